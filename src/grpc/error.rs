//! [`ApiError`]: everything a call can fail with, and the one place where it
//! becomes a [`Status`]. Internal details go to the log, never to the client.

use tonic::Status;
use tracing::error;

use crate::{
    commands::{CommandError, LogError},
    mqtt::PublishError,
    replies::TooManyPending,
    state::{StateError, StorageError},
};

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
    #[error("{0}")]
    TooManyForClient(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error(
        "the reading store is unavailable; try again (resume after sequence number {resume_after})"
    )]
    StoreUnavailable { resume_after: u64 },
    /// The same, for a call that has nothing to resume.
    #[error("the reading store is unavailable; try again")]
    ReadingsUnavailable,
    #[error("{0}")]
    Commands(#[from] CommandError),
    #[error("{0}")]
    States(#[from] StateError),
    #[error("the service is shutting down; watch anew")]
    WatchEnded,
    #[error("watcher fell behind: {0} changes were dropped before it read them; list again and watch anew")]
    ChangesDropped(u64),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub(super) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
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
            ApiError::TooManyWatchers(_)
            | ApiError::TooManyForClient(_)
            | ApiError::TooManyPending(_) => Status::resource_exhausted(message),
            ApiError::NoReply { .. } => Status::deadline_exceeded(message),
            ApiError::Unauthenticated(_) => Status::unauthenticated(message),
            ApiError::PermissionDenied(_) => Status::permission_denied(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::ShuttingDown { .. }
            | ApiError::CommandsShutDown
            | ApiError::WatchEnded
            | ApiError::StoreUnavailable { .. }
            | ApiError::ReadingsUnavailable => Status::unavailable(message),
            ApiError::Commands(CommandError::NotFound(_)) => Status::not_found(message),
            ApiError::Commands(CommandError::Ended { .. }) => Status::failed_precondition(message),
            ApiError::Commands(CommandError::Log(
                LogError::Full(_) | LogError::DeviceFull { .. } | LogError::NoRoom(_),
            )) => Status::resource_exhausted(message),
            ApiError::Commands(CommandError::Log(LogError::Unavailable(_))) => {
                // What the store said goes to the log only.
                error!(%message, "command store");
                Status::unavailable("the command store is unavailable; try again")
            }
            ApiError::States(StateError::NotFound(_)) => Status::not_found(message),
            ApiError::States(StateError::Stale { .. }) => Status::aborted(message),
            ApiError::States(StateError::Patch(_)) => {
                Status::invalid_argument(format!("patch: {message}"))
            }
            ApiError::States(StateError::Storage(StorageError::NoRoom(_))) => {
                Status::resource_exhausted(message)
            }
            ApiError::States(StateError::Storage(StorageError::Unavailable(_))) => {
                error!(%message, "state store");
                Status::unavailable("the state store is unavailable; try again")
            }
            ApiError::ChangesDropped(_) => Status::data_loss(message),
            ApiError::Internal(_) => {
                // Details go to the log, never to the client.
                error!(%message, "internal error");
                Status::internal("internal error; see the service log")
            }
        }
    }
}
