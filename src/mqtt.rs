//! The MQTT side: the one shared `rumqttc` client, the task that drives its
//! event loop (ingesting readings into the [`ReadingHub`]), and
//! [`CommandPublisher`], which publishes commands and waits for the broker's
//! acknowledgement.
//!
//! # The event loop task
//! rumqttc does nothing unless `EventLoop::poll` is called, and it has no
//! delay of its own after an error, so the task polls continuously and sleeps
//! with exponential backoff after each connection error. It subscribes again
//! on every ConnAck (a clean session forgets subscriptions) with `try_*`
//! calls: awaiting the client from the task that drives it could deadlock
//! when the request channel is full.
//!
//! # Acknowledgements
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
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet,
    QoS, SubscribeFilter, SubscribeReasonCode,
};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, info, trace, warn};

use crate::{
    buffer::NewReading, hub::ReadingHub, replies::ReplyRouter, shutdown::Shutdown,
    topic::TopicTemplate,
};

/// How long a command waits for the broker's acknowledgement.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Capacity of rumqttc's request queue: commands waiting to be written.
const REQUEST_QUEUE: usize = 1024;

/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long a clean MQTT disconnect may take at shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how to connect to the broker.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive: Duration,
    /// QoS of the readings subscription.
    pub subscribe_qos: QoS,
    /// Largest MQTT packet accepted or sent, in bytes.
    pub max_packet_bytes: usize,
    /// Keep the broker session (and queued QoS 1/2 readings) across
    /// reconnects and restarts: clean session off.
    pub persistent_session: bool,
    pub readings_topic: TopicTemplate,
    pub commands_topic: TopicTemplate,
    pub replies_topic: TopicTemplate,
}

/// The state of the MQTT link, as health checks and commands see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected (or shutting down).
    Down,
    /// Connected; the readings subscription is not confirmed yet.
    Connected,
    /// Connected and subscribed: readings flow.
    Ready,
}

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
struct AckTracker {
    /// Queued in rumqttc, no packet id yet.
    queued: VecDeque<(QoS, Waiter)>,
    /// Written with a packet id, waiting for PUBACK / PUBCOMP.
    in_flight: HashMap<u16, Waiter>,
    /// A publish whose packet id collided with one still in flight; rumqttc
    /// sends it when that one is acknowledged.
    collided: Option<(u16, Waiter)>,
}

