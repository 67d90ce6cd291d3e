//! Per-instance runtime directories: console log, QEMU's own log, the
//! writable disk. They live on disk under the cache dir (never in a tmpfs:
//! the writable disk must not be bounded by host RAM).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// A directory removed when dropped. Its name starts with the owning
/// process's pid and start time, so directories of processes that died
/// without cleaning up (even when the pid now names another process, or a
/// zombie) are found and removed by the next [`RunDir::create`].
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `<cache>/run/<pid>-<name>`, first removing leftovers of dead
    /// processes.
    pub fn create(cache: &Path, name: &str) -> Result<RunDir, Error> {
        let base = cache.join("run");
        private_dirs(&base)?;
        sweep_stale(&base);
        let path = base.join(format!("{}-{name}", crate::paths::owner_tag()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(Error::io("create", &path))?;
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

/// Creates `dir` and its missing parents, each readable by its owner only.
pub fn private_dirs(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io("create", dir))
}

fn sweep_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(|n| n.split('-').next()) else {
            continue;
        };
        if !crate::paths::owner_alive(owner) {
            tracing::debug!(dir = ?entry.path(), "removing run dir of dead process {owner}");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop_and_dead_owners_swept() {
        let cache = std::env::temp_dir().join(format!("cc-rundir-test-{}", std::process::id()));
        let stale = cache.join("run/999999999-old");
        fs::create_dir_all(&stale).unwrap();
        // Our own pid with another start time: a process that had our pid.
        let reused = cache.join(format!("run/{}.1-old", std::process::id()));
        fs::create_dir_all(&reused).unwrap();
        let dir = RunDir::create(&cache, "x").unwrap();
        assert!(dir.path().is_dir());
        assert!(!stale.exists(), "a dead process's run dir is swept");
        assert!(!reused.exists(), "a reused pid does not keep a run dir");
        assert!(dir.path().exists(), "our own stays");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let path = dir.path().to_path_buf();
        fs::write(path.join("f"), b"x").unwrap();
        drop(dir);
        assert!(!path.exists());
        fs::remove_dir_all(&cache).unwrap();
    }
}
