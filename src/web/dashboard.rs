//! The dashboard's files on the gRPC port: plain HTTP `GET`/`HEAD` for `/`,
//! `/index.html`, `/app.js` and `/app.css` answered with the bundle built
//! from `web/` (committed under `web/dist/`, embedded at compile time, so
//! `cargo build` alone builds everything), ahead of every other layer.
//!
//! It owns: which requests are the page's (anything whose content-type is
//! not `application/grpc*`: gRPC and gRPC-Web always say theirs), their
//! headers (a strict Content-Security-Policy, `nosniff`, an ETag with
//! `no-cache`, so a new build is seen at once and an unchanged one costs a
//! 304), 404 for other plain `GET`s, 405 for other methods on its paths,
//! and the DNS rebinding guard ([`HostCheck`]) for the page too.
//!
//! It never touches a gRPC or gRPC-Web request, CORS preflights included:
//! those pass through unchanged, and the per-call layer never sees the
//! page's requests. It serves nothing but the embedded files: no file
//! system, no directory listing, no data (the page gets that over gRPC-Web,
//! under the same auth as any client).

use std::{
    sync::LazyLock,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::future::{ready, Either, Ready};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use super::{HostCheck, FOREIGN_HOST};
use crate::fnv::Fnv;

/// Where the page may load from and talk to: itself only. uPlot styles its
/// elements through `element.style`, which `style-src 'self'` allows;
/// `form-action 'none'` keeps a form submitted before the script runs from
/// putting what was typed (a token) into a URL.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self'; \
     style-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: [Asset; 3] = [
    Asset {
        path: "/index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../web/dist/index.html"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/dist/app.js"),
    },
    Asset {
        path: "/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../web/dist/app.css"),
    },
];

/// Each asset's ETag, in [`ASSETS`]' order: a hash of its bytes, computed
/// once (the files are fixed for the life of the binary).
static ETAGS: LazyLock<[HeaderValue; 3]> = LazyLock::new(|| {
    ASSETS.map(|asset| {
        HeaderValue::from_str(&format!("\"{:016x}\"", Fnv::of(asset.body)))
            .expect("hex digits in quotes are a header value")
    })
});

/// The asset at `path` (`/` is the page), with its index.
fn asset(path: &str) -> Option<(usize, &'static Asset)> {
    let path = if path == "/" { "/index.html" } else { path };
    ASSETS.iter().enumerate().find(|(_, a)| a.path == path)
}

/// Whether a request is gRPC or gRPC-Web (`application/grpc`,
/// `application/grpc+proto`, `application/grpc-web-text`...).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/grpc"))
}

/// Whether `If-None-Match` names `etag` (or is `*`); weak tags compare
/// as strong ones here, as RFC 9110 asks for GET.
fn not_modified(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// The dashboard layer: see the module's documentation. `enabled: false`
/// (`--dashboard=false`) serves no page: every plain `GET` is a 404.
#[derive(Debug, Clone)]
pub struct Dashboard {
    enabled: bool,
    hosts: HostCheck,
}

impl Dashboard {
    pub fn new(enabled: bool, hosts: HostCheck) -> Self {
        Self { enabled, hosts }
    }

    /// The answer to a request that is not gRPC, or `None` to pass it on.
    fn answer<B>(&self, request: &Request<B>) -> Option<Response<tonic::body::Body>> {
        let found = asset(request.uri().path()).filter(|_| self.enabled);
        let method = request.method();
        if method != Method::GET && method != Method::HEAD {
            // Others' paths (a CORS preflight, a stray POST) are not ours.
            return found.map(|_| method_not_allowed());
        }
        if self.hosts.refuses(request) {
            return Some(plain(StatusCode::FORBIDDEN, FOREIGN_HOST));
        }
        let Some((index, asset)) = found else {
            return Some(plain(StatusCode::NOT_FOUND, "not found"));
        };
        let etag = &ETAGS[index];
        if not_modified(request.headers(), etag) {
            return Some(respond(StatusCode::NOT_MODIFIED, etag, None, Bytes::new()));
        }
        let body = match *method == Method::HEAD {
            true => Bytes::new(),
            false => Bytes::from_static(asset.body),
        };
        let mut response = respond(StatusCode::OK, etag, Some(asset.content_type), body);
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(asset.body.len()));
        Some(response)
    }
}

/// A response with the headers every page response carries.
fn respond(
    status: StatusCode,
    etag: &HeaderValue,
    content_type: Option<&'static str>,
    body: Bytes,
) -> Response<tonic::body::Body> {
    let mut response = Response::new(tonic::body::Body::new(http_body_util::Full::new(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Some(content_type) = content_type {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    headers.insert(header::ETAG, etag.clone());
    // Cached, but checked every time: a new build shows at once.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(headers);
    response
}

/// A short plain-text answer (404, 403).
fn plain(status: StatusCode, text: &'static str) -> Response<tonic::body::Body> {
    let mut response = Response::new(tonic::body::Body::new(http_body_util::Full::new(
        Bytes::from_static(text.as_bytes()),
    )));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    secure(headers);
    response
}

fn method_not_allowed() -> Response<tonic::body::Body> {
    let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

impl<S> tower_layer::Layer<S> for Dashboard {
    type Service = DashboardService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DashboardService {
            inner,
            dashboard: self.clone(),
        }
    }
}

/// See [`Dashboard`].
#[derive(Debug, Clone)]
pub struct DashboardService<S> {
    inner: S,
    dashboard: Dashboard,
}

impl<S, B> tower_service::Service<Request<B>> for DashboardService<S>
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
        if !is_grpc(request.headers()) {
            if let Some(response) = self.dashboard.answer(&request) {
                return Either::Left(ready(Ok(response)));
            }
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
#[path = "dashboard_tests.rs"]
mod tests;
