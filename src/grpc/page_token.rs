//! Paging (AIP-158): page sizes, and page tokens, opaque to clients and
//! validated here. A token is the hex form of
//! a version byte, a hash of the request's filters and order, so that a
//! token cannot be replayed against a different query, and the cursor: for
//! ListReadings the sequence number the next page starts looking at (after
//! a page cut short by `MAX_EXAMINED_PER_PAGE`, the first reading not yet
//! looked at, matching or not, so nothing is skipped or looked at twice;
//! otherwise the next matching reading: the same format and meaning, so
//! tokens issued before the bound still decode and resume), for ListDevices
//! the last device id of the page.
use super::error::ApiError;
use crate::proto::ListReadingsRequest;

/// Page size when a request leaves it at 0.
const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size accepted.
pub const MAX_PAGE_SIZE: usize = 1000;
/// A page stops growing at about this many encoded bytes, so it stays under
/// gRPC's usual 4 MiB message limit on the client; at least one item is
/// always returned.
pub const MAX_PAGE_BYTES: usize = 3 << 20;

/// A request's `page_size`: 0 means the default, at most [`MAX_PAGE_SIZE`].
pub fn page_size(n: i32) -> Result<usize, ApiError> {
    match n {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(ApiError::invalid("page_size", "must not be negative")),
        n if n as usize > MAX_PAGE_SIZE => Err(ApiError::invalid(
            "page_size",
            format!("is {n}; the maximum is {MAX_PAGE_SIZE}"),
        )),
        n => Ok(n as usize),
    }
}

const VERSION: u8 = 1;
const LEN: usize = 17;
/// ListDevices' tokens: version, hash, then the device id's bytes.
const KEY_VERSION: u8 = 2;

/// A token for a page that continues after `key`.
pub fn encode_key(key: &str, query_hash: u64) -> String {
    let mut bytes = vec![KEY_VERSION];
    bytes.extend_from_slice(&query_hash.to_be_bytes());
    bytes.extend_from_slice(key.as_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key of a token from [`encode_key`] with the same `query_hash`.
pub fn decode_key(token: &str, query_hash: u64) -> Result<String, ApiError> {
    let bytes = hex(token)?;
    if bytes.len() < 9 || bytes[0] != KEY_VERSION {
        return Err(malformed());
    }
    check_hash(&bytes[1..9], query_hash)?;
    String::from_utf8(bytes[9..].to_vec()).map_err(|_| malformed())
}

fn malformed() -> ApiError {
    ApiError::invalid(
        "page_token",
        "is malformed; pass a next_page_token unchanged",
    )
}

fn hex(token: &str) -> Result<Vec<u8>, ApiError> {
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return Err(malformed());
    }
    (0..token.len() / 2)
        .map(|i| u8::from_str_radix(&token[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| malformed())
}

fn check_hash(bytes: &[u8], query_hash: u64) -> Result<(), ApiError> {
    if bytes != query_hash.to_be_bytes() {
        return Err(ApiError::invalid(
            "page_token",
            "belongs to a request with other filters or another order",
        ));
    }
    Ok(())
}

/// A query's hash, stable across restarts and platforms.
pub use crate::fnv::Fnv;

pub fn encode(cursor: u64, query_hash: u64) -> String {
    let mut bytes = Vec::with_capacity(LEN);
    bytes.push(VERSION);
    bytes.extend_from_slice(&cursor.to_be_bytes());
    bytes.extend_from_slice(&query_hash.to_be_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode(token: &str, query_hash: u64) -> Result<u64, ApiError> {
    let bytes = hex(token)?;
    if bytes.len() != LEN || bytes[0] != VERSION {
        return Err(malformed());
    }
    check_hash(&bytes[9..17], query_hash)?;
    Ok(u64::from_be_bytes(
        bytes[1..9].try_into().map_err(|_| malformed())?,
    ))
}

/// The hash of everything but the page size and token.
pub fn query_hash(req: &ListReadingsRequest) -> u64 {
    let mut hash = Fnv::new();
    let mut eat = |bytes: &[u8]| hash.eat(bytes);
    eat(req.device_id.as_bytes());
    eat(&[0xff]);
    eat(req.topic_filter.as_bytes());
    eat(&[0xff]);
    for time in [&req.start_time, &req.end_time] {
        match time {
            Some(t) => {
                eat(&[1]);
                eat(&t.seconds.to_be_bytes());
                eat(&t.nanos.to_be_bytes());
            }
            None => eat(&[0]),
        }
    }
    eat(&[u8::from(req.oldest_first)]);
    hash.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_forgeries() {
        let req = ListReadingsRequest::default();
        let hash = query_hash(&req);
        assert_eq!(decode(&encode(42, hash), hash).unwrap(), 42);
        let other = ListReadingsRequest {
            oldest_first: true,
            ..ListReadingsRequest::default()
        };
        assert_ne!(query_hash(&other), hash);
        assert!(decode(&encode(42, hash), query_hash(&other)).is_err());
        for forged in ["", "zz", "é", &"0".repeat(34), &encode(1, hash)[..33]] {
            assert!(decode(forged, hash).is_err(), "{forged:?}");
        }
    }

    #[test]
    fn key_tokens_round_trip_and_reject_forgeries() {
        let token = encode_key("pump-7/ü", 9);
        assert_eq!(decode_key(&token, 9).unwrap(), "pump-7/ü");
        assert!(decode_key(&token, 10).is_err());
        assert!(decode(&token, 9).is_err());
        assert!(decode_key(&encode(1, 9), 9).is_err());
        let not_utf8 = format!("02{}ff", "00".repeat(7) + "09");
        assert!(decode_key(&not_utf8, 9).is_err());
        for forged in ["", "0", "zz", "é", "02"] {
            assert!(decode_key(forged, 9).is_err(), "{forged:?}");
        }
    }
}
