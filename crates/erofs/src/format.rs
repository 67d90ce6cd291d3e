//! The erofs on-disk structures this crate writes, as pure encoders, and
//! decoders that accept exactly what the encoders produce (for reading an
//! image back). The authority is Linux 6.1 `fs/erofs/erofs_fs.h` (and the
//! readers in `inode.c`, `dir.c`, `namei.c`, `xattr.c`, `super.c`); all
//! integers are little-endian.

use std::collections::BTreeMap;

pub(crate) const BLOCK_SIZE: u64 = 4096;
const BLOCK_BITS: u8 = 12;
/// Highest block count: block addresses and the superblock's `blocks` are
/// `u32`.
pub(crate) const MAX_BLOCKS: u64 = u32::MAX as u64;

const SUPER_OFFSET: u64 = 1024;
const SUPER_MAGIC: u32 = 0xE0F5_E1E2;

/// Inodes are addressed in 32-byte slots (nid = slot index from the start of
/// the meta area).
pub(crate) const SLOT_SIZE: u64 = 32;
/// Size of the extended (64-byte) inode, the only form written.
pub(crate) const INODE_SIZE: u64 = 64;
/// `i_format`: extended inode (bit 0), data layout FLAT_PLAIN (bits 1-3 = 0).
const I_FORMAT_EXTENDED_FLAT_PLAIN: u16 = 1;

const DIRENT_SIZE: usize = 12;
pub(crate) const MAX_SYMLINK: usize = 4095;

pub(crate) const S_IFSOCK: u16 = 0o140000;
pub(crate) const S_IFLNK: u16 = 0o120000;
pub(crate) const S_IFREG: u16 = 0o100000;
pub(crate) const S_IFBLK: u16 = 0o060000;
pub(crate) const S_IFDIR: u16 = 0o040000;
pub(crate) const S_IFCHR: u16 = 0o020000;
pub(crate) const S_IFIFO: u16 = 0o010000;

pub(crate) const FT_REG_FILE: u8 = 1;
pub(crate) const FT_DIR: u8 = 2;
pub(crate) const FT_CHRDEV: u8 = 3;
pub(crate) const FT_BLKDEV: u8 = 4;
pub(crate) const FT_FIFO: u8 = 5;
pub(crate) const FT_SOCK: u8 = 6;
pub(crate) const FT_SYMLINK: u8 = 7;

/// The superblock fields this crate sets; everything else is zero (no
/// features, no shared xattrs, no compression, no extra devices).
pub(crate) struct Superblock {
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub uuid: [u8; 16],
}

impl Superblock {
    /// Byte offset of the superblock in the image.
    pub const OFFSET: u64 = SUPER_OFFSET;

    pub fn encode(&self) -> [u8; 128] {
        let mut b = [0u8; 128];
        b[0..4].copy_from_slice(&SUPER_MAGIC.to_le_bytes());
        // checksum (4..8) and feature_compat (8..12) stay 0: no SB_CHKSUM.
        b[12] = BLOCK_BITS;
        // sb_extslots (13) = 0.
        b[14..16].copy_from_slice(&self.root_nid.to_le_bytes());
        b[16..24].copy_from_slice(&self.inos.to_le_bytes());
        b[24..32].copy_from_slice(&self.build_time.to_le_bytes());
        // build_time_nsec (32..36) = 0.
        b[36..40].copy_from_slice(&self.blocks.to_le_bytes());
        b[40..44].copy_from_slice(&self.meta_blkaddr.to_le_bytes());
        // xattr_blkaddr (44..48) = 0.
        b[48..64].copy_from_slice(&self.uuid);
        // volume_name (64..80) empty, feature_incompat (80..84) = 0,
        // dirblkbits (90) = 0, the rest reserved.
        b
    }

