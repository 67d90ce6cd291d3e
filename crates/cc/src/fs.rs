//! The guest's filesystem, through the agent: what guest processes see
//! (/proc, tmpfs, mounts included), with no host-side cache to go stale.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cc_protocol::{FsRequest, Request, Response, UnixTime, DATA_CHUNK};
use serde_bytes::ByteBuf;

pub use cc_protocol::open_flags::{
    O_APPEND, O_CREATE, O_EXCL, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY,
};

use crate::conn::Conn;
use cc_cancel::CancelToken;

use crate::cancel;
use crate::error::{Error, GuestOsError, Result};
use crate::instance::{Inner, Instance, REQUEST_TIMEOUT};
use crate::process::ChildOutput;

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// What `stat` tells of a guest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// The last component of the path.
    pub name: String,
    pub size: u64,
    /// Type and permission bits (`st_mode`).
    pub mode: u32,
    pub mtime: SystemTime,
    pub uid: u32,
    pub gid: u32,
    pub is_dir: bool,
    pub is_symlink: bool,
}

impl FileInfo {
    fn new(path: &str, st: cc_protocol::FileStat) -> FileInfo {
        let name = path
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("/");
        FileInfo {
            name: name.to_string(),
            size: st.size,
            mode: st.mode,
            mtime: to_system_time(st.mtime),
            uid: st.uid,
            gid: st.gid,
            is_dir: st.mode & S_IFMT == S_IFDIR,
            is_symlink: st.mode & S_IFMT == S_IFLNK,
        }
    }

    /// The permission bits alone (`0o7777`).
    pub fn permissions(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// One entry of a guest directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub is_dir: bool,
    /// Type and permission bits of the entry itself (symlinks not followed).
    pub mode: u32,
}

/// Where [`File::seek`] counts from.
pub use std::io::SeekFrom as Whence;

fn to_system_time(t: UnixTime) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nanos))
    }
}

fn to_unix(t: SystemTime) -> UnixTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UnixTime {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (secs, nanos) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            UnixTime { secs, nanos }
        }
    }
}

/// A guest path as sent: absolute, without NUL bytes. Relative paths are
/// refused rather than guessed at (the agent has no working directory).
fn guest_path(path: &str) -> Result<ByteBuf> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "guest path {path:?} must be absolute and free of NUL bytes"
        )));
    }
    Ok(ByteBuf::from(path.as_bytes()))
}

/// Maps an agent error for `op` on `path` to an I/O error carrying both.
fn remote(op: &str, path: &str, e: cc_protocol::RemoteError) -> Error {
    // The agent words errors "op path: reason"; keep its reason when it
    // says more than the errno does ("not a regular file").
    let reason = e
        .message
        .rsplit_once(": ")
        .map_or(e.message.as_str(), |(_, r)| r);
    let source = match e.errno {
        Some(errno) => {
            let os = io::Error::from_raw_os_error(errno);
            if os.to_string().starts_with(reason) {
                os
            } else {
                let reason = reason.to_string();
                io::Error::new(os.kind(), GuestOsError { errno, reason })
            }
        }
        None => io::Error::other(reason.to_string()),
    };
    Error::Io {
        op: op.to_string(),
        path: path.to_string(),
        source,
    }
}

impl Inner {
    /// One filesystem request, answered within [`REQUEST_TIMEOUT`].
    fn fs(&self, op: &str, path: &str, req: FsRequest) -> Result<Response> {
        self.check_running()?;
        self.channel
            .request(Request::Fs(req), REQUEST_TIMEOUT)?
            .map_err(|e| remote(op, path, e))
    }

    fn fs_done(&self, op: &str, path: &str, req: FsRequest) -> Result<()> {
        match self.fs(op, path, req)? {
            Response::Done => Ok(()),
            other => Err(unexpected(op, other)),
        }
    }

    fn fs_stat(&self, op: &str, path: &str, req: FsRequest) -> Result<FileInfo> {
        match self.fs(op, path, req)? {
            Response::Stat(st) => Ok(FileInfo::new(path, st)),
            other => Err(unexpected(op, other)),
        }
    }
}

