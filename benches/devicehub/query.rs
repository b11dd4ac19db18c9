//! Scenarios 4 and 5: query latency and throughput on a full buffer, and
//! memory per buffered reading.

use std::time::{Duration, Instant};

use devicehub::{
    config::BrokerUrl,
    proto::{device_hub_client::DeviceHubClient, ListReadingsRequest},
};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{
    grpc::{check_health, fill, health_floor, MakeQuery},
    measure::{percentile, settle_cpu, throughput, time_calls},
    report::Table,
    service::Service,
    sizes::Sizes,
};

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let service = Service::start(broker, &[]).await;
    let mut client = service.client().await;
    let rss_empty = service.rss_bytes();
    let count = fill(broker, &mut client, sizes, Instant::now()).await;
    let rss_full = service.rss_bytes();
    // Filling the buffer keeps the broker busy for a while after the service
    // has stored everything; latency measured before that settles is the
    // broker's, not the queries'.
    settle_cpu(&service).await;
    memory(table, &mut client, count, (rss_empty, rss_full)).await;

    let (health, floor) = health_floor(&service, sizes.query_iterations).await;
    for (name, make) in &queries(sizes.query_devices) {
        let iterations = if name.contains("one device") {
            sizes.query_iterations.min(30)
        } else {
            sizes.query_iterations
        };
        let mut i = 0;
        let times = time_calls(iterations, || {
            let mut client = client.clone();
            i += 1;
            let request = make(i);
            async move {
                client.list_readings(request).await.unwrap();
            }
        })
        .await;
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            table.row(
                &format!("4. query: {name} {label} (µs)"),
                percentile(&times, p) / 1e3,
                percentile(&floor, p) / 1e3,
                "µs",
                &format!("{count} buffered; baseline: a health check"),
            );
        }
    }
    query_throughput(table, &client, &health, sizes).await;
    service.stop().await;
}

/// Scenario 5: resident memory per reading beyond its payload and topic,
/// from the service's RSS empty and full (`rss`).
async fn memory(
    table: &Table,
    client: &mut DeviceHubClient<Channel>,
    count: u64,
    (rss_empty, rss_full): (u64, u64),
) {
    // Payloads are about 60 bytes; topics "devices/dev-NNNN/readings" are
    // shared per device, so count them once per reading to be conservative.
    let sample = client
        .list_readings(ListReadingsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .readings;
    let payload =
        sample.iter().map(|r| r.payload.len()).sum::<usize>() as f64 / sample.len().max(1) as f64;
    let topic =
        sample.iter().map(|r| r.topic.len()).sum::<usize>() as f64 / sample.len().max(1) as f64;
    let per_reading = (rss_full.saturating_sub(rss_empty)) as f64 / count.max(1) as f64;
    table.row(
        "5. memory per buffered reading (bytes)",
        per_reading - payload - topic,
        64.0,
        "B",
        &format!(
            "{count} readings: RSS {:.0} MiB (empty {:.0} MiB), {per_reading:.0} B each incl. {payload:.0} B payload and {topic:.0} B topic; baseline is the 64 B target",
            rss_full as f64 / (1 << 20) as f64,
            rss_empty as f64 / (1 << 20) as f64
        ),
    );
}

/// The timed queries, by name, over `devices` devices.
fn queries(devices: u64) -> Vec<(&'static str, MakeQuery)> {
    let device = move |i: usize| format!("dev-{}", (i as u64 * 7919) % devices);
    vec![
        (
            "device page of 100",
            Box::new(move |i| ListReadingsRequest {
                device_id: device(i),
                page_size: 100,
                ..Default::default()
            }),
        ),
        (
            "newest page of 100",
            Box::new(|_| ListReadingsRequest {
                page_size: 100,
                ..Default::default()
            }),
        ),
        (
            "topic filter devices/+/readings, 100",
            Box::new(|_| ListReadingsRequest {
                topic_filter: "devices/+/readings".into(),
                page_size: 100,
                ..Default::default()
            }),
        ),
        (
            "topic filter of one device, 100",
            Box::new(move |i| ListReadingsRequest {
                topic_filter: format!("devices/{}/#", device(i)),
                page_size: 100,
                ..Default::default()
            }),
        ),
    ]
}

/// Device pages with 8 clients in flight next to health checks with 8.
async fn query_throughput(
    table: &Table,
    client: &DeviceHubClient<Channel>,
    health: &HealthClient<Channel>,
    sizes: Sizes,
) {
    let duration = Duration::from_secs_f64(sizes.command_secs);
    let queries_per_sec = throughput(8, duration, || {
        let mut client = client.clone();
        async move {
            client
                .list_readings(ListReadingsRequest {
                    device_id: "dev-1".into(),
                    page_size: 100,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    })
    .await;
    let checks_per_sec = throughput(8, duration, || check_health(health.clone())).await;
    table.row(
        "4. query throughput, 8 clients (queries/s)",
        queries_per_sec,
        checks_per_sec,
        "/s",
        "device pages of 100; baseline: health checks",
    );
}
