//! Page tokens: opaque to clients, validated here. A token is the hex form of
//! a version byte, the cursor (the sequence number the next page starts at)
//! and a hash of the request's filters and order, so that a token cannot be
//! replayed against a different query.
use super::error::ApiError;
use crate::proto::ListReadingsRequest;

const VERSION: u8 = 1;
const LEN: usize = 17;

pub fn encode(cursor: u64, query_hash: u64) -> String {
    let mut bytes = Vec::with_capacity(LEN);
    bytes.push(VERSION);
    bytes.extend_from_slice(&cursor.to_be_bytes());
    bytes.extend_from_slice(&query_hash.to_be_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode(token: &str, query_hash: u64) -> Result<u64, ApiError> {
    let malformed = || {
        ApiError::invalid(
            "page_token",
            "is malformed; pass a next_page_token unchanged",
        )
    };
    if token.len() != LEN * 2 || !token.is_ascii() {
        return Err(malformed());
    }
    let bytes = (0..LEN)
        .map(|i| u8::from_str_radix(&token[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| malformed())?;
    if bytes[0] != VERSION {
        return Err(malformed());
    }
    let word = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    if word(9) != query_hash {
        return Err(ApiError::invalid(
            "page_token",
            "belongs to a request with other filters or another order",
        ));
    }
    Ok(word(1))
}

/// FNV-1a over everything but the page size and token: stable across
/// restarts and platforms.
pub fn query_hash(req: &ListReadingsRequest) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
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
    hash
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
}
