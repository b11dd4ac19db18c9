//! Every gRPC call, whatever the service: one `rpc` span, one log line when
//! it ends, and the `grpc_server_*` metrics of the grpc-ecosystem convention
//! (go-grpc-prometheus and its successors), so the usual dashboards work.
//!
//! A tower layer in front of tonic's router, not an interceptor: it has to
//! see the end of a call, which for a stream is the end of the response
//! body (its trailers), long after the handler returned. A call ends with
//! the `grpc-status` of the trailers (or of the headers of a trailers-only
//! error response); a body dropped before that is a call the client
//! cancelled, or DEADLINE_EXCEEDED when its `grpc-timeout` had passed.
//!
//! The span carries the method, the peer and, once the token interceptor
//! ran, the caller's subject (`caller`); a W3C `traceparent` in the request
//! makes it a child of the caller's span (see `traces.rs`). The end line is
//! at `info` for the codes that mean the server failed (those gRPC maps to
//! HTTP 5xx: UNKNOWN, INTERNAL, UNIMPLEMENTED, UNAVAILABLE,
//! DEADLINE_EXCEEDED, DATA_LOSS) and at `debug` for every other call.
//!
//! Labels are bounded: methods come from the served services' descriptors,
//! and every other path is counted as `grpc_service="unknown"`. Messages are
//! counted by reading the five-byte gRPC frame headers as the bodies pass,
//! added to the shared counters once per HTTP/2 data frame, not per
//! message; with metrics off nothing is counted.
//!
//! - this file: the layer, each call's span and its end;
//! - [`body`]: the bodies as they pass (messages counted, trailers read);
//! - [`metrics`]: the `grpc_server_*` metrics and their label values.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use prost::Message as _;
use tonic::Code;

use crate::{
    listener::ConnInfo,
    log_limit::{truncated, LogLimit},
};
use tracing::{field::Empty, Span};

use super::traces;

mod body;
mod metrics;

use body::FrameCounter;
pub use body::{CallBody, Counted};
pub use metrics::GrpcMetrics;
use metrics::{code_label, server_failed, Kind, MethodMetrics, CODES};

/// The end lines of calls to unknown methods and of unauthenticated calls.
static UNAUTHENTICATED_LOG: LogLimit = LogLimit::new();

/// A method the server knows (or the one that stands for every other
/// path): its names for the span and the labels.
struct Method {
    service: String,
    name: String,
    /// `package.Service/Method`, as OpenTelemetry names RPC spans.
    span_name: String,
    /// A method of the served services, not [`Methods::unknown`].
    known: bool,
    metrics: Option<MethodMetrics>,
}

impl Method {
    fn new(service: &str, name: &str, kind: Kind, metrics: Option<&GrpcMetrics>) -> Self {
        let metrics = metrics.map(|m| {
            let labels = [kind.label(), service, name];
            MethodMetrics {
                started: m.started.with_label_values(&labels),
                handled: CODES
                    .iter()
                    .map(|&code| {
                        m.handled.with_label_values(&[
                            kind.label(),
                            service,
                            name,
                            code_label(code),
                        ])
                    })
                    .collect(),
                handling: m.handling.with_label_values(&labels),
                sent: m.sent.with_label_values(&labels),
                received: m.received.with_label_values(&labels),
            }
        });
        Self {
            service: service.to_owned(),
            name: name.to_owned(),
            span_name: format!("{service}/{name}"),
            known: true,
            metrics,
        }
    }
}

/// The layer tonic's server is built with.
#[derive(Clone)]
pub struct CallLayer {
    methods: Arc<Methods>,
}

struct Methods {
    /// By request path, `/package.Service/Method`.
    known: HashMap<String, Arc<Method>>,
    /// Every other path.
    unknown: Arc<Method>,
}

