//! `devicehub health`: the options of the health probe, and the
//! library's [`Probe`] they describe.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use devicehub::health::{Probe, ProbeTls};

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
    /// How long to wait for the answer: a duration like 3s (the default).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// The old spelling of --timeout, in whole seconds.
    #[arg(long, hide = true)]
    pub timeout_secs: Option<u64>,
}

impl HealthArgs {
    /// How long to wait for the answer.
    pub fn timeout(&self) -> Duration {
        super::serve::duration(self.timeout, self.timeout_secs, Duration::from_secs(3))
    }

    /// The probe these options ask for.
    pub fn probe(&self) -> Probe {
        Probe {
            addr: self.grpc_addr,
            service: self.service.clone(),
            tls: self.tls_ca.as_ref().map(|ca| ProbeTls {
                ca: ca.clone(),
                server_name: self.tls_server_name.clone(),
            }),
            timeout: self.timeout(),
        }
    }
}
