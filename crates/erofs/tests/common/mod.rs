//! Shared helpers for the image tests: building an image from a tree while
//! remembering file contents, running erofs-utils, and a small independent
//! reader of the on-disk format for what erofs-utils 1.5 does not expose
//! (xattr values, dirent order, link counts).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cc_erofs::{Builder, Kind, Metadata, Node, NodeId, Summary, Tree};

/// A tree being built into an image, with each file's expected contents.
pub struct Fixture {
    pub dir: PathBuf,
    pub tree: Tree,
    pub contents: HashMap<NodeId, Vec<u8>>,
    builder: Builder<BufWriter<File>>,
}

/// A finished image and the tree it was built from.
pub struct Built {
    pub dir: PathBuf,
    pub image: PathBuf,
    pub tree: Tree,
    pub contents: HashMap<NodeId, Vec<u8>>,
    pub summary: Summary,
}

impl Fixture {
    /// Starts an image in a fresh directory named `name` under the target
    /// tmp dir.
    pub fn new(name: &str, root: Metadata) -> Fixture {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let out = BufWriter::new(File::create(dir.join("image.erofs")).unwrap());
        Fixture {
            dir,
            tree: Tree::new(root),
            contents: HashMap::new(),
            builder: Builder::new(out).unwrap(),
        }
    }

    pub fn file(
        &mut self,
        parent: NodeId,
        name: &[u8],
        content: Vec<u8>,
        meta: Metadata,
    ) -> NodeId {
        let data = self
            .builder
            .add_data(&mut &content[..], content.len() as u64)
            .unwrap();
        let id = self.node(parent, name, Kind::File(data), meta);
        self.contents.insert(id, content);
        id
    }

    pub fn node(&mut self, parent: NodeId, name: &[u8], kind: Kind, meta: Metadata) -> NodeId {
        let id = self.tree.add(Node { kind, meta });
        self.tree.link(parent, name, id).unwrap();
        id
    }

    pub fn dir(&mut self, parent: NodeId, name: &[u8], meta: Metadata) -> NodeId {
        self.node(parent, name, Kind::Dir(BTreeMap::new()), meta)
    }

    pub fn finish(self) -> Built {
        let (out, summary) = self.builder.finish(&self.tree, 1_700_000_000).unwrap();
        let file = out.into_inner().unwrap();
        file.sync_all().unwrap();
        let image = self.dir.join("image.erofs");
        let len = fs::metadata(&image).unwrap().len();
        assert_eq!(
            len,
            u64::from(summary.blocks) * 4096,
            "image is whole blocks"
        );
        Built {
            dir: self.dir,
            image,
            tree: self.tree,
            contents: self.contents,
            summary,
        }
    }
}

pub fn meta(mode: u16, uid: u32, gid: u32, mtime: i64) -> Metadata {
    Metadata {
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec: (mtime.unsigned_abs() % 1_000_000_000) as u32,
        xattrs: Vec::new(),
    }
}

/// Runs an erofs-utils tool, failing clearly when it is not installed.
pub fn run(tool: &str, args: &[&std::ffi::OsStr]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {tool} ({e}): these tests need erofs-utils (apt-get install erofs-utils)"
        )
    })
}

fn check_ok(tool: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{tool} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `fsck.erofs IMAGE`: checks the whole image, including all file data.
pub fn fsck(image: &Path) {
    let out = run("fsck.erofs", &[image.as_os_str()]);
    check_ok("fsck.erofs", &out);
}

/// Extracts with `fsck.erofs --extract --preserve` into `dir/extracted`.
/// Needs root, to create device nodes and keep ownership.
pub fn extract(built: &Built) -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "extraction tests must run as root: fsck.erofs --extract creates device nodes and chowns"
    );
    let target = built.dir.join("extracted");
    let _ = fs::remove_dir_all(&target);
    let mut arg = std::ffi::OsString::from("--extract=");
    arg.push(&target);
    let out = run(
        "fsck.erofs",
        &[
            arg.as_os_str(),
            "--preserve".as_ref(),
            built.image.as_os_str(),
        ],
    );
    check_ok("fsck.erofs --extract", &out);
    target
}

