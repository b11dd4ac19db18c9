//! Persistent commands (SendCommand with a `ttl`): queued for devices that
//! are away, delivered in order when they return, expired, cancelled,
//! published again after a device went away without replying, and
//! watched; against the embedded broker and Mosquitto, with real paho-mqtt
//! devices. The store's durability and replicas are in `store_commands.rs`.

use crate::common;

use std::time::Duration;

use common::{paho::PahoDevice, tempdir::TempDir, tokens::*, *};
use devicehub::{
    config::BrokerUrl,
    proto::{
        device_hub_client::DeviceHubClient, CancelCommandRequest, Command, CommandState,
        DeviceStatus, GetCommandRequest, GetDeviceRequest, ListCommandsRequest, SendCommandRequest,
        WatchCommandsRequest, WatchCommandsResponse,
    },
};
use tokio_stream::StreamExt;
use tonic::{transport::Channel, Code, Streaming};

pub fn persistent(device_id: &str, command: &str, ttl: Duration) -> SendCommandRequest {
    SendCommandRequest {
        device_id: device_id.into(),
        command: command.into(),
        ttl: Some(prost_types::Duration::try_from(ttl).unwrap()),
        ..Default::default()
    }
}

/// Sends a persistent command to `device_id`; the call must succeed.
pub async fn send(
    client: &DeviceHubClient<Channel>,
    device_id: &str,
    command: &str,
    ttl: Duration,
) -> devicehub::proto::SendCommandResponse {
    client
        .clone()
        .send_command(persistent(device_id, command, ttl))
        .await
        .expect("SendCommand")
        .into_inner()
}

/// Makes `device_id` OFFLINE the way a real one goes: a paho device
/// connects, is killed, and the broker publishes its last will.
pub async fn gone(broker: &BrokerUrl, client: &DeviceHubClient<Channel>, device_id: &str) {
    let device = PahoDevice::start(broker, device_id, "ok").await;
    wait_status(client, device_id, DeviceStatus::Online).await;
    device.kill().await;
    wait_status(client, device_id, DeviceStatus::Offline).await;
}

pub async fn wait_status(client: &DeviceHubClient<Channel>, device_id: &str, want: DeviceStatus) {
    eventually(&format!("{device_id} {want:?}"), || {
        let mut client = client.clone();
        async move {
            let device = client
                .get_device(GetDeviceRequest {
                    device_id: device_id.into(),
                })
                .await
                .ok()?
                .into_inner()
                .device?;
            (device.status() == want).then_some(())
        }
    })
    .await
}

pub async fn get(client: &DeviceHubClient<Channel>, command_id: &str) -> Command {
    client
        .clone()
        .get_command(GetCommandRequest {
            command_id: command_id.into(),
        })
        .await
        .expect("GetCommand")
        .into_inner()
        .command
        .expect("a command")
}

pub async fn wait_state(
    client: &DeviceHubClient<Channel>,
    command_id: &str,
    want: CommandState,
) -> Command {
    eventually(&format!("{command_id} {want:?}"), || async {
        let command = get(client, command_id).await;
        (command.state() == want).then_some(command)
    })
    .await
}

pub async fn watch(
    client: &DeviceHubClient<Channel>,
    device_id: &str,
) -> Streaming<WatchCommandsResponse> {
    client
        .clone()
        .watch_commands(WatchCommandsRequest {
            device_id: device_id.into(),
        })
        .await
        .expect("WatchCommands")
        .into_inner()
}

/// The next change a WatchCommands stream carries.
pub async fn next_change(changes: &mut Streaming<WatchCommandsResponse>) -> Command {
    within("a command change", changes.next())
        .await
        .expect("the stream goes on")
        .expect("a change")
        .command
        .expect("a command")
}

