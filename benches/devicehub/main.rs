//! devicehub's benchmark harness: every scenario measures devicehub next to
//! a baseline in the same run (a bare MQTT client through the same broker,
//! or a gRPC health check) and reports the ratio, because this machine is
//! shared and noisy. Absolute numbers drift; ratios are what to compare.
//!
//! ```sh
//! cargo bench --bench devicehub                  # full run, embedded broker (minutes)
//! cargo bench --bench devicehub -- --mosquitto   # the same through a Mosquitto process
//! cargo bench --bench devicehub -- --smoke       # seconds; what `cargo test` runs
//! cargo bench --bench devicehub -- --only ingest,query   # some scenarios
//! cargo bench --bench devicehub -- --help        # the options and every scenario's name
//! ```
//!
//! The service runs as its own process (the `devicehub` binary, pointed at
//! the broker with `--mqtt-url`) so that its CPU time and memory are its own;
//! the broker, publishers, bare subscribers and gRPC clients live here.
//! Everything binds to 127.0.0.1 on ephemeral ports, every loop is bounded
//! in count and time, and every process started is stopped.
//!
//! `DEVICEHUB_BENCH_BINARY=path` runs another build of the service (for
//! example the previous commit's release binary) under the same harness, so
//! two versions can be compared back to back on the same machine.
//!
//! Layout: [`args`] the command line; [`support`] what the scenarios share
//! (the sizes, the broker, the service process, publishers, subscribers and
//! watchers, measuring and the report's rows); a module per scenario, named
//! as `--only` names it; [`mosquitto`] the Mosquitto process (the tests' own). This file only
//! picks the scenarios and runs them in order.

// Shared with the tests, which use more of them.
#[allow(dead_code)]
#[path = "../../tests/it/common/pki.rs"]
mod pki;
#[allow(dead_code)]
#[path = "../../tests/it/common/postgres.rs"]
mod postgres;
#[path = "../../tests/it/common/tempdir.rs"]
mod tempdir;
#[allow(dead_code)]
#[path = "../../tests/it/common/tokens.rs"]
mod tokens;

mod aggregate;
mod args;
#[allow(dead_code)]
#[path = "../../tests/it/common/mosquitto.rs"]
mod mosquitto;
mod support;

mod commands;
mod contention;
mod dashboard;
mod devices;
mod fanout;
mod ingest;
mod latency;
mod metrics;
mod query;
mod queued;
mod replicas;
mod scan;
mod secure;
mod state;
mod store;

use clap::Parser;

use args::{Args, Scenario};
use support::{
    broker::Broker,
    mqtt,
    report::{self, Table},
    service::PLAIN,
    sizes::{Sizes, FULL, SMOKE},
};

fn main() {
    let args = Args::parse();
    if let Some(child) = &args.bare_subscriber_process {
        return mqtt::bare_subscriber_process(child);
    }
    if args.list {
        return args.print_list();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(&args));
}

async fn run(args: &Args) {
    let smoke = args.smoke();
    let broker = Broker::start(args.mosquitto);
    report::header(smoke, args.mosquitto);
    let ran = run_selected(args, &Table, &broker, if smoke { SMOKE } else { FULL }).await;
    drop(broker);
    println!("bench: {ran} scenario groups completed");
}

/// Runs the scenarios `args` selects, in [`Scenario::ORDER`]; returns how
/// many groups ran.
async fn run_selected(args: &Args, table: &Table, broker: &Broker, sizes: Sizes) -> usize {
    let url = broker.url();
    let mut ran = 0;
    for scenario in Scenario::ORDER {
        let wanted = args.wants(scenario)
            || (scenario == Scenario::Store && args.wants(Scenario::StoreIngest));
        if !wanted {
            continue;
        }
        match scenario {
            Scenario::Ingest => {
                ingest::run(table, url, sizes, PLAIN).await;
            }
            Scenario::Fanout => fanout::run(table, url, sizes, sizes.fanout_watchers, PLAIN).await,
            Scenario::Latency => latency::run(table, url, sizes).await,
            Scenario::Query => query::run(table, url, sizes).await,
            Scenario::Scan => scan::run(table, url, sizes).await,
            Scenario::Commands => commands::run(table, url, sizes).await,
            Scenario::Queued => queued::run(table, url, sizes).await,
            Scenario::State => state::run(table, url, sizes).await,
            Scenario::Aggregate => aggregate::run(table, url, sizes).await,
            Scenario::Secure => secure::run(table, url, sizes).await,
            Scenario::Devices => devices::run(table, url, sizes).await,
            Scenario::Dashboard => dashboard::run(table, url, sizes).await,
            // `store-ingest`: the ingest comparison alone, without the
            // 10-million-row table.
            Scenario::Store => store::run(table, url, sizes, args.wants(Scenario::Store)).await,
            // Threads and runtimes of its own, off this runtime's thread.
            Scenario::Contention => {
                std::thread::scope(|s| s.spawn(|| contention::run(table, sizes)).join().unwrap())
            }
            Scenario::Replicas => replicas::run(table, sizes).await,
            Scenario::Metrics => metrics::run(table, url, sizes).await,
            Scenario::StoreIngest => unreachable!("run as part of store"),
        }
        ran += 1;
    }
    ran
}
