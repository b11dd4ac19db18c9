//! The gRPC side: the `DeviceHub` service, request validation, conversions
//! between buffer readings and proto messages, page tokens, and the one place
//! where errors become a [`Status`] ([`ApiError`] → `Status`).

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::SystemTime,
};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use prost_types::{value::Kind, ListValue, Struct, Timestamp, Value};
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{error, info, warn};
use uuid::Uuid;

mod encoded;
mod wire;

use encoded::EncodedReadings;
pub use wire::Encoded;

/// What the server sends for WatchReadings and ListReadings: the messages,
/// encoded from readings without building them (see build.rs).
pub type EncodedWatchReadingsResponse = Encoded<proto::WatchReadingsResponse>;
pub type EncodedListReadingsResponse = Encoded<proto::ListReadingsResponse>;

use crate::{
    buffer::{CursorError, ListQuery, ReadingFilter},
    hub::{ReadingHub, SubscribeError},
    mqtt::{CommandPublisher, MqttConfig, PublishError},
    proto::{
        self, device_hub_server::DeviceHub, send_command_request, watch_readings_response,
        GapPolicy, ListReadingsRequest, SendCommandRequest, SendCommandResponse,
        StreamCommandsRequest, StreamCommandsResponse, WatchReadingsRequest,
    },
    replies::{DeviceReply, ReplyRouter, TooManyPending},
    shutdown::Shutdown,
    topic::{literal_level, validate_device_id, validate_topic_filter, TopicTemplate},
};

/// Page size when the request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size accepted.
pub const MAX_PAGE_SIZE: usize = 1000;
/// A page stops growing at about this many encoded bytes, so it stays under
/// gRPC's usual 4 MiB message limit on the client; at least one reading is
/// always returned.
const MAX_PAGE_BYTES: usize = 3 << 20;
/// Largest command payload (envelope or raw), in bytes.
pub const MAX_COMMAND_PAYLOAD_BYTES: usize = 256 << 10;
/// Longest command name, in bytes.
pub const MAX_COMMAND_BYTES: usize = 256;
/// Longest `reply_timeout` accepted.
pub const MAX_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// `ListReadingsResponse.next_page_token`.
const NEXT_PAGE_TOKEN_FIELD: u32 = 2;
/// Commands in flight per StreamCommands stream.
pub const MAX_COMMANDS_IN_FLIGHT: usize = 256;
/// Batches (of up to a few hundred readings) queued per watch stream between
/// its producer and tonic.
const WATCH_QUEUE_BATCHES: usize = 2;

