//! `devicehub serve`: its options, the exposure check, and their
//! translation into the library's [`Config`] and [`ServeConfig`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use rumqttc::QoS;

use devicehub::{
    config::{
        AuthConfig, BrokerUrl, BufferLimits, Config, ConnectionLimits, DeviceLimits, GrpcTls,
        MqttConfig, Secret, StoreConfig,
    },
    ServeConfig,
};

use super::{login::read, CommandArgs, ConfigError, MqttLoginArgs, TopicArgs};

/// The largest `--max-reading-bytes`: 4 MiB less room for the topic (up to
/// 64 KiB) and the rest of the message.
const MAX_READING_BYTES_LIMIT: u64 = (4 << 20) - (128 << 10);

/// Options of `devicehub serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC server listens on. Port 0 picks a free port (logged).
    #[arg(long, env = "DEVICEHUB_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// MQTT broker to use, as mqtt://host[:port] (port 1883 by default).
    /// Unset: start an embedded broker on --embedded-mqtt-addr.
    #[arg(long, env = "DEVICEHUB_MQTT_URL")]
    pub mqtt_url: Option<BrokerUrl>,

    #[cfg(feature = "embedded-broker")]
    /// Address of the embedded broker, used when --mqtt-url is unset. Port 0
    /// picks a free port (logged).
    #[arg(
        long,
        env = "DEVICEHUB_EMBEDDED_MQTT_ADDR",
        default_value = "127.0.0.1:1883"
    )]
    pub embedded_mqtt_addr: SocketAddr,

    #[cfg(feature = "embedded-broker")]
    /// Allow --embedded-mqtt-addr beyond loopback: the embedded broker has
    /// no TLS, passwords or ACL, so anyone who reaches it can publish as any
    /// device and read every command. Apart from --allow-insecure, which
    /// covers the gRPC port only: opening one is no reason to open both.
    #[arg(
        long,
        env = "DEVICEHUB_ALLOW_INSECURE_EMBEDDED_BROKER",
        default_value_t = false
    )]
    pub allow_insecure_embedded_broker: bool,

    /// MQTT client id. Default: `devicehub-` and a random suffix. Set a
    /// stable one with --mqtt-persistent-session.
    #[arg(long, env = "DEVICEHUB_MQTT_CLIENT_ID")]
    pub mqtt_client_id: Option<String>,

    /// Keep the broker session across reconnects and restarts (clean session
    /// off): the broker queues QoS 1/2 readings while devicehub is away.
    /// Needs a stable --mqtt-client-id.
    #[arg(
        long,
        env = "DEVICEHUB_MQTT_PERSISTENT_SESSION",
        default_value_t = false
    )]
    pub mqtt_persistent_session: bool,

    /// Run as one of several replicas: readings and status messages are
    /// subscribed as MQTT shared subscriptions of this group
    /// (`$share/NAME/...`), so the broker hands each to one instance, which
    /// stores it; every instance follows the store. Needs --store-url and
    /// --mqtt-url; give each instance its own --mqtt-client-id.
    #[arg(long, env = "DEVICEHUB_MQTT_SHARE_GROUP")]
    pub mqtt_share_group: Option<String>,

    /// MQTT keep-alive interval, whole seconds as a duration like 30s or
    /// 2m (at most 65535s, MQTT's limit; 0s disables it). Default 30s.
    #[arg(long, env = "DEVICEHUB_MQTT_KEEP_ALIVE", value_parser = keep_alive)]
    pub mqtt_keep_alive: Option<Duration>,

    /// The old spelling of --mqtt-keep-alive, in whole seconds.
    #[arg(long, env = "DEVICEHUB_MQTT_KEEP_ALIVE_SECS", hide = true,
          value_parser = clap::value_parser!(u64).range(0..=65535))]
    pub mqtt_keep_alive_secs: Option<u64>,

    /// QoS of the readings subscription: 0, 1 or 2.
    #[arg(long, env = "DEVICEHUB_MQTT_SUBSCRIBE_QOS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(0..=2))]
    pub mqtt_subscribe_qos: u8,

    /// Largest MQTT packet devicehub sends or accepts, in bytes (at least
    /// 1 MiB). Also the embedded broker's payload limit.
    #[arg(long, env = "DEVICEHUB_MQTT_MAX_PACKET_BYTES", default_value_t = 16 << 20,
          value_parser = clap::value_parser!(u64).range(1 << 20..=256 << 20))]
    pub mqtt_max_packet_bytes: u64,

    /// Largest reading payload stored, in bytes (at most 3.875 MiB, so a
    /// reading always fits in one gRPC message under clients' default 4 MiB
    /// limit). Larger ones are counted, logged and dropped.
    #[arg(long, env = "DEVICEHUB_MAX_READING_BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u64).range(1..=MAX_READING_BYTES_LIMIT))]
    pub max_reading_bytes: u64,

    #[command(flatten)]
    pub mqtt_login: MqttLoginArgs,

    #[command(flatten)]
    pub topics: TopicArgs,

    /// Most readings kept in memory; the oldest are evicted first.
    #[arg(long, env = "DEVICEHUB_BUFFER_MAX_READINGS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub buffer_max_readings: u64,

    /// Most bytes of readings kept in memory (payload, topic, device id and
    /// a fixed overhead per reading); the oldest are evicted first.
    #[arg(long, env = "DEVICEHUB_BUFFER_MAX_BYTES", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub buffer_max_bytes: u64,

    /// Most devices ListDevices lists. Messages of further devices are still
    /// buffered (ListReadings finds them); those devices are counted, not
    /// listed.
    #[arg(long, env = "DEVICEHUB_MAX_DEVICES", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_devices: u64,

    /// Most payload bytes kept of devices' newest readings once they are
    /// evicted from the buffer (so a quiet device still shows what it last
    /// said). Beyond it, such a device lists no last reading (counted).
    #[arg(long, env = "DEVICEHUB_DEVICES_MAX_BYTES", default_value_t = 16 << 20)]
    pub devices_max_bytes: u64,

    /// Most bytes the device states (desired and reported) take in memory
    /// without a store; beyond it UpdateDesiredState answers
    /// RESOURCE_EXHAUSTED for growth and reported states that would grow
    /// are dropped (counted). With --store-url the store keeps them and
    /// this does not apply.
    #[arg(long, env = "DEVICEHUB_MAX_DEVICE_STATES", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_device_states: u64,

    /// Most WatchReadings streams open at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DEVICEHUB_MAX_WATCHERS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watchers: u32,

    /// Most WatchReadings streams one client keeps open at once: per token
    /// subject with auth, else per remote IP address. More get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "DEVICEHUB_MAX_WATCHERS_PER_CLIENT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watchers_per_client: u32,

    /// Most commands one client has in progress at once (waiting for the
    /// broker's acknowledgement or the device's reply), over SendCommand and
    /// StreamCommands together: per token subject with auth, else per
    /// remote IP address. More get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DEVICEHUB_MAX_COMMANDS_PER_CLIENT", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_commands_per_client: u32,

    /// Web origins (scheme://host[:port], comma-separated) whose pages may
    /// call the service with gRPC-Web from a browser (CORS). Unset: no
    /// cross-origin calls. The gRPC port always speaks gRPC-Web too.
    #[arg(long, env = "DEVICEHUB_CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,

    /// Host names (comma-separated) requests may be addressed to besides
    /// localhost and IP addresses, while the service runs without auth:
    /// others are refused with PERMISSION_DENIED, so that a web page cannot
    /// reach the service through DNS rebinding. Set it to the names clients
    /// use (`hub.internal`) when they call by name without auth.
    #[arg(long, env = "DEVICEHUB_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// Serve the dashboard, a web page of the devices, their readings,
    /// commands and state, on the gRPC port (plain HTTP `GET /`, next to
    /// gRPC and gRPC-Web; it calls the service over gRPC-Web, with the same
    /// auth as any client). --dashboard=false turns it off: plain GETs
    /// there get 404.
    #[arg(long, env = "DEVICEHUB_DASHBOARD", default_value_t = true,
          action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub dashboard: bool,

    /// Address to serve Prometheus metrics on (`GET /metrics`). Unset: no
    /// metrics listener. Port 0 picks a free port (logged).
    #[arg(long, env = "DEVICEHUB_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// PostgreSQL store for readings: postgres://user@host[:port]/database,
    /// TLS as its `sslmode` parameter says. Readings are then acknowledged
    /// to the broker once committed, and history outlives restarts and the
    /// memory buffer. Give the password in DEVICEHUB_STORE_PASSWORD (or set
    /// this URL, password included, through DEVICEHUB_STORE_URL), never on
    /// the command line. Unset: memory only.
    #[arg(long, env = "DEVICEHUB_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,

    /// Delete stored readings older than this, in the background: a
    /// duration like 30d, 12h or 90m. Unset: keep everything. Needs
    /// --store-url.
    #[arg(long, env = "DEVICEHUB_STORE_RETENTION", requires = "store_url",
          value_parser = humantime::parse_duration)]
    pub store_retention: Option<Duration>,

    /// How long one PostgreSQL statement of a client read (a ListReadings
    /// page or a WatchReadings replay from the table) may run before the
    /// database cancels it and the call answers UNAVAILABLE, so that slow
    /// reads give their connection back: a duration like 10s or 500ms.
    /// Commits have no such limit. Needs --store-url.
    #[arg(long, env = "DEVICEHUB_STORE_READ_TIMEOUT", requires = "store_url",
          default_value = "10s", value_parser = humantime::parse_duration)]
    pub store_read_timeout: Duration,

    /// How long shutdown (SIGTERM) waits for calls and streams to end
    /// before it closes the remaining connections and exits: a duration
    /// like 10s (the default) or 500ms.
    #[arg(long, env = "DEVICEHUB_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Option<Duration>,

    /// The old spelling of --shutdown-timeout, in whole seconds.
    #[arg(long, env = "DEVICEHUB_SHUTDOWN_TIMEOUT_SECS", hide = true)]
    pub shutdown_timeout_secs: Option<u64>,

    #[command(flatten)]
    pub grpc_security: GrpcSecurityArgs,

    #[command(flatten)]
    pub connections: ConnectionArgs,

    #[command(flatten)]
    pub commands: CommandArgs,
}

