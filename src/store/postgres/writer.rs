//! The writer task: commits what ingest queued, then makes it visible.
//!
//! Ingest hands over one network read at a time ([`Writer::send`]); the
//! task takes everything queued (up to [`MAX_COMMIT_ROWS`]) into one
//! transaction, so the database sees few large statements however small the
//! reads are, and ingest never waits per reading. After the commit the
//! readings go into the hub's memory window under the numbers the database
//! gave them (with replicas, if they follow on from memory; else the
//! [`super::tail`] brings them after the other instances' commits, and a
//! NOTIFY wakes every instance's tail), and the committed batch id tells
//! the MQTT event loop what it may acknowledge. While the database fails, the task retries the same
//! readings with backoff and health says NOT_SERVING; the queue fills and
//! ingest waits (see `store`). A reading the database refuses for its
//! content is left out and counted; the rest of its batch commits. Its
//! statements use ingest's pool, which client reads never take a connection
//! from (see `postgres/mod.rs`).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{micros, Postgres, StoreStart};
use crate::{
    backoff::Backoff,
    buffer::{ConnectionStatus, MessageKind},
    hub::{Committed, ReadingHub},
    log_limit::{truncated, LogLimit},
    store::StoredReading,
};

/// Payload bytes queued for the writer at most; ingest waits beyond it.
pub const QUEUE_BYTES: usize = 64 << 20;
/// Readings committed in one transaction at most.
pub const MAX_COMMIT_ROWS: usize = 10_000;
/// Network reads queued at most (each holds a few readings).
const QUEUE_BATCHES: usize = 4_096;
/// Readings the database refused, rate-limited.
static REFUSED_LOG: LogLimit = LogLimit::new();
/// How often an idle writer checks that the database answers, for health.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Readings received together, on their way to the writer task.
struct Batch {
    id: u64,
    readings: Vec<StoredReading>,
    /// Their share of [`QUEUE_BYTES`], given back once committed.
    _bytes: OwnedSemaphorePermit,
}

/// Ingest's end of the hand-off. Owned by the MQTT event loop.
pub struct Writer {
    tx: mpsc::Sender<Batch>,
    bytes: Arc<Semaphore>,
    committed: watch::Receiver<u64>,
    /// Batch ids are handed out by the one task that sends, in order; an
    /// atomic only so that sending takes `&self`.
    last_sent: AtomicU64,
}

impl Writer {
    /// Queues readings received together and returns their batch id; waits
    /// while the queue is full. `None`: the writer task has stopped.
    pub async fn send(&self, readings: Vec<StoredReading>) -> Option<u64> {
        let bytes: usize = readings.iter().map(|r| r.payload.len()).sum();
        // One batch larger than the whole budget still goes, alone.
        let permits = bytes.clamp(1, QUEUE_BYTES) as u32;
        let permit = self.bytes.clone().acquire_many_owned(permits).await.ok()?;
        let id = self.last_sent() + 1;
        let batch = Batch {
            id,
            readings,
            _bytes: permit,
        };
        self.tx.send(batch).await.ok()?;
        self.last_sent.store(id, Ordering::Relaxed);
        Some(id)
    }

    /// The id of the last batch sent.
    pub fn last_sent(&self) -> u64 {
        self.last_sent.load(Ordering::Relaxed)
    }

    /// Follows the id of the last batch committed (batches commit in order).
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }
}

/// Starts the writer task. It ends when the [`Writer`] is dropped and the
/// queue is committed, or at `shutdown` while the database is failing.
///
/// `replicas`: other instances write too, and every instance's memory
/// follows the table ([`super::spawn_tail`]).
pub fn spawn_writer(
    store: Postgres,
    hub: ReadingHub,
    replicas: bool,
    start: StoreStart,
    shutdown: CancellationToken,
) -> Writer {
    let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
    let (committed_tx, committed) = watch::channel(0);
    let task = Task {
        store,
        hub,
        replicas,
        rx,
        committed: committed_tx,
        newest_micros: start.newest_micros,
        shutdown,
    };
    tokio::spawn(task.run());
    Writer {
        tx,
        bytes: Arc::new(Semaphore::new(QUEUE_BYTES)),
        committed,
        last_sent: AtomicU64::new(0),
    }
}

