//! A device's state as data: [`DeviceState`], JSON merge patches (RFC 7386)
//! applied to either side, the checks a patch must pass, and the delta with
//! its order rule. Pure: no I/O, no clock (the caller passes the time), no
//! locks; the storages (`memory.rs`, the store's) call it under theirs.
//!
//! # The order rule (the proto's `DeviceState` says it to clients)
//! Each side keeps, per top-level key, when a patch last set it. A desired
//! key is *met* once reported equals it (recursively: [`difference`] is
//! empty) at or after the time desired set it; a met key stays out of the
//! delta until desired sets it again, so a newer change made at the device
//! is never overridden by an older desired value (eclipse-ditto#696). A key
//! not yet met stays in the delta while reported differs.

use std::{collections::BTreeMap, time::SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::json;

/// The largest patch, and the largest side (desired or reported), encoded
/// as JSON.
pub const MAX_DOCUMENT_BYTES: usize = 64 << 10;

/// The deepest a patch may nest (objects and arrays).
pub const MAX_DEPTH: usize = 32;

/// A JSON object: one side of a state, or a patch.
pub type Object = Map<String, Value>;

/// What is kept of a top-level desired key besides its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredKey {
    /// When a patch last set it, in microseconds since the Unix epoch.
    pub set: i64,
    /// Whether reported has equalled it since.
    pub met: bool,
}

/// A device's desired and reported state.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    pub device_id: String,
    pub desired: Object,
    pub reported: Object,
    /// Per top-level desired key: when it was set, and whether it is met.
    pub desired_keys: BTreeMap<String, DesiredKey>,
    /// Per top-level reported key: when a patch last set it (microseconds
    /// since the Unix epoch).
    pub reported_keys: BTreeMap<String, i64>,
    /// Increases on every change of either side; 0 before the first.
    pub version: i64,
    pub desired_update_time: Option<SystemTime>,
    pub reported_update_time: Option<SystemTime>,
}

/// Which side a patch changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Desired,
    Reported,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Self::Desired => "desired",
            Self::Reported => "reported",
        }
    }
}

/// Why a patch was refused. The text is for the client (or the log, for a
/// device's patch), prefixed by the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("is not a JSON object")]
    NotAnObject,
    #[error("is {0} bytes encoded as JSON; the limit is {MAX_DOCUMENT_BYTES}")]
    TooLarge(usize),
    #[error("nests {0} deep; the limit is {MAX_DEPTH}")]
    TooDeep(usize),
    #[error("would make {side} {bytes} bytes encoded as JSON; the limit is {MAX_DOCUMENT_BYTES}", side = .0.name(), bytes = .1)]
    ResultTooLarge(Side, usize),
}

impl PatchError {
    /// The `reason` label of `devicehub_reported_state_dropped_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAnObject => "not_an_object",
            Self::TooLarge(_) | Self::ResultTooLarge(..) => "too_large",
            Self::TooDeep(_) => "too_deep",
        }
    }
}

/// Checks a patch's size and depth.
pub fn check_patch(patch: &Object) -> Result<(), PatchError> {
    let bytes = json::encoded_len(patch);
    if bytes > MAX_DOCUMENT_BYTES {
        return Err(PatchError::TooLarge(bytes));
    }
    let depth = 1 + patch.values().map(json::depth).max().unwrap_or(0);
    if depth > MAX_DEPTH {
        return Err(PatchError::TooDeep(depth));
    }
    Ok(())
}

/// Parses what a device published on its reported state topic, checked
/// ([`check_patch`]) before anything is applied.
pub fn parse_patch(payload: &[u8]) -> Result<Object, PatchError> {
    if payload.len() > MAX_DOCUMENT_BYTES {
        return Err(PatchError::TooLarge(payload.len()));
    }
    // serde_json refuses nesting past 128 by itself, before any of it is
    // built; what is parsed is then at most 64 KiB.
    match serde_json::from_slice(payload) {
        Ok(Value::Object(patch)) => {
            check_patch(&patch)?;
            Ok(patch)
        }
        Ok(_) => Err(PatchError::NotAnObject),
        Err(error) if error.to_string().contains("recursion limit") => {
            Err(PatchError::TooDeep(MAX_DEPTH + 1))
        }
        Err(_) => Err(PatchError::NotAnObject),
    }
}

