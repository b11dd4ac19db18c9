//! [`CommandPublisher`]: publishes commands through the shared client and
//! waits for the broker's acknowledgement.
//!
//! rumqttc's `publish` returns once the request is queued, and does not say
//! which packet id it got. Packet ids are assigned in queue order, and only
//! this module publishes, so [`AckTracker`] keeps the waiting callers in the
//! same order: `Outgoing::Publish(pkid)` pairs the oldest queued caller with
//! its pkid, `PubAck`/`PubComp` completes it. A pkid that is already in flight
//! is a retransmission after a reconnect, not a new publish. Enqueueing and the
//! tracker update happen under one lock, so the two queues cannot diverge.
//!
//! When the connection drops, requests still queued in rumqttc are moved into
//! its `pending` list (`EventLoop::clean`), which rumqttc discards at the next
//! ConnAck unless the broker kept the session. So with a clean session every
//! waiting caller is failed at once; with a persistent session they wait for
//! the ConnAck (or their acknowledgement timeout) and are failed only when the
//! session turns out to be gone.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use rumqttc::{AsyncClient, ClientError, QoS};
use tokio::sync::{oneshot, watch};
use tracing::warn;

use super::{LinkState, Shared};
use crate::{
    commands::{Publication, Transport, TransportError},
    state::{DesiredTransport, PublishFailed},
};
use futures_util::future::BoxFuture;

/// How long a command waits for the broker's acknowledgement.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a publish failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("the MQTT session is down")]
    NotConnected,
    #[error("the MQTT connection was lost before the broker acknowledged the publish")]
    ConnectionLost,
    #[error("the broker did not acknowledge the publish within {0:?}")]
    AckTimeout(Duration),
    #[error("too many publishes are waiting for the broker")]
    QueueFull,
}

type Waiter = oneshot::Sender<Result<(), PublishError>>;

/// Callers waiting for the broker, in rumqttc's order. See the module docs.
#[derive(Default)]
pub(super) struct AckTracker {
    /// Queued in rumqttc, no packet id yet.
    queued: VecDeque<(QoS, Waiter)>,
    /// Written with a packet id, waiting for PUBACK / PUBCOMP.
    in_flight: HashMap<u16, Waiter>,
    /// A publish whose packet id collided with one still in flight; rumqttc
    /// sends it when that one is acknowledged.
    collided: Option<(u16, Waiter)>,
}

impl AckTracker {
    pub(super) fn on_sent(&mut self, pkid: u16) {
        if pkid != 0 && self.in_flight.contains_key(&pkid) {
            return; // retransmission after a reconnect
        }
        if let Some((id, waiter)) = self.collided.take() {
            if id == pkid {
                self.in_flight.insert(pkid, waiter);
                return;
            }
            self.collided = Some((id, waiter));
        }
        match self.queued.pop_front() {
            Some((QoS::AtMostOnce, waiter)) => {
                let _ = waiter.send(Ok(()));
            }
            Some((_, waiter)) => {
                self.in_flight.insert(pkid, waiter);
            }
            None => warn!(pkid, "a publish left that no caller is waiting for"),
        }
    }

    pub(super) fn on_collision(&mut self, pkid: u16) {
        if let Some((_, waiter)) = self.queued.pop_front() {
            self.collided = Some((pkid, waiter));
        }
    }

    pub(super) fn on_acked(&mut self, pkid: u16) {
        if let Some(waiter) = self.in_flight.remove(&pkid) {
            let _ = waiter.send(Ok(()));
        }
    }

    pub(super) fn fail_all(&mut self, error: PublishError) {
        let queued = self.queued.drain(..).map(|(_, w)| w);
        let in_flight = self.in_flight.drain().map(|(_, w)| w);
        let collided = self.collided.take().map(|(_, w)| w);
        for waiter in queued.chain(in_flight).chain(collided) {
            let _ = waiter.send(Err(error.clone()));
        }
    }
}

/// Publishes commands through the shared client. Cheap to clone.
#[derive(Clone)]
pub struct CommandPublisher {
    client: AsyncClient,
    shared: Arc<Shared>,
}

impl CommandPublisher {
    pub(super) fn new(client: AsyncClient, shared: Arc<Shared>) -> Self {
        Self { client, shared }
    }

    /// Publishes `payload` to `topic` and waits until the broker acknowledged
    /// it (PUBACK for QoS 1, PUBCOMP for QoS 2, written for QoS 0), at most
    /// [`ACK_TIMEOUT`]. Fails at once when the link is down.
    pub async fn publish(
        &self,
        topic: String,
        payload: Bytes,
        qos: QoS,
    ) -> Result<(), PublishError> {
        self.publish_as(topic, payload, qos, false).await
    }

