//! `devicehub health`: the options of the health probe.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;

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