/// What the gRPC port holds at once and how long it waits for a peer. Over
/// a cap a new connection is closed at once and counted
/// (`devicehub_connections_closed_total{reason}`, `connections_closed` in the stats line).
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Most gRPC connections open at once.
    #[arg(long, env = "DEVICEHUB_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most gRPC connections open at once from one remote IP address.
    #[arg(long, env = "DEVICEHUB_MAX_CONNECTIONS_PER_IP", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: u32,

    /// Most TLS handshakes in progress at once (with --tls-cert).
    #[arg(long, env = "DEVICEHUB_MAX_TLS_HANDSHAKES", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tls_handshakes: u32,

    /// Most TLS handshakes in progress at once from one remote IP address.
    #[arg(long, env = "DEVICEHUB_MAX_TLS_HANDSHAKES_PER_IP", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tls_handshakes_per_ip: u32,

    /// How long a TLS handshake may take before the connection is closed:
    /// a duration like 5s or 500ms.
    #[arg(long, env = "DEVICEHUB_TLS_HANDSHAKE_TIMEOUT", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// How long a connection may stay open before its first request (a
    /// duration like 10s); then it is closed.
    #[arg(long, env = "DEVICEHUB_CONNECTION_IDLE_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub connection_idle_timeout: Duration,

    /// Most calls (HTTP/2 streams) one connection has open at once; the
    /// client queues further ones.
    #[arg(long, env = "DEVICEHUB_MAX_STREAMS_PER_CONNECTION", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// Most response bytes handed to gRPC connections and not yet written
    /// by them, over all connections (clients that stop reading hold
    /// theirs); one connection may hold a sixteenth (at least 8 MiB, two
    /// of the largest responses). Beyond either, calls end with
    /// RESOURCE_EXHAUSTED. At least 8 MiB.
    #[arg(long, env = "DEVICEHUB_MAX_RESPONSE_BYTES_IN_FLIGHT", default_value_t = 256 << 20,
          value_parser = clap::value_parser!(u64).range(8 << 20..=1 << 32))]
    pub max_response_bytes_in_flight: u64,
}

