//! [`Live`]: the newest readings, published once per push for every
//! watcher to read without a lock.
//!
//! Why it exists: every push wakes every watcher. When each woken watcher
//! took the buffer's read lock, copied its readings out (a payload
//! allocation and a reference count on its device's shared `Source` per
//! reading) and took the encoded window's mutex, N watchers running on C
//! cores met on the same few cache lines for every reading: on 16 cores the
//! same deliveries cost twelve times the CPU they cost on 2 (issue 16).
//!
//! Here each push is published once (while any watcher is open), as an
//! immutable [`LiveBatch`] in a ring of `ArcSwap` slots, and a watcher:
//! - loads the batch holding its cursor (an `arc-swap` load writes only to
//!   a slot private to its thread) and takes one reference count per batch,
//!   never one per reading;
//! - hands the readings it picked to its stream as borrowed from the batch
//!   ([`WatchBatch::readings`]): what the stream makes of them is the
//!   caller's (the gRPC side keeps each reading's message once for all
//!   streams, read the same way without a lock);
//! - waits on one of [`WAKE_SHARDS`] `Notify`s, so re-arming after a
//!   wake-up spreads over several locks instead of meeting on one; a push
//!   takes a shard's lock only when someone waits on it, so pushing costs
//!   next to nothing while every watcher is busy (or there are none).
//!
//! What is shared per batch per watcher: one reference count on the batch
//! and one registration with a wake shard. Nothing is shared per reading
//! per watcher, so the cost of a delivery does not grow with the cores:
//! the contention benchmark (BENCHMARKS.md, scenario 12) runs this path from
//! 1 to 32 threads.
//!
//! The ring speeds watchers up; it is never the record. A watcher whose
//! next reading is not in it (behind the ring, pushed while no watcher was
//! open, or evicted from the buffer) reads the buffer under its lock as
//! before (`ReadingWatcher::next_batch`), and that read is counted.
//!
//! Bounds, whatever the traffic: [`LIVE_BATCHES`] batches, [`LIVE_READINGS`]
//! readings and [`LIVE_PAYLOAD_BYTES`] of payload copies (the oldest batches
//! leave first). A watcher holds a batch that has left the ring only until
//! its stream has copied from it.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

use crate::{
    buffer::{Reading, ReadingFilter},
    sync,
};

/// Batches in the ring.
pub const LIVE_BATCHES: usize = 8192;
/// Readings in the ring at most (their records, without payloads).
pub const LIVE_READINGS: usize = 65_536;
/// Payload bytes copied into the ring at most.
pub const LIVE_PAYLOAD_BYTES: usize = 32 << 20;
/// A push of more readings, or more payload bytes, is published as several
/// batches, so what a watcher holds at once stays small.
const LIVE_BATCH_READINGS: usize = 512;
const LIVE_BATCH_BYTES: usize = 1 << 20;
/// Wake-up signals watchers are spread over.
pub const WAKE_SHARDS: usize = 8;

/// The ring of the newest batches. See the module docs.
pub struct Live {
    slots: Box<[ArcSwapOption<LiveBatch>]>,
    /// The number the next batch gets.
    next_batch: AtomicU64,
    /// The sequence number the next reading pushed gets: every reading below
    /// it is in the buffer (and in the ring, unless it left it).
    next_seq: AtomicU64,
    /// The buffer's oldest reading when the ring was last published to:
    /// older readings in the ring are not served (a watcher behind the
    /// buffer is told of its gap, as the buffer says it).
    floor: AtomicU64,
    /// The first reading of the oldest batch in the ring (`next_seq` when
    /// empty): pages and watchers older than it skip the search.
    start_seq: AtomicU64,
    wake: [Shard; WAKE_SHARDS],
    /// Reads that found their next reading no longer in the ring.
    behind: AtomicU64,
    /// What the ring holds, for eviction. Taken by pushers only, which the
    /// hub's write lock already serializes: never contended.
    held: Mutex<Held>,
}