/// Fields `dump.erofs --path` shows for one inode.
#[derive(Debug, PartialEq, Eq)]
pub struct Dump {
    pub nid: u64,
    pub links: u32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub size: u64,
    pub xattr_size: u64,
}

pub fn dump(image: &Path, path: &str) -> Dump {
    let mut arg = std::ffi::OsString::from("--path=");
    arg.push(path);
    let out = run("dump.erofs", &[arg.as_os_str(), image.as_os_str()]);
    check_ok("dump.erofs", &out);
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |key: &str| -> &str {
        let at = text
            .find(key)
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            + key.len();
        text[at..].split_whitespace().next().unwrap()
    };
    Dump {
        nid: field("NID:").parse().unwrap(),
        links: field("Links:").parse().unwrap(),
        uid: field("Uid:").parse().unwrap(),
        gid: field("Gid:").parse().unwrap(),
        mode: u32::from_str_radix(field("Access:").split('/').next().unwrap(), 8).unwrap(),
        size: field("Size:").parse().unwrap(),
        xattr_size: field("Xattr size:").parse().unwrap(),
    }
}

/// The xattrs the image should hold for `meta`: supported prefixes only,
/// later duplicates winning.
pub fn expected_xattrs(meta: &Metadata) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let supported = |n: &[u8]| {
        n == b"system.posix_acl_access"
            || n == b"system.posix_acl_default"
            || [&b"user."[..], b"trusted.", b"security."]
                .iter()
                .any(|p| n.starts_with(p) && n.len() > p.len())
    };
    meta.xattrs
        .iter()
        .filter(|(n, _)| supported(n))
        .cloned()
        .collect()
}

/// Compares the extracted tree at `root` with the model, node by node, and
/// every inode's xattrs and link count as read from the image.
pub fn compare(built: &Built, root: &Path) {
    let inodes = Image::open(&built.image).paths();
    // Per node: its names, and the nid and nlink of its inode.
    let mut seen: HashMap<NodeId, (usize, u64, u32)> = HashMap::new();
    let mut stack = vec![(Tree::ROOT, PathBuf::from("/"))];
    check_node(built, &inodes, Tree::ROOT, root, Path::new("/"));
    while let Some((dir, path)) = stack.pop() {
        for (name, child) in built.tree.children(dir) {
            let path = path.join(OsStr::from_bytes(name));
            check_node(
                built,
                &inodes,
                child,
                &root.join(path.strip_prefix("/").unwrap()),
                &path,
            );
            let inode = &inodes[path.as_os_str().as_bytes()];
            let entry = seen.entry(child).or_insert((0, inode.nid, inode.nlink));
            entry.0 += 1;
            // Hard links: every name of a node is the same inode.
            assert_eq!(entry.1, inode.nid, "{path:?}");
            if let Kind::Dir(entries) = &built.tree.node(child).kind {
                let subdirs = entries
                    .values()
                    .filter(|&&c| matches!(built.tree.node(c).kind, Kind::Dir(_)))
                    .count();
                assert_eq!(inode.nlink as usize, 2 + subdirs, "{path:?}");
                stack.push((child, path));
            }
        }
    }
    for (id, &(names, _, nlink)) in &seen {
        if !matches!(built.tree.node(*id).kind, Kind::Dir(_)) {
            assert_eq!(nlink as usize, names, "links of {id:?}");
        }
    }
    let names: usize = seen.values().map(|s| s.0).sum();
    assert_eq!(inodes.len(), names + 1, "paths in the image");
}

