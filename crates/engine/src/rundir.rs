//! Per-instance runtime directories: console log, QEMU's own log, the
//! writable disk. They live on disk under the cache dir (never in a tmpfs:
//! the writable disk must not be bounded by host RAM).

use std::fs;
use std::path::{Path, PathBuf};

use crate::Error;

/// A directory removed when dropped. Its name starts with the owning
/// process's pid, so directories of processes that died without cleaning up
/// are found and removed by the next [`RunDir::create`].
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `<cache>/run/<pid>-<name>`, first removing leftovers of dead
    /// processes.
    pub fn create(cache: &Path, name: &str) -> Result<RunDir, Error> {
        let base = cache.join("run");
        fs::create_dir_all(&base).map_err(Error::io("create", &base))?;
        sweep_stale(&base);
        let path = base.join(format!("{}-{name}", std::process::id()));
        fs::create_dir(&path).map_err(Error::io("create", &path))?;
        Ok(RunDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove run dir");
            }
        }
    }
}

fn sweep_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !process_alive(pid) {
            tracing::debug!(dir = ?entry.path(), "removing run dir of dead process {pid}");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence; no signal is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop_and_dead_owners_swept() {
        let cache = std::env::temp_dir().join(format!("cc-rundir-test-{}", std::process::id()));
        let stale = cache.join("run/999999999-old");
        fs::create_dir_all(&stale).unwrap();
        let dir = RunDir::create(&cache, "x").unwrap();
        assert!(dir.path().is_dir());
        assert!(!stale.exists(), "a dead process's run dir is swept");
        let path = dir.path().to_path_buf();
        fs::write(path.join("f"), b"x").unwrap();
        drop(dir);
        assert!(!path.exists());
        fs::remove_dir_all(&cache).unwrap();
    }
}
