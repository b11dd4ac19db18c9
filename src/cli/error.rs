//! What is wrong with the flags: every message names the flag (or variable)
//! to fix. The library's own errors are about values; these are the
//! command line's.

use devicehub::{mqtt_tls::TlsError, topic::TopicError};

/// Why the flags do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}: {1}")]
    Topic(&'static str, TopicError),
    #[error("--cors-allowed-origins: {0:?} is not an origin (scheme://host[:port], no path)")]
    CorsOrigin(String),
    #[error("{0}: {1:?} must not contain '+' or '#'")]
    Wildcards(&'static str, String),
    #[cfg(not(feature = "embedded-broker"))]
    #[error("--mqtt-url is required: this build has no embedded broker")]
    NoBroker,
    #[error("--mqtt-client-id must not be empty")]
    EmptyClientId,
    #[error("--mqtt-persistent-session needs a stable --mqtt-client-id")]
    PersistentWithoutId,
    #[error("{flag} {path}: {source}")]
    ReadFile {
        flag: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0} needs an mqtts:// --mqtt-url")]
    TlsFlagWithoutTls(&'static str),
    #[error("--mqtt-client-cert and --mqtt-client-key go together")]
    HalfClientIdentity,
    #[error(
        "a broker password (DEVICEHUB_MQTT_PASSWORD or --mqtt-password-file) needs --mqtt-username"
    )]
    PasswordWithoutUsername,
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("--tls-cert and --tls-key go together; --tls-client-ca needs them")]
    HalfServerTls,
    #[error("{0}")]
    Insecure(String),
    #[error("--mqtt-share-group needs --store-url: the broker hands each reading to one instance of the group, and the shared store is how every instance sees them all")]
    ShareGroupWithoutStore,
    #[error("--mqtt-share-group needs --mqtt-url: the instances of a group share one broker, and an embedded broker is one instance's alone")]
    ShareGroupEmbedded,
    #[error("--mqtt-persistent-session works with --mqtt-subscribe-qos 0 or 1, not 2 (the MQTT client library loses QoS 2 state across reconnects)")]
    PersistentQos2,
}
