//! The contract outside Rust: the Python client in examples/python, with
//! stubs generated from the proto by grpcio-tools at test time, against the
//! real server.

use crate::common;

use std::{path::Path, process::Stdio};

use common::*;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::Command,
};

const CLIENT: &str = "examples/python/devicehub_client.py";

fn python() -> std::path::PathBuf {
    which("python3").expect("python3 is not installed: the tests need it")
}

/// Generates the Python stubs into `out` with grpcio-tools.
async fn generate_stubs(out: &Path) {
    let output = Command::new(python())
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("proto/devicehub/v1/devicehub.proto")
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "generating stubs failed (pip install grpcio-tools, or run scripts/test.sh): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn client(stubs: &Path, target: &str, args: &[&str]) -> Command {
    let mut command = Command::new(python());
    command
        .arg(CLIENT)
        .args(["--target", target])
        .args(args)
        .env("DEVICEHUB_PY_STUBS", stubs)
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_lists_watches_and_sends_commands() {
    let stubs = tempdir::TempDir::new("pystubs");
    generate_stubs(stubs.path()).await;

    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let target = service.addr.to_string();
    let mut device =
        TestDevice::connect(&broker, "device-python", Some("devices/d1/commands")).await;

    for i in 0..3 {
        device
            .publish("devices/d1/readings", format!(r#"{{"i": {i}}}"#))
            .await;
    }
    let client_rs = service.client().await;
    eventually("three readings", || {
        let mut c = client_rs.clone();
        async move {
            let page = c
                .list_readings(devicehub::proto::ListReadingsRequest::default())
                .await
                .ok()?;
            (page.into_inner().readings.len() == 3).then_some(())
        }
    })
    .await;

    // list, paging with a small page size.
    let output = within(
        "python list",
        client(
            stubs.path(),
            &target,
            &["list", "--device-id", "d1", "--page-size", "2"],
        )
        .output(),
    )
    .await
    .unwrap();
    let listed = json_lines(&output);
    // protobuf's Value holds numbers as doubles.
    let is: Vec<Option<f64>> = listed.iter().map(|r| r["json"]["i"].as_f64()).collect();
    assert_eq!(is, [Some(0.0), Some(1.0), Some(2.0)]);
    assert!(listed.iter().all(|r| r["deviceId"] == "d1"));

    // devices, paged one at a time: d1 and d2 with their newest readings.
    device.publish("devices/d2/status", "online").await;
    eventually("d2 known", || {
        let mut c = client_rs.clone();
        async move {
            let request = devicehub::proto::GetDeviceRequest {
                device_id: "d2".into(),
            };
            c.get_device(request).await.ok()
        }
    })
    .await;
    let output = within(
        "python devices",
        client(stubs.path(), &target, &["devices", "--page-size", "1"]).output(),
    )
    .await
    .unwrap();
    let devices = json_lines(&output);
    let ids: Vec<&str> = devices
        .iter()
        .filter_map(|d| d["deviceId"].as_str())
        .collect();
    assert_eq!(ids, ["d1", "d2"]);
    assert_eq!(devices[0]["lastReading"]["json"]["i"], 2.0);
    assert_eq!(devices[0]["status"], "DEVICE_STATUS_UNKNOWN");
    assert_eq!(devices[1]["status"], "DEVICE_STATUS_ONLINE");
    assert!(devices[1].get("lastReading").is_none());

    // send: the device gets the envelope with the returned id.
    let output = within(
        "python send",
        client(
            stubs.path(),
            &target,
            &[
                "send",
                "--device-id",
                "d1",
                "--command",
                "SET_INTERVAL",
                "--params",
                r#"{"ms": 500}"#,
            ],
        )
        .output(),
    )
    .await
    .unwrap();
    let sent = &json_lines(&output)[0];
    let envelope: Value = serde_json::from_slice(&device.next_message().await.payload).unwrap();
    assert_eq!(envelope["id"], sent["commandId"]);
    assert_eq!(envelope["command"], "SET_INTERVAL");
    assert_eq!(envelope["params"]["ms"], 500);

    // send-many: commands from stdin over one StreamCommands stream; each
    // gets its outcome, matched by request_id (the input line).
    let mut many = client(stubs.path(), &target, &["send-many"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = many.stdin.take().unwrap();
    stdin
        .write_all(
            concat!(
                r#"{"device_id": "d1", "command": "PING"}"#,
                "\n",
                r#"{"device_id": "a/b", "command": "X"}"#,
                "\n",
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    drop(stdin);
    let output = within("python send-many", many.wait_with_output())
        .await
        .unwrap();
    let mut outcomes = json_lines(&output);
    outcomes.sort_by_key(|o| o["requestId"].as_u64());
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert_eq!(outcomes[0]["code"], "OK", "{outcomes:?}");
    assert_eq!(outcomes[1]["code"], "INVALID_ARGUMENT", "{outcomes:?}");
    assert!(outcomes[1]["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("device_id")));
    let envelope: Value = serde_json::from_slice(&device.next_message().await.payload).unwrap();
    assert_eq!(envelope["id"], outcomes[0]["response"]["commandId"]);
    assert_eq!(envelope["command"], "PING");

    // watch: live readings after the stream is open.
    let mut watch = client(
        stubs.path(),
        &target,
        &["watch", "--device-id", "d1", "--count", "2"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = within("the watch to open", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&first).unwrap()["watching"],
        true
    );
    device.publish("devices/d1/readings", r#"{"i": 10}"#).await;
    device.publish("devices/d1/readings", r#"{"i": 11}"#).await;
    let mut watched = Vec::new();
    while let Some(line) = within("watched readings", lines.next_line()).await.unwrap() {
        watched.push(serde_json::from_str::<Value>(&line).unwrap()["json"]["i"].as_f64());
    }
    assert_eq!(watched, [Some(10.0), Some(11.0)]);
    assert!(within("the watch to exit", watch.wait())
        .await
        .unwrap()
        .success());

    // An invalid request: the status code and the field reach Python.
    let output = within(
        "python bad send",
        client(
            stubs.path(),
            &target,
            &["send", "--device-id", "a/b", "--command", "X"],
        )
        .output(),
    )
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("INVALID_ARGUMENT: device_id"),
        "{stderr}"
    );

    drop(client_rs);
    service.stop().await;
}

/// The Python client over TLS with a token (`--ca`, `--token` or
/// DEVICEHUB_TOKEN): it sees only what the token's scopes allow, and
/// without a token it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_uses_tls_and_a_token() {
    use common::{secure::Pki, tokens::Signer};
    let stubs = tempdir::TempDir::new("pystubs-tls");
    generate_stubs(stubs.path()).await;
    let broker = embedded_broker();
    let (pki, signer) = (Pki::new("python test CA"), Signer::es256());
    let dir = tempdir::TempDir::new("python-tls");
    let args = common::pki::secured_service_args(dir.path(), &pki.server(), &signer.public_pem);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, &pki.ca_cert).unwrap();
    let ca = ca.display().to_string();
    let service = TestService::start(config(&broker, &args)).await;
    let target = format!("localhost:{}", service.addr.port());
    // Subscribed before the device publishes (the embedded broker keeps
    // nothing for later subscribers).
    let channel = eventually("a TLS connection", || async {
        common::secure::grpc_tls_channel(service.addr, &pki.ca_cert, None)
            .await
            .ok()
    })
    .await;
    common::secure::wait_serving(&channel).await;
    let device = TestDevice::connect(
        &broker,
        "device-python-tls",
        Some("devices/sensor-1/commands"),
    )
    .await;
    device
        .publish("devices/sensor-1/readings", r#"{"t": 1}"#)
        .await;
    device
        .publish("devices/secret-1/readings", r#"{"t": 2}"#)
        .await;

    let token = signer.token("python", "readings:read:sensor-* commands:send");
    let devices = eventually("the Python client to list sensor-1 over TLS", || {
        let (stubs, target, ca, token) = (stubs.path(), &target, &ca, &token);
        async move {
            let output = client(stubs, target, &["--ca", ca, "--token", token, "list"])
                .output()
                .await
                .unwrap();
            let devices: Vec<Value> = json_lines(&output)
                .iter()
                .map(|r| r["deviceId"].clone())
                .collect();
            (!devices.is_empty()).then_some(devices)
        }
    })
    .await;
    assert_eq!(
        devices,
        [Value::from("sensor-1")],
        "secret-1 is outside the scope"
    );

    let sent = client(
        stubs.path(),
        &target,
        &[
            "--ca",
            &ca,
            "send",
            "--device-id",
            "sensor-1",
            "--command",
            "PING",
        ],
    )
    .env("DEVICEHUB_TOKEN", &token)
    .output()
    .await
    .unwrap();
    assert_eq!(json_lines(&sent).len(), 1);

    let refused = client(stubs.path(), &target, &["--ca", &ca, "list"])
        .env_remove("DEVICEHUB_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("UNAUTHENTICATED"));
    service.stop().await;
}

/// Every reading the service stores decodes with the generated Python
/// client, whose protobuf stops at 100 nested messages and 4 MiB messages:
/// JSON past the depth rule or too large as a `Value` is sent raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stored_reading_decodes_in_python() {
    let stubs = tempdir::TempDir::new("pystubs-hostile");
    generate_stubs(stubs.path()).await;
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let device = TestDevice::connect(&broker, "device-python-hostile", None).await;
    let nested = |depth: usize| "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth);
    let payloads = [
        nested(32),
        nested(33),
        nested(120),
        "[".repeat(40) + &"]".repeat(40),
        "[".to_owned() + &"0,".repeat(400 << 10) + "0]",
        r#"{"plain": true}"#.to_owned(),
    ];
    for payload in &payloads {
        device
            .publish("devices/hostile/readings", payload.clone())
            .await;
    }
    let client_ = service.client().await;
    list_until("every hostile reading", &client_, Default::default(), |r| {
        (r.len() == payloads.len()).then_some(())
    })
    .await;
    let output = client(
        stubs.path(),
        &service.addr.to_string(),
        &["list", "--page-size", "1000"],
    )
    .output()
    .await
    .unwrap();
    let readings = json_lines(&output);
    assert_eq!(readings.len(), payloads.len());
    let has_json: Vec<bool> = readings.iter().map(|r| r.get("json").is_some()).collect();
    assert_eq!(has_json, [true, false, false, false, false, true]);
    service.stop().await;
}
