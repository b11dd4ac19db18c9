//! A temporary directory removed when dropped; enough for config files and
//! broker state. Shared by the integration tests (`tests/it/common`) and the
//! benchmark harness (which includes this file with `#[path]`).

use std::path::{Path, PathBuf};

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let path = std::env::temp_dir().join(format!("devicehub-{prefix}-{unique}"));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to the file `name` in the directory; returns its path,
    /// as a flag takes it.
    #[allow(dead_code)] // the benchmark harness, which includes this file, writes none
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