fn unexpected(op: &str, r: Response) -> Error {
    Error::Protocol(format!("unexpected answer to {op}: {r:?}"))
}

/// How much [`collect`] reads at a time, and [`Instance::copy_out`]'s
/// buffer.
const COPY_CHUNK: usize = 256 << 10;

/// Reads everything `read` yields (until it returns 0) into one buffer,
/// in place: reserved up front for the `expected` bytes the guest reported
/// (no copy, no doubling while it fills), grown only if more arrives. `read`
/// enforces any size limit.
pub(crate) fn collect<E>(
    expected: u64,
    mut read: impl FnMut(&mut [u8]) -> std::result::Result<usize, E>,
) -> std::result::Result<Vec<u8>, E> {
    let mut out = Vec::new();
    // The guest's word only: a reservation that fails (a guest claiming
    // more than the address space) just leaves growth to the data.
    let _ = out.try_reserve_exact(usize::try_from(expected).unwrap_or(usize::MAX));
    loop {
        let len = out.len();
        if len == out.capacity() {
            // Full (at the expected size, say): grow only if more comes.
            let mut probe = [0u8; 4096];
            let n = read(&mut probe)?;
            if n == 0 {
                return Ok(out);
            }
            out.reserve(COPY_CHUNK);
            out.extend_from_slice(&probe[..n]);
            continue;
        }
        // Only the part about to be filled is initialized, so capacity not
        // reached yet costs no host memory.
        out.resize(len + (out.capacity() - len).min(COPY_CHUNK), 0);
        let n = read(&mut out[len..]);
        out.truncate(len + *n.as_ref().unwrap_or(&0));
        if n? == 0 {
            out.shrink_to_fit();
            return Ok(out);
        }
    }
}

/// The [`Error::TooLarge`] of `op` on `path`.
pub(crate) fn too_large(op: &str, path: &str, size: Option<u64>, limit: u64) -> Error {
    Error::TooLarge {
        op: op.to_string(),
        path: path.to_string(),
        size,
        limit,
    }
}

/// Sends bytes to the guest on a new stream, for the request `request`
/// makes of its id (`WriteFile`, `WriteHandle`), which the agent answers
/// once it took them all: `feed` hands them to `send` (false once the
/// guest refused them) and fails on a source error. Returns the bytes the
/// guest took.
fn send_stream(
    inner: &Arc<Inner>,
    op: &str,
    path: &str,
    request: impl FnOnce(u32) -> Request,
    feed: impl FnOnce(&mut dyn FnMut(&[u8]) -> bool) -> io::Result<()>,
) -> Result<u64> {
    inner.check_running()?;
    let (id, stream) = inner.channel.open_outbound();
    let pending = inner.channel.begin(request(id))?;
    let mut total = 0u64;
    // A refused write shows as a broken pipe; the answer says why.
    let fed = feed(&mut |bytes| {
        let sent = inner.channel.write(id, &stream, bytes).is_ok();
        if sent {
            total += bytes.len() as u64;
        }
        sent
    });
    // Without Eof the guest would keep the file half-written and
    // waiting: end the stream before reporting a host-side failure.
    inner.channel.close_outbound(id, &stream);
    if cancel::is_cancelled() {
        return Err(cancel::cancelled(op));
    }
    let answer = pending.wait(&inner.channel, REQUEST_TIMEOUT);
    if let Err(e) = fed {
        return Err(Error::Io {
            op: format!("{op} (reading the source)"),
            path: path.into(),
            source: e,
        });
    }
    match answer? {
        Ok(Response::Done) => Ok(total),
        Ok(other) => Err(unexpected(op, other)),
        Err(e) => Err(remote(op, path, e)),
    }
}

