//! The transitions that are not publishing: a new command, a cancel, a
//! reply, a device that went away, expiry; and forgetting ended commands.
//! Each is one statement naming the states it starts from. See `mod.rs`.

use std::time::SystemTime;

use uuid::Uuid;

use super::{micros, reply_json, state_no, unavailable, PgCommandLog, CHANGES_KEPT};
use crate::{
    commands::{Command, CommandState, LogError, NewCommand, Replied},
    replies::DeviceReply,
};

impl PgCommandLog {
    pub(super) async fn insert(
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

    pub(super) async fn cancel(
        &self,
        id: Uuid,
    ) -> Result<Result<Command, Option<CommandState>>, LogError> {
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

    pub(super) async fn replied(
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

    pub(super) async fn went_away(
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

    pub(super) async fn expire(&self, now: SystemTime) -> Result<usize, LogError> {
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

    pub(super) async fn forget(&self, before: SystemTime) -> Result<usize, LogError> {
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
}
