//! Filesystems: the basics at boot, the overlay root the host asks for, the
//! runtime mounts every root gets, and the host directories shared in.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use cc_protocol::{ErrorKind, Mount, RemoteError, RootSpec};
use rustix::mount::MountFlags;

use crate::{error, sys};

/// Where the root's parts are assembled, in the initramfs: each lower layer
/// at `LOWER/<index>`, the upper disk at `UPPER`.
const LOWER: &str = "/cc/lower";
const UPPER: &str = "/cc/upper";
const ROOT: &str = "/cc/root";

/// Options of every host directory mount. `cache=none` keeps the guest's
/// view current with changes the host makes; the large `msize` makes bulk
/// reads and writes cheaper.
const NINEP_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=524288,cache=none";

/// Filesystems carried over from the initramfs into the new root.
const KERNEL_FS: [&str; 3] = ["/dev", "/proc", "/sys"];

/// virtio-blk serials are cut to this many bytes.
const SERIAL_MAX: usize = 20;

/// `mkdir -p`, mode 0755 (the agent's umask is 0).
fn make_dirs(path: &str) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o755).create(path)
}

pub(crate) fn mkdir(path: &str) -> Result<(), RemoteError> {
    make_dirs(path).map_err(|e| error::os(format_args!("mkdir {path}"), &e))
}

/// Mounts `source` on `target`, made first if missing.
pub(crate) fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: Option<&str>,
) -> Result<(), RemoteError> {
    mkdir(target)?;
    sys::mount(source, target, fstype, flags, data)
        .map_err(|e| error::os(format_args!("mount {fstype} {source} on {target}"), &e))
}

/// Mounts /dev, /proc and /sys in the initramfs; failures are only logged,
/// as the agent must keep running to report anything.
pub fn boot() {
    let nosuid = MountFlags::NOSUID;
    let sealed = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
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
/// upper mounts the overlay keeps using. Returns a descriptor of the upper
/// directory, the only way to reach the writable layer afterwards.
pub fn switch_root(spec: &RootSpec) -> Result<OwnedFd, RemoteError> {
    if spec.lowers.is_empty() {
        return Err(error::invalid("the root has no lower layers"));
    }
    let upper = find_disk(&spec.upper_serial)?;
    let mut lowerdirs = Vec::with_capacity(spec.lowers.len());
    for (i, lower) in spec.lowers.iter().enumerate() {
        let disk = find_disk(&lower.serial)?;
        let target = format!("{LOWER}/{i}");
        mount(&disk, &target, &lower.fstype, MountFlags::RDONLY, None)?;
        lowerdirs.push(target);
    }
    mount(&upper, UPPER, "ext4", MountFlags::empty(), None)?;
    // The upper disk may hold a previous run's layer: reuse its directories.
    let upper_dir = format!("{UPPER}/upper");
    mkdir(&upper_dir)?;
    mkdir(&format!("{UPPER}/work"))?;
    // Both overlayfs and the list are uppermost first.
    let options = format!(
        "lowerdir={},upperdir={upper_dir},workdir={UPPER}/work",
        lowerdirs.join(":")
    );
    mount(
        "overlay",
        ROOT,
        "overlay",
        MountFlags::empty(),
        Some(&options),
    )?;
    let upper_fd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&upper_dir)
        .map(OwnedFd::from)
        .map_err(|e| error::os(format_args!("open {upper_dir}"), &e))?;
    for fs in KERNEL_FS {
        let target = format!("{ROOT}{fs}");
        mkdir(&target)?;
        sys::mount_move(fs, &target)
            .map_err(|e| error::os(format_args!("move {fs} to {target}"), &e))?;
    }
    let switch = || -> io::Result<()> {
        std::env::set_current_dir(ROOT)?;
        sys::mount_move(".", "/")?;
        sys::chroot(".")?;
        std::env::set_current_dir("/")
    };
    switch().map_err(|e| error::os(format_args!("switch root to {ROOT}"), &e))?;
    Ok(upper_fd)
}

/// Shares of guest RAM the runtime tmpfs mounts may fill: together half
/// of it (tmpfs's default is half *each*, so filling two of them left the
/// guest's processes no memory and the guest died).
const SHM_SIZE: &str = "size=20%";
const TMP_SIZE: &str = "size=25%";
const RUN_SIZE: &str = "size=5%";

