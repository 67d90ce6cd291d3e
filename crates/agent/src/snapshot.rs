//! `SnapshotUpper`: the root overlay's writable layer, streamed to the host
//! as an OCI layer tarball.
//!
//! The upper directory is unreachable by path once the root is switched, so
//! it is walked from a descriptor kept from before the switch, with
//! `openat` relative to each directory and `O_NOFOLLOW` throughout: no
//! symlink in the layer is ever followed. Overlayfs's own records become
//! OCI ones: a whiteout (a 0:0 character device) becomes an empty
//! `.wh.<name>` file, an opaque directory (`trusted.overlay.opaque=y`) gets
//! a `.wh..wh..opq` marker, and the `trusted.overlay.*` attributes are left
//! out. Memory stays bounded: names of one directory at a time, and file
//! contents pass through a buffer of one data chunk.

use std::collections::hash_map::{Entry, HashMap};
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use cc_protocol::{Response, DATA_CHUNK};
use rustix::fs::OFlags;
use tar::{EntryType, Header};

use crate::conn::Reply;
use crate::glob::Glob;
use crate::stream::Sender;
use crate::{error, sys, Mode};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Overlayfs's bookkeeping attributes: never part of a layer.
const OVERLAY_XATTRS: &[u8] = b"trusted.overlay.";
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// Syncs, answers `Done`, and streams the layer under `upper` (the overlay's
/// upper directory; `None` without an overlay root) on `sender`. A failure
/// after the answer resets the stream. In host mode the upper directory is
/// one the host program chose, and the host's filesystems are not synced.
pub fn run(
    reply: Reply,
    mode: Mode,
    upper: Option<BorrowedFd<'_>>,
    exclude: &[String],
    sender: Sender,
) {
    let Some(upper) = upper else {
        return reply.send(Err(error::invalid("no writable layer")));
    };
    let globs = match exclude
        .iter()
        .map(|p| Glob::new(p))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(globs) => globs,
        Err(e) => return reply.send(Err(error::invalid(e))),
    };
    if mode == Mode::Guest {
        sys::sync();
    }
    reply.send(Ok(Response::Done));
    let mut out = BufWriter::with_capacity(DATA_CHUNK, &sender);
    match write_layer(upper, &globs, &mut out).and_then(|()| out.flush()) {
        Ok(()) => sender.finish(),
        // A reset by the host (its reader went away) is no failure here.
        Err(e) => {
            if sender.is_open() {
                log!(
                    "snapshot on stream {}: {}",
                    sender.id(),
                    error::describe(&e)
                );
            }
            sender.reset();
        }
    }
}

/// Writes the tarball of the layer under `upper`, leaving out paths that
/// match `exclude`.
pub fn write_layer(upper: BorrowedFd<'_>, exclude: &[Glob], out: impl Write) -> io::Result<()> {
    let mut walk = Walk {
        tar: tar::Builder::new(out),
        exclude,
        links: HashMap::new(),
    };
    let root = sys::openat(Some(upper), c".", DIR_FLAGS, 0)?;
    walk.dir(root.as_fd(), b"")?;
    // Writes the end-of-archive blocks.
    walk.tar.into_inner()?;
    Ok(())
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);

struct Walk<'a, W: Write> {
    tar: tar::Builder<W>,
    exclude: &'a [Glob],
    /// Archive path of the first entry seen for each multiply linked inode,
    /// by (device, inode): later ones become hard links to it.
    links: HashMap<(u64, u64), Vec<u8>>,
}

/// `err` with the guest path it concerns.
fn at(path: &[u8], err: io::Error) -> io::Error {
    let reason = error::describe(&err);
    io::Error::new(
        err.kind(),
        format!("/{}: {reason}", String::from_utf8_lossy(path)),
    )
}

fn archive_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

