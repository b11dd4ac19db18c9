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
    encoding::{encode_key, encode_varint, DecodeContext, WireType},
    DecodeError, Message,
};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::buffer::Reading;

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
/// message being written to `out`.
pub fn put_reading_field(field: u32, reading: &Reading, out: &mut Vec<u8>) {
    let start = out.len();
    put_reading(reading, out);
    wrap(out, start, field);
}

/// Appends a `devicehub.v1.Reading`. Like prost, fields holding their
/// default value are left out.
fn put_reading(reading: &Reading, out: &mut Vec<u8>) {
    if reading.seq != 0 {
        encode_key(1, WireType::Varint, out);
        encode_varint(reading.seq, out);
    }
    put_str(2, reading.device_id(), out);
    put_str(3, reading.topic(), out);
    // google.protobuf.Timestamp received_at = 4, always present.
    let time = prost_types::Timestamp::from(reading.received_at);
    let start = out.len();
    if time.seconds != 0 {
        encode_key(1, WireType::Varint, out);
        encode_varint(time.seconds as u64, out);
    }
    if time.nanos != 0 {
        encode_key(2, WireType::Varint, out);
        encode_varint(time.nanos as u64, out);
    }
    wrap(out, start, 4);
    if !reading.payload.is_empty() {
        put_bytes(5, &reading.payload, out);
    }
    // google.protobuf.Value json = 6, when the payload is JSON.
    let start = out.len();
    if put_json_value(&reading.payload, out) {
        wrap(out, start, 6);
    }
    if reading.qos != 0 {
        encode_key(7, WireType::Varint, out);
        encode_varint(u64::from(reading.qos), out);
    }
    if reading.retained {
        encode_key(8, WireType::Varint, out);
        encode_varint(1, out);
    }
}

/// Appends field `field` as a string, unless it is empty.
pub fn put_str(field: u32, text: &str, out: &mut Vec<u8>) {
    if !text.is_empty() {
        put_bytes(field, text.as_bytes(), out);
    }
}

fn put_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
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

/// Appends `payload` as a `google.protobuf.Value` message body if it is JSON,
/// and returns whether it was. serde_json refuses input nested deeper than
/// 128 levels and numbers out of `f64` range, so hostile payloads end up
/// raw-only instead of exhausting the stack.
pub fn put_json_value(payload: &[u8], out: &mut Vec<u8>) -> bool {
    let start = out.len();
    let mut parser = serde_json::Deserializer::from_slice(payload);
    let parsed = ValueSeed(out)
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
struct ValueSeed<'o>(&'o mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl ValueSeed<'_> {
    fn number(self, n: f64) {
        encode_key(NUMBER_VALUE, WireType::SixtyFourBit, self.0);
        self.0.put_f64_le(n);
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        encode_key(NULL_VALUE, WireType::Varint, self.0);
        encode_varint(0, self.0);
        Ok(())
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        encode_key(BOOL_VALUE, WireType::Varint, self.0);
        encode_varint(u64::from(b), self.0);
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
        put_bytes(STRING_VALUE, s.as_bytes(), self.0);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.0;
        let list = out.len();
        loop {
            let item = out.len();
            if seq.next_element_seed(ValueSeed(&mut *out))?.is_none() {
                break;
            }
            wrap(out, item, LIST_VALUES);
        }
        wrap(out, list, LIST_VALUE);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.0;
        let object = out.len();
        loop {
            let entry = out.len();
            if map.next_key_seed(KeySeed(&mut *out))?.is_none() {
                break;
            }
            let value = out.len();
            map.next_value_seed(ValueSeed(&mut *out))?;
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
        buffer::{BufferLimits, ListQuery, NewReading, ReadingBuffer},
        proto::{
            self, watch_readings_response::Event, ListReadingsResponse, WatchReadingsResponse,
        },
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
                .map(super::super::json_to_value),
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
