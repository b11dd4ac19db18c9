//! The bounded in-memory store of readings: [`ReadingBuffer`].
//!
//! Plain data structures, no async and no gRPC types; [`crate::hub`] puts it
//! behind a lock and wakes watchers.
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

use crate::{
    config::{BufferLimits, DeviceLimits},
    scope::DeviceSet,
    topic::topic_matches,
};

mod arena;
mod devices;

use arena::{PayloadArena, PayloadRef};
pub use devices::{ConnectionStatus, DeviceInfo, DeviceStats, MessageKind};
use devices::{Device, Devices, NewestReading};

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

/// A device as the device list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    pub info: DeviceInfo,
    /// Its newest reading, buffered or kept, as the lister's `encode` made
    /// it (now or for an earlier page).
    pub last_reading: Option<Bytes>,
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

/// Most readings whose slots are reserved up front (128 MiB of address space).
const MAX_RESERVED_READINGS: usize = 1 << 22;

/// Bytes charged per reading on top of its payload, topic and device id: its
/// slot in the deque and its entry in the device index.
pub const READING_OVERHEAD_BYTES: usize = std::mem::size_of::<Slot>() + 8;

/// Which readings a list or a watch wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadingFilter {
    pub device_id: Option<String>,
    pub topic_filter: Option<String>,
    /// The devices the reader may see (its token's read scope): readings of
    /// other devices are skipped as if they did not match.
    pub devices: DeviceSet,
}

impl ReadingFilter {
    pub(crate) fn matches_source(&self, device_id: &str, topic: &str) -> bool {
        self.device_id.as_deref().is_none_or(|d| device_id == d)
            && self.devices.allows(device_id)
            && self
                .topic_filter
                .as_deref()
                .is_none_or(|f| topic_matches(f, topic))
    }
}

/// A request for one page of readings.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub filter: ReadingFilter,
    /// Inclusive lower bound on `received_at`.
    pub start: Option<SystemTime>,
    /// Exclusive upper bound on `received_at`.
    pub end: Option<SystemTime>,
    /// At most this many readings (at least 1).
    pub limit: usize,
    /// Continue at this sequence number (inclusive), from a previous page.
    pub cursor: Option<u64>,
    pub oldest_first: bool,
    /// Stop before the payloads copied out pass this many bytes (the page
    /// still holds at least one reading). `None`: no byte bound.
    pub max_bytes: Option<usize>,
}

/// One page: the readings, and the cursor of the next page if there is one.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub readings: Vec<Reading>,
    pub next_cursor: Option<u64>,
}

