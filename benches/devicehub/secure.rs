//! Scenario 7, the cost of TLS and auth on the gRPC port: a plaintext
//! service and a secured one (TLS, a JWT checked on every call) on the same
//! broker at once, one watcher each on the same readings (latency), then the
//! same ListReadings calls against both.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use devicehub::{config::BrokerUrl, proto::ListReadingsRequest};
use rumqttc::QoS;

use crate::support::{
    grpc::{watchers, Watchers},
    measure::{percentile, settle, time_calls},
    publish::publish,
    report::Table,
    service::Service,
    sizes::Sizes,
};

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let plain = Service::start(broker, &[]).await;
    let secure = Service::start_secured(broker).await;
    latency(table, broker, sizes, &plain, &secure).await;
    queries(table, sizes, &plain, &secure).await;
    plain.stop().await;
    secure.stop().await;
}

/// One watcher on each service, the same readings at the latency rate.
async fn latency(
    table: &Table,
    broker: &BrokerUrl,
    sizes: Sizes,
    plain: &Service,
    secure: &Service,
) {
    let epoch = Instant::now();
    let (plain_watch, secure_watch) = (
        watchers(plain, 1, epoch).await,
        watchers(secure, 1, epoch).await,
    );
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
    for watch in [&plain_watch, &secure_watch] {
        let delivered = watch.delivered.clone();
        settle(sizes.latency_readings, Duration::from_secs(2), async || {
            delivered.load(Ordering::Relaxed)
        })
        .await;
    }
    let sorted = |w: &Watchers| {
        let mut v = w.latencies.lock().unwrap().clone();
        v.sort_unstable();
        v
    };
    let (ours, floor) = (sorted(&secure_watch), sorted(&plain_watch));
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (a, b) = (percentile(&ours, p) / 1e3, percentile(&floor, p) / 1e3);
        table.row(
            &format!("7. TLS + auth: latency {name} (µs)"),
            a,
            b,
            "µs",
            &format!(
                "{:+.0} µs; baseline: the plaintext service, same readings",
                a - b
            ),
        );
    }
    drop((plain_watch, secure_watch));
}

/// The same ListReadings calls against both, secured first.
async fn queries(table: &Table, sizes: Sizes, plain: &Service, secure: &Service) {
    let queries: [(&str, ListReadingsRequest); 2] = [
        (
            "newest page of 100",
            ListReadingsRequest {
                page_size: 100,
                ..Default::default()
            },
        ),
        (
            "device page of 100",
            ListReadingsRequest {
                device_id: "dev-1".into(),
                page_size: 100,
                ..Default::default()
            },
        ),
    ];
    let (plain_client, secure_client) = (plain.client().await, secure.client().await);
    for (name, request) in &queries {
        let mut times = Vec::new();
        for (service, client) in [(secure, &secure_client), (plain, &plain_client)] {
            times.push(
                time_calls(sizes.query_iterations, || {
                    let mut client = client.clone();
                    let request = service.request(request.clone());
                    async move {
                        client.list_readings(request).await.unwrap();
                    }
                })
                .await,
            );
        }
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            table.row(
                &format!("7. TLS + auth: query {name} {label} (µs)"),
                percentile(&times[0], p) / 1e3,
                percentile(&times[1], p) / 1e3,
                "µs",
                &format!(
                    "{} buffered; baseline: the plaintext service",
                    sizes.latency_readings
                ),
            );
        }
    }
}
