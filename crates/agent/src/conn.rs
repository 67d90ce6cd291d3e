//! One connection to the host over the agent port: frame writes shared by
//! every thread, and the streams, open files and threads the connection
//! carries.
//!
//! The port is non-blocking so that no thread can stay stuck in a write to
//! a dead connection: such a write would hold the port open (a virtio port
//! opens only once at a time) and could later leak a stale partial frame
//! into the next connection.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use cc_protocol::flow::{Broken, Inbound, Outbound};
use cc_protocol::frame::FrameReader;
use cc_protocol::mux::{self, ReceiveError, Received, Sending, Side, Streams};
use cc_protocol::{frame, ErrorKind, Message, RemoteError, Response};
use rustix::event::{PollFd, PollFlags};

use crate::fs::Handles;
use crate::tasks::Tasks;
use crate::{error, sys};

/// How long a blocked writer waits before checking whether the connection
/// was closed.
const WRITE_POLL: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A guest → host stream.
#[derive(Debug)]
pub struct Output {
    flow: Outbound,
    /// Raised when the stream ends early, to wake a pump waiting on its pipe.
    wake: OwnedFd,
}

impl Output {
    fn new() -> io::Result<Self> {
        Ok(Self {
            flow: Outbound::new(),
            wake: sys::eventfd()?,
        })
    }

    /// Blocks for credit and takes up to `want` bytes of it; `None` once the
    /// host reset the stream or the connection is gone.
    pub fn acquire(&self, want: usize) -> Option<usize> {
        self.flow.acquire(want, None).ok()
    }

    /// Returns credit taken but not used.
    pub fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.flow.grant(bytes as u32);
        }
    }

    pub fn is_open(&self) -> bool {
        // Asking for nothing never blocks and fails only on a broken stream.
        self.flow.acquire(0, None).is_ok()
    }

    /// Waits until `pipe` has data or hung up; `false` if the stream ended
    /// first.
    pub fn wait_readable(&self, pipe: BorrowedFd<'_>) -> io::Result<bool> {
        let mut fds = [
            PollFd::from_borrowed_fd(pipe, PollFlags::IN),
            PollFd::new(&self.wake, PollFlags::IN),
        ];
        sys::poll(&mut fds, None)?;
        Ok(fds[1].revents().is_empty())
    }
}

impl Sending for Output {
    fn flow(&self) -> &Outbound {
        &self.flow
    }

    /// Also wakes a pump waiting on its pipe rather than on credit.
    fn end(&self, why: Broken) {
        self.flow.break_off(why);
        sys::eventfd_raise(self.wake.as_fd());
    }
}

/// The agent's end of its channel to the host.
#[derive(Debug)]
pub enum Port {
    /// The guest's virtio-serial port.
    Device(File),
    /// A connected stream socket: the channel of an agent in host mode.
    Socket(UnixStream),
}

impl From<File> for Port {
    fn from(file: File) -> Self {
        Port::Device(file)
    }
}

impl From<UnixStream> for Port {
    fn from(socket: UnixStream) -> Self {
        Port::Socket(socket)
    }
}

impl AsFd for Port {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Port::Device(file) => file.as_fd(),
            Port::Socket(socket) => socket.as_fd(),
        }
    }
}

impl Port {
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Port::Device(file) => Port::Device(file.try_clone()?),
            Port::Socket(socket) => Port::Socket(socket.try_clone()?),
        })
    }

    /// A second handle on a socket, to hang it up with while another
    /// thread holds the port; `None` for a device, which cannot be.
    fn hang_up_handle(&self) -> io::Result<Option<OwnedFd>> {
        match self {
            Port::Device(_) => Ok(None),
            Port::Socket(socket) => Ok(Some(socket.try_clone()?.into())),
        }
    }
}

/// What a virtio port hands over per `read`: one of its receive buffers,
/// a page each.
const PORT_BUFFER: usize = 4096;

/// Pages a port read asks for at once.
const PORT_READ_PAGES: usize = 128;

impl Read for &Port {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            // A `readv` of page-sized pieces takes as many filled buffers
            // as there are in one system call (the kernel goes on while
            // each piece is filled whole): a payload costs a system call
            // per 512 KiB rather than per page.
            Port::Device(file) if buf.len() > PORT_BUFFER => {
                let mut pieces: Vec<IoSliceMut<'_>> = buf
                    .chunks_mut(PORT_BUFFER)
                    .take(PORT_READ_PAGES)
                    .map(IoSliceMut::new)
                    .collect();
                (&*file).read_vectored(&mut pieces)
            }
            Port::Device(file) => (&*file).read(buf),
            Port::Socket(socket) => (&*socket).read(buf),
        }
    }
}

