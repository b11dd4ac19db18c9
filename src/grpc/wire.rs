//! Readings written straight to protobuf wire format, and [`Encoded`]: a
//! message handed to tonic as bytes.
//!
//! Every reading listed or watched goes through here, so it skips the
//! generated structs: building a `proto::Reading` meant owned strings and a
//! `google.protobuf.Value` tree (a `BTreeMap` and a `String` per JSON key, a
//! box per value), then a second walk to size and encode it. Here the JSON
//! payload is transcoded from the parser into `Value` wire format directly.
//! The bytes decode to exactly the message `reading_to_proto` used to build
//! (the tests check that against prost); only the order of a JSON object's
//! keys may differ, which protobuf maps do not define.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes};
use prost::{
    encoding::{encode_key, encode_varint, encoded_len_varint, DecodeContext, WireType},
    DecodeError, Message,
};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use std::time::SystemTime;

use crate::{
    buffer::{ConnectionStatus, DeviceInfo, Reading},
    proto::DeviceStatus,
};

/// A message of type `M`, already encoded. The server is generated with these
/// in place of the responses it builds from readings (see build.rs); clients
/// see the same bytes as if `M` had been encoded.
pub struct Encoded<M> {
    bytes: Bytes,
    message: PhantomData<fn() -> M>,
}

impl<M: Message> Encoded<M> {
    pub fn new(message: &M) -> Self {
        Self::from_bytes(message.encode_to_vec().into())
    }
}

impl<M> Encoded<M> {
    /// `bytes` must be an encoded `M`.
    pub(super) fn from_bytes(bytes: Bytes) -> Self {
        Self {
            bytes,
            message: PhantomData,
        }
    }
}

// By hand: derives would require `M` itself to be Clone, Default...
impl<M> Clone for Encoded<M> {
    fn clone(&self) -> Self {
        Self::from_bytes(self.bytes.clone())
    }
}

impl<M> Default for Encoded<M> {
    fn default() -> Self {
        Self::from_bytes(Bytes::new())
    }
}

impl<M> PartialEq for Encoded<M> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<M> std::fmt::Debug for Encoded<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encoded({} bytes)", self.bytes.len())
    }
}

/// Encoding writes the stored bytes. Decoding (which the server never does)
/// goes through `M`.
impl<M: Message + Default> Message for Encoded<M> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let mut message = M::decode(self.bytes.clone())?;
        message.merge_field(tag, wire_type, buf, ctx)?;
        *self = Self::new(&message);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn clear(&mut self) {
        self.bytes = Bytes::new();
    }
}

/// Appends `reading` as field `field` (a `devicehub.v1.Reading`) of the
/// message being written to `out`. (The service writes a reading's
/// message once, [`reading_message`], and puts it as a field wherever it
/// goes: `encoded.rs`.)
#[cfg(test)]
pub fn put_reading_field(field: u32, reading: &Reading, out: &mut Vec<u8>) {
    let start = out.len();
    put_reading(reading, out);
    wrap(out, start, field);
}

/// A `devicehub.v1.Reading`: what `encoded.rs` keeps, and writes as a field
/// of the messages that carry it with [`put_bytes`].
pub fn reading_message(reading: &Reading) -> Vec<u8> {
    // JSON payloads grow as `Value`s: room for most at once.
    let mut out = Vec::with_capacity(2 * reading.payload.len() + 64);
    put_reading(reading, &mut out);
    out
}

/// A `devicehub.v1.Reading` with only its number, device and time: the last
/// reading of a device in ListDevices' DEVICE_VIEW_BASIC.
pub fn basic_reading_message(seq: u64, device_id: &str, received_at: SystemTime) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + device_id.len());
    put_varint(READING_SEQ, seq, &mut out);
    put_str(READING_DEVICE_ID, device_id, &mut out);
    put_time(READING_RECEIVED_AT, received_at, &mut out);
    out
}

