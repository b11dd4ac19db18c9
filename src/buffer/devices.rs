//! What the buffer knows of each device: the sequence numbers of its
//! buffered messages (the index a page for one device is served from), and
//! for the device list when it was first and last heard from, its newest
//! reading and its connection status.
//!
//! One hash lookup per stored message serves both: the entry the index
//! needs anyway is the device's record. A device stays known after its
//! messages are evicted, up to `max_devices` known devices; beyond that a
//! new device's messages are still indexed (ListReadings finds them) but the
//! device is not listed, and that is counted. The device's newest reading
//! is read from the buffer while it is there; when it is evicted, its
//! payload is copied into the record, within a byte budget for all such
//! copies (`max_kept_bytes`, counted when full).
//!
//! A device's newest reading is also kept as the caller encoded it (the
//! device list's protobuf message), made by the first page that needs it
//! and dropped when a newer reading arrives: a page of 100 devices then
//! copies 100 encodings instead of copying and transcoding 100 payloads
//! (BENCHMARKS.md, "Devices"), within `max_encoded_bytes` (see
//! `encoding_budget.rs`: pages fill it under the buffer's read lock).
//!
//! Memory per known device: the record (`Device`, 200 bytes on 64-bit
//! targets, checked by a test, and the slab's tag), its id once (shared
//! with the index and the readings), the hash map's and the ordered map's
//! entries for it (about 70 bytes with their slack), a kept reading's
//! payload and an encoding within their budgets: about 290 bytes plus the
//! id, the payload and the encoding; 31 MiB for 100 000 devices with
//! 16-byte ids, without the last two.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    ops::Bound,
    sync::{Arc, OnceLock},
};

use bytes::Bytes;
use slab::Slab;

use super::{Reading, ReadingBuffer, Source};
use crate::{config::DeviceLimits, encoding_budget::EncodingBudget};

/// A device's connection status, from its status messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnectionStatus {
    #[default]
    Unknown,
    Online,
    Offline,
}

impl ConnectionStatus {
    /// The status a status message's payload states: `online`/`offline`
    /// (any case, surrounding whitespace ignored), or a JSON object with
    /// such a `status` (or a JSON string). `None`: not a status.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let word = |text: &str| match text.trim().to_ascii_lowercase().as_str() {
            "online" => Some(Self::Online),
            "offline" => Some(Self::Offline),
            _ => None,
        };
        let text = std::str::from_utf8(payload).ok()?;
        if let Some(status) = word(text) {
            return Some(status);
        }
        match serde_json::from_str::<serde_json::Value>(text).ok()? {
            serde_json::Value::String(s) => word(&s),
            serde_json::Value::Object(map) => word(map.get("status")?.as_str()?),
            _ => None,
        }
    }
}

/// What a stored message is to its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// On the readings topic: becomes the device's newest reading.
    Reading,
    /// A command reply.
    Reply,
    /// On the status topic, stating this status (`None`: not understood).
    Status(Option<ConnectionStatus>),
}

/// One device.
pub(super) struct Device {
    /// Sequence numbers of its buffered messages, oldest first.
    pub seqs: VecDeque<u64>,
    /// Its most recent source, reused while its topic stays the same.
    pub last_source: Arc<Source>,
    /// In the ordered list (else indexed only while it has messages).
    listed: bool,
    first_seen_micros: u64,
    last_seen_micros: u64,
    /// Sequence number of its newest reading, if it sent one (and it is
    /// buffered or kept).
    newest_reading: Option<u64>,
    /// The newest reading, copied when it was evicted.
    kept: Option<Reading>,
    status: ConnectionStatus,
    status_changed_micros: u64,
    /// The newest reading as a page encoded it; empty until one did, and
    /// whenever `newest_reading` changes.
    encoded: OnceLock<Bytes>,
}

impl Device {
    /// What a page shows of this device, with where its newest reading is:
    /// encoded, buffered (its sequence number) or kept (the copy).
    pub fn view(&self) -> (DeviceInfo, NewestReading<'_>) {
        let slot = &self.encoded;
        let newest = match (slot.get(), &self.kept, self.newest_reading) {
            (Some(encoded), ..) => NewestReading::Encoded(encoded),
            (None, Some(kept), _) => NewestReading::Kept(kept, slot),
            (None, None, Some(seq)) => NewestReading::Buffered(seq, slot),
            (None, None, None) => NewestReading::None,
        };
        let info = DeviceInfo {
            device_id: self.last_source.device_id.clone(),
            first_seen_micros: self.first_seen_micros,
            last_seen_micros: self.last_seen_micros,
            buffered: self.seqs.len() as u64,
            status: self.status,
            status_changed_micros: self.status_changed_micros,
        };
        (info, newest)
    }

