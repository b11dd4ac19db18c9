//! SendCommand and StreamCommands: a command validated, published through the
//! shared MQTT client, acknowledged by the broker and, when asked, answered
//! by the device.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rumqttc::QoS;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::{debug, info_span, Instrument};
use uuid::Uuid;

use super::{
    auth::Caller,
    convert::{
        device_id_field, envelope, reply_timeout, reply_to_proto, state_to_proto, struct_to_json,
        ttl,
    },
    error::ApiError,
    wire, Shared,
};
use crate::telemetry::traces::{traced, traceparent};
use crate::{
    commands::{CommandState, NewCommand, Publication},
    proto::{
        self, send_command_request::Payload, SendCommandRequest, SendCommandResponse,
        StreamCommandsRequest, StreamCommandsResponse,
    },
};

/// Largest command payload (envelope or raw), in bytes.
const MAX_COMMAND_PAYLOAD_BYTES: usize = 256 << 10;
/// Longest command name, in bytes.
const MAX_COMMAND_BYTES: usize = 256;
/// How long a command sent without a `reply_timeout` stays valid for its
/// device (the envelope's `expires_at`): long enough for a reconnect, short
/// enough that a device back from a long absence does not act on orders
/// nobody remembers giving.
pub(super) const COMMAND_EXPIRY: Duration = Duration::from_secs(60);
/// Commands in flight per StreamCommands stream.
pub const MAX_COMMANDS_IN_FLIGHT: usize = 256;

/// A validated command, ready to publish.
struct Command {
    id: Uuid,
    device_id: String,
    name: String,
    params: Option<serde_json::Map<String, serde_json::Value>>,
    topic: String,
    payload: Bytes,
    qos: QoS,
    reply_timeout: Option<Duration>,
    /// Set for a persistent command: when its `ttl` ends.
    expires_at: Option<SystemTime>,
    created_at: SystemTime,
}

/// Serves one SendCommand call (or one command of a StreamCommands stream).
pub(super) async fn send(
    shared: &Shared,
    caller: &Caller,
    req: SendCommandRequest,
) -> Result<SendCommandResponse, ApiError> {
    // The envelope carries the trace context of this call (or, in a
    // StreamCommands stream, of this command's span).
    let command = validate(shared, req, traceparent())?;
    caller.may_send(&command.device_id)?;
    // Held until the command is done: acknowledged, answered or given up.
    let _permit = shared
        .commands_per_client
        .acquire(caller.client.clone())
        .ok_or_else(|| {
            ApiError::TooManyForClient(format!(
                "this client already has its maximum of {} commands in progress (--max-commands-per-client)",
                shared.commands_per_client.max()
            ))
        })?;
    if command.expires_at.is_some() {
        return send_persistent(shared, command).await;
    }
    let command_id = command.id.to_string();
    // Registered before publishing: a device may answer before the
    // broker's acknowledgement reaches us.
    let mut pending = command
        .reply_timeout
        .map(|_| shared.replies.register(&command.device_id, &command_id))
        .transpose()?;

    shared
        .publisher
        .publish(command.topic.clone(), command.payload, command.qos)
        .instrument(traced(|| {
            info_span!(
                "mqtt publish",
                otel.kind = "producer",
                messaging.system = "mqtt",
                messaging.destination.name = command.topic,
                messaging.message.id = command_id,
            )
        }))
        .await?;
    // At debug: a StreamCommands stream sends thousands a second, and a
    // line each cost 17 % of the command rate (BENCHMARKS.md, issue 16).
    // Each SendCommand call still logs its own line (telemetry/calls/).
    debug!(
        command_id,
        device_id = command.device_id,
        command = command.name,
        topic = command.topic,
        qos = ?command.qos,
        "command published"
    );

    let mut response = SendCommandResponse {
        command_id,
        topic: command.topic,
        reply: None,
        device_status: wire::device_status(shared.hub.device_status(&command.device_id)) as i32,
        state: proto::CommandState::Sent as i32,
    };
    let (Some(timeout), Some(pending)) = (command.reply_timeout, pending.as_mut()) else {
        return Ok(response);
    };
    // The call's own deadline (grpc-timeout) is enforced by tonic, which
    // drops this future; dropping `pending` unregisters the wait.
    let wait = tokio::time::timeout(timeout, pending.wait());
    match wait
        .instrument(traced(|| {
            info_span!(
                "reply wait",
                command_id = response.command_id,
                timeout_ms = timeout.as_millis() as u64
            )
        }))
        .await
    {
        Ok(Some(reply)) => {
            response.state = match reply.ok {
                true => proto::CommandState::Succeeded,
                false => proto::CommandState::Failed,
            } as i32;
            response.reply = Some(reply_to_proto(reply));
            Ok(response)
        }
        Ok(None) => Err(ApiError::Internal("reply waiter dropped".into())),
        Err(_) => Err(ApiError::NoReply {
            device_id: command.device_id,
            command_id: response.command_id,
            timeout,
        }),
    }
}