/// A wake-up signal and how many wait on it, on a cache line of its own.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    notify: Notify,
    sleepers: AtomicUsize,
}

/// Counts a waiter on a shard while it lives (a wait may be cancelled).
struct Sleeping<'a>(&'a AtomicUsize);

impl Drop for Sleeping<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Held {
    /// Oldest first.
    batches: VecDeque<HeldBatch>,
    readings: usize,
    payload_bytes: usize,
}

/// A batch in the ring, as eviction needs it.
struct HeldBatch {
    no: u64,
    first_seq: u64,
    readings: usize,
    payload_bytes: usize,
}

impl Held {
    fn push(&mut self, batch: HeldBatch) {
        self.readings += batch.readings;
        self.payload_bytes += batch.payload_bytes;
        self.batches.push_back(batch);
    }

    /// Takes the oldest batch out of the count; returns its number.
    fn pop(&mut self) -> Option<u64> {
        let batch = self.batches.pop_front()?;
        self.readings -= batch.readings;
        self.payload_bytes -= batch.payload_bytes;
        Some(batch.no)
    }
}

/// Readings pushed together, as published. Immutable.
pub struct LiveBatch {
    no: u64,
    first_seq: u64,
    readings: Box<[Reading]>,
}

impl LiveBatch {
    fn end_seq(&self) -> u64 {
        self.first_seq + self.readings.len() as u64
    }

    fn holds(&self, seq: u64) -> bool {
        (self.first_seq..self.end_seq()).contains(&seq)
    }
}

/// Counters for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveStats {
    /// Reads that found their next reading not in the ring and read the
    /// buffer instead.
    pub behind: u64,
}

/// What a watcher takes from the ring in one go: runs of readings, each in
/// a batch it holds, up to a bound.
pub struct LiveRead {
    pub runs: Vec<LiveRun>,
    /// The last sequence number looked at.
    pub cursor: u64,
}

/// Picked readings of one batch.
pub struct LiveRun {
    batch: Arc<LiveBatch>,
    picked: Vec<u32>,
}

impl Live {
    pub fn new(next_seq: u64) -> Self {
        Self {
            slots: (0..LIVE_BATCHES).map(|_| ArcSwapOption::empty()).collect(),
            next_batch: AtomicU64::new(0),
            next_seq: AtomicU64::new(next_seq),
            floor: AtomicU64::new(0),
            start_seq: AtomicU64::new(next_seq),
            wake: Default::default(),
            behind: AtomicU64::new(0),
            held: Mutex::default(),
        }
    }

