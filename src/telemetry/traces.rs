//! Logs and traces. [`init`] installs the one `tracing` subscriber: log
//! lines on stderr (text, or one JSON object per line) filtered by
//! `DEVICEHUB_LOG`, and with `--otlp-endpoint` an OpenTelemetry layer that
//! exports devicehub's spans over OTLP/gRPC in batches.
//!
//! W3C trace context: a call's `traceparent` makes its `rpc` span a child
//! of the caller's span ([`continue_trace`]), and the command envelope
//! carries the `traceparent` of the span that published it ([`traceparent`]),
//! so a device that reports traces joins the same trace. Both need the
//! exporter: without it devicehub's spans have no trace ids to pass on.
//!
//! The exporter has its own filter (devicehub's spans at `info` and above),
//! so `DEVICEHUB_LOG=warn` quiets the log without emptying the traces.

use std::{
    collections::HashMap,
    io::IsTerminal,
    sync::atomic::{AtomicBool, Ordering},
};

use http::HeaderMap;
use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
    Resource,
};
use tracing::{Level, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    filter::Targets, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer,
};

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Whether spans are exported (and so carry trace context).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The filter when `DEVICEHUB_LOG` is not set.
const DEFAULT_LOG: &str = "info,rumqttd=off";

/// Which server calls' traces are kept (`--otlp-sampler`). By default
/// every call's: a caller whose `traceparent` says "not sampled" (flag 00)
/// does not hide its calls from devicehub's operators, whose traces are
/// theirs to keep; `parentbased_*` follows the caller's flag instead. Named
/// as OpenTelemetry's `OTEL_TRACES_SAMPLER` values, with the ratio (its
/// `OTEL_TRACES_SAMPLER_ARG`) after a colon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// The share of traces kept, by trace id: 1.0 keeps every one.
    pub ratio: f64,
    /// Whether a caller's sampled flag decides instead, when it sent one.
    pub follow_parent: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            ratio: 1.0,
            follow_parent: false,
        }
    }
}

impl std::str::FromStr for Sampling {
    type Err = String;

    /// `always_on`, `traceidratio:R`, `parentbased_always_on` or
    /// `parentbased_traceidratio:R`, with R from 0 to 1.
    fn from_str(text: &str) -> Result<Self, String> {
        let (follow_parent, rest) = match text.strip_prefix("parentbased_") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let ratio = match rest.split_once(':') {
            None if rest == "always_on" => 1.0,
            Some(("traceidratio", ratio)) => match ratio.parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => ratio,
                _ => return Err(format!("{ratio:?} is not a ratio from 0 to 1")),
            },
            _ => {
                return Err(format!(
                    "{text:?}: expected always_on, traceidratio:R, parentbased_always_on or parentbased_traceidratio:R"
                ))
            }
        };
        Ok(Self {
            ratio,
            follow_parent,
        })
    }
}

impl Sampling {
    fn sampler(self) -> Sampler {
        let own = match self.ratio >= 1.0 {
            true => Sampler::AlwaysOn,
            false => Sampler::TraceIdRatioBased(self.ratio),
        };
        match self.follow_parent {
            true => Sampler::ParentBased(Box::new(own)),
            false => own,
        }
    }
}

/// Why logging or tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--otlp-endpoint: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("--otlp-endpoint {0:?}: expected http://host:port (or https://)")]
    Endpoint(String),
    #[error("logging is already set up")]
    AlreadySet(#[from] tracing_subscriber::util::TryInitError),
}

/// What [`init`] set up; [`Telemetry::shutdown`] sends the spans still
/// buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter. Waits at most the
    /// exporter's timeout (10 s, `OTEL_EXPORTER_OTLP_TIMEOUT`).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "could not export the last spans");
            }
        }
    }
}

/// Installs the subscriber for the process. Call once, inside the tokio
/// runtime (the OTLP exporter's gRPC client needs it).
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    sampling: Sampling,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_env("DEVICEHUB_LOG").unwrap_or_else(|_| DEFAULT_LOG.into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).boxed(),
        // One object per line, the event's fields (message included) at the
        // top level next to timestamp, level and target, and the fields of
        // the span it happened in.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
    .with_filter(filter);

    let provider = otlp_endpoint
        .map(|endpoint| exporter(endpoint, sampling))
        .transpose()?;
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("devicehub"))
            .with_filter(Targets::new().with_target("devicehub", Level::INFO))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()?;
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

fn exporter(endpoint: &str, sampling: Sampling) -> Result<SdkTracerProvider, TelemetryError> {
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(TelemetryError::Endpoint(endpoint.to_owned()));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    // service.name "devicehub" unless OTEL_SERVICE_NAME or
    // OTEL_RESOURCE_ATTRIBUTES say otherwise.
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("devicehub");
    }
    Ok(SdkTracerProvider::builder()
        .with_sampler(sampling.sampler())
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The span `make` builds when spans are exported, else none: spans below a
/// call's (per command, per publish) exist for traces only, and cost a few
/// microseconds each that a log without them does not need.
pub fn traced(make: impl FnOnce() -> Span) -> Span {
    if EXPORTING.load(Ordering::Relaxed) {
        make()
    } else {
        Span::none()
    }
}

/// Makes `span` a child of the caller's span when the request carries a
/// valid W3C `traceparent` (and `tracestate`).
pub fn continue_trace(span: &Span, headers: &HeaderMap) {
    if !EXPORTING.load(Ordering::Relaxed) || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled (filtered out).
        let _ = span.set_parent(parent);
    }
}

/// The W3C `traceparent` of the current span, when spans are exported.
pub fn traceparent() -> Option<String> {
    if !EXPORTING.load(Ordering::Relaxed) {
        return None;
    }
    let context = Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_parse_like_otel_traces_sampler() {
        let parse = |text: &str| text.parse::<Sampling>();
        assert_eq!(parse("always_on"), Ok(Sampling::default()));
        assert_eq!(
            parse("parentbased_traceidratio:0.25"),
            Ok(Sampling {
                ratio: 0.25,
                follow_parent: true
            })
        );
        assert_eq!(
            parse("parentbased_always_on").map(|s| s.follow_parent),
            Ok(true)
        );
        assert!(parse("traceidratio:1.5").is_err());
        assert!(parse("always_off").is_err());
    }
}
