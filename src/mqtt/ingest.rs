//! [`Ingest`]: where the event loop hands the readings it receives. It
//! owns the choice between memory only and the store, nothing else: the
//! event loop (`link.rs`) checks what devices send before the hand-off,
//! the writer (`store/postgres/writer.rs`) commits, the hub numbers and
//! keeps.

use crate::{hub::ReadingHub, store::Writer};

/// Where the MQTT event loop hands the readings it receives.
pub enum Ingest {
    /// Memory only: stored and visible at once, acknowledged by the MQTT
    /// client as they arrive.
    Memory(ReadingHub),
    /// Committed to the store first, acknowledged once committed (see
    /// `store`: an acknowledged reading is always committed).
    Durable(Writer),
}
