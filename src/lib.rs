//! devicehub: a typed, streaming gRPC API in front of MQTT devices.
//!
//! Devices publish readings to an MQTT broker; [`mqtt`] ingests them into the
//! bounded [`buffer`] (shared through [`hub`]), and [`grpc`] serves them and
//! publishes commands. [`run`] wires the parts together on a listener the
//! caller bound, so tests and benchmarks start the real server in-process;
//! [`serve`] adds what the binary needs (the embedded broker, binding).

pub mod broker;
pub mod buffer;
pub mod config;
pub mod grpc;
pub mod hub;
pub mod mqtt;
pub mod replies;
pub mod shutdown;
pub mod simulate;
pub mod topic;

/// The generated protobuf and gRPC code of `devicehub.v1`.
// Generated code: its doc comments come from the proto, formatted for protoc.
#[allow(clippy::all)]
pub mod proto {
    tonic::include_proto!("devicehub.v1");
    // The server, generated separately: see build.rs.
    include!(concat!(env!("OUT_DIR"), "/server/devicehub.v1.rs"));

    /// The encoded descriptor set of the proto and its imports, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/devicehub_descriptor.bin"));
}

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::net::TcpListener;
use tokio_stream::{wrappers::TcpListenerStream, StreamExt};
use tonic::transport::Server;
use tonic_health::{server::HealthReporter, ServingStatus};
use tracing::{info, warn};

use crate::{
    buffer::BufferLimits,
    config::{BrokerUrl, ConfigError, ServeArgs},
    grpc::DeviceHubService,
    hub::ReadingHub,
    mqtt::{LinkState, MqttConfig},
    proto::device_hub_server::DeviceHubServer,
    replies::ReplyRouter,
    shutdown::Shutdown,
};

/// Largest request message the service accepts. Commands are at most 256 KiB.
const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Everything [`run`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub buffer: BufferLimits,
    /// Most WatchReadings streams open at once.
    pub max_watchers: usize,
}

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
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
}

/// The gRPC service name health checks report on.
pub const SERVICE_NAME: &str = "devicehub.v1.DeviceHub";

/// Starts the embedded broker when no `--mqtt-url` is given, binds the gRPC
/// address and runs the service until `shutdown` fires.
pub async fn serve(args: &ServeArgs, shutdown: Shutdown) -> Result<(), Error> {
    let broker = match &args.mqtt_url {
        Some(url) => url.clone(),
        None => {
            let (addr, max) = (args.embedded_mqtt_addr, args.mqtt_max_packet_bytes as usize);
            let bound = tokio::task::spawn_blocking(move || broker::start(addr, max))
                .await
                .map_err(std::io::Error::other)??;
            BrokerUrl::from_addr(bound)
        }
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

/// Runs the service on `listener` until `shutdown` fires, then stops in
/// order: health NOT_SERVING, no new calls, open streams ended (tonic waits
/// for them), MQTT disconnected.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
    let hub = Arc::new(ReadingHub::new(
        config.buffer,
        first_seq(),
        config.max_watchers,
    ));
    // The MQTT link stops after the gRPC server, so calls in progress can
    // still publish while streams drain.
    let (stop_mqtt, mqtt_shutdown) = shutdown::channel();
    let replies = Arc::new(ReplyRouter::default());
    let link = mqtt::start(&config.mqtt, hub.clone(), replies.clone(), mqtt_shutdown);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    tokio::spawn(follow_link(
        health.clone(),
        link.publisher.link_state(),
        shutdown.clone(),
    ));
    tokio::spawn(log_stats(hub.clone(), replies.clone(), shutdown.clone()));

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
        shutdown.clone(),
    );
    let addr = listener.local_addr()?;
    info!(%addr, broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port), "gRPC listening");

    let mut stop = shutdown.clone();
    let stopping = async move {
        stop.recv().await;
        info!("shutting down");
        health
            .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
    };
    let served = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(DeviceHubServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES))
        .serve_with_incoming_shutdown(incoming(listener), stopping)
        .await;

    stop_mqtt.fire();
    if let Err(error) = link.task.await {
        warn!(%error, "MQTT task ended abnormally");
    }
    served?;
    info!("stopped");
    Ok(())
}

/// The accepted connections of `listener`, with Nagle's algorithm off: tonic
/// sets TCP_NODELAY only on listeners it binds itself, and without it small
/// responses wait for the peer's delayed ACK (tens of milliseconds).
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        if let Err(error) = stream.set_nodelay(true) {
            warn!(%error, "cannot set TCP_NODELAY on a gRPC connection");
        }
        Ok(stream)
    })
}

/// Keeps the health status of [`SERVICE_NAME`] in step with the MQTT link:
/// SERVING only while connected and subscribed.
async fn follow_link(
    health: HealthReporter,
    mut link: tokio::sync::watch::Receiver<LinkState>,
    mut shutdown: Shutdown,
) {
    loop {
        let status = match *link.borrow_and_update() {
            LinkState::Ready => ServingStatus::Serving,
            LinkState::Down | LinkState::Connected => ServingStatus::NotServing,
        };
        if shutdown.is_shutdown() {
            return;
        }
        health.set_service_status(SERVICE_NAME, status).await;
        tokio::select! {
            changed = link.changed() => if changed.is_err() { return },
            _ = shutdown.recv() => return,
        }
    }
}

/// Logs the buffer and watcher counters every [`STATS_INTERVAL`] and once at
/// shutdown, for operators (metrics can come later).
async fn log_stats(hub: Arc<ReadingHub>, replies: Arc<ReplyRouter>, mut shutdown: Shutdown) {
    let mut interval = tokio::time::interval(STATS_INTERVAL);
    interval.tick().await; // the first tick is immediate
    loop {
        let stopping = tokio::select! {
            _ = interval.tick() => false,
            _ = shutdown.recv() => true,
        };
        let stats = hub.stats();
        let replies = replies.stats();
        info!(
            buffered = stats.buffer.readings,
            buffered_bytes = stats.buffer.bytes,
            evicted = stats.buffer.evicted,
            next_seq = stats.buffer.next_seq,
            watchers = stats.watchers,
            watcher_gaps = stats.watcher_gaps,
            watcher_missed_readings = stats.watcher_missed_readings,
            commands_awaiting_reply = replies.pending,
            replies_matched = replies.matched,
            replies_late = replies.late,
            replies_unmatched = replies.unmatched,
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
