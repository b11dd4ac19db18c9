//! The `grpc_server_*` metrics of the grpc-ecosystem convention, and the
//! label values they take (a method's streaming kind, status codes).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use tonic::Code;

/// How a method streams, as the `grpc_type` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Unary,
    ClientStream,
    ServerStream,
    BidiStream,
}

impl Kind {
    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ClientStream => "client_stream",
            Kind::ServerStream => "server_stream",
            Kind::BidiStream => "bidi_stream",
        }
    }
}

/// Every status code, in the order of their numbers.
pub(super) const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The label value of a code, as grpc-go spells it.
pub(super) fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The codes that say the server failed rather than the request (the ones
/// gRPC's HTTP mapping turns into 5xx).
pub(super) fn server_failed(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::Internal
            | Code::Unimplemented
            | Code::Unavailable
            | Code::DeadlineExceeded
            | Code::DataLoss
    )
}

/// The `grpc_server_*` metrics, registered in the `/metrics` registry.
pub struct GrpcMetrics {
    pub(super) started: IntCounterVec,
    pub(super) handled: IntCounterVec,
    pub(super) handling: prometheus::HistogramVec,
    pub(super) sent: IntCounterVec,
    pub(super) received: IntCounterVec,
}

impl GrpcMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        const LABELS: [&str; 3] = ["grpc_type", "grpc_service", "grpc_method"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok::<_, prometheus::Error>(vec)
        };
        let handling = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "grpc_server_handling_seconds",
                "Time from the start of a call to its status, streams included.",
            ),
            &LABELS,
        )?;
        registry.register(Box::new(handling.clone()))?;
        Ok(Self {
            started: counter("grpc_server_started_total", "Calls started.", &LABELS)?,
            handled: counter(
                "grpc_server_handled_total",
                "Calls ended, by status code.",
                &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            )?,
            handling,
            sent: counter(
                "grpc_server_msg_sent_total",
                "Response messages sent.",
                &LABELS,
            )?,
            received: counter(
                "grpc_server_msg_received_total",
                "Request messages received.",
                &LABELS,
            )?,
        })
    }
}

/// One method's metrics with their labels already resolved, so a call
/// never looks a label set up.
pub(super) struct MethodMetrics {
    pub(super) started: IntCounter,
    pub(super) handled: Vec<IntCounter>,
    pub(super) handling: Histogram,
    pub(super) sent: IntCounter,
    pub(super) received: IntCounter,
}
