//! Reading the buffer: a page of readings for ListReadings ([`ReadingBuffer::list`]:
//! time bounds and the device index narrow the range before anything is
//! scanned) and a watcher's next readings ([`ReadingBuffer::scan_after`]),
//! with the filter both apply and the cursor errors both report.

use std::time::SystemTime;

use super::{Reading, ReadingBuffer, Slot};
use crate::{scope::DeviceSet, topic::topic_matches};

/// Which readings a list or a watch wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadingFilter {
    pub device_id: Option<String>,
    pub topic_filter: Option<String>,
    /// The devices the reader may see (its token's read scope): readings of
    /// other devices are skipped as if they did not match.
    pub devices: DeviceSet,
}

impl ReadingFilter {
    pub(crate) fn matches_source(&self, device_id: &str, topic: &str) -> bool {
        self.device_id.as_deref().is_none_or(|d| device_id == d)
            && self.devices.allows(device_id)
            && self
                .topic_filter
                .as_deref()
                .is_none_or(|f| topic_matches(f, topic))
    }
}

/// Most buffered readings one [`ReadingBuffer::list`] call looks at, matching
/// or not. The call runs under the hub's read lock, which ingest's pushes
/// wait for: a filter that matches nothing used to look at the whole buffer
/// (169 ms for 1 000 000 readings, all of it ingest stalled). Bounded, the
/// page comes back shorter (possibly empty) with a cursor where the looking
/// stopped, as AIP-158 allows. Measured (BENCHMARKS.md, "Bounded scans"):
/// about 60 ns a reading (topic match, scope check; release build, 2
/// shared cores), so a hold of ~0.25 ms, leaving room for slower filters or
/// a busier machine under a millisecond; a larger bound buys little, as
/// walking all 245 pages of 1 000 000 readings already costs no more than
/// the one unbounded call did. A page of readings that all match stops at
/// `limit` long before.
pub const MAX_EXAMINED_PER_PAGE: usize = 4096;

/// A request for one page of readings.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub filter: ReadingFilter,
    /// Inclusive lower bound on `received_at`.
    pub start: Option<SystemTime>,
    /// Exclusive upper bound on `received_at`.
    pub end: Option<SystemTime>,
    /// At most this many readings (at least 1).
    pub limit: usize,
    /// Continue at this sequence number (inclusive), from a previous page:
    /// the next reading to look at (in the page's order), whether or not
    /// it matches.
    pub cursor: Option<u64>,
    pub oldest_first: bool,
    /// Stop before the payloads copied out pass this many bytes (the page
    /// still holds at least one reading). `None`: no byte bound.
    pub max_bytes: Option<usize>,
}

/// One page: the readings, and the cursor of the next page if there is one.
/// A page may be short or empty and still have a cursor: it stopped after
/// [`MAX_EXAMINED_PER_PAGE`] readings.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub readings: Vec<Reading>,
    pub next_cursor: Option<u64>,
}

/// Why a cursor cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Readings from `missed_from` to `missed_to` (inclusive) were evicted
    /// before the cursor's owner got to them.
    #[error("readings {missed_from}..={missed_to} were evicted")]
    Evicted { missed_from: u64, missed_to: u64 },
    /// The cursor names a sequence number that has not been assigned yet.
    #[error("sequence number {0} has not been assigned yet")]
    Future(u64),
    /// The readings are older than memory and the store could not be read.
    #[error("the reading store is unavailable")]
    Unavailable,
}

impl ReadingBuffer {
    /// For watchers: the readings after sequence number `after` that match
    /// `filter`, looking at no more than `max_scan` readings, and the sequence
    /// number of the last reading looked at (the new cursor).
    ///
    /// `after` may be `next_seq() - 1` ("nothing yet"). An error says exactly
    /// which readings the cursor missed because they were evicted.
    pub fn scan_after(
        &self,
        after: u64,
        max_scan: usize,
        max_bytes: usize,
        filter: &ReadingFilter,
    ) -> Result<(Vec<Reading>, u64), CursorError> {
        if after >= self.next_seq() {
            return Err(CursorError::Future(after));
        }
        if after + 1 < self.first_seq {
            return Err(CursorError::Evicted {
                missed_from: after + 1,
                missed_to: self.first_seq - 1,
            });
        }
        let start = (after + 1 - self.first_seq) as usize;
        let end = self.readings.len().min(start.saturating_add(max_scan));
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut cursor = after;
        for (i, slot) in self.readings.range(start..end).enumerate() {
            let seq = self.first_seq + (start + i) as u64;
            if filter.matches_source(&slot.source.device_id, &slot.source.topic) {
                let len = slot.payload.len();
                if !batch.is_empty() && bytes + len > max_bytes {
                    break; // this one starts the next batch
                }
                bytes += len;
                batch.push(self.reading(seq, slot));
            }
            cursor = seq;
        }
        Ok((batch, cursor))
    }

