//! The harness's command line: its own options (`--smoke`, `--mosquitto`,
//! `--only`) and what `cargo test` and `cargo bench` pass to a test target
//! as they would to libtest: `--bench` (full sizes), name filters with
//! `--exact` and `--skip` (matched against the scenarios' names), `--list`,
//! and output flags that mean nothing here (accepted, ignored). Anything
//! else is an error. Runs nothing itself.

use clap::{Args as ClapArgs, Parser, ValueEnum};

/// devicehub's benchmark harness: each scenario measures devicehub next to a
/// baseline in the same run and reports the ratio. Without --bench (as under
/// `cargo test`) it runs in smoke mode.
#[derive(Parser, Debug)]
#[command(
    name = "devicehub-bench",
    bin_name = "cargo bench --bench devicehub --",
    after_help = AFTER_HELP
)]
pub struct Args {
    /// Tiny sizes, seconds in all (what `cargo test` runs)
    #[arg(long)]
    smoke: bool,
    /// Through a Mosquitto process instead of the embedded rumqttd broker
    #[arg(long)]
    pub mosquitto: bool,
    /// Only these scenarios, comma separated (`--help` describes each)
    #[arg(long, value_name = "SCENARIO,...", value_delimiter = ',')]
    only: Option<Vec<Scenario>>,

    /// Full sizes unless --smoke (`cargo bench` passes it)
    #[arg(long, help_heading = LIBTEST)]
    bench: bool,
    /// Only scenarios whose name contains one of these
    #[arg(value_name = "FILTER", help_heading = LIBTEST)]
    filters: Vec<String>,
    /// Filters (and --skip) match whole names
    #[arg(long, help_heading = LIBTEST)]
    exact: bool,
    /// Leaves out scenarios whose name contains this (repeatable)
    #[arg(long, value_name = "FILTER", help_heading = LIBTEST)]
    skip: Vec<String>,
    /// Lists the scenarios selected, as libtest lists tests; runs none
    #[arg(long, help_heading = LIBTEST)]
    pub list: bool,
    /// Only ignored tests: no scenario is
    #[arg(long, help_heading = LIBTEST)]
    ignored: bool,
    #[command(flatten)]
    output: LibtestOutput,

    /// The child side of a bare subscriber process (the harness re-executes
    /// itself with this).
    #[arg(
        long,
        hide = true,
        num_args = 5,
        value_names = ["HOST", "PORT", "QOS", "FILTER", "ID"]
    )]
    pub bare_subscriber_process: Option<Vec<String>>,
}

const LIBTEST: &str = "Passed by cargo, as to libtest";

const AFTER_HELP: &str = "\
libtest's other flags (--nocapture, --show-output, --test-threads, --quiet, --color, --format, \
--include-ignored, --test, -Z) are accepted and change nothing: the harness prints its table as \
it goes (--list --format terse leaves out the count, as libtest's does).
DEVICEHUB_BENCH_BINARY=path runs another build of the service under the same harness; \
DEVICEHUB_LOG sets the service's log filter (default info).";

/// libtest's flags about output and scheduling: cargo and its users pass
/// them to every test target; here they change nothing.
#[derive(ClapArgs, Debug)]
#[allow(dead_code)] // parsed so that they are not errors, never read
struct LibtestOutput {
    #[arg(long, alias = "no-capture", hide = true)]
    nocapture: bool,
    #[arg(long, hide = true)]
    show_output: bool,
    #[arg(long, hide = true)]
    test_threads: Option<String>,
    #[arg(short, long, hide = true)]
    quiet: bool,
    #[arg(long, hide = true)]
    color: Option<String>,
    #[arg(long, hide = true)]
    format: Option<String>,
    #[arg(long, hide = true)]
    include_ignored: bool,
    #[arg(long, hide = true)]
    test: bool,
    #[arg(short = 'Z', hide = true)]
    unstable: Vec<String>,
}

/// The scenarios, by the names `--only` and the filters take. The numbers
/// are the rows' (and BENCHMARKS.md's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// 1: readings/s stored next to a bare subscriber's, QoS 1 and QoS 0
    Ingest,
    /// 2: N watchers at a fixed offered rate
    Fanout,
    /// 3: publish → watcher next to publish → bare subscriber
    Latency,
    /// 4 and 5: ListReadings on a full buffer; memory per reading
    Query,
    /// 6: SendCommand and StreamCommands next to a bare publisher
    Commands,
    /// 7: TLS and auth on the gRPC port next to plaintext
    Secure,
    /// 8: ingest and fan-out without and with /metrics scraped
    Metrics,
    /// 9: ListDevices pages
    Devices,
    /// 10: the PostgreSQL store (needs PostgreSQL's server binaries, as the tests do)
    Store,
    /// 10: the store's ingest rows only
    StoreIngest,
    /// 11: two instances next to one (always through Mosquitto)
    Replicas,
    /// 12: the delivery path in-process from many threads, no broker
    Contention,
    /// 13: ingest next to a loop of ListReadings matching nothing
    Scan,
    /// 14: persistent commands queued for offline devices, delivered when they return
    Queued,
    /// 15: UpdateDesiredState next to SendCommand; reported patches next to readings
    State,
    /// 16: AggregateReadings of a day, from memory and from the store, next to SQL by hand and ListReadings
    Aggregate,
    /// 17: the dashboard's fleet page, first render in headless Chromium (needs chromium, `npm ci` in web/)
    Dashboard,
}

impl Scenario {
    /// The order a run takes them in (`store-ingest` runs as part of
    /// `store`).
    pub const ORDER: [Self; 16] = [
        Self::Ingest,
        Self::Fanout,
        Self::Latency,
        Self::Query,
        Self::Scan,
        Self::Commands,
        Self::Queued,
        Self::State,
        Self::Aggregate,
        Self::Secure,
        Self::Devices,
        Self::Dashboard,
        Self::Store,
        Self::Contention,
        Self::Replicas,
        Self::Metrics,
    ];

    pub fn name(self) -> String {
        let value = self.to_possible_value().expect("no scenario is skipped");
        value.get_name().to_owned()
    }
}

impl Args {
    /// Smoke sizes: asked for, or not run by `cargo bench`.
    pub fn smoke(&self) -> bool {
        self.smoke || !self.bench
    }

    /// Whether `scenario` is selected: by `--only` (if given), by the
    /// filters (if any), and not by `--skip`.
    pub fn wants(&self, scenario: Scenario) -> bool {
        let name = scenario.name();
        let matches = |filter: &String| match self.exact {
            true => name == *filter,
            false => name.contains(filter.as_str()),
        };
        !self.ignored
            && self
                .only
                .as_ref()
                .is_none_or(|only| only.contains(&scenario))
            && (self.filters.is_empty() || self.filters.iter().any(matches))
            && !self.skip.iter().any(matches)
    }

    /// Prints the selected scenarios as libtest's `--list` prints tests.
    pub fn print_list(&self) {
        let selected: Vec<Scenario> = Scenario::value_variants()
            .iter()
            .copied()
            .filter(|s| self.wants(*s))
            .collect();
        for scenario in &selected {
            println!("{}: test", scenario.name());
        }
        if self.output.format.as_deref() != Some("terse") {
            println!("\n{} tests, 0 benchmarks", selected.len());
        }
    }
}
