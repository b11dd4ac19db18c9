//! AggregateReadings: one device's numbers per bucket of time, validated
//! here and computed by the hub (`hub/aggregate.rs`).

use super::{
    auth::Caller,
    convert::{bucket_micros, device_id_field, optional_time, series_to_proto},
    error::ApiError,
    Shared,
};
use crate::{
    aggregate::{pointer_error, AggregateQuery, MAX_BUCKETS, MAX_FIELDS},
    buffer::{unix_micros, CursorError},
    proto::{AggregateReadingsRequest, AggregateReadingsResponse},
};

/// Serves one AggregateReadings call.
pub(super) async fn aggregate(
    shared: &Shared,
    caller: &Caller,
    req: AggregateReadingsRequest,
) -> Result<AggregateReadingsResponse, ApiError> {
    let query = query(caller, req)?;
    let series = shared.hub.aggregate(&query).await.map_err(|e| match e {
        // Memory and history both answer without cursors: only the store
        // failing reaches here.
        CursorError::Unavailable | CursorError::Evicted { .. } | CursorError::Future(_) => {
            ApiError::ReadingsUnavailable
        }
    })?;
    Ok(AggregateReadingsResponse {
        series: query
            .fields
            .into_iter()
            .zip(series)
            .map(|(field, buckets)| series_to_proto(field, buckets))
            .collect(),
    })
}

/// The request, validated field by field.
fn query(caller: &Caller, req: AggregateReadingsRequest) -> Result<AggregateQuery, ApiError> {
    if req.device_id.is_empty() {
        return Err(ApiError::invalid("device_id", "is required"));
    }
    let device_id = device_id_field(&req.device_id)?;
    caller.may_read(&device_id)?;
    if req.fields.is_empty() {
        return Err(ApiError::invalid(
            "fields",
            "is required: at least one JSON Pointer, such as \"/temperature\"",
        ));
    }
    if req.fields.len() > MAX_FIELDS {
        return Err(ApiError::invalid(
            "fields",
            format!("holds {} pointers; at most {MAX_FIELDS}", req.fields.len()),
        ));
    }
    for (i, field) in req.fields.iter().enumerate() {
        if let Some(error) = pointer_error(field) {
            return Err(ApiError::invalid("fields", format!("[{i}] {error}")));
        }
    }
    let start = optional_time("start_time", req.start_time)?
        .ok_or_else(|| ApiError::invalid("start_time", "is required"))?;
    let end = optional_time("end_time", req.end_time)?
        .ok_or_else(|| ApiError::invalid("end_time", "is required"))?;
    // To the microsecond, as ListReadings takes its bounds (down), so that
    // both select the same readings.
    let (start_micros, end_micros) = (unix_micros(start), unix_micros(end));
    if start >= end {
        return Err(ApiError::invalid(
            "end_time",
            "must be later than start_time",
        ));
    }
    let bucket = req
        .bucket
        .ok_or_else(|| ApiError::invalid("bucket", "is required, at least 1 ms"))?;
    let query = AggregateQuery {
        device_id,
        fields: req.fields,
        start_micros,
        end_micros,
        bucket_micros: bucket_micros(bucket)?,
    };
    let buckets = query.bucket_count();
    if buckets > MAX_BUCKETS {
        return Err(ApiError::invalid(
            "bucket",
            format!(
                "makes {buckets} buckets of the range; at most {MAX_BUCKETS} per series: \
                 use a wider bucket or a shorter range"
            ),
        ));
    }
    Ok(query)
}
