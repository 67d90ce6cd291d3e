//! Root images kept as layers. A snapshot of an instance booted from a
//! host directory stands on the erofs image the instance booted from: the
//! store takes that image as a layer of its own media type, so nothing is
//! archived or rebuilt to take the snapshot or to boot from it.
//!
//! Only this store makes such layers ([`crate::Client::erofs_image`]);
//! pulls and loads refuse them, so every one was written by cc-erofs here.
//! One is always an image's bottom layer. Building a root image of more
//! layers reads its tree back and copies its files into the new image
//! (then applies the tar layers above); exporting turns it into a plain
//! tar layer, so what leaves the store is ordinary OCI.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufReader, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use cc_erofs::{Builder, Kind, Metadata, NodeId, Reader, Tree};
use tar::{EntryType, Header};

use crate::{Error, Result};

/// Media type of an erofs root image stored as a layer.
pub(crate) const MEDIA_TYPE: &str = "application/vnd.crumblecracker.image.layer.v1.erofs";

fn open(blob: &Path) -> Result<Reader<File>> {
    let file = File::open(blob).map_err(Error::io("open", blob))?;
    Ok(Reader::new(file)?)
}

/// Checks that `path` is an erofs image this crate can read back.
pub(crate) fn check(path: &Path) -> Result<()> {
    open(path).map(drop)
}

/// The tree of the erofs layer `blob`, its files copied into `image`.
pub(crate) fn copy_into<W: Write + Seek>(blob: &Path, image: &mut Builder<W>) -> Result<Tree> {
    let mut reader = open(blob)?;
    let mut tree = reader.tree()?;
    tree.map_files(|data| image.add_data(&mut reader.data(data)?, data.len))
        .map_err(Error::io("copy into a root image from", blob))?;
    Ok(tree)
}

/// Writes the erofs layer `blob` to `out` as an uncompressed OCI layer
/// tarball: the root first, each directory before its entries, a second
/// name of a file as a hard link, owners, modes, nanosecond and pre-1970
/// mtimes and xattrs kept (the last two in PAX records). Sockets are left
/// out: a tar cannot hold them.
pub(crate) fn write_tar(blob: &Path, out: impl Write) -> Result<()> {
    let mut reader = open(blob)?;
    let tree = reader.tree()?;
    let mut tar = tar::Builder::new(out);
    let root = &tree.node(Tree::ROOT).meta;
    append(
        &mut tar,
        Path::new("./"),
        root,
        EntryType::Directory,
        io::empty(),
    )
    .map_err(fail_on(blob))?;
    let mut first_names: HashMap<NodeId, PathBuf> = HashMap::new();
    let mut dirs = vec![(Tree::ROOT, PathBuf::new())];
    while let Some((dir, dir_path)) = dirs.pop() {
        let mut subdirs = Vec::new();
        for (name, id) in tree.children(dir) {
            let path = dir_path.join(OsStr::from_bytes(name));
            let node = tree.node(id);
            let is_dir = matches!(node.kind, Kind::Dir(_));
            if let Some(first) = first_names.get(&id) {
                let mut h = header(EntryType::Link, &node.meta);
                tar.append_link(&mut h, &path, first)
                    .map_err(fail_on(blob))?;
                continue;
            } else if !is_dir && node.kind != Kind::Socket {
                first_names.insert(id, path.clone());
            }
            let written = match &node.kind {
                Kind::Dir(_) => {
                    subdirs.push((id, path.clone()));
                    append(
                        &mut tar,
                        &path,
                        &node.meta,
                        EntryType::Directory,
                        io::empty(),
                    )
                }
                Kind::File(data) => {
                    let mut h = header(EntryType::Regular, &node.meta);
                    h.set_size(data.len);
                    // The tar builder copies in small reads: buffer them.
                    pax(&mut tar, &node.meta)
                        .and_then(|()| reader.data(*data))
                        .map(|contents| BufReader::with_capacity(1 << 18, contents))
                        .and_then(|contents| tar.append_data(&mut h, &path, contents))
                }
                Kind::Symlink(target) => {
                    let mut h = header(EntryType::Symlink, &node.meta);
                    pax(&mut tar, &node.meta)
                        .and_then(|()| tar.append_link(&mut h, &path, OsStr::from_bytes(target)))
                }
                &Kind::CharDev { major, minor } | &Kind::BlockDev { major, minor } => {
                    let kind = match node.kind {
                        Kind::CharDev { .. } => EntryType::Char,
                        _ => EntryType::Block,
                    };
                    let mut h = header(kind, &node.meta);
                    h.set_device_major(major)
                        .and_then(|()| h.set_device_minor(minor))
                        .and_then(|()| pax(&mut tar, &node.meta))
                        .and_then(|()| tar.append_data(&mut h, &path, io::empty()))
                }
                Kind::Fifo => append(&mut tar, &path, &node.meta, EntryType::Fifo, io::empty()),
                Kind::Socket => Ok(()),
            };
            written.map_err(fail_on(blob))?;
        }
        // A directory's entry is written before it is visited, so every
        // entry follows its parent's.
        dirs.extend(subdirs.into_iter().rev());
    }
    tar.into_inner()
        .and_then(|mut out| out.flush())
        .map_err(fail_on(blob))
}

