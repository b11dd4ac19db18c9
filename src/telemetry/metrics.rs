//! `GET /metrics` in the Prometheus text format, on `--metrics-addr`.
//!
//! The values are not counted twice: a collector reads them at each scrape
//! from the same counters the `stats` log line prints (the hub's, the reply
//! router's, the MQTT link's, the gRPC listener's), so the two can never
//! disagree, and counting costs the ingest and delivery paths nothing
//! beyond what they already did. Nothing is copied between scrapes: each
//! sample is its source's value at that moment, however many scrapes run at
//! once. The registry and the exposition format are the `prometheus`
//! crate's; process metrics come from its process collector. The
//! `grpc_server_*` metrics are the one exception: counted per call by
//! `calls/` into the same registry, because no other counter sees calls.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    core::{Collector, Desc},
    proto::{self, MetricType},
    Encoder, Registry, TextEncoder,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    commands::Commands, grpc::EncodedReadings, hub::ReadingHub, listener::ListenerStats,
    mqtt::IngestCounters, mqtt::LinkState, replies::ReplyRouter, state::DeviceStates,
    store::Postgres,
};

/// How long one scrape connection may stay open.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the values come from.
pub struct Sources {
    pub hub: ReadingHub,
    /// The one cache of readings' messages (the gRPC side's).
    pub encoded: Arc<EncodedReadings>,
    pub replies: ReplyRouter,
    pub link_counters: Arc<IngestCounters>,
    pub link: watch::Receiver<LinkState>,
    /// The PostgreSQL store, if one is configured: its metrics exist only
    /// then.
    pub store: Option<Postgres>,
    /// The gRPC listener's open connections and closes by reason.
    pub listener: ListenerStats,
    /// Persistent commands.
    pub commands: Commands,
    /// Device states.
    pub states: DeviceStates,
}

/// One metric family as one scrape reads it.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Samples,
}

enum Samples {
    One(f64),
    /// One sample per value of the label.
    By(&'static str, Vec<(&'static str, f64)>),
}

fn counter(name: &'static str, help: &'static str, value: u64) -> Family {
    Family {
        name,
        help,
        kind: MetricType::COUNTER,
        samples: Samples::One(value as f64),
    }
}

fn gauge(name: &'static str, help: &'static str, value: f64) -> Family {
    Family {
        name,
        help,
        kind: MetricType::GAUGE,
        samples: Samples::One(value),
    }
}

