//! Scenario 6, commands: SendCommand QoS 1 with 64 concurrent callers, and
//! StreamCommands with 64 in flight, vs a bare rumqttc QoS 1 publisher with
//! 64 publishes in flight, same broker; and gRPC's own floor, health checks
//! from 64 callers.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use devicehub::{
    config::BrokerUrl,
    proto::{device_hub_client::DeviceHubClient, SendCommandRequest, StreamCommandsRequest},
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{
    grpc::check_health,
    measure::{bounded, cpu_seconds, throughput},
    report::Table,
    service::Service,
    sizes::Sizes,
};

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let service = Service::start(broker, &[]).await;
    let client = service.client().await;
    let duration = Duration::from_secs_f64(sizes.command_secs);
    let ours = throughput(64, duration, || {
        let mut client = client.clone();
        async move {
            client
                .send_command(SendCommandRequest {
                    device_id: "dev-1".into(),
                    command: "PING".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    })
    .await;
    let (cpu_before, harness_cpu_before) = (service.cpu_seconds(), cpu_seconds("self"));
    let stream_start = Instant::now();
    let streamed = stream_commands(client.clone(), 64, duration).await;
    let stream_secs = stream_start.elapsed().as_secs_f64();
    let stream_cpu = service.cpu_seconds() - cpu_before;
    let stream_harness_cpu = cpu_seconds("self") - harness_cpu_before;

    let baseline = bare_publishes(broker, duration).await;
    // What gRPC alone allows here: unary calls that do nothing.
    let health = HealthClient::new(
        Channel::from_shared(format!("http://{}", service.addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let grpc_floor = throughput(64, duration, || check_health(health.clone())).await;
    table.row(
        "6. commands, QoS 1, 64 callers (calls/s)",
        ours,
        baseline,
        "/s",
        &format!(
            "baseline: bare rumqttc acked publishes/s, 64 in flight; gRPC health checks, 64 callers: {grpc_floor:.0}/s ({:.2}x)",
            ours / grpc_floor
        ),
    );
    table.row(
        "6. commands, StreamCommands, QoS 1, 64 in flight (commands/s)",
        streamed,
        baseline,
        "/s",
        &format!(
            "one stream; baseline: bare rumqttc acked publishes/s, 64 in flight; \
             service {:.0} µs CPU per command ({:.0}% of a core), harness {:.0}%",
            stream_cpu * 1e6 / (streamed * stream_secs).max(1.0),
            100.0 * stream_cpu / stream_secs,
            100.0 * stream_harness_cpu / stream_secs,
        ),
    );
    service.stop().await;
}

/// Acked publishes per second of a bare rumqttc QoS 1 publisher with 64 in
/// flight, publishing a command envelope for `duration`.
async fn bare_publishes(broker: &BrokerUrl, duration: Duration) -> f64 {
    let mut options = MqttOptions::new("bench-bare-commands", &broker.host, broker.port);
    options.set_inflight(64);
    let (bare, mut eventloop) = AsyncClient::new(options, 64);
    let acked = Arc::new(AtomicU64::new(0));
    let counter = acked.clone();
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    let start = Instant::now();
    let payload = br#"{"id":"01a2145b-58c7-741b-93c5-feaf7e34ec99","command":"PING"}"#;
    while start.elapsed() < duration {
        bare.publish(
            "devices/dev-1/commands",
            QoS::AtLeastOnce,
            false,
            &payload[..],
        )
        .await
        .unwrap();
    }
    let rate = acked.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    driver.abort();
    rate
}

/// Commands per second through one StreamCommands stream that keeps
/// `in_flight` commands outstanding for `duration`.
async fn stream_commands(
    mut client: DeviceHubClient<Channel>,
    in_flight: u64,
    duration: Duration,
) -> f64 {
    let request = |request_id| StreamCommandsRequest {
        request_id,
        command: Some(SendCommandRequest {
            device_id: "dev-1".into(),
            command: "PING".into(),
            ..Default::default()
        }),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(in_flight as usize);
    for id in 0..in_flight {
        tx.send(request(id)).await.unwrap();
    }
    let start = Instant::now();
    let mut responses = client
        .stream_commands(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (mut sent, mut done) = (in_flight, 0);
    while let Some(response) = bounded("a command's response", responses.message())
        .await
        .unwrap()
    {
        assert_eq!(response.status_code, 0, "{response:?}");
        done += 1;
        if start.elapsed() < duration {
            tx.send(request(sent)).await.unwrap();
            sent += 1;
        } else if done == sent {
            break;
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}
