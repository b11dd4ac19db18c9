//! The library's configuration: plain data that [`crate::run`] and
//! [`crate::serve`] take. The binary's command line (`src/cli/`) builds it,
//! and checks the flags it comes from; tests and programs that embed the
//! library may build it themselves. Loading files is left to whoever builds
//! it (the TLS client configuration comes built, by [`crate::mqtt_tls`]), so that
//! nothing here depends on the parts it configures.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use rumqttc::QoS;

use crate::topic::TopicTemplate;

/// Everything [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub buffer: BufferLimits,
    pub devices: DeviceLimits,
    /// Most WatchReadings streams open at once.
    pub max_watchers: usize,
    /// Most WatchReadings streams one client (a token subject, or a
    /// connection without auth) keeps open at once.
    pub max_watchers_per_client: usize,
    /// Most commands one client has in progress (waiting for the broker's
    /// acknowledgement or the device's reply) at once.
    pub max_commands_per_client: usize,
    /// How long shutdown waits for calls to end before closing connections.
    pub shutdown_timeout: Duration,
    /// Where `GET /metrics` is served; `None`: nowhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Origins whose pages may call with gRPC-Web (CORS); empty: none.
    pub cors_allowed_origins: Vec<String>,
    /// Host names requests may name besides loopback ones and IP addresses,
    /// while there is no auth (DNS rebinding; see `web/mod.rs`).
    pub allowed_hosts: Vec<String>,
    /// Serve the dashboard (plain HTTP `GET /` on the gRPC port; see
    /// `web/dashboard.rs`). Off: every plain `GET` there is a 404.
    pub dashboard: bool,
    /// TLS on the gRPC port. `None`: plaintext.
    pub grpc_tls: Option<GrpcTls>,
    /// Bearer-token auth on the DeviceHub service. `None`: anyone may call.
    pub auth: Option<AuthConfig>,
    /// The PostgreSQL store. `None`: readings live in memory only.
    pub store: Option<StoreConfig>,
    /// What the gRPC port holds at once, and how long it waits for peers.
    pub connections: ConnectionLimits,
    /// Persistent commands' bounds.
    pub commands: CommandLimits,
    /// Most bytes device states take in memory without a store.
    pub max_device_states: usize,
}

/// How persistent commands are bounded and paced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLimits {
    /// Publishes of one command in all, before it is FAILED.
    pub max_attempts: u32,
    /// SENT commands per device at once; `None`: no limit.
    pub in_flight_per_device: Option<u32>,
    /// Active (QUEUED or SENT) commands in all.
    pub max_queued: usize,
    /// Active commands per device.
    pub max_queued_per_device: usize,
    /// How long an ended command is kept for GetCommand and ListCommands.
    pub retention: Duration,
}

impl Default for CommandLimits {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            in_flight_per_device: None,
            max_queued: 10_000,
            max_queued_per_device: 1_000,
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// What [`crate::serve`] adds to [`crate::run`]: the address to bind, and
/// the embedded broker to start.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The service itself. With [`ServeConfig::embedded_broker`],
    /// `service.mqtt`'s host and port are replaced by the address the
    /// broker bound.
    pub service: Config,
    /// Where the gRPC server listens; port 0 picks a free port (logged).
    pub grpc_addr: SocketAddr,
    /// Starts the embedded broker on this address (port 0: a free one) and
    /// connects to it, with `service.mqtt.max_packet_bytes` as its payload
    /// limit. `None`: the broker `service.mqtt` names.
    #[cfg(feature = "embedded-broker")]
    pub embedded_broker: Option<SocketAddr>,
}

/// Caps on the gRPC port's connections and TLS handshakes (overall and per
/// remote IP) and the waits on peers; over a cap a connection is closed at
/// once (counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_ip: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long a connection may stay open without a request.
    pub idle_timeout: Duration,
    /// HTTP/2 streams (calls) one connection has open at once; more wait.
    pub max_streams_per_connection: u32,
    /// Response bytes handed to connections and not yet taken by their
    /// sockets, over all connections; beyond it calls end with
    /// RESOURCE_EXHAUSTED.
    pub max_response_bytes_in_flight: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_ip: 256,
            max_handshakes: 256,
            max_handshakes_per_ip: 32,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            max_streams_per_connection: 256,
            max_response_bytes_in_flight: 256 << 20,
        }
    }
}

/// Where readings are kept beyond memory.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `postgres://user@host:port/db?sslmode=...`; may hold the password,
    /// hence a [`Secret`].
    pub url: Secret,
    /// Overrides the URL's password.
    pub password: Option<Secret>,
    /// Readings older than this are deleted in the background. `None`:
    /// kept forever.
    pub retention: Option<Duration>,
    /// How long one statement of a client read (a page, a replay) may run
    /// before PostgreSQL cancels it (`statement_timeout` of the read pool's
    /// connections); ingest's statements have none.
    pub read_timeout: Duration,
}

