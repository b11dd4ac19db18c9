//! The event loop task: drives the shared client, reconnects with backoff,
//! subscribes on every ConnAck, hands incoming readings to memory or the
//! store (what each message is: `route.rs`), and keeps the [`LinkState`]
//! current.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Outgoing, Packet, PubAck,
    PubRec, Publish, QoS, Request, SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use super::{
    leave::{sleep_until, Group, Leaving},
    publish::PublishError,
    route::Router,
    Ingest, IngestCounters, LinkState, Shared,
};
use crate::{
    backoff::Backoff, config::MqttConfig, replies::ReplyRouter, state::ReportedInbox,
    store::StoredReading,
};

/// How long a clean MQTT disconnect may take at shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the event loop task owns.
pub(super) struct Driver {
    client: AsyncClient,
    shared: Arc<Shared>,
    ingest: Ingest,
    /// With a store: the packet ids and QoS of the QoS 1 and 2 publishes
    /// received on this connection and not acknowledged yet, with the id of
    /// the batch whose commit lets them be, oldest first (MQTT wants
    /// acknowledgements in order).
    unacked: VecDeque<(u64, u16, QoS)>,
    /// What each message received is, and where it goes.
    router: Router,
    /// One of several replicas (`--mqtt-share-group`).
    replicas: bool,
    /// The filters subscribed to: readings, devices' connection status,
    /// reported states (these three shared between replicas), and command
    /// replies (which every replica gets).
    subscriptions: [String; 4],
    subscribe_qos: QoS,
    clean_session: bool,
    broker: String,
    counters: Arc<IngestCounters>,
}

