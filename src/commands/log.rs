//! [`CommandLog`]: where persistent commands are kept, in memory
//! ([`super::MemoryLog`]) or in the PostgreSQL store. Every transition is
//! one atomic step that names the states it starts from, so two callers
//! (two tasks, or two replicas on one database) never both make it: a
//! reply and a cancel racing for one command end it once.
//!
//! A log hands every change it makes, and no other, to the feed
//! (`feed.rs`), in the order it made them; the store hands the changes of
//! every instance, in the database's order.

use std::time::SystemTime;

use futures_util::future::BoxFuture;
use uuid::Uuid;

use super::{Command, CommandState, NewCommand, Publication};
use crate::{replies::DeviceReply, scope::DeviceSet};

pub type LogResult<T> = Result<T, LogError>;

/// Why a log could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("the service already keeps its maximum of {0} commands that have not ended")]
    Full(usize),
    #[error("device {device_id:?} already has its maximum of {max} commands that have not ended")]
    DeviceFull { device_id: String, max: usize },
    #[error("the commands kept in memory already take the most bytes they may ({0}); a store has room for more")]
    NoRoom(usize),
    /// The store failed; the text is for the log, never for a client.
    #[error("the command store is unavailable: {0}")]
    Unavailable(String),
}

/// Which commands to list: newest first, after a cursor.
#[derive(Debug, Clone, Default)]
pub struct CommandQuery {
    /// Only this device's.
    pub device_id: Option<String>,
    /// Only devices in this set (the caller's read scope).
    pub devices: DeviceSet,
    /// Only these states; empty: every state.
    pub states: Vec<CommandState>,
    pub page_size: usize,
    /// Only commands older than this one (the previous page's last).
    pub before: Option<Uuid>,
}

impl CommandQuery {
    /// Whether `command` belongs in the answer (the cursor aside).
    pub fn matches(&self, command: &Command) -> bool {
        self.device_id
            .as_deref()
            .is_none_or(|d| d == command.device_id)
            && self.devices.allows(&command.device_id)
            && (self.states.is_empty() || self.states.contains(&command.state))
    }
}

/// One page of commands.
#[derive(Debug, Clone, Default)]
pub struct CommandPage {
    pub commands: Vec<Command>,
    /// Where the next page starts (the last command looked at), when more
    /// may follow.
    pub next: Option<Uuid>,
}

/// A command taken for publishing: nobody else publishes it until it is
/// marked sent or released.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub device_id: String,
    pub expire_time: SystemTime,
    pub publish: Publication,
}

/// What became of a reply.
#[derive(Debug, Clone)]
pub enum Replied {
    /// It ended its command, now SUCCEEDED or FAILED.
    Recorded(Box<Command>),
    /// Its command is being published (a fast device answered before the
    /// broker's acknowledgement was recorded): try again shortly, so that
    /// the command is SENT first.
    Publishing,
    /// Not an active command of that device.
    NotActive,
}

/// A device with commands that have not ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveDevice {
    pub device_id: String,
    /// QUEUED and not claimed.
    pub queued: u32,
    /// SENT (waiting for a reply).
    pub sent: u32,
    /// When the longest-waiting SENT one was last published.
    pub oldest_sent_at: Option<SystemTime>,
}

/// Where persistent commands are kept. See the module docs.
pub trait CommandLog: Send + Sync + 'static {
    /// Keeps a new command, QUEUED, unless `max` commands (or `per_device`
    /// of its device) have not ended.
    fn insert(
        &self,
        command: NewCommand,
        max: usize,
        per_device: usize,
    ) -> BoxFuture<'_, LogResult<Command>>;

    fn get(&self, id: Uuid) -> BoxFuture<'_, LogResult<Option<Command>>>;

    fn list<'a>(&'a self, query: &'a CommandQuery) -> BoxFuture<'a, LogResult<CommandPage>>;

    /// QUEUED or SENT → CANCELLED. `Err(Some(state))`: it had already
    /// ended in `state`; `Err(None)`: not known.
    fn cancel(&self, id: Uuid) -> BoxFuture<'_, LogResult<Result<Command, Option<CommandState>>>>;

    /// Claims, for each of `device_ids`, up to `limits.0` of its QUEUED
    /// commands that have not expired by `now`, oldest first, and no more
    /// than leave at most `in_flight` SENT or claimed; at most `limits.1`
    /// in all; returned in order for each device. None of a device while another claim of it (this
    /// instance's or another's) is being published, so a device's commands
    /// go out in order.
    fn claim<'a>(
        &'a self,
        device_ids: &'a [String],
        limits: (usize, usize),
        in_flight: Option<u32>,
        now: SystemTime,
    ) -> BoxFuture<'a, LogResult<Vec<Claimed>>>;

    /// Claimed → SENT, one attempt more, published at `at`; returns those
    /// still claimed (a cancel may have come in between).
    fn sent<'a>(
        &'a self,
        ids: &'a [Uuid],
        at: SystemTime,
    ) -> BoxFuture<'a, LogResult<Vec<Command>>>;

    /// Gives claimed commands back, QUEUED, unpublished.
    fn release<'a>(&'a self, ids: &'a [Uuid]) -> BoxFuture<'a, LogResult<()>>;

    /// QUEUED or SENT → SUCCEEDED or FAILED with `reply`, if `id` is an
    /// active command of `device_id` and not being published.
    fn replied<'a>(
        &'a self,
        device_id: &'a str,
        id: Uuid,
        reply: DeviceReply,
    ) -> BoxFuture<'a, LogResult<Replied>>;

    /// `device_id` went OFFLINE at `at`: its SENT commands published before
    /// then go back to QUEUED, or FAILED after `max_attempts`.
    fn went_away<'a>(
        &'a self,
        device_id: &'a str,
        at: SystemTime,
        max_attempts: u32,
    ) -> BoxFuture<'a, LogResult<usize>>;

    /// Active commands whose `ttl` passed by `now` → EXPIRED.
    fn expire(&self, now: SystemTime) -> BoxFuture<'_, LogResult<usize>>;

    /// Forgets commands that ended before `before`.
    fn forget(&self, before: SystemTime) -> BoxFuture<'_, LogResult<usize>>;

    /// The devices with active commands.
    fn active_devices(&self) -> BoxFuture<'_, LogResult<Vec<ActiveDevice>>>;

    /// Kept commands by state.
    fn counts(&self) -> BoxFuture<'_, LogResult<Vec<(CommandState, u64)>>>;
}