/// Mounts /dev/pts, /dev/shm, /tmp and /run, and adds the /dev links
/// programs expect but devtmpfs lacks.
pub fn runtime() -> Result<(), RemoteError> {
    let flags = MountFlags::NOSUID | MountFlags::NODEV;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620,gid=5"),
    )?;
    let shm = format!("mode=1777,{SHM_SIZE}");
    let tmp = format!("mode=1777,{TMP_SIZE}");
    let run = format!("mode=755,{RUN_SIZE}");
    mount("tmpfs", "/dev/shm", "tmpfs", flags, Some(&shm))?;
    mount("tmpfs", "/tmp", "tmpfs", flags, Some(&tmp))?;
    mount("tmpfs", "/run", "tmpfs", flags, Some(&run))?;
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

/// Where the tmpfs holding the generated `/etc` files is mounted while
/// they are bound into place; detached right after.
const ETC_STAGING: &str = "/run/.cc-etc";

/// Binds each of `names` in `/etc` (which must exist) to a file of its own
/// on a small tmpfs, as Docker does, so that writing them (the per-instance
/// hostname and hosts, every start) never touches the root overlay: a
/// restored guest's first write into ext4 through overlayfs runs, and
/// under emulation translates, far more kernel code than one into tmpfs.
/// An image's symlink or missing file becomes an empty file first, the
/// mount point. The tmpfs is detached from its staging directory once the
/// files are bound, so nothing else reaches it.
pub fn bind_etc_files(names: &[&str]) -> Result<(), RemoteError> {
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount(
        "tmpfs",
        ETC_STAGING,
        "tmpfs",
        flags,
        Some("mode=755,size=1m"),
    )?;
    let bound = names.iter().try_for_each(|name| {
        let staged = format!("{ETC_STAGING}/{name}");
        let target = format!("/etc/{name}");
        mount_point_file(&staged)?;
        let target_path = Path::new(&target);
        if target_path.is_symlink() {
            fs::remove_file(target_path)
                .map_err(|e| error::os(format_args!("remove {target}"), &e))?;
        }
        mount_point_file(&target)?;
        sys::mount(&staged, &target, "", MountFlags::BIND, None)
            .map_err(|e| error::os(format_args!("bind {staged} on {target}"), &e))
    });
    let detached = sys::unmount_detach(ETC_STAGING)
        .map_err(|e| error::os(format_args!("detach {ETC_STAGING}"), &e))
        .and_then(|()| {
            fs::remove_dir(ETC_STAGING)
                .map_err(|e| error::os(format_args!("remove {ETC_STAGING}"), &e))
        });
    bound.and(detached)
}

/// Creates `path` as an empty file, mode 0644, unless it exists. An
/// existing file is left as it is: opening it to write would copy it up
/// into the overlay's writable layer for nothing.
fn mount_point_file(path: &str) -> Result<(), RemoteError> {
    if Path::new(path).exists() {
        return Ok(());
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map(drop)
        .map_err(|e| error::os(format_args!("create {path}"), &e))
}

/// Why `guest_path` cannot be a mount point, if it cannot.
pub fn check_mount_path(guest_path: &str) -> Option<&'static str> {
    if !guest_path.starts_with('/') {
        Some("not an absolute path")
    } else if guest_path.split('/').any(|c| c == "..") {
        Some("contains ..")
    } else if guest_path.contains('\0') {
        Some("contains a NUL byte")
    } else if guest_path.split('/').all(|c| c.is_empty() || c == ".") {
        Some("would hide the root")
    } else {
        None
    }
}

/// Mounts host directory `m` (checked by the caller). The host enforces
/// read-only mounts too; mounting them read-only here makes writes fail
/// with EROFS rather than EACCES.
pub fn host_dir(m: &Mount) -> Result<(), RemoteError> {
    let context = format!("mount 9p tag {:?} on {}", m.tag, m.guest_path);
    make_dirs(&m.guest_path).map_err(|e| error::os(format_args!("{context}: mkdir"), &e))?;
    let flags = if m.read_only {
        MountFlags::RDONLY
    } else {
        MountFlags::empty()
    };
    sys::mount(&m.tag, &m.guest_path, "9p", flags, Some(NINEP_OPTIONS))
        .map_err(|e| error::os(&context, &e))
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

    #[test]
    fn mount_points_must_be_absolute_and_stay_put() {
        assert_eq!(check_mount_path("/data"), None);
        assert_eq!(check_mount_path("/srv/a/b/"), None);
        assert_eq!(check_mount_path("/a..b"), None);
        assert_eq!(check_mount_path("data"), Some("not an absolute path"));
        assert_eq!(check_mount_path(""), Some("not an absolute path"));
        assert_eq!(check_mount_path("/data/../etc"), Some("contains .."));
        assert_eq!(check_mount_path("/.."), Some("contains .."));
        assert_eq!(check_mount_path("/a\0b"), Some("contains a NUL byte"));
        assert_eq!(check_mount_path("/"), Some("would hide the root"));
        assert_eq!(check_mount_path("//./"), Some("would hide the root"));
    }
}
