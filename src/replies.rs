//! Command replies: [`ReplyRouter`] pairs a device's reply with the
//! SendCommand call waiting for it, by command id and device id.
//!
//! A caller registers ([`ReplyRouter::register`]) *before* the command is
//! published (a fast device may
//! answer before the publish is even acknowledged) and holds a
//! [`PendingReply`]; dropping it (timeout, cancelled call) removes the entry,
//! so the table never outgrows the calls in progress, and is bounded by
//! [`MAX_PENDING_REPLIES`]. A reply nobody waits for is never handed to
//! anyone else: it is counted as late (its command timed out or was
//! cancelled recently) or unmatched, and logged.
//!
//! With replicas (`--mqtt-share-group`) every instance receives every
//! reply, and only the one that sent the command knows its id (ids are
//! UUIDs, unique across instances): a reply to an id this instance never
//! issued is another instance's, dropped quietly ([`Routed::Foreign`]), not
//! counted as unmatched.
//!
//! A reply to a persistent command (SendCommand with a `ttl`) has no call
//! waiting here: it is recognized by [`PersistentReplies::active`] (the
//! commands' feed knows every active command, every replica's) and handed
//! on without waiting ([`PersistentReplies::record`]); the instance that
//! published the command stores it as a reading.
//!
//! The device-side protocol: publish on the replies topic (default
//! `devices/{device_id}/replies`) a JSON object `{"id": "<command id>",
//! "status": "ok" | "error", "result": <any JSON, optional>, "message":
//! "<text, optional>"}`.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::SystemTime,
};

use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::{
    log_limit::{truncated, LogLimit},
    sync,
};

/// Most commands waiting for a reply at once.
pub const MAX_PENDING_REPLIES: usize = 10_000;

/// How many expired command ids are remembered to tell late replies from
/// unknown ones.
const EXPIRED_MEMORY: usize = 4_096;

/// What a device answered.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReply {
    pub received_at: SystemTime,
    pub ok: bool,
    pub result: Option<serde_json::Value>,
    pub message: String,
}

/// Why a reply could not be waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{MAX_PENDING_REPLIES} commands are already waiting for replies")]
pub struct TooManyPending;

/// Counters for operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyStats {
    pub pending: usize,
    /// Replies handed to their caller, by the device's status.
    pub ok: u64,
    pub error: u64,
    /// Commands whose caller stopped waiting before a reply came.
    pub timeouts: u64,
    /// Replies to commands that had timed out or been cancelled.
    pub late: u64,
    /// Replies with an unknown id, another device's id, or not a reply at all.
    pub unmatched: u64,
}

#[derive(Default)]
struct Table {
    /// Command id → (device id, waiter).
    pending: HashMap<String, (String, oneshot::Sender<DeviceReply>)>,
    expired: HashSet<String>,
    expired_order: VecDeque<String>,
}

/// The table of commands waiting for replies. A cheap handle: clones share
/// the table.
#[derive(Clone, Default)]
pub struct ReplyRouter {
    shared: Arc<Shared>,
}

/// What [`ReplyRouter::route`] made of a message on a replies topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Handed to the call waiting for it.
    Delivered,
    /// A reply to a command this instance sent, that no call took: late, or
    /// from another device than the command's. Counted and logged.
    Stray,
    /// Not a reply to any command this instance knows of: not a reply at
    /// all, or (with replicas) another instance's.
    Foreign,
}

/// Where replies to persistent commands go (the commands' side
/// implements it): they have no call waiting in this table.
pub trait PersistentReplies: Send + Sync {
    /// `Some(published here)` when `id` is an active persistent command.
    fn active(&self, id: &str) -> Option<bool>;
    /// Records `device_id`'s reply to `id`; never blocks.
    fn record(&self, device_id: &str, id: &str, reply: DeviceReply);
}

/// The table behind a std mutex (see [`crate::sync`]): held to insert,
/// look up or remove one entry, never across an `.await`.
#[derive(Default)]
struct Shared {
    table: Mutex<Table>,
    ok: AtomicU64,
    error: AtomicU64,
    timeouts: AtomicU64,
    late: AtomicU64,
    unmatched: AtomicU64,
    /// Other instances send commands too: unknown ids are theirs.
    replicas: bool,
    /// Set once the persistent commands are running.
    persistent: std::sync::OnceLock<Arc<dyn PersistentReplies>>,
}

/// A registered wait; see [`ReplyRouter::register`]. Dropping it unregisters.
pub struct PendingReply {
    router: ReplyRouter,
    command_id: String,
    reply: oneshot::Receiver<DeviceReply>,
}

impl ReplyRouter {
    /// A router for one of several replicas: replies to ids it does not
    /// know are another instance's, not unmatched.
    pub fn for_replicas() -> Self {
        Self {
            shared: Arc::new(Shared {
                replicas: true,
                ..Shared::default()
            }),
        }
    }