// devicehub.v1.Reading's fields (see the proto).
const READING_SEQ: u32 = 1;
const READING_DEVICE_ID: u32 = 2;
const READING_TOPIC: u32 = 3;
const READING_RECEIVED_AT: u32 = 4;
const READING_PAYLOAD: u32 = 5;
const READING_JSON: u32 = 6;
const READING_QOS: u32 = 7;
const READING_RETAINED: u32 = 8;
// google.protobuf.Timestamp's fields.
const TIMESTAMP_SECONDS: u32 = 1;
const TIMESTAMP_NANOS: u32 = 2;
/// `devicehub.v1.ListReadingsResponse.next_page_token`.
pub const LIST_NEXT_PAGE_TOKEN: u32 = 2;

/// Appends a `devicehub.v1.Reading`. Like prost, fields holding their
/// default value are left out.
fn put_reading(reading: &Reading, out: &mut Vec<u8>) {
    let start_of_reading = out.len();
    put_varint(READING_SEQ, reading.seq, out);
    put_str(READING_DEVICE_ID, reading.device_id(), out);
    put_str(READING_TOPIC, reading.topic(), out);
    // Always present, even at the epoch.
    put_time(READING_RECEIVED_AT, reading.received_at, out);
    if !reading.payload.is_empty() {
        put_bytes(READING_PAYLOAD, &reading.payload, out);
    }
    // Present when the payload is JSON, unless that would make the message
    // too large for clients (JSON text can grow several times as `Value`).
    let json = out.len();
    if put_json_value(&reading.payload, out) {
        wrap(out, json, READING_JSON);
        if out.len() - start_of_reading > MAX_ENCODED_READING_BYTES {
            out.truncate(json);
        }
    }
    put_varint(READING_QOS, u64::from(reading.qos), out);
    put_varint(READING_RETAINED, u64::from(reading.retained), out);
}

/// Appends field `field` as a `google.protobuf.Timestamp` (present even at
/// the epoch).
fn put_time(field: u32, time: SystemTime, out: &mut Vec<u8>) {
    let time = prost_types::Timestamp::from(time);
    put_timestamp(field, time.seconds as u64, time.nanos as u64, out);
}

/// [`put_time`] of a time in microseconds since the epoch, without going
/// through `SystemTime` (three per device in a page).
fn put_micros(field: u32, micros: u64, out: &mut Vec<u8>) {
    put_timestamp(field, micros / 1_000_000, micros % 1_000_000 * 1_000, out);
}

fn put_timestamp(field: u32, seconds: u64, nanos: u64, out: &mut Vec<u8>) {
    // Its length is known up front: no `wrap`.
    let len = |field_value: u64| match field_value {
        0 => 0,
        v => 1 + encoded_len_varint(v),
    };
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint((len(seconds) + len(nanos)) as u64, out);
    put_varint(TIMESTAMP_SECONDS, seconds, out);
    put_varint(TIMESTAMP_NANOS, nanos, out);
}

// devicehub.v1.Device's fields (see the proto).
const DEVICE_ID: u32 = 1;
const DEVICE_LAST_READING: u32 = 2;
const DEVICE_FIRST_SEEN: u32 = 3;
const DEVICE_LAST_SEEN: u32 = 4;
const DEVICE_READINGS_BUFFERED: u32 = 5;
const DEVICE_STATUS: u32 = 6;
const DEVICE_STATUS_CHANGED_AT: u32 = 7;
/// `ListDevicesResponse.devices`, `.next_page_token`; `GetDeviceResponse.device`.
pub const LIST_DEVICES_DEVICES: u32 = 1;
pub const LIST_DEVICES_NEXT_PAGE_TOKEN: u32 = 2;
pub const GET_DEVICE_DEVICE: u32 = 1;

