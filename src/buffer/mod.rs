//! The bounded in-memory store of readings: [`ReadingBuffer`].
//!
//! Plain data structures, no async and no gRPC types; [`crate::hub`] puts it
//! behind a lock and wakes watchers.
//!
//! This file stores and evicts; `query.rs` reads (ListReadings pages and
//! watchers' scans), `devices.rs` keeps the device records and serves the
//! device list, `arena.rs` packs the payloads.
//!
//! # Design
//! - Readings live in one `VecDeque<Slot>` in arrival order, stored inline
//!   and compact (32 bytes besides the payload: see [`Slot`]), with the
//!   payloads packed in a [`PayloadArena`]. Sequence
//!   numbers are contiguous inside the buffer, so they are not stored: the
//!   reading with sequence number `s` sits at index `s - first_seq`, and a
//!   cursor is found in O(1).
//! - `received_at` never goes backwards (a clock step back is clamped to the
//!   previous reading's time), so a time range is two binary searches.
//! - A per-device index keeps each device's sequence numbers in order, so a
//!   page for one device costs O(log n + page) however large the buffer. It
//!   also interns the device id and the device's last topic: readings of a
//!   device share one [`Source`] instead of owning the strings. Its entries
//!   are the device records of the device list (`devices.rs`).
//! - Topic filters without a device are served by a scan that stops as soon as
//!   the page is full.
//! - Sources are `Arc`-shared, so a [`Reading`] handed out by listing or
//!   watching copies a pointer and its payload (tens of bytes, the one copy
//!   that keeps memory per stored reading low), never the buffer. WatchReadings
//!   encodes each reading once for all its streams (see `grpc`).
//! - Watchers do not get a queue of their own: each keeps a cursor (the last
//!   sequence number it looked at) and reads forward from it with
//!   [`ReadingBuffer::scan_after`]. A slow watcher costs no memory and never
//!   blocks ingestion; if it falls behind the oldest buffered reading, the scan
//!   reports exactly which sequence numbers it missed.
//! - Bounds: a number of readings and a number of bytes (payload, topic,
//!   device id and a fixed per-reading overhead). The oldest readings are
//!   evicted first, and evictions are counted. A single reading larger than the
//!   byte bound is still kept (alone), never dropped on arrival.

use std::{collections::VecDeque, sync::Arc, time::SystemTime};

use bytes::Bytes;

use crate::config::{BufferLimits, DeviceLimits};

mod arena;
mod devices;
mod query;

use arena::{PayloadArena, PayloadRef};
use devices::Devices;
pub use devices::{
    ConnectionStatus, DeviceEntry, DeviceInfo, DeviceStats, LastReading, MessageKind, Presence,
};
pub use query::{CursorError, ListPage, ListQuery, ReadingFilter, MAX_EXAMINED_PER_PAGE};

/// Where readings come from: a device and a topic, shared by every stored
/// reading of that device on that topic.
#[derive(Debug, PartialEq, Eq)]
struct Source {
    device_id: Arc<str>,
    topic: Arc<str>,
}

/// A stored reading: 32 bytes besides the payload, which is in the
/// [`PayloadArena`]. The sequence number is implied by the position, the time
/// is microseconds since the Unix epoch.
#[derive(Debug)]
struct Slot {
    source: Arc<Source>,
    received_micros: u64,
    payload: PayloadRef,
    qos: u8,
    retained: bool,
}

/// One MQTT message received from a device, as the buffer hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// Unique in the buffer, increasing in arrival order.
    pub seq: u64,
    /// Device id and topic, shared with the buffer (one reference count
    /// per reading handed out, not one per string).
    source: Arc<Source>,
    pub received_at: SystemTime,
    /// The payload byte for byte, whatever it is.
    pub payload: Bytes,
    pub qos: u8,
    pub retained: bool,
}

/// What ingestion hands to [`ReadingBuffer::push`].
#[derive(Debug, Clone, Copy)]
pub struct NewReading<'a> {
    pub device_id: &'a str,
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub retained: bool,
    pub received_at: SystemTime,
    /// A reading, a reply or a status message, for the device's record.
    pub kind: MessageKind,
}

