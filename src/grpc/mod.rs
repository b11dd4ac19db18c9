//! The gRPC side: the `DeviceHub` service. It reads through the
//! [`ReadingHub`] and publishes through the [`CommandPublisher`]; nothing
//! below it knows about gRPC.
//!
//! - `mod.rs`: [`DeviceHubService`] and its trait impl, one line per RPC;
//! - `list.rs`, `watch.rs`, `commands.rs`, `lifecycle.rs`, `devices.rs`:
//!   the handlers, one file per RPC family (`lifecycle.rs`: persistent
//!   commands' Get, List, Cancel and Watch; `state.rs`: device states;
//!   `aggregate.rs`: AggregateReadings' validation);
//! - `convert.rs`: proto ↔ domain conversions and the validation they need;
//! - `page_token.rs`: ListReadings' opaque page tokens;
//! - `auth.rs`: the bearer-token interceptor and the scope checks by device;
//! - `error.rs`: [`ApiError`](error::ApiError), turned into a `Status` in one place;
//! - `wire.rs`, `encoded.rs`: readings written straight to protobuf wire
//!   format, and the one cache of their messages shared by every response
//!   that carries them (see BENCHMARKS.md).

mod aggregate;
mod auth;
mod commands;
mod convert;
mod devices;
mod encoded;
mod error;
mod lifecycle;
mod list;
mod page_token;
mod state;
mod watch;
mod wire;

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub use auth::{Authenticator, KeyError};
pub use commands::MAX_COMMANDS_IN_FLIGHT;
pub use encoded::EncodedReadings;
pub use wire::Encoded;

use crate::{
    commands::Commands,
    config::MqttConfig,
    hub::ReadingHub,
    mqtt::CommandPublisher,
    per_client::{PerClient, Permit as PerClientPermit},
    proto::{
        self, device_hub_server::DeviceHub, AggregateReadingsRequest, AggregateReadingsResponse,
        CancelCommandRequest, CancelCommandResponse, GetCommandRequest, GetCommandResponse,
        GetDeviceRequest, GetDeviceStateRequest, GetDeviceStateResponse, ListCommandsRequest,
        ListCommandsResponse, ListDevicesRequest, ListReadingsRequest, SendCommandRequest,
        SendCommandResponse, StreamCommandsRequest, StreamCommandsResponse,
        UpdateDesiredStateRequest, UpdateDesiredStateResponse, WatchCommandsRequest,
        WatchDeviceStateRequest, WatchReadingsRequest,
    },
    replies::ReplyRouter,
    state::DeviceStates,
    topic::TopicTemplate,
};
use auth::Caller;

/// What the server sends for WatchReadings and ListReadings: the messages,
/// encoded from readings without building them (see build.rs).
pub type EncodedWatchReadingsResponse = Encoded<proto::WatchReadingsResponse>;
pub type EncodedListReadingsResponse = Encoded<proto::ListReadingsResponse>;
pub type EncodedListDevicesResponse = Encoded<proto::ListDevicesResponse>;
pub type EncodedGetDeviceResponse = Encoded<proto::GetDeviceResponse>;

/// The `DeviceHub` service. A cheap handle: tonic and every stream's task
/// share one [`Shared`].
#[derive(Clone)]
pub struct DeviceHubService {
    shared: Arc<Shared>,
}

/// What the handlers share. No lock of its own: the hub, the reply router
/// and the hub each guard their own state.
struct Shared {
    hub: ReadingHub,
    publisher: CommandPublisher,
    replies: ReplyRouter,
    commands_topic: TopicTemplate,
    /// The topic level that holds the device id in every subscribed topic
    /// (readings and replies), if there is one.
    device_level: Option<usize>,
    /// Readings' messages, shared by every response that carries them.
    encoded: Arc<EncodedReadings>,
    /// Commands in progress (waiting for the broker or a reply) per client.
    commands_per_client: PerClient,
    /// Persistent commands.
    commands: Commands,
    /// Device states.
    states: DeviceStates,
    /// WatchCommands and WatchDeviceState streams open in all (one key),
    /// and per client.
    change_watchers: PerClient,
    change_watchers_per_client: PerClient,
    shutdown: CancellationToken,
}

/// What the service is built from besides the hub: how commands go out
/// and what bounds the calls.
pub(crate) struct ServiceParts {
    pub publisher: CommandPublisher,
    pub replies: ReplyRouter,
    pub commands: Commands,
    pub states: DeviceStates,
    pub encoded: Arc<EncodedReadings>,
    pub max_commands_per_client: usize,
    pub max_watchers: usize,
    pub max_watchers_per_client: usize,
}

impl DeviceHubService {
    pub(crate) fn new(
        hub: ReadingHub,
        parts: ServiceParts,
        topics: &MqttConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let device_level = match (
            topics.readings_topic.placeholder_level(),
            topics.replies_topic.placeholder_level(),
            topics.status_topic.placeholder_level(),
        ) {
            (Some(readings), Some(replies), Some(status))
                if readings == replies && replies == status =>
            {
                Some(readings)
            }
            _ => None,
        };
        let shared = Shared {
            hub,
            publisher: parts.publisher,
            replies: parts.replies,
            commands_topic: topics.commands_topic.clone(),
            device_level,
            encoded: parts.encoded,
            commands_per_client: PerClient::new(parts.max_commands_per_client),
            commands: parts.commands,
            states: parts.states,
            change_watchers: PerClient::new(parts.max_watchers),
            change_watchers_per_client: PerClient::new(parts.max_watchers_per_client),
            shutdown,
        };
        Self {
            shared: Arc::new(shared),
        }
    }
}

