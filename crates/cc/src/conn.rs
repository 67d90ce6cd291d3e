//! [`Conn`]: one end of a byte stream to the guest — a command's pipe, or a
//! TCP connection from [`Instance::dial`](crate::Instance::dial) or
//! [`Listener::accept`](crate::Listener::accept).

use std::cell::RefCell;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cmd_object::misuse;
use cc_cancel::CancelToken;

use crate::cancel;
use crate::error::{Error, Result};
use crate::process::{Child, ChildOutput, ChildStdin};

/// The most one [`Conn::read`] returns.
const READ_MAX: usize = 1 << 20;

thread_local! {
    /// [`Conn::read`]'s buffer: grown to the largest read this thread asked
    /// for, at most [`READ_MAX`].
    static READ_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug)]
enum State {
    /// A pipe requested before its command started; `fd` says which end
    /// it will be.
    Unbound(usize),
    /// `None` halves were closed or never existed (a pipe has one).
    Open {
        reader: Option<Arc<ChildOutput>>,
        writer: Option<Arc<ChildStdin>>,
    },
    Closed,
}

/// Addresses of a TCP connection, as `ip:port`.
#[derive(Debug, Clone)]
struct Addrs {
    local: String,
    remote: String,
}

/// One end of a byte stream to the guest: a command's stdin, stdout or
/// stderr pipe, or a TCP connection (readable and writable).
///
/// Reads and writes may run in different threads at once; [`Conn::close`]
/// from any thread ends both, waking a blocked read or write. Clones share
/// the stream.
#[derive(Debug, Clone)]
pub struct Conn {
    state: Arc<Mutex<State>>,
    addrs: Option<Arc<Addrs>>,
}

impl Conn {
    pub(crate) fn unbound(fd: usize) -> Conn {
        Conn {
            state: Arc::new(Mutex::new(State::Unbound(fd))),
            addrs: None,
        }
    }

    /// The readable end of a stream from the guest (a file being read).
    pub(crate) fn from_reader(reader: ChildOutput) -> Conn {
        Conn {
            state: Arc::new(Mutex::new(State::Open {
                reader: Some(Arc::new(reader)),
                writer: None,
            })),
            addrs: None,
        }
    }

