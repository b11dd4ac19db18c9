//! A reading's message as every response that carries it has it, and the
//! window of the newest pages' messages.
//!
//! Encoding a reading (its JSON payload transcoded to a protobuf `Value`)
//! costs microseconds, so it is done once where it can be:
//! - watchers take theirs from the hub's ring of the newest readings
//!   (`hub/live.rs`), where the first stream to need a message encodes it;
//! - ListReadings pages keep theirs in a small window of the newest
//!   readings ([`EncodedReadings`]): a dashboard asking for the newest page
//!   again and again encodes each reading once, whether or not anyone
//!   watches (the ring is filled only while a watcher is open). Pages are
//!   few next to deliveries, so one mutex per page is no contention.
//!
//! What is kept is a reading encoded as field 1 of its message: that is at
//! once a whole `WatchReadingsResponse` (field 1 is its `reading`) and one
//! entry of `ListReadingsResponse.readings` (field 1 too).

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
};

use bytes::Bytes;

use super::wire::put_reading_field;
use crate::{buffer::Reading, sync};

/// How many of the newest readings' encodings are kept for pages. A page
/// of older readings is encoded for itself (and caches nothing).
const WINDOW: usize = 8192;
/// And how many bytes of them at most: with large readings the window
/// shrinks to fewer readings instead of growing (8 192 readings of 1 MiB
/// would be 8 GiB).
pub const WINDOW_MAX_BYTES: usize = 16 << 20;
/// An encoding larger than this is never kept: it would push out hundreds
/// of others.
const WINDOW_MAX_ONE: usize = WINDOW_MAX_BYTES / 16;

/// The field number of a reading in both `WatchReadingsResponse` (`reading`)
/// and `ListReadingsResponse` (`readings`).
pub const READING_FIELD: u32 = 1;

/// Appends `reading` encoded as field [`READING_FIELD`] to `out`.
pub fn encode_reading(reading: &Reading, out: &mut Vec<u8>) {
    put_reading_field(READING_FIELD, reading, out);
}

/// The encoded messages of the newest readings listed, shared by all pages.
#[derive(Default)]
pub struct EncodedReadings {
    window: Mutex<Window>,
}

impl EncodedReadings {
    /// `readings`, each encoded as field [`READING_FIELD`], in order: from
    /// the window where another response already encoded them, else encoded
    /// now and added to it.
    pub fn encode(&self, readings: &[Reading]) -> Vec<Bytes> {
        let mut encoded = Vec::with_capacity(readings.len());
        let mut missing = Vec::new();
        {
            let window = self.window();
            for (i, reading) in readings.iter().enumerate() {
                encoded.push(window.get(reading.seq).unwrap_or_else(|| {
                    missing.push(i);
                    Bytes::new()
                }));
            }
        }
        if missing.is_empty() {
            return encoded;
        }
        // Encode without the lock: other streams keep reading the window.
        // Two streams may encode the same reading at once; both results are
        // the same bytes, and the window keeps one.
        for &i in &missing {
            let mut bytes = Vec::with_capacity(2 * readings[i].payload.len() + 64);
            encode_reading(&readings[i], &mut bytes);
            encoded[i] = bytes.into();
        }
        let mut window = self.window();
        for &i in &missing {
            window.insert(readings[i].seq, encoded[i].clone());
        }
        encoded
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        sync::lock(&self.window)
    }
}

/// Encoded messages for the sequence numbers `first_seq..first_seq + len`,
/// with holes for readings no stream has sent (streams with filters).
#[derive(Default)]
struct Window {
    first_seq: u64,
    slots: VecDeque<Option<Bytes>>,
    /// Bytes of the encodings held, at most [`WINDOW_MAX_BYTES`].
    bytes: usize,
}

impl Window {
    fn get(&self, seq: u64) -> Option<Bytes> {
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.slots.get(index)?.clone()
    }

