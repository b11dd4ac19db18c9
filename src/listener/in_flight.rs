//! Response bytes in flight: what responses have handed to hyper and the
//! sockets have not taken yet, summed over every connection, under one
//! budget (`--max-response-bytes-in-flight`).
//!
//! A client that stops reading leaves its responses in memory: h2 buffers
//! what its flow control does not let out, and hyper holds the frame it has
//! in hand. Per connection that is bounded by `--max-streams-per-connection`
//! times a response, but over thousands of connections it is not. So each
//! data frame a response produces is charged to its connection
//! ([`BoundResponses`]) and given back as the connection writes DATA
//! frames ([`DataMeter`] reads the HTTP/2 frame headers of what `Conn`
//! writes: other frames, such as PING acknowledgements or HEADERS, give
//! nothing back), or when the connection closes. One connection may owe at
//! most a sixteenth of the budget (and at least two of the largest
//! responses), so that one client cannot spend it all. A frame that does
//! not fit is not sent: the call ends with RESOURCE_EXHAUSTED in its
//! trailers, counted.
//!
//! Left over: a stream its client resets drops what h2 buffered of it,
//! which that connection then owes until it closes; bounded by its share.
//! Over HTTP/1.1 (gRPC-Web) every byte written counts, chunk framing
//! included: given back a little early.
//!
//! This module never looks into messages: it sees bytes and connections.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Semaphore;

use super::ConnInfo;

/// The largest share of the budget one connection may owe: a sixteenth.
const CONNECTION_SHARE: usize = 16;
/// And at least this much: two of the largest responses (4 MiB each).
const MIN_CONNECTION_BYTES: usize = 8 << 20;

/// The one budget, shared by every connection of a listener.
#[derive(Debug, Clone)]
pub struct ResponseBudget {
    /// One permit per byte; permits taken by a charge are forgotten, and
    /// added back as sockets take the bytes.
    permits: Arc<Semaphore>,
    max: usize,
    /// The most one connection may owe.
    per_connection: usize,
    /// Calls ended with RESOURCE_EXHAUSTED because the budget was spent.
    refused: Arc<AtomicU64>,
}

impl ResponseBudget {
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            per_connection: (max / CONNECTION_SHARE).max(MIN_CONNECTION_BYTES),
            refused: Arc::default(),
        }
    }

    /// Bytes charged and not yet taken by a socket, over all connections.
    pub fn in_flight(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }

    /// Calls ended with RESOURCE_EXHAUSTED because the budget was spent.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A connection's account.
    pub(super) fn owed(&self) -> Arc<Owed> {
        Arc::new(Owed {
            budget: self.clone(),
            bytes: AtomicUsize::new(0),
        })
    }
}

/// What one connection owes the budget: bytes its responses produced that
/// its socket has not taken yet. Given back whole when the connection ends.
#[derive(Debug)]
pub(super) struct Owed {
    budget: ResponseBudget,
    bytes: AtomicUsize,
}

impl Owed {
    /// Charges `n` bytes about to be handed to hyper; `false` if the budget
    /// has not that many left.
    fn charge(&self, n: usize) -> bool {
        let Ok(n32) = u32::try_from(n) else {
            return false;
        };
        // Only this connection's own frames add to its debt, one at a
        // time (hyper polls a body from its connection's task): a check
        // then an add is exact enough.
        if self.bytes.load(Ordering::Relaxed) + n > self.budget.per_connection {
            return false;
        }
        match self.budget.permits.try_acquire_many(n32) {
            Ok(permits) => {
                permits.forget();
                self.bytes.fetch_add(n, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// The connection wrote `n` bytes of DATA: gives back as much of the
    /// charge.
    pub(super) fn written(&self, n: usize) {
        let mut released = 0;
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |owed| {
                released = owed.min(n);
                Some(owed - released)
            });
        if released > 0 {
            self.budget.permits.add_permits(released);
        }
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        self.budget.permits.add_permits(*self.bytes.get_mut());
    }
}

/// Counts the DATA payload bytes in what a connection writes: the bytes
/// that pay off its charge. HTTP/2 frames are read by their 9-byte headers
/// (length, type), however the writes split them; a connection whose
/// first byte written is `H` speaks HTTP/1.1, where every byte counts.
#[derive(Debug, Default)]
pub(super) struct DataMeter {
    http1: Option<bool>,
    header: [u8; 9],
    header_len: usize,
    /// Bytes left of the current frame's payload.
    remaining: usize,
    /// Whether the current frame is DATA.
    data: bool,
}

impl DataMeter {
    /// How many of `written`, the next bytes the connection wrote, are
    /// DATA payload.
    pub(super) fn data_bytes(&mut self, mut written: &[u8]) -> usize {
        let Some(&first) = written.first() else {
            return 0;
        };
        if *self.http1.get_or_insert(first == b'H') {
            return written.len();
        }
        let mut data = 0;
        while !written.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(written.len());
                if self.data {
                    data += take;
                }
                self.remaining -= take;
                written = &written[take..];
                continue;
            }
            let take = (9 - self.header_len).min(written.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&written[..take]);
            self.header_len += take;
            written = &written[take..];
            if self.header_len == 9 {
                let [a, b, c, kind, ..] = self.header;
                self.remaining = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                self.data = kind == 0;
                self.header_len = 0;
            }
        }
        data
    }
}

/// The layer that charges each response's data frames to its connection
/// (see the module). Innermost, around the services: the per-call layer
/// then counts a refused call as RESOURCE_EXHAUSTED, and gRPC-Web
/// translates it for browsers.
#[derive(Debug, Clone, Copy, Default)]
pub struct BoundResponses;

impl<S> tower_layer::Layer<S> for BoundResponses {
    type Service = BoundResponsesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BoundResponsesService(inner)
    }
}

