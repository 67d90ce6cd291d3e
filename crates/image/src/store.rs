//! The content-addressed store: blobs by digest, names to manifest
//! digests, and built root filesystem images.
//!
//! Layout under the root:
//! `blobs/sha256/<hex>` (verified content), `refs/<hash of name>.json`,
//! `rootfs/<key>.erofs`, `tmp/<pid>-<n>` (in-flight writes). Everything is
//! published by rename, so a reader sees a whole file or none, and two
//! processes writing the same content race harmlessly.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::digest::Sha256;
use serde::{Deserialize, Serialize};

use crate::{Digest, Error, Result};

/// Largest manifest, index or config accepted: they are JSON documents of
/// a few KiB; anything near this is hostile.
pub(crate) const MAX_DOCUMENT: u64 = 8 << 20;

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A name recorded for a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefRecord {
    pub name: String,
    pub digest: String,
}

impl Store {
    /// Opens (creating) the store at `root` and removes in-flight files
    /// left by processes that died mid-write.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let store = Store { root: root.into() };
        for dir in ["blobs/sha256", "refs", "rootfs", "tmp"] {
            let path = store.root.join(dir);
            crate::private::create_dir_all(&path).map_err(Error::io("create", &path))?;
        }
        store.sweep_temp();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sweep_temp(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            if pid.is_some_and(|pid| !process_alive(pid)) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// A fresh in-flight file path, removed by [`Temp`]'s drop unless published.
    pub(crate) fn temp(&self) -> Result<Temp> {
        let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()));
        let file = crate::private::create_file(&path).map_err(Error::io("create", &path))?;
        Ok(Temp {
            path,
            file: Some(file),
        })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Starts writing a blob; see [`BlobWriter`].
    pub(crate) fn blob_writer(&self, expected: Option<&Digest>) -> Result<BlobWriter> {
        Ok(BlobWriter {
            store: self.clone(),
            expected: expected.cloned(),
            temp: self.temp()?,
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// Streams `reader` into the store. With `expected`, the content must
    /// hash to it; without, the content's digest names it. `on_bytes` sees
    /// every chunk's length; it returning `false` cancels the `load`.
    pub(crate) fn write_blob(
        &self,
        expected: Option<&Digest>,
        mut reader: impl Read,
        mut on_bytes: impl FnMut(u64) -> bool,
    ) -> Result<(Digest, u64)> {
        let mut w = self.blob_writer(expected)?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::io(
                        "read blob",
                        expected.map(|d| d.to_string()).unwrap_or_default(),
                    )(e))
                }
            };
            w.write(&buf[..n])?;
            if !on_bytes(n as u64) {
                return Err(Error::Cancelled("load"));
            }
        }
        w.finish()
    }

    /// Stores the file at `path` as a blob, hard-linked into place where
    /// the filesystem allows and copied elsewhere. Only for files nothing
    /// writes again (a blob must keep matching its digest), such as root
    /// images, which are only ever replaced by rename.
    pub(crate) fn link_blob(&self, path: &Path) -> Result<(Digest, u64)> {
        let mut file = File::open(path).map_err(Error::io("open", path))?;
        let opened = file.metadata().map_err(Error::io("stat", path))?;
        let mut hashed = HashingWrite::new(io::sink());
        io::copy(&mut file, &mut hashed).map_err(Error::io("read", path))?;
        let (digest, len) = hashed.finish();
        let blob = self.blob_path(&digest);
        match fs::hard_link(path, &blob) {
            Ok(()) => {
                // The file hashed, not one renamed over `path` since.
                let linked = fs::metadata(&blob).map_err(Error::io("stat", &blob))?;
                if (linked.dev(), linked.ino()) == (opened.dev(), opened.ino()) {
                    return Ok((digest, len));
                }
                fs::remove_file(&blob).map_err(Error::io("remove", &blob))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok((digest, len)),
            // Another filesystem, or links not allowed: copy.
            Err(_) => {}
        }
        file.seek(io::SeekFrom::Start(0))
            .map_err(Error::io("read", path))?;
        self.write_blob(Some(&digest), file, |_| true)
    }

    /// Stores a small document (manifest, config) already in memory.
    pub(crate) fn put_document(&self, bytes: &[u8]) -> Result<Digest> {
        Ok(self.write_blob(None, bytes, |_| true)?.0)
    }

    /// Reads a stored manifest, index or config, re-verifying its digest.
    pub fn read_document(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::MissingBlob(digest.to_string()),
            _ => Error::io("open", &path)(e),
        })?;
        let mut bytes = Vec::new();
        file.take(MAX_DOCUMENT + 1)
            .read_to_end(&mut bytes)
            .map_err(Error::io("read", &path))?;
        if bytes.len() as u64 > MAX_DOCUMENT {
            return Err(Error::BadDocument(format!(
                "{digest} is larger than {MAX_DOCUMENT} bytes"
            )));
        }
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(Error::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(bytes)
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", &Digest::of(name.as_bytes()).hex()[..32]))
    }

    /// Records `name` → `digest`, replacing what the name pointed to.
    pub fn set_ref(&self, name: &str, digest: &Digest) -> Result<()> {
        let record = RefRecord {
            name: name.to_string(),
            digest: digest.to_string(),
        };
        let mut temp = self.temp()?;
        temp.write_all(
            &serde_json::to_vec(&record).map_err(|e| Error::BadDocument(e.to_string()))?,
        )?;
        temp.publish(&self.ref_path(name))
    }

    pub fn get_ref(&self, name: &str) -> Option<Digest> {
        let bytes = fs::read(self.ref_path(name)).ok()?;
        let record: RefRecord = serde_json::from_slice(&bytes).ok()?;
        (record.name == name)
            .then(|| record.digest.parse().ok())
            .flatten()
    }

    /// Removes a name; `false` if it was not there.
    pub fn remove_ref(&self, name: &str) -> Result<bool> {
        let path = self.ref_path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove", &path)(e)),
        }
    }

    /// Every recorded name, sorted.
    pub fn refs(&self) -> Result<Vec<RefRecord>> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir)
            .map_err(Error::io("read", &dir))?
            .flatten()
        {
            if let Ok(record) = fs::read(entry.path())
                .map_err(|_| ())
                .and_then(|b| serde_json::from_slice::<RefRecord>(&b).map_err(|_| ()))
            {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Holds the store's lock until dropped: shared by writers (pulls,
    /// loads), exclusive for pruning, so a prune never deletes what a
    /// write in flight (in any process) has stored but not yet named.
    pub(crate) fn lock(&self, exclusive: bool) -> Result<StoreLock> {
        let path = self.root.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(crate::private::FILE_MODE)
            .open(&path)
            .map_err(Error::io("open", &path))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock on a file descriptor we own; no pointers.
            if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), op) } == 0 {
                return Ok(StoreLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error::io("lock", &path)(e));
            }
        }
    }

    pub(crate) fn rootfs_path(&self, key: &str) -> PathBuf {
        self.root.join("rootfs").join(format!("{key}.erofs"))
    }
}

