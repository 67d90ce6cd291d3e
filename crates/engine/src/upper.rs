//! The guest's writable layer: a sparse ext4 disk per instance, copied
//! from a cached empty image of its size (a reflink where the host
//! filesystem has them). Only what the guest writes takes host space, and
//! the guest gets `ENOSPC` once the disk is full.
//!
//! A restored guest's disk starts as its park's ([`from_park`]) without
//! copying it: a reflink, else a qcow2 overlay over the park's raw disk
//! that takes only what the guest writes after the restore (a copy of an
//! empty one cached per size). Saving such
//! a guest again ([`save`]) writes the two merged into one raw disk.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::rundir::private_dirs;
use crate::{files, paths, Error};

/// Creates the writable disk of `size_mb` MiB at `path`, private to the
/// caller.
pub(crate) fn create(cache: &Path, path: &Path, size_mb: u32) -> Result<(), Error> {
    let template = cached_empty(cache, size_mb)?;
    files::clone_file(&template, path).map_err(Error::io("copy writable disk to", path))
}

/// Makes `upper` the writable disk of a guest restored from the park disk
/// `saved`, and returns the raw image under it when it is a qcow2 overlay.
/// A reflink where the filesystem has them; else an overlay over a hard
/// link of `saved` beside `upper` (the park may be removed while the
/// guest runs, a branch's always is), which QEMU reads and never writes;
/// else (the park on another filesystem) a sparse copy.
pub(crate) fn from_park(
    cache: &Path,
    saved: &Path,
    upper: &Path,
) -> Result<Option<PathBuf>, Error> {
    let copy = || Error::io("copy writable disk to", upper);
    if files::reflink(saved, upper).map_err(copy())? {
        return Ok(None);
    }
    let base = upper.with_file_name(OVERLAY_BASE);
    match fs::hard_link(saved, &base) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            files::clone_file(saved, upper).map_err(copy())?;
            return Ok(None);
        }
        Err(e) => return Err(Error::io("link", &base)(e)),
    }
    let size = fs::metadata(&base).map_err(Error::io("stat", &base))?.len();
    let empty = cached_overlay(cache, size)?;
    files::clone_file(&empty, upper).map_err(copy())?;
    Ok(Some(base))
}

/// The name of an overlay's base beside it, which its header names.
const OVERLAY_BASE: &str = "base.img";

/// An empty qcow2 overlay of a raw base of `size` bytes, made once per
/// size: every overlay starts the same, and `qemu-img` costs each start
/// 10 to 20 ms of a process. Its header names its base relatively,
/// [`OVERLAY_BASE`] beside it, but QEMU is handed the base by descriptor.
fn cached_overlay(cache: &Path, size: u64) -> Result<PathBuf, Error> {
    let dir = cache.join("upper");
    let overlay = dir.join(format!("qcow2-over-raw-{size}.img"));
    if overlay.is_file() {
        return Ok(overlay);
    }
    private_dirs(&dir)?;
    let tmp = dir.join(paths::temp_name("qcow2"));
    // -u: the base is not there to check.
    let made = run_qemu_img(
        Command::new(qemu_img())
            .args([
                "create",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                OVERLAY_BASE,
            ])
            .arg(&tmp)
            .arg(size.to_string()),
        &tmp,
    )
    .and_then(|()| fs::rename(&tmp, &overlay).map_err(Error::io("rename", &overlay)));
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made.map(|()| overlay)
}

/// Writes the writable disk `upper` (with its `backing` image, if it is an
/// overlay) to `dst` as one raw, sparse disk; a raw `upper` is cloned.
pub(crate) fn save(upper: &Path, backing: Option<&Path>, dst: &Path) -> Result<(), Error> {
    let Some(base) = backing else {
        return files::clone_file(upper, dst).map_err(Error::io("copy", dst));
    };
    let opt = |p: &Path| p.to_string_lossy().replace(',', ",,");
    let image = format!(
        "driver=qcow2,file.filename={},file.locking=off,backing.driver=raw,\
         backing.file.filename={},backing.file.locking=off",
        opt(upper),
        opt(base)
    );
    run_qemu_img(
        Command::new(qemu_img())
            .args(["convert", "-q", "--image-opts", &image, "-O", "raw"])
            .arg(dst),
        dst,
    )
}

