//! The dispatcher: the task that moves persistent commands along, and
//! [`Dispatcher::deliver`], the one way a command is published.
//!
//! Each round looks at the devices with active commands (read from the log
//! when something changed here, and every tick) and the hub's word on
//! whether each is there ([`Presence`]):
//! - a device that is reachable (not OFFLINE, or it sent something itself
//!   since it said so) with QUEUED commands gets them published, oldest
//!   first: the devices ready in a round are delivered to by tasks of
//!   [`DEVICES_PER_DELIVERY`] devices each (at most [`DELIVERIES`] at once),
//!   each one claim (one transaction with a store), one wave of publishes
//!   and one record of what went out at a time, so that each device's
//!   commands leave in order and a store sees few statements;
//! - a device that went OFFLINE after some of its commands were published
//!   gets those back to QUEUED (or FAILED after the last attempt): the log
//!   compares the publish times with the time of the OFFLINE message, so
//!   doing it twice does nothing;
//! - every [`TICK`], commands past their `ttl` are EXPIRED and ended ones
//!   past the retention forgotten.
//!
//! A round starts every [`TICK`] (which also sees commands queued here and
//! on other replicas), when a delivery, a cancel or (with an in-flight
//! limit) a reply is done, and, while some device waits, when the hub takes
//! new messages (at most every [`COALESCE`], so a busy ingest does not turn
//! into busy rounds, and from the list already read). So a device that
//! returns gets its commands well within a second.
//!
//! Replies are recorded by a task of their own, fed through the
//! [`ReplyInbox`] (a bounded queue that never blocks the MQTT event loop:
//! a reply that does not fit is dropped and counted, and its command stays
//! SENT until it is published again or expires).

use std::{
    collections::HashMap,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::future::{join_all, BoxFuture};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    inbox::{PendingReply, ReplyInbox, ReplyReceiver},
    log::{ActiveDevice, CommandLog, Replied},
    Command, CommandLimits, CommandState, Feed, Publication,
};
use crate::{buffer::Presence, hub::ReadingHub, sync};

/// How often a round runs when nothing else starts one.
pub const TICK: Duration = Duration::from_secs(1);
/// The shortest time between rounds started by the hub's new messages.
pub const COALESCE: Duration = Duration::from_millis(20);
/// Ticks between two counts of the commands by state.
pub const COUNT_EVERY: u64 = 10;
/// Deliveries at once, each to up to [`DEVICES_PER_DELIVERY`] devices.
pub const DELIVERIES: usize = 16;
pub const DEVICES_PER_DELIVERY: usize = 256;
/// Commands of one device one claim takes, and of all its devices: a
/// wave of publishes well within the MQTT client's queue (1 024).
pub const CLAIM_BATCH: usize = 256;
pub const CLAIM_TOTAL: usize = 512;
/// How long a reply to a command being published (or one the store failed
/// to record) waits before it is recorded again, and how many times:
/// together longer than a publish may wait for the broker's
/// acknowledgement.
pub const REPLY_RETRY: Duration = Duration::from_millis(20);
pub const REPLY_RETRIES: u32 = 500;

/// Publishes a command where its device gets it. The MQTT side implements
/// it; the future resolves once the broker acknowledged the publish.
pub trait Transport: Send + Sync + 'static {
    fn publish(&self, publication: Publication) -> BoxFuture<'static, Result<(), TransportError>>;
}

/// Why a publish failed; the command stays QUEUED.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// The dispatcher's handle. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    shared: Arc<Shared>,
}

struct Shared {
    log: Arc<dyn CommandLog>,
    feed: Feed,
    hub: ReadingHub,
    transport: Arc<dyn Transport>,
    limits: CommandLimits,
    wake: Notify,
    replies: ReplyInbox,
    /// One delivery per device at a time on this instance (the log keeps
    /// instances apart): the device's lock, while anyone holds or waits for
    /// it. A std mutex held to look up or remove an entry.
    delivering: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    deliveries: Arc<Semaphore>,
    /// The log's counts by state, as of the last tick.
    counts: Mutex<Vec<(CommandState, u64)>>,
}

impl Dispatcher {
    /// Starts the dispatcher's task and the replies' task, both until
    /// `shutdown`.
    pub fn start(
        log: Arc<dyn CommandLog>,
        feed: Feed,
        hub: ReadingHub,
        transport: Arc<dyn Transport>,
        limits: CommandLimits,
        (replies, received): (ReplyInbox, ReplyReceiver),
        shutdown: CancellationToken,
    ) -> Self {
        let dispatcher = Self {
            shared: Arc::new(Shared {
                log,
                feed,
                hub,
                transport,
                limits,
                wake: Notify::new(),
                replies,
                delivering: Mutex::default(),
                deliveries: Arc::new(Semaphore::new(DELIVERIES)),
                counts: Mutex::default(),
            }),
        };
        tokio::spawn(dispatcher.clone().run(shutdown.clone()));
        tokio::spawn(dispatcher.clone().record_replies(received.0, shutdown));
        dispatcher
    }

