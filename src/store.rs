//! The boundary between ingest and where readings are kept.
//!
//! The MQTT event loop hands the publishes of each network read to a
//! [`ReadingStore`] and goes straight back to the socket, so whatever sits
//! behind this trait must never block ingest: it takes a batch in memory
//! (bounded) and returns. Today the only store is memory: the [`ReadingHub`]
//! itself, which assigns sequence numbers and wakes the watchers.
//!
//! A durable store (PostgreSQL) sits behind the same call: `append` queues
//! the batch for a writer task (a bounded hand-off, counted when full), the
//! writer commits it, the database assigns the sequence numbers, and only
//! then are the readings pushed into the hub's memory window and
//! acknowledged to the broker. The hub then follows the store's committed
//! order, which is what lets several instances share one database.
//!
//! The device list (`buffer/devices.rs`) is kept in memory beside the
//! buffer today: what each device last said, when it was first and last
//! heard from, its connection status. A durable store persists those
//! records with each committed batch (one upsert per device in the batch,
//! not a scan of history) and loads them at startup, so the list survives
//! restarts; the memory records stay the read path.

use crate::{buffer::NewReading, hub::ReadingHub};

/// Takes the readings ingest receives. See the module docs.
pub trait ReadingStore: Send + Sync + 'static {
    /// Takes readings received together, oldest first, without blocking.
    /// Returns the sequence number of the last one once it is visible to
    /// readers, or `None` when it is not (yet), or the batch was empty.
    fn append(&self, readings: &[NewReading<'_>]) -> Option<u64>;
}

/// Memory only: readings are visible as soon as they are appended.
impl ReadingStore for ReadingHub {
    fn append(&self, readings: &[NewReading<'_>]) -> Option<u64> {
        self.push_all(readings.iter().copied())
    }
}
