//! The gRPC health service's statuses: [`SERVICE_NAME`] and the overall
//! status (`""`, what Kubernetes' gRPC probe asks for) follow the MQTT link,
//! and everything turns NOT_SERVING when shutdown begins.

use tokio_util::sync::CancellationToken;
use tonic_health::{server::HealthReporter, ServingStatus};
use tracing::info;

use crate::{mqtt::LinkState, SERVICE_NAME};

/// Keeps the health status of [`SERVICE_NAME`] and the overall one in step
/// with the MQTT link: SERVING only while connected and subscribed. (A
/// service that cannot reach its broker serves no readings and no commands:
/// a probe must see that, whichever name it asks for.)
pub(crate) async fn follow_link(
    health: HealthReporter,
    mut link: tokio::sync::watch::Receiver<LinkState>,
    shutdown: CancellationToken,
) {
    loop {
        let status = match *link.borrow_and_update() {
            LinkState::Ready => ServingStatus::Serving,
            LinkState::Down | LinkState::Connected => ServingStatus::NotServing,
        };
        if shutdown.is_cancelled() {
            return;
        }
        for name in [SERVICE_NAME, ""] {
            health.set_service_status(name, status).await;
        }
        tokio::select! {
            changed = link.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Resolves once `shutdown` is cancelled, after reporting NOT_SERVING, so
/// that load balancers stop sending calls while open streams drain.
pub(crate) async fn stopping(health: HealthReporter, shutdown: CancellationToken) {
    shutdown.cancelled().await;
    info!("shutting down");
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
}