    /// Sets the newest reading (`None`: none is known any more), giving
    /// the encoding of the previous one back to `budget`.
    fn set_newest(&mut self, seq: Option<u64>, budget: &EncodingBudget) {
        self.newest_reading = seq;
        if let Some(old) = self.encoded.take() {
            budget.release(old.len());
        }
    }
}

/// A device as listed: everything but the newest reading itself, which the
/// buffer fills in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: Arc<str>,
    pub first_seen_micros: u64,
    pub last_seen_micros: u64,
    pub buffered: u64,
    pub status: ConnectionStatus,
    /// 0 while the status is unknown.
    pub status_changed_micros: u64,
}

/// Counters for operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Devices listed.
    pub known: usize,
    /// New devices not listed because `max_devices` were known.
    pub not_listed: u64,
    /// Payload bytes of newest readings kept after their eviction.
    pub kept_bytes: usize,
    /// Newest readings not kept because the budget was full.
    pub kept_dropped: u64,
    /// Bytes of newest readings' encodings kept for pages.
    pub encoded_bytes: usize,
    /// Encodings not kept because their budget was full.
    pub encodings_not_kept: u64,
}

/// Every device, by id and in order.
pub(super) struct Devices {
    records: Slab<Device>,
    /// Each record's key: one hash lookup per stored message.
    by_id: HashMap<Arc<str>, usize>,
    /// The listed ones' keys, in id order: a page walks this to the
    /// records without hashing (a hash lookup per listed device cost a page
    /// of 100 about 25 µs in cache misses at 100 000 devices).
    listed: BTreeMap<Arc<str>, usize>,
    limits: DeviceLimits,
    kept_bytes: usize,
    not_listed: u64,
    kept_dropped: u64,
    encoded: EncodingBudget,
}

impl Devices {
    pub fn new(limits: DeviceLimits) -> Self {
        Self {
            records: Slab::new(),
            by_id: HashMap::new(),
            listed: BTreeMap::new(),
            encoded: EncodingBudget::new(limits.max_encoded_bytes),
            limits,
            kept_bytes: 0,
            not_listed: 0,
            kept_dropped: 0,
        }
    }

    /// Records a message of `kind` from `device_id` on `topic`, stored as
    /// `seq`, and returns the device's source for the stored slot.
    pub fn record(
        &mut self,
        device_id: &str,
        topic: &str,
        seq: u64,
        micros: u64,
        kind: MessageKind,
    ) -> Arc<Source> {
        let key = match self.by_id.get(device_id) {
            Some(&key) => key,
            None => {
                let source = Arc::new(Source {
                    device_id: Arc::from(device_id),
                    topic: Arc::from(topic),
                });
                // Messages on topics outside the templates ("") are indexed,
                // but "" is not a device.
                let listed = !device_id.is_empty() && self.listed.len() < self.limits.max_devices;
                if !listed && !device_id.is_empty() {
                    self.not_listed += 1;
                }
                let device = Device {
                    seqs: VecDeque::new(),
                    last_source: source.clone(),
                    listed,
                    first_seen_micros: micros,
                    last_seen_micros: micros,
                    newest_reading: None,
                    kept: None,
                    status: ConnectionStatus::Unknown,
                    status_changed_micros: 0,
                    encoded: OnceLock::new(),
                };
                self.insert(source.device_id.clone(), device)
            }
        };
        let device = &mut self.records[key];
        if *device.last_source.topic != *topic {
            device.last_source = Arc::new(Source {
                device_id: device.last_source.device_id.clone(),
                topic: Arc::from(topic),
            });
        }
        device.seqs.push_back(seq);
        device.last_seen_micros = micros;
        match kind {
            MessageKind::Reading => {
                device.set_newest(Some(seq), &self.encoded);
                if let Some(kept) = device.kept.take() {
                    self.kept_bytes -= kept.payload.len();
                }
            }
            MessageKind::Status(Some(status)) if status != device.status => {
                device.status = status;
                device.status_changed_micros = micros;
            }
            MessageKind::Status(_) | MessageKind::Reply => {}
        }
        device.last_source.clone()
    }

