//! [`MemoryLog`]: persistent commands without a store. A restart loses
//! them (documented in docs/api.md).
//!
//! Bounds: at most `max_queued` active commands (the insert's quota), at
//! most [`MemoryLog::new`]'s `max_ended` ended ones, and [`MAX_BYTES`] of
//! what they hold (published payloads, parameters, replies' results): the
//! oldest ended are forgotten first to make room (counted as forgotten
//! early), and a command that would not fit even then is refused. An ended
//! command gives up its published bytes. So the log holds at most
//! `max_queued + max_ended` records of a few hundred bytes each, and
//! [`MAX_BYTES`] besides.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Mutex, MutexGuard},
    time::SystemTime,
};

use futures_util::future::{self, BoxFuture, FutureExt};
use uuid::Uuid;

use super::{
    log::{
        ActiveDevice, Claimed, CommandLog, CommandPage, CommandQuery, LogError, LogResult, Replied,
    },
    Command, CommandState, Feed, NewCommand, Publication,
};
use crate::{replies::DeviceReply, sync};

/// Most bytes the kept commands' payloads, parameters and replies take.
pub const MAX_BYTES: usize = 64 << 20;

/// Most commands one ListCommands page looks at, matching or not.
pub const MAX_EXAMINED_PER_PAGE: usize = 10_000;

/// The log without a store. Every method takes the one std mutex (see
/// [`crate::sync`]) for a few map operations, never across an `.await`:
/// the futures it returns are ready at once.
pub struct MemoryLog {
    inner: Mutex<Inner>,
    feed: Feed,
}

#[derive(Default)]
struct Inner {
    records: HashMap<Uuid, Record>,
    /// Every kept command by id: ids sort by creation (UUID v7), the order
    /// ListCommands pages in.
    order: BTreeSet<Uuid>,
    /// Active commands by device.
    devices: HashMap<String, DeviceQueue>,
    /// Active commands by the end of their `ttl`.
    expiring: BTreeSet<(SystemTime, Uuid)>,
    /// Ended commands by when they ended, oldest first.
    ended: BTreeSet<(SystemTime, Uuid)>,
    /// Kept commands by state.
    counts: [u64; CommandState::ALL.len()],
    /// Acceptance order.
    next_no: u64,
    max_ended: usize,
    /// What the records' [`Record::bytes`] add up to.
    bytes: usize,
}

struct Record {
    command: Command,
    /// What is published; dropped once the command ended.
    publish: Option<Publication>,
    /// When it was last published.
    sent_at: Option<SystemTime>,
    claimed: bool,
    /// Its place in its device's queue.
    no: u64,
    /// What it holds, as counted against [`MAX_BYTES`].
    bytes: usize,
}

/// The bytes a command holds: its payload while it is active (which holds
/// the parameters too), the parameters again, and its reply's result.
fn size(payload: Option<&Publication>, params_len: usize, reply: Option<&DeviceReply>) -> usize {
    let result = reply
        .and_then(|r| r.result.as_ref())
        .map_or(0, |r| serde_json::to_vec(r).map_or(0, |v| v.len()));
    payload.map_or(0, |p| p.payload.len()) + params_len + result
}

/// A device's active commands.
#[derive(Default)]
struct DeviceQueue {
    /// QUEUED and not claimed, in acceptance order.
    queued: BTreeMap<u64, Uuid>,
    /// Claimed, being published.
    claimed: BTreeMap<u64, Uuid>,
    /// SENT, with when each was last published.
    sent: HashMap<Uuid, SystemTime>,
}

impl DeviceQueue {
    fn active(&self) -> usize {
        self.queued.len() + self.claimed.len() + self.sent.len()
    }
}

impl MemoryLog {
    /// A log that keeps at most `max_ended` ended commands, handing its
    /// changes to `feed`.
    pub fn new(feed: Feed, max_ended: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                max_ended,
                ..Inner::default()
            }),
            feed,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        sync::lock(&self.inner)
    }

    /// Counts and hands on the changes made. Called with the log's lock
    /// still held: a change handed on after the lock was released could
    /// reach the feed after a later one (a reply's SUCCEEDED after the SENT
    /// of the command the in-flight limit then let out), and watchers must
    /// see changes in the order they were made.
    fn changed(&self, changes: Vec<Command>) -> Vec<Command> {
        for command in &changes {
            self.feed.count(command);
            self.feed.send(command);
        }
        changes
    }
}