/// QEMU's image tool, beside the QEMU binary or on `PATH`.
fn qemu_img() -> PathBuf {
    paths::qemu()
        .ok()
        .and_then(|q| q.parent().map(|d| d.join("qemu-img")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| paths::sbin_tool("qemu-img"))
}

fn run_qemu_img(cmd: &mut Command, path: &Path) -> Result<(), Error> {
    let out = cmd.output().map_err(|source| Error::ToolMissing {
        tool: "qemu-img",
        package: "qemu-utils",
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(Error::io("qemu-img", path)(io::Error::other(why)))
}

/// The cached empty ext4 image of `size_mb` MiB, one per size.
fn cached_empty(cache: &Path, size_mb: u32) -> Result<PathBuf, Error> {
    let dir = cache.join("upper");
    let template = dir.join(format!("ext4-{size_mb}m.img"));
    if template.is_file() {
        return Ok(template);
    }
    private_dirs(&dir)?;
    let tmp = dir.join(paths::temp_name("ext4"));
    crate::vm::create_private(&tmp)?
        .set_len(u64::from(size_mb) << 20)
        .map_err(Error::io("size", &tmp))?;
    // No journal: the layer lives and dies with one instance.
    let out = Command::new(paths::sbin_tool("mkfs.ext4"))
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
        .args(["-E", "lazy_itable_init=1", "-L", "ccupper"])
        .arg(&tmp)
        .output()
        .map_err(|source| Error::ToolMissing {
            tool: "mkfs.ext4",
            package: "e2fsprogs",
            source,
        })?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(Error::io("format", &tmp)(io::Error::other(why)));
    }
    fs::rename(&tmp, &template).map_err(Error::io("rename", &template))?;
    Ok(template)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writable_disks_have_their_size_one_cached_image_each_and_are_private() {
        let cache = std::env::temp_dir().join(format!("cc-upper-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache);
        fs::create_dir_all(&cache).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for (mb, name) in [(64, "a.img"), (96, "b.img"), (64, "c.img")] {
            let disk = cache.join(name);
            create(&cache, &disk, mb).unwrap();
            assert_eq!(fs::metadata(&disk).unwrap().len(), u64::from(mb) << 20);
            assert_eq!(mode(&disk), 0o600, "{name}");
        }
        let mut cached: Vec<_> = fs::read_dir(cache.join("upper"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        cached.sort();
        assert_eq!(cached.len(), 2, "one empty image per size: {cached:?}");
        assert!(cached.iter().all(|p| mode(p) == 0o600));
        assert_eq!(mode(&cache.join("upper")), 0o700);
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn restored_disks_are_overlays_copied_from_one_cached_empty_one_per_size() {
        let cache = std::env::temp_dir().join(format!("cc-overlay-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache);
        fs::create_dir_all(cache.join("park")).unwrap();
        let saved = cache.join("park/disk.img");
        fs::File::create(&saved).unwrap().set_len(8 << 20).unwrap();
        let info = |p: &Path| {
            let out = Command::new(qemu_img())
                .args(["info", "--output=json", "-U"])
                .arg(p)
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        for child in ["a", "b"] {
            let run = cache.join(child);
            fs::create_dir_all(&run).unwrap();
            let upper = run.join("upper.img");
            let base = from_park(&cache, &saved, &upper).unwrap();
            // No reflinks (a tmpfs or ext4 temp dir): an overlay.
            if let Some(base) = base {
                assert_eq!(base, run.join(OVERLAY_BASE));
                let json = info(&upper);
                assert!(json.contains("\"format\": \"qcow2\""), "{json}");
                assert!(json.contains("\"virtual-size\": 8388608"), "{json}");
                assert!(
                    json.contains("\"backing-filename\": \"base.img\""),
                    "{json}"
                );
                assert!(
                    json.contains("\"backing-filename-format\": \"raw\""),
                    "{json}"
                );
            }
        }
        let cached = fs::read_dir(cache.join("upper"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(cached <= 1, "one empty overlay for the size");
        fs::remove_dir_all(&cache).unwrap();
    }
}