/// A guest file streaming to the host, from [`Instance::read_file_stream`]:
/// read it to its end (a read of 0 bytes). Only a bounded window of it is
/// in host memory at a time. Dropping it early stops the transfer.
#[derive(Debug)]
pub struct FileReader {
    inner: Arc<Inner>,
    stream: ChildOutput,
    path: String,
    size: u64,
    /// Bytes read so far, and the most the caller takes.
    read: u64,
    limit: Option<u64>,
}

impl FileReader {
    /// The file's size when the transfer began, as the guest reported it
    /// (what it yields may differ if the file changes meanwhile; files
    /// such as those in `/proc` report 0).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The guest path being read.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The stream as a [`Conn`] to read (the C API's form of it).
    pub fn into_conn(self) -> Conn {
        Conn::from_reader(self.stream)
    }

    /// Reads up to `buf.len()` bytes, waiting for some; 0 at the end.
    pub fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = self.stream.receive(buf).map_err(|e| {
            self.stream.stop();
            match self.inner.check_running() {
                Err(not_running) => not_running,
                Ok(()) => Error::Io {
                    op: "read_file".into(),
                    path: self.path.clone(),
                    source: e,
                },
            }
        })?;
        self.read += n as u64;
        match self.limit {
            Some(limit) if self.read > limit => {
                self.stream.stop();
                Err(too_large("read_file", &self.path, None, limit))
            }
            _ => Ok(n),
        }
    }
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_some(buf).map_err(to_io)
    }
}

