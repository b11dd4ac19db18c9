//! Device state, desired and reported: UpdateDesiredState published
//! retained to the device (also one that connects later), its report
//! emptying the delta, merge patches, optimistic concurrency, reported
//! patches that are refused, WatchDeviceState, scopes, the memory budget
//! and the simulator; against the embedded broker and Mosquitto, with real
//! paho-mqtt devices. The store's durability and replicas are in
//! `store_state.rs`.

use crate::common;

use std::time::Duration;

use common::{json::*, paho::PahoDevice, tempdir::TempDir, tokens::*, *};
use devicehub::{
    config::BrokerUrl,
    proto::{
        device_hub_client::DeviceHubClient, DeviceState, GetDeviceStateRequest,
        UpdateDesiredStateRequest, WatchDeviceStateRequest, WatchDeviceStateResponse,
    },
};
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::{transport::Channel, Code, Status, Streaming};

/// Applies `patch` to `device_id`'s desired state.
pub async fn update(
    client: &DeviceHubClient<Channel>,
    device_id: &str,
    patch: Value,
    expected_version: i64,
) -> Result<DeviceState, Status> {
    let response = client
        .clone()
        .update_desired_state(UpdateDesiredStateRequest {
            device_id: device_id.into(),
            patch: Some(to_struct(patch)),
            expected_version,
        })
        .await?;
    Ok(response.into_inner().state.expect("a state"))
}

pub async fn get_state(
    client: &DeviceHubClient<Channel>,
    device_id: &str,
) -> Result<DeviceState, Status> {
    let response = client
        .clone()
        .get_device_state(GetDeviceStateRequest {
            device_id: device_id.into(),
        })
        .await?;
    Ok(response.into_inner().state.expect("a state"))
}

/// Waits until `device_id`'s state satisfies `done`, and returns it.
pub async fn wait_state(
    client: &DeviceHubClient<Channel>,
    device_id: &str,
    what: &str,
    done: impl Fn(&DeviceState) -> bool,
) -> DeviceState {
    eventually(what, || async {
        get_state(client, device_id).await.ok().filter(&done)
    })
    .await
}

/// The three sides of a state as JSON: desired, reported, delta.
pub fn sides(state: &DeviceState) -> [Value; 3] {
    [&state.desired, &state.reported, &state.delta].map(|s| from_struct(s.as_ref().unwrap()))
}

pub async fn watch_state(
    client: &DeviceHubClient<Channel>,
    device_id: &str,
) -> Streaming<WatchDeviceStateResponse> {
    client
        .clone()
        .watch_device_state(WatchDeviceStateRequest {
            device_id: device_id.into(),
        })
        .await
        .expect("WatchDeviceState")
        .into_inner()
}

pub async fn next_state(changes: &mut Streaming<WatchDeviceStateResponse>) -> DeviceState {
    within("a device state change", changes.next())
        .await
        .expect("the stream goes on")
        .expect("a change")
        .state
        .expect("a state")
}

/// The next desired state document the paho device received.
async fn next_desired(device: &mut PahoDevice) -> Value {
    let event = device.next_event().await;
    assert_eq!(event["event"], "desired", "{event}");
    event
}

