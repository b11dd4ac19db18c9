//! devicehub: a typed, streaming gRPC API in front of MQTT devices.
//!
//! Data flows one way: MQTT → store → hub → gRPC. The crate root only wires
//! the parts together; [`run`] does it on a listener the caller bound, so
//! tests and benchmarks start the real server in-process, and [`serve`] adds
//! what the binary needs (the embedded broker, binding).
//!
//! Where things live:
//! - `cli/`: the command line (clap, `DEVICEHUB_*` variables) → [`Config`],
//!   a file per subcommand and per shared group of flags;
//! - `config`: the library's configuration, plain data;
//! - `topic`: device ids, topic filters and templates, checked against what
//!   MQTT brokers refuse;
//! - `mqtt/`: the shared MQTT client: the event loop and ingest (`link.rs`),
//!   commands and broker acknowledgements (`publish.rs`);
//! - `store/`: the hand-off from ingest (memory only, or the PostgreSQL
//!   store: `postgres/` with its writer task, history reads, retention and,
//!   for replicas, the tail that follows the table; the migrations are in
//!   `migrations/`);
//! - `buffer/`: the bounded in-memory readings (storing, `query.rs` reading,
//!   `arena.rs` payloads) and what is known of each device (`devices.rs`),
//!   no async;
//! - `hub/`: the shared buffer, the watchers' wake-ups and counters, and
//!   (`live.rs`) the newest readings published to watchers without a lock;
//! - `replies`: pairs device replies with the calls waiting for them;
//! - `grpc/`: the `DeviceHub` service, a file per RPC family, auth (the
//!   token interceptor and scope checks), conversions, page tokens, the one
//!   error → `Status` mapping, wire encoding;
//! - `listener/`: accepting gRPC connections under caps per peer
//!   (`limits.rs`), TLS with certificate reload (`tls.rs`);
//! - `web`: gRPC-Web and CORS for browsers;
//! - `scope`: device-id patterns a token's scopes grant;
//! - `telemetry/`: `GET /metrics` (read from the counters the stats line
//!   prints), each call's span, log line and `grpc_server_*` metrics, the
//!   log format and OTLP trace export;
//! - `per_client`: how much one client may hold (watchers, commands);
//! - `health`: the gRPC health statuses (the MQTT link, shutdown), and the
//!   `devicehub health` probe;
//! - `sync`: the lock helpers shared by the above; `backoff`: the one retry
//!   backoff (with jitter) after failures; `encoding_budget`:
//!   encodings kept for reuse within a byte budget; `log_limit`: rate-limited,
//!   truncated log lines for what peers send; `watched_files`: the files
//!   re-read when they change (TLS certificate, JWT keys);
//! - `broker` (feature `embedded-broker`): the embedded rumqttd;
//! - `simulate` (feature `simulator`): simulated devices.

mod backoff;
#[cfg(feature = "embedded-broker")]
pub mod broker;
mod buffer;
pub mod cli;
pub mod config;
mod encoding_budget;
mod grpc;
pub mod health;
mod hub;
mod listener;
mod log_limit;
mod mqtt;
mod per_client;
mod replies;
mod scope;
#[cfg(feature = "simulator")]
pub mod simulate;
mod store;
mod sync;
pub mod telemetry;
pub mod topic;
mod watched_files;
mod web;

#[cfg(test)]
#[path = "../tests/common/rng.rs"]
mod test_rng;

/// The generated protobuf and gRPC code of `devicehub.v1`.
// Generated code: its doc comments come from the proto, formatted for protoc.
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("devicehub.v1");
    // The server, generated separately: see build.rs.
    include!(concat!(env!("OUT_DIR"), "/server/devicehub.v1.rs"));

    /// The encoded descriptor set of the proto and its imports, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/devicehub_descriptor.bin"));
}

use std::{
    sync::{atomic::Ordering, Arc},
    time::{Duration, SystemTime},
};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{service::interceptor::InterceptedService, transport::Server};
use tonic_health::ServingStatus;
use tracing::{info, warn};

pub use config::Config;
pub use grpc::MAX_COMMANDS_IN_FLIGHT;

