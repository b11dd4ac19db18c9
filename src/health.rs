//! The gRPC health service's statuses: [`SERVICE_NAME`] and the overall
//! status (`""`, what Kubernetes' gRPC probe asks for) follow the MQTT link
//! and, with one, the store,
//! and everything turns NOT_SERVING when shutdown begins. And [`probe`], the
//! client side: `devicehub health`, a container's healthcheck, asking what a
//! [`Probe`] says.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{
    transport::{Certificate, ClientTlsConfig, Endpoint},
    Status,
};
use tonic_health::{
    pb::{health_check_response, health_client::HealthClient, HealthCheckRequest},
    server::HealthReporter,
    ServingStatus,
};
use tracing::info;

use crate::{mqtt::LinkState, SERVICE_NAME};

/// What [`probe`] asks, and of whom.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The service's gRPC address; an unspecified one (0.0.0.0, `::`)
    /// means this host.
    pub addr: SocketAddr,
    /// The service to ask about; empty: the server overall.
    pub service: String,
    /// TLS on the gRPC port. `None`: plaintext.
    pub tls: Option<ProbeTls>,
    /// How long to wait for the answer, connecting included.
    pub timeout: Duration,
}

/// How [`probe`] checks the certificate of a gRPC port with TLS.
#[derive(Debug, Clone)]
pub struct ProbeTls {
    /// PEM file of the CA that signs the certificate.
    pub ca: PathBuf,
    /// The name the certificate must carry.
    pub server_name: String,
}

/// Why `devicehub health` got no status.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{path}: {source}")]
    Ca {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("health check of {addr}: {0}", .status.message())]
    Check { addr: SocketAddr, status: Status },
    #[error("no answer from {0} in time")]
    Timeout(SocketAddr),
}

/// Asks the health service at `probe.addr` for the status of
/// `probe.service`.
pub async fn probe(probe: &Probe) -> Result<health_check_response::ServingStatus, ProbeError> {
    let mut addr = probe.addr;
    // A service bound to every interface answers on loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let timeout = probe.timeout;
    let connect = |source| ProbeError::Connect { addr, source };
    let mut endpoint = match &probe.tls {
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(connect)?,
        Some(tls) => {
            let ca = std::fs::read(&tls.ca).map_err(|source| ProbeError::Ca {
                path: tls.ca.clone(),
                source,
            })?;
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(&tls.server_name);
            Endpoint::from_shared(format!("https://{addr}"))
                .and_then(|e| e.tls_config(tls))
                .map_err(connect)?
        }
    };
    endpoint = endpoint.connect_timeout(timeout).timeout(timeout);
    let call = async {
        let channel = endpoint.connect().await.map_err(connect)?;
        let request = HealthCheckRequest {
            service: probe.service.clone(),
        };
        let response = HealthClient::new(channel)
            .check(request)
            .await
            .map_err(|status| ProbeError::Check { addr, status })?;
        Ok(response.into_inner().status())
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| ProbeError::Timeout(addr))?
}

/// Keeps the health status of [`SERVICE_NAME`] and the overall one in step
/// with the MQTT link: SERVING only while connected and subscribed. (A
/// service that cannot reach its broker serves no readings and no commands:
/// a probe must see that, whichever name it asks for.)
pub(crate) async fn follow_link(
    health: HealthReporter,
    mut link: watch::Receiver<LinkState>,
    mut store: Option<watch::Receiver<bool>>,
    shutdown: CancellationToken,
) {
    loop {
        let link_ready = *link.borrow_and_update() == LinkState::Ready;
        let store_up = store.as_mut().is_none_or(|up| *up.borrow_and_update());
        let status = match link_ready && store_up {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        if shutdown.is_cancelled() {
            return;
        }
        for name in [SERVICE_NAME, ""] {
            health.set_service_status(name, status).await;
        }
        let store_changed = async {
            match &mut store {
                Some(up) => up.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = link.changed() => if changed.is_err() { return },
            changed = store_changed => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Resolves once `shutdown` is cancelled, after reporting NOT_SERVING, so
/// that load balancers stop sending calls while open streams drain.
pub(crate) async fn stopping(health: HealthReporter, shutdown: CancellationToken) {
    shutdown.cancelled().await;
    info!("shutting down");
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
}
