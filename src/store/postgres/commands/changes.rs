//! The change tail: every instance reads `command_changes` in `seq` order
//! and hands each change, with its command, to its feed, so that
//! WatchCommands and waiting SendCommand calls see every instance's
//! changes, in the same order everywhere. Woken by the NOTIFY each change
//! sends (`tail::listen`), and every [`POLL_INTERVAL`] in case one is lost.
//!
//! Changes are numbered under the counter row's lock (see `mod.rs`), so a
//! tail reading past the last number it saw never skips one that commits
//! later. It starts at the changes made from its start on, and first hands
//! the feed the active commands, so that replies to them are recognized.

use std::{sync::Arc, time::Duration};

use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{command, state_of, time, PgCommandLog, CHANNEL};
use crate::{backoff::Backoff, store::postgres::tail::listen, store::postgres::StoreError};

/// How often the tail looks for changes when no notification came.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Changes one read takes at most.
const FETCH: i64 = 1_000;

/// Starts the tail, from the changes committed from now on, until
/// `shutdown`.
pub(super) async fn start(
    log: PgCommandLog,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    let next: i64 = sqlx::query_scalar("SELECT next_seq FROM command_change_counter WHERE id = 1")
        .fetch_one(&log.pool)
        .await?;
    const ACTIVE: &str = concat!(
        "SELECT ",
        command_columns!(),
        " FROM commands WHERE state IN (1, 2)"
    );
    for row in sqlx::query(ACTIVE).fetch_all(&log.pool).await? {
        log.feed.send(&command(&row)?);
    }
    let wake = Arc::new(Notify::new());
    tokio::spawn(listen(
        log.pool.clone(),
        CHANNEL,
        wake.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(async move {
        tokio::select! {
            () = follow(&log, next - 1, &wake) => {}
            () = shutdown.cancelled() => {}
        }
    });
    Ok(())
}

/// Reads what is new whenever woken, and every [`POLL_INTERVAL`].
async fn follow(log: &PgCommandLog, mut last: i64, wake: &Notify) {
    let mut backoff = Backoff::default();
    loop {
        match catch_up(log, &mut last).await {
            Ok(true) => continue,
            Ok(false) => {
                if !backoff.is_reset() {
                    info!("following the store's command changes again");
                    backoff.reset();
                }
                let _ = tokio::time::timeout(POLL_INTERVAL, wake.notified()).await;
            }
            Err(error) => {
                if backoff.is_reset() {
                    warn!(%error, "reading command changes from the store failed; watchers lag until it works");
                }
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}

/// Hands the changes after `last` (one fetch) to the feed; returns whether
/// more may follow.
async fn catch_up(log: &PgCommandLog, last: &mut i64) -> Result<bool, sqlx::Error> {
    // The change's state, attempts and time over the command's row (which
    // may have moved on); a reply only with the change that recorded it.
    const CHANGES: &str = concat!(
        "SELECT ch.seq, ch.state AS change_state, ch.attempts AS change_attempts, ",
        micros_of!("ch.update_time"),
        " AS change_time, c.* FROM command_changes ch \
         LEFT JOIN LATERAL (SELECT ",
        command_columns!(),
        " FROM commands WHERE commands.id = ch.command_id) c ON true \
         WHERE ch.seq > $1 ORDER BY ch.seq LIMIT $2"
    );
    let rows = sqlx::query(CHANGES)
        .bind(*last)
        .bind(FETCH)
        .fetch_all(&log.pool)
        .await?;
    for row in &rows {
        *last = row.try_get("seq")?;
        // A command forgotten since: nothing to tell.
        if row.try_get::<Option<String>, _>("id")?.is_none() {
            continue;
        }
        let mut change = command(row)?;
        change.state = state_of(row.try_get("change_state")?)?;
        change.attempts = row.try_get::<i32, _>("change_attempts")?.max(0) as u32;
        change.update_time = time(row.try_get("change_time")?);
        if !matches!(
            change.state,
            crate::commands::CommandState::Succeeded | crate::commands::CommandState::Failed
        ) {
            change.reply = None;
        }
        log.feed.send(&change);
    }
    Ok(rows.len() as i64 == FETCH)
}
