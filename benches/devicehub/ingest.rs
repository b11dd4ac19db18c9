//! Scenario 1, ingest: readings/s stored by devicehub vs received by a bare
//! subscriber on the same broker, both subscribed during the same publish
//! burst; and loss at QoS 0 and QoS 1. Also the ingest half of `metrics`
//! and `store`, which run it with other flags.

use std::time::{Duration, Instant, SystemTime};

use devicehub::{
    config::BrokerUrl,
    proto::{device_hub_client::DeviceHubClient, ListReadingsRequest},
};
use rumqttc::QoS;
use tonic::transport::Channel;

use crate::support::{
    grpc::stored_count,
    measure::{cpu_seconds, settle},
    mqtt::BareSubscriberProcess,
    publish::publish,
    report::Table,
    service::{Service, Variant},
    sizes::Sizes,
};

/// Both QoS, 1 then 0; returns the rates stored in that order.
pub async fn run(
    table: &Table,
    broker: &BrokerUrl,
    sizes: Sizes,
    variant: Variant<'_>,
) -> Vec<f64> {
    let mut rates = Vec::new();
    for qos in [QoS::AtLeastOnce, QoS::AtMostOnce] {
        rates.push(once(table, broker, sizes, variant, qos).await);
    }
    rates
}

/// What one burst measured.
struct Burst {
    total: u64,
    /// Readings stored, and seconds from the first publish to the newest
    /// reading's `received_at`.
    ours: u64,
    ours_secs: f64,
    /// Readings the bare subscriber received, and seconds to its last.
    bare: u64,
    bare_secs: f64,
    /// CPU seconds of the service and of the harness over the burst.
    cpu: f64,
    harness_cpu: f64,
}

/// One burst at `qos`: the service and a bare subscriber process side by
/// side; reports its row and returns the rate stored.
async fn once(
    table: &Table,
    broker: &BrokerUrl,
    sizes: Sizes,
    variant: Variant<'_>,
    qos: QoS,
) -> f64 {
    let args = service_args(qos, variant);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let service = Service::start(broker, &args).await;
    let mut client = service.client().await;
    let epoch = Instant::now();
    let id = format!("bench-bare-ingest-{}", qos as u8);
    let mut bare = BareSubscriberProcess::start(broker, &id, "devices/+/readings", qos).await;
    let total = sizes.ingest_readings;
    let (cpu_before, harness_cpu_before) = (service.cpu_seconds(), cpu_seconds("self"));
    let (start, start_wall) = (Instant::now(), SystemTime::now());
    publish(broker, 4, total, 1000, qos, None, epoch).await;

    // Wait for both to settle, then take the service's last arrival by
    // its own clock (`received_at`): polling its count only says when
    // the harness got round to looking, which on 2 busy cores was up to
    // a second late and made ingest look half as fast as it is.
    let mut poller = client.clone();
    let (ours, bare_total) = tokio::join!(
        settle(total, Duration::from_secs(2), async || stored_count(
            &mut poller
        )
        .await),
        settle(total, Duration::from_secs(2), async || bare
            .received()
            .await
            .0),
    );
    let bare_last = bare.received().await.1;
    let ours_secs = newest_received_since(&mut client, start_wall).await;
    let burst = Burst {
        total,
        ours,
        ours_secs,
        bare: bare_total,
        bare_secs: (bare_last.unwrap_or(start) - start).as_secs_f64(),
        // Includes the idle wait for the count to settle: an upper bound.
        cpu: service.cpu_seconds() - cpu_before,
        harness_cpu: cpu_seconds("self") - harness_cpu_before,
    };
    row(table, qos, variant, &burst);
    let _ = client.list_readings(ListReadingsRequest::default()).await;
    bare.stop().await;
    service.stop().await;
    ours as f64 / ours_secs
}

/// The service's flags for a burst at `qos`: `variant`'s, and with a store
/// a fresh database and a persistent session.
fn service_args(qos: QoS, variant: Variant<'_>) -> Vec<String> {
    let qos_arg = if qos == QoS::AtMostOnce { "0" } else { "1" };
    let mut args: Vec<String> = [&["--mqtt-subscribe-qos", qos_arg][..], variant.args]
        .concat()
        .into_iter()
        .map(str::to_owned)
        .collect();
    if let Some(pg) = variant.store {
        // As in production: a persistent session, so unacknowledged
        // readings wait in the broker.
        let store_url = pg.create_database(&format!("bench_ingest_qos{}", qos as u8));
        let client_id = format!("devicehub-bench-store-{}", qos as u8);
        args.extend([
            "--store-url".to_owned(),
            store_url,
            "--mqtt-client-id".to_owned(),
            client_id,
            "--mqtt-persistent-session".to_owned(),
        ]);
    }
    args
}

/// Seconds from `start` to the newest reading's `received_at`.
async fn newest_received_since(client: &mut DeviceHubClient<Channel>, start: SystemTime) -> f64 {
    let newest = client
        .list_readings(ListReadingsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("the newest reading")
        .into_inner()
        .readings;
    newest
        .first()
        .and_then(|r| r.received_at)
        .and_then(|t| SystemTime::try_from(t).ok())
        .and_then(|last| last.duration_since(start).ok())
        .expect("the newest reading's received_at")
        .as_secs_f64()
}

fn row(table: &Table, qos: QoS, variant: Variant<'_>, burst: &Burst) {
    let Burst {
        total,
        ours,
        ours_secs,
        bare,
        bare_secs,
        cpu,
        harness_cpu,
    } = *burst;
    let label = if qos == QoS::AtMostOnce {
        "QoS 0"
    } else {
        "QoS 1"
    };
    table.row(
        &format!(
            "1. ingest, {label}, 1000 devices{} (readings/s)",
            variant.label
        ),
        ours as f64 / ours_secs,
        bare as f64 / bare_secs,
        "/s",
        &format!(
            "stored {ours} / received {bare} of {total}; loss {} vs {}; \
             service CPU {:.1} µs per reading ({:.0}% of a core), harness {:.0}%",
            total - ours.min(total),
            total - bare.min(total),
            cpu * 1e6 / ours.max(1) as f64,
            100.0 * cpu / ours_secs,
            100.0 * harness_cpu / ours_secs,
        ),
    );
}
