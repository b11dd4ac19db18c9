//! Conversions between proto messages and the service's own types, with the
//! validation the well-known types need (prost would silently normalize
//! out-of-range timestamps and durations).

use std::time::SystemTime;

use bytes::Bytes;
use prost_types::{value::Kind, ListValue, Struct, Timestamp, Value};

use super::{auth::Caller, error::ApiError, wire::MAX_JSON_DEPTH};
use crate::{
    aggregate::{self, Bucket},
    buffer::ReadingFilter,
    commands::{self, Command, CommandState},
    proto,
    replies::DeviceReply,
    state::DeviceState,
    topic::{literal_level, validate_device_id, validate_topic_filter},
};

/// The buffer filter for a request's `device_id` and `topic_filter`.
///
/// A topic filter that names one device at `device_level`, the level where
/// every subscribed topic carries the device id (`devices/d7/#`), also
/// selects by device, so the buffer uses its device index instead of a
/// scan; the result is the same.
///
/// The caller's read scope is checked against a named device, and narrows
/// everything else: readings of devices outside it are never returned.
pub(super) fn reading_filter(
    caller: &Caller,
    device_id: &str,
    topic_filter: &str,
    device_level: Option<usize>,
) -> Result<ReadingFilter, ApiError> {
    let device_id = match device_id {
        "" => None,
        id => Some(device_id_field(id)?),
    };
    caller.may_read(device_id.as_deref().unwrap_or(""))?;
    let topic_filter = match topic_filter {
        "" => None,
        filter => {
            validate_topic_filter(filter)
                .map_err(|e| ApiError::invalid("topic_filter", e.to_string()))?;
            Some(filter.to_owned())
        }
    };
    let device_id = device_id.or_else(|| {
        let device = literal_level(topic_filter.as_deref()?, device_level?)?;
        validate_device_id(device)
            .is_ok()
            .then(|| device.to_owned())
    });
    Ok(ReadingFilter {
        device_id,
        topic_filter,
        devices: caller.read.clone(),
    })
}

/// A request's `device_id`, validated as one topic level.
pub(super) fn device_id_field(id: &str) -> Result<String, ApiError> {
    validate_device_id(id).map_err(|e| ApiError::invalid("device_id", e.to_string()))?;
    Ok(id.to_owned())
}

/// A timestamp as the well-known type defines it: nanos in 0..1e9, and a
/// year from 1 to 9999. (prost would silently normalize other values.)
pub(super) fn optional_time(
    field: &'static str,
    time: Option<Timestamp>,
) -> Result<Option<SystemTime>, ApiError> {
    const MIN_SECONDS: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
    const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let Some(time) = time else { return Ok(None) };
    if !(0..1_000_000_000).contains(&time.nanos)
        || !(MIN_SECONDS..=MAX_SECONDS).contains(&time.seconds)
    {
        return Err(ApiError::invalid(
            field,
            "is not a valid timestamp (nanos must be 0 to 999999999, the year 1 to 9999)",
        ));
    }
    SystemTime::try_from(time)
        .map(Some)
        .map_err(|e| ApiError::invalid(field, format!("is not a valid timestamp: {e}")))
}

/// Longest `reply_timeout` accepted.
pub(super) const MAX_REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A `reply_timeout` as the well-known Duration defines it (nanos below one
/// second, no mixed signs; prost would silently normalize), positive and at
/// most [`MAX_REPLY_TIMEOUT`].
pub(super) fn reply_timeout(
    timeout: prost_types::Duration,
) -> Result<std::time::Duration, ApiError> {
    positive_duration(
        "reply_timeout",
        timeout,
        MAX_REPLY_TIMEOUT,
        &format!("{MAX_REPLY_TIMEOUT:?}"),
    )
}

/// A persistent command's `ttl`: positive, at most [`commands::MAX_TTL`].
pub(super) fn ttl(ttl: prost_types::Duration) -> Result<std::time::Duration, ApiError> {
    positive_duration("ttl", ttl, commands::MAX_TTL, "30 days")
}

/// AggregateReadings' `bucket` in microseconds: at least 1 ms, in whole
/// microseconds (the precision of `received_at`), at most 100 years.
pub(super) fn bucket_micros(bucket: prost_types::Duration) -> Result<u64, ApiError> {
    const MAX: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);
    let bucket = positive_duration("bucket", bucket, MAX, "100 years")?;
    if bucket.subsec_nanos() % 1_000 != 0 {
        return Err(ApiError::invalid("bucket", "must be whole microseconds"));
    }
    let micros = bucket.as_micros() as u64;
    if micros < aggregate::MIN_BUCKET_MICROS {
        return Err(ApiError::invalid("bucket", "must be at least 1 ms"));
    }
    Ok(micros)
}

