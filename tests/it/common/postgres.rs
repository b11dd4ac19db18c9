//! A throwaway PostgreSQL cluster from Debian's `postgresql` package:
//! `initdb` into a temporary directory and `pg_ctl` on a free loopback port,
//! run as an unprivileged user when the tests run as root (PostgreSQL
//! refuses root). Stopped and removed when dropped. Shared by the
//! integration tests and the benchmark harness (`#[path]`).

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Command, Output},
};

use super::tempdir::TempDir;

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The user the cluster runs as when the tests run as root.
const UNPRIVILEGED: &str = "nobody";

pub struct Postgres {
    pub port: u16,
    /// `-c name=value` server settings.
    settings: String,
    bin: PathBuf,
    dir: TempDir,
    as_root: bool,
}

impl Postgres {
    /// Creates a cluster with a `devicehub` superuser (trust on loopback)
    /// and a `devicehub` database, and starts it. Commits are not flushed
    /// to disk: the tests kill devicehub, never PostgreSQL's machine.
    pub fn start() -> Self {
        Self::start_with("-c fsync=off -c synchronous_commit=off")
    }

    /// [`Postgres::start`] with these server settings (`-c name=value ...`;
    /// empty: PostgreSQL's defaults, commits flushed to disk).
    pub fn start_with(settings: &str) -> Self {
        let bin = bin_dir();
        let dir = TempDir::new("postgres");
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if as_root {
            let status = Command::new("chown")
                .args(["-R", UNPRIVILEGED])
                .arg(dir.path())
                .status()
                .expect("chown runs");
            assert!(status.success());
        }
        let mut postgres = Self {
            port: free_port(),
            settings: settings.to_owned(),
            bin,
            dir,
            as_root,
        };
        let data = postgres.data();
        postgres.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "devicehub",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        // The port was free when picked, but another test's process may bind
        // it before PostgreSQL does: then pick another (a restart, later,
        // keeps its port: the service has its URL).
        for attempt in 1.. {
            let logged = postgres.log().len();
            let args = postgres.start_args();
            let output = postgres.output(
                "pg_ctl",
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            if output.status.success() {
                break;
            }
            let taken = postgres.log()[logged..].contains("Address already in use");
            assert!(
                taken && attempt < 5,
                "pg_ctl start failed: {}{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                postgres.log()
            );
            postgres.port = free_port();
        }
        postgres.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &postgres.port.to_string(),
                "-U",
                "devicehub",
                "devicehub",
            ],
        );
        postgres
    }

    /// The store URL for `--store-url`.
    pub fn url(&self) -> String {
        self.url_of("devicehub")
    }

    /// The URL of database `name`.
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres://devicehub@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database `name` and returns its URL.
    #[allow(dead_code)] // the benchmark harness, which includes this file, uses it; no test does
    pub fn create_database(&self, name: &str) -> String {
        self.psql(&format!("CREATE DATABASE {name}"));
        self.url_of(name)
    }

    /// Starts the cluster (again, after [`Postgres::stop`]) and waits until
    /// it accepts connections (`pg_ctl -w`).
    pub fn start_again(&self) {
        let args = self.start_args();
        self.run(
            "pg_ctl",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }

    /// `pg_ctl`'s arguments to start the cluster on its port and wait.
    fn start_args(&self) -> Vec<String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {}",
            self.port,
            self.dir.path().display(),
            self.settings,
        );
        let log = format!("{}/postgres.log", self.dir.path().display());
        [
            "-D",
            &self.data(),
            "-o",
            &options,
            "-l",
            &log,
            "-w",
            "start",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Stops the cluster at once (open connections are cut) and waits.
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    /// Runs one SQL statement with psql and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("devicehub", sql)
    }

    /// [`Postgres::psql`] in database `database`.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        let output = self.output(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "devicehub",
                "-d",
                database,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
        assert!(
            output.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Runs a psql script (statements and meta-commands such as `\timing`)
    /// in `database`; returns what psql printed. For the benchmarks'
    /// baselines timed by psql itself.
    #[allow(dead_code)]
    pub fn psql_script_in(&self, database: &str, script: &str) -> String {
        let file = self.dir.path().join("script.sql");
        std::fs::write(&file, script).expect("the script is written");
        let port = self.port.to_string();
        let file = file.to_string_lossy();
        let args = [
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "devicehub",
            "-d",
            database,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            &file,
        ];
        let output = self.output("psql", &args);
        assert!(
            output.status.success(),
            "psql -f: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts psql running `sql` (one or more statements, one transaction)
    /// in the background and returns it: for a lock held while the test
    /// goes on. Wait for it, or kill it.
    pub fn psql_spawn(&self, sql: &str) -> std::process::Child {
        let port = self.port.to_string();
        let args = [
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "devicehub",
            "-d",
            "devicehub",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ];
        self.command("psql")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("psql starts")
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn data(&self) -> String {
        format!("{}/data", self.dir.path().display())
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self.output(program, args);
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
    }

    /// PostgreSQL's `program`, as the unprivileged user when the tests run
    /// as root, in the cluster's directory.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut command = if self.as_root {
            let mut command = Command::new("runuser");
            command.args(["-u", UNPRIVILEGED, "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.current_dir(self.dir.path());
        command
    }

    fn output(&self, program: &str, args: &[&str]) -> Output {
        // pg_ctl's server must not hold the test's pipes open.
        self.command(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("a PostgreSQL program runs")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.output(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

/// Debian's PostgreSQL binaries (the newest installed version).
fn bin_dir() -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql").expect(
        "PostgreSQL is not installed: the tests need it (apt-get install -y postgresql, or run scripts/test.sh)",
    );
    let mut versions: Vec<PathBuf> = versions
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version with initdb")
}
