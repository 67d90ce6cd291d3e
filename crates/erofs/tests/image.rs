//! Builds images with the crate and checks them with erofs-utils:
//! `fsck.erofs` (structure and all data), `fsck.erofs --extract` compared
//! with the tree, `dump.erofs` for inode fields, plus the test reader in
//! `common` for xattrs, dirent order and link counts. The crate's own
//! [`Reader`] must read every image back as the tree it was built from.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use cc_erofs::{Kind, Metadata, NodeId, Reader, Tree};
use common::{compare, dump, expected_xattrs, extract, fsck, meta, Built, Fixture};

/// Deterministic xorshift64* generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A POSIX ACL xattr value equivalent to mode 0750: version 2, then
/// (tag, perm, id) for USER_OBJ, GROUP_OBJ and OTHER.
const ACL: [u8; 28] = [
    2, 0, 0, 0, 1, 0, 7, 0, 255, 255, 255, 255, 4, 0, 5, 0, 255, 255, 255, 255, 32, 0, 0, 0, 255,
    255, 255, 255,
];

fn xattr(name: &str, value: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (name.as_bytes().to_vec(), value.to_vec())
}

/// A tree with every node kind, ownership, modes, xattrs, hard
/// and symbolic links, big and multi-block directories. `name` keeps the
/// files of tests running in parallel apart.
fn full_tree(name: &str) -> Built {
    let mut root_meta = meta(0o755, 0, 0, 1_600_000_000);
    root_meta.xattrs = vec![xattr("security.selinux", b"system_u:object_r:root_t:s0\0")];
    let mut f = Fixture::new(name, root_meta);
    let root = Tree::ROOT;

    let etc = f.dir(root, b"etc", meta(0o755, 0, 0, 1_600_000_001));
    let passwd = f.file(
        etc,
        b"passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        meta(0o644, 0, 0, 1_600_000_002),
    );
    f.tree.link(etc, b"passwd-hardlink", passwd).unwrap();
    f.tree.link(root, b"passwd-top", passwd).unwrap();

    let mut a = etc;
    for (i, name) in [&b"a"[..], b"b", b"c", b"d"].into_iter().enumerate() {
        a = f.dir(
            a,
            name,
            meta(0o700 + i as u16, i as u32, i as u32, 1_500_000_000),
        );
    }
    f.file(a, b"deep.txt", b"deep\n".to_vec(), meta(0o600, 3, 3, 0));

    let mut rng = Rng(0x1234_5678_9abc_def1);
    f.file(
        root,
        b"big.bin",
        rng.bytes(3 << 19 | 123),
        meta(0o644, 0, 0, 1_700_000_000),
    );
    f.file(root, b"empty", Vec::new(), meta(0o644, 0, 0, 1_700_000_001));
    f.file(
        root,
        b"suid",
        b"#!/bin/sh\n".to_vec(),
        meta(0o4755, 1000, 2000, 1_700_000_002),
    );
    f.file(
        root,
        b"nobody",
        b"x".to_vec(),
        meta(0o640, 65534, 65534, -86_400),
    );
    f.file(
        root,
        b"exactly-a-block",
        vec![7; 4096],
        meta(0o644, 0, 0, 5),
    );

    let mut xmeta = meta(0o644, 0, 0, 1_700_000_003);
    xmeta.xattrs = vec![
        xattr("user.foo", b"bar"),
        xattr(
            "security.capability",
            &[
                1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ),
        xattr("trusted.x", b""),
        // No erofs name index: left out.
        xattr("system.nfs4_acl", b"?"),
    ];
    f.file(root, b"xattrs", b"with xattrs".to_vec(), xmeta);
    let mut big_x = meta(0o755, 0, 0, 7);
    big_x.xattrs = vec![
        xattr("user.big", &rng.bytes(6000)),
        xattr("user.small", b"s"),
    ];
    f.dir(root, b"big-xattr-dir", big_x);
    let mut acl = meta(0o750, 0, 0, 8);
    acl.xattrs = vec![
        xattr("system.posix_acl_access", &ACL),
        xattr("system.posix_acl_default", &ACL),
    ];
    f.dir(root, b"acl-dir", acl);

    let links = f.dir(root, b"links", meta(0o755, 0, 0, 9));
    let lmeta = || meta(0o777, 0, 0, 10);
    f.node(
        links,
        b"relative",
        Kind::Symlink(b"../etc/passwd".to_vec()),
        lmeta(),
    );
    f.node(
        links,
        b"absolute",
        Kind::Symlink(b"/etc/passwd".to_vec()),
        lmeta(),
    );
    let long: Vec<u8> = b"component/".iter().copied().cycle().take(3000).collect();
    f.node(links, b"long", Kind::Symlink(long), lmeta());
    f.node(
        links,
        b"dangling",
        Kind::Symlink(b"nowhere".to_vec()),
        meta(0o777, 1000, 2000, 11),
    );

    let dev = f.dir(root, b"dev", meta(0o755, 0, 0, 12));
    let dmeta = |mode| meta(mode, 0, 6, 13);
    f.node(
        dev,
        b"null",
        Kind::CharDev { major: 1, minor: 3 },
        dmeta(0o666),
    );
    f.node(
        dev,
        b"sda",
        Kind::BlockDev { major: 8, minor: 0 },
        dmeta(0o660),
    );
    let wide = Kind::CharDev {
        major: 511,
        minor: 0x54321,
    };
    f.node(dev, b"wide", wide, dmeta(0o600));
    f.node(dev, b"fifo", Kind::Fifo, dmeta(0o644));
    f.node(dev, b"socket", Kind::Socket, dmeta(0o755));

    let many = f.dir(root, b"many", meta(0o755, 0, 0, 14));
    for i in 0..1200u32 {
        let mut name = format!("entry-{:05}-", (i * 7919) % 1200).into_bytes();
        name.resize(10 + (i as usize * 13) % 240, b'x');
        if i % 100 == 0 {
            f.file(many, &name, name.clone(), meta(0o644, i, i, i64::from(i)));
        } else {
            f.node(many, &name, Kind::Fifo, meta(0o600, 0, 0, i64::from(i)));
        }
    }
    f.finish()
}

/// Reads the image back with [`Reader`] and compares it with the tree it
/// was built from, node by node: names, kinds, metadata (xattrs as stored),
/// file contents, and hard links as shared nodes.
fn read_back(built: &Built) {
    let file = std::fs::File::open(&built.image).unwrap();
    let mut reader = Reader::new(file).unwrap();
    let read = reader.tree().unwrap();
    let mut same: HashMap<NodeId, NodeId> = HashMap::from([(Tree::ROOT, Tree::ROOT)]);
    let mut dirs = vec![(Tree::ROOT, Tree::ROOT)];
    while let Some((want_dir, got_dir)) = dirs.pop() {
        let want: Vec<_> = built.tree.children(want_dir).collect();
        let got: Vec<_> = read.children(got_dir).collect();
        assert_eq!(
            want.iter().map(|e| e.0).collect::<Vec<_>>(),
            got.iter().map(|e| e.0).collect::<Vec<_>>()
        );
        for (&(name, want_id), &(_, got_id)) in want.iter().zip(&got) {
            let what = String::from_utf8_lossy(name);
            if let Some(&earlier) = same.get(&want_id) {
                assert_eq!(earlier, got_id, "{what}: hard link");
                continue;
            }
            same.insert(want_id, got_id);
            let (w, g) = (built.tree.node(want_id), read.node(got_id));
            let stored = |m: &Metadata| Metadata {
                xattrs: expected_xattrs(m).into_iter().collect(),
                ..m.clone()
            };
            let mut got_meta = g.meta.clone();
            got_meta.xattrs.sort();
            assert_eq!(stored(&w.meta), got_meta, "{what}");
            match (&w.kind, &g.kind) {
                (Kind::Dir(_), Kind::Dir(_)) => dirs.push((want_id, got_id)),
                (Kind::File(_), Kind::File(data)) => {
                    let mut bytes = Vec::new();
                    reader.data(*data).unwrap().read_to_end(&mut bytes).unwrap();
                    assert!(bytes == built.contents[&want_id], "{what}: contents");
                }
                (w, g) => assert_eq!(w, g, "{what}"),
            }
        }
    }
}

#[test]
fn full_tree_passes_fsck_and_extracts_identically() {
    let built = full_tree("full-extract");
    fsck(&built.image);
    read_back(&built);
    let extracted = extract(&built);
    compare(&built, &extracted);
    assert_eq!(built.summary.skipped_xattrs, 1);
    // The root; etc and its 6 nodes; 6 files and 2 directories in the root;
    // links and its 4; dev and its 5; many and its 1200.
    assert_eq!(built.summary.inodes, 1 + 7 + 8 + 5 + 6 + 1201);
    std::fs::remove_dir_all(&built.dir).unwrap();
}

#[test]
fn dump_shows_inode_fields() {
    let built = full_tree("full-dump");
    let image = &built.image;
    let passwd = dump(image, "/etc/passwd");
    assert_eq!(passwd.links, 3);
    assert_eq!(passwd.size, 30);
    assert_eq!(dump(image, "/etc/passwd-hardlink").nid, passwd.nid);
    assert_eq!(dump(image, "/passwd-top").nid, passwd.nid);

    let suid = dump(image, "/suid");
    // dump.erofs 1.5 shows permission bits without setuid (the image has
    // them: `compare` reads the raw inode).
    assert_eq!(
        (suid.uid, suid.gid, suid.mode, suid.links),
        (1000, 2000, 0o755, 1)
    );
    let nobody = dump(image, "/nobody");
    assert_eq!((nobody.uid, nobody.gid, nobody.mode), (65534, 65534, 0o640));
    // Root: 2 + etc, big-xattr-dir, acl-dir, links, dev, many.
    assert_eq!(dump(image, "/").links, 8);
    assert_eq!(dump(image, "/etc").links, 3);
    assert_eq!(dump(image, "/links/long").size, 3000);
    // 12-byte header, then 4 + 3 + 3 -> 12, 4 + 10 + 20 = 36 (aligned),
    // 4 + 1 + 0 -> 8.
    assert_eq!(dump(image, "/xattrs").xattr_size, 12 + 12 + 36 + 8);
    let big = dump(image, "/big-xattr-dir");
    assert!(big.xattr_size > 6000, "{big:?}");
    assert_eq!(big.links, 2);
    std::fs::remove_dir_all(&built.dir).unwrap();
}

/// Random names: any bytes but `/` and NUL, 1 to 255 long.
fn random_name(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(4) {
        0 => 1 + rng.below(3),
        1 => 200 + rng.below(56),
        _ => 1 + rng.below(40),
    } as usize;
    (0..len)
        .map(|_| match rng.below(3) {
            0 => b'.',
            _ => (1 + rng.below(255)) as u8,
        })
        .map(|b| if b == b'/' { b'_' } else { b })
        .collect()
}

fn random_meta(rng: &mut Rng, mode: u16) -> Metadata {
    let mut m = meta(
        mode | (rng.below(0o1000) as u16 & 0o755) | 0o700,
        [0, 1000, 65534, u32::MAX - 1][rng.below(4) as usize],
        rng.below(70_000) as u32,
        // What the host filesystem can store when extracting (ext4: 1901 on).
        rng.below(1 << 33) as i64 - (1 << 31),
    );
    for _ in 0..rng.below(4) {
        let prefix = [
            "user.",
            "trusted.",
            "security.",
            "system.posix_acl_access",
            "bogus.",
        ][rng.below(5) as usize];
        let name = if prefix.starts_with("system.") {
            prefix.to_owned()
        } else {
            format!("{prefix}{}", rng.below(5))
        };
        let value = if prefix.starts_with("system.") {
            // The kernel parses ACLs on access: they must be well formed.
            ACL.to_vec()
        } else {
            let len = [0, 1, 3, 50, 300, 3000][rng.below(6) as usize];
            rng.bytes(len)
        };
        m.xattrs.push((name.into_bytes(), value));
    }
    m
}

fn random_tree(seed: u64, nodes: usize) -> Built {
    let mut rng = Rng(seed);
    let mut f = Fixture::new(&format!("random-{seed:x}"), random_meta(&mut rng, 0));
    let mut dirs = vec![Tree::ROOT];
    let mut files: Vec<NodeId> = Vec::new();
    let mut added = 0;
    while added < nodes {
        let parent = dirs[rng.below(dirs.len() as u64) as usize];
        let name = random_name(&mut rng);
        if name == b"." || name == b".." || f.tree.lookup(parent, &name).is_some() {
            continue;
        }
        added += 1;
        let m = random_meta(&mut rng, 0);
        match rng.below(10) {
            0..=2 => dirs.push(f.dir(parent, &name, m)),
            3..=5 => {
                let len = [0, 1, 4095, 4096, 4097, 20_000][rng.below(6) as usize];
                files.push(f.file(parent, &name, rng.bytes(len), m));
            }
            6 if !files.is_empty() => {
                let target = files[rng.below(files.len() as u64) as usize];
                f.tree.link(parent, &name, target).unwrap();
            }
            7 => {
                let max = if rng.below(4) == 0 { 4095 } else { 60 };
                let len = 1 + rng.below(max) as usize;
                let target: Vec<u8> = rng.bytes(len).iter().map(|&b| b.max(1)).collect();
                f.node(parent, &name, Kind::Symlink(target), m);
            }
            8 => {
                let kind = Kind::CharDev {
                    major: rng.below(4096) as u32,
                    minor: rng.below(1 << 20) as u32,
                };
                f.node(parent, &name, kind, m);
            }
            _ => {
                f.node(parent, &name, Kind::Fifo, m);
            }
        }
    }
    f.finish()
}

#[test]
fn random_trees_pass_fsck_and_extract_identically() {
    for seed in 1..=12u64 {
        let built = random_tree(
            seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            150 + seed as usize * 40,
        );
        fsck(&built.image);
        read_back(&built);
        let extracted = extract(&built);
        compare(&built, &extracted);
        std::fs::remove_dir_all(&built.dir).unwrap();
    }
}

#[test]
fn random_huge_directory() {
    let mut rng = Rng(77);
    let mut f = Fixture::new("huge-dir", meta(0o755, 0, 0, 0));
    let mut names = BTreeMap::new();
    while names.len() < 5000 {
        names.insert(random_name(&mut rng), ());
    }
    for name in names.keys().filter(|n| *n != b"." && *n != b"..") {
        f.node(Tree::ROOT, name, Kind::Fifo, meta(0o644, 0, 0, 0));
    }
    let built = f.finish();
    fsck(&built.image);
    read_back(&built);
    compare(&built, &extract(&built));
    std::fs::remove_dir_all(&built.dir).unwrap();
}