impl DeviceState {
    /// A device's state before anything was desired or reported.
    pub fn new(device_id: &str) -> Self {
        Self {
            device_id: device_id.to_owned(),
            desired: Object::new(),
            reported: Object::new(),
            desired_keys: BTreeMap::new(),
            reported_keys: BTreeMap::new(),
            version: 0,
            desired_update_time: None,
            reported_update_time: None,
        }
    }

    /// `current` (or, when there is none, a new state of `device_id`) with
    /// `patch` applied ([`DeviceState::apply`]): what both storages keep.
    pub fn patched(
        current: Option<&DeviceState>,
        device_id: &str,
        side: Side,
        patch: &Object,
        now: SystemTime,
        version: i64,
    ) -> Result<DeviceState, PatchError> {
        let mut state = current
            .cloned()
            .unwrap_or_else(|| DeviceState::new(device_id));
        state.apply(side, patch, now, version)?;
        Ok(state)
    }

    /// Applies `patch` (checked: [`check_patch`]) to `side` at `now`, whole
    /// or not at all, and gives the state `version`.
    pub fn apply(
        &mut self,
        side: Side,
        patch: &Object,
        now: SystemTime,
        version: i64,
    ) -> Result<(), PatchError> {
        // Kept to the microsecond, as the store keeps times: a state reads
        // back the same from memory, the store and every replica.
        let now = from_micros(micros(now));
        let at = micros(now);
        let newer;
        let (target, patch) = match side {
            Side::Desired => (&self.desired, patch),
            Side::Reported => {
                newer = self.newer_than_reported(patch, at);
                (&self.reported, &newer)
            }
        };
        let mut merged = target.clone();
        merge(&mut merged, patch);
        let bytes = json::encoded_len(&merged);
        if bytes > MAX_DOCUMENT_BYTES {
            return Err(PatchError::ResultTooLarge(side, bytes));
        }
        match side {
            Side::Desired => {
                self.desired = merged;
                self.desired_update_time = Some(now);
                for key in patch.keys() {
                    match self.desired.get(key) {
                        None => self.desired_keys.remove(key),
                        Some(wanted) => {
                            let met = difference(wanted, self.reported.get(key)).is_none();
                            self.desired_keys
                                .insert(key.clone(), DesiredKey { set: at, met })
                        }
                    };
                }
            }
            Side::Reported => {
                self.reported = merged;
                self.reported_update_time = self.reported_update_time.max(Some(now));
                for key in patch.keys() {
                    match self.reported.contains_key(key) {
                        false => self.reported_keys.remove(key),
                        true => self.reported_keys.insert(key.clone(), at),
                    };
                    let Some(wanted) = self.desired.get(key) else {
                        continue;
                    };
                    if difference(wanted, self.reported.get(key)).is_none() {
                        if let Some(desired) = self.desired_keys.get_mut(key) {
                            desired.met = true;
                        }
                    }
                }
            }
        }
        self.version = version;
        Ok(())
    }