impl Inner {
    fn set_state(&mut self, id: Uuid, state: CommandState, at: SystemTime) -> Option<Command> {
        let record = self.records.get_mut(&id)?;
        self.counts[record.command.state as usize] -= 1;
        self.counts[state as usize] += 1;
        record.command.state = state;
        record.command.update_time = at;
        Some(record.command.clone())
    }

    /// Ends an active command in `state`.
    fn end(
        &mut self,
        id: Uuid,
        state: CommandState,
        at: SystemTime,
        forgotten: &mut u64,
    ) -> Option<Command> {
        let record = self.records.get_mut(&id)?;
        if record.command.state.ended() {
            return None;
        }
        if let Some(publish) = record.publish.take() {
            record.bytes -= publish.payload.len();
            self.bytes -= publish.payload.len();
        }
        record.claimed = false;
        let (device_id, no, expire) = (
            record.command.device_id.clone(),
            record.no,
            record.command.expire_time,
        );
        if let Some(queue) = self.devices.get_mut(&device_id) {
            queue.queued.remove(&no);
            queue.claimed.remove(&no);
            queue.sent.remove(&id);
            if queue.active() == 0 {
                self.devices.remove(&device_id);
            }
        }
        self.expiring.remove(&(expire, id));
        self.ended.insert((at, id));
        let ended = self.set_state(id, state, at);
        while self.ended.len() > self.max_ended {
            let Some((_, oldest)) = self.ended.pop_first() else {
                break;
            };
            self.remove(oldest);
            *forgotten += 1;
        }
        ended
    }

    fn remove(&mut self, id: Uuid) {
        if let Some(record) = self.records.remove(&id) {
            self.bytes -= record.bytes;
            self.counts[record.command.state as usize] -= 1;
            self.order.remove(&id);
        }
    }
}