/// Checks the extracted `path` and the image's inode at `image_path`
/// against node `id`.
fn check_node(
    built: &Built,
    inodes: &HashMap<Vec<u8>, InodeInfo>,
    id: NodeId,
    path: &Path,
    image_path: &Path,
) {
    let node = built.tree.node(id);
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let ft = md.file_type();
    let what = format!("{image_path:?}");
    match &node.kind {
        Kind::Dir(entries) => {
            assert!(ft.is_dir(), "{what}");
            let mut got: Vec<Vec<u8>> = fs::read_dir(path)
                .unwrap()
                .map(|e| e.unwrap().file_name().as_bytes().to_vec())
                .collect();
            got.sort();
            let want: Vec<Vec<u8>> = entries.keys().cloned().collect();
            assert_eq!(got, want, "{what}: entries");
        }
        Kind::File(data) => {
            assert!(ft.is_file(), "{what}");
            assert_eq!(md.len(), data.len, "{what}");
            assert!(
                fs::read(path).unwrap() == built.contents[&id],
                "{what}: contents"
            );
        }
        Kind::Symlink(target) => {
            assert!(ft.is_symlink(), "{what}");
            assert_eq!(
                fs::read_link(path).unwrap().as_os_str().as_bytes(),
                &target[..],
                "{what}"
            );
        }
        &Kind::CharDev { major, minor } | &Kind::BlockDev { major, minor } => {
            let is_char = matches!(node.kind, Kind::CharDev { .. });
            assert!(
                if is_char {
                    ft.is_char_device()
                } else {
                    ft.is_block_device()
                },
                "{what}"
            );
            let rdev = md.rdev();
            let got_major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
            let got_minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
            assert_eq!(
                (got_major, got_minor),
                (u64::from(major), u64::from(minor)),
                "{what}"
            );
        }
        Kind::Fifo => assert!(ft.is_fifo(), "{what}"),
        Kind::Socket => assert!(ft.is_socket(), "{what}"),
    }
    let meta = &node.meta;
    assert_eq!((md.uid(), md.gid()), (meta.uid, meta.gid), "{what}: owner");
    if !ft.is_symlink() {
        // erofs-utils 1.5 extracts without setuid/setgid/sticky; the image
        // check below covers those.
        assert_eq!(
            md.mode() & 0o777,
            u32::from(meta.mode & 0o777),
            "{what}: mode"
        );
    }
    if !ft.is_symlink() && !ft.is_dir() {
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (meta.mtime, i64::from(meta.mtime_nsec)),
            "{what}: mtime"
        );
    }
    let inode = &inodes[image_path.as_os_str().as_bytes()];
    let type_bits = match node.kind {
        Kind::Dir(_) => 0o040000,
        Kind::File(_) => 0o100000,
        Kind::Symlink(_) => 0o120000,
        Kind::CharDev { .. } => 0o020000,
        Kind::BlockDev { .. } => 0o060000,
        Kind::Fifo => 0o010000,
        Kind::Socket => 0o140000,
    };
    assert_eq!(
        inode.mode,
        type_bits | (meta.mode & 0o7777),
        "{what}: image mode"
    );
    assert_eq!(inode.xattrs, expected_xattrs(meta), "{what}: xattrs");
    assert_eq!(
        (inode.mtime, inode.mtime_nsec),
        (meta.mtime, meta.mtime_nsec),
        "{what}: mtime"
    );
}

/// A minimal erofs reader following Linux 6.1 (`namei.c`, `dir.c`,
/// `xattr.c`), for what erofs-utils 1.5 does not report.
pub struct Image {
    bytes: Vec<u8>,
    meta_blkaddr: u64,
    root_nid: u64,
}