impl Write for &Port {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Port::Device(file) => (&*file).write(buf),
            // A host that hung up is an error to report, not a SIGPIPE for
            // whatever process the agent runs in.
            Port::Socket(socket) => Ok(rustix::net::send(
                socket,
                buf,
                rustix::net::SendFlags::NOSIGNAL,
            )?),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The port and whether it is held quiet.
#[derive(Debug)]
struct PortState {
    port: Option<Port>,
    /// The host asked for quiet (`Quiesce`): writers wait until it is
    /// lifted or the connection closes.
    quiesced: bool,
}

#[derive(Debug)]
pub struct Conn {
    /// Unique among the agent's connections; a reborn connection keeps
    /// its predecessor's, so that the processes it leaves behind stay
    /// keyed as they were.
    id: u64,
    port: Mutex<PortState>,
    /// Signalled when the port's quiet is lifted or the connection closes.
    unquiet: Condvar,
    /// Closed by a rebirth: its processes run on, their output read and
    /// dropped rather than their pipes closed.
    orphaned: AtomicBool,
    /// The token of the `Rebirth` that made this connection, if one did.
    token: Option<u64>,
    /// A socket port's second handle, shut down on close: that fails
    /// writes in progress and ends the reader's wait.
    hang_up: Option<OwnedFd>,
    closed: AtomicBool,
    /// `closed`, for waiting on.
    gone: Mutex<bool>,
    gone_changed: Condvar,
    /// The streams, in the multiplexer both ends share.
    streams: Mutex<Streams<Output>>,
    /// Files the host opened; closed with the connection.
    handles: Handles,
    /// The host's listeners, by host-chosen id: a second handle on each
    /// listening socket, to shut it down from another thread.
    listeners: Mutex<HashMap<u64, OwnedFd>>,
    /// The threads serving this connection's requests and streams.
    tasks: Arc<Tasks>,
    /// How many `Started` answers are held back for a quick exit (see
    /// [`Conn::hold_started`]).
    held_started: Mutex<usize>,
    held_started_sent: Condvar,
}

impl Conn {
    /// Takes the (non-blocking) port for writing.
    pub fn new(port: Port) -> io::Result<Self> {
        Self::with(
            port,
            NEXT_ID.fetch_add(1, Ordering::Relaxed),
            None,
            Arc::default(),
        )
    }

    fn with(port: Port, id: u64, token: Option<u64>, tasks: Arc<Tasks>) -> io::Result<Self> {
        Ok(Self {
            id,
            hang_up: port.hang_up_handle()?,
            port: Mutex::new(PortState {
                port: Some(port),
                quiesced: false,
            }),
            unquiet: Condvar::new(),
            orphaned: AtomicBool::new(false),
            token,
            closed: AtomicBool::new(false),
            gone: Mutex::new(false),
            gone_changed: Condvar::new(),
            streams: Mutex::new(Streams::new(Side::Guest)),
            handles: Handles::default(),
            listeners: Mutex::default(),
            tasks,
            held_started: Mutex::new(0),
            held_started_sent: Condvar::new(),
        })
    }

    /// Counts a `Started` answer held back until the guard is dropped,
    /// once it is sent: a goodbye waits for it (see
    /// [`Conn::await_held_started`]).
    pub fn hold_started(self: &Arc<Self>) -> HeldStarted {
        *lock(&self.held_started) += 1;
        HeldStarted(self.clone())
    }

    /// Waits up to `limit` until no `Started` is held back, so that a host
    /// hears its command started before it hears the guest went away.
    pub fn await_held_started(&self, limit: Duration) {
        let held = lock(&self.held_started);
        let _ = self
            .held_started_sent
            .wait_timeout_while(held, limit, |n| *n > 0);
    }

    /// The token of the `Rebirth` that made this connection.
    pub fn token(&self) -> Option<u64> {
        self.token
    }

    /// Whether a rebirth closed this connection (see [`Conn::reborn`]).
    pub fn is_orphaned(&self) -> bool {
        self.orphaned.load(Ordering::Relaxed)
    }