/// Appends a device as field `field` (a `devicehub.v1.Device`): `info`,
/// and its `last_reading` as [`reading_message`] made it.
pub fn put_device_field(
    field: u32,
    info: &DeviceInfo,
    last_reading: Option<&[u8]>,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    put_str(DEVICE_ID, &info.device_id, out);
    if let Some(reading) = last_reading {
        put_bytes(DEVICE_LAST_READING, reading, out);
    }
    put_micros(DEVICE_FIRST_SEEN, info.first_seen_micros, out);
    put_micros(DEVICE_LAST_SEEN, info.last_seen_micros, out);
    put_varint(DEVICE_READINGS_BUFFERED, info.buffered, out);
    put_varint(DEVICE_STATUS, device_status(info.status) as u64, out);
    if info.status_changed_micros != 0 {
        put_micros(DEVICE_STATUS_CHANGED_AT, info.status_changed_micros, out);
    }
    wrap(out, start, field);
}

/// The proto enum of a connection status.
pub fn device_status(status: ConnectionStatus) -> DeviceStatus {
    match status {
        ConnectionStatus::Unknown => DeviceStatus::Unknown,
        ConnectionStatus::Online => DeviceStatus::Online,
        ConnectionStatus::Offline => DeviceStatus::Offline,
    }
}

/// Appends field `field` as a varint, unless it is 0.
fn put_varint(field: u32, value: u64, out: &mut Vec<u8>) {
    if value != 0 {
        encode_key(field, WireType::Varint, out);
        encode_varint(value, out);
    }
}

/// Appends field `field` as a string, unless it is empty.
pub fn put_str(field: u32, text: &str, out: &mut Vec<u8>) {
    if !text.is_empty() {
        put_bytes(field, text.as_bytes(), out);
    }
}

/// Appends field `field` as bytes, or as an embedded message already
/// encoded (present even when empty).
pub fn put_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Turns `out[start..]`, an encoded message, into field `field` of the
/// enclosing message: inserts its key and length in front of it.
fn wrap(out: &mut Vec<u8>, start: usize, field: u32) {
    let len = out.len() - start;
    let mut prefix = [0u8; 15]; // a key (≤ 5 bytes) and a length (≤ 10)
    let mut head = &mut prefix[..];
    encode_key(field, WireType::LengthDelimited, &mut head);
    encode_varint(len as u64, &mut head);
    let prefix_len = 15 - head.len();
    let prefix = &prefix[..prefix_len];
    // Make room in front (a memmove of the body, which is small), then fill it.
    out.extend_from_slice(prefix);
    out.copy_within(start..start + len, start + prefix.len());
    out[start..start + prefix.len()].copy_from_slice(prefix);
}

/// How many arrays and objects deep a JSON payload may nest and still be
/// decoded into `Reading.json`. Each level costs two protobuf message levels
/// (array: ListValue, Value) or three (object: Struct, map entry, Value), on
/// top of the three around it (response, Reading, Value): 32 object levels
/// are 99 message levels, inside the 100 that Python's protobuf (and other
/// clients' defaults) will decode. Deeper payloads are kept raw only.
pub const MAX_JSON_DEPTH: usize = 32;

/// The largest encoded reading (one `WatchReadingsResponse`, or one entry
/// of a page): what stays under gRPC clients' default 4 MiB message limit
/// with room for the message's own framing and a page token. A reading
/// whose JSON transcoding would go beyond is sent with `json` unset.
pub const MAX_ENCODED_READING_BYTES: usize = (4 << 20) - (1 << 10);

/// Appends `payload` as a `google.protobuf.Value` message body if it is JSON
/// nested at most [`MAX_JSON_DEPTH`] deep, and returns whether it was.
/// serde_json also refuses numbers out of `f64` range, so hostile payloads
/// end up raw-only instead of exhausting the stack or a client's limits.
pub fn put_json_value(payload: &[u8], out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let mut parser = serde_json::Deserializer::from_slice(payload);
    let parsed = ValueSeed { out, depth: 0 }
        .deserialize(&mut parser)
        .and_then(|()| parser.end());
    if parsed.is_err() {
        out.truncate(start);
    }
    parsed.is_ok()
}

