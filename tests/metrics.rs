//! `GET /metrics` from the running binary: the counters move with what the
//! test does (readings published and rejected, a broker stopped and
//! started, a command that times out), and `promtool check metrics`
//! accepts the output.

mod common;

use std::{process::Stdio, time::Duration};

use common::*;
use devicehub::proto::{device_hub_client::DeviceHubClient, SendCommandRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The body of `GET /metrics` at `addr`.
async fn scrape(addr: &str) -> String {
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
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn wait_for(addr: &str, name: &str, want: f64) -> String {
    eventually(&format!("{name} = {want}"), || async {
        let text = scrape(addr).await;
        (sample(&text, name) == Some(want)).then_some(text)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_what_happens_and_pass_promtool() {
    let mosquitto = Mosquitto::start();
    let port = mosquitto.url.port;
    let url = mosquitto.url.to_string();
    let (mut serve, mut log) = spawn_devicehub(
        &[
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--mqtt-url",
            &url,
            "--max-reading-bytes",
            "100",
        ],
        &[],
    );
    let (mut grpc, mut metrics) = (None, None);
    while grpc.is_none() || metrics.is_none() {
        let line = within("the listening lines", log.next_line())
            .await
            .unwrap()
            .unwrap();
        let addr = || {
            line.split("addr=")
                .nth(1)
                .map(|r| r.split_whitespace().next().unwrap().to_owned())
        };
        if line.contains("gRPC listening") {
            grpc = addr();
        } else if line.contains("metrics listening") {
            metrics = addr();
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let (grpc, metrics) = (grpc.unwrap(), metrics.unwrap());

    wait_for(&metrics, "devicehub_mqtt_up", 1.0).await;
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

    // What promtool, Prometheus' own linter, makes of it.
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
    let _ = serve.start_kill();
    let _ = serve.wait().await;
}
