//! gRPC-Web and CORS on the gRPC port, as a browser meets them: preflights
//! answered for the allowed origins only, and a gRPC-Web call over HTTP/1.1
//! whose status a page can read.

use crate::common;

use clap::Parser;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` (an HTTP/1.1 request, `Connection: close`) to `addr`;
/// the whole response.
async fn http(addr: &str, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    within("the HTTP response", stream.read_to_end(&mut response))
        .await
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_get_grpc_web_and_cors_for_the_allowed_origins_only() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(
        &broker,
        &[
            "--cors-allowed-origins",
            "http://app.test:8080,https://dash.test",
        ],
    ))
    .await;
    let addr = service.addr.to_string();
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /devicehub.v1.DeviceHub/WatchReadings HTTP/1.1\r\nHost: {addr}\r\n\
             Origin: {origin}\r\nAccess-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: content-type,x-grpc-web,authorization\r\n\
             Connection: close\r\n\r\n"
        )
    };
    for origin in ["http://app.test:8080", "https://dash.test"] {
        let response = http(&addr, preflight(origin).as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            Some(origin)
        );
        let allowed = header(&response, "access-control-allow-headers").unwrap();
        assert!(allowed.contains("authorization") && allowed.contains("x-grpc-web"));
    }
    let response = http(&addr, preflight("http://evil.test").as_bytes()).await;
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        None,
        "{response}"
    );

    // A gRPC-Web call (an empty ListReadingsRequest) from an allowed page:
    // answered over HTTP/1.1, with the status where the page can read it.
    let body = [0u8, 0, 0, 0, 0];
    let mut call = format!(
        "POST /devicehub.v1.DeviceHub/ListReadings HTTP/1.1\r\nHost: {addr}\r\n\
         Origin: https://dash.test\r\nContent-Type: application/grpc-web+proto\r\n\
         X-Grpc-Web: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    call.extend_from_slice(&body);
    let response = http(&addr, &call).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(
        header(&response, "content-type"),
        Some("application/grpc-web+proto")
    );
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        Some("https://dash.test")
    );
    assert!(header(&response, "access-control-expose-headers")
        .unwrap()
        .contains("grpc-status"));
    // The trailers travel in the body as a final frame: grpc-status 0.
    assert!(response.contains("grpc-status:0"), "{response}");
    service.stop().await;
}

#[test]
fn cors_origins_are_checked() {
    let parse = |origins: &str| {
        cli::Cli::try_parse_from(["devicehub", "--cors-allowed-origins", origins])
            .unwrap()
            .serve
            .config(&"mqtt://127.0.0.1:1883".parse().unwrap())
            .map(|c| c.cors_allowed_origins)
    };
    assert_eq!(
        parse("http://a.test,https://b.test:8443").unwrap(),
        ["http://a.test", "https://b.test:8443"]
    );
    for bad in [
        "a.test",
        "http://a.test/",
        "http://a.test/path",
        "ftp://a.test",
        "*",
    ] {
        let error = parse(bad).unwrap_err().to_string();
        assert!(error.contains("--cors-allowed-origins"), "{bad}: {error}");
    }
}

/// A gRPC-Web ListReadings call as a page would send it, to `host`.
fn grpc_web_call(host: &str) -> Vec<u8> {
    let body = [0u8, 0, 0, 0, 0];
    let mut call = format!(
        "POST /devicehub.v1.DeviceHub/ListReadings HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    call.extend_from_slice(&body);
    call
}

/// DNS rebinding: without auth, a request addressed to a name that is not
/// loopback's, an IP address or in --allowed-hosts is refused
/// (PERMISSION_DENIED), over gRPC-Web from a page and over gRPC. (With
/// auth the check is off: a rebound page has no token.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_foreign_host_names_are_refused_without_auth() {
    use devicehub::proto::{device_hub_client::DeviceHubClient, ListReadingsRequest};
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &["--allowed-hosts", "hub.test"])).await;
    let addr = service.addr.to_string();
    let port = service.addr.port();
    for (host, allowed) in [
        (format!("rebound.example:{port}"), false),
        (format!("localhost:{port}"), true),
        (format!("hub.test:{port}"), true),
        (addr.clone(), true),
    ] {
        let response = http(&addr, &grpc_web_call(&host)).await;
        let want = if allowed {
            "grpc-status:0"
        } else {
            "grpc-status:7"
        };
        assert!(
            response.contains(want) || header(&response, "grpc-status") == Some(&want[12..]),
            "{host}: {response}"
        );
    }
    // gRPC: the :authority is what the channel's origin says.
    let channel = tonic::transport::Endpoint::from_shared(service.url())
        .unwrap()
        .origin(format!("http://rebound.example:{port}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    let status = DeviceHubClient::new(channel)
        .list_readings(ListReadingsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("--allowed-hosts"), "{status:?}");
    service.stop().await;
}
