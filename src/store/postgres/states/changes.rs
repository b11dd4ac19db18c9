//! The change tail: every instance reads `device_state_changes` in
//! version order and hands each change to its feed, so that
//! WatchDeviceState sees every instance's changes, in the same order
//! everywhere. Woken by the NOTIFY each change sends (`tail::listen`), and
//! every [`POLL_INTERVAL`] in case one is lost; changes older than
//! [`CHANGES_KEPT`] are deleted, by every instance.
//!
//! Versions are handed out under the counter row's lock (see `mod.rs`), so
//! a tail reading past the last version it saw never skips one that
//! commits later. It starts at the changes made from its start on.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{decode, PgStates, CHANNEL};
use crate::{backoff::Backoff, store::postgres::tail::listen, store::postgres::StoreError};

/// How often the tail looks for changes when no notification came.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Changes one read takes at most.
const FETCH: i64 = 1_000;
/// How long changes are kept for tails that lag.
const CHANGES_KEPT: Duration = Duration::from_secs(600);
/// How often old changes are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Starts the tail, from the changes committed from now on, until
/// `shutdown`.
pub(super) async fn start(states: PgStates, shutdown: CancellationToken) -> Result<(), StoreError> {
    let last: i64 = sqlx::query_scalar("SELECT version FROM device_state_counter WHERE id = 1")
        .fetch_one(&states.pool)
        .await?;
    let wake = Arc::new(Notify::new());
    tokio::spawn(listen(
        states.pool.clone(),
        CHANNEL,
        wake.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(async move {
        tokio::select! {
            () = follow(&states, last, &wake) => {}
            () = shutdown.cancelled() => {}
        }
    });
    Ok(())
}

/// Reads what is new whenever woken, and every [`POLL_INTERVAL`].
async fn follow(states: &PgStates, mut last: i64, wake: &Notify) {
    let mut backoff = Backoff::default();
    let mut pruned = Instant::now();
    loop {
        match catch_up(states, &mut last).await {
            Ok(true) => continue,
            Ok(false) => {
                if !backoff.is_reset() {
                    info!("following the store's device state changes again");
                    backoff.reset();
                }
                if pruned.elapsed() >= PRUNE_EVERY {
                    pruned = Instant::now();
                    prune(states).await;
                }
                let _ = tokio::time::timeout(POLL_INTERVAL, wake.notified()).await;
            }
            Err(error) => {
                if backoff.is_reset() {
                    warn!(%error, "reading device state changes from the store failed; watchers lag until it works");
                }
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}

/// Hands the changes after `last` (one fetch) to the feed; returns whether
/// more may follow.
async fn catch_up(states: &PgStates, last: &mut i64) -> Result<bool, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT version, device_id, state FROM device_state_changes \
         WHERE version > $1 ORDER BY version LIMIT $2",
    )
    .bind(*last)
    .bind(FETCH)
    .fetch_all(&states.pool)
    .await?;
    for row in &rows {
        let version: i64 = row.try_get("version")?;
        if version != *last + 1 {
            // Versions have no holes: these were deleted before this tail
            // read them (it lagged for longer than CHANGES_KEPT).
            warn!(
                missed = version - *last - 1,
                "device state changes deleted before this instance read them; watchers missed them"
            );
        }
        *last = version;
        states.feed.send(&decode(row)?);
    }
    Ok(rows.len() as i64 == FETCH)
}

/// Deletes changes older than [`CHANGES_KEPT`].
async fn prune(states: &PgStates) {
    let deleted = sqlx::query(
        "DELETE FROM device_state_changes WHERE changed_at < now() - $1 * interval '1 second'",
    )
    .bind(CHANGES_KEPT.as_secs_f64())
    .execute(&states.pool)
    .await;
    if let Err(error) = deleted {
        warn!(%error, "old device state changes not deleted; retried in a minute");
    }
}
