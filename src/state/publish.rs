//! The desired state publisher: after every change of a device's desired
//! state, its document (`{"version", "desired", "delta"}`) goes out,
//! retained, on the device's desired state topic, through
//! [`DesiredTransport`] (the MQTT side implements it).
//!
//! Devices to publish wait in a queue, each once however many changes it
//! had meanwhile, with the newest of its states the change handed in:
//! that one is published, and nothing is read back from the storage. Up to
//! [`IN_FLIGHT`] publishes wait for the broker at once, one per device, so
//! a device's documents reach the broker in version order. A publish that
//! fails (the broker is away) puts its device back in the queue and the
//! publisher waits with the one backoff; so a desired state decided while
//! the broker was down goes out once it is back. What the broker
//! acknowledged is noted in the storage in batches (the store publishes
//! after a restart what it has no note of).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{atomic::Ordering, Arc, Mutex},
};

use bytes::Bytes;
use futures_util::{future::BoxFuture, stream::FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{document::DeviceState, feed::StateFeed, storage::StateStorage};
use crate::{backoff::Backoff, sync, topic::TopicTemplate};

/// Publishes waiting for the broker at once, at most.
const IN_FLIGHT: usize = 64;
/// Acknowledged publishes noted in the storage at once, at most.
const NOTE_BATCH: usize = 256;

/// Publishes a desired state document, retained. The future resolves once
/// the broker acknowledged it.
pub trait DesiredTransport: Send + Sync + 'static {
    fn publish_retained(
        &self,
        topic: String,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<(), PublishFailed>>;
}

/// Why a publish failed; the device waits for its turn again.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PublishFailed(pub String);

/// The devices whose desired state is to be published. A std mutex held
/// for a few map operations.
#[derive(Default)]
pub struct Queue {
    inner: Mutex<Inner>,
    wake: Notify,
}

#[derive(Default)]
struct Inner {
    /// Devices waiting, in the order they were queued.
    waiting: VecDeque<String>,
    /// The newest state of each device waiting, or changed again while
    /// being published (then queued once done).
    newest: HashMap<String, Arc<DeviceState>>,
    /// Devices being published now.
    in_flight: HashSet<String>,
}

impl Queue {
    /// Queues `state`'s device (once), to publish `state` unless a newer
    /// one comes first.
    pub fn push(&self, state: Arc<DeviceState>) {
        {
            let mut inner = sync::lock(&self.inner);
            let id = &state.device_id;
            let queue = !inner.in_flight.contains(id) && !inner.newest.contains_key(id);
            if queue {
                inner.waiting.push_back(id.clone());
            }
            match inner.newest.get(id) {
                Some(known) if known.version >= state.version => {}
                _ => {
                    inner.newest.insert(id.clone(), state);
                }
            }
        }
        self.wake.notify_one();
    }

    /// The next state to publish, its device now in flight.
    fn take(&self) -> Option<Arc<DeviceState>> {
        let mut inner = sync::lock(&self.inner);
        let device_id = inner.waiting.pop_front()?;
        let state = inner.newest.remove(&device_id)?;
        inner.in_flight.insert(device_id);
        Some(state)
    }

    /// `state`'s publish is done, acknowledged or not: its device is
    /// queued again if it changed meanwhile, or with `state` if it failed.
    fn done(&self, state: Arc<DeviceState>, published: bool) {
        let requeue = {
            let mut inner = sync::lock(&self.inner);
            inner.in_flight.remove(&state.device_id);
            let changed = inner.newest.contains_key(&state.device_id);
            if changed {
                inner.waiting.push_back(state.device_id.clone());
            }
            !changed && !published
        };
        match requeue {
            true => self.push(state),
            false => self.wake.notify_one(),
        }
    }
}

/// What the publisher works with.
pub struct Publisher {
    pub queue: Arc<Queue>,
    pub storage: Arc<dyn StateStorage>,
    pub transport: Arc<dyn DesiredTransport>,
    pub topic: TopicTemplate,
    pub feed: StateFeed,
}

impl Publisher {
    /// Publishes what is queued until `shutdown`, after queueing what the
    /// storage says may not have been published (a restart between a
    /// change and its publish).
    pub async fn run(self, shutdown: CancellationToken) {
        self.queue_unpublished().await;
        let mut in_flight = FuturesUnordered::new();
        let mut acknowledged = Vec::new();
        let mut backoff = Backoff::default();
        loop {
            while in_flight.len() < IN_FLIGHT {
                let Some(state) = self.queue.take() else {
                    break;
                };
                in_flight.push(self.publish(state));
            }
            if acknowledged.len() >= NOTE_BATCH
                || (in_flight.is_empty() && !acknowledged.is_empty())
            {
                self.note(std::mem::take(&mut acknowledged)).await;
            }
            let outcome = tokio::select! {
                Some(outcome) = in_flight.next(), if !in_flight.is_empty() => Some(outcome),
                () = self.queue.wake.notified() => None,
                () = shutdown.cancelled() => return,
            };
            let Some((state, published)) = outcome else {
                continue;
            };
            if published {
                backoff.reset();
                acknowledged.push((state.device_id.clone(), state.version));
            }
            self.queue.done(state, published);
            if !published {
                // The broker is away: wait before the queue is tried again
                // (the publishes in flight finish meanwhile).
                let wait = backoff.next_wait();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }

    /// Queues the states the storage has no note of as published.
    async fn queue_unpublished(&self) {
        let devices = match self.storage.unpublished().await {
            Ok(devices) => devices,
            Err(error) => {
                warn!(%error, "desired states not published before the restart are not known; they go out with their next change");
                return;
            }
        };
        for device_id in devices {
            match self.storage.get(&device_id).await {
                Ok(Some(state)) => self.queue.push(Arc::new(state)),
                Ok(None) => {}
                Err(error) => {
                    warn!(%error, "a desired state not published before the restart is not read; it goes out with its next change")
                }
            }
        }
    }

    /// Publishes `state`'s desired document; the state, and whether the
    /// broker acknowledged it.
    fn publish(&self, state: Arc<DeviceState>) -> BoxFuture<'static, (Arc<DeviceState>, bool)> {
        let transport = self.transport.clone();
        let topic = self.topic.topic_for(&state.device_id);
        let feed = self.feed.clone();
        Box::pin(async move {
            let payload = Bytes::from(state.desired_document());
            let counters = feed.counters();
            match transport.publish_retained(topic, payload).await {
                Ok(()) => {
                    counters.desired_published.fetch_add(1, Ordering::Relaxed);
                    (state, true)
                }
                Err(error) => {
                    counters
                        .desired_publish_failures
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(%error, "desired state not published; retrying");
                    (state, false)
                }
            }
        })
    }

    /// Notes acknowledged publishes in the storage. A note that fails only
    /// means a publish again after a restart.
    async fn note(&self, acknowledged: Vec<(String, i64)>) {
        if let Err(error) = self.storage.published(&acknowledged).await {
            debug!(%error, "publishes not noted; they are made again after a restart");
        }
    }
}