/// An inode as read by [`Image`].
#[derive(Debug)]
pub struct InodeInfo {
    pub nid: u64,
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    pub raw_blkaddr: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl Image {
    pub fn open(path: &Path) -> Image {
        let bytes = fs::read(path).unwrap();
        let sb = &bytes[1024..1152];
        assert_eq!(le32(sb, 0), 0xE0F5_E1E2);
        assert_eq!(
            u64::from(le32(sb, 36)) * 4096,
            bytes.len() as u64,
            "sb blocks"
        );
        Image {
            meta_blkaddr: u64::from(le32(sb, 40)),
            root_nid: u64::from(le16(sb, 14)),
            bytes,
        }
    }

    pub fn inode(&self, nid: u64) -> InodeInfo {
        let at = (self.meta_blkaddr * 4096 + nid * 32) as usize;
        let raw = &self.bytes[at..at + 64];
        assert_eq!(le16(raw, 0), 1, "extended FLAT_PLAIN inode");
        let icount = usize::from(le16(raw, 2));
        let mut xattrs = BTreeMap::new();
        if icount > 0 {
            let end = at + 64 + 12 + 4 * (icount - 1);
            let mut p = at + 64 + 12;
            while p < end {
                let name_len = usize::from(self.bytes[p]);
                let prefix: &[u8] = match self.bytes[p + 1] {
                    1 => b"user.",
                    2 => b"system.posix_acl_access",
                    3 => b"system.posix_acl_default",
                    4 => b"trusted.",
                    6 => b"security.",
                    other => panic!("xattr index {other}"),
                };
                let value_len = usize::from(le16(&self.bytes, p + 2));
                let name = [prefix, &self.bytes[p + 4..p + 4 + name_len]].concat();
                let v = p + 4 + name_len;
                xattrs.insert(name, self.bytes[v..v + value_len].to_vec());
                p = (v + value_len).next_multiple_of(4);
            }
            assert_eq!(p, end, "xattr entries fill the ibody");
        }
        InodeInfo {
            nid,
            mode: le16(raw, 4),
            size: le64(raw, 8),
            raw_blkaddr: le32(raw, 16),
            mtime: le64(raw, 32) as i64,
            mtime_nsec: le32(raw, 40),
            nlink: le32(raw, 44),
            xattrs,
        }
    }

    /// Entries of a directory inode in on-disk order, as readdir sees them.
    pub fn entries(&self, dir: &InodeInfo) -> Vec<(Vec<u8>, u64, u8)> {
        assert_eq!(dir.mode & 0o170000, 0o040000);
        let mut out = Vec::new();
        let base = dir.raw_blkaddr as usize * 4096;
        for blk in 0..dir.size.div_ceil(4096) as usize {
            let b = &self.bytes[base + blk * 4096..base + (blk + 1) * 4096];
            let maxsize = (dir.size as usize - blk * 4096).min(4096);
            let n = usize::from(le16(b, 8)) / 12;
            assert!(n > 0 && n * 12 == usize::from(le16(b, 8)));
            for i in 0..n {
                let off = usize::from(le16(b, i * 12 + 8));
                let end = if i + 1 < n {
                    usize::from(le16(b, (i + 1) * 12 + 8))
                } else {
                    off + b[off..maxsize]
                        .iter()
                        .position(|&c| c == 0)
                        .unwrap_or(maxsize - off)
                };
                assert!(end > off && end - off <= 255);
                out.push((b[off..end].to_vec(), le64(b, i * 12), b[i * 12 + 10]));
            }
        }
        out
    }

    /// Every inode by absolute path (the root is `/`), walking each
    /// directory once and checking that its entries are sorted bytewise
    /// (lookups binary-search them) and that `.` and `..` are right.
    pub fn paths(&self) -> HashMap<Vec<u8>, InodeInfo> {
        let mut out = HashMap::new();
        let mut dirs = vec![(b"/".to_vec(), self.root_nid, self.root_nid)];
        while let Some((path, nid, parent)) = dirs.pop() {
            let dir = self.inode(nid);
            let entries = self.entries(&dir);
            assert!(
                entries.windows(2).all(|w| w[0].0 < w[1].0),
                "{path:?}: dirents sorted"
            );
            for (name, child, file_type) in entries {
                match &name[..] {
                    b"." => assert_eq!((child, file_type), (nid, 2)),
                    b".." => assert_eq!((child, file_type), (parent, 2)),
                    _ => {
                        let child_path = match &path[..] {
                            b"/" => [&path[..], &name].concat(),
                            _ => [&path[..], b"/", &name].concat(),
                        };
                        let inode = self.inode(child);
                        if inode.mode & 0o170000 == 0o040000 {
                            dirs.push((child_path.clone(), child, nid));
                        }
                        out.insert(child_path, inode);
                    }
                }
            }
            out.insert(path, dir);
        }
        out
    }
}
