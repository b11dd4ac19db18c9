//! Peers that connect and say nothing, or stall in a TLS handshake, cannot
//! stop new clients: the accept loop never waits for them, caps per remote
//! IP close what is over them at once, and a connection that opens no
//! stream is closed after `--connection-idle-timeout`.
//!
//! The attackers connect from other loopback addresses (127.0.0.2, .3) than
//! the fresh client (127.0.0.1), so that per-IP caps apply to them only.

use crate::common;

use std::{net::SocketAddr, time::Duration};

use common::{secure::*, tempdir::TempDir, *};
use devicehub::proto::{device_hub_client::DeviceHubClient, ListReadingsRequest};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// The start of a TLS ClientHello: a record header announcing 512 bytes,
/// then the handshake header, and nothing more.
const PARTIAL_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];

/// How long a fresh client may take for its calls while the attackers hold
/// their sockets: well below the handshake and idle timeouts the tests set
/// (60 s), so that an accept loop waiting on the attackers fails here.
const FRESH_CLIENT_PATIENCE: Duration = Duration::from_secs(8);

async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// `count` connections from `source` to `to`, each having sent `hello`.
async fn open_many(source: &str, to: SocketAddr, count: usize, hello: &[u8]) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = connect_from(source, to).await;
        if !hello.is_empty() {
            stream.write_all(hello).await.unwrap();
        }
        streams.push(stream);
    }
    streams
}

/// Waits until the service has closed `stream` (EOF or reset).
async fn closed_by_service(what: &str, stream: &mut TcpStream) {
    let mut buf = [0u8; 256];
    within(what, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue, // a TLS alert or HTTP/2 GOAWAY first
            }
        }
    })
    .await;
}

/// A health check and a ListReadings over `channel`, a fresh connection.
async fn fresh_client_is_served(channel: Channel) {
    let calls = async {
        let request = HealthCheckRequest {
            service: devicehub::SERVICE_NAME.into(),
        };
        let health = HealthClient::new(channel.clone()).check(request).await;
        let status = health.expect("health check").into_inner().status();
        assert_eq!(status, ServingStatus::Serving);
        DeviceHubClient::new(channel)
            .list_readings(ListReadingsRequest::default())
            .await
            .expect("ListReadings");
    };
    tokio::time::timeout(FRESH_CLIENT_PATIENCE, calls)
        .await
        .expect("a fresh client was served while idle and stalled peers held their sockets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_and_stalled_handshakes_do_not_stop_new_tls_clients() {
    let broker = embedded_broker();
    let pki = Pki::new("connections test CA");
    let dir = TempDir::new("connections");
    let server = pki.server();
    let cert = dir.write("server.crt", &server.cert);
    let key = dir.write("server.key", &server.key);
    let args = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-handshake-timeout",
        "60s",
        "--connection-idle-timeout",
        "60s",
    ];
    let service = TestService::start(config(&broker, &args)).await;
    let ready = grpc_tls_channel(service.addr, &pki.ca_cert, None)
        .await
        .unwrap();
    wait_serving(&ready).await;
    drop(ready);

    // 1 000 connections that send nothing, 200 that stop inside their
    // ClientHello; every one of them waits in a handshake or is refused.
    let mut idle = open_many("127.0.0.2", service.addr, 1000, &[]).await;
    let mut stalled = open_many("127.0.0.3", service.addr, 200, PARTIAL_CLIENT_HELLO).await;
    // The last of each is over its per-IP handshake cap (32 by default): the
    // accept loop reached it and closed it at once.
    closed_by_service(
        "the 1000th idle connection closed",
        idle.last_mut().unwrap(),
    )
    .await;
    closed_by_service(
        "the 200th stalled handshake closed",
        stalled.last_mut().unwrap(),
    )
    .await;

    let channel = grpc_tls_channel(service.addr, &pki.ca_cert, None);
    let channel = tokio::time::timeout(FRESH_CLIENT_PATIENCE, channel)
        .await
        .expect("a fresh TLS client connected in time")
        .expect("TLS connection");
    fresh_client_is_served(channel).await;

    // Those within the caps are still held open (until their timeouts).
    let mut first = idle.swap_remove(0);
    let held = tokio::time::timeout(Duration::from_millis(200), first.read(&mut [0u8; 1])).await;
    assert!(
        held.is_err(),
        "a handshake within the caps is held, not closed: {held:?}"
    );
    drop((idle, stalled, first));
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_plaintext_connections_are_capped_and_closed() {
    let broker = embedded_broker();
    let args = [
        "--max-connections-per-ip",
        "100",
        "--connection-idle-timeout",
        "2s",
    ];
    let service = TestService::start_ready(config(&broker, &args)).await;

    let mut idle = open_many("127.0.0.2", service.addr, 1000, &[]).await;
    closed_by_service(
        "a connection over --max-connections-per-ip closed",
        idle.last_mut().unwrap(),
    )
    .await;
    let endpoint = Channel::from_shared(service.url()).unwrap();
    let channel = tokio::time::timeout(FRESH_CLIENT_PATIENCE, endpoint.connect())
        .await
        .expect("a fresh client connected in time")
        .expect("connection");
    fresh_client_is_served(channel).await;

    // A connection within the cap that never sends a request is closed once
    // --connection-idle-timeout has passed; its slot comes back, so another
    // connection from that address is accepted and held again.
    for stream in &mut idle {
        closed_by_service("every idle connection closed after its timeout", stream).await;
    }
    drop(idle);
    let mut again = connect_from("127.0.0.2", service.addr).await;
    let held = tokio::time::timeout(Duration::from_millis(500), again.read(&mut [0u8; 1])).await;
    assert!(
        held.is_err(),
        "a new connection is held once the idle ones closed: {held:?}"
    );
    closed_by_service("it too is closed once idle", &mut again).await;
    service.stop().await;
}
