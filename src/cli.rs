//! The command line: clap types with a `DEVICEHUB_*` environment fallback for
//! every flag, and their translation into the library's [`Config`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use rumqttc::QoS;

use crate::{
    config::{
        AuthConfig, BrokerUrl, BufferLimits, Config, ConfigError, Credentials, DeviceLimits,
        GrpcTls, MqttConfig, Secret,
    },
    mqtt::{self, ClientIdentity},
    topic::TopicTemplate,
};

/// devicehub: a typed, streaming gRPC API in front of MQTT devices.
///
/// With no subcommand, runs `serve`.
#[derive(Debug, Parser)]
#[command(name = "devicehub", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Log lines as text, or as one JSON object per line (timestamp,
    /// level, target, message and the fields) for log collectors.
    #[arg(long, env = "DEVICEHUB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint to export traces to, e.g. http://127.0.0.1:4317
    /// (an OpenTelemetry Collector, Jaeger, Tempo). Unset: no traces.
    /// OTEL_SERVICE_NAME and the other OTEL_* variables of the exporter
    /// apply.
    #[arg(long, env = "DEVICEHUB_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (the default). Without --mqtt-url, starts an
    /// embedded MQTT broker and uses it.
    Serve(Box<ServeArgs>),
    #[cfg(feature = "simulator")]
    /// Run simulated devices that publish temperature/humidity readings and
    /// print the commands they receive.
    Simulate(Box<SimulateArgs>),
    /// Ask a running service's gRPC health service; print its status and
    /// exit 0 when SERVING, 1 otherwise (a container healthcheck that needs
    /// no other tool in the image).
    Health(HealthArgs),
}

/// Options of `devicehub health`.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// The service's gRPC address (0.0.0.0 means this host).
    #[arg(long, env = "DEVICEHUB_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// The service to ask about; empty: the server overall.
    #[arg(long, default_value = "")]
    pub service: String,
    /// With TLS on the gRPC port: PEM file of the CA that signs its
    /// certificate.
    #[arg(long, env = "DEVICEHUB_HEALTH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name the certificate must carry.
    #[arg(
        long,
        env = "DEVICEHUB_HEALTH_TLS_SERVER_NAME",
        default_value = "localhost"
    )]
    pub tls_server_name: String,
    /// How long to wait for the answer.
    #[arg(long, default_value_t = 3)]
    pub timeout_secs: u64,
}

/// Topic layout, shared by `serve` and `simulate`.
#[derive(Debug, Clone, Args)]
pub struct TopicArgs {
    /// Topic devices publish readings to. `{device_id}` marks the level that
    /// holds the device id; other levels may be `+` or `#`.
    #[arg(
        long,
        env = "DEVICEHUB_READINGS_TOPIC",
        default_value = "devices/{device_id}/readings"
    )]
    pub readings_topic: String,

    /// Topic commands are published to, with a `{device_id}` level.
    #[arg(
        long,
        env = "DEVICEHUB_COMMANDS_TOPIC",
        default_value = "devices/{device_id}/commands"
    )]
    pub commands_topic: String,

    /// Topic devices publish command replies to, with a `{device_id}` level.
    /// Replies are also buffered like readings.
    #[arg(
        long,
        env = "DEVICEHUB_REPLIES_TOPIC",
        default_value = "devices/{device_id}/replies"
    )]
    pub replies_topic: String,

    /// Topic devices publish their connection status to, with a
    /// `{device_id}` level: `online` (retained) when they connect, `offline`
    /// as their MQTT last will; `{"status": "online"}` is accepted too.
    /// Status messages are also buffered like readings.
    #[arg(
        long,
        env = "DEVICEHUB_STATUS_TOPIC",
        default_value = "devices/{device_id}/status"
    )]
    pub status_topic: String,

    /// Device id for topic templates without `{device_id}`: a single device
    /// on fixed topics, e.g. `--readings-topic poc/device/sensor
    /// --commands-topic poc/device/control --fixed-device-id device`.
    #[arg(long, env = "DEVICEHUB_FIXED_DEVICE_ID")]
    pub fixed_device_id: Option<String>,
}

impl TopicArgs {
    pub fn readings(&self) -> Result<TopicTemplate, ConfigError> {
        TopicTemplate::parse(&self.readings_topic, self.fixed_device_id.as_deref())
            .map_err(|e| ConfigError::Topic("--readings-topic", e))
    }

    /// The commands template; it must be a publishable topic.
    pub fn commands(&self) -> Result<TopicTemplate, ConfigError> {
        publishable(
            "--commands-topic",
            &self.commands_topic,
            self.fixed_device_id.as_deref(),
        )
    }

