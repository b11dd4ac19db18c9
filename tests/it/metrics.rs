//! `GET /metrics` from the running binary: the counters move with what the
//! test does (readings published and rejected, a broker stopped and
//! started, commands answered, failed, late and timed out, a slow watcher
//! that loses readings, calls failing with known codes, connections over a
//! cap or idle too long), concurrent scrapes count nothing twice, and
//! `promtool check metrics` accepts the output.

use crate::common;

use std::{process::Stdio, time::Duration};

use common::*;
use devicehub::proto::{device_hub_client::DeviceHubClient, SendCommandRequest};

async fn wait_for(addr: &str, name: &str, want: f64) -> String {
    eventually(&format!("{name} = {want}"), || async {
        let text = scrape(addr).await;
        (sample(&text, name) == Some(want)).then_some(text)
    })
    .await
}

/// The value of the sample `name` that has all of `labels`, in whatever
/// order the labels are written.
fn labelled(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        let pairs: Vec<&str> = set.split(',').collect();
        labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()))
            .then(|| value.parse().ok())?
    })
}

/// What promtool, Prometheus' own linter, makes of `text`.
fn promtool_check(text: &str) {
    let promtool = which("promtool")
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    let mut check = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = check.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_what_happens_and_pass_promtool() {
    let mosquitto = Mosquitto::start();
    let port = mosquitto.url.port;
    let (mut serve, grpc, metrics) =
        serve_with_metrics(&mosquitto.url, &["--max-reading-bytes", "100"]).await;

    let device = TestDevice::connect(&mosquitto.url, "device-metrics", None).await;
    for i in 0..5 {
        device.publish("devices/m1/readings", format!("{i}")).await;
    }
    device.publish("devices/m1/readings", vec![b'x'; 101]).await;
    wait_for(&metrics, "devicehub_readings_received_total", 5.0).await;
    let text = wait_for(
        &metrics,
        "devicehub_readings_rejected_total{reason=\"too_large\"}",
        1.0,
    )
    .await;
    assert_eq!(sample(&text, "devicehub_buffer_readings"), Some(5.0));
    assert_eq!(sample(&text, "devicehub_mqtt_connects_total"), Some(1.0));
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(sample(&text, "devicehub_buffer_oldest_age_seconds").unwrap() >= 0.0);

    // A command nobody answers: a timeout.
    let mut client = eventually("a gRPC client", || {
        let url = format!("http://{grpc}");
        async move { DeviceHubClient::connect(url).await.ok() }
    })
    .await;
    let status = client
        .send_command(SendCommandRequest {
            device_id: "m1".into(),
            command: "PING".into(),
            reply_timeout: Some(Duration::from_millis(100).try_into().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    wait_for(
        &metrics,
        "devicehub_command_replies_total{outcome=\"timeout\"}",
        1.0,
    )
    .await;

    // The broker goes away and comes back.
    drop(device);
    let port = {
        let _ = port;
        mosquitto.kill()
    };
    wait_for(&metrics, "devicehub_mqtt_up", 0.0).await;
    wait_for(&metrics, "devicehub_mqtt_disconnects_total", 1.0).await;
    let _mosquitto = Mosquitto::start_on(port);
    wait_for(&metrics, "devicehub_mqtt_up", 1.0).await;
    let text = wait_for(&metrics, "devicehub_mqtt_connects_total", 2.0).await;

    promtool_check(&text);
    let _ = serve.start_kill();
    let _ = serve.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_replies_and_a_slow_watcher_move_the_counters() {
    use devicehub::proto::{
        watch_readings_response::Event, GapPolicy, ListReadingsRequest, StreamCommandsRequest,
        WatchReadingsRequest,
    };
    use serde_json::json;
    use std::sync::Arc;
    use tokio_stream::StreamExt;

    let mosquitto = Mosquitto::start();
    let (mut serve, grpc, metrics) =
        serve_with_metrics(&mosquitto.url, &["--buffer-max-readings", "100"]).await;
    let mut client = eventually("a gRPC client", || {
        let url = format!("http://{grpc}");
        async move { DeviceHubClient::connect(url).await.ok() }
    })
    .await;

    // Devices: "ok" answers ok, "bad" answers an error, "late" answers
    // after the caller gave up.
    let policy: ReplyPolicy = Arc::new(|device: &str, envelope: &serde_json::Value| {
        let id = envelope["id"].clone();
        match device {
            "ok" => Some((Duration::ZERO, json!({"id": id, "status": "ok"}))),
            "bad" => Some((
                Duration::ZERO,
                json!({"id": id, "status": "error", "message": "no"}),
            )),
            "late" => Some((
                Duration::from_millis(600),
                json!({"id": id, "status": "ok"}),
            )),
            _ => None,
        }
    });
    let _devices = Responder::start(&mosquitto.url, "responder-metrics", policy).await;
    let command = |device: &str| SendCommandRequest {
        device_id: device.into(),
        command: "PING".into(),
        reply_timeout: Some(Duration::from_millis(200).try_into().unwrap()),
        ..Default::default()
    };
    for device in ["ok", "bad"] {
        client.send_command(command(device)).await.unwrap();
    }
    let status = client.send_command(command("late")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    let text = wait_for(
        &metrics,
        "devicehub_command_replies_total{outcome=\"late\"}",
        1.0,
    )
    .await;
    for (outcome, want) in [("ok", 1.0), ("error", 1.0), ("timeout", 1.0)] {
        let got = labelled(
            &text,
            "devicehub_command_replies_total",
            &[("outcome", outcome)],
        );
        assert_eq!(got, Some(want), "{outcome}");
    }
    let send = [
        ("grpc_service", "devicehub.v1.DeviceHub"),
        ("grpc_method", "SendCommand"),
        ("grpc_type", "unary"),
    ];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = send.to_vec();
        labels.push(extra);
        labels
    };
    assert_eq!(
        labelled(&text, "grpc_server_started_total", &send),
        Some(3.0)
    );
    assert_eq!(
        labelled(
            &text,
            "grpc_server_handled_total",
            &with(("grpc_code", "OK"))
        ),
        Some(2.0)
    );
    assert_eq!(
        labelled(
            &text,
            "grpc_server_handled_total",
            &with(("grpc_code", "DeadlineExceeded"))
        ),
        Some(1.0)
    );
    assert_eq!(
        labelled(&text, "grpc_server_handling_seconds_count", &send),
        Some(3.0)
    );
    assert_eq!(
        labelled(&text, "grpc_server_msg_sent_total", &send),
        Some(2.0)
    );
    assert_eq!(
        labelled(&text, "grpc_server_msg_received_total", &send),
        Some(3.0)
    );

    // Calls failing with the client's fault, and a method nobody serves
    // (counted under "unknown", whatever its path says).
    let status = client
        .list_readings(ListReadingsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.unwrap();
    let status = raw
        .unary::<_, ListReadingsRequest, _>(
            tonic::Request::new(ListReadingsRequest::default()),
            "/devicehub.v1.DeviceHub/NoSuchMethod".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    // StreamCommands: three requests in, three responses out, then OK.
    let fire_and_forget = SendCommandRequest {
        reply_timeout: None,
        ..command("ok")
    };
    let requests = tokio_stream::iter((1..=3).map(move |request_id| StreamCommandsRequest {
        request_id,
        command: Some(fire_and_forget.clone()),
    }));
    let responses: Vec<_> = client
        .stream_commands(requests)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(responses.len(), 3);
    assert!(responses.iter().all(Result::is_ok));
    let stream = [
        ("grpc_method", "StreamCommands"),
        ("grpc_type", "bidi_stream"),
    ];
    let text = eventually("the StreamCommands call counted", || async {
        let text = scrape(&metrics).await;
        let mut ended = stream.to_vec();
        ended.push(("grpc_code", "OK"));
        (labelled(&text, "grpc_server_handled_total", &ended) == Some(1.0)).then_some(text)
    })
    .await;
    for (name, labels, want) in [
        (
            "grpc_server_handled_total",
            vec![
                ("grpc_method", "ListReadings"),
                ("grpc_code", "InvalidArgument"),
            ],
            1.0,
        ),
        (
            "grpc_server_handled_total",
            vec![
                ("grpc_service", "unknown"),
                ("grpc_method", "unknown"),
                ("grpc_code", "Unimplemented"),
            ],
            1.0,
        ),
        ("grpc_server_msg_received_total", stream.to_vec(), 3.0),
        ("grpc_server_msg_sent_total", stream.to_vec(), 3.0),
    ] {
        assert_eq!(
            labelled(&text, name, &labels),
            Some(want),
            "{name} {labels:?}"
        );
    }

    // A watcher that does not read while 20 000 readings pass through a
    // buffer of 100: it loses readings, and is told exactly which.
    let mut watch = client
        .watch_readings(WatchReadingsRequest {
            device_id: "w1".into(),
            gap_policy: GapPolicy::Notify as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let device = TestDevice::connect(&mosquitto.url, "device-w1", None).await;
    const N: u64 = 20_000;
    publish_indices(&device, "devices/w1/readings", 0..N)
        .await
        .unwrap();
    // (Replies are buffered like readings: a few more.)
    eventually("the readings stored", || async {
        let text = scrape(&metrics).await;
        (sample(&text, "devicehub_readings_received_total")? >= N as f64).then_some(())
    })
    .await;
    let (mut messages, mut gaps, mut missed) = (0u64, 0u64, 0u64);
    loop {
        let message = within("the watcher's next message", watch.next())
            .await
            .expect("stream open")
            .expect("no error with GAP_POLICY_NOTIFY");
        messages += 1;
        match message.event {
            Some(Event::Gap(gap)) => {
                gaps += 1;
                missed += gap.last_seq - gap.first_seq + 1;
            }
            Some(Event::Reading(reading)) if reading.payload == (N - 1).to_string().as_bytes() => {
                break
            }
            _ => {}
        }
    }
    assert!(gaps > 0, "the watcher lost readings");
    let text = wait_for(
        &metrics,
        "devicehub_watch_missed_readings_total",
        missed as f64,
    )
    .await;
    assert_eq!(
        sample(&text, "devicehub_watch_gaps_total"),
        Some(gaps as f64)
    );
    assert!(sample(&text, "devicehub_readings_evicted_total").unwrap() >= (N - 100) as f64);
    let watching = [
        ("grpc_method", "WatchReadings"),
        ("grpc_type", "server_stream"),
    ];
    assert_eq!(
        labelled(&text, "grpc_server_msg_sent_total", &watching),
        Some(messages as f64),
        "every message the watcher received, counted once"
    );
    assert_eq!(sample(&text, "devicehub_watchers"), Some(1.0));
    drop(watch);
    let text = wait_for(&metrics, "devicehub_watchers", 0.0).await;
    let mut cancelled = watching.to_vec();
    cancelled.push(("grpc_code", "Canceled"));
    assert_eq!(
        labelled(&text, "grpc_server_handled_total", &cancelled),
        Some(1.0)
    );
    promtool_check(&text);
    alert_rules_name_what_is_served(&text, false);

    let _ = serve.start_kill();
    let _ = serve.wait().await;
}

/// Every devicehub_* and grpc_server_* metric the shipped alert rules use
/// is one the service serves (a renamed metric would silence an alert):
/// the store's (`devicehub_store_*`, served only with a store) when
/// `store`, the others otherwise.
fn alert_rules_name_what_is_served(text: &str, store: bool) {
    let rules = std::fs::read_to_string(deploy("alerts.yml")).unwrap();
    let mut used: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("devicehub_") || w.starts_with("grpc_server_"))
        .filter(|w| w.starts_with("devicehub_store_") == store)
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() >= if store { 1 } else { 5 }, "{used:?}");
    for name in used {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{"))),
            "alerts.yml uses {name}, which /metrics does not serve"
        );
    }
}

fn deploy(file: &str) -> String {
    format!("{}/deploy/prometheus/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// The shipped Prometheus configuration and alert rules: valid, and the
/// alerts fire when they should (alerts.test.yml).
#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let promtool = which("promtool")
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    for args in [
        ["check", "config", &deploy("prometheus.yml")],
        ["check", "rules", &deploy("alerts.yml")],
        ["test", "rules", &deploy("alerts.test.yml")],
    ] {
        let output = std::process::Command::new(&promtool)
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_metrics_count_commits_and_follow_the_database() {
    let pg = postgres::Postgres::start();
    let mosquitto = Mosquitto::start();
    let url = pg.url();
    let (mut serve, _grpc, metrics) =
        serve_with_metrics(&mosquitto.url, &["--store-url", &url]).await;
    wait_for(&metrics, "devicehub_store_up", 1.0).await;
    let device = TestDevice::connect(&mosquitto.url, "device-store-metrics", None).await;
    for i in 0..50 {
        device.publish("devices/s1/readings", format!("{i}")).await;
    }
    let text = wait_for(&metrics, "devicehub_store_committed_readings_total", 50.0).await;
    assert_eq!(pg.psql("SELECT count(*) FROM readings"), "50");
    alert_rules_name_what_is_served(&text, true);
    assert!(
        sample(&text, "devicehub_store_commits_total").is_some_and(|c| (1.0..=50.0).contains(&c))
    );
    promtool_check(&text);

    pg.stop();
    wait_for(&metrics, "devicehub_store_up", 0.0).await;
    // A reading while the database is down: held, then committed.
    device.publish("devices/s1/readings", "held").await;
    let text = eventually("a failed commit", || async {
        let text = scrape(&metrics).await;
        let failed = sample(&text, "devicehub_store_commit_errors_total")?;
        (failed >= 1.0).then_some(text)
    })
    .await;
    assert_eq!(sample(&text, "devicehub_store_up"), Some(0.0));
    assert_eq!(
        sample(&text, "devicehub_store_committed_readings_total"),
        Some(50.0)
    );
    pg.start_again();
    wait_for(&metrics, "devicehub_store_up", 1.0).await;
    wait_for(&metrics, "devicehub_store_committed_readings_total", 51.0).await;
    serve.kill().await.unwrap();
}

/// Scrapes at once count nothing twice: 8 scrapers × 50 scrapes while
/// readings flow into a buffer of 100, and then the readings received and
/// evicted are exactly what was published, as no scrape ever saw more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapes_count_each_reading_once() {
    const N: u64 = 5_000;
    const KEPT: u64 = 100;
    let mosquitto = Mosquitto::start();
    let (mut serve, _grpc, metrics) = serve_with_metrics(
        &mosquitto.url,
        &["--buffer-max-readings", &KEPT.to_string()],
    )
    .await;
    let device = TestDevice::connect(&mosquitto.url, "device-scrapes", None).await;
    let publishing = publish_indices(&device, "devices/c1/readings", 0..N);
    let scrapers: Vec<_> = (0..8)
        .map(|_| {
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut seen = Vec::with_capacity(50);
                for _ in 0..50 {
                    let text = scrape(&metrics).await;
                    seen.push((
                        sample(&text, "devicehub_readings_received_total"),
                        sample(&text, "devicehub_readings_evicted_total"),
                    ));
                }
                seen
            })
        })
        .collect();
    for scraper in scrapers {
        for (received, evicted) in scraper.await.unwrap() {
            assert!(received.unwrap() <= N as f64, "received {received:?}");
            assert!(evicted.unwrap() <= (N - KEPT) as f64, "evicted {evicted:?}");
        }
    }
    publishing.await.unwrap();
    let text = eventually("every reading stored", || async {
        let text = scrape(&metrics).await;
        (sample(&text, "devicehub_readings_received_total")? >= N as f64).then_some(text)
    })
    .await;
    assert_eq!(
        sample(&text, "devicehub_readings_received_total"),
        Some(N as f64)
    );
    assert_eq!(
        sample(&text, "devicehub_readings_evicted_total"),
        Some((N - KEPT) as f64)
    );
    assert_eq!(
        sample(&text, "devicehub_buffer_readings"),
        Some(KEPT as f64)
    );
    let _ = serve.start_kill();
    let _ = serve.wait().await;
}

/// The gRPC listener's counts: connections open now, and those it closed
/// by reason: over `--max-connections-per-ip`, and with no request within
/// `--connection-idle-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_and_closed_by_reason() {
    use tokio::net::TcpStream;
    let closed = |reason| format!("devicehub_connections_closed_total{{reason=\"{reason}\"}}");
    let mosquitto = Mosquitto::start();

    // Idle connections past the per-IP cap: 3 held, 2 closed at once.
    let (mut serve, grpc, metrics) = serve_with_metrics(
        &mosquitto.url,
        &[
            "--max-connections-per-ip",
            "3",
            "--connection-idle-timeout",
            "60s",
        ],
    )
    .await;
    let text = scrape(&metrics).await;
    assert_eq!(sample(&text, "devicehub_connections"), Some(0.0));
    for reason in [
        "max_connections",
        "max_connections_per_ip",
        "max_handshakes",
        "max_handshakes_per_ip",
        "handshake_timeout",
        "handshake_failed",
        "no_stream",
    ] {
        assert_eq!(sample(&text, &closed(reason)), Some(0.0), "{reason}");
    }
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(&grpc).await.unwrap());
    }
    let text = wait_for(&metrics, &closed("max_connections_per_ip"), 2.0).await;
    assert_eq!(sample(&text, "devicehub_connections"), Some(3.0));
    promtool_check(&text);
    // Closed by the peer: the gauge goes back down.
    drop(idle);
    wait_for(&metrics, "devicehub_connections", 0.0).await;
    let _ = serve.start_kill();
    let _ = serve.wait().await;

    // A connection with no request, closed when the idle timeout passes.
    let (mut serve, grpc, metrics) =
        serve_with_metrics(&mosquitto.url, &["--connection-idle-timeout", "200ms"]).await;
    let _idle = TcpStream::connect(&grpc).await.unwrap();
    let text = wait_for(&metrics, &closed("no_stream"), 1.0).await;
    assert_eq!(sample(&text, "devicehub_connections"), Some(0.0));
    assert_eq!(sample(&text, &closed("max_connections_per_ip")), Some(0.0));
    let _ = serve.start_kill();
    let _ = serve.wait().await;
}
