//! [`PerClient`]: how many of something one client holds at once (watch
//! streams, commands in progress), so that one client cannot take what the
//! global limits leave for everyone. A client is a token subject, or
//! without auth the remote IP address (see `grpc::auth::Caller::client`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::sync;

/// Counts per client, up to a maximum each. Cheap to clone.
#[derive(Clone)]
pub struct PerClient {
    shared: Arc<Shared>,
}

struct Shared {
    max: usize,
    /// An entry exists only while its count is above 0, so the map never
    /// holds more entries than permits are out. A std mutex, held for one
    /// map update.
    counts: Mutex<HashMap<Arc<str>, usize>>,
}

/// One unit held by a client; dropping it gives it back.
pub struct Permit {
    limit: PerClient,
    client: Arc<str>,
}

impl PerClient {
    pub fn new(max: usize) -> Self {
        let shared = Shared {
            max,
            counts: Mutex::default(),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The maximum per client.
    pub fn max(&self) -> usize {
        self.shared.max
    }

    /// A permit for `client`, or `None` if it already holds the maximum.
    pub fn acquire(&self, client: Arc<str>) -> Option<Permit> {
        let mut counts = sync::lock(&self.shared.counts);
        let count = counts.entry(client.clone()).or_insert(0);
        if *count >= self.shared.max {
            if *count == 0 {
                counts.remove(&client);
            }
            return None;
        }
        *count += 1;
        Some(Permit {
            limit: self.clone(),
            client,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = sync::lock(&self.limit.shared.counts);
        if let Some(count) = counts.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_up_to_the_maximum_and_back() {
        let limit = PerClient::new(2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let first = limit.acquire(a.clone()).unwrap();
        let _second = limit.acquire(a.clone()).unwrap();
        assert!(limit.acquire(a.clone()).is_none());
        assert!(
            limit.acquire(b.clone()).is_some(),
            "another client is not affected"
        );
        drop(first);
        assert!(limit.acquire(a).is_some());
        drop(_second);
        assert_eq!(
            sync::lock(&limit.shared.counts).len(),
            0,
            "no empty entries left"
        );
        let _ = b;
    }
}
