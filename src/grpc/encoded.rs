//! WatchReadings messages encoded once and shared by every stream.
//!
//! Turning a reading into protobuf (strings, the JSON payload as a `Value`
//! tree) and encoding it costs microseconds; with N watchers on the same
//! readings, doing it per stream made the work grow with readings × watchers.
//! Instead the newest readings' encoded messages are kept in a small window
//! ([`EncodedReadings`]): the first stream to send a reading encodes it, the
//! others clone a `Bytes` handle (a reference count), and tonic copies the
//! bytes into the stream's HTTP/2 buffer.
//!
//! The server is generated with [`EncodedWatchReadingsResponse`] in place of
//! `WatchReadingsResponse` (see build.rs); the bytes on the wire are the same
//! message, so clients see no difference.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
};

use bytes::{BufMut, Bytes};
use prost::{
    encoding::{DecodeContext, WireType},
    DecodeError, Message,
};

use crate::{
    buffer::Reading,
    proto::{watch_readings_response::Event, WatchReadingsResponse},
};

/// How many of the newest readings' encoded messages are kept. A stream
/// further behind than this encodes for itself (and caches nothing).
const WINDOW: usize = 8192;

/// A `WatchReadingsResponse`, already encoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedWatchReadingsResponse {
    encoded: Bytes,
    /// The sequence number of the reading it carries, if it carries one
    /// (not part of the message: the stream uses it as its resume point).
    reading_seq: Option<u64>,
}

impl EncodedWatchReadingsResponse {
    pub fn event(event: Event) -> Self {
        WatchReadingsResponse { event: Some(event) }.into()
    }

    fn reading(reading: &Reading) -> Self {
        Self::event(Event::Reading(super::reading_to_proto(reading)))
    }

    pub fn reading_seq(&self) -> Option<u64> {
        self.reading_seq
    }
}

impl From<WatchReadingsResponse> for EncodedWatchReadingsResponse {
    fn from(message: WatchReadingsResponse) -> Self {
        let reading_seq = match &message.event {
            Some(Event::Reading(reading)) => Some(reading.seq),
            _ => None,
        };
        Self {
            encoded: message.encode_to_vec().into(),
            reading_seq,
        }
    }
}

/// Encoding writes the stored bytes. Decoding goes through
/// `WatchReadingsResponse` (the server never decodes this type).
impl Message for EncodedWatchReadingsResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.encoded);
    }

    // Never used by the server; correct all the same, through the real type.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut message = WatchReadingsResponse::decode(self.encoded.clone())?;
        message.merge_field(tag, wire_type, buf, ctx)?;
        *self = Self::from(message);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The encoded messages of the newest readings, shared by all watch streams.
#[derive(Default)]
pub struct EncodedReadings {
    window: Mutex<Window>,
}

impl EncodedReadings {
    /// The messages for `readings`, in order: from the window where another
    /// stream already encoded them, else encoded now and added to it.
    pub fn messages(&self, readings: &[Reading]) -> Vec<EncodedWatchReadingsResponse> {
        let mut messages = Vec::with_capacity(readings.len());
        let mut missing = Vec::new();
        {
            let window = self.window();
            for (i, reading) in readings.iter().enumerate() {
                match window.get(reading.seq) {
                    Some(encoded) => messages.push(EncodedWatchReadingsResponse {
                        encoded,
                        reading_seq: Some(reading.seq),
                    }),
                    None => {
                        messages.push(EncodedWatchReadingsResponse::default());
                        missing.push(i);
                    }
                }
            }
        }
        if missing.is_empty() {
            return messages;
        }
        // Encode without the lock: other streams keep reading the window.
        // Two streams may encode the same reading at once; both results are
        // the same bytes, and the window keeps one.
        for &i in &missing {
            messages[i] = EncodedWatchReadingsResponse::reading(&readings[i]);
        }
        let mut window = self.window();
        for &i in &missing {
            window.insert(readings[i].seq, messages[i].encoded.clone());
        }
        messages
    }

    // Poisoning: the window is valid between statements; keep using it.
    fn window(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Encoded messages for the sequence numbers `first_seq..first_seq + len`,
/// with holes for readings no stream has sent (streams with filters).
#[derive(Default)]
struct Window {
    first_seq: u64,
    slots: VecDeque<Option<Bytes>>,
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
        let Some(mut index) = seq.checked_sub(self.first_seq) else {
            return; // older than the window: a stream far behind
        };
        if index >= WINDOW as u64 {
            let drop = index + 1 - WINDOW as u64;
            if drop >= self.slots.len() as u64 {
                self.slots.clear();
                self.first_seq = seq;
            } else {
                self.slots.drain(..drop as usize);
                self.first_seq += drop;
            }
            index = seq - self.first_seq;
        }
        let index = index as usize; // < WINDOW
        if index >= self.slots.len() {
            self.slots.resize(index + 1, None);
        }
        self.slots[index] = Some(encoded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Gap;

    #[test]
    fn encodes_and_decodes_as_watch_readings_response() {
        let gap = WatchReadingsResponse {
            event: Some(Event::Gap(Gap {
                first_seq: 3,
                last_seq: 9,
            })),
        };
        let encoded = EncodedWatchReadingsResponse::from(gap.clone());
        assert_eq!(encoded.encoded_len(), gap.encoded_len());
        let bytes = encoded.encode_to_vec();
        assert_eq!(bytes, gap.encode_to_vec());
        assert_eq!(WatchReadingsResponse::decode(&bytes[..]).unwrap(), gap);
        assert_eq!(
            EncodedWatchReadingsResponse::decode(&bytes[..]).unwrap(),
            encoded
        );
    }

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
    }
}