impl Shared {
    /// A place for one more WatchCommands or WatchDeviceState stream, within `--max-watchers` in all and
    /// `--max-watchers-per-client` for `caller`; held while it is open.
    fn change_watcher(
        &self,
        caller: &Caller,
    ) -> Result<(PerClientPermit, PerClientPermit), error::ApiError> {
        let total = self
            .change_watchers
            .acquire(Arc::from(""))
            .ok_or(error::ApiError::TooManyWatchers(self.change_watchers.max()))?;
        let per_client = self
            .change_watchers_per_client
            .acquire(caller.client.clone())
            .ok_or_else(|| {
                error::ApiError::TooManyForClient(format!(
                    "this client already has its maximum of {} WatchCommands and WatchDeviceState streams open (--max-watchers-per-client)",
                    self.change_watchers_per_client.max()
                ))
            })?;
        Ok((total, per_client))
    }

    /// The buffer filter for a request's `device_id` and `topic_filter`,
    /// narrowed to what `caller` may read.
    fn reading_filter(
        &self,
        caller: &Caller,
        device_id: &str,
        topic_filter: &str,
    ) -> Result<crate::buffer::ReadingFilter, error::ApiError> {
        convert::reading_filter(caller, device_id, topic_filter, self.device_level)
    }
}

#[tonic::async_trait]
impl DeviceHub for DeviceHubService {
    async fn send_command(
        &self,
        request: Request<SendCommandRequest>,
    ) -> Result<Response<SendCommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = commands::send(&self.shared, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn list_readings(
        &self,
        request: Request<ListReadingsRequest>,
    ) -> Result<Response<EncodedListReadingsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = list::list(&self.shared, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn aggregate_readings(
        &self,
        request: Request<AggregateReadingsRequest>,
    ) -> Result<Response<AggregateReadingsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = aggregate::aggregate(&self.shared, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    type WatchReadingsStream = watch::WatchStream;

    async fn watch_readings(
        &self,
        request: Request<WatchReadingsRequest>,
    ) -> Result<Response<watch::WatchStream>, Status> {
        let caller = Caller::of(&request)?;
        let response = watch::watch(&self.shared, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    type StreamCommandsStream = ReceiverStream<Result<StreamCommandsResponse, Status>>;

    async fn stream_commands(
        &self,
        request: Request<Streaming<StreamCommandsRequest>>,
    ) -> Result<Response<Self::StreamCommandsStream>, Status> {
        let caller = Caller::of(&request)?;
        let responses = commands::stream(self.shared.clone(), caller, request.into_inner());
        Ok(Response::new(responses))
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<EncodedListDevicesResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = devices::list(&self.shared, &caller, request.into_inner())?;
        Ok(Response::new(response))
    }

    async fn get_device(
        &self,
        request: Request<GetDeviceRequest>,
    ) -> Result<Response<EncodedGetDeviceResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = devices::get(&self.shared, &caller, request.into_inner())?;
        Ok(Response::new(response))
    }

    async fn get_command(
        &self,
        request: Request<GetCommandRequest>,
    ) -> Result<Response<GetCommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = lifecycle::get(&self.shared, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn list_commands(
        &self,
        request: Request<ListCommandsRequest>,
    ) -> Result<Response<ListCommandsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = lifecycle::list(&self.shared, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn cancel_command(
        &self,
        request: Request<CancelCommandRequest>,
    ) -> Result<Response<CancelCommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = lifecycle::cancel(&self.shared, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    type WatchCommandsStream = lifecycle::WatchCommandsStream;

    async fn watch_commands(
        &self,
        request: Request<WatchCommandsRequest>,
    ) -> Result<Response<Self::WatchCommandsStream>, Status> {
        let caller = Caller::of(&request)?;
        let stream = lifecycle::watch(&self.shared, &caller, request.into_inner())?;
        Ok(Response::new(stream))
    }

    async fn get_device_state(
        &self,
        request: Request<GetDeviceStateRequest>,
    ) -> Result<Response<GetDeviceStateResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = state::get(&self.shared, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn update_desired_state(
        &self,
        request: Request<UpdateDesiredStateRequest>,
    ) -> Result<Response<UpdateDesiredStateResponse>, Status> {
        let caller = Caller::of(&request)?;
        let response = state::update(&self.shared, &caller, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    type WatchDeviceStateStream = state::WatchDeviceStateStream;

    async fn watch_device_state(
        &self,
        request: Request<WatchDeviceStateRequest>,
    ) -> Result<Response<Self::WatchDeviceStateStream>, Status> {
        let caller = Caller::of(&request)?;
        let stream = state::watch(&self.shared, &caller, request.into_inner())?;
        Ok(Response::new(stream))
    }
}