    /// The keys of a reported `patch` received `at` that no patch received
    /// later has set: with replicas, a device's patches may be applied out
    /// of the order they arrived in (two instances of a share group each
    /// take one), and an older one must not undo a newer one. (A key a
    /// newer patch deleted is not remembered: an older patch setting it
    /// again sets it.)
    fn newer_than_reported(&self, patch: &Object, at: i64) -> Object {
        patch
            .iter()
            .filter(|(key, _)| self.reported_keys.get(*key).is_none_or(|set| *set <= at))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// What desired still asks for: the top-level desired keys not met,
    /// each with its [`difference`] from reported.
    pub fn delta(&self) -> Object {
        self.desired
            .iter()
            .filter(|(key, _)| !self.desired_keys.get(*key).is_some_and(|k| k.met))
            .filter_map(|(key, wanted)| {
                difference(wanted, self.reported.get(key)).map(|d| (key.clone(), d))
            })
            .collect()
    }

    /// The document published, retained, on the device's desired state
    /// topic: `{"version": N, "desired": {...}, "delta": {...}}`.
    pub fn desired_document(&self) -> Vec<u8> {
        let document = serde_json::json!({
            "version": self.version,
            "desired": self.desired,
            "delta": self.delta(),
        });
        // A `Value` always encodes.
        serde_json::to_vec(&document).unwrap_or_default()
    }

    /// Bytes this state holds in memory, estimated from its JSON (what the
    /// memory storage's budget counts).
    pub fn heap_bytes(&self) -> usize {
        const RECORD: usize = std::mem::size_of::<DeviceState>() + 64;
        let keys = |names: &mut dyn Iterator<Item = &String>| {
            names.map(|k| k.len() + KEY_ENTRY).sum::<usize>()
        };
        RECORD
            + self.device_id.len()
            + object_heap_bytes(&self.desired)
            + object_heap_bytes(&self.reported)
            + keys(&mut self.desired_keys.keys())
            + keys(&mut self.reported_keys.keys())
    }
}

/// Per map entry: its key's `String` and the value, plus the map's node
/// overhead (serde_json's maps and ours are B-trees).
const KEY_ENTRY: usize = 24 + 32 + 16;

/// An estimate of what `object` takes on the heap.
fn object_heap_bytes(object: &Object) -> usize {
    object
        .iter()
        .map(|(k, v)| k.len() + KEY_ENTRY + value_heap_bytes(v))
        .sum()
}

fn value_heap_bytes(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(|v| 32 + value_heap_bytes(v)).sum(),
        Value::Object(map) => object_heap_bytes(map),
        _ => 0,
    }
}

