//! Reads back an image this crate wrote: its tree, with each regular
//! file's [`DataRef`] pointing at its bytes in that image, so the files
//! can be copied into another image or an archive without unpacking
//! anything onto a filesystem.
//!
//! Only what [`crate::Builder`] writes is accepted (extended FLAT_PLAIN
//! inodes, inline xattrs, no compression, the meta area last); anything
//! else, and every inconsistency, is an error rather than a panic, with
//! every offset checked against the image's length.
//!
//! The meta area (inodes and their xattrs, about 64 bytes a file) is read
//! into memory at once: inodes are then found without a seek and a read
//! each, and the reader can be a plain file, whose seeks are free.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Seek, SeekFrom};

use crate::format::{
    decode_rdev, decode_xattrs, unpack_dir_block, xattr_body_len, Inode, Superblock, BLOCK_SIZE,
    INODE_SIZE, MAX_SYMLINK, SLOT_SIZE, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG,
    S_IFSOCK,
};
use crate::tree::{check_name, DataRef, Kind, Metadata, Node, Tree};

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the erofs image: {0}")]
    Io(#[from] io::Error),
    #[error("erofs image: {what} (inode {nid})")]
    Corrupt { nid: u64, what: &'static str },
}

fn corrupt(nid: u64, what: &'static str) -> ReadError {
    ReadError::Corrupt { nid, what }
}

/// Largest meta area read: 16 million files' inodes.
const MAX_META: u64 = 1 << 30;

/// An image opened for reading.
#[derive(Debug)]
pub struct Reader<R> {
    inner: R,
    /// The meta area: from where nid 0 would be to the end of the image.
    meta: Vec<u8>,
    root_nid: u64,
    /// Image length in bytes, as the superblock says and the image has.
    len: u64,
}

impl<R: Read + Seek> Reader<R> {
    /// Opens the image in `inner`, checking its superblock and reading its
    /// meta area.
    pub fn new(mut inner: R) -> Result<Reader<R>, ReadError> {
        let mut sb = [0u8; 128];
        inner.seek(SeekFrom::Start(Superblock::OFFSET))?;
        inner.read_exact(&mut sb)?;
        let sb = Superblock::decode(&sb).map_err(|what| corrupt(0, what))?;
        let len = u64::from(sb.blocks) * BLOCK_SIZE;
        if inner.seek(SeekFrom::End(0))? < len {
            return Err(corrupt(0, "image shorter than its superblock says"));
        }
        let meta_start = u64::from(sb.meta_blkaddr) * BLOCK_SIZE;
        let meta_len = len
            .checked_sub(meta_start)
            .filter(|&n| n <= MAX_META)
            .ok_or_else(|| corrupt(0, "meta area out of place or too large"))?;
        let mut meta = vec![0; meta_len as usize];
        inner.seek(SeekFrom::Start(meta_start))?;
        inner.read_exact(&mut meta)?;
        Ok(Reader {
            inner,
            meta,
            root_nid: u64::from(sb.root_nid),
            len,
        })
    }

    /// The image's tree. File nodes hold where their data is in this
    /// image (see [`Reader::data`]); names of one inode are one node.
    pub fn tree(&mut self) -> Result<Tree, ReadError> {
        let root = self.inode(self.root_nid)?;
        let Node {
            kind: Kind::Dir(_),
            meta,
        } = self.node(self.root_nid, &root)?
        else {
            return Err(corrupt(self.root_nid, "root is not a directory"));
        };
        let mut tree = Tree::new(meta);
        let mut ids = HashMap::from([(self.root_nid, Tree::ROOT)]);
        let mut dirs = VecDeque::from([(self.root_nid, Tree::ROOT, root)]);
        while let Some((nid, dir, inode)) = dirs.pop_front() {
            for (name, child) in self.entries(nid, &inode)? {
                let id = match ids.get(&child) {
                    // A directory has one name: a second one would make a
                    // cycle or a second parent.
                    Some(&id) if matches!(tree.node(id).kind, Kind::Dir(_)) => {
                        return Err(corrupt(child, "directory reachable by two names"))
                    }
                    Some(&id) => id,
                    None => {
                        let inode = self.inode(child)?;
                        let node = self.node(child, &inode)?;
                        let is_dir = matches!(node.kind, Kind::Dir(_));
                        let id = tree.add(node);
                        ids.insert(child, id);
                        if is_dir {
                            dirs.push_back((child, id, inode));
                        }
                        id
                    }
                };
                tree.link(dir, &name, id)
                    .map_err(|_| corrupt(nid, "invalid name"))?;
            }
        }
        Ok(tree)
    }

    /// Reads `data`, a regular file's [`DataRef`] from [`Reader::tree`].
    pub fn data(&mut self, data: DataRef) -> io::Result<io::Take<&mut R>> {
        self.inner
            .seek(SeekFrom::Start(u64::from(data.blkaddr) * BLOCK_SIZE))?;
        Ok((&mut self.inner).take(data.len))
    }

    /// `len` bytes from byte `pos`; the whole range must lie in the image.
    fn read_at(&mut self, nid: u64, pos: u64, len: u64) -> Result<Vec<u8>, ReadError> {
        if pos.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(corrupt(nid, "reference past the end of the image"));
        }
        let mut buf = vec![0; len as usize];
        self.inner.seek(SeekFrom::Start(pos))?;
        self.inner.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// The inode `nid` with its inline xattr body.
    fn inode(&self, nid: u64) -> Result<(Inode, Vec<u8>), ReadError> {
        let past_end = || corrupt(nid, "inode past the end of the image");
        let pos = usize::try_from(nid.saturating_mul(SLOT_SIZE)).map_err(|_| past_end())?;
        let raw = self
            .meta
            .get(pos..pos.saturating_add(INODE_SIZE as usize))
            .ok_or_else(past_end)?;
        let raw: &[u8; INODE_SIZE as usize] = raw.try_into().map_err(|_| past_end())?;
        let inode = Inode::decode(raw).map_err(|what| corrupt(nid, what))?;
        let start = pos + INODE_SIZE as usize;
        let xattrs = self
            .meta
            .get(start..start + xattr_body_len(inode.xattr_icount))
            .ok_or_else(past_end)?;
        Ok((inode, xattrs.to_vec()))
    }

    /// The tree node of an inode (a directory's entries still empty).
    fn node(&mut self, nid: u64, (inode, xattrs): &(Inode, Vec<u8>)) -> Result<Node, ReadError> {
        let meta = Metadata {
            mode: inode.mode & 0o7777,
            uid: inode.uid,
            gid: inode.gid,
            mtime: inode.mtime,
            mtime_nsec: inode.mtime_nsec,
            xattrs: decode_xattrs(xattrs).map_err(|what| corrupt(nid, what))?,
        };
        let kind = match inode.mode & 0o170000 {
            S_IFDIR => Kind::Dir(Default::default()),
            S_IFREG => {
                let data = DataRef {
                    blkaddr: if inode.size == 0 { 0 } else { inode.i_u },
                    len: inode.size,
                };
                let end = u64::from(data.blkaddr) * BLOCK_SIZE + data.len;
                if end > self.len {
                    return Err(corrupt(nid, "file data past the end of the image"));
                }
                Kind::File(data)
            }
            S_IFLNK => {
                if inode.size == 0 || inode.size > MAX_SYMLINK as u64 {
                    return Err(corrupt(nid, "symlink target length"));
                }
                let pos = u64::from(inode.i_u) * BLOCK_SIZE;
                Kind::Symlink(self.read_at(nid, pos, inode.size)?)
            }
            S_IFCHR | S_IFBLK => {
                let (major, minor) = decode_rdev(inode.i_u);
                if inode.mode & 0o170000 == S_IFCHR {
                    Kind::CharDev { major, minor }
                } else {
                    Kind::BlockDev { major, minor }
                }
            }
            S_IFIFO => Kind::Fifo,
            S_IFSOCK => Kind::Socket,
            _ => return Err(corrupt(nid, "unknown file type")),
        };
        Ok(Node { kind, meta })
    }

    /// Names and nids in directory `nid`, without `.` and `..`.
    fn entries(
        &mut self,
        nid: u64,
        (inode, _): &(Inode, Vec<u8>),
    ) -> Result<Vec<(Vec<u8>, u64)>, ReadError> {
        let mut out = Vec::new();
        let start = u64::from(inode.i_u) * BLOCK_SIZE;
        let mut done = 0;
        while done < inode.size {
            let block = self.read_at(nid, start + done, BLOCK_SIZE)?;
            let maxsize = (inode.size - done).min(BLOCK_SIZE) as usize;
            let dirents = unpack_dir_block(&block, maxsize).map_err(|what| corrupt(nid, what))?;
            for d in dirents {
                match d.name {
                    b"." | b".." => {}
                    name => {
                        check_name(name).map_err(|_| corrupt(nid, "invalid name"))?;
                        out.push((name.to_vec(), d.nid));
                    }
                }
            }
            done += BLOCK_SIZE;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::{Builder, NodeId};

    fn meta(mode: u16) -> Metadata {
        Metadata {
            mode,
            uid: 1000,
            gid: 100,
            mtime: -5,
            mtime_nsec: 7,
            xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
        }
    }

    fn add(tree: &mut Tree, dir: NodeId, name: &str, kind: Kind, mode: u16) -> NodeId {
        let id = tree.add(Node {
            kind,
            meta: meta(mode),
        });
        tree.link(dir, name.as_bytes(), id).unwrap();
        id
    }

    /// An image of every node kind, and the tree it was built from.
    fn sample() -> (Vec<u8>, Tree) {
        let mut builder = Builder::new(Cursor::new(Vec::new())).unwrap();
        let mut tree = Tree::new(meta(0o755));
        let d = add(
            &mut tree,
            Tree::ROOT,
            "d",
            Kind::Dir(Default::default()),
            0o1777,
        );
        let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let data = builder.add_data(&mut &big[..], big.len() as u64).unwrap();
        let f = add(&mut tree, d, "f", Kind::File(data), 0o4755);
        tree.link(Tree::ROOT, b"hard", f).unwrap();
        add(
            &mut tree,
            d,
            "empty",
            Kind::File(DataRef { blkaddr: 0, len: 0 }),
            0o600,
        );
        add(
            &mut tree,
            Tree::ROOT,
            "l",
            Kind::Symlink(b"../x/y".to_vec()),
            0o777,
        );
        let dev = Kind::BlockDev {
            major: 259,
            minor: 0x12345,
        };
        add(&mut tree, d, "blk", dev, 0o660);
        add(&mut tree, d, "chr", Kind::CharDev { major: 0, minor: 0 }, 0);
        add(&mut tree, d, "fifo", Kind::Fifo, 0o644);
        add(&mut tree, d, "sock", Kind::Socket, 0o755);
        add(
            &mut tree,
            Tree::ROOT,
            "e",
            Kind::Dir(Default::default()),
            0o700,
        );
        let (out, _) = builder.finish(&tree, 3).unwrap();
        (out.into_inner(), tree)
    }

    /// The tree as (path, kind without data addresses, metadata) lines.
    fn listing(tree: &Tree, files: &mut dyn FnMut(DataRef) -> Vec<u8>) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![(Tree::ROOT, String::new())];
        let mut first_name: HashMap<NodeId, String> = HashMap::new();
        while let Some((dir, path)) = dirs.pop() {
            for (name, id) in tree.children(dir) {
                let path = format!("{path}/{}", String::from_utf8_lossy(name));
                if let Some(first) = first_name.get(&id) {
                    out.push(format!("{path} = {first}"));
                    continue;
                }
                first_name.insert(id, path.clone());
                let node = tree.node(id);
                let kind = match &node.kind {
                    Kind::File(data) => {
                        let bytes = files(*data);
                        let sum = bytes.iter().enumerate().fold(0u64, |s, (i, &b)| {
                            s.wrapping_mul(31).wrapping_add(i as u64 ^ u64::from(b))
                        });
                        format!("file of {} bytes, sum {sum:x}", bytes.len())
                    }
                    Kind::Dir(_) => {
                        dirs.push((id, path.clone()));
                        "dir".to_string()
                    }
                    other => format!("{other:?}"),
                };
                out.push(format!("{path} {kind} {:?}", node.meta));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn reads_back_what_the_builder_wrote() {
        let (image, tree) = sample();
        let mut reader = Reader::new(Cursor::new(&image)).unwrap();
        let read = reader.tree().unwrap();
        assert_eq!(read.node(Tree::ROOT).meta, tree.node(Tree::ROOT).meta);
        let mut from_image = |d: DataRef| {
            let mut bytes = Vec::new();
            reader.data(d).unwrap().read_to_end(&mut bytes).unwrap();
            bytes
        };
        let got = listing(&read, &mut from_image);
        // The builder's data refs are into the same image.
        let mut from_model = |d: DataRef| {
            let start = d.blkaddr as usize * 4096;
            image[start..start + d.len as usize].to_vec()
        };
        let want = listing(&tree, &mut from_model);
        assert_eq!(got, want);
        assert!(got.contains(&"/d/f = /hard".to_string()), "{got:?}");
        assert!(
            got.iter().any(|l| l.contains("mode: 1023")),
            "sticky bit kept"
        );
    }

    #[test]
    fn images_read_back_rebuild_identically() {
        let (image, _) = sample();
        let mut reader = Reader::new(Cursor::new(&image)).unwrap();
        let mut tree = reader.tree().unwrap();
        let mut builder = Builder::new(Cursor::new(Vec::new())).unwrap();
        tree.map_files(|d| builder.add_data(&mut reader.data(d)?, d.len))
            .unwrap();
        let (out, _) = builder.finish(&tree, 3).unwrap();
        assert!(out.into_inner() == image);
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let (image, _) = sample();
        assert!(
            Reader::new(Cursor::new(&image[..4096])).is_err(),
            "cut short"
        );
        let mut garbage = image.clone();
        garbage[1024] ^= 1;
        assert!(Reader::new(Cursor::new(&garbage)).is_err(), "bad magic");
        // Flip each byte of the metadata (everything after the file data)
        // in turn: reading must fail cleanly or give some tree.
        for at in (3 * 4096..image.len()).step_by(7) {
            let mut bad = image.clone();
            bad[at] ^= 0xa5;
            if let Ok(mut reader) = Reader::new(Cursor::new(&bad)) {
                let _ = reader.tree();
            }
        }
    }

    #[test]
    fn a_directory_named_twice_is_refused() {
        let (image, _) = sample();
        let mut reader = Reader::new(Cursor::new(&image)).unwrap();
        // Point the root's entry "l" at the directory "e" instead.
        let root = reader.inode(reader.root_nid).unwrap();
        let entries = reader.entries(reader.root_nid, &root).unwrap();
        let e_nid = entries.iter().find(|(n, _)| n == b"e").unwrap().1;
        let l_nid = entries.iter().find(|(n, _)| n == b"l").unwrap().1;
        let dir_block = root.0.i_u as usize * 4096;
        let mut bad = image.clone();
        let block = &mut bad[dir_block..dir_block + 4096];
        let slot = (0..block.len() / 12)
            .find(|i| block[i * 12..i * 12 + 8] == l_nid.to_le_bytes())
            .unwrap();
        block[slot * 12..slot * 12 + 8].copy_from_slice(&e_nid.to_le_bytes());
        let err = Reader::new(Cursor::new(&bad)).unwrap().tree().unwrap_err();
        assert!(err.to_string().contains("two names"), "{err}");
    }
}
