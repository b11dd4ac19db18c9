//! [`ReadingHub`]: the one shared [`ReadingBuffer`] behind a lock, plus the
//! wake-up signal that lets watchers follow it.
//!
//! Ingestion writes, ListReadings and watchers read. The lock is held only to
//! push one reading or to copy out `Arc` pointers of at most one batch, never
//! across an `.await`, JSON decoding or gRPC encoding.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::watch;

use crate::buffer::{
    BufferLimits, BufferStats, CursorError, ListPage, ListQuery, NewReading, Reading,
    ReadingBuffer, ReadingFilter,
};

/// How many buffered readings a watcher looks at per lock acquisition.
const WATCH_SCAN_BATCH: usize = 512;

/// The shared buffer and its change signal.
pub struct ReadingHub {
    buffer: RwLock<ReadingBuffer>,
    /// The next sequence number to be assigned; bumped on every push. A
    /// `watch` keeps only the latest value, so waking watchers costs the same
    /// however many there are and however slow they are.
    next_seq: watch::Sender<u64>,
}

impl ReadingHub {
    pub fn new(limits: BufferLimits, first_seq: u64) -> Self {
        let buffer = ReadingBuffer::new(limits, first_seq);
        let (next_seq, _) = watch::channel(buffer.next_seq());
        Self {
            buffer: RwLock::new(buffer),
            next_seq,
        }
    }

    // A poisoned lock means a panic while holding it; the buffer's invariants
    // hold between statements that can panic, so keep serving.
    fn read(&self) -> RwLockReadGuard<'_, ReadingBuffer> {
        self.buffer.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, ReadingBuffer> {
        self.buffer.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a reading and wakes the watchers.
    pub fn push(&self, new: NewReading<'_>) -> Arc<Reading> {
        let reading = self.write().push(new);
        self.next_seq.send_replace(reading.seq + 1);
        reading
    }

    pub fn list(&self, query: &ListQuery) -> Result<ListPage, CursorError> {
        self.read().list(query)
    }

    pub fn stats(&self) -> BufferStats {
        self.read().stats()
    }

    /// A watcher that will see every reading pushed from now on that matches
    /// `filter`.
    pub fn subscribe(self: &Arc<Self>, filter: ReadingFilter) -> ReadingWatcher {
        let mut wake = self.next_seq.subscribe();
        let cursor = *wake.borrow_and_update() - 1;
        ReadingWatcher {
            hub: self.clone(),
            wake,
            cursor,
            filter,
        }
    }
}

/// A cursor that follows the buffer. See [`ReadingHub::subscribe`].
pub struct ReadingWatcher {
    hub: Arc<ReadingHub>,
    wake: watch::Receiver<u64>,
    /// The last sequence number looked at.
    cursor: u64,
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
    /// them; the watcher is then useless (its cursor is stale).
    pub async fn next_batch(&mut self) -> Result<Vec<Arc<Reading>>, CursorError> {
        loop {
            // Mark the signal as seen *before* reading, so a push that lands
            // after the read wakes the `changed()` below.
            let next_seq = *self.wake.borrow_and_update();
            if self.cursor + 1 < next_seq {
                let (batch, cursor) =
                    self.hub
                        .read()
                        .scan_after(self.cursor, WATCH_SCAN_BATCH, &self.filter)?;
                self.cursor = cursor;
                if !batch.is_empty() {
                    return Ok(batch);
                }
                // A long run of readings for other watchers: let other
                // tasks run between batches.
                tokio::task::yield_now().await;
                continue;
            }
            // Cannot fail: this watcher holds the hub, which holds the sender.
            let _ = self.wake.changed().await;
        }
    }
}
