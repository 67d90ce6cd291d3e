//! Root images of host directories: the walk, its fingerprint, and the
//! image checked three ways: `fsck.erofs` (structure and all data), read
//! back with cc-erofs's reader and compared with the directory field by
//! field (special mode bits and xattrs included), and extracted with
//! `fsck.erofs --extract --preserve` and compared again. Extraction makes
//! device nodes and sets owners, so these tests run as root, like
//! cc-erofs's; they need erofs-utils.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Cursor, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cc_erofs::{Kind, NodeId, Reader, Tree};
use cc_image::HostDir;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hostdir-{name}"));
    if dir.exists() {
        make_writable(&dir);
        fs::remove_dir_all(&dir).unwrap();
    }
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Gives every directory under `dir` back its permissions, so a test that
/// took them away can clean up.
fn make_writable(dir: &Path) {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            make_writable(&entry.path());
        }
    }
}

fn at(secs: i64, nsec: u32) -> SystemTime {
    match secs {
        s if s >= 0 => UNIX_EPOCH + Duration::new(s as u64, nsec),
        s => UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + Duration::new(0, nsec),
    }
}

fn set_mtime(path: &Path, secs: i64, nsec: u32) {
    File::open(path)
        .unwrap()
        .set_modified(at(secs, nsec))
        .unwrap();
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

fn mknod(path: &Path, mode: libc::mode_t, major: u32, minor: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(r, 0, "mknod {path:?}: {}", std::io::Error::last_os_error());
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

/// A root filesystem tree with every file type, special permission bits,
/// owners, hard and symbolic links (some pointing outside the tree),
/// empty directories and files, odd names, xattrs and mtimes with
/// nanoseconds (one before 1970).
fn populate(root: &Path) {
    let p = |rel: &str| root.join(rel);
    for dir in [
        "etc",
        "bin",
        "tmp",
        "empty-dir",
        "sub/deeper",
        "links",
        "dev",
    ] {
        fs::create_dir_all(p(dir)).unwrap();
    }
    fs::write(p("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(p("etc/shadow"), b"root:*:19000::::::\n").unwrap();
    fs::set_permissions(p("etc/shadow"), fs::Permissions::from_mode(0o640)).unwrap();
    chown(&p("etc/shadow"), 0, 42);
    for (name, mode) in [("suid", 0o4755), ("sgid", 0o2711), ("tool", 0o755)] {
        fs::write(p(&format!("bin/{name}")), b"#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(p(&format!("bin/{name}")), fs::Permissions::from_mode(mode)).unwrap();
    }
    chown(&p("bin/tool"), 1000, 1000);
    fs::set_permissions(p("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(p("empty-dir"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(p("empty-file"), b"").unwrap();
    let big: Vec<u8> = (0..(1u32 << 20) + 123)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(p("big.bin"), &big).unwrap();
    fs::write(p("exactly-a-block"), vec![7u8; 4096]).unwrap();
    fs::write(p("hard-a"), b"shared contents\n").unwrap();
    fs::hard_link(p("hard-a"), p("sub/hard-b")).unwrap();
    fs::hard_link(p("hard-a"), p("sub/deeper/hard-c")).unwrap();
    for (name, target) in [
        ("relative", "../etc/passwd"),
        ("absolute", "/etc/passwd"),
        ("outside", "../../../../../outside/the/tree"),
        ("dangling", "nowhere"),
        ("to-dir", "../etc"),
    ] {
        std::os::unix::fs::symlink(target, p(&format!("links/{name}"))).unwrap();
    }
    mknod(&p("dev/null"), libc::S_IFCHR | 0o666, 1, 3);
    mknod(&p("dev/sda"), libc::S_IFBLK | 0o660, 8, 0);
    mknod(&p("dev/wide"), libc::S_IFCHR | 0o600, 511, 0x54321);
    mknod(&p("dev/fifo"), libc::S_IFIFO | 0o644, 0, 0);
    drop(std::os::unix::net::UnixListener::bind(p("dev/socket")).unwrap());
    for name in ["sp ace", "ünïcødé", "new\nline", "-dash"] {
        fs::write(p(&format!("sub/{name}")), name.as_bytes()).unwrap();
    }
    fs::write(p("xattrs"), b"with xattrs").unwrap();
    set_xattr(&p("xattrs"), "user.small", b"v");
    set_xattr(&p("xattrs"), "user.big", &[9u8; 3000]);
    set_xattr(&p("xattrs"), "trusted.t", b"");
    set_xattr(&p("etc"), "user.dir", b"on a directory");
    // Times last: creating entries changes their directory's mtime.
    set_mtime(&p("etc/passwd"), 1_700_000_000, 123_456_789);
    set_mtime(&p("big.bin"), -86_400, 5);
    set_mtime(&p("sub/ünïcødé"), 1, 999_999_999);
    set_mtime(&p("etc"), 1_600_000_000, 42);
    set_mtime(root, 1_650_000_000, 0);
}

/// Checks `image` against the directory it was built from, entry by entry,
/// through cc-erofs's reader: types, modes with special bits, owners,
/// mtimes, xattrs, device numbers, link targets, contents, and hard links
/// as one node. Returns how many entries it compared.
fn compare_read_back(root: &Path, image: &Path) -> usize {
    let mut reader = Reader::new(File::open(image).unwrap()).unwrap();
    let tree = reader.tree().unwrap();
    let mut by_inode: HashMap<u64, NodeId> = HashMap::new();
    let mut checked = 0;
    let mut dirs = vec![(PathBuf::new(), Tree::ROOT)];
    while let Some((rel, id)) = dirs.pop() {
        check_node(root, &rel, &tree, id, &mut reader);
        checked += 1;
        let mut names: Vec<_> = fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let in_image: Vec<&[u8]> = tree.children(id).map(|(n, _)| n).collect();
        let on_host: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
        assert_eq!(in_image, on_host, "{rel:?}: entries");
        for (name, child) in tree.children(id) {
            let rel = rel.join(std::ffi::OsStr::from_bytes(name));
            let host = fs::symlink_metadata(root.join(&rel)).unwrap();
            if host.is_dir() {
                dirs.push((rel, child));
                continue;
            }
            let first = *by_inode.entry(host.ino()).or_insert(child);
            assert_eq!(first, child, "{rel:?}: hard links are one node");
            check_node(root, &rel, &tree, child, &mut reader);
            checked += 1;
        }
    }
    checked
}

fn check_node<R: Read + std::io::Seek>(
    root: &Path,
    rel: &Path,
    tree: &Tree,
    id: NodeId,
    reader: &mut Reader<R>,
) {
    let path = root.join(rel);
    let host = fs::symlink_metadata(&path).unwrap();
    let node = tree.node(id);
    let m = &node.meta;
    assert_eq!(u32::from(m.mode), host.mode() & 0o7777, "{rel:?}: mode");
    assert_eq!((m.uid, m.gid), (host.uid(), host.gid()), "{rel:?}: owner");
    assert_eq!(
        (m.mtime, i64::from(m.mtime_nsec)),
        (host.mtime(), host.mtime_nsec()),
        "{rel:?}: mtime"
    );
    let mut xattrs = Vec::new();
    let mut names = vec![0u8; 4096];
    let len = rustix::fs::llistxattr(&path, &mut names[..]).unwrap();
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 65536];
        let n = rustix::fs::lgetxattr(&path, name, &mut value[..]).unwrap();
        xattrs.push((name.to_vec(), value[..n].to_vec()));
    }
    xattrs.sort();
    let mut stored = m.xattrs.clone();
    stored.sort();
    assert_eq!(stored, xattrs, "{rel:?}: xattrs");
    let ft = host.file_type();
    match &node.kind {
        Kind::Dir(_) => assert!(ft.is_dir(), "{rel:?}"),
        Kind::File(data) => {
            assert!(ft.is_file(), "{rel:?}");
            let mut bytes = Vec::new();
            reader.data(*data).unwrap().read_to_end(&mut bytes).unwrap();
            assert!(bytes == fs::read(&path).unwrap(), "{rel:?}: contents");
        }
        Kind::Symlink(target) => {
            assert_eq!(
                &target[..],
                fs::read_link(&path).unwrap().as_os_str().as_bytes(),
                "{rel:?}"
            );
        }
        &Kind::CharDev { major, minor } | &Kind::BlockDev { major, minor } => {
            let is_char = matches!(node.kind, Kind::CharDev { .. });
            assert_eq!(is_char, ft.is_char_device(), "{rel:?}");
            assert_eq!(is_char, !ft.is_block_device(), "{rel:?}");
            assert_eq!(libc::makedev(major, minor), host.rdev(), "{rel:?}");
        }
        Kind::Fifo => assert!(ft.is_fifo(), "{rel:?}"),
        Kind::Socket => assert!(ft.is_socket(), "{rel:?}"),
    }
}

/// Extracts `image` with `fsck.erofs --extract --preserve` and compares
/// the result with `root`: what erofs-utils 1.5 restores (no special mode
/// bits, no xattrs, no directory or symlink times, and each name of a hard
/// link as a file of its own).
fn compare_extracted(root: &Path, image: &Path, target: &Path) {
    let mut arg = std::ffi::OsString::from("--extract=");
    arg.push(target);
    let out = Command::new("fsck.erofs")
        .arg(&arg)
        .arg("--preserve")
        .arg(image)
        .output()
        .expect("fsck.erofs (apt-get install erofs-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (a, b) = (root.join(&rel), target.join(&rel));
        let (ma, mb) = (
            fs::symlink_metadata(&a).unwrap(),
            fs::symlink_metadata(&b).unwrap(),
        );
        assert_eq!(
            ma.mode() & 0o170777,
            mb.mode() & 0o170777,
            "{rel:?}: type, mode"
        );
        assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{rel:?}: owner");
        assert_eq!(ma.rdev(), mb.rdev(), "{rel:?}: device");
        let ft = ma.file_type();
        if ft.is_file() {
            assert_eq!((ma.mtime(), ma.mtime_nsec()), (mb.mtime(), mb.mtime_nsec()));
            assert!(fs::read(&a).unwrap() == fs::read(&b).unwrap(), "{rel:?}");
        } else if ft.is_symlink() {
            assert_eq!(fs::read_link(&a).unwrap(), fs::read_link(&b).unwrap());
        } else if ft.is_dir() {
            let names = |d: &Path| {
                let mut n: Vec<_> = fs::read_dir(d)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                n.sort();
                n
            };
            let here = names(&a);
            assert_eq!(here, names(&b), "{rel:?}: entries");
            stack.extend(here.into_iter().map(|n| rel.join(n)));
        }
    }
}

fn build(root: &Path, image: &Path) -> [u8; 32] {
    let dir = HostDir::read(root).unwrap();
    let fingerprint = dir.fingerprint();
    let out = dir.write(File::create(image).unwrap()).unwrap();
    out.sync_all().unwrap();
    fingerprint
}

fn fsck(image: &Path) {
    let out = Command::new("fsck.erofs")
        .arg(image)
        .output()
        .expect("fsck.erofs (apt-get install erofs-utils)");
    assert!(
        out.status.success(),
        "fsck.erofs: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_full_tree_passes_fsck_reads_back_and_extracts_identically() {
    assert!(
        is_root(),
        "these tests must run as root: they make device nodes and set owners"
    );
    let dir = scratch("full");
    let root = dir.join("root");
    fs::create_dir(&root).unwrap();
    populate(&root);
    let image = dir.join("root.erofs");
    let fingerprint = build(&root, &image);
    fsck(&image);
    assert_eq!(compare_read_back(&root, &image), 35);
    compare_extracted(&root, &image, &dir.join("extracted"));

    // The same tree always gives the same image and fingerprint.
    let again = dir.join("again.erofs");
    assert_eq!(build(&root, &again), fingerprint);
    assert!(fs::read(&image).unwrap() == fs::read(&again).unwrap());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_empty_directory_is_an_image_of_its_root() {
    let dir = scratch("empty");
    let root = dir.join("root");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o751)).unwrap();
    let image = dir.join("root.erofs");
    build(&root, &image);
    fsck(&image);
    assert_eq!(compare_read_back(&root, &image), 1);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_fingerprint_follows_what_the_image_holds() {
    let dir = scratch("fingerprint");
    let root = dir.join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/a"), b"1").unwrap();
    fs::write(root.join("b"), b"b").unwrap();
    set_mtime(&root.join("etc/a"), 1_000, 0);
    let fp = || HostDir::read(&root).unwrap().fingerprint();
    let mut last = fp();
    let changed = |what: &str, last: &mut [u8; 32]| {
        let now = fp();
        assert_ne!(now, *last, "{what} must change the fingerprint");
        *last = now;
    };

    // Reading everything, and building an image, change nothing.
    for _ in 0..2 {
        fs::read(root.join("etc/a")).unwrap();
        HostDir::read(&root)
            .unwrap()
            .write(Cursor::new(Vec::new()))
            .unwrap();
        assert_eq!(fp(), last, "stable");
    }

    // Same size, new contents: the mtime says so.
    fs::write(root.join("etc/a"), b"2").unwrap();
    changed("new contents", &mut last);
    set_mtime(&root.join("etc/a"), 2_000, 0);
    changed("an mtime", &mut last);
    set_mtime(&root.join("etc/a"), 2_000, 1);
    changed("an mtime's nanoseconds", &mut last);
    fs::write(root.join("etc/a"), b"longer").unwrap();
    set_mtime(&root.join("etc/a"), 2_000, 1);
    changed("a size", &mut last);
    fs::set_permissions(root.join("etc/a"), fs::Permissions::from_mode(0o600)).unwrap();
    changed("a mode", &mut last);
    fs::set_permissions(root.join("etc/a"), fs::Permissions::from_mode(0o4600)).unwrap();
    changed("a setuid bit", &mut last);
    if is_root() {
        chown(&root.join("etc/a"), 1, 1);
        changed("an owner", &mut last);
    }
    set_xattr(&root.join("b"), "user.x", b"1");
    changed("an xattr", &mut last);
    set_xattr(&root.join("b"), "user.x", b"2");
    changed("an xattr value", &mut last);
    std::os::unix::fs::symlink("etc/a", root.join("l")).unwrap();
    changed("a new symlink", &mut last);
    fs::remove_file(root.join("l")).unwrap();
    std::os::unix::fs::symlink("etc/b", root.join("l")).unwrap();
    changed("a symlink target", &mut last);
    fs::create_dir(root.join("empty")).unwrap();
    changed("an empty directory", &mut last);
    fs::copy(root.join("b"), root.join("c")).unwrap();
    let copy = fp();
    fs::remove_file(root.join("c")).unwrap();
    fs::hard_link(root.join("b"), root.join("c")).unwrap();
    assert_ne!(fp(), copy, "a hard link is not a copy");
    last = fp();
    fs::rename(root.join("c"), root.join("d")).unwrap();
    changed("a rename", &mut last);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_file_changed_after_the_walk_is_an_error() {
    let dir = scratch("changed");
    let root = dir.join("root");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("f"), b"before").unwrap();
    set_mtime(&root.join("f"), 1_000, 0);
    let walked = HostDir::read(&root).unwrap();
    fs::write(root.join("f"), b"after!").unwrap();
    let err = walked.write(Cursor::new(Vec::new())).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("changed while") && text.contains("/f"),
        "{text}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unreadable_files_and_directories_are_clear_errors() {
    let dir = scratch("unreadable");
    let root = dir.join("root");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("secret"), b"x").unwrap();
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    let locked = dir.join("locked");
    fs::create_dir_all(locked.join("inner")).unwrap();
    fs::set_permissions(locked.join("inner"), fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads anything: check as an ordinary user. The filesystem uid
    // is per thread, and leaving 0 drops the capability to override file
    // permissions for that thread only.
    let (file_err, dir_err) = std::thread::spawn(move || {
        if is_root() {
            // SAFETY: changes only this thread's filesystem credentials.
            unsafe {
                libc::setfsgid(65534);
                libc::setfsuid(65534);
            }
        }
        // The walk opens no file: the error comes with the contents.
        let walked = HostDir::read(&root).unwrap();
        let file_err = walked.write(Cursor::new(Vec::new())).unwrap_err();
        let dir_err = HostDir::read(&locked).unwrap_err();
        (file_err.to_string(), dir_err.to_string())
    })
    .join()
    .unwrap();
    assert!(
        file_err.contains("root/secret") && file_err.contains("Permission denied"),
        "{file_err}"
    );
    assert!(
        dir_err.contains("locked/inner") && dir_err.contains("Permission denied"),
        "{dir_err}"
    );
    make_writable(&dir);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_directory_or_a_file_is_refused() {
    let dir = scratch("missing");
    let err = HostDir::read(&dir.join("nope")).unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
    fs::write(dir.join("file"), b"x").unwrap();
    let err = HostDir::read(&dir.join("file")).unwrap_err().to_string();
    assert!(err.contains("not a directory"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

/// Every entry of an erofs image as one line: path, kind, metadata and a
/// hash of the contents; a second name of a node as `= first name`.
fn listing(image: &Path) -> Vec<String> {
    use sha2::Digest as _;
    let mut reader = Reader::new(File::open(image).unwrap()).unwrap();
    let tree = reader.tree().unwrap();
    let mut out = vec![format!("/ {:?}", tree.node(Tree::ROOT).meta)];
    let mut first: HashMap<NodeId, String> = HashMap::new();
    let mut dirs = vec![(Tree::ROOT, String::new())];
    while let Some((dir, path)) = dirs.pop() {
        for (name, id) in tree.children(dir) {
            let path = format!("{path}/{}", String::from_utf8_lossy(name));
            if let Some(earlier) = first.get(&id) {
                out.push(format!("{path} = {earlier}"));
                continue;
            }
            first.insert(id, path.clone());
            let node = tree.node(id);
            let kind = match &node.kind {
                Kind::File(data) => {
                    let mut bytes = Vec::new();
                    reader.data(*data).unwrap().read_to_end(&mut bytes).unwrap();
                    format!("file {:x}", sha2::Sha256::digest(&bytes))
                }
                Kind::Dir(_) => {
                    dirs.push((id, path.clone()));
                    "dir".into()
                }
                other => format!("{other:?}"),
            };
            let mut meta = node.meta.clone();
            meta.xattrs.sort();
            out.push(format!("{path} {kind} {meta:?}"));
        }
    }
    out.sort();
    out
}

/// A layer tarball of `(path, contents)` files, `.wh.` names included.
fn tar_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        tar.append_data(&mut h, path, *data).unwrap();
    }
    tar.into_inner().unwrap()
}

#[test]
fn a_directory_image_is_a_store_layer_that_flattens_exports_and_loads() {
    assert!(is_root(), "these tests must run as root");
    let dir = scratch("store");
    let source = dir.join("root");
    fs::create_dir(&source).unwrap();
    populate(&source);
    // Loading the exported image applies it as tar, which refuses relative
    // symlinks that climb above the root (as it always has); booting from
    // the store does not apply tar to the base and keeps them.
    fs::remove_file(source.join("links/outside")).unwrap();
    let built = dir.join("root.erofs");
    build(&source, &built);
    let client = cc_image::Client::open(dir.join("store")).unwrap();

    // The base is the image itself, hard-linked into the store.
    let base = client.erofs_image(&built).unwrap();
    let base_root = base.rootfs().unwrap();
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&base_root), ino(&built), "the booted image, not a copy");
    // Neither the directory nor the built file is needed any more.
    let want_base = listing(&built);
    fs::remove_dir_all(&source).unwrap();
    fs::remove_file(&built).unwrap();
    assert_eq!(listing(&base_root), want_base);

    // A snapshot layer on top: a new file, a changed one, a deletion.
    let layer = tar_layer(&[
        ("etc/passwd", b"changed\n"),
        ("etc/added", b"new\n"),
        ("sub/.wh.hard-b", b""),
    ]);
    let (layer, _) = client.put_layer(&layer[..]).unwrap();
    let snap = client
        .derive_image(Some(&base), &[layer], Some("localhost/cc-snapshots:test-0"))
        .unwrap();
    assert_eq!(snap.rootfs_prefix(1).unwrap(), base_root);
    let flat = snap.rootfs().unwrap();
    fsck(&flat);
    let flat_listing = listing(&flat);
    let has = |prefix: &str| flat_listing.iter().any(|l| l.starts_with(prefix));
    assert!(has("/etc/added file"));
    assert!(!has("/sub/hard-b"), "whiteout applied");
    assert!(
        has("/sub/deeper/hard-c = /hard-a"),
        "other names stay linked"
    );
    let unchanged = |l: &&String| !l.starts_with("/etc") && !l.starts_with("/sub ");
    let kept: Vec<&String> = want_base
        .iter()
        .filter(unchanged)
        .filter(|l| !l.starts_with("/sub/hard-b"))
        .collect();
    assert_eq!(
        kept,
        flat_listing.iter().filter(unchanged).collect::<Vec<_>>()
    );

    // Exported, the erofs layer becomes tar; loaded elsewhere, the image
    // is the same tree but for the socket, which a tar cannot hold.
    let out = dir.join("exported");
    client.export_dir(&snap, &out).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    assert_ne!(manifest_digest, snap.digest().to_string());
    let blob = |d: &str| fs::read(out.join("blobs/sha256").join(&d[7..])).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&blob(manifest_digest)).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        assert_eq!(layer["mediaType"], "application/vnd.oci.image.layer.v1.tar");
    }
    let other = cc_image::Client::open(dir.join("other")).unwrap();
    let loaded = other.load_dir(&out, None).unwrap();
    assert_eq!(loaded.name(), Some("localhost/cc-snapshots:test-0"));
    let no_socket: Vec<String> = flat_listing
        .iter()
        .filter(|l| !l.starts_with("/dev/socket"))
        .cloned()
        .collect();
    assert_eq!(listing(&loaded.rootfs().unwrap()), no_socket);

    // Layouts holding erofs layers come only from this store.
    let raw = dir.join("raw-layout");
    fs::create_dir_all(raw.join("blobs/sha256")).unwrap();
    let store = client.store();
    let config = manifest_config(store, snap.digest());
    for digest in [snap.digest().clone(), config]
        .into_iter()
        .chain(snap.layers().unwrap())
    {
        fs::copy(
            store.blob_path(&digest),
            raw.join("blobs/sha256").join(digest.hex()),
        )
        .unwrap();
    }
    let size = fs::metadata(store.blob_path(snap.digest())).unwrap().len();
    let raw_index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": snap.digest().to_string(), "size": size}]});
    fs::write(raw.join("index.json"), raw_index.to_string()).unwrap();
    let refused = cc_image::Client::open(dir.join("third")).unwrap();
    let err = refused.load_dir(&raw, None).unwrap_err();
    assert!(matches!(err, cc_image::Error::Unsupported(_)), "{err}");

    // Named, the base layer survives a prune; unnamed, it goes.
    let base_blob = store.blob_path(&base.layers().unwrap()[0]);
    client.prune().unwrap();
    assert!(base_blob.is_file());
    client.remove("localhost/cc-snapshots:test-0").unwrap();
    client.prune().unwrap();
    assert!(!base_blob.exists());
    fs::remove_dir_all(&dir).unwrap();
}

fn manifest_config(store: &cc_image::Store, manifest: &cc_image::Digest) -> cc_image::Digest {
    let doc: serde_json::Value =
        serde_json::from_slice(&store.read_document(manifest).unwrap()).unwrap();
    doc["config"]["digest"].as_str().unwrap().parse().unwrap()
}
