//! The gRPC listener: accepted connections with TCP_NODELAY and, with
//! `--tls-cert`, TLS handshakes done off the accept loop with certificates
//! re-read when their files change (rotation by cert-manager or certbot
//! without a restart).
//!
//! Bounds: at most [`MAX_HANDSHAKES`] handshakes at once, each given
//! [`HANDSHAKE_TIMEOUT`]; a client that connects and says nothing costs one
//! slot for that long, never the accept loop.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::{mpsc, Semaphore},
};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, info, warn};

use crate::{config::GrpcTls, sync};

/// TLS handshakes in progress at once.
const MAX_HANDSHAKES: usize = 256;
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are checked for changes.
pub const CERT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// TCP keepalive: idle time before the first probe, and between probes.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Accepted connections waiting for tonic.
const ACCEPTED_QUEUE: usize = 64;

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

/// A connection as tonic sees it: plain TCP or TLS over it.
pub struct Conn {
    io: Pin<Box<dyn Io>>,
    info: TcpConnectInfo,
}

trait Io: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> Io for T {}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
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

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(sync::read(&self.current).clone())
    }

    /// Re-reads the files whenever their modification times change, until
    /// `shutdown`. A change that does not load (a half-written file) keeps
    /// the previous configuration and is logged; the next change retries.
    async fn follow_files(self, shutdown: CancellationToken) {
        let mut seen = self.stamps();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CERT_POLL_INTERVAL) => {}
                _ = shutdown.cancelled() => return,
            }
            let now = self.stamps();
            if now == seen {
                continue;
            }
            seen = now;
            match server_config(&self.files) {
                Ok(config) => {
                    *sync::write(&self.current) = config;
                    info!(cert = %self.files.cert_chain.display(), "TLS certificate reloaded");
                }
                Err(error) => {
                    warn!(%error, "TLS files changed but do not load; keeping the previous certificate")
                }
            }
        }
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        let files = &self.files;
        [
            Some(&files.cert_chain),
            Some(&files.key),
            files.client_ca.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .collect()
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

/// The connections to serve: accepted from `listener`, with TCP_NODELAY,
/// through a TLS handshake when `tls` is given, until `shutdown`.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().follow_files(shutdown.clone()));
    }
    tokio::spawn(accept(listener, tls, tx, shutdown));
    ReceiverStream::new(rx)
}

async fn accept(
    listener: TcpListener,
    tls: Option<ServerTls>,
    tx: mpsc::Sender<io::Result<Conn>>,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: tonic logs and goes on.
                if tx.send(Err(error)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        // Without it small responses wait for the peer's delayed ACK.
        if let Err(error) = stream.set_nodelay(true) {
            warn!(%error, "cannot set TCP_NODELAY on a gRPC connection");
        }
        // A peer that vanished without a FIN (power loss, a dropped NAT
        // entry) is found and its connection closed.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE_IDLE)
            .with_interval(TCP_KEEPALIVE_INTERVAL);
        if let Err(error) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            warn!(%error, "cannot set TCP keepalive on a gRPC connection");
        }
        let info = stream.connect_info();
        let Some(tls) = &tls else {
            let conn = Conn {
                io: Box::pin(stream),
                info,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
            continue;
        };
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (acceptor, tx) = (tls.acceptor(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let _ = tx
                        .send(Ok(Conn {
                            io: Box::pin(stream),
                            info,
                        }))
                        .await;
                }
                Ok(Err(error)) => debug!(peer = ?info.remote_addr, %error, "TLS handshake failed"),
                Err(_) => debug!(peer = ?info.remote_addr, "TLS handshake timed out"),
            }
        });
    }
}
