//! `Fs` requests: operations on guest paths, and on the files the host
//! opened as numbered handles.
//!
//! Every failure names the operation and path and carries the errno
//! ([`error::fs`]). Modes are applied exactly: requests run with umask 0
//! (the guest agent's, or in host mode their thread's own), so creating a
//! file or directory gives it the requested permissions.

use std::collections::hash_map::{Entry, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::{self, DirBuilder, File, Permissions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use cc_protocol::{
    open_flags, DirEntry, ErrorKind, FileStat, FsRequest, RemoteError, Response, UnixTime,
};
use rustix::fs::{AtFlags, OFlags};
use serde_bytes::ByteBuf;

use crate::{error, sys};

/// Permission bits a request may set (with set-id and sticky bits).
const PERMISSION_BITS: u32 = 0o7777;

/// Runs one request against the connection's open files `handles`.
pub fn handle(handles: &Handles, request: FsRequest) -> Result<Response, RemoteError> {
    use FsRequest as R;
    let done = |()| Response::Done;
    match request {
        R::Stat { path, follow } => stat(&path, follow).map(Response::Stat),
        R::ReadDir { path } => read_dir(&path).map(Response::Entries),
        R::Mkdir { path, mode, all } => mkdir(&path, mode, all).map(done),
        R::Remove { path, all: false } => remove(&path).map(done),
        R::Remove { path, all: true } => remove_all(&path).map(done),
        R::Rename { from, to } => rename(&from, &to).map(done),
        R::Symlink { target, link } => symlink(&target, &link).map(done),
        R::Readlink { path } => readlink(&path).map(|t| Response::Link(ByteBuf::from(t))),
        R::Chmod { path, mode } => chmod(&path, mode).map(done),
        R::Chown { path, uid, gid } => chown(&path, uid, gid).map(done),
        R::Chtimes { path, atime, mtime } => chtimes(&path, atime, mtime).map(done),
        R::Open {
            handle,
            path,
            flags,
            mode,
        } => handles.open(handle, &path, flags, mode).map(Response::Stat),
        R::Close { handle } => handles.close(handle).map(done),
        R::Seek {
            handle,
            offset,
            whence,
        } => handles
            .get(handle)?
            .seek(offset, whence)
            .map(Response::Offset),
        R::Fstat { handle } => handles.get(handle)?.stat().map(Response::Stat),
        R::Truncate { handle, len } => handles.get(handle)?.truncate(len).map(done),
        R::Sync { handle } => handles.get(handle)?.sync().map(done),
    }
}

/// `raw` as a path: it must be absolute and free of NUL bytes.
pub fn guest_path<'a>(op: &str, raw: &'a [u8]) -> Result<&'a Path, RemoteError> {
    if !raw.starts_with(b"/") {
        return Err(error::fs_invalid(op, raw, "not an absolute path"));
    }
    if raw.contains(&0) {
        return Err(error::fs_invalid(op, raw, "contains a NUL byte"));
    }
    Ok(Path::new(OsStr::from_bytes(raw)))
}

fn c_path(op: &str, raw: &[u8]) -> Result<CString, RemoteError> {
    guest_path(op, raw)?;
    sys::cstring(raw).map_err(|e| error::fs(op, raw, &e))
}

pub fn file_stat(m: &fs::Metadata) -> FileStat {
    FileStat {
        mode: m.mode(),
        size: m.size(),
        mtime: UnixTime {
            secs: m.mtime(),
            nanos: m.mtime_nsec() as u32,
        },
        uid: m.uid(),
        gid: m.gid(),
    }
}

fn stat(raw: &[u8], follow: bool) -> Result<FileStat, RemoteError> {
    let op = if follow { "stat" } else { "lstat" };
    let path = guest_path(op, raw)?;
    let meta = if follow {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    };
    meta.map(|m| file_stat(&m))
        .map_err(|e| error::fs(op, raw, &e))
}

