//! [`ReplyInbox`]: replies to persistent commands on their way to being
//! recorded. The MQTT event loop hands them in through the reply router
//! (`PersistentReplies`), never waiting: a bounded queue
//! ([`REPLY_QUEUE`]), a reply that does not fit dropped and counted. The
//! dispatcher's replies task takes them out. It exists before the MQTT
//! link starts, so that no reply arriving with the first messages is
//! missed; the dispatcher, which needs the link to publish, starts after.

use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use uuid::Uuid;

use super::Feed;
use crate::replies::{DeviceReply, PersistentReplies};

/// Replies waiting to be recorded, at most.
pub const REPLY_QUEUE: usize = 4096;

/// A reply to record: the device, the command, the reply, tries so far.
pub type PendingReply = (String, Uuid, DeviceReply, u32);

/// Where replies to persistent commands go in. Cheap to clone.
#[derive(Clone)]
pub struct ReplyInbox {
    tx: mpsc::Sender<PendingReply>,
    feed: Feed,
}

/// The other end, the dispatcher's.
pub struct ReplyReceiver(pub(super) mpsc::Receiver<PendingReply>);

/// A new inbox for the commands `feed` follows.
pub fn inbox(feed: &Feed) -> (ReplyInbox, ReplyReceiver) {
    let (tx, rx) = mpsc::channel(REPLY_QUEUE);
    let inbox = ReplyInbox {
        tx,
        feed: feed.clone(),
    };
    (inbox, ReplyReceiver(rx))
}

impl ReplyInbox {
    /// Queues a reply; dropped and counted when the queue is full.
    pub(super) fn push(&self, reply: PendingReply) {
        if self.tx.try_send(reply).is_err() {
            let counters = self.feed.counters();
            counters.dropped_replies.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl PersistentReplies for ReplyInbox {
    fn active(&self, id: &str) -> Option<bool> {
        self.feed.active(Uuid::parse_str(id).ok()?)
    }

    fn record(&self, device_id: &str, id: &str, reply: DeviceReply) {
        if let Ok(id) = Uuid::parse_str(id) {
            self.push((device_id.to_owned(), id, reply, 0));
        }
    }
}
