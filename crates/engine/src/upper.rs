//! The guest's writable layer: a sparse ext4 disk per instance, copied
//! from a cached empty image of its size (a reflink where the host
//! filesystem has them). Only what the guest writes takes host space, and
//! the guest gets `ENOSPC` once the disk is full.

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
}
