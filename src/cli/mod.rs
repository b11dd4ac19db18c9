//! The command line: clap types with a `DEVICEHUB_*` environment fallback for
//! every flag, and their translation into the library's [`Config`].

//!
//! A file per subcommand (`serve.rs`, `simulate.rs`, `health.rs`) and per
//! group of flags they share (`topics.rs`, `login.rs`).

mod health;
mod login;
mod serve;
#[cfg(feature = "simulator")]
mod simulate;
mod topics;

use clap::{Parser, Subcommand};

use crate::telemetry::Sampling;

pub use health::HealthArgs;
pub use login::{MqttLoginArgs, MQTT_PASSWORD_ENV};
pub use serve::{GrpcSecurityArgs, ServeArgs};
#[cfg(feature = "simulator")]
pub use simulate::SimulateArgs;
pub use topics::TopicArgs;

/// devicehub: a typed, streaming gRPC API in front of MQTT devices.
///
/// With no subcommand, runs `serve`.
#[derive(Debug, Parser)]
#[command(name = "devicehub", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Log lines as text, or as one JSON object per line (timestamp,
    /// level, target, message and the fields) for log collectors.
    #[arg(long, env = "DEVICEHUB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint to export traces to, e.g. http://127.0.0.1:4317
    /// (an OpenTelemetry Collector, Jaeger, Tempo). Unset: no traces.
    /// OTEL_SERVICE_NAME and the other OTEL_* variables of the exporter
    /// apply.
    #[arg(long, env = "DEVICEHUB_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Which server calls' traces to keep: always_on (every call's, even
    /// when the caller's traceparent says not sampled), traceidratio:R (a
    /// share R of traces), parentbased_always_on or
    /// parentbased_traceidratio:R (the caller's sampled flag decides when
    /// it sent one). Takes precedence over OTEL_TRACES_SAMPLER.
    #[arg(
        long,
        env = "DEVICEHUB_OTLP_SAMPLER",
        global = true,
        default_value = "always_on"
    )]
    pub otlp_sampler: Sampling,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (the default). Without --mqtt-url, starts an
    /// embedded MQTT broker and uses it.
    Serve(Box<ServeArgs>),
    #[cfg(feature = "simulator")]
    /// Run simulated devices that publish temperature/humidity readings and
    /// print the commands they receive.
    Simulate(Box<SimulateArgs>),
    /// Ask a running service's gRPC health service; print its status and
    /// exit 0 when SERVING, 1 otherwise (a container healthcheck that needs
    /// no other tool in the image).
    Health(HealthArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BrokerUrl;
    use std::time::Duration;

    #[test]
    fn durations_take_humantime_and_the_old_seconds_flags_still_work() {
        let broker = BrokerUrl::from_addr("127.0.0.1:1883".parse().unwrap());
        let config = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("devicehub").chain(args.iter().copied()));
            cli.unwrap().serve.config(&broker).unwrap()
        };
        let defaults = config(&[]);
        assert_eq!(defaults.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(defaults.mqtt.keep_alive, Duration::from_secs(30));
        let new = config(&["--shutdown-timeout", "250ms", "--mqtt-keep-alive", "1m"]);
        assert_eq!(new.shutdown_timeout, Duration::from_millis(250));
        assert_eq!(new.mqtt.keep_alive, Duration::from_secs(60));
        let old = config(&[
            "--shutdown-timeout-secs",
            "7",
            "--mqtt-keep-alive-secs",
            "5",
        ]);
        assert_eq!(old.shutdown_timeout, Duration::from_secs(7));
        assert_eq!(old.mqtt.keep_alive, Duration::from_secs(5));
        for bad in ["500ms", "1500ms", "65536s"] {
            let parsed = Cli::try_parse_from(["devicehub", "--mqtt-keep-alive", bad]);
            assert!(parsed.is_err(), "{bad}");
        }
        let health = Cli::try_parse_from(["devicehub", "health", "--timeout-secs", "2"]).unwrap();
        let Some(Command::Health(args)) = health.command else {
            panic!("not health")
        };
        assert_eq!(args.timeout(), Duration::from_secs(2));
    }

    #[test]
    fn defaults_and_fixed_topics_parse() {
        let cli = Cli::try_parse_from(["devicehub"]).unwrap();
        assert!(cli.command.is_none());
        let broker = BrokerUrl::from_addr("127.0.0.1:1883".parse().unwrap());
        let config = cli.serve.config(&broker).unwrap();
        assert_eq!(
            config.mqtt.readings_topic.subscription_filter(),
            "devices/+/readings"
        );
        assert!(config.mqtt.client_id.starts_with("devicehub-"));

        let poc = Cli::try_parse_from([
            "devicehub",
            "serve",
            "--readings-topic=poc/device/sensor",
            "--commands-topic=poc/device/control",
            "--fixed-device-id=device",
        ])
        .unwrap();
        let Some(Command::Serve(args)) = poc.command else {
            panic!("not serve")
        };
        let config = args.config(&broker).unwrap();
        assert_eq!(
            config.mqtt.commands_topic.topic_for("device"),
            "poc/device/control"
        );

        let wild = Cli::try_parse_from(["devicehub", "--commands-topic=a/+/{device_id}"]).unwrap();
        assert!(wild.serve.config(&broker).is_err());
        let persistent = Cli::try_parse_from(["devicehub", "--mqtt-persistent-session"]).unwrap();
        assert!(persistent.serve.config(&broker).is_err());
        let qos2 = [
            "devicehub",
            "--mqtt-persistent-session",
            "--mqtt-client-id=x",
            "--mqtt-subscribe-qos=2",
        ];
        assert!(Cli::try_parse_from(qos2)
            .unwrap()
            .serve
            .config(&broker)
            .is_err());
    }
}
