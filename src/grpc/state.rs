//! GetDeviceState, UpdateDesiredState and WatchDeviceState: device states,
//! desired and reported, read from and changed through
//! [`DeviceStates`](crate::state::DeviceStates).

use std::{collections::HashMap, sync::Arc};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;

use super::{
    auth::Caller,
    convert::{device_id_field, device_state_to_proto, struct_to_json},
    error::ApiError,
    Shared,
};
use crate::{
    proto::{
        GetDeviceStateRequest, GetDeviceStateResponse, UpdateDesiredStateRequest,
        UpdateDesiredStateResponse, WatchDeviceStateRequest, WatchDeviceStateResponse,
    },
    scope::DeviceSet,
    state::{check_patch, DeviceState, DeviceStates, StateError},
};

/// Messages a WatchDeviceState stream holds for its client before the feed
/// backs up (and, past the feed's capacity, the stream ends in DATA_LOSS).
const WATCH_QUEUE: usize = 4;

/// States read per page for a watch of every device, before its changes.
const SNAPSHOT_PAGE: usize = 256;

pub type WatchDeviceStateStream = ReceiverStream<Result<WatchDeviceStateResponse, Status>>;

/// Serves one GetDeviceState call.
pub(super) async fn get(
    shared: &Shared,
    caller: &Caller,
    req: GetDeviceStateRequest,
) -> Result<GetDeviceStateResponse, ApiError> {
    let device_id = device_id_field(&req.device_id)?;
    caller.may_read_state(&device_id)?;
    let state = shared.states.get(&device_id).await?;
    Ok(GetDeviceStateResponse {
        state: Some(device_state_to_proto(&state)),
    })
}

/// Serves one UpdateDesiredState call.
pub(super) async fn update(
    shared: &Shared,
    caller: &Caller,
    req: UpdateDesiredStateRequest,
) -> Result<UpdateDesiredStateResponse, ApiError> {
    let device_id = device_id_field(&req.device_id)?;
    let patch = req
        .patch
        .as_ref()
        .ok_or_else(|| ApiError::invalid("patch", "is required: a JSON merge patch of desired"))?;
    let patch = struct_to_json(patch).map_err(|e| ApiError::invalid("patch", e))?;
    check_patch(&patch).map_err(|e| ApiError::invalid("patch", e.to_string()))?;
    if req.expected_version < 0 {
        return Err(ApiError::invalid(
            "expected_version",
            "must not be negative (0: any version)",
        ));
    }
    caller.may_write_state(&device_id)?;
    let state = shared
        .states
        .update_desired(&device_id, &patch, req.expected_version)
        .await?;
    Ok(UpdateDesiredStateResponse {
        state: Some(device_state_to_proto(&state)),
    })
}

/// Starts one WatchDeviceState stream: a task that sends the current
/// state(s), then follows the feed.
pub(super) fn watch(
    shared: &Arc<Shared>,
    caller: &Caller,
    req: WatchDeviceStateRequest,
) -> Result<WatchDeviceStateStream, ApiError> {
    let device_id = match req.device_id.as_str() {
        "" => None,
        id => Some(device_id_field(id)?),
    };
    caller.may_read_state(device_id.as_deref().unwrap_or(""))?;
    let permits = shared.change_watcher(caller)?;
    // Subscribed before the current states are read: no change between
    // the two is missed; those already in what was read are skipped.
    let changes = shared.states.subscribe();
    let watch = Watch {
        states: shared.states.clone(),
        device_id,
        devices: caller.read_state.clone(),
        changes,
    };
    let shutdown = shared.shutdown.clone();
    let (tx, rx) = mpsc::channel(WATCH_QUEUE);
    let producer = async move {
        let _permits = permits;
        tokio::select! {
            () = watch.run(&tx) => {}
            () = tx.closed() => {}
            () = shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("the service is shutting down; watch anew"))).await;
            }
        }
    };
    tokio::spawn(producer.in_current_span());
    Ok(ReceiverStream::new(rx))
}

type Sender = mpsc::Sender<Result<WatchDeviceStateResponse, Status>>;

/// One WatchDeviceState stream's producer.
struct Watch {
    states: DeviceStates,
    device_id: Option<String>,
    /// What the caller may read.
    devices: DeviceSet,
    changes: broadcast::Receiver<Arc<DeviceState>>,
}

impl Watch {
    async fn run(mut self, tx: &Sender) {
        let outcome = match self.current(tx).await {
            Ok(Some(skip)) => self.follow(tx, skip).await,
            Ok(None) => return, // the client went away
            Err(error) => Err(error),
        };
        if let Err(error) = outcome {
            let _ = tx.send(Err(error.into())).await;
        }
    }

    /// Sends the current states; what the changes to follow must skip, as
    /// already sent (`None`: the client went away).
    async fn current(&self, tx: &Sender) -> Result<Option<Skip>, ApiError> {
        let mut skip = Skip::default();
        if let Some(device_id) = &self.device_id {
            match self.states.get(device_id).await {
                Ok(state) => {
                    skip.sent.insert(state.device_id.clone(), state.version);
                    if !send(tx, &state).await {
                        return Ok(None);
                    }
                }
                Err(StateError::NotFound(_)) => {}
                Err(error) => return Err(error.into()),
            }
            return Ok(Some(skip));
        }
        // Every change up to `upto` is in the pages read from here on.
        skip.upto = self.states.version().await?;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .states
                .page(&self.devices, after.as_deref(), SNAPSHOT_PAGE)
                .await?;
            for state in &page {
                if state.version > skip.upto {
                    skip.sent.insert(state.device_id.clone(), state.version);
                }
                if !send(tx, state).await {
                    return Ok(None);
                }
            }
            match page.last() {
                Some(last) if page.len() == SNAPSHOT_PAGE => after = Some(last.device_id.clone()),
                _ => return Ok(Some(skip)),
            }
        }
    }

    /// Sends every change the caller may read, in version order.
    async fn follow(&mut self, tx: &Sender, mut skip: Skip) -> Result<(), ApiError> {
        loop {
            let state = match self.changes.recv().await {
                Ok(state) => state,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return Err(ApiError::ChangesDropped(missed));
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(ApiError::WatchEnded);
                }
            };
            let wanted = self
                .device_id
                .as_deref()
                .is_none_or(|d| d == state.device_id)
                && self.devices.allows(&state.device_id);
            if !wanted || skip.already_sent(&state) {
                continue;
            }
            if !send(tx, &state).await {
                return Ok(());
            }
        }
    }
}

/// The changes a watch has sent already, in the states it read first.
#[derive(Default)]
struct Skip {
    /// Every change up to this version.
    upto: i64,
    /// For devices read at a later version than `upto`, that version.
    sent: HashMap<String, i64>,
}

impl Skip {
    fn already_sent(&mut self, state: &DeviceState) -> bool {
        if state.version <= self.upto {
            return true;
        }
        match self.sent.get(&state.device_id) {
            Some(&sent) if state.version <= sent => true,
            Some(_) => {
                // Past what was read: nothing more to skip for it.
                self.sent.remove(&state.device_id);
                false
            }
            None => false,
        }
    }
}

/// Sends `state`; false when the client went away.
async fn send(tx: &Sender, state: &DeviceState) -> bool {
    let response = WatchDeviceStateResponse {
        state: Some(device_state_to_proto(state)),
    };
    tx.send(Ok(response)).await.is_ok()
}
