//! AggregateReadings in SQL: one statement buckets a device's readings with
//! `date_bin` and aggregates the numbers at each field's JSON Pointer, on
//! the read pool, under the read timeout. The figures are those of
//! memory's fold (`src/aggregate.rs`): the same readings (the time range
//! turned into a sequence range, as pages do, then the `(device_id, seq)`
//! index), the same buckets, numbers as float8, `first` and `last` by
//! sequence number.

use sqlx::Row;

use super::{
    reads::{to_i64, unavailable},
    Postgres,
};
use crate::{
    aggregate::{pointer_tokens, AggregateQuery, Bucket, Series},
    buffer::CursorError,
};

/// The statement, with the expressions that read a payload as JSON and a
/// JSON number as float8 left to fill in ([`FAST`] and [`SAFE`]).
///
/// `$1` device, `$2` the fields' paths as a JSON array of token arrays, `$3`
/// and `$4` the range in microseconds, `$5` the bucket in microseconds.
///
/// How it is shaped, measured on a day of one device among 10 000 000
/// readings (BENCHMARKS.md, scenario 16):
/// - the device's readings in sequence order by the `(device_id, seq)`
///   index (the `ORDER BY` makes it an index scan: the bitmap scan the
///   planner picks otherwise goes lossy under the default `work_mem` and
///   rechecks 20 times the rows);
/// - each payload parsed once, each field looked up once per reading (the
///   `OFFSET 0` subqueries are not flattened, which would repeat the parse
///   in every expression that uses it), the fields materialized once;
/// - `first`/`last` from the least/greatest `[seq, value]` pair (array
///   comparison), which needs no sort per bucket; sequence numbers are far
///   below 2^53, so exact as float8.
macro_rules! aggregate_sql {
    ($doc:literal, $number:literal, $sum:literal) => {
        concat!(
            "WITH fields AS MATERIALIZED (",
            " SELECT f.i, ARRAY(SELECT jsonb_array_elements_text(f.path)) AS path",
            " FROM jsonb_array_elements($2::jsonb) WITH ORDINALITY AS f(path, i)",
            ") ",
            "SELECT v.i, (extract(epoch FROM d.bucket) * 1000000)::bigint, count(*),",
            " min(w.n), max(w.n), ",
            $sum,
            "(w.n),",
            " (min(ARRAY[r.seq::float8, w.n]))[2], (max(ARRAY[r.seq::float8, w.n]))[2]",
            " FROM (SELECT seq, received_at, payload FROM readings",
            "  WHERE device_id = $1",
            "  AND seq >= (SELECT seq FROM readings",
            "   WHERE received_at >= 'epoch'::timestamptz + $3 * interval '1 microsecond'",
            "   ORDER BY received_at, seq LIMIT 1)",
            "  AND seq < coalesce((SELECT seq FROM readings",
            "   WHERE received_at >= 'epoch'::timestamptz + $4 * interval '1 microsecond'",
            "   ORDER BY received_at, seq LIMIT 1), 9223372036854775807)",
            "  ORDER BY device_id, seq OFFSET 0) r",
            " CROSS JOIN LATERAL (SELECT",
            "  date_bin($5 * interval '1 microsecond', r.received_at, timestamptz 'epoch') AS bucket,",
            "  ",
            $doc,
            " AS doc OFFSET 0) d",
            " CROSS JOIN LATERAL (SELECT f.i, d.doc #> f.path AS x FROM fields f OFFSET 0) v",
            " CROSS JOIN LATERAL (SELECT CASE WHEN jsonb_typeof(v.x) = 'number' THEN ",
            $number,
            " END AS n OFFSET 0) w",
            " WHERE w.n IS NOT NULL",
            " GROUP BY v.i, d.bucket ORDER BY v.i, d.bucket"
        )
    };
}

/// Plain casts for payloads that start like a JSON object or array (what
/// devices send); the others (status messages such as `online`, bare
/// values) through `devicehub_jsonb` (migration 0006), which gives NULL
/// for what is not JSON. A document that starts like one and is not, a
/// number float8 does not hold, or a sum past it fails the statement:
/// [`SAFE`] then runs instead.
const FAST: &str = aggregate_sql!(
    "CASE WHEN substring(r.payload FROM 1 FOR 1) IN ('\\x7b'::bytea, '\\x5b'::bytea) \
     THEN convert_from(r.payload, 'UTF8')::jsonb ELSE devicehub_jsonb(r.payload) END",
    "v.x::float8",
    "sum"
);

/// Every payload and number through the functions that never fail: slower
/// (a subtransaction each), for ranges that hold a payload [`FAST`] chokes
/// on.
const SAFE: &str = aggregate_sql!(
    "devicehub_jsonb(r.payload)",
    "devicehub_float8(v.x)",
    "devicehub_sum"
);

/// AggregateReadings statements at once, of the read pool's
/// [`super::READ_CONNECTIONS`]; more wait up to
/// [`super::READ_ACQUIRE_TIMEOUT`], as for a connection, then fail.
pub(super) const AT_ONCE: usize = 2;

impl Postgres {
    async fn aggregate(&self, query: &AggregateQuery) -> Result<Series, sqlx::Error> {
        let permit = tokio::time::timeout(
            super::READ_ACQUIRE_TIMEOUT,
            self.shared.aggregates.acquire(),
        )
        .await;
        let Ok(Ok(_permit)) = permit else {
            return Err(sqlx::Error::PoolTimedOut);
        };
        match self.aggregate_with(FAST, query).await {
            Err(error) if payload_error(&error) => self.aggregate_with(SAFE, query).await,
            result => result,
        }
    }

    async fn aggregate_with(
        &self,
        sql: &'static str,
        query: &AggregateQuery,
    ) -> Result<Series, sqlx::Error> {
        let paths: Vec<Vec<String>> = query.fields.iter().map(|f| pointer_tokens(f)).collect();
        let paths = serde_json::to_string(&paths).unwrap_or_default();
        let rows = sqlx::query(sql)
            .bind(&query.device_id)
            .bind(paths)
            .bind(to_i64(query.start_micros))
            .bind(to_i64(query.end_micros))
            .bind(to_i64(query.bucket_micros))
            .fetch_all(self.read_pool())
            .await?;
        let mut series: Series = vec![Vec::new(); query.fields.len()];
        for row in rows {
            let field: i64 = row.try_get(0)?;
            let start: i64 = row.try_get(1)?;
            let count: i64 = row.try_get(2)?;
            let bucket = Bucket {
                start_micros: start.max(0) as u64,
                count: count.max(0) as u64,
                min: row.try_get(3)?,
                max: row.try_get(4)?,
                sum: row.try_get(5)?,
                first: row.try_get(6)?,
                last: row.try_get(7)?,
            };
            // WITH ORDINALITY counts from 1.
            if let Some(buckets) = usize::try_from(field - 1)
                .ok()
                .and_then(|i| series.get_mut(i))
            {
                buckets.push(bucket);
            }
        }
        Ok(series)
    }

    pub(super) async fn aggregate_readings(
        &self,
        query: &AggregateQuery,
    ) -> Result<Series, CursorError> {
        self.aggregate(query).await.map_err(unavailable)
    }
}

/// Whether the statement failed on what a payload holds: a data exception
/// (class 22: not UTF-8, not JSON, a number out of range) or JSON nested
/// past the stack limit (54001).
fn payload_error(error: &sqlx::Error) -> bool {
    let code = error.as_database_error().and_then(|e| e.code());
    code.is_some_and(|code| code.starts_with("22") || code == "54001")
}
