//! The numbers a payload holds at JSON Pointers, read the way the store's
//! SQL reads them (`jsonb`, then `float8`), so that memory and the store
//! count the same values:
//! - the document must be JSON (serde_json's syntax, nested at most 128
//!   deep) without a NUL character or half a surrogate pair anywhere
//!   (`jsonb` refuses both);
//! - only the values asked for are converted: a number elsewhere in the
//!   document that no float holds does not spoil the others (a full parse
//!   into a `Value` would refuse the whole payload for it);
//! - a value counts when it is a JSON number that converts to a finite
//!   float, and not to zero from a number that is not zero (PostgreSQL's
//!   `float8` refuses both as out of range).

use std::collections::HashMap;

use serde_json::value::RawValue;

/// The values at `fields` (each a pointer's tokens, unescaped) in
/// `payload`, into `out` (as many as `fields`): `None` where there is no
/// countable number.
pub fn numbers_at(payload: &[u8], fields: &[Vec<String>], out: &mut [Option<f64>]) {
    out.fill(None);
    // Syntax checked throughout, numbers and strings left as text.
    let Ok(doc) = serde_json::from_slice::<&RawValue>(payload) else {
        return;
    };
    if jsonb_refuses_escape(doc.get()) {
        return;
    }
    // The top level is parsed once for all fields.
    let top = Level::of(doc);
    for (tokens, out) in fields.iter().zip(out) {
        let Some((first, rest)) = tokens.split_first() else {
            *out = number(doc);
            continue;
        };
        let mut value = top.as_ref().and_then(|level| level.get(first));
        for token in rest {
            value = value.and_then(|v| Level::of(v)?.get(token));
        }
        *out = value.and_then(number);
    }
}

/// An object's members or an array's items, as raw values.
enum Level<'a> {
    Object(HashMap<String, &'a RawValue>),
    Array(Vec<&'a RawValue>),
}

impl<'a> Level<'a> {
    /// `None` for a scalar.
    fn of(value: &'a RawValue) -> Option<Self> {
        match value.get().as_bytes().first()? {
            // A repeated key keeps its last value, as in `jsonb`.
            b'{' => serde_json::from_str(value.get()).ok().map(Level::Object),
            b'[' => serde_json::from_str(value.get()).ok().map(Level::Array),
            _ => None,
        }
    }

    fn get(&self, token: &str) -> Option<&'a RawValue> {
        match self {
            Level::Object(members) => members.get(token).copied(),
            // RFC 6901 indexes: `0` or digits without a leading zero (the
            // request refused the tokens PostgreSQL reads otherwise).
            Level::Array(items) => {
                let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
                let canonical = digits && (token == "0" || !token.starts_with('0'));
                let index: usize = token.parse().ok().filter(|_| canonical)?;
                items.get(index).copied()
            }
        }
    }
}

/// The value as a countable number, if it is one.
fn number(value: &RawValue) -> Option<f64> {
    let text = value.get();
    if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return None; // a string, a boolean, null, an object or an array
    }
    // Rust's parse rounds correctly, as PostgreSQL's (C's strtod) does.
    let number: f64 = text.parse().ok()?;
    let mantissa = text.split(['e', 'E']).next().unwrap_or(text);
    let underflow = number == 0.0 && mantissa.bytes().any(|b| matches!(b, b'1'..=b'9'));
    (number.is_finite() && !underflow).then_some(number)
}

/// Whether a valid JSON text has a `\u` escape `jsonb` refuses: a NUL
/// (`\u0000`), or half of a surrogate pair without the other half. (The
/// syntax check takes escapes as 4 hex digits, pairs or not.) Backslashes
/// only occur in strings there, each starting an escape.
fn jsonb_refuses_escape(json: &str) -> bool {
    let bytes = json.as_bytes();
    let hex = |at: usize| {
        let digits = bytes.get(at..at + 4)?;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        match hex(i + 2) {
            Some(0) | None => return true,
            Some(0xD800..=0xDBFF) => {
                let low = (bytes.get(i + 6..i + 8) == Some(b"\\u")).then(|| hex(i + 8));
                if !matches!(low, Some(Some(0xDC00..=0xDFFF))) {
                    return true;
                }
                i += 12;
            }
            Some(0xDC00..=0xDFFF) => return true,
            Some(_) => i += 6,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(payload: &str, fields: &[&[&str]]) -> Vec<Option<f64>> {
        let fields: Vec<Vec<String>> = fields
            .iter()
            .map(|f| f.iter().map(|t| t.to_string()).collect())
            .collect();
        let mut out = vec![Some(-1.0); fields.len()];
        numbers_at(payload.as_bytes(), &fields, &mut out);
        out
    }

    #[test]
    fn numbers_at_pointers() {
        let doc = r#" {"t": 21.5, "n": {"v": [1, 2e3]}, "s": "3", "b": true, "z": null, "t": 22} "#;
        assert_eq!(
            at(
                doc,
                &[
                    &["t"],
                    &["n", "v", "1"],
                    &["s"],
                    &["b"],
                    &["z"],
                    &["n"],
                    &["x"]
                ]
            ),
            [Some(22.0), Some(2000.0), None, None, None, None, None]
        );
        assert_eq!(at("42", &[&[]]), [Some(42.0)], "a bare number");
        assert_eq!(
            at("[5, 6]", &[&["1"], &["01"], &["-"], &["2"]]),
            [Some(6.0), None, None, None]
        );
        assert_eq!(
            at(r#"{"a/b": 1, "": 2}"#, &[&["a/b"], &[""]]),
            [Some(1.0), Some(2.0)]
        );
    }

    #[test]
    fn a_number_no_float_holds_spoils_only_itself() {
        let doc = r#"{"t": 1e400, "u": 1e-400, "v": 0.0e-999, "w": -0, "h": 3, "tiny": 5e-324}"#;
        assert_eq!(
            at(doc, &[&["t"], &["u"], &["v"], &["w"], &["h"], &["tiny"]]),
            [None, None, Some(0.0), Some(-0.0), Some(3.0), Some(5e-324)]
        );
    }

    #[test]
    fn what_is_not_json_counts_for_nothing() {
        for payload in [
            "not json",
            r#"{"t": 1,"#,
            r#"{"t": 1, "k": "\u0000"}"#,
            r#"{"t": 1, "\u0000": 2}"#,
            r#"{"t": 1, "k": "\ud800"}"#,
            r#"{"t": 1, "k": "\udc00\ud800"}"#,
            r#"{"t": 1, "k": "\ud800x"}"#,
            &format!("{}1{}", "[".repeat(200), "]".repeat(200)),
        ] {
            assert_eq!(at(payload, &[&["t"], &[]]), [None, None], "{payload}");
        }
        // An escaped backslash before "u0000" is no NUL; a pair is fine.
        assert_eq!(at(r#"{"t": 1, "k": "\\u0000"}"#, &[&["t"]]), [Some(1.0)]);
        assert_eq!(
            at(r#"{"t": 1, "k": "\ud83d\ude00\u00e9"}"#, &[&["t"]]),
            [Some(1.0)]
        );
    }
}
