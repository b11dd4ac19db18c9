//! [`StateStorage`]: where device states are kept, in memory
//! ([`super::MemoryStates`]) or in the PostgreSQL store. Every change is one
//! atomic step with the next version of one counter for all devices, so
//! versions are handed out in the order changes are made, and two callers
//! (two tasks, or two replicas on one database) never both apply a patch
//! against the same `expected_version`.
//!
//! A storage hands every change, and no other, to the feed (`feed.rs`) in
//! version order; the store hands the changes of every instance.

use std::time::SystemTime;

use futures_util::future::BoxFuture;

use super::document::{DeviceState, Object, PatchError};
use crate::scope::DeviceSet;

pub type StorageResult<T> = Result<T, StorageError>;

/// Why a storage could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("the device states kept in memory already take the most bytes they may ({0}, --max-device-states); a store has room for more")]
    NoRoom(usize),
    /// The store failed; the text is for the log, never for a client.
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
}

/// What became of a desired patch.
#[derive(Debug, Clone)]
pub enum Updated {
    /// Applied: the state after it.
    Applied(DeviceState),
    /// Not applied: the expected version is not the current one.
    Stale { current: i64 },
    /// Not applied: the patch would make desired too large.
    Refused(PatchError),
}

/// One reported patch, as a device published it (already parsed and
/// checked).
#[derive(Debug, Clone)]
pub struct ReportedPatch {
    pub device_id: String,
    pub patch: Object,
    pub received_at: SystemTime,
}

/// What became of one reported patch of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    Applied,
    /// Not applied: it would make reported too large.
    Refused(PatchError),
    /// Not applied: the memory budget is spent.
    NoRoom,
}

/// Where device states are kept.
pub trait StateStorage: Send + Sync + 'static {
    /// The state of `device_id`, if anything was ever desired or reported.
    fn get<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, StorageResult<Option<DeviceState>>>;

    /// Applies `patch` to the desired state of `device_id` (created if it
    /// has none), unless `expected_version` is set (not 0) and is not its
    /// current version.
    fn update_desired<'a>(
        &'a self,
        device_id: &'a str,
        patch: &'a Object,
        expected_version: i64,
        now: SystemTime,
    ) -> BoxFuture<'a, StorageResult<Updated>>;

    /// Applies reported patches in their order, each whole or not at all;
    /// what became of each, in the same order.
    fn apply_reported<'a>(
        &'a self,
        patches: &'a [ReportedPatch],
    ) -> BoxFuture<'a, StorageResult<Vec<Reported>>>;

    /// Up to `limit` states of devices in `devices`, ordered by device id,
    /// after `after`.
    fn page<'a>(
        &'a self,
        devices: &'a DeviceSet,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, StorageResult<Vec<DeviceState>>>;

    /// The newest version handed out: every change up to it is in what
    /// [`StateStorage::page`] reads from now on.
    fn version(&self) -> BoxFuture<'_, StorageResult<i64>>;

    /// Devices whose latest desired state may not have been published
    /// (the store's, after a restart; memory forgets everything).
    fn unpublished(&self) -> BoxFuture<'_, StorageResult<Vec<String>>>;

    /// Notes that the desired states of these devices at these versions
    /// were published (acknowledged by the broker).
    fn published<'a>(&'a self, published: &'a [(String, i64)]) -> BoxFuture<'a, StorageResult<()>>;

    /// Without a store: how many states are kept in memory, and the bytes
    /// they take (`None` for the store).
    fn memory_use(&self) -> Option<(usize, usize)>;
}
