//! Reported states on their way from devices to the storage.
//!
//! The MQTT event loop hands each message on a reported state topic to the
//! [`ReportedInbox`], a bounded queue ([`REPORTED_QUEUE`]); while it is
//! full the event loop waits (the broker holds what it has not delivered),
//! as for readings when the store's writer is full. The applier task takes what is queued, up to [`BATCH`] at once, checks each
//! (a patch that is not a JSON object, too large or too deep is dropped and
//! counted, never applied in part) and applies the batch in one step of the
//! storage (one transaction with a store). It waits out a storage that
//! does not answer, with the one backoff, keeping the batch.
//!
//! The inbox exists before the MQTT link starts, so that the retained
//! reports the broker sends first are not missed.

use std::{
    sync::{atomic::Ordering, Arc},
    time::SystemTime,
};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{
    document::parse_patch,
    feed::StateFeed,
    storage::{Reported, ReportedPatch, StateStorage},
};
use crate::{backoff::Backoff, log_limit::LogLimit};

/// Reported messages waiting to be applied, at most: with messages of at
/// most `--max-reading-bytes`, the queue's worst case is this many of them.
pub const REPORTED_QUEUE: usize = 1024;

/// Patches applied in one step, at most.
const BATCH: usize = 256;

/// A reported message: the device, the payload, when it arrived.
type Message = (String, Bytes, SystemTime);

/// Where the MQTT event loop hands reported states. Cheap to clone.
#[derive(Clone)]
pub struct ReportedInbox {
    tx: mpsc::Sender<Message>,
}

/// The other end, the applier's.
pub struct ReportedReceiver(mpsc::Receiver<Message>);

/// A new inbox.
pub fn inbox() -> (ReportedInbox, ReportedReceiver) {
    let (tx, rx) = mpsc::channel(REPORTED_QUEUE);
    (ReportedInbox { tx }, ReportedReceiver(rx))
}

impl ReportedInbox {
    /// Queues what `device_id` reported, waiting while the queue is full.
    /// (Once the applier has stopped, at shutdown, it is dropped.)
    pub async fn push(&self, device_id: &str, payload: Bytes, received_at: SystemTime) {
        let message = (device_id.to_owned(), payload, received_at);
        let _ = self.tx.send(message).await;
    }
}

/// Dropped reported patches, rate-limited: a device may send nothing else.
static DROPPED_LOG: LogLimit = LogLimit::new();

/// Applies what comes in until `shutdown`.
pub async fn apply(
    mut rx: ReportedReceiver,
    storage: Arc<dyn StateStorage>,
    feed: StateFeed,
    shutdown: CancellationToken,
) {
    let mut messages = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = rx.0.recv_many(&mut messages, BATCH) => if n == 0 { return },
            () = shutdown.cancelled() => return,
        }
        let patches = check(messages.drain(..), &feed);
        if patches.is_empty() {
            continue;
        }
        let Some(outcomes) = store(&patches, storage.as_ref(), &shutdown).await else {
            return;
        };
        let counters = feed.counters();
        for (patch, outcome) in patches.iter().zip(outcomes) {
            match outcome {
                Reported::Applied => {
                    counters.reported_applied.fetch_add(1, Ordering::Relaxed);
                }
                Reported::Refused(why) => dropped(&feed, &patch.device_id, why.reason(), &why),
                Reported::NoRoom => dropped(
                    &feed,
                    &patch.device_id,
                    "no_room",
                    &"the device states kept in memory are at --max-device-states",
                ),
            }
        }
    }
}

/// The messages that are patches a storage may apply; the others counted.
fn check(messages: impl Iterator<Item = Message>, feed: &StateFeed) -> Vec<ReportedPatch> {
    messages
        .filter_map(
            |(device_id, payload, received_at)| match parse_patch(&payload) {
                Ok(patch) => Some(ReportedPatch {
                    device_id,
                    patch,
                    received_at,
                }),
                Err(why) => {
                    dropped(feed, &device_id, why.reason(), &why);
                    None
                }
            },
        )
        .collect()
}

/// Applies `patches`, retrying while the storage does not answer; `None`
/// at shutdown.
async fn store(
    patches: &[ReportedPatch],
    storage: &dyn StateStorage,
    shutdown: &CancellationToken,
) -> Option<Vec<Reported>> {
    let mut backoff = Backoff::default();
    loop {
        match storage.apply_reported(patches).await {
            Ok(outcomes) => return Some(outcomes),
            Err(error) => {
                let wait = backoff.next_wait();
                warn!(%error, patches = patches.len(), retry_in = ?wait, "reported states not applied");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

fn dropped(feed: &StateFeed, device_id: &str, reason: &str, why: &dyn std::fmt::Display) {
    feed.counters().drop_one(reason);
    if let Some(left_out) = DROPPED_LOG.allow() {
        warn!(
            device_id = crate::log_limit::truncated(device_id),
            reason,
            similar_lines_left_out = left_out,
            "reported state dropped: {why}"
        );
    }
}
