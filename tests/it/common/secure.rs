//! The secured broker of `deploy/mosquitto`: Mosquitto with exactly the
//! shipped config and ACL (only the listener moved to a free loopback
//! port), throwaway certificates made here with rcgen, and a password file
//! made with `mosquitto_passwd`.

use std::{path::PathBuf, sync::Arc};

use rumqttc::{MqttOptions, TlsConfiguration, Transport};

pub use super::pki::{Issued, Pki};
use super::{closed_port, tempdir::TempDir, which, Mosquitto};

/// The shipped `deploy/mosquitto/mosquitto.conf`, with its listener on
/// `port` (127.0.0.1) instead of 8883; nothing else changes.
pub fn shipped_config(port: u16) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/mosquitto/mosquitto.conf"
    );
    let conf = std::fs::read_to_string(path).unwrap();
    assert!(
        conf.contains("\nlistener 8883\n"),
        "the shipped config changed"
    );
    conf.replace(
        "\nlistener 8883\n",
        &format!("\nlistener {port} 127.0.0.1\n"),
    )
}

/// Mosquitto with the shipped config and ACL, its certificates signed by
/// `pki`, and one account per `(user, password)`.
pub struct SecureMosquitto {
    pub broker: Mosquitto,
    /// The CA file clients trust.
    pub ca_file: PathBuf,
}

impl SecureMosquitto {
    pub fn start(pki: &Pki, accounts: &[(&str, &str)]) -> Self {
        Self::start_conf(pki, accounts, |conf| conf)
    }

    /// Like [`SecureMosquitto::start`], with the config changed by `edit`
    /// first (for a listener that asks for client certificates).
    pub fn start_conf(
        pki: &Pki,
        accounts: &[(&str, &str)],
        edit: impl FnOnce(String) -> String,
    ) -> Self {
        let dir = TempDir::new("mosquitto-secure");
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        let server = pki.server();
        std::fs::write(certs.join("ca.crt"), &pki.ca_cert).unwrap();
        std::fs::write(certs.join("server.crt"), server.cert).unwrap();
        std::fs::write(certs.join("server.key"), server.key).unwrap();
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/mosquitto/acl"),
            dir.path().join("acl"),
        )
        .unwrap();
        let passwd = dir.path().join("passwd");
        let tool = which("mosquitto_passwd").expect("mosquitto_passwd (package mosquitto)");
        for (i, (user, password)) in accounts.iter().enumerate() {
            let mut command = std::process::Command::new(&tool);
            if i == 0 {
                command.arg("-c"); // create the file
            }
            let status = command
                .arg("-b")
                .arg(&passwd)
                .args([user, password])
                .status()
                .unwrap();
            assert!(status.success(), "mosquitto_passwd for {user}");
        }
        // Mosquitto drops to its own user: it must be able to read these.
        use std::os::unix::fs::PermissionsExt;
        for file in [
            passwd.clone(),
            certs.join("server.key"),
            dir.path().join("acl"),
        ] {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let port = closed_port().port;
        let broker = Mosquitto::start_config(dir, &edit(shipped_config(port)), port, true);
        let ca_file = broker.dir().join("certs/ca.crt");
        Self { broker, ca_file }
    }

    /// MQTT options for a device (or any client) that logs in as `user`
    /// over TLS, trusting the test CA.
    pub fn client_options(&self, user: &str, password: &str) -> MqttOptions {
        let url = &self.broker.url;
        let mut options = MqttOptions::new(user, &url.host, url.port);
        options
            .set_credentials(user, password)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                client_tls(&std::fs::read(&self.ca_file).unwrap()),
            )));
        options
    }
}

/// A rustls client configuration trusting `ca_pem`.
pub fn client_tls(ca_pem: &[u8]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A gRPC channel over TLS to the service at `addr`, trusting `ca` (PEM)
/// for the name `localhost`, presenting `identity` when given.
pub async fn grpc_tls_channel(
    addr: std::net::SocketAddr,
    ca: &str,
    identity: Option<&Issued>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(Identity::from_pem(&identity.cert, &identity.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// Waits until the service behind `channel` reports SERVING (health needs
/// no token).
pub async fn wait_serving(channel: &tonic::transport::Channel) {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    super::eventually("health SERVING over TLS", || {
        let mut health = HealthClient::new(channel.clone());
        async move {
            let request = HealthCheckRequest {
                service: devicehub::SERVICE_NAME.into(),
            };
            let status = health.check(request).await.ok()?.into_inner().status();
            (status == ServingStatus::Serving).then_some(())
        }
    })
    .await;
}
