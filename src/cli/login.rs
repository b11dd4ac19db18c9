//! How devicehub (and the simulator's devices) log in to the broker: TLS
//! files, a user name, a password never given as a flag's value.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use clap::Args;

use devicehub::{
    config::{BrokerUrl, Credentials, Secret},
    mqtt_tls::{self, ClientIdentity},
    topic::DEVICE_ID_PLACEHOLDER,
};

use super::ConfigError;

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
        Ok(Some(mqtt_tls::client_config(ca.as_deref(), identity)?))
    }

    /// The broker login, if a user name is given.
    pub(crate) fn credentials(&self) -> Result<Option<Credentials>, ConfigError> {
        self.credentials_of(None)
    }

    /// The broker login of one simulated device: `{device_id}` in the user
    /// name and in the password file's path stands for `device_id`, so that
    /// each device logs in with an account (and a password) of its own.
    #[cfg(feature = "simulator")]
    pub(crate) fn device_credentials(
        &self,
        device_id: &str,
    ) -> Result<Option<Credentials>, ConfigError> {
        self.credentials_of(Some(device_id))
    }

    fn credentials_of(&self, device_id: Option<&str>) -> Result<Option<Credentials>, ConfigError> {
        let for_device = |text: &str| match device_id {
            Some(id) => text.replace(DEVICE_ID_PLACEHOLDER, id),
            None => text.to_owned(),
        };
        let password_file = self
            .mqtt_password_file
            .as_ref()
            .map(|path| PathBuf::from(for_device(&path.to_string_lossy())));
        let password = match &password_file {
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
                username: for_device(username),
                password: password.unwrap_or_else(|| Secret::new("")),
            })),
            (None, Some(_)) => Err(ConfigError::PasswordWithoutUsername),
            (None, None) => Ok(None),
        }
    }
}

/// The contents of the file `path` that `flag` names.
pub(super) fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::ReadFile {
        flag,
        path: path.to_owned(),
        source,
    })
}