impl<W: Write> Walk<'_, W> {
    /// Archives the entries of `dir`, at archive path `rel` (empty for the
    /// root), sorted by name so that equal layers give equal tarballs.
    fn dir(&mut self, dir: BorrowedFd<'_>, rel: &[u8]) -> io::Result<()> {
        let mut names = sys::read_dir(dir).map_err(|e| at(rel, e))?;
        names.sort();
        for name in names {
            let path = child_path(rel, &name);
            let mut guest = Vec::with_capacity(path.len() + 1);
            guest.push(b'/');
            guest.extend_from_slice(&path);
            if self.exclude.iter().any(|g| g.matches(&guest)) {
                continue;
            }
            let cname = sys::cstring(name).map_err(|e| at(&path, e))?;
            let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            // An O_PATH descriptor pins the entry without opening it, which
            // for a device or fifo could block or have effects.
            let node = match sys::openat(Some(dir), &cname, flags, 0) {
                Ok(fd) => File::from(fd),
                // Removed since the directory was read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(at(&path, e)),
            };
            let meta = node.metadata().map_err(|e| at(&path, e))?;
            self.entry(&node, &meta, &path).map_err(|e| at(&path, e))?;
        }
        Ok(())
    }

    fn entry(&mut self, node: &File, meta: &Metadata, path: &[u8]) -> io::Result<()> {
        let kind = meta.file_type();
        let mut header = Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid().into());
        header.set_gid(meta.gid().into());
        header.set_mtime(meta.mtime().max(0) as u64);
        header.set_size(0);
        if kind.is_char_device() && meta.rdev() == 0 {
            // Overlayfs shares one whiteout inode among many names, so this
            // comes before the hard link check.
            header.set_entry_type(EntryType::Regular);
            header.set_mode(0o600);
            let path = whiteout_path(path);
            return self
                .tar
                .append_data(&mut header, archive_path(&path), io::empty());
        }
        if kind.is_socket() {
            return Ok(());
        }
        if !kind.is_dir() && meta.nlink() > 1 {
            match self.links.entry((meta.dev(), meta.ino())) {
                Entry::Occupied(first) => {
                    header.set_entry_type(EntryType::Link);
                    let first = archive_path(first.get());
                    return self.tar.append_link(&mut header, archive_path(path), first);
                }
                Entry::Vacant(slot) => {
                    slot.insert(path.to_vec());
                }
            }
        }
        let xattrs = sys::xattrs(node.as_fd())?;
        let records = pax_xattrs(&xattrs);
        if !records.is_empty() {
            let mut pax = Header::new_gnu();
            pax.set_entry_type(EntryType::XHeader);
            pax.set_mode(0o644);
            pax.set_size(records.len() as u64);
            self.tar.append_data(&mut pax, "PaxHeader", &records[..])?;
        }
        if kind.is_dir() {
            header.set_entry_type(EntryType::Directory);
            self.tar
                .append_data(&mut header, archive_path(path), io::empty())?;
            if is_opaque(&xattrs) {
                header.set_entry_type(EntryType::Regular);
                header.set_mode(meta.mode() & 0o777);
                let marker = opaque_path(path);
                self.tar
                    .append_data(&mut header, archive_path(&marker), io::empty())?;
            }
            let dir = sys::openat(Some(node.as_fd()), c".", DIR_FLAGS, 0)?;
            return self.dir(dir.as_fd(), path);
        }
        if kind.is_file() {
            // Reopening the pinned inode for reading through /proc cannot
            // pick up a file renamed into its place meanwhile.
            let file = File::open(format!("/proc/self/fd/{}", node.as_raw_fd()))?;
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.len());
            let content = Exact::new(file, meta.len(), path);
            return self
                .tar
                .append_data(&mut header, archive_path(path), content);
        }
        if kind.is_symlink() {
            header.set_entry_type(EntryType::Symlink);
            let target = sys::readlink_fd(node.as_fd())?;
            return self
                .tar
                .append_link(&mut header, archive_path(path), archive_path(&target));
        }
        let (entry_type, device) = if kind.is_char_device() {
            (EntryType::Char, true)
        } else if kind.is_block_device() {
            (EntryType::Block, true)
        } else {
            (EntryType::Fifo, false)
        };
        header.set_entry_type(entry_type);
        if device {
            header.set_device_major(libc::major(meta.rdev()))?;
            header.set_device_minor(libc::minor(meta.rdev()))?;
        }
        self.tar
            .append_data(&mut header, archive_path(path), io::empty())
    }
}

/// A file's content as exactly `left` bytes, the size its header promised:
/// a file that grows while archived is cut, one that shrinks is padded
/// with zeros, so the archive stays well formed either way.
struct Exact<'a> {
    inner: File,
    left: u64,
    path: &'a [u8],
    /// The file ended early: the rest is zeros.
    short: bool,
}

impl<'a> Exact<'a> {
    fn new(inner: File, size: u64, path: &'a [u8]) -> Self {
        Self {
            inner,
            left: size,
            path,
            short: false,
        }
    }
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let mut n = 0;
        if !self.short {
            n = self.inner.read(&mut buf[..want])?;
            if n == 0 {
                log!(
                    "snapshot: /{} shrank while archived; padding it",
                    String::from_utf8_lossy(self.path)
                );
                self.short = true;
            }
        }
        if self.short {
            buf[..want].fill(0);
            n = want;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// `rel/name`, or `name` at the root.
fn child_path(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        return name.to_vec();
    }
    [rel, b"/", name].concat()
}

/// The OCI whiteout for archive path `path`: `.wh.` before its last name.
pub fn whiteout_path(path: &[u8]) -> Vec<u8> {
    let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
        Some(slash) => (&path[..slash], &path[slash + 1..]),
        None => (&b""[..], path),
    };
    child_path(dir, &[WHITEOUT_PREFIX, name].concat())
}

