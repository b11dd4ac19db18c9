//! devicehub: a typed, streaming gRPC API in front of MQTT devices.
//!
//! Data flows one way: MQTT → ingest → hub → gRPC. Ingest hands readings to
//! the hub, or to the store's writer, which pushes them into the hub once
//! committed; the hub reads what is older than its memory through its own
//! `History` trait, which the store implements, so it imports nothing from
//! the store. The crate root only wires the parts together; [`run`] does it
//! on a listener the caller bound, so tests and benchmarks start the real
//! server in-process, and [`serve`] adds what the binary needs (the embedded
//! broker, binding). Both take plain
//! configuration ([`Config`], [`ServeConfig`]): the library knows nothing of
//! the command line, and its errors are about values, not flags.
//!
//! Where things live:
//! - `main.rs` and `cli/`, the binary's and not the library's: the command
//!   line (clap, `DEVICEHUB_*` variables, the errors about flags) →
//!   [`ServeConfig`], `health::Probe`, `simulate::SimulateConfig`; a file
//!   per subcommand and per shared group of flags (the integration tests
//!   compile `cli/` too, through `tests/common`);
//! - `config`: the library's configuration, plain data;
//! - `topic`: device ids, topic filters and templates, checked against what
//!   MQTT brokers refuse;
//! - `mqtt/`: the shared MQTT client: the event loop and ingest (`link.rs`),
//!   the hand-off to memory or the store (`ingest.rs`), commands and broker
//!   acknowledgements (`publish.rs`), TLS to the broker (`tls.rs`, public as
//!   [`mqtt_tls`]);
//! - `store/`: the PostgreSQL store (`postgres/`): its writer task, history
//!   reads (the hub's `History`), retention and, for replicas, the tail that
//!   follows the table; the migrations are in `migrations/`;
//! - `buffer/`: the bounded in-memory readings (storing, `query.rs` reading,
//!   `arena.rs` payloads) and what is known of each device (`devices.rs`),
//!   no async;
//! - `hub/`: the shared buffer, the watchers' wake-ups and counters,
//!   (`live.rs`) the newest readings published to watchers without a lock,
//!   (`history.rs`) the trait through which it reads older readings, and
//!   (`aggregate.rs`) AggregateReadings from memory and history joined;
//! - `aggregate`: what AggregateReadings computes: JSON Pointer fields,
//!   epoch-aligned buckets, the fold of readings into them;
//! - `replies`: pairs device replies with the calls waiting for them, and
//!   hands replies to persistent commands on to them;
//! - `commands/`: persistent commands (SendCommand with a `ttl`): their
//!   states, the log that keeps them (memory here, the store's in
//!   `store/postgres/commands/`), the dispatcher that publishes them when
//!   their devices can take them, and the feed of their changes;
//! - `state/`: device states, desired and reported: merge patches and the
//!   delta (`document.rs`), where they are kept (memory here, the store's
//!   in `store/postgres/states/`), the desired states published retained,
//!   the reported ones applied, the feed of their changes;
//! - `grpc/`: the `DeviceHub` service, a file per RPC family, auth (the
//!   token interceptor and scope checks), conversions, page tokens, the one
//!   error → `Status` mapping, wire encoding;
//! - `listener/`: accepting gRPC connections under caps per peer
//!   (`limits.rs`), TLS with certificate reload (`tls.rs`);
//! - `web/`: gRPC-Web, CORS and the DNS rebinding guard for browsers, and
//!   (`dashboard.rs`) the dashboard's embedded page on the gRPC port;
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

mod aggregate;
mod backoff;
#[cfg(feature = "embedded-broker")]
pub mod broker;
mod buffer;
mod commands;
pub mod config;
mod encoding_budget;
mod fnv;
mod grpc;
pub mod health;
mod hub;
mod json;
mod listener;
mod log_limit;
mod mqtt;
mod per_client;
mod replies;
mod scope;
#[cfg(feature = "simulator")]
pub mod simulate;
mod state;
mod store;
mod sync;
pub mod telemetry;
pub mod topic;
mod watched_files;
mod web;

