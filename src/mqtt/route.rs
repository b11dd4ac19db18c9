//! What each message from a device is, and where it goes: a reading, a
//! reply (to the [`ReplyRouter`] too), a status message, or a reported
//! state (to the [`ReportedInbox`], not buffered); and whether it may be
//! stored at all. Runs on the event loop for every message received,
//! before the hand-off to memory or the store; only the hand-off of
//! reported states waits, while their queue is full.

use std::{sync::Arc, time::SystemTime};

use bytes::Bytes;
use rumqttc::Publish;
use tracing::{debug, warn};

use super::{IngestCounters, Rejection};
use crate::{
    buffer::{ConnectionStatus, MessageKind, NewReading},
    config::MqttConfig,
    log_limit::{truncated, LogLimit},
    replies::{ReplyRouter, Routed},
    state::ReportedInbox,
    topic::{check_received_topic, TopicTemplate},
};

/// Messages not stored ([`Rejection`]), rate-limited: a device may send
/// nothing else.
static REJECTED_LOG: LogLimit = LogLimit::new();

/// What [`Router::parse`] made of a batch.
pub(super) struct Parsed<'a> {
    /// The publishes to store, each with what is stored of it.
    pub readings: Vec<(&'a Publish, NewReading<'a>)>,
    /// Reported states: the device and the payload.
    reported: Vec<(&'a str, &'a Bytes)>,
    received_at: SystemTime,
}

/// The topics messages arrive on, and where each kind goes.
pub(super) struct Router {
    readings_topic: TopicTemplate,
    replies_topic: TopicTemplate,
    status_topic: TopicTemplate,
    reported_state_topic: TopicTemplate,
    replies: ReplyRouter,
    reported: ReportedInbox,
    /// One of several replicas (`--mqtt-share-group`).
    replicas: bool,
    max_reading_bytes: usize,
    counters: Arc<IngestCounters>,
}

impl Router {
    pub(super) fn new(
        config: &MqttConfig,
        replies: ReplyRouter,
        reported: ReportedInbox,
        counters: Arc<IngestCounters>,
    ) -> Self {
        Self {
            readings_topic: config.readings_topic.clone(),
            replies_topic: config.replies_topic.clone(),
            status_topic: config.status_topic.clone(),
            reported_state_topic: config.reported_state_topic.clone(),
            replies,
            reported,
            replicas: config.share_group.is_some(),
            max_reading_bytes: config.max_reading_bytes,
            counters,
        }
    }

    /// The publishes of `batch` to store, each with what is stored of it,
    /// replies routed meanwhile; and the reported states among them, for
    /// [`Router::hand_reported`].
    pub(super) fn parse<'a>(&'a self, batch: &'a [Publish]) -> Parsed<'a> {
        // One read, one time: they arrived together.
        let received_at = SystemTime::now();
        let mut reported = Vec::new();
        let readings = batch
            .iter()
            .filter(|publish| self.admissible(publish))
            .filter_map(|publish| {
                let (device_id, kind) = self.kind(publish, &mut reported)?;
                let reading = NewReading {
                    kind,
                    device_id: device_id.unwrap_or(""),
                    topic: &publish.topic,
                    payload: &publish.payload,
                    qos: publish.qos as u8,
                    retained: publish.retain,
                    received_at,
                };
                Some((publish, reading))
            })
            .collect();
        Parsed {
            readings,
            reported,
            received_at,
        }
    }

    /// Hands reported states to their inbox, waiting while it is full: the
    /// storage is slower than the devices, and the broker holds what is not
    /// read meanwhile, as it does for readings when the store's writer is
    /// full.
    pub(super) async fn hand_reported(&self, parsed: Parsed<'_>) {
        for (device_id, payload) in parsed.reported {
            self.reported
                .push(device_id, payload.clone(), parsed.received_at)
                .await;
        }
    }

    /// What `publish` is, and its device; `None` when it is not buffered.
    /// Replies and status messages are buffered like readings; replies are
    /// routed to a waiting SendCommand call if there is one, status
    /// messages set the device's status. Reported states are not readings:
    /// they go to the state storage only.
    fn kind<'a>(
        &'a self,
        publish: &'a Publish,
        reported: &mut Vec<(&'a str, &'a Bytes)>,
    ) -> Option<(Option<&'a str>, MessageKind)> {
        let topic = &publish.topic;
        if let Some(id) = self.replies_topic.device_id_of(topic) {
            let routed = self.replies.route(id, &publish.payload);
            if self.replicas && routed == Routed::Foreign {
                // Every replica receives it; the one whose command it
                // answers stores it.
                return None;
            }
            return Some((Some(id), MessageKind::Reply));
        }
        if let Some(id) = self.status_topic.device_id_of(topic) {
            let status = ConnectionStatus::parse(&publish.payload);
            if status.is_none() {
                debug!(
                    topic = truncated(topic),
                    "status message neither online nor offline"
                );
            }
            return Some((Some(id), MessageKind::Status(status)));
        }
        if let Some(id) = self.reported_state_topic.device_id_of(topic) {
            reported.push((id, &publish.payload));
            return None;
        }
        let device_id = self.readings_topic.device_id_of(topic);
        if device_id.is_none() {
            debug!(
                topic = truncated(topic),
                "message on a topic outside the readings, replies, status and reported state templates"
            );
        }
        Some((device_id, MessageKind::Reading))
    }

    /// Whether `publish` can be stored; counts and logs (rate-limited) one
    /// that cannot, which is still acknowledged, so that the broker does
    /// not deliver it again (a retained one would come back on every
    /// connection and, refused by the store, stop every commit). Too large
    /// for the buffer's promise that every reading fits one gRPC message,
    /// or on a topic the store or a command could not hold, it is not
    /// stored, and a reply is not routed either.
    fn admissible(&self, publish: &Publish) -> bool {
        let bytes = publish.payload.len();
        let refused = if bytes > self.max_reading_bytes {
            Some((
                Rejection::TooLarge,
                format!(
                    "larger than --max-reading-bytes ({bytes} > {})",
                    self.max_reading_bytes
                ),
            ))
        } else if publish.topic.contains(char::REPLACEMENT_CHARACTER) {
            // What the patched rumqttc puts for bytes that are not UTF-8.
            Some((Rejection::InvalidUtf8, "topic is not UTF-8".to_owned()))
        } else {
            check_received_topic(&publish.topic)
                .err()
                .map(|error| (Rejection::InvalidTopic, format!("topic {error}")))
        };
        let Some((why, detail)) = refused else {
            return true;
        };
        self.counters.reject(why);
        if let Some(left_out) = REJECTED_LOG.allow() {
            warn!(
                topic = truncated(&publish.topic),
                reason = why.reason(),
                similar_lines_left_out = left_out,
                "message from a device not stored: {detail}"
            );
        }
        false
    }
}
