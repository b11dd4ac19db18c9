//! Shared test harness: the real service in-process on ephemeral ports, real
//! brokers (embedded rumqttd or a Mosquitto process), real MQTT devices and
//! the generated tonic client. Waits are on conditions, never fixed sleeps.

// The binary's command line, compiled here too, so that tests build their
// configurations as `devicehub` with the same flags would.
#[allow(dead_code, unused_imports)]
#[path = "../../../src/cli/mod.rs"]
pub mod cli;
pub mod instance;
pub mod json;
pub mod mosquitto;
pub mod paho;
pub mod pki;
pub mod postgres;
pub mod rng;
pub mod secure;
pub mod tempdir;
pub mod tokens;

pub use mosquitto::which;

use std::{
    future::Future,
    net::{SocketAddr, TcpListener as StdListener},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use clap::Parser;
use cli::Cli;
use devicehub::{
    config::BrokerUrl,
    proto::{device_hub_client::DeviceHubClient, Reading},
    Config, SERVICE_NAME,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// Upper bound for any condition a test waits for. Generous: CI is shared.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, or panics naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lists with `request` until `check` accepts the page's readings, and returns
/// what it made of them; panics naming `what` if that never happens.
pub async fn list_until<T>(
    what: &str,
    client: &DeviceHubClient<Channel>,
    request: devicehub::proto::ListReadingsRequest,
    check: impl Fn(Vec<Reading>) -> Option<T>,
) -> T {
    let check = &check;
    eventually(what, || {
        let (mut client, request) = (client.clone(), request.clone());
        async move {
            let page = client.list_readings(request).await.ok()?.into_inner();
            check(page.readings)
        }
    })
    .await
}

/// Runs a future with the [`PATIENCE`] bound, naming it if it hangs.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Starts an embedded rumqttd broker on a free loopback port.
pub fn embedded_broker() -> BrokerUrl {
    let addr = devicehub::broker::start("127.0.0.1:0".parse().unwrap(), 4 << 20)
        .expect("embedded broker starts");
    BrokerUrl::from_addr(addr)
}

/// A loopback address where nothing listens.
pub fn closed_port() -> BrokerUrl {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    BrokerUrl::from_addr(listener.local_addr().unwrap())
}

/// The service's default configuration (as `devicehub` with `args` would
/// have it), pointed at `broker`.
pub fn config(broker: &BrokerUrl, args: &[&str]) -> Config {
    let cli = Cli::try_parse_from(std::iter::once("devicehub").chain(args.iter().copied()))
        .expect("valid arguments");
    cli.serve.config(broker).expect("valid configuration")
}

/// The simulator's configuration (as `devicehub simulate` with `args`
/// would have it), pointed at `broker`.
pub fn simulate_config(broker: &BrokerUrl, args: &[&str]) -> devicehub::simulate::SimulateConfig {
    let url = format!("mqtt://{}:{}", broker.host, broker.port);
    let head = ["devicehub", "simulate", "--mqtt-url", &url];
    let cli =
        Cli::try_parse_from(head.into_iter().chain(args.iter().copied())).expect("valid arguments");
    match cli.command {
        Some(cli::Command::Simulate(args)) => args.config().expect("valid configuration"),
        _ => unreachable!("parsed as simulate"),
    }
}

/// The real service, in-process, on an ephemeral gRPC port.
pub struct TestService {
    pub addr: SocketAddr,
    /// Cancels the service's shutdown token when dropped: a test that
    /// fails half-way still stops its service.
    shutdown: DropGuard,
    task: JoinHandle<Result<(), devicehub::Error>>,
}

impl TestService {
    pub async fn start(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(devicehub::run(config, listener, shutdown.clone()));
        Self {
            addr,
            shutdown: shutdown.drop_guard(),
            task,
        }
    }

    /// Starts the service and waits until it is connected and subscribed.
    pub async fn start_ready(config: Config) -> Self {
        let service = Self::start(config).await;
        service.wait_for_health(ServingStatus::Serving).await;
        service
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> DeviceHubClient<Channel> {
        let url = self.url();
        eventually("the gRPC server to accept", || {
            let url = url.clone();
            async move { DeviceHubClient::connect(url).await.ok() }
        })
        .await
    }

    /// The health status of the DeviceHub service.
    pub async fn health(&self) -> ServingStatus {
        self.health_of(SERVICE_NAME).await
    }

    /// The health status of `service` (`""`: the server overall, what
    /// Kubernetes' gRPC probe asks).
    pub async fn health_of(&self, service: &str) -> ServingStatus {
        let channel = Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("health client connects");
        let mut health = HealthClient::new(channel);
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check answers");
        response.into_inner().status()
    }

    /// Waits until the DeviceHub service and the server overall both
    /// report `want`.
    pub async fn wait_for_health(&self, want: ServingStatus) {
        eventually(&format!("health {want:?}"), || async {
            let both = (self.health().await, self.health_of("").await);
            (both == (want, want)).then_some(())
        })
        .await
    }

    /// Cancels the shutdown token and waits for `run` to return.
    pub async fn stop(self) {
        drop(self.shutdown);
        let result = within("the service to stop", self.task).await;
        result
            .expect("service task")
            .expect("service stops cleanly");
    }
}

/// A real MQTT client acting as a device.
pub struct TestDevice {
    pub client: AsyncClient,
    /// Messages received on the device's subscriptions.
    pub received: mpsc::UnboundedReceiver<Publish>,
    task: JoinHandle<()>,
}

impl TestDevice {
    /// Connects as `client_id`, subscribes to `subscribe` (if given) and
    /// returns once the broker confirmed both.
    pub async fn connect(broker: &BrokerUrl, client_id: &str, subscribe: Option<&str>) -> Self {
        Self::connect_with(broker, client_id, subscribe, true).await
    }

    /// Like [`TestDevice::connect`], with a persistent session when
    /// `clean_session` is false: unacknowledged publishes are sent again
    /// after a reconnect.
    pub async fn connect_with(
        broker: &BrokerUrl,
        client_id: &str,
        subscribe: Option<&str>,
        clean_session: bool,
    ) -> Self {
        let mut options = MqttOptions::new(client_id, &broker.host, broker.port);
        options.set_clean_session(clean_session);
        Self::connect_options(options, subscribe).await
    }

    /// Connects with `options` (TLS, a login...), subscribes to `subscribe`
    /// (if given) and returns once the broker confirmed both.
    pub async fn connect_options(mut options: MqttOptions, subscribe: Option<&str>) -> Self {
        options.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        // Publishes go out at once, as from a device that cares about latency.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let (received_tx, received) = mpsc::unbounded_channel();
        let subscribe = subscribe.map(str::to_owned);
        let sub_client = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => match &subscribe {
                        Some(filter) => sub_client.try_subscribe(filter, QoS::AtLeastOnce).unwrap(),
                        None => {
                            let _ = ready_tx.send(());
                        }
                    },
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = received_tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        within("the device to connect", ready_rx.recv()).await;
        Self {
            client,
            received,
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish queued");
    }

    pub async fn next_message(&mut self) -> Publish {
        within("a message for the device", self.received.recv())
            .await
            .expect("device task alive")
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Mosquitto process ([`mosquitto::Process`]) and the URL the service
/// and devices reach it at. Killed when dropped.
pub struct Mosquitto {
    pub url: BrokerUrl,
    process: mosquitto::Process,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_on(mosquitto::free_port())
    }

    /// Starts Mosquitto on `port` (a restart keeps the port).
    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, None)
    }

    /// Starts Mosquitto on `port`, saving sessions and queued messages in
    /// `persistence` (when given) at a graceful stop.
    pub fn start_with(port: u16, persistence: Option<&std::path::Path>) -> Self {
        let conf = mosquitto::config(port, persistence);
        Self::start_config(tempdir::TempDir::new("mosquitto"), &conf, port, false)
    }

    /// Starts Mosquitto with the configuration `conf` in `dir` (see
    /// [`mosquitto::Process::start`]); `tls` says whether `conf` makes
    /// `port` a TLS listener, for the URL.
    pub fn start_config(dir: tempdir::TempDir, conf: &str, port: u16, tls: bool) -> Self {
        Self {
            url: BrokerUrl {
                host: "127.0.0.1".into(),
                port,
                tls,
            },
            process: mosquitto::Process::start(dir, conf, port),
        }
    }

    /// Mosquitto's working directory (its config, log and other files).
    pub fn dir(&self) -> &std::path::Path {
        self.process.dir()
    }

    /// What Mosquitto has logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Checks Mosquitto's log: the service (client ids starting with
    /// `devicehub-`) connected exactly once and nothing was dropped as a
    /// malformed packet.
    pub fn assert_one_unbroken_service_connection(&self) {
        let log = self.log();
        let connects = log
            .lines()
            .filter(|l| l.contains("New client connected") && l.contains(" as devicehub-"))
            .count();
        assert_eq!(
            connects, 1,
            "the service connected {connects} times:\n{log}"
        );
        assert!(
            !log.contains("malformed"),
            "Mosquitto saw a malformed packet:\n{log}"
        );
    }

    /// Stops the broker with SIGTERM (it saves its state, if persistent) and
    /// waits for the process to end; returns its port.
    pub fn stop(self) -> u16 {
        self.process.stop()
    }

    /// Kills the broker and waits for the process to end; returns its port.
    pub fn kill(self) -> u16 {
        self.process.kill()
    }
}

/// Every buffered reading, oldest first, of `device_id` (empty: all),
/// paging through ListReadings.
pub async fn list_all(client: &DeviceHubClient<Channel>, device_id: &str) -> Vec<Reading> {
    let mut client = client.clone();
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = devicehub::proto::ListReadingsRequest {
            device_id: device_id.into(),
            oldest_first: true,
            page_size: 1000,
            page_token,
            ..Default::default()
        };
        let page = client.list_readings(request).await.unwrap().into_inner();
        all.extend(page.readings);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// Sends a command while the broker is unreachable: it must fail with
/// UNAVAILABLE promptly. A hang would end in DEADLINE_EXCEEDED instead.
pub async fn assert_command_unavailable(client: &DeviceHubClient<Channel>) {
    let mut request = tonic::Request::new(devicehub::proto::SendCommandRequest {
        device_id: "d1".into(),
        command: "TURN_ON_FAN".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(10));
    let status = client.clone().send_command(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

/// Publishes the payloads "first", "first + 1", ... up to `end` (exclusive)
/// at QoS 1 from a background task; the task ends once all are queued.
pub fn publish_indices(
    device: &TestDevice,
    topic: &str,
    indices: std::ops::Range<u64>,
) -> JoinHandle<()> {
    let (client, topic) = (device.client.clone(), topic.to_owned());
    tokio::spawn(async move {
        for i in indices {
            client
                .publish(&topic, QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
    })
}

/// Waits until `device_id` has a buffered reading, and returns its newest.
pub async fn newest_reading_of(client: &DeviceHubClient<Channel>, device_id: &str) -> Reading {
    eventually(&format!("a reading of {device_id}"), || async move {
        let request = devicehub::proto::ListReadingsRequest {
            device_id: device_id.into(),
            page_size: 1,
            ..Default::default()
        };
        let page = client.clone().list_readings(request).await.ok()?;
        page.into_inner().readings.pop()
    })
    .await
}

/// The sequence numbers of `readings`.
pub fn seqs(readings: &[Reading]) -> Vec<u64> {
    readings.iter().map(|r| r.seq).collect()
}

/// The main flow, against any broker: readings in → ListReadings and
/// WatchReadings out; SendCommand → the device receives the envelope.
pub async fn end_to_end(broker: &BrokerUrl) {
    use devicehub::proto::{
        send_command_request::Payload, watch_readings_response::Event as WatchEvent,
        ListReadingsRequest, SendCommandRequest, WatchReadingsRequest,
    };

    let service = TestService::start_ready(config(broker, &[])).await;
    let mut client = service.client().await;

    // Watches open before anything is published must see everything.
    let mut watch_d1 = client
        .watch_readings(WatchReadingsRequest {
            device_id: "d1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch_all = client
        .watch_readings(WatchReadingsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let mut device = TestDevice::connect(broker, "device-d1", Some("devices/d1/commands")).await;
    let d1_payloads: Vec<&[u8]> = vec![
        br#"{"temperature": 21.5, "ok": true}"#,
        b"\xff\xfe not utf-8",
        b"",
        b"[1, 2, 3]",
        b"plain text",
    ];
    for (i, payload) in d1_payloads.iter().enumerate() {
        device.publish("devices/d1/readings", *payload).await;
        device
            .publish("devices/d2/readings", format!(r#"{{"n": {i}}}"#))
            .await;
    }

    let all = eventually("10 readings to be listed", || {
        let mut client = client.clone();
        async move {
            let page = client
                .list_readings(ListReadingsRequest::default())
                .await
                .unwrap()
                .into_inner();
            (page.readings.len() == 10).then_some(page)
        }
    })
    .await;
    assert!(all.next_page_token.is_empty());
    let newest_first = seqs(&all.readings);
    assert!(
        newest_first.windows(2).all(|w| w[0] > w[1]),
        "newest first: {newest_first:?}"
    );

    let d1 = client
        .list_readings(ListReadingsRequest {
            device_id: "d1".into(),
            oldest_first: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .readings;
    let got: Vec<&[u8]> = d1.iter().map(|r| r.payload.as_ref()).collect();
    assert_eq!(got, d1_payloads, "payloads are kept byte for byte");
    for reading in &d1 {
        assert_eq!(reading.device_id, "d1");
        assert_eq!(reading.topic, "devices/d1/readings");
        assert_eq!(reading.qos, 1);
        assert!(!reading.retained);
        assert!(reading.received_at.is_some());
    }
    let has_json: Vec<bool> = d1.iter().map(|r| r.json.is_some()).collect();
    assert_eq!(has_json, [true, false, false, true, false]);

    // Watches deliver the same readings, in order, exactly once.
    let mut watched_d1 = Vec::new();
    while watched_d1.len() < 5 {
        let message = within("watch d1", watch_d1.message())
            .await
            .unwrap()
            .unwrap();
        let Some(WatchEvent::Reading(reading)) = message.event else {
            panic!("not a reading")
        };
        watched_d1.push(reading);
    }
    assert_eq!(watched_d1, d1);
    let mut watched_all = Vec::new();
    while watched_all.len() < 10 {
        let message = within("watch all", watch_all.message())
            .await
            .unwrap()
            .unwrap();
        let Some(WatchEvent::Reading(reading)) = message.event else {
            panic!("not a reading")
        };
        watched_all.push(reading.seq);
    }
    let mut oldest_first = newest_first.clone();
    oldest_first.reverse();
    assert_eq!(watched_all, oldest_first);

    // Paging: every reading once, in order, and an empty token at the end.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_readings(ListReadingsRequest {
                page_size: 3,
                page_token: token,
                oldest_first: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.readings.len() <= 3);
        paged.extend(seqs(&page.readings));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, oldest_first);

    let d2 = client
        .list_readings(ListReadingsRequest {
            topic_filter: "devices/+/readings".into(),
            device_id: "d2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .readings;
    assert_eq!(d2.len(), 5);
    assert!(d2.iter().all(|r| r.device_id == "d2" && r.json.is_some()));
    let by_topic = client
        .list_readings(ListReadingsRequest {
            topic_filter: "devices/d2/#".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .readings;
    assert_eq!(by_topic, d2);

    // Commands, at each QoS, as a JSON envelope or raw.
    for qos in [0, 1, 2] {
        let params: prost_types::Struct = prost_types::Struct {
            fields: [(
                "speed".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(3.0)),
                },
            )]
            .into(),
        };
        let response = client
            .send_command(SendCommandRequest {
                device_id: "d1".into(),
                command: "TURN_ON_FAN".into(),
                payload: Some(Payload::Params(params)),
                qos: Some(qos),
                reply_timeout: None,
                ttl: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.topic, "devices/d1/commands");
        let message = device.next_message().await;
        assert_eq!(message.topic, "devices/d1/commands");
        let mut envelope: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        // Until when the device may carry it out (tests/it/commands.rs checks
        // the value): RFC 3339.
        let expires_at = envelope["expires_at"].take();
        let expires_at = expires_at.as_str().expect("expires_at");
        assert!(
            expires_at.parse::<prost_types::Timestamp>().is_ok(),
            "{expires_at}"
        );
        envelope.as_object_mut().unwrap().remove("expires_at");
        assert_eq!(
            envelope,
            serde_json::json!({"id": response.command_id, "command": "TURN_ON_FAN", "params": {"speed": 3}})
        );
    }
    let raw = client
        .send_command(SendCommandRequest {
            device_id: "d1".into(),
            command: "RAW".into(),
            payload: Some(Payload::RawPayload(b"ON".to_vec().into())),
            qos: None,
            reply_timeout: None,
            ttl: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!raw.command_id.is_empty());
    assert_eq!(device.next_message().await.payload.as_ref(), b"ON");

    service.stop().await;
}

/// What a [`Responder`] does with one command: reply after a delay, or not.
pub type ReplyPolicy =
    Arc<dyn Fn(&str, &serde_json::Value) -> Option<(Duration, serde_json::Value)> + Send + Sync>;

/// Devices that answer commands: one MQTT client subscribed to every
/// device's command topic, replying on each device's replies topic as
/// `policy` says.
pub struct Responder {
    device: TestDevice,
    task: JoinHandle<()>,
}

impl Responder {
    pub async fn start(broker: &BrokerUrl, client_id: &str, policy: ReplyPolicy) -> Self {
        let mut device = TestDevice::connect(broker, client_id, Some("devices/+/commands")).await;
        let client = device.client.clone();
        let mut received = std::mem::replace(&mut device.received, mpsc::unbounded_channel().1);
        let task = tokio::spawn(async move {
            while let Some(command) = received.recv().await {
                let device_id = command
                    .topic
                    .split('/')
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                let Ok(envelope) = serde_json::from_slice::<serde_json::Value>(&command.payload)
                else {
                    continue;
                };
                let Some((delay, reply)) = policy(&device_id, &envelope) else {
                    continue;
                };
                let client = client.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let topic = format!("devices/{device_id}/replies");
                    let _ = client
                        .publish(topic, QoS::AtLeastOnce, false, reply.to_string())
                        .await;
                });
            }
        });
        Self { device, task }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
        let _ = &self.device;
    }
}

/// Reads log lines until one contains `marker`, and returns the address
/// logged after `field=` on it.
pub async fn logged_addr(lines: &mut ServiceLog, marker: &str, field: &str) -> String {
    loop {
        let line = within(marker, lines.next_line())
            .await
            .unwrap()
            .expect("log ended");
        // Shown if the test fails (cargo captures it otherwise).
        eprintln!("{line}");
        if line.contains(marker) {
            let at = line
                .find(field)
                .unwrap_or_else(|| panic!("{field} in {line}"));
            return line[at + field.len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
        }
    }
}

/// Reads log lines until each of `markers` was on one, and returns the
/// addresses logged after `addr=` on them, in the order of `markers`
/// (whatever order the lines came in).
pub async fn logged_addrs<const N: usize>(
    lines: &mut ServiceLog,
    markers: [&str; N],
) -> [String; N] {
    let mut found: [Option<String>; N] = std::array::from_fn(|_| None);
    while found.iter().any(Option::is_none) {
        let line = within(&markers.join(", "), lines.next_line())
            .await
            .unwrap()
            .expect("log ended");
        eprintln!("{line}");
        for (marker, slot) in markers.iter().zip(&mut found) {
            if line.contains(marker) {
                *slot = line
                    .split_whitespace()
                    .find_map(|field| field.strip_prefix("addr="))
                    .map(str::to_owned);
            }
        }
    }
    found.map(Option::unwrap)
}

/// The service's log, line by line, as the `devicehub` binary writes it.
pub type ServiceLog = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// Starts the `devicehub` binary with `args` (logging at info to a pipe, and
/// `env` set), killed when dropped; returns it and its log.
pub fn spawn_devicehub(args: &[&str], env: &[(&str, &str)]) -> (tokio::process::Child, ServiceLog) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
        .args(args)
        .env("DEVICEHUB_LOG", "info")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the devicehub binary starts");
    let log = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    (child, log)
}

/// The JSON lines a successful run of an example client printed (it failed
/// the test with its stderr otherwise).
pub fn json_lines(output: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The body of `GET /metrics` at `addr`.
pub async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: devicehub\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The value of the sample `name` (with its labels, as written) in `text`.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Sends SIGTERM to `child` and waits for it to exit.
pub async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = child.id().expect("still running").to_string();
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    within("the process to exit after SIGTERM", child.wait())
        .await
        .unwrap()
}

/// The index a test wrote at the start of the payload (`"17"` or `"17:..."`).
pub fn index_of(reading: &devicehub::proto::Reading) -> u64 {
    let text = std::str::from_utf8(&reading.payload).unwrap();
    text.split(':').next().unwrap().parse().unwrap()
}

/// Publishes readings `first..first + count` (payload: the index) spread
/// over `devices` devices (`d{i % devices}`) at QoS 1, from a background
/// task, done when all are queued.
pub fn publish_spread(device: &TestDevice, first: u64, count: u64, devices: u64) -> JoinHandle<()> {
    let client = device.client.clone();
    tokio::spawn(async move {
        for i in first..first + count {
            let topic = format!("devices/d{}/readings", i % devices);
            client
                .publish(topic, QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
    })
}

/// Waits until the table holds each of the payloads `0..total` (once or
/// more).
pub async fn every_payload_stored(pg: &postgres::Postgres, total: u64) {
    eventually("every payload in the table", || async {
        let distinct: u64 = pg
            .psql("SELECT count(DISTINCT payload) FROM readings")
            .parse()
            .unwrap();
        (distinct == total).then_some(())
    })
    .await;
}

/// Runs the `devicehub` binary with `args` and `env`, expecting it to fail
/// at startup; returns what it wrote to stderr.
pub async fn startup_error(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "it started: {stderr}");
    stderr
}

/// Starts the binary against `broker` with a metrics listener (and
/// `extra` flags) and waits until it is subscribed; returns it with its
/// gRPC and metrics addresses. Its log is read and dropped.
pub async fn serve_with_metrics(
    broker: &BrokerUrl,
    extra: &[&str],
) -> (tokio::process::Child, String, String) {
    let url = broker.to_string();
    let mut args = vec![
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--mqtt-url",
        &url,
    ];
    args.extend_from_slice(extra);
    let (serve, mut log) = spawn_devicehub(&args, &[]);
    let [grpc, metrics] = logged_addrs(&mut log, ["gRPC listening", "metrics listening"]).await;
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    eventually("the service subscribed", || async {
        let text = scrape(&metrics).await;
        (sample(&text, "devicehub_mqtt_up") == Some(1.0)).then_some(())
    })
    .await;
    (serve, grpc, metrics)
}
