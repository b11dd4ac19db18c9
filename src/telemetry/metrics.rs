//! `GET /metrics` in the Prometheus text format, on `--metrics-addr`.
//!
//! The values are not counted twice: at each scrape they are read from the
//! same counters the `stats` log line prints (the hub's, the reply
//! router's, the MQTT link's), so the two can never disagree, and counting
//! costs the ingest and delivery paths nothing beyond what they already
//! did. The registry and the exposition format are the `prometheus` crate's;
//! process metrics come from its process collector. The `grpc_server_*`
//! metrics are the one exception: counted per call by `calls.rs` into the
//! same registry, because no other counter sees calls.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    core::{AtomicU64 as PromU64, GenericCounter},
    Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    hub::ReadingHub, mqtt::IngestCounters, mqtt::LinkState, replies::ReplyRouter, store::Postgres,
};

/// How long one scrape connection may stay open.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

type Counter = GenericCounter<PromU64>;

/// Where the values come from.
pub struct Sources {
    pub hub: ReadingHub,
    pub replies: ReplyRouter,
    pub link_counters: Arc<IngestCounters>,
    pub link: watch::Receiver<LinkState>,
    /// The PostgreSQL store, if one is configured: its metrics exist only
    /// then.
    pub store: Option<Postgres>,
}

/// The store's metrics.
struct StoreMetrics {
    up: IntGauge,
    committed: Counter,
    commits: Counter,
    errors: Counter,
    retention_deleted: Counter,
}

/// The registry and the metrics in it, refreshed from [`Sources`].
struct Metrics {
    registry: Registry,
    sources: Sources,
    received: Counter,
    rejected: IntCounterVec,
    evicted: Counter,
    buffer_readings: IntGauge,
    buffer_bytes: IntGauge,
    oldest_age: prometheus::Gauge,
    watchers: IntGauge,
    watch_gaps: Counter,
    watch_behind_live: Counter,
    live_encoded_bytes: IntGauge,
    live_not_kept: Counter,
    watch_missed: Counter,
    mqtt_up: IntGauge,
    connects: Counter,
    disconnects: Counter,
    replies: IntCounterVec,
    awaiting_reply: IntGauge,
    devices: IntGauge,
    devices_not_listed: Counter,
    kept_bytes: IntGauge,
    kept_dropped: Counter,
    devices_encoded_bytes: IntGauge,
    devices_not_kept: Counter,
    store: Option<StoreMetrics>,
}

fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<Counter> {
    let counter = Counter::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let gauge = IntGauge::with_opts(Opts::new(name, help))?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
) -> prometheus::Result<IntCounterVec> {
    let vec = IntCounterVec::new(Opts::new(name, help), &[label])?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec)
}

impl Metrics {
    fn new(r: Registry, sources: Sources) -> prometheus::Result<Self> {
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let oldest_age = prometheus::Gauge::with_opts(Opts::new(
            "devicehub_buffer_oldest_age_seconds",
            "Age of the oldest buffered reading (0 when the buffer is empty).",
        ))?;
        r.register(Box::new(oldest_age.clone()))?;
        Ok(Self {
            received: counter(&r, "devicehub_readings_received_total", "Readings stored in the buffer.")?,
            rejected: counter_vec(&r, "devicehub_readings_rejected_total", "Readings not stored, by reason.", "reason")?,
            evicted: counter(&r, "devicehub_readings_evicted_total", "Readings evicted from the buffer to make room.")?,
            buffer_readings: gauge(&r, "devicehub_buffer_readings", "Readings in the buffer.")?,
            buffer_bytes: gauge(&r, "devicehub_buffer_bytes", "Bytes the buffer counts against --buffer-max-bytes.")?,
            oldest_age,
            watchers: gauge(&r, "devicehub_watchers", "WatchReadings streams open.")?,
            watch_gaps: counter(&r, "devicehub_watch_gaps_total", "Times a watcher found readings it had not received evicted.")?,
            watch_behind_live: counter(&r, "devicehub_watch_behind_live_total", "Watcher reads whose next reading had left the ring of the newest readings (read from the buffer under its lock instead).")?,
            live_encoded_bytes: gauge(&r, "devicehub_live_encoded_bytes", "Bytes of encoded messages kept with the newest readings for watchers (at most 32 MiB).")?,
            live_not_kept: counter(&r, "devicehub_live_encodings_not_kept_total", "Encoded messages of the newest readings not kept because their 32 MiB were full (each stream then encodes for itself).")?,
            watch_missed: counter(&r, "devicehub_watch_missed_readings_total", "Readings watchers missed that way.")?,
            mqtt_up: gauge(&r, "devicehub_mqtt_up", "1 while connected to the broker and subscribed, else 0.")?,
            connects: counter(&r, "devicehub_mqtt_connects_total", "Connections the broker accepted.")?,
            disconnects: counter(&r, "devicehub_mqtt_disconnects_total", "Connections to the broker lost.")?,
            replies: counter_vec(&r, "devicehub_command_replies_total", "Command replies by outcome: ok, error, timeout (the caller stopped waiting), late, unmatched.", "outcome")?,
            awaiting_reply: gauge(&r, "devicehub_commands_awaiting_reply", "Commands waiting for a device's reply.")?,
            devices: gauge(&r, "devicehub_devices", "Devices listed (heard from since the start, up to --max-devices).")?,
            devices_not_listed: counter(&r, "devicehub_devices_not_listed_total", "New devices not listed because --max-devices were known.")?,
            kept_bytes: gauge(&r, "devicehub_devices_kept_bytes", "Payload bytes of devices' newest readings kept after eviction (bounded by --devices-max-bytes).")?,
            kept_dropped: counter(&r, "devicehub_devices_last_readings_dropped_total", "Devices' newest readings not kept after eviction because --devices-max-bytes was full.")?,
            devices_encoded_bytes: gauge(&r, "devicehub_devices_encoded_bytes", "Bytes of devices' newest readings kept encoded for device pages (at most 32 MiB).")?,
            devices_not_kept: counter(&r, "devicehub_devices_encodings_not_kept_total", "Devices' newest readings encoded for a page and not kept because those 32 MiB were full (encoded again for the next page).")?,
            store: match sources.store {
                None => None,
                Some(_) => Some(StoreMetrics {
                    up: gauge(&r, "devicehub_store_up", "1 while the PostgreSQL store answers, else 0 (readings are then not acknowledged).")?,
                    committed: counter(&r, "devicehub_store_committed_readings_total", "Readings committed to the PostgreSQL store.")?,
                    commits: counter(&r, "devicehub_store_commits_total", "Transactions that committed readings.")?,
                    errors: counter(&r, "devicehub_store_commit_errors_total", "Commits that failed (each is retried until it succeeds).")?,
                    retention_deleted: counter(&r, "devicehub_store_retention_deleted_total", "Readings retention deleted from the store.")?,
                }),
            },
            registry: r,
            sources,
        })
    }

