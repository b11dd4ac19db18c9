//! Commands with a round trip: device replies, timeouts, correlation under
//! load, late and stray replies, against the embedded broker and Mosquitto.

use crate::common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::*;
use devicehub::{
    config::BrokerUrl,
    proto::{
        CommandStatus, ListReadingsRequest, SendCommandRequest, SendCommandResponse,
        StreamCommandsRequest, StreamCommandsResponse,
    },
};
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Status};

fn command(device_id: &str, command: &str, reply_timeout_ms: Option<u64>) -> SendCommandRequest {
    SendCommandRequest {
        device_id: device_id.into(),
        command: command.into(),
        reply_timeout: reply_timeout_ms
            .map(|ms| prost_types::Duration::try_from(Duration::from_millis(ms)).unwrap()),
        ..Default::default()
    }
}

fn with_params(mut request: SendCommandRequest, params: Value) -> SendCommandRequest {
    request.payload = Some(devicehub::proto::send_command_request::Payload::Params(
        common::json::to_struct(params),
    ));
    request
}

/// The policy of the tests' devices: d-silent never answers, d-late answers
/// after 1 s, FAIL gets an error, anything else an ok echoing the device and
/// params, after a short pseudo-random delay that shuffles reply order.
fn policy() -> ReplyPolicy {
    Arc::new(|device_id: &str, envelope: &Value| {
        let id = envelope["id"].clone();
        let jitter = Duration::from_micros(
            id.as_str()
                .unwrap_or("")
                .bytes()
                .map(u64::from)
                .sum::<u64>()
                % 3000,
        );
        match (device_id, envelope["command"].as_str()) {
            ("d-silent", _) => None,
            ("d-late", _) => Some((
                Duration::from_millis(1000),
                json!({"id": id, "status": "ok", "result": "late"}),
            )),
            (_, Some("FAIL")) => Some((
                jitter,
                json!({"id": id, "status": "error", "message": "fan is broken"}),
            )),
            _ => Some((
                jitter,
                json!({"id": id, "status": "ok", "result": {"device": device_id, "params": envelope["params"]}}),
            )),
        }
    })
}

fn result_json(response: &SendCommandResponse) -> Value {
    let reply = response.reply.as_ref().expect("a reply");
    let value = reply.result.as_ref().expect("a result");
    common::json::from_value(value)
}