// google.protobuf.Value's fields (a oneof: always written, even when zero).
const NULL_VALUE: u32 = 1;
const NUMBER_VALUE: u32 = 2;
const STRING_VALUE: u32 = 3;
const BOOL_VALUE: u32 = 4;
const STRUCT_VALUE: u32 = 5;
const LIST_VALUE: u32 = 6;
// Struct.fields (map<string, Value>) and ListValue.values.
const STRUCT_FIELDS: u32 = 1;
const LIST_VALUES: u32 = 1;
// A map entry's key and value.
const ENTRY_KEY: u32 = 1;
const ENTRY_VALUE: u32 = 2;

/// Writes the JSON value being parsed as a `Value` message body.
struct ValueSeed<'o> {
    out: &'o mut Vec<u8>,
    /// Arrays and objects this value is inside.
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'o> ValueSeed<'o> {
    fn number(self, n: f64) {
        encode_key(NUMBER_VALUE, WireType::SixtyFourBit, self.out);
        self.out.put_f64_le(n);
    }

    /// The seed for a value one array or object further in; an error past
    /// [`MAX_JSON_DEPTH`].
    fn nested<E: serde::de::Error>(depth: usize, out: &mut Vec<u8>) -> Result<ValueSeed<'_>, E> {
        if depth >= MAX_JSON_DEPTH {
            return Err(E::custom("nested deeper than clients decode"));
        }
        Ok(ValueSeed {
            out,
            depth: depth + 1,
        })
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        encode_key(NULL_VALUE, WireType::Varint, self.out);
        encode_varint(0, self.out);
        Ok(())
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        encode_key(BOOL_VALUE, WireType::Varint, self.out);
        encode_varint(u64::from(b), self.out);
        Ok(())
    }

    // protobuf's Value holds numbers as f64, like JSON in JavaScript.
    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        self.number(n as f64);
        Ok(())
    }

    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        self.number(n as f64);
        Ok(())
    }

    fn visit_f64<E>(self, n: f64) -> Result<(), E> {
        self.number(n);
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        // Written even when empty: a oneof member is always present.
        put_bytes(STRING_VALUE, s.as_bytes(), self.out);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (out, depth) = (self.out, self.depth);
        let list = out.len();
        loop {
            let item = out.len();
            if seq
                .next_element_seed(Self::nested(depth, &mut *out)?)?
                .is_none()
            {
                break;
            }
            wrap(out, item, LIST_VALUES);
        }
        wrap(out, list, LIST_VALUE);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (out, depth) = (self.out, self.depth);
        let object = out.len();
        loop {
            let entry = out.len();
            if map.next_key_seed(KeySeed(&mut *out))?.is_none() {
                break;
            }
            let value = out.len();
            map.next_value_seed(Self::nested(depth, &mut *out)?)?;
            wrap(out, value, ENTRY_VALUE);
            wrap(out, entry, STRUCT_FIELDS);
        }
        wrap(out, object, STRUCT_VALUE);
        Ok(())
    }
}

/// Writes an object key as a map entry's key field (left out when empty,
/// as prost does).
struct KeySeed<'o>(&'o mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<(), E> {
        put_str(ENTRY_KEY, key, self.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        buffer::{ListQuery, NewReading, ReadingBuffer},
        config::BufferLimits,
        grpc::encoded,
        proto::{
            self, watch_readings_response::Event, ListReadingsResponse, WatchReadingsResponse,
        },
        test_rng::Rng,
    };
    use prost_types::{value::Kind, Value};
    use std::time::{Duration, SystemTime};

