//! The dashboard in a real browser: headless Chromium (Debian's package,
//! through puppeteer-core) loads the page from the service's own origin
//! (no --cors-allowed-origins) and drives it as a person would, against
//! simulated devices. The scripts are `web/test/*.mjs`; they print each
//! step's findings as a JSON line and wait for the test where it acts (it
//! kills the simulator). scripts/test.sh installs Chromium and
//! `npm ci`s web/ (the page itself is embedded in the binary).
//!
//! Screenshots of each page go to the test's directory, and also to
//! `$DEVICEHUB_SCREENSHOTS` when that is set (docs/dashboard-auth-error.png
//! comes from there: see docs/dashboard.md).

mod script;

use crate::common;

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{tokens::Signer, *};
use devicehub::proto::{device_hub_client::DeviceHubClient, AggregateReadingsRequest};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::Child,
};
use tonic::transport::Channel;

use script::Script;

/// `devicehub simulate` as its own process, each device publishing every
/// `interval_ms`, killed (SIGKILL: its devices' last wills) by the test or
/// when dropped.
fn simulator(broker: &devicehub::config::BrokerUrl, devices: u32, interval_ms: u32) -> Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
        .args(["simulate", "--mqtt-url", &broker.to_string()])
        .args(["--devices", &devices.to_string()])
        .args(["--interval-ms", &interval_ms.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// One plain HTTP/1.1 request; the status line and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within("an HTTP response", stream.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// Waits until `device`'s buffered readings span `span` (the simulator
/// keeps publishing meanwhile).
async fn readings_spanning(client: &DeviceHubClient<Channel>, device: &str, span: Duration) {
    let deadline = tokio::time::Instant::now() + span + PATIENCE;
    loop {
        let readings = list_all(client, device).await;
        let at = |r: Option<&devicehub::proto::Reading>| {
            r.and_then(|r| r.received_at.as_ref())
                .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        };
        if at(readings.last()) - at(readings.first()) >= span.as_millis() as i64 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{device}'s readings never spanned {span:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Compares the buckets the page showed (`history`, from its tables) with
/// AggregateReadings over the last hour in the page's bucket, field by field
/// and figure by figure (the page's numbers are JavaScript's exact decimal
/// forms of the doubles it received).
async fn assert_history_matches(client: &DeviceHubClient<Channel>, device: &str, history: &Value) {
    let bucket_ms = history["bucketMs"].as_i64().unwrap();
    assert_eq!(bucket_ms, 7_000, "1 h / 500, in whole seconds: {history}");
    let series = history["series"].as_array().unwrap();
    assert!(!series.is_empty(), "{history}");
    let fields: Vec<String> = series
        .iter()
        .map(|s| s["field"].as_str().unwrap().to_owned())
        .collect();
    assert!(fields.contains(&"/temperature".to_owned()), "{fields:?}");
    let end = now_micros();
    let response = client
        .clone()
        .aggregate_readings(AggregateReadingsRequest {
            device_id: device.into(),
            fields: fields.clone(),
            start_time: Some(timestamp(end - 3_600_000_000)),
            end_time: Some(timestamp(end)),
            bucket: Some(prost_types::Duration {
                seconds: bucket_ms / 1000,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.series.len(), series.len());
    assert!(
        response.series.iter().all(|s| s.buckets.len() >= 3),
        "{response:?}"
    );
    for (mine, shown) in response.series.iter().zip(series) {
        assert_eq!(shown["field"], mine.field.as_str());
        assert_eq!(shown["buckets"], mine.buckets.len(), "{}", mine.field);
        assert!(shown["canvas"].as_bool().unwrap(), "a chart is drawn");
        let total: i64 = mine.buckets.iter().map(|b| b.count).sum();
        assert_eq!(shown["readings"], total, "{}", mine.field);
        let rows = shown["rows"].as_array().unwrap();
        assert_eq!(rows.len(), mine.buckets.len(), "{}", mine.field);
        for (bucket, row) in mine.buckets.iter().zip(rows) {
            let start = bucket.start_time.as_ref().unwrap();
            let start_ms = start.seconds * 1000 + i64::from(start.nanos) / 1_000_000;
            assert_eq!(row["start"], start_ms, "{row}");
            assert_eq!(row["count"], bucket.count, "{row}");
            for (name, figure) in [
                ("min", bucket.min),
                ("max", bucket.max),
                ("mean", bucket.mean),
                ("first", bucket.first),
                ("last", bucket.last),
            ] {
                assert_eq!(row[name].as_f64(), Some(figure), "{name} in {row}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_a_device_live_its_history_and_a_reply_in_chromium() {
    // Mosquitto: it publishes a killed client's last will at once (as the
    // devices tests rely on too).
    let mosquitto = Mosquitto::start();
    let broker = mosquitto.url.clone();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    // 100 readings/s per device: the live chart must keep up.
    let mut simulator = simulator(&broker, 2, 10);
    newest_reading_of(&client, "sim-2").await;

    let dir = tempdir::TempDir::new("dashboard");
    let env = [
        ("DEVICES", "sim-1,sim-2".to_owned()),
        ("DEVICE", "sim-1".to_owned()),
    ];
    let mut script = Script::start("dashboard", dir.path(), &service.url(), &env);

    let fleet = script.next("fleet").await;
    let rows = fleet["rows"].as_array().unwrap();
    let listed: Vec<&str> = rows.iter().map(|r| r["device"].as_str().unwrap()).collect();
    assert_eq!(listed, ["sim-1", "sim-2"], "{fleet}");
    for row in rows {
        assert_eq!(row["status"], "online", "{row}");
        // In words and an icon, not by colour alone.
        assert!(
            row["statusText"].as_str().unwrap().ends_with("online"),
            "{row}"
        );
        assert!(
            row["values"].as_str().unwrap().contains("temperature"),
            "{row}"
        );
    }
    assert!(fleet["url"].as_str().unwrap().starts_with(&service.url()));

    let keyboard = script.next("keyboard").await;
    assert_eq!(keyboard["focused"], "#/device/sim-1", "{keyboard}");
    assert_eq!(keyboard["hash"], "#/device/sim-1", "{keyboard}");

    let device = script.next("device").await;
    let (first, later) = (&device["first"], &device["later"]);
    assert!(
        later["temperature"].as_u64() > first["temperature"].as_u64()
            || later["humidity"].as_u64() > first["humidity"].as_u64(),
        "the live chart receives new points: {device}"
    );
    let shown = device["shown"].as_object().unwrap();
    assert!(
        shown.values().all(|n| n.as_u64().unwrap() <= 3000),
        "bounded: {device}"
    );
    assert_eq!(
        device["reply"]["reply"]["status"], "COMMAND_STATUS_OK",
        "{device}"
    );
    assert_eq!(device["reply"]["reply"]["result"]["pong"], true, "{device}");

    let state = script.next("state").await;
    let stale = state["stale"].as_str().unwrap();
    assert!(
        stale.contains("changed since version 1"),
        "ABORTED, said: {state}"
    );
    assert!(
        state["version"].as_str().unwrap().parse::<i64>().unwrap()
            > state["shownVersion"]
                .as_str()
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        "{state}"
    );
    let unknown = script.next("unknown").await;
    assert!(
        unknown["summary"]
            .as_str()
            .unwrap()
            .contains("Not heard from yet"),
        "{unknown}"
    );
    assert_eq!(unknown["alerts"], serde_json::json!([]), "{unknown}");

    script.next("kill").await;
    // History worth comparing: readings over two bucket boundaries at
    // least (1 h in buckets of 7 s), so three buckets or more.
    readings_spanning(&client, "sim-1", Duration::from_secs(15)).await;
    simulator.start_kill().unwrap();
    simulator.wait().await.unwrap();
    script.answer().await;
    let offline = script.next("offline").await;
    for row in offline["rows"].as_array().unwrap() {
        assert_eq!(row["status"], "offline", "{offline}");
    }
    let announced = offline["announced"].as_array().unwrap();
    assert!(
        announced.iter().any(|a| a == "sim-1 is now offline"),
        "the change is announced: {offline}"
    );

    let history = script.next("history").await;
    assert!(
        history["alerts"].as_array().unwrap().is_empty(),
        "{history}"
    );
    assert_eq!(history["range"], "1 h");
    assert_history_matches(&client, "sim-1", &history).await;

    let phone = script.next("phone").await;
    for page in ["fleet", "device"] {
        let width = phone["widths"][page].as_u64().unwrap();
        assert!(
            width <= 375,
            "the {page} page fits a phone's width: {phone}"
        );
    }
    assert_eq!(
        phone["csp"],
        serde_json::json!([]),
        "no CSP violation: {phone}"
    );
    assert_eq!(
        phone["errors"],
        serde_json::json!([]),
        "no page error: {phone}"
    );
    let shots = [
        "dashboard-fleet",
        "dashboard-device",
        "dashboard-phone-fleet",
        "dashboard-phone-device",
    ];
    let paths: Vec<PathBuf> = shots.iter().map(|s| script.screenshot(s)).collect();
    script.finish().await;
    for path in paths {
        assert!(
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 0),
            "{path:?}"
        );
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_the_dashboard_shows_a_bad_token_and_a_missing_scope_as_messages() {
    let broker = embedded_broker();
    let dir = tempdir::TempDir::new("dashboard-auth");
    let signer = Signer::es256();
    let key = dir.write("key.pem", &signer.public_pem);
    let service = TestService::start_ready(config(&broker, &["--auth-jwt-key", &key])).await;
    let mut simulator = simulator(&broker, 1, 1000);
    let good = signer.token("dashboard", "readings:read");
    let client = service.client().await;
    eventually("sim-1's first reading", || {
        let mut client = client.clone();
        let request = tokens::authed(
            &good,
            devicehub::proto::GetDeviceRequest {
                device_id: "sim-1".into(),
            },
        );
        async move { client.get_device(request).await.ok() }
    })
    .await;

    let env = [
        ("BAD_TOKEN", "not-a-token".to_owned()),
        ("NARROW_TOKEN", signer.token("dashboard", "commands:send")),
        ("GOOD_TOKEN", good.clone()),
    ];
    let mut script = Script::start("auth", dir.path(), &service.url(), &env);
    let none = script.next("none").await;
    assert!(
        none["alerts"][0]
            .as_str()
            .unwrap()
            .contains("UNAUTHENTICATED"),
        "{none}"
    );
    let bad = script.next("bad").await;
    assert!(
        bad["alerts"][0]
            .as_str()
            .unwrap()
            .contains("UNAUTHENTICATED"),
        "{bad}"
    );
    assert_eq!(bad["state"], "a token is set");
    let narrow = script.next("narrow").await;
    let denied = narrow["alerts"][0].as_str().unwrap();
    assert!(
        denied.contains("PERMISSION_DENIED") && denied.contains("readings:read"),
        "{narrow}"
    );
    let ok = script.next("good").await;
    assert_eq!(ok["devices"], serde_json::json!(["sim-1"]), "{ok}");
    assert_eq!(ok["alerts"], serde_json::json!([]), "{ok}");
    assert_eq!(ok["stored"], good.as_str(), "kept in sessionStorage");
    assert!(
        !ok["url"].as_str().unwrap().contains(&good),
        "never in the URL"
    );
    assert_eq!(ok["csp"], serde_json::json!([]), "{ok}");
    let shot = script.screenshot("dashboard-auth-error");
    script.finish().await;
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 0));
    simulator.start_kill().unwrap();
    let _ = simulator.wait().await;
    service.stop().await;
}

#[tokio::test]
async fn the_page_is_served_by_default_and_404_with_dashboard_false() {
    let broker = embedded_broker();
    let on = TestService::start_ready(config(&broker, &[])).await;
    let (status, body) = http_get(on.addr, "/").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        body.contains("<script type=\"module\" src=\"app.js\">"),
        "{body}"
    );
    assert_eq!(http_get(on.addr, "/app.js").await.0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(on.addr, "/nope").await.0, "HTTP/1.1 404 Not Found");
    on.stop().await;

    let off = TestService::start_ready(config(&broker, &["--dashboard=false"])).await;
    for path in ["/", "/index.html", "/app.js"] {
        assert_eq!(
            http_get(off.addr, path).await.0,
            "HTTP/1.1 404 Not Found",
            "{path}"
        );
    }
    // gRPC is untouched either way.
    let mut client = off.client().await;
    client
        .list_devices(devicehub::proto::ListDevicesRequest::default())
        .await
        .unwrap();
    off.stop().await;
}
