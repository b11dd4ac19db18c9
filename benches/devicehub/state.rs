//! Scenario 15, device state: UpdateDesiredState calls/s with 64 callers
//! over `state_devices` devices, next to as many plain SendCommand calls
//! (QoS 1, no reply) in the same run; and reported state patches/s applied
//! from those devices, next to as many readings/s ingested, the same
//! payloads from the same publishers. In memory, and with the PostgreSQL
//! store.
//!
//! Completion of a burst is seen by polling (every [`POLL`]) for a sentinel
//! each publisher sends last: one connection's messages arrive and are
//! applied in order, so its sentinel comes after all of its others. The
//! same method times both sides of a row.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use devicehub::{
    config::BrokerUrl,
    proto::{
        device_hub_client::DeviceHubClient, GetDeviceRequest, GetDeviceStateRequest,
        SendCommandRequest, UpdateDesiredStateRequest,
    },
};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::{
    postgres,
    support::{
        measure::bounded, publish::driven_client, report::Table, service::Service, sizes::Sizes,
    },
};

/// Callers at once, for both sides of the calls row.
const CALLERS: usize = 64;
/// MQTT clients publishing patches (and readings).
const PUBLISHERS: usize = 4;
/// How often completion is polled.
const POLL: Duration = Duration::from_millis(10);

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let (calls, devices) = (sizes.state_calls, sizes.state_devices);
    let pg = postgres::Postgres::start_with("");
    for store in [false, true] {
        let url = store.then(|| pg.create_database("state"));
        let mut args = vec![];
        if let Some(url) = &url {
            args.extend(["--store-url", url.as_str()]);
        }
        let service = Service::start(broker, &args).await;
        let client = service.client().await;
        let label = if store { ", store" } else { "" };
        let updates = call_all(&client, calls, devices, Call::UpdateDesired).await;
        let commands = call_all(&client, calls, devices, Call::SendCommand).await;
        table.row(
            &format!("15. UpdateDesiredState{label} (calls/s)"),
            updates,
            commands,
            "/s",
            &format!(
                "{calls} calls over {devices} devices, {CALLERS} callers; baseline: as many plain SendCommand (QoS 1, no reply)"
            ),
        );
        let patches = burst(&client, broker, calls, devices, Kind::Reported, store).await;
        let readings = burst(&client, broker, calls, devices, Kind::Readings, store).await;
        table.row(
            &format!("15. reported patches applied{label} (patches/s)"),
            patches,
            readings,
            "/s",
            &format!(
                "{calls} patches from {devices} devices, {PUBLISHERS} publishers; baseline: as many readings ingested"
            ),
        );
        service.stop().await;
    }
}

fn device(i: u64) -> String {
    format!("st-{i}")
}

#[derive(Clone, Copy)]
enum Call {
    UpdateDesired,
    SendCommand,
}

/// `calls` calls round-robin over `devices`, [`CALLERS`] at once; the rate.
async fn call_all(client: &DeviceHubClient<Channel>, calls: u64, devices: u64, call: Call) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let mut callers = JoinSet::new();
    let start = Instant::now();
    for _ in 0..CALLERS {
        let (mut client, next) = (client.clone(), next.clone());
        callers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= calls {
                    return;
                }
                let device_id = device(n % devices);
                match call {
                    Call::UpdateDesired => {
                        let patch = prost_types::Struct {
                            fields: [(
                                "interval_ms".to_owned(),
                                prost_types::Value {
                                    kind: Some(prost_types::value::Kind::NumberValue(n as f64)),
                                },
                            )]
                            .into(),
                        };
                        let request = UpdateDesiredStateRequest {
                            device_id,
                            patch: Some(patch),
                            expected_version: 0,
                        };
                        client.update_desired_state(request).await.unwrap();
                    }
                    Call::SendCommand => {
                        let request = SendCommandRequest {
                            device_id,
                            command: "SET".into(),
                            ..Default::default()
                        };
                        client.send_command(request).await.unwrap();
                    }
                }
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }
    calls as f64 / start.elapsed().as_secs_f64()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Reported,
    Readings,
}

impl Kind {
    fn topic(self, device_id: &str) -> String {
        match self {
            Self::Reported => format!("devices/{device_id}/state/reported"),
            Self::Readings => format!("devices/{device_id}/readings"),
        }
    }
}

/// Publishes `total` messages of `kind` for `devices` devices, then one
/// sentinel per publisher; the rate from the first publish until every
/// sentinel is stored.
async fn burst(
    client: &DeviceHubClient<Channel>,
    broker: &BrokerUrl,
    total: u64,
    devices: u64,
    kind: Kind,
    store: bool,
) -> f64 {
    let run = format!("{}{}", if store { "s" } else { "m" }, kind as u8);
    let start = Instant::now();
    let mut publishers = JoinSet::new();
    for p in 0..PUBLISHERS {
        let broker = broker.clone();
        let sentinel = format!("st-sentinel-{run}-{p}");
        let id = format!("bench-state-{run}-{p}");
        publishers.spawn(async move {
            let client = publisher(&broker, &id);
            let share = total / PUBLISHERS as u64;
            for i in 0..share {
                let n = i * PUBLISHERS as u64 + p as u64;
                let payload = format!(
                    "{{\"temp\":{:.2},\"hum\":{:.1},\"n\":{n}}}",
                    20.0 + (n % 100) as f64 / 10.0,
                    40.0 + (n % 50) as f64
                );
                let topic = kind.topic(&device(n % devices));
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
            }
            client
                .publish(
                    kind.topic(&sentinel),
                    QoS::AtLeastOnce,
                    false,
                    "{\"done\":true}",
                )
                .await
                .unwrap();
            sentinel
        });
    }
    let mut sentinels = Vec::new();
    while let Some(done) = publishers.join_next().await {
        sentinels.push(done.unwrap());
    }
    for sentinel in &sentinels {
        bounded("the sentinel stored", wait_stored(client, sentinel, kind)).await;
    }
    (total / PUBLISHERS as u64 * PUBLISHERS as u64) as f64 / start.elapsed().as_secs_f64()
}

/// Waits until `sentinel`'s message is stored: its state, or the device.
async fn wait_stored(client: &DeviceHubClient<Channel>, sentinel: &str, kind: Kind) {
    let mut client = client.clone();
    loop {
        let found = match kind {
            Kind::Reported => client
                .get_device_state(GetDeviceStateRequest {
                    device_id: sentinel.into(),
                })
                .await
                .is_ok(),
            Kind::Readings => client
                .get_device(GetDeviceRequest {
                    device_id: sentinel.into(),
                })
                .await
                .is_ok(),
        };
        if found {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One MQTT client publishing as fast as 200 in flight allow.
fn publisher(broker: &BrokerUrl, id: &str) -> AsyncClient {
    let mut options = MqttOptions::new(id, &broker.host, broker.port);
    options.set_inflight(200);
    driven_client(options)
}
