//! devicehub's benchmark harness: every scenario measures devicehub next to
//! a baseline in the same run (a bare MQTT client through the same broker,
//! or a gRPC health check) and reports the ratio, because this machine is
//! shared and noisy. Absolute numbers drift; ratios are what to compare.
//!
//! ```sh
//! cargo bench --bench devicehub                  # full run, embedded broker (minutes)
//! cargo bench --bench devicehub -- --mosquitto   # the same through a Mosquitto process
//! cargo bench --bench devicehub -- --smoke       # seconds; what `cargo test` runs
//! cargo bench --bench devicehub -- --only ingest,query   # some scenarios: ingest,
//!                             # fanout, latency, query, commands, secure, metrics, devices,
//!                             # store (needs PostgreSQL's server binaries, as the tests do),
//!                             # store-ingest (its ingest rows only), replicas (two
//!                             # instances next to one; always through Mosquitto),
//!                             # contention (the delivery path in-process, no broker),
//!                             # scan (ingest next to a loop of ListReadings matching nothing)
//! ```
//!
//! The service runs as its own process (the `devicehub` binary, pointed at
//! the broker with `--mqtt-url`) so that its CPU time and memory are its own;
//! the broker, publishers, bare subscribers and gRPC clients live here.
//! Everything binds to 127.0.0.1 on ephemeral ports, every loop is bounded
//! in count and time, and every process started is stopped.
//!
//! `DEVICEHUB_BENCH_BINARY=path` runs another build of the service (for
//! example the previous commit's release binary) under the same harness, so
//! two versions can be compared back to back on the same machine.

// Shared with the tests, which use more of them.
#[allow(dead_code)]
#[path = "../tests/common/pki.rs"]
mod pki;
#[allow(dead_code)]
#[path = "../tests/common/postgres.rs"]
mod postgres;
#[path = "../tests/common/tempdir.rs"]
mod tempdir;
#[allow(dead_code)]
#[path = "../tests/common/tokens.rs"]
mod tokens;

use std::{
    future::Future,
    net::SocketAddr,
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use devicehub::{
    config::BrokerUrl,
    proto::{
        device_hub_client::DeviceHubClient, watch_readings_response::Event as WatchEvent,
        ListReadingsRequest, SendCommandRequest, StreamCommandsRequest, WatchReadingsRequest,
    },
};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};
use tonic::transport::Channel;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// Scenario sizes: full (`cargo bench`) and smoke (`cargo test`, `--smoke`).
#[derive(Clone, Copy)]
struct Sizes {
    ingest_readings: u64,
    fanout_watchers: &'static [usize],
    fanout_rate: u64,
    fanout_secs: f64,
    latency_readings: u64,
    latency_rate: u64,
    query_readings: u64,
    query_devices: u64,
    query_iterations: usize,
    command_secs: f64,
    /// Devices (one reading each) for the device list scenario.
    devices: u64,
    /// Readings in the table for the store's page and replay scenario.
    stored_readings: u64,
    /// Readings replayed from the table (and from memory) per resume.
    replay_readings: u64,
    /// Readings each watcher thread receives in the contention scenario.
    contention_readings: u64,
}

const FULL: Sizes = Sizes {
    ingest_readings: 200_000,
    fanout_watchers: &[1, 10, 100, 1000],
    fanout_rate: 10_000,
    fanout_secs: 1.0,
    latency_readings: 5_000,
    latency_rate: 1_000,
    query_readings: 1_000_000,
    query_devices: 10_000,
    query_iterations: 300,
    command_secs: 3.0,
    devices: 100_000,
    stored_readings: 10_000_000,
    replay_readings: 1_000_000,
    contention_readings: 200_000,
};

const SMOKE: Sizes = Sizes {
    ingest_readings: 2_000,
    fanout_watchers: &[1, 10],
    fanout_rate: 1_000,
    fanout_secs: 0.5,
    latency_readings: 100,
    latency_rate: 500,
    query_readings: 5_000,
    query_devices: 100,
    query_iterations: 20,
    command_secs: 0.5,
    devices: 500,
    stored_readings: 20_000,
    replay_readings: 5_000,
    contention_readings: 5_000,
};

/// Upper bound on any wait, so a broken run ends instead of hanging.
const PATIENCE: Duration = Duration::from_secs(120);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(BARE_SUBSCRIBER_PROCESS) {
        return bare_subscriber_process(&args[2..]);
    }
    // `cargo bench` passes --bench; `cargo test` runs this target without it.
    let smoke = args.iter().any(|a| a == "--smoke") || !args.iter().any(|a| a == "--bench");
    let mosquitto = args.iter().any(|a| a == "--mosquitto");
    // `--only ingest,query` runs those scenarios alone.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_owned).collect::<Vec<_>>());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(
        if smoke { SMOKE } else { FULL },
        smoke,
        mosquitto,
        only,
    ));
}

async fn run(sizes: Sizes, smoke: bool, mosquitto: bool, only: Option<Vec<String>>) {
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name));
    let broker = Broker::start(mosquitto);
    println!(
        "devicehub benchmarks ({}; broker: {}; {} cores, {})",
        if smoke {
            "smoke run: sizes too small to mean anything"
        } else {
            "full run"
        },
        if mosquitto {
            "mosquitto"
        } else {
            "embedded rumqttd"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
    );
    println!(
        "{:<44} {:>16} {:>16} {:>8}  notes",
        "scenario", "devicehub", "baseline", "ratio"
    );
    let table = Table;

    let mut ran = 0;
    if wanted("ingest") {
        ingest(&table, &broker.url, sizes, PLAIN).await;
        ran += 1;
    }
    if wanted("fanout") {
        fan_out(&table, &broker.url, sizes, sizes.fanout_watchers, PLAIN).await;
        ran += 1;
    }
    if wanted("latency") {
        latency(&table, &broker.url, sizes).await;
        ran += 1;
    }
    if wanted("query") {
        query_and_memory(&table, &broker.url, sizes).await;
        ran += 1;
    }
    if wanted("scan") {
        scan_next_to_ingest(&table, &broker.url, sizes).await;
        ran += 1;
    }
    if wanted("commands") {
        commands(&table, &broker.url, sizes).await;
        ran += 1;
    }
    if wanted("secure") {
        secured(&table, &broker.url, sizes).await;
        ran += 1;
    }
    if wanted("devices") {
        device_list(&table, &broker.url, sizes).await;
        ran += 1;
    }
    if wanted("store") || wanted("store-ingest") {
        // `store-ingest`: the ingest comparison alone, without the
        // 10-million-row table.
        store(&table, &broker.url, sizes, wanted("store")).await;
        ran += 1;
    }
    if wanted("contention") {
        // Threads and runtimes of its own, off this runtime's thread.
        std::thread::scope(|s| s.spawn(|| contention(&table, sizes)).join().unwrap());
        ran += 1;
    }
    if wanted("replicas") {
        replicas(&table, sizes).await;
        ran += 1;
    }
    if wanted("metrics") {
        // Scenario 8: ingest and fan-out without and with /metrics (scraped
        // every second, four times as often as Prometheus' usual 15 s),
        // back to back. Compare the service CPU per reading or delivery.
        for variant in [PLAIN, SCRAPED] {
            ingest(&table, &broker.url, sizes, variant).await;
        }
        let counts = &sizes.fanout_watchers[sizes.fanout_watchers.len().saturating_sub(2)..];
        for variant in [PLAIN, SCRAPED] {
            fan_out(&table, &broker.url, sizes, counts, variant).await;
        }
        ran += 1;
    }
    drop(broker);
    println!("bench: {ran} scenario groups completed");
}

struct Table;

impl Table {
    fn row(&self, scenario: &str, ours: f64, baseline: f64, unit: &str, notes: &str) {
        let ratio = if baseline > 0.0 {
            ours / baseline
        } else {
            f64::NAN
        };
        println!(
            "{:<44} {:>12.1} {:<3} {:>12.1} {:<3} {:>8.3}  {notes}",
            scenario, ours, unit, baseline, unit, ratio
        );
    }
}

// ---------------------------------------------------------------- parts

/// How a scenario runs the service: a suffix for its rows, extra flags, and
/// the PostgreSQL cluster to store readings in (a fresh database per run).
#[derive(Clone, Copy)]
struct Variant<'a> {
    label: &'static str,
    args: &'static [&'static str],
    store: Option<&'a postgres::Postgres>,
}

const PLAIN: Variant = Variant {
    label: "",
    args: &[],
    store: None,
};

/// With `/metrics`, which [`Service::start`] then scrapes every second.
const SCRAPED: Variant = Variant {
    label: ", /metrics",
    args: &["--metrics-addr", "127.0.0.1:0"],
    store: None,
};

