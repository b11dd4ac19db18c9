//! [`PahoDevice`]: a real device on paho-mqtt (`examples/devices/
//! paho_device.py`, run with python3): a last will, `online` when it
//! connects, each command it receives reported as a JSON line, answered as
//! told.

use std::{path::Path, process::Stdio};

use devicehub::config::BrokerUrl;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
};

use super::{mosquitto::which, within};

/// A paho-mqtt device process. Killed (SIGKILL, so the broker publishes
/// its last will) when dropped.
pub struct PahoDevice {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Events reported before it was ready (a retained desired state).
    early: std::collections::VecDeque<Value>,
}

impl PahoDevice {
    /// Starts `device_id`, answering commands with `reply` (`ok`, `error`
    /// or `none`), and returns once it is subscribed and said `online`.
    pub async fn start(broker: &BrokerUrl, device_id: &str, reply: &str) -> Self {
        Self::start_with(broker, device_id, &["--reply", reply]).await
    }

    /// Starts `device_id` with the script's `args`, and returns once it is
    /// subscribed and said `online`.
    pub async fn start_with(broker: &BrokerUrl, device_id: &str, args: &[&str]) -> Self {
        let python = which("python3").expect("python3 is not installed: the tests need it");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/devices/paho_device.py");
        let mut child = Command::new(python)
            .arg(script)
            .args(["--host", &broker.host, "--port", &broker.port.to_string()])
            .args(["--device-id", device_id])
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs the paho device (pip install paho-mqtt)");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut device = Self {
            child,
            lines,
            early: Default::default(),
        };
        loop {
            let event = device.read_event().await;
            if event["event"] == "ready" {
                return device;
            }
            device.early.push_back(event);
        }
    }

    /// The next thing the device reports: `{"event": "command" |
    /// "duplicate" | "expired", "envelope": {...}}`, or `{"event":
    /// "desired", "document": {...}, "retained": bool}`.
    pub async fn next_event(&mut self) -> Value {
        match self.early.pop_front() {
            Some(event) => event,
            None => self.read_event().await,
        }
    }

    /// The next line the device prints, as JSON.
    async fn read_event(&mut self) -> Value {
        let line = within("the paho device to report", self.lines.next_line())
            .await
            .expect("the paho device's stdout")
            .expect("the paho device is running (is paho-mqtt installed?)");
        serde_json::from_str(&line).expect("the paho device prints JSON lines")
    }

    /// The next command's envelope (not a duplicate or an expired one).
    pub async fn next_command(&mut self) -> Value {
        let event = self.next_event().await;
        assert_eq!(event["event"], "command", "{event}");
        event["envelope"].clone()
    }

    /// SIGKILL: the connection breaks, and the broker publishes the last
    /// will (`offline`).
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill the paho device");
    }
}
