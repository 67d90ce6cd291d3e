//! Where the engine finds its inputs: cache dir, guest kernel, guest agent,
//! QEMU. Environment variables override every default.

use std::path::{Path, PathBuf};

use crate::Error;

/// The per-user cache root: `CC_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/crumblecracker`, else `~/.cache/crumblecracker`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env_path("CC_CACHE_DIR") {
        return dir;
    }
    let base = env_path("XDG_CACHE_HOME").unwrap_or_else(|| home().join(".cache"));
    base.join("crumblecracker")
}

fn home() -> PathBuf {
    env_path("HOME").unwrap_or_else(|| PathBuf::from("/"))
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The guest kernel: `CC_KERNEL`, else the one `scripts/build-kernel.sh`
/// cached last (`<cache>/kernel/current/vmlinux`).
pub fn kernel() -> Result<PathBuf, Error> {
    let path = env_path("CC_KERNEL").unwrap_or_else(|| cache_dir().join("kernel/current/vmlinux"));
    existing(path, Error::KernelMissing)
}

/// The static guest agent: `CC_AGENT`, else the one `scripts/setup.sh`
/// installed (`<cache>/agent/cc-agent`).
pub fn agent() -> Result<PathBuf, Error> {
    let path = env_path("CC_AGENT").unwrap_or_else(|| cache_dir().join("agent/cc-agent"));
    existing(path, Error::AgentMissing)
}

/// The content hash directory name of the kernel, when it is a cached build.
pub fn kernel_hash(kernel: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(kernel)
        .ok()?
        .parent()?
        .file_name()?
        .to_str()?
        .to_string();
    Some(dir)
}

/// The QEMU binary: `CC_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn qemu() -> Result<PathBuf, Error> {
    let name = std::env::var("CC_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    if name.contains('/') {
        return existing(PathBuf::from(&name), |_| Error::QemuMissing(name.clone()));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(&name))
        .find(|p| p.is_file())
        .ok_or(Error::QemuMissing(name))
}

fn existing(path: PathBuf, missing: impl FnOnce(PathBuf) -> Error) -> Result<PathBuf, Error> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(missing(path))
    }
}

/// A file name for an in-flight write next to its final place: unique per
/// process and call, so concurrent builders (threads or processes) never
/// write the same temporary file.
pub fn temp_name(stem: &str) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{stem}.{}-{n}.tmp", owner_tag())
}

/// This process as the owner of files it may leave behind if it dies:
/// `PID.STARTTIME`, which no other process has, even after the pid is
/// reused.
pub fn owner_tag() -> String {
    let pid = std::process::id();
    format!("{pid}.{}", start_time(pid).unwrap_or(0))
}

/// Whether the process an [`owner_tag`] names still runs (a zombie does
/// not). A tag without a start time is judged by the pid alone.
pub fn owner_alive(tag: &str) -> bool {
    let (pid, start) = match tag.split_once('.') {
        Some((p, s)) => (p, s.parse::<u64>().ok()),
        None => (tag, None),
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return true; // not ours to judge
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    match parse_stat(&stat) {
        Some((state, _)) if state == 'Z' || state == 'X' => false,
        Some((_, started)) => start.is_none_or(|s| s == started),
        None => true,
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, start)| start)
}

/// The state and start time (field 22) from `/proc/PID/stat`; the command
/// name (field 2) may hold spaces and parentheses, so fields are counted
/// from its closing parenthesis.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=21 lie between the state and the start time.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_told_apart_by_start_time() {
        assert!(owner_alive(&owner_tag()));
        let pid = std::process::id();
        assert!(!owner_alive(&format!("{pid}.1")), "same pid, other start");
        assert!(!owner_alive("999999999.5"));
        assert!(owner_alive(&pid.to_string()), "old names: pid alone");
        assert_eq!(
            parse_stat("7 (a) b) c) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0"),
            Some(('S', 4242))
        );
    }
}
