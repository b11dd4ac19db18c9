//! A browser script of `web/test/` run by node, and the line protocol with
//! it (see `web/test/browser.mjs`): its findings one JSON line each on
//! stdout, its waits answered on stdin, its log in a file shown on failure.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
};

use crate::common::which;

const WEB_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/web");
/// Longer than any step of the scripts (30 s each), so that a slow step
/// fails there, with what the page logged, rather than here with nothing.
const STEP: Duration = Duration::from_secs(90);

/// A browser script (`web/test/NAME.mjs`) and the line protocol with it.
pub struct Script {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stdin: ChildStdin,
    stderr: PathBuf,
    shots: PathBuf,
}

impl Script {
    pub fn start(name: &str, dir: &Path, base_url: &str, env: &[(&str, String)]) -> Self {
        let chromium =
            which("chromium").expect("chromium (Debian package; scripts/test.sh installs it)");
        let node = which("node").expect("node (Node.js 20)");
        assert!(
            Path::new(&format!("{WEB_DIR}/node_modules/puppeteer-core")).exists(),
            "web/ has no node_modules: `npm ci` in web/ (scripts/test.sh does it)"
        );
        let shots = dir.join("screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        let stderr = dir.join(format!("{name}.stderr"));
        let mut child = tokio::process::Command::new(node)
            .arg(format!("{WEB_DIR}/test/{name}.mjs"))
            .current_dir(WEB_DIR)
            .env("BASE_URL", base_url)
            .env("CHROMIUM", chromium)
            .env("PROFILE_DIR", dir.join(format!("{name}-profile")))
            .env("SHOTS", &shots)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self {
            lines: BufReader::new(child.stdout.take().unwrap()).lines(),
            stdin: child.stdin.take().unwrap(),
            child,
            stderr,
            shots,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The script's next finding, which must be `event`.
    pub async fn next(&mut self, event: &str) -> Value {
        let line = tokio::time::timeout(STEP, self.lines.next_line()).await;
        let line = match line {
            Ok(Ok(Some(line))) => line,
            other => panic!(
                "the browser script gave no `{event}` ({other:?}); its log:\n{}",
                self.log()
            ),
        };
        let value: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line}"));
        assert_eq!(value["event"], event, "{value}\n{}", self.log());
        value
    }

    /// Lets the script go on after a wait.
    pub async fn answer(&mut self) {
        self.stdin.write_all(b"go\n").await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Waits for the script to end well; copies its screenshots to
    /// `$DEVICEHUB_SCREENSHOTS` when set.
    pub async fn finish(mut self) {
        let status = tokio::time::timeout(STEP, self.child.wait()).await;
        assert!(
            matches!(status, Ok(Ok(s)) if s.success()),
            "the browser script failed ({status:?}):\n{}",
            self.log()
        );
        if let Some(to) = std::env::var_os("DEVICEHUB_SCREENSHOTS") {
            for entry in std::fs::read_dir(&self.shots).unwrap() {
                let path = entry.unwrap().path();
                std::fs::copy(&path, Path::new(&to).join(path.file_name().unwrap())).unwrap();
            }
        }
    }

    pub fn screenshot(&self, name: &str) -> PathBuf {
        self.shots.join(format!("{name}.png"))
    }
}

impl Drop for Script {
    /// A test that failed half-way: SIGINT lets puppeteer kill its Chromium
    /// before node exits (SIGKILL, kill_on_drop's, would leave Chromium
    /// running: puppeteer starts it in a process group of its own).
    fn drop(&mut self) {
        let (Ok(None), Some(pid)) = (self.child.try_wait(), self.child.id()) else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        for _ in 0..250 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