    /// The number the next reading pushed gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire)
    }

    /// What the ring holds and has done; see [`LiveStats`].
    pub fn stats(&self) -> LiveStats {
        LiveStats {
            behind: self.behind.load(Ordering::Relaxed),
        }
    }

    /// Publishes `readings` (numbered on from `readings[0].seq`, without
    /// holes; none when nobody watches), sets the next number to `next_seq`
    /// and the buffer's oldest to `floor`. Called with the hub's write lock
    /// held, so batches go in in number order; [`Live::wake`] follows once
    /// the lock is released.
    pub fn publish(&self, readings: Vec<Reading>, next_seq: u64, floor: u64) {
        let mut held = sync::lock(&self.held);
        self.floor.store(floor, Ordering::Release);
        // What the buffer evicted leaves the ring too.
        let evicted = |b: &HeldBatch| b.first_seq + b.readings as u64 <= floor;
        while held.batches.front().is_some_and(evicted) {
            self.evict_oldest(&mut held);
        }
        let mut readings = readings.into_iter().peekable();
        while let Some(first) = readings.peek() {
            let first_seq = first.seq;
            let (mut entries, mut payload) = (Vec::new(), 0);
            while let Some(reading) = readings.next_if(|r| {
                entries.is_empty()
                    || (entries.len() < LIVE_BATCH_READINGS
                        && payload + r.payload.len() <= LIVE_BATCH_BYTES)
            }) {
                payload += reading.payload.len();
                entries.push(reading);
            }
            let entries = entries.into_boxed_slice();
            let no = self.next_batch.load(Ordering::Relaxed);
            // Make room first: the slot this batch takes, then the oldest
            // while over a bound.
            while held.batches.len() >= LIVE_BATCHES
                || (!held.batches.is_empty()
                    && (held.readings + entries.len() > LIVE_READINGS
                        || held.payload_bytes + payload > LIVE_PAYLOAD_BYTES))
            {
                self.evict_oldest(&mut held);
            }
            held.push(HeldBatch {
                no,
                first_seq,
                readings: entries.len(),
                payload_bytes: payload,
            });
            let batch = LiveBatch {
                no,
                first_seq,
                readings: entries,
            };
            self.slot(no).store(Some(Arc::new(batch)));
            self.next_batch.store(no + 1, Ordering::Release);
        }
        // Nothing in the ring is older than its oldest batch's first.
        let start = held.batches.front().map_or(next_seq, |b| b.first_seq);
        self.start_seq.store(start, Ordering::Release);
        // SeqCst: see `wait_past`.
        self.next_seq.store(next_seq, Ordering::SeqCst);
    }

    /// Empties the slot of the oldest batch in the ring.
    fn evict_oldest(&self, held: &mut Held) {
        if let Some(no) = held.pop() {
            self.slot(no).store(None);
        }
    }

    /// Wakes every waiting watcher.
    pub fn wake(&self) {
        for shard in &self.wake {
            if shard.sleepers.load(Ordering::SeqCst) > 0 {
                shard.notify.notify_waiters();
            }
        }
    }

    /// Returns at once if a reading numbered above `seq` has been pushed,
    /// else after the next push. `shard` spreads the waiters (any number;
    /// one per watcher).
    pub async fn wait_past(&self, seq: u64, shard: usize) {
        if self.next_seq() > seq + 1 {
            return;
        }
        let shard = &self.wake[shard % WAKE_SHARDS];
        let notified = shard.notify.notified();
        tokio::pin!(notified);
        // Counted and registered before the second look, all SeqCst as the
        // pusher's store of `next_seq` and load of `sleepers` are: either
        // this look sees the push, or the pusher sees this waiter and wakes
        // it.
        shard.sleepers.fetch_add(1, Ordering::SeqCst);
        let _sleeping = Sleeping(&shard.sleepers);
        notified.as_mut().enable();
        if self.next_seq.load(Ordering::SeqCst) > seq + 1 {
            return;
        }
        notified.await;
    }

    fn slot(&self, no: u64) -> &ArcSwapOption<LiveBatch> {
        &self.slots[(no % LIVE_BATCHES as u64) as usize]
    }

    /// The batch numbered `no`, if the ring still holds it and `wanted`
    /// says yes. Looking costs no shared write (an `arc-swap` guard); only
    /// the batch returned gets a reference count.
    fn batch_if(&self, no: u64, wanted: impl Fn(&LiveBatch) -> bool) -> Option<Arc<LiveBatch>> {
        let guard = self.slot(no).load();
        let batch = guard.as_ref().filter(|b| b.no == no && wanted(b))?;
        Some(Arc::clone(batch))
    }

    #[cfg(test)]
    fn batch(&self, no: u64) -> Option<Arc<LiveBatch>> {
        self.batch_if(no, |_| true)
    }

    /// The batch holding `seq`, looked for at `hint` and the batches next
    /// to it first (where a watcher's next reading, or a page's, nearly
    /// always is), then by bisection over the ring. A number outside the
    /// ring's range costs two loads.
    fn find(&self, seq: u64, hint: u64) -> Option<Arc<LiveBatch>> {
        let start = self.start_seq.load(Ordering::Acquire);
        if seq < start || seq >= self.next_seq.load(Ordering::Acquire) {
            return None;
        }
        for no in [hint, hint + 1, hint.saturating_sub(1)] {
            if let Some(batch) = self.batch_if(no, |b| b.holds(seq)) {
                return Some(batch);
            }
        }
        let end = self.next_batch.load(Ordering::Acquire);
        let (mut low, mut high) = (end.saturating_sub(LIVE_BATCHES as u64), end);
        while low < high {
            let mid = low + (high - low) / 2;
            let guard = self.slot(mid).load();
            match guard.as_ref().filter(|b| b.no == mid) {
                // Gone (evicted while we looked): everything before it too.
                None => low = mid + 1,
                Some(batch) if batch.holds(seq) => return Some(Arc::clone(batch)),
                Some(batch) if seq < batch.first_seq => high = mid,
                Some(_) => low = mid + 1,
            }
        }
        None
    }

    /// The readings after `after` that match `filter`, from the ring: up to
    /// `max_scan` looked at and `max_bytes` of payload (at least one
    /// reading). `None` when the next reading is not in the ring. `hint`
    /// is the batch the previous read ended in, and is moved on.
    pub fn read_after(
        &self,
        after: u64,
        hint: &mut u64,
        filter: &ReadingFilter,
        max_scan: usize,
        max_bytes: usize,
    ) -> Option<LiveRead> {
        let found = match after + 1 >= self.floor.load(Ordering::Acquire) {
            true => self.find(after + 1, *hint),
            false => None,
        };
        let Some(mut batch) = found else {
            self.behind.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let (mut runs, mut cursor, mut scanned, mut taken, mut bytes) =
            (Vec::new(), after, 0, 0, 0);
        loop {
            *hint = batch.no;
            let start = (cursor + 1 - batch.first_seq) as usize;
            let mut picked = Vec::new();
            let mut full = false;
            for (i, reading) in batch.readings.iter().enumerate().skip(start) {
                if scanned == max_scan {
                    full = true;
                    break;
                }
                if filter.matches_source(reading.device_id(), reading.topic()) {
                    let len = reading.payload.len();
                    if taken > 0 && bytes + len > max_bytes {
                        full = true; // this one starts the next read
                        break;
                    }
                    bytes += len;
                    taken += 1;
                    picked.push(i as u32);
                }
                scanned += 1;
                cursor = reading.seq;
            }
            let (no, end) = (batch.no, batch.end_seq());
            if !picked.is_empty() {
                runs.push(LiveRun { batch, picked });
            }
            if full {
                break;
            }
            // Go on into the next batch if it follows on without a hole.
            match self.batch_if(no + 1, |b| b.first_seq == end) {
                Some(next) => batch = next,
                None => break,
            }
        }
        Some(LiveRead { runs, cursor })
    }
}

