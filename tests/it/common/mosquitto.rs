//! A Mosquitto process: started on a loopback port with a config file of its
//! own, in a directory of its own that holds its log, and killed when
//! dropped. Self-contained (std and the sibling `tempdir` module only) so
//! that the benchmark harness can include it with `#[path]` next to
//! `tempdir.rs`; what the service makes of the broker (its URL) is the
//! includer's business.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::tempdir::TempDir;

/// How long Mosquitto may take to listen: generous, CI is shared (the
/// tests' `PATIENCE`).
const LISTEN_PATIENCE: Duration = Duration::from_secs(20);
/// What the tests' Mosquitto logs: everything, for a failing test's message.
const LOG_ALL: &str = "log_dest stderr\nlog_type all\nconnection_messages true\n";
/// What the benchmarks' logs: what went wrong only.
#[allow(dead_code)] // the benchmarks' (benches/devicehub includes this file)
const LOG_QUIET: &str = "log_dest stderr\nlog_type error\nlog_type warning\n";
/// The name of Mosquitto's log file in its directory.
const LOG: &str = "mosquitto.log";

/// A running Mosquitto.
pub struct Process {
    port: u16,
    child: Child,
    dir: TempDir,
}

impl Process {
    /// Starts Mosquitto with the configuration `conf` (logging added) in
    /// `dir`, its working directory, so relative paths in `conf` name files
    /// there; waits until it listens on `port`, where `conf` has it listen.
    pub fn start(dir: TempDir, conf: &str, port: u16) -> Self {
        Self::start_logging(dir, conf, port, LOG_ALL)
    }

    /// Like [`Process::start`], logging only warnings and errors: for the
    /// benchmarks, whose bursts of hundreds of thousands of publishes would
    /// pay for a log line each.
    #[allow(dead_code)] // the benchmarks'
    pub fn start_quiet(dir: TempDir, conf: &str, port: u16) -> Self {
        Self::start_logging(dir, conf, port, LOG_QUIET)
    }

    fn start_logging(dir: TempDir, conf: &str, port: u16, logging: &str) -> Self {
        let binary = which("mosquitto").expect(
            "mosquitto is not installed: the tests need it (apt-get install -y mosquitto, or run scripts/test.sh)",
        );
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, format!("{conf}\n{logging}")).unwrap();
        // The log goes to stderr, into a file opened here: no permission
        // games with the user Mosquitto drops to.
        let log = std::fs::File::create(dir.path().join(LOG)).unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&path)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto starts");
        let mosquitto = Self { port, child, dir };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + LISTEN_PATIENCE;
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {addr}:\n{}",
                mosquitto.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        mosquitto
    }

    /// Mosquitto's working directory (its config, log and other files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What Mosquitto has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG)).unwrap_or_default()
    }

    /// Stops Mosquitto with SIGTERM (it saves its state, if persistent) and
    /// waits for the process to end; returns its port.
    pub fn stop(mut self) -> u16 {
        let pid = self.child.id().to_string();
        let term = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(term.success());
        let _ = self.child.wait();
        self.port
    }

    /// Kills Mosquitto and waits for the process to end; returns its port.
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tests' usual configuration: anonymous clients on `port`, a deep
/// queue, and sessions and queued messages saved in `persistence` (when
/// given) at a graceful stop.
pub fn config(port: u16, persistence: Option<&Path>) -> String {
    let mut conf =
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n");
    match persistence {
        Some(dir) => {
            // Started as root, mosquitto drops to its own user, which
            // must be able to write its state here.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            conf += &format!(
                "persistence true\npersistence_location {}/\n",
                dir.display()
            );
        }
        None => conf += "persistence false\n",
    }
    conf
}

/// A loopback port free a moment ago (another process could take it before
/// Mosquitto binds it; the wait in [`Process::start`] then fails loudly).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Finds an executable on PATH, or in /usr/sbin and /sbin (where Debian
/// puts mosquitto, and which a non-root PATH may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