    /// [`CommandPublisher::publish`], retained when `retain` is set.
    async fn publish_as(
        &self,
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<(), PublishError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut tracker = self.shared.tracker();
            if *self.shared.state.borrow() == LinkState::Down {
                return Err(PublishError::NotConnected);
            }
            match self.client.try_publish(topic, qos, retain, payload) {
                Ok(()) => tracker.queued.push_back((qos, tx)),
                Err(ClientError::TryRequest(_)) => return Err(PublishError::QueueFull),
                Err(ClientError::Request(_)) => return Err(PublishError::NotConnected),
            }
        }
        // A timed-out caller's waiter stays queued until its publish is
        // written; only the receiving end goes away.
        match tokio::time::timeout(ACK_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            // The tracker dropped the waiter: the event loop has ended.
            Ok(Err(_)) => Err(PublishError::ConnectionLost),
            Err(_) => Err(PublishError::AckTimeout(ACK_TIMEOUT)),
        }
    }

    /// The link state, following changes.
    pub fn link_state(&self) -> watch::Receiver<LinkState> {
        self.shared.state.subscribe()
    }
}

/// Persistent commands go out through the same client, one publish per
/// attempt, acknowledged as any command.
impl Transport for CommandPublisher {
    fn publish(&self, publication: Publication) -> BoxFuture<'static, Result<(), TransportError>> {
        let publisher = self.clone();
        let qos = match publication.qos {
            0 => QoS::AtMostOnce,
            2 => QoS::ExactlyOnce,
            _ => QoS::AtLeastOnce,
        };
        Box::pin(async move {
            publisher
                .publish(publication.topic, publication.payload, qos)
                .await
                .map_err(|e| TransportError(e.to_string()))
        })
    }
}

/// Desired states go out through the same client, retained at QoS 1, so
/// that a device subscribing later gets the latest at once.
impl DesiredTransport for CommandPublisher {
    fn publish_retained(
        &self,
        topic: String,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<(), PublishFailed>> {
        let publisher = self.clone();
        Box::pin(async move {
            publisher
                .publish_as(topic, payload, QoS::AtLeastOnce, true)
                .await
                .map_err(|e| PublishFailed(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(tracker: &mut AckTracker, qos: QoS) -> oneshot::Receiver<Result<(), PublishError>> {
        let (tx, rx) = oneshot::channel();
        tracker.queued.push_back((qos, tx));
        rx
    }

    #[test]
    fn pairs_callers_with_packet_ids_in_order() {
        let mut t = AckTracker::default();
        let mut a = waiter(&mut t, QoS::AtLeastOnce);
        let mut b = waiter(&mut t, QoS::AtMostOnce);
        let mut c = waiter(&mut t, QoS::ExactlyOnce);
        t.on_sent(1);
        t.on_sent(0);
        t.on_sent(2);
        assert_eq!(b.try_recv(), Ok(Ok(())));
        assert!(a.try_recv().is_err());
        t.on_sent(1); // retransmission: not a new publish
        t.on_acked(2);
        assert_eq!(c.try_recv(), Ok(Ok(())));
        assert!(a.try_recv().is_err());
        t.on_acked(1);
        assert_eq!(a.try_recv(), Ok(Ok(())));
        assert!(t.queued.is_empty() && t.in_flight.is_empty());
    }

    #[test]
    fn collided_publish_waits_for_its_turn() {
        let mut t = AckTracker::default();
        let mut a = waiter(&mut t, QoS::AtLeastOnce);
        let mut b = waiter(&mut t, QoS::AtLeastOnce);
        t.on_sent(7);
        t.on_collision(7);
        t.on_acked(7);
        assert_eq!(a.try_recv(), Ok(Ok(())));
        t.on_sent(7);
        assert!(b.try_recv().is_err());
        t.on_acked(7);
        assert_eq!(b.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn fail_all_answers_every_caller() {
        let mut t = AckTracker::default();
        let mut a = waiter(&mut t, QoS::AtLeastOnce);
        let mut b = waiter(&mut t, QoS::AtLeastOnce);
        t.on_sent(1);
        t.fail_all(PublishError::ConnectionLost);
        assert_eq!(a.try_recv(), Ok(Err(PublishError::ConnectionLost)));
        assert_eq!(b.try_recv(), Ok(Err(PublishError::ConnectionLost)));
    }
}
