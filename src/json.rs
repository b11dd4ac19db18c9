//! JSON measures shared by what devices and clients send: how deep a value
//! nests, how long it encodes, and equality that compares numbers by value.
//! Pure functions; nothing here allocates beyond the value itself.

use serde_json::Value;

/// How many arrays and objects deep `json` nests (a scalar: 0).
pub fn depth(json: &Value) -> usize {
    let inner = match json {
        Value::Array(items) => items.iter().map(depth).max(),
        Value::Object(map) => map.values().map(depth).max(),
        _ => return 0,
    };
    1 + inner.unwrap_or(0)
}

/// The length of `json` encoded compactly, without encoding it anywhere.
pub fn encoded_len(json: &impl serde::Serialize) -> usize {
    let mut counter = Counter(0);
    // Writing to a counter cannot fail, and serde_json's values always encode.
    let _ = serde_json::to_writer(&mut counter, json);
    counter.0
}

struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether `a` and `b` are the same JSON, numbers compared by value: `3`
/// from a device and `3.0` from a protobuf `Struct` (which holds every
/// number as a double) are equal, where `serde_json`'s `==` tells them apart.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!({"a": [1, {"b": []}]})), 4);
    }

    #[test]
    fn encoded_len_is_the_compact_encoding() {
        let value = json!({"a": [1, "x\"y"], "b": null});
        assert_eq!(
            encoded_len(&value),
            serde_json::to_vec(&value).unwrap().len()
        );
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(same(&json!(3), &json!(3.0)));
        assert!(same(&json!({"a": [1, 2.5]}), &json!({"a": [1.0, 2.5]})));
        assert!(!same(&json!(3), &json!(4)));
        assert!(!same(&json!([1]), &json!([1, 2])));
        assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!same(&json!("3"), &json!(3)));
    }
}