    /// One page of readings for `query`. Never scans more than it has to:
    /// time bounds and the device index narrow the range first, and no more
    /// than [`MAX_EXAMINED_PER_PAGE`] readings are looked at; the page then
    /// ends early with `next_cursor` at the first reading not looked at.
    pub fn list(&self, query: &ListQuery) -> Result<ListPage, CursorError> {
        // A cursor is the sequence number of the first reading of the page,
        // so it must still be buffered.
        if let Some(cursor) = query.cursor {
            if cursor >= self.next_seq() {
                return Err(CursorError::Future(cursor));
            }
            if cursor < self.first_seq {
                return Err(CursorError::Evicted {
                    missed_from: cursor,
                    missed_to: self.first_seq - 1,
                });
            }
        }
        // Sequence range [lo, hi) allowed by the time bounds and the cursor.
        let micros = super::unix_micros;
        let mut lo = self.first_seq
            + query.start.map_or(0, |start| {
                let start = micros(start);
                self.readings.partition_point(|r| r.received_micros < start)
            }) as u64;
        let mut hi = self.first_seq
            + query.end.map_or(self.readings.len(), |end| {
                let end = micros(end);
                self.readings.partition_point(|r| r.received_micros < end)
            }) as u64;
        match (query.cursor, query.oldest_first) {
            (Some(c), true) => lo = lo.max(c),
            (Some(c), false) => hi = hi.min(c + 1),
            (None, _) => {}
        }
        if lo >= hi {
            return Ok(ListPage::default());
        }

        let limit = query.limit.max(1);
        let mut page = Vec::with_capacity(limit.min(1024));
        let mut next_cursor = None;
        let max_bytes = query.max_bytes.unwrap_or(usize::MAX);
        let mut bytes = 0;
        let mut examined = 0;
        let mut take = |(seq, slot): (u64, &Slot)| -> bool {
            if examined == MAX_EXAMINED_PER_PAGE {
                // `seq` is not looked at: the next page starts there, so
                // nothing between the pages is skipped or seen twice.
                next_cursor = Some(seq);
                return false;
            }
            examined += 1;
            if !query
                .filter
                .matches_source(&slot.source.device_id, &slot.source.topic)
            {
                return true;
            }
            let len = slot.payload.len();
            if page.len() == limit || (!page.is_empty() && bytes + len > max_bytes) {
                next_cursor = Some(seq);
                return false;
            }
            bytes += len;
            page.push(self.reading(seq, slot));
            true
        };

        match query.filter.device_id.as_deref() {
            Some(device_id) => {
                let Some(device_seqs) = self.devices.seqs(device_id) else {
                    return Ok(ListPage::default());
                };
                let from = device_seqs.partition_point(|s| *s < lo);
                let to = device_seqs.partition_point(|s| *s < hi);
                let seqs = device_seqs.range(from..to);
                let slots = seqs.filter_map(|s| Some((*s, self.get(*s)?)));
                if query.oldest_first {
                    slots.take_while(|r| take(*r)).for_each(drop);
                } else {
                    slots.rev().take_while(|r| take(*r)).for_each(drop);
                }
            }
            None => {
                let range = (lo - self.first_seq) as usize..(hi - self.first_seq) as usize;
                let slots = self
                    .readings
                    .range(range)
                    .enumerate()
                    .map(|(i, slot)| (lo + i as u64, slot));
                if query.oldest_first {
                    slots.take_while(|r| take(*r)).for_each(drop);
                } else {
                    slots.rev().take_while(|r| take(*r)).for_each(drop);
                }
            }
        }
        Ok(ListPage {
            readings: page,
            next_cursor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, buffer, push, query, seqs, FIRST};
    use super::*;

    #[test]
    fn pages_through_everything_in_both_orders() {
        let mut buf = buffer(100, usize::MAX);
        let all: Vec<u64> = (0..25).map(|i| push(&mut buf, "a", i, "x")).collect();
        for oldest_first in [true, false] {
            let mut got = Vec::new();
            let mut cursor = None;
            loop {
                let page = buf
                    .list(&ListQuery {
                        cursor,
                        oldest_first,
                        ..query(10)
                    })
                    .unwrap();
                got.extend(seqs(&page));
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            let mut want = all.clone();
            if !oldest_first {
                want.reverse();
            }
            assert_eq!(got, want);
        }
    }

    /// Every page of `query` from the first, following the cursors as a
    /// client follows tokens: each page's readings, in order.
    fn follow(buf: &ReadingBuffer, query: &ListQuery) -> Vec<Vec<u64>> {
        let mut pages = Vec::new();
        let mut cursor = None;
        loop {
            let page = buf.list(&ListQuery {
                cursor,
                ..query.clone()
            });
            let page = page.unwrap();
            pages.push(seqs(&page));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return pages,
            }
            assert!(pages.len() < 1000, "the cursors go round in circles");
        }
    }

    fn topic(filter: &str) -> ReadingFilter {
        ReadingFilter {
            topic_filter: Some(filter.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_filter_matching_nothing_stops_after_the_bound_with_a_cursor() {
        let n = 2 * MAX_EXAMINED_PER_PAGE + 100;
        let mut buf = buffer(n, usize::MAX);
        for i in 0..n {
            push(&mut buf, "a", i as u64, "x");
        }
        for oldest_first in [true, false] {
            let nothing = ListQuery {
                filter: topic("devices/nobody/#"),
                oldest_first,
                ..query(100)
            };
            let first = buf.list(&nothing).unwrap();
            assert!(first.readings.is_empty());
            // The cursor is where looking stopped, not a reading returned.
            let stopped = match oldest_first {
                true => FIRST + MAX_EXAMINED_PER_PAGE as u64,
                false => FIRST + (n - 1 - MAX_EXAMINED_PER_PAGE) as u64,
            };
            assert_eq!(first.next_cursor, Some(stopped), "{oldest_first}");
            // Three pages look at every reading once; the last has no cursor.
            let pages = follow(&buf, &nothing);
            assert_eq!(pages, vec![Vec::<u64>::new(); 3], "{oldest_first}");

            // The device index is bounded the same way: a device with more
            // readings than the bound, and a topic none of them has.
            let by_device = ListQuery {
                filter: ReadingFilter {
                    device_id: Some("a".into()),
                    ..topic("devices/nobody/#")
                },
                oldest_first,
                ..query(100)
            };
            assert_eq!(buf.list(&by_device).unwrap().next_cursor, Some(stopped));
            assert_eq!(follow(&buf, &by_device).len(), 3);
        }
    }

    #[test]
    fn following_bounded_pages_returns_exactly_the_matching_readings() {
        let n = 3 * MAX_EXAMINED_PER_PAGE + 7;
        let bound = MAX_EXAMINED_PER_PAGE;
        // Rare matches, some right at a page's edge, where an off-by-one
        // would skip or repeat one.
        let rare = [0, 5, bound - 1, bound, bound + 1, 2 * bound, n - 1];
        let mut buf = buffer(n, usize::MAX);
        let mut want = Vec::new();
        for i in 0..n {
            let device = if rare.contains(&i) { "b" } else { "a" };
            let seq = push(&mut buf, device, i as u64, "x");
            if device == "b" {
                want.push(seq);
            }
        }
        for oldest_first in [true, false] {
            for limit in [1, 2, 100] {
                for filter in [
                    topic("devices/b/#"),
                    ReadingFilter {
                        device_id: Some("b".into()),
                        ..Default::default()
                    },
                ] {
                    let sparse = ListQuery {
                        filter,
                        oldest_first,
                        ..query(limit)
                    };
                    let pages = follow(&buf, &sparse);
                    assert!(pages.iter().all(|p| p.len() <= limit));
                    let got: Vec<u64> = pages.concat();
                    let mut want = want.clone();
                    if !oldest_first {
                        want.reverse();
                    }
                    assert_eq!(got, want, "oldest_first {oldest_first}, limit {limit}");
                }
            }
            // Pages of everything are not shortened: they fill up first.
            let everything = follow(
                &buf,
                &ListQuery {
                    oldest_first,
                    ..query(1000)
                },
            );
            assert!(everything.iter().rev().skip(1).all(|p| p.len() == 1000));
            assert_eq!(everything.concat().len(), n);
        }
    }

    #[test]
    fn last_full_page_has_no_next_cursor() {
        let mut buf = buffer(100, usize::MAX);
        for i in 0..10 {
            push(&mut buf, "a", i, "x");
        }
        assert_eq!(buf.list(&query(10)).unwrap().next_cursor, None);
        assert_eq!(buf.list(&query(9)).unwrap().next_cursor, Some(FIRST));
    }

    #[test]
    fn filters_by_device_topic_and_time() {
        let mut buf = buffer(100, usize::MAX);
        for i in 0..30 {
            push(&mut buf, ["a", "b", "c"][i % 3], i as u64, "x");
        }
        let by_device = buf
            .list(&ListQuery {
                filter: ReadingFilter {
                    device_id: Some("b".into()),
                    topic_filter: None,
                    ..Default::default()
                },
                oldest_first: true,
                ..query(3)
            })
            .unwrap();
        assert_eq!(seqs(&by_device), [FIRST + 1, FIRST + 4, FIRST + 7]);
        assert_eq!(by_device.next_cursor, Some(FIRST + 10));

        let by_topic = buf
            .list(&ListQuery {
                filter: ReadingFilter {
                    device_id: None,
                    topic_filter: Some("devices/c/#".into()),
                    ..Default::default()
                },
                ..query(2)
            })
            .unwrap();
        assert_eq!(seqs(&by_topic), [FIRST + 29, FIRST + 26]);

        let by_time = buf
            .list(&ListQuery {
                start: Some(at(10)),
                end: Some(at(13)),
                oldest_first: true,
                ..query(10)
            })
            .unwrap();
        assert_eq!(seqs(&by_time), [FIRST + 10, FIRST + 11, FIRST + 12]);

        let device_and_time = buf
            .list(&ListQuery {
                filter: ReadingFilter {
                    device_id: Some("a".into()),
                    topic_filter: Some("devices/+/readings".into()),
                    ..Default::default()
                },
                start: Some(at(10)),
                end: Some(at(20)),
                ..query(10)
            })
            .unwrap();
        assert_eq!(seqs(&device_and_time), [FIRST + 18, FIRST + 15, FIRST + 12]);

        let unknown = ReadingFilter {
            device_id: Some("zzz".into()),
            topic_filter: None,
            ..Default::default()
        };
        let none = buf.list(&ListQuery {
            filter: unknown,
            ..query(10)
        });
        assert!(none.unwrap().readings.is_empty());
    }

    #[test]
    fn evicted_and_future_cursors_are_refused() {
        let mut buf = buffer(5, usize::MAX);
        for i in 0..10 {
            push(&mut buf, "a", i, "x");
        }
        let evicted = buf.list(&ListQuery {
            cursor: Some(FIRST + 2),
            ..query(1)
        });
        assert_eq!(
            evicted.unwrap_err(),
            CursorError::Evicted {
                missed_from: FIRST + 2,
                missed_to: FIRST + 4
            }
        );
        let future = buf.list(&ListQuery {
            cursor: Some(FIRST + 10),
            ..query(1)
        });
        assert_eq!(future.unwrap_err(), CursorError::Future(FIRST + 10));
        assert!(buf
            .list(&ListQuery {
                cursor: Some(FIRST + 5),
                ..query(1)
            })
            .is_ok());
    }

    #[test]
    fn pages_and_batches_stop_at_their_byte_budget() {
        let mut buf = buffer(100, 1 << 20);
        for i in 0..10 {
            push(&mut buf, "d", i, &"x".repeat(100));
        }
        let page = buf
            .list(&ListQuery {
                limit: 100,
                oldest_first: true,
                max_bytes: Some(350),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.readings.len(), 3);
        assert_eq!(page.next_cursor, Some(FIRST + 3));
        // A single reading over the budget still comes, alone.
        let one = buf
            .list(&ListQuery {
                limit: 100,
                max_bytes: Some(10),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(one.readings.len(), 1);
        let everything = ReadingFilter::default();
        let (batch, cursor) = buf.scan_after(FIRST - 1, 100, 250, &everything).unwrap();
        assert_eq!((batch.len(), cursor), (2, FIRST + 1));
        let (batch, _) = buf.scan_after(cursor, 100, 1, &everything).unwrap();
        assert_eq!(seqs_of(&batch), [FIRST + 2]);
    }

    fn seqs_of(readings: &[Reading]) -> Vec<u64> {
        readings.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn scan_after_reads_forward_and_reports_gaps() {
        let mut buf = buffer(5, usize::MAX);
        let everything = ReadingFilter::default();
        let start = buf.stats().next_seq - 1;
        assert_eq!(
            buf.scan_after(start, 10, usize::MAX, &everything).unwrap(),
            (vec![], start)
        );

        for i in 0..3 {
            push(&mut buf, ["a", "b"][i % 2], i as u64, "x");
        }
        let only_a = ReadingFilter {
            device_id: Some("a".into()),
            topic_filter: None,
            ..Default::default()
        };
        let (batch, cursor) = buf.scan_after(start, 2, usize::MAX, &only_a).unwrap();
        assert_eq!(batch.iter().map(|r| r.seq).collect::<Vec<_>>(), [FIRST]);
        assert_eq!(cursor, FIRST + 1);
        let (batch, cursor) = buf.scan_after(cursor, 10, usize::MAX, &only_a).unwrap();
        assert_eq!(batch.iter().map(|r| r.seq).collect::<Vec<_>>(), [FIRST + 2]);
        assert_eq!(cursor, FIRST + 2);

        for i in 0..7 {
            push(&mut buf, "a", i, "x");
        }
        assert_eq!(
            buf.scan_after(cursor, 10, usize::MAX, &everything)
                .unwrap_err(),
            CursorError::Evicted {
                missed_from: FIRST + 3,
                missed_to: FIRST + 4
            }
        );
        assert_eq!(
            buf.scan_after(FIRST + 50, 10, usize::MAX, &everything)
                .unwrap_err(),
            CursorError::Future(FIRST + 50)
        );
    }
}