#[cfg(test)]
#[path = "../tests/it/common/rng.rs"]
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
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    service::{interceptor::InterceptedService, Routes},
    transport::Server,
};
use tonic_health::{server::HealthReporter, ServingStatus};
use tracing::{info, warn};

pub use config::{Config, ServeConfig};
pub use grpc::MAX_COMMANDS_IN_FLIGHT;

/// TLS to the broker: the rustls client configuration that
/// [`config::MqttConfig::tls`] (and the simulator's devices) connect with,
/// built from PEM files' contents.
pub mod mqtt_tls {
    pub use crate::mqtt::{client_config, ClientIdentity, TlsError};
}

/// The watch delivery path without the transport, for the contention
/// benchmark (`benches/devicehub/contention.rs`, scenario 12). Not a stable API.
#[doc(hidden)]
pub mod delivery {
    pub use crate::buffer::{MessageKind, NewReading, ReadingFilter};
    pub use crate::grpc::EncodedReadings;
    pub use crate::hub::{ReadingHub, ReadingWatcher, WatchBatch};
}

use crate::{
    commands::{CommandLog, Commands, MemoryLog, ReplyInbox, ReplyReceiver},
    grpc::{Authenticator, DeviceHubService},
    hub::{History, ReadingHub},
    listener::ServerTls,
    mqtt::Ingest,
    proto::device_hub_server::DeviceHubServer,
    replies::ReplyRouter,
    state::{DeviceStates, MemoryStates, StateStorage},
    store::{postgres::StoreStart, Postgres},
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
    #[error("a share group (replicas) needs a store: the broker hands each reading to one instance of the group, and the shared store is how every instance sees them all")]
    ShareGroupWithoutStore,
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

/// Starts the embedded broker if `config` asks for one, binds the gRPC
/// address and runs the service until `shutdown` is cancelled.
pub async fn serve(mut config: ServeConfig, shutdown: CancellationToken) -> Result<(), Error> {
    start_embedded_broker(&mut config).await?;
    let addr = config.grpc_addr;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    run(config.service, listener, shutdown).await
}

/// Starts the embedded broker `config` asks for, if any, and points the
/// service at the address it bound.
#[cfg(feature = "embedded-broker")]
async fn start_embedded_broker(config: &mut ServeConfig) -> Result<(), Error> {
    let Some(addr) = config.embedded_broker else {
        return Ok(());
    };
    let mqtt = &mut config.service.mqtt;
    let max = mqtt.max_packet_bytes;
    let bound = tokio::task::spawn_blocking(move || broker::start(addr, max))
        .await
        .map_err(std::io::Error::other)??;
    mqtt.host = bound.ip().to_string();
    mqtt.port = bound.port();
    Ok(())
}

#[cfg(not(feature = "embedded-broker"))]
async fn start_embedded_broker(_: &mut ServeConfig) -> Result<(), Error> {
    Ok(())
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
        return Err(Error::ShareGroupWithoutStore);
    }
    let store = open_store(&config).await?;
    let hub = start_hub(&config, store.as_ref(), replicas).await?;
    // The MQTT link stops after the gRPC server, so calls in progress can
    // still publish while streams drain; and also if this future is dropped.
    let stop_mqtt = CancellationToken::new();
    let _stop_mqtt_on_drop = stop_mqtt.clone().drop_guard();
    let replies = match replicas {
        true => ReplyRouter::for_replicas(),
        false => ReplyRouter::default(),
    };
    let ingest = start_ingest(&config, &hub, store.as_ref(), replicas, &stop_mqtt);
    let store = store.map(|(postgres, _)| postgres);
    // Before the link: replies to persistent commands may come first thing.
    let (log, feed, inbox) = open_commands(&config, store.as_ref(), &stop_mqtt).await?;
    replies.set_persistent(Arc::new(inbox.0.clone()));
    let (state_storage, state_feed) = open_states(&config, store.as_ref(), &stop_mqtt).await?;
    let (reported, reported_rx) = state::inbox();
    let link = mqtt::start(
        &config.mqtt,
        ingest,
        replies.clone(),
        reported,
        stop_mqtt.clone(),
    );
    let (health, routes) = start_health(&link, store.as_ref(), &shutdown).await;
    let (registry, calls) = observe_calls(&config)?;
    // Accepting starts now; tonic takes the connections once it serves.
    let addr = listener.local_addr()?;
    let tls_on = tls.is_some();
    let (incoming, connections) =
        listener::incoming(listener, tls, config.connections.clone(), shutdown.clone());
    let commands = Commands::start(
        log,
        feed,
        hub.clone(),
        Arc::new(link.publisher.clone()),
        config.commands.clone(),
        inbox,
        stop_mqtt.clone(),
    );
    let states = DeviceStates::start(
        state::StateParts {
            storage: state_storage,
            feed: state_feed,
            transport: Arc::new(link.publisher.clone()),
            desired_topic: config.mqtt.desired_state_topic.clone(),
            reported: reported_rx,
        },
        stop_mqtt.clone(),
    );
    let parts = Parts {
        hub,
        replies,
        link,
        store,
        connections,
        authenticator,
        encoded: Arc::new(grpc::EncodedReadings::default()),
        commands,
        states,
    };
    start_reporting(&config, registry, &parts, &shutdown).await?;
    let routes = add_reflection(routes)?;
    let Parts {
        hub,
        replies,
        link,
        authenticator,
        encoded,
        commands,
        states,
        ..
    } = parts;
    let service_parts = grpc::ServiceParts {
        publisher: link.publisher.clone(),
        replies,
        commands,
        states,
        encoded,
        max_commands_per_client: config.max_commands_per_client,
        max_watchers: config.max_watchers,
        max_watchers_per_client: config.max_watchers_per_client,
    };
    let service = DeviceHubService::new(hub, service_parts, &config.mqtt, shutdown.clone());
    info!(
        %addr,
        broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port),
        tls = tls_on,
        auth = config.auth.is_some(),
        "gRPC listening"
    );
    let routes = add_devicehub(routes, service, authenticator);
    let served = serve_until_shutdown(&config, routes, calls, incoming, health, &shutdown).await;
    stop_link(stop_mqtt, link).await;
    served?;
    info!("stopped");
    Ok(())
}

