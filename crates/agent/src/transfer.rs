//! `ReadFile` and `WriteFile`: whole files streamed to or from the host
//! with the streams' flow control, never held in memory.

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use cc_protocol::{ErrorKind, RemoteError, Response};
use rustix::fs::OFlags;

use crate::conn::Reply;
use crate::fs::guest_path;
use crate::stream::{DrainError, Receiver, Sender};
use crate::{error, sys};

/// Opens `path`, answers its size, then streams it on `sender`. Nothing is
/// sent on the stream if it cannot be opened.
pub fn read_file(reply: Reply, path: &[u8], sender: Sender) {
    let opened = guest_path("open", path).and_then(|p| {
        let fail = |e: &io::Error| error::fs("open", path, e);
        // Non-blocking, so a FIFO without a writer cannot hang the open.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .map_err(|e| fail(&e))?;
        let meta = file.metadata().map_err(|e| fail(&e))?;
        // Only regular files have an end: a directory fails later, a device
        // or FIFO may never end.
        if meta.is_dir() {
            return Err(fail(&io::Error::from_raw_os_error(libc::EISDIR)));
        }
        if !meta.is_file() {
            return Err(error::fs_invalid("open", path, "not a regular file"));
        }
        Ok((file, meta.len()))
    });
    match opened {
        Ok((file, size)) => {
            reply.send(Ok(Response::Size(size)));
            sender.splice_file(file);
        }
        Err(e) => reply.send(Err(e)),
    }
}

/// Creates or truncates `path` with permissions `mode`, fills it with what
/// the host sends on `receiver`, and answers once it is closed.
pub fn write_file(reply: Reply, path: &[u8], mode: u32, receiver: Receiver) {
    let file = match create(path, mode) {
        Ok(file) => file,
        // Reset first, as on a write error below: by the time the host reads
        // the answer, its writer has been told to stop.
        Err(e) => {
            receiver.reset();
            return reply.send(Err(e));
        }
    };
    let mut out = NewFile::new(&file);
    let answer = drain(|bytes| out.write(bytes), path, &receiver);
    // Answered once closed, so the host never sees the file still open.
    drop(file);
    reply.send(answer);
}

/// Answers once open file `handle` is found, then streams up to `len`
/// bytes of it from its offset on `sender`.
pub fn read_handle(reply: Reply, handle: u64, len: u64, sender: Sender) {
    match reply.conn().handles().stream_file(handle, true) {
        Ok((file, _)) => {
            reply.send(Ok(Response::Done));
            sender.pump_some(file, len);
        }
        Err(e) => reply.send(Err(e)),
    }
}

/// Writes what the host sends on `receiver` to open file `handle` at its
/// offset, and answers once it is all written.
pub fn write_handle(reply: Reply, handle: u64, receiver: Receiver) {
    let (file, path) = match reply.conn().handles().stream_file(handle, false) {
        Ok(found) => found,
        Err(e) => {
            receiver.reset();
            return reply.send(Err(e));
        }
    };
    reply.send(drain(|bytes| (&file).write_all(bytes), &path, &receiver));
}

/// A file being filled by `write_file`, written with `O_DIRECT` while the
/// data comes in whole aligned blocks (stream buffers start on a page):
/// the guest CPU then never copies it into the page cache, which under TCG
/// costs more than the transfer itself, and the disk's emulation does the
/// copying on the host. The first piece that is not whole blocks (the
/// file's tail) turns it off for the rest; a filesystem without direct
/// I/O (tmpfs) never has it on.
struct NewFile<'a> {
    file: &'a File,
    direct: bool,
}

impl<'a> NewFile<'a> {
    fn new(file: &'a File) -> Self {
        Self {
            file,
            direct: sys::set_direct(file, true).is_ok(),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let whole_blocks = |b: &[u8]| {
            (b.as_ptr() as usize | b.len()).is_multiple_of(cc_protocol::flow::BUFFER_ALIGN)
        };
        if self.direct && !whole_blocks(bytes) {
            sys::set_direct(self.file, false)?;
            self.direct = false;
        }
        (&*self.file).write_all(bytes)
    }
}

/// Hands everything `receiver` yields to `write`; the answer to send.
fn drain(
    write: impl FnMut(&[u8]) -> io::Result<()>,
    path: &[u8],
    receiver: &Receiver,
) -> Result<Response, RemoteError> {
    match receiver.drain(write) {
        Ok(()) => Ok(Response::Done),
        // The stream was reset: the host stops sending, later data drops.
        Err(DrainError::Sink(e)) => Err(error::fs("write", path, &e)),
        Err(DrainError::Broken) => Err(error::new(
            ErrorKind::Io,
            format!(
                "write {}: the transfer was aborted",
                String::from_utf8_lossy(path)
            ),
        )),
    }
}

fn create(raw: &[u8], mode: u32) -> Result<File, RemoteError> {
    guest_path("open", raw)?;
    let fail = |e: &io::Error| error::fs("open", raw, e);
    let path = sys::cstring(raw).map_err(|e| fail(&e))?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC | OFlags::NOCTTY;
    let mode = mode & 0o7777;
    let file = File::from(sys::openat(None, &path, flags, mode).map_err(|e| fail(&e))?);
    // open(2) applies the mode only when it creates the file.
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|e| error::fs("chmod", raw, &e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::Scratch;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn new_files_take_whole_blocks_directly_and_the_tail_buffered() {
        use cc_protocol::flow::{Buffer, BUFFER_ALIGN};
        let s = Scratch::new();
        let file = create(&s.path("f"), 0o644).unwrap();
        let mut out = NewFile::new(&file);
        let mut block = Buffer::with_len(2 * BUFFER_ALIGN);
        block.fill(b'x');
        out.write(&block).unwrap();
        out.write(b"tail").unwrap();
        assert!(!out.direct, "the tail turns direct I/O off");
        out.write(&block).unwrap();
        drop(file);
        let back = std::fs::read(s.0.join("f")).unwrap();
        assert_eq!(back.len(), 4 * BUFFER_ALIGN + 4);
        assert_eq!(&back[2 * BUFFER_ALIGN..2 * BUFFER_ALIGN + 4], b"tail");
        assert!(back.iter().filter(|&&b| b == b'x').count() == 4 * BUFFER_ALIGN);
    }

    #[test]
    fn created_files_get_the_mode_even_when_they_existed() {
        let s = Scratch::new();
        let path = s.path("f");
        std::fs::write(s.0.join("f"), b"old contents").unwrap();
        let mut file = create(&path, 0o640).unwrap();
        file.write_all(b"new").unwrap();
        drop(file);
        let meta = std::fs::metadata(s.0.join("f")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read(s.0.join("f")).unwrap(), b"new");
        let e = create(&s.path("missing/f"), 0o600).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.starts_with("open /"), "{}", e.message);
        let e = create(&s.path(""), 0o600).unwrap_err();
        assert_eq!(e.errno, Some(libc::EISDIR));
    }
}
