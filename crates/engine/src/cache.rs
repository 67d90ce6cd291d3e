//! What the engine keeps in the cache directory besides templates, measured
//! and pruned: boot files (an initramfs per agent binary) and writable
//! layers (the blank disks instances' layers are copied from, and the run
//! directories holding each instance's own layer). Everything here is
//! rebuilt on demand, so removing it only costs time at the next start.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{initramfs, paths, Error};

/// Space taken by one kind of cached file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub count: usize,
    /// Bytes allocated on the host's disk (sparse files count what they use).
    pub bytes: u64,
    /// Of `bytes`, what nothing uses and a default prune frees.
    pub reclaimable: u64,
}

impl Usage {
    fn add(&mut self, bytes: u64, in_use: bool) {
        self.count += 1;
        self.bytes += bytes;
        if !in_use {
            self.reclaimable += bytes;
        }
    }
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    pub count: usize,
    pub bytes: u64,
}

/// One cached entry: a file or a directory, with its size and whether
/// something uses it now.
#[derive(Debug)]
struct Entry {
    path: PathBuf,
    bytes: u64,
    in_use: bool,
}

/// The boot files: an initramfs per agent binary. The current agent's
/// (`CC_AGENT` or the installed one) is in use; the others are left over
/// from earlier agents.
pub fn boot_files(cache: &Path) -> Result<Usage, Error> {
    Ok(sum(&boot_entries(cache)?))
}

/// The writable layers: blank disks (in use: they are copied at every
/// start) and run directories (in use while their process lives).
pub fn writable_layers(cache: &Path) -> Result<Usage, Error> {
    Ok(sum(&layer_entries(cache)?))
}

/// Removes the boot files nothing uses, or with `all` every one (the
/// current agent's is rebuilt at the next start).
pub fn prune_boot_files(cache: &Path, all: bool) -> Result<Removed, Error> {
    remove(boot_entries(cache)?, all)
}

/// Removes run directories of processes that died without cleaning up,
/// and with `all` the blank disks too. Run directories of live processes
/// always stay.
pub fn prune_writable_layers(cache: &Path, all: bool) -> Result<Removed, Error> {
    let blank = cache.join("upper");
    let entries = layer_entries(cache)?
        .into_iter()
        .filter(|e| !e.in_use || (all && e.path.starts_with(&blank)));
    remove(entries.collect(), true)
}

/// The files in `dir` that only a whole-cache prune removes (nothing tells
/// whether they will be used again, and each is rebuilt on demand).
pub fn kept_files(dir: &Path) -> Result<Usage, Error> {
    Ok(sum(&entries(dir, |_| true)?))
}

/// Removes every file [`kept_files`] counts.
pub fn remove_kept_files(dir: &Path) -> Result<Removed, Error> {
    remove(entries(dir, |_| true)?, true)
}

fn boot_entries(cache: &Path) -> Result<Vec<Entry>, Error> {
    let current = paths::agent()
        .ok()
        .and_then(|agent| initramfs::file_name(&agent).ok());
    entries(&cache.join("initramfs"), |name| {
        current.as_deref() == Some(name)
    })
}

fn layer_entries(cache: &Path) -> Result<Vec<Entry>, Error> {
    let mut all = entries(&cache.join("upper"), |_| true)?;
    all.extend(entries(&cache.join("run"), |name| {
        name.split('-').next().is_none_or(paths::owner_alive)
    })?);
    Ok(all)
}

/// The entries of `dir` (none when it does not exist), skipping files a
/// writer has not yet published.
fn entries(dir: &Path, in_use: impl Fn(&str) -> bool) -> Result<Vec<Entry>, Error> {
    let list = match fs::read_dir(dir) {
        Ok(list) => list,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in list.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        out.push(Entry {
            bytes: allocated(&entry.path()),
            in_use: in_use(&name),
            path: entry.path(),
        });
    }
    Ok(out)
}

fn sum(entries: &[Entry]) -> Usage {
    let mut usage = Usage::default();
    for e in entries {
        usage.add(e.bytes, e.in_use);
    }
    usage
}

fn remove(entries: Vec<Entry>, all: bool) -> Result<Removed, Error> {
    let mut removed = Removed::default();
    for e in entries.into_iter().filter(|e| all || !e.in_use) {
        let done = if e.path.is_dir() {
            fs::remove_dir_all(&e.path)
        } else {
            fs::remove_file(&e.path)
        };
        match done {
            Ok(()) => {
                removed.count += 1;
                removed.bytes += e.bytes;
            }
            // Another prune, or the owner's own cleanup, was first.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(Error::io("remove", &e.path)(err)),
        }
    }
    Ok(removed)
}

/// Bytes `path` takes on disk, a directory with everything under it; what
/// vanishes during the walk counts nothing.
pub fn allocated(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| allocated(&e.path()))
        .sum::<u64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cc-cache-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_empty_or_missing_cache_uses_nothing() {
        let dir = cache("empty");
        assert_eq!(boot_files(&dir).unwrap(), Usage::default());
        assert_eq!(writable_layers(&dir).unwrap(), Usage::default());
        assert_eq!(prune_boot_files(&dir, true).unwrap(), Removed::default());
        assert_eq!(
            prune_writable_layers(&dir, true).unwrap(),
            Removed::default()
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_dirs_of_dead_processes_are_reclaimable_and_live_ones_stay() {
        let dir = cache("run");
        let live = dir.join(format!("run/{}-live", paths::owner_tag()));
        // Pid 0 is never a process of ours.
        let dead = dir.join("run/0.1-dead");
        let blank = dir.join("upper/ext4-64m.img");
        for d in [&live, &dead] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("upper.img"), vec![1u8; 8192]).unwrap();
        }
        fs::create_dir_all(blank.parent().unwrap()).unwrap();
        fs::write(&blank, vec![1u8; 4096]).unwrap();
        // Half written by someone else: not ours to count.
        fs::write(dir.join("upper/.ext4.tmp"), b"x").unwrap();

        let usage = writable_layers(&dir).unwrap();
        assert_eq!(usage.count, 3, "{usage:?}");
        assert_eq!(usage.reclaimable, allocated(&dead));
        assert!(usage.bytes >= allocated(&live) + allocated(&dead) + 4096);

        let removed = prune_writable_layers(&dir, false).unwrap();
        assert_eq!((removed.count, removed.bytes), (1, usage.reclaimable));
        assert!(!dead.exists() && live.exists() && blank.exists());

        let removed = prune_writable_layers(&dir, true).unwrap();
        assert_eq!(
            removed.count, 1,
            "only the blank disk: the live run dir stays"
        );
        assert!(live.exists() && !blank.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn boot_files_of_other_agents_are_reclaimable() {
        let dir = cache("boot");
        fs::create_dir_all(dir.join("initramfs")).unwrap();
        fs::write(dir.join("initramfs/000000000000000000000000.cpio"), b"old").unwrap();
        let usage = boot_files(&dir).unwrap();
        assert_eq!(usage.count, 1);
        assert_eq!(usage.reclaimable, usage.bytes);
        let removed = prune_boot_files(&dir, false).unwrap();
        assert_eq!(removed.count, 1);
        assert_eq!(boot_files(&dir).unwrap(), Usage::default());
        fs::remove_dir_all(&dir).unwrap();
    }
}
