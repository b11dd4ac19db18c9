//! [`EncodedReadings`]: the one cache of readings' encoded messages, shared
//! by every response that carries readings: watch streams, ListReadings
//! pages, and the device list's newest readings (ListDevices, GetDevice).
//!
//! Encoding a reading (its JSON payload transcoded to a protobuf `Value`)
//! costs microseconds, so it is done once where it can be: the first
//! response to need a reading's message encodes it and keeps it here, the
//! others copy it. What is kept is the `devicehub.v1.Reading` message
//! itself, without a field key; each use writes the key and length its
//! message has it under (field 1 of `WatchReadingsResponse` and
//! `ListReadingsResponse`, `last_reading` of a `Device`).
//!
//! A direct-mapped table of [`SLOTS`] slots, indexed by the sequence number:
//! - a hit is one `arc-swap` load of the slot (which writes only to a slot
//!   private to its thread) and a compare, then a copy. Nothing is shared
//!   per reading per stream, so fan-out to N watchers on C cores meets on no
//!   lock or counter (why that matters: `hub/live.rs`). A page or a stream
//!   copies what it sends into a buffer of its own;
//! - a reading is known by its sequence number *and* its `received_at`:
//!   when memory starts over from the store, or the store's counter went
//!   back, one number can name two readings, and one must never be sent
//!   for the other;
//! - a miss encodes without a lock and swaps the message into the slot,
//!   giving back the bytes of whatever it replaces. Two streams may encode
//!   the same reading at once: both send the same bytes, the slot keeps one.
//!
//! [`SLOTS`] covers more readings than the watchers' ring (65 536) and the
//! default `--max-devices` (100 000): the ring's readings never meet in a
//! slot, nor do the newest readings of devices that report in turn. A
//! reading pushed out by another with the same slot (a device's newest
//! reading, 131 072 readings older than one a stream or a device page
//! encoded since) is encoded again when next asked for, counted.
//!
//! Bounds: [`KEPT_MAX_BYTES`] of messages for all uses together (the
//! budget, `encoding_budget.rs`), plus the table (8 bytes a slot) and ~64
//! bytes per kept message. A message larger than a sixteenth of the budget
//! is never kept (it would push out hundreds of others). When the budget is
//! full, what the slot held goes first, then kept messages from a hand that
//! sweeps the table from where keeping started (for readings arriving in
//! turn, the oldest first), so a full budget always makes room for what is
//! asked for now: it never freezes with what was asked for once. What still
//! finds no room is encoded for its one response and counted.
//!
//! Pages keep the messages of the newest [`PAGE_WINDOW`] readings only: a
//! dashboard asking for the newest page again and again encodes each reading
//! once, whereas a page deep in history would only push out what streams
//! and device pages reuse.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::SystemTime,
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;

use super::wire;
use crate::{
    buffer::{DeviceEntry, LastReading, Reading},
    encoding_budget::EncodingBudget,
    hub::WatchBatch,
};

/// The field number of a reading in both `WatchReadingsResponse` (`reading`)
/// and `ListReadingsResponse` (`readings`).
pub const READING_FIELD: u32 = 1;
/// Bytes of kept messages at most, for all uses together (not a flag: in
/// docs/api.md's memory formula).
pub const KEPT_MAX_BYTES: usize = 32 << 20;
/// Slots in the table: 1 MiB of pointers.
pub const SLOTS: usize = 1 << 17;
/// Slots a miss sweeps at most for a message to give up when the budget is
/// full (a hand, so the next miss goes on from there).
const SWEEP: usize = 1024;
/// Pages keep the messages of this many of the newest readings.
pub const PAGE_WINDOW: u64 = 8192;
/// The hand before anything was kept.
const NO_HAND: usize = usize::MAX;

/// Readings' messages, kept for the next response that carries them. See
/// the module docs.
pub struct EncodedReadings {
    slots: Box<[ArcSwapOption<Kept>]>,
    budget: EncodingBudget,
    /// A message larger than this is never kept.
    max_one: usize,
    /// Where sweeping for room goes on: a slot index, modulo the slots.
    hand: AtomicUsize,
    /// Messages encoded because none was kept.
    encodings: AtomicU64,
}

/// A reading's kept message, and which reading it is.
pub struct Kept {
    seq: u64,
    received_at: SystemTime,
    message: Box<[u8]>,
}