    /// Lists a device known from before this process (the store's record),
    /// with its newest reading kept if it is given and fits the budget. A
    /// device already known, or one past `max_devices`, is left out.
    pub fn restore(&mut self, info: DeviceInfo, newest: Option<Reading>) {
        let known = self.by_id.contains_key(&info.device_id);
        if known || info.device_id.is_empty() || self.listed.len() >= self.limits.max_devices {
            return;
        }
        let kept = newest.filter(|reading| {
            let len = reading.payload.len();
            let fits = self.kept_bytes + len <= self.limits.max_kept_bytes;
            match fits {
                true => self.kept_bytes += len,
                false => self.kept_dropped += 1,
            }
            fits
        });
        let topic = kept.as_ref().map_or("", |r| r.topic());
        let source = Arc::new(Source {
            device_id: info.device_id.clone(),
            topic: Arc::from(topic),
        });
        let device = Device {
            seqs: VecDeque::new(),
            last_source: source,
            listed: true,
            first_seen_micros: info.first_seen_micros,
            last_seen_micros: info.last_seen_micros,
            newest_reading: kept.as_ref().map(|r| r.seq),
            kept,
            status: info.status,
            status_changed_micros: info.status_changed_micros,
            encoded: OnceLock::new(),
        };
        self.insert(info.device_id, device);
    }

    /// Adds a record for a device not known yet, and returns its key.
    fn insert(&mut self, device_id: Arc<str>, device: Device) -> usize {
        let listed = device.listed;
        let key = self.records.insert(device);
        if listed {
            self.listed.insert(device_id.clone(), key);
        }
        self.by_id.insert(device_id, key);
        key
    }

    fn find(&self, device_id: &str) -> Option<&Device> {
        self.by_id.get(device_id).map(|&key| &self.records[key])
    }

    /// Whether the message `seq` of `device_id`, about to be evicted, is the
    /// device's newest reading (and should be kept).
    pub fn is_newest_reading(&self, device_id: &str, seq: u64) -> bool {
        self.find(device_id)
            .is_some_and(|d| d.listed && d.newest_reading == Some(seq))
    }

    /// Forgets the evicted message `seq`; `kept` is its copy when
    /// [`Self::is_newest_reading`] said so.
    pub fn evicted(&mut self, device_id: &str, seq: u64, kept: Option<Reading>) {
        let Some(&key) = self.by_id.get(device_id) else {
            return;
        };
        let device = &mut self.records[key];
        device.seqs.pop_front();
        if let Some(reading) = kept {
            let len = reading.payload.len();
            if self.kept_bytes + len <= self.limits.max_kept_bytes {
                self.kept_bytes += len;
                device.kept = Some(reading);
            } else {
                self.kept_dropped += 1;
                device.set_newest(None, &self.encoded);
            }
        } else if device.newest_reading == Some(seq) {
            device.set_newest(None, &self.encoded);
        }
        if device.seqs.is_empty() && !device.listed {
            self.by_id.remove(device_id);
            self.records.remove(key);
        }
    }

    /// The buffered sequence numbers of `device_id`.
    pub fn seqs(&self, device_id: &str) -> Option<&VecDeque<u64>> {
        self.find(device_id).map(|d| &d.seqs)
    }

    pub fn status(&self, device_id: &str) -> ConnectionStatus {
        self.find(device_id)
            .map_or(ConnectionStatus::Unknown, |d| d.status)
    }

    /// A listed device.
    pub fn get(&self, device_id: &str) -> Option<&Device> {
        self.find(device_id).filter(|d| d.listed)
    }

