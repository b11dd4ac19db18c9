//! Reading the table back: the device list at startup, ListReadings pages
//! and WatchReadings replays beyond the memory window, on the read pool
//! (see the parent module: readers cannot starve the writer). Nothing here
//! writes.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sqlx::{postgres::PgRow, PgPool, Row};

use futures_util::future::BoxFuture;

use super::{micros, writer, Postgres, StoreError};
use crate::{
    aggregate::{AggregateQuery, Series},
    buffer::{CursorError, DeviceInfo, ListPage, ListQuery, Reading, ReadingFilter},
    hub::History,
    log_limit::LogLimit,
};

/// Devices read per statement while restoring the device list at startup.
const DEVICE_BATCH: i64 = 1_000;
/// Rows fetched per statement while filling a page or a replay batch (or
/// following the table, with replicas), and the payload bytes one fetch
/// holds at most (beyond them, one row more).
pub(super) const FETCH_ROWS: i64 = 1_000;
const FETCH_BYTES: i64 = 4 << 20;
/// Rows one page looks at, at most: a filter that matches little stops
/// there with a page token to go on from (a page may then hold fewer
/// readings than asked for, as AIP-158 allows).
const MAX_SCAN_ROWS: usize = 100_000;

impl Postgres {
    /// The device records (at most `max`, in id order), each with its newest
    /// reading unless retention deleted it or it is past `max_bytes` of
    /// newest payloads (what the hub keeps of them, `--devices-max-bytes`):
    /// the device list as it was.
    ///
    /// Read in batches of [`DEVICE_BATCH`] devices (keyset pages of the
    /// `devices` primary key), each first without payloads: the newest
    /// readings that fit what is left of the budget, in id order as the
    /// hub takes them (`Devices::restore`), are then read by number. So
    /// the restore holds the records the hub lists anyway, one batch's rows
    /// and no more payload bytes than the hub keeps, however many devices
    /// and however large their readings.
    pub async fn devices(
        &self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(DeviceInfo, Option<Reading>)>, StoreError> {
        let mut budget = max_bytes;
        let mut devices = Vec::new();
        let mut after = String::new();
        while devices.len() < max {
            let batch = DEVICE_BATCH.min(i64::try_from(max - devices.len()).unwrap_or(i64::MAX));
            let rows = sqlx::query(
                "SELECT d.device_id, \
                        (extract(epoch FROM d.first_seen) * 1000000)::int8, \
                        (extract(epoch FROM d.last_seen) * 1000000)::int8, \
                        d.status, \
                        (extract(epoch FROM d.status_changed_at) * 1000000)::int8, \
                        r.seq, octet_length(r.payload) \
                 FROM devices d LEFT JOIN readings r ON r.seq = d.last_reading_seq \
                 WHERE d.device_id > $1 ORDER BY d.device_id LIMIT $2",
            )
            .bind(&after)
            .bind(batch)
            .fetch_all(self.read_pool())
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.try_get::<String, _>(0)?;
            let mut records = Vec::with_capacity(rows.len());
            let mut wanted = Vec::new();
            for row in &rows {
                let micros = |i: usize| -> Result<u64, sqlx::Error> {
                    Ok(row.try_get::<Option<i64>, _>(i)?.unwrap_or(0).max(0) as u64)
                };
                let info = DeviceInfo {
                    device_id: row.try_get::<&str, _>(0)?.into(),
                    first_seen_micros: micros(1)?,
                    last_seen_micros: micros(2)?,
                    buffered: 0,
                    status: writer::status_of(row.try_get(3)?),
                    status_changed_micros: micros(4)?,
                };
                let newest = row.try_get::<Option<i64>, _>(5)?;
                let len = row.try_get::<Option<i32>, _>(6)?.unwrap_or(0).max(0) as usize;
                // The hub's rule: a payload that does not fit is left out,
                // and a smaller one after it may still fit.
                let kept = newest.filter(|_| len <= budget);
                if let Some(seq) = kept {
                    budget -= len;
                    wanted.push(seq);
                }
                records.push((info, kept));
            }
            let mut newest = std::collections::HashMap::with_capacity(wanted.len());
            if !wanted.is_empty() {
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    reading_columns!(),
                    " FROM readings WHERE seq = ANY($1)"
                ))
                .bind(&wanted)
                .fetch_all(self.read_pool())
                .await?;
                for row in &rows {
                    let reading = reading(row)?;
                    newest.insert(reading.seq as i64, reading);
                }
            }
            // A reading missing now was deleted by retention in between.
            devices.extend(
                records
                    .into_iter()
                    .map(|(info, seq)| (info, seq.and_then(|s| newest.remove(&s)))),
            );
        }
        Ok(devices)
    }

    /// One page of readings for `query`, with the memory buffer's meaning
    /// (filters, order, cursor, byte budget).
    async fn list(&self, query: &ListQuery) -> Result<ListPage, CursorError> {
        self.list_inner(query).await.map_err(unavailable)
    }

    async fn list_inner(&self, query: &ListQuery) -> Result<ListPage, sqlx::Error> {
        // The sequence range [lo, hi) the time bounds and the cursor allow.
        let mut lo = match query.start {
            Some(start) => match self.first_seq_at_or_after(start).await? {
                Some(seq) => seq,
                None => return Ok(ListPage::default()),
            },
            None => 0,
        };
        let mut hi = match query.end {
            Some(end) => self.first_seq_at_or_after(end).await?.unwrap_or(u64::MAX),
            None => u64::MAX,
        };
        match (query.cursor, query.oldest_first) {
            (Some(c), true) => lo = lo.max(c),
            (Some(c), false) => hi = hi.min(c.saturating_add(1)),
            (None, _) => {}
        }
        let limit = query.limit.max(1);
        let max_bytes = query.max_bytes.unwrap_or(usize::MAX);
        let mut page = ListPage::default();
        let mut bytes = 0;
        let mut scanned = 0;
        // The first fetch asks for the page and the one reading that tells
        // whether another page follows; filters that skip rows make the
        // next fetches larger.
        let mut rows_wanted = (limit as i64 + 1).min(FETCH_ROWS);
        while lo < hi {
            let Fetched { rows, more } = self
                .fetch(
                    self.read_pool(),
                    query.filter.device_id.as_deref(),
                    lo,
                    hi,
                    query.oldest_first,
                    rows_wanted,
                )
                .await?;
            rows_wanted = FETCH_ROWS;
            for row in rows {
                let reading = reading(&row)?;
                scanned += 1;
                if query.oldest_first {
                    lo = reading.seq + 1;
                } else {
                    hi = reading.seq;
                }
                if !matches(&query.filter, &reading) {
                    continue;
                }
                let len = reading.payload.len();
                if page.readings.len() == limit
                    || (!page.readings.is_empty() && bytes + len > max_bytes)
                {
                    page.next_cursor = Some(reading.seq);
                    return Ok(page);
                }
                bytes += len;
                page.readings.push(reading);
            }
            if !more {
                break;
            }
            if scanned >= MAX_SCAN_ROWS && lo < hi {
                // Where the next page goes on looking.
                page.next_cursor = Some(if query.oldest_first { lo } else { hi - 1 });
                break;
            }
        }
        Ok(page)
    }

    /// For a watcher whose cursor `after` is older than the memory window,
    /// which starts at `below`: the next readings after `after` (and before
    /// `below`) matching `filter`, and the last sequence number looked at.
    /// A watcher of one device reads that device's rows only (its index),
    /// not everyone's to filter them here.
    ///
    /// Numbers are committed without gaps, so a missing number means
    /// retention deleted it: that is reported as an eviction.
    async fn scan_after(
        &self,
        after: u64,
        below: u64,
        filter: &ReadingFilter,
    ) -> Result<(Vec<Reading>, u64), CursorError> {
        let device_id = filter.device_id.as_deref();
        let Fetched { rows, more } = self
            .fetch(
                self.read_pool(),
                device_id,
                after + 1,
                below,
                true,
                FETCH_ROWS,
            )
            .await
            .map_err(unavailable)?;
        let readings: Vec<Reading> = rows
            .iter()
            .map(reading)
            .collect::<Result<_, _>>()
            .map_err(unavailable)?;
        // The first number still kept after `after`. All devices' rows: the
        // first one read. One device's: the table's oldest, asked after the
        // fetch; retention only ever deletes from the oldest up, so if
        // `after + 1` is still kept now it was when the fetch ran, which
        // then missed nothing.
        let first_kept = match device_id {
            None => readings.first().map_or(below, |r| r.seq),
            Some(_) => {
                let oldest: Option<i64> = sqlx::query_scalar("SELECT min(seq) FROM readings")
                    .fetch_one(self.read_pool())
                    .await
                    .map_err(unavailable)?;
                oldest.map_or(below, |s| (s.max(0) as u64).min(below))
            }
        };
        if first_kept > after + 1 {
            return Err(CursorError::Evicted {
                missed_from: after + 1,
                missed_to: first_kept - 1,
            });
        }
        let cursor = readings.last().map_or(after, |r| r.seq);
        let batch: Vec<Reading> = readings
            .into_iter()
            .filter(|r| matches(filter, r))
            .collect();
        // A short fetch read everything up to the memory window.
        let cursor = match more {
            false => below - 1,
            true => cursor,
        };
        Ok((batch, cursor))
    }

    /// Sequence number of the first reading received at or after `at`.
    async fn first_seq_at_or_after(&self, at: SystemTime) -> Result<Option<u64>, sqlx::Error> {
        let seq: Option<i64> = sqlx::query_scalar(
            "SELECT seq FROM readings \
             WHERE received_at >= 'epoch'::timestamptz + $1 * interval '1 microsecond' \
             ORDER BY received_at, seq LIMIT 1",
        )
        .bind(micros(at) as i64)
        .fetch_optional(self.read_pool())
        .await?;
        Ok(seq.map(|s| s as u64))
    }

    /// Up to `rows` readings with `lo <= seq < hi`, of one device or all,
    /// in either order, and no more than [`FETCH_BYTES`] of payloads (and
    /// one row).
    pub(super) async fn fetch(
        &self,
        pool: &PgPool,
        device_id: Option<&str>,
        lo: u64,
        hi: u64,
        ascending: bool,
        rows: i64,
    ) -> Result<Fetched, sqlx::Error> {
        // Four constant statements (one per index and order), so each is
        // prepared with a plan that uses its index. The running sum of
        // payload sizes is taken as the index delivers rows, and the
        // LIMIT stops it: the database reads no further than it returns.
        macro_rules! select {
            ($where:literal, $order:literal) => {
                concat!(
                    "SELECT ",
                    reading_columns!(),
                    " FROM (",
                    "SELECT *, sum(octet_length(payload)) OVER (ORDER BY ",
                    $order,
                    ") AS upto ",
                    "FROM readings WHERE ",
                    $where,
                    " ORDER BY ",
                    $order,
                    " LIMIT $3) r ",
                    "WHERE upto - octet_length(payload) < $4 ORDER BY ",
                    $order
                )
            };
        }
        let sql = match (device_id.is_some(), ascending) {
            (false, true) => select!("seq >= $1 AND seq < $2", "seq"),
            (false, false) => select!("seq >= $1 AND seq < $2", "seq DESC"),
            (true, true) => select!(
                "device_id = $5 AND seq >= $1 AND seq < $2",
                "device_id, seq"
            ),
            (true, false) => select!(
                "device_id = $5 AND seq >= $1 AND seq < $2",
                "device_id DESC, seq DESC"
            ),
        };
        let mut statement = sqlx::query(sql)
            .bind(to_i64(lo))
            .bind(to_i64(hi))
            .bind(rows)
            .bind(FETCH_BYTES);
        if let Some(device_id) = device_id {
            statement = statement.bind(device_id);
        }
        let rows_got = statement.fetch_all(pool).await?;
        let mut bytes = 0;
        for row in &rows_got {
            bytes += row.try_get_raw(3)?.as_bytes().map_or(0, <[u8]>::len) as i64;
        }
        // Cut by the row limit or by bytes: there may be more.
        let more = rows_got.len() as i64 == rows || bytes >= FETCH_BYTES;
        Ok(Fetched {
            rows: rows_got,
            more,
        })
    }
}

