//! Persistent commands in PostgreSQL: [`PgCommandLog`], the commands'
//! [`CommandLog`] over the `commands` table (`migrations/0004_commands.sql`),
//! and (`changes.rs`) the tail that hands every instance's changes to this
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

use super::{micros, Postgres, StoreError};
use crate::{
    commands::{
        ActiveDevice, Claimed, Command, CommandLog, CommandPage, CommandQuery, CommandState, Feed,
        LogError, NewCommand, Publication, Replied,
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

mod changes;

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
        sqlx::query("SELECT set_config('synchronous_commit', 'off', true)")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
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

    async fn insert(
        &self,
        new: NewCommand,
        max: usize,
        per_device: usize,
    ) -> Result<Command, LogError> {
        const INSERT: &str = changing!(
            "INSERT INTO commands (id, device_id, command, params, topic, payload, qos, \
                state, create_time, expire_time, update_time) \
             SELECT $1::uuid, $2, $3, $4, $5, $6, $7, 1, ",
            at!(8),
            ", ",
            at!(9),
            ", ",
            at!(8),
            " WHERE (SELECT count(*) FROM commands WHERE state IN (1, 2)) < $10 \
               AND (SELECT count(*) FROM commands WHERE state IN (1, 2) AND device_id = $2) < $11 \
             RETURNING commands.*"
        );
        let device_id = new.device_id.clone();
        let query = sqlx::query(INSERT)
            .bind(new.id.to_string())
            .bind(&new.device_id)
            .bind(&new.name)
            .bind(new.params.map(serde_json::Value::Object))
            .bind(&new.publish.topic)
            .bind(new.publish.payload.to_vec())
            .bind(i16::from(new.publish.qos))
            .bind(micros(new.create_time) as i64)
            .bind(micros(new.expire_time) as i64)
            .bind(max as i64)
            .bind(per_device as i64);
        if let Some(inserted) = self.change(query).await?.pop() {
            return Ok(inserted);
        }
        // Refused: which bound?
        let (total, device): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE device_id = $1) \
             FROM commands WHERE state IN (1, 2)",
        )
        .bind(&device_id)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        let counters = self.feed.counters();
        counters
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(match total as usize >= max || device < per_device as i64 {
            true => LogError::Full(max),
            false => LogError::DeviceFull {
                device_id,
                max: per_device,
            },
        })
    }

    async fn get(&self, id: Uuid) -> Result<Option<Command>, LogError> {
        const GET: &str = concat!(
            "SELECT ",
            command_columns!(),
            " FROM commands WHERE id = $1::uuid"
        );
        let row = sqlx::query(GET)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(command).transpose().map_err(unavailable)
    }

    async fn list(&self, query: &CommandQuery) -> Result<CommandPage, LogError> {
        const LIST: &str = concat!(
            "SELECT ",
            command_columns!(),
            " FROM commands \
             WHERE ($1::uuid IS NULL OR id < $1::uuid) \
               AND ($2::text IS NULL OR device_id = $2) \
               AND (cardinality($3::int2[]) = 0 OR state = ANY($3)) \
             ORDER BY id DESC LIMIT $4"
        );
        let states: Vec<i16> = query.states.iter().map(|s| state_no(*s)).collect();
        let mut page = CommandPage::default();
        let mut before = query.before;
        let mut examined = 0;
        loop {
            let rows = sqlx::query(LIST)
                .bind(before.map(|id| id.to_string()))
                .bind(query.device_id.as_deref())
                .bind(&states)
                .bind(LIST_FETCH)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
            let fetched = rows.len();
            for row in &rows {
                if page.commands.len() == query.page_size || examined == MAX_EXAMINED_PER_PAGE {
                    page.next = before;
                    return Ok(page);
                }
                let command = command(row).map_err(unavailable)?;
                examined += 1;
                before = Some(command.id);
                if query.matches(&command) {
                    page.commands.push(command);
                }
            }
            if (fetched as i64) < LIST_FETCH {
                return Ok(page); // looked at everything
            }
        }
    }

    async fn cancel(&self, id: Uuid) -> Result<Result<Command, Option<CommandState>>, LogError> {
        const CANCEL: &str = changing!(
            "UPDATE commands SET state = 6, payload = NULL, lease_owner = NULL, \
                update_time = ",
            at!(2),
            " WHERE id = $1::uuid AND state IN (1, 2) RETURNING commands.*"
        );
        let query = sqlx::query(CANCEL)
            .bind(id.to_string())
            .bind(micros(SystemTime::now()) as i64);
        if let Some(cancelled) = self.change(query).await?.pop() {
            return Ok(Ok(cancelled));
        }
        Ok(Err(self.get(id).await?.map(|c| c.state)))
    }

    async fn claim(
        &self,
        device_ids: &[String],
        (limit, total): (usize, usize),
        in_flight: Option<u32>,
        now: SystemTime,
    ) -> Result<Vec<Claimed>, LogError> {
        if device_ids.is_empty() {
            return Ok(Vec::new());
        }
        // Its own transaction: the claim's statement must see what the
        // claims before it (holding the devices' locks) committed. The
        // locks are taken in one order, so that two claims of overlapping
        // devices never wait for each other in a circle. A claim a crash
        // undoes is claimed again: no wait for the disk.
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query(
            "SELECT set_config('synchronous_commit', 'off', true), \
                    count(pg_advisory_xact_lock(h)) \
             FROM (SELECT DISTINCT hashtextextended(d, 7027) AS h \
                   FROM unnest($1::text[]) AS d ORDER BY h) locks",
        )
        .bind(device_ids)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        const CLAIM: &str = concat!(
            "WITH busy AS (SELECT DISTINCT device_id FROM commands \
                WHERE device_id = ANY($1) AND state = 1 AND lease_until > ",
            at!(2),
            "), in_flight AS (SELECT device_id, count(*) AS n FROM commands \
                WHERE device_id = ANY($1) AND state = 2 GROUP BY device_id), \
             ranked AS (SELECT id, device_id, \
                    row_number() OVER (PARTITION BY device_id ORDER BY accepted) AS r \
                FROM commands WHERE device_id = ANY($1) AND state = 1 AND expire_time > ",
            at!(2),
            " AND device_id NOT IN (SELECT device_id FROM busy)), \
             picked AS (SELECT ranked.id FROM ranked LEFT JOIN in_flight USING (device_id) \
                WHERE ranked.r <= least($3, $4 - coalesce(in_flight.n, 0)) \
                ORDER BY ranked.r LIMIT $7) \
             UPDATE commands c SET lease_owner = $5::uuid, lease_until = ",
            at!(6),
            " FROM picked WHERE c.id = picked.id \
             RETURNING c.id::text AS id, c.device_id, c.accepted, c.topic, c.payload, c.qos, ",
            micros_of!("c.expire_time"),
            " AS expire_time"
        );
        let cap = in_flight.map_or(i64::MAX, i64::from);
        let rows = sqlx::query(CLAIM)
            .bind(device_ids)
            .bind(micros(now) as i64)
            .bind(limit as i64)
            .bind(cap)
            .bind(self.owner.to_string())
            .bind(micros(now + LEASE) as i64)
            .bind(total as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let payload: Option<Vec<u8>> = row.try_get("payload")?;
                let accepted: i64 = row.try_get("accepted")?;
                Ok::<_, sqlx::Error>((
                    accepted,
                    Claimed {
                        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(e.into()))?,
                        device_id: row.try_get("device_id")?,
                        expire_time: time(row.try_get("expire_time")?),
                        publish: Publication {
                            topic: row.try_get("topic")?,
                            payload: payload.unwrap_or_default().into(),
                            qos: row.try_get::<i16, _>("qos")?.clamp(0, 2) as u8,
                        },
                    },
                ))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        // Acceptance order is each device's order too.
        claimed.sort_by_key(|(accepted, _)| *accepted);
        Ok(claimed.into_iter().map(|(_, c)| c).collect())
    }

    async fn sent(&self, ids: &[Uuid], at: SystemTime) -> Result<Vec<Command>, LogError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        const SENT: &str = changing!(
            "UPDATE commands SET state = 2, attempts = attempts + 1, \
                lease_owner = NULL, lease_until = NULL, sent_at = ",
            at!(2),
            ", update_time = ",
            at!(2),
            " WHERE id = ANY($1::uuid[]) AND state = 1 AND lease_owner = $3::uuid \
             RETURNING commands.*"
        );
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let query = sqlx::query(SENT)
            .bind(ids)
            .bind(micros(at) as i64)
            .bind(self.owner.to_string());
        self.change_lightly(query).await
    }

    async fn release(&self, ids: &[Uuid]) -> Result<(), LogError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        sqlx::query(
            "UPDATE commands SET lease_owner = NULL, lease_until = NULL \
             WHERE id = ANY($1::uuid[]) AND lease_owner = $2::uuid",
        )
        .bind(ids)
        .bind(self.owner.to_string())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn replied(
        &self,
        device_id: &str,
        id: Uuid,
        reply: DeviceReply,
    ) -> Result<Replied, LogError> {
        // Not while it is being published: its SENT comes first.
        const REPLIED: &str = changing!(
            "UPDATE commands SET state = $3, reply = $4, payload = NULL, lease_owner = NULL, \
                update_time = ",
            at!(5),
            " WHERE id = $1::uuid AND device_id = $2 AND state IN (1, 2) \
               AND (lease_until IS NULL OR lease_until <= ",
            at!(6),
            ") RETURNING commands.*"
        );
        let state = match reply.ok {
            true => CommandState::Succeeded,
            false => CommandState::Failed,
        };
        let now = micros(SystemTime::now()) as i64;
        let query = sqlx::query(REPLIED)
            .bind(id.to_string())
            .bind(device_id)
            .bind(state_no(state))
            .bind(reply_json(&reply))
            .bind(micros(reply.received_at) as i64)
            .bind(now);
        if let Some(ended) = self.change(query).await?.pop() {
            return Ok(Replied::Recorded(Box::new(ended)));
        }
        // Not changed: ended, not ours, or claimed at that moment. Still
        // active now means it was claimed (and maybe published since):
        // worth another try.
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM commands WHERE id = $1::uuid AND device_id = $2 \
               AND state IN (1, 2)",
        )
        .bind(id.to_string())
        .bind(device_id)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(match active {
            0 => Replied::NotActive,
            _ => Replied::Publishing,
        })
    }

    async fn went_away(
        &self,
        device_id: &str,
        at: SystemTime,
        max_attempts: u32,
    ) -> Result<usize, LogError> {
        const WENT_AWAY: &str = changing!(
            "UPDATE commands SET \
                state = CASE WHEN attempts >= $3 THEN 4 ELSE 1 END, \
                payload = CASE WHEN attempts >= $3 THEN NULL ELSE payload END, \
                update_time = ",
            at!(4),
            " WHERE device_id = $1 AND state = 2 AND sent_at < ",
            at!(2),
            " RETURNING commands.*"
        );
        let query = sqlx::query(WENT_AWAY)
            .bind(device_id)
            .bind(micros(at) as i64)
            .bind(max_attempts as i32)
            .bind(micros(SystemTime::now()) as i64);
        Ok(self.change_lightly(query).await?.len())
    }

    async fn expire(&self, now: SystemTime) -> Result<usize, LogError> {
        const EXPIRE: &str = changing!(
            "UPDATE commands SET state = 5, payload = NULL, lease_owner = NULL, update_time = ",
            at!(1),
            " WHERE state IN (1, 2) AND expire_time <= ",
            at!(1),
            " RETURNING commands.*"
        );
        let query = sqlx::query(EXPIRE).bind(micros(now) as i64);
        Ok(self.change_lightly(query).await?.len())
    }

    async fn forget(&self, before: SystemTime) -> Result<usize, LogError> {
        // Bounded per statement, as readings' retention is.
        const FORGET: &str = concat!(
            "DELETE FROM commands WHERE id IN (SELECT id FROM commands \
               WHERE state > 2 AND update_time < ",
            at!(1),
            " LIMIT 10000)"
        );
        let deleted = sqlx::query(FORGET)
            .bind(micros(before) as i64)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?
            .rows_affected();
        // Changes every tail has long read.
        const FORGET_CHANGES: &str =
            concat!("DELETE FROM command_changes WHERE update_time < ", at!(1));
        let kept_since = SystemTime::now()
            .checked_sub(CHANGES_KEPT)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        sqlx::query(FORGET_CHANGES)
            .bind(micros(kept_since) as i64)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(deleted as usize)
    }

    async fn active_devices(&self) -> Result<Vec<ActiveDevice>, LogError> {
        const ACTIVE: &str = concat!(
            "SELECT device_id, \
                count(*) FILTER (WHERE state = 1), \
                count(*) FILTER (WHERE state = 2), \
                min(",
            micros_of!("sent_at"),
            ") FILTER (WHERE state = 2) \
             FROM commands WHERE state IN (1, 2) GROUP BY device_id"
        );
        let rows: Vec<(String, i64, i64, Option<i64>)> = sqlx::query_as(ACTIVE)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .map(|(device_id, queued, sent, oldest)| ActiveDevice {
                device_id,
                queued: queued as u32,
                sent: sent as u32,
                oldest_sent_at: oldest.map(time),
            })
            .collect())
    }

    async fn counts(&self) -> Result<Vec<(CommandState, u64)>, LogError> {
        let rows: Vec<(i16, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM commands GROUP BY state")
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(CommandState::ALL
            .into_iter()
            .map(|state| {
                let n = rows
                    .iter()
                    .find(|(no, _)| *no == state_no(state))
                    .map_or(0, |(_, n)| *n as u64);
                (state, n)
            })
            .collect())
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