    /// Hands replies to persistent commands to `persistent` from now on.
    pub fn set_persistent(&self, persistent: Arc<dyn PersistentReplies>) {
        let _ = self.shared.persistent.set(persistent);
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        sync::lock(&self.shared.table)
    }

    /// Registers a wait for `device_id`'s reply to `command_id`.
    pub fn register(
        &self,
        device_id: &str,
        command_id: &str,
    ) -> Result<PendingReply, TooManyPending> {
        let (tx, rx) = oneshot::channel();
        let mut table = self.table();
        if table.pending.len() >= MAX_PENDING_REPLIES {
            return Err(TooManyPending);
        }
        table
            .pending
            .insert(command_id.to_owned(), (device_id.to_owned(), tx));
        Ok(PendingReply {
            router: self.clone(),
            command_id: command_id.to_owned(),
            reply: rx,
        })
    }

    /// Routes a message that `device_id` published on its replies topic.
    pub fn route(&self, device_id: &str, payload: &[u8]) -> Routed {
        let Some((command_id, reply)) = parse_reply(payload, SystemTime::now()) else {
            self.shared.unmatched.fetch_add(1, Ordering::Relaxed);
            debug!(
                device_id,
                "a message on a replies topic is not a command reply"
            );
            return Routed::Foreign;
        };
        let mut table = self.table();
        match table.pending.get(&command_id) {
            Some((owner, _)) if owner == device_id => {
                let Some((_, (_, waiter))) = table.pending.remove_entry(&command_id) else {
                    return Routed::Stray;
                };
                drop(table);
                // The caller may have gone in the meantime; then it is late.
                let outcome = if reply.ok {
                    &self.shared.ok
                } else {
                    &self.shared.error
                };
                if waiter.send(reply).is_ok() {
                    outcome.fetch_add(1, Ordering::Relaxed);
                    return Routed::Delivered;
                }
                self.shared.late.fetch_add(1, Ordering::Relaxed);
                stray(
                    &LATE_LOG,
                    device_id,
                    &command_id,
                    "reply arrived after its command was given up",
                );
                Routed::Stray
            }
            Some(_) => {
                self.shared.unmatched.fetch_add(1, Ordering::Relaxed);
                stray(
                    &UNMATCHED_LOG,
                    device_id,
                    &command_id,
                    "reply from another device than the command's; ignored",
                );
                Routed::Stray
            }
            None if self.persistent_owner(&command_id).is_some() => {
                drop(table);
                // Stored as a reading by the instance that published it.
                let published_here = self.persistent_owner(&command_id) == Some(true);
                if let Some(persistent) = self.shared.persistent.get() {
                    persistent.record(device_id, &command_id, reply);
                }
                match published_here {
                    true => Routed::Delivered,
                    false => Routed::Foreign,
                }
            }
            None if table.expired.contains(&command_id) => {
                self.shared.late.fetch_add(1, Ordering::Relaxed);
                stray(
                    &LATE_LOG,
                    device_id,
                    &command_id,
                    "reply arrived after its command timed out",
                );
                Routed::Stray
            }
            None if self.shared.replicas => Routed::Foreign,
            None => {
                self.shared.unmatched.fetch_add(1, Ordering::Relaxed);
                stray(
                    &UNMATCHED_LOG,
                    device_id,
                    &command_id,
                    "reply to an unknown command",
                );
                Routed::Foreign
            }
        }
    }

    fn persistent_owner(&self, command_id: &str) -> Option<bool> {
        self.shared.persistent.get()?.active(command_id)
    }

    pub fn stats(&self) -> ReplyStats {
        ReplyStats {
            pending: self.table().pending.len(),
            ok: self.shared.ok.load(Ordering::Relaxed),
            error: self.shared.error.load(Ordering::Relaxed),
            timeouts: self.shared.timeouts.load(Ordering::Relaxed),
            late: self.shared.late.load(Ordering::Relaxed),
            unmatched: self.shared.unmatched.load(Ordering::Relaxed),
        }
    }

    fn give_up(&self, command_id: &str) {
        let mut table = self.table();
        if table.pending.remove(command_id).is_none() {
            return; // answered
        }
        self.shared.timeouts.fetch_add(1, Ordering::Relaxed);
        if table.expired_order.len() == EXPIRED_MEMORY {
            if let Some(oldest) = table.expired_order.pop_front() {
                table.expired.remove(&oldest);
            }
        }
        table.expired.insert(command_id.to_owned());
        table.expired_order.push_back(command_id.to_owned());
    }
}

