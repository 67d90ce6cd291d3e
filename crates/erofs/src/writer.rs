//! Streams an erofs image: regular file data first, as the caller reads it
//! from layers, then (given the finished tree) directory blocks, symlink
//! targets, the inodes and the superblock.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::format::{
    encode_rdev, encode_xattrs, pack_dir, Dirent, Inode, Superblock, XattrError, Xattrs,
    BLOCK_SIZE, FT_BLKDEV, FT_CHRDEV, FT_DIR, FT_FIFO, FT_REG_FILE, FT_SOCK, FT_SYMLINK,
    INODE_SIZE, MAX_BLOCKS, MAX_SYMLINK, SLOT_SIZE, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK,
    S_IFREG, S_IFSOCK,
};
use crate::tree::{check_name, DataRef, Kind, Node, Tree};

/// Copy and write-back buffer size: large writes keep multi-GB images fast.
const BUF_SIZE: usize = 256 * 1024;

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the erofs image: {0}")]
    Io(#[from] io::Error),
    #[error("the image needs more than {MAX_BLOCKS} blocks of {BLOCK_SIZE} bytes")]
    TooManyBlocks,
    #[error("the tree has more than {} reachable nodes", u32::MAX - 1)]
    TooManyInodes,
    #[error("the root node is not a directory")]
    RootNotDirectory,
    #[error("{path}: node id is not in the tree")]
    InvalidNode { path: String },
    #[error("{path}: directory reachable by more than one name")]
    DirectoryLinkedTwice { path: String },
    #[error("{path}: invalid file name")]
    BadName { path: String },
    #[error(
        "{path}: symlink target of {len} bytes; it must be 1 to {MAX_SYMLINK} bytes without NUL"
    )]
    BadSymlink { path: String, len: usize },
    #[error("{path}: device {major}:{minor} exceeds Linux's 12-bit major / 20-bit minor")]
    BadDevice {
        path: String,
        major: u32,
        minor: u32,
    },
    #[error(
        "{path}: extended attribute {name} too large (name over 255 bytes after its prefix, \
         value over 65535 bytes, or all together over 256 KiB)"
    )]
    XattrTooLarge { path: String, name: String },
    #[error("{path}: file data {data:?} was not written by this builder")]
    InvalidDataRef { path: String, data: DataRef },
}

/// What [`Builder::finish`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Inodes written: the nodes reachable from the root.
    pub inodes: u64,
    /// Image size in 4096-byte blocks.
    pub blocks: u32,
    /// Extended attributes left out because erofs has no name index for
    /// their prefix (it stores `user.`, `trusted.`, `security.` and POSIX
    /// ACLs only).
    pub skipped_xattrs: u64,
}

/// Writes one erofs image into `W`, which should start out empty.
///
/// Call [`Builder::add_data`] for each regular file's contents (in any
/// order, as they are read), put the returned [`DataRef`]s in the tree, then
/// [`Builder::finish`] with the final tree. Writing is sequential except for
/// the superblock at the end (and a seek after a failed `add_data`), so a
/// `BufWriter<File>` helps images with many small files.
pub struct Builder<W: Write + Seek> {
    out: W,
    /// First block after the file data written so far.
    next_blk: u64,
    /// Whether `out` is positioned at `next_blk`, saving a seek per file.
    at_end: bool,
    /// Copy buffer: `BUF_SIZE` bytes of data plus a block for padding.
    buf: Vec<u8>,
}

impl<W: Write + Seek> fmt::Debug for Builder<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("next_blk", &self.next_blk)
            .finish_non_exhaustive()
    }
}

impl<W: Write + Seek> Builder<W> {
    /// Starts an image in `out` (block 0 is reserved for the superblock).
    pub fn new(mut out: W) -> io::Result<Self> {
        out.seek(SeekFrom::Start(0))?;
        out.write_all(&[0; BLOCK_SIZE as usize])?;
        Ok(Builder {
            out,
            next_blk: 1,
            at_end: true,
            buf: vec![0; BUF_SIZE + BLOCK_SIZE as usize],
        })
    }

