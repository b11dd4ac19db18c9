//! The MQTT side: the one shared `rumqttc` client and the task that drives
//! it. It knows nothing of gRPC: incoming readings go to the hand-off
//! ([`Ingest`]: the hub, or the store's writer), replies to the
//! [`ReplyRouter`], and commands come in through [`CommandPublisher`]. With a store, readings are acknowledged
//! to the broker only once committed (rumqttc's manual acknowledgements;
//! see `store`).
//!
//! - [`link`]: the event loop task: connection, backoff, subscriptions, ingest;
//! - [`ingest`]: [`Ingest`], memory only or the store;
//! - [`leave`]: a replica leaving its share group at shutdown;
//! - [`route`]: what each message received is and where it goes (readings,
//!   replies, status, reported states), and whether it may be stored;
//! - [`publish`]: [`CommandPublisher`] (commands, and desired states,
//!   retained) and the acknowledgement tracker;
//! - [`tls`]: the TLS client configuration for `mqtts://` brokers.
//!
//! # The event loop task
//! rumqttc does nothing unless `EventLoop::poll` is called, and it has no
//! delay of its own after an error, so the task polls continuously and sleeps
//! with exponential backoff after each connection error. It subscribes again
//! on every ConnAck (a clean session forgets subscriptions) with `try_*`
//! calls: awaiting the client from the task that drives it could deadlock
//! when the request channel is full.
//!

mod ingest;
mod leave;
mod link;
mod publish;
mod route;
mod tls;

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex, MutexGuard,
};

use rumqttc::{AsyncClient, MqttOptions, TlsConfiguration, Transport};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use ingest::Ingest;
pub use publish::{CommandPublisher, PublishError};
pub use tls::{client_config, ClientIdentity, TlsError};

use crate::{
    config::{Credentials, MqttConfig},
    replies::ReplyRouter,
    state::ReportedInbox,
    sync,
};
use link::Driver;
use publish::AckTracker;

/// Capacity of rumqttc's request queue: commands waiting to be written.
const REQUEST_QUEUE: usize = 1024;

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

/// State shared by the event loop task and the publishers. One std mutex
/// (see [`crate::sync`]), so that "is the link up" and "enqueue the publish"
/// are one step; it is held for a few statements, never across an `.await`.
struct Shared {
    tracker: Mutex<AckTracker>,
    state: watch::Sender<LinkState>,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, AckTracker> {
        sync::lock(&self.tracker)
    }
}

/// What the link counts, read by the stats line and `/metrics` alike.
#[derive(Debug, Default)]
pub struct IngestCounters {
    /// Messages from devices not stored, by [`Rejection`].
    rejected: [AtomicU64; Rejection::ALL.len()],
    /// Connections the broker accepted (CONNACK).
    pub connects: AtomicU64,
    /// Connections lost after they were up.
    pub disconnects: AtomicU64,
}

/// Why a message from a device was not stored. It is acknowledged all the
/// same (the broker must not deliver it again: it would be refused again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Larger than `--max-reading-bytes`.
    TooLarge,
    /// Its topic was not UTF-8 (read with U+FFFD in place of the invalid
    /// bytes: vendor/rumqttc/PATCH.md).
    InvalidUtf8,
    /// Its topic holds U+0000, another control character or a Unicode
    /// noncharacter, or a level over `topic::MAX_TOPIC_LEVEL_BYTES`.
    InvalidTopic,
}

impl Rejection {
    pub const ALL: [Rejection; 3] = [Self::TooLarge, Self::InvalidUtf8, Self::InvalidTopic];

    /// The `reason` label of `devicehub_readings_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::InvalidTopic => "invalid_topic",
        }
    }
}

impl IngestCounters {
    /// Counts one message not stored.
    pub fn reject(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Messages from devices not stored at ingest, by reason, as
    /// `devicehub_readings_rejected_total{reason}` shows them: the one list
    /// of these reasons, read by the metrics and the stats line. (The store
    /// counts the rows PostgreSQL refuses: `refused_by_store`.)
    pub fn rejected(&self) -> Vec<(&'static str, u64)> {
        Rejection::ALL
            .iter()
            .map(|&why| {
                (
                    why.reason(),
                    self.rejected[why as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// The running MQTT link: its publisher and the event loop task.
pub struct MqttLink {
    pub publisher: CommandPublisher,
    pub counters: Arc<IngestCounters>,
    /// Ends after a clean disconnect once shutdown has fired.
    pub task: JoinHandle<()>,
}

/// Requests (command publishes, acknowledgements) the event loop writes
/// before it flushes, when that many are queued: one write for many
/// commands. Only what is already queued is taken, so nothing waits for a
/// batch to fill (vendor/rumqttc/PATCH.md; BENCHMARKS.md, issue 16).
const REQUEST_BATCH: usize = 64;

/// Builds rumqttc's options from `config`.
fn options(config: &MqttConfig, manual_acks: bool) -> MqttOptions {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes)
        .set_clean_session(!config.persistent_session)
        .set_manual_acks(manual_acks)
        .set_request_channel_capacity(REQUEST_QUEUE)
        .set_max_request_batch(REQUEST_BATCH);
    log_in(
        &mut options,
        config.tls.as_ref(),
        config.credentials.as_ref(),
    );
    options
}

/// Sets TLS (for an `mqtts://` broker) and the login on `options`.
pub fn log_in(
    options: &mut MqttOptions,
    tls: Option<&Arc<rustls::ClientConfig>>,
    credentials: Option<&Credentials>,
) {
    if let Some(tls) = tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    if let Some(login) = credentials {
        options.set_credentials(&login.username, login.password.expose());
    }
}

/// Starts the shared client and its event loop task, which hands incoming
/// readings (and command replies) to `ingest` and routes replies through
/// `replies` and reported states to `reported`, until `shutdown` is
/// cancelled.
pub fn start(
    config: &MqttConfig,
    ingest: Ingest,
    replies: ReplyRouter,
    reported: ReportedInbox,
    shutdown: CancellationToken,
) -> MqttLink {
    let manual_acks = matches!(ingest, Ingest::Durable(_));
    let (client, mut eventloop) = AsyncClient::new(options(config, manual_acks), REQUEST_QUEUE);
    // Commands and acknowledgements are small writes that must go out at
    // once, not wait for Nagle's algorithm.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let shared = Arc::new(Shared {
        tracker: Mutex::default(),
        state: watch::channel(LinkState::Down).0,
    });
    let counters = Arc::new(IngestCounters::default());
    let driver = Driver::new(
        config,
        client.clone(),
        shared.clone(),
        ingest,
        replies,
        reported,
        counters.clone(),
    );
    let task = tokio::spawn(driver.run(eventloop, shutdown));
    MqttLink {
        publisher: CommandPublisher::new(client, shared),
        counters,
        task,
    }
}
