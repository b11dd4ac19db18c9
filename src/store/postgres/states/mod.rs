//! Device states in PostgreSQL: [`PgStates`], the states' [`StateStorage`]
//! over `device_states` (`migrations/0005_device_states.sql`). This file:
//! the statements and the trait's impl; `changes.rs` the tail that hands
//! every instance's changes to this instance's feed.
//!
//! - Every change is one transaction that first locks the counter row
//!   (`device_state_counter`), reads the states it changes, applies the
//!   patches in Rust (`state::DeviceState::apply`, the one implementation
//!   of merge patches and the delta), and writes the new states with the
//!   next versions, each change also into `device_state_changes`, with a
//!   NOTIFY. The lock makes changes one after another across instances:
//!   versions follow commit order without gaps, `expected_version` is
//!   checked against what no other instance can change meanwhile, and
//!   every instance's tail reads the same changes in the same order.
//! - Desired changes that come in together are committed together
//!   (`desired.rs`), each a step of its own, flushed to disk before any is
//!   answered; a batch of reported patches with `synchronous_commit` off,
//!   as nobody was told it was stored, and a device reports again.
//! - Its own pool ([`STATE_CONNECTIONS`], each statement under the read
//!   timeout), so that neither ingest, client reads nor commands delay it.

mod changes;
mod desired;

use std::{
    collections::{BTreeMap, HashMap},
    time::SystemTime,
};

use futures_util::future::{BoxFuture, FutureExt};
use serde::{Deserialize, Serialize};
use sqlx::{postgres::PgRow, PgPool, Postgres as Pg, Row, Transaction};
use tokio_util::sync::CancellationToken;

use super::{without_flush, Postgres, StoreError};
use crate::{
    scope::DeviceSet,
    state::{
        from_micros, micros, DesiredKey, DeviceState, Object, Reported, ReportedPatch, Side,
        StateFeed, StateStorage, StorageError, Updated,
    },
};

/// Connections of the states' pool: the change tail's LISTEN and its
/// reads, the desired writer, the reported applier, the publisher's notes,
/// and client reads.
pub const STATE_CONNECTIONS: u32 = 6;
/// The channel each change notifies.
const CHANNEL: &str = "devicehub_states";
/// Rows one page's query fetches at a time.
const PAGE_FETCH: i64 = 500;

/// What the `state` column holds: a [`DeviceState`] but for its device id
/// and version (columns of their own). Times in microseconds since the
/// Unix epoch.
#[derive(Serialize, Deserialize)]
struct Stored {
    desired: Object,
    reported: Object,
    desired_keys: BTreeMap<String, DesiredKey>,
    reported_keys: BTreeMap<String, i64>,
    desired_update_time: Option<i64>,
    reported_update_time: Option<i64>,
}

fn encode(state: &DeviceState) -> serde_json::Value {
    let stored = Stored {
        desired: state.desired.clone(),
        reported: state.reported.clone(),
        desired_keys: state.desired_keys.clone(),
        reported_keys: state.reported_keys.clone(),
        desired_update_time: state.desired_update_time.map(micros),
        reported_update_time: state.reported_update_time.map(micros),
    };
    // Maps of JSON and numbers always encode.
    serde_json::to_value(stored).unwrap_or_default()
}

/// A row of `device_id, version, state`.
fn decode(row: &PgRow) -> Result<DeviceState, sqlx::Error> {
    let json: serde_json::Value = row.try_get("state")?;
    let stored: Stored =
        serde_json::from_value(json).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(DeviceState {
        device_id: row.try_get("device_id")?,
        desired: stored.desired,
        reported: stored.reported,
        desired_keys: stored.desired_keys,
        reported_keys: stored.reported_keys,
        version: row.try_get("version")?,
        desired_update_time: stored.desired_update_time.map(from_micros),
        reported_update_time: stored.reported_update_time.map(from_micros),
    })
}

fn unavailable(error: sqlx::Error) -> StorageError {
    StorageError::Unavailable(error.to_string())
}

/// The device states in the store. Cheap to clone.
#[derive(Clone)]
pub struct PgStates {
    pool: PgPool,
    feed: StateFeed,
    /// Desired changes, committed in batches (`desired.rs`).
    desired: desired::Sender,
}

impl Postgres {
    /// The device states, with their change tail feeding `feed` until
    /// `shutdown`.
    pub async fn state_storage(
        &self,
        feed: StateFeed,
        shutdown: CancellationToken,
    ) -> Result<PgStates, StoreError> {
        let pool = self.states_pool().clone();
        let states = PgStates {
            desired: desired::start(pool.clone()),
            pool,
            feed,
        };
        changes::start(states.clone(), shutdown).await?;
        Ok(states)
    }
}