/// Checks every field of a SendCommand request and builds what is published.
fn validate(
    shared: &Shared,
    req: SendCommandRequest,
    traceparent: Option<String>,
) -> Result<Command, ApiError> {
    let device_id = device_id_field(&req.device_id)?;
    if let Some(fixed) = shared.commands_topic.fixed_device_id() {
        if device_id != fixed {
            return Err(ApiError::invalid(
                "device_id",
                format!(
                    "the command topic {} serves only device {fixed:?}",
                    shared.commands_topic
                ),
            ));
        }
    }
    if req.command.is_empty() {
        return Err(ApiError::invalid("command", "must not be empty"));
    }
    if req.command.len() > MAX_COMMAND_BYTES {
        return Err(ApiError::invalid(
            "command",
            format!(
                "is {} bytes long; the limit is {MAX_COMMAND_BYTES}",
                req.command.len()
            ),
        ));
    }
    let qos = match req.qos.unwrap_or(1) {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        other => {
            return Err(ApiError::invalid(
                "qos",
                format!("must be 0, 1 or 2, not {other}"),
            ))
        }
    };

    let id = Uuid::now_v7();
    let reply_timeout = req.reply_timeout.map(reply_timeout).transpose()?;
    let ttl = req.ttl.map(ttl).transpose()?;
    let created_at = SystemTime::now();
    // Nobody waits for it after the reply timeout: carried out later, it
    // would be done while its caller was told it timed out. A persistent
    // command lasts its ttl.
    let expires_at = created_at + ttl.or(reply_timeout).unwrap_or(COMMAND_EXPIRY);
    let envelope_id = id.to_string();
    let (payload, field, params) = match req.payload {
        Some(Payload::RawPayload(raw)) => (raw, "raw_payload", None),
        Some(Payload::Params(params)) => {
            let params =
                struct_to_json(&params).map_err(|reason| ApiError::invalid("params", reason))?;
            (
                envelope(
                    &envelope_id,
                    &req.command,
                    Some(params.clone()),
                    traceparent,
                    expires_at,
                )?,
                "params",
                Some(params),
            )
        }
        None => (
            envelope(&envelope_id, &req.command, None, traceparent, expires_at)?,
            "command",
            None,
        ),
    };
    if payload.len() > MAX_COMMAND_PAYLOAD_BYTES {
        return Err(ApiError::invalid(
            field,
            format!(
                "the published payload would be {} bytes; the limit is {MAX_COMMAND_PAYLOAD_BYTES}",
                payload.len()
            ),
        ));
    }
    Ok(Command {
        topic: shared.commands_topic.topic_for(&device_id),
        reply_timeout,
        id,
        device_id,
        name: req.command,
        params,
        payload,
        qos,
        expires_at: ttl.map(|_| expires_at),
        created_at,
    })
}

/// A persistent command: kept, published when its device can take it, and
/// with a `reply_timeout` waited for until it ends (bounded by both).
async fn send_persistent(
    shared: &Shared,
    command: Command,
) -> Result<SendCommandResponse, ApiError> {
    let expires_at = command.expires_at.unwrap_or(command.created_at);
    // Subscribed before it is accepted: the reply may come at once.
    let mut changes = command.reply_timeout.map(|_| shared.commands.subscribe());
    let accepted = shared
        .commands
        .submit(NewCommand {
            id: command.id,
            device_id: command.device_id.clone(),
            name: command.name,
            params: command.params,
            create_time: command.created_at,
            expire_time: expires_at,
            publish: Publication {
                topic: command.topic.clone(),
                payload: command.payload,
                qos: command.qos as u8,
            },
        })
        .await?;
    debug!(command_id = %accepted.id, device_id = accepted.device_id, state = accepted.state.name(), "persistent command accepted");
    let mut response = SendCommandResponse {
        command_id: accepted.id.to_string(),
        topic: command.topic,
        reply: None,
        device_status: wire::device_status(shared.hub.device_status(&command.device_id)) as i32,
        state: state_to_proto(accepted.state) as i32,
    };
    let (Some(timeout), Some(changes)) = (command.reply_timeout, changes.as_mut()) else {
        return Ok(response);
    };
    let until = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .min(timeout);
    let ended = tokio::time::timeout(until, ended(shared, changes, accepted.id)).await;
    match ended {
        Ok(Ok(ended)) if ended.reply.is_some() || ended.state != CommandState::Expired => {
            response.state = state_to_proto(ended.state) as i32;
            response.reply = ended.reply.map(reply_to_proto);
            Ok(response)
        }
        Ok(Err(error)) => Err(error),
        _ => Err(ApiError::NoReply {
            device_id: command.device_id,
            command_id: response.command_id,
            timeout: until,
        }),
    }
}

