//! Aggregated history (AggregateReadings): what a request asks for (a
//! device, JSON Pointers, a range and a bucket width), how buckets are
//! aligned and bounded, and the fold of readings into buckets.
//!
//! Memory folds its readings here ([`Fold`]); the store computes the same
//! figures in SQL (`store/postgres/aggregate.rs`), and the hub joins the
//! two at a bucket boundary (`hub/aggregate.rs`). This module knows neither
//! gRPC nor SQL.
//!
//! The rules both sides follow, so that either gives the same figures:
//! - a bucket starts at a multiple of its width since the Unix epoch
//!   (PostgreSQL's `date_bin` with origin 1970-01-01), in microseconds;
//! - a reading counts for a field when its payload is JSON and the value
//!   at the pointer is a number a float holds (`numbers.rs`: read as
//!   PostgreSQL's `jsonb` and `float8` read it);
//! - `first` and `last` are by sequence number, which follows arrival.

mod numbers;

use numbers::numbers_at;

/// Most fields one request may aggregate.
pub const MAX_FIELDS: usize = 16;

/// Most buckets one series may span, counting the edge ones: a range over
/// this is refused rather than answered slowly (ThingsBoard's limit, 700,
/// is what its users hit; 10 000 is a 7-day chart at one-minute buckets).
pub const MAX_BUCKETS: u64 = 10_000;

/// The narrowest bucket, in microseconds (1 ms).
pub const MIN_BUCKET_MICROS: u64 = 1_000;

/// The longest field (JSON Pointer) accepted, in bytes.
pub const MAX_FIELD_BYTES: usize = 1_024;

/// One AggregateReadings request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateQuery {
    pub device_id: String,
    /// JSON Pointers (RFC 6901), each checked by [`pointer_error`].
    pub fields: Vec<String>,
    /// Readings received at or after this time (microseconds since 1970).
    pub start_micros: u64,
    /// Readings received before this time.
    pub end_micros: u64,
    /// The bucket width in microseconds, at least [`MIN_BUCKET_MICROS`].
    pub bucket_micros: u64,
}

impl AggregateQuery {
    /// The start of the bucket that holds `micros`.
    pub fn bucket_of(&self, micros: u64) -> u64 {
        micros - micros % self.bucket_micros
    }

    /// How many buckets the range spans, the edge ones included (the
    /// first starts at or before `start_micros`).
    pub fn bucket_count(&self) -> u64 {
        if self.end_micros <= self.start_micros {
            return 0;
        }
        (self.bucket_of(self.end_micros - 1) - self.bucket_of(self.start_micros))
            / self.bucket_micros
            + 1
    }

    /// The same query over `[start_micros, end_micros)` only.
    pub fn narrowed(&self, start_micros: u64, end_micros: u64) -> Self {
        Self {
            start_micros,
            end_micros,
            ..self.clone()
        }
    }

    /// The first bucket boundary at or after `micros`.
    pub fn boundary_at_or_after(&self, micros: u64) -> u64 {
        let start = self.bucket_of(micros);
        if start == micros {
            micros
        } else {
            start.saturating_add(self.bucket_micros)
        }
    }
}

/// Why `field` is not a JSON Pointer (RFC 6901), if it is not: empty (the
/// whole document) or `/`-separated tokens in which `~` is only ever `~0`
/// or `~1`.
pub fn pointer_error(field: &str) -> Option<&'static str> {
    if field.len() > MAX_FIELD_BYTES {
        return Some("is longer than 1024 bytes");
    }
    if field.contains('\0') {
        // `jsonb`, which the store reads fields as, refuses it.
        return Some("holds a NUL character");
    }
    if !field.is_empty() && !field.starts_with('/') {
        return Some("is not a JSON Pointer: it must be empty or start with '/'");
    }
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Some("is not a JSON Pointer: '~' must be followed by '0' or '1'");
        }
    }
    if pointer_tokens(field).iter().any(|t| ambiguous_index(t)) {
        return Some(
            "has a token that reads as an array index in one reading and not in another \
             (a sign, leading zeros or spaces): write indexes as 0, 1, 2...",
        );
    }
    None
}

