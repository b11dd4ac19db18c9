//! The service against a real Mosquitto process that the tests start (and
//! kill, and restart) on an ephemeral loopback port.

use crate::common;

use std::time::Duration;

use common::*;
use devicehub::proto::{
    watch_readings_response::Event as WatchEvent, ListReadingsRequest, WatchReadingsRequest,
};
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_and_commands_flow_through_mosquitto() {
    let mosquitto = Mosquitto::start();
    end_to_end(&mosquitto.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_readings_are_flagged() {
    let mosquitto = Mosquitto::start();
    let device = TestDevice::connect(&mosquitto.url, "device-retained", None).await;
    device
        .client
        .publish(
            "devices/r1/readings",
            rumqttc::QoS::AtLeastOnce,
            true,
            "last known",
        )
        .await
        .unwrap();
    // Published before the service subscribes, so the broker delivers it
    // as a retained message.
    eventually("mosquitto to store the retained message", || async {
        let mut probe = TestDevice::connect(
            &mosquitto.url,
            "probe-retained",
            Some("devices/r1/readings"),
        )
        .await;
        tokio::time::timeout(Duration::from_millis(200), probe.received.recv())
            .await
            .ok()
            .flatten()
    })
    .await;
    let service = TestService::start_ready(config(&mosquitto.url, &[])).await;
    let client = service.client().await;
    let reading = newest_reading_of(&client, "r1").await;
    assert!(reading.retained);
    assert_eq!(reading.payload.as_ref(), b"last known");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_flips_health_and_ingestion_resumes() {
    let mosquitto = Mosquitto::start();
    let service = TestService::start_ready(config(&mosquitto.url, &[])).await;
    let mut client = service.client().await;
    let mut watch = client
        .watch_readings(WatchReadingsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let port = mosquitto.kill();
    service.wait_for_health(ServingStatus::NotServing).await;
    assert_command_unavailable(&client).await;

    let mosquitto = Mosquitto::start_on(port);
    service.wait_for_health(ServingStatus::Serving).await;
    let device = TestDevice::connect(&mosquitto.url, "device-after-restart", None).await;
    device.publish("devices/d1/readings", "after restart").await;
    // The watch stream survived the outage and sees the new reading.
    let message = within("a reading after the restart", watch.message())
        .await
        .unwrap()
        .unwrap();
    let Some(WatchEvent::Reading(reading)) = message.event else {
        panic!("not a reading")
    };
    assert_eq!(reading.payload.as_ref(), b"after restart");
    service.stop().await;
}

/// Collects the payload indices a watcher receives, in a background task.
fn collect_indices(
    mut stream: tonic::Streaming<devicehub::proto::WatchReadingsResponse>,
) -> std::sync::Arc<std::sync::Mutex<Vec<u64>>> {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok(Some(message)) = stream.message().await {
            let Some(WatchEvent::Reading(reading)) = message.event else {
                panic!("unexpected gap")
            };
            let index = std::str::from_utf8(&reading.payload)
                .unwrap()
                .parse()
                .unwrap();
            sink.lock().unwrap().push(index);
        }
    });
    got
}

/// The indices the test devices wrote as payloads, of every buffered reading.
async fn indices_listed(
    client: &devicehub::proto::device_hub_client::DeviceHubClient<tonic::transport::Channel>,
) -> Vec<u64> {
    let readings = list_all(client, "").await;
    let index = |r: &devicehub::proto::Reading| {
        std::str::from_utf8(&r.payload)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    readings.iter().map(index).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_loses_nothing_across_a_service_restart() {
    let mosquitto = Mosquitto::start();
    let args = [
        "--mqtt-persistent-session",
        "--mqtt-client-id",
        "devicehub-persistent-test",
    ];
    let device = TestDevice::connect(&mosquitto.url, "device-persistent", None).await;

    let first = TestService::start_ready(config(&mosquitto.url, &args)).await;
    let first_client = first.client().await;
    for i in 0..100u64 {
        device.publish("devices/d1/readings", i.to_string()).await;
    }
    eventually("the first run to store 100 readings", || async {
        (indices_listed(&first_client).await.len() == 100).then_some(())
    })
    .await;
    let last_seq_of_first_run = {
        let mut client = first_client.clone();
        let page = client
            .list_readings(ListReadingsRequest {
                page_size: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        page.into_inner().readings[0].seq
    };
    first.stop().await;

    // Published while devicehub is down: the broker queues them for its session.
    for i in 100..300u64 {
        device.publish("devices/d1/readings", i.to_string()).await;
    }
    let second = TestService::start_ready(config(&mosquitto.url, &args)).await;
    let client = second.client().await;
    let got = eventually("the queued readings", || async {
        let got = indices_listed(&client).await;
        (got.len() >= 200).then_some(got)
    })
    .await;
    assert_eq!(
        got,
        (100..300).collect::<Vec<_>>(),
        "every reading once, in order"
    );
    let mut c = client.clone();
    let oldest = c
        .list_readings(ListReadingsRequest {
            page_size: 1,
            oldest_first: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .readings[0]
        .seq;
    assert!(
        oldest > last_seq_of_first_run,
        "sequence numbers never go backwards across restarts"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos1_reading_reaches_every_watcher_across_a_broker_restart() {
    let state = tempdir::TempDir::new("mosquitto-state");
    let port = closed_port().port;
    let mosquitto = Mosquitto::start_with(port, Some(state.path()));
    let args = [
        "--mqtt-persistent-session",
        "--mqtt-client-id",
        "devicehub-broker-restart",
    ];
    let service = TestService::start_ready(config(&mosquitto.url, &args)).await;
    let mut client = service.client().await;
    let watchers = [
        collect_indices(
            client
                .watch_readings(WatchReadingsRequest::default())
                .await
                .unwrap()
                .into_inner(),
        ),
        collect_indices(
            client
                .watch_readings(WatchReadingsRequest {
                    device_id: "d1".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner(),
        ),
    ];

    // The device keeps publishing at QoS 1 through the outage; its session
    // (like devicehub's) survives the broker restart.
    let device =
        TestDevice::connect_with(&mosquitto.url, "device-broker-restart", None, false).await;
    let total = 1500u64;
    let publishing = publish_indices(&device, "devices/d1/readings", 0..total);
    eventually("readings to flow before the restart", || async {
        (watchers[0].lock().unwrap().len() >= 300).then_some(())
    })
    .await;
    mosquitto.stop();
    service.wait_for_health(ServingStatus::NotServing).await;
    let mosquitto = Mosquitto::start_with(port, Some(state.path()));
    service.wait_for_health(ServingStatus::Serving).await;

    within("the device to publish everything", publishing)
        .await
        .unwrap();
    // No loss: every published reading reached every watcher. And each
    // watcher got exactly what the buffer holds, in order: devicehub itself
    // neither drops nor repeats anything. (The buffer may hold a few readings
    // twice: QoS 1 is at-least-once, and the device sends again the publishes
    // the broker had not acknowledged when it stopped.)
    let distinct = |got: &[u64]| {
        got.iter()
            .copied()
            .collect::<std::collections::BTreeSet<u64>>()
    };
    for watcher in &watchers {
        eventually("every reading at every watcher", || async {
            (distinct(&watcher.lock().unwrap()).len() as u64 == total).then_some(())
        })
        .await;
    }
    let buffered = indices_listed(&client).await;
    assert_eq!(distinct(&buffered), (0..total).collect());
    assert_eq!(
        *watchers[0].lock().unwrap(),
        buffered,
        "the all-devices watcher got the buffer, once, in order"
    );
    assert_eq!(
        *watchers[1].lock().unwrap(),
        buffered,
        "the d1 watcher got the buffer, once, in order"
    );
    drop(mosquitto);
    service.stop().await;
}

/// One device id for each class of text MQTT receivers reject in a topic,
/// and the code point the error must name. Mosquitto drops the whole
/// connection for a PUBLISH whose topic holds any of these.
const HOSTILE_DEVICE_IDS: &[(&str, &str)] = &[
    ("a\u{0}b", "U+0000"),
    ("a\u{1}b", "U+0001"),
    ("tab\tid", "U+0009"),
    ("\u{1f}", "U+001F"),
    ("del\u{7f}", "U+007F"),
    ("c1\u{85}x", "U+0085"),
    ("\u{9f}", "U+009F"),
    ("non\u{fdd0}char", "U+FDD0"),
    ("\u{fdef}", "U+FDEF"),
    ("bom\u{fffe}", "U+FFFE"),
    ("\u{ffff}", "U+FFFF"),
    ("plane1\u{1fffe}", "U+1FFFE"),
    ("\u{10ffff}", "U+10FFFF"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_ids_brokers_reject_are_refused_and_the_link_never_drops() {
    use devicehub::proto::{SendCommandRequest, StreamCommandsRequest};
    use tokio_stream::StreamExt;

    let mosquitto = Mosquitto::start();
    // A persistent session would replay a bad publish on every reconnect.
    let args = [
        "--mqtt-persistent-session",
        "--mqtt-client-id",
        "devicehub-hostile-ids",
    ];
    let service = TestService::start_ready(config(&mosquitto.url, &args)).await;
    let mut client = service.client().await;
    let command = |device_id: &str| SendCommandRequest {
        device_id: device_id.into(),
        command: "PING".into(),
        ..Default::default()
    };
    let too_long = "x".repeat(devicehub::topic::MAX_DEVICE_ID_BYTES + 1);

    for (id, code_point) in HOSTILE_DEVICE_IDS {
        let status = client.send_command(command(id)).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{id:?}: {status:?}"
        );
        assert!(
            status.message().starts_with("device_id") && status.message().contains(code_point),
            "{id:?}: {status:?}"
        );
    }
    let status = client.send_command(command(&too_long)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    let requests: Vec<StreamCommandsRequest> = HOSTILE_DEVICE_IDS
        .iter()
        .map(|(id, _)| *id)
        .chain([too_long.as_str()])
        .enumerate()
        .map(|(i, id)| StreamCommandsRequest {
            request_id: i as u64,
            command: Some(command(id)),
        })
        .collect();
    let sent = requests.len();
    let responses: Vec<_> = within(
        "every StreamCommands response",
        client
            .stream_commands(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner()
            .map(|r| r.unwrap())
            .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(responses.len(), sent);
    for response in &responses {
        assert_eq!(
            tonic::Code::from_i32(response.status_code),
            tonic::Code::InvalidArgument,
            "{response:?}"
        );
        assert!(
            response.status_message.starts_with("device_id"),
            "{response:?}"
        );
    }

    // Filters carrying such text are refused too, naming the field.
    let status = client
        .list_readings(ListReadingsRequest {
            topic_filter: "devices/\u{1}/readings".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("topic_filter") && status.message().contains("U+0001"));

    // The link never dropped: a reading still flows and a command still goes
    // out, health stayed SERVING, and Mosquitto saw one connection from the
    // service and no malformed packet.
    let mut device = TestDevice::connect(
        &mosquitto.url,
        "device-after-hostile",
        Some("devices/ok/commands"),
    )
    .await;
    device.publish("devices/ok/readings", "still flowing").await;
    let reading = newest_reading_of(&client, "ok").await;
    assert_eq!(reading.payload.as_ref(), b"still flowing");
    client.send_command(command("ok")).await.unwrap();
    assert_eq!(device.next_message().await.topic, "devices/ok/commands");
    assert_eq!(service.health().await, ServingStatus::Serving);
    mosquitto.assert_one_unbroken_service_connection();
    service.stop().await;
}
