//! The PostgreSQL store: [`Postgres`], a cheap handle over two connection
//! pools.
//!
//! - this file: connecting, the pools, the migrations (`migrations/` at
//!   the crate root, embedded at build time and run at startup, each once,
//!   recorded in `_sqlx_migrations`);
//! - [`reads`]: reading back: the device list at startup (in batches),
//!   pages and the replay of a resume cursor older than the memory window;
//! - [`aggregate`]: AggregateReadings' buckets, in one statement;
//! - [`writer`]: the writer task that commits what ingest hands it;
//! - [`retention`]: deletes readings past `--store-retention`;
//! - [`tail`]: with replicas, makes memory follow every instance's commits;
//! - [`commands`]: persistent commands, their claims and their change tail,
//!   on a pool of their own.
//!
//! Every statement is a constant string with bound parameters; nothing a
//! client sends becomes SQL text. Time ranges are turned into sequence
//! ranges first (received times never go backwards as numbers go up, as in
//! the memory buffer), so pages walk the primary key or the
//! `(device_id, seq)` index.
//!
//! # Readers cannot starve the writer
//! Ingest's path (the writer, retention, the tail) has a pool of its own,
//! [`WRITE_CONNECTIONS`], which no client call ever takes a connection
//! from. Client reads (pages, replays) share a separate pool of
//! [`READ_CONNECTIONS`]: a read that cannot get one within
//! [`READ_ACQUIRE_TIMEOUT`] answers UNAVAILABLE instead of queueing, and
//! every read statement runs under `statement_timeout`
//! (`--store-read-timeout`, set on each read connection), so a slow or
//! blocked read gives its connection back. A page looks at no more than
//! `reads::MAX_SCAN_ROWS` rows, and holds one fetch at a time.

/// The columns [`reading`] decodes, in its order, then the message's kind
/// and status (`writer::kind_of`).
macro_rules! reading_columns {
    () => {
        "seq, device_id, topic, payload, qos, retained, \
         (extract(epoch FROM received_at) * 1000000)::int8, kind, status"
    };
}

mod aggregate;
mod commands;
mod reads;
mod retention;
mod states;
mod tail;
mod writer;

use std::{
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions, PgSslMode},
    PgPool, Row,
};
use tokio::sync::watch;

use crate::config::StoreConfig;

pub use retention::spawn_retention;
pub use tail::spawn_tail;
pub use writer::{spawn_writer, Writer};

/// Connections of ingest's pool: one each for the writer (its commits and
/// idle probes), retention, the tail's LISTEN and the tail's reads. Each
/// task uses one at a time, so none ever waits for another's.
const WRITE_CONNECTIONS: u32 = 4;
/// How long ingest's tasks wait for a connection before the attempt fails
/// (and is retried with backoff, as any failure).
const WRITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections client reads (pages, replays) use at once, at most.
const READ_CONNECTIONS: u32 = 8;
/// How long a read waits for a connection before it answers UNAVAILABLE:
/// short, so that reads beyond what the pool serves are refused rather
/// than queued without end.
const READ_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Why the store could not be opened or read. The text never holds the
/// store URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("--store-url is not a postgres:// URL PostgreSQL's client accepts")]
    Url,
    #[error("cannot reach the PostgreSQL store: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migrating the PostgreSQL store: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("PostgreSQL: {0}")]
    Query(#[from] sqlx::Error),
}

/// The store handle. Clones share the pools.
#[derive(Clone)]
pub struct Postgres {
    shared: Arc<Shared>,
}

struct Shared {
    /// Ingest's: the writer, retention and the tail, never client calls.
    write_pool: PgPool,
    /// Client reads', each statement under the read timeout.
    read_pool: PgPool,
    /// AggregateReadings statements running on the read pool, at most
    /// [`aggregate::AT_ONCE`]: each may scan a device's history for up to
    /// the read timeout, and pages and replays keep the rest of the pool.
    aggregates: tokio::sync::Semaphore,
    /// Persistent commands' (`commands/`), each statement under the read
    /// timeout.
    commands_pool: PgPool,
    /// Device states' (`states/`), each statement under the read timeout.
    states_pool: PgPool,
    /// Whether the last statement the writer ran (a commit or its idle
    /// probe) succeeded: health follows it.
    up: watch::Sender<bool>,
    /// Sequence number of the oldest reading kept (`u64::MAX`: none yet).
    /// Moved up by retention and down by the first commit; pages read it
    /// to know whether the table reaches further back than memory.
    oldest_seq: AtomicU64,
    pub(super) counters: StoreCounters,
}