/// The OCI opaque marker inside directory `dir`.
pub fn opaque_path(dir: &[u8]) -> Vec<u8> {
    child_path(dir, OPAQUE_MARKER)
}

/// Whether overlayfs marked the directory opaque: it hides the layers below.
fn is_opaque(xattrs: &[(Vec<u8>, Vec<u8>)]) -> bool {
    xattrs
        .iter()
        .any(|(name, value)| name == OPAQUE_XATTR && value == b"y")
}

/// PAX records (`SCHILY.xattr.<name>`) for the attributes that belong in a
/// layer: all but overlayfs's own.
fn pax_xattrs(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    xattrs
        .iter()
        .filter(|(name, _)| !name.starts_with(OVERLAY_XATTRS))
        .flat_map(|(name, value)| pax_record(&[b"SCHILY.xattr.", &name[..]].concat(), value))
        .collect()
}

/// One PAX record, `"<len> <key>=<value>\n"`, where `len` counts the whole
/// record, its own digits included.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut len = rest;
    loop {
        let total = rest + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    [format!("{len} ").as_bytes(), key, b"=", value, b"\n"].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::Scratch;
    use rustix::fs::FileType;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn whiteouts_and_opaque_markers_are_named_as_oci_wants() {
        assert_eq!(whiteout_path(b"etc/motd"), b"etc/.wh.motd");
        assert_eq!(whiteout_path(b"top"), b".wh.top");
        assert_eq!(whiteout_path(b"a/b/c d"), b"a/b/.wh.c d");
        assert_eq!(opaque_path(b"var/lib"), b"var/lib/.wh..wh..opq");
        assert_eq!(child_path(b"", b"x"), b"x");
        assert_eq!(child_path(b"a", b"x"), b"a/x");
    }

    #[test]
    fn opaque_is_exactly_y_and_overlay_xattrs_stay_out() {
        let x = |n: &str, v: &str| (n.as_bytes().to_vec(), v.as_bytes().to_vec());
        assert!(is_opaque(&[x("trusted.overlay.opaque", "y")]));
        assert!(!is_opaque(&[x("trusted.overlay.opaque", "x")]));
        assert!(!is_opaque(&[x("user.opaque", "y")]));
        let records = pax_xattrs(&[
            x("trusted.overlay.opaque", "y"),
            x("trusted.overlay.origin", "zzz"),
            x("user.k", "v"),
            x("security.capability", "\u{1}\u{2}"),
        ]);
        assert_eq!(
            records,
            b"25 SCHILY.xattr.user.k=v\n39 SCHILY.xattr.security.capability=\x01\x02\n"
        );
    }

    #[test]
    fn pax_record_lengths_count_their_own_digits() {
        assert_eq!(pax_record(b"a", b"b"), b"6 a=b\n");
        // 9 bytes without the length, 10 with one digit: two digits, 11.
        assert_eq!(pax_record(b"abc", b"def"), b"11 abc=def\n");
        for n in 0..300 {
            let value = vec![b'v'; n];
            let rec = pax_record(b"key", &value);
            let space = rec.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&rec[..space]).unwrap().parse().unwrap();
            assert_eq!(len, rec.len(), "value of {n} bytes");
        }
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) {
        rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).unwrap();
    }

    fn mknod(path: &Path, kind: FileType, mode: u32, dev: u64) {
        let mode = rustix::fs::Mode::from_raw_mode(mode);
        rustix::fs::mknodat(rustix::fs::CWD, path, kind, mode, dev).unwrap();
    }

    /// What a tar entry says, for comparing.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        path: String,
        kind: char,
        mode: u32,
        link: Option<String>,
        data: Vec<u8>,
        xattrs: Vec<(String, Vec<u8>)>,
    }

    fn read_tar(bytes: &[u8]) -> Vec<Seen> {
        let mut archive = tar::Archive::new(bytes);
        let mut out = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut xattrs = Vec::new();
            if let Some(ext) = entry.pax_extensions().unwrap() {
                for rec in ext {
                    let rec = rec.unwrap();
                    xattrs.push((rec.key().unwrap().to_string(), rec.value_bytes().to_vec()));
                }
            }
            let header = entry.header();
            let seen = Seen {
                path: String::from_utf8(entry.path_bytes().into_owned()).unwrap(),
                kind: header.entry_type().as_byte() as char,
                mode: header.mode().unwrap(),
                link: entry
                    .link_name_bytes()
                    .map(|l| String::from_utf8(l.into_owned()).unwrap()),
                data: Vec::new(),
                xattrs,
            };
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            out.push(Seen { data, ..seen });
        }
        out
    }

    fn seen(path: &str, kind: char, mode: u32) -> Seen {
        Seen {
            path: path.into(),
            kind,
            mode,
            link: None,
            data: Vec::new(),
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn an_upper_directory_becomes_an_oci_layer() {
        if !is_root() {
            eprintln!("skipped: needs root for whiteouts and trusted xattrs");
            return;
        }
        let s = Scratch::new();
        let up = s.0.join("upper");
        let mkdir = |rel: &str, mode| {
            fs::create_dir(up.join(rel)).unwrap();
            fs::set_permissions(up.join(rel), fs::Permissions::from_mode(mode)).unwrap();
        };
        mkdir("", 0o755);
        mkdir("etc", 0o755);
        fs::write(up.join("etc/hostname"), b"box\n").unwrap();
        fs::set_permissions(up.join("etc/hostname"), fs::Permissions::from_mode(0o644)).unwrap();
        mknod(&up.join("etc/motd"), FileType::CharacterDevice, 0, 0);
        mkdir("opaque", 0o750);
        set_xattr(&up.join("opaque"), "trusted.overlay.opaque", b"y");
        set_xattr(&up.join("opaque"), "user.note", b"kept");
        fs::write(up.join("opaque/new"), b"n").unwrap();
        fs::set_permissions(up.join("opaque/new"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(up.join("opaque/new"), up.join("opaque/new2")).unwrap();
        std::os::unix::fs::symlink("../etc/hostname", up.join("link")).unwrap();
        std::os::unix::fs::symlink("/nowhere", up.join("dangling")).unwrap();
        mknod(&up.join("fifo"), FileType::Fifo, 0o600, 0);
        let null = rustix::fs::makedev(1, 3);
        mknod(&up.join("null"), FileType::CharacterDevice, 0o666, null);
        mkdir("tmp", 0o1777);
        fs::write(up.join("tmp/junk"), b"j").unwrap();
        fs::write(up.join("app.log"), b"l").unwrap();
        mkdir("cache", 0o755);
        fs::write(up.join("cache/x"), b"x").unwrap();
        let long = "d".repeat(120);
        fs::write(up.join(&long), b"long").unwrap();
        let sock = std::os::unix::net::UnixListener::bind(up.join("sock")).unwrap();

        let exclude = ["/tmp/*", "*.log", "/cache"].map(|p| Glob::new(p).unwrap());
        let dir = File::open(&up).unwrap();
        let mut tarball = Vec::new();
        write_layer(dir.as_fd(), &exclude, &mut tarball).unwrap();
        drop(sock);
        let entries = read_tar(&tarball);

        // Sorted by the names in the upper directory: a whiteout sorts by
        // the name it deletes.
        let mut expected = vec![
            Seen {
                link: Some("/nowhere".into()),
                ..seen("dangling", '2', 0o777)
            },
            seen(&long, '0', 0o666),
            seen("etc", '5', 0o755),
            seen("etc/hostname", '0', 0o644),
            seen("etc/.wh.motd", '0', 0o600),
            seen("fifo", '6', 0o600),
            Seen {
                link: Some("../etc/hostname".into()),
                ..seen("link", '2', 0o777)
            },
            seen("null", '3', 0o666),
            Seen {
                xattrs: vec![("SCHILY.xattr.user.note".into(), b"kept".to_vec())],
                ..seen("opaque", '5', 0o750)
            },
            seen("opaque/.wh..wh..opq", '0', 0o750),
            seen("opaque/new", '0', 0o4755),
            Seen {
                link: Some("opaque/new".into()),
                ..seen("opaque/new2", '1', 0o4755)
            },
            seen("tmp", '5', 0o1777),
        ];
        expected[1].data = b"long".to_vec();
        expected[3].data = b"box\n".to_vec();
        expected[10].data = b"n".to_vec();
        assert_eq!(entries, expected);
    }

    #[test]
    fn files_are_archived_at_the_size_their_header_says() {
        let s = Scratch::new();
        let path = s.0.join("f");
        fs::write(&path, b"abcdef").unwrap();
        let mut short = Exact::new(File::open(&path).unwrap(), 4, b"f");
        let mut out = Vec::new();
        short.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcd");
        let mut long = Exact::new(File::open(&path).unwrap(), 9, b"f");
        let mut out = Vec::new();
        long.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcdef\0\0\0");
    }
}