impl Reading {
    /// A reading read back from elsewhere (the store), with strings of its
    /// own.
    pub fn new(
        seq: u64,
        device_id: &str,
        topic: &str,
        received_at: SystemTime,
        payload: Bytes,
        qos: u8,
        retained: bool,
    ) -> Self {
        Self {
            seq,
            source: Arc::new(Source {
                device_id: device_id.into(),
                topic: topic.into(),
            }),
            received_at,
            payload,
            qos,
            retained,
        }
    }

    /// What ingest would have handed over for it, as a `kind` of message.
    pub fn as_new(&self, kind: MessageKind) -> NewReading<'_> {
        NewReading {
            device_id: self.device_id(),
            topic: self.topic(),
            payload: &self.payload,
            qos: self.qos,
            retained: self.retained,
            received_at: self.received_at,
            kind,
        }
    }

    /// From the topic; empty when the topic did not follow the template.
    pub fn device_id(&self) -> &str {
        &self.source.device_id
    }

    pub fn topic(&self) -> &str {
        &self.source.topic
    }
}

/// Microseconds since the Unix epoch (0 before it): the time readings are
/// kept and compared in, here and in the store.
pub fn unix_micros(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Most readings whose slots are reserved up front (128 MiB of address space).
const MAX_RESERVED_READINGS: usize = 1 << 22;

/// Bytes charged per reading on top of its payload, topic and device id: its
/// slot in the deque and its entry in the device index.
pub const READING_OVERHEAD_BYTES: usize = std::mem::size_of::<Slot>() + 8;

/// Counters for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferStats {
    pub readings: usize,
    pub bytes: usize,
    pub evicted: u64,
    /// Sequence number of the oldest buffered reading (`next_seq` when empty).
    pub first_seq: u64,
    /// Sequence number the next reading will get.
    pub next_seq: u64,
    /// When the oldest buffered reading arrived (`None` when empty).
    pub oldest_received_at: Option<SystemTime>,
}

/// The bounded store. See the module documentation for the design.
pub struct ReadingBuffer {
    readings: VecDeque<Slot>,
    payloads: PayloadArena,
    /// Sequence number of `readings[0]`, or of the next reading when empty.
    first_seq: u64,
    devices: Devices,
    bytes: usize,
    evicted: u64,
    limits: BufferLimits,
    last_received_micros: u64,
}

impl ReadingBuffer {
    /// An empty buffer whose first reading gets sequence number `first_seq`.
    pub fn new(limits: BufferLimits, first_seq: u64) -> Self {
        // Room for as many readings as the limits allow, reserved at once:
        // growing by doubling would leave up to half of it unused, and pages
        // not yet written take no memory. Past a sane size (limits are not
        // bounded in the configuration) the deque grows as it fills.
        let most = limits
            .max_readings
            .min(limits.max_bytes / READING_OVERHEAD_BYTES + 1)
            .min(MAX_RESERVED_READINGS);
        Self {
            readings: VecDeque::with_capacity(most),
            payloads: PayloadArena::default(),
            first_seq,
            devices: Devices::new(DeviceLimits::default()),
            bytes: 0,
            evicted: 0,
            limits,
            last_received_micros: 0,
        }
    }

    /// The same buffer, with these bounds on the device list.
    pub fn with_device_limits(mut self, limits: DeviceLimits) -> Self {
        self.devices = Devices::new(limits);
        self
    }

    pub fn stats(&self) -> BufferStats {
        BufferStats {
            readings: self.readings.len(),
            bytes: self.bytes,
            evicted: self.evicted,
            first_seq: self.first_seq,
            next_seq: self.next_seq(),
            oldest_received_at: self.readings.front().map(|slot| {
                SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(slot.received_micros)
            }),
        }
    }

