//! [`ReadingHub`]: the one shared [`ReadingBuffer`] behind a lock, the
//! wake-up signal that lets watchers follow it, and the watcher counters.
//! It knows nothing of MQTT, gRPC or PostgreSQL: ingest pushes into it
//! (through `mqtt::Ingest`: at once in memory, or after the store's
//! commit), the gRPC handlers read.
//!
//! With a store, the buffer is a window onto the newest part of the table:
//! readings arrive through [`ReadingHub::push_committed`] with the numbers
//! the database gave them, and pages and watchers that reach back beyond
//! the window are served from [`History`] ([`ReadingHub::list`],
//! [`ReadingWatcher::next_batch`]), which the store implements.
//!
//! With replicas, memory follows the table (`store/postgres/tail.rs`) a
//! little behind the instance that committed: a cursor or page token from
//! another instance may be ahead of this one's memory for a moment. A
//! watcher then waits (bounded) for memory to get there, and a page is read
//! from the store.
//!
//! The lock is a std `RwLock` (see [`crate::sync`]): it is held only to
//! store the readings of one network read, to copy out at most one batch
//! of readings, or to look at no more than `MAX_EXAMINED_PER_PAGE`
//! (`buffer/query.rs`) readings for a page, whatever its filter matches;
//! never across an `.await`, JSON decoding or gRPC encoding.
//! Watchers following the newest readings do not take it: each push is
//! also published to [`live::Live`], which they read without a lock (its
//! module docs say why that keeps a delivery's cost flat as cores grow).

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    time::{Duration, SystemTime},
};

use crate::{
    buffer::{
        BufferStats, ConnectionStatus, CursorError, DeviceEntry, DeviceInfo, DeviceStats, ListPage,
        ListQuery, NewReading, Presence, Reading, ReadingBuffer, ReadingFilter,
    },
    config::{BufferLimits, DeviceLimits},
    per_client::{PerClient, Permit},
    sync,
};

mod aggregate;
mod history;
mod live;

pub use history::History;
use live::Live;
pub use live::WatchBatch;

/// How many buffered readings a watcher looks at per lock acquisition.
const WATCH_SCAN_BATCH: usize = 512;
/// And how many bytes of payload one batch copies out at most (a batch
/// holds at least one reading): what a stalled watcher can hold per batch.
pub const WATCH_BATCH_BYTES: usize = 1 << 20;
/// With replicas: how long a watcher whose cursor is committed but not yet
/// in this instance's memory waits for it.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// Why a watcher could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("sequence number {after} is ahead of the newest one ({newest})")]
    Future { after: u64, newest: u64 },
    #[error("the service already serves its maximum of {0} watchers")]
    TooManyWatchers(usize),
    #[error(
        "this client already has its maximum of {0} watchers open (--max-watchers-per-client)"
    )]
    TooManyForClient(usize),
}

/// Whose commits [`ReadingHub::push_committed`] pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The one writer's: numbers follow on from memory's.
    Sole,
    /// A replica's own writer's: pushed if they follow on from memory (or
    /// overlap it), else left to the tail, which brings the other
    /// instances' commits before them.
    Own,
    /// The tail's (see `store/postgres/tail.rs`): every instance's, in
    /// number order.
    Tail,
}

/// Counters for operators: see [`ReadingHub::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubStats {
    pub buffer: BufferStats,
    pub devices: DeviceStats,
    /// Watchers open now.
    pub watchers: usize,
    /// Times a watcher found that readings it had not read yet were evicted
    /// (a slow watcher, or a resume cursor older than the buffer).
    pub watcher_gaps: u64,
    /// Readings skipped by those gaps, summed over watchers.
    pub watcher_missed_readings: u64,
    /// Watcher reads that found their next reading behind the ring and
    /// read the buffer under its lock instead.
    pub watcher_behind_live: u64,
}

/// The shared buffer and its change signal. A cheap handle: clones share it.
#[derive(Clone)]
pub struct ReadingHub {
    shared: Arc<Shared>,
}