    /// What the service used to build with prost: the oracle.
    fn expected(reading: &Reading) -> proto::Reading {
        proto::Reading {
            seq: reading.seq,
            device_id: reading.device_id().to_owned(),
            topic: reading.topic().to_owned(),
            received_at: Some(reading.received_at.into()),
            payload: reading.payload.clone(),
            json: serde_json::from_slice::<serde_json::Value>(&reading.payload)
                .ok()
                .map(crate::grpc::convert::json_to_value),
            qos: u32::from(reading.qos),
            retained: reading.retained,
        }
    }

    fn json_of(payload: &[u8]) -> Option<Value> {
        let mut out = Vec::new();
        put_json_value(payload, &mut out).then(|| Value::decode(&out[..]).unwrap())
    }

    const PAYLOADS: &[&[u8]] = &[
        br#"{"hum":40.5,"n":7,"t":21.5}"#,
        br#"{"t": 21.5, "n": -3, "big": 18446744073709551615, "s": "x\u00e9", "z": null}"#,
        br#"[true, false, [], {}, [1, [2, [3]]], "a", "", 0, -0.0]"#,
        br#"{"dup": 1, "dup": 2}"#,
        br#"{"": "empty key", "e": ""}"#,
        br#"{"nested": {"a": [{"b": {"c": 1e300}}]}}"#,
        b"0",
        b" \"just a string\" ",
        b"",
        b"\xff\xfe",
        b"not json",
        b"1e999",
        b"{\"a\":",
        b"{} trailing",
    ];

    #[test]
    fn readings_decode_to_what_prost_would_have_encoded() {
        let mut buffer = ReadingBuffer::new(
            BufferLimits {
                max_readings: 100,
                max_bytes: 1 << 20,
            },
            1,
        );
        for (i, payload) in PAYLOADS.iter().enumerate() {
            let (device, topic) = if i % 3 == 0 {
                ("", "elsewhere/x")
            } else {
                ("dev-1", "devices/dev-1/readings")
            };
            buffer.push(NewReading {
                kind: crate::buffer::MessageKind::Reading,
                device_id: device,
                topic,
                payload,
                qos: (i % 3) as u8,
                retained: i % 2 == 0,
                received_at: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000 + i as u64, 0),
            });
        }
        let readings = buffer
            .list(&ListQuery {
                limit: 100,
                oldest_first: true,
                ..Default::default()
            })
            .unwrap()
            .readings;
        assert_eq!(readings.len(), PAYLOADS.len());