    /// A TCP connection carried by a stream pair.
    pub(crate) fn socket(
        reader: ChildOutput,
        writer: ChildStdin,
        local: String,
        remote: String,
    ) -> Conn {
        Conn {
            state: Arc::new(Mutex::new(State::Open {
                reader: Some(Arc::new(reader)),
                writer: Some(Arc::new(writer)),
            })),
            addrs: Some(Arc::new(Addrs { local, remote })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Binds a pipe to the started `child`'s matching end.
    pub(crate) fn bind(&self, child: &mut Child) {
        let mut state = self.lock();
        *state = match *state {
            State::Unbound(0) => child.stdin.take().map(|w| State::Open {
                reader: None,
                writer: Some(Arc::new(w)),
            }),
            State::Unbound(fd) => {
                let out = if fd == 1 {
                    child.stdout.take()
                } else {
                    child.stderr.take()
                };
                out.map(|r| State::Open {
                    reader: Some(Arc::new(r)),
                    writer: None,
                })
            }
            _ => None,
        }
        .unwrap_or(State::Closed);
    }

    /// What errors name as the stream: the peer's address, or "pipe".
    fn name(&self) -> String {
        self.addrs
            .as_ref()
            .map_or_else(|| "pipe".to_string(), |a| a.remote.clone())
    }

    /// `gone` says why, when the instance itself is closed or dead.
    fn io_error(&self, op: &str, e: io::Error, gone: Option<Error>) -> Error {
        if self.is_closed() {
            return Error::AlreadyClosed;
        }
        if let Some(gone) = gone {
            return gone;
        }
        match e.kind() {
            io::ErrorKind::ConnectionAborted => Error::NotRunning(e.to_string()),
            _ => Error::Io {
                op: op.into(),
                path: self.name(),
                source: e,
            },
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub(crate) fn is_closed(&self) -> bool {
        matches!(*self.lock(), State::Closed)
    }

    /// Reads up to `max` (at most 1 MiB) bytes, waiting for some; an empty
    /// result is end of stream. The result holds only what came.
    pub fn read(&self, max: usize) -> Result<Vec<u8>> {
        // Through a buffer kept per thread, copied out at the size that
        // came: a fresh zeroed buffer of `max` bytes per call cost more than
        // the data when reads are small (a guest writing 1 KiB at a time
        // gave 1 MiB of memset per KiB, which starved the emulated guest
        // of memory bandwidth: 1.6 MB/s through a listener instead of 7.5),
        // and the truncated result kept all of it allocated.
        READ_BUFFER.with(|cell| {
            let mut buf = cell.borrow_mut();
            let want = max.min(READ_MAX);
            if buf.len() < want {
                buf.resize(want, 0);
            }
            let n = self.read_into(&mut buf[..want])?;
            Ok(buf[..n].to_vec())
        })
    }

    /// [`read`](Self::read) that `cancel` stops with [`Error::Cancelled`];
    /// what was not read yet stays to be read.
    pub fn read_cancellable(&self, max: usize, cancel: &CancelToken) -> Result<Vec<u8>> {
        cancel::scope("read", cancel, || self.read(max))
    }

    /// [`read_into`](Self::read_into) that `cancel` stops with
    /// [`Error::Cancelled`].
    pub fn read_into_cancellable(&self, buf: &mut [u8], cancel: &CancelToken) -> Result<usize> {
        cancel::scope("read", cancel, || self.read_into(buf))
    }

    /// [`write`](Self::write) that `cancel` stops with [`Error::Cancelled`]
    /// while it waits for the guest; part of `data` may have been sent.
    pub fn write_cancellable(&self, data: &[u8], cancel: &CancelToken) -> Result<()> {
        cancel::scope("write", cancel, || self.write(data))
    }

    /// Reads up to `buf.len()` bytes into `buf`, waiting for some; 0 is end
    /// of stream (or an empty `buf`).
    pub fn read_into(&self, buf: &mut [u8]) -> Result<usize> {
        let reader = self.reader()?;
        reader
            .receive(buf)
            .map_err(|e| self.io_error("read", e, reader.gone()))
    }

    /// The readable end, or why there is none.
    fn reader(&self) -> Result<Arc<ChildOutput>> {
        match &*self.lock() {
            State::Open {
                reader: Some(r), ..
            } => Ok(r.clone()),
            State::Open { reader: None, .. } if self.addrs.is_none() => {
                Err(misuse("this end is not readable"))
            }
            State::Open { reader: None, .. } | State::Closed => Err(Error::AlreadyClosed),
            State::Unbound(_) => Err(misuse("the command was not started")),
        }
    }

    /// Reads to the end of the stream into one buffer. More than the
    /// instance's [`Options::max_result_bytes`](crate::Options::max_result_bytes)
    /// fails with [`Error::TooLarge`] and stops the stream; read big streams
    /// in parts with [`Conn::read_into`].
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let limit = self.reader()?.max_result();
        let mut total = 0u64;
        crate::fs::collect(0, |buf| {
            let n = self.read_into(buf)?;
            total += n as u64;
            if total > limit {
                if let Ok(reader) = self.reader() {
                    reader.stop();
                }
                return Err(crate::fs::too_large("read", &self.name(), None, limit));
            }
            Ok(n)
        })
    }

    /// Writes all of `data`, waiting while the guest catches up.
    pub fn write(&self, data: &[u8]) -> Result<()> {
        let writer = match &*self.lock() {
            State::Open {
                writer: Some(w), ..
            } => w.clone(),
            State::Open { writer: None, .. } if self.addrs.is_none() => {
                return Err(misuse("this end is not writable"))
            }
            State::Open { writer: None, .. } | State::Closed => return Err(Error::AlreadyClosed),
            State::Unbound(_) => return Err(misuse("the command was not started")),
        };
        writer
            .send(data)
            .map_err(|e| self.io_error("write", e, writer.gone()))
    }

    /// Ends the writing direction only: the guest reads end of file, and
    /// this end can still read its answer (a TCP half close). On a pipe it
    /// is `close` for stdin and does nothing for output.
    pub fn close_write(&self) {
        let writer = match &mut *self.lock() {
            State::Open { writer, .. } => writer.take(),
            _ => None,
        };
        if let Some(w) = writer {
            w.finish();
        }
    }

    /// Closes this end: the guest reads end of file from what this end
    /// wrote, and its writes to this end fail (a TCP peer sees the
    /// connection close). A read or write blocked in another thread ends
    /// with [`Error::AlreadyClosed`]. Closing again does nothing.
    pub fn close(&self) {
        let old = std::mem::replace(&mut *self.lock(), State::Closed);
        if let State::Open { reader, writer } = old {
            if let Some(r) = reader {
                r.stop();
            }
            if let Some(w) = writer {
                w.finish();
            }
        }
    }

    /// This end's address (`ip:port`) for a TCP connection, as the guest
    /// sees it (for a dialed connection, the guest address it comes from;
    /// for an accepted one, the listener's); `None` for a pipe.
    pub fn local_addr(&self) -> Option<&str> {
        self.addrs.as_deref().map(|a| a.local.as_str())
    }

    /// The peer's address (`ip:port`) for a TCP connection; `None` for a
    /// pipe.
    pub fn remote_addr(&self) -> Option<&str> {
        self.addrs.as_deref().map(|a| a.remote.as_str())
    }
}