/// What [`Postgres::fetch`] read.
pub(super) struct Fetched {
    pub rows: Vec<PgRow>,
    /// Whether rows may follow in the range (the fetch was cut short).
    pub more: bool,
}

pub(super) fn to_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn matches(filter: &ReadingFilter, reading: &Reading) -> bool {
    filter.matches_source(reading.device_id(), reading.topic())
}

/// A row of [`reading_columns`] as a reading.
pub(super) fn reading(row: &PgRow) -> Result<Reading, sqlx::Error> {
    let seq: i64 = row.try_get(0)?;
    let device_id: &str = row.try_get(1)?;
    let topic: &str = row.try_get(2)?;
    let payload: Vec<u8> = row.try_get(3)?;
    let qos: i16 = row.try_get(4)?;
    let retained: bool = row.try_get(5)?;
    let micros: i64 = row.try_get(6)?;
    Ok(Reading::new(
        seq as u64,
        device_id,
        topic,
        SystemTime::UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64),
        Bytes::from(payload),
        qos as u8,
        retained,
    ))
}

/// Failed reads, rate-limited: when the read pool is exhausted, every
/// caller beyond it fails at once.
static READ_FAILED_LOG: LogLimit = LogLimit::new();

/// A failed read (no connection within [`super::READ_ACQUIRE_TIMEOUT`], the read
/// timeout, the database down): logged here with its cause, reported to
/// the caller as the store being unavailable (UNAVAILABLE: try again).
pub(super) fn unavailable(error: sqlx::Error) -> CursorError {
    if let Some(left_out) = READ_FAILED_LOG.allow() {
        tracing::warn!(%error, similar_lines_left_out = left_out, "reading from the PostgreSQL store failed");
    }
    CursorError::Unavailable
}

/// The hub's view of the table: pages and replays beyond its memory window.
impl History for Postgres {
    fn oldest_seq(&self) -> Option<u64> {
        Postgres::oldest_seq(self)
    }

    fn next_seq(&self) -> BoxFuture<'_, Option<u64>> {
        Box::pin(async { Postgres::next_seq(self).await.ok() })
    }

    fn list<'a>(&'a self, query: &'a ListQuery) -> BoxFuture<'a, Result<ListPage, CursorError>> {
        Box::pin(Postgres::list(self, query))
    }

    fn scan_after<'a>(
        &'a self,
        after: u64,
        below: u64,
        filter: &'a ReadingFilter,
    ) -> BoxFuture<'a, Result<(Vec<Reading>, u64), CursorError>> {
        Box::pin(Postgres::scan_after(self, after, below, filter))
    }

    fn aggregate<'a>(
        &'a self,
        query: &'a AggregateQuery,
    ) -> BoxFuture<'a, Result<Series, CursorError>> {
        Box::pin(self.aggregate_readings(query))
    }
}
