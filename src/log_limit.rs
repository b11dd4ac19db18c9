//! Log lines that carry what devices or clients sent (topics, reply ids)
//! are rate-limited and truncated: a device publishing garbage in a loop
//! must not fill the disk or drown the log. Each kind of line has its own
//! [`LogLimit`]; the line that does get through says how many were left out.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use crate::sync;

/// At most one line per kind in this long.
const INTERVAL: Duration = Duration::from_secs(10);

/// Longest piece of peer-controlled text put in a log line, in bytes.
const MAX_LOGGED_TEXT: usize = 128;

/// One kind of rate-limited log line.
pub struct LogLimit {
    /// When the next line may be logged; a std mutex held for a comparison.
    next: Mutex<Option<Instant>>,
    left_out: AtomicU64,
}

impl LogLimit {
    pub const fn new() -> Self {
        Self {
            next: Mutex::new(None),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be logged now (`n` lines were left out since
    /// the last one), `None` if this one is left out.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut next = sync::lock(&self.next);
        if next.is_some_and(|at| now < at) {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *next = Some(now + INTERVAL);
        Some(self.left_out.swap(0, Ordering::Relaxed))
    }
}

/// `text` cut to at most [`MAX_LOGGED_TEXT`] bytes, at a character boundary.
pub fn truncated(text: &str) -> &str {
    if text.len() <= MAX_LOGGED_TEXT {
        return text;
    }
    let mut end = MAX_LOGGED_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_a_count_of_the_rest() {
        let limit = LogLimit::new();
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        *sync::lock(&limit.next) = Some(Instant::now());
        assert_eq!(limit.allow(), Some(2));
        let long = "é".repeat(100);
        assert!(truncated(&long).len() <= MAX_LOGGED_TEXT);
        assert_eq!(truncated("short"), "short");
    }
}