impl Driver {
    pub(super) fn new(
        config: &MqttConfig,
        client: AsyncClient,
        shared: Arc<Shared>,
        ingest: Ingest,
        replies: ReplyRouter,
        reported: ReportedInbox,
        counters: Arc<IngestCounters>,
    ) -> Self {
        // Replicas share readings and status messages (the broker hands
        // each to one of them, which stores it); every instance gets every
        // reply, to take those to its own commands.
        let share = |filter: &str| match &config.share_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter.to_owned(),
        };
        let subscriptions = [
            share(&config.readings_subscription),
            share(config.status_topic.subscription_filter()),
            share(config.reported_state_topic.subscription_filter()),
            config.replies_topic.subscription_filter().to_owned(),
        ];
        Self {
            replicas: config.share_group.is_some(),
            subscriptions,
            router: Router::new(config, replies, reported, counters.clone()),
            counters,
            client,
            shared,
            ingest,
            unacked: VecDeque::new(),
            subscribe_qos: config.subscribe_qos,
            clean_session: !config.persistent_session,
            broker: format!("{}:{}", config.host, config.port),
        }
    }

    pub(super) async fn run(mut self, mut eventloop: EventLoop, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut batch = Vec::new();
        let mut committed = match &self.ingest {
            Ingest::Durable(writer) => Some(writer.committed()),
            Ingest::Memory(_) => None,
        };
        let mut stop = Stop {
            shutdown,
            group: self.replicas.then(|| Group {
                client: self.client.clone(),
                shared: self.shared.clone(),
                filters: [
                    self.subscriptions[0].clone(),
                    self.subscriptions[1].clone(),
                    self.subscriptions[2].clone(),
                ],
            }),
            leaving: None,
        };
        while let Some(event) = self
            .next_event(&mut eventloop, &mut committed, &mut stop)
            .await
        {
            match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    take_batch(&mut batch, publish, &mut eventloop);
                    if !self.store_batch(&batch, &mut stop).await {
                        break;
                    }
                    batch.clear();
                    self.acknowledge_committed(&mut eventloop, committed.as_ref())
                        .await;
                }
                Ok(event) => {
                    if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                        backoff.reset();
                    }
                    self.handle(event);
                }
                Err(error) => {
                    let shutdown = &stop.shutdown;
                    if !self
                        .wait_to_reconnect(&mut eventloop, &error, &mut backoff, shutdown)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        if let Some(committed) = &mut committed {
            self.drain(&mut eventloop, committed).await;
        }
        self.disconnect(&mut eventloop).await;
    }

    /// The next event of the event loop, acknowledging what the store
    /// commits meanwhile; `None` once the loop is to stop: at shutdown, or
    /// for a replica once it has left its group.
    async fn next_event(
        &mut self,
        eventloop: &mut EventLoop,
        committed: &mut Option<watch::Receiver<u64>>,
        stop: &mut Stop,
    ) -> Option<Result<Event, ConnectionError>> {
        loop {
            let leave_by = stop.leaving.as_ref().map(Leaving::deadline);
            let event = tokio::select! {
                event = eventloop.poll() => event,
                Some(committed) = changed(committed) => {
                    self.acknowledge(eventloop, committed).await;
                    continue;
                }
                _ = stop.shutdown.cancelled(), if stop.leaving.is_none() => {
                    match stop.leave() {
                        true => continue,
                        false => return None,
                    }
                }
                _ = sleep_until(leave_by), if leave_by.is_some() => return None,
            };
            if let (Some(leaving), Ok(event)) = (&mut stop.leaving, &event) {
                leaving.saw(event);
            }
            return Some(event);
        }
    }

    /// Stores `batch` (see [`Driver::ingest`]). False when shutdown comes
    /// first and there is no group to leave: the loop stops, and the
    /// publishes are not acknowledged, so the broker delivers them again. A
    /// replica leaving its group goes on (the writer ends if it cannot
    /// commit, which ends the wait).
    async fn store_batch(&mut self, batch: &[Publish], stop: &mut Stop) -> bool {
        let ingest = self.ingest(batch);
        tokio::pin!(ingest);
        loop {
            tokio::select! {
                _ = &mut ingest => return true,
                _ = stop.shutdown.cancelled(), if stop.leaving.is_none() => {
                    if !stop.leave() {
                        return false;
                    }
                }
            }
        }
    }

    /// After a batch is stored: acknowledges the publishes with nothing to
    /// store (another replica's reply, one rejected) that wait for a batch
    /// already committed. No commit would come to acknowledge them, and the
    /// broker, its window full, would stop sending.
    async fn acknowledge_committed(
        &mut self,
        eventloop: &mut EventLoop,
        committed: Option<&watch::Receiver<u64>>,
    ) {
        let Some(committed) = committed else {
            return;
        };
        let now = *committed.borrow();
        if self.unacked.front().is_some_and(|&(id, ..)| id <= now) {
            self.acknowledge(eventloop, now).await;
        }
    }

    /// After a connection error: the link is down; logs why, and waits
    /// before the next poll reconnects. False if shutdown comes first.
    async fn wait_to_reconnect(
        &mut self,
        eventloop: &mut EventLoop,
        error: &ConnectionError,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> bool {
        self.connection_lost(eventloop, error);
        let wait = backoff.next_wait();
        match refusal(error) {
            Some(reason) => {
                warn!(broker = %self.broker, %error, retry_in = ?wait, "MQTT connection failed: {reason}")
            }
            None => {
                warn!(broker = %self.broker, %error, retry_in = ?wait, "MQTT connection failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = shutdown.cancelled() => false,
        }
    }

    /// Acknowledges the publishes whose batches are committed, up to batch
    /// `committed`, with one write to the socket for all of them: what
    /// rumqttc does for the acknowledgements of one read when it sends them
    /// itself. (Through `AsyncClient::ack`, each would be a request of its
    /// own, written and flushed alone, taking turns at random with socket
    /// reads in rumqttc's event loop.) A write that fails leaves them
    /// unacknowledged: the broker delivers them again after the reconnect
    /// the next poll starts.
    async fn acknowledge(&mut self, eventloop: &mut EventLoop, committed: u64) {
        let Some(network) = eventloop.network.as_mut() else {
            return; // not connected; `connection_lost` cleared the list
        };
        let mut written = 0;
        while let Some(&(batch, pkid, qos)) = self.unacked.front() {
            if batch > committed {
                break;
            }
            let ack = match qos {
                QoS::AtLeastOnce => Some(Request::PubAck(PubAck::new(pkid))),
                QoS::ExactlyOnce => Some(Request::PubRec(PubRec::new(pkid))),
                QoS::AtMostOnce => None, // never queued
            };
            self.unacked.pop_front();
            let Some(ack) = ack else { continue };
            let packet = match eventloop.state.handle_outgoing_packet(ack) {
                Ok(Some(packet)) => packet,
                Ok(None) => continue,
                Err(error) => {
                    debug!(%error, "acknowledgement not sent");
                    continue;
                }
            };
            if let Err(error) = network.write(packet).await {
                debug!(%error, "acknowledgement not written");
                return;
            }
            written += 1;
        }
        if written > 0 {
            let flushed = tokio::time::timeout(DISCONNECT_TIMEOUT, network.flush()).await;
            if !matches!(flushed, Ok(Ok(()))) {
                debug!("acknowledgements not flushed; the connection is failing");
            }
        }
    }

    /// At shutdown: waits (bounded) for what was handed to the store to be
    /// committed, and acknowledges it, so the broker does not deliver it
    /// again after a restart.
    async fn drain(&mut self, eventloop: &mut EventLoop, committed: &mut watch::Receiver<u64>) {
        let Ingest::Durable(writer) = &self.ingest else {
            return;
        };
        let last_sent = writer.last_sent();
        let all = async { committed.wait_for(|c| *c >= last_sent).await.is_ok() };
        let done = tokio::time::timeout(DISCONNECT_TIMEOUT, all).await == Ok(true);
        let upto = *committed.borrow();
        self.acknowledge(eventloop, upto).await;
        if !done {
            warn!(
                unacknowledged = self.unacked.len(),
                "readings not committed at shutdown; the broker delivers them again"
            );
        }
    }

    /// Handles an event other than an incoming publish (see `run`).
    fn handle(&self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(connack)) => {
                self.counters.connects.fetch_add(1, Ordering::Relaxed);
                info!(broker = %self.broker, session_present = connack.session_present, "MQTT connected");
                let mut tracker = self.shared.tracker();
                if !connack.session_present {
                    // rumqttc has just discarded everything it had pending.
                    tracker.fail_all(PublishError::ConnectionLost);
                }
                self.shared.state.send_replace(LinkState::Connected);
                drop(tracker);
                let filters = self
                    .subscriptions
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), self.subscribe_qos));
                if let Err(error) = self.client.try_subscribe_many(filters) {
                    warn!(%error, "could not queue the subscriptions");
                }
            }
            Event::Incoming(Packet::SubAck(suback)) => {
                let filters = &self.subscriptions;
                let codes = &suback.return_codes;
                let granted = codes.len() == filters.len()
                    && codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if granted {
                    info!(
                        ?filters,
                        ?codes,
                        "subscribed to readings, status, reported states and replies"
                    );
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

    /// Stores publishes received together (and routes the replies among
    /// them), parsing topics before taking the buffer's lock. With a store,
    /// hands them to its writer (waiting while its queue is full) and keeps
    /// the QoS 1 and 2 ones to acknowledge once committed.
    async fn ingest(&mut self, batch: &[Publish]) {
        let mut parsed = self.router.parse(batch);
        let readings = std::mem::take(&mut parsed.readings);
        self.router.hand_reported(parsed).await;
        let count = readings.len();
        match &self.ingest {
            Ingest::Memory(hub) => {
                let last_seq = hub.push_all(readings.into_iter().map(|(_, r)| r));
                trace!(last_seq, count, "readings stored");
            }
            Ingest::Durable(writer) => {
                let stored = readings
                    .iter()
                    .map(|(publish, reading)| StoredReading::new(reading, publish.payload.clone()))
                    .collect::<Vec<_>>();
                // Publishes not stored (rejected) are acknowledged with the
                // batch before them, keeping acknowledgements in order.
                let id = match stored.is_empty() {
                    true => Some(writer.last_sent()),
                    false => writer.send(stored).await,
                };
                drop(readings);
                let Some(id) = id else {
                    return; // the writer stopped: shutting down
                };
                let needs_ack = batch.iter().filter(|p| p.qos != QoS::AtMostOnce);
                self.unacked.extend(needs_ack.map(|p| (id, p.pkid, p.qos)));
                trace!(batch = id, count, "readings handed to the store");
            }
        }
    }

    fn connection_lost(&mut self, eventloop: &mut EventLoop, error: &ConnectionError) {
        let mut tracker = self.shared.tracker();
        let was = self.shared.state.send_replace(LinkState::Down);
        if was != LinkState::Down {
            self.counters.disconnects.fetch_add(1, Ordering::Relaxed);
            warn!(broker = %self.broker, %error, "MQTT connection lost");
        }
        // Publishes queued after rumqttc's own clean-up are moved to its
        // pending list too, so none slips out unmatched after the reconnect.
        eventloop.clean();
        // Acknowledgements belong to the connection: packet ids start over,
        // and one sent on the next connection could acknowledge another
        // message, not yet committed. The broker delivers the unacknowledged
        // ones again (with a persistent session).
        self.unacked.clear();
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

/// How the event loop task ends: at once at shutdown, or for a replica
/// once it has left its share group (`leave.rs`).
struct Stop {
    shutdown: CancellationToken,
    /// Apart from the [`Driver`], so that leaving can start while an ingest
    /// (which borrows the driver) waits.
    group: Option<Group>,
    leaving: Option<Leaving>,
}

impl Stop {
    /// At shutdown: starts leaving the group. False when there is none to
    /// leave: the loop stops now.
    fn leave(&mut self) -> bool {
        self.leaving = self.group.as_ref().and_then(Group::leave);
        self.leaving.is_some()
    }
}

/// `publish` and the publishes queued right behind it, into `batch`.
/// rumqttc decodes up to ten packets per read and hands them out one by
/// one; those queued behind this one are stored with it, under one lock and
/// one wake-up of the watchers. (Popping them is what `poll` would do next,
/// without I/O.) The acknowledgements rumqttc sent for them in between need
/// nothing from us.
fn take_batch(batch: &mut Vec<Publish>, publish: Publish, eventloop: &mut EventLoop) {
    batch.push(publish);
    while let Some(
        Event::Incoming(Packet::Publish(_))
        | Event::Outgoing(Outgoing::PubAck(_) | Outgoing::PubRec(_)),
    ) = eventloop.state.events.front()
    {
        if let Some(Event::Incoming(Packet::Publish(publish))) = eventloop.state.events.pop_front()
        {
            batch.push(publish);
        }
    }
}

/// In words, why the broker would not have us, when that is the reason a
/// connection failed: a refused login or a failed TLS handshake are
/// configuration to fix, not a network hiccup, and the log must say so.
fn refusal(error: &ConnectionError) -> Option<&'static str> {
    let tls = "TLS with the broker failed (its certificate is not trusted or names another host, or it refused ours)";
    match error {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
        ) => Some("the broker refused the login (wrong user name or password, or not authorized)"),
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId) => {
            Some("the broker refused the client id")
        }
        ConnectionError::Tls(_) => Some(tls),
        // rustls reports handshake failures through the socket's I/O error,
        // and under TLS 1.3 a broker refuses a client certificate only after
        // the handshake: that alert arrives wrapped in rumqttc's state and
        // decoding errors. Look down the whole chain.
        _ if caused_by_tls(error) => Some(tls),
        _ => None,
    }
}

/// Whether a rustls error is anywhere in `error`'s chain of sources.
fn caused_by_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        let io_inner = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        if error.is::<rustls::Error>() || io_inner.is_some_and(|e| e.is::<rustls::Error>()) {
            return true;
        }
        cause = error.source();
    }
    false
}

/// The next value of `committed`, if there is one to follow: pending
/// forever when there is none, or its writer is gone.
async fn changed(committed: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    if let Some(rx) = committed {
        if rx.changed().await.is_ok() {
            return Some(*rx.borrow_and_update());
        }
    }
    std::future::pending().await
}