impl Instance {
    /// The whole contents of a guest file, read into one buffer of the
    /// size the guest reports. A file over
    /// [`Options::max_result_bytes`](crate::Options::max_result_bytes) is
    /// refused with [`Error::TooLarge`] before any of it is read; stream
    /// such files ([`Instance::copy_out`], [`Instance::read_file_stream`]).
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let mut reader = self.read_file_stream(path)?;
        let limit = self.inner().max_result;
        if reader.size > limit {
            return Err(too_large("read_file", path, Some(reader.size), limit));
        }
        reader.limit = Some(limit);
        collect(reader.size, |buf| reader.read_some(buf))
    }

    /// [`read_file`](Self::read_file) that `cancel` stops with
    /// [`Error::Cancelled`], also while the guest has nothing to send (a
    /// FIFO, a device).
    pub fn read_file_cancellable(&self, path: &str, cancel: &CancelToken) -> Result<Vec<u8>> {
        cancel::scope("read_file", cancel, || self.read_file(path))
    }

    /// [`write_file`](Self::write_file) that `cancel` stops with
    /// [`Error::Cancelled`] while it waits for the guest to take the
    /// bytes; the guest file may then hold part of `data`.
    pub fn write_file_cancellable(
        &self,
        path: &str,
        data: &[u8],
        mode: u32,
        cancel: &CancelToken,
    ) -> Result<()> {
        cancel::scope("write_file", cancel, || self.write_file(path, data, mode))
    }

    /// Starts streaming a guest file to the host: any size, in bounded
    /// host memory, with no limit of its own.
    pub fn read_file_stream(&self, path: &str) -> Result<FileReader> {
        let inner = self.inner();
        inner.check_running()?;
        let wire = guest_path(path)?;
        let (id, stream) = inner.channel.open_inbound();
        let stream = ChildOutput::new(inner.clone(), id, stream);
        let reply = inner.channel.request(
            Request::ReadFile {
                path: wire,
                stream: id,
            },
            REQUEST_TIMEOUT,
        );
        // On an error, dropping `stream` closes it.
        let size = match reply? {
            Ok(Response::Size(size)) => size,
            Ok(other) => return Err(unexpected("read_file", other)),
            Err(e) => return Err(remote("read_file", path, e)),
        };
        Ok(FileReader {
            inner: inner.clone(),
            stream,
            path: path.to_string(),
            size,
            read: 0,
            limit: None,
        })
    }

    /// Streams a guest file into `out` in chunks (any size, bounded
    /// memory); returns the bytes copied.
    pub fn read_file_to(&self, path: &str, out: &mut impl Write) -> Result<u64> {
        let mut reader = self.read_file_stream(path)?;
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut total = 0u64;
        loop {
            let n = reader.read_some(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            out.write_all(&buf[..n]).map_err(|e| Error::Io {
                op: "read_file (writing the copy)".into(),
                path: path.into(),
                source: e,
            })?;
            total += n as u64;
        }
    }

    /// Copies a guest file to `host_path` (created, or truncated), streamed
    /// in constant host memory whatever its size; runs of zero bytes
    /// become holes, so a sparse guest file stays sparse. Returns the bytes
    /// copied. On failure the host file may hold part of the contents.
    pub fn copy_out(&self, guest_path: &str, host_path: impl AsRef<Path>) -> Result<u64> {
        let host_path = host_path.as_ref();
        let mut reader = self.read_file_stream(guest_path)?;
        let mut file =
            std::fs::File::create(host_path).map_err(Error::io("copy_out (create)", host_path))?;
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut total = 0u64;
        loop {
            let n = reader.read_some(&mut buf)?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            if chunk.iter().all(|&b| b == 0) {
                file.seek(SeekFrom::Current(n as i64)).map(drop)
            } else {
                file.write_all(chunk)
            }
            .map_err(Error::io("copy_out (write)", host_path))?;
            total += n as u64;
        }
        // A file ending in a hole gets its length here.
        file.set_len(total)
            .map_err(Error::io("copy_out (write)", host_path))?;
        Ok(total)
    }

    /// Copies the host file `host_path` to the guest path (created or
    /// replaced, permissions `mode`), streamed in constant host memory
    /// whatever its size. Returns the bytes copied.
    pub fn copy_in(&self, host_path: impl AsRef<Path>, guest_path: &str, mode: u32) -> Result<u64> {
        let host_path = host_path.as_ref();
        let mut file =
            std::fs::File::open(host_path).map_err(Error::io("copy_in (open)", host_path))?;
        self.write_file_from(guest_path, &mut file, mode)
    }

    /// Creates or replaces a guest file with `data`, permissions `mode`.
    pub fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        // Sent from where it is: no copy on the host.
        self.send_file(path, mode, |send| {
            send(data);
            Ok(())
        })
        .map(drop)
    }

    /// Creates or replaces a guest file with everything `input` yields,
    /// streamed in chunks; returns the bytes written.
    pub fn write_file_from(&self, path: &str, input: &mut impl Read, mode: u32) -> Result<u64> {
        let mut buf = vec![0u8; DATA_CHUNK];
        self.send_file(path, mode, |send| loop {
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if !send(&buf[..n]) {
                return Ok(());
            }
        })
    }

    /// Streams a guest file's new contents (see [`send_stream`]).
    fn send_file(
        &self,
        path: &str,
        mode: u32,
        feed: impl FnOnce(&mut dyn FnMut(&[u8]) -> bool) -> io::Result<()>,
    ) -> Result<u64> {
        let wire = guest_path(path)?;
        let request = |stream| Request::WriteFile {
            path: wire,
            mode: mode & 0o7777,
            stream,
        };
        send_stream(self.inner(), "write_file", path, request, feed)
    }

    /// Metadata of `path`, following a final symlink.
    pub fn stat(&self, path: &str) -> Result<FileInfo> {
        self.inner().fs_stat(
            "stat",
            path,
            FsRequest::Stat {
                path: guest_path(path)?,
                follow: true,
            },
        )
    }

    /// Metadata of `path` itself, not following a final symlink.
    pub fn lstat(&self, path: &str) -> Result<FileInfo> {
        self.inner().fs_stat(
            "lstat",
            path,
            FsRequest::Stat {
                path: guest_path(path)?,
                follow: false,
            },
        )
    }

    /// Creates a directory with permissions `mode`; its parent must exist.
    pub fn mkdir(&self, path: &str, mode: u32) -> Result<()> {
        self.inner().fs_done(
            "mkdir",
            path,
            FsRequest::Mkdir {
                path: guest_path(path)?,
                mode,
                all: false,
            },
        )
    }

    /// Creates a directory and any missing parents; an existing directory
    /// is fine.
    pub fn mkdir_all(&self, path: &str, mode: u32) -> Result<()> {
        self.inner().fs_done(
            "mkdir_all",
            path,
            FsRequest::Mkdir {
                path: guest_path(path)?,
                mode,
                all: true,
            },
        )
    }

    /// Removes a file, symlink or empty directory.
    pub fn remove(&self, path: &str) -> Result<()> {
        self.inner().fs_done(
            "remove",
            path,
            FsRequest::Remove {
                path: guest_path(path)?,
                all: false,
            },
        )
    }

    /// Removes a path and everything under it (never following symlinks);
    /// a missing path is fine.
    pub fn remove_all(&self, path: &str) -> Result<()> {
        self.inner().fs_done(
            "remove_all",
            path,
            FsRequest::Remove {
                path: guest_path(path)?,
                all: true,
            },
        )
    }

    /// The entries of a directory, sorted by name.
    pub fn read_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        match self.inner().fs(
            "read_dir",
            path,
            FsRequest::ReadDir {
                path: guest_path(path)?,
            },
        )? {
            Response::Entries(entries) => Ok(entries
                .into_iter()
                .map(|e| DirEntry {
                    name: String::from_utf8_lossy(&e.name).into_owned(),
                    is_dir: e.mode & S_IFMT == S_IFDIR,
                    mode: e.mode,
                })
                .collect()),
            other => Err(unexpected("read_dir", other)),
        }
    }

    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        let req = FsRequest::Rename {
            from: guest_path(from)?,
            to: guest_path(to)?,
        };
        self.inner().fs_done("rename", from, req)
    }

    /// Creates `link` as a symlink to `target` (stored as given).
    pub fn symlink(&self, target: &str, link: &str) -> Result<()> {
        if target.is_empty() || target.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "invalid symlink target {target:?}"
            )));
        }
        let req = FsRequest::Symlink {
            target: ByteBuf::from(target.as_bytes()),
            link: guest_path(link)?,
        };
        self.inner().fs_done("symlink", link, req)
    }

    pub fn readlink(&self, path: &str) -> Result<String> {
        match self.inner().fs(
            "readlink",
            path,
            FsRequest::Readlink {
                path: guest_path(path)?,
            },
        )? {
            Response::Link(target) => Ok(String::from_utf8_lossy(&target).into_owned()),
            other => Err(unexpected("readlink", other)),
        }
    }

    /// Sets the permission bits (`0o7777`).
    pub fn chmod(&self, path: &str, mode: u32) -> Result<()> {
        self.inner().fs_done(
            "chmod",
            path,
            FsRequest::Chmod {
                path: guest_path(path)?,
                mode: mode & 0o7777,
            },
        )
    }

    /// Sets owner and/or group; `None` leaves one unchanged.
    pub fn chown(&self, path: &str, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        self.inner().fs_done(
            "chown",
            path,
            FsRequest::Chown {
                path: guest_path(path)?,
                uid,
                gid,
            },
        )
    }

    /// Sets access and modification times.
    pub fn chtimes(&self, path: &str, atime: SystemTime, mtime: SystemTime) -> Result<()> {
        let req = FsRequest::Chtimes {
            path: guest_path(path)?,
            atime: to_unix(atime),
            mtime: to_unix(mtime),
        };
        self.inner().fs_done("chtimes", path, req)
    }

    /// Opens a guest file for reading.
    pub fn open(&self, path: &str) -> Result<File> {
        self.open_file(path, O_RDONLY, 0)
    }

    /// Creates (or truncates) a guest file for reading and writing, 0o666.
    pub fn create(&self, path: &str) -> Result<File> {
        self.open_file(path, O_RDWR | O_CREATE | O_TRUNC, 0o666)
    }

    /// Opens a guest file with `O_*` flags (this crate's numbering) and,
    /// when created, permissions `mode`.
    pub fn open_file(&self, path: &str, flags: u32, mode: u32) -> Result<File> {
        if flags & !cc_protocol::open_flags::ALL != 0 || flags & 3 == 3 {
            return Err(Error::InvalidArgument(format!(
                "invalid open flags {flags:#x}"
            )));
        }
        let inner = self.inner();
        let handle = inner.next_handle.fetch_add(1, Ordering::Relaxed);
        let req = FsRequest::Open {
            handle,
            path: guest_path(path)?,
            flags,
            mode: mode & 0o7777,
        };
        inner.fs_stat("open", path, req)?;
        Ok(File {
            inner: inner.clone(),
            handle,
            path: path.to_string(),
            open: Mutex::new(true),
        })
    }
}

