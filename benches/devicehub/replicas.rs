//! Scenario 11, replicas (issue 13): the same work on one instance with the
//! store, on one in a share group (its memory fed by the tail) and on two
//! in one share group, back to back. Always through Mosquitto (shared
//! subscriptions), whatever broker the rest of the run uses.
//!
//! - ingest: QoS 1 readings at full speed, each instance watched by one
//!   stream; the rate is of readings visible on every instance (the last
//!   arrival at any watcher), so with two it includes the tail;
//! - fan-out: 100 watchers spread evenly over the instances at the fan-out
//!   rate; service CPU summed over the instances;
//! - latency: publish → watcher at the latency scenario's steady rate, one
//!   watcher per instance.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use devicehub::config::BrokerUrl;
use rumqttc::QoS;

use crate::{
    postgres,
    support::{
        broker::Broker,
        grpc::{watchers, Watchers},
        measure::{percentile, settle},
        publish::publish,
        report::Table,
        service::Service,
        sizes::Sizes,
    },
};

pub async fn run(table: &Table, sizes: Sizes) {
    let broker = Broker::start(true);
    let pg = postgres::Postgres::start_with("");
    let mut baseline: Option<Replicated> = None;
    let setups = [
        ("1 instance", 1, false),
        ("1 in a share group", 1, true),
        ("2 in a share group", 2, true),
    ];
    for (label, instances, group) in setups {
        let services = start(broker.url(), &pg, instances, group).await;
        let now = Replicated::measure(broker.url(), &services, sizes).await;
        for service in services {
            service.stop().await;
        }
        let base = baseline.get_or_insert_with(|| now.clone());
        now.rows(table, base, label, sizes);
    }
}

/// `instances` services on a fresh database of `pg`, with persistent
/// sessions, in a share group if `group`.
async fn start(
    broker: &BrokerUrl,
    pg: &postgres::Postgres,
    instances: usize,
    group: bool,
) -> Vec<Service> {
    let db = format!("bench_replicas_{instances}_{}", group as u8);
    let url = pg.create_database(&db);
    let mut services = Vec::new();
    for i in 0..instances {
        let id = format!("devicehub-{db}-{i}");
        let mut args = vec![
            "--store-url",
            &url,
            "--mqtt-client-id",
            &id,
            "--mqtt-persistent-session",
        ];
        if group {
            args.extend(["--mqtt-share-group", "bench"]);
        }
        services.push(Service::start(broker, &args).await);
    }
    services
}

/// What scenario 11 measures of one setup.
#[derive(Clone)]
struct Replicated {
    ingest: f64,
    ingest_notes: String,
    fanout_cpu: f64,
    fanout_notes: String,
    latency_p99: f64,
    latency_notes: String,
}

impl Replicated {
    async fn measure(broker: &BrokerUrl, services: &[Service], sizes: Sizes) -> Self {
        let (ingest, ingest_notes) = Self::ingest(broker, services, sizes).await;
        let (fanout_cpu, fanout_notes) = Self::fanout(broker, services, sizes).await;
        let (latency_p99, latency_notes) = Self::latency(broker, services, sizes).await;
        Self {
            ingest,
            ingest_notes,
            fanout_cpu,
            fanout_notes,
            latency_p99,
            latency_notes,
        }
    }

    /// Ingest at full speed, one watcher per instance.
    async fn ingest(broker: &BrokerUrl, services: &[Service], sizes: Sizes) -> (f64, String) {
        let instances = services.len() as u64;
        let epoch = Instant::now();
        let each = Self::watch(services, 1, epoch).await;
        let total = sizes.ingest_readings;
        let cpu_before = cpu(services);
        let start = Instant::now();
        publish(broker, 4, total, 1000, QoS::AtLeastOnce, None, epoch).await;
        let (got, last) = Self::settle(&each, total * instances, start).await;
        let ingest = got as f64 / instances as f64 / (last - start).as_secs_f64();
        let notes = format!(
            "visible on every instance: {got} of {}; service CPU {:.1} µs per reading \
             (all instances)",
            total * instances,
            (cpu(services) - cpu_before) * 1e6 / total as f64
        );
        (ingest, notes)
    }