    /// Appends exactly `len` bytes from `data` as a regular file's contents,
    /// starting at a fresh 4096-byte block, and returns where they are. A
    /// reader that ends early is an error ([`io::ErrorKind::UnexpectedEof`]);
    /// the partially written blocks are then simply unreferenced.
    pub fn add_data(&mut self, data: &mut impl Read, len: u64) -> io::Result<DataRef> {
        if len == 0 {
            return Ok(DataRef { blkaddr: 0, len: 0 });
        }
        let start = self.next_blk;
        let blocks = len.div_ceil(BLOCK_SIZE);
        let blkaddr = start
            .checked_add(blocks)
            .filter(|&end| end <= MAX_BLOCKS)
            .and_then(|_| u32::try_from(start).ok())
            .ok_or_else(|| io::Error::other(Error::TooManyBlocks))?;
        if !self.at_end {
            self.out.seek(SeekFrom::Start(start * BLOCK_SIZE))?;
        }
        let mut written = 0;
        let copied = self.copy(data, len, &mut written);
        // Even on failure, later data must not land in the blocks written.
        self.next_blk = start + written.div_ceil(BLOCK_SIZE);
        self.at_end = copied.is_ok();
        copied?;
        Ok(DataRef { blkaddr, len })
    }

    /// Copies `len` bytes and the zero padding to the end of their last
    /// block, counting the data bytes copied in `written`.
    fn copy(&mut self, data: &mut impl Read, len: u64, written: &mut u64) -> io::Result<()> {
        let pad = (len.next_multiple_of(BLOCK_SIZE) - len) as usize;
        while *written < len {
            let want = (len - *written).min(BUF_SIZE as u64) as usize;
            let n = match data.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("file data ended after {written} of {len} bytes"),
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut end = n;
            if *written + n as u64 == len {
                // The buffer has a spare block, so small files take one write.
                self.buf[n..n + pad].fill(0);
                end += pad;
            }
            self.out.write_all(&self.buf[..end])?;
            *written += n as u64;
        }
        Ok(())
    }

    /// Writes directories, symlink targets, inodes and the superblock for
    /// every node reachable from [`Tree::ROOT`], then flushes and returns the
    /// writer. `build_time` (seconds since the epoch) goes in the superblock;
    /// the uuid is a hash of the metadata written, so identical inputs give
    /// identical images.
    pub fn finish(mut self, tree: &Tree, build_time: u64) -> Result<(W, Summary), Error> {
        let data_end = self.next_blk;
        let mut plan = Plan::new(tree)?;
        self.out.seek(SeekFrom::Start(data_end * BLOCK_SIZE))?;
        let mut sink = Sink::new(&mut self.out, data_end * BLOCK_SIZE);
        plan.write_data(&mut sink, data_end)?;
        let meta_blkaddr = block_addr(sink.pos)?;
        plan.write_inodes(&mut sink)?;
        let blocks = block_addr(sink.pos)?;
        let uuid = sink.uuid();
        sink.flush()?;

        let root_nid = plan.slots[0].pos / SLOT_SIZE;
        let sb = Superblock {
            // The root is placed first, within the first meta block.
            root_nid: root_nid as u16,
            inos: plan.slots.len() as u64,
            build_time,
            blocks,
            meta_blkaddr,
            uuid,
        };
        self.out.seek(SeekFrom::Start(Superblock::OFFSET))?;
        self.out.write_all(&sb.encode())?;
        self.out.flush()?;
        let summary = Summary {
            inodes: plan.slots.len() as u64,
            blocks,
            skipped_xattrs: plan.skipped_xattrs,
        };
        Ok((self.out, summary))
    }
}

/// The block at byte offset `pos`, which must be addressable with `u32`.
fn block_addr(pos: u64) -> Result<u32, Error> {
    u32::try_from(pos / BLOCK_SIZE).map_err(|_| Error::TooManyBlocks)
}