/// TLS on the gRPC port: PEM files, read at startup and again whenever they
/// change (certificate rotation without a restart).
#[derive(Debug, Clone)]
pub struct GrpcTls {
    pub cert_chain: PathBuf,
    pub key: PathBuf,
    /// With it, every client must present a certificate signed by one of
    /// these CAs (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// JWT verification: the public keys (PEM, several per file allowed) and
/// the claims to insist on.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub public_keys_pem: Vec<Vec<u8>>,
    /// The files `public_keys_pem` was read from, re-read whenever they
    /// change (key rotation without a restart). Empty: the keys were given
    /// some other way and are never re-read.
    pub key_files: Vec<PathBuf>,
    pub issuer: Option<String>,
    /// Required `aud`. Without it a token from the issuer for any other
    /// service is accepted too (a warning at startup says so).
    pub audience: Option<String>,
}

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
    /// Largest reading payload stored, in bytes; larger ones are counted and
    /// dropped, so that every reading fits one gRPC message.
    pub max_reading_bytes: usize,
    /// Keep the broker session (and queued QoS 1/2 readings) across
    /// reconnects and restarts: clean session off.
    pub persistent_session: bool,
    /// Parses the device id out of the topic of an incoming reading.
    pub readings_topic: TopicTemplate,
    /// What is subscribed to for readings. Usually the readings template
    /// with `+` for the device id; kept apart from the template because
    /// what is subscribed to and the topics that arrive differ (a shared
    /// subscription, see `share_group`, prefixes the filter only).
    pub readings_subscription: String,
    /// Replicas: readings and status messages are subscribed as MQTT shared
    /// subscriptions of this group (`$share/GROUP/filter`), so the broker
    /// hands each to one instance of the group. Needs a store, through
    /// which every instance sees them all (see `store`). `None`: plain
    /// subscriptions.
    pub share_group: Option<String>,
    pub commands_topic: TopicTemplate,
    pub replies_topic: TopicTemplate,
    /// Where devices publish their connection status (online/offline).
    pub status_topic: TopicTemplate,
    /// Where devices' desired states are published (retained).
    pub desired_state_topic: TopicTemplate,
    /// Where devices publish their reported states.
    pub reported_state_topic: TopicTemplate,
    /// TLS to the broker (an `mqtts://` URL): what to trust and what to
    /// present. `None`: plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// User name and password to log in with, if the broker asks for them.
    pub credentials: Option<Credentials>,
}

/// A broker login. The password is a [`Secret`].
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

/// A secret value (a password): its `Debug` and `Display` print a
/// placeholder, so it cannot end up in a log line or an error by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How much the buffer keeps before it evicts the oldest readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    pub max_readings: usize,
    pub max_bytes: usize,
}

/// Bounds on the device list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Most devices listed; messages of more are still buffered.
    pub max_devices: usize,
    /// Most payload bytes kept of devices' newest readings after their
    /// eviction from the buffer.
    pub max_kept_bytes: usize,
}

impl Default for DeviceLimits {
    fn default() -> Self {
        Self {
            max_devices: 100_000,
            max_kept_bytes: 16 << 20,
        }
    }
}

/// An MQTT broker address: `mqtt://host[:port]` (or `tcp://`), port 1883 by
/// default; `mqtts://host[:port]` (or `ssl://`) for TLS, port 8883 by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS to the broker.
    pub tls: bool,
}

impl BrokerUrl {
    pub fn from_addr(addr: SocketAddr) -> Self {
        Self {
            host: addr.ip().to_string(),
            port: addr.port(),
            tls: false,
        }
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for BrokerUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let schemes = [
            ("mqtt://", false),
            ("tcp://", false),
            ("mqtts://", true),
            ("ssl://", true),
        ];
        let (rest, tls) = schemes
            .iter()
            .find_map(|(scheme, tls)| Some((url.strip_prefix(scheme)?, *tls)))
            .ok_or_else(|| format!("{url:?} must start with mqtt:// or mqtts://"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            // Never echo the URL here: it may hold a password.
            return Err("the broker URL must not hold credentials: use --mqtt-username and DEVICEHUB_MQTT_PASSWORD or --mqtt-password-file".into());
        }
        if rest.contains('/') || rest.contains('?') {
            return Err(format!("{url:?} must be mqtt://host[:port] with no path"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
            (host, after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = match port {
            None if tls => 8883,
            None => 1883,
            Some(p) => p
                .parse()
                .map_err(|_| format!("{url:?}: {p:?} is not a port number"))?,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let url = |s: &str| s.parse::<BrokerUrl>();
        assert_eq!(
            url("mqtt://localhost").unwrap(),
            BrokerUrl {
                host: "localhost".into(),
                port: 1883,
                tls: false,
            }
        );
        assert_eq!(url("tcp://10.0.0.1:1884/").unwrap().port, 1884);
        assert_eq!(
            url("mqtt://[::1]:1885").unwrap(),
            BrokerUrl {
                host: "::1".into(),
                port: 1885,
                tls: false,
            }
        );
        for bad in [
            "localhost:1883",
            "http://h",
            "mqtt://",
            "mqtt://h:x",
            "mqtt://u:p@h",
            "mqtt://h/a",
        ] {
            assert!(url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            url("mqtt://[::1]:1885").unwrap().to_string(),
            "mqtt://[::1]:1885"
        );
        let tls = url("mqtts://broker.example").unwrap();
        assert!(tls.tls && tls.port == 8883);
        assert_eq!(url("ssl://h:9000").unwrap().to_string(), "mqtts://h:9000");
        let error = url("mqtt://user:hunter2@h").unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
    }
}