/// The parts that run, as `/metrics`, the stats line and the service see
/// them.
struct Parts {
    hub: ReadingHub,
    replies: ReplyRouter,
    link: mqtt::MqttLink,
    store: Option<Postgres>,
    connections: listener::ListenerStats,
    authenticator: Authenticator,
    /// Readings' messages kept for every response (and /metrics' counts).
    encoded: Arc<grpc::EncodedReadings>,
    /// Persistent commands.
    commands: Commands,
    /// Device states.
    states: DeviceStates,
}

/// Connects to the PostgreSQL store, if there is one, and reads where its
/// table stands.
async fn open_store(config: &Config) -> Result<Option<(Postgres, StoreStart)>, Error> {
    let Some(store_config) = &config.store else {
        return Ok(None);
    };
    if !config.mqtt.persistent_session {
        warn!("a store without --mqtt-persistent-session: readings the broker sent but devicehub had not committed are lost if it restarts (the broker forgets its clean session)");
    }
    Ok(Some(Postgres::connect(store_config).await?))
}

/// The hub, numbering readings on from the store's (or from now), with the
/// devices the store knows restored.
async fn start_hub(
    config: &Config,
    store: Option<&(Postgres, StoreStart)>,
    replicas: bool,
) -> Result<ReadingHub, Error> {
    let hub = ReadingHub::new(
        config.buffer,
        config.devices,
        store.map_or_else(first_seq, |(_, start)| start.next_seq),
        config.max_watchers,
        config.max_watchers_per_client,
        store.map(|(postgres, _)| Arc::new(postgres.clone()) as Arc<dyn History>),
        replicas,
    );
    if let Some((postgres, _)) = store {
        // No more of the newest readings than the hub keeps of them.
        let devices = &config.devices;
        let restored = postgres
            .devices(devices.max_devices, devices.max_kept_bytes)
            .await?;
        hub.restore_devices(restored);
    }
    Ok(hub)
}