fn read_dir(raw: &[u8]) -> Result<Vec<DirEntry>, RemoteError> {
    let fail = |e: &io::Error| error::fs("readdir", raw, e);
    let mut entries = Vec::new();
    for entry in fs::read_dir(guest_path("readdir", raw)?).map_err(|e| fail(&e))? {
        let entry = entry.map_err(|e| fail(&e))?;
        // The entry itself, not what a symlink points at (fstatat with
        // AT_SYMLINK_NOFOLLOW on the directory).
        match entry.metadata() {
            Ok(m) => entries.push(DirEntry {
                name: ByteBuf::from(entry.file_name().into_vec()),
                mode: m.mode(),
            }),
            // Removed since the directory was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                let path = entry.path().into_os_string().into_vec();
                return Err(error::fs("lstat", &path, &e));
            }
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

fn mkdir(raw: &[u8], mode: u32, all: bool) -> Result<(), RemoteError> {
    let path = guest_path("mkdir", raw)?;
    let fail = |e: &io::Error| error::fs("mkdir", raw, e);
    let mode = mode & PERMISSION_BITS;
    let created = match all {
        true => make_all(path, mode),
        false => DirBuilder::new().mode(mode).create(path).map(|()| true),
    };
    // mkdir(2) ignores the set-id bits.
    if created.map_err(|e| fail(&e))? && mode & 0o6000 != 0 {
        fs::set_permissions(path, Permissions::from_mode(mode)).map_err(|e| fail(&e))?;
    }
    Ok(())
}

/// `mkdir -p` with `mode` for every directory made, like Go's `MkdirAll`:
/// an existing directory (or symlink to one) is fine, anything else in the
/// way is ENOTDIR. Returns whether `path` itself was created.
fn make_all(path: &Path, mode: u32) -> io::Result<bool> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => return Ok(false),
        Ok(_) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        Err(_) => {}
    }
    if let Some(parent) = path.parent() {
        make_all(parent, mode)?;
    }
    match DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(true),
        // Made meanwhile by someone else.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes a file, symlink or empty directory, as Go's `os.Remove`.
fn remove(raw: &[u8]) -> Result<(), RemoteError> {
    let path = guest_path("remove", raw)?;
    let Err(unlink) = fs::remove_file(path) else {
        return Ok(());
    };
    let Err(rmdir) = fs::remove_dir(path) else {
        return Ok(());
    };
    // Whether unlink(2) of a directory fails with EISDIR or EPERM varies,
    // but rmdir(2) of a non-directory is always ENOTDIR: that tells which
    // error is the real one.
    let real = match rmdir.raw_os_error() {
        Some(libc::ENOTDIR) => unlink,
        _ => rmdir,
    };
    Err(error::fs("remove", raw, &real))
}

/// Splits `raw` (absolute, no trailing slashes) into its parent directory
/// and final name; `None` for the root.
fn split_parent(raw: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = raw.iter().rposition(|&b| b != b'/')? + 1;
    let trimmed = &raw[..end];
    let slash = trimmed.iter().rposition(|&b| b == b'/')?;
    let parent = match &trimmed[..slash] {
        [] => &b"/"[..],
        parent => parent,
    };
    Some((parent, &trimmed[slash + 1..]))
}

/// Removes `raw` and everything under it; a missing path is no error.
///
/// The tree is walked with descriptors (`openat`/`unlinkat` relative to the
/// directory being emptied, `O_NOFOLLOW`), never by path strings, so a
/// symlink inside it, even one swapped in during the walk, is removed
/// itself and never followed out of the tree.
fn remove_all(raw: &[u8]) -> Result<(), RemoteError> {
    guest_path("remove", raw)?;
    let (parent, name) =
        split_parent(raw).ok_or_else(|| error::fs_invalid("remove", raw, "is the root"))?;
    if name == b"." || name == b".." {
        return Err(error::fs_invalid("remove", raw, "ends in . or .."));
    }
    let fail = |e: &io::Error| error::fs("remove", raw, e);
    let parent = sys::cstring(parent).map_err(|e| fail(&e))?;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let dir = match sys::openat(None, &parent, flags, 0) {
        Ok(dir) => dir,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(fail(&e)),
    };
    remove_at(dir.as_fd(), name, raw)
}

/// Removes `name` in `dir`, recursively; `shown` is its path for errors.
fn remove_at(dir: BorrowedFd<'_>, name: &[u8], shown: &[u8]) -> Result<(), RemoteError> {
    let fail = |e: &io::Error| error::fs("remove", shown, e);
    let cname = sys::cstring(name).map_err(|e| fail(&e))?;
    let errno = |e: &io::Error| e.raw_os_error().unwrap_or(0);
    let unlink_error = match sys::unlinkat(dir, &cname, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(e) if errno(&e) == libc::ENOENT => return Ok(()),
        Err(e) if matches!(errno(&e), libc::EISDIR | libc::EPERM | libc::EACCES) => e,
        Err(e) => return Err(fail(&e)),
    };
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let sub = match sys::openat(Some(dir), &cname, flags, 0) {
        Ok(sub) => sub,
        Err(e) if errno(&e) == libc::ENOENT => return Ok(()),
        // Not a directory (a symlink is not followed): the unlink error is
        // the real one.
        Err(e) if matches!(errno(&e), libc::ENOTDIR | libc::ELOOP) => {
            return Err(fail(&unlink_error))
        }
        Err(e) => return Err(fail(&e)),
    };
    // Entries created while emptying it make rmdir fail: go around again,
    // but not forever.
    let mut passes = 0;
    loop {
        for child in sys::read_dir(sub.as_fd()).map_err(|e| fail(&e))? {
            let mut path = shown.to_vec();
            path.push(b'/');
            path.extend_from_slice(&child);
            remove_at(sub.as_fd(), &child, &path)?;
        }
        passes += 1;
        match sys::unlinkat(dir, &cname, AtFlags::REMOVEDIR) {
            Ok(()) => return Ok(()),
            Err(e) if errno(&e) == libc::ENOENT => return Ok(()),
            Err(e) if errno(&e) == libc::ENOTEMPTY && passes < 3 => {}
            Err(e) => return Err(fail(&e)),
        }
    }
}

/// `a b`, for messages about two paths.
fn pair(a: &[u8], b: &[u8]) -> Vec<u8> {
    [a, b" ", b].concat()
}

fn rename(from: &[u8], to: &[u8]) -> Result<(), RemoteError> {
    let fail = |e: &io::Error| error::fs("rename", &pair(from, to), e);
    let src = guest_path("rename", from)?;
    let dst = guest_path("rename", to)?;
    fs::rename(src, dst).map_err(|e| fail(&e))
}

fn symlink(target: &[u8], link: &[u8]) -> Result<(), RemoteError> {
    let path = guest_path("symlink", link)?;
    // The target is any string, relative or not, but a C string.
    if target.contains(&0) {
        return Err(error::fs_invalid("symlink", target, "contains a NUL byte"));
    }
    std::os::unix::fs::symlink(OsStr::from_bytes(target), path)
        .map_err(|e| error::fs("symlink", &pair(target, link), &e))
}

fn readlink(raw: &[u8]) -> Result<Vec<u8>, RemoteError> {
    fs::read_link(guest_path("readlink", raw)?)
        .map(|t| t.into_os_string().into_vec())
        .map_err(|e| error::fs("readlink", raw, &e))
}

fn chmod(raw: &[u8], mode: u32) -> Result<(), RemoteError> {
    let perms = Permissions::from_mode(mode & PERMISSION_BITS);
    fs::set_permissions(guest_path("chmod", raw)?, perms).map_err(|e| error::fs("chmod", raw, &e))
}

fn chown(raw: &[u8], uid: Option<u32>, gid: Option<u32>) -> Result<(), RemoteError> {
    std::os::unix::fs::lchown(guest_path("chown", raw)?, uid, gid)
        .map_err(|e| error::fs("chown", raw, &e))
}

fn chtimes(raw: &[u8], atime: UnixTime, mtime: UnixTime) -> Result<(), RemoteError> {
    let path = c_path("chtimes", raw)?;
    // Out-of-range nanoseconds would alias utimensat's UTIME_NOW/UTIME_OMIT.
    if atime.nanos >= 1_000_000_000 || mtime.nanos >= 1_000_000_000 {
        return Err(error::fs_invalid(
            "chtimes",
            raw,
            "nanoseconds out of range",
        ));
    }
    sys::utimens(&path, (atime.secs, atime.nanos), (mtime.secs, mtime.nanos))
        .map_err(|e| error::fs("chtimes", raw, &e))
}

/// Translates protocol open flags ([`open_flags`]) to the guest's. Always
/// close-on-exec, so no process inherits a host's file, and never a
/// controlling terminal for the agent.
pub fn translate_open_flags(flags: u32) -> Result<OFlags, String> {
    use open_flags as p;
    let unknown = flags & !p::ALL;
    if unknown != 0 {
        return Err(format!("unknown open flags {unknown:#x}"));
    }
    let mut out = match flags & 3 {
        p::O_RDONLY => OFlags::RDONLY,
        p::O_WRONLY => OFlags::WRONLY,
        p::O_RDWR => OFlags::RDWR,
        _ => return Err("invalid access mode 3".into()),
    };
    for (ours, theirs) in [
        (p::O_APPEND, OFlags::APPEND),
        (p::O_CREATE, OFlags::CREATE),
        (p::O_TRUNC, OFlags::TRUNC),
        (p::O_EXCL, OFlags::EXCL),
    ] {
        if flags & ours != 0 {
            out |= theirs;
        }
    }
    Ok(out | OFlags::CLOEXEC | OFlags::NOCTTY)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The files the host opened on one connection, by the handle it chose.
/// Dropping the table (the connection ended) closes them.
///
/// Requests run on worker threads, so two requests on one handle could in
/// principle race. They do not: the host sends the next request on a
/// handle only after the answer to the previous one, so requests on a
/// handle run in the order sent. Each file's lock, held for a whole
/// operation, only keeps a misbehaving host from interleaving operations
/// on one offset.
#[derive(Debug, Default)]
pub struct Handles {
    slots: Mutex<HashMap<u64, Slot>>,
}

#[derive(Debug)]
enum Slot {
    /// Claimed by an `Open` still running, so a duplicate id is refused
    /// before it could create or truncate anything.
    Opening,
    Open(Arc<OpenFile>),
}

fn unknown_handle(handle: u64) -> RemoteError {
    RemoteError {
        kind: ErrorKind::InvalidArgument,
        message: format!("unknown file handle {handle}"),
        errno: Some(libc::EBADF),
    }
}

impl Handles {
    /// Closes every file.
    pub fn close_all(&self) {
        let closed = std::mem::take(&mut *lock(&self.slots));
        drop(closed);
    }

    fn open(
        &self,
        handle: u64,
        raw: &[u8],
        flags: u32,
        mode: u32,
    ) -> Result<FileStat, RemoteError> {
        let path = c_path("open", raw)?;
        let flags = translate_open_flags(flags).map_err(|e| error::fs_invalid("open", raw, &e))?;
        match lock(&self.slots).entry(handle) {
            Entry::Occupied(_) => {
                let reason = format!("file handle {handle} is already open");
                return Err(error::fs_invalid("open", raw, &reason));
            }
            Entry::Vacant(slot) => slot.insert(Slot::Opening),
        };
        let opened = sys::openat(None, &path, flags, mode & PERMISSION_BITS).and_then(|fd| {
            let file = File::from(fd);
            let meta = file.metadata()?;
            Ok((file, meta))
        });
        let mut slots = lock(&self.slots);
        // The connection may have ended meanwhile, emptying the table: then
        // the file just closes.
        let claimed = matches!(slots.get(&handle), Some(Slot::Opening));
        match opened {
            Ok((file, meta)) => {
                if claimed {
                    let file = OpenFile {
                        path: raw.to_vec(),
                        file: Mutex::new(file),
                    };
                    slots.insert(handle, Slot::Open(Arc::new(file)));
                }
                Ok(file_stat(&meta))
            }
            Err(e) => {
                if claimed {
                    slots.remove(&handle);
                }
                Err(error::fs("open", raw, &e))
            }
        }
    }

    fn get(&self, handle: u64) -> Result<Arc<OpenFile>, RemoteError> {
        match lock(&self.slots).get(&handle) {
            Some(Slot::Open(file)) => Ok(file.clone()),
            _ => Err(unknown_handle(handle)),
        }
    }

    /// A second descriptor of open file `handle`, sharing its offset and
    /// flags, for a transfer to read or write at that offset (`ReadHandle`,
    /// `WriteHandle`), and its path for error messages. Reading a
    /// directory or a write-only handle fails here, before anything is
    /// streamed, with the errno a read would get.
    pub fn stream_file(&self, handle: u64, read: bool) -> Result<(File, Vec<u8>), RemoteError> {
        let open = self.get(handle)?;
        let op = if read { "read" } else { "write" };
        let file = open.with(op, |f| {
            let file = f.try_clone()?;
            if read {
                let access = rustix::fs::fcntl_getfl(&file)? & OFlags::ACCMODE;
                if access == OFlags::WRONLY {
                    return Err(io::Error::from_raw_os_error(libc::EBADF));
                }
                if file.metadata()?.is_dir() {
                    return Err(io::Error::from_raw_os_error(libc::EISDIR));
                }
            }
            Ok(file)
        })?;
        Ok((file, open.path.clone()))
    }

    fn close(&self, handle: u64) -> Result<(), RemoteError> {
        let mut slots = lock(&self.slots);
        match slots.get(&handle) {
            Some(Slot::Open(_)) => {
                let file = slots.remove(&handle);
                // Closing may wait (on a 9p server): not under the lock.
                drop(slots);
                drop(file);
                Ok(())
            }
            _ => Err(unknown_handle(handle)),
        }
    }
}

/// A file the host opened.
#[derive(Debug)]
struct OpenFile {
    /// For error messages.
    path: Vec<u8>,
    file: Mutex<File>,
}

impl OpenFile {
    fn with<T>(
        &self,
        op: &str,
        f: impl FnOnce(&mut File) -> io::Result<T>,
    ) -> Result<T, RemoteError> {
        f(&mut lock(&self.file)).map_err(|e| error::fs(op, &self.path, &e))
    }

    fn seek(&self, offset: i64, whence: u8) -> Result<u64, RemoteError> {
        let to = match whence {
            // lseek(2) refuses a negative offset from the start the same way.
            0 => u64::try_from(offset)
                .map(SeekFrom::Start)
                .map_err(|_| libc::EINVAL),
            1 => Ok(SeekFrom::Current(offset)),
            2 => Ok(SeekFrom::End(offset)),
            _ => {
                let reason = format!("invalid whence {whence}");
                return Err(error::fs_invalid("seek", &self.path, &reason));
            }
        };
        self.with("seek", |file| {
            file.seek(to.map_err(io::Error::from_raw_os_error)?)
        })
    }

    fn stat(&self) -> Result<FileStat, RemoteError> {
        self.with("stat", |file| file.metadata().map(|m| file_stat(&m)))
    }

    fn truncate(&self, len: u64) -> Result<(), RemoteError> {
        self.with("truncate", |file| {
            // ftruncate(2) takes a signed length.
            i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            file.set_len(len)
        })
    }

    fn sync(&self) -> Result<(), RemoteError> {
        self.with("sync", |file| file.sync_all())
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system's temporary directory, removed on
    /// drop; with umask 0 set for the calling thread, as for a request.
    #[derive(Debug)]
    pub struct Scratch(pub std::path::PathBuf);

    impl Scratch {
        pub fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            sys::exact_modes_in_this_thread().unwrap();
            let dir = std::env::temp_dir().join(format!(
                "cc-agent-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir(&dir).unwrap();
            Self(dir)
        }

        /// Absolute path bytes of `rel` inside.
        pub fn path(&self, rel: &str) -> Vec<u8> {
            self.0.join(rel).into_os_string().into_vec()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn run(handles: &Handles, request: FsRequest) -> Result<Response, RemoteError> {
        handle(handles, request)
    }

    fn b(bytes: Vec<u8>) -> ByteBuf {
        ByteBuf::from(bytes)
    }

    #[test]
    fn open_flags_translate_one_by_one() {
        use open_flags as p;
        let base = OFlags::CLOEXEC | OFlags::NOCTTY;
        assert_eq!(translate_open_flags(p::O_RDONLY), Ok(OFlags::RDONLY | base));
        assert_eq!(translate_open_flags(p::O_WRONLY), Ok(OFlags::WRONLY | base));
        assert_eq!(translate_open_flags(p::O_RDWR), Ok(OFlags::RDWR | base));
        assert_eq!(
            translate_open_flags(p::O_WRONLY | p::O_APPEND),
            Ok(OFlags::WRONLY | OFlags::APPEND | base)
        );
        assert_eq!(
            translate_open_flags(p::O_RDWR | p::O_CREATE | p::O_EXCL),
            Ok(OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | base)
        );
        assert_eq!(
            translate_open_flags(p::O_WRONLY | p::O_CREATE | p::O_TRUNC),
            Ok(OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | base)
        );
        assert_eq!(
            translate_open_flags(3),
            Err("invalid access mode 3".to_string())
        );
        assert_eq!(
            translate_open_flags(p::O_RDONLY | 0x4),
            Err("unknown open flags 0x4".to_string())
        );
        assert_eq!(
            translate_open_flags(0x8000_0000 | p::O_CREATE),
            Err("unknown open flags 0x80000000".to_string())
        );
    }

    #[test]
    fn parents_split_off_without_trailing_slashes() {
        let s = split_parent;
        assert_eq!(s(b"/a"), Some((&b"/"[..], &b"a"[..])));
        assert_eq!(s(b"/a/b/c"), Some((&b"/a/b"[..], &b"c"[..])));
        assert_eq!(s(b"/a/b/"), Some((&b"/a"[..], &b"b"[..])));
        assert_eq!(s(b"/"), None);
        assert_eq!(s(b"//"), None);
    }

    #[test]
    fn stat_and_errors_name_op_and_path() {
        let h = Handles::default();
        let e = run(
            &h,
            FsRequest::Stat {
                path: b(b"/no/such".to_vec()),
                follow: true,
            },
        )
        .unwrap_err();
        assert_eq!(e.message, "stat /no/such: No such file or directory");
        assert_eq!((e.kind, e.errno), (ErrorKind::NotFound, Some(libc::ENOENT)));
        let e = run(
            &h,
            FsRequest::Stat {
                path: b(b"relative".to_vec()),
                follow: false,
            },
        )
        .unwrap_err();
        assert_eq!(e.message, "lstat relative: not an absolute path");
        assert_eq!(
            (e.kind, e.errno),
            (ErrorKind::InvalidArgument, Some(libc::EINVAL))
        );
        let e = stat(b"/a\0b", true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }

    #[test]
    fn directories_are_made_with_exact_modes_and_listed_sorted() {
        let s = Scratch::new();
        let h = Handles::default();
        let mk = |rel: &str, mode, all| {
            run(
                &h,
                FsRequest::Mkdir {
                    path: b(s.path(rel)),
                    mode,
                    all,
                },
            )
        };
        mk("d", 0o755, false).unwrap();
        assert_eq!(fs::metadata(s.0.join("d")).unwrap().mode(), 0o40755);
        mk("d/x/y/z", 0o700, true).unwrap();
        assert_eq!(
            fs::metadata(s.0.join("d/x/y/z")).unwrap().mode() & 0o7777,
            0o700
        );
        assert_eq!(
            fs::metadata(s.0.join("d/x")).unwrap().mode() & 0o7777,
            0o700
        );
        // Existing directory: fine with `all`, EEXIST without.
        mk("d/x/y/z", 0o755, true).unwrap();
        let e = mk("d", 0o755, false).unwrap_err();
        assert_eq!(e.errno, Some(libc::EEXIST));
        mk("sticky", 0o1777, false).unwrap();
        assert_eq!(
            fs::metadata(s.0.join("sticky")).unwrap().mode() & 0o7777,
            0o1777
        );
        mk("setgid", 0o2750, false).unwrap();
        assert_eq!(
            fs::metadata(s.0.join("setgid")).unwrap().mode() & 0o7777,
            0o2750
        );
        fs::write(s.0.join("file"), b"x").unwrap();
        let e = mk("file", 0o755, true).unwrap_err();
        assert_eq!(e.errno, Some(libc::ENOTDIR));
        let e = mk("file/sub", 0o755, true).unwrap_err();
        assert_eq!(e.errno, Some(libc::ENOTDIR));
        std::os::unix::fs::symlink("d", s.0.join("link")).unwrap();

        let Response::Entries(entries) = run(
            &h,
            FsRequest::ReadDir {
                path: b(s.path("")),
            },
        )
        .unwrap() else {
            panic!("not entries")
        };
        let names: Vec<_> = entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect();
        assert_eq!(names, ["d", "file", "link", "setgid", "sticky"]);
        assert_eq!(entries[2].mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(entries[0].mode, 0o40755);
        let e = read_dir(&s.path("file")).unwrap_err();
        assert_eq!(e.errno, Some(libc::ENOTDIR));
    }

    #[test]
    fn remove_is_like_go_os_remove() {
        let s = Scratch::new();
        fs::create_dir_all(s.0.join("full/sub")).unwrap();
        fs::create_dir(s.0.join("empty")).unwrap();
        fs::write(s.0.join("file"), b"x").unwrap();
        remove(&s.path("file")).unwrap();
        remove(&s.path("empty")).unwrap();
        let e = remove(&s.path("full")).unwrap_err();
        assert_eq!(e.errno, Some(libc::ENOTEMPTY));
        let e = remove(&s.path("gone")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.starts_with("remove /"), "{}", e.message);
    }

    #[test]
    fn remove_all_never_follows_symlinks_out_of_the_tree() {
        let s = Scratch::new();
        fs::create_dir_all(s.0.join("outside/keep")).unwrap();
        fs::write(s.0.join("outside/keep/f"), b"x").unwrap();
        fs::create_dir_all(s.0.join("tree/a/b/c")).unwrap();
        fs::write(s.0.join("tree/a/b/c/f"), b"x").unwrap();
        fs::write(s.0.join("tree/top"), b"x").unwrap();
        std::os::unix::fs::symlink(s.0.join("outside"), s.0.join("tree/a/link")).unwrap();
        std::os::unix::fs::symlink(s.0.join("outside/keep"), s.0.join("dirlink")).unwrap();
        remove_all(&s.path("tree")).unwrap();
        assert!(!s.0.join("tree").exists());
        assert!(s.0.join("outside/keep/f").exists());
        // A symlink to a directory is removed, not emptied.
        remove_all(&s.path("dirlink")).unwrap();
        assert!(s.0.join("outside/keep/f").exists());
        // Missing paths, and paths under a missing directory, are fine.
        remove_all(&s.path("tree")).unwrap();
        remove_all(&s.path("nope/deeper")).unwrap();
        let e = remove_all(b"/").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        let e = remove_all(&s.path("outside/..")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        remove_all(&s.path("outside/keep/f")).unwrap();
        assert!(!s.0.join("outside/keep/f").exists());
    }

    #[test]
    fn links_modes_owners_and_times() {
        let s = Scratch::new();
        let h = Handles::default();
        fs::write(s.0.join("f"), b"x").unwrap();
        run(
            &h,
            FsRequest::Symlink {
                target: b(b"f".to_vec()),
                link: b(s.path("l")),
            },
        )
        .unwrap();
        assert_eq!(
            run(
                &h,
                FsRequest::Readlink {
                    path: b(s.path("l"))
                }
            )
            .unwrap(),
            Response::Link(b(b"f".to_vec()))
        );
        let e = run(
            &h,
            FsRequest::Readlink {
                path: b(s.path("f")),
            },
        )
        .unwrap_err();
        assert_eq!(e.errno, Some(libc::EINVAL));
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        run(
            &h,
            FsRequest::Chmod {
                path: b(s.path("l")),
                mode: 0o104_711,
            },
        )
        .unwrap();
        assert_eq!(fs::metadata(s.0.join("f")).unwrap().mode() & 0o7777, 0o4711);
        let time = |secs, nanos| UnixTime { secs, nanos };
        run(
            &h,
            FsRequest::Chtimes {
                path: b(s.path("l")),
                atime: time(1_000, 5),
                mtime: time(2_000_000_000, 123_456_789),
            },
        )
        .unwrap();
        let st = stat(&s.path("f"), true).unwrap();
        assert_eq!(st.mtime, time(2_000_000_000, 123_456_789));
        assert_eq!(st.mode, 0o104_711);
        assert_eq!(st.size, 1);
        let e = chtimes(&s.path("f"), time(0, 1_000_000_000), time(0, 0)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        run(
            &h,
            FsRequest::Rename {
                from: b(s.path("f")),
                to: b(s.path("g")),
            },
        )
        .unwrap();
        let e = rename(&s.path("f"), &s.path("h")).unwrap_err();
        assert!(e.message.starts_with("rename /"), "{}", e.message);
        assert!(e.message.contains("/f /"), "{}", e.message);
        if is_root() {
            // lchown changes the link, not its (now dangling) target.
            chown(&s.path("l"), Some(1234), None).unwrap();
            let m = fs::symlink_metadata(s.0.join("l")).unwrap();
            assert_eq!((m.uid(), m.gid()), (1234, 0));
            chown(&s.path("g"), None, Some(99)).unwrap();
            let m = fs::metadata(s.0.join("g")).unwrap();
            assert_eq!((m.uid(), m.gid()), (0, 99));
        }
    }

    #[test]
    fn handles_read_write_seek_and_close() {
        use open_flags as p;
        let s = Scratch::new();
        let h = Handles::default();
        let path = s.path("data");
        let open = |handle, flags, mode| {
            run(
                &h,
                FsRequest::Open {
                    handle,
                    path: b(path.clone()),
                    flags,
                    mode,
                },
            )
        };
        let Response::Stat(st) = open(1, p::O_RDWR | p::O_CREATE | p::O_EXCL, 0o600).unwrap()
        else {
            panic!("not stat")
        };
        assert_eq!(st.mode, 0o100_600);
        let e = open(1, p::O_RDONLY, 0).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        let e = open(2, p::O_RDWR | p::O_CREATE | p::O_EXCL, 0o600).unwrap_err();
        assert_eq!(e.errno, Some(libc::EEXIST));
        // The failed open released its handle id.
        open(2, p::O_RDONLY, 0).unwrap();
        let e = open(3, 3, 0).unwrap_err();
        assert_eq!(
            e.message,
            format!("open {}: invalid access mode 3", s.0.join("data").display())
        );

        // Transfers read and write a second descriptor sharing the offset.
        let (mut file, named) = h.stream_file(1, false).unwrap();
        assert_eq!(named, path);
        file.write_all(b"hello world").unwrap();
        let seek = |whence, offset| {
            run(
                &h,
                FsRequest::Seek {
                    handle: 1,
                    offset,
                    whence,
                },
            )
        };
        assert_eq!(seek(0, 6).unwrap(), Response::Offset(6));
        let read = |handle, len: usize| {
            let (file, _) = h.stream_file(handle, true)?;
            let mut buf = Vec::new();
            file.take(len as u64).read_to_end(&mut buf).unwrap();
            Ok::<_, RemoteError>(buf)
        };
        assert_eq!(read(1, 100).unwrap(), b"world");
        assert_eq!(read(1, 100).unwrap(), b"");
        assert_eq!(seek(2, -5).unwrap(), Response::Offset(6));
        assert_eq!(seek(1, -1).unwrap(), Response::Offset(5));
        assert_eq!(seek(3, 0).unwrap_err().kind, ErrorKind::InvalidArgument);
        assert_eq!(seek(0, -1).unwrap_err().errno, Some(libc::EINVAL));
        // Handle 2 has its own offset.
        assert_eq!(read(2, 5).unwrap(), b"hello");
        run(&h, FsRequest::Truncate { handle: 1, len: 4 }).unwrap();
        run(&h, FsRequest::Sync { handle: 1 }).unwrap();
        let Response::Stat(st) = run(&h, FsRequest::Fstat { handle: 1 }).unwrap() else {
            panic!("not stat")
        };
        assert_eq!(st.size, 4);
        let e = run(
            &h,
            FsRequest::Truncate {
                handle: 1,
                len: u64::MAX,
            },
        )
        .unwrap_err();
        assert_eq!(e.errno, Some(libc::EINVAL));
        // Writing a read-only handle, reading a write-only one.
        let (mut file, _) = h.stream_file(2, false).unwrap();
        assert_eq!(
            file.write_all(b"x").unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
        open(4, p::O_WRONLY | p::O_CREATE, 0o600).unwrap();
        assert_eq!(read(4, 1).unwrap_err().errno, Some(libc::EBADF));
        run(&h, FsRequest::Close { handle: 1 }).unwrap();
        let e = run(&h, FsRequest::Close { handle: 1 }).unwrap_err();
        assert_eq!(e.message, "unknown file handle 1");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        let e = read(1, 1).unwrap_err();
        assert_eq!(e.message, "unknown file handle 1");

        // A directory opens read-only; reading it fails.
        run(
            &h,
            FsRequest::Open {
                handle: 10,
                path: b(s.path("")),
                flags: p::O_RDONLY,
                mode: 0,
            },
        )
        .unwrap();
        assert_eq!(read(10, 10).unwrap_err().errno, Some(libc::EISDIR));
        h.close_all();
        assert_eq!(read(9, 1).unwrap_err().message, "unknown file handle 9");
    }

    #[test]
    fn created_files_get_exactly_the_mode_asked_for() {
        use open_flags as p;
        let s = Scratch::new();
        let h = Handles::default();
        run(
            &h,
            FsRequest::Open {
                handle: 1,
                path: b(s.path("secret")),
                flags: p::O_WRONLY | p::O_CREATE,
                mode: 0o666,
            },
        )
        .unwrap();
        assert_eq!(
            fs::metadata(s.0.join("secret")).unwrap().mode() & 0o7777,
            0o666
        );
        // An existing file keeps its mode.
        run(
            &h,
            FsRequest::Open {
                handle: 2,
                path: b(s.path("secret")),
                flags: p::O_WRONLY | p::O_CREATE | p::O_TRUNC,
                mode: 0o600,
            },
        )
        .unwrap();
        assert_eq!(
            fs::metadata(s.0.join("secret")).unwrap().mode() & 0o7777,
            0o666
        );
    }
}