/// Why a cursor cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Readings from `missed_from` to `missed_to` (inclusive) were evicted
    /// before the cursor's owner got to them.
    #[error("readings {missed_from}..={missed_to} were evicted")]
    Evicted { missed_from: u64, missed_to: u64 },
    /// The cursor names a sequence number that has not been assigned yet.
    #[error("sequence number {0} has not been assigned yet")]
    Future(u64),
    /// The readings are older than memory and the store could not be read.
    #[error("the reading store is unavailable")]
    Unavailable,
}

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
        let micros = new
            .received_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
            .max(self.last_received_micros);
        self.last_received_micros = micros;

        let source = self
            .devices
            .record(new.device_id, new.topic, seq, micros, new.kind);
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

    /// A listed device, its newest reading as `encode` makes it. The
    /// encoding is kept for later calls (within a budget; see
    /// `buffer/devices.rs`), so `encode` must make the same bytes of the
    /// same reading every time.
    pub fn device(
        &self,
        device_id: &str,
        encode: impl Fn(&Reading) -> Vec<u8>,
    ) -> Option<DeviceEntry> {
        Some(self.device_entry(self.devices.get(device_id)?, encode))
    }

    fn device_entry(&self, device: &Device, encode: impl Fn(&Reading) -> Vec<u8>) -> DeviceEntry {
        let (info, newest) = device.view();
        let last_reading = match newest {
            NewestReading::Encoded(encoded) => Some(encoded.clone()),
            NewestReading::Buffered(seq, keep) => self.get(seq).map(|slot| {
                let encoded = encode(&self.reading(seq, slot));
                self.devices.keep_encoding(keep, encoded)
            }),
            NewestReading::Kept(reading, keep) => {
                Some(self.devices.keep_encoding(keep, encode(reading)))
            }
            NewestReading::None => None,
        };
        DeviceEntry { info, last_reading }
    }

    /// Up to `limit` listed devices whose id starts with `prefix`, after
    /// `after` when given, that `visible` lets through, in id order, as
    /// [`Self::device`] gives them; and whether more follow.
    pub fn devices(
        &self,
        prefix: &str,
        after: Option<&str>,
        visible: impl Fn(&str) -> bool,
        limit: usize,
        encode: impl Fn(&Reading) -> Vec<u8>,
    ) -> (Vec<DeviceEntry>, bool) {
        let mut listed = self
            .devices
            .listed_from(prefix, after)
            .filter(|(id, _)| visible(id));
        let page: Vec<DeviceEntry> = listed
            .by_ref()
            .take(limit)
            .map(|(_, device)| self.device_entry(device, &encode))
            .collect();
        (page, listed.next().is_some())
    }

    /// Lists a device known from before this process; see
    /// `Devices::restore`.
    pub fn restore_device(&mut self, info: DeviceInfo, newest: Option<Reading>) {
        self.devices.restore(info, newest);
    }

    /// A device's connection status (unknown for a device never heard from).
    pub fn device_status(&self, device_id: &str) -> ConnectionStatus {
        self.devices.status(device_id)
    }

    pub fn device_stats(&self) -> DeviceStats {
        self.devices.stats()
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

    /// For watchers: the readings after sequence number `after` that match
    /// `filter`, looking at no more than `max_scan` readings, and the sequence
    /// number of the last reading looked at (the new cursor).
    ///
    /// `after` may be `next_seq() - 1` ("nothing yet"). An error says exactly
    /// which readings the cursor missed because they were evicted.
    pub fn scan_after(
        &self,
        after: u64,
        max_scan: usize,
        max_bytes: usize,
        filter: &ReadingFilter,
    ) -> Result<(Vec<Reading>, u64), CursorError> {
        if after >= self.next_seq() {
            return Err(CursorError::Future(after));
        }
        if after + 1 < self.first_seq {
            return Err(CursorError::Evicted {
                missed_from: after + 1,
                missed_to: self.first_seq - 1,
            });
        }
        let start = (after + 1 - self.first_seq) as usize;
        let end = self.readings.len().min(start.saturating_add(max_scan));
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut cursor = after;
        for (i, slot) in self.readings.range(start..end).enumerate() {
            let seq = self.first_seq + (start + i) as u64;
            if filter.matches_source(&slot.source.device_id, &slot.source.topic) {
                let len = slot.payload.len();
                if !batch.is_empty() && bytes + len > max_bytes {
                    break; // this one starts the next batch
                }
                bytes += len;
                batch.push(self.reading(seq, slot));
            }
            cursor = seq;
        }
        Ok((batch, cursor))
    }

    /// One page of readings for `query`. Never scans more than it has to:
    /// time bounds and the device index narrow the range first.
    pub fn list(&self, query: &ListQuery) -> Result<ListPage, CursorError> {
        // A cursor is the sequence number of the first reading of the page,
        // so it must still be buffered.
        if let Some(cursor) = query.cursor {
            if cursor >= self.next_seq() {
                return Err(CursorError::Future(cursor));
            }
            if cursor < self.first_seq {
                return Err(CursorError::Evicted {
                    missed_from: cursor,
                    missed_to: self.first_seq - 1,
                });
            }
        }
        // Sequence range [lo, hi) allowed by the time bounds and the cursor.
        let micros = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64)
        };
        let mut lo = self.first_seq
            + query.start.map_or(0, |start| {
                let start = micros(start);
                self.readings.partition_point(|r| r.received_micros < start)
            }) as u64;
        let mut hi = self.first_seq
            + query.end.map_or(self.readings.len(), |end| {
                let end = micros(end);
                self.readings.partition_point(|r| r.received_micros < end)
            }) as u64;
        match (query.cursor, query.oldest_first) {
            (Some(c), true) => lo = lo.max(c),
            (Some(c), false) => hi = hi.min(c + 1),
            (None, _) => {}
        }
        if lo >= hi {
            return Ok(ListPage::default());
        }

        let limit = query.limit.max(1);
        let mut page = Vec::with_capacity(limit.min(1024));
        let mut next_cursor = None;
        let max_bytes = query.max_bytes.unwrap_or(usize::MAX);
        let mut bytes = 0;
        let mut take = |(seq, slot): (u64, &Slot)| -> bool {
            if !query
                .filter
                .matches_source(&slot.source.device_id, &slot.source.topic)
            {
                return true;
            }
            let len = slot.payload.len();
            if page.len() == limit || (!page.is_empty() && bytes + len > max_bytes) {
                next_cursor = Some(seq);
                return false;
            }
            bytes += len;
            page.push(self.reading(seq, slot));
            true
        };

        match query.filter.device_id.as_deref() {
            Some(device_id) => {
                let Some(device_seqs) = self.devices.seqs(device_id) else {
                    return Ok(ListPage::default());
                };
                let from = device_seqs.partition_point(|s| *s < lo);
                let to = device_seqs.partition_point(|s| *s < hi);
                let seqs = device_seqs.range(from..to);
                let slots = seqs.filter_map(|s| Some((*s, self.get(*s)?)));
                if query.oldest_first {
                    slots.take_while(|r| take(*r)).for_each(drop);
                } else {
                    slots.rev().take_while(|r| take(*r)).for_each(drop);
                }
            }
            None => {
                let range = (lo - self.first_seq) as usize..(hi - self.first_seq) as usize;
                let slots = self
                    .readings
                    .range(range)
                    .enumerate()
                    .map(|(i, slot)| (lo + i as u64, slot));
                if query.oldest_first {
                    slots.take_while(|r| take(*r)).for_each(drop);
                } else {
                    slots.rev().take_while(|r| take(*r)).for_each(drop);
                }
            }
        }
        Ok(ListPage {
            readings: page,
            next_cursor,
        })
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

    const FIRST: u64 = 1_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn buffer(max_readings: usize, max_bytes: usize) -> ReadingBuffer {
        ReadingBuffer::new(
            BufferLimits {
                max_readings,
                max_bytes,
            },
            FIRST,
        )
    }

    fn push(buf: &mut ReadingBuffer, device: &str, secs: u64, payload: &str) -> u64 {
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

    fn seqs(page: &ListPage) -> Vec<u64> {
        page.readings.iter().map(|r| r.seq).collect()
    }

    fn query(limit: usize) -> ListQuery {
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
    fn device_index_is_dropped_with_the_last_reading_of_an_unlisted_device() {
        let mut buf = buffer(2, usize::MAX).with_device_limits(DeviceLimits {
            max_devices: 1,
            max_kept_bytes: 1 << 20,
            ..DeviceLimits::default()
        });
        push(&mut buf, "a", 1, "1");
        push(&mut buf, "b", 2, "2");
        push(&mut buf, "b", 3, "3");
        // "a" is listed: known after its reading left the buffer.
        assert!(buf.devices.indexed("a"));
        assert_eq!(buf.devices.seqs("a").map(VecDeque::len), Some(0));
        push(&mut buf, "c", 4, "4");
        push(&mut buf, "d", 5, "5");
        push(&mut buf, "d", 6, "6");
        // "c" was over the limit: indexed only while it had a reading.
        assert!(!buf.devices.indexed("c"));
        assert_eq!(buf.devices.seqs("d").map(VecDeque::len), Some(2));
        assert_eq!(buf.device_stats().not_listed, 3);
    }

    fn push_kind(
        buf: &mut ReadingBuffer,
        device: &str,
        secs: u64,
        kind: MessageKind,
        payload: &str,
    ) {
        let topic = format!("devices/{device}/other");
        buf.push(NewReading {
            kind,
            device_id: device,
            topic: &topic,
            payload: payload.as_bytes(),
            qos: 1,
            retained: true,
            received_at: at(secs),
        });
    }

    #[test]
    fn devices_keep_their_newest_reading_status_and_times() {
        let mut buf = buffer(3, usize::MAX).with_device_limits(DeviceLimits {
            max_devices: 10,
            max_kept_bytes: 5,
            ..DeviceLimits::default()
        });
        push(&mut buf, "a", 1, "a-1");
        push_kind(
            &mut buf,
            "a",
            2,
            MessageKind::Status(Some(ConnectionStatus::Online)),
            "online",
        );
        push(&mut buf, "b", 3, "b-1");
        let a = buf.device("a", described).unwrap();
        assert_eq!(a.last_reading.unwrap(), format!("{FIRST}:a-1"));
        assert_eq!(
            (a.info.first_seen_micros, a.info.last_seen_micros),
            (1_000_000, 2_000_000)
        );
        assert_eq!(
            (a.info.status, a.info.status_changed_micros),
            (ConnectionStatus::Online, 2_000_000)
        );
        assert_eq!(a.info.buffered, 2);

        // a's reading is evicted: kept (3 bytes of a 5-byte budget). A reply
        // or a repeated status does not replace it or move the status time.
        push_kind(&mut buf, "a", 4, MessageKind::Reply, "{}");
        push_kind(
            &mut buf,
            "a",
            5,
            MessageKind::Status(Some(ConnectionStatus::Online)),
            "online",
        );
        let a = buf.device("a", described).unwrap();
        assert_eq!(a.last_reading.unwrap(), format!("{FIRST}:a-1"));
        assert_eq!(a.info.status_changed_micros, 2_000_000);
        assert_eq!(a.info.last_seen_micros, 5_000_000);
        assert_eq!(buf.device_stats().kept_bytes, 3);

        // b's reading is evicted too: 3 more bytes do not fit the budget.
        push_kind(
            &mut buf,
            "a",
            6,
            MessageKind::Status(Some(ConnectionStatus::Offline)),
            "offline",
        );
        let b = buf.device("b", described).unwrap();
        assert_eq!((b.last_reading, b.info.buffered), (None, 0));
        assert_eq!(buf.device_stats().kept_dropped, 1);
        let a = buf.device("a", described).unwrap();
        assert_eq!(
            (a.info.status, a.info.status_changed_micros),
            (ConnectionStatus::Offline, 6_000_000)
        );
        assert_eq!(buf.device_status("a"), ConnectionStatus::Offline);
        assert_eq!(buf.device_status("nobody"), ConnectionStatus::Unknown);

        // A new reading replaces the kept copy and frees its budget.
        push(&mut buf, "a", 7, "a-2");
        let a = buf.device("a", described).unwrap();
        assert_eq!(a.last_reading.unwrap(), format!("{}:a-2", FIRST + 6));
        assert_eq!(buf.device_stats().kept_bytes, 0);
        assert!(buf.device("", described).is_none() && buf.device("c", described).is_none());
    }

    /// The tests' encoding of a device's newest reading.
    fn described(reading: &Reading) -> Vec<u8> {
        let payload = String::from_utf8_lossy(&reading.payload);
        format!("{}:{payload}", reading.seq).into_bytes()
    }

    #[test]
    fn a_devices_newest_reading_is_encoded_once_until_a_newer_one_arrives() {
        use std::cell::Cell;
        let calls = Cell::new(0);
        let encode = |reading: &Reading| {
            calls.set(calls.get() + 1);
            described(reading)
        };
        let mut buf = buffer(2, usize::MAX).with_device_limits(DeviceLimits {
            max_devices: 10,
            max_kept_bytes: 100,
            max_encoded_bytes: 20,
        });
        let first = push(&mut buf, "a", 1, "a-1");
        let one = format!("{first}:a-1");
        for _ in 0..3 {
            let (page, _) = buf.devices("", None, |_| true, 10, encode);
            assert_eq!(page[0].last_reading.as_ref().unwrap(), &one);
        }
        assert_eq!(calls.get(), 1);
        assert_eq!(buf.device_stats().encoded_bytes, one.len());

        // A reply and a status leave it; its eviction keeps it (with the
        // kept copy).
        push_kind(&mut buf, "a", 2, MessageKind::Reply, "{}");
        push_kind(&mut buf, "a", 3, MessageKind::Status(None), "?");
        assert_eq!(buf.device("a", encode).unwrap().last_reading.unwrap(), one);
        assert_eq!(calls.get(), 1);

        // A newer reading replaces it and its bytes.
        let second = push(&mut buf, "a", 4, "a-2");
        let two = format!("{second}:a-2");
        assert_eq!(buf.device("a", encode).unwrap().last_reading.unwrap(), two);
        assert_eq!(buf.device("a", encode).unwrap().last_reading.unwrap(), two);
        assert_eq!(calls.get(), 2);
        assert_eq!(buf.device_stats().encoded_bytes, two.len());

        // Past the budget: encoded every time, counted, still right.
        push(&mut buf, "bb", 5, "a much longer payload than 20 bytes");
        for _ in 0..2 {
            let b = buf.device("bb", encode).unwrap().last_reading.unwrap();
            assert!(b.ends_with(b":a much longer payload than 20 bytes"));
        }
        assert_eq!(calls.get(), 4);
        let stats = buf.device_stats();
        assert_eq!(
            (stats.encoded_bytes, stats.encodings_not_kept),
            (two.len(), 2)
        );
    }

    #[test]
    fn devices_page_in_id_order_by_prefix() {
        let mut buf = buffer(1000, usize::MAX);
        for id in [
            "pump-2", "fan-1", "pump-10", "pump-1", "fan-2", "pumpkin", "",
        ] {
            push(&mut buf, id, 1, "x");
        }
        let ids = |page: &[DeviceEntry]| -> Vec<String> {
            page.iter().map(|d| d.info.device_id.to_string()).collect()
        };
        let (page, more) = buf.devices("pump-", None, |_| true, 2, described);
        assert_eq!(
            (ids(&page), more),
            (vec!["pump-1".into(), "pump-10".into()], true)
        );
        let (page, more) = buf.devices("pump-", Some("pump-10"), |_| true, 2, described);
        assert_eq!((ids(&page), more), (vec!["pump-2".into()], false));
        let (page, _) = buf.devices("", None, |id| id != "fan-2", 10, described);
        assert_eq!(
            ids(&page),
            ["fan-1", "pump-1", "pump-10", "pump-2", "pumpkin"]
        );
        // A cursor before the prefix starts at the prefix.
        let (page, _) = buf.devices("pump", Some("a"), |_| true, 1, described);
        assert_eq!(ids(&page), ["pump-1"]);
        assert_eq!(buf.device_stats().known, 6);
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

    #[test]
    fn pages_through_everything_in_both_orders() {
        let mut buf = buffer(100, usize::MAX);
        let all: Vec<u64> = (0..25).map(|i| push(&mut buf, "a", i, "x")).collect();
        for oldest_first in [true, false] {
            let mut got = Vec::new();
            let mut cursor = None;
            loop {
                let page = buf
                    .list(&ListQuery {
                        cursor,
                        oldest_first,
                        ..query(10)
                    })
                    .unwrap();
                got.extend(seqs(&page));
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            let mut want = all.clone();
            if !oldest_first {
                want.reverse();
            }
            assert_eq!(got, want);
        }
    }

    #[test]
    fn last_full_page_has_no_next_cursor() {
        let mut buf = buffer(100, usize::MAX);
        for i in 0..10 {
            push(&mut buf, "a", i, "x");
        }
        assert_eq!(buf.list(&query(10)).unwrap().next_cursor, None);
        assert_eq!(buf.list(&query(9)).unwrap().next_cursor, Some(FIRST));
    }

    #[test]
    fn filters_by_device_topic_and_time() {
        let mut buf = buffer(100, usize::MAX);
        for i in 0..30 {
            push(&mut buf, ["a", "b", "c"][i % 3], i as u64, "x");
        }
        let by_device = buf
            .list(&ListQuery {
                filter: ReadingFilter {
                    device_id: Some("b".into()),
                    topic_filter: None,
                    ..Default::default()
                },
                oldest_first: true,
                ..query(3)
            })
            .unwrap();
        assert_eq!(seqs(&by_device), [FIRST + 1, FIRST + 4, FIRST + 7]);
        assert_eq!(by_device.next_cursor, Some(FIRST + 10));

        let by_topic = buf
            .list(&ListQuery {
                filter: ReadingFilter {
                    device_id: None,
                    topic_filter: Some("devices/c/#".into()),
                    ..Default::default()
                },
                ..query(2)
            })
            .unwrap();
        assert_eq!(seqs(&by_topic), [FIRST + 29, FIRST + 26]);

        let by_time = buf
            .list(&ListQuery {
                start: Some(at(10)),
                end: Some(at(13)),
                oldest_first: true,
                ..query(10)
            })
            .unwrap();
        assert_eq!(seqs(&by_time), [FIRST + 10, FIRST + 11, FIRST + 12]);

        let device_and_time = buf
            .list(&ListQuery {
                filter: ReadingFilter {
                    device_id: Some("a".into()),
                    topic_filter: Some("devices/+/readings".into()),
                    ..Default::default()
                },
                start: Some(at(10)),
                end: Some(at(20)),
                ..query(10)
            })
            .unwrap();
        assert_eq!(seqs(&device_and_time), [FIRST + 18, FIRST + 15, FIRST + 12]);

        let unknown = ReadingFilter {
            device_id: Some("zzz".into()),
            topic_filter: None,
            ..Default::default()
        };
        let none = buf.list(&ListQuery {
            filter: unknown,
            ..query(10)
        });
        assert!(none.unwrap().readings.is_empty());
    }

    #[test]
    fn evicted_and_future_cursors_are_refused() {
        let mut buf = buffer(5, usize::MAX);
        for i in 0..10 {
            push(&mut buf, "a", i, "x");
        }
        let evicted = buf.list(&ListQuery {
            cursor: Some(FIRST + 2),
            ..query(1)
        });
        assert_eq!(
            evicted.unwrap_err(),
            CursorError::Evicted {
                missed_from: FIRST + 2,
                missed_to: FIRST + 4
            }
        );
        let future = buf.list(&ListQuery {
            cursor: Some(FIRST + 10),
            ..query(1)
        });
        assert_eq!(future.unwrap_err(), CursorError::Future(FIRST + 10));
        assert!(buf
            .list(&ListQuery {
                cursor: Some(FIRST + 5),
                ..query(1)
            })
            .is_ok());
    }

    #[test]
    fn pages_and_batches_stop_at_their_byte_budget() {
        let mut buf = buffer(100, 1 << 20);
        for i in 0..10 {
            push(&mut buf, "d", i, &"x".repeat(100));
        }
        let page = buf
            .list(&ListQuery {
                limit: 100,
                oldest_first: true,
                max_bytes: Some(350),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.readings.len(), 3);
        assert_eq!(page.next_cursor, Some(FIRST + 3));
        // A single reading over the budget still comes, alone.
        let one = buf
            .list(&ListQuery {
                limit: 100,
                max_bytes: Some(10),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(one.readings.len(), 1);
        let everything = ReadingFilter::default();
        let (batch, cursor) = buf.scan_after(FIRST - 1, 100, 250, &everything).unwrap();
        assert_eq!((batch.len(), cursor), (2, FIRST + 1));
        let (batch, _) = buf.scan_after(cursor, 100, 1, &everything).unwrap();
        assert_eq!(seqs_of(&batch), [FIRST + 2]);
    }

    fn seqs_of(readings: &[Reading]) -> Vec<u64> {
        readings.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn scan_after_reads_forward_and_reports_gaps() {
        let mut buf = buffer(5, usize::MAX);
        let everything = ReadingFilter::default();
        let start = buf.stats().next_seq - 1;
        assert_eq!(
            buf.scan_after(start, 10, usize::MAX, &everything).unwrap(),
            (vec![], start)
        );

        for i in 0..3 {
            push(&mut buf, ["a", "b"][i % 2], i as u64, "x");
        }
        let only_a = ReadingFilter {
            device_id: Some("a".into()),
            topic_filter: None,
            ..Default::default()
        };
        let (batch, cursor) = buf.scan_after(start, 2, usize::MAX, &only_a).unwrap();
        assert_eq!(batch.iter().map(|r| r.seq).collect::<Vec<_>>(), [FIRST]);
        assert_eq!(cursor, FIRST + 1);
        let (batch, cursor) = buf.scan_after(cursor, 10, usize::MAX, &only_a).unwrap();
        assert_eq!(batch.iter().map(|r| r.seq).collect::<Vec<_>>(), [FIRST + 2]);
        assert_eq!(cursor, FIRST + 2);

        for i in 0..7 {
            push(&mut buf, "a", i, "x");
        }
        assert_eq!(
            buf.scan_after(cursor, 10, usize::MAX, &everything)
                .unwrap_err(),
            CursorError::Evicted {
                missed_from: FIRST + 3,
                missed_to: FIRST + 4
            }
        );
        assert_eq!(
            buf.scan_after(FIRST + 50, 10, usize::MAX, &everything)
                .unwrap_err(),
            CursorError::Future(FIRST + 50)
        );
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