impl PendingReply {
    /// Waits for the reply. Cancel-safe: drop the future (or `self`) to stop.
    pub async fn wait(&mut self) -> Option<DeviceReply> {
        (&mut self.reply).await.ok()
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.router.give_up(&self.command_id);
    }
}

/// Late replies, and unmatched ones: what devices send, so rate-limited.
static LATE_LOG: LogLimit = LogLimit::new();
static UNMATCHED_LOG: LogLimit = LogLimit::new();

/// Logs a reply nobody takes, if `limit` lets it through; the ids are the
/// device's text, truncated.
fn stray(limit: &LogLimit, device_id: &str, command_id: &str, what: &str) {
    if let Some(left_out) = limit.allow() {
        warn!(
            device_id = truncated(device_id),
            command_id = truncated(command_id),
            similar_lines_left_out = left_out,
            "{what}"
        );
    }
}

/// Parses a device's reply; `None` when it is not one.
fn parse_reply(payload: &[u8], received_at: SystemTime) -> Option<(String, DeviceReply)> {
    let serde_json::Value::Object(mut reply) = serde_json::from_slice(payload).ok()? else {
        return None;
    };
    let serde_json::Value::String(id) = reply.remove("id")? else {
        return None;
    };
    let ok = match reply.get("status").and_then(|s| s.as_str()) {
        Some(s) if s.eq_ignore_ascii_case("ok") => true,
        Some(s) if s.eq_ignore_ascii_case("error") => false,
        _ => return None,
    };
    let message = match reply.remove("message") {
        Some(serde_json::Value::String(m)) => m,
        _ => String::new(),
    };
    let reply = DeviceReply {
        received_at,
        ok,
        result: reply.remove("result"),
        message,
    };
    Some((id, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_leniently_but_need_id_and_status() {
        let (id, reply) = parse_reply(
            br#"{"id": "c1", "status": "OK", "result": {"x": 1}}"#,
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(id, "c1");
        assert!(reply.ok);
        assert_eq!(reply.result, Some(serde_json::json!({"x": 1})));
        let (_, error) = parse_reply(
            br#"{"id": "c2", "status": "error", "message": "no"}"#,
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        assert!(!error.ok && error.message == "no");
        for bad in [
            &b"not json"[..],
            br#"{"status": "ok"}"#,
            br#"{"id": 5, "status": "ok"}"#,
            br#"{"id": "c", "status": "maybe"}"#,
            b"[]",
        ] {
            assert!(
                parse_reply(bad, SystemTime::UNIX_EPOCH).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn a_reply_goes_to_its_caller_only() {
        let router = ReplyRouter::default();
        let mut pending = router.register("d1", "c1").unwrap();
        assert_eq!(
            router.route("d2", br#"{"id": "c1", "status": "ok"}"#),
            Routed::Stray,
            "another device's reply"
        );
        assert_eq!(
            router.route("d1", br#"{"id": "zz", "status": "ok"}"#),
            Routed::Foreign,
            "unknown id"
        );
        assert_eq!(
            router.route("d1", br#"{"id": "c1", "status": "ok", "result": 7}"#),
            Routed::Delivered
        );
        assert_eq!(
            pending.wait().await.unwrap().result,
            Some(serde_json::json!(7))
        );
        drop(pending);
        let stats = router.stats();
        assert_eq!(
            (stats.pending, stats.ok, stats.unmatched, stats.late),
            (0, 1, 2, 0)
        );
    }

    #[test]
    fn giving_up_cleans_up_and_makes_later_replies_late() {
        let router = ReplyRouter::default();
        let pending = router.register("d1", "c1").unwrap();
        drop(pending);
        assert_eq!(router.stats().pending, 0);
        assert_eq!(
            router.route("d1", br#"{"id": "c1", "status": "ok"}"#),
            Routed::Stray
        );
        assert_eq!(router.stats().late, 1);
    }

    #[test]
    fn with_replicas_unknown_ids_are_another_instances_and_not_counted() {
        let router = ReplyRouter::for_replicas();
        let _pending = router.register("d1", "c1").unwrap();
        assert_eq!(
            router.route("d1", br#"{"id": "theirs", "status": "ok"}"#),
            Routed::Foreign
        );
        assert_eq!(
            router.route("d2", br#"{"id": "c1", "status": "ok"}"#),
            Routed::Stray,
            "ours, from the wrong device: still counted"
        );
        let stats = router.stats();
        assert_eq!((stats.unmatched, stats.late, stats.pending), (1, 0, 1));
    }

    #[test]
    fn the_table_is_bounded() {
        let router = ReplyRouter::default();
        let held: Vec<_> = (0..MAX_PENDING_REPLIES)
            .map(|i| router.register("d", &i.to_string()).unwrap())
            .collect();
        assert!(router.register("d", "one more").is_err());
        drop(held);
        assert!(router.register("d", "one more").is_ok());
    }
}