impl CallLayer {
    /// Knows the methods of every service in `descriptor_sets` (encoded
    /// `FileDescriptorSet`s); counts into `metrics` when given.
    pub fn new(descriptor_sets: &[&[u8]], metrics: Option<&GrpcMetrics>) -> Self {
        let mut known = HashMap::new();
        for set in descriptor_sets {
            // The sets are compiled in; one that does not decode is a build
            // problem, and its methods are then counted as unknown.
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                tracing::error!("a compiled-in descriptor set does not decode");
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    let service_name = match file.package() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    for method in &service.method {
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => Kind::Unary,
                            (true, false) => Kind::ClientStream,
                            (false, true) => Kind::ServerStream,
                            (true, true) => Kind::BidiStream,
                        };
                        let path = format!("/{service_name}/{}", method.name());
                        known.entry(path).or_insert_with(|| {
                            Arc::new(Method::new(&service_name, method.name(), kind, metrics))
                        });
                    }
                }
            }
        }
        let unknown = Arc::new(Method {
            span_name: "unknown".into(),
            known: false,
            ..Method::new("unknown", "unknown", Kind::Unary, metrics)
        });
        Self {
            methods: Arc::new(Methods { known, unknown }),
        }
    }
}

impl<S> tower_layer::Layer<S> for CallLayer {
    type Service = CallService<S>;

    fn layer(&self, inner: S) -> CallService<S> {
        CallService {
            inner,
            methods: self.methods.clone(),
        }
    }
}

/// The service [`CallLayer`] wraps around tonic's router.
#[derive(Clone)]
pub struct CallService<S> {
    inner: S,
    methods: Arc<Methods>,
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for CallService<S>
where
    S: tower_service::Service<Request<tonic::body::Body>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let method = self
            .methods
            .known
            .get(request.uri().path())
            .unwrap_or(&self.methods.unknown)
            .clone();
        let peer = request
            .extensions()
            .get::<ConnInfo>()
            .and_then(ConnInfo::remote_addr);
        // The path is what the client sent: a known method's span is named
        // after it, any other's has one fixed name and the path, truncated,
        // as a field, so that no peer picks span names or fills the log.
        let path = match method.known {
            true => None,
            false => Some(truncated(request.uri().path())),
        };
        let span = tracing::info_span!(
            "rpc",
            otel.name = %method.span_name,
            path = path.map(tracing::field::display),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %method.service,
            rpc.method = %method.name,
            peer = peer.map(tracing::field::display),
            caller = Empty,
            rpc.grpc.status_code = Empty,
        );
        traces::continue_trace(&span, request.headers());
        let call = Call {
            deadline: grpc_timeout(request.headers()),
            start: Instant::now(),
            span,
            method,
        };
        let request = match &call.method.metrics {
            Some(metrics) => {
                metrics.started.inc();
                let counter = metrics.received.clone();
                request.map(|body| {
                    tonic::body::Body::new(Counted {
                        inner: body,
                        frames: FrameCounter::default(),
                        counter: Some(counter),
                        call: None,
                    })
                })
            }
            None => request.map(tonic::body::Body::new),
        };
        // Entered while the service is called: the token interceptor runs
        // here, and records the caller into the current span.
        let inner = call.span.in_scope(|| self.inner.call(request));
        CallFuture {
            inner,
            call: Some(call),
        }
    }
}

/// One call in progress: ends exactly once, when its status is known or
/// when what carries it is dropped.
struct Call {
    method: Arc<Method>,
    span: Span,
    start: Instant,
    /// The client's `grpc-timeout`, if it sent one.
    deadline: Option<Duration>,
}

