//! Moving bytes between local files and the connection's streams, with the
//! streams' flow control: process pipes, file transfers and snapshots all
//! go through here.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use cc_protocol::flow::Inbound;
use cc_protocol::{frame, Message, RemoteError, DATA_CHUNK};

use crate::conn::{Conn, Output};
use crate::{error, sys, trace};

/// A registered guest → host stream. Dropping it unregisters the stream, so
/// one that is never pumped (its request failed) is released too.
#[derive(Debug)]
pub struct Sender {
    conn: Arc<Conn>,
    id: u32,
    output: Arc<Output>,
}

impl Sender {
    pub fn open(conn: &Arc<Conn>, id: u32) -> Result<Self, RemoteError> {
        Ok(Self {
            conn: conn.clone(),
            id,
            output: conn.open_output(id)?,
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Copies `source` to the host until its end of file, then sends `Eof`.
    /// Reads only as much as the host's credit allows, so a slow host reader
    /// stalls the source (a process writing a pipe) rather than growing the
    /// agent's memory. A read error resets the stream; a reset from the host
    /// stops the copy and closes `source` (a pipe's writer then gets EPIPE).
    /// A process's output outlives a rebirth of the connection: it is
    /// then read to its end and dropped, so the process runs on.
    pub fn pump(self, mut source: File) {
        let conn = self.conn.clone();
        if !self.copy(&mut source, u64::MAX, false) && conn.is_orphaned() {
            discard(source);
        }
    }

    /// Like [`pump`](Self::pump) of a file (no rebirth keeps it going),
    /// but ends the stream after at most `limit` bytes.
    pub fn pump_some(self, mut source: File, limit: u64) {
        self.copy(&mut source, limit, false);
    }

    /// Like [`pump`](Self::pump), for a terminal's master: `EIO`, which
    /// reading it gives once no process has the terminal open, is its end.
    pub fn pump_terminal(self, mut master: File) {
        let conn = self.conn.clone();
        if !self.copy(&mut master, u64::MAX, true) && conn.is_orphaned() {
            discard(master);
        }
    }

    /// `true` once `source` was copied to its end (or `limit`), `false`
    /// if the stream or the connection ended first.
    fn copy(self, source: &mut File, limit: u64, eio_ends: bool) -> bool {
        let stream = self.id;
        let mut left = limit;
        // The payload is read right after room for the frame header, so
        // each chunk is copied once (from the source) before it is sent.
        const ROOM: usize = frame::DATA_HEADER_MAX;
        let mut frame_buf =
            vec![0; ROOM + DATA_CHUNK.min(usize::try_from(limit).unwrap_or(usize::MAX))];
        loop {
            if left == 0 {
                self.finish();
                return true;
            }
            let waited = Instant::now();
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(DATA_CHUNK);
            let Some(credit) = self.output.acquire(want) else {
                return false;
            };
            trace::record("guest: wait for credit", waited);
            // Waiting here rather than in read lets a reset interrupt an idle
            // pipe; regular files are always ready.
            match self.output.wait_readable(source.as_fd()) {
                Ok(true) => {}
                Ok(false) => return false,
                Err(e) => {
                    log!("stream {stream}: poll: {}", error::describe(&e));
                    return false;
                }
            }
            let read = Instant::now();
            let got = loop {
                match source.read(&mut frame_buf[ROOM..ROOM + credit]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other,
                }
            };
            trace::record("guest: read the file", read);
            let got = match got {
                Ok(n) => n,
                Err(e) if eio_ends && e.raw_os_error() == Some(libc::EIO) => 0,
                Err(e) => {
                    log!("stream {stream}: read: {}", error::describe(&e));
                    self.reset();
                    return true;
                }
            };
            if !self.settle(credit, got) {
                return got == 0;
            }
            left -= got as u64;
            let mut header = [0u8; ROOM];
            let len = frame::data_header(stream, got, &mut header);
            frame_buf[ROOM - len..ROOM].copy_from_slice(&header[ROOM - len..]);
            let sent = Instant::now();
            if self
                .conn
                .send_frame(&frame_buf[ROOM - len..ROOM + got])
                .is_err()
            {
                return false;
            }
            trace::record("guest: write frames to the port", sent);
        }
    }

    /// Like [`pump`](Self::pump), for a regular file: its pages move file →
    /// pipe → port by `splice`, never copied into the agent (a page the
    /// kernel cannot hand over whole is copied once, in the kernel, where
    /// reading and writing would copy twice). A file whose filesystem
    /// cannot splice is pumped instead.
    pub fn splice_file(self, file: File) {
        let stream = self.id;
        let (pipe_out, pipe_in) = match sys::pipe() {
            Ok(pipe) => pipe,
            Err(_) => return self.pump(file),
        };
        // One chunk per splice: the default pipe holds 64 KiB. Refused,
        // frames are smaller; never more than the pipe holds, or filling
        // it would block with nobody to drain it.
        let chunk = rustix::pipe::fcntl_setpipe_size(&pipe_in, DATA_CHUNK)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&pipe_in))
            .map_or(4096, |size| size.min(DATA_CHUNK));
        let mut first = true;
        loop {
            let waited = Instant::now();
            let Some(credit) = self.output.acquire(chunk) else {
                break;
            };
            trace::record("guest: wait for credit", waited);
            let read = Instant::now();
            let got = match fill_pipe(&file, &pipe_in, credit) {
                Ok(n) => n,
                Err(e) if first && e.raw_os_error() == Some(libc::EINVAL) => {
                    self.output.give_back(credit);
                    return self.pump(file);
                }
                Err(e) => {
                    log!(
                        "stream {stream}: splice from the file: {}",
                        error::describe(&e)
                    );
                    self.output.give_back(credit);
                    self.reset();
                    break;
                }
            };
            trace::record("guest: read the file", read);
            first = false;
            if !self.settle(credit, got) {
                break;
            }
            let mut header = [0u8; frame::DATA_HEADER_MAX];
            let len = frame::data_header(stream, got, &mut header);
            let sent = Instant::now();
            let header = &header[frame::DATA_HEADER_MAX - len..];
            if let Err(e) = self.conn.send_spliced(header, pipe_out.as_fd(), got) {
                log!(
                    "stream {stream}: splice to the port: {}",
                    error::describe(&e)
                );
                break;
            }
            trace::record("guest: write frames to the port", sent);
        }
    }

    /// After reading `got` bytes with `credit` acquired: returns the unused
    /// credit and whether to send the chunk (not when the host reset the
    /// stream, nor at end of file, which ends it).
    fn settle(&self, credit: usize, got: usize) -> bool {
        self.output.give_back(credit - got);
        if !self.output.is_open() {
            return false;
        }
        if got == 0 {
            self.finish();
            return false;
        }
        true
    }

    /// Whether the host still takes data (it has not reset the stream).
    pub fn is_open(&self) -> bool {
        self.output.is_open()
    }

    /// Ends the stream with `Eof`, unless the host already reset it.
    pub fn finish(&self) {
        if self.output.is_open() {
            let _ = self.conn.send(&Message::Eof { stream: self.id });
        }
        self.conn.release_output(self.id, &self.output);
    }

    /// Aborts the stream: the host sees `Reset` instead of an end of file,
    /// and later writes fail.
    pub fn reset(&self) {
        if self.output.is_open() {
            let _ = self.conn.send(&Message::Reset { stream: self.id });
        }
        self.conn.release_output(self.id, &self.output);
    }
}

/// Reads `source` (a pipe, or a terminal's master, which fails with `EIO`
/// once no process holds the terminal) to its end and forgets what it
/// read, so that its writer never blocks on it.
pub fn discard(mut source: File) {
    let mut buf = [0; 4096];
    loop {
        match source.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// Splices up to `want` bytes of `file` (from its offset) into `pipe`;
/// returns how many, fewer only at the end of the file.
fn fill_pipe(file: &File, pipe: &OwnedFd, want: usize) -> io::Result<usize> {
    let mut got = 0;
    while got < want {
        match rustix::pipe::splice(
            file,
            None,
            pipe,
            None,
            want - got,
            rustix::pipe::SpliceFlags::MOVE,
        ) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Sends what is written as `Data` frames of at most [`DATA_CHUNK`] bytes,
/// blocking for credit. Wrap it in a buffer: every write is a frame.
impl Write for &Sender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self
            .output
            .acquire(buf.len().min(DATA_CHUNK))
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))?;
        self.conn.send_data(self.id, &buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.conn.release_output(self.id, &self.output);
    }
}

/// Why [`Receiver::drain`] stopped before the end of the stream.
#[derive(Debug)]
pub enum DrainError {
    /// Writing the data failed; the stream was reset.
    Sink(io::Error),
    /// The stream broke off: the host reset it or the connection is gone.
    Broken,
}

/// A registered host → guest stream; dropping it unregisters the stream.
#[derive(Debug)]
pub struct Receiver {
    conn: Arc<Conn>,
    id: u32,
    input: Arc<Inbound>,
}

impl Receiver {
    pub fn open(conn: &Arc<Conn>, id: u32) -> Result<Self, RemoteError> {
        Ok(Self {
            conn: conn.clone(),
            id,
            input: conn.open_input(id)?,
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Hands everything the host sends to `sink` until its end of file,
    /// in the buffers the payloads were read into (no copy), returning
    /// credit as the data is taken, so no more than the stream window is
    /// ever buffered.
    pub fn drain(&self, mut sink: impl FnMut(&[u8]) -> io::Result<()>) -> Result<(), DrainError> {
        let stream = self.id;
        loop {
            let waited = Instant::now();
            let chunk = self.input.take(None).map_err(|_| DrainError::Broken)?;
            trace::record("guest: wait for data", waited);
            if chunk.credit > 0 {
                let _ = self.conn.send(&Message::Credit {
                    stream,
                    bytes: chunk.credit,
                });
            }
            if chunk.bytes.is_empty() {
                return Ok(());
            }
            let written = Instant::now();
            if let Err(e) = sink(&chunk.bytes) {
                self.reset();
                return Err(DrainError::Sink(e));
            }
            trace::record("guest: write to the file", written);
            self.input.recycle(chunk.bytes);
        }
    }

    /// Tells the host to stop sending, and drops what it still sends.
    pub fn reset(&self) {
        self.conn.release_input(self.id, &self.input);
        let _ = self.conn.send(&Message::Reset { stream: self.id });
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.conn.release_input(self.id, &self.input);
    }
}
