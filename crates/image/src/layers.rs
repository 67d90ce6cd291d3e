//! Applying layer tarballs to a filesystem tree, OCI semantics: later
//! layers override earlier ones, `.wh.NAME` deletes `NAME`, a directory
//! holding `.wh..wh..opq` hides everything lower layers put in it.
//!
//! Nothing here touches the host filesystem: entries become nodes of a
//! [`Tree`] and file contents are copied into the image being built. Paths
//! are resolved inside the tree only; an entry that would reach outside the
//! root, pass through a symlink, or hard-link to something that does not
//! exist is refused, since no well-formed image contains one.

use std::collections::HashSet;
use std::io::{self, Read, Seek, Write};

use cc_erofs::{Builder, DataRef, Kind, Metadata, Node, NodeId, Tree};
use tar::EntryType;

/// Why a layer was refused.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer entry {path:?}: {why}")]
    Entry { path: String, why: String },
    #[error("reading layer")]
    Io(#[from] io::Error),
}

fn bad(path: &[u8], why: impl Into<String>) -> LayerError {
    LayerError::Entry {
        path: String::from_utf8_lossy(path).into_owned(),
        why: why.into(),
    }
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE: &[u8] = b"trusted.overlay.opaque";

/// Bytes read through it, failing once `limit` is passed: a bound on what
/// a compressed layer may expand to.
#[derive(Debug)]
pub(crate) struct Limited<R> {
    inner: R,
    pub(crate) read: u64,
    pub(crate) limit: u64,
}

impl<R: Read> Limited<R> {
    pub(crate) fn new(inner: R, limit: u64) -> Self {
        Limited {
            inner,
            read: 0,
            limit,
        }
    }
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("limit {}", self.limit),
            ));
        }
        Ok(n)
    }
}