/// A node to write, in breadth-first order from the root.
struct Slot<'t> {
    node: &'t Node,
    /// The directory that first named this node (the root's is itself).
    parent: usize,
    /// The name it has there (empty for the root), for error paths.
    name: &'t [u8],
    nlink: u32,
    /// Byte offset of the inode in the meta area.
    pos: u64,
    xattrs: Xattrs,
    /// Data block address or device number, once data is written.
    i_u: u32,
    size: u64,
}

/// Reachable nodes with their inode placement.
struct Plan<'t> {
    slots: Vec<Slot<'t>>,
    /// Slot of each tree node (by `NodeId`), `usize::MAX` if not reached.
    index: Vec<usize>,
    /// End of the meta area placed so far.
    meta_len: u64,
    skipped_xattrs: u64,
}

impl<'t> Plan<'t> {
    /// Walks the tree breadth-first (so siblings' inodes are adjacent),
    /// counting links and placing each inode.
    fn new(tree: &'t Tree) -> Result<Plan<'t>, Error> {
        let root = tree.node(Tree::ROOT);
        if !matches!(root.kind, Kind::Dir(_)) {
            return Err(Error::RootNotDirectory);
        }
        let mut plan = Plan {
            slots: Vec::new(),
            index: vec![usize::MAX; tree.len()],
            // Slot 0 stays unused: the kernel uses the nid as the inode
            // number, and some programs skip directory entries with inode 0.
            meta_len: SLOT_SIZE,
            skipped_xattrs: 0,
        };
        plan.push(root, 0, b"")?;
        plan.index[Tree::ROOT.0] = 0;
        let mut i = 0;
        while i < plan.slots.len() {
            if let Kind::Dir(entries) = &plan.slots[i].node.kind {
                let mut subdirs: u32 = 0;
                for (name, &child) in entries {
                    let path = |plan: &Plan| plan.path(i, name);
                    if check_name(name).is_err() {
                        return Err(Error::BadName { path: path(&plan) });
                    }
                    if child.0 >= tree.len() {
                        return Err(Error::InvalidNode { path: path(&plan) });
                    }
                    let node = tree.node(child);
                    let is_dir = matches!(node.kind, Kind::Dir(_));
                    match plan.index[child.0] {
                        usize::MAX => {
                            plan.index[child.0] = plan.slots.len();
                            plan.push(node, i, name)?;
                        }
                        _ if is_dir => {
                            return Err(Error::DirectoryLinkedTwice { path: path(&plan) })
                        }
                        s => plan.slots[s].nlink = plan.slots[s].nlink.saturating_add(1),
                    }
                    subdirs = subdirs.saturating_add(u32::from(is_dir));
                }
                plan.slots[i].nlink = subdirs.saturating_add(2);
            }
            i += 1;
        }
        Ok(plan)
    }

    /// Adds a slot named `name` in the directory at slot `parent` and places
    /// its inode (with inline xattrs) at the next 32-byte slot that keeps it
    /// within one block, or at a block start if it is larger than a block.
    fn push(&mut self, node: &'t Node, parent: usize, name: &'t [u8]) -> Result<(), Error> {
        if self.slots.len() >= u32::MAX as usize - 1 {
            return Err(Error::TooManyInodes);
        }
        let xattrs = encode_xattrs(&node.meta.xattrs).map_err(|e| Error::XattrTooLarge {
            path: self.path(parent, name),
            name: match e {
                XattrError::TooLarge(xattr) => String::from_utf8_lossy(&xattr).into_owned(),
                XattrError::TooManyInTotal => "(all together)".to_owned(),
            },
        })?;
        self.skipped_xattrs += xattrs.skipped;
        let size = INODE_SIZE + xattrs.body.len() as u64;
        let mut pos = self.meta_len.next_multiple_of(SLOT_SIZE);
        if pos % BLOCK_SIZE + size > BLOCK_SIZE {
            pos = pos.next_multiple_of(BLOCK_SIZE);
        }
        self.meta_len = pos + size;
        self.slots.push(Slot {
            node,
            parent,
            name,
            nlink: 1,
            pos,
            xattrs,
            i_u: 0,
            size: 0,
        });
        Ok(())
    }

    fn nid(&self, slot: usize) -> u64 {
        self.slots[slot].pos / SLOT_SIZE
    }

    /// `/`-separated path of `name` in the directory at slot `dir`.
    fn path(&self, mut dir: usize, name: &[u8]) -> String {
        let mut parts = vec![name];
        while dir != 0 {
            parts.push(self.slots[dir].name);
            dir = self.slots[dir].parent;
        }
        let mut path = Vec::new();
        for part in parts.iter().rev().filter(|p| !p.is_empty()) {
            path.push(b'/');
            path.extend_from_slice(part);
        }
        if path.is_empty() {
            path.push(b'/');
        }
        String::from_utf8_lossy(&path).into_owned()
    }

    fn slot_path(&self, slot: usize) -> String {
        self.path(self.slots[slot].parent, self.slots[slot].name)
    }

    /// Writes directory blocks and symlink targets, each from a fresh block,
    /// and records every slot's data address and size. File data must lie
    /// in blocks `1..data_end`.
    fn write_data<W: Write>(&mut self, sink: &mut Sink<'_, W>, data_end: u64) -> Result<(), Error> {
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            let (i_u, size) = match &slot.node.kind {
                Kind::Dir(entries) => {
                    let mut dirents = Vec::with_capacity(entries.len() + 2);
                    dirents.push(Dirent {
                        name: b".",
                        nid: self.nid(i),
                        file_type: FT_DIR,
                    });
                    dirents.push(Dirent {
                        name: b"..",
                        nid: self.nid(slot.parent),
                        file_type: FT_DIR,
                    });
                    dirents.extend(entries.iter().map(|(name, child)| {
                        let s = self.index[child.0];
                        Dirent {
                            name,
                            nid: self.nid(s),
                            file_type: file_type(&self.slots[s].node.kind),
                        }
                    }));
                    let (blocks, size) = pack_dir(&mut dirents);
                    let blkaddr = block_addr(sink.pos)?;
                    // Hashing the used bytes only; the rest is zero padding.
                    sink.write(&blocks[..size as usize])?;
                    sink.zero_to(sink.pos + (blocks.len() as u64 - size))?;
                    (blkaddr, size)
                }
                Kind::Symlink(target) => {
                    if target.is_empty() || target.len() > MAX_SYMLINK || target.contains(&0) {
                        return Err(Error::BadSymlink {
                            path: self.slot_path(i),
                            len: target.len(),
                        });
                    }
                    let blkaddr = block_addr(sink.pos)?;
                    sink.write(target)?;
                    sink.zero_to(sink.pos.next_multiple_of(BLOCK_SIZE))?;
                    (blkaddr, target.len() as u64)
                }
                Kind::File(data) if data.len == 0 => (0, 0),
                Kind::File(data) => {
                    let end = u64::from(data.blkaddr) + data.len.div_ceil(BLOCK_SIZE);
                    if data.blkaddr == 0 || end > data_end {
                        return Err(Error::InvalidDataRef {
                            path: self.slot_path(i),
                            data: *data,
                        });
                    }
                    (data.blkaddr, data.len)
                }
                &Kind::CharDev { major, minor } | &Kind::BlockDev { major, minor } => {
                    let rdev = encode_rdev(major, minor).ok_or_else(|| Error::BadDevice {
                        path: self.slot_path(i),
                        major,
                        minor,
                    })?;
                    (rdev, 0)
                }
                Kind::Fifo | Kind::Socket => (0, 0),
            };
            self.slots[i].i_u = i_u;
            self.slots[i].size = size;
        }
        Ok(())
    }

