//! Persistent commands with the PostgreSQL store: they survive a SIGKILL
//! of devicehub (queued ones are delivered when their device returns, SENT
//! ones still take their reply, expired ones turn EXPIRED), and two
//! replicas deliver each command exactly once and answer alike. Real
//! parts: Mosquitto, a throwaway PostgreSQL cluster, the `devicehub`
//! binary, paho-mqtt devices.

use crate::common;

use std::{collections::HashSet, time::Duration};

use common::{instance::Instance, paho::PahoDevice, postgres::Postgres, *};
use devicehub::proto::{CommandState, DeviceStatus, ListCommandsRequest};
use tokio_stream::StreamExt;

use crate::lifecycle::{gone, next_change, send, send_many, wait_state, wait_status, watch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_commands_survive_a_sigkill() {
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let first = Instance::start_with("alone", &broker.url, &pg, &[]).await;
    let client = first.client.clone();
    gone(&broker.url, &client, "s1").await;
    let mut queued = Vec::new();
    for i in 0..3 {
        let accepted = send(
            &client,
            "s1",
            &format!("KEEP-{i}"),
            Duration::from_secs(120),
        )
        .await;
        assert_eq!(accepted.state(), CommandState::Queued);
        // Written before the call returned.
        assert_eq!(
            pg.psql(&format!(
                "SELECT state FROM commands WHERE id = '{}'",
                accepted.command_id
            )),
            "1"
        );
        queued.push(accepted.command_id);
    }
    let short = send(&client, "s1", "SHORT", Duration::from_secs(3)).await;
    // One SENT to a device that is there and answers only later.
    let mut late = TestDevice::connect(&broker.url, "s2-device", Some("devices/s2/commands")).await;
    let sent = send(&client, "s2", "ANSWER-LATER", Duration::from_secs(120)).await;
    assert_eq!(sent.state(), CommandState::Sent);
    late.next_message().await;

    let mut first = first;
    first.child.kill().await.unwrap();
    let second = Instance::start_with("alone", &broker.url, &pg, &[]).await;
    let mut client = second.client.clone();
    for id in &queued {
        let command = crate::lifecycle::get(&client, id).await;
        assert_eq!(
            (command.state(), command.attempts),
            (CommandState::Queued, 0)
        );
    }
    let listed = client
        .list_commands(ListCommandsRequest {
            device_id: "s1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.commands.len(), 4);
    assert_eq!(listed.commands[3].command_id, queued[0], "oldest last");

    // The SENT one takes its reply after the restart.
    late.publish(
        "devices/s2/replies",
        serde_json::json!({"id": sent.command_id, "status": "ok"}).to_string(),
    )
    .await;
    wait_state(&client, &sent.command_id, CommandState::Succeeded).await;
    // The short one expires; the device, back, gets the others in order.
    wait_state(&client, &short.command_id, CommandState::Expired).await;
    let mut device = PahoDevice::start(&broker.url, "s1", "ok").await;
    wait_status(&client, "s1", DeviceStatus::Online).await;
    for id in &queued {
        assert_eq!(device.next_command().await["id"], id.as_str());
    }
    for id in &queued {
        wait_state(&client, id, CommandState::Succeeded).await;
    }
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_each_command_once_and_answer_alike() {
    const COMMANDS: usize = 40;
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let a = Instance::start("a", &broker, &pg).await;
    let b = Instance::start("b", &broker, &pg).await;
    gone(&broker.url, &a.client, "r1").await;
    // Both instances know it is away (the status came to one of them).
    wait_status(&b.client, "r1", DeviceStatus::Offline).await;
    let mut changes_on_b = watch(&b.client, "r1").await;

    let ids = send_many(&[&a.client, &b.client], "r1", COMMANDS).await;
    // B's watcher sees what A accepted too, in the order accepted.
    for id in &ids {
        let change = next_change(&mut changes_on_b).await;
        assert_eq!(
            (&change.command_id, change.state()),
            (id, CommandState::Queued)
        );
    }

    let mut device = PahoDevice::start(&broker.url, "r1", "ok").await;
    for id in &ids {
        assert_eq!(device.next_command().await["id"], id.as_str());
    }
    for id in &ids {
        wait_state(&a.client, id, CommandState::Succeeded).await;
        let on_b = wait_state(&b.client, id, CommandState::Succeeded).await;
        assert_eq!(on_b.attempts, 1, "published once");
    }
    // Nothing more came: a marker is the next thing the device gets.
    let marker = send(&a.client, "r1", "MARKER", Duration::from_secs(30)).await;
    assert_eq!(
        device.next_command().await["id"],
        marker.command_id.as_str()
    );
    wait_state(&a.client, &marker.command_id, CommandState::Succeeded).await;
    wait_state(&b.client, &marker.command_id, CommandState::Succeeded).await;
    let published: u64 = pg
        .psql("SELECT sum(attempts) FROM commands WHERE device_id = 'r1'")
        .parse()
        .unwrap();
    assert_eq!(published, COMMANDS as u64 + 1);

    // Both list the same.
    let list = |client: &devicehub::proto::device_hub_client::DeviceHubClient<_>| {
        let mut client = client.clone();
        async move {
            client
                .list_commands(ListCommandsRequest {
                    device_id: "r1".into(),
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .commands
        }
    };
    let (on_a, on_b) = (list(&a.client).await, list(&b.client).await);
    assert_eq!(on_a, on_b);
    let distinct: HashSet<_> = on_a.iter().map(|c| c.command_id.clone()).collect();
    assert_eq!(distinct.len(), COMMANDS + 1);
    // B saw every state change, whichever instance made it.
    let mut sent_seen = HashSet::new();
    while sent_seen.len() < COMMANDS {
        let change = next_change(&mut changes_on_b).await;
        if change.state() == CommandState::Sent {
            sent_seen.insert(change.command_id);
        }
    }
    drop(changes_on_b.next());
}
