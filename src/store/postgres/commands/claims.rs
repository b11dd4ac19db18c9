//! Publishing a device's commands: claims (a transaction holding the
//! devices' advisory locks, then a lease on the rows), and what became of
//! the publishes (SENT, or released back to QUEUED). See `mod.rs`.

use std::time::SystemTime;

use sqlx::Row;
use uuid::Uuid;

use super::{micros, time, unavailable, PgCommandLog, LEASE};
use crate::commands::{Claimed, Command, LogError, Publication};

impl PgCommandLog {
    pub(super) async fn claim(
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

    pub(super) async fn sent(
        &self,
        ids: &[Uuid],
        at: SystemTime,
    ) -> Result<Vec<Command>, LogError> {
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

    pub(super) async fn release(&self, ids: &[Uuid]) -> Result<(), LogError> {
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
}