impl AckTracker {
    fn on_sent(&mut self, pkid: u16) {
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

    fn on_collision(&mut self, pkid: u16) {
        if let Some((_, waiter)) = self.queued.pop_front() {
            self.collided = Some((pkid, waiter));
        }
    }

    fn on_acked(&mut self, pkid: u16) {
        if let Some(waiter) = self.in_flight.remove(&pkid) {
            let _ = waiter.send(Ok(()));
        }
    }

    fn fail_all(&mut self, error: PublishError) {
        let queued = self.queued.drain(..).map(|(_, w)| w);
        let in_flight = self.in_flight.drain().map(|(_, w)| w);
        let collided = self.collided.take().map(|(_, w)| w);
        for waiter in queued.chain(in_flight).chain(collided) {
            let _ = waiter.send(Err(error.clone()));
        }
    }
}

/// State shared by the event loop task and the publishers. One lock, so that
/// "is the link up" and "enqueue the publish" are one step.
struct Shared {
    tracker: Mutex<AckTracker>,
    state: watch::Sender<LinkState>,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, AckTracker> {
        // The tracker's invariants hold between statements; keep serving after
        // a panic elsewhere.
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Publishes commands through the shared client. Cheap to clone.
#[derive(Clone)]
pub struct CommandPublisher {
    client: AsyncClient,
    shared: Arc<Shared>,
}

impl CommandPublisher {
    /// Publishes `payload` to `topic` and waits until the broker acknowledged
    /// it (PUBACK for QoS 1, PUBCOMP for QoS 2, written for QoS 0), at most
    /// [`ACK_TIMEOUT`]. Fails at once when the link is down.
    pub async fn publish(
        &self,
        topic: String,
        payload: Bytes,
        qos: QoS,
    ) -> Result<(), PublishError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut tracker = self.shared.tracker();
            if *self.shared.state.borrow() == LinkState::Down {
                return Err(PublishError::NotConnected);
            }
            match self.client.try_publish(topic, qos, false, payload) {
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

/// The running MQTT link: its publisher and the event loop task.
pub struct MqttLink {
    pub publisher: CommandPublisher,
    /// Ends after a clean disconnect once shutdown has fired.
    pub task: JoinHandle<()>,
}

/// Builds rumqttc's options from `config`.
fn options(config: &MqttConfig) -> MqttOptions {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes)
        .set_clean_session(!config.persistent_session)
        .set_request_channel_capacity(REQUEST_QUEUE);
    options
}

/// Starts the shared client and its event loop task, which stores incoming
/// readings (and command replies) in `hub` and routes replies through
/// `replies`, until `shutdown` fires.
pub fn start(
    config: &MqttConfig,
    hub: Arc<ReadingHub>,
    replies: Arc<ReplyRouter>,
    shutdown: Shutdown,
) -> MqttLink {
    let (client, mut eventloop) = AsyncClient::new(options(config), REQUEST_QUEUE);
    // Commands and acknowledgements are small writes that must go out at
    // once, not wait for Nagle's algorithm.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let shared = Arc::new(Shared {
        tracker: Mutex::default(),
        state: watch::channel(LinkState::Down).0,
    });
    let driver = Driver {
        client: client.clone(),
        shared: shared.clone(),
        hub,
        replies,
        readings_topic: config.readings_topic.clone(),
        replies_topic: config.replies_topic.clone(),
        subscribe_qos: config.subscribe_qos,
        clean_session: !config.persistent_session,
        broker: format!("{}:{}", config.host, config.port),
    };
    let task = tokio::spawn(driver.run(eventloop, shutdown));
    MqttLink {
        publisher: CommandPublisher { client, shared },
        task,
    }
}

struct Driver {
    client: AsyncClient,
    shared: Arc<Shared>,
    hub: Arc<ReadingHub>,
    replies: Arc<ReplyRouter>,
    readings_topic: TopicTemplate,
    replies_topic: TopicTemplate,
    subscribe_qos: QoS,
    clean_session: bool,
    broker: String,
}

impl Driver {
    async fn run(self, mut eventloop: EventLoop, mut shutdown: Shutdown) {
        let mut backoff = BACKOFF_MIN;
        let mut batch = Vec::new();
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = shutdown.recv() => break,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    // rumqttc decodes up to ten packets per read and hands
                    // them out one by one; the publishes queued right behind
                    // this one are stored with it, under one lock and one
                    // wake-up of the watchers. (Popping them is what `poll`
                    // would do next, without I/O.) The acknowledgements
                    // rumqttc sent for them in between need nothing from us.
                    batch.push(publish);
                    while let Some(
                        Event::Incoming(Packet::Publish(_))
                        | Event::Outgoing(Outgoing::PubAck(_) | Outgoing::PubRec(_)),
                    ) = eventloop.state.events.front()
                    {
                        if let Some(Event::Incoming(Packet::Publish(publish))) =
                            eventloop.state.events.pop_front()
                        {
                            batch.push(publish);
                        }
                    }
                    self.ingest(&batch);
                    batch.clear();
                }
                Ok(event) => {
                    if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                        backoff = BACKOFF_MIN;
                    }
                    self.handle(event);
                }
                Err(error) => {
                    self.connection_lost(&mut eventloop, &error);
                    warn!(broker = %self.broker, %error, retry_in = ?backoff, "MQTT connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.recv() => break,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        self.disconnect(&mut eventloop).await;
    }

    /// Handles an event other than an incoming publish (see `run`).
    fn handle(&self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(connack)) => {
                info!(broker = %self.broker, session_present = connack.session_present, "MQTT connected");
                let mut tracker = self.shared.tracker();
                if !connack.session_present {
                    // rumqttc has just discarded everything it had pending.
                    tracker.fail_all(PublishError::ConnectionLost);
                }
                self.shared.state.send_replace(LinkState::Connected);
                drop(tracker);
                let filters = self
                    .subscriptions()
                    .map(|f| SubscribeFilter::new(f.to_owned(), self.subscribe_qos));
                if let Err(error) = self.client.try_subscribe_many(filters) {
                    warn!(%error, "could not queue the readings and replies subscriptions");
                }
            }
            Event::Incoming(Packet::SubAck(suback)) => {
                let filters: Vec<&str> = self.subscriptions().collect();
                let codes = &suback.return_codes;
                let granted = codes.len() == filters.len()
                    && codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if granted {
                    info!(?filters, ?codes, "subscribed to readings and replies");
                    self.shared.state.send_replace(LinkState::Ready);
                } else {
                    warn!(?filters, ?codes, "the broker refused a subscription");
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => self.shared.tracker().on_acked(ack.pkid),
            Event::Incoming(Packet::PubComp(comp)) => self.shared.tracker().on_acked(comp.pkid),
            Event::Outgoing(Outgoing::Publish(pkid)) => self.shared.tracker().on_sent(pkid),
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => self.shared.tracker().on_collision(pkid),
            other => trace!(event = ?other, "MQTT event"),
        }
    }

    /// The filters subscribed to: readings and command replies.
    fn subscriptions(&self) -> impl Iterator<Item = &str> {
        [
            self.readings_topic.subscription_filter(),
            self.replies_topic.subscription_filter(),
        ]
        .into_iter()
    }

    /// Stores publishes received together (and routes the replies among
    /// them), parsing topics before taking the buffer's lock.
    fn ingest(&self, batch: &[rumqttc::Publish]) {
        // One read, one time: they arrived together.
        let received_at = SystemTime::now();
        let readings: Vec<NewReading<'_>> = batch
            .iter()
            .map(|publish| {
                // Replies are buffered like readings, and routed to a waiting
                // SendCommand call if there is one.
                let device_id = match self.replies_topic.device_id_of(&publish.topic) {
                    Some(device_id) => {
                        self.replies.route(device_id, &publish.payload);
                        Some(device_id)
                    }
                    None => self.readings_topic.device_id_of(&publish.topic),
                };
                if device_id.is_none() {
                    debug!(
                        topic = publish.topic,
                        "message on a topic outside the readings and replies templates"
                    );
                }
                NewReading {
                    device_id: device_id.unwrap_or(""),
                    topic: &publish.topic,
                    payload: &publish.payload,
                    qos: publish.qos as u8,
                    retained: publish.retain,
                    received_at,
                }
            })
            .collect();
        let last_seq = self.hub.push_all(readings);
        trace!(last_seq, count = batch.len(), "readings stored");
    }

    fn connection_lost(&self, eventloop: &mut EventLoop, error: &ConnectionError) {
        let mut tracker = self.shared.tracker();
        let was = self.shared.state.send_replace(LinkState::Down);
        if was != LinkState::Down {
            warn!(broker = %self.broker, %error, "MQTT connection lost");
        }
        // Publishes queued after rumqttc's own clean-up are moved to its
        // pending list too, so none slips out unmatched after the reconnect.
        eventloop.clean();
        if self.clean_session {
            tracker.fail_all(PublishError::ConnectionLost);
        }
    }

    /// Sends DISCONNECT and drives the loop until it is written, bounded.
    async fn disconnect(&self, eventloop: &mut EventLoop) {
        let connected = *self.shared.state.borrow() != LinkState::Down;
        self.shared.state.send_replace(LinkState::Down);
        if connected && self.client.try_disconnect().is_ok() {
            let flushed = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(event) => self.handle(event),
                    }
                }
            })
            .await;
            if flushed.is_err() {
                warn!("MQTT disconnect did not complete in time");
            } else {
                info!(broker = %self.broker, "MQTT disconnected");
            }
        }
        self.shared.tracker().fail_all(PublishError::ConnectionLost);
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
