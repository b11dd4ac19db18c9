//! TLS on the gRPC port: the server's configuration from PEM files,
//! re-read when the files change (rotation by cert-manager or certbot
//! without a restart). The handshakes themselves run in `super`.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{config::GrpcTls, sync, watched_files::WatchedFiles};

/// Why the server's TLS files could not be used. Names the file, never its
/// contents.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{0}: no PEM certificate found")]
    NoCertificate(PathBuf),
    #[error("{0}: no PEM private key found")]
    NoKey(PathBuf),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("--tls-client-ca: {0}")]
    ClientCa(String),
}

/// The server's TLS configuration, swapped when the files change.
#[derive(Clone)]
pub struct ServerTls {
    files: Arc<GrpcTls>,
    // A std lock: read once per handshake, written on rotation; never held
    // across an `.await`.
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// Loads the files once; fails if they do not make a configuration.
    pub fn load(files: &GrpcTls) -> Result<Self, ServerTlsError> {
        Ok(Self {
            current: Arc::new(RwLock::new(server_config(files)?)),
            files: Arc::new(files.clone()),
        })
    }

    pub(super) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(sync::read(&self.current).clone())
    }

    /// Re-reads the files whenever their modification times change, until
    /// `shutdown` (the same [`WatchedFiles`] as the JWT keys). A change that
    /// does not load (a half-written file) keeps the previous configuration
    /// and is logged; the next change retries.
    pub(super) async fn follow_files(self, shutdown: CancellationToken) {
        let files = &self.files;
        let paths = [
            Some(&files.cert_chain),
            Some(&files.key),
            files.client_ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        WatchedFiles::new(paths)
            .follow(shutdown, || match server_config(files) {
                Ok(config) => {
                    *sync::write(&self.current) = config;
                    info!(cert = %files.cert_chain.display(), "TLS certificate reloaded");
                }
                Err(error) => {
                    warn!(%error, "TLS files changed but do not load; keeping the previous certificate")
                }
            })
            .await;
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ServerTlsError> {
    std::fs::read(path).map_err(|source| ServerTlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn server_config(files: &GrpcTls) -> Result<Arc<ServerConfig>, ServerTlsError> {
    let chain = CertificateDer::pem_slice_iter(&read(&files.cert_chain)?)
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ServerTlsError::NoCertificate(files.cert_chain.clone()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|_| ServerTlsError::NoKey(files.key.clone()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read(path)?) {
                let cert = cert.map_err(|e| ServerTlsError::ClientCa(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| ServerTlsError::ClientCa(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ServerTlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    // gRPC is HTTP/2; clients that negotiate ALPN (grpcurl, grpc-go) need
    // it. gRPC-Web from browsers may come over HTTP/1.1 too.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
