//! Device states with the PostgreSQL store: they survive a SIGKILL of
//! devicehub (and a desired state changed while the broker was away is
//! published once it is back), and two replicas agree within a second,
//! hand out versions that never collide, and let exactly one of two racing
//! updates win. Real parts: Mosquitto, a throwaway PostgreSQL cluster, the
//! `devicehub` binary, paho-mqtt devices.

use crate::common;

use std::time::{Duration, Instant};

use common::{instance::Instance, paho::PahoDevice, postgres::Postgres, *};
use serde_json::json;
use tonic::Code;

use crate::state::{get_state, next_state, sides, update, wait_state, watch_state};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_states_survive_a_sigkill() {
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let mut first = Instance::start_with("alone", &broker.url, &pg, &[]).await;
    let client = first.client.clone();
    let desired = update(&client, "k-1", json!({"mode": "eco", "limit": 3}), 0)
        .await
        .unwrap();
    // Written before the call returned.
    assert_eq!(
        pg.psql("SELECT version FROM device_states WHERE device_id = 'k-1'"),
        desired.version.to_string()
    );
    let device = TestDevice::connect(&broker.url, "k-1", None).await;
    device
        .publish("devices/k-1/state/reported", r#"{"mode": "eco"}"#)
        .await;
    let before = wait_state(&client, "k-1", "the report stored", |s| {
        s.reported_update_time.is_some()
    })
    .await;
    assert_eq!(sides(&before)[2], json!({"limit": 3.0}));

    first.child.kill().await.unwrap();
    let second = Instance::start_with("alone", &broker.url, &pg, &[]).await;
    let client = second.client.clone();
    let after = get_state(&client, "k-1").await.unwrap();
    assert_eq!(after, before, "the same state, version and times");
    let next = update(&client, "k-1", json!({"limit": null}), after.version)
        .await
        .unwrap();
    assert!(next.version > after.version);
    assert_eq!(sides(&next)[2], json!({}));

    // The retained document is the newest, for a device that connects now.
    let mut device = PahoDevice::start_with(&broker.url, "k-1", &[]).await;
    let event = device.next_event().await;
    assert_eq!(event["document"]["version"], json!(next.version), "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_state_changed_while_the_broker_is_away_is_published_when_it_returns() {
    let pg = Postgres::start();
    let port = mosquitto::free_port();
    let broker = Mosquitto::start_on(port);
    let instance = Instance::start_with("alone", &broker.url, &pg, &[]).await;
    let client = instance.client.clone();
    drop(broker);
    let updated = update(&client, "away-1", json!({"on": true}), 0)
        .await
        .unwrap();
    assert_eq!(
        pg.psql("SELECT published_version FROM device_states WHERE device_id = 'away-1'"),
        "0"
    );
    let broker = Mosquitto::start_on(port);
    eventually("the desired state published", || async {
        let published =
            pg.psql("SELECT published_version FROM device_states WHERE device_id = 'away-1'");
        (published == updated.version.to_string()).then_some(())
    })
    .await;
    let mut device = PahoDevice::start_with(&broker.url, "away-1", &[]).await;
    let event = device.next_event().await;
    assert_eq!(
        event["document"]["version"],
        json!(updated.version),
        "{event}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_agree_on_device_states_within_a_second() {
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let a = Instance::start("a", &broker, &pg).await;
    let b = Instance::start("b", &broker, &pg).await;
    let mut watch_b = watch_state(&b.client, "r-1").await;

    let updated = update(&a.client, "r-1", json!({"speed": 1}), 0)
        .await
        .unwrap();
    let started = Instant::now();
    let seen = next_state(&mut watch_b).await;
    let seen_after = started.elapsed();
    assert_eq!(seen, updated, "B's watcher sees A's change");
    let got = get_state(&b.client, "r-1").await.unwrap();
    assert_eq!(got, updated);
    assert!(
        seen_after < Duration::from_secs(1),
        "B saw A's change after {seen_after:?}"
    );

    // Updates through both instances: versions never collide, and of two
    // racing on one expected version exactly one wins.
    for round in 0..10 {
        let base = get_state(&a.client, "r-1").await.unwrap().version;
        let (x, y) = tokio::join!(
            update(&a.client, "r-1", json!({"speed": round, "by": "a"}), base),
            update(&b.client, "r-1", json!({"speed": round, "by": "b"}), base),
        );
        let codes = [&x, &y].map(|r| r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok));
        assert!(
            codes == [Code::Ok, Code::Aborted] || codes == [Code::Aborted, Code::Ok],
            "round {round}: {codes:?}"
        );
    }
    let (x, y) = tokio::join!(
        update(&a.client, "r-2", json!({"n": 1}), 0),
        update(&b.client, "r-3", json!({"n": 1}), 0),
    );
    assert_ne!(x.unwrap().version, y.unwrap().version);

    // Every change reaches B's watcher once, in version order.
    let mut versions = vec![seen.version];
    while versions.len() < 11 {
        versions.push(next_state(&mut watch_b).await.version);
    }
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");

    // Reported patches through the share group are applied once each,
    // by one instance or the other, and seen alike on both.
    let device = TestDevice::connect(&broker.url, "r-1", None).await;
    let mut last = None;
    for speed in [9, 10] {
        device
            .publish(
                "devices/r-1/state/reported",
                format!(r#"{{"speed": {speed}}}"#),
            )
            .await;
        let on_a = wait_state(&a.client, "r-1", "the report", |s| {
            sides(s)[1] == json!({ "speed": f64::from(speed) })
        })
        .await;
        let mut seen = next_state(&mut watch_b).await;
        while seen.version < on_a.version {
            seen = next_state(&mut watch_b).await;
        }
        assert_eq!(seen, on_a, "B's watcher sees what A reads");
        last = Some(on_a);
    }
    // Counted once applied, just after it is committed.
    eventually("each patch applied by one instance", || async {
        let mut total = 0.0;
        for instance in [&a, &b] {
            let text = scrape(&instance.metrics).await;
            total += sample(&text, "devicehub_reported_state_patches_total")?;
        }
        (total == 2.0).then_some(())
    })
    .await;
    assert_eq!(get_state(&b.client, "r-1").await.unwrap(), last.unwrap());
}
