//! What an operator sees of the service:
//! - `metrics.rs`: `GET /metrics` (`--metrics-addr`), the devicehub_* values
//!   read at scrape time from the counters the `stats` line prints;
//! - `calls/`: every gRPC call's span, end-of-call log line and the
//!   `grpc_server_*` metrics (a tower layer in front of tonic's router);
//! - `traces.rs`: the log subscriber (text or JSON), OTLP span export
//!   (`--otlp-endpoint`) and W3C trace context in and out.

pub mod calls;
pub mod metrics;
pub mod traces;

pub use traces::{init, LogFormat, Sampling, Telemetry, TelemetryError};
