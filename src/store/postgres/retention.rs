//! Retention: readings received longer than `--store-retention` ago are
//! deleted in the background, oldest first, [`DELETE_ROWS`] per statement so
//! no transaction holds many locks or much WAL at once. It uses ingest's
//! pool: client reads that take every read connection never delay it.

use std::{
    sync::atomic::Ordering,
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{micros, Postgres};

/// Readings one DELETE removes at most.
const DELETE_ROWS: i64 = 10_000;
/// How often retention runs at most (and at least every tenth of the
/// retention, for short ones).
const INTERVAL_MAX: Duration = Duration::from_secs(60);
const INTERVAL_MIN: Duration = Duration::from_millis(500);

/// Starts the retention task; it ends at `shutdown`.
pub fn spawn_retention(store: Postgres, retention: Duration, shutdown: CancellationToken) {
    let interval = (retention / 10).clamp(INTERVAL_MIN, INTERVAL_MAX);
    tokio::spawn(async move {
        loop {
            let cutoff = SystemTime::now()
                .checked_sub(retention)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            tokio::select! {
                result = delete_before(&store, cutoff) => match result {
                    Ok(0) => {}
                    Ok(deleted) => info!(deleted, ?retention, "retention deleted old readings"),
                    Err(error) => warn!(%error, "retention failed; trying again later"),
                },
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

/// Deletes every reading received before `cutoff`, in bounded statements,
/// and moves the store's oldest sequence number up. Returns how many.
async fn delete_before(store: &Postgres, cutoff: SystemTime) -> Result<u64, sqlx::Error> {
    let cutoff = micros(cutoff) as i64;
    let mut total = 0;
    loop {
        // Received times follow sequence numbers, so the oldest by time are
        // the lowest numbers: what is left stays one contiguous range.
        let deleted = sqlx::query(
            "DELETE FROM readings WHERE seq IN ( \
                 SELECT seq FROM readings \
                 WHERE received_at < 'epoch'::timestamptz + $1 * interval '1 microsecond' \
                 ORDER BY received_at LIMIT $2)",
        )
        .bind(cutoff)
        .bind(DELETE_ROWS)
        .execute(store.write_pool())
        .await?
        .rows_affected();
        if deleted == 0 {
            return Ok(total);
        }
        total += deleted;
        let counters = &store.shared.counters;
        counters
            .retention_deleted
            .fetch_add(deleted, Ordering::Relaxed);
        let oldest: Option<i64> = sqlx::query_scalar("SELECT min(seq) FROM readings")
            .fetch_one(store.write_pool())
            .await?;
        // Only ever raised here (a commit lowers it when the table was
        // empty): as a lower bound it is always safe, since a page that
        // thinks the table reaches further back only asks it in vain.
        if let Some(oldest) = oldest {
            store
                .shared
                .oldest_seq
                .fetch_max(oldest as u64, Ordering::AcqRel);
        }
    }
}
