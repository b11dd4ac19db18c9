//! Browsers: the gRPC port also speaks gRPC-Web (`tonic-web`, over HTTP/1.1
//! and HTTP/2, server streaming included), and answers CORS for the origins
//! `--cors-allowed-origins` names. Layered around the whole server, outside
//! the per-call layer (`telemetry/calls/`), which so sees plain gRPC.
//!
//! Without auth, a page on any web site could reach a service on loopback
//! by DNS rebinding (its own name made to resolve to 127.0.0.1: then it is
//! same-origin, and CORS does not apply): [`HostCheck`] refuses requests
//! whose `Host` / `:authority` names anything but loopback, an IP address
//! or a name in `--allowed-hosts`.
//!
//! The dashboard (`dashboard.rs`): the same port answers plain HTTP `GET /`
//! with the page's embedded files, ahead of everything above, and the page
//! calls the service over gRPC-Web from that same origin.

mod dashboard;

pub use dashboard::Dashboard;

use std::{
    net::IpAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::{ready, Either, Ready};
use http::{HeaderName, HeaderValue, Method, Request, Response};
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

/// Refuses requests for hosts other than loopback, IP addresses and the
/// `--allowed-hosts` names, with PERMISSION_DENIED. Only without auth:
/// with it, a rebound page has no token to send.
#[derive(Debug, Clone)]
pub struct HostCheck {
    /// Lower-case host names allowed besides the loopback ones; `None`:
    /// every host (auth is on).
    allowed: Option<Arc<[String]>>,
}

impl HostCheck {
    pub fn new(allowed: &[String]) -> Self {
        Self {
            // As request hosts are compared: no spaces, case or final dot.
            allowed: Some(
                allowed
                    .iter()
                    .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
            ),
        }
    }

    /// Every host allowed.
    pub fn off() -> Self {
        Self { allowed: None }
    }

    /// Whether `authority` (`host[:port]`) may be served. An IP address may:
    /// rebinding needs a name (the attacker's) in the browser's address bar,
    /// and a request to one of our addresses has reached us already.
    fn allows(&self, authority: &str) -> bool {
        let Some(allowed) = &self.allowed else {
            return true;
        };
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6),
            None => authority
                .rsplit_once(':')
                .map_or(authority, |(host, _)| host),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        host.parse::<IpAddr>().is_ok()
            || host == "localhost"
            || host.ends_with(".localhost")
            || allowed.contains(&host)
    }
}

impl HostCheck {
    /// Whether `request` names a host that may not be served. One that
    /// names none (HTTP/2's :authority, else HTTP/1.1's Host) is not from a
    /// browser, and passes.
    fn refuses<B>(&self, request: &Request<B>) -> bool {
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                let host = request.headers().get(http::header::HOST)?;
                host.to_str().ok().map(str::to_owned)
            });
        authority.is_some_and(|authority| !self.allows(&authority))
    }
}

/// Why a request for a foreign host is refused.
const FOREIGN_HOST: &str = "the request's host is not this service's: add it to --allowed-hosts";

impl<S> tower_layer::Layer<S> for HostCheck {
    type Service = HostCheckService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HostCheckService {
            inner,
            check: self.clone(),
        }
    }
}

/// See [`HostCheck`].
#[derive(Debug, Clone)]
pub struct HostCheckService<S> {
    inner: S,
    check: HostCheck,
}

impl<S, B> tower_service::Service<Request<B>> for HostCheckService<S>
where
    S: tower_service::Service<Request<B>, Response = Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if self.check.refuses(&request) {
            let status = tonic::Status::permission_denied(FOREIGN_HOST);
            return Either::Left(ready(Ok(status.into_http())));
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_allowed_are_loopback_addresses_and_the_named_ones() {
        let check = HostCheck::new(&["Hub.Example.com".into(), " other.test. ".into()]);
        for allowed in [
            "localhost:50051",
            "LOCALHOST",
            "app.localhost:8080",
            "127.0.0.1:50051",
            "10.1.2.3:50051",
            "[::1]:50051",
            "[fe80::1]",
            "hub.example.com:443",
            "hub.example.com.",
            "other.test:8080",
        ] {
            assert!(check.allows(allowed), "{allowed}");
        }
        for refused in [
            "evil.example:50051",
            "localhost.evil.example",
            "example.com",
        ] {
            assert!(!check.allows(refused), "{refused}");
        }
        assert!(HostCheck::off().allows("evil.example"), "with auth");
    }
}