struct Shared {
    buffer: RwLock<ReadingBuffer>,
    /// Where readings older than the buffer are read from, if anywhere.
    history: Option<Arc<dyn History>>,
    /// One of several replicas: memory follows the store, behind it.
    replicas: bool,
    /// The newest readings as published for watchers, the next sequence
    /// number, and the watchers' wake-up signal: waking costs the same
    /// however many watchers there are and however slow they are.
    live: Live,
    max_watchers: usize,
    watchers: AtomicUsize,
    /// Open watchers per client (token subject or connection).
    per_client: PerClient,
    watcher_gaps: AtomicU64,
    watcher_missed_readings: AtomicU64,
}

impl ReadingHub {
    pub fn new(
        limits: BufferLimits,
        devices: DeviceLimits,
        first_seq: u64,
        max_watchers: usize,
        max_watchers_per_client: usize,
        history: Option<Arc<dyn History>>,
        replicas: bool,
    ) -> Self {
        let buffer = ReadingBuffer::new(limits, first_seq).with_device_limits(devices);
        let live = Live::new(buffer.next_seq());
        let shared = Shared {
            buffer: RwLock::new(buffer),
            history,
            replicas,
            live,
            max_watchers,
            watchers: AtomicUsize::new(0),
            per_client: PerClient::new(max_watchers_per_client),
            watcher_gaps: AtomicU64::new(0),
            watcher_missed_readings: AtomicU64::new(0),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The number the next reading pushed gets.
    pub fn next_seq(&self) -> u64 {
        self.shared.live.next_seq()
    }

    fn read(&self) -> RwLockReadGuard<'_, ReadingBuffer> {
        sync::read(&self.shared.buffer)
    }

    fn write(&self) -> RwLockWriteGuard<'_, ReadingBuffer> {
        sync::write(&self.shared.buffer)
    }

