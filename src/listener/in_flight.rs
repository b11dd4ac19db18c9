//! Response bytes in flight: what responses have handed to hyper and the
//! sockets have not taken yet, summed over every connection, under one
//! budget (`--max-response-bytes-in-flight`).
//!
//! A client that stops reading leaves its responses in memory: h2 buffers
//! what its flow control does not let out, and hyper holds the frame it has
//! in hand. Per connection that is bounded by `--max-streams-per-connection`
//! times a response, but over thousands of connections it is not. So each
//! data frame a response produces is charged to its connection
//! ([`BoundResponses`]) and given back as the connection's socket accepts
//! bytes ([`Owed::written`], from `Conn`'s writes) or when the connection
//! closes. A frame that does not fit the budget is not sent: the call ends
//! with RESOURCE_EXHAUSTED in its trailers, counted. Socket writes include
//! framing (HEADERS, frame headers), so the charge is given back a little
//! early, never late: a connection never owes more than it was charged.
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

/// The one budget, shared by every connection of a listener.
#[derive(Debug, Clone)]
pub struct ResponseBudget {
    /// One permit per byte; permits taken by a charge are forgotten, and
    /// added back as sockets take the bytes.
    permits: Arc<Semaphore>,
    max: usize,
    /// Calls ended with RESOURCE_EXHAUSTED because the budget was spent.
    refused: Arc<AtomicU64>,
}

impl ResponseBudget {
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
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
        match self.budget.permits.try_acquire_many(n32) {
            Ok(permits) => {
                permits.forget();
                self.bytes.fetch_add(n, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// The socket took `n` bytes: gives back as much of the charge.
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

    #[test]
    fn charges_come_back_as_sockets_take_bytes_or_connections_close() {
        let budget = ResponseBudget::new(100);
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
}
