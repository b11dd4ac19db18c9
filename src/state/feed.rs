//! [`StateFeed`]: every change of a device state, in version order, for
//! WatchDeviceState; and [`StateCounters`], what this instance counted, for
//! `/metrics` and the stats line.
//!
//! A broadcast channel of bounded capacity ([`FEED_CAPACITY`]): a receiver
//! that falls further behind is told how many changes it missed (tokio's
//! `Lagged`), never blocks a storage. Without a store the memory storage
//! sends what it changes; with one, the store's change tail sends what
//! every instance changed, in version order.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use tokio::sync::broadcast;

use super::document::DeviceState;

/// Changes a receiver may be behind before it misses some. A change is
/// freed once every receiver has read it, so only a lagging receiver makes
/// the feed hold this many: at most 256 × 2 × 64 KiB (docs/api.md's memory
/// formula).
pub const FEED_CAPACITY: usize = 256;

/// Why a reported patch was not applied (`reason` of
/// `devicehub_reported_state_dropped_total`).
pub const DROP_REASONS: [&str; 4] = ["not_an_object", "too_large", "too_deep", "no_room"];

/// The feed of changes. Cheap to clone.
#[derive(Clone)]
pub struct StateFeed {
    shared: Arc<Shared>,
}

struct Shared {
    tx: broadcast::Sender<Arc<DeviceState>>,
    counters: StateCounters,
}

/// What this instance counted, read by `/metrics` and the stats line alike.
#[derive(Debug, Default)]
pub struct StateCounters {
    /// Reported patches applied.
    pub reported_applied: AtomicU64,
    /// Reported patches dropped, by [`DROP_REASONS`] order.
    dropped: [AtomicU64; DROP_REASONS.len()],
    /// Desired states published (acknowledged by the broker).
    pub desired_published: AtomicU64,
    /// Publishes of desired states that failed (retried).
    pub desired_publish_failures: AtomicU64,
}

impl StateCounters {
    /// Counts one reported patch dropped for `reason` (one of
    /// [`DROP_REASONS`]).
    pub fn drop_one(&self, reason: &str) {
        if let Some(i) = DROP_REASONS.iter().position(|r| *r == reason) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reported patches dropped, by reason.
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        DROP_REASONS
            .iter()
            .zip(&self.dropped)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Default for StateFeed {
    fn default() -> Self {
        Self {
            shared: Arc::new(Shared {
                tx: broadcast::channel(FEED_CAPACITY).0,
                counters: StateCounters::default(),
            }),
        }
    }
}

impl StateFeed {
    /// Hands a change to every receiver.
    pub fn send(&self, state: &DeviceState) {
        if self.shared.tx.receiver_count() > 0 {
            let _ = self.shared.tx.send(Arc::new(state.clone()));
        }
    }

    /// The changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<DeviceState>> {
        self.shared.tx.subscribe()
    }

    pub fn counters(&self) -> &StateCounters {
        &self.shared.counters
    }
}