    /// Marks the connection's processes as living on without it: their
    /// output is read and dropped once the connection closes.
    pub fn orphan(&self) {
        self.orphaned.store(true, Ordering::Relaxed);
    }

    /// Holds every later frame back, once the one being written is out,
    /// and writes `last`, the answer to `Quiesce`, as the last frame
    /// before the quiet is lifted.
    pub fn quiesce(&self, last: &Message) -> io::Result<()> {
        let frame = frame::encode(last).map_err(io::Error::other)?;
        // Not waiting for a quiet already asked for: this runs on the
        // reader, which must never wait for the host.
        let mut state = lock(&self.port);
        self.write_all_port(&state.port, &frame)?;
        state.quiesced = true;
        Ok(())
    }

    /// Lets the held writers go on.
    pub fn unquiesce(&self) {
        lock(&self.port).quiesced = false;
        self.unquiet.notify_all();
    }

    /// Closes this connection for a rebirth and returns the new one, on
    /// the same port: its streams, files and listeners end with it, a
    /// frame being written goes out whole first and the held ones never
    /// do. Its processes run on under the new connection's id, their
    /// output read and dropped (see [`Conn::is_orphaned`]), their exits
    /// reported to nobody.
    pub fn reborn(&self, token: u64) -> io::Result<Arc<Conn>> {
        let port = {
            // Once locked, no frame is half written (a writer holds the
            // lock for a whole frame), quiet or not.
            let mut state = lock(&self.port);
            state.quiesced = true;
            state
                .port
                .as_ref()
                .ok_or_else(Self::closed_error)?
                .try_clone()?
        };
        self.orphan();
        self.shut(false);
        Ok(Arc::new(Self::with(
            port,
            self.id,
            Some(token),
            self.tasks.clone(),
        )?))
    }

    /// The port, once it is not held quiet; fails once the connection is
    /// closed.
    fn port_for_writing(&self) -> io::Result<MutexGuard<'_, PortState>> {
        let mut state = lock(&self.port);
        while state.quiesced && !self.closed.load(Ordering::Relaxed) {
            state = self.unquiet.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if self.closed.load(Ordering::Relaxed) {
            return Err(Self::closed_error());
        }
        Ok(state)
    }

    /// Starts `f` on a thread of this connection's (see [`Tasks`]).
    pub fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        self.tasks.spawn(name, f)
    }

    pub fn tasks(&self) -> &Arc<Tasks> {
        &self.tasks
    }

    /// A stream id of the guest's own numbering, for streams the guest opens.
    pub fn new_stream_id(&self) -> u32 {
        lock(&self.streams).allocate()
    }

    /// The host named these streams in a request: frames for them are
    /// expected from now on, even if the request fails.
    pub fn announce(&self, ids: impl Iterator<Item = u32>) {
        let mut streams = lock(&self.streams);
        for id in ids {
            streams.announce(id);
        }
    }

    /// Reads the next frame from the host, applying stream frames (see
    /// [`mux::receive`]); other messages are returned.
    pub fn receive(
        &self,
        reader: &mut FrameReader<PortReader>,
    ) -> Result<Option<Received>, ReceiveError> {
        mux::receive(reader, &self.streams)
    }

