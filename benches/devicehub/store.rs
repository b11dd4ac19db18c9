//! Scenario 10, the PostgreSQL store (a cluster of its own, PostgreSQL's
//! default settings: every commit flushed to disk):
//! - ingest with the store next to memory-only, same broker, back to back
//!   (all that `store-ingest` runs);
//! - pages of 100 from `sizes.stored_readings` readings in the table (none
//!   in memory), newest, by device and by time range; baseline: a health
//!   check;
//! - a resume replayed from the table next to one replayed from memory.

use std::time::Instant;

use devicehub::{
    config::BrokerUrl,
    proto::{
        device_hub_client::DeviceHubClient, watch_readings_response::Event as WatchEvent,
        ListReadingsRequest, WatchReadingsRequest,
    },
};
use rumqttc::QoS;
use tonic::transport::Channel;

use crate::{
    ingest, postgres,
    support::{
        grpc::{health_floor, wait_for_stored, MakeQuery},
        measure::{bounded, percentile, settle_cpu, time_calls},
        publish::publish,
        report::Table,
        service::{Service, Variant, PLAIN},
        sizes::Sizes,
    },
};

/// The ingest rows, then with `pages` the table's pages and the replays.
pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes, pages: bool) {
    let pg = postgres::Postgres::start_with("");
    ingest_next_to_memory(table, broker, sizes, &pg).await;
    if !pages {
        return;
    }
    let total = sizes.stored_readings;
    let devices = (total / 1000).clamp(1, 10_000);
    let url = fill_table(&pg, broker, total, devices).await;
    let service = Service::start(broker, &["--store-url", &url]).await;
    let client = service.client().await;
    let (_health, floor) = health_floor(&service, sizes.query_iterations).await;
    for (name, make) in &table_queries(total, devices) {
        let mut i = 0;
        let times = time_calls(sizes.query_iterations, || {
            let mut client = client.clone();
            i += 1;
            let request = make(i);
            async move {
                let page = client.list_readings(request).await.unwrap().into_inner();
                assert_eq!(page.readings.len(), 100, "a full page from the table");
            }
        })
        .await;
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            table.row(
                &format!("10. store: {name} {label} (µs)"),
                percentile(&times, p) / 1e3,
                percentile(&floor, p) / 1e3,
                "µs",
                &format!("{total} in the table ({devices} devices), none in memory; baseline: a health check; target p99 ≤ 10 ms"),
            );
        }
    }
    replays(
        table,
        broker,
        &service,
        &client,
        total,
        sizes.replay_readings,
    )
    .await;
    service.stop().await;
}

/// Scenario 1's ingest memory-only, then with the store.
async fn ingest_next_to_memory(
    table: &Table,
    broker: &BrokerUrl,
    sizes: Sizes,
    pg: &postgres::Postgres,
) {
    let memory = ingest::run(table, broker, sizes, PLAIN).await;
    let with_store = Variant {
        label: ", store",
        args: &[],
        store: Some(pg),
    };
    let stored = ingest::run(table, broker, sizes, with_store).await;
    for ((label, memory), stored) in ["QoS 1", "QoS 0"].iter().zip(memory).zip(stored) {
        table.row(
            &format!("10. ingest with the store, {label} (readings/s)"),
            stored,
            memory,
            "/s",
            "baseline: memory only, the run just before; target ≥ 0.7",
        );
    }
}

/// A table of `total` readings of `devices` devices (1 000 readings each at
/// least), one a millisecond from 2026-01-01, written by SQL (publishing
/// them would take the broker minutes) into a fresh database whose
/// migrations a service ran; returns its URL.
async fn fill_table(
    pg: &postgres::Postgres,
    broker: &BrokerUrl,
    total: u64,
    devices: u64,
) -> String {
    let url = pg.create_database("bench_pages");
    let service = Service::start(broker, &["--store-url", &url]).await;
    service.stop().await; // the migrations ran
    pg.psql_in(
        "bench_pages",
        &format!(
            "INSERT INTO readings (seq, device_id, topic, payload, qos, retained, received_at, kind) \
             SELECT s, 'dev-' || (s % {devices}), 'devices/dev-' || (s % {devices}) || '/readings', \
                    convert_to('{{\"temperature\":21.5,\"humidity\":40,\"i\":' || s || '}}', 'UTF8'), \
                    1, false, timestamptz '2026-01-01' + s * interval '1 millisecond', 0 \
             FROM generate_series(1, {total}) s"
        ),
    );
    pg.psql_in(
        "bench_pages",
        &format!("UPDATE devicehub_sequence SET next_seq = {}", total + 1),
    );
    pg.psql_in("bench_pages", "VACUUM ANALYZE readings");
    url
}

/// The timed pages from the table, by name.
fn table_queries(total: u64, devices: u64) -> Vec<(&'static str, MakeQuery)> {
    let at = move |i: usize| {
        // At least a minute (60 000 readings) before the table's end, so
        // each range holds a full page.
        let ms = 1 + (i as u64 * 7_919_993) % total.saturating_sub(60_000).max(1);
        prost_types::Timestamp {
            seconds: 1_767_225_600 + (ms / 1000) as i64,
            nanos: (ms % 1000) as i32 * 1_000_000,
        }
    };
    vec![
        (
            "newest page of 100",
            Box::new(|_| ListReadingsRequest {
                page_size: 100,
                ..Default::default()
            }),
        ),
        (
            "device page of 100",
            Box::new(move |i| ListReadingsRequest {
                device_id: format!("dev-{}", (i as u64 * 7919) % devices),
                page_size: 100,
                ..Default::default()
            }),
        ),
        (
            "time range page of 100",
            Box::new(move |i| {
                let start = at(i);
                let end = prost_types::Timestamp {
                    seconds: start.seconds + 60,
                    ..start
                };
                ListReadingsRequest {
                    start_time: Some(start),
                    end_time: Some(end),
                    oldest_first: true,
                    page_size: 100,
                    ..Default::default()
                }
            }),
        ),
    ]
}

/// Resumes: from the table's oldest reading (of `total`), and from the
/// oldest of `replay` readings published through the broker (in memory).
async fn replays(
    table: &Table,
    broker: &BrokerUrl,
    service: &Service,
    client: &DeviceHubClient<Channel>,
    total: u64,
    replay: u64,
) {
    let now = Instant::now();
    publish(broker, 4, replay, 1000, QoS::AtLeastOnce, None, now).await;
    wait_for_stored(&mut client.clone(), total + replay).await;
    settle_cpu(service).await;
    let from_table = replay_rate(client, 0, replay).await;
    let from_memory = replay_rate(client, total, replay).await;
    table.row(
        "10. store: resume replay (readings/s)",
        from_table,
        from_memory,
        "/s",
        &format!("{replay} readings from the table; baseline: {replay} from memory"),
    );
}

/// Readings per second a WatchReadings resumed after `after_seq` delivers,
/// over its first `n` readings.
async fn replay_rate(client: &DeviceHubClient<Channel>, after_seq: u64, n: u64) -> f64 {
    let start = Instant::now();
    let mut stream = client
        .clone()
        .watch_readings(WatchReadingsRequest {
            after_seq: Some(after_seq),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    bounded("the replay", async {
        while received < n {
            match stream.message().await.unwrap().unwrap().event {
                Some(WatchEvent::Reading(_)) => received += 1,
                other => panic!("expected a reading, got {other:?}"),
            }
        }
    })
    .await;
    n as f64 / start.elapsed().as_secs_f64()
}
