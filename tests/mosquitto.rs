//! The service against a real Mosquitto process that the tests start (and
//! kill, and restart) on an ephemeral loopback port.

mod common;

use std::time::Duration;

use common::*;
use devicehub::proto::{
    watch_readings_response::Event as WatchEvent, ListReadingsRequest, SendCommandRequest,
    WatchReadingsRequest,
};
use tonic::{Code, Request};
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
    let reading = eventually("the retained reading", || {
        let mut client = client.clone();
        async move {
            let request = ListReadingsRequest {
                device_id: "r1".into(),
                ..Default::default()
            };
            client
                .list_readings(request)
                .await
                .unwrap()
                .into_inner()
                .readings
                .pop()
        }
    })
    .await;
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
    let mut request = Request::new(SendCommandRequest {
        device_id: "d1".into(),
        command: "TURN_ON_FAN".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(10));
    let status = client.send_command(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

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
