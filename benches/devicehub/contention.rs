//! Scenario 12, contention: the watch delivery path
//! (`ReadingWatcher::next_batch` and `EncodedReadings::watch_messages`,
//! what each WatchReadings stream's producer runs) from 1, 2, 8 and 32 OS
//! threads at once, in-process, with
//! no broker and no transport; each thread runs one watcher on a runtime of
//! its own and takes every reading. The cost per delivery is the watcher
//! threads' own CPU time (from /proc/thread-self/schedstat, nanoseconds)
//! over their deliveries; the baseline is the 1-thread figure of the same
//! run. Two modes:
//! - `ring`: the readings are pushed first (as many as the ring holds) and
//!   their messages encoded by one untimed pass, then the threads read them
//!   all at once: the delivery path alone, contended as hard as it gets.
//!   Flat from 1 to 32 threads when nothing is shared per reading.
//! - `live`: one thread pushes JSON readings in batches of 32, as ingest
//!   does, while the watchers follow (waking, waiting, the first to need a
//!   message encoding it); the publisher stays within 8 192 readings of the
//!   slowest watcher so they all read the ring.
//!
//! Before both, a control: the same thread counts doing work that shares
//! nothing, what flat looks like on this machine.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Barrier,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use devicehub::{
    config::{BufferLimits, DeviceLimits},
    delivery::{
        EncodedReadings, MessageKind, NewReading, ReadingFilter, ReadingHub, ReadingWatcher,
    },
};

use crate::support::{report::Table, sizes::Sizes};

/// Readings per push, as ingest batches them.
const PUSH: u64 = 32;
/// How far the `live` publisher may run ahead of the slowest watcher.
const AHEAD: u64 = 8_192;
const THREADS: [usize; 4] = [1, 2, 8, 32];

pub fn run(table: &Table, sizes: Sizes) {
    let readings = Readings::new();
    control(table);
    for live in [false, true] {
        mode(table, &readings, sizes, live);
    }
}

/// This thread's CPU time so far, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The control: the same thread counts doing work that shares nothing
/// (each copies ~110-byte messages, 32 to a batch, out of 6.6 MB of its
/// own into buffers of its own): what flat looks like on this machine,
/// where threads also share caches, memory bandwidth and the scheduler.
fn control(table: &Table) {
    let control: Vec<f64> = THREADS.into_iter().map(control_once).collect();
    let one = control[0];
    for (threads, per) in THREADS.into_iter().zip(control) {
        table.row(
            &format!("12. contention: control, {threads} threads (ns CPU/copy)"),
            per,
            one,
            "ns",
            "private copies only; baseline: 1 thread, same run",
        );
    }
}

/// The control's CPU nanoseconds per copy with `threads` threads.
fn control_once(threads: usize) -> f64 {
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let messages: Vec<Vec<u8>> =
                    (0..60_000u32).map(|i| i.to_le_bytes().repeat(28)).collect();
                barrier.wait();
                let cpu_before = thread_cpu_ns();
                let mut copied = 0u64;
                for _ in 0..50 {
                    for batch in messages.chunks(32) {
                        let mut out = Vec::new();
                        for message in batch {
                            out.extend_from_slice(message);
                        }
                        copied += std::hint::black_box(out).len() as u64 / 112;
                    }
                }
                (thread_cpu_ns() - cpu_before, copied)
            })
        })
        .collect();
    let (cpu, copies) = workers
        .into_iter()
        .map(|w| w.join().unwrap())
        .fold((0, 0), |(c, n), (dc, dn)| (c + dc, n + dn));
    cpu as f64 / copies as f64
}

/// One mode (`live` or `ring`) at every thread count, and its rows.
fn mode(table: &Table, readings: &Readings, sizes: Sizes, live: bool) {
    // The ring holds 65 536 readings: in `ring` mode all of them fit.
    let n = match live {
        true => sizes.contention_readings,
        false => sizes.contention_readings.min(60_000),
    };
    let results: Vec<Run> = THREADS
        .into_iter()
        .map(|threads| Run::measure(readings, n, threads, live))
        .collect();
    let one = results[0].per;
    let mode = if live { "live" } else { "ring" };
    for run in results {
        let Run {
            threads,
            per,
            delivered,
            wall,
            behind,
        } = run;
        table.row(
            &format!("12. contention: {mode}, {threads} threads (ns CPU/delivery)"),
            per,
            one,
            "ns",
            &format!(
                "{delivered} deliveries in {wall:.2} s; baseline: 1 thread, same run; \
                 reads behind the ring: {behind}"
            ),
        );
    }
}

/// The JSON readings pushed: 1 000 devices in turn.
struct Readings {
    devices: Vec<String>,
    topics: Vec<String>,
}

impl Readings {
    fn new() -> Self {
        let devices: Vec<String> = (0..1000).map(|i| format!("dev-{i}")).collect();
        let topics = devices
            .iter()
            .map(|d| format!("devices/{d}/readings"))
            .collect();
        Self { devices, topics }
    }

    /// Pushes readings `from..to` into `hub` in one batch.
    fn push(&self, hub: &ReadingHub, from: u64, to: u64) {
        let json = br#"{"temperature": 21.5, "humidity": 40.25, "battery": 3.71, "n": 17}"#;
        let now = SystemTime::now();
        hub.push_all((from..to).map(|i| {
            let d = (i % self.devices.len() as u64) as usize;
            NewReading {
                device_id: &self.devices[d],
                topic: &self.topics[d],
                payload: json,
                qos: 1,
                retained: false,
                received_at: now,
                kind: MessageKind::Reading,
            }
        }));
    }
}

