//! Filesystems: the basics at boot, the overlay root the host asks for, and
//! the runtime mounts every root gets.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;

use cc_protocol::{ErrorKind, RemoteError, RootSpec};

use crate::{error, sys};

/// Where the root's parts are assembled, in the initramfs.
const LOWER: &str = "/cc/lower";
const UPPER: &str = "/cc/upper";
const ROOT: &str = "/cc/root";

/// Filesystems carried over from the initramfs into the new root.
const KERNEL_FS: [&str; 3] = ["/dev", "/proc", "/sys"];

/// virtio-blk serials are cut to this many bytes.
const SERIAL_MAX: usize = 20;

fn mkdir(path: &str) -> Result<(), RemoteError> {
    fs::create_dir_all(path).map_err(|e| error::os(format_args!("mkdir {path}"), &e))
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), RemoteError> {
    mkdir(target)?;
    sys::mount(source, target, Some(fstype), flags, data)
        .map_err(|e| error::os(format_args!("mount {fstype} {source} on {target}"), &e))
}

/// Mounts /dev, /proc and /sys in the initramfs; failures are only logged,
/// as the agent must keep running to report anything.
pub fn boot() {
    let nosuid = libc::MS_NOSUID;
    let sealed = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (fstype, target, flags) in [
        ("devtmpfs", "/dev", nosuid),
        ("proc", "/proc", sealed),
        ("sysfs", "/sys", sealed),
    ] {
        if let Err(e) = mount(fstype, target, fstype, flags, None) {
            log!("{e}");
        }
    }
}

/// Whether a disk reporting `device` as its serial is the one the host
/// named `wanted`, which virtio-blk may have cut short.
fn serial_matches(device: &str, wanted: &str) -> bool {
    device == wanted
        || (wanted.len() > SERIAL_MAX && device.as_bytes() == &wanted.as_bytes()[..SERIAL_MAX])
}

/// The device node of the virtio disk with serial `serial`.
fn find_disk(serial: &str) -> Result<String, RemoteError> {
    let entries = fs::read_dir("/sys/block").map_err(|e| error::os("read /sys/block", &e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("vd")) else {
            continue;
        };
        let Ok(found) = fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        if serial_matches(
            found.trim_matches(|c: char| c.is_whitespace() || c == '\0'),
            serial,
        ) {
            return Ok(format!("/dev/{name}"));
        }
    }
    Err(error::new(
        ErrorKind::NotFound,
        format!("no disk with serial {serial:?}"),
    ))
}

/// Builds the overlay of `spec` and makes it the root, like switch_root:
/// the initramfs stays underneath, unreachable, and so do the lower and
/// upper mounts the overlay keeps using.
pub fn switch_root(spec: &RootSpec) -> Result<(), RemoteError> {
    let lower = find_disk(&spec.lower_serial)?;
    let upper = find_disk(&spec.upper_serial)?;
    mount(&lower, LOWER, &spec.lower_fstype, libc::MS_RDONLY, None)?;
    mount(&upper, UPPER, "ext4", 0, None)?;
    // The upper disk may hold a previous run's layer: reuse its directories.
    mkdir(&format!("{UPPER}/upper"))?;
    mkdir(&format!("{UPPER}/work"))?;
    let options = format!("lowerdir={LOWER},upperdir={UPPER}/upper,workdir={UPPER}/work");
    mount("overlay", ROOT, "overlay", 0, Some(&options))?;
    for fs in KERNEL_FS {
        let target = format!("{ROOT}{fs}");
        mkdir(&target)?;
        sys::mount(fs, &target, None, libc::MS_MOVE, None)
            .map_err(|e| error::os(format_args!("move {fs} to {target}"), &e))?;
    }
    let switch = || -> io::Result<()> {
        std::env::set_current_dir(ROOT)?;
        sys::mount(".", "/", None, libc::MS_MOVE, None)?;
        sys::chroot(".")?;
        std::env::set_current_dir("/")
    };
    switch().map_err(|e| error::os(format_args!("switch root to {ROOT}"), &e))
}

/// Mounts /dev/pts, /dev/shm, /tmp and /run, and adds the /dev links
/// programs expect but devtmpfs lacks.
pub fn runtime() -> Result<(), RemoteError> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
    )?;
    mount("tmpfs", "/dev/shm", "tmpfs", flags, Some("mode=1777"))?;
    mount("tmpfs", "/tmp", "tmpfs", flags, Some("mode=1777"))?;
    mount("tmpfs", "/run", "tmpfs", flags, Some("mode=755"))?;
    for (link, target) in [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if Path::new(link).symlink_metadata().is_err() {
            symlink(target, link).map_err(|e| error::os(format_args!("symlink {link}"), &e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_match_exactly_or_as_virtio_cut_them() {
        assert!(serial_matches("cc-lower", "cc-lower"));
        assert!(!serial_matches("cc-lower", "cc-upper"));
        assert!(!serial_matches("cc-lowe", "cc-lower"));
        let long = "cc-0123456789abcdef-lower";
        assert!(serial_matches(&long[..SERIAL_MAX], long));
        assert!(!serial_matches(&long[..SERIAL_MAX - 1], long));
    }
}
