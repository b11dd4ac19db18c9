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
//! The device list hands each newest reading out as a copy, unless the
//! lister says it already has what it needs of it (`find`, asked with the
//! reading's number and time: the gRPC side keeps readings' messages, and a
//! page of 100 devices then copies no payload). The buffer holds no
//! encodings of its own.
//!
//! Memory per known device: the record (`Device`, 168 bytes on 64-bit
//! targets, checked by a test, and the slab's tag), its id once (shared
//! with the index and the readings), the hash map's and the ordered map's
//! entries for it (about 70 bytes with their slack) and a kept reading's
//! payload within its budget: about 260 bytes plus the id and the payload;
//! 28 MiB for 100 000 devices with 16-byte ids, without the payloads.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    ops::Bound,
    sync::Arc,
    time::{Duration, SystemTime},
};

use slab::Slab;

use super::{Reading, ReadingBuffer, Source};
use crate::config::DeviceLimits;

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
    /// When it last sent something itself: a message that is neither a
    /// status message nor a retained one (which the broker replays from
    /// its store, say on devicehub's reconnect). 0: not since this
    /// process started.
    active_micros: u64,
}

impl Device {
    /// What a page shows of this device, with where its newest reading is:
    /// buffered (its sequence number) or kept (the copy).
    pub fn view(&self) -> (DeviceInfo, NewestReading<'_>) {
        let newest = match (&self.kept, self.newest_reading) {
            (Some(kept), _) => NewestReading::Kept(kept),
            (None, Some(seq)) => NewestReading::Buffered(seq),
            (None, None) => NewestReading::None,
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

/// Whether a device is there, as its messages tell: its status and when it
/// last changed, and when it last sent something itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    pub status: ConnectionStatus,
    /// 0 while the status is unknown.
    pub status_changed_micros: u64,
    /// When it last sent something itself (not a status message, not a
    /// retained message the broker replayed).
    pub active_micros: u64,
}

impl Presence {
    /// Whether the device can take a command now: it did not say it went
    /// away, or it sent something itself after it did (a reading or a
    /// reply after its last will means it is back, status message or not).
    pub fn reachable(&self) -> bool {
        self.status != ConnectionStatus::Offline || self.active_micros > self.status_changed_micros
    }

    /// When it went away, if it is away now.
    pub fn away_since_micros(&self) -> Option<u64> {
        (!self.reachable()).then_some(self.status_changed_micros)
    }
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
}

impl Devices {
    pub fn new(limits: DeviceLimits) -> Self {
        Self {
            records: Slab::new(),
            by_id: HashMap::new(),
            listed: BTreeMap::new(),
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
        retained: bool,
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
                    active_micros: 0,
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
        if !retained && !matches!(kind, MessageKind::Status(_)) {
            device.active_micros = micros;
        }
        match kind {
            MessageKind::Reading => {
                device.newest_reading = Some(seq);
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
            // Not known from before: away until it sends something.
            active_micros: 0,
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
                device.newest_reading = None;
            }
        } else if device.newest_reading == Some(seq) {
            device.newest_reading = None;
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

    /// What `device_id`'s messages say about whether it is there (`None`
    /// for a device never heard from).
    pub fn presence(&self, device_id: &str) -> Option<Presence> {
        self.find(device_id).map(|d| Presence {
            status: d.status,
            status_changed_micros: d.status_changed_micros,
            active_micros: d.active_micros,
        })
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
        }
    }

    #[cfg(test)]
    pub fn indexed(&self, device_id: &str) -> bool {
        self.by_id.contains_key(device_id)
    }
}

/// Where a device's newest reading is.
pub(super) enum NewestReading<'a> {
    Buffered(u64),
    Kept(&'a Reading),
    None,
}

/// A device as the device list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry<K> {
    pub info: DeviceInfo,
    /// Its newest reading, buffered or kept.
    pub last_reading: Option<LastReading<K>>,
}

/// A device's newest reading as the device list hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastReading<K> {
    /// What the lister's `find` returned for it.
    Found(K),
    /// A copy, as `find` returned nothing.
    Copied(Reading),
}

/// The device list, served from the buffer: the records above, with each
/// newest reading read from the buffer (or the kept copy).
impl ReadingBuffer {
    /// A listed device and its newest reading: what `find` returns for the
    /// reading's number and time (something the caller keeps of it), else a
    /// copy of it.
    pub fn device<K>(
        &self,
        device_id: &str,
        find: impl Fn(u64, SystemTime) -> Option<K>,
    ) -> Option<DeviceEntry<K>> {
        Some(self.device_entry(self.devices.get(device_id)?, find))
    }

    fn device_entry<K>(
        &self,
        device: &Device,
        find: impl Fn(u64, SystemTime) -> Option<K>,
    ) -> DeviceEntry<K> {
        let (info, newest) = device.view();
        let found = |seq, received_at| find(seq, received_at).map(LastReading::Found);
        let last_reading = match newest {
            NewestReading::Buffered(seq) => self.get(seq).map(|slot| {
                // The time as a copy would have it.
                let received_at =
                    SystemTime::UNIX_EPOCH + Duration::from_micros(slot.received_micros);
                found(seq, received_at)
                    .unwrap_or_else(|| LastReading::Copied(self.reading(seq, slot)))
            }),
            NewestReading::Kept(reading) => Some(
                found(reading.seq, reading.received_at)
                    .unwrap_or_else(|| LastReading::Copied(reading.clone())),
            ),
            NewestReading::None => None,
        };
        DeviceEntry { info, last_reading }
    }

    /// Up to `limit` listed devices whose id starts with `prefix`, after
    /// `after` when given, that `visible` lets through, in id order, as
    /// [`Self::device`] gives them; and whether more follow.
    pub fn devices<K>(
        &self,
        prefix: &str,
        after: Option<&str>,
        visible: impl Fn(&str) -> bool,
        limit: usize,
        find: impl Fn(u64, SystemTime) -> Option<K>,
    ) -> (Vec<DeviceEntry<K>>, bool) {
        let mut listed = self
            .devices
            .listed_from(prefix, after)
            .filter(|(id, _)| visible(id));
        let page: Vec<DeviceEntry<K>> = listed
            .by_ref()
            .take(limit)
            .map(|(_, device)| self.device_entry(device, &find))
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

    /// `Devices::presence`.
    pub fn presence(&self, device_id: &str) -> Option<Presence> {
        self.devices.presence(device_id)
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
        assert_eq!(std::mem::size_of::<Device>(), 168);
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
        let a = device(&buf, "a").unwrap();
        assert_eq!(described(&a).unwrap(), format!("{FIRST}:a-1"));
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
        let a = device(&buf, "a").unwrap();
        assert_eq!(described(&a).unwrap(), format!("{FIRST}:a-1"));
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
        let b = device(&buf, "b").unwrap();
        assert_eq!((described(&b), b.info.buffered), (None, 0));
        assert_eq!(buf.device_stats().kept_dropped, 1);
        let a = device(&buf, "a").unwrap();
        assert_eq!(
            (a.info.status, a.info.status_changed_micros),
            (ConnectionStatus::Offline, 6_000_000)
        );
        assert_eq!(buf.device_status("a"), ConnectionStatus::Offline);
        assert_eq!(buf.device_status("nobody"), ConnectionStatus::Unknown);

        // A new reading replaces the kept copy and frees its budget.
        push(&mut buf, "a", 7, "a-2");
        let a = device(&buf, "a").unwrap();
        assert_eq!(described(&a).unwrap(), format!("{}:a-2", FIRST + 6));
        assert_eq!(buf.device_stats().kept_bytes, 0);
        assert!(device(&buf, "").is_none() && device(&buf, "c").is_none());
    }

    /// A listed device, its newest reading copied (nothing is found).
    fn device(buf: &ReadingBuffer, device_id: &str) -> Option<DeviceEntry<()>> {
        buf.device(device_id, |_, _| None)
    }

    /// The tests' description of a device's newest reading.
    fn described(device: &DeviceEntry<()>) -> Option<String> {
        match device.last_reading.as_ref()? {
            LastReading::Copied(reading) => {
                let payload = String::from_utf8_lossy(&reading.payload);
                Some(format!("{}:{payload}", reading.seq))
            }
            LastReading::Found(()) => panic!("nothing is found"),
        }
    }

    fn nothing_found(_: u64, _: SystemTime) -> Option<()> {
        None
    }

    #[test]
    fn a_devices_newest_reading_is_what_find_found_for_it_else_a_copy() {
        let mut buf = buffer(2, usize::MAX).with_device_limits(DeviceLimits {
            max_devices: 10,
            max_kept_bytes: 100,
        });
        let first = push(&mut buf, "a", 1, "a-1");
        // Asked with the reading's number and time; what it found is
        // handed back as it is, and nothing is copied.
        let find = |seq: u64, at: SystemTime| Some((seq, at));
        let found = buf.device("a", find).unwrap().last_reading;
        assert_eq!(found, Some(LastReading::Found((first, at(1)))));
        let (page, _) = buf.devices("", None, |_| true, 10, find);
        assert_eq!(page[0].last_reading, found);
        // Evicted and kept: the same number and time.
        push_kind(&mut buf, "a", 2, MessageKind::Reply, "{}");
        push_kind(&mut buf, "a", 3, MessageKind::Status(None), "?");
        assert_eq!(buf.device("a", find).unwrap().last_reading, found);
        assert_eq!(
            described(&device(&buf, "a").unwrap()).unwrap(),
            format!("{first}:a-1")
        );
        // A newer reading is another.
        let second = push(&mut buf, "a", 4, "a-2");
        let found = buf.device("a", find).unwrap().last_reading;
        assert_eq!(found, Some(LastReading::Found((second, at(4)))));
    }

    #[test]
    fn devices_page_in_id_order_by_prefix() {
        let mut buf = buffer(1000, usize::MAX);
        for id in [
            "pump-2", "fan-1", "pump-10", "pump-1", "fan-2", "pumpkin", "",
        ] {
            push(&mut buf, id, 1, "x");
        }
        let ids = |page: &[DeviceEntry<()>]| -> Vec<String> {
            page.iter().map(|d| d.info.device_id.to_string()).collect()
        };
        let (page, more) = buf.devices("pump-", None, |_| true, 2, nothing_found);
        assert_eq!(
            (ids(&page), more),
            (vec!["pump-1".into(), "pump-10".into()], true)
        );
        let (page, more) = buf.devices("pump-", Some("pump-10"), |_| true, 2, nothing_found);
        assert_eq!((ids(&page), more), (vec!["pump-2".into()], false));
        let (page, _) = buf.devices("", None, |id| id != "fan-2", 10, nothing_found);
        assert_eq!(
            ids(&page),
            ["fan-1", "pump-1", "pump-10", "pump-2", "pumpkin"]
        );
        // A cursor before the prefix starts at the prefix.
        let (page, _) = buf.devices("pump", Some("a"), |_| true, 1, nothing_found);
        assert_eq!(ids(&page), ["pump-1"]);
        assert_eq!(buf.device_stats().known, 6);
    }
}