struct Task {
    store: Postgres,
    hub: ReadingHub,
    replicas: bool,
    rx: mpsc::Receiver<Batch>,
    committed: watch::Sender<u64>,
    /// Received times never go backwards as numbers go up (a clock stepped
    /// back is clamped), in the table as in memory: time ranges rely on it.
    newest_micros: u64,
    shutdown: CancellationToken,
}

impl Task {
    async fn run(mut self) {
        let mut batches = Vec::new();
        loop {
            let first = tokio::select! {
                batch = self.rx.recv() => batch,
                _ = tokio::time::sleep(PROBE_INTERVAL) => {
                    self.probe().await;
                    continue;
                }
            };
            let Some(first) = first else { return };
            let mut rows = first.readings.len();
            batches.push(first);
            while rows < MAX_COMMIT_ROWS {
                let Ok(batch) = self.rx.try_recv() else { break };
                rows += batch.readings.len();
                batches.push(batch);
            }
            if !self.commit(&mut batches).await {
                return; // shutdown while the database was failing
            }
            batches.clear();
        }
    }

    /// Commits `batches` (retrying until it works or shutdown), then pushes
    /// them into memory and reports them committed. A reading the database
    /// refuses for its content is left out, counted and logged, and the
    /// rest commit: halves of a refused piece are tried in turn, down to the
    /// one reading, so a batch with one bad row costs about twice its
    /// depth in statements, and it never blocks the readings behind it.
    /// (Ingest refuses what it knows the table cannot hold; this is for
    /// what it does not know.) `false`: shutdown came first.
    async fn commit(&mut self, batches: &mut [Batch]) -> bool {
        for reading in batches.iter_mut().flat_map(|b| b.readings.iter_mut()) {
            let at = micros(reading.received_at).max(self.newest_micros);
            self.newest_micros = at;
            reading.received_at = SystemTime::UNIX_EPOCH + Duration::from_micros(at);
        }
        let readings: Vec<&StoredReading> = batches.iter().flat_map(|b| &b.readings).collect();
        let Some(last_id) = batches.last().map(|b| b.id) else {
            return true;
        };
        let started = std::time::Instant::now();
        // Pieces to insert, in order: all of them, or the halves of a
        // piece refused. They are taken front first, so what is done
        // (committed or refused) is always a prefix of `readings`.
        let mut pieces = VecDeque::from([&readings[..]]);
        let mut done = 0;
        while let Some(piece) = pieces.pop_front() {
            let Some(inserted) = self.insert_retrying(piece).await else {
                // Shutdown: the batches wholly done are acknowledged, so
                // the broker does not deliver them again after a restart
                // (they would be stored twice).
                if let Some(id) = last_batch_within(batches, done) {
                    self.committed.send_replace(id);
                }
                return false;
            };
            if inserted.is_ok() || piece.len() == 1 {
                done += piece.len();
            }
            match inserted {
                Ok(first_seq) => self.pushed(first_seq, piece),
                Err(error) if piece.len() == 1 => self.refused(piece[0], &error),
                Err(_) => {
                    let (front, back) = piece.split_at(piece.len() / 2);
                    pieces.push_front(back);
                    pieces.push_front(front);
                }
            }
        }
        debug!(
            readings = readings.len(),
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "readings committed"
        );
        self.committed.send_replace(last_id);
        true
    }