    /// Brings every metric up to its source's value.
    fn refresh(&self) {
        let hub = self.sources.hub.stats();
        let buffer = hub.buffer;
        let replies = self.sources.replies.stats();
        let link = &self.sources.link_counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        // Counters only go up: add what came since the last scrape.
        let set =
            |counter: &Counter, value: u64| counter.inc_by(value.saturating_sub(counter.get()));
        set(&self.received, buffer.readings as u64 + buffer.evicted);
        for (reason, count) in link.rejected() {
            set(&self.rejected.with_label_values(&[reason]), count);
        }
        set(&self.evicted, buffer.evicted);
        self.buffer_readings.set(buffer.readings as i64);
        self.buffer_bytes.set(buffer.bytes as i64);
        let age = buffer
            .oldest_received_at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        self.oldest_age.set(age);
        self.watchers.set(hub.watchers as i64);
        self.devices.set(hub.devices.known as i64);
        set(&self.devices_not_listed, hub.devices.not_listed);
        self.kept_bytes.set(hub.devices.kept_bytes as i64);
        set(&self.kept_dropped, hub.devices.kept_dropped);
        self.devices_encoded_bytes
            .set(hub.devices.encoded_bytes as i64);
        set(&self.devices_not_kept, hub.devices.encodings_not_kept);
        set(&self.watch_gaps, hub.watcher_gaps);
        set(&self.watch_behind_live, hub.watcher_behind_live);
        self.live_encoded_bytes.set(hub.live_encoded_bytes as i64);
        set(&self.live_not_kept, hub.live_encodings_not_kept);
        set(&self.watch_missed, hub.watcher_missed_readings);
        self.mqtt_up
            .set(i64::from(*self.sources.link.borrow() == LinkState::Ready));
        set(&self.connects, load(&link.connects));
        set(&self.disconnects, load(&link.disconnects));
        for (outcome, value) in [
            ("ok", replies.ok),
            ("error", replies.error),
            ("timeout", replies.timeouts),
            ("late", replies.late),
            ("unmatched", replies.unmatched),
        ] {
            set(&self.replies.with_label_values(&[outcome]), value);
        }
        self.awaiting_reply.set(replies.pending as i64);
        if let (Some(metrics), Some(store)) = (&self.store, &self.sources.store) {
            let counters = store.counters();
            metrics.up.set(i64::from(*store.up().borrow()));
            set(&metrics.committed, load(&counters.committed_readings));
            set(&metrics.commits, load(&counters.commits));
            set(&metrics.errors, load(&counters.errors));
            set(
                &metrics.retention_deleted,
                load(&counters.retention_deleted),
            );
            set(
                &self.rejected.with_label_values(&["refused_by_store"]),
                load(&counters.refused_readings),
            );
        }
    }

    fn render(&self) -> Result<String, prometheus::Error> {
        self.refresh();
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    sources: Sources,
    shutdown: CancellationToken,
) -> prometheus::Result<()> {
    let metrics = Arc::new(Metrics::new(registry, sources)?);
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
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, &request)) }
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

fn respond(metrics: &Metrics, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
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
    match metrics.render() {
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