impl ConnectionArgs {
    fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections as usize,
            max_connections_per_ip: self.max_connections_per_ip as usize,
            max_handshakes: self.max_tls_handshakes as usize,
            max_handshakes_per_ip: self.max_tls_handshakes_per_ip as usize,
            handshake_timeout: self.tls_handshake_timeout,
            idle_timeout: self.connection_idle_timeout,
            max_streams_per_connection: self.max_streams_per_connection,
            max_response_bytes_in_flight: self.max_response_bytes_in_flight as usize,
        }
    }
}

/// TLS and caller authentication on the gRPC port, and the opt-in to run
/// without them beyond loopback.
#[derive(Debug, Clone, Args)]
pub struct GrpcSecurityArgs {
    /// PEM certificate chain the gRPC port presents (TLS). Re-read when the
    /// file changes. Needs --tls-key.
    #[arg(long, env = "DEVICEHUB_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert. Re-read when the file changes.
    #[arg(long, env = "DEVICEHUB_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: every gRPC client must present a certificate
    /// signed by one of them (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "DEVICEHUB_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// PEM public key(s) that sign callers' JWTs (RSA, EC P-256/P-384,
    /// Ed25519); repeat the flag, or put several keys in one file, to
    /// rotate. Re-read when the files change (a file that does not load
    /// keeps the previous keys). With it, DeviceHub calls need
    /// `authorization: Bearer <JWT>`.
    #[arg(long, env = "DEVICEHUB_AUTH_JWT_KEY", value_delimiter = ',')]
    pub auth_jwt_key: Vec<PathBuf>,

