//! Replicas: the tail, which makes every instance's memory window follow
//! the table in committed order, whichever instance committed.
//!
//! With `--mqtt-share-group` the broker hands each reading to one instance,
//! whose writer commits it with a NOTIFY on [`CHANNEL`] (delivered once
//! committed) and pushes it into its own memory if it follows on from what
//! memory holds. Every instance LISTENs, and on each notification reads the
//! rows numbered from its memory's next sequence number on, in order, and
//! pushes them into its hub with their numbers and times from the table. So
//! each instance holds the same readings under the same numbers, and a
//! cursor or page token from one means the same on any other.
//!
//! Why reading "from the next number on" never skips one: commits take
//! numbers one after another under the counter row's lock (see `store`), so
//! once a number is visible every lower one is committed and visible too.
//! A notification can be lost (the listening connection drops): the tail
//! also polls every [`POLL_INTERVAL`], and reads everything new after each
//! reconnect. While the database fails the tail retries with backoff;
//! memory lags, nothing is skipped. What the tail holds at once is one
//! fetch (`Postgres::fetch`: at most 1 000 rows and 4 MiB of payloads, and
//! one row). The LISTEN and the reads use ingest's pool, not the client
//! reads' (see `postgres/mod.rs`): busy pages never hold memory back.

use std::{sync::Arc, time::Duration};

use sqlx::{postgres::PgListener, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    reads::{self, FETCH_ROWS},
    writer::kind_of,
    Postgres,
};
use crate::{
    backoff::Backoff,
    buffer::{MessageKind, Reading},
    hub::{Committed, ReadingHub},
};

/// The notification channel: each commit notifies it (named in the
/// statement in `writer.rs`), tails listen.
const CHANNEL: &str = "devicehub_readings";
/// How often the tail looks for new rows when no notification came.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Starts the tail: `hub` follows the table from its next sequence number
/// on, until `shutdown`.
pub fn spawn_tail(store: Postgres, hub: ReadingHub, shutdown: CancellationToken) {
    let wake = Arc::new(Notify::new());
    tokio::spawn(listen(
        store.write_pool().clone(),
        CHANNEL,
        wake.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(async move {
        tokio::select! {
            _ = follow(&store, &hub, &wake) => {}
            _ = shutdown.cancelled() => {}
        }
    });
}

/// Reads what is new whenever woken up, and every [`POLL_INTERVAL`].
async fn follow(store: &Postgres, hub: &ReadingHub, wake: &Notify) {
    let mut backoff = Backoff::default();
    loop {
        match catch_up(store, hub).await {
            // A full fetch: there may be more right away.
            Ok(true) => continue,
            Ok(false) => {
                if !backoff.is_reset() {
                    info!("following the PostgreSQL store again");
                    backoff.reset();
                }
                let _ = tokio::time::timeout(POLL_INTERVAL, wake.notified()).await;
            }
            Err(error) => {
                if backoff.is_reset() {
                    warn!(%error, "reading new rows from the PostgreSQL store failed; memory lags behind it until it works");
                }
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}

/// LISTENs on `channel` and wakes its follower (here [`follow`]; the
/// commands' change tail too) for every notification, on a connection of
/// its own from `pool`. Its own task: the follower never cancels a receive
/// half-way. The follower is woken after every (re)connection too, to read
/// what was committed meanwhile.
pub(super) async fn listen(
    pool: sqlx::PgPool,
    channel: &'static str,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let listened = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let error = tokio::select! {
            listener = listened => match listener {
                Ok(mut listener) => {
                    backoff.reset();
                    // Rows committed before LISTEN took effect.
                    wake.notify_one();
                    loop {
                        tokio::select! {
                            // `None`: the connection dropped and is made
                            // again; the catch-up reads what was missed.
                            received = listener.try_recv() => match received {
                                Ok(_) => wake.notify_one(),
                                Err(error) => break error,
                            },
                            _ = shutdown.cancelled() => return,
                        }
                    }
                }
                Err(error) => error,
            },
            _ = shutdown.cancelled() => return,
        };
        let wait = backoff.next_wait();
        debug!(%error, retry_in = ?wait, "LISTEN on the PostgreSQL store failed; polling meanwhile");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Pushes the rows numbered from the hub's next number on (one fetch) into
/// memory; returns whether more may follow.
async fn catch_up(store: &Postgres, hub: &ReadingHub) -> Result<bool, sqlx::Error> {
    let fetched = store
        .fetch(
            store.write_pool(),
            None,
            hub.next_seq(),
            u64::MAX,
            true,
            FETCH_ROWS,
        )
        .await?;
    let mut run: Vec<(Reading, MessageKind)> = Vec::new();
    for row in &fetched.rows {
        let reading = reads::reading(row)?;
        let kind = kind_of(row.try_get("kind")?, row.try_get("status")?);
        // Numbers are contiguous but for what retention deleted: each
        // contiguous run goes in as one push.
        if let Some((first, _)) = run.first() {
            if reading.seq != first.seq + run.len() as u64 {
                push(store, hub, &run);
                run.clear();
            }
        }
        run.push((reading, kind));
    }
    push(store, hub, &run);
    Ok(fetched.more)
}

/// Pushes readings numbered without holes into memory.
fn push(store: &Postgres, hub: &ReadingHub, run: &[(Reading, MessageKind)]) {
    let Some((first, _)) = run.first() else {
        return;
    };
    store.note_committed(first.seq);
    hub.push_committed(
        first.seq,
        run.iter().map(|(r, kind)| r.as_new(*kind)),
        Committed::Tail,
    );
}
