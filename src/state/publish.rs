//! The desired state publisher: after every change of a device's desired
//! state, its document (`{"version", "desired", "delta"}`) goes out,
//! retained, on the device's desired state topic, through
//! [`DesiredTransport`] (the MQTT side implements it).
//!
//! Devices to publish wait in a queue, each once however many changes it
//! had meanwhile: what is published is the state as it is when its turn
//! comes, the latest. Up to [`IN_FLIGHT`] publishes wait for the broker at
//! once, one per device, so a device's documents reach the broker in
//! version order. A publish that fails (the broker is away) puts its device
//! back in the queue and the publisher waits with the one backoff; so a
//! desired state decided while the broker was down goes out once it is back.

use std::{
    collections::{HashSet, VecDeque},
    sync::{atomic::Ordering, Arc, Mutex},
};

use bytes::Bytes;
use futures_util::{future::BoxFuture, stream::FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{feed::StateFeed, storage::StateStorage};
use crate::{backoff::Backoff, sync, topic::TopicTemplate};

/// Publishes waiting for the broker at once, at most.
const IN_FLIGHT: usize = 64;

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
/// for a few set operations.
#[derive(Default)]
pub struct Queue {
    inner: Mutex<Inner>,
    wake: Notify,
}

#[derive(Default)]
struct Inner {
    waiting: VecDeque<String>,
    /// What `waiting` holds, to queue each device once.
    queued: HashSet<String>,
    /// Devices being published now.
    in_flight: HashSet<String>,
    /// Devices changed again while being published: queued once done.
    again: HashSet<String>,
}

impl Queue {
    /// Queues `device_id` (once).
    pub fn push(&self, device_id: &str) {
        {
            let mut inner = sync::lock(&self.inner);
            if inner.in_flight.contains(device_id) {
                inner.again.insert(device_id.to_owned());
            } else if inner.queued.insert(device_id.to_owned()) {
                inner.waiting.push_back(device_id.to_owned());
            }
        }
        self.wake.notify_one();
    }

    /// The next device to publish, now in flight.
    fn take(&self) -> Option<String> {
        let mut inner = sync::lock(&self.inner);
        let device_id = inner.waiting.pop_front()?;
        inner.queued.remove(&device_id);
        inner.in_flight.insert(device_id.clone());
        Some(device_id)
    }

    /// `device_id` is done, published or not.
    fn done(&self, device_id: &str, published: bool) {
        let again = {
            let mut inner = sync::lock(&self.inner);
            inner.in_flight.remove(device_id);
            inner.again.remove(device_id) || !published
        };
        if again {
            self.push(device_id);
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
        match self.storage.unpublished().await {
            Ok(devices) => devices.iter().for_each(|d| self.queue.push(d)),
            Err(error) => {
                warn!(%error, "desired states not published before the restart are not known; they go out with their next change")
            }
        }
        let mut in_flight = FuturesUnordered::new();
        let mut backoff = Backoff::default();
        loop {
            while in_flight.len() < IN_FLIGHT {
                let Some(device_id) = self.queue.take() else {
                    break;
                };
                in_flight.push(self.publish(device_id));
            }
            let failed = tokio::select! {
                Some(published) = in_flight.next(), if !in_flight.is_empty() => !published,
                () = self.queue.wake.notified() => false,
                () = shutdown.cancelled() => return,
            };
            if failed {
                // The broker is away: wait before the queue is tried again
                // (the publishes in flight finish meanwhile).
                let wait = backoff.next_wait();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => return,
                }
            } else if in_flight.is_empty() {
                backoff.reset();
            }
        }
    }

    /// Publishes `device_id`'s desired state as it is now; whether it went
    /// out (or there was nothing to publish).
    fn publish(&self, device_id: String) -> BoxFuture<'static, bool> {
        let queue = self.queue.clone();
        let storage = self.storage.clone();
        let transport = self.transport.clone();
        let topic = self.topic.topic_for(&device_id);
        let feed = self.feed.clone();
        Box::pin(async move {
            let published = match storage.get(&device_id).await {
                Ok(None) => true,
                Ok(Some(state)) => {
                    let payload = Bytes::from(state.desired_document());
                    let counters = feed.counters();
                    match transport.publish_retained(topic, payload).await {
                        Ok(()) => {
                            counters.desired_published.fetch_add(1, Ordering::Relaxed);
                            if let Err(error) = storage.published(&device_id, state.version).await {
                                debug!(%error, "a publish not noted; it is published again after a restart");
                            }
                            true
                        }
                        Err(error) => {
                            counters
                                .desired_publish_failures
                                .fetch_add(1, Ordering::Relaxed);
                            debug!(%error, "desired state not published; retrying");
                            false
                        }
                    }
                }
                Err(error) => {
                    debug!(%error, "desired state not read; retrying");
                    false
                }
            };
            queue.done(&device_id, published);
            published
        })
    }
}