/// One changing transaction: the counter row locked, the states it
/// changes read, the changes made so far.
struct Change {
    tx: Transaction<'static, Pg>,
    /// The newest version handed out (in this transaction too).
    version: i64,
    states: HashMap<String, DeviceState>,
    /// Each change, in order, and whether it changed desired.
    changes: Vec<(DeviceState, bool)>,
}

impl Change {
    /// Begins one: locks the counter row, reads the states of `device_ids`.
    async fn begin(pool: &PgPool, device_ids: &[String]) -> Result<Self, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let version: i64 =
            sqlx::query_scalar("SELECT version FROM device_state_counter WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        let rows = sqlx::query(
            "SELECT device_id, version, state FROM device_states WHERE device_id = ANY($1)",
        )
        .bind(device_ids)
        .fetch_all(&mut *tx)
        .await?;
        let states = rows
            .iter()
            .map(|row| decode(row).map(|s| (s.device_id.clone(), s)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            tx,
            version,
            states,
            changes: Vec::new(),
        })
    }

    /// The current version of `device_id`'s state (0: none).
    fn version_of(&self, device_id: &str) -> i64 {
        self.states.get(device_id).map_or(0, |s| s.version)
    }

    /// Applies `patch` to `side` of `device_id`'s state with the next
    /// version; the state after it.
    fn apply(
        &mut self,
        device_id: &str,
        side: Side,
        patch: &Object,
        now: SystemTime,
    ) -> Result<&DeviceState, crate::state::PatchError> {
        let current = self.states.get(device_id);
        let state = DeviceState::patched(current, device_id, side, patch, now, self.version + 1)?;
        self.version += 1;
        self.changes.push((state.clone(), side == Side::Desired));
        self.states.insert(device_id.to_owned(), state);
        Ok(&self.states[device_id])
    }

    /// Writes the changes and commits (not waiting for the disk when
    /// `lightly`).
    async fn commit(mut self, lightly: bool) -> Result<(), sqlx::Error> {
        if self.changes.is_empty() {
            return self.tx.rollback().await;
        }
        if lightly {
            without_flush(&mut self.tx).await?;
        }
        sqlx::query("UPDATE device_state_counter SET version = $1 WHERE id = 1")
            .bind(self.version)
            .execute(&mut *self.tx)
            .await?;
        // The newest state of each device changed, with the version of its
        // newest desired change.
        let mut newest: HashMap<&str, (&DeviceState, i64)> = HashMap::new();
        for (state, desired) in &self.changes {
            let desired_version = if *desired { state.version } else { 0 };
            let entry = newest.entry(&state.device_id).or_insert((state, 0));
            *entry = (state, entry.1.max(desired_version));
        }
        let (mut ids, mut versions, mut states, mut desired) = (vec![], vec![], vec![], vec![]);
        for (id, (state, desired_version)) in newest {
            ids.push(id.to_owned());
            versions.push(state.version);
            states.push(encode(state));
            desired.push(desired_version);
        }
        sqlx::query(
            "INSERT INTO device_states (device_id, version, state, desired_version) \
             SELECT * FROM unnest($1::text[], $2::int8[], $3::jsonb[], $4::int8[]) \
             ON CONFLICT (device_id) DO UPDATE SET version = excluded.version, \
                state = excluded.state, \
                desired_version = GREATEST(device_states.desired_version, excluded.desired_version)",
        )
        .bind(&ids)
        .bind(&versions)
        .bind(&states)
        .bind(&desired)
        .execute(&mut *self.tx)
        .await?;
        let versions: Vec<i64> = self.changes.iter().map(|(s, _)| s.version).collect();
        let ids: Vec<&str> = self
            .changes
            .iter()
            .map(|(s, _)| s.device_id.as_str())
            .collect();
        let states: Vec<serde_json::Value> = self.changes.iter().map(|(s, _)| encode(s)).collect();
        sqlx::query(
            "INSERT INTO device_state_changes (version, device_id, state) \
             SELECT * FROM unnest($1::int8[], $2::text[], $3::jsonb[])",
        )
        .bind(&versions)
        .bind(&ids)
        .bind(&states)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&mut *self.tx)
            .await?;
        self.tx.commit().await
    }
}