    /// Inserts `readings`, retrying with backoff while the database fails
    /// for any reason but their content. `Some(Err)`: it refused them for
    /// their content; `None`: shutdown came first.
    async fn insert_retrying(
        &self,
        readings: &[&StoredReading],
    ) -> Option<Result<u64, sqlx::Error>> {
        let mut backoff = Backoff::default();
        loop {
            match insert(&self.store, readings, self.replicas).await {
                Ok(first_seq) => {
                    self.set_up(true, None);
                    return Some(Ok(first_seq));
                }
                Err(error) if refused_for_content(&error) => return Some(Err(error)),
                Err(error) => {
                    self.store
                        .shared
                        .counters
                        .errors
                        .fetch_add(1, Ordering::Relaxed);
                    self.set_up(false, Some(&error));
                    let wait = backoff.next_wait();
                    warn!(%error, readings = readings.len(), retry_in = ?wait, "committing readings to PostgreSQL failed; not acknowledging them");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Counts readings committed from `first_seq` on and pushes them into
    /// memory.
    fn pushed(&self, first_seq: u64, readings: &[&StoredReading]) {
        let counters = &self.store.shared.counters;
        counters.commits.fetch_add(1, Ordering::Relaxed);
        counters
            .committed_readings
            .fetch_add(readings.len() as u64, Ordering::Relaxed);
        self.store.note_committed(first_seq);
        let from = match self.replicas {
            true => Committed::Own,
            false => Committed::Sole,
        };
        self.hub
            .push_committed(first_seq, readings.iter().map(|r| r.as_new()), from);
    }

    /// Counts and logs (rate-limited) a reading the database refused.
    fn refused(&self, reading: &StoredReading, error: &sqlx::Error) {
        let counters = &self.store.shared.counters;
        counters.refused_readings.fetch_add(1, Ordering::Relaxed);
        if let Some(left_out) = REFUSED_LOG.allow() {
            warn!(
                topic = truncated(&reading.topic),
                error = truncated(&error.to_string()),
                similar_lines_left_out = left_out,
                "PostgreSQL refused a reading for its content; not stored (acknowledged all the same)"
            );
        }
    }

    /// Checks that the database answers while nothing is being written.
    async fn probe(&self) {
        let answer = sqlx::query("SELECT 1")
            .execute(self.store.write_pool())
            .await;
        self.set_up(answer.is_ok(), answer.as_ref().err());
    }

    fn set_up(&self, up: bool, error: Option<&sqlx::Error>) {
        let was = self.store.shared.up.send_replace(up);
        match (was, up) {
            (true, false) => {
                warn!(error = ?error.map(ToString::to_string), "PostgreSQL store unavailable")
            }
            (false, true) => info!("PostgreSQL store available again"),
            _ => {}
        }
    }
}

/// The id of the last of `batches` whose readings all lie within the first
/// `done` of them (taken in order), if any.
fn last_batch_within(batches: &[Batch], done: usize) -> Option<u64> {
    let mut end = 0;
    let mut last = None;
    for batch in batches {
        end += batch.readings.len();
        if end > done {
            break;
        }
        last = Some(batch.id);
    }
    last
}

/// Whether the database refused a statement for what it held (SQLSTATE
/// class 22, data exception, such as U+0000 in `text`; class 23, integrity
/// constraint violation; 54000, such as an index row too large), not for
/// being unreachable or busy: the same rows would be refused again.
fn refused_for_content(error: &sqlx::Error) -> bool {
    let code = error.as_database_error().and_then(|e| e.code());
    code.is_some_and(|code| code.starts_with("22") || code.starts_with("23") || code == "54000")
}

/// Numbers and inserts `readings` and updates their devices' records in
/// one statement (so one round trip, and one transaction: autocommit);
/// returns the first reading's sequence number. With `notify` (replicas) it
/// also notifies the tails' channel (`tail`), which PostgreSQL delivers once
/// the transaction has committed. See `store` for why the
/// counter row orders commits. The counter row also keeps the newest time
/// committed, and each batch's times are raised to at least the one before
/// it: received times never go backwards as numbers go up, with several
/// writers too (whose clocks and commit order differ by a little).
async fn insert(
    store: &Postgres,
    readings: &[&StoredReading],
    notify: bool,
) -> Result<u64, sqlx::Error> {
    let count = readings.len() as i64;
    let mut device_ids = Vec::with_capacity(readings.len());
    let mut topics = Vec::with_capacity(readings.len());
    let mut payloads = Vec::with_capacity(readings.len());
    let mut qos = Vec::with_capacity(readings.len());
    let mut retained = Vec::with_capacity(readings.len());
    let mut received = Vec::with_capacity(readings.len());
    let mut kinds = Vec::with_capacity(readings.len());
    let mut statuses = Vec::with_capacity(readings.len());
    for reading in readings {
        device_ids.push(&*reading.device_id);
        topics.push(&*reading.topic);
        payloads.push(&reading.payload[..]);
        qos.push(i16::from(reading.qos));
        retained.push(reading.retained);
        received.push(micros(reading.received_at) as i64);
        let (kind, status) = kind_columns(reading.kind);
        kinds.push(kind);
        statuses.push(status);
    }
    let devices = DeviceColumns::of(readings);
    let first: i64 = sqlx::query_scalar(
        "WITH counter AS ( \
             UPDATE devicehub_sequence SET next_seq = next_seq + $1, \
                 floor_micros = newest_micros, \
                 newest_micros = greatest(newest_micros, $16) \
             WHERE id = 1 \
             RETURNING next_seq - $1 AS first, floor_micros AS floor), \
         stored AS ( \
             INSERT INTO readings \
                 (seq, device_id, topic, payload, qos, retained, received_at, kind, status) \
             SELECT counter.first + n - 1, d, t, p, q, r, \
                    'epoch'::timestamptz + greatest(m, counter.floor) * interval '1 microsecond', \
                    k, st \
             FROM counter, UNNEST($2::text[], $3::text[], $4::bytea[], $5::int2[], \
                                  $6::bool[], $7::int8[], $8::int2[], $9::int2[]) \
                  WITH ORDINALITY AS u(d, t, p, q, r, m, k, st, n)), \
         listed AS ( \
             INSERT INTO devices AS dv \
                 (device_id, first_seen, last_seen, last_reading_seq, status, status_changed_at) \
             SELECT i, 'epoch'::timestamptz + greatest(f, counter.floor) * interval '1 microsecond', \
                    'epoch'::timestamptz + greatest(l, counter.floor) * interval '1 microsecond', \
                    counter.first + lr - 1, coalesce(ds, 0), \
                    'epoch'::timestamptz \
                        + CASE WHEN c IS NOT NULL THEN greatest(c, counter.floor) END \
                        * interval '1 microsecond' \
             FROM counter, UNNEST($10::text[], $11::int8[], $12::int8[], $13::int8[], \
                                  $14::int2[], $15::int8[]) AS v(i, f, l, lr, ds, c) \
             ON CONFLICT (device_id) DO UPDATE SET \
                 last_seen = EXCLUDED.last_seen, \
                 last_reading_seq = coalesce(EXCLUDED.last_reading_seq, dv.last_reading_seq), \
                 status_changed_at = CASE \
                     WHEN EXCLUDED.status_changed_at IS NOT NULL AND EXCLUDED.status <> dv.status \
                     THEN EXCLUDED.status_changed_at ELSE dv.status_changed_at END, \
                 status = CASE WHEN EXCLUDED.status_changed_at IS NOT NULL \
                     THEN EXCLUDED.status ELSE dv.status END) \
         SELECT first, \
             CASE WHEN $17 THEN (SELECT count(*) FROM (SELECT pg_notify('devicehub_readings', '')) n) END \
         FROM counter",
    )
    .bind(count)
    .bind(&device_ids)
    .bind(&topics)
    .bind(&payloads)
    .bind(&qos)
    .bind(&retained)
    .bind(&received)
    .bind(&kinds)
    .bind(&statuses)
    .bind(&devices.ids)
    .bind(&devices.first_seen)
    .bind(&devices.last_seen)
    .bind(&devices.last_reading)
    .bind(&devices.status)
    .bind(&devices.status_changed)
    .bind(received.last().copied().unwrap_or(0))
    .bind(notify)
    .fetch_one(store.write_pool())
    .await?;
    Ok(first as u64)
}

/// What a batch says of each device in it, as the columns of its
/// `devices` rows, in device id order (so two writers never wait for each
/// other's rows in opposite orders).
struct DeviceColumns<'a> {
    ids: Vec<&'a str>,
    first_seen: Vec<i64>,
    last_seen: Vec<i64>,
    /// The position (from 1) of the device's newest reading in the batch.
    last_reading: Vec<Option<i64>>,
    /// The last status the batch states, and when.
    status: Vec<Option<i16>>,
    status_changed: Vec<Option<i64>>,
}

impl<'a> DeviceColumns<'a> {
    fn of(readings: &[&'a StoredReading]) -> Self {
        struct Update {
            first_seen: i64,
            last_seen: i64,
            last_reading: Option<i64>,
            status: Option<(i16, i64)>,
        }
        let mut devices: BTreeMap<&str, Update> = BTreeMap::new();
        for (i, reading) in readings.iter().enumerate() {
            if reading.device_id.is_empty() {
                continue; // a topic outside the templates: not a device
            }
            let at = micros(reading.received_at) as i64;
            let device = devices.entry(&reading.device_id).or_insert(Update {
                first_seen: at,
                last_seen: at,
                last_reading: None,
                status: None,
            });
            device.last_seen = at;
            match reading.kind {
                MessageKind::Reading => device.last_reading = Some(i as i64 + 1),
                MessageKind::Status(Some(status)) => {
                    device.status = Some((status_column(status), at))
                }
                MessageKind::Status(None) | MessageKind::Reply => {}
            }
        }
        let updates = devices.values();
        Self {
            ids: devices.keys().copied().collect(),
            first_seen: updates.clone().map(|d| d.first_seen).collect(),
            last_seen: updates.clone().map(|d| d.last_seen).collect(),
            last_reading: updates.clone().map(|d| d.last_reading).collect(),
            status: updates.clone().map(|d| d.status.map(|s| s.0)).collect(),
            status_changed: updates.map(|d| d.status.map(|s| s.1)).collect(),
        }
    }
}

/// The `kind` and `status` columns of a message (see the migration).
fn kind_columns(kind: MessageKind) -> (i16, Option<i16>) {
    match kind {
        MessageKind::Reading => (0, None),
        MessageKind::Reply => (1, None),
        MessageKind::Status(status) => (2, status.map(status_column)),
    }
}

/// A message's kind from its `kind` and `status` columns: the inverse of
/// [`kind_columns`]. An unknown kind (a newer version's) reads as a reading.
pub(super) fn kind_of(kind: i16, status: Option<i16>) -> MessageKind {
    match kind {
        1 => MessageKind::Reply,
        2 => MessageKind::Status(status.map(status_of)),
        _ => MessageKind::Reading,
    }
}

/// The `status` column of a connection status (see the migrations).
fn status_column(status: ConnectionStatus) -> i16 {
    match status {
        ConnectionStatus::Unknown => 0,
        ConnectionStatus::Online => 1,
        ConnectionStatus::Offline => 2,
    }
}

/// A connection status from its `status` column: the inverse of
/// [`status_column`].
pub(super) fn status_of(column: i16) -> ConnectionStatus {
    match column {
        1 => ConnectionStatus::Online,
        2 => ConnectionStatus::Offline,
        _ => ConnectionStatus::Unknown,
    }
}
