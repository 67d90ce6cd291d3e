//! How an instance gets its root filesystem (BRIEF 3.4), in one place: a
//! read-only erofs image per source tree, built once and cached by content
//! (the engine adds a writable layer over it). The source tree and the
//! cached image are never written.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cc_image::private;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Filesystem type of the read-only images this module builds.
pub(crate) const LOWER_FSTYPE: &str = "erofs";

/// The cached read-only image of `dir`, built if this exact tree (paths,
/// types, modes, owners, sizes, mtimes, link targets) has none yet.
pub(crate) fn image_for_dir(dir: &Path, cache: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(dir).map_err(Error::io("open rootfs", dir))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "rootfs {} is not a directory",
            dir.display()
        )));
    }
    let mut hasher = Sha256::new();
    fingerprint(dir, Path::new(""), &mut hasher)?;
    let key = hex(&hasher.finalize()[..12]);
    let images = cache.join("rootfs");
    let image = images.join(format!("{key}.{LOWER_FSTYPE}"));
    if image.is_file() {
        return Ok(image);
    }
    private::create_dir_all(&images).map_err(Error::io("create", &images))?;
    let tmp = images.join(cc_engine::paths::temp_name(&key));
    // Created here so it is private from the start; mkfs.erofs writes into it.
    private::create_file(&tmp).map_err(Error::io("create", &tmp))?;
    let out = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&tmp)
        .arg(dir)
        .output()
        .map_err(|e| tool_error("mkfs.erofs", "erofs-utils", e))?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io {
            op: "build root image from".into(),
            path: dir.display().to_string(),
            source: io::Error::other(format!(
                "mkfs.erofs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        });
    }
    fs::rename(&tmp, &image).map_err(Error::io("rename", &image))?;
    Ok(image)
}

/// Feeds every entry's identity under `root/rel` into `h`, in name order.
fn fingerprint(root: &Path, rel: &Path, h: &mut Sha256) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(Error::io("read rootfs", &dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .map_err(Error::io("read rootfs", &dir))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let m = fs::symlink_metadata(&path).map_err(Error::io("stat", &path))?;
        let line = format!(
            "{}\0{:o} {} {} {} {} {} {}\n",
            rel.display(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.rdev()
        );
        h.update(line.as_bytes());
        if m.file_type().is_symlink() {
            let target = fs::read_link(&path).map_err(Error::io("readlink", &path))?;
            h.update(target.as_os_str().as_encoded_bytes());
        } else if m.is_dir() {
            fingerprint(root, &rel, h)?;
        }
    }
    Ok(())
}

/// A tool that could not run, naming the package that has it.
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

    fn key(dir: &Path) -> String {
        let mut h = Sha256::new();
        fingerprint(dir, Path::new(""), &mut h).unwrap();
        hex(&h.finalize())
    }

    #[test]
    fn fingerprint_changes_with_content_metadata_and_links() {
        let d = scratch("fp");
        fs::create_dir(d.join("etc")).unwrap();
        fs::write(d.join("etc/a"), b"1").unwrap();
        let k0 = key(&d);
        assert_eq!(k0, key(&d), "stable");
        fs::write(d.join("etc/a"), b"22").unwrap();
        let k1 = key(&d);
        assert_ne!(k0, k1);
        std::os::unix::fs::symlink("etc/a", d.join("l")).unwrap();
        let k2 = key(&d);
        assert_ne!(k1, k2);
        fs::remove_file(d.join("l")).unwrap();
        std::os::unix::fs::symlink("etc", d.join("l")).unwrap();
        assert_ne!(k2, key(&d), "link target counts");
        fs::remove_dir_all(&d).unwrap();
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