    /// Stores readings received together under one lock, wakes the watchers
    /// once, and returns the last one's sequence number (`None` if there
    /// were none).
    pub fn push_all<'a>(&self, readings: impl IntoIterator<Item = NewReading<'a>>) -> Option<u64> {
        self.push_and_wake(self.write(), readings)
    }

    /// Pushes `readings` under the held lock and publishes them to the
    /// watchers' ring, releases the lock, and wakes the watchers once.
    fn push_and_wake<'a>(
        &self,
        mut buffer: RwLockWriteGuard<'_, ReadingBuffer>,
        readings: impl IntoIterator<Item = NewReading<'a>>,
    ) -> Option<u64> {
        let first = buffer.next_seq();
        let last = readings.into_iter().map(|new| buffer.push(new)).last()?;
        // A tiny buffer may already have evicted the first of them. With
        // no watcher open, nothing is published: copying into the ring
        // would cost ingest a third of its CPU for nobody (a watcher that
        // opens later reads what it missed from the buffer).
        let oldest = buffer.stats().first_seq;
        let published = match self.shared.watchers.load(Ordering::Relaxed) {
            0 => Vec::new(),
            _ => (first.max(oldest)..=last)
                .filter_map(|seq| buffer.reading_at(seq))
                .collect(),
        };
        self.shared.live.publish(published, last + 1, oldest);
        drop(buffer);
        self.shared.live.wake();
        Some(last)
    }

    /// Like [`ReadingHub::push_all`], for readings the store committed with
    /// the numbers from `first_seq` on; `from` says whose commits they are,
    /// and so what a number other than memory's next one means.
    pub fn push_committed<'a>(
        &self,
        first_seq: u64,
        readings: impl IntoIterator<Item = NewReading<'a>>,
        from: Committed,
    ) -> Option<u64> {
        let mut buffer = self.write();
        let next = buffer.next_seq();
        match from {
            Committed::Sole if first_seq > next => {
                let dropped = buffer.skip_to(first_seq);
                tracing::warn!(
                    expected = next,
                    got = first_seq,
                    dropped,
                    "the store numbered readings this instance did not write; memory starts over"
                );
            }
            Committed::Sole if first_seq < next => {
                tracing::error!(
                    expected = next,
                    got = first_seq,
                    "the store's sequence counter went back; numbers in memory no longer match it"
                );
            }
            // Other instances' commits come first: the tail brings them,
            // and these after them.
            Committed::Own if first_seq > next => return None,
            // A hole: readings retention deleted before the tail got there.
            Committed::Tail if first_seq > next => {
                buffer.skip_to(first_seq);
            }
            _ => {}
        }
        // With replicas the writer and the tail may both bring a reading:
        // whichever comes second skips it.
        let known = match from {
            Committed::Sole => 0,
            Committed::Own | Committed::Tail => next.saturating_sub(first_seq),
        };
        self.push_and_wake(buffer, readings.into_iter().skip(known as usize))
    }

    /// One page of readings: from memory when the buffer holds everything
    /// the page needs, else from the store (which holds all that memory
    /// does, and older). Either answers with the same numbers, so a page
    /// token goes on from wherever the previous page came from.
    pub async fn list(&self, query: &ListQuery) -> Result<ListPage, CursorError> {
        let (page, complete) = {
            let buffer = self.read();
            let page = buffer.list(query);
            let complete = match (&self.shared.history, &page) {
                (None, _) => true,
                (Some(history), Ok(page)) => {
                    let stats = buffer.stats();
                    covers(query, page, &stats, history.oldest_seq())
                }
                // A token from another replica, ahead of this one.
                (Some(_), Err(CursorError::Future(_))) => !self.shared.replicas,
                (Some(_), Err(_)) => false,
            };
            (page, complete)
        };
        match &self.shared.history {
            Some(history) if !complete => history.list(query).await,
            _ => page,
        }
    }

    /// The oldest sequence number a reader can still get: the buffer's
    /// oldest, or the store's.
    pub fn oldest_seq(&self) -> u64 {
        let first = self.read().stats().first_seq;
        let stored = self.shared.history.as_ref().and_then(|h| h.oldest_seq());
        stored.map_or(first, |s| s.min(first))
    }

    /// A listed device; see [`ReadingBuffer::device`].
    pub fn device<K>(
        &self,
        device_id: &str,
        find: impl Fn(u64, SystemTime) -> Option<K>,
    ) -> Option<DeviceEntry<K>> {
        self.read().device(device_id, find)
    }

    /// A page of listed devices; see [`ReadingBuffer::devices`].
    pub fn devices<K>(
        &self,
        prefix: &str,
        after: Option<&str>,
        visible: impl Fn(&str) -> bool,
        limit: usize,
        find: impl Fn(u64, SystemTime) -> Option<K>,
    ) -> (Vec<DeviceEntry<K>>, bool) {
        self.read().devices(prefix, after, visible, limit, find)
    }

    /// Lists devices known from before this process (the store's records),
    /// each with its newest reading if it has one.
    pub fn restore_devices(&self, devices: Vec<(DeviceInfo, Option<Reading>)>) {
        let mut buffer = self.write();
        for (info, newest) in devices {
            buffer.restore_device(info, newest);
        }
    }

    pub fn device_status(&self, device_id: &str) -> ConnectionStatus {
        self.read().device_status(device_id)
    }

    /// Whether each of `device_ids` is there (see [`Presence`]), under one
    /// read of the lock.
    pub fn presence<'a>(
        &self,
        device_ids: impl IntoIterator<Item = &'a str>,
    ) -> Vec<Option<Presence>> {
        let buffer = self.read();
        device_ids
            .into_iter()
            .map(|id| buffer.presence(id))
            .collect()
    }

    /// Returns once a reading numbered `next_seq` or later was pushed.
    pub async fn pushed(&self, next_seq: u64) {
        self.shared
            .live
            .wait_past(next_seq.saturating_sub(1), 0)
            .await;
    }

    pub fn stats(&self) -> HubStats {
        let buffer = self.read();
        let live = self.shared.live.stats();
        HubStats {
            watcher_behind_live: live.behind,
            buffer: buffer.stats(),
            devices: buffer.device_stats(),
            watchers: self.shared.watchers.load(Ordering::Relaxed),
            watcher_gaps: self.shared.watcher_gaps.load(Ordering::Relaxed),
            watcher_missed_readings: self.shared.watcher_missed_readings.load(Ordering::Relaxed),
        }
    }

    /// A watcher that returns the readings matching `filter` with a sequence
    /// number above `after`: `None` means from now on, `Some(0)` everything
    /// buffered. A cursor older than the buffer is accepted; the watcher's
    /// first [`ReadingWatcher::next_batch`] then reports the gap.
    ///
    /// `client` names who opens it (a token subject, or a connection), for
    /// the per-client limit.
    pub async fn subscribe(
        &self,
        filter: ReadingFilter,
        after: Option<u64>,
        client: Arc<str>,
    ) -> Result<ReadingWatcher, SubscribeError> {
        if let Some(after) = after.filter(|_| self.shared.replicas) {
            self.catch_up_to(after).await;
        }
        self.subscribe_now(filter, after, client)
    }

    /// With replicas: waits (bounded) until memory holds `seq`, if the
    /// history has committed it.
    async fn catch_up_to(&self, seq: u64) {
        let live = &self.shared.live;
        if live.next_seq() > seq {
            return;
        }
        let Some(history) = &self.shared.history else {
            return;
        };
        if history
            .next_seq()
            .await
            .is_some_and(|committed| committed > seq)
        {
            let caught_up = async {
                while live.next_seq() <= seq {
                    live.wait_past(seq.saturating_sub(1), 0).await;
                }
            };
            let _ = tokio::time::timeout(CATCH_UP_WAIT, caught_up).await;
        }
    }

    fn subscribe_now(
        &self,
        filter: ReadingFilter,
        after: Option<u64>,
        client: Arc<str>,
    ) -> Result<ReadingWatcher, SubscribeError> {
        let shared = &self.shared;
        let open = shared.watchers.fetch_add(1, Ordering::Relaxed);
        // From here on, dropping the watcher (also on error) gives the slot back.
        let mut watcher = ReadingWatcher {
            hub: self.clone(),
            cursor: 0,
            hint: 0,
            shard: open,
            filter,
            _client: None,
        };
        if open >= shared.max_watchers {
            return Err(SubscribeError::TooManyWatchers(shared.max_watchers));
        }
        watcher._client = Some(
            shared
                .per_client
                .acquire(client)
                .ok_or(SubscribeError::TooManyForClient(shared.per_client.max()))?,
        );
        // A push from now on is seen by `next_batch`, which compares the
        // cursor with the next number.
        let stats = self.read().stats();
        watcher.cursor = match after {
            None => stats.next_seq - 1,
            Some(0) => self.oldest_seq() - 1,
            Some(after) if after >= stats.next_seq => {
                return Err(SubscribeError::Future {
                    after,
                    newest: stats.next_seq - 1,
                })
            }
            Some(after) => after,
        };
        Ok(watcher)
    }
}