/// Splits a tar path into components, dropping `.` and empty ones.
/// `..` and absolute paths are refused.
fn components(path: &[u8]) -> Result<Vec<&[u8]>, LayerError> {
    if path.first() == Some(&b'/') {
        return Err(bad(path, "absolute path"));
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(bad(path, "path leaves the root")),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// What to do with a layer's whiteouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Delete what they name from the tree (flattening layers into one).
    Apply,
    /// Keep them in overlayfs's own form, for an image mounted as an
    /// overlay layer above others: a `.wh.NAME` becomes a 0:0 character
    /// device `NAME`, an opaque marker the `trusted.overlay.opaque` xattr.
    Overlay,
}

/// Applies one uncompressed layer tarball from `input` to `tree`, copying
/// file contents into `image`.
pub fn apply_layer<W: Write + Seek>(
    tree: &mut Tree,
    image: &mut Builder<W>,
    input: impl Read,
) -> Result<(), LayerError> {
    apply_layer_with(tree, image, input, Whiteouts::Apply)
}

/// [`apply_layer`] with a choice of what whiteouts become.
pub fn apply_layer_with<W: Write + Seek>(
    tree: &mut Tree,
    image: &mut Builder<W>,
    input: impl Read,
    whiteouts: Whiteouts,
) -> Result<(), LayerError> {
    let mut archive = tar::Archive::new(input);
    // Nodes this layer created: an opaque marker hides only lower layers.
    let mut ours: HashSet<NodeId> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path_bytes().into_owned();
        let parts = components(&path)?;
        let Some((&name, parents)) = parts.split_last() else {
            // The root itself: take its metadata.
            if entry.header().entry_type() == EntryType::Directory {
                tree.node_mut(Tree::ROOT).meta = metadata(&mut entry, &path)?;
            }
            continue;
        };
        let dir = ensure_dirs(tree, parents, &path, &mut ours)?;

        if name == OPAQUE && whiteouts == Whiteouts::Overlay {
            let xattrs = &mut tree.node_mut(dir).meta.xattrs;
            xattrs.retain(|(k, _)| k != OVERLAY_OPAQUE);
            xattrs.push((OVERLAY_OPAQUE.to_vec(), b"y".to_vec()));
            continue;
        }
        if name == OPAQUE {
            let keep: Vec<(Vec<u8>, NodeId)> = tree
                .children(dir)
                .filter(|(_, id)| ours.contains(id))
                .map(|(n, id)| (n.to_vec(), id))
                .collect();
            tree.clear(dir).map_err(|e| bad(&path, e.to_string()))?;
            for (n, id) in keep {
                tree.link(dir, &n, id)
                    .map_err(|e| bad(&path, e.to_string()))?;
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            cc_erofs::check_name(hidden).map_err(|e| bad(&path, e.to_string()))?;
            if whiteouts == Whiteouts::Overlay {
                let node = Node {
                    kind: Kind::CharDev { major: 0, minor: 0 },
                    meta: Metadata::default(),
                };
                let id = tree.add(node);
                ours.insert(id);
                tree.link(dir, hidden, id)
                    .map_err(|e| bad(&path, e.to_string()))?;
            } else {
                tree.unlink(dir, hidden)
                    .map_err(|e| bad(&path, e.to_string()))?;
            }
            continue;
        }
        cc_erofs::check_name(name).map_err(|e| bad(&path, e.to_string()))?;

        let kind = entry.header().entry_type();
        if kind == EntryType::Link {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| bad(&path, "hard link without target"))?
                .into_owned();
            let target_id =
                resolve(tree, &target).ok_or_else(|| bad(&path, "hard link to a missing entry"))?;
            if matches!(tree.node(target_id).kind, Kind::Dir(_)) {
                return Err(bad(&path, "hard link to a directory"));
            }
            tree.link(dir, name, target_id)
                .map_err(|e| bad(&path, e.to_string()))?;
            continue;
        }
        let meta = metadata(&mut entry, &path)?;
        let node_kind = match kind {
            EntryType::Directory => {
                if let Some(existing) = tree.lookup(dir, name) {
                    if matches!(tree.node(existing).kind, Kind::Dir(_)) {
                        // A directory again: new metadata, children stay.
                        tree.node_mut(existing).meta = meta;
                        ours.insert(existing);
                        continue;
                    }
                }
                Kind::Dir(Default::default())
            }
            EntryType::Regular | EntryType::Continuous => {
                let len = entry.size();
                let data: DataRef = image.add_data(&mut entry, len)?;
                Kind::File(data)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(&path, "symlink without target"))?
                    .into_owned();
                check_symlink(parents, &target, &path)?;
                Kind::Symlink(target)
            }
            EntryType::Char | EntryType::Block => {
                let major = entry.header().device_major()?.unwrap_or(0);
                let minor = entry.header().device_minor()?.unwrap_or(0);
                if kind == EntryType::Char {
                    Kind::CharDev { major, minor }
                } else {
                    Kind::BlockDev { major, minor }
                }
            }
            EntryType::Fifo => Kind::Fifo,
            other => return Err(bad(&path, format!("unsupported entry type {other:?}"))),
        };
        let id = tree.add(Node {
            kind: node_kind,
            meta,
        });
        ours.insert(id);
        tree.link(dir, name, id)
            .map_err(|e| bad(&path, e.to_string()))?;
    }
    Ok(())
}

/// The directory `parents` names, creating missing ones. A component that
/// exists but is not a directory (a symlink, say) is refused: following it
/// could lead anywhere.
fn ensure_dirs(
    tree: &mut Tree,
    parents: &[&[u8]],
    path: &[u8],
    ours: &mut HashSet<NodeId>,
) -> Result<NodeId, LayerError> {
    let mut dir = Tree::ROOT;
    for &part in parents {
        cc_erofs::check_name(part).map_err(|e| bad(path, e.to_string()))?;
        dir = match tree.lookup(dir, part) {
            Some(id) => match tree.node(id).kind {
                Kind::Dir(_) => id,
                Kind::Symlink(_) => return Err(bad(path, "path passes through a symlink")),
                _ => return Err(bad(path, "path passes through a non-directory")),
            },
            None => {
                let id = tree.add(Node {
                    kind: Kind::Dir(Default::default()),
                    meta: Metadata {
                        mode: 0o755,
                        ..Default::default()
                    },
                });
                ours.insert(id);
                tree.link(dir, part, id)
                    .map_err(|e| bad(path, e.to_string()))?;
                id
            }
        };
    }
    Ok(dir)
}