    /// Starts a round soon.
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Whether `device_id` can take a command now.
    pub fn reachable(&self, device_id: &str) -> bool {
        let presence = self.shared.hub.presence([device_id]);
        presence[0].is_none_or(|p| p.reachable())
    }

    pub fn counts(&self) -> Vec<(CommandState, u64)> {
        sync::lock(&self.shared.counts).clone()
    }

    /// Publishes the QUEUED commands of `device_ids`, each device's oldest
    /// first, as far as the in-flight limit lets, and returns those now
    /// SENT. Waits for other deliveries to these devices on this instance
    /// to end first.
    pub async fn deliver(&self, device_ids: &[String]) -> Vec<Command> {
        let mut ids = device_ids.to_vec();
        // One order for every delivery: two never wait for each other.
        ids.sort_unstable();
        ids.dedup();
        let locks: Vec<_> = {
            let mut delivering = sync::lock(&self.shared.delivering);
            ids.iter()
                .map(|id| delivering.entry(id.clone()).or_default().clone())
                .collect()
        };
        let mut turns = Vec::with_capacity(locks.len());
        for lock in &locks {
            turns.push(lock.clone().lock_owned().await);
        }
        let sent = self.deliver_locked(ids.clone()).await;
        drop(turns);
        drop(locks);
        let mut delivering = sync::lock(&self.shared.delivering);
        for id in &ids {
            // Only the map's reference left: nobody holds or waits for it.
            if delivering
                .get(id)
                .is_some_and(|l| Arc::strong_count(l) == 1)
            {
                delivering.remove(id);
            }
        }
        sent
    }

