//! Scenario 2, fan-out: N watchers at a fixed offered rate; delivered/s,
//! loss, and the service's CPU seconds per million deliveries. Baseline: a
//! bare subscriber's received rate (the offered rate actually achieved).
//! Also the fan-out half of `metrics`.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use devicehub::config::BrokerUrl;
use rumqttc::QoS;

use crate::support::{
    grpc::watchers,
    measure::{cpu_seconds, settle},
    mqtt::BareSubscriber,
    publish::publish,
    report::Table,
    service::{Service, Variant},
    sizes::Sizes,
};

/// One service, then each of `counts` watchers in turn.
pub async fn run(
    table: &Table,
    broker: &BrokerUrl,
    sizes: Sizes,
    counts: &[usize],
    variant: Variant<'_>,
) {
    let service = Service::start(broker, variant.args).await;
    for &n in counts {
        once(table, broker, sizes, &service, n, variant).await;
    }
    service.stop().await;
}

/// `n` watchers and a bare subscriber through one publish at the fan-out
/// rate; reports its row.
async fn once(
    table: &Table,
    broker: &BrokerUrl,
    sizes: Sizes,
    service: &Service,
    n: usize,
    variant: Variant<'_>,
) {
    let epoch = Instant::now();
    let bare_id = format!("bench-bare-fanout-{n}");
    let filter = "devices/+/readings";
    let bare = BareSubscriber::start(broker, &bare_id, filter, QoS::AtLeastOnce, epoch).await;
    let watchers = watchers(service, n, epoch).await;
    let delivered = watchers.delivered.clone();
    let total = (sizes.fanout_rate as f64 * sizes.fanout_secs) as u64;
    let cpu_before = service.cpu_seconds();
    let harness_cpu_before = cpu_seconds("self");
    let start = Instant::now();
    let rate = Some(sizes.fanout_rate);
    publish(broker, 2, total, 1000, QoS::AtLeastOnce, rate, epoch).await;
    let want = total * n as u64;
    let got = settle(want, Duration::from_secs(2), async || {
        delivered.load(Ordering::Relaxed)
    })
    .await;
    // CPU over the whole window, rates up to the last arrival.
    let cpu = service.cpu_seconds() - cpu_before;
    let harness_cpu = cpu_seconds("self") - harness_cpu_before;
    let secs = (watchers.last.lock().unwrap().unwrap_or(start) - start).as_secs_f64();
    let bare_got = bare.count.load(Ordering::Relaxed);
    let bare_secs = (bare.last.lock().unwrap().unwrap_or(start) - start).as_secs_f64();
    table.row(
        &format!("2. fan-out to {n} watchers{} (deliveries/s)", variant.label),
        got as f64 / secs,
        bare_got as f64 / bare_secs * n as f64,
        "/s",
        &format!(
            "loss {} of {want}; service CPU {:.2} s per million deliveries, {:.0}% of a core \
             (harness: broker, publishers, gRPC clients, {:.0}%)",
            want - got.min(want),
            cpu / (got.max(1) as f64 / 1e6),
            100.0 * cpu / secs,
            100.0 * harness_cpu / secs
        ),
    );
    drop(watchers);
}
