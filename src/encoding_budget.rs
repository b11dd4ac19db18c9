//! The byte budget of the encodings kept for reuse: the one cache of
//! readings' encoded messages (`grpc/encoded.rs`) reserves what it keeps
//! here and gives it back when it drops it.
//!
//! The cache is filled by readers without a lock, so the budget is atomic:
//! a reservation is one add, taken back when it went over. What is not kept
//! because the budget was full is counted, for operators.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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

    /// Takes `len` bytes if the budget has room for them.
    pub fn reserve(&self, len: usize) -> bool {
        if self.bytes.fetch_add(len, Ordering::Relaxed) + len > self.max_bytes {
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Gives back `len` bytes of kept encodings being dropped.
    pub fn release(&self, len: usize) {
        self.bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// Counts an encoding that was not kept for want of room.
    pub fn count_not_kept(&self) {
        self.not_kept.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Encodings not kept for want of room.
    pub fn not_kept(&self) -> u64 {
        self.not_kept.load(Ordering::Relaxed)
    }

    /// Uses the whole budget up, as if full of other encodings.
    #[cfg(test)]
    pub fn fill(&self) {
        self.bytes.store(self.max_bytes, Ordering::Relaxed);
    }
}
