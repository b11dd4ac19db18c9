//! [`PayloadArena`]: the payload bytes of buffered readings, copied into
//! large chunks in arrival order.
//!
//! Why not keep the `Bytes` that rumqttc hands over: a `Bytes` handle is 32
//! bytes, and it keeps the whole network read buffer it points into alive,
//! packet headers and topics included, for as long as the reading is
//! buffered. Copying ~60 bytes at ingest is cheaper than both. A reading
//! refers to its payload with a 12-byte [`PayloadRef`].
//!
//! Readings are evicted oldest first, so payloads die in the order they were
//! written: a chunk is freed as a whole once the oldest buffered reading's
//! payload lies in a later chunk. Memory held beyond the buffered payloads is
//! therefore at most one chunk's worth of already-evicted payloads, plus the
//! unused tail of the chunk being filled.

use std::collections::VecDeque;

/// Size of a chunk; a larger payload gets a chunk of its own size.
const CHUNK_BYTES: usize = 256 << 10;

/// Where a payload lies in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PayloadRef {
    /// Chunk number, counted from the first chunk ever made (wrapping).
    chunk: u32,
    offset: u32,
    len: u32,
}

impl PayloadRef {
    pub(super) fn len(self) -> usize {
        self.len as usize
    }
}

#[derive(Default)]
pub(super) struct PayloadArena {
    chunks: VecDeque<Vec<u8>>,
    /// Number of `chunks[0]` (wrapping: only differences are used).
    first_chunk: u32,
}

impl PayloadArena {
    /// Copies `payload` in. MQTT caps a packet at 256 MiB, so offsets and
    /// lengths fit in 32 bits.
    pub(super) fn push(&mut self, payload: &[u8]) -> PayloadRef {
        let fits = self
            .chunks
            .back()
            .is_some_and(|chunk| chunk.capacity() - chunk.len() >= payload.len());
        if !fits {
            self.chunks
                .push_back(Vec::with_capacity(CHUNK_BYTES.max(payload.len())));
        }
        let index = self.chunks.len() - 1;
        let chunk = &mut self.chunks[index];
        let offset = chunk.len();
        // Never reallocates: the capacity was checked above.
        chunk.extend_from_slice(payload);
        PayloadRef {
            chunk: self.first_chunk.wrapping_add(index as u32),
            offset: offset as u32,
            len: payload.len() as u32,
        }
    }

    /// The payload `at` refers to, which must not have been released.
    pub(super) fn get(&self, at: PayloadRef) -> &[u8] {
        let index = at.chunk.wrapping_sub(self.first_chunk) as usize;
        let start = at.offset as usize;
        &self.chunks[index][start..start + at.len as usize]
    }

    /// Frees the chunks older than the one `oldest` (the oldest payload
    /// still referred to) lies in.
    pub(super) fn release_before(&mut self, oldest: PayloadRef) {
        while self.first_chunk != oldest.chunk && self.chunks.len() > 1 {
            self.chunks.pop_front();
            self.first_chunk = self.first_chunk.wrapping_add(1);
        }
    }

    /// Frees every chunk: nothing is referred to any more.
    pub(super) fn release_all(&mut self) {
        self.first_chunk = self.first_chunk.wrapping_add(self.chunks.len() as u32);
        self.chunks.clear();
    }

    /// Bytes allocated for chunks.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.chunks.iter().map(Vec::capacity).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_come_back_and_chunks_are_freed_in_order() {
        let mut arena = PayloadArena::default();
        let small = vec![7u8; 1000];
        let refs: Vec<PayloadRef> = (0..1000).map(|_| arena.push(&small)).collect();
        // 1 000 000 bytes in 256 KiB chunks.
        assert_eq!(arena.chunks.len(), 4);
        assert!(refs.iter().all(|r| arena.get(*r) == small));

        // A payload larger than a chunk gets its own.
        let big = vec![9u8; CHUNK_BYTES + 1];
        let big_ref = arena.push(&big);
        assert_eq!(arena.get(big_ref), big);
        let empty = arena.push(b"");
        assert_eq!(arena.get(empty), b"");

        arena.release_before(refs[600]);
        assert_eq!(arena.chunks.len(), 3); // 262 payloads a chunk: the third on
        assert!(refs[600..].iter().all(|r| arena.get(*r) == small));
        assert_eq!(arena.get(big_ref), big);

        arena.release_before(big_ref);
        assert_eq!(arena.chunks.len(), 1); // the big one, which the empty one fit in
        assert_eq!(arena.get(big_ref), big);
        assert_eq!(arena.get(empty), b"");

        arena.release_all();
        assert_eq!(arena.capacity(), 0);
        let again = arena.push(b"again");
        assert_eq!(arena.get(again), b"again");
    }

    #[test]
    fn chunk_numbers_wrap() {
        let mut arena = PayloadArena {
            first_chunk: u32::MAX - 1,
            ..Default::default()
        };
        let big = vec![1u8; CHUNK_BYTES];
        let refs: Vec<PayloadRef> = (0..4).map(|_| arena.push(&big)).collect();
        assert_eq!(refs[3].chunk, 1);
        arena.release_before(refs[2]);
        assert_eq!(arena.chunks.len(), 2);
        assert_eq!(arena.get(refs[3]), big);
    }
}
