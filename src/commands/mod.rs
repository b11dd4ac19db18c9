//! Persistent commands (sent with a `ttl`): their lifecycle from accepted to
//! an outcome, kept in a [`CommandLog`] (memory, or the PostgreSQL store
//! through the same trait) and delivered by the dispatcher.
//!
//! - this file: [`Commands`], the handle the gRPC side and the replies call
//!   into, and the domain types;
//! - `log.rs`: [`CommandLog`], what a log keeps and the transitions it
//!   makes, each one atomic (a compare-and-set on the state);
//! - `memory.rs`: [`MemoryLog`], the log without a store;
//! - `dispatch.rs`: the task that publishes queued commands when their
//!   device can take them, sends commands back to QUEUED when their device
//!   went away without replying, expires and forgets;
//! - `feed.rs`: the state changes, in order, for WatchCommands and for calls
//!   waiting for a reply, and the counters behind `/metrics`;
//! - `inbox.rs`: replies on their way from the MQTT event loop to the log.
//!
//! It knows neither gRPC nor MQTT nor PostgreSQL: commands are published
//! through [`Transport`] (the MQTT side implements it), devices' presence is
//! read from the hub, and the store implements [`CommandLog`].
//!
//! # States
//! QUEUED → SENT → SUCCEEDED | FAILED, with EXPIRED and CANCELLED from
//! either active state. SENT goes back to QUEUED when the device went
//! OFFLINE after the command was published and no reply came: it is
//! published again (same id) when the device returns, at most
//! `max_attempts` times in all; a SENT command whose device goes away once
//! more after its last attempt is FAILED. So delivery is at least once,
//! and the envelope's `id` is the key for a device to drop duplicates.

mod dispatch;
mod feed;
mod inbox;
mod log;
mod memory;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use tokio::sync::broadcast;
use uuid::Uuid;

pub use dispatch::{Dispatcher, Transport, TransportError};
pub use feed::Feed;
pub use inbox::{inbox, ReplyInbox, ReplyReceiver};
pub use log::{ActiveDevice, Claimed, CommandLog, CommandPage, CommandQuery, LogError, Replied};
pub use memory::MemoryLog;

pub use crate::config::CommandLimits;
use crate::replies::DeviceReply;

/// The longest `ttl` a command may have.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where a command is in its life (the proto's `CommandState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CommandState {
    Queued,
    Sent,
    Succeeded,
    Failed,
    Expired,
    Cancelled,
}

impl CommandState {
    pub const ALL: [CommandState; 6] = [
        Self::Queued,
        Self::Sent,
        Self::Succeeded,
        Self::Failed,
        Self::Expired,
        Self::Cancelled,
    ];

    /// Whether the command is over: it never changes again.
    pub fn ended(self) -> bool {
        !matches!(self, Self::Queued | Self::Sent)
    }

    /// The name in metrics' labels and in the store.
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state named `name` (see [`CommandState::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A persistent command and what happened to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: Uuid,
    pub device_id: String,
    pub name: String,
    /// The parameters, when given (none for a raw payload).
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
    pub state: CommandState,
    pub create_time: SystemTime,
    pub expire_time: SystemTime,
    pub update_time: SystemTime,
    /// Times published (acknowledged by the broker).
    pub attempts: u32,
    pub reply: Option<DeviceReply>,
}

/// A command to accept, with what is published for it.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: Uuid,
    pub device_id: String,
    pub name: String,
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
    pub create_time: SystemTime,
    pub expire_time: SystemTime,
    /// What is published, every attempt the same bytes.
    pub publish: Publication,
}

/// What is published for a command: to which topic, which bytes, at which
/// QoS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
}

/// Why a call on [`Commands`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("command {0} is not known (never issued, or forgotten after its retention)")]
    NotFound(Uuid),
    #[error("command {id} already ended: it is {}", .state.name())]
    Ended { id: Uuid, state: CommandState },
}

/// The persistent commands: the log, the feed of changes and the
/// dispatcher's wake-up. A cheap handle; clones share everything.
#[derive(Clone)]
pub struct Commands {
    shared: Arc<Shared>,
}

/// No lock of its own: the log guards its records, the feed is a
/// broadcast channel.
struct Shared {
    log: Arc<dyn CommandLog>,
    feed: Feed,
    dispatcher: Dispatcher,
    limits: CommandLimits,
}

impl Commands {
    /// Commands kept in `log`, published through `transport` when the
    /// devices `presence` knows of can take them. Starts the dispatcher,
    /// which runs until `shutdown`.
    pub fn start(
        log: Arc<dyn CommandLog>,
        feed: Feed,
        presence: crate::hub::ReadingHub,
        transport: Arc<dyn Transport>,
        limits: CommandLimits,
        inbox: (ReplyInbox, ReplyReceiver),
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let dispatcher = Dispatcher::start(
            log.clone(),
            feed.clone(),
            presence,
            transport,
            limits.clone(),
            inbox,
            shutdown,
        );
        Self {
            shared: Arc::new(Shared {
                log,
                feed,
                dispatcher,
                limits,
            }),
        }
    }

    /// Accepts a command: QUEUED, and published at once when its device can
    /// take it (then SENT when this returns). Refused beyond the quotas.
    pub async fn submit(&self, command: NewCommand) -> Result<Command, CommandError> {
        let limits = &self.shared.limits;
        let device_id = command.device_id.clone();
        let id = command.id;
        let accepted = self
            .shared
            .log
            .insert(command, limits.max_queued, limits.max_queued_per_device)
            .await?;
        if !self.shared.dispatcher.reachable(&device_id) {
            // The next round (a tick at most away) sees it; waking one per
            // queued command would read the log as often.
            return Ok(accepted);
        }
        let sent = self.shared.dispatcher.deliver(&[device_id]).await;
        Ok(sent.into_iter().find(|c| c.id == id).unwrap_or(accepted))
    }

    pub async fn get(&self, id: Uuid) -> Result<Command, CommandError> {
        self.shared
            .log
            .get(id)
            .await?
            .ok_or(CommandError::NotFound(id))
    }

    pub async fn list(&self, query: &CommandQuery) -> Result<CommandPage, CommandError> {
        Ok(self.shared.log.list(query).await?)
    }

    /// Cancels an active command; an ended one is [`CommandError::Ended`].
    pub async fn cancel(&self, id: Uuid) -> Result<Command, CommandError> {
        match self.shared.log.cancel(id).await? {
            Ok(cancelled) => {
                // Room for the device's next one under the in-flight limit.
                self.shared.dispatcher.wake();
                Ok(cancelled)
            }
            Err(Some(state)) => Err(CommandError::Ended { id, state }),
            Err(None) => Err(CommandError::NotFound(id)),
        }
    }

    /// The changes from now on (see [`Feed`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Command> {
        self.shared.feed.subscribe()
    }

    pub fn feed(&self) -> &Feed {
        &self.shared.feed
    }

    /// Active and kept commands by state, as the log last counted them.
    pub fn counts(&self) -> Vec<(CommandState, u64)> {
        self.shared.dispatcher.counts()
    }
}
