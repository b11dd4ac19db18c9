//! A Mosquitto process for the harness: started on a loopback port with a
//! config file of its own, killed when dropped. The harness uses only
//! [`Process::start`], [`free_port`] and `Drop` (from `support/broker.rs`,
//! which writes the config and makes the broker's URL).
//!
//! A second copy of the tests' Mosquitto start-up, to be replaced by
//! `#[path = "../../tests/it/common/mosquitto.rs"]` (with
//! `#[allow(dead_code)]`: the tests use more of it) on `mod mosquitto` in
//! `main.rs` once the tests have that self-contained module, which has the
//! same `Process::start(dir, conf, port)` and `free_port()`; then this file
//! goes. One difference to weigh at the swap: the tests' Mosquitto logs
//! every packet to a file (`log_type all`), which the benchmarks' bursts of
//! hundreds of thousands of publishes through `--mosquitto` and `replicas`
//! would pay for; this one logs nothing.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{support::measure::PATIENCE, tempdir::TempDir};

/// A running Mosquitto.
pub struct Process {
    child: Child,
    _dir: TempDir,
}

impl Process {
    /// Starts Mosquitto with the configuration `conf`, written into `dir`;
    /// waits until it listens on `port`, where `conf` has it listen.
    pub fn start(dir: TempDir, conf: &str, port: u16) -> Self {
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (apt-get install mosquitto)");
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, _dir: dir }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