    /// Fan-out: 100 watchers over the instances, at the fan-out rate.
    async fn fanout(broker: &BrokerUrl, services: &[Service], sizes: Sizes) -> (f64, String) {
        let epoch = Instant::now();
        let each = Self::watch(services, 100, epoch).await;
        let total = (sizes.fanout_rate as f64 * sizes.fanout_secs) as u64;
        let cpu_before = cpu(services);
        let start = Instant::now();
        let rate = Some(sizes.fanout_rate);
        publish(broker, 2, total, 1000, QoS::AtLeastOnce, rate, epoch).await;
        let (got, last) = Self::settle(&each, total * 100, start).await;
        let fanout_cpu = (cpu(services) - cpu_before) / (got.max(1) as f64 / 1e6);
        let notes = format!(
            "delivered {got} of {} at {:.0}/s",
            total * 100,
            got as f64 / (last - start).as_secs_f64()
        );
        (fanout_cpu, notes)
    }

    /// Latency at a steady, low rate, one watcher per instance: what the
    /// tail adds (commit → NOTIFY → read back) where CPU is not short.
    /// Returns the p99 in milliseconds.
    async fn latency(broker: &BrokerUrl, services: &[Service], sizes: Sizes) -> (f64, String) {
        let instances = services.len() as u64;
        let epoch = Instant::now();
        let each = Self::watch(services, 1, epoch).await;
        let total = sizes.latency_readings;
        let start = Instant::now();
        let rate = Some(sizes.latency_rate);
        publish(broker, 1, total, 100, QoS::AtLeastOnce, rate, epoch).await;
        Self::settle(&each, total * instances, start).await;
        let mut latencies: Vec<u64> = each
            .iter()
            .flat_map(|w| w.latencies.lock().unwrap().clone())
            .collect();
        latencies.sort_unstable();
        let notes = format!(
            "publish → watcher, every instance; p50 {:.2} ms",
            percentile(&latencies, 0.5) / 1e6
        );
        (percentile(&latencies, 0.99) / 1e6, notes)
    }

    /// `n` watchers spread evenly over `services`.
    async fn watch(services: &[Service], n: usize, epoch: Instant) -> Vec<Watchers> {
        let mut each = Vec::new();
        for service in services {
            each.push(watchers(service, n.div_ceil(services.len()), epoch).await);
        }
        each
    }

    /// Waits until `each` delivered `want` in all (or stopped), and returns
    /// what they did and when the last arrived.
    async fn settle(each: &[Watchers], want: u64, start: Instant) -> (u64, Instant) {
        let got = settle(want, Duration::from_secs(2), async || {
            each.iter()
                .map(|w| w.delivered.load(Ordering::Relaxed))
                .sum()
        })
        .await;
        let last = each
            .iter()
            .filter_map(|w| *w.last.lock().unwrap())
            .max()
            .unwrap_or(start);
        (got, last)
    }

    /// The setup's three rows, next to `base` (the first setup's).
    fn rows(&self, table: &Table, base: &Self, label: &str, sizes: Sizes) {
        let suffix = "baseline: 1 instance";
        table.row(
            &format!("11. replicas: ingest, {label} (readings/s)"),
            self.ingest,
            base.ingest,
            "/s",
            &format!("{}; {suffix}", self.ingest_notes),
        );
        table.row(
            &format!("11. replicas: fan-out to 100, {label} (CPU s per million)"),
            self.fanout_cpu,
            base.fanout_cpu,
            "s",
            &format!("{}; {suffix}", self.fanout_notes),
        );
        table.row(
            &format!(
                "11. replicas: latency at {}/s, {label} (p99 ms)",
                sizes.latency_rate
            ),
            self.latency_p99,
            base.latency_p99,
            "ms",
            &format!("{}; {suffix}", self.latency_notes),
        );
    }
}

/// CPU seconds so far of all `services`.
fn cpu(services: &[Service]) -> f64 {
    services.iter().map(Service::cpu_seconds).sum()
}
