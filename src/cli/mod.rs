//! The command line: clap types with a `DEVICEHUB_*` environment fallback for
//! every flag, their translation into the library's plain configuration
//! (`devicehub::Config`, `devicehub::ServeConfig`, `health::Probe`,
//! `simulate::SimulateConfig`), and the errors about flags
//! ([`ConfigError`]).
//!
//! A module of the binary, not of the library, which knows nothing of clap:
//! it uses only the library's public API (`devicehub::...`, never `crate::`),
//! because the integration tests compile it too (`tests/common`), to build
//! configurations as the command line would.
//!
//! A file per subcommand (`serve.rs`, `simulate.rs`, `health.rs`), per
//! group of flags they share (`topics.rs`, `login.rs`, `commands.rs`), and the errors
//! (`error.rs`). Its tests are in `tests.rs`, declared by `main.rs` so that
//! only the binary's test target runs them.

mod commands;
mod error;
mod health;
mod login;
mod serve;
#[cfg(feature = "simulator")]
mod simulate;
mod topics;

use clap::{Parser, Subcommand};

use devicehub::telemetry::Sampling;

pub use commands::CommandArgs;
pub use error::ConfigError;
pub use health::HealthArgs;
pub use login::MqttLoginArgs;
pub use serve::ServeArgs;
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

/// How log lines are written (to stderr): `--log-format`'s values, for
/// `devicehub::telemetry::LogFormat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for devicehub::telemetry::LogFormat {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => Self::Text,
            LogFormat::Json => Self::Json,
        }
    }
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