    /// Required `iss` claim of callers' tokens.
    #[arg(long, env = "DEVICEHUB_AUTH_JWT_ISSUER", requires = "auth_jwt_key")]
    pub auth_jwt_issuer: Option<String>,

    /// Required `aud` claim of callers' tokens. Set it: without it, a token
    /// the issuer minted for any other service is accepted too (warned
    /// about at startup).
    #[arg(long, env = "DEVICEHUB_AUTH_JWT_AUDIENCE", requires = "auth_jwt_key")]
    pub auth_jwt_audience: Option<String>,

    /// Allow listening beyond loopback without TLS and auth on the gRPC
    /// port. Without it such a configuration refuses to start. (The
    /// embedded broker beyond loopback has its own opt-in:
    /// --allow-insecure-embedded-broker.)
    #[arg(long, env = "DEVICEHUB_ALLOW_INSECURE", default_value_t = false)]
    pub allow_insecure: bool,
}

impl GrpcSecurityArgs {
    fn tls(&self) -> Result<Option<GrpcTls>, ConfigError> {
        match (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            (Some(cert), Some(key), client_ca) => Ok(Some(GrpcTls {
                cert_chain: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
            })),
            (None, None, None) => Ok(None),
            _ => Err(ConfigError::HalfServerTls),
        }
    }

    fn auth(&self) -> Result<Option<AuthConfig>, ConfigError> {
        if self.auth_jwt_key.is_empty() {
            return Ok(None);
        }
        let public_keys_pem = self
            .auth_jwt_key
            .iter()
            .map(|path| read("--auth-jwt-key", path))
            .collect::<Result<_, _>>()?;
        Ok(Some(AuthConfig {
            public_keys_pem,
            key_files: self.auth_jwt_key.clone(),
            issuer: self.auth_jwt_issuer.clone(),
            audience: self.auth_jwt_audience.clone(),
        }))
    }
}