    /// The status template; devices publish to it, so no wildcards.
    pub fn status(&self) -> Result<TopicTemplate, ConfigError> {
        publishable(
            "--status-topic",
            &self.status_topic,
            self.fixed_device_id.as_deref(),
        )
    }

    /// The replies template; devices publish to it, so no wildcards.
    pub fn replies(&self) -> Result<TopicTemplate, ConfigError> {
        publishable(
            "--replies-topic",
            &self.replies_topic,
            self.fixed_device_id.as_deref(),
        )
    }
}

fn publishable(
    flag: &'static str,
    template: &str,
    fixed_device_id: Option<&str>,
) -> Result<TopicTemplate, ConfigError> {
    let template =
        TopicTemplate::parse(template, fixed_device_id).map_err(|e| ConfigError::Topic(flag, e))?;
    if template.has_wildcards() {
        return Err(ConfigError::Wildcards(flag, template.to_string()));
    }
    Ok(template)
}

/// The largest `--max-reading-bytes`: 4 MiB less room for the topic (up to
/// 64 KiB) and the rest of the message.
const MAX_READING_BYTES_LIMIT: u64 = (4 << 20) - (128 << 10);

/// The environment variable the broker password may come from. Not a flag:
/// a flag's value shows in `ps` and shell history.
pub const MQTT_PASSWORD_ENV: &str = "DEVICEHUB_MQTT_PASSWORD";

/// How devicehub proves itself to the broker and checks the broker: TLS
/// files and a user name; the password comes from [`MQTT_PASSWORD_ENV`] or
/// a file, never from a flag's value.
#[derive(Debug, Clone, Args)]
pub struct MqttLoginArgs {
    /// PEM file of the CA certificates that sign the broker's certificate
    /// (mqtts:// only). Unset: the system's root certificates.
    #[arg(long, env = "DEVICEHUB_MQTT_CA")]
    pub mqtt_ca: Option<PathBuf>,

    /// PEM certificate chain devicehub presents to the broker (mqtts://
    /// only), for brokers that authenticate clients by certificate. Needs
    /// --mqtt-client-key.
    #[arg(long, env = "DEVICEHUB_MQTT_CLIENT_CERT")]
    pub mqtt_client_cert: Option<PathBuf>,

    /// PEM private key of --mqtt-client-cert.
    #[arg(long, env = "DEVICEHUB_MQTT_CLIENT_KEY")]
    pub mqtt_client_key: Option<PathBuf>,

    /// User name to log in to the broker with. The password comes from
    /// the DEVICEHUB_MQTT_PASSWORD environment variable or
    /// --mqtt-password-file.
    #[arg(long, env = "DEVICEHUB_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,

    /// File holding the broker password (one trailing newline is ignored).
    /// Takes precedence over DEVICEHUB_MQTT_PASSWORD.
    #[arg(long, env = "DEVICEHUB_MQTT_PASSWORD_FILE")]
    pub mqtt_password_file: Option<PathBuf>,
}

impl MqttLoginArgs {
    /// The TLS client configuration for an `mqtts://` broker, from the files
    /// given; `None` for plain `mqtt://`, where TLS flags are refused.
    pub(crate) fn tls(
        &self,
        broker: &BrokerUrl,
    ) -> Result<Option<Arc<rustls::ClientConfig>>, ConfigError> {
        if !broker.tls {
            let given = [
                ("--mqtt-ca", &self.mqtt_ca),
                ("--mqtt-client-cert", &self.mqtt_client_cert),
                ("--mqtt-client-key", &self.mqtt_client_key),
            ];
            return match given.iter().find(|(_, path)| path.is_some()) {
                Some((flag, _)) => Err(ConfigError::TlsFlagWithoutTls(flag)),
                None => Ok(None),
            };
        }
        let ca = self
            .mqtt_ca
            .as_deref()
            .map(|path| read("--mqtt-ca", path))
            .transpose()?;
        let identity = match (&self.mqtt_client_cert, &self.mqtt_client_key) {
            (Some(cert), Some(key)) => Some((
                read("--mqtt-client-cert", cert)?,
                read("--mqtt-client-key", key)?,
            )),
            (None, None) => None,
            _ => return Err(ConfigError::HalfClientIdentity),
        };
        let identity = identity.as_ref().map(|(cert, key)| ClientIdentity {
            cert_chain_pem: cert,
            key_pem: key,
        });
        Ok(Some(mqtt::client_config(ca.as_deref(), identity)?))
    }