fn counters(
    name: &'static str,
    help: &'static str,
    label: &'static str,
    values: impl IntoIterator<Item = (&'static str, u64)>,
) -> Family {
    let values = values.into_iter().map(|(v, n)| (v, n as f64)).collect();
    Family {
        name,
        help,
        kind: MetricType::COUNTER,
        samples: Samples::By(label, values),
    }
}

fn gauges(
    name: &'static str,
    help: &'static str,
    label: &'static str,
    values: impl IntoIterator<Item = (&'static str, u64)>,
) -> Family {
    Family {
        kind: MetricType::GAUGE,
        ..counters(name, help, label, values)
    }
}

impl Family {
    fn desc(&self) -> prometheus::Result<Desc> {
        let labels = match &self.samples {
            Samples::One(_) => vec![],
            Samples::By(label, _) => vec![label.to_string()],
        };
        Desc::new(self.name.into(), self.help.into(), labels, HashMap::new())
    }

    fn into_proto(self) -> proto::MetricFamily {
        let kind = self.kind;
        let metric = |labels: Vec<proto::LabelPair>, value: f64| {
            let mut metric = proto::Metric::from_label(labels);
            match kind {
                MetricType::GAUGE => {
                    let mut gauge = proto::Gauge::default();
                    gauge.set_value(value);
                    metric.set_gauge(gauge);
                }
                _ => {
                    let mut counter = proto::Counter::default();
                    counter.set_value(value);
                    metric.set_counter(counter);
                }
            }
            metric
        };
        let metrics = match self.samples {
            Samples::One(value) => vec![metric(vec![], value)],
            Samples::By(label, values) => values
                .into_iter()
                .map(|(value_of_label, value)| {
                    let mut pair = proto::LabelPair::default();
                    pair.set_name(label.into());
                    pair.set_value(value_of_label.into());
                    metric(vec![pair], value)
                })
                .collect(),
        };
        let mut family = proto::MetricFamily::default();
        family.set_name(self.name.into());
        family.set_help(self.help.into());
        family.set_field_type(kind);
        family.set_metric(metrics);
        family
    }
}

impl Sources {
    /// Every devicehub_* metric, read now.
    fn read(&self) -> Vec<Family> {
        let hub = self.hub.stats();
        let buffer = &hub.buffer;
        let encoded = self.encoded.stats();
        let replies = self.replies.stats();
        let link = &self.link_counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut rejected = link.rejected();
        if let Some(store) = &self.store {
            rejected.push(("refused_by_store", load(&store.counters().refused_readings)));
        }
        let age = buffer
            .oldest_received_at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        let mut families = vec![
            counter("devicehub_readings_received_total", "Readings stored in the buffer.", buffer.readings as u64 + buffer.evicted),
            counters("devicehub_readings_rejected_total", "Readings not stored, by reason.", "reason", rejected),
            counter("devicehub_readings_evicted_total", "Readings evicted from the buffer to make room.", buffer.evicted),
            gauge("devicehub_buffer_readings", "Readings in the buffer.", buffer.readings as f64),
            gauge("devicehub_buffer_bytes", "Bytes the buffer counts against --buffer-max-bytes.", buffer.bytes as f64),
            gauge("devicehub_buffer_oldest_age_seconds", "Age of the oldest buffered reading (0 when the buffer is empty).", age),
            gauge("devicehub_watchers", "WatchReadings streams open.", hub.watchers as f64),
            counter("devicehub_watch_gaps_total", "Times a watcher found readings it had not received evicted.", hub.watcher_gaps),
            counter("devicehub_watch_behind_live_total", "Watcher reads whose next reading had left the ring of the newest readings (read from the buffer under its lock instead).", hub.watcher_behind_live),
            gauge("devicehub_encoded_readings_bytes", "Bytes of readings' encoded messages kept for the responses that carry them: watch streams, pages, the device list (at most 32 MiB).", encoded.bytes as f64),
            counter("devicehub_encoded_readings_not_kept_total", "Readings' messages encoded and not kept because those 32 MiB had no room (or a message was over 2 MiB): encoded again for each response.", encoded.not_kept),
            counter("devicehub_reading_encodings_total", "Readings' messages encoded because none was kept: first uses, messages pushed out by another reading's, those not kept.", encoded.encodings),
            counter("devicehub_watch_missed_readings_total", "Readings watchers missed that way.", hub.watcher_missed_readings),
            gauge("devicehub_mqtt_up", "1 while connected to the broker and subscribed, else 0.", f64::from(u8::from(*self.link.borrow() == LinkState::Ready))),
            counter("devicehub_mqtt_connects_total", "Connections the broker accepted.", load(&link.connects)),
            counter("devicehub_mqtt_disconnects_total", "Connections to the broker lost.", load(&link.disconnects)),
            counters("devicehub_command_replies_total", "Command replies by outcome: ok, error, timeout (the caller stopped waiting), late, unmatched.", "outcome", [
                ("ok", replies.ok),
                ("error", replies.error),
                ("timeout", replies.timeouts),
                ("late", replies.late),
                ("unmatched", replies.unmatched),
            ]),
            gauge("devicehub_commands_awaiting_reply", "Commands waiting for a device's reply.", replies.pending as f64),
            gauge("devicehub_devices", "Devices listed (heard from since the start, up to --max-devices).", hub.devices.known as f64),
            counter("devicehub_devices_not_listed_total", "New devices not listed because --max-devices were known.", hub.devices.not_listed),
            gauge("devicehub_devices_kept_bytes", "Payload bytes of devices' newest readings kept after eviction (bounded by --devices-max-bytes).", hub.devices.kept_bytes as f64),
            counter("devicehub_devices_last_readings_dropped_total", "Devices' newest readings not kept after eviction because --devices-max-bytes was full.", hub.devices.kept_dropped),
            gauge("devicehub_connections", "gRPC connections open (TLS handshakes in progress included), counted against --max-connections.", self.listener.connections() as f64),
            gauge("devicehub_response_bytes_in_flight", "Response bytes handed to gRPC connections and not yet taken by their sockets (bounded by --max-response-bytes-in-flight).", self.listener.responses.in_flight() as f64),
            counter("devicehub_responses_refused_total", "Calls ended with RESOURCE_EXHAUSTED because --max-response-bytes-in-flight was spent.", self.listener.responses.refused()),
            counters("devicehub_connections_closed_total", "gRPC connections the listener closed, by reason: a cap reached (max_connections, max_connections_per_ip, max_handshakes, max_handshakes_per_ip), handshake_timeout, handshake_failed, no_stream (no request within --connection-idle-timeout).", "reason", self.listener.closed()),
        ];
        let commands = self.commands.feed().counters();
        let named = |counts: Vec<(crate::commands::CommandState, u64)>| {
            counts
                .into_iter()
                .map(|(state, n)| (state.name(), n))
                .collect::<Vec<_>>()
        };
        families.extend([
            gauges("devicehub_commands", "Persistent commands kept, by state (counted every 10 s; with a store, of every instance).", "state", named(self.commands.counts())),
            counters("devicehub_command_transitions_total", "State changes of persistent commands this instance made, by the state entered.", "state", named(commands.transitions())),
            counter("devicehub_commands_expired_total", "Persistent commands whose ttl passed before they ended (made EXPIRED by this instance).", commands.expired()),
            counter("devicehub_commands_refused_total", "Persistent commands refused because --max-queued-commands (or its per-device bound) was reached.", load(&commands.refused)),
            counter("devicehub_commands_forgotten_early_total", "Ended persistent commands forgotten before --command-retention to keep memory bounded (without a store).", load(&commands.forgotten_early)),
            counters("devicehub_command_replies_not_recorded_total", "Replies to persistent commands not recorded: stray (the command had ended, or is another device's), queue_full (the recording queue was full).", "reason", [
                ("stray", load(&commands.stray_replies)),
                ("queue_full", load(&commands.dropped_replies)),
            ]),
        ]);
        let states = self.states.counters();
        families.extend([
            counter("devicehub_reported_state_patches_total", "Reported state patches from devices applied.", load(&states.reported_applied)),
            counters("devicehub_reported_state_dropped_total", "Reported state patches from devices not applied, by reason: not_an_object, too_large (the patch, or the reported state it would make, over 64 KiB), too_deep (nested over 32), no_room (--max-device-states reached).", "reason", states.dropped()),
            counter("devicehub_desired_state_publishes_total", "Desired states published to devices (acknowledged by the broker).", load(&states.desired_published)),
            counter("devicehub_desired_state_publish_failures_total", "Publishes of desired states that failed (each retried).", load(&states.desired_publish_failures)),
        ]);
        if let Some((count, bytes)) = self.states.memory_use() {
            families.extend([
                gauge(
                    "devicehub_device_states",
                    "Device states kept in memory (without a store).",
                    count as f64,
                ),
                gauge(
                    "devicehub_device_states_bytes",
                    "Bytes device states take in memory, counted against --max-device-states.",
                    bytes as f64,
                ),
            ]);
        }
        if let Some(store) = &self.store {
            let counters = store.counters();
            families.extend([
                gauge("devicehub_store_up", "1 while the PostgreSQL store answers, else 0 (readings are then not acknowledged).", f64::from(u8::from(*store.up().borrow()))),
                counter("devicehub_store_committed_readings_total", "Readings committed to the PostgreSQL store.", load(&counters.committed_readings)),
                counter("devicehub_store_commits_total", "Transactions that committed readings.", load(&counters.commits)),
                counter("devicehub_store_commit_errors_total", "Commits that failed (each is retried until it succeeds).", load(&counters.errors)),
                counter("devicehub_store_retention_deleted_total", "Readings retention deleted from the store.", load(&counters.retention_deleted)),
            ]);
        }
        families
    }
}

/// The devicehub_* metrics, built from [`Sources`] at each scrape. (Copying
/// the sources into prometheus counters between scrapes, as before, let two
/// scrapes at once both add the same increase.)
struct SourcesCollector {
    sources: Sources,
    /// What [`Sources::read`] returns, described once for the registry.
    descs: Vec<Desc>,
}

impl SourcesCollector {
    fn new(sources: Sources) -> prometheus::Result<Self> {
        let descs = sources
            .read()
            .iter()
            .map(Family::desc)
            .collect::<prometheus::Result<_>>()?;
        Ok(Self { sources, descs })
    }
}

impl Collector for SourcesCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        self.sources
            .read()
            .into_iter()
            .map(Family::into_proto)
            .collect()
    }
}

fn render(registry: &Registry) -> Result<String, prometheus::Error> {
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    sources: Sources,
    shutdown: CancellationToken,
) -> prometheus::Result<()> {
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    registry.register(Box::new(SourcesCollector::new(sources)?))?;
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics listening");
    }
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "metrics: accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&registry, &request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(SCRAPE_TIMEOUT, connection).await {
                Ok(Err(error)) => debug!(%peer, %error, "metrics connection failed"),
                Err(_) => debug!(%peer, "metrics connection timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn respond(registry: &Registry, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |status, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
            response.headers_mut().insert("content-type", value);
        }
        response
    };
    if request.method() != hyper::Method::GET || request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "GET /metrics\n".into());
    }
    match render(registry) {
        Ok(text) => reply(StatusCode::OK, TextEncoder::new().format_type(), text),
        Err(error) => {
            warn!(%error, "metrics: encoding failed");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "error\n".into(),
            )
        }
    }
}