impl Kept {
    /// The `devicehub.v1.Reading` message, without a field key.
    pub fn message(&self) -> &[u8] {
        &self.message
    }

    fn is(&self, seq: u64, received_at: SystemTime) -> bool {
        self.seq == seq && self.received_at == received_at
    }
}

/// Whether a message encoded now is kept for the next response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Kept, within the budget: what other streams, or the next device
    /// page, ask for again.
    Always,
    /// Kept for readings numbered this or later (pages: see
    /// [`PAGE_WINDOW`]).
    From(u64),
}

impl Keep {
    /// For a page, while the next reading pushed gets `next_seq`.
    pub fn for_page(next_seq: u64) -> Self {
        Self::From(next_seq.saturating_sub(PAGE_WINDOW))
    }

    fn keeps(self, seq: u64) -> bool {
        match self {
            Self::Always => true,
            Self::From(first) => seq >= first,
        }
    }
}

/// Counters for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodingStats {
    /// Bytes of messages kept now, at most [`KEPT_MAX_BYTES`].
    pub bytes: usize,
    /// Messages encoded and not kept because the budget had no room for
    /// them (or they were larger than a sixteenth of it).
    pub not_kept: u64,
    /// Messages encoded because none was kept: first uses, messages pushed
    /// out of their slot, and those not kept.
    pub encodings: u64,
}

impl Default for EncodedReadings {
    fn default() -> Self {
        Self::new(KEPT_MAX_BYTES)
    }
}