/// The watch delivery path without the transport, for the contention
/// benchmark (`benches/devicehub.rs`, scenario 12). Not a stable API.
#[doc(hidden)]
pub mod delivery {
    pub use crate::buffer::{MessageKind, NewReading, ReadingFilter};
    pub use crate::grpc::EncodedReadings;
    pub use crate::hub::{ReadingHub, ReadingWatcher, WatchBatch};
}

use crate::{
    cli::ServeArgs,
    config::{BrokerUrl, ConfigError},
    grpc::{Authenticator, DeviceHubService},
    hub::ReadingHub,
    listener::ServerTls,
    proto::device_hub_server::DeviceHubServer,
    replies::ReplyRouter,
    store::{Ingest, Postgres},
    telemetry::{
        calls::{CallLayer, GrpcMetrics},
        metrics,
    },
};

/// Largest request message the service accepts. Commands are at most 256 KiB.
const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Streams a client may open and reset before the server handles them (the
/// "rapid reset" flood, CVE-2023-44487) before the connection is closed.
const MAX_PENDING_RESETS: usize = 20;
/// Streams the server may reset for a client's errors before it closes
/// the connection.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Request metadata per call. Explicit rather than hyper's implicit 16 KiB,
/// which answers HTTP 431 to tokens carrying many scopes or claims.
const MAX_HEADER_LIST_BYTES: u32 = 64 << 10;
/// HTTP/2 pings on idle connections, and how long an answer may take before
/// the connection is considered dead and closed.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[cfg(feature = "embedded-broker")]
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("cannot bind the gRPC server to {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Auth(#[from] grpc::KeyError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("gRPC TLS: {0}")]
    ServerTls(#[from] listener::ServerTlsError),
}

/// The gRPC service name health checks report on.
pub const SERVICE_NAME: &str = "devicehub.v1.DeviceHub";

/// Starts the embedded broker when no `--mqtt-url` is given, binds the gRPC
/// address and runs the service until `shutdown` is cancelled.
pub async fn serve(args: &ServeArgs, shutdown: CancellationToken) -> Result<(), Error> {
    args.check_exposure()?;
    let broker = match &args.mqtt_url {
        Some(url) => url.clone(),
        None => embedded_broker(args).await?,
    };
    let config = args.config(&broker)?;
    let listener = TcpListener::bind(args.grpc_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: args.grpc_addr,
            source,
        })?;
    run(config, listener, shutdown).await
}

#[cfg(feature = "embedded-broker")]
async fn embedded_broker(args: &ServeArgs) -> Result<BrokerUrl, Error> {
    let (addr, max) = (args.embedded_mqtt_addr, args.mqtt_max_packet_bytes as usize);
    let bound = tokio::task::spawn_blocking(move || broker::start(addr, max))
        .await
        .map_err(std::io::Error::other)??;
    Ok(BrokerUrl::from_addr(bound))
}

#[cfg(not(feature = "embedded-broker"))]
async fn embedded_broker(_: &ServeArgs) -> Result<BrokerUrl, Error> {
    Err(ConfigError::NoBroker.into())
}

/// Runs the service on `listener` until `shutdown` is cancelled, then stops
/// in order: health NOT_SERVING, no new calls, open streams ended (tonic
/// waits for them), MQTT disconnected.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // What can fail on bad files fails before anything starts.
    let authenticator = Authenticator::new(config.auth.as_ref())?;
    let tls = config.grpc_tls.as_ref().map(ServerTls::load).transpose()?;
    let replicas = config.mqtt.share_group.is_some();
    if replicas && config.store.is_none() {
        return Err(ConfigError::ShareGroupWithoutStore.into());
    }
    let store = match &config.store {
        Some(store_config) => {
            if !config.mqtt.persistent_session {
                warn!("a store without --mqtt-persistent-session: readings the broker sent but devicehub had not committed are lost if it restarts (the broker forgets its clean session)");
            }
            Some(Postgres::connect(store_config).await?)
        }
        None => None,
    };
    let hub = ReadingHub::new(
        config.buffer,
        config.devices,
        store
            .as_ref()
            .map_or_else(first_seq, |(_, start)| start.next_seq),
        config.max_watchers,
        config.max_watchers_per_client,
        store.as_ref().map(|(postgres, _)| postgres.clone()),
        replicas,
    );
    if let Some((postgres, _)) = &store {
        // No more of the newest readings than the hub keeps of them.
        let devices = &config.devices;
        let restored = postgres
            .devices(devices.max_devices, devices.max_kept_bytes)
            .await?;
        hub.restore_devices(restored);
    }
    // The MQTT link stops after the gRPC server, so calls in progress can
    // still publish while streams drain; and also if this future is dropped.
    let stop_mqtt = CancellationToken::new();
    let _stop_mqtt_on_drop = stop_mqtt.clone().drop_guard();
    let replies = match replicas {
        true => ReplyRouter::for_replicas(),
        false => ReplyRouter::default(),
    };
    let ingest = match &store {
        None => Ingest::Memory(hub.clone()),
        Some((postgres, start)) => {
            if let Some(retention) = config.store.as_ref().and_then(|s| s.retention) {
                store::postgres::spawn_retention(postgres.clone(), retention, stop_mqtt.clone());
            }
            if replicas {
                store::postgres::spawn_tail(postgres.clone(), hub.clone(), stop_mqtt.clone());
            }
            let writer = store::postgres::spawn_writer(
                postgres.clone(),
                hub.clone(),
                replicas,
                *start,
                stop_mqtt.clone(),
            );
            Ingest::Durable(writer)
        }
    };
    let store = store.map(|(postgres, _)| postgres);
    let link = mqtt::start(&config.mqtt, ingest, replies.clone(), stop_mqtt.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    tokio::spawn(health::follow_link(
        health.clone(),
        link.publisher.link_state(),
        store.as_ref().map(Postgres::up),
        shutdown.clone(),
    ));
    // The grpc_server_* metrics exist only with a /metrics endpoint.
    let registry = prometheus::Registry::new();
    let grpc_metrics = match config.metrics_addr {
        Some(_) => Some(GrpcMetrics::register(&registry)?),
        None => None,
    };
    let calls = CallLayer::new(
        &[
            proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ],
        grpc_metrics.as_ref(),
    );
    // Accepting starts now; tonic takes the connections once it serves.
    let addr = listener.local_addr()?;
    let tls_on = tls.is_some();
    let (incoming, connections) =
        listener::incoming(listener, tls, config.connections.clone(), shutdown.clone());
    // Readings' messages kept for every response (and /metrics' counts).
    let encoded = Arc::new(grpc::EncodedReadings::default());
    // After the listener: /metrics reads its counts.
    if let Some(addr) = config.metrics_addr {
        let sources = metrics::Sources {
            hub: hub.clone(),
            encoded: encoded.clone(),
            replies: replies.clone(),
            link_counters: link.counters.clone(),
            link: link.publisher.link_state(),
            store: store.clone(),
            listener: connections.clone(),
        };
        spawn_metrics(addr, registry, sources, shutdown.clone()).await?;
    }
    tokio::spawn(log_stats(
        Stats {
            hub: hub.clone(),
            replies: replies.clone(),
            ingest: link.counters.clone(),
            connections,
            auth: authenticator.clone(),
        },
        shutdown.clone(),
    ));
    // Both reflection versions: grpcurl before 1.8.8 only asks v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let service = DeviceHubService::new(
        hub,
        link.publisher.clone(),
        replies,
        &config.mqtt,
        config.max_commands_per_client,
        encoded,
        shutdown.clone(),
    );
    info!(
        %addr,
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        tls = tls_on,
        auth = config.auth.is_some(),
        "gRPC listening"
    );
    // Auth in front of the DeviceHub service only: health and reflection
    // stay open for probes and grpcurl.
    let devicehub = InterceptedService::new(
        DeviceHubServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
        move |request| authenticator.intercept(request),
    );

    // Outermost first: CORS answers preflights, gRPC-Web is translated to
    // gRPC, then every call is observed as gRPC, refused for a foreign host
    // included.
    let server = bounded_server(&config.connections)
        .accept_http1(true)
        .layer(listener::MarkOpened)
        .layer(web::cors(&config.cors_allowed_origins))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(calls)
        .layer(match config.auth {
            None => web::HostCheck::new(&config.allowed_hosts),
            Some(_) => web::HostCheck::off(),
        })
        .layer(listener::BoundResponses)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(devicehub)
        .serve_with_incoming_shutdown(incoming, health::stopping(health, shutdown.clone()));
    // Shutdown waits for calls to end, but not for ever: a call waiting a
    // minute for a device's reply, or a client that stopped reading, would
    // keep the process alive after SIGTERM.
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(config.shutdown_timeout).await;
    };
    let served = tokio::select! {
        served = server => served,
        () = deadline => {
            warn!(timeout = ?config.shutdown_timeout, "calls still open at the shutdown deadline; closing their connections");
            Ok(())
        }
    };

    stop_mqtt.cancel();
    if let Err(error) = link.task.await {
        warn!(%error, "MQTT task ended abnormally");
    }
    served?;
    info!("stopped");
    Ok(())
}

