//! Host directories as root images, built by cc-erofs like layers are.
//!
//! One walk of the directory ([`HostDir::read`]) gives both the tree the
//! image is written from and a fingerprint of everything that goes into
//! it, so a cache can tell whether an image built earlier still matches
//! without reading any file's contents. Those are read only when the image
//! is written ([`HostDir::write`]), straight from the host files into the
//! image, never held in memory.
//!
//! The image keeps what a guest needs of its root filesystem (and what
//! `mkfs.erofs`, which built these images before, kept): every file type
//! (sockets too), permission bits with setuid/setgid/sticky, owners as the
//! host has them, mtimes to the nanosecond, symlink targets as written
//! (even pointing outside the directory: in the guest they resolve inside
//! its root), hard links within the tree as one inode, and the xattrs the
//! host reports (erofs stores `user.`, `trusted.`, `security.` and POSIX
//! ACLs). Mount points inside the directory are crossed like any
//! directory.
//!
//! The fingerprint covers each entry's path, type, mode, owners, size,
//! mtime, device number, symlink target, xattrs and which earlier path it
//! is a hard link of. Like `make`, it trusts size and mtime for contents:
//! a file rewritten with the same size and its mtime put back is not seen.
//! A file that changes between the walk and the copy of its contents is an
//! error, so an image never holds something its fingerprint does not
//! describe.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Seek, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use cc_erofs::{Builder, DataRef, Kind, Metadata, Node, NodeId, Tree};
use sha2::{Digest as _, Sha256};

use crate::{Error, Result};

/// What the fingerprint covers and how images are built from it; a change
/// to either must change this, so old cached images are not reused.
const FORMAT: &[u8] = b"cc-erofs-hostdir-1";

/// A host directory, walked: the image's tree, where each file's contents
/// are, and the fingerprint.
#[derive(Debug)]
pub struct HostDir {
    root: PathBuf,
    tree: Tree,
    files: Vec<HostFile>,
    fingerprint: [u8; 32],
}

/// A regular file whose contents go into the image.
#[derive(Debug)]
struct HostFile {
    node: NodeId,
    /// Path relative to the root.
    rel: PathBuf,
    seen: Identity,
}

/// What must not change between the walk and copying a file's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Identity {
    fn of(m: &fs::Metadata) -> Identity {
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        }
    }
}

/// The walk in progress.
struct Walk {
    root: PathBuf,
    tree: Tree,
    files: Vec<HostFile>,
    hash: Sha256,
    /// Non-directories with more than one name: their node and the path
    /// of the name seen first.
    links: HashMap<(u64, u64), (NodeId, PathBuf)>,
}

