//! [`History`]: what the hub needs from wherever readings older than its
//! memory window are kept, and nothing more.
//!
//! The hub serves pages and watchers from memory while memory holds what
//! they ask for; a page that reaches further back, or a watcher whose
//! cursor is older than the window, is served from history. The
//! PostgreSQL store implements it (`store/postgres/reads.rs`); the hub
//! never names the store, so it knows no SQL and the store's other
//! duties (the writer, retention, the tail) stay the store's.
//!
//! History answers with the numbers memory uses: one sequence number
//! names a reading in both, so a page token or a cursor goes on from
//! wherever the previous answer came from.

use futures_util::future::BoxFuture;

use crate::{
    aggregate::{AggregateQuery, Series},
    buffer::{CursorError, ListPage, ListQuery, Reading, ReadingFilter},
};

/// Readings older than memory, read back.
///
/// Methods that read return [`CursorError::Unavailable`] when history
/// cannot be read now, and [`CursorError::Evicted`] for readings it no
/// longer keeps; the gRPC side maps them like memory's.
pub trait History: Send + Sync + 'static {
    /// The oldest sequence number kept, `None` when nothing is. Cheap (no
    /// I/O): the hub asks it under its buffer lock.
    fn oldest_seq(&self) -> Option<u64>;

    /// The number the next reading committed gets: every number below it
    /// is readable (or was deleted). `None` when history cannot say now.
    fn next_seq(&self) -> BoxFuture<'_, Option<u64>>;

    /// One page of readings for `query`, with memory's meaning (filters,
    /// order, cursor, byte budget).
    fn list<'a>(&'a self, query: &'a ListQuery) -> BoxFuture<'a, Result<ListPage, CursorError>>;

    /// For a watcher whose cursor `after` is older than memory, which
    /// starts at `below`: the next readings after `after` (and before
    /// `below`) matching `filter`, and the last sequence number looked at.
    fn scan_after<'a>(
        &'a self,
        after: u64,
        below: u64,
        filter: &'a ReadingFilter,
    ) -> BoxFuture<'a, Result<(Vec<Reading>, u64), CursorError>>;

    /// The buckets of `query` (AggregateReadings) over the readings
    /// [`History::list`] would return for its device and range, with the
    /// figures memory's fold gives (`aggregate.rs`).
    fn aggregate<'a>(
        &'a self,
        query: &'a AggregateQuery,
    ) -> BoxFuture<'a, Result<Series, CursorError>>;
}
