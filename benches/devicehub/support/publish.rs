//! MQTT publishers: readings of about 60 bytes stamped with their send
//! time, from a few clients, as fast as the broker takes them or at a
//! steady rate.

use std::time::{Duration, Instant};

use devicehub::config::BrokerUrl;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};

use super::measure::bounded;

/// The send time a publisher wrote into a payload: `{"t":<nanos>,...}`.
pub fn sent_at(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix("{\"t\":")?;
    rest[..rest.find(',')?].parse().ok()
}

/// A reading of about 60 bytes, stamped with its send time.
fn reading_payload(epoch: Instant, i: u64) -> Vec<u8> {
    format!(
        "{{\"t\":{},\"temp\":{:.2},\"hum\":{:.1},\"n\":{}}}",
        (Instant::now() - epoch).as_nanos(),
        20.0 + (i % 100) as f64 / 10.0,
        40.0 + (i % 50) as f64,
        i
    )
    .into_bytes()
}

/// An MQTT client with `options`, its event loop driven in the background
/// (polled again 20 ms after an error), for a scenario's own publishes.
pub fn driven_client(options: MqttOptions) -> AsyncClient {
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    client
}

/// Publishes `total` readings for `devices` devices from `publishers` MQTT
/// clients, as fast as the broker takes them, or at `rate` per second.
pub async fn publish(
    broker: &BrokerUrl,
    publishers: usize,
    total: u64,
    devices: u64,
    qos: QoS,
    rate: Option<u64>,
    epoch: Instant,
) {
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let mut options = MqttOptions::new(
            format!("bench-pub-{p}-{}", uuid::Uuid::now_v7().simple()),
            &broker.host,
            broker.port,
        );
        options
            .set_inflight(200)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, eventloop) = AsyncClient::new(options, 1000);
        let share = total / publishers as u64 + u64::from((p as u64) < total % publishers as u64);
        let interval = rate.map(|r| Duration::from_secs_f64(publishers as f64 / r as f64));
        tasks.push(tokio::spawn(async move {
            let driver = tokio::spawn(drive(eventloop, share, qos));
            let mut ticker = interval.map(tokio::time::interval);
            for i in 0..share {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let n = i * publishers as u64 + p as u64;
                let topic = format!("devices/dev-{}/readings", n % devices);
                client
                    .publish(topic, qos, false, reading_payload(epoch, n))
                    .await
                    .unwrap();
            }
            bounded("the publisher to finish", driver).await.unwrap();
            let _ = client.try_disconnect();
        }));
    }
    for task in tasks {
        bounded("publishers", task).await.unwrap();
    }
}

/// Runs a publisher's event loop until its `share` publishes are done.
async fn drive(mut eventloop: EventLoop, share: u64, qos: QoS) {
    // QoS 0/1 publishes are done once their acks (or writes) are.
    let mut outstanding = share as i64;
    while outstanding > 0 {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => outstanding -= 1,
            Ok(Event::Incoming(Packet::PubAck(_))) => outstanding -= 1,
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // Flush and say goodbye.
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}