impl CommandLog for MemoryLog {
    fn insert(
        &self,
        new: NewCommand,
        max: usize,
        per_device: usize,
    ) -> BoxFuture<'_, LogResult<Command>> {
        let mut inner = self.inner();
        let device_active = inner.devices.get(&new.device_id).map_or(0, |q| q.active());
        let params_len = new
            .params
            .as_ref()
            .map_or(0, |p| serde_json::to_vec(p).map_or(0, |v| v.len()));
        let bytes = size(Some(&new.publish), params_len, None);
        let mut forgotten = 0;
        while inner.bytes + bytes > MAX_BYTES {
            let Some((_, oldest)) = inner.ended.pop_first() else {
                break;
            };
            inner.remove(oldest);
            forgotten += 1;
        }
        self.count_forgotten(forgotten);
        let refused = if inner.bytes + bytes > MAX_BYTES {
            Some(LogError::NoRoom(MAX_BYTES))
        } else if inner.expiring.len() >= max {
            Some(LogError::Full(max))
        } else if device_active >= per_device {
            Some(LogError::DeviceFull {
                device_id: new.device_id.clone(),
                max: per_device,
            })
        } else {
            None
        };
        if let Some(refused) = refused {
            self.feed
                .counters()
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return future::ready(Err(refused)).boxed();
        }
        let command = Command {
            id: new.id,
            device_id: new.device_id,
            name: new.name,
            params: new.params,
            state: CommandState::Queued,
            create_time: new.create_time,
            expire_time: new.expire_time,
            update_time: new.create_time,
            attempts: 0,
            reply: None,
        };
        let no = inner.next_no;
        inner.next_no += 1;
        inner
            .devices
            .entry(command.device_id.clone())
            .or_default()
            .queued
            .insert(no, command.id);
        inner.expiring.insert((command.expire_time, command.id));
        inner.order.insert(command.id);
        inner.counts[CommandState::Queued as usize] += 1;
        inner.records.insert(
            command.id,
            Record {
                command: command.clone(),
                publish: Some(new.publish),
                sent_at: None,
                claimed: false,
                no,
                bytes,
            },
        );
        inner.bytes += bytes;
        self.changed(vec![command.clone()]);
        drop(inner);
        future::ready(Ok(command)).boxed()
    }

    fn get(&self, id: Uuid) -> BoxFuture<'_, LogResult<Option<Command>>> {
        let found = self.inner().records.get(&id).map(|r| r.command.clone());
        future::ready(Ok(found)).boxed()
    }

    fn list<'a>(&'a self, query: &'a CommandQuery) -> BoxFuture<'a, LogResult<CommandPage>> {
        let inner = self.inner();
        let mut page = CommandPage::default();
        let older = match query.before {
            Some(before) => inner.order.range(..before),
            None => inner.order.range(..),
        };
        let mut examined = 0;
        for id in older.rev() {
            if page.commands.len() == query.page_size || examined == MAX_EXAMINED_PER_PAGE {
                page.next = page.commands.last().map(|c| c.id).or(page.next);
                break;
            }
            examined += 1;
            page.next = Some(*id);
            let command = &inner.records[id].command;
            if query.matches(command) {
                page.commands.push(command.clone());
            }
        }
        if page.commands.len() < query.page_size && examined < MAX_EXAMINED_PER_PAGE {
            page.next = None; // looked at everything
        }
        future::ready(Ok(page)).boxed()
    }

    fn cancel(&self, id: Uuid) -> BoxFuture<'_, LogResult<Result<Command, Option<CommandState>>>> {
        let mut inner = self.inner();
        let mut forgotten = 0;
        let outcome = match inner.records.get(&id).map(|r| r.command.state) {
            None => Err(None),
            Some(state) if state.ended() => Err(Some(state)),
            Some(_) => inner
                .end(
                    id,
                    CommandState::Cancelled,
                    SystemTime::now(),
                    &mut forgotten,
                )
                .ok_or(None),
        };
        if let Ok(cancelled) = &outcome {
            self.changed(vec![cancelled.clone()]);
        }
        drop(inner);
        self.count_forgotten(forgotten);
        future::ready(Ok(outcome)).boxed()
    }

    fn claim<'a>(
        &'a self,
        device_ids: &'a [String],
        (limit, total): (usize, usize),
        in_flight: Option<u32>,
        now: SystemTime,
    ) -> BoxFuture<'a, LogResult<Vec<Claimed>>> {
        let mut inner = self.inner();
        let inner = &mut *inner;
        let mut claimed = Vec::new();
        for device_id in device_ids {
            if claimed.len() >= total {
                break;
            }
            let Some(queue) = inner.devices.get_mut(device_id) else {
                continue;
            };
            if !queue.claimed.is_empty() {
                continue; // being published
            }
            let room = in_flight.map_or(usize::MAX, |n| {
                (n as usize).saturating_sub(queue.sent.len())
            });
            let candidates: Vec<(u64, Uuid)> =
                queue.queued.iter().map(|(n, id)| (*n, *id)).collect();
            let mut taken = 0;
            for (no, id) in candidates {
                if taken == limit.min(room) || claimed.len() == total {
                    break;
                }
                let Some(record) = inner.records.get_mut(&id) else {
                    continue;
                };
                let (Some(publish), true) = (&record.publish, record.command.expire_time > now)
                else {
                    continue; // expired: the next expiry pass ends it
                };
                record.claimed = true;
                claimed.push(Claimed {
                    id,
                    device_id: device_id.clone(),
                    expire_time: record.command.expire_time,
                    publish: publish.clone(),
                });
                taken += 1;
                queue.queued.remove(&no);
                queue.claimed.insert(no, id);
            }
        }
        future::ready(Ok(claimed)).boxed()
    }

    fn sent<'a>(
        &'a self,
        ids: &'a [Uuid],
        at: SystemTime,
    ) -> BoxFuture<'a, LogResult<Vec<Command>>> {
        let mut inner = self.inner();
        let mut sent = Vec::new();
        for id in ids {
            let Some(record) = inner.records.get_mut(id) else {
                continue;
            };
            if !record.claimed || record.command.state != CommandState::Queued {
                continue;
            }
            record.claimed = false;
            record.sent_at = Some(at);
            record.command.attempts += 1;
            let (device_id, no) = (record.command.device_id.clone(), record.no);
            if let Some(queue) = inner.devices.get_mut(&device_id) {
                queue.claimed.remove(&no);
                queue.sent.insert(*id, at);
            }
            sent.extend(inner.set_state(*id, CommandState::Sent, at));
        }
        let sent = self.changed(sent);
        drop(inner);
        future::ready(Ok(sent)).boxed()
    }

    fn release<'a>(&'a self, ids: &'a [Uuid]) -> BoxFuture<'a, LogResult<()>> {
        let mut inner = self.inner();
        for id in ids {
            let Some(record) = inner.records.get_mut(id) else {
                continue;
            };
            if !record.claimed {
                continue;
            }
            record.claimed = false;
            let (device_id, no) = (record.command.device_id.clone(), record.no);
            if let Some(queue) = inner.devices.get_mut(&device_id) {
                queue.claimed.remove(&no);
                queue.queued.insert(no, *id);
            }
        }
        future::ready(Ok(())).boxed()
    }

    fn replied<'a>(
        &'a self,
        device_id: &'a str,
        id: Uuid,
        reply: DeviceReply,
    ) -> BoxFuture<'a, LogResult<Replied>> {
        let mut inner = self.inner();
        let mut forgotten = 0;
        let outcome = match inner.records.get_mut(&id) {
            Some(r) if r.command.device_id == device_id && !r.command.state.ended() => {
                if r.claimed {
                    Replied::Publishing
                } else {
                    let state = match reply.ok {
                        true => CommandState::Succeeded,
                        false => CommandState::Failed,
                    };
                    let at = reply.received_at;
                    let result = size(None, 0, Some(&reply));
                    r.bytes += result;
                    r.command.reply = Some(reply);
                    inner.bytes += result;
                    match inner.end(id, state, at, &mut forgotten) {
                        Some(ended) => Replied::Recorded(Box::new(ended)),
                        None => Replied::NotActive,
                    }
                }
            }
            _ => Replied::NotActive,
        };
        if let Replied::Recorded(ended) = &outcome {
            self.changed(vec![(**ended).clone()]);
        }
        drop(inner);
        self.count_forgotten(forgotten);
        future::ready(Ok(outcome)).boxed()
    }

    fn went_away<'a>(
        &'a self,
        device_id: &'a str,
        at: SystemTime,
        max_attempts: u32,
    ) -> BoxFuture<'a, LogResult<usize>> {
        let mut inner = self.inner();
        let mut forgotten = 0;
        let Some(queue) = inner.devices.get(device_id) else {
            return future::ready(Ok(0)).boxed();
        };
        let mut away: Vec<Uuid> = queue
            .sent
            .iter()
            .filter(|(_, sent_at)| **sent_at < at)
            .map(|(id, _)| *id)
            .collect();
        away.sort_by_key(|id| inner.records.get(id).map(|r| r.no));
        let now = SystemTime::now();
        let mut changes = Vec::new();
        for id in away {
            let Some(record) = inner.records.get(&id) else {
                continue;
            };
            if record.command.attempts >= max_attempts {
                changes.extend(inner.end(id, CommandState::Failed, now, &mut forgotten));
                continue;
            }
            let no = record.no;
            if let Some(queue) = inner.devices.get_mut(device_id) {
                queue.sent.remove(&id);
                queue.queued.insert(no, id);
            }
            changes.extend(inner.set_state(id, CommandState::Queued, now));
        }
        let changed = self.changed(changes).len();
        drop(inner);
        self.count_forgotten(forgotten);
        future::ready(Ok(changed)).boxed()
    }

    fn expire(&self, now: SystemTime) -> BoxFuture<'_, LogResult<usize>> {
        let mut inner = self.inner();
        let mut forgotten = 0;
        let mut expired = Vec::new();
        while let Some(&(at, id)) = inner.expiring.first() {
            if at > now {
                break;
            }
            inner.expiring.pop_first();
            expired.extend(inner.end(id, CommandState::Expired, now, &mut forgotten));
        }
        let expired = self.changed(expired).len();
        drop(inner);
        self.count_forgotten(forgotten);
        future::ready(Ok(expired)).boxed()
    }

    fn forget(&self, before: SystemTime) -> BoxFuture<'_, LogResult<usize>> {
        let mut inner = self.inner();
        let mut forgotten = 0;
        while let Some(&(at, id)) = inner.ended.first() {
            if at >= before {
                break;
            }
            inner.ended.pop_first();
            inner.remove(id);
            forgotten += 1;
        }
        future::ready(Ok(forgotten)).boxed()
    }

    fn active_devices(&self) -> BoxFuture<'_, LogResult<Vec<ActiveDevice>>> {
        let inner = self.inner();
        let devices = inner
            .devices
            .iter()
            .map(|(device_id, queue)| ActiveDevice {
                device_id: device_id.clone(),
                queued: queue.queued.len() as u32,
                sent: queue.sent.len() as u32,
                oldest_sent_at: queue.sent.values().min().copied(),
            })
            .collect();
        future::ready(Ok(devices)).boxed()
    }

    fn counts(&self) -> BoxFuture<'_, LogResult<Vec<(CommandState, u64)>>> {
        let inner = self.inner();
        let counts = CommandState::ALL
            .iter()
            .map(|&s| (s, inner.counts[s as usize]))
            .collect();
        future::ready(Ok(counts)).boxed()
    }
}

impl MemoryLog {
    fn count_forgotten(&self, forgotten: u64) {
        if forgotten > 0 {
            self.feed
                .counters()
                .forgotten_early
                .fetch_add(forgotten, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
