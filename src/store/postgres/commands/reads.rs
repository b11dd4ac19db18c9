//! Reading commands back: one, a page, the devices with active ones, the
//! counts by state. See `mod.rs`.

use uuid::Uuid;

use super::{
    command, state_no, time, unavailable, PgCommandLog, LIST_FETCH, MAX_EXAMINED_PER_PAGE,
};
use crate::commands::{ActiveDevice, Command, CommandPage, CommandQuery, CommandState, LogError};

impl PgCommandLog {
    pub(super) async fn get(&self, id: Uuid) -> Result<Option<Command>, LogError> {
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

    pub(super) async fn list(&self, query: &CommandQuery) -> Result<CommandPage, LogError> {
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

    pub(super) async fn active_devices(&self) -> Result<Vec<ActiveDevice>, LogError> {
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

    pub(super) async fn counts(&self) -> Result<Vec<(CommandState, u64)>, LogError> {
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
