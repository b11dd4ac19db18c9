//! [`Feed`]: every state change of persistent commands, in order, for
//! WatchCommands and for SendCommand calls waiting for a reply; and
//! [`CommandCounters`], the transitions this instance made, for `/metrics`.
//!
//! A broadcast channel of bounded capacity ([`FEED_CAPACITY`]): a receiver
//! that falls further behind is told how many changes it missed (tokio's
//! `Lagged`), never blocks the log. Without a store the memory log sends
//! what it changes; with one, the store's change tail sends what every
//! instance changed, in the database's order, so that every instance's
//! watchers see the same.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::broadcast;
use uuid::Uuid;

use super::{Command, CommandState};
use crate::sync;

/// Changes a receiver may be behind before it misses some. A change is
/// freed once every receiver has read it, so only a lagging receiver makes
/// the feed hold this many (docs/api.md's memory formula).
pub const FEED_CAPACITY: usize = 1024;

/// The feed of changes. Cheap to clone.
#[derive(Clone)]
pub struct Feed {
    shared: Arc<Shared>,
}

struct Shared {
    tx: broadcast::Sender<Command>,
    counters: CommandCounters,
    /// The active commands, each with whether this instance published it:
    /// how a reply is told to be one of ours without asking the log (the
    /// MQTT event loop must not wait). Kept from the changes sent, so it
    /// follows every instance's commands; bounded by the active commands.
    /// A std mutex held for one map operation.
    active: Mutex<HashMap<Uuid, bool>>,
}

/// The transitions this instance made, read by `/metrics` and the stats
/// line alike.
#[derive(Debug, Default)]
pub struct CommandCounters {
    /// Into each state, by [`CommandState`] order.
    transitions: [AtomicU64; CommandState::ALL.len()],
    /// Commands refused because a queue bound was reached.
    pub refused: AtomicU64,
    /// Ended commands forgotten before their retention to stay in bounds.
    pub forgotten_early: AtomicU64,
    /// Replies to commands that were not active (late, or not ours).
    pub stray_replies: AtomicU64,
    /// Replies dropped because the dispatcher's queue was full.
    pub dropped_replies: AtomicU64,
}

impl CommandCounters {
    pub fn transitions(&self) -> Vec<(CommandState, u64)> {
        CommandState::ALL
            .iter()
            .map(|&s| (s, self.transitions[s as usize].load(Ordering::Relaxed)))
            .collect()
    }

    /// Transitions into EXPIRED.
    pub fn expired(&self) -> u64 {
        self.transitions[CommandState::Expired as usize].load(Ordering::Relaxed)
    }
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            shared: Arc::new(Shared {
                tx: broadcast::channel(FEED_CAPACITY).0,
                counters: CommandCounters::default(),
                active: Mutex::default(),
            }),
        }
    }
}

impl Feed {
    /// Counts a transition this instance made into `command`'s state.
    pub fn count(&self, command: &Command) {
        self.shared.counters.transitions[command.state as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Hands a change to every receiver.
    pub fn send(&self, command: &Command) {
        {
            let mut active = sync::lock(&self.shared.active);
            match command.state.ended() {
                true => {
                    active.remove(&command.id);
                }
                false => {
                    active.entry(command.id).or_insert(false);
                }
            }
        }
        if self.shared.tx.receiver_count() > 0 {
            let _ = self.shared.tx.send(command.clone());
        }
    }

    /// Notes that this instance is about to publish command `id`.
    pub fn publishing(&self, id: Uuid) {
        sync::lock(&self.shared.active).insert(id, true);
    }

    /// Forgets `id` as active: it ended (for a change the feed may have
    /// carried before [`Feed::publishing`] noted it again).
    pub fn ended(&self, id: Uuid) {
        sync::lock(&self.shared.active).remove(&id);
    }

    /// Whether `id` is an active command (`Some`), and whether this
    /// instance published it.
    pub fn active(&self, id: Uuid) -> Option<bool> {
        sync::lock(&self.shared.active).get(&id).copied()
    }

    /// The changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Command> {
        self.shared.tx.subscribe()
    }

    pub fn counters(&self) -> &CommandCounters {
        &self.shared.counters
    }
}
