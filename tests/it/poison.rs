//! Messages from devices that cannot be stored (issue 25, "What devices
//! publish"): retained ones on topics holding U+0000, bytes that are not
//! UTF-8, or a 3 000-byte device id, and a row the database refuses. Each
//! is dropped, counted by reason and acknowledged, and the readings around
//! it are stored: through the embedded broker (rumqttd forwards U+0000 but
//! refuses what is not UTF-8), Mosquitto (which refuses both itself) and a
//! hand-written broker that forwards what is not UTF-8, with and
//! without the store, and again after a restart, when the broker delivers
//! the retained ones anew. The service is the binary, so that a restart is
//! a new process and `/metrics` shows the counts.

use crate::common;

use std::io::{Read, Write};

use common::{postgres::Postgres, *};
use devicehub::config::BrokerUrl;

/// Readings published around the poison, per service run.
const READINGS: u64 = 1000;

/// The retained poison messages a broker takes, each with the reason
/// devicehub counts it under. (Neither broker takes a topic that is not
/// UTF-8: [`a_topic_that_is_not_utf8_is_acknowledged_on_the_same_connection`]
/// plays a broker that forwards one.)
fn poison(broker_forwards_anything: bool) -> Vec<(Vec<u8>, &'static str)> {
    let long_id = format!("devices/{}/readings", "x".repeat(3000));
    let mut poison = vec![(long_id.into_bytes(), "invalid_topic")];
    if broker_forwards_anything {
        poison.push((b"devices/a\0b/readings".to_vec(), "invalid_topic"));
    }
    poison
}

/// MQTT 3.1.1's variable-length "remaining length".
fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// Reads one MQTT packet: its first byte and its body.
fn read_packet(stream: &mut std::net::TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut first = [0];
    stream.read_exact(&mut first)?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut byte = [0];
        stream.read_exact(&mut byte)?;
        len |= usize::from(byte[0] & 0x7f) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    stream.read_exact(&mut body)?;
    Ok((first[0], body))
}

/// A PUBLISH at QoS 1 with packet id `pkid`.
fn publish_packet(topic: &[u8], pkid: u16, payload: &[u8], retain: bool) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32 | u8::from(retain), &body)
}

/// Publishes `payload` retained at QoS 1 on `topic`, taken as bytes as they
/// are (rumqttc's client takes only valid strings), and waits for the
/// broker's PUBACK: a hand-written MQTT 3.1.1 client.
fn retain_raw(broker: &BrokerUrl, client_id: &str, topic: &[u8], payload: &[u8]) {
    let mut stream = std::net::TcpStream::connect((broker.host.as_str(), broker.port)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut connect = b"\x00\x04MQTT\x04\x02\x00\x3c".to_vec();
    connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    connect.extend_from_slice(client_id.as_bytes());
    stream.write_all(&packet(0x10, &connect)).unwrap();
    let mut connack = [0; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    stream
        .write_all(&publish_packet(topic, 1, payload, true))
        .unwrap();
    let mut puback = [0; 4];
    stream
        .read_exact(&mut puback)
        .expect("the broker acknowledges the retained publish");
    assert_eq!(puback, [0x40, 2, 0, 1]);
    stream.write_all(&[0xe0, 0]).unwrap(); // DISCONNECT
}

type Client = devicehub::proto::device_hub_client::DeviceHubClient<tonic::transport::Channel>;

/// The service binary, with what the test reaches it by.
struct Service {
    process: tokio::process::Child,
    channel: tonic::transport::Channel,
    client: Client,
    metrics: String,
}

impl Service {
    /// Starts the binary against `broker` (with the store at `store_url`,
    /// if any).
    async fn start(broker: &BrokerUrl, store_url: Option<&str>) -> Self {
        let extra = match store_url {
            Some(url) => vec!["--store-url", url],
            None => vec![],
        };
        let (process, grpc, metrics) = serve_with_metrics(broker, &extra).await;
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .expect("the service's gRPC port answers");
        Self {
            process,
            client: Client::new(channel.clone()),
            channel,
            metrics,
        }
    }

    /// Health says SERVING (the gRPC health service, as probes ask it) and
    /// a call that reads answers.
    async fn assert_serving(&self) {
        use tonic_health::pb::{
            health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
        };
        let status = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest::default())
            .await
            .expect("the health check answers")
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving);
        self.client
            .clone()
            .list_devices(devicehub::proto::ListDevicesRequest::default())
            .await
            .expect("ListDevices answers");
    }

    async fn stop(mut self) {
        terminate(&mut self.process).await;
    }
}

