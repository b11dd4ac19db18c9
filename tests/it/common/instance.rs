//! [`Instance`]: the `devicehub` binary with a PostgreSQL store, as the
//! replica and store tests run it (to SIGKILL it, or two in a group).

use devicehub::{config::BrokerUrl, proto::device_hub_client::DeviceHubClient};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

use super::{
    eventually, logged_addrs, postgres::Postgres, sample, scrape, spawn_devicehub, Mosquitto,
};

/// One `devicehub serve` process with a store: of a share group (replicas),
/// or alone.
pub struct Instance {
    pub child: tokio::process::Child,
    pub client: DeviceHubClient<Channel>,
    pub metrics: String,
    /// Read on so that the pipe never fills.
    _log: JoinHandle<()>,
}

impl Instance {
    /// Starts instance `name` of the share group `hub` and waits until it
    /// is SERVING (subscribed, store up).
    pub async fn start(name: &str, broker: &Mosquitto, pg: &Postgres) -> Self {
        Self::start_with(name, &broker.url, pg, &["--mqtt-share-group", "hub"]).await
    }

    /// Starts instance `name` with `extra` flags (a share group, or none
    /// for an instance alone) and waits until it is SERVING.
    pub async fn start_with(name: &str, broker: &BrokerUrl, pg: &Postgres, extra: &[&str]) -> Self {
        let mqtt_url = format!("mqtt://127.0.0.1:{}", broker.port);
        let client_id = format!("devicehub-{name}");
        let url = pg.url();
        let mut args = vec![
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--mqtt-url",
            &mqtt_url,
            "--mqtt-client-id",
            &client_id,
            "--mqtt-persistent-session",
            "--store-url",
            &url,
        ];
        args.extend_from_slice(extra);
        let (child, mut log) = spawn_devicehub(&args, &[]);
        let [metrics, grpc] = logged_addrs(&mut log, ["metrics listening", "gRPC listening"]).await;
        // Shown if the test fails.
        let prefix = name.to_owned();
        let _log = tokio::spawn(async move {
            while let Ok(Some(line)) = log.next_line().await {
                eprintln!("{prefix}: {line}");
            }
        });
        let url = format!("http://{grpc}");
        let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
        eventually(&format!("{name} SERVING"), || {
            let mut health = HealthClient::new(channel.clone());
            async move {
                let request = tonic_health::pb::HealthCheckRequest {
                    service: "devicehub.v1.DeviceHub".into(),
                };
                let status = health.check(request).await.ok()?.into_inner().status();
                (status == ServingStatus::Serving).then_some(())
            }
        })
        .await;
        Self {
            child,
            client: DeviceHubClient::new(channel),
            metrics,
            _log,
        }
    }

    /// Readings this instance committed to the store.
    pub async fn committed(&self) -> u64 {
        let text = scrape(&self.metrics).await;
        sample(&text, "devicehub_store_committed_readings_total").unwrap_or(0.0) as u64
    }

    pub async fn metric(&self, name: &str) -> f64 {
        sample(&scrape(&self.metrics).await, name).unwrap_or(0.0)
    }
}