fn fail_on(blob: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    Error::io("write a tar layer from", blob)
}

/// A header of `kind` with `meta`'s mode, owners and (whole, non-negative)
/// mtime; the rest goes in PAX records.
fn header(kind: EntryType, meta: &Metadata) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mode(u32::from(meta.mode));
    h.set_uid(u64::from(meta.uid));
    h.set_gid(u64::from(meta.gid));
    h.set_mtime(u64::try_from(meta.mtime).unwrap_or(0));
    h
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    meta: &Metadata,
    kind: EntryType,
    data: impl io::Read,
) -> io::Result<()> {
    pax(tar, meta)?;
    tar.append_data(&mut header(kind, meta), path, data)
}

/// The PAX records the next entry needs for what a tar header cannot
/// say: an mtime with nanoseconds or before 1970, and xattrs.
fn pax<W: Write>(tar: &mut tar::Builder<W>, meta: &Metadata) -> io::Result<()> {
    let mut records = Vec::new();
    if meta.mtime < 0 || meta.mtime_nsec != 0 {
        record(
            &mut records,
            b"mtime",
            pax_time(meta.mtime, meta.mtime_nsec).as_bytes(),
        );
    }
    for (name, value) in &meta.xattrs {
        record(&mut records, &[b"SCHILY.xattr.", &name[..]].concat(), value);
    }
    if records.is_empty() {
        return Ok(());
    }
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::XHeader);
    h.set_size(records.len() as u64);
    h.set_cksum();
    tar.append(&h, &records[..])
}

/// Appends `<length> <key>=<value>\n`, the length counting itself.
fn record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// `secs` + `nsec` nanoseconds as PAX writes times: decimal seconds, a
/// minus sign for times before 1970 (-1.5 is a second and a half before).
fn pax_time(secs: i64, nsec: u32) -> String {
    let total = i128::from(secs) * 1_000_000_000 + i128::from(nsec);
    let sign = if total < 0 { "-" } else { "" };
    let abs = total.unsigned_abs();
    format!("{sign}{}.{:09}", abs / 1_000_000_000, abs % 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_their_own_length() {
        for value_len in [0, 1, 5, 6, 7, 85, 86, 87, 990, 995, 996, 1000] {
            let mut out = Vec::new();
            record(&mut out, b"k", &vec![b'v'; value_len]);
            let text = String::from_utf8(out.clone()).unwrap();
            let (len, _) = text.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), out.len(), "{value_len}");
        }
    }

    #[test]
    fn pax_times_are_signed_decimals() {
        assert_eq!(pax_time(12, 500_000_000), "12.500000000");
        assert_eq!(pax_time(-2, 500_000_000), "-1.500000000");
        assert_eq!(pax_time(-1, 500_000_000), "-0.500000000");
        assert_eq!(pax_time(-86_400, 0), "-86400.000000000");
    }
}