    /// The fields [`Superblock::encode`] sets, from an image's superblock.
    /// Images with incompatible features (compression, extra devices, ...)
    /// or another block size are refused: this crate never writes them.
    pub fn decode(b: &[u8; 128]) -> Result<Superblock, &'static str> {
        if le32(b, 0) != SUPER_MAGIC {
            return Err("no erofs superblock");
        }
        if b[12] != BLOCK_BITS || b[13] != 0 || le32(b, 80) != 0 || b[90] != 0 {
            return Err("erofs features this crate does not write");
        }
        Ok(Superblock {
            root_nid: le16(b, 14),
            inos: le64(b, 16),
            build_time: le64(b, 24),
            blocks: le32(b, 36),
            meta_blkaddr: le32(b, 40),
            uuid: b[48..64].try_into().unwrap_or_default(),
        })
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

/// An extended inode with FLAT_PLAIN data.
pub(crate) struct Inode {
    /// File type and permission bits.
    pub mode: u16,
    pub xattr_icount: u16,
    pub size: u64,
    /// Block address of the data, or the encoded rdev of a device.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub nlink: u32,
}

impl Inode {
    pub fn encode(&self) -> [u8; INODE_SIZE as usize] {
        let mut b = [0u8; INODE_SIZE as usize];
        b[0..2].copy_from_slice(&I_FORMAT_EXTENDED_FLAT_PLAIN.to_le_bytes());
        b[2..4].copy_from_slice(&self.xattr_icount.to_le_bytes());
        b[4..6].copy_from_slice(&self.mode.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..20].copy_from_slice(&self.i_u.to_le_bytes());
        b[20..24].copy_from_slice(&self.ino.to_le_bytes());
        b[24..28].copy_from_slice(&self.uid.to_le_bytes());
        b[28..32].copy_from_slice(&self.gid.to_le_bytes());
        b[32..40].copy_from_slice(&self.mtime.to_le_bytes());
        b[40..44].copy_from_slice(&self.mtime_nsec.to_le_bytes());
        b[44..48].copy_from_slice(&self.nlink.to_le_bytes());
        b
    }

    /// An inode as [`Inode::encode`] writes it: extended, FLAT_PLAIN.
    pub fn decode(b: &[u8; INODE_SIZE as usize]) -> Result<Inode, &'static str> {
        if le16(b, 0) != I_FORMAT_EXTENDED_FLAT_PLAIN {
            return Err("inode format this crate does not write");
        }
        Ok(Inode {
            xattr_icount: le16(b, 2),
            mode: le16(b, 4),
            size: le64(b, 8),
            i_u: le32(b, 16),
            ino: le32(b, 20),
            uid: le32(b, 24),
            gid: le32(b, 28),
            mtime: le64(b, 32) as i64,
            mtime_nsec: le32(b, 40),
            nlink: le32(b, 44),
        })
    }
}

/// The kernel's `new_encode_dev(MKDEV(major, minor))`, or `None` when the
/// numbers exceed Linux's 12-bit major / 20-bit minor.
pub(crate) fn encode_rdev(major: u32, minor: u32) -> Option<u32> {
    if major >= 1 << 12 || minor >= 1 << 20 {
        return None;
    }
    Some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// `(major, minor)` of an [`encode_rdev`] value (the kernel's
/// `new_decode_dev`).
pub(crate) fn decode_rdev(rdev: u32) -> (u32, u32) {
    (
        (rdev & 0xfff00) >> 8,
        (rdev & 0xff) | ((rdev >> 12) & 0xfff00),
    )
}

/// Inline xattrs ready to follow an inode.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Xattrs {
    /// `erofs_xattr_ibody_header` and the entries; empty when there are no
    /// (supported) xattrs, since a header alone is rejected by the kernel.
    pub body: Vec<u8>,
    /// `i_xattr_icount` for `body`.
    pub icount: u16,
    /// Attributes dropped because erofs has no index for their prefix.
    pub skipped: u64,
}

/// Why an xattr cannot be stored.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum XattrError {
    /// Name suffix over 255 bytes or value over 65535 bytes.
    TooLarge(Vec<u8>),
    /// All of an inode's xattrs together exceed what `i_xattr_icount` counts.
    TooManyInTotal,
}

const XATTR_HEADER_SIZE: usize = 12;