/// An open guest file. Reads at end of file return 0 bytes. Closing is
/// idempotent; dropping closes it.
#[derive(Debug)]
pub struct File {
    inner: Arc<Inner>,
    handle: u64,
    path: String,
    open: Mutex<bool>,
}

impl File {
    /// The path it was opened with.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn check_open(&self) -> Result<()> {
        if *self.open.lock().unwrap_or_else(|e| e.into_inner()) {
            Ok(())
        } else {
            Err(Error::AlreadyClosed)
        }
    }

    fn call(&self, op: &str, req: FsRequest) -> Result<Response> {
        self.check_open()?;
        self.inner.fs(op, &self.path, req)
    }

    /// Reads up to `buf.len()` bytes at the file offset, fewer only at the
    /// end of the file; 0 at end of file. The bytes come on a stream, as
    /// `read_file`'s do, straight into `buf`, in one round trip.
    pub fn read_some(&self, buf: &mut [u8]) -> Result<usize> {
        self.check_open()?;
        if buf.is_empty() {
            return Ok(0);
        }
        let inner = &self.inner;
        inner.check_running()?;
        let (id, stream) = inner.channel.open_inbound();
        // Dropped early (an error), it closes the stream.
        let stream = ChildOutput::new(inner.clone(), id, stream);
        let request = Request::ReadHandle {
            handle: self.handle,
            len: buf.len() as u64,
            stream: id,
        };
        match inner.channel.request(request, REQUEST_TIMEOUT)? {
            Ok(Response::Done) => {}
            Ok(other) => return Err(unexpected("read", other)),
            Err(e) => return Err(remote("read", &self.path, e)),
        }
        let fail = |e| match inner.check_running() {
            Err(not_running) => not_running,
            Ok(()) => Error::Io {
                op: "read".into(),
                path: self.path.clone(),
                source: e,
            },
        };
        let mut got = 0;
        // Until the end of the stream, which follows the last byte asked
        // for: reading it lets the stream close without a reset.
        loop {
            let n = if got < buf.len() {
                stream.receive(&mut buf[got..])
            } else {
                stream.receive(&mut [0u8; 1])
            }
            .map_err(fail)?;
            if n == 0 {
                return Ok(got);
            }
            got += n;
            if got > buf.len() {
                return Err(Error::Protocol("the guest sent more than was asked".into()));
            }
        }
    }

    /// [`read_some`](Self::read_some) that `cancel` stops with
    /// [`Error::Cancelled`].
    pub fn read_some_cancellable(&self, buf: &mut [u8], cancel: &CancelToken) -> Result<usize> {
        cancel::scope("read", cancel, || self.read_some(buf))
    }

    /// [`write_all_bytes`](Self::write_all_bytes) that `cancel` stops with
    /// [`Error::Cancelled`]; part of `data` may have been written.
    pub fn write_all_bytes_cancellable(&self, data: &[u8], cancel: &CancelToken) -> Result<()> {
        cancel::scope("write", cancel, || self.write_all_bytes(data))
    }

    /// Everything from the file offset to the end, read into one buffer
    /// of the size left in a regular file. More than
    /// [`Options::max_result_bytes`](crate::Options::max_result_bytes) is
    /// [`Error::TooLarge`]; read such files in parts with
    /// [`File::read_some`].
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let limit = self.inner.max_result;
        let info = self.stat()?;
        let expected = if info.mode & S_IFMT == S_IFREG {
            info.size
                .saturating_sub(self.seek_to(SeekFrom::Current(0))?)
        } else {
            0
        };
        if expected > limit {
            return Err(too_large("read", &self.path, Some(expected), limit));
        }
        let mut total = 0u64;
        collect(expected, |buf| {
            let n = self.read_some(buf)?;
            total += n as u64;
            if total > limit {
                return Err(too_large("read", &self.path, None, limit));
            }
            Ok(n)
        })
    }

    /// Writes all of `data` at the file offset (the end, with `O_APPEND`),
    /// on a stream as `write_file` does, in one round trip.
    pub fn write_all_bytes(&self, data: &[u8]) -> Result<()> {
        self.check_open()?;
        let request = |stream| Request::WriteHandle {
            handle: self.handle,
            stream,
        };
        send_stream(&self.inner, "write", &self.path, request, |send| {
            send(data);
            Ok(())
        })
        .map(drop)
    }

    /// Moves the file offset; returns the new one.
    pub fn seek_to(&self, pos: SeekFrom) -> Result<u64> {
        let (offset, whence) = match pos {
            SeekFrom::Start(o) => (
                i64::try_from(o).map_err(|_| Error::InvalidArgument("offset too large".into()))?,
                0,
            ),
            SeekFrom::Current(o) => (o, 1),
            SeekFrom::End(o) => (o, 2),
        };
        match self.call(
            "seek",
            FsRequest::Seek {
                handle: self.handle,
                offset,
                whence,
            },
        )? {
            Response::Offset(o) => Ok(o),
            other => Err(unexpected("seek", other)),
        }
    }

    pub fn stat(&self) -> Result<FileInfo> {
        match self.call(
            "stat",
            FsRequest::Fstat {
                handle: self.handle,
            },
        )? {
            Response::Stat(st) => Ok(FileInfo::new(&self.path, st)),
            other => Err(unexpected("stat", other)),
        }
    }

    /// Sets the file's length.
    pub fn truncate(&self, len: u64) -> Result<()> {
        match self.call(
            "truncate",
            FsRequest::Truncate {
                handle: self.handle,
                len,
            },
        )? {
            Response::Done => Ok(()),
            other => Err(unexpected("truncate", other)),
        }
    }

    /// Flushes the file to the guest's disk.
    pub fn sync(&self) -> Result<()> {
        match self.call(
            "sync",
            FsRequest::Sync {
                handle: self.handle,
            },
        )? {
            Response::Done => Ok(()),
            other => Err(unexpected("sync", other)),
        }
    }

    /// Closes the handle; closing again does nothing.
    pub fn close(&self) -> Result<()> {
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if !*open {
                return Ok(());
            }
            *open = false;
        }
        // A guest that is gone has closed it already.
        if self.inner.check_running().is_err() {
            return Ok(());
        }
        match self.inner.channel.request(
            Request::Fs(FsRequest::Close {
                handle: self.handle,
            }),
            REQUEST_TIMEOUT,
        )? {
            Ok(_) => Ok(()),
            Err(e) => Err(remote("close", &self.path, e)),
        }
    }
}

