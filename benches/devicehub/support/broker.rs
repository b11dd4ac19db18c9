//! The broker a run goes through: rumqttd embedded in the harness process,
//! or a Mosquitto process (`--mosquitto`, and always for `replicas`).

use devicehub::config::BrokerUrl;

use crate::{mosquitto, tempdir::TempDir};

/// What the benchmarks add to Mosquitto's defaults: room to queue a whole
/// burst for a slow subscriber, and enough QoS 1 messages in flight.
const BENCH_SETTINGS: &str = "max_queued_messages 1000000\nmax_inflight_messages 1000\n";

/// The broker the run goes through; stopped when dropped.
pub struct Broker {
    url: BrokerUrl,
    _mosquitto: Option<mosquitto::Process>,
}

impl Broker {
    pub fn start(mosquitto: bool) -> Self {
        if !mosquitto {
            let addr = devicehub::broker::start("127.0.0.1:0".parse().unwrap(), 1 << 20)
                .expect("embedded broker");
            return Self {
                url: BrokerUrl::from_addr(addr),
                _mosquitto: None,
            };
        }
        let port = mosquitto::free_port();
        let conf = format!("listener {port} 127.0.0.1\nallow_anonymous true\n{BENCH_SETTINGS}");
        let process = mosquitto::Process::start_quiet(TempDir::new("bench"), &conf, port);
        Self {
            url: BrokerUrl {
                host: "127.0.0.1".into(),
                port,
                tls: false,
            },
            _mosquitto: Some(process),
        }
    }

    pub fn url(&self) -> &BrokerUrl {
        &self.url
    }
}