/// How often a service with `--metrics-addr` is scraped.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// Scrapes `GET /metrics` at `addr` every [`SCRAPE_INTERVAL`], like Prometheus.
async fn scrape_forever(addr: String) {
    let mut interval = tokio::time::interval(SCRAPE_INTERVAL);
    loop {
        interval.tick().await;
        let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
            continue;
        };
        let request = b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
        if stream.write_all(request).await.is_err() {
            continue;
        }
        let mut body = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut body).await;
        assert!(body.starts_with(b"HTTP/1.1 200"), "a scrape failed");
    }
}

/// The broker the run goes through.
struct Broker {
    url: BrokerUrl,
    mosquitto: Option<std::process::Child>,
    _dir: Option<tempdir::TempDir>,
}

impl Broker {
    fn start(mosquitto: bool) -> Self {
        if !mosquitto {
            let addr = devicehub::broker::start("127.0.0.1:0".parse().unwrap(), 1 << 20)
                .expect("embedded broker");
            return Self {
                url: BrokerUrl::from_addr(addr),
                mosquitto: None,
                _dir: None,
            };
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempdir::TempDir::new("bench");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\nmax_inflight_messages 1000\n"),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (apt-get install mosquitto)");
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            url: BrokerUrl {
                host: "127.0.0.1".into(),
                port,
                tls: false,
            },
            mosquitto: Some(child),
            _dir: Some(dir),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.mosquitto {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The devicehub binary as its own process.
struct Service {
    child: Child,
    addr: SocketAddr,
    /// Scrapes /metrics while the service runs with `--metrics-addr`.
    scraper: Option<tokio::task::JoinHandle<()>>,
    /// With TLS and auth: the CA clients trust, and the bearer token every
    /// call carries; the files the service reads.
    secured: Option<(String, String, tempdir::TempDir)>,
}

impl Service {
    async fn start(broker: &BrokerUrl, extra: &[&str]) -> Self {
        let binary = std::env::var_os("DEVICEHUB_BENCH_BINARY")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_devicehub").into());
        let mut child = Command::new(binary)
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--mqtt-url",
                &broker.to_string(),
            ])
            .args([
                "--buffer-max-readings",
                "2000000",
                "--buffer-max-bytes",
                "4000000000",
                "--max-watchers",
                "5000",
                "--max-watchers-per-client",
                "5000",
                // Fan-out opens its watchers over few connections.
                "--max-streams-per-connection",
                "5000",
            ])
            .args(extra)
            // The harness reads the startup lines logged at info; pass a
            // DEVICEHUB_LOG on, e.g. "info,devicehub::grpc=warn" to measure
            // commands without a log line each.
            .env(
                "DEVICEHUB_LOG",
                std::env::var("DEVICEHUB_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("devicehub binary");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut addr = None;
        let mut ready = false;
        let mut scraper = None;
        bounded("the service to start", async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("metrics listening") {
                    let at = line.find("addr=").unwrap() + 5;
                    let metrics = line[at..].split_whitespace().next().unwrap().to_owned();
                    scraper = Some(tokio::spawn(scrape_forever(metrics)));
                }
                if line.contains("gRPC listening") {
                    let at = line.find("addr=").unwrap() + 5;
                    addr = Some(
                        line[at..]
                            .split_whitespace()
                            .next()
                            .unwrap()
                            .parse()
                            .unwrap(),
                    );
                }
                if line.contains("subscribed to readings") {
                    ready = true;
                }
                if addr.is_some() && ready {
                    return;
                }
            }
        })
        .await;
        // Keep draining the log so the service never blocks on the pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            addr: addr.unwrap(),
            scraper,
            secured: None,
        }
    }

    /// The service with TLS on its gRPC port and JWT auth (ES256), as an
    /// operator would run it beyond loopback.
    async fn start_secured(broker: &BrokerUrl) -> Self {
        let dir = tempdir::TempDir::new("bench-secure");
        let (pki, signer) = (pki::Pki::new("bench CA"), tokens::Signer::es256());
        let args = pki::secured_service_args(dir.path(), &pki.server(), &signer.public_pem);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut service = Self::start(broker, &args).await;
        let token = signer.token("bench", "readings:read commands:send");
        service.secured = Some((pki.ca_cert, token, dir));
        service
    }

    async fn channel(&self) -> Channel {
        let Some((ca, _, _)) = &self.secured else {
            return Channel::from_shared(format!("http://{}", self.addr))
                .unwrap()
                .connect()
                .await
                .expect("gRPC channel");
        };
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        Channel::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("gRPC channel over TLS")
    }

    async fn client(&self) -> DeviceHubClient<Channel> {
        DeviceHubClient::new(self.channel().await)
    }

    /// `message` as a request, carrying the token when the service wants one.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some((_, token, _)) = &self.secured {
            let value = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// User + system CPU seconds of the service process so far.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&self.pid().to_string())
    }

    /// Resident memory of the service process, in bytes.
    fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    async fn stop(mut self) {
        if let Some(scraper) = self.scraper.take() {
            scraper.abort();
        }
        let pid = self.pid().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
        let _ = bounded("the service to stop", self.child.wait()).await;
    }
}

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A bare MQTT subscriber: the baseline consumer.
struct BareSubscriber {
    count: Arc<AtomicU64>,
    last: Arc<Mutex<Option<Instant>>>,
    latencies: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BareSubscriber {
    async fn start(broker: &BrokerUrl, id: &str, filter: &str, qos: QoS, epoch: Instant) -> Self {
        let mut options = MqttOptions::new(id, &broker.host, broker.port);
        options
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (count, last, latencies) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(None)),
            Arc::new(Mutex::new(Vec::new())),
        );
        let (c, l, lat) = (count.clone(), last.clone(), latencies.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client.try_subscribe(&filter, qos).unwrap()
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = Instant::now();
                        if let Some(sent) = sent_at(&p.payload) {
                            lat.lock()
                                .unwrap()
                                .push((now - epoch).as_nanos() as u64 - sent);
                        }
                        c.fetch_add(1, Ordering::Relaxed);
                        *l.lock().unwrap() = Some(now);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        bounded("the bare subscriber to subscribe", ready_rx)
            .await
            .unwrap();
        Self {
            count,
            last,
            latencies,
            task,
        }
    }
}

impl Drop for BareSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The argument that makes this program a [`BareSubscriberProcess`].
const BARE_SUBSCRIBER_PROCESS: &str = "--bare-subscriber-process";