/// Where the MQTT link hands readings: the hub, or the store's writer (with
/// the store's background tasks: retention, and for replicas the tail),
/// all stopping with `stop_mqtt`.
fn start_ingest(
    config: &Config,
    hub: &ReadingHub,
    store: Option<&(Postgres, StoreStart)>,
    replicas: bool,
    stop_mqtt: &CancellationToken,
) -> Ingest {
    let Some((postgres, start)) = store else {
        return Ingest::Memory(hub.clone());
    };
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

/// Where persistent commands are kept (the store when there is one, else
/// memory), the feed of their changes, and the inbox their replies come
/// in by; the store's change tail stops with `stop_mqtt`.
async fn open_commands(
    config: &Config,
    store: Option<&Postgres>,
    stop_mqtt: &CancellationToken,
) -> Result<
    (
        Arc<dyn CommandLog>,
        commands::Feed,
        (ReplyInbox, ReplyReceiver),
    ),
    Error,
> {
    let feed = commands::Feed::default();
    let log: Arc<dyn CommandLog> = match store {
        None => Arc::new(MemoryLog::new(feed.clone(), config.commands.max_queued)),
        Some(postgres) => Arc::new(
            postgres
                .command_log(feed.clone(), stop_mqtt.clone())
                .await?,
        ),
    };
    let inbox = commands::inbox(&feed);
    Ok((log, feed, inbox))
}

/// Where device states are kept (the store when there is one, else
/// memory, within `--max-device-states`) and the feed of their changes;
/// the store's change tail stops with `stop_mqtt`.
async fn open_states(
    config: &Config,
    store: Option<&Postgres>,
    stop_mqtt: &CancellationToken,
) -> Result<(Arc<dyn StateStorage>, state::StateFeed), Error> {
    let feed = state::StateFeed::default();
    let storage: Arc<dyn StateStorage> = match store {
        None => Arc::new(MemoryStates::new(feed.clone(), config.max_device_states)),
        Some(postgres) => Arc::new(
            postgres
                .state_storage(feed.clone(), stop_mqtt.clone())
                .await?,
        ),
    };
    Ok((storage, feed))
}

/// The gRPC health service, NOT_SERVING until the MQTT link (and the
/// store) are up, then following them: its reporter, and the routes it
/// starts.
async fn start_health(
    link: &mqtt::MqttLink,
    store: Option<&Postgres>,
    shutdown: &CancellationToken,
) -> (HealthReporter, Routes) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    tokio::spawn(health::follow_link(
        health.clone(),
        link.publisher.link_state(),
        store.map(Postgres::up),
        shutdown.clone(),
    ));
    (health, Routes::new(health_service))
}

/// What observes every call (span, log line and, with a `/metrics`
/// endpoint, the grpc_server_* metrics), and the registry of those metrics.
fn observe_calls(config: &Config) -> Result<(prometheus::Registry, CallLayer), Error> {
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
    Ok((registry, calls))
}