/// The node at `path` (a hard link target), walking directories only.
fn resolve(tree: &Tree, path: &[u8]) -> Option<NodeId> {
    let parts = components(path).ok()?;
    let mut id = Tree::ROOT;
    for part in parts {
        if !matches!(tree.node(id).kind, Kind::Dir(_)) {
            return None;
        }
        id = tree.lookup(id, part)?;
    }
    Some(id)
}

/// Relative symlink targets may not climb above the root. Absolute targets
/// are inside the guest's root by definition.
fn check_symlink(parents: &[&[u8]], target: &[u8], path: &[u8]) -> Result<(), LayerError> {
    if target.is_empty() || target.contains(&0) {
        return Err(bad(path, "empty or invalid symlink target"));
    }
    if target.first() == Some(&b'/') {
        return Ok(());
    }
    let mut depth = parents.len() as i64;
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(bad(path, "symlink points outside the root"));
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// Ownership, mode, mtime and xattrs of an entry, with PAX overrides.
fn metadata<R: Read>(entry: &mut tar::Entry<'_, R>, path: &[u8]) -> Result<Metadata, LayerError> {
    let h = entry.header();
    let mut meta = Metadata {
        mode: (h.mode().map_err(|e| bad(path, e.to_string()))? & 0o7777) as u16,
        uid: h.uid().unwrap_or(0) as u32,
        gid: h.gid().unwrap_or(0) as u32,
        mtime: h.mtime().unwrap_or(0) as i64,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            let number = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u32>().ok())
            };
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                meta.xattrs.push((name.to_vec(), value.to_vec()));
            } else if key == b"uid" {
                meta.uid = number().ok_or_else(|| bad(path, "bad pax uid"))?;
            } else if key == b"gid" {
                meta.gid = number().ok_or_else(|| bad(path, "bad pax gid"))?;
            } else if key == b"mtime" {
                (meta.mtime, meta.mtime_nsec) =
                    pax_time(value).ok_or_else(|| bad(path, "bad pax mtime"))?;
            }
        }
    }
    Ok(meta)
}