/// What the store counts, for `/metrics` and the stats line.
#[derive(Debug, Default)]
pub struct StoreCounters {
    pub committed_readings: AtomicU64,
    pub commits: AtomicU64,
    /// Commits that failed (and were retried).
    pub errors: AtomicU64,
    /// Readings deleted by retention.
    pub retention_deleted: AtomicU64,
    /// Readings the database refused for their content, left out of their
    /// commits.
    pub refused_readings: AtomicU64,
}

/// Where the table stands at startup.
#[derive(Debug, Clone, Copy)]
pub struct StoreStart {
    /// The sequence number the next committed reading gets.
    pub next_seq: u64,
    /// The newest reading's time, in microseconds since the Unix epoch.
    pub newest_micros: u64,
}

/// Whether a store `url` whose host is `host` gets `sslmode=require`: when
/// neither the URL nor `PGSSLMODE` chose a mode and the host is not this
/// machine (a loopback name or address, or a Unix socket directory).
fn tls_required(url: &str, host: &str) -> bool {
    let chosen = url.split_once('?').is_some_and(|(_, query)| {
        // sqlx takes both spellings.
        query
            .split('&')
            .any(|p| p.starts_with("sslmode=") || p.starts_with("ssl-mode="))
    }) || std::env::var_os("PGSSLMODE").is_some();
    let local = host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !chosen && !local
}