impl PgStates {
    async fn get(&self, device_id: &str) -> Result<Option<DeviceState>, StorageError> {
        let row =
            sqlx::query("SELECT device_id, version, state FROM device_states WHERE device_id = $1")
                .bind(device_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
        row.as_ref().map(decode).transpose().map_err(unavailable)
    }

    async fn update_desired(
        &self,
        device_id: &str,
        patch: &Object,
        expected_version: i64,
        now: SystemTime,
    ) -> Result<Updated, StorageError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = desired::Request {
            device_id: device_id.to_owned(),
            patch: patch.clone(),
            expected_version,
            now,
            reply,
        };
        let gone = || StorageError::Unavailable("the desired state writer stopped".into());
        self.desired.send(request).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn apply_reported(
        &self,
        patches: &[ReportedPatch],
    ) -> Result<Vec<Reported>, StorageError> {
        let mut ids: Vec<String> = patches.iter().map(|p| p.device_id.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut change = Change::begin(&self.pool, &ids).await.map_err(unavailable)?;
        let outcomes = patches
            .iter()
            .map(
                |p| match change.apply(&p.device_id, Side::Reported, &p.patch, p.received_at) {
                    Ok(_) => Reported::Applied,
                    Err(why) => Reported::Refused(why),
                },
            )
            .collect();
        change.commit(true).await.map_err(unavailable)?;
        Ok(outcomes)
    }

    /// Notes acknowledged publishes, with `synchronous_commit` off: a note
    /// a crash undoes only means a publish again after the restart. It
    /// takes the counter row's lock first, as every change does: rows of
    /// `device_states` are only ever locked under it, so two transactions
    /// never lock them in opposite orders (a deadlock PostgreSQL would end
    /// by failing one, a batch of calls among them).
    async fn published(&self, published: &[(String, i64)]) -> Result<(), StorageError> {
        let (ids, versions): (Vec<&str>, Vec<i64>) =
            published.iter().map(|(id, v)| (id.as_str(), *v)).unzip();
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        without_flush(&mut tx).await.map_err(unavailable)?;
        sqlx::query("SELECT 1 FROM device_state_counter WHERE id = 1 FOR UPDATE")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query(
            "UPDATE device_states d SET published_version = GREATEST(d.published_version, p.version) \
             FROM unnest($1::text[], $2::int8[]) AS p(device_id, version) \
             WHERE d.device_id = p.device_id",
        )
        .bind(&ids)
        .bind(&versions)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)
    }

    async fn page(
        &self,
        devices: &DeviceSet,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeviceState>, StorageError> {
        let mut page = Vec::new();
        let mut after = after.unwrap_or("").to_owned();
        loop {
            let rows = sqlx::query(
                "SELECT device_id, version, state FROM device_states \
                 WHERE device_id > $1 ORDER BY device_id LIMIT $2",
            )
            .bind(&after)
            .bind(PAGE_FETCH)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            for row in &rows {
                let state = decode(row).map_err(unavailable)?;
                after.clone_from(&state.device_id);
                if devices.allows(&state.device_id) {
                    page.push(state);
                    if page.len() == limit {
                        return Ok(page);
                    }
                }
            }
            if (rows.len() as i64) < PAGE_FETCH {
                return Ok(page);
            }
        }
    }
}

impl StateStorage for PgStates {
    fn get<'a>(
        &'a self,
        device_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<DeviceState>, StorageError>> {
        PgStates::get(self, device_id).boxed()
    }

    fn update_desired<'a>(
        &'a self,
        device_id: &'a str,
        patch: &'a Object,
        expected_version: i64,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Updated, StorageError>> {
        PgStates::update_desired(self, device_id, patch, expected_version, now).boxed()
    }

    fn apply_reported<'a>(
        &'a self,
        patches: &'a [ReportedPatch],
    ) -> BoxFuture<'a, Result<Vec<Reported>, StorageError>> {
        PgStates::apply_reported(self, patches).boxed()
    }

    fn page<'a>(
        &'a self,
        devices: &'a DeviceSet,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeviceState>, StorageError>> {
        PgStates::page(self, devices, after, limit).boxed()
    }

    fn version(&self) -> BoxFuture<'_, Result<i64, StorageError>> {
        async {
            sqlx::query_scalar("SELECT version FROM device_state_counter WHERE id = 1")
                .fetch_one(&self.pool)
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    fn unpublished(&self) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        async {
            sqlx::query_scalar(
                "SELECT device_id FROM device_states WHERE published_version < desired_version",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)
        }
        .boxed()
    }

    fn published<'a>(
        &'a self,
        published: &'a [(String, i64)],
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        PgStates::published(self, published).boxed()
    }

    fn memory_use(&self) -> Option<(usize, usize)> {
        None
    }
}