/// Seconds and nanoseconds of a PAX time: decimal seconds, negative
/// before 1970 (`-1.5` is a second and a half before).
fn pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nsec: u32 = digits.parse().ok()?;
    Some(match (negative, nsec) {
        (false, nsec) => (secs, nsec),
        (true, 0) => (-secs, 0),
        (true, nsec) => (-secs - 1, 1_000_000_000 - nsec),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A tar built entry by entry, including entries `tar::Builder`'s
    /// checked paths would refuse.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Layer(tar::Builder::new(Vec::new()))
        }
        fn header(kind: EntryType, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h
        }
        fn raw(mut self, path: &[u8], mut h: tar::Header, data: &[u8]) -> Self {
            h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn file(self, path: &str, data: &[u8]) -> Self {
            let h = Self::header(EntryType::Regular, data.len() as u64, 0o644);
            self.raw(path.as_bytes(), h, data)
        }
        fn dir(self, path: &str) -> Self {
            self.raw(
                path.as_bytes(),
                Self::header(EntryType::Directory, 0, 0o755),
                b"",
            )
        }
        fn link(self, kind: EntryType, path: &str, target: &str) -> Self {
            let mut h = Self::header(kind, 0, 0o777);
            h.set_link_name_literal(target.as_bytes()).unwrap();
            self.raw(path.as_bytes(), h, b"")
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn apply_all(layers: &[Vec<u8>]) -> Result<Tree, LayerError> {
        let mut tree = Tree::new(Metadata {
            mode: 0o755,
            ..Default::default()
        });
        let mut image = Builder::new(Cursor::new(Vec::new()))?;
        for l in layers {
            apply_layer(&mut tree, &mut image, &l[..])?;
        }
        Ok(tree)
    }

    fn names(tree: &Tree, path: &str) -> Vec<String> {
        let id = resolve(tree, path.as_bytes()).unwrap();
        tree.children(id)
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect()
    }

    #[test]
    fn later_layers_override_and_whiteouts_delete() {
        let l1 = Layer::new()
            .dir("etc")
            .file("etc/a", b"1")
            .file("etc/b", b"2")
            .dir("opt/x")
            .file("opt/x/old", b"")
            .bytes();
        let l2 = Layer::new()
            .file("etc/a", b"11")
            .file("etc/.wh.b", b"")
            .file("opt/x/new", b"")
            .file("opt/x/.wh..wh..opq", b"")
            .bytes();
        let tree = apply_all(&[l1, l2]).unwrap();
        assert_eq!(names(&tree, "etc"), ["a"]);
        assert_eq!(
            names(&tree, "opt/x"),
            ["new"],
            "opaque hides lower entries only"
        );
        let a = resolve(&tree, b"etc/a").unwrap();
        assert!(matches!(
            tree.node(a).kind,
            Kind::File(DataRef { len: 2, .. })
        ));
    }

    #[test]
    fn overlay_mode_keeps_whiteouts_for_overlayfs() {
        let l = Layer::new()
            .dir("d")
            .file("d/.wh.gone", b"")
            .file("d/.wh..wh..opq", b"")
            .file("d/new", b"n")
            .bytes();
        let mut tree = Tree::new(Metadata {
            mode: 0o755,
            ..Default::default()
        });
        let mut image = Builder::new(Cursor::new(Vec::new())).unwrap();
        apply_layer_with(&mut tree, &mut image, &l[..], Whiteouts::Overlay).unwrap();
        assert_eq!(names(&tree, "d"), ["gone", "new"]);
        let gone = tree.node(resolve(&tree, b"d/gone").unwrap());
        assert_eq!(gone.kind, Kind::CharDev { major: 0, minor: 0 });
        let d = tree.node(resolve(&tree, b"d").unwrap());
        assert_eq!(
            d.meta.xattrs,
            vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())]
        );
    }

    #[test]
    fn hard_links_share_a_node_and_must_exist() {
        let l = Layer::new()
            .file("a", b"x")
            .link(EntryType::Link, "b", "a")
            .bytes();
        let tree = apply_all(&[l]).unwrap();
        assert_eq!(resolve(&tree, b"a"), resolve(&tree, b"b"));
        let l = Layer::new().link(EntryType::Link, "b", "missing").bytes();
        assert!(apply_all(&[l]).unwrap_err().to_string().contains("missing"));
        let l = Layer::new()
            .file("a", b"x")
            .link(EntryType::Link, "b", "../a")
            .bytes();
        assert!(apply_all(&[l]).is_err());
    }

    #[test]
    fn hostile_paths_are_refused() {
        for path in ["../evil", "a/../../evil", "/abs"] {
            let l = Layer::new().file(path, b"x").bytes();
            let err = apply_all(&[l]).unwrap_err().to_string();
            assert!(err.contains(path), "{path}: {err}");
        }
        let l = Layer::new()
            .link(EntryType::Symlink, "up", "../../etc")
            .bytes();
        assert!(apply_all(&[l])
            .unwrap_err()
            .to_string()
            .contains("outside the root"));
        // A symlink, then a file through it.
        let l = Layer::new()
            .link(EntryType::Symlink, "lnk", "/etc")
            .file("lnk/passwd", b"x")
            .bytes();
        assert!(apply_all(&[l])
            .unwrap_err()
            .to_string()
            .contains("through a symlink"));
        let l = Layer::new().file(".wh...", b"").bytes();
        assert!(apply_all(&[l]).is_err());
    }

    #[test]
    fn absolute_and_inside_relative_symlinks_are_fine() {
        let l = Layer::new()
            .dir("usr/bin")
            .link(EntryType::Symlink, "bin", "usr/bin")
            .link(EntryType::Symlink, "usr/bin/sh", "../../bin/busybox")
            .link(EntryType::Symlink, "x", "/anything")
            .bytes();
        let tree = apply_all(&[l]).unwrap();
        assert!(
            matches!(&tree.node(resolve(&tree, b"bin").unwrap()).kind, Kind::Symlink(t) if t == b"usr/bin")
        );
    }

    #[test]
    fn a_file_replaces_a_directory_and_back() {
        let l1 = Layer::new().dir("d").file("d/f", b"").bytes();
        let l2 = Layer::new().file("d", b"now a file").bytes();
        let l3 = Layer::new().dir("d").bytes();
        let tree = apply_all(&[l1.clone(), l2.clone()]).unwrap();
        assert!(matches!(
            tree.node(resolve(&tree, b"d").unwrap()).kind,
            Kind::File(_)
        ));
        let tree = apply_all(&[l1, l2, l3]).unwrap();
        assert!(names(&tree, "d").is_empty());
    }

    #[test]
    fn truncated_and_oversized_entries_are_errors() {
        let l = Layer::new().file("big", &[7u8; 5000]).bytes();
        assert!(apply_all(&[l[..3000].to_vec()]).is_err());
        // A header declaring far more data than the stream holds.
        let mut h = Layer::header(EntryType::Regular, 1 << 40, 0o644);
        h.as_gnu_mut().unwrap().name[..1].copy_from_slice(b"f");
        h.set_cksum();
        let mut wire = h.as_bytes().to_vec();
        wire.extend([0u8; 1024]);
        assert!(apply_all(&[wire]).is_err());
    }

    #[test]
    fn truncated_gzip_is_an_error_not_a_short_layer() {
        use std::io::Write as _;
        let tar = Layer::new()
            .file("a", &[1u8; 100_000])
            .file("b", b"x")
            .bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let cut = &gz[..gz.len() / 2];
        let mut tree = Tree::new(Metadata::default());
        let mut image = Builder::new(Cursor::new(Vec::new())).unwrap();
        let result = apply_layer(
            &mut tree,
            &mut image,
            flate2::read::MultiGzDecoder::new(cut),
        );
        assert!(
            result.is_err(),
            "a truncated layer must not apply as a partial one"
        );
    }

    #[test]
    fn limited_reader_stops_bombs() {
        let mut r = Limited::new(io::repeat(0), 1 << 20);
        let err = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
    }

    #[test]
    fn pax_metadata_and_xattrs_apply() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = Layer::header(EntryType::Regular, 1, 0o4755);
        h.set_path("f").unwrap();
        h.set_cksum();
        b.append_pax_extensions([
            ("SCHILY.xattr.user.k", &b"v"[..]),
            ("uid", b"3000000"),
            ("gid", b"42"),
            ("mtime", b"12.5"),
        ])
        .unwrap();
        b.append(&h, &b"x"[..]).unwrap();
        let tree = apply_all(&[b.into_inner().unwrap()]).unwrap();
        let n = tree.node(resolve(&tree, b"f").unwrap());
        assert_eq!(
            (n.meta.uid, n.meta.gid, n.meta.mode),
            (3_000_000, 42, 0o4755)
        );
        assert_eq!((n.meta.mtime, n.meta.mtime_nsec), (12, 500_000_000));
        assert_eq!(n.meta.xattrs, vec![(b"user.k".to_vec(), b"v".to_vec())]);
    }

    #[test]
    fn pax_times_before_1970_count_down() {
        assert_eq!(pax_time(b"12"), Some((12, 0)));
        assert_eq!(pax_time(b"12.000000001"), Some((12, 1)));
        assert_eq!(pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(pax_time(b"-0.25"), Some((-1, 750_000_000)));
        assert_eq!(pax_time(b"-86400"), Some((-86_400, 0)));
        assert_eq!(pax_time(b"1.x"), None);
        assert_eq!(pax_time(b""), None);
    }
}