impl Call {
    fn end(self, code: Code) {
        let elapsed = self.start.elapsed();
        if let Some(metrics) = &self.method.metrics {
            metrics.handled[code as usize].inc();
            metrics.handling.observe(elapsed.as_secs_f64());
        }
        self.span.record("rpc.grpc.status_code", code as i32);
        let failed = server_failed(code);
        if failed {
            self.span.record("otel.status_code", "ERROR");
        }
        let _entered = self.span.enter();
        // Whole microseconds: 104.142, not 104.14287399999999.
        let duration_ms = elapsed.as_micros() as f64 / 1e3;
        if !self.method.known || code == Code::Unauthenticated {
            // Anyone who reaches the port can cause these, as fast as they
            // like: rate-limited, so they cannot fill the disk.
            if let Some(left_out) = UNAUTHENTICATED_LOG.allow() {
                tracing::info!(
                    code = code_label(code),
                    duration_ms,
                    similar_lines_left_out = left_out,
                    "call failed"
                );
            }
        } else if failed {
            tracing::info!(code = code_label(code), duration_ms, "call failed");
        } else {
            tracing::debug!(code = code_label(code), duration_ms, "call ended");
        }
    }

    /// Ends a call whose status never came: the client went away, or its
    /// deadline passed and tonic dropped the call.
    fn abandon(self) {
        let code = match self.deadline {
            Some(deadline) if self.start.elapsed() >= deadline => Code::DeadlineExceeded,
            _ => Code::Cancelled,
        };
        self.end(code);
    }
}

/// `grpc-timeout`: an integer of at most 8 digits and a unit.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The status in `headers` (trailers, or a trailers-only response's headers).
fn status_in(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
            .map_or(Code::Unknown, Code::from_i32),
    )
}

pin_project_lite::pin_project! {
    /// The response future: the call ends here if the handler answered
    /// with a trailers-only status, or if the future is dropped.
    pub struct CallFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }

    impl<F> PinnedDrop for CallFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.abandon();
            }
        }
    }
}

impl<F, B, E> std::future::Future for CallFuture<F>
where
    F: std::future::Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CallBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.call.as_ref().map(|call| call.span.enter());
            std::task::ready!(this.inner.poll(cx))
        };
        let Some(call) = this.call.take() else {
            // Polled after completion: tonic never does.
            return Poll::Pending;
        };
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                call.end(Code::Unknown);
                return Poll::Ready(Err(error));
            }
        };
        // A trailers-only response: the status is in the headers.
        let (call, counter) = match status_in(response.headers()) {
            Some(code) => {
                call.end(code);
                (None, None)
            }
            None => {
                let counter = call.method.metrics.as_ref().map(|m| m.sent.clone());
                (Some(call), counter)
            }
        };
        Poll::Ready(Ok(response.map(|inner| Counted {
            inner,
            frames: FrameCounter::default(),
            counter,
            call,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;

    #[test]
    fn reads_grpc_timeout() {
        let mut h = HeaderMap::new();
        for (v, d) in [
            ("5S", Some(Duration::from_secs(5))),
            ("250m", Some(Duration::from_millis(250))),
            ("2H", Some(Duration::from_secs(7200))),
            ("", None),
            ("S", None),
            ("10x", None),
        ] {
            h.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&h), d, "{v:?}");
        }
    }

    #[test]
    fn labels_every_method_from_the_descriptors() {
        let registry = Registry::new();
        let metrics = GrpcMetrics::register(&registry).unwrap();
        let layer = CallLayer::new(
            &[
                crate::proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
            Some(&metrics),
        );
        assert!(layer
            .methods
            .known
            .contains_key("/devicehub.v1.DeviceHub/ListReadings"));
        assert!(!layer.methods.known.contains_key("/nope/Nope"));
        // Every method's series exist from the start, at zero.
        let started: Vec<(String, String)> = registry
            .gather()
            .iter()
            .filter(|family| family.name() == "grpc_server_started_total")
            .flat_map(|family| family.get_metric().iter())
            .map(|metric| {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                (label("grpc_method"), label("grpc_type"))
            })
            .collect();
        for (method, kind) in [
            ("SendCommand", "unary"),
            ("ListReadings", "unary"),
            ("WatchReadings", "server_stream"),
            ("StreamCommands", "bidi_stream"),
            ("Check", "unary"),
            ("Watch", "server_stream"),
            ("unknown", "unary"),
        ] {
            assert!(
                started.contains(&(method.to_owned(), kind.to_owned())),
                "{method} {kind} in {started:?}"
            );
        }
    }
}