/// What [`ReadingWatcher::next_batch`](super::ReadingWatcher::next_batch)
/// returns: readings from the ring, or copied out of the buffer.
pub enum WatchBatch {
    Live(Vec<LiveRun>),
    Copied(Vec<Reading>),
}

impl WatchBatch {
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Live(runs) => runs.is_empty(),
            Self::Copied(readings) => readings.is_empty(),
        }
    }

    /// The last reading's sequence number.
    pub fn last_seq(&self) -> Option<u64> {
        self.readings().last().map(|r| r.seq)
    }

    /// The readings, in order: borrowed from the ring's batches, or copied.
    pub fn readings(&self) -> impl Iterator<Item = &Reading> {
        let (runs, copied) = match self {
            Self::Live(runs) => (&runs[..], &[][..]),
            Self::Copied(readings) => (&[][..], &readings[..]),
        };
        let live = runs
            .iter()
            .flat_map(|run| run.picked.iter().map(|&i| &run.batch.readings[i as usize]));
        live.chain(copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::{Duration, SystemTime};

    fn reading(seq: u64, device: &str, payload: &[u8]) -> Reading {
        let topic = format!("devices/{device}/readings");
        let payload = Bytes::copy_from_slice(payload);
        Reading::new(seq, device, &topic, SystemTime::now(), payload, 1, false)
    }

    /// Publishes readings `from..to` (device `d{seq % 3}`) as one push.
    fn push(live: &Live, from: u64, to: u64) {
        let readings = (from..to)
            .map(|seq| reading(seq, &format!("d{}", seq % 3), seq.to_string().as_bytes()))
            .collect();
        live.publish(readings, to, 1);
    }

    fn seqs(read: &LiveRead) -> Vec<u64> {
        let batch = WatchBatch::Live(read_runs(read));
        batch
            .readings()
            .map(|r| {
                assert_eq!(r.payload, r.seq.to_string().as_bytes());
                r.seq
            })
            .collect()
    }

    fn read_runs(read: &LiveRead) -> Vec<LiveRun> {
        read.runs
            .iter()
            .map(|r| LiveRun {
                batch: r.batch.clone(),
                picked: r.picked.clone(),
            })
            .collect()
    }

    #[test]
    fn a_read_follows_batches_in_order_with_filters_and_bounds() {
        let live = Live::new(1);
        push(&live, 1, 4);
        push(&live, 4, 5);
        push(&live, 5, 11);
        assert_eq!(live.next_seq(), 11);
        let all = ReadingFilter::default();
        let mut hint = 0;
        for after in 0..10 {
            let read = live
                .read_after(after, &mut hint, &all, 512, 1 << 20)
                .unwrap();
            assert_eq!(seqs(&read), (after + 1..11).collect::<Vec<_>>());
            assert_eq!(read.cursor, 10);
        }
        // At most `max_scan` looked at; the cursor says where it stopped.
        let read = live.read_after(2, &mut hint, &all, 4, 1 << 20).unwrap();
        assert_eq!((seqs(&read), read.cursor), (vec![3, 4, 5, 6], 6));
        // One device: the others are looked at, not returned.
        let d1 = ReadingFilter {
            device_id: Some("d1".into()),
            ..Default::default()
        };
        let read = live.read_after(0, &mut hint, &d1, 512, 1 << 20).unwrap();
        assert_eq!((seqs(&read), read.cursor), (vec![1, 4, 7, 10], 10));
        // Bytes: "1" and "2" fit in 2 bytes, "3" starts the next read; a
        // reading larger than the bound still goes alone.
        let read = live.read_after(0, &mut hint, &all, 512, 2).unwrap();
        assert_eq!((seqs(&read), read.cursor), (vec![1, 2], 2));
        let read = live.read_after(9, &mut hint, &all, 512, 1).unwrap();
        assert_eq!(seqs(&read), vec![10]);
        // Nothing after the newest; nothing before the first published.
        assert!(live.read_after(0, &mut 7, &all, 512, 1 << 20).is_some());
        let empty = Live::new(5);
        assert!(empty.read_after(4, &mut 0, &all, 512, 1 << 20).is_none());
        assert_eq!(empty.stats().behind, 1);
    }

    #[test]
    fn a_hole_between_pushes_ends_a_read_and_what_the_buffer_evicted_is_not_served() {
        let live = Live::new(1);
        push(&live, 1, 3);
        push(&live, 5, 7); // 3 and 4 were never published
        let all = ReadingFilter::default();
        let read = live.read_after(0, &mut 0, &all, 512, 1 << 20).unwrap();
        assert_eq!((seqs(&read), read.cursor), (vec![1, 2], 2));
        assert!(live.read_after(2, &mut 0, &all, 512, 1 << 20).is_none());
        let read = live.read_after(4, &mut 0, &all, 512, 1 << 20).unwrap();
        assert_eq!(seqs(&read), vec![5, 6]);

        // The buffer's oldest is now 6: 5 is not served, and the batch
        // wholly below it left the ring.
        live.publish(vec![reading(7, "d", b"7")], 8, 6);
        assert!(live.read_after(4, &mut 0, &all, 512, 1 << 20).is_none());
        assert!(live.batch(0).is_none());
        let read = live.read_after(5, &mut 0, &all, 512, 1 << 20).unwrap();
        assert_eq!(seqs(&read), vec![6, 7]);
    }

    #[test]
    fn the_ring_is_bounded_by_batches_readings_and_bytes() {
        let live = Live::new(1);
        let all = ReadingFilter::default();
        let pushes = LIVE_BATCHES as u64 + 10;
        for seq in 1..=pushes {
            push(&live, seq, seq + 1);
        }
        assert!(live.read_after(0, &mut 0, &all, 512, 1 << 20).is_none());
        let oldest = pushes - LIVE_BATCHES as u64 + 1;
        let read = live
            .read_after(oldest - 1, &mut 0, &all, 512, 1 << 20)
            .unwrap();
        assert_eq!(read.cursor, oldest - 1 + 512);

        // Readings: a push of more than the bound keeps the newest batches.
        let live = Live::new(1);
        let many = LIVE_READINGS as u64 + 1000;
        push(&live, 1, many + 1);
        let held = sync::lock(&live.held);
        assert!(held.readings <= LIVE_READINGS);
        let newest = held.batches.back().map(|b| b.first_seq + b.readings as u64);
        assert_eq!(newest, Some(many + 1));
        drop(held);

        // Payload bytes: 40 readings of 1 MiB keep 32 MiB at most, one
        // reading a batch.
        let live = Live::new(1);
        let big = vec![b'x'; 1 << 20];
        let readings = (1..=40).map(|seq| reading(seq, "d", &big)).collect();
        live.publish(readings, 41, 1);
        let held = sync::lock(&live.held);
        assert!(held.payload_bytes <= LIVE_PAYLOAD_BYTES);
        assert_eq!(held.batches.len(), LIVE_PAYLOAD_BYTES >> 20);
        assert!(held.batches.iter().all(|b| b.readings == 1));
    }

    #[test]
    fn a_batch_lends_the_rings_readings_as_a_copied_one_its_own() {
        let live = Live::new(1);
        push(&live, 1, 4);
        push(&live, 4, 6);
        let all = ReadingFilter::default();
        let read = live.read_after(1, &mut 0, &all, 512, 1 << 20).unwrap();
        let ring = live.batch(0).unwrap();
        let batch = WatchBatch::Live(read.runs);
        // The ring's own readings, not copies: the same payload bytes.
        let first = batch.readings().next().unwrap();
        assert!(std::ptr::eq(first, &ring.readings[1]));
        let copied = WatchBatch::Copied(batch.readings().cloned().collect());
        for batch in [&batch, &copied] {
            let seqs: Vec<u64> = batch.readings().map(|r| r.seq).collect();
            assert_eq!(seqs, [2, 3, 4, 5]);
            assert_eq!(batch.last_seq(), Some(5));
        }
        assert!(WatchBatch::Copied(Vec::new()).last_seq().is_none());
    }

    #[tokio::test]
    async fn waiting_ends_with_the_next_push() {
        let live = Arc::new(Live::new(1));
        // Nothing above 1 is in: no return without a push.
        tokio::time::timeout(Duration::from_millis(100), live.wait_past(1, 3))
            .await
            .expect_err("nothing was pushed");
        let waiter = tokio::spawn({
            let live = live.clone();
            async move { live.wait_past(0, 5).await }
        });
        tokio::task::yield_now().await;
        push(&live, 1, 2);
        live.wake();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
        tokio::time::timeout(Duration::from_secs(5), live.wait_past(0, 1))
            .await
            .expect("a reading above 0 is in");
    }
}
