//! Persistent commands in PostgreSQL: [`PgCommandLog`], the commands'
//! [`CommandLog`] over the `commands` table (`migrations/0004_commands.sql`).
//! This file: the pool, the statements' shared parts (macros, decoding) and
//! the trait's impl; `claims.rs` publishing (claims, SENT, release),
//! `transitions.rs` the other changes, `reads.rs` reading back, and
//! `changes.rs` the tail that hands every instance's changes to this
//! instance's feed.
//!
//! - Every transition is one statement that names the states it starts
//!   from, and records its changes in `command_changes` under the counter
//!   row's lock, with a NOTIFY: so changes are numbered in commit order
//!   across instances, and every instance's WatchCommands sees them alike.
//! - Claims: publishing a device's commands takes an advisory lock on the
//!   device (for the claim's short transaction only) and a lease on the
//!   rows (`lease_owner`, `lease_until`): while one instance publishes a
//!   device's commands no other claims any of that device's, so they go out
//!   in order and exactly once. An instance that dies while publishing
//!   leaves a lease that ends after [`LEASE`]; then another publishes them
//!   (again, if the first had: at least once).
//! - Its own pool ([`COMMAND_CONNECTIONS`], each statement under the read
//!   timeout), so that neither ingest nor busy client reads delay commands.

use std::time::{Duration, SystemTime};

use futures_util::future::{BoxFuture, FutureExt};
use sqlx::{postgres::PgRow, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{micros, without_flush, Postgres, StoreError};
use crate::{
    commands::{
        ActiveDevice, Claimed, Command, CommandLog, CommandPage, CommandQuery, CommandState, Feed,
        LogError, NewCommand, Replied,
    },
    replies::DeviceReply,
};

/// Connections of the commands' pool, the change tail's LISTEN included.
pub const COMMAND_CONNECTIONS: u32 = 6;
/// How long a claim holds a device's commands for its publisher.
pub const LEASE: Duration = Duration::from_secs(30);
/// Most commands one ListCommands page looks at, matching or not.
const MAX_EXAMINED_PER_PAGE: usize = 10_000;
/// Rows one page's query fetches at a time.
const LIST_FETCH: i64 = 1_000;
/// How long read changes are kept for tails that lag.
const CHANGES_KEPT: Duration = Duration::from_secs(600);

/// A time parameter, bound as microseconds since the epoch.
macro_rules! at {
    ($n:literal) => {
        concat!(
            "('epoch'::timestamptz + $",
            $n,
            " * interval '1 microsecond')"
        )
    };
}

/// A time column read as microseconds since the epoch.
macro_rules! micros_of {
    ($c:literal) => {
        concat!("(extract(epoch FROM ", $c, ") * 1000000)::int8")
    };
}

/// The columns [`command`] decodes.
macro_rules! command_columns {
    () => {
        concat!(
            "id::text AS id, device_id, command, params, state, ",
            micros_of!("create_time"),
            " AS create_time, ",
            micros_of!("expire_time"),
            " AS expire_time, ",
            micros_of!("update_time"),
            " AS update_time, attempts, reply"
        )
    };
}

/// What every changing statement ends with: its changes (the CTE
/// `changed`, the changed rows as `RETURNING commands.*`) numbered
/// under the counter row's lock, logged, and notified; then the changed
/// rows, decoded by [`command`].
macro_rules! record_changes {
    () => {
        concat!(
            ", counter AS (UPDATE command_change_counter \
                SET next_seq = next_seq + (SELECT count(*) FROM changed) \
                WHERE id = 1 AND EXISTS (SELECT 1 FROM changed) \
                RETURNING next_seq - (SELECT count(*) FROM changed) AS first), \
             logged AS (INSERT INTO command_changes (seq, command_id, state, attempts, update_time) \
                SELECT counter.first + row_number() OVER (ORDER BY changed.accepted) - 1, \
                       changed.id, changed.state, changed.attempts, changed.update_time \
                FROM changed, counter) \
             SELECT ",
            command_columns!(),
            ", (SELECT count(*) FROM (SELECT pg_notify('devicehub_commands', '') FROM counter) n) \
             FROM changed ORDER BY accepted"
        )
    };
}

/// The channel each change notifies.
const CHANNEL: &str = "devicehub_commands";

/// The commands' log in the store. Cheap to clone.
#[derive(Clone)]
pub struct PgCommandLog {
    pool: PgPool,
    feed: Feed,
    /// This instance, as the owner of its claims.
    owner: Uuid,
}

impl Postgres {
    /// The commands' log, with its change tail feeding `feed` until
    /// `shutdown`.
    pub async fn command_log(
        &self,
        feed: Feed,
        shutdown: CancellationToken,
    ) -> Result<PgCommandLog, StoreError> {
        let log = PgCommandLog {
            pool: self.commands_pool().clone(),
            feed,
            owner: Uuid::now_v7(),
        };
        changes::start(log.clone(), shutdown).await?;
        Ok(log)
    }
}

fn unavailable(error: sqlx::Error) -> LogError {
    LogError::Unavailable(error.to_string())
}

/// The state's number in the table (the proto's).
fn state_no(state: CommandState) -> i16 {
    match state {
        CommandState::Queued => 1,
        CommandState::Sent => 2,
        CommandState::Succeeded => 3,
        CommandState::Failed => 4,
        CommandState::Expired => 5,
        CommandState::Cancelled => 6,
    }
}

fn state_of(no: i16) -> Result<CommandState, sqlx::Error> {
    CommandState::ALL
        .into_iter()
        .find(|s| state_no(*s) == no)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown command state {no}").into()))
}

fn time(micros: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64)
}

