//! Scenario 17: the dashboard's fleet page, first render, in headless
//! Chromium (Debian's, through puppeteer-core: `web/test/first-render.mjs`)
//! with `sizes.dashboard_devices` devices known (one reading each): from
//! navigation start to the first page of devices in the DOM, each load a
//! first visit (a new browser context: no cache). Baseline: the same page
//! filtered to no device, loaded right after each, so that both meet the
//! machine at the same moments: what the list itself costs over loading
//! the page, the bundle and one ListDevices round trip.
//!
//! Needs `chromium` and `npm ci` in web/, as the dashboard's tests do.

use std::{process::Stdio, time::Instant};

use devicehub::config::BrokerUrl;
use rumqttc::QoS;
use serde_json::Value;

use crate::{
    support::{
        grpc::wait_for_stored,
        measure::{bounded, percentile, settle_cpu},
        publish::publish,
        report::Table,
        service::Service,
        sizes::Sizes,
    },
    tempdir,
};

const WEB_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/web");

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let chromium = crate::mosquitto::which("chromium")
        .expect("chromium (Debian package; scripts/test.sh installs it)");
    let node = crate::mosquitto::which("node").expect("node (Node.js 20)");
    assert!(
        std::path::Path::new(&format!("{WEB_DIR}/node_modules/puppeteer-core")).exists(),
        "web/ has no node_modules: `npm ci` in web/ (scripts/test.sh does it)"
    );
    let service = Service::start(broker, &[]).await;
    let mut client = service.client().await;
    let n = sizes.dashboard_devices;
    publish(broker, 4, n, n, QoS::AtLeastOnce, None, Instant::now()).await;
    wait_for_stored(&mut client, n).await;
    settle_cpu(&service).await;

    let dir = tempdir::TempDir::new("bench-dashboard");
    let output = bounded(
        "the first-render script",
        tokio::process::Command::new(node)
            .arg(format!("{WEB_DIR}/test/first-render.mjs"))
            .current_dir(WEB_DIR)
            .env("BASE_URL", format!("http://{}", service.addr))
            .env("CHROMIUM", chromium)
            .env("PROFILE_DIR", dir.path().join("profile"))
            .env("LOADS", sizes.dashboard_loads.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("node runs");
    assert!(
        output.status.success(),
        "the first-render script failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (mut fleet, mut empty, mut rows) = (Vec::new(), Vec::new(), 0);
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let load: Value = serde_json::from_str(line).expect("one JSON line per load");
        assert_eq!(load["alerts"], serde_json::json!([]), "{load}");
        let micros = (load["ms"].as_f64().unwrap_or(f64::NAN) * 1e3) as u64;
        match load["kind"].as_str() {
            Some("fleet") => {
                rows = load["rows"].as_u64().unwrap_or(0);
                fleet.push(micros);
            }
            Some("baseline") => empty.push(micros),
            _ => {}
        }
    }
    assert_eq!(fleet.len(), sizes.dashboard_loads, "every load rendered");
    assert!(rows > 0, "the first page lists devices");
    fleet.sort_unstable();
    empty.sort_unstable();
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        table.row(
            &format!("17. dashboard: fleet first render {label} (ms)"),
            percentile(&fleet, p) / 1e3,
            percentile(&empty, p) / 1e3,
            "ms",
            &format!(
                "{n} devices known, the first page of {rows} in the DOM, navigation start → \
                 render, each load a first visit (no cache), {} loads; baseline: the same page \
                 filtered to no device",
                fleet.len()
            ),
        );
    }
    service.stop().await;
}