impl Postgres {
    /// Connects, runs the pending migrations and reads where the table
    /// stands.
    pub async fn connect(config: &StoreConfig) -> Result<(Self, StoreStart), StoreError> {
        let mut options =
            PgConnectOptions::from_str(config.url.expose()).map_err(|_| StoreError::Url)?;
        if let Some(password) = &config.password {
            options = options.password(password.expose());
        }
        options = options.application_name("devicehub");
        if tls_required(config.url.expose(), options.get_host()) {
            // sqlx's default, `prefer`, falls back to plaintext without a
            // word when the server offers no TLS: beyond this machine that
            // would send readings (and the password) in the clear.
            tracing::info!(
                host = options.get_host(),
                "PostgreSQL beyond loopback without sslmode in the URL: sslmode=require"
            );
            options = options.ssl_mode(PgSslMode::Require);
        }
        // No ping before every statement (a round trip each): a connection
        // the server dropped fails its statement, which the writer retries
        // and a page reports as UNAVAILABLE, and the pool then replaces it.
        let pool_options = |connections, acquire| {
            PgPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(acquire)
                .test_before_acquire(false)
        };
        let pool = pool_options(WRITE_CONNECTIONS, WRITE_ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(StoreError::Connect)?;
        // Set at connection start (no statement of its own), for every
        // statement of the connection. At least 1 ms: 0 would turn the
        // timeout off.
        let timeout_ms = config.read_timeout.as_millis().clamp(1, i32::MAX as u128);
        let read_options = options.options([("statement_timeout", timeout_ms.to_string())]);
        let read_pool = pool_options(READ_CONNECTIONS, READ_ACQUIRE_TIMEOUT)
            .connect_with(read_options.clone())
            .await
            .map_err(StoreError::Connect)?;
        let commands_pool = pool_options(commands::COMMAND_CONNECTIONS, READ_ACQUIRE_TIMEOUT)
            .connect_with(read_options.clone())
            .await
            .map_err(StoreError::Connect)?;
        let states_pool = pool_options(states::STATE_CONNECTIONS, READ_ACQUIRE_TIMEOUT)
            .connect_with(read_options)
            .await
            .map_err(StoreError::Connect)?;
        MIGRATOR.run(&pool).await?;
        let row = sqlx::query(
            "SELECT (SELECT next_seq FROM devicehub_sequence WHERE id = 1), \
                    (SELECT min(seq) FROM readings), \
                    (SELECT (extract(epoch FROM max(received_at)) * 1000000)::int8 FROM readings)",
        )
        .fetch_one(&pool)
        .await?;
        let next_seq: i64 = row.try_get(0)?;
        let oldest: Option<i64> = row.try_get(1)?;
        let newest_micros: Option<i64> = row.try_get(2)?;
        let store = Self {
            shared: Arc::new(Shared {
                write_pool: pool,
                read_pool,
                aggregates: tokio::sync::Semaphore::new(aggregate::AT_ONCE),
                commands_pool,
                states_pool,
                up: watch::channel(true).0,
                oldest_seq: AtomicU64::new(oldest.map_or(u64::MAX, |s| s as u64)),
                counters: StoreCounters::default(),
            }),
        };
        let start = StoreStart {
            next_seq: next_seq as u64,
            newest_micros: newest_micros.unwrap_or(0).max(0) as u64,
        };
        Ok((store, start))
    }

    /// Follows whether the store answers.
    pub fn up(&self) -> watch::Receiver<bool> {
        self.shared.up.subscribe()
    }

    pub fn counters(&self) -> &StoreCounters {
        &self.shared.counters
    }

    /// Sequence number of the oldest reading kept, `None` when the table is
    /// empty.
    pub fn oldest_seq(&self) -> Option<u64> {
        Some(self.shared.oldest_seq.load(Ordering::Acquire)).filter(|s| *s != u64::MAX)
    }

    /// Readings from `first_seq` on are committed: the table now reaches
    /// that far back at least.
    fn note_committed(&self, first_seq: u64) {
        self.shared
            .oldest_seq
            .fetch_min(first_seq, Ordering::AcqRel);
    }

    /// The number the next commit gets: every number below it is committed
    /// (or deleted by retention).
    async fn next_seq(&self) -> Result<u64, StoreError> {
        let next: i64 = sqlx::query_scalar("SELECT next_seq FROM devicehub_sequence WHERE id = 1")
            .fetch_one(self.read_pool())
            .await?;
        Ok(next as u64)
    }

    /// Ingest's pool: the writer, retention, the tail.
    fn write_pool(&self) -> &PgPool {
        &self.shared.write_pool
    }

    /// Client reads' pool.
    fn read_pool(&self) -> &PgPool {
        &self.shared.read_pool
    }

    /// Persistent commands' pool.
    fn commands_pool(&self) -> &PgPool {
        &self.shared.commands_pool
    }

    /// Device states' pool.
    fn states_pool(&self) -> &PgPool {
        &self.shared.states_pool
    }
}

/// Makes `tx` commit without waiting for the disk (`synchronous_commit`
/// off for it alone): for changes a crash may undo without harm, because
/// they are made again (a claim, a publish note, a reported patch).
async fn without_flush(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('synchronous_commit', 'off', true)")
        .execute(&mut **tx)
        .await
        .map(drop)
}

/// Times as the table keeps them (`received_at`, to the microsecond).
pub(super) use crate::buffer::unix_micros as micros;

#[cfg(test)]
mod tests {
    use super::tls_required;

    #[test]
    fn tls_is_required_beyond_loopback_unless_the_url_chose() {
        // The test environment must not choose for the URLs.
        if std::env::var_os("PGSSLMODE").is_some() {
            return;
        }
        for (url, host) in [
            ("postgres://u@db.internal/d", "db.internal"),
            ("postgres://u@10.0.0.5:5432/d", "10.0.0.5"),
            (
                "postgres://u@db.internal/d?application_name=x",
                "db.internal",
            ),
        ] {
            assert!(tls_required(url, host), "{url}");
        }
        for (url, host) in [
            ("postgres://u@localhost/d", "localhost"),
            ("postgres://u@127.0.0.1:5432/d", "127.0.0.1"),
            ("postgres://u@[::1]/d", "[::1]"),
            ("postgres:///d?host=/run/postgresql", "/run/postgresql"),
            ("postgres://u@db.internal/d?sslmode=disable", "db.internal"),
            ("postgres://u@db.internal/d?ssl-mode=disable", "db.internal"),
            (
                "postgres://u@db.internal/d?x=1&sslmode=verify-full",
                "db.internal",
            ),
        ] {
            assert!(!tls_required(url, host), "{url}");
        }
    }
}
