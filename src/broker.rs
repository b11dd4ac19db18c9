//! The embedded MQTT broker (rumqttd) that `devicehub serve` starts when no
//! broker URL is configured, so the service runs with one command.
//!
//! rumqttd runs on threads of its own and binds its listener itself, and it
//! cannot be stopped: it lives until the process exits. It is meant for
//! development and demos: its per-subscription log is bounded (see
//! `broker_config`), so a subscriber that lags far behind loses messages;
//! production deployments use a real broker (`--mqtt-url`).

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tracing::{error, info};

/// How long to wait for the broker to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot bind the embedded MQTT broker to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the embedded MQTT broker did not start listening on {0} (is the port in use?)")]
    NotListening(SocketAddr),
    #[error("cannot start the embedded MQTT broker thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Starts the embedded broker on `addr` and returns the address it listens on
/// once it accepts connections. Port 0 picks a free port.
pub fn start(addr: SocketAddr, max_packet_bytes: usize) -> Result<SocketAddr, BrokerError> {
    // rumqttd binds by itself and does not report the port, so resolve port 0
    // here first. Another process could take the port in between; the wait
    // below then fails loudly instead of connecting somewhere else silently.
    let addr = if addr.port() == 0 {
        let probe = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
        probe
            .local_addr()
            .map_err(|source| BrokerError::Bind { addr, source })?
    } else {
        addr
    };

    let config = broker_config(addr, max_packet_bytes);
    let handle = thread::Builder::new()
        .name("embedded-mqtt".into())
        .spawn(move || {
            if let Err(error) = Broker::new(config).start() {
                error!(%error, "embedded MQTT broker stopped");
            }
        })?;

    let deadline = Instant::now() + START_TIMEOUT;
    while !speaks_mqtt(addr) {
        // rumqttd's start returns (ending the thread) when its listener fails.
        if handle.is_finished() || Instant::now() > deadline {
            return Err(BrokerError::NotListening(addr));
        }
        thread::sleep(Duration::from_millis(10)); // a poll, bounded by START_TIMEOUT
    }
    info!(%addr, "embedded MQTT broker listening");
    Ok(addr)
}

/// Whether an MQTT broker answers on `addr`: CONNECT, expect a CONNACK that
/// accepts, DISCONNECT. A full handshake, so the broker logs no aborted
/// connection and another program on the port is not mistaken for it.
fn speaks_mqtt(addr: SocketAddr) -> bool {
    const CONNECT: &[u8] = &[
        0x10, 27, // CONNECT, remaining length
        0, 4, b'M', b'Q', b'T', b'T', 4, // protocol name and level 3.1.1
        0x02, 0, 10, // clean session, keep-alive 10 s
        0, 15, b'd', b'e', b'v', b'i', b'c', b'e', b'h', b'u', b'b', b'-', b'p', b'r', b'o', b'b',
        b'e',
    ];
    const DISCONNECT: &[u8] = &[0xe0, 0];
    // Loopback answers in microseconds; these only bound a stuck probe.
    let handshake = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(CONNECT)?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack)?;
        stream.write_all(DISCONNECT)?;
        Ok(connack[0] == 0x20 && connack[3] == 0)
    };
    handshake().unwrap_or(false)
}

fn broker_config(addr: SocketAddr, max_packet_bytes: usize) -> Config {
    let server = ServerSettings {
        name: "embedded-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            // How long a new connection may take to send CONNECT.
            connection_timeout_ms: 10_000,
            max_payload_size: max_packet_bytes,
            // Despite the name, rumqttd uses this as the most packets it
            // decodes from one connection's socket per read before handing
            // them to the router: large batches for bursts of readings.
            max_inflight_count: 1_000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            // Devices plus devicehub: room for the simulator's maximum of
            // 10 000 devices (rumqttd allocates its tables for this up front).
            max_connections: 10_000,
            // QoS 0 messages the router copies from a commit log to one
            // subscriber per turn (QoS 1/2 are bounded by the subscriber's
            // free in-flight slots instead).
            max_outgoing_packet_count: 1_000,
            // rumqttd keeps one commit log per subscription filter and drops
            // its oldest segment when full: a subscriber that falls further
            // behind than the log loses messages without notice, even at
            // QoS 1. 8 x 16 MiB (the broker's memory once full) gives
            // devicehub seconds of slack at 100 000 readings/s. A segment
            // must also hold the largest publish.
            max_segment_size: max_packet_bytes.max(16 << 20),
            max_segment_count: 8,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("embedded".to_owned(), server)])),
        ..Config::default()
    }
}