async fn round_trips(broker: &BrokerUrl) {
    let service = TestService::start_ready(config(broker, &[])).await;
    let mut client = service.client().await;
    let _devices = Responder::start(broker, "responder", policy()).await;

    // OK, with the device's result.
    let response = client
        .send_command(with_params(
            command("d1", "TURN_ON_FAN", Some(5000)),
            json!({"speed": 3}),
        ))
        .await
        .unwrap()
        .into_inner();
    let reply = response.reply.as_ref().unwrap();
    assert_eq!(reply.status(), CommandStatus::Ok);
    assert!(reply.received_at.is_some());
    assert_eq!(
        result_json(&response),
        json!({"device": "d1", "params": {"speed": 3.0}})
    );

    // The device's error is an answer, not a gRPC error.
    let response = client
        .send_command(command("d1", "FAIL", Some(5000)))
        .await
        .unwrap()
        .into_inner();
    let reply = response.reply.unwrap();
    assert_eq!(reply.status(), CommandStatus::Error);
    assert_eq!(reply.message, "fan is broken");

    // No reply in time.
    let status = client
        .send_command(command("d-silent", "PING", Some(300)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("d-silent") && status.message().contains("300ms"),
        "{status:?}"
    );

    // Fire-and-forget stays the default: no reply is waited for.
    let response = client
        .send_command(command("d-silent", "PING", None))
        .await
        .unwrap()
        .into_inner();
    assert!(response.reply.is_none());

    // Replies are buffered like readings, so anyone can see outcomes.
    let request = ListReadingsRequest {
        topic_filter: "devices/+/replies".into(),
        ..Default::default()
    };
    let outcomes = list_until("the replies in the buffer", &client, request, |readings| {
        (readings.len() >= 2).then_some(readings)
    })
    .await;
    assert!(outcomes
        .iter()
        .all(|r| r.device_id == "d1" && r.json.is_some()));
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_through_the_embedded_broker() {
    round_trips(&embedded_broker()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_through_mosquitto() {
    let mosquitto = Mosquitto::start();
    round_trips(&mosquitto.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_commands_each_get_their_own_devices_reply() {
    let mosquitto = Mosquitto::start();
    let service = TestService::start_ready(config(&mosquitto.url, &[])).await;
    let client = service.client().await;
    let _devices = Responder::start(&mosquitto.url, "responder-load", policy()).await;

    let calls: Vec<_> = (0..1000u64)
        .map(|n| {
            let mut client = client.clone();
            let device = format!("dev{}", n % 100);
            tokio::spawn(async move {
                let request = with_params(command(&device, "SET", Some(15_000)), json!({"n": n}));
                let response = client.send_command(request).await.map(|r| r.into_inner());
                (device, n, response)
            })
        })
        .collect();
    let mut per_device: HashMap<String, usize> = HashMap::new();
    for call in calls {
        let (device, n, response) = within("a concurrent command", call).await.unwrap();
        let response = response.unwrap_or_else(|s: Status| panic!("command {n}: {s:?}"));
        assert_eq!(
            result_json(&response),
            json!({"device": device, "params": {"n": n as f64}}),
            "command {n}"
        );
        *per_device.entry(device).or_default() += 1;
    }
    assert_eq!(per_device.len(), 100);
    assert!(per_device.values().all(|&count| count == 10));
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_replies_and_short_client_deadlines_never_misdeliver() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    let _devices = Responder::start(&broker, "responder-late", policy()).await;

    // The reply comes after 1 s; the command gives up after 200 ms.
    let status = client
        .send_command(command("d-late", "PING", Some(200)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);

    // The client's own deadline, shorter than the reply timeout, wins.
    let mut request = Request::new(command("d-late", "PING", Some(10_000)));
    request.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = client.send_command(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the call ended at the client's deadline"
    );

    // Both late replies arrive while a new command to the same device waits:
    // it must get its own reply (which is also late, by design of d-late,
    // so give it time), never one of theirs.
    let response = client
        .send_command(command("d-late", "PING", Some(5000)))
        .await
        .unwrap()
        .into_inner();
    let reply = response.reply.unwrap();
    assert_eq!(reply.status(), CommandStatus::Ok);
    let request = ListReadingsRequest {
        device_id: "d-late".into(),
        ..Default::default()
    };
    let outcomes = list_until(
        "three late replies in the buffer",
        &client,
        request,
        |readings| (readings.len() == 3).then_some(readings),
    )
    .await;
    let ids: Vec<String> = outcomes
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.payload).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(ids.contains(&response.command_id));
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reply_timeouts_and_a_down_broker_are_refused() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    for timeout in [
        prost_types::Duration {
            seconds: 0,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: -1,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: 61,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: 1,
            nanos: 2_000_000_000,
        },
    ] {
        let mut request = command("d1", "PING", None);
        request.reply_timeout = Some(timeout);
        let status = client.send_command(request).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{timeout:?}: {status:?}"
        );
        assert!(status.message().starts_with("reply_timeout"), "{status:?}");
    }
    service.stop().await;

    let service = TestService::start(config(&closed_port(), &[])).await;
    let mut client = service.client().await;
    let status = client
        .send_command(command("d1", "PING", Some(5000)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_commands_gets_one_response_per_request() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    let _devices = Responder::start(&broker, "responder-stream", policy()).await;

    let request = |request_id: u64, command: Option<SendCommandRequest>| StreamCommandsRequest {
        request_id,
        command,
    };
    // Stays in flight for a while, so that the same id again is refused.
    let mut requests = vec![
        request(1, Some(command("d-silent", "PING", Some(1500)))),
        request(1, Some(command("dev0", "PING", None))),
        request(2, None),
        request(3, Some(command("dev0", "", None))),
        request(4, Some(command("bad/device", "PING", None))),
        request(5, Some(command("dev1", "FAIL", Some(15_000)))),
    ];
    // More than one stream's in-flight limit: flow control, not refusal.
    let many = 2 * devicehub::MAX_COMMANDS_IN_FLIGHT as u64;
    for n in 0..many {
        let device = format!("dev{}", n % 50);
        let command = with_params(command(&device, "SET", Some(15_000)), json!({"n": n}));
        requests.push(request(100 + n, Some(command)));
    }
    let sent = requests.len();
    let responses = client
        .stream_commands(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let responses: Vec<StreamCommandsResponse> =
        within("every response", responses.map(|r| r.unwrap()).collect()).await;
    assert_eq!(responses.len(), sent);

    let mut by_id: HashMap<u64, Vec<&StreamCommandsResponse>> = HashMap::new();
    for response in &responses {
        by_id.entry(response.request_id).or_default().push(response);
    }
    let code = |r: &StreamCommandsResponse| Code::from_i32(r.status_code);
    // Id 1: the duplicate is refused at once, the first times out later.
    let ones: Vec<Code> = by_id[&1].iter().map(|r| code(r)).collect();
    assert_eq!(ones, [Code::InvalidArgument, Code::DeadlineExceeded]);
    assert!(by_id[&1][0].status_message.contains("request_id"));
    for (id, field) in [(2, "command"), (3, "command"), (4, "device_id")] {
        let [response] = by_id[&id][..] else {
            panic!("one response for {id}")
        };
        assert_eq!(code(response), Code::InvalidArgument, "{response:?}");
        assert!(response.status_message.starts_with(field), "{response:?}");
        assert!(response.response.is_none());
    }
    let failed = by_id[&5][0].response.as_ref().unwrap();
    assert_eq!(
        failed.reply.as_ref().unwrap().status(),
        CommandStatus::Error,
        "a device's error is a reply, not a failed command"
    );
    for n in 0..many {
        let [response] = by_id[&(100 + n)][..] else {
            panic!("one response for command {n}")
        };
        assert_eq!(code(response), Code::Ok, "{response:?}");
        let device = format!("dev{}", n % 50);
        assert_eq!(
            result_json(response.response.as_ref().unwrap()),
            json!({"device": device, "params": {"n": n as f64}}),
            "command {n}"
        );
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_stream_ends_unavailable_when_the_service_stops() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    let mut device = TestDevice::connect(
        &broker,
        "device-stream-stop",
        Some("devices/d-silent/commands"),
    )
    .await;
    let (requests, stream) = tokio::sync::mpsc::channel(4);
    // A command that waits for a reply that never comes, on a stream the
    // client keeps open.
    requests
        .send(StreamCommandsRequest {
            request_id: 7,
            command: Some(command("d-silent", "PING", Some(60_000))),
        })
        .await
        .unwrap();
    let mut responses = client
        .stream_commands(tokio_stream::wrappers::ReceiverStream::new(stream))
        .await
        .unwrap()
        .into_inner();
    // The device got it, so it is in flight when the service stops.
    let message = within("the command at the device", device.next_message()).await;
    assert_eq!(message.topic, "devices/d-silent/commands");
    within("the service to stop", service.stop()).await;
    let status = within("the stream to end", responses.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    drop(requests);
}

/// A result nested `depth` arrays deep: `[[...[1]...]]`.
fn nested_result(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!([inner]))
}

/// A device's reply with a result nested deeper than clients decode: the
/// outcome is returned, the result left out and the message says so; one
/// as deep as allowed (31 levels) comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_result_too_deep_for_clients_is_left_out_and_said_so() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    let deep: ReplyPolicy = Arc::new(|_: &str, envelope: &Value| {
        let depth = envelope["params"]["depth"].as_u64()? as usize;
        let reply = json!({"id": envelope["id"], "status": "ok", "message": "done", "result": nested_result(depth)});
        Some((Duration::ZERO, reply))
    });
    let _devices = Responder::start(&broker, "responder-deep", deep).await;
    for (depth, kept) in [(31, true), (32, false), (100, false)] {
        let request = with_params(
            command("d-deep", "DEEP", Some(5000)),
            json!({"depth": depth}),
        );
        let reply = client
            .send_command(request)
            .await
            .unwrap()
            .into_inner()
            .reply
            .unwrap();
        assert_eq!(reply.status(), CommandStatus::Ok, "depth {depth}");
        assert_eq!(reply.result.is_some(), kept, "depth {depth}");
        match kept {
            true => assert_eq!(reply.message, "done"),
            false => assert_eq!(
                reply.message,
                "done (devicehub left out the result: nested deeper than 31 arrays and objects)"
            ),
        }
    }
    service.stop().await;
}

/// The time an envelope's `expires_at` names.
fn expires_at(envelope: &Value) -> std::time::SystemTime {
    let text = envelope["expires_at"].as_str().expect("expires_at");
    let timestamp: prost_types::Timestamp = text.parse().expect("RFC 3339");
    timestamp.try_into().unwrap()
}

/// The envelope says until when the command is valid: its reply timeout,
/// or a minute without one; the simulator drops one that arrives after it
/// (as a broker's queue for an offline device's session would deliver it)
/// and carries out the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_expire_and_the_simulator_drops_expired_ones() {
    use std::time::SystemTime;
    let mosquitto = Mosquitto::start();
    let service = TestService::start_ready(config(&mosquitto.url, &[])).await;
    let mut client = service.client().await;
    let mut device =
        TestDevice::connect(&mosquitto.url, "expiry-device", Some("devices/+/commands")).await;
    for (timeout_ms, valid_for) in [(Some(3000), 3), (None, 60)] {
        let sent = SystemTime::now();
        let request = command("e1", "PING", timeout_ms);
        match timeout_ms {
            // Nobody replies: only the envelope matters here.
            Some(_) => {
                let mut waiting = client.clone();
                tokio::spawn(async move { waiting.send_command(request).await });
            }
            None => {
                client.send_command(request).await.unwrap();
            }
        }
        let envelope: Value = serde_json::from_slice(&device.next_message().await.payload).unwrap();
        let valid = expires_at(&envelope).duration_since(sent).unwrap();
        let want = Duration::from_secs(valid_for);
        assert!(
            valid >= want && valid < want + Duration::from_secs(5),
            "{valid:?} for {timeout_ms:?}"
        );
    }
    drop(device);

    // The simulator: an expired command, then a fresh one, on its topic.
    let url = mosquitto.url.to_string();
    let mut simulator = tokio::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
        .args([
            "simulate",
            "--mqtt-url",
            &url,
            "--devices",
            "1",
            "--interval-ms",
            "60000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut watcher =
        TestDevice::connect(&mosquitto.url, "expiry-watcher", Some("devices/sim-1/+")).await;
    eventually("the simulated device online", || {
        let client = client.clone();
        async move {
            let device = client
                .clone()
                .get_device(devicehub::proto::GetDeviceRequest {
                    device_id: "sim-1".into(),
                })
                .await
                .ok()?
                .into_inner()
                .device?;
            (device.status() == devicehub::proto::DeviceStatus::Online).then_some(())
        }
    })
    .await;
    let publisher = TestDevice::connect(&mosquitto.url, "expiry-sender", None).await;
    let expired = json!({"id": "late", "command": "PING", "expires_at": "2020-01-01T00:00:00Z"});
    let fresh = json!({"id": "fresh", "command": "PING", "expires_at": "2999-01-01T00:00:00Z"});
    for envelope in [expired, fresh] {
        publisher
            .publish("devices/sim-1/commands", envelope.to_string())
            .await;
    }
    // Replies come in order: the fresh one's is the first reply if the
    // expired one was dropped.
    let reply = loop {
        let message = watcher.next_message().await;
        if message.topic == "devices/sim-1/replies" {
            break serde_json::from_slice::<Value>(&message.payload).unwrap();
        }
    };
    assert_eq!(reply["id"], "fresh", "{reply}");
    simulator.start_kill().unwrap();
    simulator.wait().await.unwrap();
    service.stop().await;
}
