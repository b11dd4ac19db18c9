//! The gRPC listener: accepted connections with TCP_NODELAY and keepalive
//! and, with `--tls-cert`, TLS handshakes (`tls.rs`) done beside the accept
//! loop, each within `--tls-handshake-timeout`.
//!
//! The accept loop never waits for a peer: connections and handshakes take
//! a slot under caps overall and per remote IP (`limits.rs`) or are closed
//! at once, counted. A connection that opens no stream (no request) within
//! `--connection-idle-timeout` is closed, plaintext or TLS, so sockets that
//! say nothing cannot pile up either. Responses that clients do not read
//! are held under one budget of bytes (`in_flight.rs`).

mod in_flight;
mod limits;
mod tls;

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::Sleep,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

pub use in_flight::{BoundResponses, ResponseBudget};
use in_flight::{DataMeter, Owed};
pub use limits::ListenerStats;
use limits::{Kind, ListenerCounters, Slot, Slots};
pub use tls::{ServerTls, ServerTlsError};

use crate::config::ConnectionLimits;

/// TCP keepalive: idle time before the first probe, and between probes.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Accepted connections waiting for tonic.
const ACCEPTED_QUEUE: usize = 64;

/// What each request knows of its connection (a request extension, as
/// tonic's `TcpConnectInfo` would be): the peer, and whether the
/// connection has carried a request yet.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    tcp: TcpConnectInfo,
    opened: Arc<AtomicBool>,
    /// Response bytes this connection's socket has yet to take.
    owed: Arc<Owed>,
}

impl ConnInfo {
    pub fn remote_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp.remote_addr()
    }

    /// Marks the connection as used: it is no longer idle.
    pub fn opened(&self) {
        self.opened.store(true, Ordering::Relaxed);
    }
}

/// A connection as tonic sees it: plain TCP or TLS over it, with its slot
/// under the caps (given back when hyper drops it) and, until its first
/// request, the deadline for one.
pub struct Conn {
    io: Pin<Box<dyn Io>>,
    info: ConnInfo,
    /// Reads what is written for the DATA bytes that pay off `info.owed`.
    meter: DataMeter,
    idle: Option<Pin<Box<Sleep>>>,
    counters: Arc<ListenerCounters>,
    _slot: Slot,
}

trait Io: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> Io for T {}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl Conn {
    /// Ends the connection once its idle deadline passed with no request.
    /// hyper always has a read pending on a connection, so polling the
    /// deadline here (same waker) is enough to wake it when it fires.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(deadline) = &mut self.idle else {
            return Poll::Pending;
        };
        if self.info.opened.load(Ordering::Relaxed) {
            self.idle = None;
            return Poll::Pending;
        }
        if deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.idle = None;
        self.counters.idle.fetch_add(1, Ordering::Relaxed);
        debug!(peer = ?self.info.remote_addr(), "connection opened no stream in time; closing it");
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "no request within --connection-idle-timeout",
        ))
    }
}

impl Conn {
    /// Gives back the response bytes among the first `n` of `bufs`, just
    /// written (see `in_flight.rs`). Under TLS these are plaintext taken
    /// into rustls's buffer (bounded, about 64 KiB), on their way to the
    /// socket.
    fn took(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let mut data = 0;
        for buf in bufs {
            let take = n.min(buf.len());
            data += self.meter.data_bytes(&buf[..take]);
            n -= take;
            if n == 0 {
                break;
            }
        }
        self.info.owed.written(data);
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(error) = self.poll_idle(cx) {
            return Poll::Ready(Err(error));
        }
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = self.io.as_mut().poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            self.took(&[io::IoSlice::new(buf)], n);
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = self.io.as_mut().poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            self.took(bufs, n);
        }
        written
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

/// The connections to serve: accepted from `listener` under `limits`, with
/// TCP_NODELAY, through a TLS handshake when `tls` is given, until
/// `shutdown`. Returns them with a view of the listener's counts.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> (ReceiverStream<io::Result<Conn>>, ListenerStats) {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().follow_files(shutdown.clone()));
    }
    let budget = ResponseBudget::new(limits.max_response_bytes_in_flight);
    let slots = Slots::new(limits);
    let stats = slots.stats(budget.clone());
    tokio::spawn(accept(listener, tls, slots, budget, tx, shutdown));
    (ReceiverStream::new(rx), stats)
}

async fn accept(
    listener: TcpListener,
    tls: Option<ServerTls>,
    slots: Slots,
    budget: ResponseBudget,
    tx: mpsc::Sender<io::Result<Conn>>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: tonic logs and goes on.
                if tx.send(Err(error)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        // Over a cap: dropped here, which closes it at once (counted).
        let Some(slot) = slots.take(Kind::Connection, peer.ip()) else {
            continue;
        };
        tune(&stream);
        let info = ConnInfo {
            tcp: stream.connect_info(),
            opened: Arc::default(),
            owed: budget.owed(),
        };
        let conn = |io: Pin<Box<dyn Io>>| Conn {
            io,
            info,
            meter: DataMeter::default(),
            idle: Some(Box::pin(tokio::time::sleep(slots.limits().idle_timeout))),
            counters: slots.counters.clone(),
            _slot: slot,
        };
        let Some(tls) = &tls else {
            if tx.send(Ok(conn(Box::pin(stream)))).await.is_err() {
                return;
            }
            continue;
        };
        let Some(handshake) = slots.take(Kind::Handshake, peer.ip()) else {
            continue;
        };
        let (acceptor, tx) = (tls.acceptor(), tx.clone());
        let (timeout, counters) = (slots.limits().handshake_timeout, slots.counters.clone());
        // The connection's idle deadline starts with the handshake: both
        // bound how long a peer that says nothing is kept.
        let conn = conn(Box::pin(tokio::io::empty()));
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(timeout, acceptor.accept(stream)).await;
            drop(handshake);
            match outcome {
                Ok(Ok(stream)) => {
                    let _ = tx
                        .send(Ok(Conn {
                            io: Box::pin(stream),
                            ..conn
                        }))
                        .await;
                }
                Ok(Err(error)) => {
                    counters.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, %error, "TLS handshake failed");
                }
                Err(_) => {
                    counters.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}

/// TCP_NODELAY, without which small responses wait for the peer's delayed
/// ACK, and keepalive, so that a peer that vanished without a FIN (power
/// loss, a dropped NAT entry) is found and its connection closed.
fn tune(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        warn!(%error, "cannot set TCP_NODELAY on a gRPC connection");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL);
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        warn!(%error, "cannot set TCP keepalive on a gRPC connection");
    }
}

/// A layer that marks each request's connection as used (see [`Conn`]'s
/// idle deadline). Outermost, so that every request counts: gRPC, gRPC-Web,
/// health and reflection alike.
#[derive(Debug, Clone, Copy, Default)]
pub struct MarkOpened;

impl<S> tower_layer::Layer<S> for MarkOpened {
    type Service = MarkOpenedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MarkOpenedService(inner)
    }
}

/// See [`MarkOpened`].
#[derive(Debug, Clone)]
pub struct MarkOpenedService<S>(S);

impl<S, B> tower_service::Service<http::Request<B>> for MarkOpenedService<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        if let Some(info) = request.extensions().get::<ConnInfo>() {
            info.opened();
        }
        self.0.call(request)
    }
}