    /// Registers listener `id`, whose socket `stop` shuts down.
    pub fn add_listener(&self, id: u64, stop: OwnedFd) -> Result<(), RemoteError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(error::new(ErrorKind::Io, "connection closed"));
        }
        let mut listeners = lock(&self.listeners);
        if listeners.contains_key(&id) {
            return Err(error::invalid(format!("listener {id} already exists")));
        }
        listeners.insert(id, stop);
        Ok(())
    }

    pub fn has_listener(&self, id: u64) -> bool {
        lock(&self.listeners).contains_key(&id)
    }

    /// Stops listener `id`: its accept loop wakes and ends. `false` if there
    /// was no such listener.
    pub fn remove_listener(&self, id: u64) -> bool {
        let stop = lock(&self.listeners).remove(&id);
        if let Some(fd) = &stop {
            sys::shutdown_socket(fd.as_fd());
        }
        stop.is_some()
    }

    /// Unique among the agent's connections.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn handles(&self) -> &Handles {
        &self.handles
    }

    fn closed_error() -> io::Error {
        io::Error::new(io::ErrorKind::NotConnected, "connection closed")
    }

    /// Writes `msg` as one frame; fails once the connection is closed.
    pub fn send(&self, msg: &Message) -> io::Result<()> {
        let frame = frame::encode(msg).map_err(io::Error::other)?;
        self.send_frame(&frame)
    }

    /// Writes `msgs` as consecutive frames in one write, so the host gets
    /// them together.
    pub fn send_all(&self, msgs: &[Message]) -> io::Result<()> {
        let mut frames = Vec::new();
        for msg in msgs {
            frames.extend(frame::encode(msg).map_err(io::Error::other)?);
        }
        self.send_frame(&frames)
    }

    /// Writes one already-encoded frame.
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        let state = self.port_for_writing()?;
        self.write_all_port(&state.port, frame)
    }

    /// Writes a `Data` frame of `payload` on `stream`, the payload
    /// straight from where it is. A failure past the header leaves a
    /// partial frame, which ends the connection.
    pub fn send_data(&self, stream: u32, payload: &[u8]) -> io::Result<()> {
        let mut header = [0u8; frame::DATA_HEADER_MAX];
        let len = frame::data_header(stream, payload.len(), &mut header);
        let state = self.port_for_writing()?;
        self.write_all_port(&state.port, &header[frame::DATA_HEADER_MAX - len..])?;
        let sent = self.write_all_port(&state.port, payload);
        if sent.is_err() {
            drop(state);
            self.close();
        }
        sent
    }

    fn write_all_port(&self, port: &Option<Port>, bytes: &[u8]) -> io::Result<()> {
        let mut rest = bytes;
        self.write_port(port, rest.len(), |port| {
            let n = (&mut &*port).write(rest)?;
            rest = &rest[n..];
            Ok(n)
        })
    }

    /// Writes a `Data` frame whose payload, `len` bytes, waits in `pipe`:
    /// the header is written, then the payload spliced into the port, so
    /// its pages reach the host without being copied through the agent. A
    /// failure past the header leaves a partial frame, which ends the
    /// connection.
    pub fn send_spliced(&self, header: &[u8], pipe: BorrowedFd<'_>, len: usize) -> io::Result<()> {
        let state = self.port_for_writing()?;
        self.write_all_port(&state.port, header)?;
        let spliced = self.write_port(&state.port, len, |port| {
            Ok(rustix::pipe::splice(
                pipe,
                None,
                port,
                None,
                len,
                rustix::pipe::SpliceFlags::MOVE,
            )?)
        });
        if spliced.is_err() {
            drop(state);
            self.close();
        }
        spliced
    }

    /// Runs `write` on the (non-blocking) port until it wrote `len` bytes
    /// in all, waiting while the port is full.
    fn write_port(
        &self,
        port: &Option<Port>,
        len: usize,
        mut write: impl FnMut(&Port) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            if self.closed.load(Ordering::Relaxed) {
                return Err(Self::closed_error());
            }
            let port = port.as_ref().ok_or_else(Self::closed_error)?;
            match write(port) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(port, PollFlags::OUT)];
                    sys::poll(&mut fds, Some(WRITE_POLL))?;
                    let revents = fds[0].revents();
                    if !revents.contains(PollFlags::OUT) && !revents.is_empty() {
                        // Hung up: poll returns at once, so pace the retries
                        // until the reader notices and closes the connection.
                        thread::sleep(WRITE_POLL);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Like [`send`](Self::send), but returns only once the host took the
    /// frame: a blocking write to a virtio port waits for that.
    pub fn send_flushed(&self, msg: &Message) -> io::Result<()> {
        let frame = frame::encode(msg).map_err(io::Error::other)?;
        let state = self.port_for_writing()?;
        let port = state.port.as_ref().ok_or_else(Self::closed_error)?;
        sys::set_nonblocking(port, false)?;
        let result = (&mut &*port).write_all(&frame);
        sys::set_nonblocking(port, true)?;
        result
    }

    /// The answer to request `id`, to be sent exactly once.
    pub fn reply(self: &Arc<Self>, id: u64) -> Reply {
        Reply {
            conn: self.clone(),
            id,
            sent: false,
        }
    }

    /// Registers a host → guest stream.
    pub fn open_input(&self, stream: u32) -> Result<Arc<Inbound>, RemoteError> {
        let input = Arc::new(Inbound::new());
        lock(&self.streams)
            .add_inbound(stream, input.clone())
            .map_err(|e| error::invalid(e.to_string()))?;
        Ok(input)
    }

    /// Registers a guest → host stream.
    pub fn open_output(&self, stream: u32) -> Result<Arc<Output>, RemoteError> {
        let output = Arc::new(Output::new().map_err(|e| error::os("create stream wakeup", &e))?);
        lock(&self.streams)
            .add_outbound(stream, output.clone())
            .map_err(|e| error::invalid(e.to_string()))?;
        Ok(output)
    }

    /// Unregisters `input` and breaks it off: later frames for it are
    /// dropped. Only while `stream` is still `input`: once ids went
    /// round, a late release must not close a new stream.
    pub fn release_input(&self, stream: u32, input: &Arc<Inbound>) {
        lock(&self.streams).remove_inbound(stream, input);
        input.break_off(Broken::Closed);
    }

    /// Like [`release_input`](Self::release_input), for an output; its
    /// pump stops.
    pub fn release_output(&self, stream: u32, output: &Arc<Output>) {
        lock(&self.streams).remove_outbound(stream, output);
        output.end(Broken::Closed);
    }

    /// Closes the connection after `grace`, unless it is closed before:
    /// a frame being sent gets that long to go out.
    pub fn close_after(self: &Arc<Self>, grace: Duration) -> io::Result<()> {
        let conn = self.clone();
        self.spawn("goodbye".into(), move || {
            let gone = lock(&conn.gone);
            drop(
                conn.gone_changed
                    .wait_timeout_while(gone, grace, |gone| !*gone)
                    .unwrap_or_else(|e| e.into_inner()),
            );
            conn.close();
        })
    }

    /// Ends the connection: every stream breaks off, later sends fail, and
    /// the port is released once the current writer gives up. A socket is
    /// shut down, which the host sees as the end of the channel.
    pub fn close(&self) {
        self.shut(true);
    }

    /// Closes the connection; `hang_up` also shuts a socket port down,
    /// which a rebirth, going on over the same socket, must not.
    fn shut(&self, hang_up: bool) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(socket) = self.hang_up.as_ref().filter(|_| hang_up) {
            sys::shutdown_socket(socket.as_fd());
        }
        // Held writers wake and fail.
        drop(lock(&self.port));
        self.unquiet.notify_all();
        *lock(&self.gone) = true;
        self.gone_changed.notify_all();
        lock(&self.streams).end();
        self.handles.close_all();
        for (_, fd) in lock(&self.listeners).drain() {
            sys::shutdown_socket(fd.as_fd());
        }
        drop(lock(&self.port).port.take());
    }
}

