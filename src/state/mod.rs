//! Device state: what a device should be (desired, set by clients) and what
//! it says it is (reported, from its reported state topic), versioned, with
//! the delta between them; the desired state delivered, retained, to
//! devices that were away.
//!
//! - this file: [`DeviceStates`], the handle the gRPC side calls into;
//! - `document.rs`: the state as data: merge patches, their limits, the
//!   delta and its order rule;
//! - `storage.rs`: [`StateStorage`], where states are kept, each change
//!   one atomic step with the next version;
//! - `memory.rs`: [`MemoryStates`], the storage without a store;
//! - `feed.rs`: the changes, in version order, for WatchDeviceState, and
//!   the counters behind `/metrics`;
//! - `reported.rs`: reported states on their way from the MQTT event loop
//!   to the storage;
//! - `publish.rs`: the desired states on their way to the devices.
//!
//! It knows neither gRPC nor MQTT nor PostgreSQL: desired states are
//! published through [`DesiredTransport`] (the MQTT side implements it),
//! reported ones come in through [`ReportedInbox`], and the store
//! implements [`StateStorage`].

mod document;
mod feed;
mod memory;
mod publish;
mod reported;
mod storage;

use std::{sync::Arc, time::SystemTime};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use document::{
    check_patch, from_micros, micros, DesiredKey, DeviceState, Object, PatchError, Side,
};
pub use feed::{StateCounters, StateFeed};
pub use memory::MemoryStates;
pub use publish::{DesiredTransport, PublishFailed};
pub use reported::{inbox, ReportedInbox, ReportedReceiver};
pub use storage::{Reported, ReportedPatch, StateStorage, StorageError, Updated};

use crate::{scope::DeviceSet, topic::TopicTemplate};

/// Why a call on [`DeviceStates`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("nothing was ever desired or reported for device {0:?}")]
    NotFound(String),
    #[error("expected_version {expected} is not the current version of device {device_id:?}'s state, {current}: read it again and retry")]
    Stale {
        device_id: String,
        expected: i64,
        current: i64,
    },
    #[error("{0}")]
    Patch(PatchError),
    #[error("{0}")]
    Storage(#[from] StorageError),
}

/// Device states. Cheap to clone.
#[derive(Clone)]
pub struct DeviceStates {
    shared: Arc<Shared>,
}

struct Shared {
    storage: Arc<dyn StateStorage>,
    feed: StateFeed,
    /// Devices whose desired state is to be published.
    queue: Arc<publish::Queue>,
}

/// What [`DeviceStates::start`] needs.
pub struct StateParts {
    pub storage: Arc<dyn StateStorage>,
    pub feed: StateFeed,
    pub transport: Arc<dyn DesiredTransport>,
    /// The devices' desired state topic.
    pub desired_topic: TopicTemplate,
    /// Reported states from the MQTT event loop.
    pub reported: ReportedReceiver,
}

impl DeviceStates {
    /// Starts the desired state publisher and the reported state applier,
    /// both stopping with `shutdown`.
    pub fn start(parts: StateParts, shutdown: CancellationToken) -> Self {
        let StateParts {
            storage,
            feed,
            transport,
            desired_topic,
            reported,
        } = parts;
        let queue = Arc::new(publish::Queue::default());
        let publisher = publish::Publisher {
            queue: queue.clone(),
            storage: storage.clone(),
            transport,
            topic: desired_topic,
            feed: feed.clone(),
        };
        tokio::spawn(publisher.run(shutdown.clone()));
        tokio::spawn(reported::apply(
            reported,
            storage.clone(),
            feed.clone(),
            shutdown,
        ));
        Self {
            shared: Arc::new(Shared {
                storage,
                feed,
                queue,
            }),
        }
    }

    /// The state of `device_id`.
    pub async fn get(&self, device_id: &str) -> Result<DeviceState, StateError> {
        self.shared
            .storage
            .get(device_id)
            .await?
            .ok_or_else(|| StateError::NotFound(device_id.to_owned()))
    }

    /// Applies the merge `patch` (checked: [`check_patch`]) to the desired
    /// state of `device_id`, if `expected_version` is 0 or the current
    /// version; queues the new desired state to be published.
    pub async fn update_desired(
        &self,
        device_id: &str,
        patch: &Object,
        expected_version: i64,
    ) -> Result<DeviceState, StateError> {
        let now = SystemTime::now();
        let updated = self
            .shared
            .storage
            .update_desired(device_id, patch, expected_version, now)
            .await?;
        match updated {
            Updated::Applied(state) => {
                self.shared.queue.push(Arc::new(state.clone()));
                Ok(state)
            }
            Updated::Stale { current } => Err(StateError::Stale {
                device_id: device_id.to_owned(),
                expected: expected_version,
                current,
            }),
            Updated::Refused(why) => Err(StateError::Patch(why)),
        }
    }

    /// Up to `limit` states of devices in `devices`, ordered by device id,
    /// after `after`.
    pub async fn page(
        &self,
        devices: &DeviceSet,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeviceState>, StateError> {
        Ok(self.shared.storage.page(devices, after, limit).await?)
    }

    /// The newest version handed out.
    pub async fn version(&self) -> Result<i64, StateError> {
        Ok(self.shared.storage.version().await?)
    }

    /// The changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<DeviceState>> {
        self.shared.feed.subscribe()
    }

    pub fn counters(&self) -> &StateCounters {
        self.shared.feed.counters()
    }

    /// Without a store: the states kept in memory and their bytes.
    pub fn memory_use(&self) -> Option<(usize, usize)> {
        self.shared.storage.memory_use()
    }
}
