//! AggregateReadings through the hub: memory folds the part of the range
//! it holds, history (the store) aggregates the part before it, and the
//! two are joined at a bucket boundary, so that no bucket is made of both
//! and the figures are those either side alone would give.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::{History, ReadingHub};
use crate::{
    aggregate::{concat, AggregateQuery, Fold, Series},
    buffer::{
        unix_micros, CursorError, ListQuery, ReadingBuffer, ReadingFilter, MAX_EXAMINED_PER_PAGE,
    },
};

/// Payload bytes one lock hold copies out at most (a chunk holds at least
/// one reading): memory's part is read as pages are, a bounded chunk per
/// hold, and parsed after the lock is released.
const CHUNK_BYTES: usize = 1 << 20;

impl ReadingHub {
    /// The buckets of `query`, from memory where the buffer holds every
    /// reading of the range, from history before that.
    pub async fn aggregate(&self, query: &AggregateQuery) -> Result<Series, CursorError> {
        let Some(history) = &self.shared.history else {
            return self.fold_memory(query.clone(), None).await;
        };
        let split = Self::memory_from(&self.read(), history.as_ref(), query);
        let memory = Some(history.clone());
        match split {
            Some(split) if split <= query.start_micros => {
                match self.fold_memory(query.clone(), memory).await {
                    Err(CursorError::Evicted { .. }) => history.aggregate(query).await,
                    folded => folded,
                }
            }
            Some(split) if split < query.end_micros => {
                let later = query.narrowed(split, query.end_micros);
                let later = match self.fold_memory(later, memory).await {
                    Err(CursorError::Evicted { .. }) => return history.aggregate(query).await,
                    folded => folded?,
                };
                let earlier = history
                    .aggregate(&query.narrowed(query.start_micros, split))
                    .await?;
                Ok(concat(earlier, later))
            }
            _ => history.aggregate(query).await,
        }
    }

    /// [`ReadingHub::fold_chunks`] on a blocking thread: a day of readings
    /// is tens of milliseconds of parsing, which would hold up every task
    /// sharing a runtime thread with the call.
    async fn fold_memory(
        &self,
        query: AggregateQuery,
        history: Option<Arc<dyn History>>,
    ) -> Result<Series, CursorError> {
        let hub = self.clone();
        match tokio::task::spawn_blocking(move || hub.fold_chunks(&query, history.as_deref())).await
        {
            Ok(folded) => folded,
            // A bug: the call fails as it would have inline.
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(CursorError::Unavailable),
        }
    }

    /// Where memory's part of `query` may start: every reading received
    /// after the oldest buffered one is buffered (times never go backwards
    /// as numbers go up), so from the next bucket boundary after it; 0 when
    /// history holds nothing older than memory. `None`: memory holds
    /// nothing.
    fn memory_from(
        buffer: &ReadingBuffer,
        history: &dyn History,
        query: &AggregateQuery,
    ) -> Option<u64> {
        let stats = buffer.stats();
        if history
            .oldest_seq()
            .is_none_or(|oldest| oldest >= stats.first_seq)
        {
            return Some(0);
        }
        let oldest = unix_micros(stats.oldest_received_at?);
        Some(query.boundary_at_or_after(oldest + 1))
    }

    /// Folds the buffered readings of `query` chunk by chunk. With
    /// `history`, the range must still be wholly buffered: when its
    /// readings were evicted on the way (or before the first chunk), the
    /// error says so and the caller asks history instead. Without, evicted
    /// readings are gone anyway, and the fold goes on with what memory
    /// still holds.
    fn fold_chunks(
        &self,
        query: &AggregateQuery,
        history: Option<&dyn History>,
    ) -> Result<Series, CursorError> {
        let at = |micros| SystemTime::UNIX_EPOCH + Duration::from_micros(micros);
        let mut list = ListQuery {
            filter: ReadingFilter {
                device_id: Some(query.device_id.clone()),
                ..ReadingFilter::default()
            },
            start: Some(at(query.start_micros)),
            end: Some(at(query.end_micros)),
            limit: MAX_EXAMINED_PER_PAGE,
            cursor: None,
            oldest_first: true,
            max_bytes: Some(CHUNK_BYTES),
        };
        let mut fold = Fold::new(query);
        loop {
            let page = {
                let buffer = self.read();
                // Eviction may have passed the range's start since the
                // caller decided: looked at again under this hold.
                if let (Some(history), None) = (history, list.cursor) {
                    let split = Self::memory_from(&buffer, history, query);
                    if split.is_none_or(|split| split > query.start_micros) {
                        let first_seq = buffer.stats().first_seq;
                        return Err(CursorError::Evicted {
                            missed_from: history.oldest_seq().unwrap_or(0),
                            missed_to: first_seq.saturating_sub(1),
                        });
                    }
                }
                buffer.list(&list)
            };
            match page {
                Ok(page) => {
                    for reading in &page.readings {
                        fold.add(unix_micros(reading.received_at), &reading.payload);
                    }
                    match page.next_cursor {
                        Some(cursor) => list.cursor = Some(cursor),
                        None => return Ok(fold.finish()),
                    }
                }
                Err(CursorError::Evicted { missed_to, .. }) if history.is_none() => {
                    list.cursor = Some(missed_to + 1);
                }
                Err(error) => return Err(error),
            }
        }
    }
}
