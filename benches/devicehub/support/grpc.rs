//! gRPC clients of the service: WatchReadings streams that count and time
//! what they receive, the stored count from ListReadings (and filling the
//! buffer until it is reached), and health checks, the floor of a unary
//! call.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use devicehub::{
    config::BrokerUrl,
    proto::{
        device_hub_client::DeviceHubClient, watch_readings_response::Event as WatchEvent,
        ListReadingsRequest, WatchReadingsRequest,
    },
};
use rumqttc::QoS;
use tonic::transport::Channel;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use super::{
    measure::{time_calls, PATIENCE},
    publish::{publish, sent_at},
    service::Service,
    sizes::Sizes,
};

/// Builds the i-th request of a query scenario.
pub type MakeQuery = Box<dyn Fn(usize) -> ListReadingsRequest>;

/// How many readings the service holds: newest seq - oldest seq + 1
/// (sequence numbers are contiguous in the buffer).
pub async fn stored_count(client: &mut DeviceHubClient<Channel>) -> u64 {
    let seq = |oldest_first| ListReadingsRequest {
        page_size: 1,
        oldest_first,
        ..Default::default()
    };
    let newest = client
        .list_readings(seq(false))
        .await
        .map(|r| r.into_inner().readings)
        .unwrap_or_default();
    let oldest = client
        .list_readings(seq(true))
        .await
        .map(|r| r.into_inner().readings)
        .unwrap_or_default();
    match (newest.first(), oldest.first()) {
        (Some(n), Some(o)) => n.seq - o.seq + 1,
        _ => 0,
    }
}

/// Waits (at most [`PATIENCE`]) until the service holds `n` readings.
pub async fn wait_for_stored(client: &mut DeviceHubClient<Channel>, n: u64) {
    let deadline = Instant::now() + PATIENCE;
    while stored_count(client).await < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fills the service's buffer with `sizes.query_readings` readings of
/// `sizes.query_devices` devices, as fast as the broker takes them, stamped
/// from `epoch`; returns how many it holds then.
pub async fn fill(
    broker: &BrokerUrl,
    client: &mut DeviceHubClient<Channel>,
    sizes: Sizes,
    epoch: Instant,
) -> u64 {
    let (n, devices) = (sizes.query_readings, sizes.query_devices);
    publish(broker, 4, n, devices, QoS::AtLeastOnce, None, epoch).await;
    wait_for_stored(client, n).await;
    stored_count(client).await
}

/// WatchReadings streams that count what they receive.
pub struct Watchers {
    pub delivered: Arc<AtomicU64>,
    /// When the last reading arrived, at any of them.
    pub last: Arc<Mutex<Option<Instant>>>,
    /// Arrival latencies seen by the first watcher.
    pub latencies: Arc<Mutex<Vec<u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Opens `n` WatchReadings streams, 100 per HTTP/2 connection.
pub async fn watchers(service: &Service, n: usize, epoch: Instant) -> Watchers {
    let delivered = Arc::new(AtomicU64::new(0));
    let last = Arc::new(Mutex::new(None));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..n.div_ceil(100) {
        clients.push(service.client().await);
    }
    for i in 0..n {
        let mut client = clients[i / 100].clone();
        let mut stream = client
            .watch_readings(service.request(WatchReadingsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let (delivered, last, latencies) = (delivered.clone(), last.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                if let Some(WatchEvent::Reading(r)) = message.event {
                    let now = Instant::now();
                    if let (0, Some(sent)) = (i, sent_at(&r.payload)) {
                        latencies
                            .lock()
                            .unwrap()
                            .push((now - epoch).as_nanos() as u64 - sent);
                    }
                    delivered.fetch_add(1, Ordering::Relaxed);
                    *last.lock().unwrap() = Some(now);
                }
            }
        }));
    }
    Watchers {
        delivered,
        last,
        latencies,
        tasks,
    }
}

/// One health check: the floor of a unary call.
pub async fn check_health(mut health: HealthClient<Channel>) {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    health.check(request).await.unwrap();
}

/// A health client of `service`, and the sorted times of `n` health checks:
/// the floor of a unary call.
pub async fn health_floor(service: &Service, n: usize) -> (HealthClient<Channel>, Vec<u64>) {
    let health = HealthClient::new(service.channel().await);
    let floor = time_calls(n, || check_health(health.clone())).await;
    (health, floor)
}