async fn desired_reaches_the_device_and_its_report_empties_the_delta(broker: &BrokerUrl) {
    let service = TestService::start_ready(config(broker, &[])).await;
    let client = service.client().await;
    let mut device = PahoDevice::start_with(broker, "fan-1", &["--apply-desired"]).await;

    let desired = json!({"interval_ms": 500, "mode": {"eco": true, "level": 2}});
    let updated = update(&client, "fan-1", desired.clone(), 0).await.unwrap();
    let [wanted, reported, delta] = sides(&updated);
    assert_eq!(
        wanted,
        json!({"interval_ms": 500.0, "mode": {"eco": true, "level": 2.0}})
    );
    assert_eq!(reported, json!({}));
    assert_eq!(
        delta, wanted,
        "nothing reported: everything desired is asked for"
    );
    assert!(updated.desired_update_time.is_some());
    assert!(updated.reported_update_time.is_none());

    // The device gets {"version", "desired", "delta"}, retained, at QoS 1.
    let event = next_desired(&mut device).await;
    let document = &event["document"];
    assert_eq!(document["version"], json!(updated.version), "{event}");
    assert_eq!(document["desired"], desired);
    assert_eq!(document["delta"], desired);

    // It applies the delta and reports it: nothing is asked for any more.
    let done = wait_state(&client, "fan-1", "the report applied", |s| {
        s.reported_update_time.is_some()
    })
    .await;
    let [wanted, reported, delta] = sides(&done);
    assert_eq!(reported, wanted);
    assert_eq!(delta, json!({}));
    assert!(done.version > updated.version);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_reaches_the_device_and_its_report_empties_the_delta_embedded() {
    desired_reaches_the_device_and_its_report_empties_the_delta(&embedded_broker()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_reaches_the_device_and_its_report_empties_the_delta_mosquitto() {
    let mosquitto = Mosquitto::start();
    desired_reaches_the_device_and_its_report_empties_the_delta(&mosquitto.url).await;
}

async fn a_device_away_gets_the_retained_desired_state(broker: &BrokerUrl) {
    let service = TestService::start_ready(config(broker, &[])).await;
    let client = service.client().await;
    // Never heard from: provisioned ahead of its first connection, twice.
    update(&client, "valve-9", json!({"open": false}), 0)
        .await
        .unwrap();
    let latest = update(&client, "valve-9", json!({"open": true, "limit": 7}), 0)
        .await
        .unwrap();
    // Published (acknowledged by the broker) before the device shows up.
    eventually("the desired state published", || async {
        let device = TestDevice::connect(
            broker,
            "probe-valve-9",
            Some("devices/valve-9/state/desired"),
        )
        .await;
        let mut device = device;
        let message = tokio::time::timeout(Duration::from_millis(500), device.received.recv())
            .await
            .ok()??;
        let document: Value = serde_json::from_slice(&message.payload).ok()?;
        (document["version"] == json!(latest.version)).then_some(())
    })
    .await;

    let mut device = PahoDevice::start_with(broker, "valve-9", &[]).await;
    let event = next_desired(&mut device).await;
    assert_eq!(event["retained"], json!(true), "{event}");
    assert_eq!(event["document"]["version"], json!(latest.version));
    assert_eq!(
        event["document"]["desired"],
        json!({"open": true, "limit": 7})
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_away_gets_the_retained_desired_state_when_it_connects_embedded() {
    a_device_away_gets_the_retained_desired_state(&embedded_broker()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_away_gets_the_retained_desired_state_when_it_connects_mosquitto() {
    let mosquitto = Mosquitto::start();
    a_device_away_gets_the_retained_desired_state(&mosquitto.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_patches_merge_objects_delete_nulls_and_replace_arrays() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    update(
        &client,
        "m-1",
        json!({"config": {"a": 1, "b": 2}, "list": [1, 2, 3], "gone": "x", "keep": true}),
        0,
    )
    .await
    .unwrap();
    let state = update(
        &client,
        "m-1",
        json!({"config": {"a": null, "c": {"d": 4}}, "list": [9], "gone": null}),
        0,
    )
    .await
    .unwrap();
    assert_eq!(
        sides(&state)[0],
        json!({"config": {"b": 2.0, "c": {"d": 4.0}}, "list": [9.0], "keep": true})
    );
    // A device reports part of it: the delta is what differs, recursively;
    // arrays compare whole.
    let reporter = TestDevice::connect(&broker, "m-1", None).await;
    reporter
        .publish(
            "devices/m-1/state/reported",
            r#"{"config": {"b": 2, "c": {"d": 5}, "extra": 1}, "list": [9, 1], "keep": true}"#,
        )
        .await;
    let state = wait_state(&client, "m-1", "the report", |s| {
        s.reported_update_time.is_some()
    })
    .await;
    assert_eq!(
        sides(&state)[2],
        json!({"config": {"c": {"d": 4.0}}, "list": [9.0]})
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_expected_version_is_aborted_and_of_two_racing_updates_one_wins() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    let first = update(&client, "v-1", json!({"speed": 1}), 0)
        .await
        .unwrap();
    let second = update(&client, "v-1", json!({"speed": 2}), first.version)
        .await
        .unwrap();
    assert!(second.version > first.version);
    let stale = update(&client, "v-1", json!({"speed": 3}), first.version)
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert!(
        stale.message().contains(&second.version.to_string()),
        "the message gives the current version: {}",
        stale.message()
    );
    // Nothing ever desired or reported: any expected version is stale.
    let none = update(&client, "v-new", json!({"speed": 3}), 5)
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Aborted);

    for round in 0..20 {
        let base = get_state(&client, "v-1").await.unwrap().version;
        let (a, b) = tokio::join!(
            update(&client, "v-1", json!({"speed": round, "by": "a"}), base),
            update(&client, "v-1", json!({"speed": round, "by": "b"}), base),
        );
        let codes = [&a, &b].map(|r| r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok));
        assert!(
            codes == [Code::Ok, Code::Aborted] || codes == [Code::Aborted, Code::Ok],
            "round {round}: {codes:?}"
        );
        let winner = a.or(b).unwrap();
        let [desired, ..] = sides(&get_state(&client, "v-1").await.unwrap());
        assert_eq!(desired["by"], sides(&winner)[0]["by"]);
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_patches_that_cannot_be_applied_are_dropped_and_counted() {
    let broker = embedded_broker();
    let metrics = format!("127.0.0.1:{}", mosquitto::free_port());
    let service = TestService::start_ready(config(&broker, &["--metrics-addr", &metrics])).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker, "r-1", None).await;
    let topic = "devices/r-1/state/reported";
    device.publish(topic, r#"{"ok": 1}"#).await;
    device.publish(topic, "[1, 2]").await;
    device.publish(topic, "not json").await;
    device
        .publish(topic, format!(r#"{{"big": "{}"}}"#, "x".repeat(70 << 10)))
        .await;
    let deep = format!("{}1{}", r#"{"a":"#.repeat(33), "}".repeat(33));
    device.publish(topic, deep).await;
    device.publish(topic, r#"{"ok": 2, "also": true}"#).await;

    let state = wait_state(&client, "r-1", "the last good patch", |s| {
        sides(s)[1].get("also").is_some()
    })
    .await;
    assert_eq!(sides(&state)[1], json!({"ok": 2.0, "also": true}));
    let text = eventually("the drops counted", || async {
        let text = scrape(&metrics).await;
        let dropped = |reason: &str| {
            sample(
                &text,
                &format!("devicehub_reported_state_dropped_total{{reason=\"{reason}\"}}"),
            )
        };
        (dropped("not_an_object") == Some(2.0)
            && dropped("too_large") == Some(1.0)
            && dropped("too_deep") == Some(1.0))
        .then_some(text)
    })
    .await;
    assert_eq!(
        sample(&text, "devicehub_reported_state_patches_total"),
        Some(2.0)
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_the_current_state_then_desired_and_reported_changes_in_version_order() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    let first = update(&client, "w-1", json!({"level": 1}), 0)
        .await
        .unwrap();
    update(&client, "w-2", json!({"level": 1}), 0)
        .await
        .unwrap();

    let mut one = watch_state(&client, "w-1").await;
    let mut all = watch_state(&client, "").await;
    let current = next_state(&mut one).await;
    assert_eq!(current.version, first.version);
    // Every device's current state, by device id, then the changes.
    let mut seen = vec![next_state(&mut all).await, next_state(&mut all).await];
    assert_eq!(
        seen.iter()
            .map(|s| s.device_id.as_str())
            .collect::<Vec<_>>(),
        ["w-1", "w-2"]
    );

    let device = TestDevice::connect(&broker, "w-1", None).await;
    let desired = update(&client, "w-1", json!({"level": 2}), 0)
        .await
        .unwrap();
    device
        .publish("devices/w-1/state/reported", r#"{"level": 2}"#)
        .await;
    let a = next_state(&mut one).await;
    let b = next_state(&mut one).await;
    update(&client, "w-2", json!({"level": 3}), 0)
        .await
        .unwrap();
    assert_eq!(a.version, desired.version);
    assert!(b.version > a.version);
    assert_eq!(sides(&b)[1], json!({"level": 2.0}));
    assert_eq!(sides(&b)[2], json!({}));
    for _ in 0..3 {
        seen.push(next_state(&mut all).await);
    }
    let versions: Vec<i64> = seen[2..].iter().map(|s| s.version).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert_eq!(seen[4].device_id, "w-2");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_validated_and_a_device_without_state_is_not_found() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    let code_and_message = |status: Status| (status.code(), status.message().to_owned());

    let (code, message) = code_and_message(get_state(&client, "nobody").await.unwrap_err());
    assert_eq!(code, Code::NotFound);
    assert!(message.contains("nobody"), "{message}");

    let missing = client
        .clone()
        .update_desired_state(UpdateDesiredStateRequest {
            device_id: "d".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(
        missing.message().starts_with("patch"),
        "{}",
        missing.message()
    );

    let too_deep = (0..33).fold(json!(1), |inner, _| json!({ "a": inner }));
    let too_large = json!({ "big": "x".repeat(65 << 10) });
    for (patch, expected) in [
        (too_deep, "nests 33 deep"),
        (too_large, "the limit is 65536"),
    ] {
        let (code, message) = code_and_message(update(&client, "d", patch, 0).await.unwrap_err());
        assert_eq!(code, Code::InvalidArgument);
        assert!(
            message.starts_with("patch") && message.contains(expected),
            "{message}"
        );
    }
    // Each patch fits, but together they would make desired too large.
    let half = || json!({ "x": "y".repeat(40 << 10) });
    update(&client, "d", half(), 0).await.unwrap();
    let (code, message) = code_and_message(
        update(&client, "d", json!({ "z": "y".repeat(40 << 10) }), 0)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("would make desired"), "{message}");

    let (code, message) =
        code_and_message(update(&client, "d", json!({"a": 1}), -1).await.unwrap_err());
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.starts_with("expected_version"), "{message}");
    let (code, message) = code_and_message(
        update(&client, "a/b", json!({"a": 1}), 0)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.starts_with("device_id"), "{message}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_states_stay_within_max_device_states() {
    let broker = embedded_broker();
    let service =
        TestService::start_ready(config(&broker, &["--max-device-states", "200000"])).await;
    let client = service.client().await;
    let big = || json!({ "blob": "x".repeat(40 << 10) });
    let mut refused = None;
    for n in 0..10 {
        if let Err(status) = update(&client, &format!("b-{n}"), big(), 0).await {
            refused = Some((n, status));
            break;
        }
    }
    let (n, status) = refused.expect("the budget runs out");
    assert!((2..=5).contains(&n), "refused at device {n}");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("--max-device-states"),
        "{}",
        status.message()
    );
    // Shrinking is always allowed, and makes room.
    update(&client, "b-0", json!({"blob": null}), 0)
        .await
        .unwrap();
    update(&client, &format!("b-{n}"), big(), 0).await.unwrap();
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_decide_who_reads_and_who_changes_states() {
    let broker = embedded_broker();
    let dir = TempDir::new("state-scopes");
    let signer = Signer::es256();
    let keys = dir.write("keys.pem", &signer.public_pem);
    let service = TestService::start_ready(config(&broker, &["--auth-jwt-key", &keys])).await;
    let client = service.client().await;
    let token = |scope: &str| signer.sign(&claims("tester", scope, 3600));
    let writer = token("state:write:fan-*");
    let reader = token("state:read:fan-1");
    let readings = token("readings:read");
    let request = |device: &str| UpdateDesiredStateRequest {
        device_id: device.into(),
        patch: Some(to_struct(json!({"on": true}))),
        expected_version: 0,
    };
    let get = |device: &str| GetDeviceStateRequest {
        device_id: device.into(),
    };

    client
        .clone()
        .update_desired_state(authed(&writer, request("fan-1")))
        .await
        .unwrap();
    client
        .clone()
        .update_desired_state(authed(&writer, request("fan-2")))
        .await
        .unwrap();
    let outside = client
        .clone()
        .update_desired_state(authed(&writer, request("pump-1")))
        .await
        .unwrap_err();
    assert_eq!(outside.code(), Code::PermissionDenied);
    assert!(
        outside.message().contains("state:write"),
        "{}",
        outside.message()
    );
    let not_a_writer = client
        .clone()
        .update_desired_state(authed(&reader, request("fan-1")))
        .await
        .unwrap_err();
    assert_eq!(not_a_writer.code(), Code::PermissionDenied);

    client
        .clone()
        .get_device_state(authed(&reader, get("fan-1")))
        .await
        .unwrap();
    let outside = client
        .clone()
        .get_device_state(authed(&reader, get("fan-2")))
        .await
        .unwrap_err();
    assert_eq!(outside.code(), Code::PermissionDenied);
    let status = client
        .clone()
        .get_device_state(authed(&readings, get("fan-1")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("state:read"),
        "{}",
        status.message()
    );

    // A watch of every device shows only those the scope covers.
    let mut all = client
        .clone()
        .watch_device_state(authed(&reader, WatchDeviceStateRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let first = next_state(&mut all).await;
    assert_eq!(first.device_id, "fan-1");
    client
        .clone()
        .update_desired_state(authed(&writer, request("fan-2")))
        .await
        .unwrap();
    client
        .clone()
        .update_desired_state(authed(&writer, request("fan-1")))
        .await
        .unwrap();
    assert_eq!(next_state(&mut all).await.device_id, "fan-1");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_applies_interval_ms_and_reports_it() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    let simulate = simulate_config(
        &broker,
        &[
            "--devices",
            "1",
            "--device-prefix",
            "sim-",
            "--interval-ms",
            "1000",
        ],
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let simulator = tokio::spawn(devicehub::simulate::run(simulate, shutdown.clone()));
    let _stop = shutdown.clone().drop_guard();

    let reported = wait_state(&client, "sim-1", "the simulator's first report", |s| {
        s.reported_update_time.is_some()
    })
    .await;
    assert_eq!(
        sides(&reported)[1],
        json!({"interval_ms": 1000.0, "fan": false})
    );
    let updated = update(&client, "sim-1", json!({"interval_ms": 250}), 0)
        .await
        .unwrap();
    let applied = wait_state(&client, "sim-1", "interval_ms applied and reported", |s| {
        sides(s)[1]["interval_ms"] == json!(250.0)
    })
    .await;
    assert_eq!(sides(&applied)[2], json!({}));
    assert!(applied.version > updated.version);
    shutdown.cancel();
    within("the simulator to stop", simulator).await.unwrap();
    service.stop().await;
}
