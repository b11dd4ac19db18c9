//! [`MemoryStates`]: device states without a store, within a byte budget
//! (`--max-device-states`), lost on restart.
//!
//! Versions start at the time the service started, in microseconds, so
//! that they keep increasing across restarts: a device that ignores
//! documents not newer than one it applied still takes the first one after
//! a restart.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard},
    time::SystemTime,
};

use futures_util::future::BoxFuture;

use super::{
    document::{micros, DeviceState, Object, Side},
    feed::StateFeed,
    storage::{Reported, ReportedPatch, StateStorage, StorageError, StorageResult, Updated},
};
use crate::{scope::DeviceSet, sync};

/// The states, by device id. One std mutex, held to apply one patch (or
/// one batch of reported patches) and hand the change to the feed, so that
/// the feed carries changes in version order; never across an `.await`.
pub struct MemoryStates {
    inner: Mutex<Inner>,
    feed: StateFeed,
    max_bytes: usize,
}

struct Inner {
    /// Ordered, for WatchDeviceState's pages.
    states: BTreeMap<String, DeviceState>,
    /// What `states` take, as [`DeviceState::heap_bytes`] counts.
    bytes: usize,
    version: i64,
}

impl MemoryStates {
    pub fn new(feed: StateFeed, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                states: BTreeMap::new(),
                bytes: 0,
                version: micros(SystemTime::now()),
            }),
            feed,
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        sync::lock(&self.inner)
    }
}

impl Inner {
    /// Applies `patch` to `side` of `device_id`'s state if the budget has
    /// room for the result; the state after it.
    fn apply(
        &mut self,
        device_id: &str,
        side: Side,
        patch: &Object,
        now: SystemTime,
        max_bytes: usize,
    ) -> Result<&DeviceState, Reported> {
        let current = self.states.get(device_id);
        let before = current.map_or(0, DeviceState::heap_bytes);
        let state = DeviceState::patched(current, device_id, side, patch, now, self.version + 1)
            .map_err(Reported::Refused)?;
        let after = state.heap_bytes();
        let bytes = self.bytes - before + after;
        if after > before && bytes > max_bytes {
            return Err(Reported::NoRoom);
        }
        self.bytes = bytes;
        self.version += 1;
        self.states.insert(device_id.to_owned(), state);
        Ok(&self.states[device_id])
    }
}

impl StateStorage for MemoryStates {
    fn get<'a>(&'a self, device_id: &'a str) -> BoxFuture<'a, StorageResult<Option<DeviceState>>> {
        let state = self.lock().states.get(device_id).cloned();
        Box::pin(async move { Ok(state) })
    }