fn to_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        other => io::Error::other(other),
    }
}

impl Read for File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_some(buf).map_err(to_io)
    }
}

impl Write for File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all_bytes(buf).map_err(to_io)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for File {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.seek_to(pos).map_err(to_io)
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader yielding `data` in pieces of at most `step` bytes.
    fn pieces(data: &[u8], step: usize) -> impl FnMut(&mut [u8]) -> Result<usize> + '_ {
        let mut at = 0;
        move |buf| {
            let n = buf.len().min(step).min(data.len() - at);
            buf[..n].copy_from_slice(&data[at..at + n]);
            at += n;
            Ok(n)
        }
    }

    #[test]
    fn collect_fills_the_reported_size_in_place() {
        let data: Vec<u8> = (0..3 * COPY_CHUNK + 17).map(|i| i as u8).collect();
        let out = collect(data.len() as u64, pieces(&data, 100_000)).unwrap();
        assert_eq!(out, data);
        // Reserved once for the reported size: never grown past it.
        assert_eq!(out.capacity(), data.len());
    }

    #[test]
    fn collect_grows_when_the_guest_sends_more_or_less_than_it_said() {
        let data: Vec<u8> = (0..COPY_CHUNK + 5000).map(|i| (i * 7) as u8).collect();
        for expected in [0, 10, data.len() as u64 * 2, u64::MAX] {
            let out = collect(expected, pieces(&data, 3000)).unwrap();
            assert_eq!(out, data, "expected {expected}");
        }
        assert!(collect(0, pieces(&[], 1)).unwrap().is_empty());
    }

    #[test]
    fn collect_stops_at_the_first_error() {
        let mut calls = 0;
        let err = collect(100, |buf: &mut [u8]| {
            calls += 1;
            if calls == 2 {
                return Err(too_large("read_file", "/big", Some(1 << 40), 1 << 30));
            }
            buf[0] = 1;
            Ok(1)
        })
        .unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::TooLarge);
        assert_eq!(
            err.to_string(),
            "read_file /big: 1099511627776 bytes, over max_result_bytes (1073741824); stream it instead"
        );
        assert_eq!((err.op(), err.path()), (Some("read_file"), Some("/big")));
        let err = too_large("output of", "command", None, 5);
        assert!(err.to_string().contains("more than 5 bytes"), "{err}");
    }

    #[test]
    fn agent_errors_keep_the_guest_errno_whatever_the_wording() {
        let agent = |errno, message: &str| cc_protocol::RemoteError {
            kind: cc_protocol::ErrorKind::Io,
            message: message.into(),
            errno: Some(errno),
        };
        // Worded as this host's C library words it.
        let e = remote(
            "read_file",
            "/x",
            agent(libc::ENOENT, "open /x: No such file or directory"),
        );
        assert_eq!(e.os_errno(), Some(libc::ENOENT));
        assert_eq!(e.io_kind(), Some(io::ErrorKind::NotFound));
        // Worded by the agent itself, or by another C library.
        let e = remote(
            "read_file",
            "/d",
            agent(libc::EINVAL, "open /d: not a regular file"),
        );
        assert_eq!(e.os_errno(), Some(libc::EINVAL));
        assert_eq!(e.io_kind(), Some(io::ErrorKind::InvalidInput));
        assert_eq!(e.to_string(), "read_file /d: not a regular file");
        let e = remote(
            "write_file",
            "/f",
            agent(libc::ENOSPC, "open /f: No space left"),
        );
        assert_eq!(e.os_errno(), Some(libc::ENOSPC));
        assert_eq!(e.io_kind(), Some(io::ErrorKind::StorageFull));
        let e = remote(
            "stat",
            "/x",
            cc_protocol::RemoteError {
                errno: None,
                ..agent(0, "stat /x: gone")
            },
        );
        assert_eq!(e.os_errno(), None);
    }

    #[test]
    fn times_round_trip_including_before_the_epoch() {
        for t in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            UNIX_EPOCH - Duration::new(10, 250),
        ] {
            assert_eq!(to_system_time(to_unix(t)), t);
        }
    }

    #[test]
    fn paths_must_be_absolute_and_free_of_nul() {
        assert_eq!(&guest_path("/a/b").unwrap()[..], b"/a/b");
        assert!(guest_path("a/b").is_err());
        assert!(guest_path("").is_err());
        assert!(guest_path("/a\0b").is_err());
    }

    #[test]
    fn file_info_names_and_types() {
        let st = cc_protocol::FileStat {
            mode: 0o040755,
            size: 0,
            mtime: UnixTime { secs: 0, nanos: 0 },
            uid: 0,
            gid: 0,
        };
        let info = FileInfo::new("/tmp/dir/", st);
        assert_eq!(
            (
                info.name.as_str(),
                info.is_dir,
                info.is_symlink,
                info.permissions()
            ),
            ("dir", true, false, 0o755)
        );
        assert_eq!(FileInfo::new("/", st).name, "/");
    }
}
