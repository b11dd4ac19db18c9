//! Measuring: bounded waits, waiting for counts and CPU to settle, timing
//! calls one at a time or many in flight, percentiles, and a process's CPU
//! time from /proc.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use super::service::Service;

/// Upper bound on any wait, so a broken run ends instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(120);

pub async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Waits until `count` stops growing for `quiet`, or reaches `target`.
pub async fn settle(target: u64, quiet: Duration, mut count: impl AsyncFnMut() -> u64) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    let (mut last, mut since) = (count().await, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = count().await;
        if now >= target || Instant::now() > deadline {
            return now;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > quiet {
            return now;
        }
    }
}

/// Waits (at most 20 s) until the service and the harness each used under a
/// tenth of a core over the last 200 ms.
pub async fn settle_cpu(service: &Service) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut before = (service.cpu_seconds(), cpu_seconds("self"));
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = (service.cpu_seconds(), cpu_seconds("self"));
        if now.0 - before.0 < 0.02 && now.1 - before.1 < 0.02 {
            return;
        }
        before = now;
    }
}

pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

/// User + system CPU seconds so far of a process (`self` for this one).
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0 // utime, stime; CLK_TCK is 100 on Linux
}

/// Runs `f` `n` times, one at a time, after a tenth as many untimed calls,
/// and returns the sorted nanoseconds.
pub async fn time_calls<F, Fut>(n: usize, mut f: F) -> Vec<u64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    // Warm-up, untimed: whatever runs first after the buffer was filled
    // otherwise pays for the broker and the service settling down.
    for _ in 0..n / 10 {
        f().await;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        f().await;
        times.push(start.elapsed().as_nanos() as u64);
    }
    times.sort_unstable();
    times
}

/// Keeps `workers` calls of `f` in flight for `duration`; calls per second.
pub async fn throughput<F, Fut>(workers: usize, duration: Duration, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    let mut done = 0u64;
    for _ in 0..workers {
        running.spawn(f());
    }
    while let Some(result) = running.join_next().await {
        result.expect("call");
        done += 1;
        if start.elapsed() < duration {
            running.spawn(f());
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}
