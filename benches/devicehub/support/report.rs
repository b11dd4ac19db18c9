//! The report: a header naming the run, the broker and the machine, then
//! one row per measurement (devicehub, its baseline, their ratio, notes).
//! BENCHMARKS.md's tables are copied from these rows, so their shape stays.

/// Prints what the run is and the table's column heads.
pub fn header(smoke: bool, mosquitto: bool) {
    println!(
        "devicehub benchmarks ({}; broker: {}; {} cores, {})",
        if smoke {
            "smoke run: sizes too small to mean anything"
        } else {
            "full run"
        },
        if mosquitto {
            "mosquitto"
        } else {
            "embedded rumqttd"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
    );
    println!(
        "{:<44} {:>16} {:>16} {:>8}  notes",
        "scenario", "devicehub", "baseline", "ratio"
    );
}

/// Where the rows go.
pub struct Table;

impl Table {
    pub fn row(&self, scenario: &str, ours: f64, baseline: f64, unit: &str, notes: &str) {
        let ratio = if baseline > 0.0 {
            ours / baseline
        } else {
            f64::NAN
        };
        println!(
            "{:<44} {:>12.1} {:<3} {:>12.1} {:<3} {:>8.3}  {notes}",
            scenario, ours, unit, baseline, unit, ratio
        );
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
