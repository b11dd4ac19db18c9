//! Browsers: the gRPC port also speaks gRPC-Web (`tonic-web`, over HTTP/1.1
//! and HTTP/2, server streaming included), and answers CORS for the origins
//! `--cors-allowed-origins` names. Layered around the whole server, outside
//! the per-call layer (`telemetry/calls.rs`), which so sees plain gRPC.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Request headers a gRPC-Web client sends (and ours: the token, the trace
/// context, the call's deadline).
const ALLOWED_HEADERS: [&str; 8] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "authorization",
    "traceparent",
    "tracestate",
    "connect-protocol-version",
];

/// Response headers a gRPC-Web client must be able to read: the status
/// travels in them for errors before any message.
const EXPOSED_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// CORS for `origins` (exact matches); with none, no cross-origin access.
pub fn cors(origins: &[String]) -> CorsLayer {
    let origins = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect::<Vec<_>>();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
        .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
        .max_age(PREFLIGHT_MAX_AGE)
}