    /// Listed devices from `prefix` on, after `after` (exclusive) when
    /// given, in id order.
    pub fn listed_from<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&str>,
    ) -> impl Iterator<Item = (&'a str, &'a Device)> + 'a {
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        self.listed
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(move |(id, _)| id.starts_with(prefix))
            .map(|(id, &key)| (&**id, &self.records[key]))
    }

    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            known: self.listed.len(),
            not_listed: self.not_listed,
            kept_bytes: self.kept_bytes,
            kept_dropped: self.kept_dropped,
            encoded_bytes: self.encoded.bytes(),
            encodings_not_kept: self.encoded.not_kept(),
        }
    }

    /// Keeps `encoded`, a newest reading's encoding, in `slot` (from
    /// [`NewestReading`]) if the budget has room, and returns it.
    pub fn keep_encoding(&self, slot: &OnceLock<Bytes>, encoded: Vec<u8>) -> Bytes {
        match self.encoded.keep(slot, encoded) {
            Ok(kept) => kept.clone(),
            Err(encoded) => encoded.into(),
        }
    }

    #[cfg(test)]
    pub fn indexed(&self, device_id: &str) -> bool {
        self.by_id.contains_key(device_id)
    }
}

/// Where a device's newest reading is; with the slot its encoding is to
/// be kept in when it is not encoded yet.
pub(super) enum NewestReading<'a> {
    Encoded(&'a Bytes),
    Buffered(u64, &'a OnceLock<Bytes>),
    Kept(&'a Reading, &'a OnceLock<Bytes>),
    None,
}

/// A device as the device list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    pub info: DeviceInfo,
    /// Its newest reading, buffered or kept, as the lister's `encode` made
    /// it (now or for an earlier page).
    pub last_reading: Option<Bytes>,
}

/// The device list, served from the buffer: the records above, with each
/// newest reading read from the buffer (or the kept copy) and encoded.
impl ReadingBuffer {
    /// A listed device, its newest reading as `encode` makes it. The
    /// encoding is kept for later calls (within a budget; see
    /// `buffer/devices.rs`), so `encode` must make the same bytes of the
    /// same reading every time.
    pub fn device(
        &self,
        device_id: &str,
        encode: impl Fn(&Reading) -> Vec<u8>,
    ) -> Option<DeviceEntry> {
        Some(self.device_entry(self.devices.get(device_id)?, encode))
    }

    fn device_entry(&self, device: &Device, encode: impl Fn(&Reading) -> Vec<u8>) -> DeviceEntry {
        let (info, newest) = device.view();
        let last_reading = match newest {
            NewestReading::Encoded(encoded) => Some(encoded.clone()),
            NewestReading::Buffered(seq, keep) => self.get(seq).map(|slot| {
                let encoded = encode(&self.reading(seq, slot));
                self.devices.keep_encoding(keep, encoded)
            }),
            NewestReading::Kept(reading, keep) => {
                Some(self.devices.keep_encoding(keep, encode(reading)))
            }
            NewestReading::None => None,
        };
        DeviceEntry { info, last_reading }
    }

    /// Up to `limit` listed devices whose id starts with `prefix`, after
    /// `after` when given, that `visible` lets through, in id order, as
    /// [`Self::device`] gives them; and whether more follow.
    pub fn devices(
        &self,
        prefix: &str,
        after: Option<&str>,
        visible: impl Fn(&str) -> bool,
        limit: usize,
        encode: impl Fn(&Reading) -> Vec<u8>,
    ) -> (Vec<DeviceEntry>, bool) {
        let mut listed = self
            .devices
            .listed_from(prefix, after)
            .filter(|(id, _)| visible(id));
        let page: Vec<DeviceEntry> = listed
            .by_ref()
            .take(limit)
            .map(|(_, device)| self.device_entry(device, &encode))
            .collect();
        (page, listed.next().is_some())
    }

    /// Lists a device known from before this process; see
    /// `Devices::restore`.
    pub fn restore_device(&mut self, info: DeviceInfo, newest: Option<Reading>) {
        self.devices.restore(info, newest);
    }

    /// A device's connection status (unknown for a device never heard from).
    pub fn device_status(&self, device_id: &str) -> ConnectionStatus {
        self.devices.status(device_id)
    }

    pub fn device_stats(&self) -> DeviceStats {
        self.devices.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, buffer, push, FIRST};
    use super::*;
    use crate::buffer::NewReading;

