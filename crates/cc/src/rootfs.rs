//! How an instance gets its root filesystem (BRIEF 3.4), in one place: a
//! read-only erofs image per source tree, built once and cached by content
//! (the engine adds a writable layer over it). The source tree and the
//! cached image are never written.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use cc_image::{private, HostDir};

use crate::error::{Error, Result};

/// Filesystem type of the read-only images this module builds.
pub(crate) const LOWER_FSTYPE: &str = "erofs";

/// Where, under the cache, the images of host directories live.
pub(crate) const IMAGES_DIR: &str = "rootfs";

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
    let images = cache.join(IMAGES_DIR);
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
    fn root_images_and_their_directory_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let cache = scratch("private");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tree = cache.join("tree");
        fs::create_dir(&tree).unwrap();
        fs::write(tree.join("f"), b"x").unwrap();
        let image = image_for_dir(&tree, &cache).unwrap();
        assert_eq!(mode(&image), 0o600);
        assert_eq!(mode(image.parent().unwrap()), 0o700);
        fs::remove_dir_all(&cache).unwrap();
    }
}