    /// Writes the meta area from the sink's position (a block boundary):
    /// every inode at its placed offset, then padding to a whole block.
    fn write_inodes<W: Write>(&self, sink: &mut Sink<'_, W>) -> Result<(), Error> {
        let base = sink.pos;
        for (i, slot) in self.slots.iter().enumerate() {
            let meta = &slot.node.meta;
            let inode = Inode {
                mode: type_bits(&slot.node.kind) | (meta.mode & 0o7777),
                xattr_icount: slot.xattrs.icount,
                size: slot.size,
                i_u: slot.i_u,
                // `push` keeps the count below u32::MAX.
                ino: i as u32 + 1,
                uid: meta.uid,
                gid: meta.gid,
                mtime: meta.mtime,
                mtime_nsec: meta.mtime_nsec,
                nlink: slot.nlink,
            };
            sink.zero_to(base + slot.pos)?;
            sink.write(&inode.encode())?;
            sink.write(&slot.xattrs.body)?;
        }
        sink.zero_to(sink.pos.next_multiple_of(BLOCK_SIZE))?;
        Ok(())
    }
}

fn type_bits(kind: &Kind) -> u16 {
    match kind {
        Kind::Dir(_) => S_IFDIR,
        Kind::File(_) => S_IFREG,
        Kind::Symlink(_) => S_IFLNK,
        Kind::CharDev { .. } => S_IFCHR,
        Kind::BlockDev { .. } => S_IFBLK,
        Kind::Fifo => S_IFIFO,
        Kind::Socket => S_IFSOCK,
    }
}

fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::Dir(_) => FT_DIR,
        Kind::File(_) => FT_REG_FILE,
        Kind::Symlink(_) => FT_SYMLINK,
        Kind::CharDev { .. } => FT_CHRDEV,
        Kind::BlockDev { .. } => FT_BLKDEV,
        Kind::Fifo => FT_FIFO,
        Kind::Socket => FT_SOCK,
    }
}

/// Buffered sequential writer for the metadata part of the image, hashing
/// what it writes (FNV-1a, 128-bit) to derive the uuid.
struct Sink<'a, W: Write> {
    out: &'a mut W,
    buf: Vec<u8>,
    /// Image offset just past the last byte written or buffered.
    pos: u64,
    hash: u128,
}

impl<'a, W: Write> Sink<'a, W> {
    const FNV_OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const FNV_PRIME: u128 = 0x0000000001000000000000000000013b;

    fn new(out: &'a mut W, pos: u64) -> Self {
        Sink {
            out,
            buf: Vec::with_capacity(BUF_SIZE),
            pos,
            hash: Self::FNV_OFFSET,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        for &b in bytes {
            self.hash = (self.hash ^ u128::from(b)).wrapping_mul(Self::FNV_PRIME);
        }
        self.buf.extend_from_slice(bytes);
        self.pos += bytes.len() as u64;
        self.maybe_flush()
    }

    /// Zero-fills (unhashed) up to image offset `pos`.
    fn zero_to(&mut self, pos: u64) -> io::Result<()> {
        let n = (pos - self.pos) as usize;
        self.buf.resize(self.buf.len() + n, 0);
        self.pos = pos;
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> io::Result<()> {
        if self.buf.len() >= BUF_SIZE {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// The hash as an RFC 9562 version 8 (custom) uuid.
    fn uuid(&self) -> [u8; 16] {
        let mut uuid = self.hash.to_be_bytes();
        uuid[6] = (uuid[6] & 0x0f) | 0x80;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        uuid
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::tree::{Metadata, NodeId};

    fn meta(mode: u16) -> Metadata {
        Metadata {
            mode,
            ..Metadata::default()
        }
    }

    fn dir(tree: &mut Tree, parent: NodeId, name: &str) -> NodeId {
        let id = tree.add(Node {
            kind: Kind::Dir(Default::default()),
            meta: meta(0o755),
        });
        tree.link(parent, name.as_bytes(), id).unwrap();
        id
    }

    fn leaf(tree: &mut Tree, parent: NodeId, name: &str, kind: Kind) -> NodeId {
        let id = tree.add(Node {
            kind,
            meta: meta(0o644),
        });
        tree.link(parent, name.as_bytes(), id).unwrap();
        id
    }

    fn build(tree: &Tree) -> Result<Vec<u8>, Error> {
        let builder = Builder::new(Cursor::new(Vec::new()))?;
        Ok(builder.finish(tree, 0)?.0.into_inner())
    }

    #[test]
    fn nlink_counts_names_and_subdirectories() {
        let mut tree = Tree::new(meta(0o755));
        let a = dir(&mut tree, Tree::ROOT, "a");
        let b = dir(&mut tree, a, "b");
        dir(&mut tree, a, "c");
        let f = leaf(&mut tree, b, "f", Kind::Fifo);
        tree.link(a, b"f2", f).unwrap();
        tree.link(Tree::ROOT, b"f3", f).unwrap();
        let lone = leaf(&mut tree, Tree::ROOT, "s", Kind::Socket);
        // Not reachable, so neither written nor counted.
        tree.add(Node {
            kind: Kind::Fifo,
            meta: meta(0),
        });

        let plan = Plan::new(&tree).unwrap();
        let nlink = |id: NodeId| plan.slots[plan.index[id.0]].nlink;
        assert_eq!(plan.slots.len(), 6);
        assert_eq!(nlink(Tree::ROOT), 3);
        assert_eq!(nlink(a), 4);
        assert_eq!(nlink(b), 2);
        assert_eq!(nlink(f), 3);
        assert_eq!(nlink(lone), 1);
        // Breadth-first, root first at nid 1.
        assert_eq!(plan.nid(0), 1);
        assert_eq!(plan.index[a.0], 1);
    }

    #[test]
    fn inodes_do_not_cross_blocks() {
        let mut tree = Tree::new(meta(0o755));
        for i in 0..200 {
            let f = leaf(&mut tree, Tree::ROOT, &format!("f{i}"), Kind::Fifo);
            tree.node_mut(f).meta.xattrs = vec![(b"user.x".to_vec(), vec![7; i * 3])];
        }
        let big = leaf(&mut tree, Tree::ROOT, "big", Kind::Fifo);
        tree.node_mut(big).meta.xattrs = vec![(b"user.x".to_vec(), vec![7; 6000])];
        let plan = Plan::new(&tree).unwrap();
        for slot in &plan.slots {
            let size = INODE_SIZE + slot.xattrs.body.len() as u64;
            assert_eq!(slot.pos % SLOT_SIZE, 0);
            if size <= BLOCK_SIZE {
                assert_eq!(slot.pos / BLOCK_SIZE, (slot.pos + size - 1) / BLOCK_SIZE);
            } else {
                assert_eq!(slot.pos % BLOCK_SIZE, 0);
            }
        }
        let mut by_pos: Vec<_> = plan.slots.iter().map(|s| s.pos).collect();
        by_pos.dedup();
        assert_eq!(by_pos.len(), plan.slots.len());
    }

    #[test]
    fn invalid_trees_are_errors() {
        let mut tree = Tree::new(meta(0o755));
        let a = dir(&mut tree, Tree::ROOT, "a");
        tree.link(a, b"again", a).unwrap();
        assert!(matches!(
            build(&tree),
            Err(Error::DirectoryLinkedTwice { path }) if path == "/a/again"
        ));

        let mut tree = Tree::new(meta(0o755));
        let a = dir(&mut tree, Tree::ROOT, "a");
        tree.link(a, b"root", Tree::ROOT).unwrap();
        assert!(matches!(
            build(&tree),
            Err(Error::DirectoryLinkedTwice { .. })
        ));

        let mut tree = Tree::new(meta(0o755));
        let a = dir(&mut tree, Tree::ROOT, "a");
        tree.link(a, b"dangling", NodeId(99)).unwrap();
        assert!(matches!(
            build(&tree),
            Err(Error::InvalidNode { path }) if path == "/a/dangling"
        ));

        let mut tree = Tree::new(meta(0o755));
        let a = dir(&mut tree, Tree::ROOT, "a");
        let f = tree.add(Node {
            kind: Kind::Fifo,
            meta: meta(0),
        });
        if let Kind::Dir(entries) = &mut tree.node_mut(a).kind {
            entries.insert(vec![b'n'; 256], f);
        }
        assert!(matches!(build(&tree), Err(Error::BadName { .. })));

        for target in [Vec::new(), vec![b'x'; 4096], b"a\0b".to_vec()] {
            let mut tree = Tree::new(meta(0o755));
            let len = target.len();
            leaf(&mut tree, Tree::ROOT, "l", Kind::Symlink(target));
            assert!(matches!(
                build(&tree),
                Err(Error::BadSymlink { path, len: l }) if path == "/l" && l == len
            ));
        }

        let mut tree = Tree::new(meta(0o755));
        let kind = Kind::CharDev {
            major: 4096,
            minor: 0,
        };
        leaf(&mut tree, Tree::ROOT, "c", kind);
        assert!(matches!(build(&tree), Err(Error::BadDevice { .. })));

        let mut tree = Tree::new(meta(0o755));
        tree.node_mut(Tree::ROOT).meta.xattrs = vec![(b"user.x".to_vec(), vec![0; 70000])];
        assert!(matches!(
            build(&tree),
            Err(Error::XattrTooLarge { path, name }) if path == "/" && name == "user.x"
        ));

        let mut tree = Tree::new(meta(0o755));
        let data = DataRef {
            blkaddr: 1,
            len: 10,
        };
        leaf(&mut tree, Tree::ROOT, "f", Kind::File(data));
        assert!(matches!(build(&tree), Err(Error::InvalidDataRef { .. })));

        let mut tree = Tree::new(meta(0o755));
        tree.node_mut(Tree::ROOT).kind = Kind::Fifo;
        assert!(matches!(build(&tree), Err(Error::RootNotDirectory)));
    }

    #[test]
    fn short_data_is_an_error_and_not_reused() {
        let mut builder = Builder::new(Cursor::new(Vec::new())).unwrap();
        let err = builder.add_data(&mut &[1u8; 5000][..], 9000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let data = builder.add_data(&mut &[2u8; 10][..], 10).unwrap();
        assert_eq!(
            data,
            DataRef {
                blkaddr: 3,
                len: 10
            }
        );
        let empty = builder.add_data(&mut io::empty(), 0).unwrap();
        assert_eq!(empty, DataRef { blkaddr: 0, len: 0 });
        let mut tree = Tree::new(meta(0o755));
        leaf(&mut tree, Tree::ROOT, "f", Kind::File(data));
        let (out, summary) = builder.finish(&tree, 0).unwrap();
        let image = out.into_inner();
        assert_eq!(image.len() as u64, u64::from(summary.blocks) * BLOCK_SIZE);
        assert_eq!(
            &image[3 * 4096..3 * 4096 + 11],
            &[2; 10].iter().chain(&[0]).copied().collect::<Vec<_>>()[..]
        );
        // Block 0, the 2 partial blocks, the file, root directory, meta.
        assert_eq!(summary.blocks, 6);
        assert_eq!(summary.inodes, 2);
    }

    #[test]
    fn identical_inputs_give_identical_images() {
        let make = |mode| {
            let mut tree = Tree::new(meta(0o755));
            let a = dir(&mut tree, Tree::ROOT, "a");
            leaf(&mut tree, a, "l", Kind::Symlink(b"../x".to_vec()));
            tree.node_mut(a).meta.mode = mode;
            build(&tree).unwrap()
        };
        let one = make(0o755);
        assert_eq!(one, make(0o755));
        let other = make(0o700);
        assert_ne!(
            one[1024 + 48..1024 + 64],
            other[1024 + 48..1024 + 64],
            "uuid"
        );
    }
}