        let mut list = Vec::new();
        for reading in &readings {
            let mut watch = Vec::new();
            put_reading_field(1, reading, &mut watch);
            let decoded = WatchReadingsResponse::decode(&watch[..]).unwrap();
            let want = expected(reading);
            assert_eq!(
                decoded.event,
                Some(Event::Reading(want.clone())),
                "{:?}",
                reading.payload
            );
            // Objects with sorted, distinct keys come out byte for byte.
            if reading.payload.starts_with(br#"{"hum""#) || !reading.payload.starts_with(b"{") {
                let prost = WatchReadingsResponse {
                    event: Some(Event::Reading(want)),
                };
                assert_eq!(watch, prost.encode_to_vec(), "{:?}", reading.payload);
            }
            list.extend_from_slice(&watch);
        }
        // The same bytes, one after another, are a ListReadingsResponse.
        let page = ListReadingsResponse::decode(&list[..]).unwrap();
        let want: Vec<proto::Reading> = readings.iter().map(expected).collect();
        assert_eq!(page.readings, want);
    }

    #[test]
    fn devices_encode_as_prost_would() {
        use crate::buffer::{DeviceEntry, DeviceInfo, LastReading};
        use crate::grpc::encoded::EncodedReadings;
        let cache = EncodedReadings::default();
        let reading = Reading::new(
            7,
            "dev-1",
            "devices/dev-1/readings",
            SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            bytes::Bytes::from_static(br#"{"t":21.5}"#),
            1,
            false,
        );
        let time = |micros| {
            Some(prost_types::Timestamp::from(
                SystemTime::UNIX_EPOCH + Duration::from_micros(micros),
            ))
        };
        for (first, last, buffered, status, changed, newest) in [
            (0, 0, 0, ConnectionStatus::Unknown, 0, None),
            (
                1_000_000,
                1_000_001,
                3,
                ConnectionStatus::Online,
                999_999,
                Some(&reading),
            ),
            (
                1_700_000_000_123_456,
                u64::MAX / 2,
                u64::MAX,
                ConnectionStatus::Offline,
                1,
                None,
            ),
        ] {
            let info = DeviceInfo {
                device_id: "dev-1".into(),
                first_seen_micros: first,
                last_seen_micros: last,
                buffered,
                status,
                status_changed_micros: changed,
            };
            let message = newest.map(reading_message);
            let mut out = Vec::new();
            put_device_field(GET_DEVICE_DEVICE, &info, message.as_deref(), &mut out);
            // Through the cache: encoded (and kept) the first time, found
            // the second.
            for _ in 0..2 {
                let last_reading = newest.map(|r| match cache.find(r.seq, r.received_at) {
                    Some(kept) => LastReading::Found(kept),
                    None => LastReading::Copied(r.clone()),
                });
                let device = DeviceEntry {
                    info: info.clone(),
                    last_reading,
                };
                let mut cached = Vec::new();
                cache.put_device_field(GET_DEVICE_DEVICE, &device, &mut cached);
                assert_eq!(cached, out);
            }
            let want = proto::GetDeviceResponse {
                device: Some(proto::Device {
                    device_id: "dev-1".into(),
                    last_reading: newest.map(expected),
                    first_seen: time(first),
                    last_seen: time(last),
                    readings_buffered: buffered,
                    status: device_status(status) as i32,
                    status_changed_at: (changed != 0).then(|| time(changed)).flatten(),
                }),
            };
            assert_eq!(out, want.encode_to_vec(), "{want:?}");
        }
        // The one reading was encoded once.
        assert_eq!(cache.stats().encodings, 1);
    }

    /// Appends a random JSON document as text: every kind of value, nested,
    /// with escapes, non-ASCII text, duplicate keys, extreme numbers and odd
    /// spacing.
    fn random_json(rng: &mut Rng, depth: u32, out: &mut String) {
        fn space(rng: &mut Rng, out: &mut String) {
            for _ in 0..rng.below(3) {
                out.push(*rng.pick(&[' ', '\n', '\t', '\r']));
            }
        }
        fn string(rng: &mut Rng, pieces: &[&str], out: &mut String) {
            out.push('"');
            for _ in 0..rng.below(6) {
                out.push_str(rng.pick::<&str>(pieces));
            }
            out.push('"');
        }
        const TEXT: &[&str] = &[
            "a",
            "é",
            "\\n",
            "\\\"",
            "\\\\",
            "\\u00e9",
            "\\ud83d\\ude00",
            "\u{1F600}",
            "\\/",
            " ",
            "\\u0000",
            "\u{7f}",
        ];
        // Few distinct keys, so objects often repeat one.
        const KEYS: &[&str] = &["a", "b", "é", ""];
        space(rng, out);
        match rng.below(if depth == 0 { 5 } else { 7 }) {
            0 => out.push_str("null"),
            1 => out.push_str(rng.pick::<&str>(&["true", "false"])),
            2 => {
                let number = match rng.below(6) {
                    0 => (rng.next() as i64).to_string(),
                    1 => rng.next().to_string(),
                    2 => Some(f64::from_bits(rng.next()))
                        .filter(|f| f.is_finite())
                        .map_or("0.5".into(), |f| format!("{f:e}")),
                    // Some of these overflow f64: the document is then not JSON.
                    3 => format!(
                        "{}e{}",
                        rng.below(2000) as i64 - 1000,
                        rng.below(700) as i64 - 350
                    ),
                    4 => "-0.0".into(),
                    _ => format!("{}.{:03}", rng.below(100), rng.below(1000)),
                };
                out.push_str(&number);
            }
            3 | 4 => string(rng, TEXT, out),
            5 => {
                out.push('[');
                for i in 0..rng.below(5) {
                    if i > 0 {
                        out.push(',');
                    }
                    random_json(rng, depth - 1, out);
                }
                space(rng, out);
                out.push(']');
            }
            _ => {
                out.push('{');
                for i in 0..rng.below(5) {
                    if i > 0 {
                        out.push(',');
                    }
                    space(rng, out);
                    string(rng, KEYS, out);
                    space(rng, out);
                    out.push(':');
                    random_json(rng, depth - 1, out);
                }
                space(rng, out);
                out.push('}');
            }
        }
        space(rng, out);
    }

    /// Thousands of random readings (JSON documents, broken JSON, random
    /// bytes; random ids, topics, QoS, flags and times): each must decode to
    /// exactly the message prost would have built, alone (WatchReadings) and
    /// concatenated (ListReadings).
    #[test]
    fn random_readings_decode_to_what_prost_would_have_encoded() {
        for seed in 0..8 {
            let mut rng = Rng(seed);
            let mut buffer = ReadingBuffer::new(
                BufferLimits {
                    max_readings: 1000,
                    max_bytes: 64 << 20,
                },
                1 + rng.below(1 << 40),
            );
            let mut json_readings = 0;
            for _ in 0..1000 {
                let payload = match rng.below(8) {
                    0 => rng.bytes(64),
                    1 => {
                        // Broken JSON: a document cut short.
                        let mut text = String::new();
                        random_json(&mut rng, 4, &mut text);
                        let mut bytes = text.into_bytes();
                        bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize);
                        bytes
                    }
                    _ => {
                        let (mut text, depth) = (String::new(), 1 + rng.below(5) as u32);
                        random_json(&mut rng, depth, &mut text);
                        text.into_bytes()
                    }
                };
                json_readings +=
                    usize::from(serde_json::from_slice::<serde_json::Value>(&payload).is_ok());
                let device = format!("d{}", rng.below(50));
                let topic = format!(
                    "devices/{device}/{}",
                    rng.pick(&["readings", "replies", "é"])
                );
                let (device, topic) = match rng.below(10) {
                    0 => ("", "elsewhere"),
                    _ => (device.as_str(), topic.as_str()),
                };
                buffer.push(NewReading {
                    kind: crate::buffer::MessageKind::Reading,
                    device_id: device,
                    topic,
                    payload: &payload,
                    qos: rng.below(3) as u8,
                    retained: rng.below(2) == 0,
                    received_at: SystemTime::UNIX_EPOCH
                        + Duration::new(rng.below(1 << 34), rng.below(1_000_000_000) as u32),
                });
            }
            // Most documents are JSON, some are not: both paths are covered.
            assert!((500..1000).contains(&json_readings), "{json_readings}");

            let readings = buffer
                .list(&ListQuery {
                    limit: 1000,
                    oldest_first: true,
                    ..Default::default()
                })
                .unwrap()
                .readings;
            assert_eq!(readings.len(), 1000);
            let mut list = Vec::new();
            for reading in &readings {
                let start = list.len();
                put_reading_field(encoded::READING_FIELD, reading, &mut list);
                let decoded = WatchReadingsResponse::decode(&list[start..]).unwrap();
                assert_eq!(
                    decoded.event,
                    Some(Event::Reading(expected(reading))),
                    "seed {seed}: {:?}",
                    String::from_utf8_lossy(&reading.payload)
                );
            }
            let page = ListReadingsResponse::decode(&list[..]).unwrap();
            let want: Vec<proto::Reading> = readings.iter().map(expected).collect();
            assert_eq!(page.readings, want, "seed {seed}");
        }
    }

    #[test]
    fn json_past_the_depth_rule_or_the_size_cap_stays_raw() {
        let nested = |depth: usize| "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth);
        assert!(json_of(nested(MAX_JSON_DEPTH).as_bytes()).is_some());
        assert!(json_of(nested(MAX_JSON_DEPTH + 1).as_bytes()).is_none());
        let arrays = |depth: usize| "[".repeat(depth) + &"]".repeat(depth);
        assert!(json_of(arrays(MAX_JSON_DEPTH).as_bytes()).is_some());
        assert!(json_of(arrays(MAX_JSON_DEPTH + 1).as_bytes()).is_none());

        // 1 MiB of `[0,0,...]` grows about fivefold as a Value: too large
        // for one message, so the reading goes out raw, under the cap.
        let zeros = "[".to_owned() + &"0,".repeat(512 << 10) + "0]";
        let mut buffer = ReadingBuffer::new(
            BufferLimits {
                max_readings: 10,
                max_bytes: 16 << 20,
            },
            1,
        );
        for payload in [zeros.as_bytes(), b"[0,0,0]"] {
            buffer.push(NewReading {
                kind: crate::buffer::MessageKind::Reading,
                device_id: "d",
                topic: "devices/d/readings",
                payload,
                qos: 0,
                retained: false,
                received_at: SystemTime::UNIX_EPOCH,
            });
        }
        let readings = buffer
            .list(&ListQuery {
                limit: 10,
                oldest_first: true,
                ..Default::default()
            })
            .unwrap()
            .readings;
        let encode = |reading| {
            let mut out = Vec::new();
            put_reading_field(encoded::READING_FIELD, reading, &mut out);
            WatchReadingsResponse::decode(&out[..]).map(|m| (out.len(), m))
        };
        let (len, big) = encode(&readings[0]).unwrap();
        assert!(len <= MAX_ENCODED_READING_BYTES + 8, "{len}");
        let Some(Event::Reading(big)) = big.event else {
            panic!("not a reading")
        };
        assert!(big.json.is_none() && big.payload.len() == zeros.len());
        let (_, small) = encode(&readings[1]).unwrap();
        let Some(Event::Reading(small)) = small.event else {
            panic!("not a reading")
        };
        assert!(small.json.is_some(), "small JSON is still transcoded");
    }

    #[test]
    fn json_payloads_are_transcoded_and_others_are_not() {
        let value = json_of(br#"{"t": 21.5, "ok": true, "tags": ["a", null]}"#).unwrap();
        let Some(Kind::StructValue(s)) = value.kind else {
            panic!("not an object")
        };
        assert_eq!(s.fields["t"].kind, Some(Kind::NumberValue(21.5)));
        assert_eq!(s.fields["ok"].kind, Some(Kind::BoolValue(true)));
        for raw in [
            &b""[..],
            b"\xff\xfe",
            b"not json",
            b"1e999",
            b"{\"a\":",
            b"[1] 2",
        ] {
            assert_eq!(json_of(raw), None, "{raw:?}");
        }
        // Too deep for the parser: refused, not a stack overflow.
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert_eq!(json_of(deep.as_bytes()), None);
        // A failed transcode leaves what was written before untouched.
        let mut out = b"kept".to_vec();
        assert!(!put_json_value(br#"{"a": [1, 2, {"b": tru"#, &mut out));
        assert_eq!(out, b"kept");
    }

    #[test]
    fn encoded_messages_encode_and_decode_as_themselves() {
        let gap = WatchReadingsResponse {
            event: Some(Event::Gap(proto::Gap {
                first_seq: 3,
                last_seq: 9,
            })),
        };
        let encoded = Encoded::new(&gap);
        assert_eq!(encoded.encoded_len(), gap.encoded_len());
        let bytes = encoded.encode_to_vec();
        assert_eq!(bytes, gap.encode_to_vec());
        assert_eq!(
            Encoded::<WatchReadingsResponse>::decode(&bytes[..]).unwrap(),
            encoded
        );
    }
}
