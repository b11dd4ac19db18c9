//! Where readings are kept beyond memory: the PostgreSQL store.
//!
//! Without a store, readings live in the hub's memory window only: the hub
//! numbers them and they are visible at once (`mqtt::Ingest::Memory`).
//!
//! With the PostgreSQL store ([`postgres`]), the database is the record and
//! memory a window onto its newest part (`mqtt::Ingest::Durable`); the hub
//! reads what is older than its window through its `History` trait, which
//! the store implements (`postgres/reads.rs`):
//!
//! 1. the MQTT event loop hands each network read's readings to the
//!    [`Writer`] (a bounded queue) and goes back to the socket; QoS 1 and 2
//!    readings are *not* acknowledged yet. When the queue is full (the
//!    database is slow or down) the event loop waits: the broker holds what
//!    it has not delivered, which is the only place it is safe;
//! 2. the writer task commits what is queued in one transaction; the
//!    database assigns the sequence numbers (see below);
//! 3. only then are the readings pushed into the hub's memory window with
//!    those numbers (watchers see them), and the event loop acknowledges
//!    them to the broker.
//!
//! So an acknowledged reading is always committed. A reading committed but
//! not yet acknowledged when devicehub dies (or its MQTT connection drops)
//! is delivered again by the broker and stored again under a new sequence
//! number: that is the one way a duplicate arises.
//!
//! # Sequence numbers
//! One counter row (`devicehub_sequence`), moved by each committing
//! transaction: the row stays locked until the transaction ends, so writers
//! (several instances on one database too) commit one after another, each
//! batch numbered above every batch committed before it, and a rolled-back
//! batch gives its numbers back. Committed numbers therefore form one
//! increasing sequence without gaps, and a reader that has seen `seq` has
//! seen everything committed below it: a reader tailing the table by `seq`
//! never skips a number that commits later. The only holes are readings
//! retention deleted, which is how a hole is told apart: below the oldest
//! kept reading. The same number names a reading in memory, in the table,
//! in page tokens and in resume cursors.
//!
//! # Replicas
//! With `--mqtt-share-group`, several instances write to one database, each
//! what the broker handed it. The writer then does not push into memory;
//! the tail (`postgres/tail.rs`) of every instance reads the table in
//! number order into its memory window, woken by the NOTIFY a writer sends
//! after each commit. The reasoning above is what makes that safe: a tail
//! reading from its next number on never skips one. The counter row also
//! keeps the newest time committed, so times stay in number order across
//! writers (`migrations/0003_replicas.sql`).
//!
//! # The device list
//! Each commit also upserts one `devices` row per device in the batch (first
//! and last seen, the newest reading's number, the connection status), in
//! device id order so concurrent writers cannot deadlock on them. At startup
//! the rows, joined with their newest readings, are loaded into the memory
//! records (`buffer/devices.rs`), which stay the read path: the list
//! survives restarts without a scan of history. They are read in batches in
//! id order, and only the newest readings the hub's budget keeps are read.
//!
//! # Readers and the writer
//! Client reads from the table (pages, replays) have a pool of their own,
//! bounded in connections, in the wait for one and in each statement's
//! time; the writer, retention and the tail have another (see
//! `postgres/mod.rs`). A read that cannot be served answers UNAVAILABLE;
//! it never takes a connection ingest needs.

pub mod postgres;

use std::time::SystemTime;

use bytes::Bytes;

use crate::buffer::{MessageKind, NewReading};

pub use postgres::{Postgres, StoreError, Writer};

/// A reading on its way to the store: [`NewReading`] with owned data.
#[derive(Debug, Clone)]
pub struct StoredReading {
    pub device_id: Box<str>,
    pub topic: Box<str>,
    pub payload: Bytes,
    pub qos: u8,
    pub retained: bool,
    pub received_at: SystemTime,
    pub kind: MessageKind,
}

impl StoredReading {
    pub fn new(reading: &NewReading<'_>, payload: Bytes) -> Self {
        Self {
            device_id: reading.device_id.into(),
            topic: reading.topic.into(),
            payload,
            qos: reading.qos,
            retained: reading.retained,
            received_at: reading.received_at,
            kind: reading.kind,
        }
    }

    pub fn as_new(&self) -> NewReading<'_> {
        NewReading {
            device_id: &self.device_id,
            topic: &self.topic,
            payload: &self.payload,
            qos: self.qos,
            retained: self.retained,
            received_at: self.received_at,
            kind: self.kind,
        }
    }
}
