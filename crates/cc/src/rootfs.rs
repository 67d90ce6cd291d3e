//! How an instance gets its root filesystem (BRIEF 3.4), in one place: a
//! read-only erofs image per source tree, built once and cached by content,
//! plus a per-instance sparse ext4 disk the guest uses as overlayfs's upper
//! layer. The source tree and the cached image are never written.

use std::fs;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::process::Command;

use cc_image::{private, HostDir};

use crate::error::{Error, Result};

/// Filesystem type of the read-only images this module builds.
pub(crate) const LOWER_FSTYPE: &str = "erofs";

/// The cached read-only image of `dir`, built by cc-image's [`HostDir`]
/// (cc-erofs, as for OCI layers) unless this exact tree has one already.
/// One walk of the tree gives both the cache key (its fingerprint: paths,
/// types, modes, owners, sizes, mtimes, link targets, xattrs) and what the
/// image is written from, so a cached image costs a walk and nothing more.
pub(crate) fn image_for_dir(dir: &Path, cache: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(dir).map_err(Error::io("open rootfs", dir))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "rootfs {} is not a directory",
            dir.display()
        )));
    }
    let tree = HostDir::read(dir)?;
    let key = hex(&tree.fingerprint()[..12]);
    let images = cache.join("rootfs");
    let image = images.join(format!("{key}.{LOWER_FSTYPE}"));
    if image.is_file() {
        return Ok(image);
    }
    private::create_dir_all(&images).map_err(Error::io("create", &images))?;
    let tmp = images.join(cc_engine::paths::temp_name(&key));
    // Created here so it is private from the start.
    let file = private::create_file(&tmp).map_err(Error::io("create", &tmp))?;
    let written = tree
        .write(BufWriter::with_capacity(1 << 20, file))
        .map_err(Error::from)
        .and_then(|out| {
            out.into_inner()
                .map_err(|e| Error::io("write", &tmp)(e.into_error()))
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &image).map_err(Error::io("rename", &image))?;
    Ok(image)
}

/// Creates the instance's writable disk of `size_mb` MiB at `path`: a copy
/// of a cached, empty, sparse ext4 image of that size (a reflink where the
/// host filesystem has them). Sparse: only what the guest writes takes
/// host space, and the guest gets `ENOSPC` once the disk is full.
pub(crate) fn create_upper(cache: &Path, path: &Path, size_mb: u32) -> Result<()> {
    let template = upper_template(cache, size_mb)?;
    // The copy keeps the mode of the file it lands in: make that private.
    private::create_file(path).map_err(Error::io("create", path))?;
    cc_engine::files::clone_file(&template, path).map_err(Error::io("copy writable disk to", path))
}

/// The cached empty ext4 image of `size_mb` MiB, one per size.
fn upper_template(cache: &Path, size_mb: u32) -> Result<PathBuf> {
    let dir = cache.join("upper");
    let template = dir.join(format!("ext4-{size_mb}m.img"));
    if template.is_file() {
        return Ok(template);
    }
    private::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
    let tmp = dir.join(cc_engine::paths::temp_name("ext4"));
    private::create_file(&tmp)
        .and_then(|f| f.set_len(u64::from(size_mb) << 20))
        .map_err(Error::io("create", &tmp))?;
    // No journal: the layer lives and dies with one instance.
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-E",
            "lazy_itable_init=1",
            "-L",
            "ccupper",
        ])
        .arg(&tmp)
        .output()
        .map_err(|e| tool_error("mkfs.ext4", "e2fsprogs", e))?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io {
            op: "format".into(),
            path: tmp.display().to_string(),
            source: io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    fs::rename(&tmp, &template).map_err(Error::io("rename", &template))?;
    Ok(template)
}

/// Copies only the data extents of `src`, keeping holes.
fn tool_error(tool: &str, package: &str, e: io::Error) -> Error {
    Error::Io {
        op: format!("run {tool} (apt-get install {package})"),
        path: tool.to_string(),
        source: e,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("cc-rootfs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn images_are_cached_by_the_tree_and_rebuilt_when_it_changes() {
        let cache = scratch("cached");
        let tree = cache.join("tree");
        fs::create_dir(&tree).unwrap();
        fs::write(tree.join("f"), b"one").unwrap();
        let first = image_for_dir(&tree, &cache).unwrap();
        let built = fs::metadata(&first).unwrap().modified().unwrap();
        assert_eq!(image_for_dir(&tree, &cache).unwrap(), first);
        assert_eq!(
            fs::metadata(&first).unwrap().modified().unwrap(),
            built,
            "reused, not rebuilt"
        );
        fs::write(tree.join("f"), b"three").unwrap();
        let second = image_for_dir(&tree, &cache).unwrap();
        assert_ne!(second, first);
        let names: Vec<_> = fs::read_dir(cache.join("rootfs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
        fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn missing_and_non_directory_roots_are_clear_errors() {
        let d = scratch("bad");
        let e = image_for_dir(&d.join("nope"), &d).unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::Io);
        assert!(e.to_string().contains("nope"), "{e}");
        fs::write(d.join("file"), b"x").unwrap();
        let e = image_for_dir(&d.join("file"), &d).unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::InvalidArgument);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn writable_disks_have_their_size_one_cached_image_each_and_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let cache = scratch("upper");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for (mb, name) in [(64, "a.img"), (96, "b.img"), (64, "c.img")] {
            let disk = cache.join(name);
            create_upper(&cache, &disk, mb).unwrap();
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

        let tree = cache.join("tree");
        fs::create_dir(&tree).unwrap();
        fs::write(tree.join("f"), b"x").unwrap();
        let image = image_for_dir(&tree, &cache).unwrap();
        assert_eq!(mode(&image), 0o600);
        assert_eq!(mode(image.parent().unwrap()), 0o700);
        fs::remove_dir_all(&cache).unwrap();
    }
}