    /// The sequence number the next reading will get.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.readings.len() as u64
    }

    /// Makes `seq` the next sequence number when it is ahead (the store
    /// numbered readings this buffer never saw): the buffer empties, since
    /// its sequence numbers are contiguous, and the device records keep
    /// their newest readings. Returns how many readings were dropped.
    pub fn skip_to(&mut self, seq: u64) -> usize {
        let dropped = self.readings.len();
        if seq <= self.next_seq() {
            return 0;
        }
        // Evicting everything keeps each device's newest reading.
        let limits = self.limits;
        self.limits.max_readings = 0;
        self.evict();
        self.limits = limits;
        self.first_seq = seq;
        dropped
    }

    /// Stores a reading, evicting the oldest ones beyond the limits, and
    /// returns its sequence number.
    pub fn push(&mut self, new: NewReading<'_>) -> u64 {
        let seq = self.next_seq();
        let micros = unix_micros(new.received_at).max(self.last_received_micros);
        self.last_received_micros = micros;

        let source = self.devices.record(
            new.device_id,
            new.topic,
            seq,
            micros,
            new.kind,
            new.retained,
        );
        let slot = Slot {
            source,
            received_micros: micros,
            payload: self.payloads.push(new.payload),
            qos: new.qos,
            retained: new.retained,
        };
        self.bytes += charged_bytes(&slot);
        self.readings.push_back(slot);
        self.evict();
        seq
    }

    fn evict(&mut self) {
        while self.readings.len() > self.limits.max_readings
            || (self.bytes > self.limits.max_bytes && self.readings.len() > 1)
        {
            let Some(oldest) = self.readings.pop_front() else {
                break;
            };
            let seq = self.first_seq;
            self.first_seq += 1;
            self.evicted += 1;
            self.bytes -= charged_bytes(&oldest);
            // A device's newest reading outlives its eviction, copied (its
            // payload is still in the arena until the end of this call).
            let device_id = &oldest.source.device_id;
            let kept = self
                .devices
                .is_newest_reading(device_id, seq)
                .then(|| self.reading(seq, &oldest));
            self.devices.evicted(device_id, seq, kept);
        }
        match self.readings.front() {
            Some(oldest) => self.payloads.release_before(oldest.payload),
            None => self.payloads.release_all(),
        }
    }

    /// A stored slot as the reading handed out, with a copy of its payload.
    fn reading(&self, seq: u64, slot: &Slot) -> Reading {
        Reading {
            seq,
            source: slot.source.clone(),
            received_at: SystemTime::UNIX_EPOCH
                + std::time::Duration::from_micros(slot.received_micros),
            payload: Bytes::copy_from_slice(self.payloads.get(slot.payload)),
            qos: slot.qos,
            retained: slot.retained,
        }
    }

    /// The buffered reading `seq`, with a copy of its payload.
    pub fn reading_at(&self, seq: u64) -> Option<Reading> {
        self.get(seq).map(|slot| self.reading(seq, slot))
    }

    fn get(&self, seq: u64) -> Option<&Slot> {
        let index = seq.checked_sub(self.first_seq)?;
        self.readings.get(usize::try_from(index).ok()?)
    }
}

