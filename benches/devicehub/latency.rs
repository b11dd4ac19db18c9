//! Scenario 3, end-to-end latency at a steady rate: MQTT publish → gRPC
//! watcher vs publish → bare MQTT subscriber, same readings, same run.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use devicehub::config::BrokerUrl;
use rumqttc::QoS;

use crate::support::{
    grpc::watchers,
    measure::{percentile, settle},
    mqtt::BareSubscriber,
    publish::publish,
    report::Table,
    service::Service,
    sizes::Sizes,
};

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let service = Service::start(broker, &[]).await;
    let epoch = Instant::now();
    let bare = BareSubscriber::start(
        broker,
        "bench-bare-latency",
        "devices/+/readings",
        QoS::AtLeastOnce,
        epoch,
    )
    .await;
    let watchers = watchers(&service, 1, epoch).await;
    let (delivered, latencies) = (watchers.delivered.clone(), watchers.latencies.clone());
    publish(
        broker,
        1,
        sizes.latency_readings,
        100,
        QoS::AtLeastOnce,
        Some(sizes.latency_rate),
        epoch,
    )
    .await;
    settle(sizes.latency_readings, Duration::from_secs(2), async || {
        delivered.load(Ordering::Relaxed)
    })
    .await;
    let mut ours = latencies.lock().unwrap().clone();
    let mut floor = bare.latencies.lock().unwrap().clone();
    ours.sort_unstable();
    floor.sort_unstable();
    for (name, p) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
        let (a, b) = (percentile(&ours, p) / 1e3, percentile(&floor, p) / 1e3);
        table.row(
            &format!("3. latency {name} at {}/s (µs)", sizes.latency_rate),
            a,
            b,
            "µs",
            &format!("+{:.0} µs over the bare subscriber", a - b),
        );
    }
    drop(watchers);
    service.stop().await;
}