/// The xattr name indexes erofs has, with the name prefix each stands
/// for. The POSIX ACLs are whole names (an empty suffix); the others need
/// one.
const XATTR_PREFIXES: [(u8, &[u8]); 5] = [
    (1, b"user."),
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (4, b"trusted."),
    (6, b"security."),
];

fn is_acl(index: u8) -> bool {
    matches!(index, 2 | 3)
}

/// Name index and stored suffix of a full xattr name, or `None` for prefixes
/// erofs cannot represent.
fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    XATTR_PREFIXES
        .iter()
        .find_map(|&(index, prefix)| name.strip_prefix(prefix).map(|s| (index, s)))
        // An ACL is the whole name; any other empty suffix ("user.") names
        // nothing the VFS would accept.
        .filter(|&(index, suffix)| is_acl(index) == suffix.is_empty())
}

/// Bytes of the inline xattr body `i_xattr_icount` announces
/// (`erofs_xattr_ibody_size`).
pub(crate) fn xattr_body_len(icount: u16) -> usize {
    match icount {
        0 => 0,
        n => XATTR_HEADER_SIZE + 4 * (usize::from(n) - 1),
    }
}

/// Full xattr names with their values, as in [`crate::Metadata`].
type XattrList = Vec<(Vec<u8>, Vec<u8>)>;

/// The full names and values of an inline xattr body as
/// [`encode_xattrs`] writes it (no shared xattrs).
pub(crate) fn decode_xattrs(body: &[u8]) -> Result<XattrList, &'static str> {
    let mut out = Vec::new();
    if body.is_empty() {
        return Ok(out);
    }
    if body.len() < XATTR_HEADER_SIZE || body[4] != 0 {
        return Err("shared or malformed xattrs");
    }
    let mut p = XATTR_HEADER_SIZE;
    while p < body.len() {
        let head = body.get(p..p + 4).ok_or("xattr entry past its inode")?;
        let (name_len, index) = (usize::from(head[0]), head[1]);
        let value_len = usize::from(le16(head, 2));
        let (_, prefix) = XATTR_PREFIXES
            .iter()
            .find(|(i, _)| *i == index)
            .ok_or("unknown xattr name index")?;
        let suffix = body
            .get(p + 4..p + 4 + name_len)
            .ok_or("xattr entry past its inode")?;
        if is_acl(index) != suffix.is_empty() {
            return Err("malformed xattr name");
        }
        let v = p + 4 + name_len;
        let value = body
            .get(v..v + value_len)
            .ok_or("xattr entry past its inode")?;
        out.push(([*prefix, suffix].concat(), value.to_vec()));
        p = (v + value_len).next_multiple_of(4);
    }
    Ok(out)
}

