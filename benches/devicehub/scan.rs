//! Scenario 13: ListReadings whose filter matches nothing, against a buffer
//! of `sizes.query_readings`, next to ingest. Such a call looks at readings
//! under the buffer's read lock, which ingest's pushes wait for: publish →
//! watcher latency at `sizes.latency_rate` without, then with, one client
//! calling it in a tight loop (first pages, the most a call looks at), same
//! service and watcher, back to back. Also the call's own latency next to a
//! health check, and one walk through all its pages following the tokens.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use devicehub::{
    config::BrokerUrl,
    proto::{device_hub_client::DeviceHubClient, ListReadingsRequest},
};
use rumqttc::QoS;
use tonic::transport::Channel;

use crate::support::{
    grpc::{fill, health_floor, watchers, Watchers},
    measure::{bounded, percentile, settle, settle_cpu, time_calls, PATIENCE},
    publish::publish,
    report::Table,
    service::Service,
    sizes::Sizes,
};

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let service = Service::start(broker, &[]).await;
    let mut client = service.client().await;
    let epoch = Instant::now();
    let count = fill(broker, &mut client, sizes, epoch).await;
    settle_cpu(&service).await;
    // Topics are "devices/dev-N/readings": this matches none of them, and
    // its `+` at the device level keeps the device index out of it (a
    // literal device there would be looked up, not scanned).
    let nothing = ListReadingsRequest {
        topic_filter: "devices/+/nothing".into(),
        page_size: 100,
        ..Default::default()
    };

    let (_health, floor) = health_floor(&service, sizes.query_iterations).await;
    let times = time_calls(sizes.query_iterations, || {
        let (mut client, request) = (client.clone(), nothing.clone());
        async move {
            client.list_readings(request).await.unwrap();
        }
    })
    .await;
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        table.row(
            &format!("13. scan: match-nothing page {label} (µs)"),
            percentile(&times, p) / 1e3,
            percentile(&floor, p) / 1e3,
            "µs",
            &format!("{count} buffered, first page; baseline: a health check"),
        );
    }
    walk(table, &mut client, &nothing, count, percentile(&floor, 0.5)).await;

    let watchers = watchers(&service, 1, epoch).await;
    let lister = Lister { client, nothing };
    latency(table, broker, sizes, &watchers, &lister, count, epoch).await;
    drop(watchers);
    service.stop().await;
}

/// What a client following tokens to the end pays, in pages and time, next
/// to as many health checks at their p50 (`floor_p50`, nanoseconds).
async fn walk(
    table: &Table,
    client: &mut DeviceHubClient<Channel>,
    nothing: &ListReadingsRequest,
    count: u64,
    floor_p50: f64,
) {
    let (start, mut pages, mut token) = (Instant::now(), 0u64, String::new());
    loop {
        let page = client
            .list_readings(ListReadingsRequest {
                page_token: token,
                ..nothing.clone()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.readings.is_empty(), "the filter matches nothing");
        if page.next_page_token.is_empty() || start.elapsed() > PATIENCE {
            break;
        }
        token = page.next_page_token;
    }
    let walk = start.elapsed();
    table.row(
        "13. scan: match-nothing, every page (ms)",
        walk.as_secs_f64() * 1e3,
        floor_p50 / 1e3 * pages as f64 / 1e3,
        "ms",
        &format!("{pages} pages to the end of {count}; baseline: as many health checks (p50)"),
    );
}

/// The client that calls the match-nothing list in a loop.
struct Lister {
    client: DeviceHubClient<Channel>,
    nothing: ListReadingsRequest,
}

impl Lister {
    /// Calls the list until `stop`; returns how many calls, in how long.
    fn spawn(&self, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, Duration)> {
        let (mut client, request) = (self.client.clone(), self.nothing.clone());
        tokio::spawn(async move {
            let (start, mut calls) = (Instant::now(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                client.list_readings(request.clone()).await.unwrap();
                calls += 1;
            }
            (calls, start.elapsed())
        })
    }
}

/// Publish → watcher latency in rounds without and with the list loop.
async fn latency(
    table: &Table,
    broker: &BrokerUrl,
    sizes: Sizes,
    watchers: &Watchers,
    lister: &Lister,
    count: u64,
    epoch: Instant,
) {
    // Rounds alternate without and with the loop, so that the machine's
    // drift (other builders share it) falls on both alike.
    let (mut quiet, mut loud) = (Vec::new(), Vec::new());
    let (mut calls, mut looped) = (0u64, Duration::ZERO);
    for looping in [false, true, false, true] {
        let (round, listed) =
            round(broker, sizes, watchers, looping.then_some(lister), epoch).await;
        if let Some((n, took)) = listed {
            (calls, looped) = (calls + n, looped + took);
        }
        match looping {
            true => loud.extend(round),
            false => quiet.extend(round),
        }
    }
    quiet.sort_unstable();
    loud.sort_unstable();
    let calls_per_sec = calls as f64 / looped.as_secs_f64().max(1e-9);
    for (name, p) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
        table.row(
            &format!(
                "13. scan: latency {name} at {}/s, list loop (µs)",
                sizes.latency_rate
            ),
            percentile(&loud, p) / 1e3,
            percentile(&quiet, p) / 1e3,
            "µs",
            &format!(
                "publish → watcher, {count} buffered, {calls_per_sec:.0} match-nothing calls/s; baseline: no loop, rounds alternating in the same run ({} and {} readings)",
                loud.len(),
                quiet.len()
            ),
        );
    }
}

/// One round of half the latency scenario's readings at its rate, with
/// `lister` looping meanwhile if given; the round's latencies, and the
/// lister's calls and time.
async fn round(
    broker: &BrokerUrl,
    sizes: Sizes,
    watchers: &Watchers,
    lister: Option<&Lister>,
    epoch: Instant,
) -> (Vec<u64>, Option<(u64, Duration)>) {
    let per_round = sizes.latency_readings / 2;
    let (delivered, latencies) = (&watchers.delivered, &watchers.latencies);
    latencies.lock().unwrap().clear();
    let before = delivered.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let task = lister.map(|lister| lister.spawn(stop.clone()));
    let rate = Some(sizes.latency_rate);
    publish(broker, 1, per_round, 100, QoS::AtLeastOnce, rate, epoch).await;
    settle(before + per_round, Duration::from_secs(2), async || {
        delivered.load(Ordering::Relaxed)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let listed = match task {
        Some(task) => Some(bounded("the list loop", task).await.unwrap()),
        None => None,
    };
    let round = latencies.lock().unwrap().clone();
    (round, listed)
}