/// A cursor that follows the buffer. See [`ReadingHub::subscribe`].
pub struct ReadingWatcher {
    hub: ReadingHub,
    /// Its place in its client's count, once counted.
    _client: Option<Permit>,
    /// The last sequence number looked at.
    cursor: u64,
    /// The ring's batch its last read ended in (where to look next).
    hint: u64,
    /// Which wake-up signal it waits on.
    shard: usize,
    filter: ReadingFilter,
}

impl ReadingWatcher {
    /// The last sequence number this watcher has looked at: everything up to
    /// it that matched has been returned.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Waits for and returns the next matching readings, oldest first.
    ///
    /// An error says which readings were evicted before this watcher read
    /// them. Call [`ReadingWatcher::skip_gap`] to go on after it.
    pub async fn next_batch(&mut self) -> Result<WatchBatch, CursorError> {
        let live = &self.hub.shared.live;
        loop {
            if self.cursor + 1 < live.next_seq() {
                let read = live.read_after(
                    self.cursor,
                    &mut self.hint,
                    &self.filter,
                    WATCH_SCAN_BATCH,
                    WATCH_BATCH_BYTES,
                );
                if let Some(read) = read {
                    self.cursor = read.cursor;
                    if !read.runs.is_empty() {
                        return Ok(WatchBatch::Live(read.runs));
                    }
                    // A run of readings for other watchers: let other
                    // tasks run if this one used up its turn.
                    tokio::task::coop::consume_budget().await;
                    continue;
                }
                // Not in the ring (behind it): from the buffer.
                let scanned = self.hub.read().scan_after(
                    self.cursor,
                    WATCH_SCAN_BATCH,
                    WATCH_BATCH_BYTES,
                    &self.filter,
                );
                let (batch, cursor) = match (scanned, &self.hub.shared.history) {
                    // Older than memory: replayed from history, up to
                    // where memory starts.
                    (Err(CursorError::Evicted { missed_to, .. }), Some(history)) => {
                        history
                            .scan_after(self.cursor, missed_to + 1, &self.filter)
                            .await
                    }
                    (scanned, _) => scanned,
                }
                .inspect_err(|e| self.count_gap(e))?;
                self.cursor = cursor;
                if !batch.is_empty() {
                    return Ok(WatchBatch::Copied(batch));
                }
                tokio::task::coop::consume_budget().await;
                continue;
            }
            live.wait_past(self.cursor, self.shard).await;
        }
    }

