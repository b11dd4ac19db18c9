//! Replicas (`--mqtt-share-group`), with real parts: Mosquitto (shared
//! subscriptions), one throwaway PostgreSQL cluster, and two `devicehub`
//! processes in one share group, each with its own client id and a
//! persistent session.

use crate::common;

use std::{collections::HashSet, time::Duration};

use common::{instance::Instance, postgres::Postgres, *};
use devicehub::proto::{
    device_hub_client::DeviceHubClient, watch_readings_response::Event as WatchEvent,
    ListReadingsRequest, Reading, SendCommandRequest, WatchReadingsRequest,
};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

const DEVICES: u64 = 100;

/// Mosquitto with room for bursts.
fn broker() -> Mosquitto {
    let port = closed_port().port;
    let conf = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
         max_queued_messages 100000\n"
    );
    Mosquitto::start_config(
        common::tempdir::TempDir::new("mosquitto"),
        &conf,
        port,
        false,
    )
}

/// A watch of `client` from `after_seq` (`None`: from now on), collecting
/// readings in a task until `n` arrived or the stream ends; a gap fails.
fn watch(
    client: &DeviceHubClient<Channel>,
    after_seq: Option<u64>,
    n: usize,
) -> (JoinHandle<Vec<Reading>>, tokio::sync::oneshot::Receiver<()>) {
    let mut client = client.clone();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let request = WatchReadingsRequest {
            after_seq,
            topic_filter: "devices/+/readings".into(),
            ..Default::default()
        };
        let mut stream = client.watch_readings(request).await.unwrap().into_inner();
        let _ = started_tx.send(());
        let mut readings = Vec::with_capacity(n);
        while readings.len() < n {
            match stream.message().await {
                Ok(Some(message)) => match message.event {
                    Some(WatchEvent::Reading(reading)) => readings.push(reading),
                    other => panic!("expected a reading, got {other:?}"),
                },
                Ok(None) | Err(_) => break, // its instance died
            }
        }
        readings
    });
    (task, started)
}

