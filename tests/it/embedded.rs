//! The service against the embedded broker (rumqttd), driven by the generated
//! tonic client and real MQTT devices.

use crate::common;

use common::*;
use devicehub::proto::{
    send_command_request::Payload, watch_readings_response::Event as WatchEvent,
    ListReadingsRequest, SendCommandRequest, WatchReadingsRequest,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_and_commands_flow_through_the_embedded_broker() {
    end_to_end(&embedded_broker()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_invalid_argument_naming_the_field() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;

    let command = |device_id: &str, command: &str| SendCommandRequest {
        device_id: device_id.into(),
        command: command.into(),
        ..Default::default()
    };
    let bad_commands = [
        (command("", "X"), "device_id"),
        (command("a/b", "X"), "device_id"),
        (command("a+", "X"), "device_id"),
        (command("#", "X"), "device_id"),
        (command("a\0b", "X"), "device_id"),
        (command(&"d".repeat(300), "X"), "device_id"),
        (command("d1", ""), "command"),
        (command("d1", &"c".repeat(300)), "command"),
        (
            SendCommandRequest {
                qos: Some(3),
                ..command("d1", "X")
            },
            "qos",
        ),
        (
            SendCommandRequest {
                payload: Some(Payload::RawPayload(vec![0u8; 300 << 10].into())),
                ..command("d1", "X")
            },
            "raw_payload",
        ),
    ];
    for (request, field) in bad_commands {
        let status = client.send_command(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{field}: {status:?}");
    }
    // Over the request size limit: refused by tonic before it is decoded.
    let huge = SendCommandRequest {
        payload: Some(Payload::RawPayload(vec![0u8; 2 << 20].into())),
        ..command("d1", "X")
    };
    let status = client.send_command(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    let list = |f: fn(&mut ListReadingsRequest)| {
        let mut request = ListReadingsRequest::default();
        f(&mut request);
        request
    };
    let bad_lists = [
        (list(|r| r.device_id = "a/b".into()), "device_id"),
        (list(|r| r.topic_filter = "a/#/b".into()), "topic_filter"),
        (list(|r| r.topic_filter = "a+".into()), "topic_filter"),
        (list(|r| r.page_size = -1), "page_size"),
        (list(|r| r.page_size = 1001), "page_size"),
        (list(|r| r.page_token = "forged".into()), "page_token"),
        (list(|r| r.page_token = "01".repeat(17)), "page_token"),
        (
            list(|r| {
                r.start_time = Some(prost_types::Timestamp {
                    seconds: 10,
                    nanos: 0,
                });
                r.end_time = Some(prost_types::Timestamp {
                    seconds: 5,
                    nanos: 0,
                });
            }),
            "end_time",
        ),
        (
            list(|r| {
                r.start_time = Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -5,
                })
            }),
            "start_time",
        ),
    ];
    for (request, field) in bad_lists {
        let status = client.list_readings(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{field}: {status:?}");
    }

    // A page token only works with the filters it was issued for.
    let device = TestDevice::connect(&broker, "device-tokens", None).await;
    for i in 0..3 {
        device.publish("devices/d1/readings", format!("{i}")).await;
    }
    let first = eventually("a second page", || {
        let mut client = client.clone();
        async move {
            let page = client
                .list_readings(ListReadingsRequest {
                    page_size: 2,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            (!page.next_page_token.is_empty()).then_some(page)
        }
    })
    .await;
    let status = client
        .list_readings(ListReadingsRequest {
            page_token: first.next_page_token.clone(),
            oldest_first: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("page_token"), "{status:?}");

    for (device_id, topic_filter, field) in [("a/b", "", "device_id"), ("", "#/a", "topic_filter")]
    {
        let status = client
            .watch_readings(WatchReadingsRequest {
                device_id: device_id.into(),
                topic_filter: topic_filter.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{status:?}");
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_means_not_serving_and_unavailable() {
    let service = TestService::start(config(&closed_port(), &[])).await;
    let mut client = service.client().await;
    assert_eq!(service.health().await, ServingStatus::NotServing);

    assert_command_unavailable(&client).await;

    // Reads still work from the (empty) buffer.
    let page = client
        .list_readings(ListReadingsRequest::default())
        .await
        .unwrap();
    assert!(page.into_inner().readings.is_empty());
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_gets_data_loss_and_ingestion_goes_on() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &["--buffer-max-readings", "50"])).await;
    let mut client = service.client().await;
    let mut slow = client
        .watch_readings(WatchReadingsRequest::default())
        .await
        .unwrap()
        .into_inner();

    // Far more than the stream's queues hold while nobody reads.
    let device = TestDevice::connect(&broker, "device-flood", None).await;
    let total = 20_000;
    for i in 0..total {
        device
            .publish(
                "devices/flood/readings",
                format!("{{\"i\": {i}, \"pad\": \"{}\"}}", "x".repeat(100)),
            )
            .await;
    }
    // Ingestion was not held up by the stalled watcher: the last reading is in.
    let last = format!("{{\"i\": {}, ", total - 1);
    eventually("the last reading to be stored", || {
        let mut client = client.clone();
        let last = last.clone();
        async move {
            let page = client
                .list_readings(ListReadingsRequest {
                    page_size: 1,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            page.readings
                .first()
                .filter(|r| r.payload.starts_with(last.as_bytes()))
                .map(|_| ())
        }
    })
    .await;

    // The slow watcher gets what fitted in its queues, in order, then a
    // DATA_LOSS status that names the last sequence number it was sent.
    let mut received = Vec::new();
    let status = loop {
        match within("the slow watcher's stream", slow.message()).await {
            Ok(Some(message)) => {
                let Some(WatchEvent::Reading(reading)) = message.event else {
                    panic!("not a reading")
                };
                received.push(reading.seq);
            }
            Ok(None) => panic!("the stream ended without telling the watcher what it missed"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    // "... sequence numbers A to B were evicted ... the last sequence number sent is C"
    let numbers: Vec<u64> = status
        .message()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let [missed_from, missed_to, last_sent] = numbers[..] else {
        panic!("{status:?}")
    };
    assert_eq!(
        missed_from,
        last_sent + 1,
        "the gap starts right after the last reading sent"
    );
    assert!(missed_to >= missed_from);
    assert!(received.len() < total);
    assert!(
        received.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap before the error"
    );
    if let Some(last) = received.last() {
        assert_eq!(*last, last_sent);
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_token_into_evicted_readings_is_out_of_range() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &["--buffer-max-readings", "5"])).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker, "device-evict", None).await;
    for i in 0..5 {
        device.publish("devices/d1/readings", format!("{i}")).await;
    }
    let page = eventually("a full buffer", || {
        let mut client = client.clone();
        async move {
            let request = ListReadingsRequest {
                page_size: 2,
                oldest_first: true,
                ..Default::default()
            };
            let page = client.list_readings(request).await.unwrap().into_inner();
            (page.readings.first().map(|r| r.payload.as_ref()) == Some(b"0")).then_some(page)
        }
    })
    .await;
    for i in 5..10 {
        device.publish("devices/d1/readings", format!("{i}")).await;
    }
    let status = eventually("the token's readings to be evicted", || {
        let mut client = client.clone();
        let token = page.next_page_token.clone();
        async move {
            let request = ListReadingsRequest {
                page_size: 2,
                oldest_first: true,
                page_token: token,
                ..Default::default()
            };
            client.list_readings(request).await.err()
        }
    })
    .await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().starts_with("page_token"), "{status:?}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_topic_device_like_the_old_poc_works_with_flags_alone() {
    let broker = embedded_broker();
    let args = [
        "--readings-topic=poc/device/sensor",
        "--commands-topic=poc/device/control",
        "--fixed-device-id=device",
    ];
    let service = TestService::start_ready(config(&broker, &args)).await;
    let mut client = service.client().await;
    let mut device = TestDevice::connect(&broker, "poc-device", Some("poc/device/control")).await;
    device
        .publish("poc/device/sensor", r#"{"temperature": 22}"#)
        .await;
    let reading = newest_reading_of(&client, "device").await;
    assert_eq!(reading.topic, "poc/device/sensor");

    let response = client
        .send_command(SendCommandRequest {
            device_id: "device".into(),
            command: "TURN_ON_FAN".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.topic, "poc/device/control");
    let message = device.next_message().await;
    let envelope: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(envelope["command"], "TURN_ON_FAN");

    let status = client
        .send_command(SendCommandRequest {
            device_id: "other".into(),
            command: "X".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_with_unavailable_and_a_resume_point() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    let mut watch = client
        .watch_readings(WatchReadingsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let device = TestDevice::connect(&broker, "device-shutdown", None).await;
    device.publish("devices/d1/readings", "1").await;
    let message = within("a reading", watch.message()).await.unwrap().unwrap();
    let Some(WatchEvent::Reading(reading)) = message.event else {
        panic!("not a reading")
    };

    let stopping = tokio::spawn(service.stop());
    let status = within("the stream to end", watch.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .ends_with(&format!("resume after sequence number {}", reading.seq)),
        "{status:?}"
    );
    within("the service to stop", stopping).await.unwrap();
}