    async fn deliver_locked(&self, device_ids: Vec<String>) -> Vec<Command> {
        let shared = &self.shared;
        let mut sent = Vec::new();
        loop {
            let now = SystemTime::now();
            let in_flight = shared.limits.in_flight_per_device;
            let limits = (CLAIM_BATCH, CLAIM_TOTAL);
            let claimed = match shared.log.claim(&device_ids, limits, in_flight, now).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    warn!(devices = device_ids.len(), %error, "claiming commands to publish failed");
                    break;
                }
            };
            // Created in order and first polled in order: each publish is
            // queued on the MQTT client when first polled, so each
            // device's leave in the order they were accepted.
            let publishes = claimed.iter().map(|c| {
                let late = c.expire_time <= SystemTime::now();
                shared.feed.publishing(c.id);
                let publish = (!late).then(|| shared.transport.publish(c.publish.clone()));
                async move {
                    match publish {
                        Some(publish) => publish.await.map_err(|e| e.to_string()),
                        None => Err("its ttl passed".to_owned()),
                    }
                }
            });
            let outcomes = join_all(publishes).await;
            let at = SystemTime::now();
            let (mut published, mut unpublished) = (Vec::new(), Vec::new());
            for (claimed, outcome) in claimed.iter().zip(outcomes) {
                match outcome {
                    Ok(()) => published.push(claimed.id),
                    Err(reason) => {
                        debug!(device_id = claimed.device_id, command_id = %claimed.id, reason, "command not published; stays queued");
                        unpublished.push(claimed.id);
                    }
                }
            }
            if let Err(error) = shared.log.release(&unpublished).await {
                warn!(%error, "releasing unpublished commands failed; they are claimed until the lease ends");
            }
            match shared.log.sent(&published, at).await {
                Ok(now_sent) => {
                    // Published but not SENT: it ended meanwhile (a
                    // cancel), and its end may have passed the feed first.
                    for id in &published {
                        if !now_sent.iter().any(|c| c.id == *id) {
                            shared.feed.ended(*id);
                        }
                    }
                    sent.extend(now_sent);
                }
                Err(error) => {
                    warn!(%error, "recording published commands failed; they may be published again")
                }
            }
            if !unpublished.is_empty() {
                break; // the link is down: the next round tries again
            }
            // A full claim: there may be more.
            if claimed.len() < CLAIM_TOTAL {
                break;
            }
        }
        sent
    }

    /// The dispatcher's task. The devices with active commands are read
    /// from the log when something changed here (a wake-up) and every
    /// tick (for other replicas' changes); rounds started by the hub's new
    /// messages look at that list again.
    async fn run(self, shutdown: CancellationToken) {
        let shared = &self.shared;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut active, mut stale, mut ticks) = (Vec::new(), true, 0u64);
        loop {
            if stale {
                match shared.log.active_devices().await {
                    Ok(now) => active = now,
                    Err(error) => warn!(%error, "reading the devices with active commands failed"),
                }
            }
            let (waiting, changed) = self.round(&active).await;
            stale = changed;
            let next_seq = shared.hub.next_seq();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    self.housekeeping(ticks).await;
                    ticks += 1;
                    stale = true;
                }
                () = shared.wake.notified() => stale = true,
                () = shared.hub.pushed(next_seq), if waiting => {
                    tokio::time::sleep(COALESCE).await;
                }
            }
        }
    }

    /// One look at `active`, the devices with active commands; returns
    /// whether some device waits to come back, and whether this changed
    /// what the log holds.
    async fn round(&self, active: &[ActiveDevice]) -> (bool, bool) {
        let shared = &self.shared;
        let presence = shared
            .hub
            .presence(active.iter().map(|d| d.device_id.as_str()));
        let (mut waiting, mut changed) = (false, false);
        let mut ready = Vec::new();
        for (device, presence) in active.iter().zip(presence) {
            changed |= self.went_away(device, presence).await;
            if device.queued == 0 {
                continue;
            }
            if !presence.is_none_or(|p| p.reachable()) {
                waiting = true;
                continue;
            }
            if sync::lock(&shared.delivering).contains_key(&device.device_id) {
                continue; // being delivered; its end starts a round
            }
            ready.push(device.device_id.clone());
        }
        for devices in ready.chunks(DEVICES_PER_DELIVERY) {
            let Ok(permit) = shared.deliveries.clone().try_acquire_owned() else {
                break; // the next round takes the rest
            };
            let (dispatcher, devices) = (self.clone(), devices.to_vec());
            // Marked before the task runs, so that the next round skips them.
            {
                let mut delivering = sync::lock(&shared.delivering);
                for id in &devices {
                    delivering.entry(id.clone()).or_default();
                }
            }
            tokio::spawn(async move {
                let _permit = permit;
                dispatcher.deliver(&devices).await;
                dispatcher.wake();
            });
        }
        (waiting, changed)
    }

    /// Sends `device`'s SENT commands back to QUEUED (or FAILED) if it went
    /// OFFLINE after they were published; returns whether it did.
    async fn went_away(&self, device: &ActiveDevice, presence: Option<Presence>) -> bool {
        let (Some(oldest_sent), Some(away)) = (
            device.oldest_sent_at,
            presence.and_then(|p| p.away_since_micros()),
        ) else {
            return false;
        };
        let away = UNIX_EPOCH + Duration::from_micros(away);
        if away <= oldest_sent {
            return false;
        }
        let max_attempts = self.shared.limits.max_attempts;
        match self
            .shared
            .log
            .went_away(&device.device_id, away, max_attempts)
            .await
        {
            Ok(changed) => changed > 0,
            Err(error) => {
                warn!(device_id = device.device_id, %error, "returning commands of a device that went away failed");
                false
            }
        }
    }

    /// Expiry and retention once a tick, the counts every
    /// [`COUNT_EVERY`] ticks (with a store they count the whole table).
    async fn housekeeping(&self, tick: u64) {
        let (log, now) = (&self.shared.log, SystemTime::now());
        if let Err(error) = log.expire(now).await {
            warn!(%error, "expiring commands failed");
        }
        let before = now.checked_sub(self.shared.limits.retention);
        if let Some(before) = before {
            if let Err(error) = log.forget(before).await {
                warn!(%error, "forgetting ended commands failed");
            }
        }
        if tick.is_multiple_of(COUNT_EVERY) {
            match log.counts().await {
                Ok(counts) => *sync::lock(&self.shared.counts) = counts,
                Err(error) => warn!(%error, "counting commands failed"),
            }
        }
    }

    /// The replies' task: records each reply; one that came while its
    /// command was being published is recorded again a moment later.
    async fn record_replies(
        self,
        mut received: mpsc::Receiver<PendingReply>,
        shutdown: CancellationToken,
    ) {
        loop {
            let (device_id, id, reply, tries) = tokio::select! {
                () = shutdown.cancelled() => return,
                Some(reply) = received.recv() => reply,
                else => return,
            };
            let counters = self.shared.feed.counters();
            let outcome = self.shared.log.replied(&device_id, id, reply.clone()).await;
            match outcome {
                // The device may have room for its next command.
                Ok(Replied::Recorded(_)) if self.shared.limits.in_flight_per_device.is_some() => {
                    self.wake()
                }
                Ok(Replied::Recorded(_)) => {}
                // Published a moment ago, or the store did not answer:
                // again shortly (the store's outage is logged once).
                Ok(Replied::Publishing) | Err(_) if tries < REPLY_RETRIES => {
                    if let Err(error) = &outcome {
                        if tries == 0 {
                            warn!(device_id, command_id = %id, %error, "recording a reply failed; trying again");
                        }
                    }
                    let dispatcher = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(REPLY_RETRY).await;
                        dispatcher
                            .shared
                            .replies
                            .push((device_id, id, reply, tries + 1));
                    });
                }
                Ok(Replied::Publishing | Replied::NotActive) => {
                    counters.stray_replies.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    warn!(device_id, command_id = %id, %error, "recording a reply failed")
                }
            }
        }
    }
}