fn assert_contiguous(readings: &[Reading]) {
    for pair in readings.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1, "every number once, in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_ingest_and_serve_the_same_readings() {
    const TOTAL: u64 = 20_000;
    let pg = Postgres::start();
    let broker = broker();
    let a = Instance::start("a", &broker, &pg).await;
    let b = Instance::start("b", &broker, &pg).await;
    let (watch_a, started_a) = watch(&a.client, None, TOTAL as usize);
    let (watch_b, started_b) = watch(&b.client, None, TOTAL as usize);
    started_a.await.unwrap();
    started_b.await.unwrap();

    let device = TestDevice::connect(&broker.url, "device-replicas", None).await;
    publish_spread(&device, 0, TOTAL, DEVICES).await.unwrap();
    let seen_a = within("instance a's watcher", watch_a).await.unwrap();
    let seen_b = within("instance b's watcher", watch_b).await.unwrap();
    assert_eq!(seen_a.len() as u64, TOTAL);
    assert_eq!(seen_a, seen_b, "the same readings, numbers and times");
    assert_contiguous(&seen_a);
    let indices: HashSet<u64> = seen_a.iter().map(index_of).collect();
    assert_eq!(indices.len() as u64, TOTAL, "each reading once");
    // The broker shared the work: both committed part of it.
    let (by_a, by_b) = (a.committed().await, b.committed().await);
    assert!(by_a > 0 && by_b > 0, "a committed {by_a}, b {by_b}");
    assert_eq!(by_a + by_b, TOTAL);
    eprintln!("a committed {by_a} readings, b {by_b}");

    // A page token from one instance goes on on the other, and the pages
    // together are the listing either gives.
    let request = ListReadingsRequest {
        oldest_first: true,
        page_size: 700,
        ..Default::default()
    };
    let mut paged = Vec::new();
    let mut request_now = request.clone();
    for turn in 0.. {
        let client = if turn % 2 == 0 { &a.client } else { &b.client };
        let page = client
            .clone()
            .list_readings(request_now.clone())
            .await
            .unwrap()
            .into_inner();
        paged.extend(page.readings);
        if page.next_page_token.is_empty() {
            break;
        }
        request_now.page_token = page.next_page_token;
    }
    assert_eq!(paged, seen_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_watcher_resumes_on_another_with_every_reading_once() {
    const TOTAL: u64 = 20_000;
    let pg = Postgres::start();
    let broker = broker();
    let mut a = Instance::start("a", &broker, &pg).await;
    let b = Instance::start("b", &broker, &pg).await;
    let (watch_a, started) = watch(&a.client, None, TOTAL as usize);
    started.await.unwrap();
    let device = TestDevice::connect(&broker.url, "device-kill", None).await;
    let burst = publish_spread(&device, 0, TOTAL, DEVICES);
    eventually("a's share under way", || async {
        (a.committed().await >= 2_000).then_some(())
    })
    .await;
    a.child.kill().await.unwrap();
    let before = watch_a.await.unwrap();
    assert!(
        (before.len() as u64) < TOTAL,
        "killed mid-stream ({} seen)",
        before.len()
    );
    assert_contiguous(&before);
    burst.await.unwrap();

    // The killed instance comes back under its client id: the broker
    // delivers what it had not acknowledged to its session.
    let _a = Instance::start("a", &broker, &pg).await;
    let last = before.last().map(|r| r.seq).unwrap_or(0);
    let stored_after = || {
        let n: u64 = pg
            .psql(&format!("SELECT count(*) FROM readings WHERE seq > {last}"))
            .parse()
            .unwrap();
        n
    };
    every_payload_stored(&pg, TOTAL).await;
    let rest = stored_after() as usize;
    let (watch_b, _) = watch(&b.client, Some(last), rest);
    let after = within("the resumed watch", watch_b).await.unwrap();
    assert_eq!(after.len(), rest);
    assert_eq!(after[0].seq, last + 1, "on from the last one seen");
    let all: Vec<Reading> = before.into_iter().chain(after).collect();
    assert_contiguous(&all);
    let indices: HashSet<u64> = all.iter().map(index_of).collect();
    assert_eq!(indices.len() as u64, TOTAL, "every reading");
    // Payloads stored twice are the documented duplicates: committed but
    // not acknowledged when the process died.
    eprintln!(
        "{} readings committed but not acknowledged at the kill were stored twice",
        all.len() as u64 - TOTAL
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_leaves_the_group_and_the_other_takes_its_share() {
    const TOTAL: u64 = 20_000;
    let pg = Postgres::start();
    let broker = broker();
    let mut a = Instance::start("a", &broker, &pg).await;
    let b = Instance::start("b", &broker, &pg).await;
    let device = TestDevice::connect(&broker.url, "device-leave", None).await;
    let burst = publish_spread(&device, 0, TOTAL, DEVICES);
    eventually("a's share under way", || async {
        (a.committed().await >= 2_000).then_some(())
    })
    .await;
    let b_before = b.committed().await;
    assert!(terminate(&mut a.child).await.success());
    burst.await.unwrap();
    // a does not come back: what the broker held for it was taken in before
    // it left, and the rest went to b.
    every_payload_stored(&pg, TOTAL).await;
    assert!(b.committed().await > b_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_both_instances_get_their_own_replies() {
    const COMMANDS: usize = 1_000;
    let pg = Postgres::start();
    let broker = broker();
    let a = Instance::start("a", &broker, &pg).await;
    let b = Instance::start("b", &broker, &pg).await;
    let policy: ReplyPolicy = std::sync::Arc::new(|device_id: &str, command| {
        let reply = serde_json::json!({
            "id": command["id"],
            "status": "ok",
            "result": {"device": device_id},
        });
        Some((Duration::ZERO, reply))
    });
    let _responder = Responder::start(&broker.url, "responder", policy).await;

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..COMMANDS {
        let mut client = if i % 2 == 0 { &a.client } else { &b.client }.clone();
        calls.spawn(async move {
            let device_id = format!("d{}", i % 50);
            let response = client
                .send_command(SendCommandRequest {
                    device_id: device_id.clone(),
                    command: "ping".into(),
                    reply_timeout: Some(prost_types::Duration {
                        seconds: 10,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await
                .expect("command accepted")
                .into_inner();
            (device_id, response)
        });
    }
    let mut ids = HashSet::new();
    while let Some(call) = within("the commands", calls.join_next()).await {
        let (device_id, response) = call.unwrap();
        let reply = response.reply.expect("a reply");
        assert_eq!(
            replying_device(&reply.result.expect("a result")),
            device_id,
            "its own device's reply"
        );
        assert!(ids.insert(response.command_id), "command ids are unique");
    }
    assert_eq!(ids.len(), COMMANDS);
    // Each instance received every reply; the other's were dropped quietly.
    for instance in [&a, &b] {
        let unmatched = r#"devicehub_command_replies_total{outcome="unmatched"}"#;
        assert_eq!(instance.metric(unmatched).await, 0.0);
        let ok = r#"devicehub_command_replies_total{outcome="ok"}"#;
        assert_eq!(instance.metric(ok).await, (COMMANDS / 2) as f64);
    }
    // Each reply stored once, by the instance that sent its command.
    let stored: u64 = pg
        .psql("SELECT count(*) FROM readings WHERE kind = 1")
        .parse()
        .unwrap();
    assert_eq!(stored, COMMANDS as u64);
}

/// The `device` field of a reply's result object.
fn replying_device(result: &prost_types::Value) -> &str {
    use prost_types::value::Kind;
    let Some(Kind::StructValue(fields)) = &result.kind else {
        panic!("an object: {result:?}");
    };
    match fields.fields.get("device").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(device)) => device,
        other => panic!("a device name: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_ahead_of_this_instances_memory_waits_for_its_tail() {
    let pg = Postgres::start();
    let broker = broker();
    let a = Instance::start("a", &broker, &pg).await;
    // Two readings another instance committed, as its writer would, but
    // without the NOTIFY: this instance sees them at its next poll.
    let next: u64 = pg
        .psql("SELECT next_seq FROM devicehub_sequence")
        .parse()
        .unwrap();
    pg.psql(&format!(
        "INSERT INTO readings (seq, device_id, topic, payload, qos, retained, received_at, kind) \
         SELECT s, 'd1', 'devices/d1/readings', convert_to(s::text, 'UTF8'), 1, false, now(), 0 \
         FROM generate_series({next}, {next} + 1) s; \
         UPDATE devicehub_sequence SET next_seq = {next} + 2"
    ));
    // A client resuming from the first of them (as if it had read it on the
    // other instance) is not told its cursor is in the future.
    let (watch, _) = watch(&a.client, Some(next), 1);
    let got = within("the resumed watch", watch).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].seq, next + 1);
    // A cursor nobody committed still is.
    let future = WatchReadingsRequest {
        after_seq: Some(next + 100),
        ..Default::default()
    };
    let status = a.client.clone().watch_readings(future).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn a_share_group_without_a_store_is_refused() {
    let args = [
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--mqtt-url",
        "mqtt://127.0.0.1:1",
        "--mqtt-share-group",
        "hub",
    ];
    let stderr = startup_error(&args, &[]).await;
    assert!(
        stderr.contains("--mqtt-share-group needs --store-url"),
        "{stderr}"
    );
    let stderr = startup_error(&["serve", "--mqtt-share-group", "a/b"], &[]).await;
    assert!(stderr.contains("--mqtt-share-group"), "{stderr}");
}