    /// Adds a message, sliding the window forward when `seq` is past its end.
    /// The window only moves forward, so each slot is created and dropped
    /// once: constant work per reading, however the streams interleave.
    fn insert(&mut self, seq: u64, encoded: Bytes) {
        if encoded.len() > WINDOW_MAX_ONE {
            return;
        }
        let Some(index) = seq.checked_sub(self.first_seq) else {
            return; // older than the window: a stream far behind
        };
        if index >= WINDOW as u64 {
            let drop = index + 1 - WINDOW as u64;
            if drop >= self.slots.len() as u64 {
                self.slots.clear();
                self.bytes = 0;
                self.first_seq = seq;
            } else {
                self.pop_front(drop as usize);
            }
        }
        let index = (seq - self.first_seq) as usize; // < WINDOW
        if index >= self.slots.len() {
            self.slots.resize(index + 1, None);
        }
        self.bytes += encoded.len();
        if let Some(old) = self.slots[index].replace(encoded) {
            self.bytes -= old.len();
        }
        // Over the byte bound: the oldest go first. The new one stays, as
        // it is at most a sixteenth of the bound.
        while self.bytes > WINDOW_MAX_BYTES {
            self.pop_front(1);
        }
    }

    /// Slides the window forward by `count` slots.
    fn pop_front(&mut self, count: usize) {
        for slot in self.slots.drain(..count).flatten() {
            self.bytes -= slot.len();
        }
        self.first_seq += count as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn bytes(seq: u64) -> Bytes {
        Bytes::from(seq.to_string())
    }

    #[test]
    fn window_keeps_the_newest_and_slides_forward() {
        let mut window = Window::default();
        let base = 1_700_000_000_000_000;
        window.insert(base, bytes(base));
        assert_eq!(window.get(base), Some(bytes(base)));
        assert_eq!(window.get(base + 1), None);
        assert_eq!(window.get(base - 1), None);

        // A hole (a filtered stream ran ahead), then the reading in it.
        window.insert(base + 5, bytes(base + 5));
        assert_eq!(window.get(base + 3), None);
        window.insert(base + 3, bytes(base + 3));
        assert_eq!(window.get(base + 3), Some(bytes(base + 3)));

        // Past the end: the oldest slide out, the rest stay.
        let far = base + WINDOW as u64 + 2;
        window.insert(far, bytes(far));
        assert_eq!(window.slots.len(), WINDOW);
        assert_eq!(window.get(base), None);
        assert_eq!(window.get(base + 3), Some(bytes(base + 3)));
        assert_eq!(window.get(base + 5), Some(bytes(base + 5)));
        assert_eq!(window.get(far), Some(bytes(far)));

        // Older than the window: not kept.
        window.insert(base + 1, bytes(base + 1));
        assert_eq!(window.get(base + 1), None);

        // Far past the end: starts over at that reading.
        let farther = far + 10 * WINDOW as u64;
        window.insert(farther, bytes(farther));
        assert_eq!(window.slots.len(), 1);
        assert_eq!(window.get(farther), Some(bytes(farther)));
        assert_eq!(window.get(far), None);
        assert_eq!(window.bytes, farther.to_string().len());
    }

    #[test]
    fn window_is_bounded_by_bytes() {
        let mut window = Window::default();
        let big = Bytes::from(vec![7u8; WINDOW_MAX_ONE]);
        for seq in 1..=100 {
            window.insert(seq, big.clone());
            assert!(window.bytes <= WINDOW_MAX_BYTES);
        }
        let kept = WINDOW_MAX_BYTES / WINDOW_MAX_ONE;
        assert_eq!((1..=100).filter(|s| window.get(*s).is_some()).count(), kept);
        assert!(window.get(100).is_some() && window.get(100 - kept as u64).is_none());
        // Larger than a sixteenth of the bound: never kept.
        window.insert(101, Bytes::from(vec![0u8; WINDOW_MAX_ONE + 1]));
        assert_eq!(window.get(101), None);
        assert_eq!(window.bytes, kept * WINDOW_MAX_ONE);
    }
}