/// `devicehub_readings_rejected_total{reason}`, 0 when absent.
fn rejected(text: &str, reason: &str) -> f64 {
    sample(
        text,
        &format!("devicehub_readings_rejected_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Waits until the scrape shows `want` rejections for each reason.
async fn wait_for_rejected(metrics: &str, want: &[(&str, f64)]) {
    eventually(&format!("rejections {want:?}"), || async {
        let text = scrape(metrics).await;
        want.iter()
            .all(|&(reason, n)| rejected(&text, reason) == n)
            .then_some(())
    })
    .await
}

/// Readings `0..READINGS` on `devices/{device}/readings` are all listed.
async fn publish_and_list(client: &Client, device: &TestDevice, device_id: &str) {
    let topic = format!("devices/{device_id}/readings");
    publish_indices(device, &topic, 0..READINGS).await.unwrap();
    let listed = eventually(&format!("{READINGS} readings of {device_id}"), || async {
        let all = list_all(client, device_id).await;
        (all.len() as u64 == READINGS).then_some(all)
    })
    .await;
    let indices: Vec<u64> = listed.iter().map(index_of).collect();
    assert_eq!(indices, (0..READINGS).collect::<Vec<_>>());
}

/// The scenario of the issue on `broker`: retained poison, then readings;
/// a restart; then readings again.
async fn poison_then_readings(
    broker: &BrokerUrl,
    forwards_anything: bool,
    store: Option<&Postgres>,
) {
    let poison = poison(forwards_anything);
    for (i, (topic, _)) in poison.iter().enumerate() {
        retain_raw(broker, &format!("poisoner-{i}"), topic, b"21.5");
    }
    let mut want: Vec<(&str, f64)> = Vec::new();
    for (_, reason) in &poison {
        match want.iter_mut().find(|(r, _)| r == reason) {
            Some((_, n)) => *n += 1.0,
            None => want.push((reason, 1.0)),
        }
    }
    let store_url = store.map(Postgres::url);
    let device = TestDevice::connect(broker, "poison-neighbour", None).await;

    let service = Service::start(broker, store_url.as_deref()).await;
    publish_and_list(&service.client, &device, "before").await;
    wait_for_rejected(&service.metrics, &want).await;
    service.assert_serving().await;
    if let Some(pg) = store {
        assert_eq!(
            pg.psql("SELECT count(*) FROM readings"),
            READINGS.to_string()
        );
    }
    service.stop().await;

    // A new process: the broker delivers the retained poison again.
    let service = Service::start(broker, store_url.as_deref()).await;
    publish_and_list(&service.client, &device, "after").await;
    wait_for_rejected(&service.metrics, &want).await;
    service.assert_serving().await;
    if store.is_some() {
        // The first run's readings, from the table.
        assert_eq!(
            list_all(&service.client, "before").await.len() as u64,
            READINGS
        );
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_through_the_embedded_broker_is_dropped_and_counted() {
    let broker = embedded_broker();
    poison_then_readings(&broker, true, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_through_the_embedded_broker_never_stops_the_store() {
    let pg = Postgres::start();
    let broker = embedded_broker();
    poison_then_readings(&broker, true, Some(&pg)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_through_mosquitto_is_dropped_and_counted() {
    let broker = Mosquitto::start();
    poison_then_readings(&broker.url, false, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_through_mosquitto_never_stops_the_store() {
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    poison_then_readings(&broker.url, false, Some(&pg)).await;
}

/// A row the database refuses for a reason ingest cannot know (here a
/// CHECK constraint the test adds) is left out of its commit and counted;
/// the readings committed with it, before and after, are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_refuses_is_isolated_and_the_rest_commits() {
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let service = Service::start(&broker.url, Some(&pg.url())).await;
    let client = &service.client;
    pg.psql("ALTER TABLE readings ADD CONSTRAINT refuses_a_device CHECK (device_id <> 'refused')");
    let device = TestDevice::connect(&broker.url, "refusal-neighbour", None).await;
    // In one burst, so that the refused row shares batches with the rest.
    let first = publish_indices(&device, "devices/d/readings", 0..READINGS / 2);
    device.publish("devices/refused/readings", "21.5").await;
    let second = publish_indices(&device, "devices/d/readings", READINGS / 2..READINGS);
    first.await.unwrap();
    second.await.unwrap();
    let listed = eventually("every reading of d listed", || async {
        let all = list_all(client, "d").await;
        (all.len() as u64 == READINGS).then_some(all)
    })
    .await;
    let mut indices: Vec<u64> = listed.iter().map(index_of).collect();
    indices.sort();
    assert_eq!(indices, (0..READINGS).collect::<Vec<_>>());
    wait_for_rejected(&service.metrics, &[("refused_by_store", 1.0)]).await;
    assert_eq!(
        pg.psql("SELECT count(*) FROM readings"),
        READINGS.to_string()
    );
    service.assert_serving().await;
    service.stop().await;
}

/// A broker that forwards a topic that is not UTF-8 (which MQTT forbids):
/// devicehub counts it, acknowledges it and goes on with the same
/// connection. (rumqttc as published fails the connection on it, and a
/// broker would deliver it again on the next one, forever: see
/// vendor/rumqttc/PATCH.md.) The broker is played by hand here, on one
/// connection, for the one exchange: CONNECT, SUBSCRIBE, two publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_is_not_utf8_is_acknowledged_on_the_same_connection() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let broker = BrokerUrl::from_addr(listener.local_addr().unwrap());
    let played = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let (connect, _) = read_packet(&mut stream).unwrap();
        assert_eq!(connect, 0x10, "CONNECT first");
        stream.write_all(&[0x20, 2, 0, 0]).unwrap();
        let mut acked = Vec::new();
        loop {
            let (kind, body) = read_packet(&mut stream).expect("the connection stays up");
            match kind {
                // SUBSCRIBE: grant each filter QoS 1, then publish.
                0x82 => {
                    let filters = count_filters(&body[2..]);
                    let mut suback = body[..2].to_vec();
                    suback.extend(std::iter::repeat_n(1, filters));
                    stream.write_all(&packet(0x90, &suback)).unwrap();
                    stream
                        .write_all(&publish_packet(b"devices/a\xffb/readings", 1, b"1", false))
                        .unwrap();
                    stream
                        .write_all(&publish_packet(b"devices/ok/readings", 2, b"2", false))
                        .unwrap();
                }
                0x40 => {
                    acked.push(u16::from_be_bytes([body[0], body[1]]));
                    if acked.len() == 2 {
                        return (acked, stream); // kept open: the link stays up
                    }
                }
                0xc0 => stream.write_all(&[0xd0, 0]).unwrap(), // PINGREQ
                other => panic!("unexpected packet {other:#x}"),
            }
        }
    });
    let service = Service::start(&broker, None).await;
    let reading = newest_reading_of(&service.client, "ok").await;
    assert_eq!(&reading.payload[..], b"2");
    let (acked, _connection) = tokio::task::spawn_blocking(move || played.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        acked,
        [1, 2],
        "both acknowledged, in order, on one connection"
    );
    wait_for_rejected(&service.metrics, &[("invalid_utf8", 1.0)]).await;
    service.assert_serving().await;
    service.stop().await;
}

/// The number of topic filters in a SUBSCRIBE's payload.
fn count_filters(mut payload: &[u8]) -> usize {
    let mut filters = 0;
    while payload.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([payload[0], payload[1]]));
        payload = &payload[(2 + len + 1).min(payload.len())..];
        filters += 1;
    }
    filters
}