/// A `field` that is a well-formed Duration, more than zero and at most
/// `max`.
fn positive_duration(
    field: &'static str,
    duration: prost_types::Duration,
    max: std::time::Duration,
    max_text: &str,
) -> Result<std::time::Duration, ApiError> {
    let valid = duration.seconds >= 0 && (0..1_000_000_000).contains(&duration.nanos);
    valid
        .then(|| std::time::Duration::new(duration.seconds as u64, duration.nanos as u32))
        .filter(|t| !t.is_zero() && *t <= max)
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("must be more than 0 s and at most {max_text}"),
            )
        })
}

pub(super) fn state_to_proto(state: CommandState) -> proto::CommandState {
    match state {
        CommandState::Queued => proto::CommandState::Queued,
        CommandState::Sent => proto::CommandState::Sent,
        CommandState::Succeeded => proto::CommandState::Succeeded,
        CommandState::Failed => proto::CommandState::Failed,
        CommandState::Expired => proto::CommandState::Expired,
        CommandState::Cancelled => proto::CommandState::Cancelled,
    }
}

/// A request's `states`: known, specified values.
pub(super) fn states_field(states: &[i32]) -> Result<Vec<CommandState>, ApiError> {
    states
        .iter()
        .map(|&n| {
            CommandState::ALL
                .into_iter()
                .find(|&s| state_to_proto(s) as i32 == n)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "states",
                        format!("{n} is not a CommandState other than COMMAND_STATE_UNSPECIFIED"),
                    )
                })
        })
        .collect()
}

/// A request's `command_id`: a UUID, as SendCommand gives them.
pub(super) fn command_id_field(id: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(id).map_err(|_| {
        ApiError::invalid(
            "command_id",
            "is not a UUID; pass a command_id SendCommand returned",
        )
    })
}

pub(super) fn command_to_proto(command: Command) -> proto::Command {
    proto::Command {
        command_id: command.id.to_string(),
        device_id: command.device_id,
        command: command.name,
        params: command.params.map(|params| Struct {
            fields: params
                .into_iter()
                .map(|(k, v)| (k, json_to_value(v)))
                .collect(),
        }),
        state: state_to_proto(command.state) as i32,
        create_time: Some(command.create_time.into()),
        expire_time: Some(command.expire_time.into()),
        update_time: Some(command.update_time.into()),
        attempts: command.attempts,
        reply: command.reply.map(reply_to_proto),
    }
}

/// How many arrays and objects deep a reply's `result` may nest and be
/// returned: one level less than a reading's JSON ([`MAX_JSON_DEPTH`]), as
/// a reply reaches clients one message deeper (StreamCommandsResponse,
/// SendCommandResponse, CommandReply, Value). serde_json parsed it (its own
/// limit is 128 levels), but clients' decoders stop at 100 message levels.
pub(super) const MAX_RESULT_DEPTH: usize = MAX_JSON_DEPTH - 1;

pub(super) fn reply_to_proto(reply: DeviceReply) -> proto::CommandReply {
    let status = match reply.ok {
        true => proto::CommandStatus::Ok,
        false => proto::CommandStatus::Error,
    };
    let mut message = reply.message;
    let result = match reply.result {
        Some(result) if crate::json::depth(&result) > MAX_RESULT_DEPTH => {
            // The device's outcome stands; only what clients could not
            // decode is left out, and the message says so.
            let note = format!(
                "(devicehub left out the result: nested deeper than {MAX_RESULT_DEPTH} arrays and objects)"
            );
            message = match message.is_empty() {
                true => note,
                false => format!("{message} {note}"),
            };
            None
        }
        result => result.map(json_to_value),
    };
    proto::CommandReply {
        status: status.into(),
        result,
        message,
        received_at: Some(Timestamp::from(reply.received_at)),
    }
}

