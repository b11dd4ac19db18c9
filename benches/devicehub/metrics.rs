//! Scenario 8: ingest and fan-out without and with /metrics (scraped every
//! second, four times as often as Prometheus' usual 15 s), back to back.
//! Compare the service CPU per reading or delivery.

use devicehub::config::BrokerUrl;

use crate::{
    fanout, ingest,
    support::{
        report::Table,
        service::{PLAIN, SCRAPED},
        sizes::Sizes,
    },
};

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    for variant in [PLAIN, SCRAPED] {
        ingest::run(table, broker, sizes, variant).await;
    }
    // The two largest watcher counts.
    let counts = &sizes.fanout_watchers[sizes.fanout_watchers.len().saturating_sub(2)..];
    for variant in [PLAIN, SCRAPED] {
        fanout::run(table, broker, sizes, counts, variant).await;
    }
}