/// The pending answer to one request. Dropping it unanswered (say, when
/// its handler panicked) answers with an error, so the host never waits in
/// vain.
#[derive(Debug)]
pub struct Reply {
    conn: Arc<Conn>,
    id: u64,
    sent: bool,
}

impl Reply {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// The answer as a message for the caller to send, e.g. together with
    /// others through [`Conn::send_all`].
    pub fn into_message(mut self, body: Result<Response, RemoteError>) -> Message {
        self.message(body)
    }

    fn message(&mut self, body: Result<Response, RemoteError>) -> Message {
        self.sent = true;
        Message::Response { id: self.id, body }
    }

    pub fn send(mut self, body: Result<Response, RemoteError>) {
        let msg = self.message(body);
        // A failed send means the connection is gone; its reader reports that.
        let _ = self.conn.send(&msg);
    }

    /// Sends and waits until the host took the answer.
    pub fn send_flushed(mut self, body: Result<Response, RemoteError>) {
        let msg = self.message(body);
        if let Err(e) = self.conn.send_flushed(&msg) {
            log!("send response {}: {}", self.id, error::describe(&e));
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.sent {
            let msg = self.message(Err(error::new(
                ErrorKind::Io,
                "the agent failed to handle the request",
            )));
            let _ = self.conn.send(&msg);
        }
    }
}

/// The reading half of the non-blocking port, blocking in `poll` instead.
#[derive(Debug)]
pub struct PortReader(pub Port);

impl Read for PortReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.0).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
                    sys::poll(&mut fds, None)?;
                }
                other => return other,
            }
        }
    }
}

/// A `Started` answer held back; see [`Conn::hold_started`].
#[derive(Debug)]
pub struct HeldStarted(Arc<Conn>);

impl Drop for HeldStarted {
    fn drop(&mut self) {
        *lock(&self.0.held_started) -= 1;
        self.0.held_started_sent.notify_all();
    }
}
