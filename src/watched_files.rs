//! Files named by the configuration that are re-read while the service
//! runs (the gRPC TLS certificate and key, the JWT public keys): one
//! mechanism, so they rotate alike. It only says *that* a file changed;
//! what a change that does not load means is the caller's (each keeps what
//! it had).

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;

/// How often the files the configuration names (TLS certificates, JWT
/// keys) are checked for changes.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Files the configuration names, followed for changes by their
/// modification times and lengths. One mechanism for everything re-read at run time
/// (the TLS certificate, the JWT keys), so that they rotate alike: a
/// polled stamp rather than inotify, because it also sees the symlink swaps
/// of Kubernetes secret volumes and works on every filesystem.
#[derive(Debug, Clone)]
pub struct WatchedFiles {
    paths: Vec<PathBuf>,
    seen: Vec<Option<Stamp>>,
}

/// What tells a file changed: its modification time and, because that has
/// the kernel's tick as granularity, its length (a truncation and the
/// write after it may share one time, not one length).
type Stamp = (SystemTime, u64);

impl WatchedFiles {
    /// Takes the files' stamps now: a change after this is a change.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let seen = stamps(&paths);
        Self { paths, seen }
    }

    /// Calls `reload` after each change of any of the files, checking every
    /// [`FILE_POLL_INTERVAL`], until `shutdown`. `reload` decides what a
    /// file that does not load means (the callers keep what they had); the
    /// next change retries.
    pub async fn follow(mut self, shutdown: CancellationToken, mut reload: impl FnMut()) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(FILE_POLL_INTERVAL) => {}
                _ = shutdown.cancelled() => return,
            }
            let now = stamps(&self.paths);
            if now != self.seen {
                self.seen = now;
                reload();
            }
        }
    }
}

/// The stamp of each of `paths` (`None`: unreadable, itself a state to
/// leave).
fn stamps(paths: &[PathBuf]) -> Vec<Option<Stamp>> {
    paths
        .iter()
        .map(|path| {
            let metadata = std::fs::metadata(path).ok()?;
            Some((metadata.modified().ok()?, metadata.len()))
        })
        .collect()
}