impl EncodedReadings {
    /// A cache of [`SLOTS`] slots keeping at most `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self::with_slots(SLOTS, max_bytes)
    }

    /// `slots` must be a power of two.
    fn with_slots(slots: usize, max_bytes: usize) -> Self {
        assert!(slots.is_power_of_two());
        Self {
            slots: (0..slots).map(|_| ArcSwapOption::empty()).collect(),
            budget: EncodingBudget::new(max_bytes),
            max_one: max_bytes / 16,
            hand: AtomicUsize::new(NO_HAND),
            encodings: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> EncodingStats {
        EncodingStats {
            bytes: self.budget.bytes(),
            not_kept: self.budget.not_kept(),
            encodings: self.encodings.load(Ordering::Relaxed),
        }
    }

    fn index(&self, seq: u64) -> usize {
        seq as usize & (self.slots.len() - 1)
    }

    /// The kept message of the reading numbered `seq` received at
    /// `received_at`, if there is one (what the device list looks for under
    /// the buffer's lock, so that it copies no reading it need not encode).
    pub fn find(&self, seq: u64, received_at: SystemTime) -> Option<Arc<Kept>> {
        let slot = self.slots[self.index(seq)].load();
        slot.as_ref().filter(|k| k.is(seq, received_at)).cloned()
    }

    /// Appends `reading` as field `field` of the message being written to
    /// `out`: its kept message copied, or encoded now (and kept if `keep`
    /// and the budget allow).
    pub fn put_field(&self, field: u32, reading: &Reading, keep: Keep, out: &mut Vec<u8>) {
        self.with_message(reading, keep, |message| {
            wire::put_bytes(field, message, out);
        });
    }

    /// Each reading of a watch batch and its whole `WatchReadingsResponse`,
    /// all copied into one buffer private to this call: the reference
    /// counts tonic takes per message are then on memory no other stream
    /// touches.
    pub fn watch_messages(&self, batch: &WatchBatch) -> Vec<(u64, Bytes)> {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for reading in batch.readings() {
            // A reading as field 1 is a whole message.
            self.put_field(READING_FIELD, reading, Keep::Always, &mut out);
            ends.push((reading.seq, out.len()));
        }
        let out = Bytes::from(out);
        let mut start = 0;
        ends.into_iter()
            .map(|(seq, end)| {
                let message = out.slice(start..end);
                start = end;
                (seq, message)
            })
            .collect()
    }

    /// Appends `device` as field `field` (a `devicehub.v1.Device`), its
    /// newest reading from the message found for it, or encoded now (and
    /// kept).
    pub fn put_device_field(&self, field: u32, device: &DeviceEntry<Arc<Kept>>, out: &mut Vec<u8>) {
        let info = &device.info;
        match &device.last_reading {
            None => wire::put_device_field(field, info, None, out),
            Some(LastReading::Found(kept)) => {
                wire::put_device_field(field, info, Some(kept.message()), out);
            }
            Some(LastReading::Copied(reading)) => {
                self.with_message(reading, Keep::Always, |message| {
                    wire::put_device_field(field, info, Some(message), out);
                });
            }
        }
    }

    /// Calls `f` with `reading`'s message: the kept one, or one encoded now
    /// (and then kept if `keep` and the budget allow).
    fn with_message<R>(&self, reading: &Reading, keep: Keep, f: impl FnOnce(&[u8]) -> R) -> R {
        let index = self.index(reading.seq);
        {
            let slot = self.slots[index].load();
            if let Some(kept) = slot
                .as_ref()
                .filter(|k| k.is(reading.seq, reading.received_at))
            {
                return f(&kept.message);
            }
        }
        self.encodings.fetch_add(1, Ordering::Relaxed);
        let message = wire::reading_message(reading);
        let result = f(&message);
        if keep.keeps(reading.seq) {
            self.keep(index, reading, message);
        }
        result
    }

    /// Keeps `message`, `reading`'s, in slot `index` if the budget has (or
    /// can make) room for it.
    fn keep(&self, index: usize, reading: &Reading, message: Vec<u8>) {
        let len = message.len();
        if len > self.max_one {
            self.budget.count_not_kept();
            return;
        }
        if !self.budget.reserve(len) {
            // Full: what this slot holds is replaced anyway, so it goes
            // first; then the next kept from the hand on.
            self.evict(index);
            while !self.budget.reserve(len) {
                if !self.evict_next() {
                    self.budget.count_not_kept();
                    return;
                }
            }
        }
        let kept = Arc::new(Kept {
            seq: reading.seq,
            received_at: reading.received_at,
            message: message.into_boxed_slice(),
        });
        if let Some(old) = self.slots[index].swap(Some(kept)) {
            self.budget.release(old.message.len());
        }
        // Sweeping starts where keeping did: for readings kept in turn,
        // at the oldest.
        if self.hand.load(Ordering::Relaxed) == NO_HAND {
            let _ =
                self.hand
                    .compare_exchange(NO_HAND, index, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Gives up the message kept in slot `index`, if any; whether there was
    /// one.
    fn evict(&self, index: usize) -> bool {
        let slot = &self.slots[index];
        // A look first: swapping costs more, and most swept slots are empty.
        if slot.load().is_none() {
            return false;
        }
        match slot.swap(None) {
            Some(old) => {
                self.budget.release(old.message.len());
                true
            }
            None => false,
        }
    }

    /// Gives up the next kept message from the hand on, looking at up to
    /// [`SWEEP`] slots; whether one was found.
    fn evict_next(&self) -> bool {
        (0..SWEEP).any(|_| {
            let index = self.hand.fetch_add(1, Ordering::Relaxed) & (self.slots.len() - 1);
            self.evict(index)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        buffer::{MessageKind, NewReading, ReadingBuffer},
        config::{BufferLimits, DeviceLimits},
    };
    use std::time::{Duration, UNIX_EPOCH};

    fn reading(seq: u64, secs: u64, payload: &str) -> Reading {
        Reading::new(
            seq,
            "dev-1",
            "devices/dev-1/readings",
            UNIX_EPOCH + Duration::from_secs(secs),
            Bytes::copy_from_slice(payload.as_bytes()),
            1,
            false,
        )
    }

    /// `reading` as field 1, encoded without the cache.
    fn field_of(reading: &Reading) -> Bytes {
        let mut out = Vec::new();
        wire::put_reading_field(READING_FIELD, reading, &mut out);
        out.into()
    }

    fn len_of(readings: &[Reading]) -> usize {
        readings
            .iter()
            .map(|r| wire::reading_message(r).len())
            .sum()
    }

    fn watch(cache: &EncodedReadings, readings: &[Reading]) -> Vec<(u64, Bytes)> {
        cache.watch_messages(&WatchBatch::Copied(readings.to_vec()))
    }

    fn watch_one(cache: &EncodedReadings, reading: &Reading) -> Vec<(u64, Bytes)> {
        watch(cache, std::slice::from_ref(reading))
    }

    #[test]
    fn a_message_is_encoded_once_and_its_bytes_are_counted_until_replaced() {
        let cache = EncodedReadings::with_slots(128, KEPT_MAX_BYTES);
        let readings: Vec<Reading> = (1..=100)
            .map(|seq| reading(seq, seq, &format!(r#"{{"n": {seq}}}"#)))
            .collect();
        for _watcher in 0..3 {
            let messages = watch(&cache, &readings);
            assert_eq!(messages.len(), 100);
            assert_eq!(messages[41], (42, field_of(&readings[41])));
        }
        assert_eq!(cache.stats().encodings, 100);
        assert_eq!(cache.stats().bytes, len_of(&readings));
        // Replaced by the readings that take their slots: their bytes go
        // back, the newer ones' are counted.
        let newer: Vec<Reading> = (129..=228).map(|seq| reading(seq, seq, "x")).collect();
        assert_eq!(watch(&cache, &newer)[0], (129, field_of(&newer[0])));
        assert_eq!(cache.stats().bytes, len_of(&newer));
        assert_eq!(cache.stats().encodings, 200);

        // A message over a sixteenth of the budget is never kept.
        let cache = EncodedReadings::with_slots(128, 16 << 10);
        let big = reading(1, 1, &"x".repeat(2000));
        assert_eq!(watch_one(&cache, &big), [(1, field_of(&big))]);
        assert_eq!(cache.stats().bytes, 0);

        // A full budget: encoded, not kept, counted.
        let cache = EncodedReadings::with_slots(128, 16 << 10);
        cache.budget.fill();
        let one = reading(1, 1, "1");
        assert_eq!(watch_one(&cache, &one), [(1, field_of(&one))]);
        let stats = cache.stats();
        assert_eq!((stats.bytes, stats.not_kept), (16 << 10, 1));
    }

    #[test]
    fn a_renumbered_reading_is_not_served_another_readings_bytes() {
        let cache = EncodedReadings::with_slots(128, KEPT_MAX_BYTES);
        let before = reading(5, 100, r#"{"before": true}"#);
        // The same number, after memory started over: another reading.
        let after = reading(5, 200, r#"{"after": true}"#);
        assert_eq!(watch_one(&cache, &before), [(5, field_of(&before))]);
        assert_eq!(watch_one(&cache, &after), [(5, field_of(&after))]);
        assert_eq!(watch_one(&cache, &after), [(5, field_of(&after))]);
        assert!(cache.find(5, before.received_at).is_none());
        assert_eq!(watch_one(&cache, &before), [(5, field_of(&before))]);
        assert_eq!(cache.stats().encodings, 3);
        assert_eq!(cache.stats().bytes, len_of(&[before]));
    }

    #[test]
    fn a_full_budget_does_not_freeze_the_cache() {
        // Room for about four of these messages, in a table of 64 slots.
        let one = wire::reading_message(&reading(1, 1, "xxxxxxxxxx")).len();
        let budget = 4 * one + one / 2;
        let cache = EncodedReadings {
            max_one: budget,
            ..EncodedReadings::with_slots(64, budget)
        };
        let all: Vec<Reading> = (1..=300)
            .map(|seq| reading(seq, seq, "xxxxxxxxxx"))
            .collect();
        for (i, reading) in all.iter().enumerate() {
            // Asked for twice: the second time from the cache.
            for _ in 0..2 {
                let sent = watch_one(&cache, reading);
                assert_eq!(sent, [(reading.seq, field_of(reading))]);
            }
            let stats = cache.stats();
            assert_eq!(stats.encodings, i as u64 + 1, "reading {}", reading.seq);
            assert!(stats.bytes <= budget);
        }
        // Nothing was refused for room: the oldest made way, the newest
        // four are kept.
        let stats = cache.stats();
        assert_eq!((stats.not_kept, stats.bytes), (0, len_of(&all[296..])));
        assert!((297..=300).all(|s| cache.find(s, all[s as usize - 1].received_at).is_some()));
        assert!(cache.find(296, all[295].received_at).is_none());
        // Readings far apart (no two in turn), each into a slot of its
        // own: the hand finds room all the same.
        for seq in (1000..1000 + 64 * 40).step_by(40) {
            let far = reading(seq, seq, "xxxxxxxxxx");
            watch_one(&cache, &far);
            assert!(cache.find(seq, far.received_at).is_some(), "{seq}");
        }
        assert_eq!(cache.stats().not_kept, 0);
    }

    #[test]
    fn pages_keep_the_newest_readings_messages_only() {
        let cache = EncodedReadings::with_slots(1 << 14, KEPT_MAX_BYTES);
        let next_seq = 20_000;
        let keep = Keep::for_page(next_seq);
        let newest = reading(next_seq - 1, 1, "1");
        let oldest_kept = reading(next_seq - PAGE_WINDOW, 1, "2");
        let older = reading(next_seq - PAGE_WINDOW - 1, 1, "3");
        for _ in 0..2 {
            for r in [&newest, &oldest_kept, &older] {
                let mut out = Vec::new();
                cache.put_field(READING_FIELD, r, keep, &mut out);
                assert_eq!(out, field_of(r));
            }
        }
        // The older page's reading was encoded both times, and is not kept.
        assert_eq!(cache.stats().encodings, 4);
        assert_eq!(cache.stats().bytes, len_of(&[newest, oldest_kept]));
        assert!(cache.find(older.seq, older.received_at).is_none());
    }

    fn push(buf: &mut ReadingBuffer, device: &str, secs: u64, kind: MessageKind, payload: &str) {
        let topic = format!("devices/{device}/readings");
        buf.push(NewReading {
            kind,
            device_id: device,
            topic: &topic,
            payload: payload.as_bytes(),
            qos: 1,
            retained: false,
            received_at: UNIX_EPOCH + Duration::from_secs(secs),
        });
    }

    /// GetDevice's device through the cache, and the same encoded without
    /// it from the buffer's copy of its newest reading.
    fn device(cache: &EncodedReadings, buf: &ReadingBuffer, id: &str) -> (Vec<u8>, Vec<u8>) {
        let found = buf.device(id, |seq, at| cache.find(seq, at)).unwrap();
        let mut out = Vec::new();
        cache.put_device_field(1, &found, &mut out);
        let copied = buf.device(id, |_, _| None::<()>).unwrap();
        let Some(LastReading::Copied(newest)) = &copied.last_reading else {
            panic!("no newest reading")
        };
        let mut want = Vec::new();
        let message = wire::reading_message(newest);
        wire::put_device_field(1, &copied.info, Some(&message), &mut want);
        (out, want)
    }

    #[test]
    fn a_devices_newest_reading_is_encoded_once_until_a_newer_one_arrives() {
        // A message larger than 128 bytes is not kept.
        let cache = EncodedReadings::with_slots(1 << 10, 16 * 128);
        let mut buf = ReadingBuffer::new(
            BufferLimits {
                max_readings: 2,
                max_bytes: usize::MAX,
            },
            1,
        )
        .with_device_limits(DeviceLimits {
            max_devices: 10,
            max_kept_bytes: 100,
        });
        push(&mut buf, "a", 1, MessageKind::Reading, "a-1");
        let one = wire::reading_message(&buf.reading_at(1).unwrap()).len();
        for _ in 0..3 {
            let (page, _) = buf.devices("", None, |_| true, 10, |seq, at| cache.find(seq, at));
            let mut out = Vec::new();
            cache.put_device_field(1, &page[0], &mut out);
            let (got, want) = device(&cache, &buf, "a");
            assert_eq!((&out, &got), (&want, &want));
        }
        assert_eq!(cache.stats().encodings, 1);
        assert_eq!(cache.stats().bytes, one);

        // A reply and a status leave it; its eviction keeps it (with the
        // kept copy, the same reading).
        push(&mut buf, "a", 2, MessageKind::Reply, "{}");
        push(&mut buf, "a", 3, MessageKind::Status(None), "?");
        assert!(buf.reading_at(1).is_none());
        let (got, want) = device(&cache, &buf, "a");
        assert_eq!(got, want);
        assert_eq!(cache.stats().encodings, 1);

        // A newer reading is encoded once. (The older one's bytes go back
        // when a reading takes its slot: see the watch test above.)
        push(&mut buf, "a", 4, MessageKind::Reading, "a-2");
        let two = wire::reading_message(&buf.reading_at(4).unwrap()).len();
        for _ in 0..2 {
            let (got, want) = device(&cache, &buf, "a");
            assert_eq!(got, want);
        }
        assert_eq!(cache.stats().encodings, 2);
        assert_eq!(cache.stats().bytes, one + two);

        // Past the budget: encoded every time, counted, still right.
        let long = "a much longer payload than 128 bytes ".repeat(4);
        push(&mut buf, "bb", 5, MessageKind::Reading, &long);
        for _ in 0..2 {
            let (got, want) = device(&cache, &buf, "bb");
            assert_eq!(got, want);
        }
        let stats = cache.stats();
        assert_eq!(stats.encodings, 4);
        assert_eq!((stats.bytes, stats.not_kept), (one + two, 2));
    }
}