    /// Moves the cursor past readings reported missing by `next_batch`.
    pub fn skip_gap(&mut self, missed_to: u64) {
        self.cursor = self.cursor.max(missed_to);
    }

    fn count_gap(&self, error: &CursorError) {
        if let CursorError::Evicted {
            missed_from,
            missed_to,
        } = error
        {
            let shared = &self.hub.shared;
            shared.watcher_gaps.fetch_add(1, Ordering::Relaxed);
            shared
                .watcher_missed_readings
                .fetch_add(missed_to - missed_from + 1, Ordering::Relaxed);
        }
    }
}

impl Drop for ReadingWatcher {
    fn drop(&mut self) {
        self.hub.shared.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether `page`, served from memory, is the whole answer to `query`, given
/// a store whose oldest reading is `stored_oldest`: nothing the page needs
/// lies below the buffer's oldest reading.
fn covers(
    query: &ListQuery,
    page: &ListPage,
    stats: &BufferStats,
    stored_oldest: Option<u64>,
) -> bool {
    if stored_oldest.is_none_or(|oldest| oldest >= stats.first_seq) {
        return true; // the store holds nothing older
    }
    // Every reading from `start` on is buffered when the oldest buffered
    // one arrived earlier (times never go backwards as numbers go up).
    let starts_in_memory = query
        .start
        .zip(stats.oldest_received_at)
        .is_some_and(|(start, oldest)| start > oldest);
    if query.oldest_first {
        // A cursor inside the buffer, or a start time after its oldest
        // reading: the page and all that follows are in memory.
        query.cursor.is_some() || starts_in_memory
    } else {
        // Newest first: the page filled up before it reached the buffer's
        // oldest reading, or nothing older is wanted.
        page.next_cursor.is_some() || starts_in_memory
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;

    use super::*;
    use crate::buffer::MessageKind;

    /// A hub of `max_readings`, memory only, first number 1.
    fn hub(max_readings: usize) -> ReadingHub {
        let limits = BufferLimits {
            max_readings,
            max_bytes: 1 << 30,
        };
        ReadingHub::new(limits, DeviceLimits::default(), 1, 100, 100, None, false)
    }

    /// What a watcher took, as (seq, payload) pairs, until `total` readings
    /// were looked at; `pause` once after its first batch.
    async fn follow(mut watcher: ReadingWatcher, total: u64, pause: Duration) -> Vec<(u64, Bytes)> {
        let mut got = Vec::new();
        while watcher.cursor() < total {
            let batch = watcher.next_batch().await.expect("nothing is evicted");
            let first = got.is_empty();
            got.extend(batch.readings().map(|r| (r.seq, r.payload.clone())));
            if first {
                tokio::time::sleep(pause).await;
            }
        }
        got
    }

    /// One reading at a time, each waited for by every watcher before the
    /// next: every push finds watchers asleep or about to sleep, so a lost
    /// wake-up would leave one waiting (until the 5 s bound fails the test).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost() {
        let hub = hub(10_000);
        let rounds = 3_000u64;
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..16 {
            let (hub, seen) = (hub.clone(), seen_tx.clone());
            let mut watcher = hub
                .subscribe(ReadingFilter::default(), None, Arc::from("test"))
                .await
                .unwrap();
            tokio::spawn(async move {
                while watcher.cursor() < rounds {
                    let batch = watcher.next_batch().await.unwrap();
                    let _ = seen.send(batch.last_seq());
                }
            });
        }
        for round in 1..=rounds {
            let reading = NewReading {
                device_id: "d",
                topic: "devices/d/readings",
                payload: b"1",
                qos: 0,
                retained: false,
                received_at: SystemTime::now(),
                kind: MessageKind::Reading,
            };
            hub.push_all([reading]);
            for _ in 0..16 {
                let seen = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await;
                assert_eq!(seen.expect("a watcher was not woken"), Some(Some(round)));
            }
        }
    }

    /// Watchers on several threads while readings are pushed: one keeps up
    /// (the ring), one pauses until it is behind the ring (the buffer, then
    /// the ring again), one starts once everything is in, one follows one
    /// device. Each gets every reading it wants, once and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchers_get_every_reading_once_in_order_from_the_ring_and_the_buffer() {
        let hub = hub(1_000_000);
        let total = 3 * live::LIVE_READINGS as u64;
        let client: Arc<str> = Arc::from("test");
        let all = ReadingFilter::default();
        let d7 = ReadingFilter {
            device_id: Some("d7".into()),
            ..Default::default()
        };
        let watch = |filter: &ReadingFilter, pause_ms| {
            let hub = hub.clone();
            let (filter, client) = (filter.clone(), client.clone());
            tokio::spawn(async move {
                let watcher = hub.subscribe(filter, Some(0), client).await.unwrap();
                follow(watcher, total, Duration::from_millis(pause_ms)).await
            })
        };
        let (fast, paused, one_device) = (watch(&all, 0), watch(&all, 300), watch(&d7, 0));
        let pusher = std::thread::spawn({
            let hub = hub.clone();
            move || {
                let (mut index, mut size) = (0u64, 1u64);
                while index < total {
                    let end = (index + size).min(total);
                    let payloads: Vec<String> = (index..end).map(|i| i.to_string()).collect();
                    let devices: Vec<String> =
                        (index..end).map(|i| format!("d{}", i % 10)).collect();
                    let topics: Vec<String> = devices
                        .iter()
                        .map(|d| format!("devices/{d}/readings"))
                        .collect();
                    hub.push_all((0..payloads.len()).map(|i| NewReading {
                        device_id: &devices[i],
                        topic: &topics[i],
                        payload: payloads[i].as_bytes(),
                        qos: 1,
                        retained: false,
                        received_at: SystemTime::now(),
                        kind: MessageKind::Reading,
                    }));
                    (index, size) = (end, size % 97 + 1);
                }
            }
        });
        tokio::task::spawn_blocking(move || pusher.join().unwrap())
            .await
            .unwrap();
        let late = watch(&all, 0);

        let expected = |filter: &dyn Fn(u64) -> bool| -> Vec<(u64, Bytes)> {
            (0..total)
                .filter(|i| filter(*i))
                .map(|i| (i + 1, Bytes::from(i.to_string())))
                .collect()
        };
        let everything = expected(&|_| true);
        assert!(
            fast.await.unwrap() == everything,
            "the watcher that kept up"
        );
        assert!(paused.await.unwrap() == everything, "the paused watcher");
        assert!(late.await.unwrap() == everything, "the late watcher");
        assert!(
            one_device.await.unwrap() == expected(&|i| i % 10 == 7),
            "one device"
        );
        assert!(
            hub.stats().watcher_behind_live > 0,
            "some reads came from the buffer"
        );
    }
}
