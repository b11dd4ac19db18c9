use std::convert::Infallible;

use http_body_util::BodyExt;
use tower_layer::Layer;
use tower_service::Service;

use super::*;

/// The rest of the server: answers every request it is handed, marked so
/// that a test sees it passed through.
#[derive(Clone)]
struct Inner;

impl Service<Request<()>> for Inner {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        let mut response = Response::new(tonic::body::Body::empty());
        response
            .headers_mut()
            .insert("x-inner", HeaderValue::from_static("1"));
        ready(Ok(response))
    }
}

fn service(enabled: bool, hosts: HostCheck) -> DashboardService<Inner> {
    Dashboard::new(enabled, hosts).layer(Inner)
}

fn request(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut builder = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(name, _)| *name == "host") {
        builder = builder.header("host", "127.0.0.1:50051");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap()
}

async fn call(
    service: &mut DashboardService<Inner>,
    request: Request<()>,
) -> (Response<()>, Bytes) {
    let response = service.call(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, ()), body)
}

fn passed_through(response: &Response<()>) -> bool {
    response.headers().contains_key("x-inner")
}

fn header<'a>(response: &'a Response<()>, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .map_or("", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn the_page_and_its_files_are_served_with_their_types_and_security_headers() {
    let mut service = service(true, HostCheck::new(&[]));
    for (path, content_type, file) in [
        ("/", "text/html; charset=utf-8", ASSETS[0].body),
        ("/index.html", "text/html; charset=utf-8", ASSETS[0].body),
        ("/app.js", "text/javascript; charset=utf-8", ASSETS[1].body),
        ("/app.css", "text/css; charset=utf-8", ASSETS[2].body),
        ("/?x=1", "text/html; charset=utf-8", ASSETS[0].body),
    ] {
        let (response, body) = call(&mut service, request(Method::GET, path, &[])).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&response, "content-type"), content_type, "{path}");
        assert_eq!(body, file, "{path}");
        assert_eq!(header(&response, "content-length"), file.len().to_string());
        assert_eq!(header(&response, "cache-control"), "no-cache");
        assert_eq!(header(&response, "x-content-type-options"), "nosniff");
        let csp = header(&response, "content-security-policy");
        for directive in [
            "default-src 'self'",
            "connect-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{directive} in {csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(header(&response, "etag").starts_with('"'), "{path}");
    }
    assert!(!ASSETS[1].body.is_empty() && !ASSETS[2].body.is_empty());
}

#[tokio::test]
async fn head_answers_the_headers_without_the_body() {
    let mut service = service(true, HostCheck::new(&[]));
    let (response, body) = call(&mut service, request(Method::HEAD, "/app.js", &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "content-length"),
        ASSETS[1].body.len().to_string()
    );
    assert!(body.is_empty());
}

#[tokio::test]
async fn a_known_etag_gets_304_without_a_body() {
    let mut service = service(true, HostCheck::new(&[]));
    let (first, _) = call(&mut service, request(Method::GET, "/", &[])).await;
    let etag = header(&first, "etag").to_owned();
    let weak = format!("W/{etag}");
    for tag in [etag.as_str(), weak.as_str(), "\"other\", \"x\"", "*"] {
        let (response, body) = call(
            &mut service,
            request(Method::GET, "/", &[("if-none-match", tag)]),
        )
        .await;
        let want = match tag.contains("other") {
            true => StatusCode::OK,
            false => StatusCode::NOT_MODIFIED,
        };
        assert_eq!(response.status(), want, "{tag}");
        assert_eq!(header(&response, "etag"), etag);
        assert_eq!(body.is_empty(), want == StatusCode::NOT_MODIFIED);
    }
    // Another file, another tag.
    let (css, _) = call(&mut service, request(Method::GET, "/app.css", &[])).await;
    assert_ne!(header(&css, "etag"), etag);
}

#[tokio::test]
async fn other_paths_are_404_and_other_methods_on_the_pages_paths_405() {
    let mut service = service(true, HostCheck::new(&[]));
    for path in [
        "/nope",
        "/dist/app.js",
        "/devicehub.v1.DeviceHub/ListDevices",
        "/index.htm",
    ] {
        let (response, _) = call(&mut service, request(Method::GET, path, &[])).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(!passed_through(&response));
    }
    for (method, path) in [
        (Method::POST, "/"),
        (Method::DELETE, "/app.js"),
        (Method::PUT, "/index.html"),
    ] {
        let (response, _) = call(&mut service, request(method.clone(), path, &[])).await;
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(header(&response, "allow"), "GET, HEAD");
    }
}

#[tokio::test]
async fn grpc_grpc_web_and_preflights_pass_through_untouched() {
    let mut service = service(true, HostCheck::new(&[]));
    for (method, path, content_type) in [
        (
            Method::POST,
            "/devicehub.v1.DeviceHub/ListDevices",
            "application/grpc",
        ),
        (
            Method::POST,
            "/devicehub.v1.DeviceHub/ListDevices",
            "application/grpc+proto",
        ),
        (
            Method::POST,
            "/devicehub.v1.DeviceHub/ListDevices",
            "application/grpc-web+proto",
        ),
        (
            Method::POST,
            "/devicehub.v1.DeviceHub/ListDevices",
            "application/grpc-web-text",
        ),
        // gRPC content on the page's own paths is still gRPC's business.
        (Method::POST, "/", "application/grpc"),
        (Method::GET, "/", "application/grpc-web"),
    ] {
        let (response, _) = call(
            &mut service,
            request(method.clone(), path, &[("content-type", content_type)]),
        )
        .await;
        assert!(passed_through(&response), "{method} {path} {content_type}");
    }
    // A CORS preflight, and a POST that is not gRPC, elsewhere: not ours.
    let preflight = request(
        Method::OPTIONS,
        "/devicehub.v1.DeviceHub/ListDevices",
        &[("access-control-request-method", "POST")],
    );
    assert!(passed_through(&call(&mut service, preflight).await.0));
    let post = request(Method::POST, "/devicehub.v1.DeviceHub/ListDevices", &[]);
    assert!(passed_through(&call(&mut service, post).await.0));
}

#[tokio::test]
async fn turned_off_every_plain_get_is_404() {
    let mut service = service(false, HostCheck::new(&[]));
    for path in ["/", "/index.html", "/app.js", "/app.css"] {
        let (response, body) = call(&mut service, request(Method::GET, path, &[])).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body, "not found");
    }
    let grpc = request(
        Method::POST,
        "/x/Y",
        &[("content-type", "application/grpc")],
    );
    assert!(passed_through(&call(&mut service, grpc).await.0));
    // Nothing is ours any more: other methods go on as before the dashboard.
    assert!(passed_through(
        &call(&mut service, request(Method::POST, "/", &[])).await.0
    ));
}

#[tokio::test]
async fn a_foreign_host_is_refused_without_auth_and_served_with_it() {
    let foreign = request(Method::GET, "/", &[("host", "evil.example:50051")]);
    let mut without_auth = service(true, HostCheck::new(&["hub.internal".into()]));
    let (response, _) = call(&mut without_auth, foreign).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    for allowed in ["localhost:50051", "hub.internal", "[::1]:1"] {
        let request = request(Method::GET, "/", &[("host", allowed)]);
        let (response, _) = call(&mut without_auth, request).await;
        assert_eq!(response.status(), StatusCode::OK, "{allowed}");
    }
    let mut with_auth = service(true, HostCheck::off());
    let foreign = request(Method::GET, "/", &[("host", "evil.example:50051")]);
    let (response, _) = call(&mut with_auth, foreign).await;
    assert_eq!(response.status(), StatusCode::OK);
}