/// The gRPC server with what tonic and hyper leave open to a hostile or
/// broken client closed.
fn bounded_server(limits: &config::ConnectionLimits) -> Server {
    Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
}

/// Binds `addr` and serves `/metrics` there until `shutdown`.
async fn spawn_metrics(
    addr: std::net::SocketAddr,
    registry: prometheus::Registry,
    sources: metrics::Sources,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    tokio::spawn(async move {
        if let Err(error) = metrics::serve(listener, registry, sources, shutdown).await {
            warn!(%error, "metrics endpoint stopped");
        }
    });
    Ok(())
}

/// What the stats line reads.
struct Stats {
    hub: ReadingHub,
    replies: ReplyRouter,
    ingest: Arc<mqtt::IngestCounters>,
    connections: listener::ListenerStats,
    auth: Authenticator,
}

/// Logs the buffer, watcher and connection counters every
/// [`STATS_INTERVAL`] and once at shutdown, for operators without metrics.
async fn log_stats(sources: Stats, shutdown: CancellationToken) {
    let Stats {
        hub,
        replies,
        ingest,
        connections,
        auth,
    } = sources;
    let mut interval = tokio::time::interval(STATS_INTERVAL);
    interval.tick().await; // the first tick is immediate
    loop {
        let stopping = tokio::select! {
            _ = interval.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        let stats = hub.stats();
        let replies = replies.stats();
        info!(
            buffered = stats.buffer.readings,
            buffered_bytes = stats.buffer.bytes,
            evicted = stats.buffer.evicted,
            rejected = ?ingest.rejected(),
            mqtt_connects = ingest.connects.load(Ordering::Relaxed),
            mqtt_disconnects = ingest.disconnects.load(Ordering::Relaxed),
            next_seq = stats.buffer.next_seq,
            watchers = stats.watchers,
            devices = stats.devices.known,
            devices_not_listed = stats.devices.not_listed,
            devices_kept_bytes = stats.devices.kept_bytes,
            devices_last_readings_dropped = stats.devices.kept_dropped,
            watcher_gaps = stats.watcher_gaps,
            watcher_missed_readings = stats.watcher_missed_readings,
            commands_awaiting_reply = replies.pending,
            replies_ok = replies.ok,
            replies_error = replies.error,
            replies_timeout = replies.timeouts,
            replies_late = replies.late,
            replies_unmatched = replies.unmatched,
            token_cache_evictions = auth.cache_evictions(),
            connections_closed = ?connections.closed(),
            "stats"
        );
        if stopping {
            return;
        }
    }
}

/// How often [`log_stats`] logs.
const STATS_INTERVAL: Duration = Duration::from_secs(60);

/// The first sequence number of this run: microseconds since the Unix epoch,
/// so that numbers keep increasing across restarts (as long as the service
/// ingests fewer than a million readings a second on average).
fn first_seq() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
        .max(1)
}
