//! The devicehub binary as its own process: started with the harness's
//! limits and a scenario's flags, found by the addresses it logs, asked for
//! its CPU time and resident memory, stopped with SIGTERM. With
//! `--metrics-addr` it is scraped like Prometheus would.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use devicehub::{config::BrokerUrl, proto::device_hub_client::DeviceHubClient};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStderr, Command},
    task::JoinHandle,
};
use tonic::transport::Channel;

use super::measure::{bounded, cpu_seconds};
use crate::{pki, postgres, tempdir, tokens};

/// How a scenario runs the service: a suffix for its rows, extra flags, and
/// the PostgreSQL cluster to store readings in (a fresh database per run).
#[derive(Clone, Copy)]
pub struct Variant<'a> {
    pub label: &'static str,
    pub args: &'static [&'static str],
    pub store: Option<&'a postgres::Postgres>,
}

pub const PLAIN: Variant = Variant {
    label: "",
    args: &[],
    store: None,
};

/// With `/metrics`, which [`Service::start`] then scrapes every second.
pub const SCRAPED: Variant = Variant {
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

/// The devicehub binary as its own process.
pub struct Service {
    child: Child,
    pub addr: SocketAddr,
    /// Scrapes /metrics while the service runs with `--metrics-addr`.
    scraper: Option<JoinHandle<()>>,
    /// With TLS and auth: the CA clients trust, and the bearer token every
    /// call carries; the files the service reads.
    secured: Option<(String, String, tempdir::TempDir)>,
}

impl Service {
    pub async fn start(broker: &BrokerUrl, extra: &[&str]) -> Self {
        let mut child = Self::command(broker, extra)
            .spawn()
            .expect("devicehub binary");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (addr, scraper) = bounded("the service to start", Self::started(&mut lines)).await;
        // Keep draining the log so the service never blocks on the pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            addr,
            scraper,
            secured: None,
        }
    }

    /// `devicehub serve` on `broker` with room for every scenario (buffer,
    /// watchers, streams), then `extra`.
    fn command(broker: &BrokerUrl, extra: &[&str]) -> Command {
        let binary = std::env::var_os("DEVICEHUB_BENCH_BINARY")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_devicehub").into());
        let mut command = Command::new(binary);
        command
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
            .kill_on_drop(true);
        command
    }

    /// Reads the service's log until it listens for gRPC and has subscribed
    /// to readings; scrapes its /metrics from when it says where they are.
    async fn started(
        lines: &mut Lines<BufReader<ChildStderr>>,
    ) -> (SocketAddr, Option<JoinHandle<()>>) {
        // "... addr=127.0.0.1:1234 ..."
        let logged_addr = |line: &str| {
            let at = line.find("addr=").unwrap() + 5;
            line[at..].split_whitespace().next().unwrap().to_owned()
        };
        let (mut addr, mut ready, mut scraper) = (None, false, None);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("metrics listening") {
                scraper = Some(tokio::spawn(scrape_forever(logged_addr(&line))));
            }
            if line.contains("gRPC listening") {
                addr = Some(logged_addr(&line).parse().unwrap());
            }
            if line.contains("subscribed to readings") {
                ready = true;
            }
            if let (Some(addr), true) = (addr, ready) {
                return (addr, scraper);
            }
        }
        panic!("the service exited before it was ready");
    }

    /// The service with TLS on its gRPC port and JWT auth (ES256), as an
    /// operator would run it beyond loopback.
    pub async fn start_secured(broker: &BrokerUrl) -> Self {
        let dir = tempdir::TempDir::new("bench-secure");
        let (pki, signer) = (pki::Pki::new("bench CA"), tokens::Signer::es256());
        let args = pki::secured_service_args(dir.path(), &pki.server(), &signer.public_pem);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut service = Self::start(broker, &args).await;
        let token = signer.token("bench", "readings:read commands:send");
        service.secured = Some((pki.ca_cert, token, dir));
        service
    }

    pub async fn channel(&self) -> Channel {
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

    pub async fn client(&self) -> DeviceHubClient<Channel> {
        DeviceHubClient::new(self.channel().await)
    }

    /// `message` as a request, carrying the token when the service wants one.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
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
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&self.pid().to_string())
    }

    /// Resident memory of the service process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    pub async fn stop(mut self) {
        if let Some(scraper) = self.scraper.take() {
            scraper.abort();
        }
        let pid = self.pid().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
        let _ = bounded("the service to stop", self.child.wait()).await;
    }
}