/// Everything a call can fail with. Turned into a [`Status`] in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{0}")]
    Publish(#[from] PublishError),
    #[error("page_token: the readings it points at (sequence numbers {missed_from} to {missed_to}) have been evicted from the buffer; list again without a page_token")]
    PageEvicted { missed_from: u64, missed_to: u64 },
    #[error("this watcher fell behind: readings with sequence numbers {missed_from} to {missed_to} were evicted from the buffer before they were sent; the last sequence number sent is {last_sent}")]
    WatcherFellBehind {
        missed_from: u64,
        missed_to: u64,
        last_sent: u64,
    },
    #[error("after_seq: readings after sequence number {after_seq} are no longer buffered; the oldest buffered is {oldest} (set gap_policy GAP_POLICY_NOTIFY to continue from there)")]
    CursorTooOld { after_seq: u64, oldest: u64 },
    #[error("the service already serves its maximum of {0} watchers")]
    TooManyWatchers(usize),
    #[error("the service is shutting down; resume after sequence number {resume_after}")]
    ShuttingDown { resume_after: u64 },
    #[error("the service is shutting down; commands without a response may or may not have been published")]
    CommandsShutDown,
    #[error(transparent)]
    TooManyPending(#[from] TooManyPending),
    #[error("device {device_id:?} did not reply to command {command_id} within {timeout:?}")]
    NoReply {
        device_id: String,
        command_id: String,
        timeout: std::time::Duration,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let message = error.to_string();
        match error {
            ApiError::InvalidArgument { .. } => Status::invalid_argument(message),
            ApiError::Publish(PublishError::QueueFull) => Status::resource_exhausted(message),
            ApiError::Publish(_) => Status::unavailable(message),
            ApiError::PageEvicted { .. } => Status::out_of_range(message),
            ApiError::WatcherFellBehind { .. } => Status::data_loss(message),
            ApiError::CursorTooOld { .. } => Status::out_of_range(message),
            ApiError::TooManyWatchers(_) | ApiError::TooManyPending(_) => {
                Status::resource_exhausted(message)
            }
            ApiError::NoReply { .. } => Status::deadline_exceeded(message),
            ApiError::ShuttingDown { .. } | ApiError::CommandsShutDown => {
                Status::unavailable(message)
            }
            ApiError::Internal(_) => {
                // Details go to the log, never to the client.
                error!(%message, "internal error");
                Status::internal("internal error; see the service log")
            }
        }
    }
}

/// The `DeviceHub` service. Cheap to clone: StreamCommands shares it with
/// the task that serves a stream.
#[derive(Clone)]
pub struct DeviceHubService {
    hub: Arc<ReadingHub>,
    publisher: CommandPublisher,
    replies: Arc<ReplyRouter>,
    commands_topic: TopicTemplate,
    /// The topic level that holds the device id in every subscribed topic
    /// (readings and replies), if there is one.
    device_level: Option<usize>,
    /// The newest readings' WatchReadings messages, shared by all streams.
    encoded: Arc<EncodedReadings>,
    shutdown: Shutdown,
}

impl DeviceHubService {
    pub fn new(
        hub: Arc<ReadingHub>,
        publisher: CommandPublisher,
        replies: Arc<ReplyRouter>,
        topics: &MqttConfig,
        shutdown: Shutdown,
    ) -> Self {
        let device_level = match (
            topics.readings_topic.placeholder_level(),
            topics.replies_topic.placeholder_level(),
        ) {
            (Some(readings), Some(replies)) if readings == replies => Some(readings),
            _ => None,
        };
        Self {
            hub,
            publisher,
            replies,
            commands_topic: topics.commands_topic.clone(),
            device_level,
            encoded: Arc::default(),
            shutdown,
        }
    }

    async fn send_command(&self, req: SendCommandRequest) -> Result<SendCommandResponse, ApiError> {
        validate_device_id(&req.device_id)
            .map_err(|e| ApiError::invalid("device_id", e.to_string()))?;
        if let Some(fixed) = self.commands_topic.fixed_device_id() {
            if req.device_id != fixed {
                return Err(ApiError::invalid(
                    "device_id",
                    format!(
                        "the command topic {} serves only device {fixed:?}",
                        self.commands_topic
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

        let command_id = Uuid::now_v7().to_string();
        let (payload, field) = match req.payload {
            Some(send_command_request::Payload::RawPayload(raw)) => (raw, "raw_payload"),
            Some(send_command_request::Payload::Params(params)) => {
                let params = struct_to_json(&params)
                    .map_err(|reason| ApiError::invalid("params", reason))?;
                (envelope(&command_id, &req.command, Some(params))?, "params")
            }
            None => (envelope(&command_id, &req.command, None)?, "command"),
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

        let reply_timeout = req.reply_timeout.map(reply_timeout).transpose()?;
        // Registered before publishing: a device may answer before the
        // broker's acknowledgement reaches us.
        let mut pending = reply_timeout
            .map(|_| self.replies.expect(&req.device_id, &command_id))
            .transpose()?;

        let topic = self.commands_topic.topic_for(&req.device_id);
        self.publisher.publish(topic.clone(), payload, qos).await?;
        info!(
            command_id,
            device_id = req.device_id,
            command = req.command,
            topic,
            ?qos,
            "command published"
        );

        let (Some(timeout), Some(pending)) = (reply_timeout, pending.as_mut()) else {
            return Ok(SendCommandResponse {
                command_id,
                topic,
                reply: None,
            });
        };
        // The call's own deadline (grpc-timeout) is enforced by tonic, which
        // drops this future; dropping `pending` unregisters the wait.
        match tokio::time::timeout(timeout, pending.wait()).await {
            Ok(Some(reply)) => Ok(SendCommandResponse {
                command_id,
                topic,
                reply: Some(reply_to_proto(reply)),
            }),
            Ok(None) => Err(ApiError::Internal("reply waiter dropped".into())),
            Err(_) => Err(ApiError::NoReply {
                device_id: req.device_id,
                command_id,
                timeout,
            }),
        }
    }

    /// The buffer filter for a request's `device_id` and `topic_filter`.
    ///
    /// A topic filter that names one device at the level where every
    /// subscribed topic carries the device id (`devices/d7/#`) also selects
    /// by device, so the buffer uses its device index instead of a scan; the
    /// result is the same.
    fn reading_filter(
        &self,
        device_id: &str,
        topic_filter: &str,
    ) -> Result<ReadingFilter, ApiError> {
        let device_id = match device_id {
            "" => None,
            id => {
                validate_device_id(id)
                    .map_err(|e| ApiError::invalid("device_id", e.to_string()))?;
                Some(id.to_owned())
            }
        };
        let topic_filter = match topic_filter {
            "" => None,
            filter => {
                validate_topic_filter(filter)
                    .map_err(|e| ApiError::invalid("topic_filter", e.to_string()))?;
                Some(filter.to_owned())
            }
        };
        let device_id = device_id.or_else(|| {
            let device = literal_level(topic_filter.as_deref()?, self.device_level?)?;
            validate_device_id(device)
                .is_ok()
                .then(|| device.to_owned())
        });
        Ok(ReadingFilter {
            device_id,
            topic_filter,
        })
    }

    fn list_readings(
        &self,
        req: ListReadingsRequest,
    ) -> Result<EncodedListReadingsResponse, ApiError> {
        let filter = self.reading_filter(&req.device_id, &req.topic_filter)?;
        let start = optional_time("start_time", req.start_time)?;
        let end = optional_time("end_time", req.end_time)?;
        if let (Some(start), Some(end)) = (start, end) {
            if start >= end {
                return Err(ApiError::invalid(
                    "end_time",
                    "must be later than start_time",
                ));
            }
        }
        let limit = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => return Err(ApiError::invalid("page_size", "must not be negative")),
            n if n as usize > MAX_PAGE_SIZE => {
                return Err(ApiError::invalid(
                    "page_size",
                    format!("is {n}; the maximum is {MAX_PAGE_SIZE}"),
                ))
            }
            n => n as usize,
        };
        let query_hash = page_token::query_hash(&req);
        let cursor = match req.page_token.as_str() {
            "" => None,
            token => Some(page_token::decode(token, query_hash)?),
        };

        let query = ListQuery {
            filter,
            start,
            end,
            limit,
            cursor,
            oldest_first: req.oldest_first,
        };
        let page = self.hub.list(&query).map_err(|e| match e {
            CursorError::Evicted {
                missed_from,
                missed_to,
            } => ApiError::PageEvicted {
                missed_from,
                missed_to,
            },
            CursorError::Future(_) => {
                ApiError::invalid("page_token", "was not issued by this service")
            }
        })?;

        // Keep the response under the client's message size limit; at least
        // one reading is always sent.
        let encoded = self.encoded.encode(&page.readings);
        let mut bytes = 0;
        let fits = encoded
            .iter()
            .position(|e| {
                bytes += e.len();
                bytes > MAX_PAGE_BYTES
            })
            .filter(|&i| i > 0)
            .unwrap_or(encoded.len());
        let next_cursor = page.readings.get(fits).map(|r| r.seq).or(page.next_cursor);
        let mut response = Vec::with_capacity(bytes.min(MAX_PAGE_BYTES) + 64);
        for reading in &encoded[..fits] {
            response.extend_from_slice(reading);
        }
        if let Some(cursor) = next_cursor {
            let token = page_token::encode(cursor, query_hash);
            wire::put_str(NEXT_PAGE_TOKEN_FIELD, &token, &mut response);
        }
        Ok(Encoded::from_bytes(response.into()))
    }
}

#[tonic::async_trait]
impl DeviceHub for DeviceHubService {
    async fn send_command(
        &self,
        request: Request<SendCommandRequest>,
    ) -> Result<Response<SendCommandResponse>, Status> {
        Ok(Response::new(
            self.send_command(request.into_inner()).await?,
        ))
    }

    async fn list_readings(
        &self,
        request: Request<ListReadingsRequest>,
    ) -> Result<Response<EncodedListReadingsResponse>, Status> {
        Ok(Response::new(self.list_readings(request.into_inner())?))
    }

    type WatchReadingsStream = WatchStream;

    type StreamCommandsStream = ReceiverStream<Result<StreamCommandsResponse, Status>>;

    async fn stream_commands(
        &self,
        request: Request<Streaming<StreamCommandsRequest>>,
    ) -> Result<Response<Self::StreamCommandsStream>, Status> {
        Ok(Response::new(self.stream_commands(request.into_inner())))
    }

    async fn watch_readings(
        &self,
        request: Request<WatchReadingsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        Ok(Response::new(self.watch_readings(request.into_inner())?))
    }
}

impl DeviceHubService {
    /// Serves a StreamCommands stream from a task of its own: reads requests
    /// while fewer than [`MAX_COMMANDS_IN_FLIGHT`] are in flight, runs them
    /// concurrently as SendCommand, and sends each outcome as it completes.
    fn stream_commands(
        &self,
        mut requests: Streaming<StreamCommandsRequest>,
    ) -> ReceiverStream<Result<StreamCommandsResponse, Status>> {
        let (tx, rx) = mpsc::channel(MAX_COMMANDS_IN_FLIGHT);
        // One copy per stream, shared by its commands.
        let service = Arc::new(self.clone());
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut request_ids = HashSet::new();
            let mut reading = true;
            while reading || !in_flight.is_empty() {
                let (response, finished) = tokio::select! {
                    // Outcomes first: they make room for more requests.
                    biased;
                    Some(response) = in_flight.next() => (response, true),
                    request = requests.message(),
                        if reading && in_flight.len() < MAX_COMMANDS_IN_FLIGHT =>
                    {
                        let (id, command) = match request {
                            Ok(Some(request)) => (request.request_id, request.command),
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
                        let error = match command {
                            None => ApiError::invalid("command", "is required"),
                            Some(_) if request_ids.contains(&id) => ApiError::invalid(
                                "request_id",
                                format!("{id} is already in flight on this stream"),
                            ),
                            Some(command) => {
                                request_ids.insert(id);
                                let service = service.clone();
                                in_flight.push(async move {
                                    command_response(id, service.send_command(command).await)
                                });
                                continue;
                            }
                        };
                        (command_response(id, Err(error)), false)
                    }
                    _ = tx.closed() => return, // the client went away
                    _ = shutdown.recv() => {
                        let _ = tx.send(Err(ApiError::CommandsShutDown.into())).await;
                        return;
                    }
                };
                if finished {
                    request_ids.remove(&response.request_id);
                }
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

impl DeviceHubService {
    fn watch_readings(&self, req: WatchReadingsRequest) -> Result<WatchStream, ApiError> {
        let filter = self.reading_filter(&req.device_id, &req.topic_filter)?;
        let notify_gaps = match GapPolicy::try_from(req.gap_policy) {
            Ok(GapPolicy::Unspecified | GapPolicy::Fail) => false,
            Ok(GapPolicy::Notify) => true,
            Err(_) => {
                return Err(ApiError::invalid(
                    "gap_policy",
                    format!("{} is not a GapPolicy", req.gap_policy),
                ))
            }
        };
        let mut watcher = self
            .hub
            .subscribe(filter, req.after_seq)
            .map_err(|e| match e {
                SubscribeError::Future { .. } => ApiError::invalid("after_seq", e.to_string()),
                SubscribeError::TooManyWatchers(max) => ApiError::TooManyWatchers(max),
            })?;
        // A stale resume cursor fails the call itself, before any message,
        // unless the client asked to be told about gaps in-band.
        let oldest = self.hub.stats().buffer.first_seq;
        if !notify_gaps && watcher.cursor() + 1 < oldest {
            return Err(ApiError::CursorTooOld {
                after_seq: watcher.cursor(),
                oldest,
            });
        }
        let start_cursor = watcher.cursor();
        let (tx, rx) = mpsc::channel(WATCH_QUEUE_BATCHES);
        let encoded = self.encoded.clone();

        // The producer reads the buffer at its own pace; a slow client only
        // holds up this task (its queue is bounded), never ingestion.
        tokio::spawn(async move {
            let mut last_sent = start_cursor;
            loop {
                let batch = tokio::select! {
                    batch = watcher.next_batch() => batch,
                    _ = tx.closed() => return,
                };
                let event = match batch {
                    Ok(batch) => {
                        last_sent = batch.last().map_or(last_sent, |r| r.seq);
                        let messages = encoded.encode(&batch);
                        Ok(batch
                            .iter()
                            .zip(messages)
                            .map(|(reading, message)| WatchItem {
                                reading_seq: Some(reading.seq),
                                // A reading as field 1 is a whole message.
                                message: Encoded::from_bytes(message),
                            })
                            .collect())
                    }
                    Err(CursorError::Evicted {
                        missed_from,
                        missed_to,
                    }) if notify_gaps => {
                        warn!(
                            missed_from,
                            missed_to, "watcher missed evicted readings; notified in-band"
                        );
                        watcher.skip_gap(missed_to);
                        let gap = proto::Gap {
                            first_seq: missed_from,
                            last_seq: missed_to,
                        };
                        Ok(vec![WatchItem {
                            reading_seq: None,
                            message: Encoded::new(&proto::WatchReadingsResponse {
                                event: Some(watch_readings_response::Event::Gap(gap)),
                            }),
                        }])
                    }
                    Err(CursorError::Evicted {
                        missed_from,
                        missed_to,
                    }) => {
                        warn!(
                            missed_from,
                            missed_to, last_sent, "watcher fell behind; ending its stream"
                        );
                        Err(ApiError::WatcherFellBehind {
                            missed_from,
                            missed_to,
                            last_sent,
                        }
                        .into())
                    }
                    Err(CursorError::Future(_)) => {
                        Err(ApiError::Internal("watch cursor ahead of the buffer".into()).into())
                    }
                };
                let ends = event.is_err();
                if tx.send(event).await.is_err() || ends {
                    return; // the client went away, or the stream ends
                }
            }
        });

        let mut shutdown = self.shutdown.clone();
        Ok(WatchStream {
            batches: ReceiverStream::new(rx),
            batch: Vec::new().into_iter(),
            shutdown: Box::pin(async move { shutdown.recv().await }),
            resume_after: start_cursor,
            done: false,
        })
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

/// A message of a watch stream, and the reading it carries if it does.
struct WatchItem {
    reading_seq: Option<u64>,
    message: EncodedWatchReadingsResponse,
}

/// The response stream of WatchReadings: the producer's messages until the
/// service shuts down, then an `UNAVAILABLE` status that says where to resume.
pub struct WatchStream {
    batches: ReceiverStream<Result<Vec<WatchItem>, Status>>,
    /// The rest of the batch being sent.
    batch: std::vec::IntoIter<WatchItem>,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Sequence number of the last reading handed to the transport (or the
    /// position the watch started at).
    resume_after: u64,
    done: bool,
}

impl Stream for WatchStream {
    type Item = Result<EncodedWatchReadingsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            self.done = true;
            let error = ApiError::ShuttingDown {
                resume_after: self.resume_after,
            };
            return Poll::Ready(Some(Err(error.into())));
        }
        loop {
            if let Some(item) = self.batch.next() {
                if let Some(seq) = item.reading_seq {
                    self.resume_after = seq;
                }
                return Poll::Ready(Some(Ok(item.message)));
            }
            match std::task::ready!(Pin::new(&mut self.batches).poll_next(cx)) {
                Some(Ok(batch)) => self.batch = batch.into_iter(),
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// A timestamp as the well-known type defines it: nanos in 0..1e9, and a
/// year from 1 to 9999. (prost would silently normalize other values.)
fn optional_time(
    field: &'static str,
    time: Option<Timestamp>,
) -> Result<Option<SystemTime>, ApiError> {
    const MIN_SECONDS: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let Some(time) = time else { return Ok(None) };
    if !(0..1_000_000_000).contains(&time.nanos)
        || !(MIN_SECONDS..=MAX_SECONDS).contains(&time.seconds)
    {
        return Err(ApiError::invalid(
            field,
            "is not a valid timestamp (nanos must be 0 to 999999999, the year 1 to 9999)",
        ));
    }
    SystemTime::try_from(time)
        .map(Some)
        .map_err(|e| ApiError::invalid(field, format!("is not a valid timestamp: {e}")))
}

/// A `reply_timeout` as the well-known Duration defines it (nanos below one
/// second, no mixed signs; prost would silently normalize), positive and at
/// most [`MAX_REPLY_TIMEOUT`].
fn reply_timeout(timeout: prost_types::Duration) -> Result<std::time::Duration, ApiError> {
    let valid = timeout.seconds >= 0 && (0..1_000_000_000).contains(&timeout.nanos);
    valid
        .then(|| std::time::Duration::new(timeout.seconds as u64, timeout.nanos as u32))
        .filter(|t| !t.is_zero() && *t <= MAX_REPLY_TIMEOUT)
        .ok_or_else(|| {
            ApiError::invalid(
                "reply_timeout",
                format!("must be more than 0 s and at most {MAX_REPLY_TIMEOUT:?}"),
            )
        })
}

fn reply_to_proto(reply: DeviceReply) -> proto::CommandReply {
    let status = match reply.ok {
        true => proto::CommandStatus::Ok,
        false => proto::CommandStatus::Error,
    };
    proto::CommandReply {
        status: status.into(),
        result: reply.result.map(json_to_value),
        message: reply.message,
        received_at: Some(Timestamp::from(reply.received_at)),
    }
}

/// The JSON envelope published for a command.
fn envelope(
    command_id: &str,
    command: &str,
    params: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<Bytes, ApiError> {
    let mut envelope = serde_json::Map::new();
    envelope.insert("id".into(), command_id.into());
    envelope.insert("command".into(), command.into());
    if let Some(params) = params {
        envelope.insert("params".into(), params.into());
    }
    serde_json::to_vec(&envelope)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(format!("encoding a command envelope: {e}")))
}

fn json_to_value(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        // protobuf's Value holds numbers as f64, like JSON in JavaScript.
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, json_to_value(v)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

fn struct_to_json(s: &Struct) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    s.fields
        .iter()
        .map(|(k, v)| Ok((k.clone(), value_to_json(v)?)))
        .collect()
}

fn value_to_json(value: &Value) -> Result<serde_json::Value, String> {
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => (*b).into(),
        // Whole numbers stay whole (`3`, not `3.0`) where f64 holds them exactly.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 => {
            (*n as i64).into()
        }
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("holds the number {n}, which JSON cannot represent"))?,
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .map(value_to_json)
            .collect::<Result<Vec<_>, _>>()?
            .into(),
        Some(Kind::StructValue(s)) => struct_to_json(s)?.into(),
    })
}

/// Page tokens: opaque to clients, validated here. A token is the hex form of
/// a version byte, the cursor (the sequence number the next page starts at)
/// and a hash of the request's filters and order, so that a token cannot be
/// replayed against a different query.
mod page_token {
    use super::{ApiError, ListReadingsRequest};

    const VERSION: u8 = 1;
    const LEN: usize = 17;

    pub fn encode(cursor: u64, query_hash: u64) -> String {
        let mut bytes = Vec::with_capacity(LEN);
        bytes.push(VERSION);
        bytes.extend_from_slice(&cursor.to_be_bytes());
        bytes.extend_from_slice(&query_hash.to_be_bytes());
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn decode(token: &str, query_hash: u64) -> Result<u64, ApiError> {
        let malformed = || {
            ApiError::invalid(
                "page_token",
                "is malformed; pass a next_page_token unchanged",
            )
        };
        if token.len() != LEN * 2 || !token.is_ascii() {
            return Err(malformed());
        }
        let bytes = (0..LEN)
            .map(|i| u8::from_str_radix(&token[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| malformed())?;
        if bytes[0] != VERSION {
            return Err(malformed());
        }
        let word = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        if word(9) != query_hash {
            return Err(ApiError::invalid(
                "page_token",
                "belongs to a request with other filters or another order",
            ));
        }
        Ok(word(1))
    }

    /// FNV-1a over everything but the page size and token: stable across
    /// restarts and platforms.
    pub fn query_hash(req: &ListReadingsRequest) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(req.device_id.as_bytes());
        eat(&[0xff]);
        eat(req.topic_filter.as_bytes());
        eat(&[0xff]);
        for time in [&req.start_time, &req.end_time] {
            match time {
                Some(t) => {
                    eat(&[1]);
                    eat(&t.seconds.to_be_bytes());
                    eat(&t.nanos.to_be_bytes());
                }
                None => eat(&[0]),
            }
        }
        eat(&[u8::from(req.oldest_first)]);
        hash
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_and_rejects_forgeries() {
            let req = ListReadingsRequest::default();
            let hash = query_hash(&req);
            assert_eq!(decode(&encode(42, hash), hash).unwrap(), 42);
            let other = ListReadingsRequest {
                oldest_first: true,
                ..ListReadingsRequest::default()
            };
            assert_ne!(query_hash(&other), hash);
            assert!(decode(&encode(42, hash), query_hash(&other)).is_err());
            for forged in ["", "zz", "é", &"0".repeat(34), &encode(1, hash)[..33]] {
                assert!(decode(forged, hash).is_err(), "{forged:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_and_non_finite_numbers_are_refused() {
        let params = struct_to_json(&Struct {
            fields: [(
                "speed".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(3.0)),
                },
            )]
            .into(),
        })
        .unwrap();
        assert_eq!(
            serde_json::Value::Object(params),
            serde_json::json!({"speed": 3})
        );
        let nan = Struct {
            fields: [(
                "x".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        assert!(struct_to_json(&nan).is_err());
    }

    #[test]
    fn the_envelope_carries_id_command_and_params() {
        let params = serde_json::json!({"on": true}).as_object().cloned();
        let bytes = envelope("id-1", "TURN_ON_FAN", params).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": "id-1", "command": "TURN_ON_FAN", "params": {"on": true}})
        );
    }
}
