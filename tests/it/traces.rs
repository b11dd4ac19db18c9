//! `--otlp-endpoint`: the binary exports its spans over OTLP/gRPC to a real
//! receiver (the collector's `TraceService`, from the opentelemetry-proto
//! definitions) started here. A caller's `traceparent` becomes the parent
//! of the call's span, the MQTT publish and the reply wait are its
//! children, and the command envelope the device receives carries the
//! trace on.

use crate::common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::*;
use devicehub::proto::{
    device_hub_client::DeviceHubClient, SendCommandRequest, StreamCommandsRequest,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value::Value,
    trace::v1::{span::SpanKind, Span},
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

/// The receiver: every span exported to it, with its resource's service name.
struct Receiver(mpsc::UnboundedSender<(String, Span)>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    Some(match value.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        _ => return None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_with_their_parents() {
    // The receiver, on a free port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let (spans_tx, mut spans) = mpsc::unbounded_channel();
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(spans_tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mosquitto = Mosquitto::start();
    let url = mosquitto.url.to_string();
    let endpoint = format!("http://{otlp}");
    let (mut serve, mut log) = spawn_devicehub(
        &[
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--mqtt-url",
            &url,
            "--otlp-endpoint",
            &endpoint,
        ],
        // Export batches every 100 ms rather than every 5 s.
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let grpc = logged_addr(&mut log, "gRPC listening", "addr=").await;
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });

    // A device that answers, and remembers the envelopes it got.
    let (envelopes_tx, mut envelopes) = mpsc::unbounded_channel();
    let policy: ReplyPolicy = Arc::new(move |_device: &str, envelope: &serde_json::Value| {
        let _ = envelopes_tx.send(envelope.clone());
        Some((
            Duration::ZERO,
            json!({"id": envelope["id"], "status": "ok"}),
        ))
    });
    let _device = Responder::start(&mosquitto.url, "traced-device", policy).await;

    let mut client = eventually("a gRPC client", || {
        let url = format!("http://{grpc}");
        async move { DeviceHubClient::connect(url).await.ok() }
    })
    .await;
    eventually("the MQTT link up", || {
        let mut client = client.clone();
        async move {
            let request = SendCommandRequest {
                device_id: "warmup".into(),
                command: "PING".into(),
                ..Default::default()
            };
            client.send_command(request).await.ok()
        }
    })
    .await;
    let _ = within("the warm-up envelope", envelopes.recv()).await;

    // The caller's trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(SendCommandRequest {
        device_id: "fan-1".into(),
        command: "TURN_ON".into(),
        reply_timeout: Some(Duration::from_secs(5).try_into().unwrap()),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let response = client.send_command(request).await.unwrap().into_inner();
    assert!(response.reply.is_some());
    let envelope = within("the device's envelope", envelopes.recv())
        .await
        .unwrap();

    // One command on a traced StreamCommands stream.
    let stream_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(tokio_stream::iter([StreamCommandsRequest {
        request_id: 7,
        command: Some(SendCommandRequest {
            device_id: "fan-2".into(),
            command: "TURN_ON".into(),
            reply_timeout: Some(Duration::from_secs(5).try_into().unwrap()),
            ..Default::default()
        }),
    }]));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{stream_trace}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    let outcomes: Vec<_> = client
        .stream_commands(request)
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert!(outcomes[0].as_ref().unwrap().response.is_some());
    let stream_envelope = within("the streamed command's envelope", envelopes.recv())
        .await
        .unwrap();

    // Every span of both traces, as exported.
    let mut seen: HashMap<String, (String, Span)> = HashMap::new();
    let wanted = |seen: &HashMap<String, (String, Span)>| {
        let count = |trace: &str, name: &str| {
            seen.values()
                .filter(|(_, s)| hex(&s.trace_id) == trace && s.name == name)
                .count()
        };
        count(trace_id, "devicehub.v1.DeviceHub/SendCommand") == 1
            && count(trace_id, "mqtt publish") == 1
            && count(trace_id, "reply wait") == 1
            && count(stream_trace, "devicehub.v1.DeviceHub/StreamCommands") == 1
            && count(stream_trace, "command") == 1
            && count(stream_trace, "reply wait") == 1
    };
    while !wanted(&seen) {
        let (service, span) = within("the exported spans", spans.recv()).await.unwrap();
        seen.insert(hex(&span.span_id), (service, span));
    }
    let find = |trace: &str, name: &str| {
        seen.values()
            .map(|(service, span)| (service, span))
            .find(|(_, s)| hex(&s.trace_id) == trace && s.name == name)
            .unwrap()
    };

    // SendCommand: the caller's span → the call → publish and reply wait.
    let (service, call) = find(trace_id, "devicehub.v1.DeviceHub/SendCommand");
    assert_eq!(service, "devicehub");
    assert_eq!(hex(&call.parent_span_id), caller_span);
    assert_eq!(call.kind, SpanKind::Server as i32);
    assert_eq!(attribute(call, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        attribute(call, "rpc.method").as_deref(),
        Some("SendCommand")
    );
    assert_eq!(
        attribute(call, "rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    assert!(attribute(call, "peer").unwrap().starts_with("127.0.0.1:"));
    let call_id = hex(&call.span_id);
    let (_, publish) = find(trace_id, "mqtt publish");
    assert_eq!(hex(&publish.parent_span_id), call_id);
    assert_eq!(publish.kind, SpanKind::Producer as i32);
    assert_eq!(
        attribute(publish, "messaging.destination.name").as_deref(),
        Some("devices/fan-1/commands")
    );
    assert_eq!(
        attribute(publish, "messaging.message.id").as_deref(),
        Some(response.command_id.as_str())
    );
    let (_, wait) = find(trace_id, "reply wait");
    assert_eq!(hex(&wait.parent_span_id), call_id);
    assert!(wait.start_time_unix_nano >= publish.start_time_unix_nano);
    assert!(call.end_time_unix_nano >= wait.end_time_unix_nano);
    // The device receives the trace: same trace, the call as parent.
    assert_eq!(
        envelope["traceparent"],
        format!("00-{trace_id}-{call_id}-01"),
        "{envelope}"
    );

    // StreamCommands: the stream's call → one span per command → its wait.
    let (_, stream) = find(stream_trace, "devicehub.v1.DeviceHub/StreamCommands");
    assert_eq!(hex(&stream.parent_span_id), "b7ad6b7169203331");
    let (_, command) = find(stream_trace, "command");
    assert_eq!(command.parent_span_id, stream.span_id);
    assert_eq!(attribute(command, "request_id").as_deref(), Some("7"));
    let (_, wait) = find(stream_trace, "reply wait");
    assert_eq!(wait.parent_span_id, command.span_id);
    assert_eq!(
        stream_envelope["traceparent"],
        format!("00-{stream_trace}-{}-01", hex(&command.span_id)),
        "{stream_envelope}"
    );

    let _ = serve.start_kill();
    let _ = serve.wait().await;
    receiver.abort();
}

/// An OTLP receiver on a free port: its address, and the spans it gets.
fn otlp_receiver() -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<(String, Span)>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let otlp = listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let (spans_tx, spans) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(spans_tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (otlp, spans)
}

/// Calls ListDevices with the caller's `traceparent` for `trace_id`,
/// sampled or not.
async fn list_devices_traced(
    client: &mut DeviceHubClient<tonic::transport::Channel>,
    trace_id: &str,
    sampled: bool,
) {
    let mut request = tonic::Request::new(devicehub::proto::ListDevicesRequest::default());
    let flags = if sampled { "01" } else { "00" };
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-{flags}")
            .parse()
            .unwrap(),
    );
    client.list_devices(request).await.unwrap();
}

/// Waits for a span named `name`, collecting every span up to it.
async fn spans_until(
    spans: &mut mpsc::UnboundedReceiver<(String, Span)>,
    name: &str,
    trace_id: Option<&str>,
) -> Vec<Span> {
    let mut seen = Vec::new();
    loop {
        let (_, span) = within(&format!("a span named {name}"), spans.recv())
            .await
            .unwrap();
        let found = span.name == name && trace_id.is_none_or(|t| hex(&span.trace_id) == t);
        seen.push(span);
        if found {
            return seen;
        }
    }
}

/// By default a caller's "not sampled" flag does not hide its calls from
/// devicehub's traces (`--otlp-sampler always_on`); `parentbased_always_on`
/// follows it. A call to an unknown method gets one fixed span name, and
/// its path, truncated, as a field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_callers_are_traced_unless_told_and_unknown_methods_share_one_span_name() {
    const UNSAMPLED: &str = "11111111111111111111111111111111";
    const SAMPLED: &str = "22222222222222222222222222222222";
    const LIST: &str = "devicehub.v1.DeviceHub/ListDevices";
    for sampler in ["always_on", "parentbased_always_on"] {
        let (otlp, mut spans) = otlp_receiver();
        let endpoint = format!("http://{otlp}");
        let (mut serve, mut log) = spawn_devicehub(
            &[
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--embedded-mqtt-addr",
                "127.0.0.1:0",
                "--otlp-endpoint",
                &endpoint,
                "--otlp-sampler",
                sampler,
            ],
            &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
        );
        let grpc = logged_addr(&mut log, "gRPC listening", "addr=").await;
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = log.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let channel = eventually("a gRPC channel", || {
            let url = format!("http://{grpc}");
            async move {
                tonic::transport::Channel::from_shared(url)
                    .unwrap()
                    .connect()
                    .await
                    .ok()
            }
        })
        .await;
        let mut client = DeviceHubClient::new(channel.clone());
        list_devices_traced(&mut client, UNSAMPLED, false).await;
        list_devices_traced(&mut client, SAMPLED, true).await;
        let seen = spans_until(&mut spans, LIST, Some(SAMPLED)).await;
        let unsampled_seen = || seen.iter().any(|s| hex(&s.trace_id) == UNSAMPLED);
        match sampler {
            "always_on" => {
                if !unsampled_seen() {
                    spans_until(&mut spans, LIST, Some(UNSAMPLED)).await;
                }
            }
            _ => assert!(!unsampled_seen(), "the caller's flag was followed"),
        }
        if sampler == "always_on" {
            // Methods nobody serves, with long paths, 50 times.
            let mut grpc_client = tonic::client::Grpc::new(channel);
            for i in 0..50 {
                let path = format!("/{}{i}/Nope", "x".repeat(4000));
                grpc_client.ready().await.unwrap();
                let status = grpc_client
                    .unary::<(), (), _>(
                        tonic::Request::new(()),
                        http::uri::PathAndQuery::try_from(path).unwrap(),
                        tonic_prost::ProstCodec::default(),
                    )
                    .await
                    .unwrap_err();
                assert_eq!(status.code(), tonic::Code::Unimplemented);
            }
            let seen = spans_until(&mut spans, "unknown", None).await;
            let span = seen.last().unwrap();
            let logged = attribute(span, "path").expect("the path, as a field");
            assert!(logged.len() < 200 && logged.starts_with("/xxx"), "{logged}");
            // Their end lines are rate-limited, and none holds a whole path.
            let failed = || {
                let lines = lines.lock().unwrap();
                lines.iter().filter(|l| l.contains("call failed")).count()
            };
            eventually("a call failed line", || async {
                (failed() > 0).then_some(())
            })
            .await;
            assert!(failed() <= 2, "{} lines", failed());
            let lines = lines.lock().unwrap();
            assert!(lines.iter().all(|l| l.len() < 2000), "a long line");
        }
        terminate(&mut serve).await;
    }
}
