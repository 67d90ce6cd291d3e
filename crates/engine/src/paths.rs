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
    format!(".{stem}.{}-{n}.tmp", std::process::id())
}
