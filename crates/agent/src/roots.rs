//! Roots of a pod's containers: the host writes each container's erofs
//! image into a directory of the running guest, and the agent mounts it
//! there, under a writable layer of its own, for processes to run in.
//!
//! Layout of a root's directory `dir`: `root.erofs` (the image, written by
//! the host), `lower` (the image, read-only, through a loop device), `rw`
//! (a tmpfs: the overlay's `upper` and `work`) and `root` (the overlay,
//! with `/proc`, `/dev` and `/tmp` mounted in it).

use std::fs::{self, File};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use cc_protocol::{RemoteError, Response};
use rustix::mount::MountFlags;

use crate::mounts::{mkdir, mount as mount_at};
use crate::{error, sys, Mode};

/// The image file the host writes into the root's directory.
pub const IMAGE: &str = "root.erofs";

/// What is mounted inside a container's root, in mount order: the
/// guest's own `/proc` instance, the guest's `/dev`, a private `/tmp`.
const INNER: [&str; 3] = ["proc", "dev", "tmp"];

fn utf8(dir: &[u8]) -> Result<&str, RemoteError> {
    let dir = std::str::from_utf8(dir).map_err(|_| error::invalid("root dir is not UTF-8"))?;
    if !dir.starts_with('/') || dir.split('/').any(|c| c == "..") {
        return Err(error::invalid(format!("root dir {dir:?} is not absolute")));
    }
    Ok(dir.trim_end_matches('/'))
}

/// Mounts the root in `dir` (see the module docs); on failure undoes what
/// it mounted.
pub fn mount(mode: Mode, dir: &[u8]) -> Result<Response, RemoteError> {
    if mode == Mode::Host {
        return Err(error::invalid("container roots need a guest"));
    }
    let dir = utf8(dir)?;
    let mounted = mount_parts(dir);
    if mounted.is_err() {
        detach(dir);
    }
    mounted.map(|()| Response::Done)
}

fn mount_parts(dir: &str) -> Result<(), RemoteError> {
    let image_path = format!("{dir}/{IMAGE}");
    let image =
        File::open(&image_path).map_err(|e| error::os(format_args!("open {image_path}"), &e))?;
    let (device, opened) = sys::loop_attach(image.as_fd())
        .map_err(|e| error::os(format_args!("attach {image_path} to a loop device"), &e))?;
    let sealed = MountFlags::NOSUID | MountFlags::NODEV;
    let lower = format!("{dir}/lower");
    mount_at(&device, &lower, "erofs", MountFlags::RDONLY, None)?;
    // The mount holds the device now, which lets go of the image when
    // it is unmounted.
    drop((opened, image));
    let rw = format!("{dir}/rw");
    mount_at("tmpfs", &rw, "tmpfs", sealed, Some("mode=0700"))?;
    for sub in ["upper", "work"] {
        mkdir(&format!("{rw}/{sub}"))?;
    }
    let root = format!("{dir}/root");
    let options = format!("lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work");
    mount_at(
        "overlay",
        &root,
        "overlay",
        MountFlags::empty(),
        Some(&options),
    )?;
    mount_at(
        "proc",
        &format!("{root}/proc"),
        "proc",
        sealed | MountFlags::NOEXEC,
        None,
    )?;
    mount_at(
        "/dev",
        &format!("{root}/dev"),
        "",
        MountFlags::BIND | MountFlags::REC,
        None,
    )?;
    mount_at(
        "tmpfs",
        &format!("{root}/tmp"),
        "tmpfs",
        sealed,
        Some("mode=1777"),
    )
}

/// Unmounts the root in `dir` and removes `dir` with the image.
pub fn unmount(dir: &[u8]) -> Result<Response, RemoteError> {
    let dir = utf8(dir)?;
    if fs::symlink_metadata(dir).is_err() {
        return Ok(Response::Done);
    }
    detach(dir);
    fs::remove_dir_all(dir).map_err(|e| {
        error::fs(
            "remove",
            std::path::Path::new(dir).as_os_str().as_bytes(),
            &e,
        )
    })?;
    Ok(Response::Done)
}

/// Detaches whatever of a root is mounted, innermost first (a process
/// still inside keeps its view until it ends; the names are gone at once).
fn detach(dir: &str) {
    let root = format!("{dir}/root");
    let inner = INNER.iter().rev().map(|m| format!("{root}/{m}"));
    let outer = [root.clone(), format!("{dir}/rw"), format!("{dir}/lower")];
    for target in inner.chain(outer) {
        let _ = sys::unmount_detach(&target);
    }
}