    fn update_desired<'a>(
        &'a self,
        device_id: &'a str,
        patch: &'a Object,
        expected_version: i64,
        now: SystemTime,
    ) -> BoxFuture<'a, StorageResult<Updated>> {
        let updated = {
            let mut inner = self.lock();
            let current = inner.states.get(device_id).map_or(0, |s| s.version);
            if expected_version != 0 && expected_version != current {
                Ok(Updated::Stale { current })
            } else {
                match inner.apply(device_id, Side::Desired, patch, now, self.max_bytes) {
                    Ok(state) => {
                        self.feed.send(state);
                        Ok(Updated::Applied(state.clone()))
                    }
                    Err(Reported::Refused(why)) => Ok(Updated::Refused(why)),
                    Err(_) => Err(StorageError::NoRoom(self.max_bytes)),
                }
            }
        };
        Box::pin(async move { updated })
    }

    fn apply_reported<'a>(
        &'a self,
        patches: &'a [ReportedPatch],
    ) -> BoxFuture<'a, StorageResult<Vec<Reported>>> {
        let outcomes = {
            let mut inner = self.lock();
            patches
                .iter()
                .map(|p| {
                    let applied = inner.apply(
                        &p.device_id,
                        Side::Reported,
                        &p.patch,
                        p.received_at,
                        self.max_bytes,
                    );
                    match applied {
                        Ok(state) => {
                            self.feed.send(state);
                            Reported::Applied
                        }
                        Err(why) => why,
                    }
                })
                .collect()
        };
        Box::pin(async move { Ok(outcomes) })
    }

    fn page<'a>(
        &'a self,
        devices: &'a DeviceSet,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, StorageResult<Vec<DeviceState>>> {
        let page = {
            let inner = self.lock();
            let from = match after {
                Some(after) => std::ops::Bound::Excluded(after),
                None => std::ops::Bound::Unbounded,
            };
            inner
                .states
                .range::<str, _>((from, std::ops::Bound::Unbounded))
                .filter(|(id, _)| devices.allows(id))
                .take(limit)
                .map(|(_, state)| state.clone())
                .collect()
        };
        Box::pin(async move { Ok(page) })
    }

    fn version(&self) -> BoxFuture<'_, StorageResult<i64>> {
        let version = self.lock().version;
        Box::pin(async move { Ok(version) })
    }

    fn unpublished(&self) -> BoxFuture<'_, StorageResult<Vec<String>>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn published<'a>(
        &'a self,
        _published: &'a [(String, i64)],
    ) -> BoxFuture<'a, StorageResult<()>> {
        Box::pin(async { Ok(()) })
    }

    fn memory_use(&self) -> Option<(usize, usize)> {
        let inner = self.lock();
        Some((inner.states.len(), inner.bytes))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn patch(value: serde_json::Value) -> Object {
        value.as_object().cloned().unwrap()
    }

    fn block_on<T>(f: BoxFuture<'_, T>) -> T {
        futures_util::FutureExt::now_or_never(f).expect("memory storage never waits")
    }

    #[test]
    fn stale_versions_are_refused_and_versions_increase() {
        let states = MemoryStates::new(StateFeed::default(), 1 << 20);
        let now = SystemTime::now();
        let Updated::Applied(first) =
            block_on(states.update_desired("d", &patch(json!({"a": 1})), 0, now)).unwrap()
        else {
            panic!("not applied")
        };
        let stale =
            block_on(states.update_desired("d", &patch(json!({"a": 2})), first.version - 1, now));
        assert!(matches!(stale, Ok(Updated::Stale { current }) if current == first.version));
        let Updated::Applied(second) =
            block_on(states.update_desired("d", &patch(json!({"a": 2})), first.version, now))
                .unwrap()
        else {
            panic!("not applied")
        };
        assert!(second.version > first.version);
        // A device never seen, with an expected version: there is none yet.
        let none = block_on(states.update_desired("e", &patch(json!({"a": 1})), 7, now));
        assert!(matches!(none, Ok(Updated::Stale { current: 0 })));
    }

    #[test]
    fn the_budget_refuses_growth_and_not_shrinking() {
        let big = |key: &str| patch(json!({ key: "x".repeat(40 << 10) }));
        let states = MemoryStates::new(StateFeed::default(), 100 << 10);
        let now = SystemTime::now();
        let reported = |device: &str, patch: Object| ReportedPatch {
            device_id: device.into(),
            patch,
            received_at: now,
        };
        let outcomes = block_on(states.apply_reported(&[
            reported("a", big("v")),
            reported("b", big("v")),
            reported("c", big("v")),
            reported("a", patch(json!({"v": null}))),
            reported("c", big("v")),
        ]))
        .unwrap();
        use Reported::*;
        assert_eq!(outcomes, [Applied, Applied, NoRoom, Applied, Applied]);
        let (count, bytes) = states.memory_use().unwrap();
        assert_eq!(count, 3);
        assert!(bytes <= 100 << 10, "{bytes}");
        let refused = block_on(states.update_desired("d", &big("v"), 0, now));
        assert!(matches!(refused, Err(StorageError::NoRoom(_))));
    }
}
