//! How big each scenario runs: full (`cargo bench`) and smoke (`cargo
//! test`, `--smoke`).

/// Scenario sizes: full (`cargo bench`) and smoke (`cargo test`, `--smoke`).
#[derive(Clone, Copy)]
pub struct Sizes {
    pub ingest_readings: u64,
    pub fanout_watchers: &'static [usize],
    pub fanout_rate: u64,
    pub fanout_secs: f64,
    pub latency_readings: u64,
    pub latency_rate: u64,
    pub query_readings: u64,
    pub query_devices: u64,
    pub query_iterations: usize,
    pub command_secs: f64,
    /// Devices (one reading each) for the device list scenario.
    pub devices: u64,
    /// Readings in the table for the store's page and replay scenario.
    pub stored_readings: u64,
    /// Readings replayed from the table (and from memory) per resume.
    pub replay_readings: u64,
    /// Readings each watcher thread receives in the contention scenario.
    pub contention_readings: u64,
    /// Persistent commands queued, and the offline devices they are for.
    pub queued_commands: u64,
    pub queued_devices: u64,
    /// UpdateDesiredState calls (and reported patches), and the devices
    /// they are for.
    pub state_calls: u64,
    pub state_devices: u64,
    /// One device's readings aggregated (a day's, one a second), and the
    /// readings in the store's table around them.
    pub aggregate_readings: u64,
    pub aggregate_stored: u64,
    /// Devices known (one reading each) for the dashboard's first render,
    /// and how many loads of the page are timed.
    pub dashboard_devices: u64,
    pub dashboard_loads: usize,
}

pub const FULL: Sizes = Sizes {
    ingest_readings: 200_000,
    fanout_watchers: &[1, 10, 100, 1000],
    fanout_rate: 10_000,
    fanout_secs: 1.0,
    latency_readings: 5_000,
    latency_rate: 1_000,
    query_readings: 1_000_000,
    query_devices: 10_000,
    query_iterations: 300,
    command_secs: 3.0,
    devices: 100_000,
    stored_readings: 10_000_000,
    replay_readings: 1_000_000,
    contention_readings: 200_000,
    queued_commands: 10_000,
    queued_devices: 1_000,
    state_calls: 20_000,
    state_devices: 1_000,
    aggregate_readings: 86_400,
    aggregate_stored: 10_000_000,
    dashboard_devices: 10_000,
    dashboard_loads: 30,
};

pub const SMOKE: Sizes = Sizes {
    ingest_readings: 2_000,
    fanout_watchers: &[1, 10],
    fanout_rate: 1_000,
    fanout_secs: 0.5,
    latency_readings: 100,
    latency_rate: 500,
    query_readings: 5_000,
    query_devices: 100,
    query_iterations: 20,
    command_secs: 0.5,
    devices: 500,
    stored_readings: 20_000,
    replay_readings: 5_000,
    contention_readings: 5_000,
    queued_commands: 200,
    queued_devices: 20,
    state_calls: 400,
    state_devices: 20,
    aggregate_readings: 2_000,
    aggregate_stored: 20_000,
    dashboard_devices: 200,
    dashboard_loads: 2,
};