/// Starts reporting the counters: `/metrics` if it has an address (after
/// the listener: it reads its counts), and the stats line.
async fn start_reporting(
    config: &Config,
    registry: prometheus::Registry,
    parts: &Parts,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    if let Some(addr) = config.metrics_addr {
        let sources = metrics::Sources {
            hub: parts.hub.clone(),
            encoded: parts.encoded.clone(),
            replies: parts.replies.clone(),
            link_counters: parts.link.counters.clone(),
            link: parts.link.publisher.link_state(),
            store: parts.store.clone(),
            listener: parts.connections.clone(),
            commands: parts.commands.clone(),
            states: parts.states.clone(),
        };
        spawn_metrics(addr, registry, sources, shutdown.clone()).await?;
    }
    tokio::spawn(log_stats(
        Stats {
            hub: parts.hub.clone(),
            replies: parts.replies.clone(),
            ingest: parts.link.counters.clone(),
            connections: parts.connections.clone(),
            auth: parts.authenticator.clone(),
            commands: parts.commands.clone(),
            states: parts.states.clone(),
        },
        shutdown.clone(),
    ));
    Ok(())
}

/// `routes` with server reflection, both versions: grpcurl before 1.8.8
/// only asks v1alpha.
fn add_reflection(routes: Routes) -> Result<Routes, Error> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(routes
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?))
}

/// `routes` with the DeviceHub service, behind the token check. Auth is in
/// front of the DeviceHub service only: health and reflection stay open
/// for probes and grpcurl.
fn add_devicehub(
    routes: Routes,
    service: DeviceHubService,
    authenticator: Authenticator,
) -> Routes {
    routes.add_service(InterceptedService::new(
        DeviceHubServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
        move |request| authenticator.intercept(request),
    ))
}

/// Serves `routes` on `incoming` until `shutdown` is cancelled and the
/// calls still open end, or the shutdown timeout passes.
async fn serve_until_shutdown(
    config: &Config,
    routes: Routes,
    calls: CallLayer,
    incoming: ReceiverStream<std::io::Result<listener::Conn>>,
    health: HealthReporter,
    shutdown: &CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let hosts = match config.auth {
        None => web::HostCheck::new(&config.allowed_hosts),
        Some(_) => web::HostCheck::off(),
    };
    // Outermost first: the dashboard answers the page's plain GETs (and
    // nothing gRPC), CORS answers preflights, gRPC-Web is translated to
    // gRPC, then every call is observed as gRPC, refused for a foreign host
    // included (the page's requests too, by the dashboard).
    let server = bounded_server(&config.connections)
        .accept_http1(true)
        .layer(listener::MarkOpened)
        .layer(web::Dashboard::new(config.dashboard, hosts.clone()))
        .layer(web::cors(&config.cors_allowed_origins))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(calls)
        .layer(hosts)
        .layer(listener::BoundResponses)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, health::stopping(health, shutdown.clone()));
    // Shutdown waits for calls to end, but not for ever: a call waiting a
    // minute for a device's reply, or a client that stopped reading, would
    // keep the process alive after SIGTERM.
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(config.shutdown_timeout).await;
    };
    tokio::select! {
        served = server => served,
        () = deadline => {
            warn!(timeout = ?config.shutdown_timeout, "calls still open at the shutdown deadline; closing their connections");
            Ok(())
        }
    }
}

/// Stops the MQTT link, once the gRPC server has: it disconnects, after
/// acknowledging what the store committed.
async fn stop_link(stop_mqtt: CancellationToken, link: mqtt::MqttLink) {
    stop_mqtt.cancel();
    if let Err(error) = link.task.await {
        warn!(%error, "MQTT task ended abnormally");
    }
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
    commands: Commands,
    states: DeviceStates,
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
        commands,
        states,
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
            persistent_commands = ?commands.counts().iter().map(|(s, n)| (s.name(), *n)).collect::<Vec<_>>(),
            reported_states_applied = states.counters().reported_applied.load(Ordering::Relaxed),
            reported_states_dropped = ?states.counters().dropped(),
            desired_states_published = states.counters().desired_published.load(Ordering::Relaxed),
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