/// Whether PostgreSQL's `#>` would take `token` as an array index (C's
/// `strtol`: leading spaces, a sign, digits; negative counts from the end)
/// while RFC 6901 (and serde_json) would not (only `0` or digits without a
/// leading zero): memory and the store would then read different values.
fn ambiguous_index(token: &str) -> bool {
    let trimmed = token.trim_start_matches([' ', '\t', '\n', '\u{b}', '\u{c}', '\r']);
    let digits = trimmed.strip_prefix(['+', '-']).unwrap_or(trimmed);
    let numeric = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    let canonical =
        token == "0" || (token.bytes().all(|b| b.is_ascii_digit()) && !token.starts_with('0'));
    numeric && !canonical
}

/// The tokens of a valid pointer, unescaped (`~1` is `/`, `~0` is `~`):
/// the path the store hands to `jsonb #>`.
pub fn pointer_tokens(field: &str) -> Vec<String> {
    field
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// The numbers of one field in one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Microseconds since the Unix epoch, a multiple of the bucket width.
    pub start_micros: u64,
    /// At least 1.
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub first: f64,
    pub last: f64,
}

impl Bucket {
    fn new(start_micros: u64, value: f64) -> Self {
        Self {
            start_micros,
            count: 1,
            min: value,
            max: value,
            sum: value,
            first: value,
            last: value,
        }
    }

    /// `sum / count`: derived, so both sides agree whenever their sums do.
    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }

    fn add(&mut self, value: f64) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += value;
        self.last = value;
    }
}

/// One bucket list per field, in the query's order, each ordered by time.
pub type Series = Vec<Vec<Bucket>>;

/// Readings folded into buckets, in the order they arrived.
#[derive(Debug)]
pub struct Fold<'q> {
    query: &'q AggregateQuery,
    /// Each field's pointer tokens.
    tokens: Vec<Vec<String>>,
    /// The current reading's values, one per field.
    values: Vec<Option<f64>>,
    series: Series,
}

impl<'q> Fold<'q> {
    pub fn new(query: &'q AggregateQuery) -> Self {
        Self {
            query,
            tokens: query.fields.iter().map(|f| pointer_tokens(f)).collect(),
            values: vec![None; query.fields.len()],
            series: vec![Vec::new(); query.fields.len()],
        }
    }

    /// Counts one reading, received at `received_micros` (at or after every
    /// reading added before), for each field whose value is a number.
    /// Readings outside the query's range are left out.
    pub fn add(&mut self, received_micros: u64, payload: &[u8]) {
        if received_micros < self.query.start_micros || received_micros >= self.query.end_micros {
            return;
        }
        numbers_at(payload, &self.tokens, &mut self.values);
        let start = self.query.bucket_of(received_micros);
        for (value, buckets) in self.values.iter().zip(&mut self.series) {
            let Some(value) = *value else {
                continue;
            };
            match buckets.last_mut() {
                Some(last) if last.start_micros == start => last.add(value),
                Some(last) if last.start_micros > start => {
                    // Times never go backwards as readings arrive; should
                    // one, it still lands in its own bucket.
                    match buckets.binary_search_by_key(&start, |b| b.start_micros) {
                        Ok(i) => buckets[i].add(value),
                        Err(i) => buckets.insert(i, Bucket::new(start, value)),
                    }
                }
                _ => buckets.push(Bucket::new(start, value)),
            }
        }
    }

    pub fn finish(self) -> Series {
        self.series
    }
}

