//! Replicas leaving their share group at shutdown ([`Group::leave`]): the
//! shared subscriptions are dropped and what the broker still holds for
//! this instance is taken in, bounded in time ([`Leaving`]). Driven by the
//! event loop in `link.rs`.

use std::{sync::Arc, time::Duration};

use rumqttc::{AsyncClient, Event, Packet};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{LinkState, Shared};

/// How long leaving a share group may take at most, and how long without
/// a message from the broker (once it confirmed the unsubscriptions) counts
/// as having taken in all it held for this instance.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
const LEAVE_IDLE: Duration = Duration::from_millis(300);

/// A replica's way out of its share group.
pub(super) struct Group {
    pub(super) client: AsyncClient,
    pub(super) shared: Arc<Shared>,
    /// The shared subscriptions: readings, status and reported states.
    pub(super) filters: [String; 3],
}

impl Group {
    /// At shutdown: drops the shared subscriptions, so the broker hands new
    /// readings to the other instances and keeps no share for this one's
    /// session while it is gone (Mosquitto does, for a persistent session
    /// that is still subscribed). What it had queued for this instance still
    /// comes in and is stored until [`Leaving`] ends. `None`: not
    /// subscribed, nothing to leave.
    pub(super) fn leave(&self) -> Option<Leaving> {
        if *self.shared.state.borrow() != LinkState::Ready {
            return None;
        }
        let mut unsubscribes = 0;
        for filter in &self.filters {
            match self.client.try_unsubscribe(filter.as_str()) {
                Ok(()) => unsubscribes += 1,
                Err(error) => warn!(%error, filter, "could not leave the share group"),
            }
        }
        info!("leaving the share group: taking in what the broker holds for this instance");
        Some(Leaving::new(unsubscribes))
    }
}

/// A replica leaving its share group at shutdown (see [`Group::leave`]).
pub(super) struct Leaving {
    since: Instant,
    /// UNSUBACKs still to come.
    unsubacks: usize,
    /// When the broker last sent something, once they all came.
    last_heard: Option<Instant>,
}

impl Leaving {
    fn new(unsubacks: usize) -> Self {
        let now = Instant::now();
        Self {
            since: now,
            unsubacks,
            last_heard: (unsubacks == 0).then_some(now),
        }
    }

    pub(super) fn saw(&mut self, event: &Event) {
        match event {
            Event::Incoming(Packet::UnsubAck(_)) => {
                self.unsubacks = self.unsubacks.saturating_sub(1);
                if self.unsubacks == 0 {
                    self.last_heard = Some(Instant::now());
                }
            }
            Event::Incoming(Packet::Publish(_)) if self.last_heard.is_some() => {
                self.last_heard = Some(Instant::now());
            }
            _ => {}
        }
    }

    pub(super) fn deadline(&self) -> Instant {
        let timeout = self.since + LEAVE_TIMEOUT;
        match self.last_heard {
            Some(heard) => timeout.min(heard + LEAVE_IDLE),
            None => timeout,
        }
    }
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
