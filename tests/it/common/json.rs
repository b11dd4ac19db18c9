//! serde_json ↔ protobuf's `Struct` and `Value`, for requests and answers
//! that carry JSON (command params and results, device states).

use prost_types::{value::Kind, ListValue, Struct, Value as ProtoValue};
use serde_json::{json, Value};

/// `value` (an object) as a `Struct`.
pub fn to_struct(value: Value) -> Struct {
    let Value::Object(map) = value else {
        panic!("a Struct is made from a JSON object, not {value}")
    };
    Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

/// `value` as a protobuf `Value`.
pub fn to_value(value: Value) -> ProtoValue {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(to_struct(value)),
    };
    ProtoValue { kind: Some(kind) }
}

/// A `Struct` as JSON (numbers as doubles: compare with `3.0`, not `3`).
pub fn from_struct(s: &Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), from_value(v)))
            .collect(),
    )
}

/// A protobuf `Value` as JSON.
pub fn from_value(value: &ProtoValue) -> Value {
    match value.kind.as_ref().unwrap() {
        Kind::NullValue(_) => Value::Null,
        Kind::NumberValue(n) => json!(n),
        Kind::StringValue(s) => json!(s),
        Kind::BoolValue(b) => json!(b),
        Kind::StructValue(s) => from_struct(s),
        Kind::ListValue(l) => Value::Array(l.values.iter().map(from_value).collect()),
    }
}
