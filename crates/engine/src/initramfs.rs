//! The guest's initramfs: the agent as `/init` plus the few nodes the kernel
//! needs before the agent mounts devtmpfs. Written as a `newc` cpio archive
//! directly, so no root privileges or `cpio` tool are needed for device nodes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::Error;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// One archive member.
#[derive(Debug)]
pub struct Entry<'a> {
    pub name: &'a str,
    /// Type and permission bits (`S_IF*` | perms).
    pub mode: u32,
    pub data: &'a [u8],
    /// (major, minor) for device nodes.
    pub rdev: (u32, u32),
}

impl<'a> Entry<'a> {
    pub fn dir(name: &'a str) -> Self {
        Entry {
            name,
            mode: S_IFDIR | 0o755,
            data: &[],
            rdev: (0, 0),
        }
    }
    pub fn file(name: &'a str, perms: u32, data: &'a [u8]) -> Self {
        Entry {
            name,
            mode: S_IFREG | perms,
            data,
            rdev: (0, 0),
        }
    }
    pub fn char_dev(name: &'a str, perms: u32, major: u32, minor: u32) -> Self {
        Entry {
            name,
            mode: S_IFCHR | perms,
            data: &[],
            rdev: (major, minor),
        }
    }
}

/// Writes a `newc` archive of `entries`, ending with the trailer.
pub fn write_newc(out: &mut impl Write, entries: &[Entry<'_>]) -> std::io::Result<()> {
    let trailer = Entry {
        name: "TRAILER!!!",
        mode: 0,
        data: &[],
        rdev: (0, 0),
    };
    for (ino, e) in entries.iter().chain(std::iter::once(&trailer)).enumerate() {
        let name_len = e.name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino + 1,
            e.mode,
            0,
            0,
            1,
            0,
            e.data.len(),
            0,
            0,
            e.rdev.0,
            e.rdev.1,
            name_len,
            0
        );
        out.write_all(header.as_bytes())?;
        out.write_all(e.name.as_bytes())?;
        out.write_all(&[0])?;
        out.write_all(&[0; 3][..pad4(header.len() + name_len)])?;
        out.write_all(e.data)?;
        out.write_all(&[0; 3][..pad4(e.data.len())])?;
    }
    Ok(())
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// The initramfs for `agent`, built once per agent binary and cached under
/// `cache/initramfs/<sha256>.cpio`.
pub fn for_agent(agent: &Path, cache: &Path) -> Result<PathBuf, Error> {
    let bytes = fs::read(agent).map_err(Error::io("read agent", agent))?;
    let hash = hash(&bytes);
    let dir = cache.join("initramfs");
    let path = dir.join(format!("{hash}.cpio"));
    if path.is_file() {
        return Ok(path);
    }
    crate::rundir::private_dirs(&dir)?;
    let mut archive = Vec::with_capacity(bytes.len() + 4096);
    let entries = [
        Entry::dir("dev"),
        Entry::char_dev("dev/console", 0o600, 5, 1),
        Entry::char_dev("dev/null", 0o666, 1, 3),
        Entry::dir("proc"),
        Entry::dir("sys"),
        Entry::file("init", 0o755, &bytes),
    ];
    write_newc(&mut archive, &entries).map_err(Error::io("build initramfs", &path))?;
    // Publish atomically: concurrent builders race to the same content.
    let tmp = dir.join(crate::paths::temp_name(&hash));
    fs::write(&tmp, &archive).map_err(Error::io("write", &tmp))?;
    // A sandboxed QEMU runs as another uid and must read it; it holds
    // nothing but the public agent binary.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))
        .map_err(Error::io("chmod", &tmp))?;
    fs::rename(&tmp, &path).map_err(Error::io("rename", &path))?;
    Ok(path)
}

/// The file name [`for_agent`] gives the initramfs of `agent`.
pub fn file_name(agent: &Path) -> Result<String, Error> {
    let bytes = fs::read(agent).map_err(Error::io("read agent", agent))?;
    Ok(format!("{}.cpio", hash(&bytes)))
}

fn hash(agent: &[u8]) -> String {
    hex(&Sha256::digest(agent)[..12])
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_matches_the_format() {
        let mut out = Vec::new();
        write_newc(
            &mut out,
            &[
                Entry::file("init", 0o755, b"hello"),
                Entry::char_dev("dev/console", 0o600, 5, 1),
            ],
        )
        .unwrap();
        // Header (110) + "init\0" (5) → padded to 116, then 5 data bytes padded to 8.
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[14..22], b"000081ed");
        assert_eq!(&out[54..62], b"00000005");
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..121], b"hello");
        let second = 124;
        assert_eq!(&out[second + 14..second + 22], b"00002180");
        assert_eq!(&out[second + 78..second + 86], b"00000005");
        assert_eq!(&out[second + 86..second + 94], b"00000001");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn cpio_tool_reads_our_archives() {
        let mut out = Vec::new();
        write_newc(
            &mut out,
            &[Entry::dir("d"), Entry::file("d/f", 0o644, b"abc")],
        )
        .unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&out).unwrap();
        let listing = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&listing.stdout), "d\nd/f\n");
    }
}