/// `later`'s buckets after `earlier`'s, field by field: the two halves of a
/// range split at a bucket boundary, so no bucket is in both.
pub fn concat(mut earlier: Series, later: Series) -> Series {
    for (buckets, more) in earlier.iter_mut().zip(later) {
        buckets.extend(more);
    }
    earlier
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(fields: &[&str], start: u64, end: u64, bucket: u64) -> AggregateQuery {
        AggregateQuery {
            device_id: "d".into(),
            fields: fields.iter().map(|f| f.to_string()).collect(),
            start_micros: start,
            end_micros: end,
            bucket_micros: bucket,
        }
    }

    #[test]
    fn buckets_are_aligned_to_the_epoch_and_edges_count_only_the_range() {
        let q = query(&["/t"], 1_500, 4_500, 1_000);
        assert_eq!(q.bucket_count(), 4, "1000, 2000, 3000, 4000");
        let mut fold = Fold::new(&q);
        for (at, t) in [(1_000, 9.0), (1_499, 9.0), (1_500, 1.0), (1_999, 3.0)] {
            fold.add(at, format!("{{\"t\":{t}}}").as_bytes());
        }
        fold.add(3_100, b"{\"t\":2}");
        fold.add(4_500, b"{\"t\":100}");
        let series = fold.finish();
        let b = &series[0];
        assert_eq!(b.len(), 2, "the empty bucket at 2000 is left out: {b:?}");
        assert_eq!(b[0].start_micros, 1_000, "the edge keeps its aligned start");
        assert_eq!((b[0].count, b[0].min, b[0].max), (2, 1.0, 3.0));
        assert_eq!(
            (b[0].first, b[0].last, b[0].sum, b[0].mean()),
            (1.0, 3.0, 4.0, 2.0)
        );
        assert_eq!((b[1].start_micros, b[1].count), (3_000, 1));
    }

    #[test]
    fn only_numbers_count() {
        let q = query(&["/t", "/a/1", "", "/x~1y"], 0, 10_000, 1_000);
        let mut fold = Fold::new(&q);
        for payload in [
            &b"{\"t\":\"3\",\"a\":[0,true]}"[..],
            b"{\"t\":null}",
            b"not json",
            b"{\"t\":1e400}",
            b"{\"t\":true,\"x/y\":7}",
            b"{\"a\":[0,1],\"k\":\"\\u0000\"}",
            b"42",
            b"{\"a\":[1,2.5]}",
        ] {
            fold.add(5, payload);
        }
        let series = fold.finish();
        assert!(series[0].is_empty(), "{series:?}");
        assert_eq!(series[1][0].count, 1);
        assert_eq!(series[1][0].sum, 2.5);
        assert_eq!(series[2][0].sum, 42.0, "the whole document");
        assert_eq!(series[3][0].sum, 7.0, "~1 is '/'");
    }

    #[test]
    fn pointers_are_checked_and_unescaped() {
        assert_eq!(pointer_error(""), None);
        assert_eq!(pointer_error("/a/~0b~1c"), None);
        assert!(pointer_error("a").is_some());
        assert!(pointer_error("/a~2").is_some());
        assert!(pointer_error("/a~").is_some());
        assert!(pointer_error("/a\0").is_some());
        assert!(pointer_error(&format!("/{}", "a".repeat(MAX_FIELD_BYTES))).is_some());
        for ambiguous in ["/a/-1", "/a/01", "/a/+1", "/ 1", "/a/\t2", "/-0"] {
            assert!(pointer_error(ambiguous).is_some(), "{ambiguous}");
        }
        for fine in ["/a/0", "/a/10", "/a/-", "/a/1x", "/a/", "/a/1.5"] {
            assert_eq!(pointer_error(fine), None, "{fine}");
        }
        assert_eq!(pointer_tokens("/a/~0b~1c/"), ["a", "~b/c", ""]);
        assert!(pointer_tokens("").is_empty());
    }

    #[test]
    fn bucket_counts_and_boundaries() {
        let q = query(&[], 0, 86_400_000_000, 60_000_000);
        assert_eq!(q.bucket_count(), 1_440);
        assert_eq!(query(&[], 999, 1_000, 1_000).bucket_count(), 1);
        assert_eq!(query(&[], 999, 1_001, 1_000).bucket_count(), 2);
        assert_eq!(q.boundary_at_or_after(60_000_000), 60_000_000);
        assert_eq!(q.boundary_at_or_after(60_000_001), 120_000_000);
    }

    #[test]
    fn halves_split_at_a_boundary_concatenate() {
        let q = query(&["/t"], 0, 4_000, 1_000);
        let mut whole = Fold::new(&q);
        let (a, b) = (q.narrowed(0, 2_000), q.narrowed(2_000, 4_000));
        let (mut fa, mut fb) = (Fold::new(&a), Fold::new(&b));
        for at in (0..4_000).step_by(250) {
            let payload = format!("{{\"t\":{}}}", at % 700);
            whole.add(at, payload.as_bytes());
            fa.add(at, payload.as_bytes());
            fb.add(at, payload.as_bytes());
        }
        assert_eq!(concat(fa.finish(), fb.finish()), whole.finish());
    }
}