/// The JSON envelope published for a command. `expires_at` (RFC 3339, UTC)
/// tells the device not to carry it out later: a broker that queued it for
/// an offline device's session would otherwise hand it over whenever the
/// device returns, however late.
pub(super) fn envelope(
    command_id: &str,
    command: &str,
    params: Option<serde_json::Map<String, serde_json::Value>>,
    traceparent: Option<String>,
    expires_at: SystemTime,
) -> Result<Bytes, ApiError> {
    let mut envelope = serde_json::Map::new();
    envelope.insert("id".into(), command_id.into());
    envelope.insert("command".into(), command.into());
    envelope.insert(
        "expires_at".into(),
        Timestamp::from(expires_at).to_string().into(),
    );
    if let Some(params) = params {
        envelope.insert("params".into(), params.into());
    }
    if let Some(traceparent) = traceparent {
        envelope.insert("traceparent".into(), traceparent.into());
    }
    serde_json::to_vec(&envelope)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(format!("encoding a command envelope: {e}")))
}

/// A device state as the proto has it.
pub(super) fn device_state_to_proto(state: &DeviceState) -> proto::DeviceState {
    let object = |object: &serde_json::Map<String, serde_json::Value>| Struct {
        fields: object
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v.clone())))
            .collect(),
    };
    proto::DeviceState {
        device_id: state.device_id.clone(),
        desired: Some(object(&state.desired)),
        reported: Some(object(&state.reported)),
        delta: Some(object(&state.delta())),
        version: state.version,
        desired_update_time: state.desired_update_time.map(Timestamp::from),
        reported_update_time: state.reported_update_time.map(Timestamp::from),
    }
}

pub(super) fn json_to_value(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        // protobuf's Value holds numbers as f64, like JSON in JavaScript.
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(Struct {
            fields: map
                .into_iter()
                .map(|(k, v)| (k, json_to_value(v)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

pub(super) fn struct_to_json(
    s: &Struct,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    s.fields
        .iter()
        .map(|(k, v)| Ok((k.clone(), value_to_json(v)?)))
        .collect()
}

fn value_to_json(value: &Value) -> Result<serde_json::Value, String> {
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => (*b).into(),
        // Whole numbers stay whole (`3`, not `3.0`) where f64 holds them exactly.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 => {
            (*n as i64).into()
        }
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("holds the number {n}, which JSON cannot represent"))?,
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .map(value_to_json)
            .collect::<Result<Vec<_>, _>>()?
            .into(),
        Some(Kind::StructValue(s)) => struct_to_json(s)?.into(),
    })
}

/// One field's buckets as a `Series`.
pub(super) fn series_to_proto(field: String, buckets: Vec<Bucket>) -> proto::Series {
    let at = |micros| {
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(micros);
        Some(Timestamp::from(time))
    };
    proto::Series {
        field,
        buckets: buckets
            .into_iter()
            .map(|b| proto::Bucket {
                start_time: at(b.start_micros),
                count: b.count as i64,
                min: b.min,
                max: b.max,
                mean: b.mean(),
                sum: b.sum,
                first: b.first,
                last: b.last,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_and_non_finite_numbers_are_refused() {
        let params = struct_to_json(&Struct {
            fields: [(
                "speed".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(3.0)),
                },
            )]
            .into(),
        })
        .unwrap();
        assert_eq!(
            serde_json::Value::Object(params),
            serde_json::json!({"speed": 3})
        );
        let nan = Struct {
            fields: [(
                "x".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        assert!(struct_to_json(&nan).is_err());
    }

    #[test]
    fn the_envelope_carries_id_command_and_params() {
        let params = serde_json::json!({"on": true}).as_object().cloned();
        let bytes = envelope("id-1", "TURN_ON_FAN", params, None, SystemTime::UNIX_EPOCH).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": "id-1", "command": "TURN_ON_FAN", "params": {"on": true}, "expires_at": "1970-01-01T00:00:00Z"})
        );
    }
}
