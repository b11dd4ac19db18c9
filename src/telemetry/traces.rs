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
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tracing::{Level, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    filter::Targets, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer,
};

use crate::cli::LogFormat;

/// Whether spans are exported (and so carry trace context).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The filter when `DEVICEHUB_LOG` is not set.
const DEFAULT_LOG: &str = "info,rumqttd=off";

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
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
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

    let provider = otlp_endpoint.map(exporter).transpose()?;
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

fn exporter(endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
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
