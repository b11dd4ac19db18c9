//! WatchReadings: a stream that follows the buffer from a resume cursor, with
//! gaps reported in-band or as DATA_LOSS, and UNAVAILABLE with the resume
//! point at shutdown.
//!
//! Each stream has a producer task of its own ([`produce`]) that reads the
//! buffer at the stream's pace: a slow client only holds up its producer
//! (whose queue is bounded), never ingestion or other streams.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::Status;
use tracing::{warn, Instrument};

use super::{
    auth::Caller, encoded::EncodedReadings, error::ApiError, Encoded, EncodedWatchReadingsResponse,
    Shared,
};
use crate::{
    buffer::CursorError,
    hub::{ReadingWatcher, SubscribeError},
    proto::{self, watch_readings_response, GapPolicy, WatchReadingsRequest},
};

/// Batches (of up to a few hundred readings) queued per watch stream between
/// its producer and tonic.
const WATCH_QUEUE_BATCHES: usize = 2;

/// Starts serving one WatchReadings call.
pub(super) async fn watch(
    shared: &Arc<Shared>,
    caller: &Caller,
    req: WatchReadingsRequest,
) -> Result<WatchStream, ApiError> {
    let filter = shared.reading_filter(caller, &req.device_id, &req.topic_filter)?;
    let notify_gaps = match GapPolicy::try_from(req.gap_policy) {
        Ok(GapPolicy::Unspecified | GapPolicy::Fail) => false,
        Ok(GapPolicy::Notify) => true,
        Err(_) => {
            return Err(ApiError::invalid(
                "gap_policy",
                format!("{} is not a GapPolicy", req.gap_policy),
            ))
        }
    };
    let watcher = shared
        .hub
        .subscribe(filter, req.after_seq, caller.client.clone())
        .await
        .map_err(|e| match e {
            SubscribeError::Future { .. } => ApiError::invalid("after_seq", e.to_string()),
            SubscribeError::TooManyWatchers(max) => ApiError::TooManyWatchers(max),
            SubscribeError::TooManyForClient(_) => ApiError::TooManyForClient(e.to_string()),
        })?;
    // A stale resume cursor fails the call itself, before any message,
    // unless the client asked to be told about gaps in-band.
    let oldest = shared.hub.oldest_seq();
    if !notify_gaps && watcher.cursor() + 1 < oldest {
        return Err(ApiError::CursorTooOld {
            after_seq: watcher.cursor(),
            oldest,
        });
    }
    let start_cursor = watcher.cursor();
    let (tx, rx) = mpsc::channel(WATCH_QUEUE_BATCHES);
    let encoded = shared.encoded.clone();
    tokio::spawn(produce(watcher, encoded, notify_gaps, tx).in_current_span());
    Ok(WatchStream {
        batches: ReceiverStream::new(rx),
        batch: Vec::new().into_iter(),
        shutdown: Box::pin(shared.shutdown.clone().cancelled_owned()),
        resume_after: start_cursor,
        done: false,
    })
}

/// A batch of messages for the stream, or the status that ends it.
type WatchEvent = Result<Vec<WatchItem>, Status>;

/// The producer of one stream: reads the buffer from the watcher's cursor
/// and queues what the stream sends (each reading's message from `encoded`,
/// shared by all streams), until the client goes away or the stream ends
/// with an error.
async fn produce(
    mut watcher: ReadingWatcher,
    encoded: Arc<EncodedReadings>,
    notify_gaps: bool,
    tx: mpsc::Sender<WatchEvent>,
) {
    let mut last_sent = watcher.cursor();
    loop {
        let batch = tokio::select! {
            batch = watcher.next_batch() => batch,
            _ = tx.closed() => return,
        };
        let event = match batch {
            Ok(batch) => Ok(encoded
                .watch_messages(&batch)
                .into_iter()
                .map(|(seq, message)| WatchItem {
                    resumes_after: Some(seq),
                    // A reading as field 1 is a whole message.
                    message: Encoded::from_bytes(message),
                })
                .collect()),
            Err(error) => gap(&mut watcher, error, notify_gaps, last_sent),
        };
        if let Ok(items) = &event {
            last_sent = items
                .iter()
                .rev()
                .find_map(|item| item.resumes_after)
                .unwrap_or(last_sent);
        }
        let ends = event.is_err();
        if tx.send(event).await.is_err() || ends {
            return; // the client went away, or the stream ends
        }
    }
}

/// What the stream says when its watcher missed readings: a `Gap` message
/// (and the watcher moves past it) when the client asked for that, else the
/// status that ends the stream.
fn gap(
    watcher: &mut ReadingWatcher,
    error: CursorError,
    notify_gaps: bool,
    last_sent: u64,
) -> WatchEvent {
    let (missed_from, missed_to) = match error {
        CursorError::Evicted {
            missed_from,
            missed_to,
        } => (missed_from, missed_to),
        CursorError::Unavailable => {
            let error = ApiError::StoreUnavailable {
                resume_after: last_sent,
            };
            return Err(error.into());
        }
        CursorError::Future(_) => {
            return Err(ApiError::Internal("watch cursor ahead of the buffer".into()).into())
        }
    };
    if !notify_gaps {
        warn!(
            missed_from,
            missed_to, last_sent, "watcher fell behind; ending its stream"
        );
        return Err(ApiError::WatcherFellBehind {
            missed_from,
            missed_to,
            last_sent,
        }
        .into());
    }
    warn!(
        missed_from,
        missed_to, "watcher missed evicted readings; notified in-band"
    );
    watcher.skip_gap(missed_to);
    let gap = proto::Gap {
        first_seq: missed_from,
        last_seq: missed_to,
    };
    Ok(vec![WatchItem {
        // A client that resumes after the gap is not told of it again.
        resumes_after: Some(missed_to),
        message: Encoded::new(&proto::WatchReadingsResponse {
            event: Some(watch_readings_response::Event::Gap(gap)),
        }),
    }])
}

/// A message of a watch stream, and the position a client that received it
/// resumes after: the reading's number, or the last one a gap reports.
struct WatchItem {
    resumes_after: Option<u64>,
    message: EncodedWatchReadingsResponse,
}

/// The response stream of WatchReadings: the producer's messages until the
/// service shuts down, then an `UNAVAILABLE` status that says where to resume.
pub struct WatchStream {
    batches: ReceiverStream<WatchEvent>,
    /// The rest of the batch being sent.
    batch: std::vec::IntoIter<WatchItem>,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Where a client resumes after what was handed to the transport: the
    /// last reading's number, or the end of the last gap reported (or the
    /// position the watch started at).
    resume_after: u64,
    done: bool,
}

impl Stream for WatchStream {
    type Item = Result<EncodedWatchReadingsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            self.done = true;
            let error = ApiError::ShuttingDown {
                resume_after: self.resume_after,
            };
            return Poll::Ready(Some(Err(error.into())));
        }
        loop {
            if let Some(item) = self.batch.next() {
                if let Some(seq) = item.resumes_after {
                    self.resume_after = seq;
                }
                return Poll::Ready(Some(Ok(item.message)));
            }
            match std::task::ready!(Pin::new(&mut self.batches).poll_next(cx)) {
                Some(Ok(batch)) => self.batch = batch.into_iter(),
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                None => return Poll::Ready(None),
            }
        }
    }
}