fn charged_bytes(slot: &Slot) -> usize {
    let source = &slot.source;
    slot.payload.len() + source.topic.len() + source.device_id.len() + READING_OVERHEAD_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;
    use std::time::Duration;

    pub(super) const FIRST: u64 = 1_000;

    pub(super) fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    pub(super) fn buffer(max_readings: usize, max_bytes: usize) -> ReadingBuffer {
        ReadingBuffer::new(
            BufferLimits {
                max_readings,
                max_bytes,
            },
            FIRST,
        )
    }

    pub(super) fn push(buf: &mut ReadingBuffer, device: &str, secs: u64, payload: &str) -> u64 {
        let topic = format!("devices/{device}/readings");
        buf.push(NewReading {
            kind: crate::buffer::MessageKind::Reading,
            device_id: device,
            topic: &topic,
            payload: payload.as_bytes(),
            qos: 1,
            retained: false,
            received_at: at(secs),
        })
    }

    pub(super) fn seqs(page: &ListPage) -> Vec<u64> {
        page.readings.iter().map(|r| r.seq).collect()
    }

    pub(super) fn query(limit: usize) -> ListQuery {
        ListQuery {
            limit,
            ..ListQuery::default()
        }
    }

    #[test]
    fn a_stored_reading_is_compact() {
        // What the module documentation promises; the memory target depends on it.
        assert_eq!(std::mem::size_of::<Slot>(), 32);
        assert_eq!(READING_OVERHEAD_BYTES, 40);
    }

    #[test]
    fn unbounded_limits_reserve_a_bounded_deque() {
        let mut buf = buffer(usize::MAX, usize::MAX);
        assert!(buf.readings.capacity() <= 2 * MAX_RESERVED_READINGS);
        assert_eq!(push(&mut buf, "d1", 1, "{}"), FIRST);
    }

    #[test]
    fn sequence_numbers_are_contiguous_and_start_where_told() {
        let mut buf = buffer(10, usize::MAX);
        assert_eq!(push(&mut buf, "a", 1, "1"), FIRST);
        assert_eq!(push(&mut buf, "b", 2, "2"), FIRST + 1);
        assert_eq!(buf.stats().next_seq, FIRST + 2);
    }

    #[test]
    fn evicts_oldest_by_count_and_counts_evictions() {
        let mut buf = buffer(3, usize::MAX);
        for i in 0..5 {
            push(&mut buf, "a", i, "x");
        }
        let stats = buf.stats();
        assert_eq!(stats.readings, 3);
        assert_eq!(stats.evicted, 2);
        assert_eq!(stats.first_seq, FIRST + 2);
        assert_eq!(
            seqs(&buf.list(&query(10)).unwrap()),
            [FIRST + 4, FIRST + 3, FIRST + 2]
        );
    }

    #[test]
    fn evicts_oldest_by_bytes_but_keeps_an_oversized_reading() {
        let per = READING_OVERHEAD_BYTES + 1 + "devices/a/readings".len() + 1;
        let mut buf = buffer(100, per * 2);
        for i in 0..4 {
            push(&mut buf, "a", i, "x");
        }
        assert_eq!(buf.stats().readings, 2);
        assert_eq!(buf.stats().bytes, per * 2);

        let big = "y".repeat(per * 10);
        let seq = push(&mut buf, "a", 9, &big);
        let stats = buf.stats();
        assert_eq!((stats.readings, stats.evicted), (1, 4));
        assert_eq!(seqs(&buf.list(&query(10)).unwrap()), [seq]);
    }

    #[test]
    fn readings_share_device_and_topic_strings() {
        let mut buf = buffer(10, usize::MAX);
        push(&mut buf, "a", 1, "1");
        push(&mut buf, "a", 2, "2");
        let page = buf.list(&query(10)).unwrap();
        assert!(Arc::ptr_eq(
            &page.readings[0].source,
            &page.readings[1].source
        ));
        assert!(Arc::ptr_eq(
            &page.readings[0].source.device_id,
            &page.readings[1].source.device_id
        ));
    }

    #[test]
    fn received_at_never_goes_backwards() {
        let mut buf = buffer(10, usize::MAX);
        push(&mut buf, "a", 10, "1");
        push(&mut buf, "a", 5, "2");
        let page = buf.list(&ListQuery {
            oldest_first: true,
            ..query(10)
        });
        let times: Vec<_> = page
            .unwrap()
            .readings
            .iter()
            .map(|r| r.received_at)
            .collect();
        assert_eq!(times, [at(10), at(10)]);
    }

    /// Model-based check: random pushes (devices, topics, payload sizes,
    /// clock steps backwards) and random queries (filters, time ranges, page
    /// sizes, both orders, paging to the end) against a naive model: a plain
    /// list of what the buffer should hold, filtered by brute force.
    #[test]
    fn random_operations_match_a_naive_model() {
        for seed in 0..40 {
            let mut rng = Rng(seed);
            let limits = BufferLimits {
                max_readings: 1 + rng.below(60) as usize,
                max_bytes: READING_OVERHEAD_BYTES * (1 + rng.below(40) as usize)
                    + rng.below(500) as usize,
            };
            let mut buf = ReadingBuffer::new(limits, FIRST);
            let mut model: Vec<Reading> = Vec::new();
            let mut clock = 1_000u64;
            for _ in 0..400 {
                if rng.below(3) > 0 {
                    // Push; the clock sometimes steps back.
                    clock =
                        (clock + rng.below(5)).saturating_sub(rng.below(4) * (rng.below(8) / 7));
                    let device = format!("d{}", rng.below(5));
                    let topic = format!(
                        "devices/{device}/{}",
                        ["readings", "status"][rng.below(2) as usize]
                    );
                    // Distinct bytes, so a payload read from the wrong place
                    // in the arena cannot pass for the right one.
                    let salt = rng.below(256);
                    let payload: Vec<u8> = (0..rng.below(200)).map(|j| (salt + j) as u8).collect();
                    let seq = buf.push(NewReading {
                        kind: crate::buffer::MessageKind::Reading,
                        device_id: &device,
                        topic: &topic,
                        payload: &payload,
                        qos: 1,
                        retained: false,
                        received_at: at(clock),
                    });
                    // The newest reading is never evicted on arrival.
                    model.push(buf.reading(seq, buf.get(seq).unwrap()));
                    // The model evicts by the documented rule.
                    let charged = |m: &[Reading]| {
                        m.iter()
                            .map(|r| {
                                r.payload.len()
                                    + r.topic().len()
                                    + r.device_id().len()
                                    + READING_OVERHEAD_BYTES
                            })
                            .sum::<usize>()
                    };
                    while model.len() > limits.max_readings
                        || (model.len() > 1 && charged(&model) > limits.max_bytes)
                    {
                        model.remove(0);
                    }
                    let stats = buf.stats();
                    assert_eq!(stats.readings, model.len(), "seed {seed}");
                    assert_eq!(stats.bytes, charged(&model), "seed {seed}");
                    assert!(model
                        .windows(2)
                        .all(|w| w[0].received_at <= w[1].received_at));
                    continue;
                }
                let filter = ReadingFilter {
                    device_id: (rng.below(2) == 0).then(|| format!("d{}", rng.below(6))),
                    topic_filter: match rng.below(4) {
                        0 => Some("devices/+/status".into()),
                        1 => Some("devices/#".into()),
                        2 => Some(format!("devices/d{}/readings", rng.below(5))),
                        _ => None,
                    },
                    ..Default::default()
                };
                let start = (rng.below(3) == 0).then(|| at(clock.saturating_sub(rng.below(30))));
                let end = (rng.below(3) == 0).then(|| at(clock.saturating_sub(rng.below(30)) + 1));
                let oldest_first = rng.below(2) == 0;
                let limit = 1 + rng.below(25) as usize;
                let mut want: Vec<u64> = model
                    .iter()
                    .filter(|r| filter.matches_source(r.device_id(), r.topic()))
                    .filter(|r| start.is_none_or(|s| r.received_at >= s))
                    .filter(|r| end.is_none_or(|e| r.received_at < e))
                    .map(|r| r.seq)
                    .collect();
                if !oldest_first {
                    want.reverse();
                }
                let mut got = Vec::new();
                let mut cursor = None;
                loop {
                    let query = ListQuery {
                        filter: filter.clone(),
                        start,
                        end,
                        limit,
                        cursor,
                        oldest_first,
                        // Sometimes a byte budget too: pages get shorter,
                        // never lose or repeat a reading.
                        max_bytes: limit.is_multiple_of(3).then_some(150),
                    };
                    let page = buf.list(&query).unwrap();
                    assert!(page.readings.len() <= limit);
                    got.extend(seqs(&page));
                    match page.next_cursor {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
                assert_eq!(
                    got, want,
                    "seed {seed}: {filter:?} {start:?}..{end:?} oldest_first={oldest_first}"
                );

                // A watcher from a random point sees the same as the model.
                let everything = ReadingFilter::default();
                let after =
                    buf.stats().first_seq.saturating_sub(1) + rng.below(model.len() as u64 + 1);
                let (batch, _) = buf
                    .scan_after(after, usize::MAX, usize::MAX, &everything)
                    .unwrap();
                let expect: Vec<u64> = model.iter().map(|r| r.seq).filter(|s| *s > after).collect();
                assert_eq!(
                    batch.iter().map(|r| r.seq).collect::<Vec<_>>(),
                    expect,
                    "seed {seed}"
                );
            }
        }
    }
}