/// The store lock; released when dropped (the descriptor closes).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// A blob being written: hashed as it goes, published under its digest by
/// [`BlobWriter::finish`] only if it matches; dropped unfinished, it leaves
/// nothing behind.
#[derive(Debug)]
pub(crate) struct BlobWriter {
    store: Store,
    expected: Option<Digest>,
    temp: Temp,
    hasher: Sha256,
    len: u64,
}

impl BlobWriter {
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        let path = self.temp.path.clone();
        self.temp.write_all(bytes).map_err(Error::io("write", path))
    }

    pub(crate) fn finish(self) -> Result<(Digest, u64)> {
        let digest = self.hasher.finalize();
        if let Some(expected) = &self.expected {
            if *expected != digest {
                return Err(Error::DigestMismatch {
                    expected: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        self.temp.publish(&self.store.blob_path(&digest))?;
        Ok((digest, self.len))
    }
}

/// An in-flight file in the store's `tmp/`.
#[derive(Debug)]
pub(crate) struct Temp {
    pub(crate) path: PathBuf,
    file: Option<File>,
}

impl Temp {
    pub(crate) fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("temp file open until published")
    }

    /// Renames into place (atomically replacing any existing file).
    pub(crate) fn publish(mut self, to: &Path) -> Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_data().map_err(Error::io("sync", &self.path))?;
        }
        fs::rename(&self.path, to).map_err(Error::io("rename", to))?;
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Write for Temp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Hashes and counts what passes through it into `out`.
pub(crate) struct HashingWrite<W> {
    out: W,
    hasher: Sha256,
    len: u64,
}

impl<W> HashingWrite<W> {
    pub(crate) fn new(out: W) -> Self {
        HashingWrite {
            out,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The digest and length of everything written.
    pub(crate) fn finish(self) -> (Digest, u64) {
        (self.hasher.finalize(), self.len)
    }
}

impl<W: Write> Write for HashingWrite<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn process_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str) -> Store {
        let root = std::env::temp_dir().join(format!("cc-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        Store::open(root).unwrap()
    }

    #[test]
    fn blobs_are_verified_and_nothing_half_written_stays() {
        let s = store("verify");
        let (d, n) = s.write_blob(None, &b"hello"[..], |_| true).unwrap();
        assert_eq!(n, 5);
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.read_document(&d).unwrap(), b"hello");
        let wrong = Digest::of(b"other");
        let err = s
            .write_blob(Some(&wrong), &b"hello!"[..], |_| true)
            .unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }));
        assert!(!s.has_blob(&wrong));
        let err = s.write_blob(None, &b"abc"[..], |_| false).unwrap_err();
        assert!(matches!(err, Error::Cancelled("load")));
        assert_eq!(
            fs::read_dir(s.root().join("tmp")).unwrap().count(),
            0,
            "temp files left"
        );
        fs::remove_dir_all(s.root()).unwrap();
    }

    #[test]
    fn linked_blobs_share_the_file_and_match_their_digest() {
        let s = store("link");
        let file = s.root().join("root.erofs");
        fs::write(&file, b"an image").unwrap();
        let (d, n) = s.link_blob(&file).unwrap();
        assert_eq!((d.clone(), n), (Digest::of(b"an image"), 8));
        let (a, b) = (
            fs::metadata(&file).unwrap(),
            fs::metadata(s.blob_path(&d)).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "hard-linked, not copied");
        assert_eq!(s.link_blob(&file).unwrap(), (d, 8), "again: already there");
        assert!(s.link_blob(&s.root().join("missing")).is_err());
        fs::remove_dir_all(s.root()).unwrap();
    }

    #[test]
    fn refs_round_trip_and_list() {
        let s = store("refs");
        let d = s.put_document(b"{}").unwrap();
        s.set_ref("example.org/a:1", &d).unwrap();
        s.set_ref("example.org/b:2", &d).unwrap();
        assert_eq!(s.get_ref("example.org/a:1"), Some(d.clone()));
        assert_eq!(s.refs().unwrap().len(), 2);
        assert!(s.remove_ref("example.org/a:1").unwrap());
        assert!(!s.remove_ref("example.org/a:1").unwrap());
        assert_eq!(s.get_ref("example.org/a:1"), None);
        fs::remove_dir_all(s.root()).unwrap();
    }

    #[test]
    fn tampered_documents_are_refused() {
        let s = store("tamper");
        let d = s.put_document(b"{\"a\":1}").unwrap();
        fs::write(s.blob_path(&d), b"{\"a\":2}").unwrap();
        assert!(matches!(
            s.read_document(&d),
            Err(Error::DigestMismatch { .. })
        ));
        fs::remove_dir_all(s.root()).unwrap();
    }
}