/// A device comes back and takes its queued command; the watch saw every
/// state in order. Against any broker.
async fn queued_until_the_device_returns(broker: &BrokerUrl) {
    let service = TestService::start_ready(config(broker, &[])).await;
    let client = service.client().await;
    gone(broker, &client, "p1").await;
    let mut changes = watch(&client, "p1").await;
    // Whatever reaches the command topic, from now on.
    let mut monitor = TestDevice::connect(broker, "monitor-p1", Some("devices/p1/commands")).await;

    let accepted = send(&client, "p1", "WATER", Duration::from_secs(60)).await;
    assert_eq!(accepted.state(), CommandState::Queued);
    assert_eq!(accepted.device_status(), DeviceStatus::Offline);
    let queued = next_change(&mut changes).await;
    assert_eq!((queued.state(), queued.attempts), (CommandState::Queued, 0));
    assert_eq!(queued.command_id, accepted.command_id);

    let mut device = PahoDevice::start(broker, "p1", "ok").await;
    let envelope = device.next_command().await;
    assert_eq!(envelope["id"], accepted.command_id.as_str());
    assert_eq!(envelope["command"], "WATER");
    assert!(envelope["expires_at"].is_string(), "{envelope}");
    // The first thing ever published to the device's topic is this, after
    // it came back: nothing went out while it was away.
    let first = monitor.next_message().await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&first.payload).unwrap()["id"],
        accepted.command_id.as_str()
    );

    let sent = next_change(&mut changes).await;
    assert_eq!((sent.state(), sent.attempts), (CommandState::Sent, 1));
    let succeeded = next_change(&mut changes).await;
    assert_eq!(succeeded.state(), CommandState::Succeeded);
    let reply = succeeded.reply.expect("the reply");
    assert_eq!(reply.status(), devicehub::proto::CommandStatus::Ok);
    let stored = get(&client, &accepted.command_id).await;
    assert_eq!(stored.state(), CommandState::Succeeded);
    assert_eq!(stored.attempts, 1);
    assert!(stored.reply.is_some());
    assert!(stored.create_time.is_some() && stored.expire_time.is_some());
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_an_offline_device_waits_until_it_returns_embedded() {
    queued_until_the_device_returns(&embedded_broker()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_an_offline_device_waits_until_it_returns_mosquitto() {
    let mosquitto = Mosquitto::start();
    queued_until_the_device_returns(&mosquitto.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_and_unknown_devices_get_persistent_commands_at_once() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    let mut device = PahoDevice::start(&broker, "p-on", "ok").await;
    wait_status(&client, "p-on", DeviceStatus::Online).await;
    let sent = send(&client, "p-on", "NOW", Duration::from_secs(30)).await;
    assert_eq!(sent.state(), CommandState::Sent);
    assert_eq!(device.next_command().await["id"], sent.command_id.as_str());
    wait_state(&client, &sent.command_id, CommandState::Succeeded).await;

    // Never heard from: not held back.
    let mut unknown =
        TestDevice::connect(&broker, "p-unknown", Some("devices/p-unknown/commands")).await;
    let sent = send(&client, "p-unknown", "NOW", Duration::from_secs(30)).await;
    assert_eq!(sent.state(), CommandState::Sent);
    assert_eq!(sent.device_status(), DeviceStatus::Unknown);
    let envelope: serde_json::Value =
        serde_json::from_slice(&unknown.next_message().await.payload).unwrap();
    assert_eq!(envelope["id"], sent.command_id.as_str());

    // With a reply timeout, the call waits for the reply.
    let mut request = persistent("p-on", "WAIT", Duration::from_secs(30));
    request.reply_timeout = Some(prost_types::Duration::try_from(Duration::from_secs(10)).unwrap());
    let answered = client.send_command(request).await.unwrap().into_inner();
    assert_eq!(answered.state(), CommandState::Succeeded);
    assert_eq!(
        answered.reply.expect("the reply").status(),
        devicehub::proto::CommandStatus::Ok
    );
    device.next_command().await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_command_is_never_published() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    gone(&broker, &client, "p2").await;
    let mut monitor = TestDevice::connect(&broker, "monitor-p2", Some("devices/p2/commands")).await;
    let short = send(&client, "p2", "SOON", Duration::from_secs(2)).await;
    assert_eq!(short.state(), CommandState::Queued);
    let expired = wait_state(&client, &short.command_id, CommandState::Expired).await;
    assert_eq!(expired.attempts, 0);

    let mut device = PahoDevice::start(&broker, "p2", "ok").await;
    // A marker sent after it came back is the first thing it gets.
    let marker = send(&client, "p2", "MARKER", Duration::from_secs(30)).await;
    assert_eq!(
        device.next_command().await["id"],
        marker.command_id.as_str()
    );
    let first: serde_json::Value =
        serde_json::from_slice(&monitor.next_message().await.payload).unwrap();
    assert_eq!(first["id"], marker.command_id.as_str());
    assert_eq!(
        get(&client, &short.command_id).await.state(),
        CommandState::Expired
    );
    service.stop().await;
}

/// Sends `n` persistent commands to `device_id`, taking `clients` in turn
/// (two instances, say), each QUEUED; returns their ids in the order sent.
pub async fn send_many(
    clients: &[&DeviceHubClient<Channel>],
    device_id: &str,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let accepted = send(
            clients[i % clients.len()],
            device_id,
            &format!("STEP-{i}"),
            Duration::from_secs(120),
        )
        .await;
        assert_eq!(accepted.state(), CommandState::Queued);
        ids.push(accepted.command_id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_queued_commands_arrive_in_order() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    gone(&broker, &client, "p3").await;
    let ids = send_many(&[&client], "p3", 100).await;
    let mut device = PahoDevice::start(&broker, "p3", "ok").await;
    for id in &ids {
        assert_eq!(device.next_command().await["id"], id.as_str());
    }
    for id in &ids {
        wait_state(&client, id, CommandState::Succeeded).await;
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_in_flight_per_device_means_one_at_a_time() {
    let broker = embedded_broker();
    let args = ["--command-in-flight-per-device", "1"];
    let service = TestService::start_ready(config(&broker, &args)).await;
    let client = service.client().await;
    gone(&broker, &client, "p4").await;
    let mut changes = watch(&client, "p4").await;
    let ids = send_many(&[&client], "p4", 100).await;
    let mut device = PahoDevice::start(&broker, "p4", "ok").await;
    for id in &ids {
        assert_eq!(device.next_command().await["id"], id.as_str());
    }
    // In the order the changes happened, never two SENT at once, and
    // each published only after the one before it ended.
    let mut in_flight: Option<String> = None;
    let mut sent_order = Vec::new();
    let mut succeeded = 0;
    while succeeded < ids.len() {
        let change = next_change(&mut changes).await;
        match change.state() {
            CommandState::Queued => {}
            CommandState::Sent => {
                assert_eq!(
                    in_flight, None,
                    "a second command in flight: {}",
                    change.command_id
                );
                in_flight = Some(change.command_id.clone());
                sent_order.push(change.command_id);
            }
            CommandState::Succeeded => {
                assert_eq!(in_flight.take(), Some(change.command_id));
                succeeded += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sent_order, ids);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_command_is_never_published_and_cancels_once() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    gone(&broker, &client, "p5").await;
    let queued = send(&client, "p5", "NEVER", Duration::from_secs(60)).await;
    let cancel = || CancelCommandRequest {
        command_id: queued.command_id.clone(),
    };
    let cancelled = client.cancel_command(cancel()).await.unwrap().into_inner();
    assert_eq!(cancelled.command.unwrap().state(), CommandState::Cancelled);
    let again = client.cancel_command(cancel()).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert!(again.message().contains("cancelled"), "{}", again.message());

    let mut device = PahoDevice::start(&broker, "p5", "ok").await;
    let marker = send(&client, "p5", "MARKER", Duration::from_secs(30)).await;
    assert_eq!(
        device.next_command().await["id"],
        marker.command_id.as_str()
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_commands_go_again_when_the_device_returns_then_fail() {
    let broker = embedded_broker();
    let args = ["--command-max-attempts", "2"];
    let service = TestService::start_ready(config(&broker, &args)).await;
    let client = service.client().await;
    let mut device = PahoDevice::start(&broker, "p6", "none").await;
    wait_status(&client, "p6", DeviceStatus::Online).await;
    let sent = send(&client, "p6", "SILENT", Duration::from_secs(120)).await;
    assert_eq!(sent.state(), CommandState::Sent);
    assert_eq!(device.next_command().await["id"], sent.command_id.as_str());
    device.kill().await;
    let requeued = wait_state(&client, &sent.command_id, CommandState::Queued).await;
    assert_eq!(requeued.attempts, 1);

    // Back, it gets the same id again (a fresh process: no memory of it).
    let mut device = PahoDevice::start(&broker, "p6", "none").await;
    assert_eq!(device.next_command().await["id"], sent.command_id.as_str());
    let again = wait_state(&client, &sent.command_id, CommandState::Sent).await;
    assert_eq!(again.attempts, 2);
    device.kill().await;
    let failed = wait_state(&client, &sent.command_id, CommandState::Failed).await;
    assert_eq!(failed.attempts, 2);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_error_reply_fails_the_command() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    let mut device = PahoDevice::start(&broker, "p7", "error").await;
    wait_status(&client, "p7", DeviceStatus::Online).await;
    let sent = send(&client, "p7", "NO", Duration::from_secs(30)).await;
    device.next_command().await;
    let failed = wait_state(&client, &sent.command_id, CommandState::Failed).await;
    let reply = failed.reply.expect("the reply");
    assert_eq!(reply.status(), devicehub::proto::CommandStatus::Error);
    assert_eq!(reply.message, "refused by the test device");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_newest_first_and_filter_by_state() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    gone(&broker, &client, "p8").await;
    let ids = send_many(&[&client], "p8", 25).await;
    client
        .cancel_command(CancelCommandRequest {
            command_id: ids[3].clone(),
        })
        .await
        .unwrap();
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_commands(ListCommandsRequest {
                device_id: "p8".into(),
                page_size: 10,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.commands.len() <= 10);
        listed.extend(page.commands.into_iter().map(|c| c.command_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);

    let cancelled = client
        .list_commands(ListCommandsRequest {
            states: vec![CommandState::Cancelled as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cancelled: Vec<_> = cancelled
        .commands
        .into_iter()
        .map(|c| c.command_id)
        .collect();
    assert_eq!(cancelled, [ids[3].clone()]);

    // A token belongs to its filters.
    let first = client
        .list_commands(ListCommandsRequest {
            device_id: "p8".into(),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = client
        .list_commands(ListCommandsRequest {
            device_id: "other".into(),
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("page_token"),
        "{}",
        status.message()
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_their_field() {
    let broker = embedded_broker();
    let args = ["--max-queued-commands-per-device", "2"];
    let service = TestService::start_ready(config(&broker, &args)).await;
    let mut client = service.client().await;
    let invalid = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    };
    for ttl in [
        prost_types::Duration {
            seconds: 0,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: -5,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: 30 * 24 * 3600 + 1,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: 1,
            nanos: -1,
        },
    ] {
        let mut request = persistent("p9", "X", Duration::from_secs(1));
        request.ttl = Some(ttl);
        invalid(client.send_command(request).await.unwrap_err(), "ttl");
    }
    let thirty_days = persistent("p9", "X", Duration::from_secs(30 * 24 * 3600));
    client
        .send_command(thirty_days)
        .await
        .expect("30 days is allowed");

    for id in ["", "not-a-uuid", "0190f1c2"] {
        let get = client
            .get_command(GetCommandRequest {
                command_id: id.into(),
            })
            .await
            .unwrap_err();
        invalid(get, "command_id");
        let cancel = client
            .cancel_command(CancelCommandRequest {
                command_id: id.into(),
            })
            .await
            .unwrap_err();
        invalid(cancel, "command_id");
    }
    let unknown = uuid::Uuid::now_v7().to_string();
    let status = client
        .get_command(GetCommandRequest {
            command_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client
        .cancel_command(CancelCommandRequest {
            command_id: unknown,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let bad_lists = [
        (
            "page_token",
            ListCommandsRequest {
                page_token: "zz".into(),
                ..Default::default()
            },
        ),
        (
            "page_token",
            ListCommandsRequest {
                page_token: "02".into(),
                ..Default::default()
            },
        ),
        (
            "states",
            ListCommandsRequest {
                states: vec![0],
                ..Default::default()
            },
        ),
        (
            "states",
            ListCommandsRequest {
                states: vec![99],
                ..Default::default()
            },
        ),
        (
            "page_size",
            ListCommandsRequest {
                page_size: -1,
                ..Default::default()
            },
        ),
        (
            "page_size",
            ListCommandsRequest {
                page_size: 1001,
                ..Default::default()
            },
        ),
        (
            "device_id",
            ListCommandsRequest {
                device_id: "a/b".into(),
                ..Default::default()
            },
        ),
    ];
    for (field, request) in bad_lists {
        invalid(client.list_commands(request).await.unwrap_err(), field);
    }
    let status = client
        .watch_commands(WatchCommandsRequest {
            device_id: "a+b".into(),
        })
        .await
        .unwrap_err();
    invalid(status, "device_id");

    // The per-device bound: the third active command of one device.
    gone(&broker, &client, "p10").await;
    for _ in 0..2 {
        client
            .send_command(persistent("p10", "Q", Duration::from_secs(60)))
            .await
            .unwrap();
    }
    let full = client
        .send_command(persistent("p10", "Q", Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("p10"), "{}", full.message());
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_decide_who_sends_reads_and_cancels_commands() {
    let broker = embedded_broker();
    let dir = TempDir::new("lifecycle-scopes");
    let signer = Signer::es256();
    let keys = dir.write("keys.pem", &signer.public_pem);
    let service = TestService::start(config(&broker, &["--auth-jwt-key", &keys])).await;
    service
        .wait_for_health(tonic_health::pb::health_check_response::ServingStatus::Serving)
        .await;
    let client = service.client().await;
    let token = |scope: &str| signer.sign(&claims("tester", scope, 3600));
    let sender = token("commands:send:pump-*");
    let reader = token("commands:read:pump-1");
    let nobody = token("readings:read");

    let accepted = client
        .clone()
        .send_command(authed(
            &sender,
            persistent("pump-1", "GO", Duration::from_secs(60)),
        ))
        .await
        .unwrap()
        .into_inner();
    let denied = client
        .clone()
        .send_command(authed(
            &sender,
            persistent("valve-1", "GO", Duration::from_secs(60)),
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("commands:send"),
        "{}",
        denied.message()
    );

    let get = |token: &str| {
        let mut client = client.clone();
        let request = authed(
            token,
            GetCommandRequest {
                command_id: accepted.command_id.clone(),
            },
        );
        async move { client.get_command(request).await }
    };
    assert_eq!(
        get(&reader)
            .await
            .unwrap()
            .into_inner()
            .command
            .unwrap()
            .command_id,
        accepted.command_id
    );
    let status = get(&nobody).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("commands:read"),
        "{}",
        status.message()
    );
    // The sender may not read it.
    assert_eq!(
        get(&sender).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    let status = client
        .clone()
        .watch_commands(authed(&nobody, WatchCommandsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client
        .clone()
        .list_commands(authed(
            &reader,
            ListCommandsRequest {
                device_id: "pump-2".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Cancel needs commands:send for the device.
    let status = client
        .clone()
        .cancel_command(authed(
            &reader,
            CancelCommandRequest {
                command_id: accepted.command_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("commands:send"),
        "{}",
        status.message()
    );
    client
        .clone()
        .cancel_command(authed(
            &sender,
            CancelCommandRequest {
                command_id: accepted.command_id.clone(),
            },
        ))
        .await
        .unwrap();
    service.stop().await;
}