impl ServeArgs {
    /// Refuses to listen beyond loopback without protection: the gRPC port
    /// without both TLS and auth (unless --allow-insecure), and the embedded
    /// broker, which has neither, at all (unless
    /// --allow-insecure-embedded-broker).
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        let security = &self.grpc_security;
        let protected = security.tls_cert.is_some() && !security.auth_jwt_key.is_empty();
        if !self.grpc_addr.ip().is_loopback() && !protected && !security.allow_insecure {
            return Err(ConfigError::Insecure(format!(
                "--grpc-addr {} is beyond loopback without TLS and auth: set --tls-cert, --tls-key and --auth-jwt-key, or --allow-insecure to accept the risk",
                self.grpc_addr
            )));
        }
        #[cfg(feature = "embedded-broker")]
        if self.mqtt_url.is_none()
            && !self.embedded_mqtt_addr.ip().is_loopback()
            && !self.allow_insecure_embedded_broker
        {
            return Err(ConfigError::Insecure(format!(
                "--embedded-mqtt-addr {} is beyond loopback, and the embedded broker has no TLS or passwords: use a real broker (--mqtt-url), or --allow-insecure-embedded-broker to accept the risk",
                self.embedded_mqtt_addr
            )));
        }
        Ok(())
    }

    /// What `devicehub serve` runs: the exposure checked, then the
    /// configuration, connecting to the --mqtt-url or else to the embedded
    /// broker started on --embedded-mqtt-addr.
    pub fn serve_config(&self) -> Result<ServeConfig, ConfigError> {
        self.check_exposure()?;
        let broker = match &self.mqtt_url {
            Some(url) => url.clone(),
            // Where it will listen; `devicehub::serve` puts in the address it
            // bound (port 0 picks one).
            #[cfg(feature = "embedded-broker")]
            None => BrokerUrl::from_addr(self.embedded_mqtt_addr),
            #[cfg(not(feature = "embedded-broker"))]
            None => return Err(ConfigError::NoBroker),
        };
        Ok(ServeConfig {
            service: self.config(&broker)?,
            grpc_addr: self.grpc_addr,
            #[cfg(feature = "embedded-broker")]
            embedded_broker: self.mqtt_url.is_none().then_some(self.embedded_mqtt_addr),
        })
    }

    /// The library configuration, connecting to `broker` (the --mqtt-url, or
    /// the embedded broker's address).
    pub fn config(&self, broker: &BrokerUrl) -> Result<Config, ConfigError> {
        let client_id = match &self.mqtt_client_id {
            Some(id) if id.is_empty() => return Err(ConfigError::EmptyClientId),
            Some(id) => id.clone(),
            None if self.mqtt_persistent_session => return Err(ConfigError::PersistentWithoutId),
            None => default_client_id(),
        };
        let subscribe_qos = match self.mqtt_subscribe_qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            // rumqttc forgets incoming QoS 2 state on reconnect, then treats
            // the broker's resent PUBREL as a protocol error and reconnects
            // forever (bytebeamio/rumqtt#664).
            _ if self.mqtt_persistent_session => return Err(ConfigError::PersistentQos2),
            _ => QoS::ExactlyOnce,
        };
        let readings_topic = self.topics.readings()?;
        if let Some(group) = &self.mqtt_share_group {
            devicehub::topic::validate_device_id(group)
                .map_err(|e| ConfigError::Topic("--mqtt-share-group", e))?;
            if self.mqtt_url.is_none() {
                return Err(ConfigError::ShareGroupEmbedded);
            }
            if self.store_url.is_none() {
                return Err(ConfigError::ShareGroupWithoutStore);
            }
        }
        Ok(Config {
            mqtt: MqttConfig {
                host: broker.host.clone(),
                port: broker.port,
                client_id,
                keep_alive: duration(
                    self.mqtt_keep_alive,
                    self.mqtt_keep_alive_secs,
                    Duration::from_secs(30),
                ),
                subscribe_qos,
                max_packet_bytes: self.mqtt_max_packet_bytes as usize,
                max_reading_bytes: self.max_reading_bytes as usize,
                persistent_session: self.mqtt_persistent_session,
                readings_subscription: readings_topic.subscription_filter().to_owned(),
                readings_topic,
                share_group: self.mqtt_share_group.clone(),
                commands_topic: self.topics.commands()?,
                replies_topic: self.topics.replies()?,
                status_topic: self.topics.status()?,
                desired_state_topic: self.topics.desired_state()?,
                reported_state_topic: self.topics.reported_state()?,
                tls: self.mqtt_login.tls(broker)?,
                credentials: self.mqtt_login.credentials()?,
            },
            buffer: BufferLimits {
                max_readings: usize::try_from(self.buffer_max_readings).unwrap_or(usize::MAX),
                max_bytes: usize::try_from(self.buffer_max_bytes).unwrap_or(usize::MAX),
            },
            devices: DeviceLimits {
                max_devices: usize::try_from(self.max_devices).unwrap_or(usize::MAX),
                max_kept_bytes: usize::try_from(self.devices_max_bytes).unwrap_or(usize::MAX),
            },
            max_watchers: self.max_watchers as usize,
            max_watchers_per_client: self.max_watchers_per_client as usize,
            max_commands_per_client: self.max_commands_per_client as usize,
            shutdown_timeout: duration(
                self.shutdown_timeout,
                self.shutdown_timeout_secs,
                Duration::from_secs(10),
            ),
            metrics_addr: self.metrics_addr,
            cors_allowed_origins: cors_origins(&self.cors_allowed_origins)?,
            allowed_hosts: self.allowed_hosts.clone(),
            dashboard: self.dashboard,
            grpc_tls: self.grpc_security.tls()?,
            auth: self.grpc_security.auth()?,
            connections: self.connections.limits(),
            commands: self.commands.limits(),
            max_device_states: usize::try_from(self.max_device_states).unwrap_or(usize::MAX),
            store: self.store_url.as_ref().map(|url| StoreConfig {
                url: Secret::new(url.as_str()),
                password: std::env::var(STORE_PASSWORD_ENV).ok().map(Secret::new),
                retention: self.store_retention,
                read_timeout: self.store_read_timeout,
            }),
        })
    }
}