fn reply_json(reply: &DeviceReply) -> serde_json::Value {
    serde_json::json!({
        "ok": reply.ok,
        "result": reply.result,
        "message": reply.message,
        "received_at": micros(reply.received_at),
    })
}

fn reply_of(json: serde_json::Value) -> Option<DeviceReply> {
    Some(DeviceReply {
        ok: json.get("ok")?.as_bool()?,
        result: json.get("result").filter(|r| !r.is_null()).cloned(),
        message: json.get("message")?.as_str()?.to_owned(),
        received_at: time(json.get("received_at")?.as_i64()?),
    })
}

/// A row of [`command_columns`].
fn command(row: &PgRow) -> Result<Command, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let params: Option<serde_json::Value> = row.try_get("params")?;
    let reply: Option<serde_json::Value> = row.try_get("reply")?;
    Ok(Command {
        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(e.into()))?,
        device_id: row.try_get("device_id")?,
        name: row.try_get("command")?,
        params: params.and_then(|p| match p {
            serde_json::Value::Object(map) => Some(map),
            _ => None,
        }),
        state: state_of(row.try_get("state")?)?,
        create_time: time(row.try_get("create_time")?),
        expire_time: time(row.try_get("expire_time")?),
        update_time: time(row.try_get("update_time")?),
        attempts: row.try_get::<i32, _>("attempts")?.max(0) as u32,
        reply: reply.and_then(reply_of),
    })
}

/// A changing statement: `$changed` is the CTE's body (an INSERT or UPDATE
/// ending in `RETURNING commands.*`).
macro_rules! changing {
    ($($changed:expr),+ $(,)?) => {
        concat!("WITH changed AS (", $($changed),+, ")", record_changes!())
    };
}

// After the macros, which they use.
mod changes;
mod claims;
mod reads;
mod transitions;

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl PgCommandLog {
    /// Runs a changing statement and counts its changes. Committed as
    /// any: flushed to disk before this returns.
    async fn change(&self, query: Query<'_>) -> Result<Vec<Command>, LogError> {
        let rows = query.fetch_all(&self.pool).await.map_err(unavailable)?;
        self.changed(&rows)
    }

    /// Like [`Self::change`], for changes a crash may undo without harm
    /// (`synchronous_commit` off for its transaction: no wait for the
    /// disk): claims and publishes, which come again after a crash
    /// (delivery is at least once), expiries, which the next tick makes
    /// again. Never a new command, a reply or a cancel: those are told to
    /// someone as done.
    async fn change_lightly(&self, query: Query<'_>) -> Result<Vec<Command>, LogError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        without_flush(&mut tx).await.map_err(unavailable)?;
        let rows = query.fetch_all(&mut *tx).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        self.changed(&rows)
    }

    fn changed(&self, rows: &[PgRow]) -> Result<Vec<Command>, LogError> {
        let changed = rows
            .iter()
            .map(command)
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        for command in &changed {
            self.feed.count(command);
        }
        Ok(changed)
    }
}

impl CommandLog for PgCommandLog {
    fn insert(
        &self,
        new: NewCommand,
        max: usize,
        per_device: usize,
    ) -> BoxFuture<'_, Result<Command, LogError>> {
        PgCommandLog::insert(self, new, max, per_device).boxed()
    }

    fn get(&self, id: Uuid) -> BoxFuture<'_, Result<Option<Command>, LogError>> {
        PgCommandLog::get(self, id).boxed()
    }

    fn list<'a>(&'a self, query: &'a CommandQuery) -> BoxFuture<'a, Result<CommandPage, LogError>> {
        PgCommandLog::list(self, query).boxed()
    }

    fn cancel(
        &self,
        id: Uuid,
    ) -> BoxFuture<'_, Result<Result<Command, Option<CommandState>>, LogError>> {
        PgCommandLog::cancel(self, id).boxed()
    }

    fn claim<'a>(
        &'a self,
        device_ids: &'a [String],
        limits: (usize, usize),
        in_flight: Option<u32>,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Vec<Claimed>, LogError>> {
        PgCommandLog::claim(self, device_ids, limits, in_flight, now).boxed()
    }

    fn sent<'a>(
        &'a self,
        ids: &'a [Uuid],
        at: SystemTime,
    ) -> BoxFuture<'a, Result<Vec<Command>, LogError>> {
        PgCommandLog::sent(self, ids, at).boxed()
    }

    fn release<'a>(&'a self, ids: &'a [Uuid]) -> BoxFuture<'a, Result<(), LogError>> {
        PgCommandLog::release(self, ids).boxed()
    }

    fn replied<'a>(
        &'a self,
        device_id: &'a str,
        id: Uuid,
        reply: DeviceReply,
    ) -> BoxFuture<'a, Result<Replied, LogError>> {
        PgCommandLog::replied(self, device_id, id, reply).boxed()
    }

    fn went_away<'a>(
        &'a self,
        device_id: &'a str,
        at: SystemTime,
        max_attempts: u32,
    ) -> BoxFuture<'a, Result<usize, LogError>> {
        PgCommandLog::went_away(self, device_id, at, max_attempts).boxed()
    }

    fn expire(&self, now: SystemTime) -> BoxFuture<'_, Result<usize, LogError>> {
        PgCommandLog::expire(self, now).boxed()
    }

    fn forget(&self, before: SystemTime) -> BoxFuture<'_, Result<usize, LogError>> {
        PgCommandLog::forget(self, before).boxed()
    }

    fn active_devices(&self) -> BoxFuture<'_, Result<Vec<ActiveDevice>, LogError>> {
        PgCommandLog::active_devices(self).boxed()
    }

    fn counts(&self) -> BoxFuture<'_, Result<Vec<(CommandState, u64)>, LogError>> {
        PgCommandLog::counts(self).boxed()
    }
}