/// A bare MQTT subscriber in a process of its own, like the service: the
/// ingest baseline, so that both sides cross the same process boundary and
/// neither shares a runtime with the broker and the publishers.
struct BareSubscriberProcess {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl BareSubscriberProcess {
    async fn start(broker: &BrokerUrl, id: &str, filter: &str, qos: QoS) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("this program"))
            .args([
                BARE_SUBSCRIBER_PROCESS,
                &broker.host,
                &broker.port.to_string(),
            ])
            .args([&(qos as u8).to_string(), filter, id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting a bare subscriber process");
        let stdin = child.stdin.take().expect("piped");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let ready = bounded("a bare subscriber process", lines.next_line()).await;
        assert_eq!(ready.ok().flatten().as_deref(), Some("ready"));
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Readings received so far, and when the last one arrived.
    async fn received(&mut self) -> (u64, Option<Instant>) {
        self.stdin
            .write_all(b"?\n")
            .await
            .expect("asking the subscriber");
        let line = bounded("the subscriber's answer", self.lines.next_line())
            .await
            .ok()
            .flatten()
            .expect("an answer");
        let now = Instant::now();
        let (count, age) = line.split_once(' ').expect("count and age");
        let age = age.parse().ok().map(Duration::from_nanos);
        (count.parse().expect("a count"), age.map(|age| now - age))
    }

    async fn stop(mut self) {
        drop(self.stdin); // it exits at the end of its input
        if bounded("a bare subscriber to exit", self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The child side of [`BareSubscriberProcess`]: args are host, port, QoS,
/// filter, client id. Prints `ready` once subscribed, then for each line read
/// `<count> <nanoseconds since the last arrival, or ->`.
fn bare_subscriber_process(args: &[String]) {
    let [host, port, qos, filter, id] = args else {
        panic!("{BARE_SUBSCRIBER_PROCESS} host port qos filter id");
    };
    let broker = BrokerUrl {
        host: host.clone(),
        port: port.parse().expect("a port"),
        tls: false,
    };
    let qos = rumqttc::qos(qos.parse().expect("a QoS")).expect("a QoS");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let bare = BareSubscriber::start(&broker, id, filter, qos, Instant::now()).await;
        let mut stdout = tokio::io::stdout();
        stdout.write_all(b"ready\n").await.expect("stdout");
        stdout.flush().await.expect("stdout");
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(_)) = lines.next_line().await {
            let count = bare.count.load(Ordering::Relaxed);
            let age = match *bare.last.lock().unwrap() {
                Some(last) => last.elapsed().as_nanos().to_string(),
                None => "-".to_owned(),
            };
            stdout
                .write_all(format!("{count} {age}\n").as_bytes())
                .await
                .expect("stdout");
            stdout.flush().await.expect("stdout");
        }
    });
}

/// The send time a publisher wrote into a payload: `{"t":<nanos>,...}`.
fn sent_at(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix("{\"t\":")?;
    rest[..rest.find(',')?].parse().ok()
}

/// A reading of about 60 bytes, stamped with its send time.
fn reading_payload(epoch: Instant, i: u64) -> Vec<u8> {
    format!(
        "{{\"t\":{},\"temp\":{:.2},\"hum\":{:.1},\"n\":{}}}",
        (Instant::now() - epoch).as_nanos(),
        20.0 + (i % 100) as f64 / 10.0,
        40.0 + (i % 50) as f64,
        i
    )
    .into_bytes()
}

/// Publishes `total` readings for `devices` devices from `publishers` MQTT
/// clients, as fast as the broker takes them, or at `rate` per second.
async fn publish(
    broker: &BrokerUrl,
    publishers: usize,
    total: u64,
    devices: u64,
    qos: QoS,
    rate: Option<u64>,
    epoch: Instant,
) {
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let mut options = MqttOptions::new(
            format!("bench-pub-{p}-{}", uuid::Uuid::now_v7().simple()),
            &broker.host,
            broker.port,
        );
        options
            .set_inflight(200)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let share = total / publishers as u64 + u64::from((p as u64) < total % publishers as u64);
        let interval = rate.map(|r| Duration::from_secs_f64(publishers as f64 / r as f64));
        tasks.push(tokio::spawn(async move {
            let driver = tokio::spawn(async move {
                // QoS 0/1 publishes are done once their acks (or writes) are.
                let mut outstanding = share as i64;
                while outstanding > 0 {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                            outstanding -= 1
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => outstanding -= 1,
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                // Flush and say goodbye.
                let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
            });
            let mut ticker = interval.map(tokio::time::interval);
            for i in 0..share {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let n = i * publishers as u64 + p as u64;
                let topic = format!("devices/dev-{}/readings", n % devices);
                client
                    .publish(topic, qos, false, reading_payload(epoch, n))
                    .await
                    .unwrap();
            }
            bounded("the publisher to finish", driver).await.unwrap();
            let _ = client.try_disconnect();
        }));
    }
    for task in tasks {
        bounded("publishers", task).await.unwrap();
    }
}

/// Waits until `count` stops growing for `quiet`, or reaches `target`.
async fn settle(target: u64, quiet: Duration, mut count: impl AsyncFnMut() -> u64) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    let (mut last, mut since) = (count().await, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = count().await;
        if now >= target || Instant::now() > deadline {
            return now;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > quiet {
            return now;
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

// ---------------------------------------------------------------- scenarios

/// Scenario 1, ingest: readings/s stored by devicehub vs received by a bare
/// subscriber on the same broker, both subscribed during the same publish
/// burst; and loss at QoS 0 and QoS 1.
/// Returns the rates stored, QoS 1 then QoS 0.
async fn ingest(table: &Table, broker: &BrokerUrl, sizes: Sizes, variant: Variant<'_>) -> Vec<f64> {
    let mut rates = Vec::new();
    for qos in [QoS::AtLeastOnce, QoS::AtMostOnce] {
        let qos_arg = if qos == QoS::AtMostOnce { "0" } else { "1" };
        let mut args = [&["--mqtt-subscribe-qos", qos_arg][..], variant.args].concat();
        let (store_url, client_id);
        if let Some(pg) = variant.store {
            // As in production: a persistent session, so unacknowledged
            // readings wait in the broker.
            store_url = pg.create_database(&format!("bench_ingest_qos{}", qos as u8));
            client_id = format!("devicehub-bench-store-{}", qos as u8);
            args.extend([
                "--store-url",
                &store_url,
                "--mqtt-client-id",
                &client_id,
                "--mqtt-persistent-session",
            ]);
        }
        let service = Service::start(broker, &args).await;
        let mut client = service.client().await;
        let epoch = Instant::now();
        let mut bare = BareSubscriberProcess::start(
            broker,
            &format!("bench-bare-ingest-{}", qos as u8),
            "devices/+/readings",
            qos,
        )
        .await;
        let total = sizes.ingest_readings;
        let (cpu_before, harness_cpu_before) = (service.cpu_seconds(), cpu_seconds("self"));
        let (start, start_wall) = (Instant::now(), SystemTime::now());
        publish(broker, 4, total, 1000, qos, None, epoch).await;

        // Wait for both to settle, then take the service's last arrival by
        // its own clock (`received_at`): polling its count only says when
        // the harness got round to looking, which on 2 busy cores was up to
        // a second late and made ingest look half as fast as it is.
        let mut poller = client.clone();
        let (ours, bare_total) = tokio::join!(
            settle(total, Duration::from_secs(2), async || stored_count(
                &mut poller
            )
            .await),
            settle(total, Duration::from_secs(2), async || bare
                .received()
                .await
                .0),
        );
        let bare_last = bare.received().await.1;
        let newest = client
            .list_readings(ListReadingsRequest {
                page_size: 1,
                ..Default::default()
            })
            .await
            .expect("the newest reading")
            .into_inner()
            .readings;
        let ours_secs = newest
            .first()
            .and_then(|r| r.received_at)
            .and_then(|t| SystemTime::try_from(t).ok())
            .and_then(|last| last.duration_since(start_wall).ok())
            .expect("the newest reading's received_at")
            .as_secs_f64();
        // Includes the idle wait for the count to settle: an upper bound.
        let cpu = service.cpu_seconds() - cpu_before;
        let harness_cpu = cpu_seconds("self") - harness_cpu_before;
        let bare_secs = (bare_last.unwrap_or(start) - start).as_secs_f64();
        let label = if qos == QoS::AtMostOnce {
            "QoS 0"
        } else {
            "QoS 1"
        };
        table.row(
            &format!(
                "1. ingest, {label}, 1000 devices{} (readings/s)",
                variant.label
            ),
            ours as f64 / ours_secs,
            bare_total as f64 / bare_secs,
            "/s",
            &format!(
                "stored {ours} / received {bare_total} of {total}; loss {} vs {}; \
                 service CPU {:.1} µs per reading ({:.0}% of a core), harness {:.0}%",
                total - ours.min(total),
                total - bare_total.min(total),
                cpu * 1e6 / ours.max(1) as f64,
                100.0 * cpu / ours_secs,
                100.0 * harness_cpu / ours_secs,
            ),
        );
        let _ = client.list_readings(ListReadingsRequest::default()).await;
        bare.stop().await;
        service.stop().await;
        rates.push(ours as f64 / ours_secs);
    }
    rates
}

/// How many readings the service holds: newest seq - oldest seq + 1
/// (sequence numbers are contiguous in the buffer).
async fn stored_count(client: &mut DeviceHubClient<Channel>) -> u64 {
    let seq = |oldest_first| ListReadingsRequest {
        page_size: 1,
        oldest_first,
        ..Default::default()
    };
    let newest = client
        .list_readings(seq(false))
        .await
        .map(|r| r.into_inner().readings)
        .unwrap_or_default();
    let oldest = client
        .list_readings(seq(true))
        .await
        .map(|r| r.into_inner().readings)
        .unwrap_or_default();
    match (newest.first(), oldest.first()) {
        (Some(n), Some(o)) => n.seq - o.seq + 1,
        _ => 0,
    }
}

/// WatchReadings streams that count what they receive.
struct Watchers {
    delivered: Arc<AtomicU64>,
    /// When the last reading arrived, at any of them.
    last: Arc<Mutex<Option<Instant>>>,
    /// Arrival latencies seen by the first watcher.
    latencies: Arc<Mutex<Vec<u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Opens `n` WatchReadings streams, 100 per HTTP/2 connection.
async fn watchers(service: &Service, n: usize, epoch: Instant) -> Watchers {
    let delivered = Arc::new(AtomicU64::new(0));
    let last = Arc::new(Mutex::new(None));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..n.div_ceil(100) {
        clients.push(service.client().await);
    }
    for i in 0..n {
        let mut client = clients[i / 100].clone();
        let mut stream = client
            .watch_readings(service.request(WatchReadingsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let (delivered, last, latencies) = (delivered.clone(), last.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                if let Some(WatchEvent::Reading(r)) = message.event {
                    let now = Instant::now();
                    if let (0, Some(sent)) = (i, sent_at(&r.payload)) {
                        latencies
                            .lock()
                            .unwrap()
                            .push((now - epoch).as_nanos() as u64 - sent);
                    }
                    delivered.fetch_add(1, Ordering::Relaxed);
                    *last.lock().unwrap() = Some(now);
                }
            }
        }));
    }
    Watchers {
        delivered,
        last,
        latencies,
        tasks,
    }
}

/// User + system CPU seconds so far of a process (`self` for this one).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0 // utime, stime; CLK_TCK is 100 on Linux
}

/// Scenario 2, fan-out: N watchers at a fixed offered rate; delivered/s, loss, and
/// the service's CPU seconds per million deliveries. Baseline: a bare
/// subscriber's received rate (the offered rate actually achieved).
async fn fan_out(
    table: &Table,
    broker: &BrokerUrl,
    sizes: Sizes,
    counts: &[usize],
    variant: Variant<'_>,
) {
    let service = Service::start(broker, variant.args).await;
    for &n in counts {
        let epoch = Instant::now();
        let bare = BareSubscriber::start(
            broker,
            &format!("bench-bare-fanout-{n}"),
            "devices/+/readings",
            QoS::AtLeastOnce,
            epoch,
        )
        .await;
        let watchers = watchers(&service, n, epoch).await;
        let delivered = watchers.delivered.clone();
        let total = (sizes.fanout_rate as f64 * sizes.fanout_secs) as u64;
        let cpu_before = service.cpu_seconds();
        let harness_cpu_before = cpu_seconds("self");
        let start = Instant::now();
        publish(
            broker,
            2,
            total,
            1000,
            QoS::AtLeastOnce,
            Some(sizes.fanout_rate),
            epoch,
        )
        .await;
        let want = total * n as u64;
        let got = settle(want, Duration::from_secs(2), async || {
            delivered.load(Ordering::Relaxed)
        })
        .await;
        // CPU over the whole window, rates up to the last arrival.
        let cpu = service.cpu_seconds() - cpu_before;
        let harness_cpu = cpu_seconds("self") - harness_cpu_before;
        let secs = (watchers.last.lock().unwrap().unwrap_or(start) - start).as_secs_f64();
        let bare_got = bare.count.load(Ordering::Relaxed);
        let bare_secs = (bare.last.lock().unwrap().unwrap_or(start) - start).as_secs_f64();
        table.row(
            &format!("2. fan-out to {n} watchers{} (deliveries/s)", variant.label),
            got as f64 / secs,
            bare_got as f64 / bare_secs * n as f64,
            "/s",
            &format!(
                "loss {} of {want}; service CPU {:.2} s per million deliveries, {:.0}% of a core \
                 (harness: broker, publishers, gRPC clients, {:.0}%)",
                want - got.min(want),
                cpu / (got.max(1) as f64 / 1e6),
                100.0 * cpu / secs,
                100.0 * harness_cpu / secs
            ),
        );
        drop(watchers);
    }
    service.stop().await;
}

/// Scenario 3, end-to-end latency at a steady rate: MQTT publish → gRPC watcher vs
/// publish → bare MQTT subscriber, same readings, same run.
async fn latency(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let service = Service::start(broker, &[]).await;
    let epoch = Instant::now();
    let bare = BareSubscriber::start(
        broker,
        "bench-bare-latency",
        "devices/+/readings",
        QoS::AtLeastOnce,
        epoch,
    )
    .await;
    let watchers = watchers(&service, 1, epoch).await;
    let (delivered, latencies) = (watchers.delivered.clone(), watchers.latencies.clone());
    publish(
        broker,
        1,
        sizes.latency_readings,
        100,
        QoS::AtLeastOnce,
        Some(sizes.latency_rate),
        epoch,
    )
    .await;
    settle(sizes.latency_readings, Duration::from_secs(2), async || {
        delivered.load(Ordering::Relaxed)
    })
    .await;
    let mut ours = latencies.lock().unwrap().clone();
    let mut floor = bare.latencies.lock().unwrap().clone();
    ours.sort_unstable();
    floor.sort_unstable();
    for (name, p) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
        let (a, b) = (percentile(&ours, p) / 1e3, percentile(&floor, p) / 1e3);
        table.row(
            &format!("3. latency {name} at {}/s (µs)", sizes.latency_rate),
            a,
            b,
            "µs",
            &format!("+{:.0} µs over the bare subscriber", a - b),
        );
    }
    drop(watchers);
    service.stop().await;
}

/// One health check: the floor of a unary call.
async fn check_health(mut health: HealthClient<Channel>) {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    health.check(request).await.unwrap();
}

/// A health client of `service`, and the sorted times of `n` health checks:
/// the floor of a unary call.
async fn health_floor(service: &Service, n: usize) -> (HealthClient<Channel>, Vec<u64>) {
    let health = HealthClient::new(service.channel().await);
    let floor = time_calls(n, || check_health(health.clone())).await;
    (health, floor)
}

/// Scenario 9: ListDevices with `sizes.devices` devices known: every page of
/// 100 in order (following the tokens), and pages by prefix. Baseline: a
/// health check right after each page, so that both meet the machine at the
/// same moments (on this VM the tail comes in bursts of a few milliseconds
/// every few hundred that hit a health check as much as a page).
async fn device_list(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    use devicehub::proto::ListDevicesRequest;
    let service = Service::start(broker, &[]).await;
    let mut client = service.client().await;
    let n = sizes.devices;
    publish(broker, 4, n, n, QoS::AtLeastOnce, None, Instant::now()).await;
    let deadline = Instant::now() + PATIENCE;
    while stored_count(&mut client).await < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle_cpu(&service).await;
    let health = HealthClient::new(service.channel().await);
    let mut beside = Vec::new();
    let timed_health = async |beside: &mut Vec<u64>| {
        let start = Instant::now();
        check_health(health.clone()).await;
        beside.push(start.elapsed().as_nanos() as u64);
    };

    // Every page, in order, three times: a warm-up, a pass for the
    // service's CPU time per page, a pass timing each page (and the health
    // check after it).
    let mut times = Vec::new();
    let (mut token, mut listed, mut pass) = (String::new(), 0, 0);
    let (mut cpu_before, mut cpu_per_page, mut pages) = (0.0, 0.0, 0);
    loop {
        let start = Instant::now();
        let page = client
            .list_devices(ListDevicesRequest {
                page_size: 100,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        token = page.next_page_token;
        if pass < 2 {
            pages += 1;
            if token.is_empty() {
                if pass == 1 {
                    cpu_per_page = (service.cpu_seconds() - cpu_before) / f64::from(pages);
                }
                (pass, cpu_before, pages) = (pass + 1, service.cpu_seconds(), 0);
            }
            continue;
        }
        times.push(start.elapsed().as_nanos() as u64);
        timed_health(&mut beside).await;
        listed += page.devices.len();
        if token.is_empty() {
            break;
        }
    }
    times.sort_unstable();
    beside.sort_unstable();
    let mut prefix_beside = Vec::new();
    let mut by_prefix = Vec::new();
    for i in 0..sizes.query_iterations {
        let prefix = format!("dev-{}", (i as u64 * 7919) % 10);
        let start = Instant::now();
        client
            .list_devices(ListDevicesRequest {
                page_size: 100,
                device_id_prefix: prefix,
                ..Default::default()
            })
            .await
            .unwrap();
        by_prefix.push(start.elapsed().as_nanos() as u64);
        timed_health(&mut prefix_beside).await;
    }
    by_prefix.sort_unstable();
    prefix_beside.sort_unstable();
    for (name, times, beside) in [
        ("every page in turn", &times, &beside),
        ("by prefix", &by_prefix, &prefix_beside),
    ] {
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            table.row(
                &format!("9. devices: page of 100, {name} {label} (µs)"),
                percentile(times, p) / 1e3,
                percentile(beside, p) / 1e3,
                "µs",
                &format!(
                    "{listed} devices listed of {n}, each with its newest reading (~60 B JSON); \
                     service CPU {:.0} µs per page over the full pass; baseline: a health check \
                     right after each page",
                    cpu_per_page * 1e6
                ),
            );
        }
    }
    service.stop().await;
}

/// Scenarios 4 and 5: query latency and throughput on a full buffer, and memory per
/// buffered reading.
async fn query_and_memory(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let service = Service::start(broker, &[]).await;
    let mut client = service.client().await;
    let rss_empty = service.rss_bytes();
    let epoch = Instant::now();
    publish(
        broker,
        4,
        sizes.query_readings,
        sizes.query_devices,
        QoS::AtLeastOnce,
        None,
        epoch,
    )
    .await;
    let deadline = Instant::now() + PATIENCE;
    while stored_count(&mut client).await < sizes.query_readings && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let count = stored_count(&mut client).await;
    let rss_full = service.rss_bytes();
    // Filling the buffer keeps the broker busy for a while after the service
    // has stored everything; latency measured before that settles is the
    // broker's, not the queries'.
    settle_cpu(&service).await;
    // Payloads are about 60 bytes; topics "devices/dev-NNNN/readings" are
    // shared per device, so count them once per reading to be conservative.
    let sample = client
        .list_readings(ListReadingsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .readings;
    let payload =
        sample.iter().map(|r| r.payload.len()).sum::<usize>() as f64 / sample.len().max(1) as f64;
    let topic =
        sample.iter().map(|r| r.topic.len()).sum::<usize>() as f64 / sample.len().max(1) as f64;
    let per_reading = (rss_full.saturating_sub(rss_empty)) as f64 / count.max(1) as f64;
    table.row(
        "5. memory per buffered reading (bytes)",
        per_reading - payload - topic,
        64.0,
        "B",
        &format!(
            "{count} readings: RSS {:.0} MiB (empty {:.0} MiB), {per_reading:.0} B each incl. {payload:.0} B payload and {topic:.0} B topic; baseline is the 64 B target",
            rss_full as f64 / (1 << 20) as f64,
            rss_empty as f64 / (1 << 20) as f64
        ),
    );

    let (health, floor) = health_floor(&service, sizes.query_iterations).await;
    let devices = sizes.query_devices;
    let device = move |i: usize| format!("dev-{}", (i as u64 * 7919) % devices);
    let queries: Vec<(&str, MakeQuery)> = vec![
        (
            "device page of 100",
            Box::new(move |i| ListReadingsRequest {
                device_id: device(i),
                page_size: 100,
                ..Default::default()
            }),
        ),
        (
            "newest page of 100",
            Box::new(|_| ListReadingsRequest {
                page_size: 100,
                ..Default::default()
            }),
        ),
        (
            "topic filter devices/+/readings, 100",
            Box::new(|_| ListReadingsRequest {
                topic_filter: "devices/+/readings".into(),
                page_size: 100,
                ..Default::default()
            }),
        ),
        (
            "topic filter of one device, 100",
            Box::new(move |i| ListReadingsRequest {
                topic_filter: format!("devices/{}/#", device(i)),
                page_size: 100,
                ..Default::default()
            }),
        ),
    ];
    for (name, make) in &queries {
        let iterations = if name.contains("one device") {
            sizes.query_iterations.min(30)
        } else {
            sizes.query_iterations
        };
        let mut i = 0;
        let times = time_calls(iterations, || {
            let mut client = client.clone();
            i += 1;
            let request = make(i);
            async move {
                client.list_readings(request).await.unwrap();
            }
        })
        .await;
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            table.row(
                &format!("4. query: {name} {label} (µs)"),
                percentile(&times, p) / 1e3,
                percentile(&floor, p) / 1e3,
                "µs",
                &format!("{count} buffered; baseline: a health check"),
            );
        }
    }
    let (queries_per_sec, checks_per_sec) = (
        throughput(8, Duration::from_secs_f64(sizes.command_secs), || {
            let mut client = client.clone();
            async move {
                client
                    .list_readings(ListReadingsRequest {
                        device_id: "dev-1".into(),
                        page_size: 100,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        })
        .await,
        throughput(8, Duration::from_secs_f64(sizes.command_secs), || {
            check_health(health.clone())
        })
        .await,
    );
    table.row(
        "4. query throughput, 8 clients (queries/s)",
        queries_per_sec,
        checks_per_sec,
        "/s",
        "device pages of 100; baseline: health checks",
    );
    service.stop().await;
}

/// Scenario 13: ListReadings whose filter matches nothing, against a buffer
/// of `sizes.query_readings`, next to ingest. Such a call looks at readings
/// under the buffer's read lock, which ingest's pushes wait for: publish →
/// watcher latency at `sizes.latency_rate` without, then with, one client
/// calling it in a tight loop (first pages, the most a call looks at), same
/// service and watcher, back to back. Also the call's own latency next to a
/// health check, and one walk through all its pages following the tokens.
async fn scan_next_to_ingest(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let service = Service::start(broker, &[]).await;
    let mut client = service.client().await;
    let epoch = Instant::now();
    publish(
        broker,
        4,
        sizes.query_readings,
        sizes.query_devices,
        QoS::AtLeastOnce,
        None,
        epoch,
    )
    .await;
    let deadline = Instant::now() + PATIENCE;
    while stored_count(&mut client).await < sizes.query_readings && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let count = stored_count(&mut client).await;
    settle_cpu(&service).await;
    // Topics are "devices/dev-N/readings": this matches none of them, and
    // its `+` at the device level keeps the device index out of it (a
    // literal device there would be looked up, not scanned).
    let nothing = ListReadingsRequest {
        topic_filter: "devices/+/nothing".into(),
        page_size: 100,
        ..Default::default()
    };

    let (_health, floor) = health_floor(&service, sizes.query_iterations).await;
    let times = time_calls(sizes.query_iterations, || {
        let (mut client, request) = (client.clone(), nothing.clone());
        async move {
            client.list_readings(request).await.unwrap();
        }
    })
    .await;
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        table.row(
            &format!("13. scan: match-nothing page {label} (µs)"),
            percentile(&times, p) / 1e3,
            percentile(&floor, p) / 1e3,
            "µs",
            &format!("{count} buffered, first page; baseline: a health check"),
        );
    }
    // What a client following tokens to the end pays, in pages and time.
    let (start, mut pages, mut token) = (Instant::now(), 0u64, String::new());
    loop {
        let page = client
            .list_readings(ListReadingsRequest {
                page_token: token,
                ..nothing.clone()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.readings.is_empty(), "the filter matches nothing");
        if page.next_page_token.is_empty() || start.elapsed() > PATIENCE {
            break;
        }
        token = page.next_page_token;
    }
    let walk = start.elapsed();
    table.row(
        "13. scan: match-nothing, every page (ms)",
        walk.as_secs_f64() * 1e3,
        percentile(&floor, 0.5) / 1e3 * pages as f64 / 1e3,
        "ms",
        &format!("{pages} pages to the end of {count}; baseline: as many health checks (p50)"),
    );

    let watchers = watchers(&service, 1, epoch).await;
    let (delivered, latencies) = (watchers.delivered.clone(), watchers.latencies.clone());
    // Rounds alternate without and with the loop, so that the machine's
    // drift (other builders share it) falls on both alike.
    let (mut quiet, mut loud) = (Vec::new(), Vec::new());
    let (mut calls, mut looped) = (0u64, Duration::ZERO);
    let per_round = sizes.latency_readings / 2;
    for looping in [false, true, false, true] {
        latencies.lock().unwrap().clear();
        let before = delivered.load(Ordering::Relaxed);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lister = looping.then(|| {
            let (mut client, request, stop) = (client.clone(), nothing.clone(), stop.clone());
            tokio::spawn(async move {
                let (start, mut calls) = (Instant::now(), 0u64);
                while !stop.load(Ordering::Relaxed) {
                    client.list_readings(request.clone()).await.unwrap();
                    calls += 1;
                }
                (calls, start.elapsed())
            })
        });
        publish(
            broker,
            1,
            per_round,
            100,
            QoS::AtLeastOnce,
            Some(sizes.latency_rate),
            epoch,
        )
        .await;
        settle(before + per_round, Duration::from_secs(2), async || {
            delivered.load(Ordering::Relaxed)
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        if let Some(task) = lister {
            let (n, took) = bounded("the list loop", task).await.unwrap();
            (calls, looped) = (calls + n, looped + took);
        }
        let round = latencies.lock().unwrap().clone();
        match looping {
            true => loud.extend(round),
            false => quiet.extend(round),
        }
    }
    quiet.sort_unstable();
    loud.sort_unstable();
    let calls_per_sec = calls as f64 / looped.as_secs_f64().max(1e-9);
    for (name, p) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
        table.row(
            &format!(
                "13. scan: latency {name} at {}/s, list loop (µs)",
                sizes.latency_rate
            ),
            percentile(&loud, p) / 1e3,
            percentile(&quiet, p) / 1e3,
            "µs",
            &format!(
                "publish → watcher, {count} buffered, {calls_per_sec:.0} match-nothing calls/s; baseline: no loop, rounds alternating in the same run ({} and {} readings)",
                loud.len(),
                quiet.len()
            ),
        );
    }
    drop(watchers);
    service.stop().await;
}

/// Scenario 7, the cost of TLS and auth on the gRPC port: a plaintext
/// service and a secured one (TLS, a JWT checked on every call) on the same
/// broker at once, one watcher each on the same readings (latency), then the
/// same ListReadings calls against both.
async fn secured(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let plain = Service::start(broker, &[]).await;
    let secure = Service::start_secured(broker).await;
    let epoch = Instant::now();
    let (plain_watch, secure_watch) = (
        watchers(&plain, 1, epoch).await,
        watchers(&secure, 1, epoch).await,
    );
    publish(
        broker,
        1,
        sizes.latency_readings,
        100,
        QoS::AtLeastOnce,
        Some(sizes.latency_rate),
        epoch,
    )
    .await;
    for watch in [&plain_watch, &secure_watch] {
        let delivered = watch.delivered.clone();
        settle(sizes.latency_readings, Duration::from_secs(2), async || {
            delivered.load(Ordering::Relaxed)
        })
        .await;
    }
    let sorted = |w: &Watchers| {
        let mut v = w.latencies.lock().unwrap().clone();
        v.sort_unstable();
        v
    };
    let (ours, floor) = (sorted(&secure_watch), sorted(&plain_watch));
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (a, b) = (percentile(&ours, p) / 1e3, percentile(&floor, p) / 1e3);
        table.row(
            &format!("7. TLS + auth: latency {name} (µs)"),
            a,
            b,
            "µs",
            &format!(
                "{:+.0} µs; baseline: the plaintext service, same readings",
                a - b
            ),
        );
    }
    drop((plain_watch, secure_watch));
    let queries: [(&str, ListReadingsRequest); 2] = [
        (
            "newest page of 100",
            ListReadingsRequest {
                page_size: 100,
                ..Default::default()
            },
        ),
        (
            "device page of 100",
            ListReadingsRequest {
                device_id: "dev-1".into(),
                page_size: 100,
                ..Default::default()
            },
        ),
    ];
    let (plain_client, secure_client) = (plain.client().await, secure.client().await);
    for (name, request) in &queries {
        let mut times = Vec::new();
        for (service, client) in [(&secure, &secure_client), (&plain, &plain_client)] {
            times.push(
                time_calls(sizes.query_iterations, || {
                    let mut client = client.clone();
                    let request = service.request(request.clone());
                    async move {
                        client.list_readings(request).await.unwrap();
                    }
                })
                .await,
            );
        }
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            table.row(
                &format!("7. TLS + auth: query {name} {label} (µs)"),
                percentile(&times[0], p) / 1e3,
                percentile(&times[1], p) / 1e3,
                "µs",
                &format!(
                    "{} buffered; baseline: the plaintext service",
                    sizes.latency_readings
                ),
            );
        }
    }
    plain.stop().await;
    secure.stop().await;
}

/// Builds the i-th request of a query scenario.
type MakeQuery = Box<dyn Fn(usize) -> ListReadingsRequest>;

/// Waits (at most 20 s) until the service and the harness each used under a
/// tenth of a core over the last 200 ms.
async fn settle_cpu(service: &Service) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut before = (service.cpu_seconds(), cpu_seconds("self"));
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = (service.cpu_seconds(), cpu_seconds("self"));
        if now.0 - before.0 < 0.02 && now.1 - before.1 < 0.02 {
            return;
        }
        before = now;
    }
}

/// Runs `f` `n` times, one at a time, after a tenth as many untimed calls,
/// and returns the sorted nanoseconds.
async fn time_calls<F, Fut>(n: usize, mut f: F) -> Vec<u64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    // Warm-up, untimed: whatever runs first after the buffer was filled
    // otherwise pays for the broker and the service settling down.
    for _ in 0..n / 10 {
        f().await;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        f().await;
        times.push(start.elapsed().as_nanos() as u64);
    }
    times.sort_unstable();
    times
}

/// Keeps `workers` calls of `f` in flight for `duration`; calls per second.
async fn throughput<F, Fut>(workers: usize, duration: Duration, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    let mut done = 0u64;
    for _ in 0..workers {
        running.spawn(f());
    }
    while let Some(result) = running.join_next().await {
        result.expect("call");
        done += 1;
        if start.elapsed() < duration {
            running.spawn(f());
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// Scenario 6, commands: SendCommand QoS 1 with 64 concurrent callers vs a bare
/// rumqttc QoS 1 publisher with 64 publishes in flight, same broker.
async fn commands(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let service = Service::start(broker, &[]).await;
    let client = service.client().await;
    let duration = Duration::from_secs_f64(sizes.command_secs);
    let ours = throughput(64, duration, || {
        let mut client = client.clone();
        async move {
            client
                .send_command(SendCommandRequest {
                    device_id: "dev-1".into(),
                    command: "PING".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    })
    .await;
    let (cpu_before, harness_cpu_before) = (service.cpu_seconds(), cpu_seconds("self"));
    let stream_start = Instant::now();
    let streamed = stream_commands(client.clone(), 64, duration).await;
    let stream_secs = stream_start.elapsed().as_secs_f64();
    let stream_cpu = service.cpu_seconds() - cpu_before;
    let stream_harness_cpu = cpu_seconds("self") - harness_cpu_before;

    let mut options = MqttOptions::new("bench-bare-commands", &broker.host, broker.port);
    options.set_inflight(64);
    let (bare, mut eventloop) = AsyncClient::new(options, 64);
    let acked = Arc::new(AtomicU64::new(0));
    let counter = acked.clone();
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    let start = Instant::now();
    let payload = br#"{"id":"01a2145b-58c7-741b-93c5-feaf7e34ec99","command":"PING"}"#;
    while start.elapsed() < duration {
        bare.publish(
            "devices/dev-1/commands",
            QoS::AtLeastOnce,
            false,
            &payload[..],
        )
        .await
        .unwrap();
    }
    let baseline = acked.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    driver.abort();
    // What gRPC alone allows here: unary calls that do nothing.
    let health = HealthClient::new(
        Channel::from_shared(format!("http://{}", service.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let grpc_floor = throughput(64, duration, || check_health(health.clone())).await;
    table.row(
        "6. commands, QoS 1, 64 callers (calls/s)",
        ours,
        baseline,
        "/s",
        &format!(
            "baseline: bare rumqttc acked publishes/s, 64 in flight; gRPC health checks, 64 callers: {grpc_floor:.0}/s ({:.2}x)",
            ours / grpc_floor
        ),
    );
    table.row(
        "6. commands, StreamCommands, QoS 1, 64 in flight (commands/s)",
        streamed,
        baseline,
        "/s",
        &format!(
            "one stream; baseline: bare rumqttc acked publishes/s, 64 in flight; \
             service {:.0} µs CPU per command ({:.0}% of a core), harness {:.0}%",
            stream_cpu * 1e6 / (streamed * stream_secs).max(1.0),
            100.0 * stream_cpu / stream_secs,
            100.0 * stream_harness_cpu / stream_secs,
        ),
    );
    service.stop().await;
}

/// Commands per second through one StreamCommands stream that keeps
/// `in_flight` commands outstanding for `duration`.
async fn stream_commands(
    mut client: DeviceHubClient<Channel>,
    in_flight: u64,
    duration: Duration,
) -> f64 {
    let request = |request_id| StreamCommandsRequest {
        request_id,
        command: Some(SendCommandRequest {
            device_id: "dev-1".into(),
            command: "PING".into(),
            ..Default::default()
        }),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(in_flight as usize);
    for id in 0..in_flight {
        tx.send(request(id)).await.unwrap();
    }
    let start = Instant::now();
    let mut responses = client
        .stream_commands(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (mut sent, mut done) = (in_flight, 0);
    while let Some(response) = bounded("a command's response", responses.message())
        .await
        .unwrap()
    {
        assert_eq!(response.status_code, 0, "{response:?}");
        done += 1;
        if start.elapsed() < duration {
            tx.send(request(sent)).await.unwrap();
            sent += 1;
        } else if done == sent {
            break;
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}

/// Scenario 10, the PostgreSQL store (a cluster of its own, PostgreSQL's
/// default settings: every commit flushed to disk):
/// - ingest with the store next to memory-only, same broker, back to back;
/// - pages of 100 from `sizes.stored_readings` readings in the table (none
///   in memory), newest, by device and by time range; baseline: a health
///   check;
/// - a resume replayed from the table next to one replayed from memory.
async fn store(table: &Table, broker: &BrokerUrl, sizes: Sizes, pages: bool) {
    let pg = postgres::Postgres::start_with("");
    let memory = ingest(table, broker, sizes, PLAIN).await;
    let stored = ingest(
        table,
        broker,
        sizes,
        Variant {
            label: ", store",
            args: &[],
            store: Some(&pg),
        },
    )
    .await;
    for ((label, memory), stored) in ["QoS 1", "QoS 0"].iter().zip(memory).zip(stored) {
        table.row(
            &format!("10. ingest with the store, {label} (readings/s)"),
            stored,
            memory,
            "/s",
            "baseline: memory only, the run just before; target ≥ 0.7",
        );
    }
    if !pages {
        return;
    }

    // A table of `stored_readings` readings of up to 10 000 devices (1 000
    // readings each at least), one a millisecond, written by SQL
    // (publishing them would take the broker minutes); the service started
    // after it, so nothing is in memory.
    let total = sizes.stored_readings;
    let devices = (total / 1000).clamp(1, 10_000);
    let url = pg.create_database("bench_pages");
    let service = Service::start(broker, &["--store-url", &url]).await;
    service.stop().await; // the migrations ran
    pg.psql_in(
        "bench_pages",
        &format!(
            "INSERT INTO readings (seq, device_id, topic, payload, qos, retained, received_at, kind) \
             SELECT s, 'dev-' || (s % {devices}), 'devices/dev-' || (s % {devices}) || '/readings', \
                    convert_to('{{\"temperature\":21.5,\"humidity\":40,\"i\":' || s || '}}', 'UTF8'), \
                    1, false, timestamptz '2026-01-01' + s * interval '1 millisecond', 0 \
             FROM generate_series(1, {total}) s"
        ),
    );
    pg.psql_in(
        "bench_pages",
        &format!("UPDATE devicehub_sequence SET next_seq = {}", total + 1),
    );
    pg.psql_in("bench_pages", "VACUUM ANALYZE readings");
    let service = Service::start(broker, &["--store-url", &url]).await;
    let client = service.client().await;
    let (_health, floor) = health_floor(&service, sizes.query_iterations).await;
    let at = move |i: usize| {
        // At least a minute (60 000 readings) before the table's end, so
        // each range holds a full page.
        let ms = 1 + (i as u64 * 7_919_993) % total.saturating_sub(60_000).max(1);
        prost_types::Timestamp {
            seconds: 1_767_225_600 + (ms / 1000) as i64,
            nanos: (ms % 1000) as i32 * 1_000_000,
        }
    };
    let queries: Vec<(&str, MakeQuery)> = vec![
        (
            "newest page of 100",
            Box::new(|_| ListReadingsRequest {
                page_size: 100,
                ..Default::default()
            }),
        ),
        (
            "device page of 100",
            Box::new(move |i| ListReadingsRequest {
                device_id: format!("dev-{}", (i as u64 * 7919) % devices),
                page_size: 100,
                ..Default::default()
            }),
        ),
        (
            "time range page of 100",
            Box::new(move |i| {
                let start = at(i);
                let end = prost_types::Timestamp {
                    seconds: start.seconds + 60,
                    ..start
                };
                ListReadingsRequest {
                    start_time: Some(start),
                    end_time: Some(end),
                    oldest_first: true,
                    page_size: 100,
                    ..Default::default()
                }
            }),
        ),
    ];
    for (name, make) in &queries {
        let mut i = 0;
        let times = time_calls(sizes.query_iterations, || {
            let mut client = client.clone();
            i += 1;
            let request = make(i);
            async move {
                let page = client.list_readings(request).await.unwrap().into_inner();
                assert_eq!(page.readings.len(), 100, "a full page from the table");
            }
        })
        .await;
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            table.row(
                &format!("10. store: {name} {label} (µs)"),
                percentile(&times, p) / 1e3,
                percentile(&floor, p) / 1e3,
                "µs",
                &format!("{total} in the table ({devices} devices), none in memory; baseline: a health check; target p99 ≤ 10 ms"),
            );
        }
    }

    // Resumes: from the table's oldest reading, and from the oldest of as
    // many readings published through the broker (in memory).
    let replay = sizes.replay_readings;
    publish(
        broker,
        4,
        replay,
        1000,
        QoS::AtLeastOnce,
        None,
        Instant::now(),
    )
    .await;
    let mut lister = client.clone();
    let deadline = Instant::now() + PATIENCE;
    while stored_count(&mut lister).await < total + replay && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle_cpu(&service).await;
    let from_table = replay_rate(&client, 0, replay).await;
    let from_memory = replay_rate(&client, total, replay).await;
    table.row(
        "10. store: resume replay (readings/s)",
        from_table,
        from_memory,
        "/s",
        &format!("{replay} readings from the table; baseline: {replay} from memory"),
    );
    service.stop().await;
}

/// Readings per second a WatchReadings resumed after `after_seq` delivers,
/// over its first `n` readings.
async fn replay_rate(client: &DeviceHubClient<Channel>, after_seq: u64, n: u64) -> f64 {
    let start = Instant::now();
    let mut stream = client
        .clone()
        .watch_readings(WatchReadingsRequest {
            after_seq: Some(after_seq),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    bounded("the replay", async {
        while received < n {
            match stream.message().await.unwrap().unwrap().event {
                Some(WatchEvent::Reading(_)) => received += 1,
                other => panic!("expected a reading, got {other:?}"),
            }
        }
    })
    .await;
    n as f64 / start.elapsed().as_secs_f64()
}

/// Scenario 11, replicas (issue 13): the same work on one instance with the
/// store, on one in a share group (its memory fed by the tail) and on two
/// in one share group, back to back. Always through Mosquitto (shared
/// subscriptions), whatever broker the rest of the run uses.
///
/// - ingest: QoS 1 readings at full speed, each instance watched by one
///   stream; the rate is of readings visible on every instance (the last
///   arrival at any watcher), so with two it includes the tail;
/// - fan-out: 100 watchers spread evenly over the instances at the fan-out
///   rate; service CPU summed over the instances;
/// - latency: publish → watcher at the latency scenario's steady rate, one
///   watcher per instance.
async fn replicas(table: &Table, sizes: Sizes) {
    let broker = Broker::start(true);
    let pg = postgres::Postgres::start_with("");
    let mut baseline: Option<Replicated> = None;
    let setups = [
        ("1 instance", 1, false),
        ("1 in a share group", 1, true),
        ("2 in a share group", 2, true),
    ];
    for (label, instances, group) in setups {
        let db = format!("bench_replicas_{instances}_{}", group as u8);
        let url = pg.create_database(&db);
        let mut services = Vec::new();
        for i in 0..instances {
            let id = format!("devicehub-{db}-{i}");
            let mut args = vec![
                "--store-url",
                &url,
                "--mqtt-client-id",
                &id,
                "--mqtt-persistent-session",
            ];
            if group {
                args.extend(["--mqtt-share-group", "bench"]);
            }
            services.push(Service::start(&broker.url, &args).await);
        }
        let now = Replicated::measure(&broker.url, &services, sizes).await;
        for service in services {
            service.stop().await;
        }
        let base = baseline.get_or_insert_with(|| now.clone());
        let suffix = "baseline: 1 instance";
        table.row(
            &format!("11. replicas: ingest, {label} (readings/s)"),
            now.ingest,
            base.ingest,
            "/s",
            &format!("{}; {suffix}", now.ingest_notes),
        );
        table.row(
            &format!("11. replicas: fan-out to 100, {label} (CPU s per million)"),
            now.fanout_cpu,
            base.fanout_cpu,
            "s",
            &format!("{}; {suffix}", now.fanout_notes),
        );
        table.row(
            &format!(
                "11. replicas: latency at {}/s, {label} (p99 ms)",
                sizes.latency_rate
            ),
            now.latency_p99,
            base.latency_p99,
            "ms",
            &format!("{}; {suffix}", now.latency_notes),
        );
    }
}

/// What scenario 11 measures of one setup.
#[derive(Clone)]
struct Replicated {
    ingest: f64,
    ingest_notes: String,
    fanout_cpu: f64,
    fanout_notes: String,
    latency_p99: f64,
    latency_notes: String,
}

impl Replicated {
    async fn measure(broker: &BrokerUrl, services: &[Service], sizes: Sizes) -> Self {
        let instances = services.len() as u64;
        let cpu = || services.iter().map(Service::cpu_seconds).sum::<f64>();

        // Ingest at full speed, one watcher per instance.
        let epoch = Instant::now();
        let each = Self::watch(services, 1, epoch).await;
        let total = sizes.ingest_readings;
        let cpu_before = cpu();
        let start = Instant::now();
        publish(broker, 4, total, 1000, QoS::AtLeastOnce, None, epoch).await;
        let (got, last) = Self::settle(&each, total * instances, start).await;
        let ingest = got as f64 / instances as f64 / (last - start).as_secs_f64();
        let ingest_notes = format!(
            "visible on every instance: {got} of {}; service CPU {:.1} µs per reading \
             (all instances)",
            total * instances,
            (cpu() - cpu_before) * 1e6 / total as f64
        );
        drop(each);

        // Fan-out: 100 watchers over the instances, at the fan-out rate.
        let epoch = Instant::now();
        let each = Self::watch(services, 100, epoch).await;
        let total = (sizes.fanout_rate as f64 * sizes.fanout_secs) as u64;
        let cpu_before = cpu();
        let start = Instant::now();
        let rate = Some(sizes.fanout_rate);
        publish(broker, 2, total, 1000, QoS::AtLeastOnce, rate, epoch).await;
        let (got, last) = Self::settle(&each, total * 100, start).await;
        let fanout_cpu = (cpu() - cpu_before) / (got.max(1) as f64 / 1e6);
        let fanout_notes = format!(
            "delivered {got} of {} at {:.0}/s",
            total * 100,
            got as f64 / (last - start).as_secs_f64()
        );
        drop(each);

        // Latency at a steady, low rate, one watcher per instance: what the
        // tail adds (commit → NOTIFY → read back) where CPU is not short.
        let epoch = Instant::now();
        let each = Self::watch(services, 1, epoch).await;
        let total = sizes.latency_readings;
        let start = Instant::now();
        let rate = Some(sizes.latency_rate);
        publish(broker, 1, total, 100, QoS::AtLeastOnce, rate, epoch).await;
        Self::settle(&each, total * instances, start).await;
        let mut latencies: Vec<u64> = each
            .iter()
            .flat_map(|w| w.latencies.lock().unwrap().clone())
            .collect();
        latencies.sort_unstable();
        let latency_notes = format!(
            "publish → watcher, every instance; p50 {:.2} ms",
            percentile(&latencies, 0.5) / 1e6
        );
        Self {
            ingest,
            ingest_notes,
            fanout_cpu,
            fanout_notes,
            latency_p99: percentile(&latencies, 0.99) / 1e6,
            latency_notes,
        }
    }

    /// `n` watchers spread evenly over `services`.
    async fn watch(services: &[Service], n: usize, epoch: Instant) -> Vec<Watchers> {
        let mut each = Vec::new();
        for service in services {
            each.push(watchers(service, n.div_ceil(services.len()), epoch).await);
        }
        each
    }

    /// Waits until `each` delivered `want` in all (or stopped), and returns
    /// what they did and when the last arrived.
    async fn settle(each: &[Watchers], want: u64, start: Instant) -> (u64, Instant) {
        let got = settle(want, Duration::from_secs(2), async || {
            each.iter()
                .map(|w| w.delivered.load(Ordering::Relaxed))
                .sum()
        })
        .await;
        let last = each
            .iter()
            .filter_map(|w| *w.last.lock().unwrap())
            .max()
            .unwrap_or(start);
        (got, last)
    }
}

/// Scenario 12, contention: the watch delivery path (`ReadingWatcher::
/// next_batch` and `WatchBatch::messages`, what each WatchReadings stream's
/// producer runs) from 1, 2, 8 and 32 OS threads at once, in-process, with
/// no broker and no transport; each thread runs one watcher on a runtime of
/// its own and takes every reading. The cost per delivery is the watcher
/// threads' own CPU time (from /proc/thread-self/schedstat, nanoseconds)
/// over their deliveries; the baseline is the 1-thread figure of the same
/// run. Two modes:
/// - `ring`: the readings are pushed first (as many as the ring holds) and
///   their messages encoded by one untimed pass, then the threads read them
///   all at once: the delivery path alone, contended as hard as it gets.
///   Flat from 1 to 32 threads when nothing is shared per reading.
/// - `live`: one thread pushes JSON readings in batches of 32, as ingest
///   does, while the watchers follow (waking, waiting, the first to need a
///   message encoding it); the publisher stays within 8 192 readings of the
///   slowest watcher so they all read the ring.
fn contention(table: &Table, sizes: Sizes) {
    use devicehub::{
        config::{BufferLimits, DeviceLimits},
        delivery::{EncodedReadings, MessageKind, NewReading, ReadingFilter, ReadingHub},
    };
    const PUSH: u64 = 32;
    const AHEAD: u64 = 8_192;
    let devices: Vec<String> = (0..1000).map(|i| format!("dev-{i}")).collect();
    let topics: Vec<String> = devices
        .iter()
        .map(|d| format!("devices/{d}/readings"))
        .collect();
    let json = br#"{"temperature": 21.5, "humidity": 40.25, "battery": 3.71, "n": 17}"#;
    let thread_cpu_ns = || -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let push = |hub: &ReadingHub, from: u64, to: u64| {
        let now = SystemTime::now();
        hub.push_all((from..to).map(|i| {
            let d = (i % devices.len() as u64) as usize;
            NewReading {
                device_id: &devices[d],
                topic: &topics[d],
                payload: json,
                qos: 1,
                retained: false,
                received_at: now,
                kind: MessageKind::Reading,
            }
        }));
    };
    // The control: the same thread counts doing work that shares nothing
    // (each copies ~110-byte messages, 32 to a batch, out of 6.6 MB of its
    // own into buffers of its own): what flat looks like on this machine,
    // where threads also share caches, memory bandwidth and the scheduler.
    let mut control = Vec::new();
    for threads in [1usize, 2, 8, 32] {
        let barrier = Arc::new(std::sync::Barrier::new(threads));
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let messages: Vec<Vec<u8>> =
                        (0..60_000u32).map(|i| i.to_le_bytes().repeat(28)).collect();
                    barrier.wait();
                    let cpu_before = thread_cpu_ns();
                    let mut copied = 0u64;
                    for _ in 0..50 {
                        for batch in messages.chunks(32) {
                            let mut out = Vec::new();
                            for message in batch {
                                out.extend_from_slice(message);
                            }
                            copied += std::hint::black_box(out).len() as u64 / 112;
                        }
                    }
                    (thread_cpu_ns() - cpu_before, copied)
                })
            })
            .collect();
        let (cpu, copies) = workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .fold((0, 0), |(c, n), (dc, dn)| (c + dc, n + dn));
        control.push(cpu as f64 / copies as f64);
    }
    let one = control[0];
    for (threads, per) in [1, 2, 8, 32].into_iter().zip(control) {
        table.row(
            &format!("12. contention: control, {threads} threads (ns CPU/copy)"),
            per,
            one,
            "ns",
            "private copies only; baseline: 1 thread, same run",
        );
    }
    for live in [false, true] {
        // The ring holds 65 536 readings: in `ring` mode all of them fit.
        let n = match live {
            true => sizes.contention_readings,
            false => sizes.contention_readings.min(60_000),
        };
        let mut results = Vec::new();
        for threads in [1usize, 2, 8, 32] {
            let hub = ReadingHub::new(
                BufferLimits {
                    max_readings: 100_000,
                    max_bytes: 64 << 20,
                },
                DeviceLimits::default(),
                1,
                1000,
                1000,
                None,
                false,
            );
            let encoded = Arc::new(EncodedReadings::default());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Watchers start after reading 0: everything pushed, in order.
            let from_start = || async {
                let client: Arc<str> = Arc::from("bench");
                hub.subscribe(ReadingFilter::default(), Some(0), client)
                    .await
                    .unwrap()
            };
            if !live {
                // Opened first: with no watcher open, pushes are not
                // published to the ring.
                let mut warm = runtime.block_on(from_start());
                let mut seq = 0;
                while seq < n {
                    push(&hub, seq, (seq + PUSH).min(n));
                    seq += PUSH;
                }
                runtime.block_on(async {
                    let mut got = 0;
                    while got < n {
                        let batch = warm.next_batch().await.unwrap();
                        got += encoded.watch_messages(&batch).len() as u64;
                    }
                });
            }
            // One cache line each: the threads must not share one here.
            #[repr(align(128))]
            #[derive(Default)]
            struct Progress(AtomicU64);
            let progress: Arc<Vec<Progress>> =
                Arc::new((0..threads).map(|_| Progress::default()).collect());
            let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
            // In `ring` mode each thread reads the ring this many times over,
            // for a run long enough to time.
            let rounds = if live { 1 } else { 50 };
            let workers: Vec<_> = (0..threads)
                .map(|i| {
                    let (hub, progress, barrier) = (hub.clone(), progress.clone(), barrier.clone());
                    let encoded = encoded.clone();
                    std::thread::spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        barrier.wait();
                        let cpu_before = thread_cpu_ns();
                        let mut got = 0u64;
                        runtime.block_on(async {
                            for _ in 0..rounds {
                                let client: Arc<str> = Arc::from(format!("bench-{i}"));
                                let mut watcher = hub
                                    .subscribe(ReadingFilter::default(), Some(0), client)
                                    .await
                                    .unwrap();
                                let mut round = 0;
                                while round < n {
                                    let batch = watcher.next_batch().await.unwrap();
                                    round += encoded.watch_messages(&batch).len() as u64;
                                    progress[i].0.store(got + round, Ordering::Relaxed);
                                }
                                got += round;
                            }
                        });
                        (thread_cpu_ns() - cpu_before, got)
                    })
                })
                .collect();
            barrier.wait();
            let start = Instant::now();
            let mut seq = 0u64;
            while live && seq < n {
                let slowest = progress.iter().map(|p| p.0.load(Ordering::Relaxed)).min();
                if seq >= slowest.unwrap_or(0) + AHEAD {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                push(&hub, seq, (seq + PUSH).min(n));
                seq = (seq + PUSH).min(n);
            }
            let (mut cpu, mut delivered) = (0u64, 0u64);
            for worker in workers {
                let (c, d) = worker.join().unwrap();
                cpu += c;
                delivered += d;
            }
            let wall = start.elapsed().as_secs_f64();
            let behind = hub.stats().watcher_behind_live;
            results.push((
                threads,
                cpu as f64 / delivered as f64,
                delivered,
                wall,
                behind,
            ));
        }
        let one = results[0].1;
        let mode = if live { "live" } else { "ring" };
        for (threads, per, delivered, wall, behind) in results {
            table.row(
                &format!("12. contention: {mode}, {threads} threads (ns CPU/delivery)"),
                per,
                one,
                "ns",
                &format!(
                    "{delivered} deliveries in {wall:.2} s; baseline: 1 thread, same run; \
                     reads behind the ring: {behind}"
                ),
            );
        }
    }
}