/// Where the store's password comes from, if not from its URL.
pub const STORE_PASSWORD_ENV: &str = "DEVICEHUB_STORE_PASSWORD";

/// `--cors-allowed-origins`, each checked to be an origin (a browser sends
/// exactly `scheme://host[:port]`, so anything else would never match).
fn cors_origins(origins: &[String]) -> Result<Vec<String>, ConfigError> {
    origins
        .iter()
        .map(|origin| {
            let origin = origin.trim();
            let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
                && origin.splitn(4, '/').nth(3).is_none()
                && !origin.ends_with('/')
                && origin.is_ascii()
                && http::HeaderValue::from_str(origin).is_ok();
            if valid {
                Ok(origin.to_owned())
            } else {
                Err(ConfigError::CorsOrigin(origin.to_owned()))
            }
        })
        .collect()
}

fn default_client_id() -> String {
    // The last 12 hex digits of a UUID v7 are random.
    let uuid = uuid::Uuid::now_v7().simple().to_string();
    format!("devicehub-{}", &uuid[20..])
}

/// A duration flag (`--shutdown-timeout 10s`), else its old spelling in
/// whole seconds (`--shutdown-timeout-secs 10`, hidden, kept so that
/// existing deployments go on working), else `default`.
pub(super) fn duration(
    given: Option<Duration>,
    old_secs: Option<u64>,
    default: Duration,
) -> Duration {
    given
        .or(old_secs.map(Duration::from_secs))
        .unwrap_or(default)
}

/// `--mqtt-keep-alive`: MQTT counts keep-alive in whole seconds, at most
/// 65 535 (and rumqttc refuses less than one second, but for 0).
fn keep_alive(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.subsec_nanos() != 0 || duration.as_secs() > 65_535 {
        return Err(format!(
            "{text:?}: MQTT's keep-alive is whole seconds, 0s to 65535s"
        ));
    }
    Ok(duration)
}