/// See [`BoundResponses`].
#[derive(Debug, Clone)]
pub struct BoundResponsesService<S>(S);

impl<S, B> tower_service::Service<Request<B>> for BoundResponsesService<S>
where
    S: tower_service::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let owed = request
            .extensions()
            .get::<ConnInfo>()
            .map(|info| info.owed.clone());
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match owed {
                Some(owed) => response.map(|body| {
                    tonic::body::Body::new(Bounded {
                        inner: body,
                        owed,
                        refused: false,
                    })
                }),
                // Not from our listener (a test's in-memory transport).
                None => response,
            })
        })
    }
}

/// A response body whose data frames are charged to its connection.
struct Bounded {
    inner: tonic::body::Body,
    owed: Arc<Owed>,
    /// The budget was spent: the trailers that say so have gone out.
    refused: bool,
}

impl Body for Bounded {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.refused {
            return Poll::Ready(None);
        }
        let frame = match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let Some(data) = frame.data_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        if self.owed.charge(data.remaining()) {
            return Poll::Ready(Some(Ok(frame)));
        }
        self.refused = true;
        self.owed.budget.refused.fetch_add(1, Ordering::Relaxed);
        let status = tonic::Status::resource_exhausted(
            "the service holds too many response bytes for clients that are not reading (--max-response-bytes-in-flight); retry later",
        );
        let mut trailers = http::HeaderMap::new();
        // Fails only for a message that is no header value: ours is one.
        let _ = status.add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/2 frame header: `len` bytes of payload of type `kind`.
    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len().to_be_bytes();
        let mut frame = vec![len[5], len[6], len[7], kind, 0, 0, 0, 0, 1];
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn only_data_payloads_count_however_writes_split_them() {
        let mut written = frame(4, &[0; 6]); // SETTINGS
        written.extend(frame(0, &[7; 100])); // DATA
        written.extend(frame(6, &[0; 8])); // PING ack
        written.extend(frame(0, &[7; 20])); // DATA
        for split in [1, 2, 9, 10, 50, written.len()] {
            let mut meter = DataMeter::default();
            let counted: usize = written.chunks(split).map(|c| meter.data_bytes(c)).sum();
            assert_eq!(counted, 120, "in writes of {split}");
        }
        let mut http1 = DataMeter::default();
        assert_eq!(http1.data_bytes(b"HTTP/1.1 200 OK\r\n"), 17);
        assert_eq!(http1.data_bytes(&[0; 5]), 5);
    }

    #[test]
    fn charges_come_back_as_sockets_take_bytes_or_connections_close() {
        let budget = ResponseBudget {
            per_connection: 100,
            ..ResponseBudget::new(100)
        };
        let a = budget.owed();
        let b = budget.owed();
        assert!(a.charge(60));
        assert!(!b.charge(50), "over the budget");
        assert!(b.charge(40));
        assert_eq!(budget.in_flight(), 100);
        a.written(25);
        assert_eq!(budget.in_flight(), 75);
        // Framing makes writes larger than the charge: never owed below 0.
        a.written(1000);
        assert_eq!(budget.in_flight(), 40);
        drop(b);
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn one_connection_owes_at_most_its_share() {
        let budget = ResponseBudget::new(256 << 20);
        let greedy = budget.owed();
        assert!(greedy.charge(8 << 20));
        assert!(greedy.charge(8 << 20));
        assert!(!greedy.charge(1), "a sixteenth of 256 MiB is 16 MiB");
        assert!(budget.owed().charge(4 << 20), "others are served");
    }
}
