//! Desired changes, committed together: UpdateDesiredState calls that come
//! in while a commit is in progress wait for the next one, which takes up
//! to [`BATCH`] of them in one transaction (one lock of the counter row,
//! one flush to disk). Each call is still its own step: applied in arrival
//! order, its `expected_version` checked against the state as the calls
//! before it in the batch left it, and answered once the batch committed.
//! Without it, every call waited for its own flush under the counter's
//! lock, and 64 callers made 640 calls/s (BENCHMARKS.md, issue 28).

use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use super::{unavailable, Change};
use crate::state::{Object, Side, StorageError, Updated};

/// Calls one transaction takes at most.
const BATCH: usize = 256;
/// Calls waiting for a transaction, at most; more wait to be queued.
const QUEUE: usize = 1024;

/// One UpdateDesiredState call's change.
pub(super) struct Request {
    pub device_id: String,
    pub patch: Object,
    pub expected_version: i64,
    pub now: SystemTime,
    pub reply: oneshot::Sender<Result<Updated, StorageError>>,
}

pub(super) type Sender = mpsc::Sender<Request>;

/// Starts the task that commits what the returned sender is given; it ends
/// when every sender is gone.
pub(super) fn start(pool: sqlx::PgPool) -> Sender {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let mut requests = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut requests, BATCH).await > 0 {
            commit(&pool, requests.drain(..)).await;
        }
    });
    tx
}

/// Applies and commits one batch, and answers each call.
async fn commit(pool: &sqlx::PgPool, requests: impl Iterator<Item = Request>) {
    let requests: Vec<Request> = requests.collect();
    let mut ids: Vec<String> = requests.iter().map(|r| r.device_id.clone()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut change = match Change::begin(pool, &ids).await {
        Ok(change) => change,
        Err(error) => return answer_all(requests, &unavailable(error)),
    };
    let mut outcomes = Vec::with_capacity(requests.len());
    for r in &requests {
        let current = change.version_of(&r.device_id);
        let outcome = if r.expected_version != 0 && r.expected_version != current {
            Updated::Stale { current }
        } else {
            match change.apply(&r.device_id, Side::Desired, &r.patch, r.now) {
                Ok(state) => Updated::Applied(state.clone()),
                Err(why) => Updated::Refused(why),
            }
        };
        outcomes.push(outcome);
    }
    if let Err(error) = change.commit(false).await {
        return answer_all(requests, &unavailable(error));
    }
    for (request, outcome) in requests.into_iter().zip(outcomes) {
        let _ = request.reply.send(Ok(outcome));
    }
}

fn answer_all(requests: Vec<Request>, error: &StorageError) {
    for request in requests {
        let _ = request.reply.send(Err(error.clone()));
    }
}
