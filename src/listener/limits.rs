//! How many connections and TLS handshakes the gRPC port holds: caps
//! overall and per remote IP, each refusal counted by reason. The accept
//! loop asks for a slot and never waits for one: over a cap, the connection
//! is closed at once, so idle or stalled peers cannot hold the loop (or the
//! health check behind it).
//!
//! Owns the counts and their lock; never touches a socket.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use super::ResponseBudget;
use crate::{config::ConnectionLimits, sync};

/// What a slot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An open connection, from accept until it closes.
    Connection,
    /// A TLS handshake in progress.
    Handshake,
}

/// Connections closed by the listener, by reason; read by the stats line
/// (`connections_closed`) and `/metrics` (`devicehub_connections_closed_total`).
#[derive(Debug, Default)]
pub struct ListenerCounters {
    pub over_connections: AtomicU64,
    pub over_connections_per_ip: AtomicU64,
    pub over_handshakes: AtomicU64,
    pub over_handshakes_per_ip: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub idle: AtomicU64,
}

impl ListenerCounters {
    /// Every reason with its count: the one list `/metrics` and the stats
    /// line show.
    pub fn closed(&self) -> [(&'static str, u64); 7] {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("max_connections", load(&self.over_connections)),
            (
                "max_connections_per_ip",
                load(&self.over_connections_per_ip),
            ),
            ("max_handshakes", load(&self.over_handshakes)),
            ("max_handshakes_per_ip", load(&self.over_handshakes_per_ip)),
            ("handshake_timeout", load(&self.handshake_timeouts)),
            ("handshake_failed", load(&self.handshake_failures)),
            ("no_stream", load(&self.idle)),
        ]
    }
}

#[derive(Default)]
struct Counts {
    connections: usize,
    handshakes: usize,
    /// Connections and handshakes per remote IP; an entry goes when both
    /// reach zero, so the map holds at most one entry per open connection.
    per_ip: HashMap<IpAddr, (usize, usize)>,
}

/// The listener's slots. A cheap handle: clones share the counts.
#[derive(Clone)]
pub struct Slots {
    limits: ConnectionLimits,
    // A std mutex: held for a few additions per accept and per close, never
    // across an `.await`.
    counts: Arc<Mutex<Counts>>,
    pub counters: Arc<ListenerCounters>,
}

impl Slots {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            counts: Arc::default(),
            counters: Arc::default(),
        }
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// A read-only view of the counts, for `/metrics` and the stats line.
    pub fn stats(&self, responses: ResponseBudget) -> ListenerStats {
        ListenerStats {
            counts: self.counts.clone(),
            counters: self.counters.clone(),
            responses,
        }
    }

    /// A slot of `kind` for a peer at `ip`, or `None` (counted) when a cap
    /// is reached.
    pub fn take(&self, kind: Kind, ip: IpAddr) -> Option<Slot> {
        let mut counts = sync::lock(&self.counts);
        let (total, max, max_per_ip, over, over_per_ip) = match kind {
            Kind::Connection => (
                counts.connections,
                self.limits.max_connections,
                self.limits.max_connections_per_ip,
                &self.counters.over_connections,
                &self.counters.over_connections_per_ip,
            ),
            Kind::Handshake => (
                counts.handshakes,
                self.limits.max_handshakes,
                self.limits.max_handshakes_per_ip,
                &self.counters.over_handshakes,
                &self.counters.over_handshakes_per_ip,
            ),
        };
        if total >= max {
            over.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let of_ip = counts.per_ip.get(&ip).copied().unwrap_or_default();
        if pick(of_ip, kind) >= max_per_ip {
            over_per_ip.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *pick_mut(counts.per_ip.entry(ip).or_default(), kind) += 1;
        match kind {
            Kind::Connection => counts.connections += 1,
            Kind::Handshake => counts.handshakes += 1,
        }
        Some(Slot {
            counts: self.counts.clone(),
            kind,
            ip,
        })
    }
}

/// What the listener holds and has closed, read-only (the accept loop
/// alone takes and gives back slots).
#[derive(Clone)]
pub struct ListenerStats {
    counts: Arc<Mutex<Counts>>,
    counters: Arc<ListenerCounters>,
    /// The response bytes in flight (`in_flight.rs`).
    pub responses: ResponseBudget,
}

impl ListenerStats {
    /// Connections open now, TLS handshakes in progress included: what
    /// `--max-connections` caps.
    pub fn connections(&self) -> usize {
        sync::lock(&self.counts).connections
    }

    /// See [`ListenerCounters::closed`].
    pub fn closed(&self) -> [(&'static str, u64); 7] {
        self.counters.closed()
    }
}

fn pick((connections, handshakes): (usize, usize), kind: Kind) -> usize {
    match kind {
        Kind::Connection => connections,
        Kind::Handshake => handshakes,
    }
}

fn pick_mut(entry: &mut (usize, usize), kind: Kind) -> &mut usize {
    match kind {
        Kind::Connection => &mut entry.0,
        Kind::Handshake => &mut entry.1,
    }
}

/// A connection's or handshake's place under the caps, given back on drop.
pub struct Slot {
    counts: Arc<Mutex<Counts>>,
    kind: Kind,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = sync::lock(&self.counts);
        match self.kind {
            Kind::Connection => counts.connections -= 1,
            Kind::Handshake => counts.handshakes -= 1,
        }
        if let Some(entry) = counts.per_ip.get_mut(&self.ip) {
            *pick_mut(entry, self.kind) -= 1;
            if *entry == (0, 0) {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 3,
            max_connections_per_ip: 2,
            max_handshakes: 2,
            max_handshakes_per_ip: 1,
            ..ConnectionLimits::default()
        }
    }

    #[test]
    fn caps_per_ip_and_overall_and_gives_slots_back() {
        let slots = Slots::new(limits());
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let a1 = slots.take(Kind::Connection, a).unwrap();
        let _a2 = slots.take(Kind::Connection, a).unwrap();
        assert!(slots.take(Kind::Connection, a).is_none(), "per-IP cap");
        let _b1 = slots.take(Kind::Connection, b).unwrap();
        assert!(slots.take(Kind::Connection, c).is_none(), "overall cap");
        let counters = &slots.counters;
        assert_eq!(counters.over_connections_per_ip.load(Ordering::Relaxed), 1);
        assert_eq!(counters.over_connections.load(Ordering::Relaxed), 1);
        drop(a1);
        assert_eq!(slots.stats(ResponseBudget::new(1)).connections(), 2);
        let _c1 = slots.take(Kind::Connection, c).unwrap();

        // Handshakes are counted apart from connections.
        let h = slots.take(Kind::Handshake, a).unwrap();
        assert!(slots.take(Kind::Handshake, a).is_none());
        let _hb = slots.take(Kind::Handshake, b).unwrap();
        assert!(slots.take(Kind::Handshake, c).is_none());
        drop(h);
        assert!(slots.take(Kind::Handshake, a).is_some());
    }

    #[test]
    fn forgets_an_ip_with_nothing_open() {
        let slots = Slots::new(limits());
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        drop(slots.take(Kind::Connection, ip).unwrap());
        drop(slots.take(Kind::Handshake, ip).unwrap());
        assert!(sync::lock(&slots.counts).per_ip.is_empty());
    }
}