/// A hub of its own for each run: room for every reading of a `ring` run.
fn hub() -> ReadingHub {
    ReadingHub::new(
        BufferLimits {
            max_readings: 100_000,
            max_bytes: 64 << 20,
        },
        DeviceLimits::default(),
        1,
        1000,
        1000,
        None,
        false,
    )
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A watcher starting after reading 0: everything pushed, in order.
async fn from_start(hub: &ReadingHub, client: String) -> ReadingWatcher {
    let client: Arc<str> = Arc::from(client);
    hub.subscribe(ReadingFilter::default(), Some(0), client)
        .await
        .unwrap()
}

/// `ring` mode's readings, pushed and encoded before the threads start;
/// the watcher that read them stays open through the run.
struct Warm {
    _watcher: ReadingWatcher,
    _runtime: tokio::runtime::Runtime,
}

impl Warm {
    fn fill(hub: &ReadingHub, encoded: &EncodedReadings, readings: &Readings, n: u64) -> Self {
        let runtime = current_thread_runtime();
        // Opened first: with no watcher open, pushes are not published to
        // the ring.
        let mut warm = runtime.block_on(from_start(hub, "bench".into()));
        let mut seq = 0;
        while seq < n {
            readings.push(hub, seq, (seq + PUSH).min(n));
            seq += PUSH;
        }
        runtime.block_on(async {
            let mut got = 0;
            while got < n {
                let batch = warm.next_batch().await.unwrap();
                got += encoded.watch_messages(&batch).len() as u64;
            }
        });
        Self {
            _watcher: warm,
            _runtime: runtime,
        }
    }
}

/// How far one watcher thread got. One cache line each: the threads must
/// not share one here.
#[repr(align(128))]
#[derive(Default)]
struct Progress(AtomicU64);

/// One mode at one thread count.
struct Run {
    threads: usize,
    /// Watcher threads' CPU nanoseconds per delivery.
    per: f64,
    delivered: u64,
    wall: f64,
    /// The hub's count of reads behind the ring.
    behind: u64,
}

impl Run {
    fn measure(readings: &Readings, n: u64, threads: usize, live: bool) -> Self {
        let hub = hub();
        // The service's one cache of messages, as its streams share it.
        let encoded = Arc::new(EncodedReadings::default());
        let _warm = (!live).then(|| Warm::fill(&hub, &encoded, readings, n));
        let progress: Arc<Vec<Progress>> =
            Arc::new((0..threads).map(|_| Progress::default()).collect());
        let barrier = Arc::new(Barrier::new(threads + 1));
        // In `ring` mode each thread reads the ring this many times over,
        // for a run long enough to time.
        let rounds = if live { 1 } else { 50 };
        let workers: Vec<_> = (0..threads)
            .map(|i| watcher_thread(&hub, &encoded, &progress, &barrier, i, n, rounds))
            .collect();
        barrier.wait();
        let start = Instant::now();
        if live {
            publish_live(&hub, readings, n, &progress);
        }
        let (mut cpu, mut delivered) = (0u64, 0u64);
        for worker in workers {
            let (c, d) = worker.join().unwrap();
            cpu += c;
            delivered += d;
        }
        Self {
            threads,
            per: cpu as f64 / delivered as f64,
            delivered,
            wall: start.elapsed().as_secs_f64(),
            behind: hub.stats().watcher_behind_live,
        }
    }
}

/// Watcher thread `i`: on a runtime of its own, once `barrier` lets it go,
/// reads `n` readings from the start `rounds` times, saying how far it got
/// in `progress`; returns its CPU nanoseconds and deliveries.
fn watcher_thread(
    hub: &ReadingHub,
    encoded: &Arc<EncodedReadings>,
    progress: &Arc<Vec<Progress>>,
    barrier: &Arc<Barrier>,
    i: usize,
    n: u64,
    rounds: u32,
) -> JoinHandle<(u64, u64)> {
    let (hub, progress, barrier) = (hub.clone(), progress.clone(), barrier.clone());
    let encoded = encoded.clone();
    std::thread::spawn(move || {
        let runtime = current_thread_runtime();
        barrier.wait();
        let cpu_before = thread_cpu_ns();
        let mut got = 0u64;
        runtime.block_on(async {
            for _ in 0..rounds {
                let mut watcher = from_start(&hub, format!("bench-{i}")).await;
                let mut round = 0;
                while round < n {
                    let batch = watcher.next_batch().await.unwrap();
                    round += encoded.watch_messages(&batch).len() as u64;
                    progress[i].0.store(got + round, Ordering::Relaxed);
                }
                got += round;
            }
        });
        (thread_cpu_ns() - cpu_before, got)
    })
}

/// `live` mode's publisher: pushes `n` readings in batches of [`PUSH`],
/// staying within [`AHEAD`] of the slowest watcher.
fn publish_live(hub: &ReadingHub, readings: &Readings, n: u64, progress: &[Progress]) {
    let mut seq = 0u64;
    while seq < n {
        let slowest = progress.iter().map(|p| p.0.load(Ordering::Relaxed)).min();
        if seq >= slowest.unwrap_or(0) + AHEAD {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        readings.push(hub, seq, (seq + PUSH).min(n));
        seq = (seq + PUSH).min(n);
    }
}