/// Waits for command `id` to end, following `changes` (and asking the log
/// when it fell behind them).
async fn ended(
    shared: &Shared,
    changes: &mut broadcast::Receiver<crate::commands::Command>,
    id: Uuid,
) -> Result<crate::commands::Command, ApiError> {
    // It may have ended before the call got here.
    let current = shared.commands.get(id).await?;
    if current.state.ended() {
        return Ok(current);
    }
    loop {
        match changes.recv().await {
            Ok(change) if change.id == id && change.state.ended() => return Ok(change),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let current = shared.commands.get(id).await?;
                if current.state.ended() {
                    return Ok(current);
                }
            }
            Err(broadcast::error::RecvError::Closed) => {
                return Err(ApiError::CommandsShutDown);
            }
        }
    }
}

/// Starts serving one StreamCommands call; see [`serve_stream`].
pub(super) fn stream(
    shared: Arc<Shared>,
    caller: Caller,
    requests: Streaming<StreamCommandsRequest>,
) -> ReceiverStream<Result<StreamCommandsResponse, Status>> {
    let (tx, rx) = mpsc::channel(MAX_COMMANDS_IN_FLIGHT);
    tokio::spawn(serve_stream(shared, Arc::new(caller), requests, tx).in_current_span());
    ReceiverStream::new(rx)
}

/// The task behind a StreamCommands stream: reads requests while fewer than
/// [`MAX_COMMANDS_IN_FLIGHT`] are in flight, runs them concurrently as
/// SendCommand, and sends each outcome as it completes.
async fn serve_stream(
    shared: Arc<Shared>,
    caller: Arc<Caller>,
    mut requests: Streaming<StreamCommandsRequest>,
    tx: mpsc::Sender<Result<StreamCommandsResponse, Status>>,
) {
    let mut in_flight = FuturesUnordered::new();
    let mut request_ids = HashSet::new();
    let mut reading = true;
    while reading || !in_flight.is_empty() {
        let response = tokio::select! {
            // Outcomes first: they make room for more requests.
            biased;
            Some(response) = in_flight.next() => {
                let response: StreamCommandsResponse = response;
                request_ids.remove(&response.request_id);
                response
            }
            request = requests.message(),
                if reading && in_flight.len() < MAX_COMMANDS_IN_FLIGHT =>
            {
                let request = match request {
                    Ok(Some(request)) => request,
                    Ok(None) => {
                        reading = false;
                        continue;
                    }
                    // The client's side broke (or sent an oversized
                    // message): report it and abandon the stream.
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let id = request.request_id;
                let error = match request.command {
                    None => ApiError::invalid("command", "is required"),
                    Some(_) if request_ids.contains(&id) => ApiError::invalid(
                        "request_id",
                        format!("{id} is already in flight on this stream"),
                    ),
                    Some(command) => {
                        request_ids.insert(id);
                        let (shared, caller) = (shared.clone(), caller.clone());
                        in_flight.push(
                            async move {
                                command_response(id, send(&shared, &caller, command).await)
                            }
                            .instrument(traced(|| info_span!("command", request_id = id))),
                        );
                        continue;
                    }
                };
                command_response(id, Err(error))
            }
            _ = tx.closed() => return, // the client went away
            _ = shared.shutdown.cancelled() => {
                let _ = tx.send(Err(ApiError::CommandsShutDown.into())).await;
                return;
            }
        };
        if tx.send(Ok(response)).await.is_err() {
            return;
        }
    }
}

/// A StreamCommands response: the outcome SendCommand would have returned,
/// its status turned into a code and message in the one usual place.
fn command_response(
    request_id: u64,
    outcome: Result<SendCommandResponse, ApiError>,
) -> StreamCommandsResponse {
    match outcome {
        Ok(response) => StreamCommandsResponse {
            request_id,
            response: Some(response),
            ..Default::default()
        },
        Err(error) => {
            let status = Status::from(error);
            StreamCommandsResponse {
                request_id,
                status_code: status.code() as i32,
                status_message: status.message().to_owned(),
                response: None,
            }
        }
    }
}
