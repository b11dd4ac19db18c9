//! Scenario 14, persistent commands: `queued_commands` commands (SendCommand
//! with a `ttl`) queued for `queued_devices` offline devices that then come
//! online at once; the time from their `online` messages until every
//! command is SENT (counted on a WatchCommands stream), as a rate, next to
//! the same number of plain SendCommand calls to online devices, 64
//! callers, in the same run. In memory, and with the PostgreSQL store.

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
        device_hub_client::DeviceHubClient, CommandState, GetDeviceRequest, SendCommandRequest,
        WatchCommandsRequest,
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

/// Callers sending at once, for both the queue and the baseline.
const CALLERS: usize = 64;

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let (commands, devices) = (sizes.queued_commands, sizes.queued_devices);
    let room = [
        "--max-queued-commands",
        &commands.to_string(),
        "--max-queued-commands-per-device",
        &commands.to_string(),
    ]
    .map(str::to_owned);
    let room: Vec<&str> = room.iter().map(String::as_str).collect();
    let pg = postgres::Postgres::start_with("");
    for store in [false, true] {
        let url = store.then(|| pg.create_database("queued"));
        let mut args = room.clone();
        if let Some(url) = &url {
            args.extend(["--store-url", url]);
        }
        let service = Service::start(broker, &args).await;
        let client = service.client().await;
        let (queued_rate, queue_rate) = queued(&client, broker, commands, devices).await;
        let plain_rate = plain(&client, commands, devices).await;
        table.row(
            &format!(
                "14. queued commands delivered{} (commands/s)",
                if store { ", store" } else { "" }
            ),
            queued_rate,
            plain_rate,
            "/s",
            &format!(
                "{commands} queued for {devices} offline devices, from their `online` to all SENT; \
                 baseline: the same number of plain SendCommand, {CALLERS} callers; queueing them: {queue_rate:.0}/s"
            ),
        );
        service.stop().await;
    }
}

fn device(i: u64) -> String {
    format!("q-{i}")
}

/// Queues `commands` for `devices` offline devices, brings them online at
/// once, and returns the delivery rate (commands SENT per second from the
/// `online` messages) and the rate they were queued at.
async fn queued(
    client: &DeviceHubClient<Channel>,
    broker: &BrokerUrl,
    commands: u64,
    devices: u64,
) -> (f64, f64) {
    let fleet = fleet(broker).await;
    for i in 0..devices {
        let topic = format!("devices/{}/status", device(i));
        fleet
            .publish(topic, QoS::AtLeastOnce, true, "offline")
            .await
            .unwrap();
    }
    wait_offline(client, &device(devices - 1)).await;
    let queue_start = Instant::now();
    let statuses = send_all(client, commands, devices, Some(Duration::from_secs(600))).await;
    let queue_rate = commands as f64 / queue_start.elapsed().as_secs_f64();
    assert!(
        statuses.iter().all(|s| *s == CommandState::Queued),
        "all queued"
    );

    let mut changes = client
        .clone()
        .watch_commands(WatchCommandsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let start = Instant::now();
    for i in 0..devices {
        let topic = format!("devices/{}/status", device(i));
        fleet
            .publish(topic, QoS::AtLeastOnce, true, "online")
            .await
            .unwrap();
    }
    let mut sent = 0;
    while sent < commands {
        let change = bounded("a command change", changes.message())
            .await
            .expect("the watch goes on")
            .expect("a change");
        if change
            .command
            .is_some_and(|c| c.state() == CommandState::Sent)
        {
            sent += 1;
        }
    }
    let rate = commands as f64 / start.elapsed().as_secs_f64();
    // Leave the retained statuses clean for the next run.
    for i in 0..devices {
        let topic = format!("devices/{}/status", device(i));
        fleet
            .publish(topic, QoS::AtLeastOnce, true, "")
            .await
            .unwrap();
    }
    (rate, queue_rate)
}

/// The same number of plain SendCommand calls to online devices (those
/// of the queued run, online now).
async fn plain(client: &DeviceHubClient<Channel>, commands: u64, devices: u64) -> f64 {
    let start = Instant::now();
    send_all(client, commands, devices, None).await;
    commands as f64 / start.elapsed().as_secs_f64()
}

/// Sends `commands` round-robin over `devices`, [`CALLERS`] at once, with
/// `ttl` if given; returns their states.
async fn send_all(
    client: &DeviceHubClient<Channel>,
    commands: u64,
    devices: u64,
    ttl: Option<Duration>,
) -> Vec<CommandState> {
    let next = Arc::new(AtomicU64::new(0));
    let mut callers = JoinSet::new();
    for _ in 0..CALLERS {
        let (mut client, next) = (client.clone(), next.clone());
        callers.spawn(async move {
            let mut states = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= commands {
                    return states;
                }
                let request = SendCommandRequest {
                    device_id: device(n % devices),
                    command: "PING".into(),
                    ttl: ttl.map(|t| prost_types::Duration::try_from(t).unwrap()),
                    ..Default::default()
                };
                let response = client.send_command(request).await.unwrap().into_inner();
                states.push(response.state());
            }
        });
    }
    let mut states = Vec::new();
    while let Some(done) = callers.join_next().await {
        states.extend(done.unwrap());
    }
    states
}

/// One MQTT client publishing the fleet's status messages.
async fn fleet(broker: &BrokerUrl) -> AsyncClient {
    driven_client(MqttOptions::new(
        "bench-queued-fleet",
        &broker.host,
        broker.port,
    ))
}

async fn wait_offline(client: &DeviceHubClient<Channel>, device_id: &str) {
    bounded("the fleet to be offline", async {
        loop {
            let device = client
                .clone()
                .get_device(GetDeviceRequest {
                    device_id: device_id.into(),
                })
                .await
                .ok()
                .and_then(|r| r.into_inner().device);
            if device.is_some_and(|d| d.status() == devicehub::proto::DeviceStatus::Offline) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