    /// The broker login, if a user name is given.
    pub(crate) fn credentials(&self) -> Result<Option<Credentials>, ConfigError> {
        let password = match &self.mqtt_password_file {
            Some(path) => {
                let text = read("--mqtt-password-file", path)?;
                let text = String::from_utf8(text).map_err(|_| ConfigError::ReadFile {
                    flag: "--mqtt-password-file",
                    path: path.clone(),
                    source: std::io::Error::other("not UTF-8 text"),
                })?;
                let line = text.strip_suffix('\n').unwrap_or(&text);
                Some(Secret::new(line.strip_suffix('\r').unwrap_or(line)))
            }
            None => std::env::var(MQTT_PASSWORD_ENV).ok().map(Secret::new),
        };
        match (&self.mqtt_username, password) {
            (Some(username), password) => Ok(Some(Credentials {
                username: username.clone(),
                password: password.unwrap_or_else(|| Secret::new("")),
            })),
            (None, Some(_)) => Err(ConfigError::PasswordWithoutUsername),
            (None, None) => Ok(None),
        }
    }
}

/// The contents of the file `path` that `flag` names.
fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::ReadFile {
        flag,
        path: path.to_owned(),
        source,
    })
}

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

    /// MQTT keep-alive interval in seconds (at least 1; 0 disables it).
    #[arg(long, env = "DEVICEHUB_MQTT_KEEP_ALIVE_SECS", default_value_t = 30)]
    pub mqtt_keep_alive_secs: u64,

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

    /// Most WatchReadings streams open at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DEVICEHUB_MAX_WATCHERS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watchers: u32,

    /// Most WatchReadings streams one client keeps open at once: per token
    /// subject with auth, else per connection. More get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DEVICEHUB_MAX_WATCHERS_PER_CLIENT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watchers_per_client: u32,

    /// Most commands one client has in progress at once (waiting for the
    /// broker's acknowledgement or the device's reply), over SendCommand and
    /// StreamCommands together: per token subject with auth, else per
    /// connection. More get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DEVICEHUB_MAX_COMMANDS_PER_CLIENT", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_commands_per_client: u32,

    /// Web origins (scheme://host[:port], comma-separated) whose pages may
    /// call the service with gRPC-Web from a browser (CORS). Unset: no
    /// cross-origin calls. The gRPC port always speaks gRPC-Web too.
    #[arg(long, env = "DEVICEHUB_CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,

    /// Address to serve Prometheus metrics on (`GET /metrics`). Unset: no
    /// metrics listener. Port 0 picks a free port (logged).
    #[arg(long, env = "DEVICEHUB_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Seconds shutdown (SIGTERM) waits for calls and streams to end before
    /// it closes the remaining connections and exits.
    #[arg(long, env = "DEVICEHUB_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,

    #[command(flatten)]
    pub grpc_security: GrpcSecurityArgs,
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
    /// rotate. With it, DeviceHub calls need `authorization: Bearer <JWT>`.
    #[arg(long, env = "DEVICEHUB_AUTH_JWT_KEY", value_delimiter = ',')]
    pub auth_jwt_key: Vec<PathBuf>,

    /// Required `iss` claim of callers' tokens.
    #[arg(long, env = "DEVICEHUB_AUTH_JWT_ISSUER", requires = "auth_jwt_key")]
    pub auth_jwt_issuer: Option<String>,

    /// Required `aud` claim of callers' tokens.
    #[arg(long, env = "DEVICEHUB_AUTH_JWT_AUDIENCE", requires = "auth_jwt_key")]
    pub auth_jwt_audience: Option<String>,

    /// Allow listening beyond loopback without TLS and auth on the gRPC
    /// port, and the embedded broker (no TLS, no passwords) beyond loopback
    /// at all. Without it such a configuration refuses to start.
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
            issuer: self.auth_jwt_issuer.clone(),
            audience: self.auth_jwt_audience.clone(),
        }))
    }
}

impl ServeArgs {
    /// Refuses to listen beyond loopback without protection, unless
    /// --allow-insecure: the gRPC port without both TLS and auth, and the
    /// embedded broker (which has neither) at all.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        let security = &self.grpc_security;
        if security.allow_insecure {
            return Ok(());
        }
        let protected = security.tls_cert.is_some() && !security.auth_jwt_key.is_empty();
        if !self.grpc_addr.ip().is_loopback() && !protected {
            return Err(ConfigError::Insecure(format!(
                "--grpc-addr {} is beyond loopback without TLS and auth: set --tls-cert, --tls-key and --auth-jwt-key, or --allow-insecure to accept the risk",
                self.grpc_addr
            )));
        }
        #[cfg(feature = "embedded-broker")]
        if self.mqtt_url.is_none() && !self.embedded_mqtt_addr.ip().is_loopback() {
            return Err(ConfigError::Insecure(format!(
                "--embedded-mqtt-addr {} is beyond loopback, and the embedded broker has no TLS or passwords: use a real broker (--mqtt-url), or --allow-insecure to accept the risk",
                self.embedded_mqtt_addr
            )));
        }
        Ok(())
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
        Ok(Config {
            mqtt: MqttConfig {
                host: broker.host.clone(),
                port: broker.port,
                client_id,
                keep_alive: Duration::from_secs(self.mqtt_keep_alive_secs),
                subscribe_qos,
                max_packet_bytes: self.mqtt_max_packet_bytes as usize,
                max_reading_bytes: self.max_reading_bytes as usize,
                persistent_session: self.mqtt_persistent_session,
                readings_subscription: readings_topic.subscription_filter().to_owned(),
                readings_topic,
                commands_topic: self.topics.commands()?,
                replies_topic: self.topics.replies()?,
                status_topic: self.topics.status()?,
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
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            metrics_addr: self.metrics_addr,
            cors_allowed_origins: cors_origins(&self.cors_allowed_origins)?,
            grpc_tls: self.grpc_security.tls()?,
            auth: self.grpc_security.auth()?,
        })
    }
}

