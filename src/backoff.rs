//! The one retry backoff: the MQTT link's reconnects, the store writer's
//! commits and the replicas' tail all wait with it after a failure.
//!
//! Exponential, from [`MIN`] doubling up to [`MAX`], each wait drawn at
//! random from its upper half ("equal jitter"): replicas that lost the same
//! broker or database at the same moment do not all come back in step, and
//! no wait is shorter than half its step, so a failing peer is not hammered.

use std::{
    hash::{BuildHasher, RandomState},
    time::Duration,
};

/// The first wait's step.
pub const MIN: Duration = Duration::from_millis(100);
/// The longest step.
pub const MAX: Duration = Duration::from_secs(5);

/// Where a run of failures stands: the step of the next wait.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { step: MIN }
    }
}

impl Backoff {
    /// The wait before the next attempt, and the step after it doubled.
    pub fn next_wait(&mut self) -> Duration {
        let half = self.step / 2;
        self.step = (self.step * 2).min(MAX);
        half + half.mul_f64(unit_random())
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.step = MIN;
    }

    /// Whether no failure has been seen since the last success.
    pub fn is_reset(&self) -> bool {
        self.step == MIN
    }
}

/// A number in [0, 1). The standard library's hasher keys are random per
/// process and per `RandomState`: enough for jitter, with no crate for it.
fn unit_random() -> f64 {
    let bits = RandomState::new().hash_one(0u8);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::default();
        let mut step = MIN;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let wait = backoff.next_wait();
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} for step {step:?}"
            );
            waits.push(wait);
            step = (step * 2).min(MAX);
        }
        assert!(waits[9] >= MAX / 2);
        // Two instances failing together wait differently.
        let first: Vec<Duration> = (0..20).map(|_| Backoff::default().next_wait()).collect();
        assert!(first.iter().any(|w| *w != first[0]), "jittered: {first:?}");
        assert!(!backoff.is_reset());
        backoff.reset();
        assert!(backoff.is_reset());
        assert!(backoff.next_wait() <= MIN);
    }
}