impl HostDir {
    /// Walks the directory `root` (a symlink to one is followed; nothing
    /// below it is).
    pub fn read(root: &Path) -> Result<HostDir> {
        let root = fs::canonicalize(root).map_err(Error::io("open", root))?;
        let meta = fs::metadata(&root).map_err(Error::io("stat", &root))?;
        if !meta.is_dir() {
            return Err(Error::io("open", &root)(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        let mut hash = Sha256::new();
        hash.update(FORMAT);
        let mut walk = Walk {
            tree: Tree::new(Metadata::default()),
            files: Vec::new(),
            hash,
            links: HashMap::new(),
            root,
        };
        let (_, root_meta) = walk.entry(Path::new(""), &meta)?;
        walk.tree.node_mut(Tree::ROOT).meta = root_meta;
        let mut dirs = vec![(Tree::ROOT, PathBuf::new())];
        while let Some((dir, rel)) = dirs.pop() {
            let subdirs = walk.dir(dir, &rel)?;
            // Depth first, in name order: the fingerprint depends on it.
            dirs.extend(subdirs.into_iter().rev());
        }
        Ok(HostDir {
            root: walk.root,
            tree: walk.tree,
            files: walk.files,
            fingerprint: walk.hash.finalize().into(),
        })
    }

    /// SHA-256 over everything the image is built from (see the module
    /// docs), and the format version.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Writes the erofs image into `out` (which should be empty), copying
    /// each file's contents from the host, and returns `out` flushed.
    pub fn write<W: Write + Seek>(mut self, out: W) -> Result<W> {
        let mut builder = Builder::new(out).map_err(Error::io("write", "root image"))?;
        for file in &self.files {
            let path = self.root.join(&file.rel);
            let data = copy_file(&mut builder, &path, file.seen)?;
            self.tree.node_mut(file.node).kind = Kind::File(data);
        }
        // Build time 0: the same tree always gives the same image.
        let (out, _) = builder.finish(&self.tree, 0)?;
        Ok(out)
    }
}

/// Appends the contents of `path` to the image, checking that it is still
/// the file the walk saw, before and after.
fn copy_file<W: Write + Seek>(
    builder: &mut Builder<W>,
    path: &Path,
    seen: Identity,
) -> Result<DataRef> {
    // Not following a symlink that replaced the file since the walk.
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(Error::io("read", path))?;
    let unchanged = |file: &File| -> Result<()> {
        let now = file.metadata().map_err(Error::io("stat", path))?;
        if Identity::of(&now) != seen {
            return Err(Error::io("read", path)(io::Error::other(
                "it changed while its root image was built; try again",
            )));
        }
        Ok(())
    };
    unchanged(&file)?;
    let data = builder
        .add_data(&mut file, seen.size)
        .map_err(Error::io("copy into the root image", path))?;
    unchanged(&file)?;
    Ok(data)
}

impl Walk {
    /// Adds the entries of directory `dir` at `rel` to the tree and the
    /// fingerprint; returns its subdirectories, in name order.
    fn dir(&mut self, dir: NodeId, rel: &Path) -> Result<Vec<(NodeId, PathBuf)>> {
        let path = self.root.join(rel);
        let mut names = fs::read_dir(&path)
            .and_then(|entries| {
                entries
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()
            })
            .map_err(Error::io("read directory", &path))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut subdirs = Vec::new();
        for name in names {
            let rel = rel.join(&name);
            let path = self.root.join(&rel);
            let meta = fs::symlink_metadata(&path).map_err(Error::io("stat", &path))?;
            let link_key = (meta.dev(), meta.ino());
            let earlier = (!meta.is_dir() && meta.nlink() > 1)
                .then(|| self.links.get(&link_key).cloned())
                .flatten();
            let id = match earlier {
                Some((id, first)) => {
                    // The metadata is the first name's: only where it is.
                    self.hash_bytes(rel.as_os_str().as_bytes());
                    self.hash.update(b"L");
                    self.hash_bytes(first.as_os_str().as_bytes());
                    id
                }
                None => {
                    let (kind, node_meta) = self.entry(&rel, &meta)?;
                    let is_dir = matches!(kind, Kind::Dir(_));
                    let id = self.tree.add(Node {
                        kind,
                        meta: node_meta,
                    });
                    if is_dir {
                        subdirs.push((id, rel.clone()));
                    } else if meta.nlink() > 1 {
                        self.links.insert(link_key, (id, rel.clone()));
                    }
                    if meta.is_file() && meta.size() > 0 {
                        self.files.push(HostFile {
                            node: id,
                            rel: rel.clone(),
                            seen: Identity::of(&meta),
                        });
                    }
                    id
                }
            };
            self.tree
                .link(dir, name.as_bytes(), id)
                .map_err(|e| Error::io("read", &path)(io::Error::other(e)))?;
        }
        Ok(subdirs)
    }

    /// The node kind and metadata of the entry at `rel`, fed to the
    /// fingerprint. A regular file's data is filled in when written.
    fn entry(&mut self, rel: &Path, m: &fs::Metadata) -> Result<(Kind, Metadata)> {
        let path = self.root.join(rel);
        let ft = m.file_type();
        let (tag, kind) = if ft.is_dir() {
            (b'd', Kind::Dir(Default::default()))
        } else if ft.is_file() {
            (b'f', Kind::File(DataRef { blkaddr: 0, len: 0 }))
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(Error::io("read link", &path))?;
            (b'l', Kind::Symlink(target.into_os_string().into_vec()))
        } else if ft.is_char_device() || ft.is_block_device() {
            let (major, minor) = (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev()));
            match ft.is_char_device() {
                true => (b'c', Kind::CharDev { major, minor }),
                false => (b'b', Kind::BlockDev { major, minor }),
            }
        } else if ft.is_fifo() {
            (b'p', Kind::Fifo)
        } else {
            (b's', Kind::Socket)
        };
        let xattrs = xattrs(&path)?;
        self.hash_bytes(rel.as_os_str().as_bytes());
        self.hash.update([tag]);
        for n in [m.mode(), m.uid(), m.gid()] {
            self.hash.update(n.to_le_bytes());
        }
        for n in [m.size(), m.mtime() as u64, m.mtime_nsec() as u64, m.rdev()] {
            self.hash.update(n.to_le_bytes());
        }
        if let Kind::Symlink(target) = &kind {
            self.hash_bytes(target);
        }
        self.hash.update((xattrs.len() as u64).to_le_bytes());
        for (name, value) in &xattrs {
            self.hash_bytes(name);
            self.hash_bytes(value);
        }
        let meta = Metadata {
            mode: (m.mode() & 0o7777) as u16,
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            xattrs,
        };
        Ok((kind, meta))
    }

    /// Feeds `bytes` with its length first, so no two sequences of fields
    /// hash alike.
    fn hash_bytes(&mut self, bytes: &[u8]) {
        self.hash.update((bytes.len() as u64).to_le_bytes());
        self.hash.update(bytes);
    }
}

/// The extended attributes of `path` itself (not a symlink's target), by
/// name; none where the filesystem has no xattrs.
fn xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let fail = |e: rustix::io::Errno| Error::io("read xattrs of", path)(e.into());
    let mut names = Vec::new();
    loop {
        let len = match rustix::fs::llistxattr_query(path) {
            // Most files have none: one system call for them.
            Ok(0) | Err(rustix::io::Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Ok(len) => len,
            Err(e) => return Err(fail(e)),
        };
        names.resize(len, 0);
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(got) => {
                names.truncate(got);
                break;
            }
            // Another name was added since the query: ask again.
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(fail(e)),
        }
    }
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = Vec::new();
        loop {
            let len = match rustix::fs::lgetxattr_query(path, name) {
                Ok(len) => len,
                // Removed since it was listed.
                Err(rustix::io::Errno::NODATA) => break,
                Err(e) => return Err(fail(e)),
            };
            value.resize(len, 0);
            match rustix::fs::lgetxattr(path, name, &mut value[..]) {
                Ok(got) => {
                    value.truncate(got);
                    out.push((name.to_vec(), value));
                    break;
                }
                Err(rustix::io::Errno::RANGE) => continue,
                Err(rustix::io::Errno::NODATA) => break,
                Err(e) => return Err(fail(e)),
            }
        }
    }
    out.sort();
    Ok(out)
}
