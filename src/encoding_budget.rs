//! Encoded messages kept for reuse, within a byte budget: the watchers'
//! ring keeps each newest reading's message (`hub/live.rs`), the device
//! list each device's newest reading (`buffer/devices.rs`).
//!
//! Both are filled by readers under shared access (no lock, or a read
//! lock), so a kept encoding sits in a `OnceLock` and the budget is atomic:
//! two readers may encode the same thing at once, the first to set it wins
//! and the other gives its bytes back. What is not kept because the budget
//! was full is counted, for operators.

use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    OnceLock,
};

use bytes::Bytes;

pub(crate) struct EncodingBudget {
    max_bytes: usize,
    bytes: AtomicUsize,
    not_kept: AtomicU64,
}

impl EncodingBudget {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            bytes: AtomicUsize::new(0),
            not_kept: AtomicU64::new(0),
        }
    }

    /// Keeps `encoded` in `slot` if the budget has room and returns what
    /// the slot holds (ours, or another reader's that won the race); gives
    /// `encoded` back when the budget is full.
    pub fn keep<'a>(
        &self,
        slot: &'a OnceLock<Bytes>,
        encoded: Vec<u8>,
    ) -> Result<&'a Bytes, Vec<u8>> {
        let len = encoded.len();
        if self.bytes.fetch_add(len, Ordering::Relaxed) + len > self.max_bytes {
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            self.not_kept.fetch_add(1, Ordering::Relaxed);
            return Err(encoded);
        }
        let mut ours = Some(Bytes::from(encoded));
        let kept = slot.get_or_init(|| ours.take().unwrap_or_default());
        if ours.is_some() {
            self.release(len);
        }
        Ok(kept)
    }

    /// Gives back `len` bytes of kept encodings being dropped.
    pub fn release(&self, len: usize) {
        self.bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Encodings not kept because the budget was full.
    pub fn not_kept(&self) -> u64 {
        self.not_kept.load(Ordering::Relaxed)
    }

    /// Uses the whole budget up, as if full of other encodings.
    #[cfg(test)]
    pub fn fill(&self) {
        self.bytes.store(self.max_bytes, Ordering::Relaxed);
    }
}