/// Encodes `xattrs` as an inline xattr body. Later duplicates of a name win;
/// entries are ordered by (index, suffix) so equal sets encode identically.
pub(crate) fn encode_xattrs(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Xattrs, XattrError> {
    let mut skipped = 0;
    let mut entries = BTreeMap::new();
    for (name, value) in xattrs {
        let Some((index, suffix)) = xattr_index(name) else {
            skipped += 1;
            continue;
        };
        if suffix.len() > usize::from(u8::MAX) || value.len() > usize::from(u16::MAX) {
            return Err(XattrError::TooLarge(name.clone()));
        }
        entries.insert((index, suffix), value.as_slice());
    }
    if entries.is_empty() {
        return Ok(Xattrs {
            body: Vec::new(),
            icount: 0,
            skipped,
        });
    }
    // h_reserved, h_shared_count and h_reserved2 are all zero.
    let mut body = vec![0u8; XATTR_HEADER_SIZE];
    for ((index, suffix), value) in entries {
        body.push(suffix.len() as u8);
        body.push(index);
        body.extend_from_slice(&(value.len() as u16).to_le_bytes());
        body.extend_from_slice(suffix);
        body.extend_from_slice(value);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    // erofs_xattr_ibody_size: 12 + 4 * (icount - 1).
    let icount = u16::try_from((body.len() - XATTR_HEADER_SIZE) / 4 + 1)
        .map_err(|_| XattrError::TooManyInTotal)?;
    Ok(Xattrs {
        body,
        icount,
        skipped,
    })
}

/// One directory entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dirent<'a> {
    pub name: &'a [u8],
    pub nid: u64,
    pub file_type: u8,
}

/// Sorts `entries` bytewise (lookup binary-searches across and within
/// blocks) and packs them into whole blocks. Each block holds its dirents
/// then their names; an entry never straddles blocks and the rest of a block
/// is zero. Returns the blocks and the directory's `i_size`, which ends at
/// the last name of the last block: readdir takes the final name's length
/// from `i_size`. Names must be 1 to 255 bytes.
pub(crate) fn pack_dir(entries: &mut [Dirent<'_>]) -> (Vec<u8>, u64) {
    entries.sort_unstable_by(|a, b| a.name.cmp(b.name));
    let block = BLOCK_SIZE as usize;
    let mut out = Vec::new();
    let mut last_used = 0;
    let mut rest = &entries[..];
    while !rest.is_empty() {
        let mut used = 0;
        let count = rest
            .iter()
            .take_while(|e| {
                used += DIRENT_SIZE + e.name.len();
                used <= block
            })
            .count();
        let (this, next) = rest.split_at(count);
        let start = out.len();
        out.resize(start + block, 0);
        let blk = &mut out[start..];
        let mut nameoff = count * DIRENT_SIZE;
        for (i, e) in this.iter().enumerate() {
            let d = &mut blk[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE];
            d[0..8].copy_from_slice(&e.nid.to_le_bytes());
            // nameoff < 4096 because the whole entry fits in the block.
            d[8..10].copy_from_slice(&(nameoff as u16).to_le_bytes());
            d[10] = e.file_type;
            blk[nameoff..nameoff + e.name.len()].copy_from_slice(e.name);
            nameoff += e.name.len();
        }
        last_used = nameoff;
        rest = next;
    }
    let size = match out.len() as u64 {
        0 => 0,
        len => len - BLOCK_SIZE + last_used as u64,
    };
    (out, size)
}

/// The entries of one directory block as [`pack_dir`] writes it, the way
/// `dir.c` reads them. `maxsize` is how much of the block the directory's
/// `i_size` covers: the last name ends there or at its first NUL.
pub(crate) fn unpack_dir_block(
    blk: &[u8],
    maxsize: usize,
) -> Result<Vec<Dirent<'_>>, &'static str> {
    const BAD: &str = "malformed directory block";
    let maxsize = maxsize.min(blk.len());
    if maxsize < DIRENT_SIZE {
        return Err(BAD);
    }
    let first = usize::from(le16(blk, 8));
    if first == 0 || first % DIRENT_SIZE != 0 || first > maxsize {
        return Err(BAD);
    }
    let count = first / DIRENT_SIZE;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let d = &blk[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE];
        let off = usize::from(le16(d, 8));
        let end = if i + 1 < count {
            usize::from(le16(blk, (i + 1) * DIRENT_SIZE + 8))
        } else {
            let tail = blk.get(off..maxsize).ok_or(BAD)?;
            off + tail.iter().position(|&b| b == 0).unwrap_or(tail.len())
        };
        if off >= end || end > maxsize {
            return Err(BAD);
        }
        out.push(Dirent {
            name: &blk[off..end],
            nid: le64(d, 0),
            file_type: d[10],
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes packed directory blocks with [`unpack_dir_block`].
    fn unpack_dir(blocks: &[u8], size: u64) -> Vec<(Vec<u8>, u64, u8)> {
        let mut out = Vec::new();
        for (i, blk) in blocks.chunks(BLOCK_SIZE as usize).enumerate() {
            let maxsize = (size - i as u64 * BLOCK_SIZE).min(BLOCK_SIZE) as usize;
            for d in unpack_dir_block(blk, maxsize).unwrap() {
                out.push((d.name.to_vec(), d.nid, d.file_type));
            }
        }
        out
    }

    #[test]
    fn dir_blocks_sorted_and_packed_across_blocks() {
        let names: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| {
                // Long names with prefixes shared across blocks, in an
                // order that is not the sorted one.
                let k = (i * 7919) % 1000;
                let mut name = format!("{k:04}-").into_bytes();
                name.resize(200 + (k as usize % 56), b'a' + (k % 26) as u8);
                name
            })
            .collect();
        let mut entries: Vec<Dirent> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Dirent {
                name: n,
                nid: i as u64 + 100,
                file_type: FT_REG_FILE,
            })
            .chain([
                Dirent {
                    name: b".",
                    nid: 1,
                    file_type: FT_DIR,
                },
                Dirent {
                    name: b"..",
                    nid: 2,
                    file_type: FT_DIR,
                },
            ])
            .collect();
        let (blocks, size) = pack_dir(&mut entries);
        assert_eq!(blocks.len() % BLOCK_SIZE as usize, 0);
        assert!(blocks.len() > 40 * BLOCK_SIZE as usize);
        assert!(size > blocks.len() as u64 - BLOCK_SIZE && size <= blocks.len() as u64);
        let got = unpack_dir(&blocks, size);
        assert_eq!(got.len(), 1002);
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "not sorted");
        assert_eq!(got[0], (b".".to_vec(), 1, FT_DIR));
        assert_eq!(got[1], (b"..".to_vec(), 2, FT_DIR));
        let mut want: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u64 + 100, FT_REG_FILE))
            .collect();
        want.sort();
        assert_eq!(got[2..], want[..]);
        // Every block but the last is filled as far as the next entry allows.
        for blk in blocks.chunks(BLOCK_SIZE as usize) {
            let n = usize::from(le16(blk, 8)) / DIRENT_SIZE;
            let last = usize::from(le16(blk, (n - 1) * DIRENT_SIZE + 8));
            assert!(last < BLOCK_SIZE as usize);
        }
    }

    #[test]
    fn dir_size_ends_at_last_name() {
        let mut entries = [
            Dirent {
                name: b"..",
                nid: 1,
                file_type: FT_DIR,
            },
            Dirent {
                name: b"abc",
                nid: 3,
                file_type: FT_SYMLINK,
            },
            Dirent {
                name: b".",
                nid: 1,
                file_type: FT_DIR,
            },
            // Sorts before "." (0x2d < 0x2e).
            Dirent {
                name: b"-x",
                nid: 2,
                file_type: FT_FIFO,
            },
        ];
        let (blocks, size) = pack_dir(&mut entries);
        assert_eq!(blocks.len(), BLOCK_SIZE as usize);
        assert_eq!(size, 4 * 12 + 2 + 1 + 2 + 3);
        assert_eq!(le16(&blocks, 8), 48);
        assert_eq!(&blocks[48..56], b"-x...abc");
        assert!(blocks[56..].iter().all(|&b| b == 0));
        let names: Vec<_> = unpack_dir(&blocks, size).into_iter().map(|e| e.0).collect();
        assert_eq!(names, [&b"-x"[..], b".", b"..", b"abc"]);
    }

    #[test]
    fn dir_entry_exactly_filling_a_block() {
        // 15 entries of 12 + 255 bytes = 4005 bytes, then one of 12 + 79 =
        // 4096 exactly; the next entry starts a new block.
        let long: Vec<Vec<u8>> = (0..15).map(|i| vec![b'a' + i; 255]).collect();
        let fill = vec![b'q'; 79];
        let mut entries: Vec<Dirent> = long
            .iter()
            .chain([&fill])
            .map(|n| Dirent {
                name: n,
                nid: 9,
                file_type: FT_REG_FILE,
            })
            .collect();
        entries.push(Dirent {
            name: b"z",
            nid: 10,
            file_type: FT_REG_FILE,
        });
        let (blocks, size) = pack_dir(&mut entries);
        assert_eq!(blocks.len(), 2 * BLOCK_SIZE as usize);
        assert_eq!(size, BLOCK_SIZE + 13);
        let got = unpack_dir(&blocks, size);
        assert_eq!(got[15].0, fill);
        assert_eq!(got[16].0, b"z");
    }

    #[test]
    fn xattr_encoding() {
        let x = encode_xattrs(&[
            (b"user.foo".to_vec(), b"bar".to_vec()),
            (b"security.capability".to_vec(), vec![1, 0, 0, 2, 0xff]),
            (b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0]),
            (b"system.nfs4_acl".to_vec(), vec![1]),
            (b"user.".to_vec(), vec![1]),
            (b"user.foo".to_vec(), b"baz".to_vec()),
        ])
        .unwrap();
        assert_eq!(x.skipped, 2);
        let mut want = vec![0u8; 12];
        // (1, "foo") = "baz": 4 + 3 + 3 = 10, padded to 12.
        want.extend_from_slice(&[3, 1, 3, 0]);
        want.extend_from_slice(b"foobaz\0\0");
        // (2, "") acl access: 4 + 0 + 4 = 8 bytes.
        want.extend_from_slice(&[0, 2, 4, 0, 2, 0, 0, 0]);
        // (6, "capability"): 4 + 10 + 5 = 19, padded to 20.
        want.extend_from_slice(&[10, 6, 5, 0]);
        want.extend_from_slice(b"capability");
        want.extend_from_slice(&[1, 0, 0, 2, 0xff, 0]);
        assert_eq!(x.body, want);
        assert_eq!(x.icount, 1 + (12 + 8 + 20) / 4);
        assert_eq!(xattr_body_len(x.icount), x.body.len());
        assert_eq!(
            decode_xattrs(&x.body).unwrap(),
            [
                (&b"user.foo"[..], &b"baz"[..]),
                (b"system.posix_acl_access", &[2, 0, 0, 0]),
                (b"security.capability", &[1, 0, 0, 2, 0xff]),
            ]
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
        );
    }

    #[test]
    fn malformed_xattrs_are_refused() {
        let body = encode_xattrs(&[(b"user.foo".to_vec(), vec![7; 9])])
            .unwrap()
            .body;
        assert!(decode_xattrs(&body[..body.len() - 4]).is_err(), "truncated");
        let mut shared = body.clone();
        shared[4] = 1;
        assert!(decode_xattrs(&shared).is_err(), "shared xattrs");
        let mut index = body.clone();
        index[13] = 5;
        assert!(decode_xattrs(&index).is_err(), "unknown index");
        let mut acl = body;
        acl[13] = 2;
        assert!(decode_xattrs(&acl).is_err(), "ACL with a suffix");
        assert_eq!(decode_xattrs(&[]).unwrap(), []);
        assert_eq!(xattr_body_len(0), 0);
    }

    #[test]
    fn xattrs_none_or_all_skipped_have_no_body() {
        let none = encode_xattrs(&[]).unwrap();
        assert_eq!((none.body.len(), none.icount, none.skipped), (0, 0, 0));
        let skipped = encode_xattrs(&[(b"os2.x".to_vec(), vec![])]).unwrap();
        assert_eq!(
            (skipped.body.len(), skipped.icount, skipped.skipped),
            (0, 0, 1)
        );
    }

    #[test]
    fn xattr_limits() {
        let long_name = [b"user.".to_vec(), vec![b'n'; 256]].concat();
        assert_eq!(
            encode_xattrs(&[(long_name.clone(), vec![])]),
            Err(XattrError::TooLarge(long_name))
        );
        assert_eq!(
            encode_xattrs(&[(b"trusted.v".to_vec(), vec![0; 65536])]),
            Err(XattrError::TooLarge(b"trusted.v".to_vec()))
        );
        let big: Vec<_> = (0..5)
            .map(|i| (format!("user.{i}").into_bytes(), vec![0; 65535]))
            .collect();
        assert_eq!(encode_xattrs(&big), Err(XattrError::TooManyInTotal));
        assert!(encode_xattrs(&big[..3]).is_ok());
    }

    #[test]
    fn rdev_matches_new_encode_dev() {
        assert_eq!(encode_rdev(0, 0), Some(0));
        assert_eq!(encode_rdev(1, 3), Some(0x103));
        assert_eq!(encode_rdev(8, 1), Some(0x801));
        // Minor bits above 8 go to bits 20 and up.
        assert_eq!(
            encode_rdev(259, 0x12345),
            Some(0x45 | (259 << 8) | (0x123 << 20))
        );
        assert_eq!(encode_rdev(4095, (1 << 20) - 1), Some(u32::MAX));
        assert_eq!(encode_rdev(4096, 0), None);
        assert_eq!(encode_rdev(0, 1 << 20), None);
        for (major, minor) in [(0, 0), (1, 3), (259, 0x12345), (4095, (1 << 20) - 1)] {
            let rdev = encode_rdev(major, minor).unwrap();
            assert_eq!(decode_rdev(rdev), (major, minor));
        }
    }

    #[test]
    fn malformed_directory_blocks_are_refused() {
        let mut entries = [Dirent {
            name: b"name",
            nid: 5,
            file_type: FT_FIFO,
        }];
        let (blk, size) = pack_dir(&mut entries);
        let size = size as usize;
        assert_eq!(unpack_dir_block(&blk, size).unwrap()[0].name, b"name");
        assert!(unpack_dir_block(&[0; 4096], 4096).is_err(), "no entries");
        assert!(unpack_dir_block(&blk, 12).is_err(), "names past i_size");
        let mut odd = blk.clone();
        odd[8] = 13;
        assert!(unpack_dir_block(&odd, size).is_err(), "misaligned nameoff");
        let mut empty = blk;
        empty[12] = 0;
        assert!(unpack_dir_block(&empty, size).is_err(), "empty name");
    }

    #[test]
    fn superblock_and_inode_fields() {
        let sb = Superblock {
            root_nid: 1,
            inos: 7,
            build_time: 1_700_000_000,
            blocks: 9,
            meta_blkaddr: 8,
            uuid: [0xab; 16],
        }
        .encode();
        assert_eq!(&sb[0..4], &[0xe2, 0xe1, 0xf5, 0xe0]);
        assert_eq!(sb[12], 12);
        assert_eq!(le16(&sb, 14), 1);
        assert_eq!(sb[36], 9);
        assert_eq!(sb[40], 8);
        assert_eq!(&sb[48..64], &[0xab; 16]);
        assert!(sb[64..].iter().all(|&b| b == 0));
        let back = Superblock::decode(&sb).unwrap();
        assert_eq!(
            (back.root_nid, back.inos, back.build_time, back.blocks),
            (1, 7, 1_700_000_000, 9)
        );
        assert_eq!((back.meta_blkaddr, back.uuid), (8, [0xab; 16]));
        let mut compressed = sb;
        compressed[80] = 1;
        assert!(Superblock::decode(&compressed).is_err());
        let mut not_erofs = sb;
        not_erofs[0] = 0;
        assert!(Superblock::decode(&not_erofs).is_err());

        let inode = Inode {
            mode: S_IFREG | 0o4755,
            xattr_icount: 3,
            size: 1 << 33,
            i_u: 5,
            ino: 6,
            uid: 65534,
            gid: 2000,
            mtime: -1,
            mtime_nsec: 999_999_999,
            nlink: 2,
        }
        .encode();
        assert_eq!(le16(&inode, 0), 1);
        assert_eq!(le16(&inode, 2), 3);
        assert_eq!(le16(&inode, 4), 0o104755);
        assert_eq!(inode[12], 2);
        assert_eq!(inode[16], 5);
        assert_eq!(&inode[32..40], &[0xff; 8]);
        assert_eq!(inode[44], 2);
        assert!(inode[48..].iter().all(|&b| b == 0));
        let back = Inode::decode(&inode).unwrap();
        assert_eq!(
            (back.mode, back.xattr_icount, back.size, back.i_u, back.ino),
            (S_IFREG | 0o4755, 3, 1 << 33, 5, 6)
        );
        assert_eq!(
            (back.uid, back.gid, back.mtime, back.mtime_nsec, back.nlink),
            (65534, 2000, -1, 999_999_999, 2)
        );
        let mut compact = inode;
        compact[0] = 0;
        assert!(Inode::decode(&compact).is_err());
    }
}
