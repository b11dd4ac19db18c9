//! GetCommand, ListCommands, CancelCommand and WatchCommands: persistent
//! commands and their states, read from the commands' log and feed
//! (`crate::commands`). SendCommand with a `ttl` is in `commands.rs`.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;

use super::{
    auth::Caller,
    convert::{command_id_field, command_to_proto, device_id_field, states_field},
    error::ApiError,
    page_token, Shared,
};
use crate::{
    commands::{CommandError, CommandQuery},
    proto::{
        CancelCommandRequest, CancelCommandResponse, GetCommandRequest, GetCommandResponse,
        ListCommandsRequest, ListCommandsResponse, WatchCommandsRequest, WatchCommandsResponse,
    },
};

/// Messages a WatchCommands stream holds for its client before the feed
/// backs up (and, past the feed's capacity, the stream ends in DATA_LOSS).
const WATCH_QUEUE: usize = 4;

pub type WatchCommandsStream = ReceiverStream<Result<WatchCommandsResponse, Status>>;

/// Serves one GetCommand call.
pub(super) async fn get(
    shared: &Shared,
    caller: &Caller,
    req: GetCommandRequest,
) -> Result<GetCommandResponse, ApiError> {
    let id = command_id_field(&req.command_id)?;
    caller.may_read_commands("")?;
    let command = shared.commands.get(id).await?;
    // Outside the scope is not found: the id says nothing of its device.
    if !caller.read_commands.allows(&command.device_id) {
        return Err(CommandError::NotFound(id).into());
    }
    Ok(GetCommandResponse {
        command: Some(command_to_proto(command)),
    })
}

/// Serves one ListCommands call.
pub(super) async fn list(
    shared: &Shared,
    caller: &Caller,
    req: ListCommandsRequest,
) -> Result<ListCommandsResponse, ApiError> {
    let page_size = page_token::page_size(req.page_size)?;
    let device_id = match req.device_id.as_str() {
        "" => None,
        id => Some(device_id_field(id)?),
    };
    let states = states_field(&req.states)?;
    caller.may_read_commands(device_id.as_deref().unwrap_or(""))?;
    let mut hash = page_token::Fnv::new();
    hash.eat(b"ListCommands\xff");
    hash.eat(device_id.as_deref().unwrap_or("").as_bytes());
    for state in &states {
        hash.eat(&[0xff, *state as u8]);
    }
    let hash = hash.finish();
    let before = match req.page_token.as_str() {
        "" => None,
        token => {
            let key = page_token::decode_key(token, hash)?;
            Some(uuid::Uuid::parse_str(&key).map_err(|_| {
                ApiError::invalid(
                    "page_token",
                    "is malformed; pass a next_page_token unchanged",
                )
            })?)
        }
    };
    let page = shared
        .commands
        .list(&CommandQuery {
            device_id,
            devices: caller.read_commands.clone(),
            states,
            page_size,
            before,
        })
        .await?;
    Ok(ListCommandsResponse {
        commands: page.commands.into_iter().map(command_to_proto).collect(),
        next_page_token: page
            .next
            .map(|id| page_token::encode_key(&id.to_string(), hash))
            .unwrap_or_default(),
    })
}

/// Serves one CancelCommand call.
pub(super) async fn cancel(
    shared: &Shared,
    caller: &Caller,
    req: CancelCommandRequest,
) -> Result<CancelCommandResponse, ApiError> {
    let id = command_id_field(&req.command_id)?;
    caller.may_send("")?;
    // The device is checked before anything changes.
    let command = shared.commands.get(id).await?;
    if !caller.read_commands.allows(&command.device_id) && !caller.send.allows(&command.device_id) {
        return Err(CommandError::NotFound(id).into());
    }
    caller.may_send(&command.device_id)?;
    let cancelled = shared.commands.cancel(id).await?;
    Ok(CancelCommandResponse {
        command: Some(command_to_proto(cancelled)),
    })
}

/// Starts one WatchCommands stream: a task that follows the feed and sends
/// the changes the caller may read.
pub(super) fn watch(
    shared: &Arc<Shared>,
    caller: &Caller,
    req: WatchCommandsRequest,
) -> Result<WatchCommandsStream, ApiError> {
    let device_id = match req.device_id.as_str() {
        "" => None,
        id => Some(device_id_field(id)?),
    };
    caller.may_read_commands(device_id.as_deref().unwrap_or(""))?;
    let permits = shared.change_watcher(caller)?;
    let mut changes = shared.commands.subscribe();
    let devices = caller.read_commands.clone();
    let shutdown = shared.shutdown.clone();
    let (tx, rx) = mpsc::channel(WATCH_QUEUE);
    let producer = async move {
        let _permits = permits;
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                () = tx.closed() => return,
                () = shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("the service is shutting down; watch anew"))).await;
                    return;
                }
            };
            let command = match change {
                Ok(command) => command,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let _ = tx.send(Err(ApiError::ChangesDropped(missed).into())).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = tx.send(Err(ApiError::CommandsShutDown.into())).await;
                    return;
                }
            };
            let wanted = device_id.as_deref().is_none_or(|d| d == command.device_id)
                && devices.allows(&command.device_id);
            if !wanted {
                continue;
            }
            let response = WatchCommandsResponse {
                command: Some(command_to_proto(command)),
            };
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
        }
    };
    tokio::spawn(producer.in_current_span());
    Ok(ReceiverStream::new(rx))
}
