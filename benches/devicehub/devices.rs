//! Scenario 9: ListDevices with `sizes.devices` devices known: every page of
//! 100 in order (following the tokens), and pages by prefix. Baseline: a
//! health check right after each page, so that both meet the machine at the
//! same moments (on this VM the tail comes in bursts of a few milliseconds
//! every few hundred that hit a health check as much as a page).

use std::{future::Future, time::Instant};

use devicehub::{
    config::BrokerUrl,
    proto::{device_hub_client::DeviceHubClient, ListDevicesRequest},
};
use rumqttc::QoS;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{
    grpc::{check_health, wait_for_stored},
    measure::{percentile, settle_cpu},
    publish::publish,
    report::Table,
    service::Service,
    sizes::Sizes,
};

/// Sorted page times, and the sorted times of the health check after each.
struct Timed {
    pages: Vec<u64>,
    beside: Vec<u64>,
}

impl Timed {
    fn new() -> Self {
        Self {
            pages: Vec::new(),
            beside: Vec::new(),
        }
    }

    /// Times one page (`call`), then a health check right after it.
    async fn page<T>(
        &mut self,
        health: &HealthClient<Channel>,
        call: impl Future<Output = T>,
    ) -> T {
        let start = Instant::now();
        let page = call.await;
        self.pages.push(start.elapsed().as_nanos() as u64);
        let start = Instant::now();
        check_health(health.clone()).await;
        self.beside.push(start.elapsed().as_nanos() as u64);
        page
    }

    fn sorted(mut self) -> Self {
        self.pages.sort_unstable();
        self.beside.sort_unstable();
        self
    }
}

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let service = Service::start(broker, &[]).await;
    let mut client = service.client().await;
    let n = sizes.devices;
    publish(broker, 4, n, n, QoS::AtLeastOnce, None, Instant::now()).await;
    wait_for_stored(&mut client, n).await;
    settle_cpu(&service).await;
    let health = HealthClient::new(service.channel().await);
    let cpu_per_page = cpu_per_page(&service, &mut client).await;
    let (in_turn, listed) = every_page(&mut client, &health).await;
    let by_prefix = by_prefix(&mut client, &health, sizes.query_iterations).await;
    for (name, timed) in [("every page in turn", &in_turn), ("by prefix", &by_prefix)] {
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            table.row(
                &format!("9. devices: page of 100, {name} {label} (µs)"),
                percentile(&timed.pages, p) / 1e3,
                percentile(&timed.beside, p) / 1e3,
                "µs",
                &format!(
                    "{listed} devices listed of {n}, each with its newest reading (~60 B JSON); \
                     service CPU {:.0} µs per page over the full pass; baseline: a health check \
                     right after each page",
                    cpu_per_page * 1e6
                ),
            );
        }
    }
    service.stop().await;
}

/// The page of 100 after `token`.
async fn page(
    client: &mut DeviceHubClient<Channel>,
    token: String,
) -> devicehub::proto::ListDevicesResponse {
    client
        .list_devices(ListDevicesRequest {
            page_size: 100,
            page_token: token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Every page in order twice, untimed: a warm-up, then a pass for the
/// service's CPU time per page.
async fn cpu_per_page(service: &Service, client: &mut DeviceHubClient<Channel>) -> f64 {
    let (mut token, mut pages) = (String::new(), 0);
    loop {
        token = page(client, token).await.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let cpu_before = service.cpu_seconds();
    loop {
        pages += 1;
        token = page(client, token).await.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    (service.cpu_seconds() - cpu_before) / f64::from(pages)
}

/// Every page in order, each timed with the health check after it; and how
/// many devices they listed.
async fn every_page(
    client: &mut DeviceHubClient<Channel>,
    health: &HealthClient<Channel>,
) -> (Timed, usize) {
    let (mut timed, mut token, mut listed) = (Timed::new(), String::new(), 0);
    loop {
        let page = timed.page(health, page(client, token)).await;
        listed += page.devices.len();
        token = page.next_page_token;
        if token.is_empty() {
            return (timed.sorted(), listed);
        }
    }
}

/// First pages by prefix (`dev-0` to `dev-9`), each timed with the health
/// check after it.
async fn by_prefix(
    client: &mut DeviceHubClient<Channel>,
    health: &HealthClient<Channel>,
    iterations: usize,
) -> Timed {
    let mut timed = Timed::new();
    for i in 0..iterations {
        let prefix = format!("dev-{}", (i as u64 * 7919) % 10);
        let request = ListDevicesRequest {
            page_size: 100,
            device_id_prefix: prefix,
            ..Default::default()
        };
        timed
            .page(health, client.list_devices(request))
            .await
            .unwrap();
    }
    timed.sorted()
}
