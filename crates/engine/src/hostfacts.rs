//! Facts about the host that take child processes to learn (whether QEMU
//! has `-sandbox`, the library directories it links, whether bubblewrap
//! can make namespaces here), kept in `<cache>/host/` under a hash of
//! everything each depends on. Learning them took a new process about
//! 150 ms before its first VM (`qemu -help`, `ldd` of QEMU and its
//! modules, a sandboxed `true`), every `crumble run` included. A fact is
//! learned again whenever what it depends on changes; removing the
//! directory only costs that time once.

use std::fs;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Bumped when what a fact holds changes.
const FORMAT: u32 = 1;

/// The fact `name` for `depends_on`: read from `dir` when it was kept
/// there for the same dependencies, else learned now, and kept when
/// `keep` says so. A directory that cannot be read or written only means
/// learning it again.
pub(crate) fn remembered<T: Serialize + DeserializeOwned>(
    dir: &Path,
    name: &str,
    depends_on: &[String],
    learn: impl FnOnce() -> T,
    keep: impl FnOnce(&T) -> bool,
) -> T {
    let mut h = Sha256::new();
    h.update(format!("format {FORMAT}\n"));
    for d in depends_on {
        h.update(d.len().to_le_bytes());
        h.update(d.as_bytes());
    }
    let hash: String = h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = dir.join(format!("{name}-{hash}.json"));
    if let Some(fact) = fs::read(&file)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    {
        return fact;
    }
    let fact = learn();
    if keep(&fact) {
        if let Err(e) = store(dir, name, &file, &fact) {
            tracing::debug!(fact = name, error = %e, "host fact not kept");
        }
    }
    fact
}

/// Writes `fact` to `file` atomically, and removes what was kept for
/// `name` under other dependencies (a replaced QEMU's, say).
fn store<T: Serialize>(dir: &Path, name: &str, file: &Path, fact: &T) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(crate::paths::temp_name(name));
    fs::write(&tmp, serde_json::to_vec(fact)?)?;
    fs::rename(&tmp, file)?;
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let stale = path != file
            && path.extension().is_some_and(|e| e == "json")
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(name))
                .is_some_and(|rest| rest.starts_with('-'));
        if stale {
            let _ = fs::remove_file(path);
        }
    }
    Ok(())
}

/// Where the engine keeps host facts.
pub(crate) fn dir() -> std::path::PathBuf {
    crate::paths::cache_dir().join("host")
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cc-hostfacts-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_fact_is_learned_once_per_dependencies() {
        let dir = scratch("once");
        let learned = Cell::new(0);
        let get = |deps: &[String], value: u32| {
            remembered(
                &dir,
                "probe",
                deps,
                || {
                    learned.set(learned.get() + 1);
                    value
                },
                |_| true,
            )
        };
        let a = ["qemu 1:2:3".to_string()];
        assert_eq!(get(&a, 7), 7);
        assert_eq!(get(&a, 8), 7, "kept, not learned again");
        assert_eq!(learned.get(), 1);
        let b = ["qemu 1:2:4".to_string()];
        assert_eq!(get(&b, 9), 9, "learned again for new dependencies");
        assert_eq!(learned.get(), 2);
        let kept: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(kept.len(), 1, "the stale fact was removed: {kept:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unkept_corrupt_and_unwritable_facts_are_learned_again() {
        let dir = scratch("again");
        let deps = ["x".to_string()];
        let fact = |value: bool, keep: bool| remembered(&dir, "ns", &deps, || value, |_| keep);
        assert!(!fact(false, false));
        assert!(fact(true, true), "an unkept fact is not read back");
        let file = fs::read_dir(&dir).unwrap().flatten().next().unwrap().path();
        fs::write(&file, b"{not json").unwrap();
        assert!(!fact(false, false), "a corrupt fact is learned again");
        // A file where the directory should be: learned every time.
        let blocked = scratch("blocked");
        fs::write(&blocked, b"").unwrap();
        let n = Cell::new(0);
        for _ in 0..2 {
            remembered(&blocked, "ns", &deps, || n.set(n.get() + 1), |_| true);
        }
        assert_eq!(n.get(), 2);
        fs::remove_file(&blocked).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
