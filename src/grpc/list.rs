//! ListReadings: a page of buffered readings, newest or oldest first, with
//! filters and an opaque page token.

use super::{
    auth::Caller,
    convert::optional_time,
    encoded::{Keep, READING_FIELD},
    error::ApiError,
    page_token, wire, Encoded, EncodedListReadingsResponse, Shared,
};
use crate::{
    buffer::{CursorError, ListQuery},
    proto::ListReadingsRequest,
};

use page_token::MAX_PAGE_BYTES;

/// Serves one ListReadings call.
pub(super) async fn list(
    shared: &Shared,
    caller: &Caller,
    req: ListReadingsRequest,
) -> Result<EncodedListReadingsResponse, ApiError> {
    let query_hash = page_token::query_hash(&req);
    let query = list_query(shared, caller, req, query_hash)?;
    let page = shared.hub.list(&query).await.map_err(|e| match e {
        CursorError::Evicted {
            missed_from,
            missed_to,
        } => ApiError::PageEvicted {
            missed_from,
            missed_to,
        },
        CursorError::Future(_) => ApiError::invalid("page_token", "was not issued by this service"),
        CursorError::Unavailable => ApiError::StoreUnavailable {
            resume_after: query.cursor.unwrap_or(0),
        },
    })?;

    // Keep the response under the client's message size limit; at least
    // one reading is always sent. Each reading's message comes from the
    // cache shared with streams and other pages (which keeps the newest).
    let keep = Keep::for_page(shared.hub.next_seq());
    let guess: usize = page.readings.iter().map(|r| 2 * r.payload.len() + 96).sum();
    let mut response = Vec::with_capacity(guess.min(MAX_PAGE_BYTES) + 64);
    let mut fits = page.readings.len();
    for (i, reading) in page.readings.iter().enumerate() {
        let before = response.len();
        shared
            .encoded
            .put_field(READING_FIELD, reading, keep, &mut response);
        if i > 0 && response.len() > MAX_PAGE_BYTES {
            response.truncate(before);
            fits = i;
            break;
        }
    }
    // The page may be empty and still go on (the buffer stopped looking
    // after `MAX_EXAMINED_PER_PAGE` readings): its cursor then names where
    // looking resumes, and the token is sent all the same.
    let next_cursor = page.readings.get(fits).map(|r| r.seq).or(page.next_cursor);
    if let Some(cursor) = next_cursor {
        let token = page_token::encode(cursor, query_hash);
        wire::put_str(wire::LIST_NEXT_PAGE_TOKEN, &token, &mut response);
    }
    Ok(Encoded::from_bytes(response.into()))
}

/// The buffer query a request asks for, validated field by field.
fn list_query(
    shared: &Shared,
    caller: &Caller,
    req: ListReadingsRequest,
    query_hash: u64,
) -> Result<ListQuery, ApiError> {
    let filter = shared.reading_filter(caller, &req.device_id, &req.topic_filter)?;
    let start = optional_time("start_time", req.start_time)?;
    let end = optional_time("end_time", req.end_time)?;
    if let (Some(start), Some(end)) = (start, end) {
        if start >= end {
            return Err(ApiError::invalid(
                "end_time",
                "must be later than start_time",
            ));
        }
    }
    let limit = page_token::page_size(req.page_size)?;
    let cursor = match req.page_token.as_str() {
        "" => None,
        token => Some(page_token::decode(token, query_hash)?),
    };
    Ok(ListQuery {
        filter,
        start,
        end,
        limit,
        cursor,
        oldest_first: req.oldest_first,
        // Payloads copied out stop at the page's byte budget: a page of 1 000
        // large readings is never built only to be cut.
        max_bytes: Some(MAX_PAGE_BYTES),
    })
}