    #[test]
    fn a_device_record_is_as_large_as_documented() {
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<Device>(), 200);
    }

    #[test]
    fn parses_status_payloads() {
        use ConnectionStatus::*;
        for (payload, want) in [
            (&b"online"[..], Some(Online)),
            (b" OFFLINE\n", Some(Offline)),
            (br#"{"status": "Online", "since": 3}"#, Some(Online)),
            (br#""offline""#, Some(Offline)),
            (b"", None),
            (b"gone", None),
            (br#"{"state": "online"}"#, None),
            (br#"{"status": 1}"#, None),
            (&[0xff, 0xfe], None),
        ] {
            assert_eq!(ConnectionStatus::parse(payload), want, "{payload:?}");
        }
    }

    #[test]
    fn device_index_is_dropped_with_the_last_reading_of_an_unlisted_device() {
        let mut buf = buffer(2, usize::MAX).with_device_limits(DeviceLimits {
            max_devices: 1,
            max_kept_bytes: 1 << 20,
            ..DeviceLimits::default()
        });
        push(&mut buf, "a", 1, "1");
        push(&mut buf, "b", 2, "2");
        push(&mut buf, "b", 3, "3");
        // "a" is listed: known after its reading left the buffer.
        assert!(buf.devices.indexed("a"));
        assert_eq!(buf.devices.seqs("a").map(VecDeque::len), Some(0));
        push(&mut buf, "c", 4, "4");
        push(&mut buf, "d", 5, "5");
        push(&mut buf, "d", 6, "6");
        // "c" was over the limit: indexed only while it had a reading.
        assert!(!buf.devices.indexed("c"));
        assert_eq!(buf.devices.seqs("d").map(VecDeque::len), Some(2));
        assert_eq!(buf.device_stats().not_listed, 3);
    }

    fn push_kind(
        buf: &mut ReadingBuffer,
        device: &str,
        secs: u64,
        kind: MessageKind,
        payload: &str,
    ) {
        let topic = format!("devices/{device}/other");
        buf.push(NewReading {
            kind,
            device_id: device,
            topic: &topic,
            payload: payload.as_bytes(),
            qos: 1,
            retained: true,
            received_at: at(secs),
        });
    }

    #[test]
    fn devices_keep_their_newest_reading_status_and_times() {
        let mut buf = buffer(3, usize::MAX).with_device_limits(DeviceLimits {
            max_devices: 10,
            max_kept_bytes: 5,
            ..DeviceLimits::default()
        });
        push(&mut buf, "a", 1, "a-1");
        push_kind(
            &mut buf,
            "a",
            2,
            MessageKind::Status(Some(ConnectionStatus::Online)),
            "online",
        );
        push(&mut buf, "b", 3, "b-1");
        let a = buf.device("a", described).unwrap();
        assert_eq!(a.last_reading.unwrap(), format!("{FIRST}:a-1"));
        assert_eq!(
            (a.info.first_seen_micros, a.info.last_seen_micros),
            (1_000_000, 2_000_000)
        );
        assert_eq!(
            (a.info.status, a.info.status_changed_micros),
            (ConnectionStatus::Online, 2_000_000)
        );
        assert_eq!(a.info.buffered, 2);

        // a's reading is evicted: kept (3 bytes of a 5-byte budget). A reply
        // or a repeated status does not replace it or move the status time.
        push_kind(&mut buf, "a", 4, MessageKind::Reply, "{}");
        push_kind(
            &mut buf,
            "a",
            5,
            MessageKind::Status(Some(ConnectionStatus::Online)),
            "online",
        );
        let a = buf.device("a", described).unwrap();
        assert_eq!(a.last_reading.unwrap(), format!("{FIRST}:a-1"));
        assert_eq!(a.info.status_changed_micros, 2_000_000);
        assert_eq!(a.info.last_seen_micros, 5_000_000);
        assert_eq!(buf.device_stats().kept_bytes, 3);

        // b's reading is evicted too: 3 more bytes do not fit the budget.
        push_kind(
            &mut buf,
            "a",
            6,
            MessageKind::Status(Some(ConnectionStatus::Offline)),
            "offline",
        );
        let b = buf.device("b", described).unwrap();
        assert_eq!((b.last_reading, b.info.buffered), (None, 0));
        assert_eq!(buf.device_stats().kept_dropped, 1);
        let a = buf.device("a", described).unwrap();
        assert_eq!(
            (a.info.status, a.info.status_changed_micros),
            (ConnectionStatus::Offline, 6_000_000)
        );
        assert_eq!(buf.device_status("a"), ConnectionStatus::Offline);
        assert_eq!(buf.device_status("nobody"), ConnectionStatus::Unknown);

        // A new reading replaces the kept copy and frees its budget.
        push(&mut buf, "a", 7, "a-2");
        let a = buf.device("a", described).unwrap();
        assert_eq!(a.last_reading.unwrap(), format!("{}:a-2", FIRST + 6));
        assert_eq!(buf.device_stats().kept_bytes, 0);
        assert!(buf.device("", described).is_none() && buf.device("c", described).is_none());
    }

    /// The tests' encoding of a device's newest reading.
    fn described(reading: &Reading) -> Vec<u8> {
        let payload = String::from_utf8_lossy(&reading.payload);
        format!("{}:{payload}", reading.seq).into_bytes()
    }

    #[test]
    fn a_devices_newest_reading_is_encoded_once_until_a_newer_one_arrives() {
        use std::cell::Cell;
        let calls = Cell::new(0);
        let encode = |reading: &Reading| {
            calls.set(calls.get() + 1);
            described(reading)
        };
        let mut buf = buffer(2, usize::MAX).with_device_limits(DeviceLimits {
            max_devices: 10,
            max_kept_bytes: 100,
            max_encoded_bytes: 20,
        });
        let first = push(&mut buf, "a", 1, "a-1");
        let one = format!("{first}:a-1");
        for _ in 0..3 {
            let (page, _) = buf.devices("", None, |_| true, 10, encode);
            assert_eq!(page[0].last_reading.as_ref().unwrap(), &one);
        }
        assert_eq!(calls.get(), 1);
        assert_eq!(buf.device_stats().encoded_bytes, one.len());

        // A reply and a status leave it; its eviction keeps it (with the
        // kept copy).
        push_kind(&mut buf, "a", 2, MessageKind::Reply, "{}");
        push_kind(&mut buf, "a", 3, MessageKind::Status(None), "?");
        assert_eq!(buf.device("a", encode).unwrap().last_reading.unwrap(), one);
        assert_eq!(calls.get(), 1);

        // A newer reading replaces it and its bytes.
        let second = push(&mut buf, "a", 4, "a-2");
        let two = format!("{second}:a-2");
        assert_eq!(buf.device("a", encode).unwrap().last_reading.unwrap(), two);
        assert_eq!(buf.device("a", encode).unwrap().last_reading.unwrap(), two);
        assert_eq!(calls.get(), 2);
        assert_eq!(buf.device_stats().encoded_bytes, two.len());

        // Past the budget: encoded every time, counted, still right.
        push(&mut buf, "bb", 5, "a much longer payload than 20 bytes");
        for _ in 0..2 {
            let b = buf.device("bb", encode).unwrap().last_reading.unwrap();
            assert!(b.ends_with(b":a much longer payload than 20 bytes"));
        }
        assert_eq!(calls.get(), 4);
        let stats = buf.device_stats();
        assert_eq!(
            (stats.encoded_bytes, stats.encodings_not_kept),
            (two.len(), 2)
        );
    }

    #[test]
    fn devices_page_in_id_order_by_prefix() {
        let mut buf = buffer(1000, usize::MAX);
        for id in [
            "pump-2", "fan-1", "pump-10", "pump-1", "fan-2", "pumpkin", "",
        ] {
            push(&mut buf, id, 1, "x");
        }
        let ids = |page: &[DeviceEntry]| -> Vec<String> {
            page.iter().map(|d| d.info.device_id.to_string()).collect()
        };
        let (page, more) = buf.devices("pump-", None, |_| true, 2, described);
        assert_eq!(
            (ids(&page), more),
            (vec!["pump-1".into(), "pump-10".into()], true)
        );
        let (page, more) = buf.devices("pump-", Some("pump-10"), |_| true, 2, described);
        assert_eq!((ids(&page), more), (vec!["pump-2".into()], false));
        let (page, _) = buf.devices("", None, |id| id != "fan-2", 10, described);
        assert_eq!(
            ids(&page),
            ["fan-1", "pump-1", "pump-10", "pump-2", "pumpkin"]
        );
        // A cursor before the prefix starts at the prefix.
        let (page, _) = buf.devices("pump", Some("a"), |_| true, 1, described);
        assert_eq!(ids(&page), ["pump-1"]);
        assert_eq!(buf.device_stats().known, 6);
    }
}