#[cfg(feature = "simulator")]
/// Options of `devicehub simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// MQTT broker the devices connect to, as mqtt://host[:port] (or
    /// mqtts:// for TLS).
    #[arg(
        long,
        env = "DEVICEHUB_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub mqtt_url: BrokerUrl,

    /// TLS and login of every device; in --mqtt-username, `{device_id}`
    /// stands for each device's id (brokers that give every device an
    /// account, like the shipped Mosquitto configuration, want
    /// `--mqtt-username '{device_id}'`).
    #[command(flatten)]
    pub login: MqttLoginArgs,

    /// Number of simulated devices.
    #[arg(long, env = "DEVICEHUB_SIM_DEVICES", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub devices: u32,

    /// Milliseconds between two readings of one device.
    #[arg(long, env = "DEVICEHUB_SIM_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub interval_ms: u64,

    /// Device ids are this prefix and a number: sim-1, sim-2...
    #[arg(long, env = "DEVICEHUB_SIM_DEVICE_PREFIX", default_value = "sim-")]
    pub device_prefix: String,

    /// Fraction of the devices (the first ones) that never reply to
    /// commands, to demonstrate reply timeouts.
    #[arg(long, env = "DEVICEHUB_SIM_SILENT_FRACTION", default_value_t = 0.0,
          value_parser = fraction)]
    pub silent_fraction: f64,

    /// Fraction of the devices (after the silent ones) that reply late, after
    /// --slow-reply-ms.
    #[arg(long, env = "DEVICEHUB_SIM_SLOW_FRACTION", default_value_t = 0.0,
          value_parser = fraction)]
    pub slow_fraction: f64,

    /// How late slow devices reply, in milliseconds.
    #[arg(long, env = "DEVICEHUB_SIM_SLOW_REPLY_MS", default_value_t = 3000)]
    pub slow_reply_ms: u64,

    #[command(flatten)]
    pub topics: TopicArgs,
}

#[cfg(feature = "simulator")]
fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{text:?} is not a fraction from 0 to 1")),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_fixed_topics_parse() {
        let cli = Cli::try_parse_from(["devicehub"]).unwrap();
        assert!(cli.command.is_none());
        let broker = BrokerUrl::from_addr("127.0.0.1:1883".parse().unwrap());
        let config = cli.serve.config(&broker).unwrap();
        assert_eq!(
            config.mqtt.readings_topic.subscription_filter(),
            "devices/+/readings"
        );
        assert!(config.mqtt.client_id.starts_with("devicehub-"));

        let poc = Cli::try_parse_from([
            "devicehub",
            "serve",
            "--readings-topic=poc/device/sensor",
            "--commands-topic=poc/device/control",
            "--fixed-device-id=device",
        ])
        .unwrap();
        let Some(Command::Serve(args)) = poc.command else {
            panic!("not serve")
        };
        let config = args.config(&broker).unwrap();
        assert_eq!(
            config.mqtt.commands_topic.topic_for("device"),
            "poc/device/control"
        );

        let wild = Cli::try_parse_from(["devicehub", "--commands-topic=a/+/{device_id}"]).unwrap();
        assert!(wild.serve.config(&broker).is_err());
        let persistent = Cli::try_parse_from(["devicehub", "--mqtt-persistent-session"]).unwrap();
        assert!(persistent.serve.config(&broker).is_err());
        let qos2 = [
            "devicehub",
            "--mqtt-persistent-session",
            "--mqtt-client-id=x",
            "--mqtt-subscribe-qos=2",
        ];
        assert!(Cli::try_parse_from(qos2)
            .unwrap()
            .serve
            .config(&broker)
            .is_err());
    }
}