/// RFC 7386 section 2: applies merge `patch` to `target`.
pub fn merge(target: &mut Object, patch: &Object) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Object::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Object::new());
                }
                if let Value::Object(existing) = slot {
                    merge(existing, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// What of `wanted` `actual` lacks: `None` when nothing. For two objects,
/// the keys of `wanted` that differ, each by its own difference; a key
/// missing from `actual` whole; anything else (arrays too) compared whole,
/// numbers by value.
pub fn difference(wanted: &Value, actual: Option<&Value>) -> Option<Value> {
    match (wanted, actual) {
        (_, None) => Some(wanted.clone()),
        (Value::Object(wanted), Some(Value::Object(actual))) => {
            let differing: Object = wanted
                .iter()
                .filter_map(|(k, v)| difference(v, actual.get(k)).map(|d| (k.clone(), d)))
                .collect();
            (!differing.is_empty()).then_some(Value::Object(differing))
        }
        (wanted, Some(actual)) => (!json::same(wanted, actual)).then(|| wanted.clone()),
    }
}

/// The time `micros` microseconds after the Unix epoch.
pub fn from_micros(micros: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(micros.max(0) as u64)
}

/// `time` in microseconds since the Unix epoch (0 before it).
pub fn micros(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Object {
        match value {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        // RFC 7386 appendix A, the cases with an object on both sides.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!({"a": "foo"}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut merged = object(target);
            merge(&mut merged, &object(patch.clone()));
            assert_eq!(Value::Object(merged), expected, "patch {patch}");
        }
    }

    #[test]
    fn the_delta_is_what_reported_lacks() {
        let mut state = DeviceState::new("d");
        let desired = json!({"fan": 3, "config": {"mode": "eco", "level": 2}, "list": [1, 2]});
        state
            .apply(Side::Desired, &object(desired), at(1), 1)
            .unwrap();
        let reported =
            json!({"fan": 3.0, "config": {"mode": "eco", "level": 1, "extra": true}, "list": [1]});
        state
            .apply(Side::Reported, &object(reported), at(2), 2)
            .unwrap();
        assert_eq!(
            Value::Object(state.delta()),
            json!({"config": {"level": 2}, "list": [1, 2]})
        );
        state
            .apply(
                Side::Reported,
                &object(json!({"config": {"level": 2}, "list": [1, 2]})),
                at(3),
                3,
            )
            .unwrap();
        assert!(state.delta().is_empty());
        assert_eq!(state.version, 3);
        assert_eq!(state.reported_update_time, Some(at(3)));
        assert_eq!(state.reported_keys.get("config"), Some(&micros(at(3))));
    }

    #[test]
    fn a_met_key_does_not_resurrect_when_the_device_changes_it_later() {
        let mut state = DeviceState::new("d");
        state
            .apply(
                Side::Desired,
                &object(json!({"fan": 3, "mode": "eco"})),
                at(1),
                1,
            )
            .unwrap();
        // The device reports an older value first: the key stays asked for.
        state
            .apply(Side::Reported, &object(json!({"fan": 1})), at(2), 2)
            .unwrap();
        assert_eq!(
            Value::Object(state.delta()),
            json!({"fan": 3, "mode": "eco"})
        );
        // It reaches the desired value, then someone turns the knob at the device.
        state
            .apply(Side::Reported, &object(json!({"fan": 3})), at(3), 3)
            .unwrap();
        state
            .apply(Side::Reported, &object(json!({"fan": 5})), at(4), 4)
            .unwrap();
        assert_eq!(Value::Object(state.delta()), json!({"mode": "eco"}));
        // Desiring it again asks again.
        state
            .apply(Side::Desired, &object(json!({"fan": 3})), at(5), 5)
            .unwrap();
        assert_eq!(
            Value::Object(state.delta()),
            json!({"fan": 3, "mode": "eco"})
        );
        // Desired equal to reported when set is met at once.
        state
            .apply(Side::Desired, &object(json!({"fan": 5})), at(6), 6)
            .unwrap();
        assert_eq!(Value::Object(state.delta()), json!({"mode": "eco"}));
        // Deleting a desired key forgets it.
        state
            .apply(Side::Desired, &object(json!({"mode": null})), at(7), 7)
            .unwrap();
        assert!(state.delta().is_empty());
        assert!(!state.desired_keys.contains_key("mode"));
    }

    #[test]
    fn an_older_reported_patch_applied_late_does_not_undo_a_newer_one() {
        let mut state = DeviceState::new("d");
        state
            .apply(
                Side::Reported,
                &object(json!({"speed": 10, "mode": "a"})),
                at(5),
                1,
            )
            .unwrap();
        state
            .apply(
                Side::Reported,
                &object(json!({"speed": 9, "fan": true})),
                at(4),
                2,
            )
            .unwrap();
        assert_eq!(
            Value::Object(state.reported.clone()),
            json!({"speed": 10, "mode": "a", "fan": true})
        );
        assert_eq!(state.reported_update_time, Some(at(5)));
        assert_eq!(state.version, 2);
    }

    #[test]
    fn patches_over_the_limits_are_refused_whole() {
        assert_eq!(parse_patch(b"[1]"), Err(PatchError::NotAnObject));
        assert_eq!(parse_patch(b"{\"a\":"), Err(PatchError::NotAnObject));
        assert_eq!(parse_patch(b"3"), Err(PatchError::NotAnObject));
        let deep = format!("{}1{}", "{\"a\":".repeat(32), "}".repeat(32));
        assert!(parse_patch(deep.as_bytes()).is_ok());
        let deeper = format!("{}1{}", "{\"a\":".repeat(33), "}".repeat(33));
        assert_eq!(parse_patch(deeper.as_bytes()), Err(PatchError::TooDeep(33)));
        let deepest = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let deepest = format!("{{\"a\":{deepest}}}");
        assert!(matches!(
            parse_patch(deepest.as_bytes()),
            Err(PatchError::TooDeep(_))
        ));
        let large = format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_DOCUMENT_BYTES));
        assert!(matches!(
            parse_patch(large.as_bytes()),
            Err(PatchError::TooLarge(_))
        ));

        // A patch that fits, onto a side it would make too large.
        let mut state = DeviceState::new("d");
        let half = |key: &str| object(json!({ key: "x".repeat(MAX_DOCUMENT_BYTES / 2) }));
        state.apply(Side::Reported, &half("a"), at(1), 1).unwrap();
        let before = state.clone();
        let refused = state.apply(Side::Reported, &half("b"), at(2), 2);
        assert!(matches!(
            refused,
            Err(PatchError::ResultTooLarge(Side::Reported, _))
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn the_desired_document_carries_version_desired_and_delta() {
        let mut state = DeviceState::new("d");
        state
            .apply(
                Side::Desired,
                &object(json!({"interval_ms": 500})),
                at(1),
                42,
            )
            .unwrap();
        let document: Value = serde_json::from_slice(&state.desired_document()).unwrap();
        assert_eq!(
            document,
            json!({"version": 42, "desired": {"interval_ms": 500}, "delta": {"interval_ms": 500}})
        );
    }
}
