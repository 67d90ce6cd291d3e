//! The host end of the agent connection: one reader thread demultiplexes
//! frames into request replies, stream buffers and process exits; callers
//! write frames under one lock. What a frame does to the host's state is
//! [`Tables::dispatch`], a plain function of the message, so it can be
//! driven without a VM (unit tests, the `dispatch` fuzz target).
//!
//! Liveness: [`Channel::check_alive`] pings a quiet guest and calls it dead
//! when nothing at all comes back within [`ANSWER_TIMEOUT`]; the instance
//! calls it periodically and ends the channel with the reason.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cc_protocol::flow::{Broken, Inbound, Outbound};
use cc_protocol::frame::{Frame, FrameReader};
use cc_protocol::mux::{self, Calls, ReceiveError, Received, Side, Streams, Violation};
use cc_protocol::{
    frame, ExitStatus, Message, RemoteError, Request, Response, DATA_CHUNK, GUEST_STREAM_BASE,
    PROTOCOL_VERSION,
};

use cc_cancel::CancelToken;

use crate::cancel;
use crate::error::{Error, Result};
use crate::pause::PauseClock;
use crate::phases::{self, Phase};

type Reply = std::result::Result<Response, RemoteError>;

/// A write blocked this long fails, unless the guest was paused meanwhile
/// (a paused guest reads nothing; the write goes on after its resume).
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the first resuming ping waits before it is sent again; each
/// retry waits twice as long, up to [`PING_RETRY_MAX`]. A restored agent
/// usually sees its port reset and re-opens it, and a ping sent meanwhile
/// is lost: retrying early keeps that cheap.
const PING_RETRY: Duration = Duration::from_millis(10);
const PING_RETRY_MAX: Duration = Duration::from_millis(250);

/// A guest heard from less than this long ago is not pinged.
const QUIET: Duration = Duration::from_millis(200);
/// How long a pinged guest may stay silent before it is called dead. The
/// agent answers pings on its reader thread at the highest priority, so a
/// second is plenty even under TCG on a loaded host; a busy guest is not
/// silent (its traffic counts as an answer).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Connections a listener keeps waiting for `accept`; the guest's further
/// ones are reset, like a full TCP backlog. Bounds what a guest flooding a
/// listener costs the host.
const ACCEPT_BACKLOG: usize = 64;

/// Why a channel is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Gone {
    /// The instance was closed by its owner.
    Closed,
    /// The guest died, shut down, stopped answering or broke the protocol.
    Dead(String),
}

impl Gone {
    /// What a caller waiting on the channel gets.
    pub(crate) fn error(&self) -> Error {
        match self {
            Gone::Closed => Error::AlreadyClosed,
            Gone::Dead(why) => Error::NotRunning(why.clone()),
        }
    }
}

/// Where a process's exit is delivered.
#[derive(Debug, Default)]
pub(crate) struct ExitSlot {
    status: Mutex<Option<std::result::Result<ExitStatus, Gone>>>,
    set: Condvar,
}

impl ExitSlot {
    fn fill(&self, value: std::result::Result<ExitStatus, Gone>) {
        let mut s = lock(&self.status);
        if s.is_none() {
            *s = Some(value);
        }
        self.set.notify_all();
    }

    fn wake(&self) {
        let _held = lock(&self.status);
        self.set.notify_all();
    }

    /// Waits for the exit until `deadline`; `Ok(None)` on timeout. The
    /// current call's cancel token ends the wait.
    pub(crate) fn wait(self: &Arc<Self>, deadline: Option<Instant>) -> Result<Option<ExitStatus>> {
        let _wake = cancel::wake_on(self, Self::wake);
        let mut s = lock(&self.status);
        loop {
            match &*s {
                Some(Ok(status)) => return Ok(Some(*status)),
                Some(Err(gone)) => return Err(gone.error()),
                None => {}
            }
            if cancel::is_cancelled() {
                return Err(cancel::cancelled("wait"));
            }
            s = match deadline {
                None => self.set.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.set
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// A connection a guest program made to one of the host's listeners, its
/// streams already registered.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) peer: String,
    pub(crate) to_guest: (u32, Arc<Outbound>),
    pub(crate) from_guest: (u32, Arc<Inbound>),
}

#[derive(Debug, Default)]
struct QueueState {
    waiting: VecDeque<Accepted>,
    /// Why no more connections will come, once that is so.
    ended: Option<Ended>,
}

/// Why a listener's queue ended.
#[derive(Debug, Clone)]
pub(crate) enum Ended {
    /// The listener was closed.
    Closed,
    /// The channel went down.
    Lost(Gone),
}

/// Connections accepted in the guest for one host listener, waiting for
/// the host's `accept`.
#[derive(Debug, Default)]
pub(crate) struct AcceptQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

impl AcceptQueue {
    fn push(&self, conn: Accepted) {
        lock(&self.state).waiting.push_back(conn);
        self.ready.notify_all();
    }

    fn len(&self) -> usize {
        lock(&self.state).waiting.len()
    }

    fn end(&self, why: Ended) -> VecDeque<Accepted> {
        let mut s = lock(&self.state);
        s.ended.get_or_insert(why);
        self.ready.notify_all();
        std::mem::take(&mut s.waiting)
    }

    fn wake(&self) {
        let _held = lock(&self.state);
        self.ready.notify_all();
    }

    /// The next connection, waiting until `deadline` (or none): `Ok(None)`
    /// on timeout or when the current call's token is cancelled, `Err` once
    /// the queue ended (connections already queued still come first unless
    /// the listener was closed).
    pub(crate) fn pop(
        self: &Arc<Self>,
        deadline: Option<Instant>,
    ) -> std::result::Result<Option<Accepted>, Ended> {
        let _wake = cancel::wake_on(self, Self::wake);
        let mut s = lock(&self.state);
        loop {
            if let Some(Ended::Closed) = s.ended {
                return Err(Ended::Closed);
            }
            if let Some(conn) = s.waiting.pop_front() {
                return Ok(Some(conn));
            }
            if let Some(why) = &s.ended {
                return Err(why.clone());
            }
            if cancel::is_cancelled() {
                return Ok(None);
            }
            s = match deadline {
                None => self.ready.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.ready
                        .wait_timeout(s, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// The host's side of one connection: everything a guest frame can reach.
/// Streams and request correlation are the shared multiplexer's
/// ([`mux`]); processes and listeners are the host's own.
#[derive(Debug)]
pub(crate) struct Tables {
    calls: Calls<Reply>,
    streams: Streams,
    exits: HashMap<u64, Arc<ExitSlot>>,
    listeners: HashMap<u64, Arc<AcceptQueue>>,
    /// Why the connection is gone, once it is.
    dead: Option<Gone>,
}

impl Default for Tables {
    fn default() -> Self {
        Self {
            calls: Calls::default(),
            streams: Streams::new(Side::Host),
            exits: HashMap::new(),
            listeners: HashMap::new(),
            dead: None,
        }
    }
}

impl AsMut<Streams> for Tables {
    fn as_mut(&mut self) -> &mut Streams {
        &mut self.streams
    }
}

/// What the host says of a guest that broke the protocol.
fn violation(v: Violation) -> String {
    format!("the guest agent {v}")
}

impl Tables {
    /// Applies one message from the guest. `Ok` holds guest streams to
    /// reset (a connection nobody will accept); `Err` ends the channel for
    /// that reason: the guest broke the protocol or said goodbye. Frames
    /// that may race with the host's own teardown (data or credit for a
    /// stream it closed, the answer to a request it gave up on, the exit of
    /// a process it forgot) are dropped; nothing a guest sends makes this
    /// panic or grow without bound.
    pub(crate) fn dispatch(
        &mut self,
        msg: Message,
        resumed: bool,
    ) -> std::result::Result<Vec<u32>, String> {
        let Some(msg) = self.streams.dispatch(msg).map_err(violation)? else {
            return Ok(Vec::new());
        };
        match msg {
            Message::Response { id, body } => {
                self.calls.answer(id, body);
            }
            Message::Accepted {
                listener,
                peer,
                to_guest,
                from_guest,
            } => {
                let t = &mut self.streams;
                if to_guest < GUEST_STREAM_BASE
                    || from_guest < GUEST_STREAM_BASE
                    || to_guest == from_guest
                    || t.in_use(to_guest)
                    || t.in_use(from_guest)
                {
                    return Err(format!(
                        "the guest agent accepted a connection on bad streams {to_guest}/{from_guest}"
                    ));
                }
                // Named now, so that what the guest sends on them before it
                // hears of a refusal is dropped, not a violation.
                t.announce(to_guest);
                t.announce(from_guest);
                match self.listeners.get(&listener) {
                    Some(queue) if queue.len() < ACCEPT_BACKLOG => {
                        let inbound = Arc::new(Inbound::new());
                        let outbound = Arc::new(Outbound::new());
                        t.add_inbound(from_guest, inbound.clone())
                            .and_then(|()| t.add_outbound(to_guest, outbound.clone()))
                            .map_err(|e| e.to_string())?;
                        queue.push(Accepted {
                            peer,
                            to_guest: (to_guest, outbound),
                            from_guest: (from_guest, inbound),
                        });
                    }
                    // Closed meanwhile, or its backlog is full.
                    _ => return Ok(vec![to_guest, from_guest]),
                }
            }
            Message::Exited { process, status } => {
                if let Some(slot) = self.exits.remove(&process) {
                    slot.fill(Ok(status));
                }
            }
            Message::Goodbye { reason } => {
                return Err(format!("the guest agent shut down: {reason}"));
            }
            Message::Hello { version, .. } if resumed && version == PROTOCOL_VERSION => {}
            Message::Hello { .. } | Message::Request { .. } => {
                return Err("the guest agent sent a message out of turn".into());
            }
            // Applied by the stream table above.
            Message::Data { .. }
            | Message::Eof { .. }
            | Message::Credit { .. }
            | Message::Reset { .. } => {}
        }
        Ok(Vec::new())
    }

    /// Fails everything waiting with `gone`; the first reason sticks.
    fn end(&mut self, gone: Gone) {
        if self.dead.is_some() {
            return;
        }
        tracing::debug!(?gone, "agent channel down");
        self.calls.end();
        self.streams.end();
        for (_, slot) in self.exits.drain() {
            slot.fill(Err(gone.clone()));
        }
        for (_, queue) in self.listeners.drain() {
            // Their streams were broken off above.
            queue.end(Ended::Lost(gone.clone()));
        }
        self.dead = Some(gone);
    }
}

/// The writing half of the channel, and whether it is held quiet while
/// the guest is saved.
#[derive(Debug)]
struct Writer {
    socket: UnixStream,
    /// `Quiesce` was sent: other senders wait until [`Quiet`] ends.
    quiesced: bool,
    /// Frames the reader thread, which must never wait, had to send while
    /// the channel was quiet; they follow `Unquiesce`.
    deferred: Vec<Vec<u8>>,
}

#[derive(Debug)]
struct Shared {
    writer: Mutex<Writer>,
    /// Notified when the quiet ends or the channel goes down.
    unquiet: Condvar,
    tables: Mutex<Tables>,
    /// Notified, with `tables` held, when the channel goes down.
    down: Condvar,
    /// When the channel started; `heard` counts from it.
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last frame from the guest.
    heard: AtomicU64,
    /// When the liveness check began waiting for a sign of life, if it is.
    asked: Mutex<Option<u64>>,
    next_process: AtomicU64,
    next_listener: AtomicU64,
    /// Resumed after a restore: the agent may greet again, harmlessly.
    resumed: bool,
    /// Whether the guest is paused; time limits count only running time.
    pause: PauseClock,
}

/// A request sent and not yet answered.
#[derive(Debug)]
pub(crate) struct Pending {
    id: u64,
    rx: mpsc::Receiver<Reply>,
}

impl Pending {
    /// Waits up to `timeout` of the guest's running time (paused time does
    /// not count) for the answer. The current call's cancel token forgets
    /// the request, which wakes this wait.
    pub(crate) fn wait(self, channel: &Channel, timeout: Duration) -> Result<Reply> {
        let id = self.id;
        let _wake = cancel::wake_on(&channel.shared, move |shared: &Shared| {
            lock(&shared.tables).calls.forget(id);
        });
        let clock = &channel.shared.pause;
        let deadline = clock.deadline_in(timeout);
        let mut answer = Err(mpsc::RecvTimeoutError::Timeout);
        while matches!(answer, Err(mpsc::RecvTimeoutError::Timeout)) && !deadline.passed(clock) {
            let left = deadline
                .now(clock)
                .saturating_duration_since(Instant::now());
            answer = self.rx.recv_timeout(left);
        }
        match answer {
            Ok(reply) => Ok(reply),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                lock(&channel.shared.tables).calls.forget(self.id);
                Err(Error::Timeout("request to the guest agent".into()))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) if cancel::is_cancelled() => {
                Err(cancel::cancelled("request"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(channel.gone_error()),
        }
    }
}

/// A connected, version-checked agent channel.
#[derive(Debug)]
pub(crate) struct Channel {
    shared: Arc<Shared>,
    socket: UnixStream,
    reader: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Channel {
    /// Waits up to `timeout` for the agent's greeting, checks its version
    /// and starts the reader thread. Returns the agent's self-description.
    pub(crate) fn connect(socket: UnixStream, timeout: Duration) -> Result<(Channel, String)> {
        socket
            .set_read_timeout(Some(timeout))
            .map_err(Error::io("configure", "agent channel"))?;
        let mut reader = frame_reader(&socket)?;
        // A cancelled boot shuts the socket down: the read ends at once.
        let boot_cancel = match cancel::current() {
            Some(_) => Some(Arc::new(
                socket
                    .try_clone()
                    .map_err(Error::io("dup", "agent channel"))?,
            )),
            None => None,
        };
        let wake = boot_cancel.as_ref().and_then(|s| {
            cancel::wake_on(s, |s: &UnixStream| {
                let _ = s.shutdown(std::net::Shutdown::Both);
            })
        });
        let greeting = reader.read_frame();
        drop(wake);
        let agent = match greeting {
            Ok(Some(Frame::Message(Message::Hello { version, agent })))
                if version == PROTOCOL_VERSION =>
            {
                agent
            }
            Ok(Some(Frame::Message(Message::Hello { version, .. }))) => {
                return Err(Error::ProtocolMismatch {
                    guest: version,
                    host: PROTOCOL_VERSION,
                })
            }
            Ok(Some(other)) => {
                return Err(Error::Protocol(format!(
                    "expected a greeting, got {other:?}"
                )))
            }
            Ok(None) => {
                return Err(Error::NotRunning(
                    "the guest closed the channel before greeting".into(),
                ))
            }
            Err(frame::FrameError::Decode(_)) => {
                match frame::hello_version(reader.last_payload()) {
                    Some(version) => {
                        return Err(Error::ProtocolMismatch {
                            guest: version,
                            host: PROTOCOL_VERSION,
                        })
                    }
                    None => return Err(Error::Protocol("undecodable greeting".into())),
                }
            }
            Err(frame::FrameError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Timeout(format!(
                    "waiting {} s for the guest agent",
                    timeout.as_secs()
                )))
            }
            Err(e) => return Err(Error::Protocol(e.to_string())),
        };
        Ok((Channel::start(socket, reader, false)?, agent))
    }

    /// Resumes the conversation with an agent restored from a save (a
    /// template, a park or a branch): `Rebirth` is sent until it is
    /// answered, for up to `timeout`, so one lost while the agent re-opens
    /// its port is simply sent again (its token makes a repeat harmless).
    /// The agent then serves this channel afresh, whatever it was doing on
    /// the old one. The greeting of an agent that did start over is
    /// accepted too.
    pub(crate) fn resume(socket: UnixStream, timeout: Duration) -> Result<Channel> {
        let reader = frame_reader(&socket)?;
        let channel = Channel::start(socket, reader, true)?;
        let token = rebirth_token();
        let deadline = Instant::now() + timeout;
        let mut retry = PING_RETRY;
        loop {
            let answer = channel
                .begin(Request::Rebirth { token })?
                .wait(&channel, retry);
            retry = (retry * 2).min(PING_RETRY_MAX);
            match answer {
                Ok(Ok(Response::Done)) => return Ok(channel),
                Ok(other) => {
                    return Err(Error::Protocol(format!(
                        "unexpected answer to a rebirth: {other:?}"
                    )))
                }
                Err(Error::Timeout(_)) if Instant::now() < deadline => {}
                Err(Error::Timeout(_)) => {
                    return Err(Error::Timeout(format!(
                        "waiting {} s for the restored guest agent",
                        timeout.as_secs()
                    )))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts the reader thread on a connected channel.
    fn start(
        socket: UnixStream,
        reader: FrameReader<UnixStream>,
        resumed: bool,
    ) -> Result<Channel> {
        socket
            .set_read_timeout(None)
            .map_err(Error::io("configure", "agent channel"))?;
        let writer = socket
            .try_clone()
            .map_err(Error::io("dup", "agent channel"))?;
        // The agent always drains the channel (flow control bounds what it
        // buffers), so a write blocked this long means the guest is wedged:
        // fail it rather than hang closes and drops behind the writer lock.
        writer
            .set_write_timeout(Some(WRITE_TIMEOUT))
            .map_err(Error::io("configure", "agent channel"))?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(Writer {
                socket: writer,
                quiesced: false,
                deferred: Vec::new(),
            }),
            unquiet: Condvar::new(),
            tables: Mutex::new(Tables::default()),
            down: Condvar::new(),
            next_process: AtomicU64::new(1),
            next_listener: AtomicU64::new(1),
            resumed,
            epoch: Instant::now(),
            heard: AtomicU64::new(0),
            asked: Mutex::new(None),
            pause: PauseClock::default(),
        });
        let shared2 = shared.clone();
        let handle = std::thread::Builder::new()
            .name("cc-agent-reader".into())
            .spawn(move || read_loop(&shared2, reader))
            .map_err(Error::io("spawn", "agent reader thread"))?;
        Ok(Channel {
            shared,
            socket,
            reader: Mutex::new(Some(handle)),
        })
    }

    /// Why the channel is gone, if it is.
    pub(crate) fn dead(&self) -> Option<Gone> {
        lock(&self.shared.tables).dead.clone()
    }

    /// Waits until the channel goes down and says why; `None` when the
    /// current call's cancel token stops the wait first.
    pub(crate) fn wait_down(&self) -> Option<Gone> {
        let _wake = cancel::wake_on(&self.shared, |shared: &Shared| {
            let _held = lock(&shared.tables);
            shared.down.notify_all();
        });
        let mut t = lock(&self.shared.tables);
        loop {
            if let Some(gone) = &t.dead {
                return Some(gone.clone());
            }
            if cancel::is_cancelled() {
                return None;
            }
            t = self.shared.down.wait(t).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Pings a guest that has been quiet for [`QUIET`]; `Err` with the
    /// reason once a guest asked for a sign of life sent nothing for
    /// [`ANSWER_TIMEOUT`]. Any frame counts as an answer, so a guest busy
    /// streaming is never pinged. Never blocks: a ping that cannot be
    /// written at once (a writer is stuck on a guest that stopped reading)
    /// is not needed to see the guest stay silent.
    /// A paused guest answers nothing and is never asked.
    pub(crate) fn check_alive(&self) -> std::result::Result<(), String> {
        let shared = &self.shared;
        let mut asked = lock(&shared.asked);
        if shared.pause.is_paused() {
            *asked = None;
            return Ok(());
        }
        let now = shared.epoch.elapsed().as_nanos() as u64;
        let heard = shared.heard.load(Ordering::Acquire);
        match *asked {
            Some(since) if heard >= since => *asked = None,
            Some(since) if now - since >= ANSWER_TIMEOUT.as_nanos() as u64 => {
                // Bytes waiting in the socket: the host's reader is behind,
                // not the guest.
                if unread(&self.socket) {
                    return Ok(());
                }
                return Err(format!(
                    "the guest stopped answering (nothing for {:.1} s after a ping)",
                    (now - since) as f64 / 1e9
                ));
            }
            Some(_) => return Ok(()),
            None => {}
        }
        if now.saturating_sub(heard) >= QUIET.as_nanos() as u64 {
            *asked = Some(now);
            // Its answer has no waiter: arriving is all it has to do.
            let id = lock(&shared.tables).calls.unanswered();
            if let Ok(bytes) = frame::encode(&Message::Request {
                id,
                body: Request::Ping,
            }) {
                if let Ok(mut w) =
                    shared
                        .writer
                        .try_lock()
                        .map_err(drop)
                        .and_then(|w| match w.quiesced {
                            false => Ok(w),
                            true => Err(()),
                        })
                {
                    if let Err(e) = send_now(&mut w.socket, &bytes) {
                        drop(w);
                        mark_dead(
                            shared,
                            Gone::Dead(format!("writing to the guest agent: {e}")),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The guest's pause state and paused time.
    pub(crate) fn pause_clock(&self) -> &PauseClock {
        &self.shared.pause
    }

    /// Counts the guest as just heard from, with no ping outstanding: after
    /// a resume, the paused time is not silence.
    pub(crate) fn reset_liveness(&self) {
        let shared = &self.shared;
        let mut asked = lock(&shared.asked);
        *asked = None;
        shared
            .heard
            .store(shared.epoch.elapsed().as_nanos() as u64, Ordering::Release);
    }

    /// Sends `body` and waits up to `timeout` for its reply.
    pub(crate) fn request(&self, body: Request, timeout: Duration) -> Result<Reply> {
        self.begin(body)?.wait(self, timeout)
    }

    /// Sends `body` without waiting: for requests whose answer comes after
    /// stream traffic (`WriteFile`). Every request starts here, so this is
    /// where a paused guest refuses new ones ([`Error::Paused`]).
    pub(crate) fn begin(&self, body: Request) -> Result<Pending> {
        let named = body.streams();
        let (id, rx) = {
            let mut t = lock(&self.shared.tables);
            if let Some(gone) = &t.dead {
                return Err(gone.error());
            }
            if self.shared.pause.is_paused() {
                for stream in named {
                    t.streams.discard(stream);
                }
                return Err(Error::Paused);
            }
            t.calls.begin()
        };
        let bytes = match frame::encode(&Message::Request { id, body }) {
            Ok(bytes) => bytes,
            Err(e) => {
                // The agent never hears of the request, so its streams
                // must end without a frame: one for a stream the agent
                // never saw named would be a protocol violation.
                let mut t = lock(&self.shared.tables);
                t.calls.forget(id);
                for stream in named {
                    t.streams.discard(stream);
                }
                return Err(e.into());
            }
        };
        self.send_frame(&bytes)?;
        Ok(Pending { id, rx })
    }

    /// Why the channel is gone, as the error callers get.
    fn gone_error(&self) -> Error {
        self.dead()
            .map(|gone| gone.error())
            .unwrap_or_else(|| Error::NotRunning("the guest agent is gone".into()))
    }

    pub(crate) fn send(&self, msg: &Message) -> Result<()> {
        let bytes = frame::encode(msg)?;
        self.send_frame(&bytes)
    }

    fn send_frame(&self, bytes: &[u8]) -> Result<()> {
        send_frame(&self.shared, bytes).map_err(|()| self.gone_error())
    }

    pub(crate) fn new_process_id(&self) -> u64 {
        self.shared.next_process.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers where process `id`'s exit goes, before it is started.
    pub(crate) fn watch_exit(&self, id: u64) -> Arc<ExitSlot> {
        let slot = Arc::new(ExitSlot::default());
        let mut t = lock(&self.shared.tables);
        match &t.dead {
            Some(gone) => slot.fill(Err(gone.clone())),
            None => {
                t.exits.insert(id, slot.clone());
            }
        }
        slot
    }

    pub(crate) fn forget_exit(&self, id: u64) {
        lock(&self.shared.tables).exits.remove(&id);
    }

    /// Registers a new listener; connections accepted for it queue up in
    /// the returned queue. Returns its id.
    pub(crate) fn open_listener(&self) -> (u64, Arc<AcceptQueue>) {
        let id = self.shared.next_listener.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(AcceptQueue::default());
        let mut t = lock(&self.shared.tables);
        match &t.dead {
            Some(gone) => {
                queue.end(Ended::Lost(gone.clone()));
            }
            None => {
                t.listeners.insert(id, queue.clone());
            }
        }
        (id, queue)
    }

    /// Forgets listener `id`: its queue ends, and connections still waiting
    /// in it are aborted (their guest peers see the connection close).
    pub(crate) fn close_listener(&self, id: u64) {
        let queue = lock(&self.shared.tables).listeners.remove(&id);
        if let Some(queue) = queue {
            for conn in queue.end(Ended::Closed) {
                self.abort_accepted(&conn);
            }
        }
    }

    /// Closes both streams of a connection nobody will take.
    pub(crate) fn abort_accepted(&self, conn: &Accepted) {
        self.close_inbound(conn.from_guest.0, &conn.from_guest.1);
        self.close_outbound(conn.to_guest.0, &conn.to_guest.1);
    }

    /// A new guest → host stream (broken at once on a channel gone).
    pub(crate) fn open_inbound(&self) -> (u32, Arc<Inbound>) {
        let stream = Arc::new(Inbound::new());
        let mut t = lock(&self.shared.tables);
        let id = t.streams.allocate();
        // A fresh id is never in use.
        let _ = t.streams.add_inbound(id, stream.clone());
        (id, stream)
    }

    /// A new host → guest stream (broken at once on a channel gone).
    pub(crate) fn open_outbound(&self) -> (u32, Arc<Outbound>) {
        let stream = Arc::new(Outbound::new());
        let mut t = lock(&self.shared.tables);
        let id = t.streams.allocate();
        let _ = t.streams.add_outbound(id, stream.clone());
        (id, stream)
    }

    /// Reads from an inbound stream, returning credit to the guest. The
    /// current call's cancel token ends the wait.
    pub(crate) fn read(
        &self,
        id: u32,
        stream: &Arc<Inbound>,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        let started = Instant::now();
        let token = cancel::current();
        // A cancelled transfer stops even while data keeps coming.
        if token.as_ref().is_some_and(CancelToken::is_cancelled) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
        }
        let _wake = cancel::wake_on(stream, Inbound::wake);
        let r = stream.read_cancellable(buf, deadline, token.as_ref())?;
        phases::add(Phase::Read, started);
        if r.credit > 0 {
            // A lost channel surfaces on the next read; credit is moot then.
            let _ = self.send(&Message::Credit {
                stream: id,
                bytes: r.credit,
            });
        }
        if r.len == 0 && !buf.is_empty() {
            lock(&self.shared.tables).streams.remove_inbound(id, stream);
        }
        Ok(r.len)
    }

    /// Stops an inbound stream early; the guest's writer sees a broken pipe.
    pub(crate) fn close_inbound(&self, id: u32, stream: &Inbound) {
        if lock(&self.shared.tables).streams.remove_inbound(id, stream) && !stream.is_drained() {
            stream.break_off(Broken::Closed);
            let _ = self.send(&Message::Reset { stream: id });
        }
    }

    /// Writes all of `data` to an outbound stream within its credit. The
    /// current call's cancel token ends a wait for credit (what was sent
    /// before stays sent).
    pub(crate) fn write(&self, id: u32, stream: &Arc<Outbound>, data: &[u8]) -> io::Result<()> {
        let token = cancel::current();
        let _wake = cancel::wake_on(stream, Outbound::wake);
        let mut rest = data;
        while !rest.is_empty() {
            if token.as_ref().is_some_and(CancelToken::is_cancelled) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            let waited = Instant::now();
            let n = stream.acquire_cancellable(rest.len().min(DATA_CHUNK), None, token.as_ref())?;
            phases::add(Phase::CreditWait, waited);
            let mut header = [0u8; frame::DATA_HEADER_MAX];
            let len = frame::data_header(id, n, &mut header);
            // Header and payload go out in one system call straight from
            // where they are: the payload is never copied on the host.
            let sent = Instant::now();
            let mut frame = [
                IoSlice::new(&header[frame::DATA_HEADER_MAX - len..]),
                IoSlice::new(&rest[..n]),
            ];
            send_frame_vectored(&self.shared, &mut frame)
                .map_err(|()| io::Error::new(io::ErrorKind::BrokenPipe, self.gone_error()))?;
            phases::add(Phase::Send, sent);
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Ends an outbound stream: the guest reader sees end of file.
    pub(crate) fn close_outbound(&self, id: u32, stream: &Outbound) {
        stream.break_off(Broken::Closed);
        if lock(&self.shared.tables)
            .streams
            .remove_outbound(id, stream)
        {
            let _ = self.send(&Message::Eof { stream: id });
        }
    }

    /// Closes the conversation: everything waiting fails with
    /// [`Error::AlreadyClosed`] at once, then the agent is asked to shut
    /// down. `true` once it answered; `false` if it does not within
    /// `timeout`, stops answering pings meanwhile, or the channel was gone.
    pub(crate) fn close_gracefully(&self, timeout: Duration) -> bool {
        let (id, rx) = {
            let mut t = lock(&self.shared.tables);
            if t.dead.is_some() {
                return false;
            }
            t.end(Gone::Closed);
            self.shared.down.notify_all();
            // The reader still delivers answers to requests in the table.
            t.calls.begin()
        };
        if self
            .send(&Message::Request {
                id,
                body: Request::Shutdown,
            })
            .is_err()
        {
            return false;
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(reply) => return matches!(reply, Ok(Response::Done)),
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                // The guest hung up (QEMU exited) without answering.
                Err(mpsc::RecvTimeoutError::Timeout) if self.reader_finished() => return false,
                Err(mpsc::RecvTimeoutError::Timeout) if self.check_alive().is_err() => {
                    return false
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        false
    }

    fn reader_finished(&self) -> bool {
        match &*lock(&self.reader) {
            Some(reader) => reader.is_finished(),
            None => true,
        }
    }

    /// Holds the channel quiet while the guest is saved: `Quiesce` is
    /// sent and answered, after which the agent sends nothing, and every
    /// host sender but the reader (whose frames are deferred) waits until
    /// the returned guard ends the quiet. Everything the agent sent before
    /// its answer has been dispatched when this returns, so no frame of
    /// either side is in flight. Requests, streams, processes and
    /// listeners may be open: they go on after [`Quiet::lift`].
    pub(crate) fn quiesce(&self, timeout: Duration) -> Result<Quiet<'_>> {
        let (id, rx) = {
            let mut t = lock(&self.shared.tables);
            if let Some(gone) = &t.dead {
                return Err(gone.error());
            }
            // A paused guest would never answer.
            if self.shared.pause.is_paused() {
                return Err(Error::Paused);
            }
            t.calls.begin()
        };
        let bytes = frame::encode(&Message::Request {
            id,
            body: Request::Quiesce,
        })?;
        {
            let mut w = wait_unquiet(&self.shared).map_err(|()| self.gone_error())?;
            write_frame(&self.shared, &mut w, &mut [IoSlice::new(&bytes)])
                .map_err(|()| self.gone_error())?;
            // Nothing else goes out behind it.
            w.quiesced = true;
        }
        // From here on the guard lifts the quiet, whatever happens.
        let quiet = Quiet {
            channel: self,
            lifted: false,
        };
        match (Pending { id, rx }).wait(self, timeout)? {
            Ok(Response::Done) => Ok(quiet),
            Ok(other) => Err(Error::Protocol(format!(
                "unexpected answer to a quiesce: {other:?}"
            ))),
            Err(e) => Err(Error::Guest {
                op: "quiesce".into(),
                message: e.message,
            }),
        }
    }

    /// The next process id this channel hands out.
    pub(crate) fn next_process_id(&self) -> u64 {
        self.shared.next_process.load(Ordering::Relaxed)
    }

    /// Goes on numbering processes from `next`, as the channel a restored
    /// guest's agent had before it was parked did.
    pub(crate) fn continue_process_ids(&self, next: u64) {
        self.shared.next_process.fetch_max(next, Ordering::Relaxed);
    }

    /// Marks the channel gone (the first reason sticks), unblocks everyone,
    /// a writer stuck on a deaf guest included, and joins the reader.
    pub(crate) fn shut_down(&self, gone: Gone) {
        mark_dead(&self.shared, gone);
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = lock(&self.reader).take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.shut_down(Gone::Closed);
    }
}

/// The channel held quiet by [`Channel::quiesce`]; dropping it lifts the
/// quiet as [`Quiet::lift`] does.
#[derive(Debug)]
pub(crate) struct Quiet<'a> {
    channel: &'a Channel,
    lifted: bool,
}

impl Quiet<'_> {
    /// The guest saved runs on: `Unquiesce` goes out first, then what the
    /// reader deferred, and the waiting senders go on.
    pub(crate) fn lift(mut self) {
        self.lifted = true;
        lift_quiet(&self.channel.shared);
    }

    /// The guest saved has ended: the channel goes down with `gone` and
    /// stays quiet, so the waiting senders, and any later, fail with its
    /// error.
    pub(crate) fn end(mut self, gone: Gone) {
        self.lifted = true;
        mark_dead(&self.channel.shared, gone);
        self.channel.shared.unquiet.notify_all();
    }
}

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        if !self.lifted {
            lift_quiet(&self.channel.shared);
        }
    }
}

/// Ends the quiet, telling the agent first (on a channel still up).
fn lift_quiet(shared: &Shared) {
    let mut w = lock(&shared.writer);
    if lock(&shared.tables).dead.is_none() {
        // Its answer has no waiter: the agent's senders going on is all.
        let id = lock(&shared.tables).calls.unanswered();
        let deferred = std::mem::take(&mut w.deferred);
        let frames = frame::encode(&Message::Request {
            id,
            body: Request::Unquiesce,
        })
        .into_iter()
        .chain(deferred);
        for bytes in frames {
            if write_frame(shared, &mut w, &mut [IoSlice::new(&bytes)]).is_err() {
                break;
            }
        }
    }
    w.deferred.clear();
    w.quiesced = false;
    drop(w);
    shared.unquiet.notify_all();
}

/// A token no earlier channel to any copy of a guest used (see
/// [`Request::Rebirth`]).
fn rebirth_token() -> u64 {
    let bytes = crate::instance::random_bytes(8);
    u64::from_le_bytes(bytes.try_into().unwrap_or_default())
}

/// How often a sender waiting out a quiet checks whether the channel went
/// down meanwhile.
const QUIET_POLL: Duration = Duration::from_millis(100);

/// The writer, once the channel is not quiet; `Err` if it goes down while
/// quiet. (A channel marked down may still write: closing sends
/// `Shutdown` after failing every waiter.)
fn wait_unquiet(shared: &Shared) -> std::result::Result<MutexGuard<'_, Writer>, ()> {
    let mut w = lock(&shared.writer);
    loop {
        if !w.quiesced {
            return Ok(w);
        }
        if lock(&shared.tables).dead.is_some() {
            return Err(());
        }
        w = shared
            .unquiet
            .wait_timeout(w, QUIET_POLL)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Writes a small frame unless the socket is full (a guest that stopped
/// reading: its silence tells, no need to wait for room).
fn send_now(socket: &mut UnixStream, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: the pointer and length describe `bytes`; the fd is open.
    let n = unsafe {
        libc::send(
            socket.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    match n {
        n if n >= 0 => io::Write::write_all(socket, &bytes[n as usize..]),
        _ => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            e => Err(e),
        },
    }
}

/// Whether bytes wait unread in `socket`.
fn unread(socket: &UnixStream) -> bool {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which is valid.
    let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut n) };
    r == 0 && n > 0
}

/// A reader of the channel's frames, on a second handle of it.
fn frame_reader(socket: &UnixStream) -> Result<FrameReader<UnixStream>> {
    let handle = socket
        .try_clone()
        .map_err(Error::io("dup", "agent channel"))?;
    Ok(FrameReader::new(handle))
}

fn read_loop(shared: &Shared, mut reader: FrameReader<UnixStream>) {
    let why = loop {
        let received = match mux::receive(&mut reader, &shared.tables) {
            Ok(Some(received)) => received,
            Ok(None) => break "the guest stopped".to_string(),
            Err(ReceiveError::Violation(v)) => break violation(v),
            Err(e) => break format!("agent channel failed: {e}"),
        };
        shared
            .heard
            .store(shared.epoch.elapsed().as_nanos() as u64, Ordering::Release);
        let resets = match received {
            Received::Stream => Ok(Vec::new()),
            Received::Payload { since } => {
                phases::add(Phase::Receive, since);
                Ok(Vec::new())
            }
            Received::Message(msg) => lock(&shared.tables).dispatch(msg, shared.resumed),
        };
        let resets = match resets {
            Ok(resets) => resets,
            Err(why) => break why,
        };
        for stream in resets {
            let Ok(frame) = frame::encode(&Message::Reset { stream }) else {
                continue;
            };
            // The reader never waits out a quiet: it must read the answer
            // that ends it.
            let mut w = lock(&shared.writer);
            if w.quiesced {
                w.deferred.push(frame);
            } else if write_frame(shared, &mut w, &mut [IoSlice::new(&frame)]).is_err() {
                return;
            }
        }
    };
    mark_dead(shared, Gone::Dead(why));
}

/// Writes one frame; on failure the channel is marked dead.
fn send_frame(shared: &Shared, bytes: &[u8]) -> std::result::Result<(), ()> {
    send_frame_vectored(shared, &mut [IoSlice::new(bytes)])
}

/// Writes one frame given in pieces, without joining them; on failure the
/// channel is marked dead. A write that timed out while the guest was
/// paused goes on where it stopped.
/// A channel held quiet is waited out first.
fn send_frame_vectored(shared: &Shared, frame: &mut [IoSlice<'_>]) -> std::result::Result<(), ()> {
    let mut w = wait_unquiet(shared)?;
    write_frame(shared, &mut w, frame)
}

/// Writes one frame with the writer held; on failure the channel is marked
/// dead.
fn write_frame(
    shared: &Shared,
    w: &mut MutexGuard<'_, Writer>,
    frame: &mut [IoSlice<'_>],
) -> std::result::Result<(), ()> {
    let mut slices = frame;
    let mut paused_before = shared.pause.total_at(Instant::now());
    while !slices.is_empty() {
        match io::Write::write_vectored(&mut w.socket, slices) {
            Ok(0) => {
                mark_dead(
                    shared,
                    Gone::Dead("writing to the guest agent: wrote nothing".into()),
                );
                return Err(());
            }
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && (shared.pause.is_paused()
                        || shared.pause.total_at(Instant::now()) > paused_before) =>
            {
                paused_before = shared.pause.total_at(Instant::now());
            }
            Err(e) => {
                mark_dead(
                    shared,
                    Gone::Dead(format!("writing to the guest agent: {e}")),
                );
                return Err(());
            }
        }
    }
    Ok(())
}

/// Fails everything waiting on the channel with `gone`.
fn mark_dead(shared: &Shared, gone: Gone) {
    lock(&shared.tables).end(gone);
    shared.down.notify_all();
}

/// Feeds `data`, read as frames, to the host's dispatch over a connection
/// with requests pending, streams open both ways, processes running and a
/// listener: the `dispatch` fuzz target. Stops at the first frame that
/// does not decode or at the first error (which would end the channel).
/// Panics if dispatching panics or the host's state outgrows its bounds.
#[doc(hidden)]
pub fn fuzz_dispatch(data: &[u8]) {
    let (resumed, mut input) = match data.split_first() {
        Some((flags, rest)) => (flags & 1 == 1, rest),
        None => (false, data),
    };
    let mut t = Tables::default();
    let mut answers = Vec::new();
    for id in 1..=4 {
        answers.push(t.calls.begin().1);
        t.exits.insert(id, Arc::new(ExitSlot::default()));
    }
    for _ in 1..=2 {
        let id = t.streams.allocate();
        let _ = t.streams.add_inbound(id, Arc::new(Inbound::new()));
    }
    for _ in 1..=2 {
        let id = t.streams.allocate();
        let _ = t.streams.add_outbound(id, Arc::new(Outbound::new()));
    }
    let queue = Arc::new(AcceptQueue::default());
    t.listeners.insert(1, queue.clone());
    let mut buf = Vec::new();
    while let Ok(Some(msg)) = frame::read(&mut input, &mut buf) {
        let resets = match t.dispatch(msg, resumed) {
            Ok(resets) => resets,
            Err(_) => break,
        };
        assert!(resets.len() <= 2);
        assert!(queue.len() <= ACCEPT_BACKLOG);
        let (inbound, outbound) = t.streams.len();
        assert!(inbound <= 2 + ACCEPT_BACKLOG && outbound <= 2 + ACCEPT_BACKLOG);
        assert!(t.calls.len() <= 4 && t.exits.len() <= 4);
    }
    assert!(buf.capacity() <= cc_protocol::MAX_FRAME);
    t.end(Gone::Closed);
}

#[cfg(test)]
mod tests {
    //! Handshake checks against a fake agent on a socketpair (no VM).
    use super::*;
    use serde_bytes::ByteBuf;
    use std::io::Write;

    fn greet(payload: &[u8]) -> Result<(Channel, String)> {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let mut wire = (payload.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(payload);
        guest.write_all(&wire).unwrap();
        let result = Channel::connect(host, Duration::from_millis(500));
        drop(guest);
        result
    }

    fn hello(version: u32) -> Vec<u8> {
        frame::encode(&Message::Hello {
            version,
            agent: "test".into(),
        })
        .unwrap()[4..]
            .to_vec()
    }

    #[test]
    fn matching_version_connects() {
        let (channel, agent) = greet(&hello(PROTOCOL_VERSION)).unwrap();
        assert_eq!(agent, "test");
        channel.shut_down(Gone::Closed);
    }

    #[test]
    fn other_versions_are_refused_with_both_numbers() {
        let err = greet(&hello(PROTOCOL_VERSION + 1)).unwrap_err();
        assert!(
            matches!(err, Error::ProtocolMismatch { guest, host } if guest == PROTOCOL_VERSION + 1 && host == PROTOCOL_VERSION)
        );
        assert!(err.to_string().contains("scripts/setup.sh"), "{err}");
        // A future Hello with fields this build cannot decode.
        let err = greet(&[0, 7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(
            matches!(err, Error::ProtocolMismatch { guest: 7, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_silence_and_hangups_are_errors() {
        assert!(matches!(greet(&[9, 9, 9]).unwrap_err(), Error::Protocol(_)));
        let eof = greet(&[]).unwrap_err();
        assert!(
            matches!(eof, Error::Protocol(_) | Error::NotRunning(_)),
            "{eof:?}"
        );
        let (host, _guest) = UnixStream::pair().unwrap();
        let err = Channel::connect(host, Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::Timeout);
    }

    // ---- dispatch without a VM ----

    /// Stream 1 comes from the guest, 2 goes to it, 3 was opened and
    /// closed already.
    fn tables() -> Tables {
        let mut t = Tables::default();
        let ids: Vec<u32> = (0..3).map(|_| t.streams.allocate()).collect();
        assert_eq!(ids, [1, 2, 3]);
        t.streams.add_inbound(1, Arc::new(Inbound::new())).unwrap();
        t.streams
            .add_outbound(2, Arc::new(Outbound::new()))
            .unwrap();
        t
    }

    fn data(stream: u32, len: usize) -> Message {
        Message::Data {
            stream,
            bytes: serde_bytes::ByteBuf::from(vec![7u8; len]),
        }
    }

    fn accepted(listener: u64, n: u32) -> Message {
        Message::Accepted {
            listener,
            peer: "127.0.0.1:1".into(),
            to_guest: GUEST_STREAM_BASE + 2 * n,
            from_guest: GUEST_STREAM_BASE + 2 * n + 1,
        }
    }

    #[test]
    fn frames_for_streams_never_opened_end_the_channel() {
        for stream in [0, 4, 99, GUEST_STREAM_BASE] {
            for msg in [
                data(stream, 10),
                Message::Eof { stream },
                Message::Credit { stream, bytes: 1 },
                Message::Reset { stream },
            ] {
                let err = tables().dispatch(msg, false).unwrap_err();
                assert!(err.contains("never opened"), "{err}");
            }
        }
    }

    #[test]
    fn frames_for_closed_streams_requests_and_processes_are_dropped() {
        let mut t = tables();
        for msg in [
            data(3, 10),
            Message::Eof { stream: 3 },
            Message::Credit {
                stream: 3,
                bytes: u32::MAX,
            },
            Message::Reset { stream: 3 },
            Message::Response {
                id: 12345,
                body: Ok(Response::Pong),
            },
            Message::Exited {
                process: 777,
                status: ExitStatus::Code(0),
            },
        ] {
            assert_eq!(t.dispatch(msg, false), Ok(vec![]));
        }
        assert_eq!(t.streams.len(), (1, 1));
    }

    #[test]
    fn credit_not_owed_ends_the_channel() {
        let mut t = tables();
        let out = t.streams.outbound(2).unwrap().clone();
        assert_eq!(out.acquire(10, None).unwrap(), 10);
        let owed = Message::Credit {
            stream: 2,
            bytes: 10,
        };
        t.dispatch(owed, false).unwrap();
        let err = t
            .dispatch(
                Message::Credit {
                    stream: 2,
                    bytes: 1,
                },
                false,
            )
            .unwrap_err();
        assert!(err.contains("flow control"), "{err}");
        assert_eq!(
            out.acquire(usize::MAX, None).unwrap(),
            cc_protocol::STREAM_WINDOW as usize
        );
    }

    #[test]
    fn overrunning_a_window_ends_the_channel_with_a_clear_error() {
        let mut t = tables();
        let chunk = cc_protocol::DATA_CHUNK;
        for _ in 0..cc_protocol::STREAM_WINDOW as usize / chunk {
            t.dispatch(data(1, chunk), false).unwrap();
        }
        let err = t.dispatch(data(1, 1), false).unwrap_err();
        assert!(err.contains("flow control"), "{err}");
    }

    #[test]
    fn answers_reach_their_request_once() {
        let mut t = tables();
        let (id, rx) = t.calls.begin();
        for _ in 0..2 {
            let answer = Message::Response {
                id,
                body: Ok(Response::Pong),
            };
            t.dispatch(answer, false).unwrap();
        }
        assert!(matches!(rx.try_recv(), Ok(Ok(Response::Pong))));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn accepted_connections_are_checked_and_bounded() {
        let mut t = tables();
        let queue = Arc::new(AcceptQueue::default());
        t.listeners.insert(1, queue.clone());
        // Host-numbered, duplicate or already used streams are refused.
        for (to_guest, from_guest) in [
            (1, GUEST_STREAM_BASE),
            (GUEST_STREAM_BASE, GUEST_STREAM_BASE),
        ] {
            let msg = Message::Accepted {
                listener: 1,
                peer: String::new(),
                to_guest,
                from_guest,
            };
            assert!(t.dispatch(msg, false).unwrap_err().contains("bad streams"));
        }
        t.dispatch(accepted(1, 0), false).unwrap();
        assert!(t.dispatch(accepted(1, 0), false).is_err(), "streams reused");
        // Their frames are accepted now.
        t.dispatch(data(GUEST_STREAM_BASE + 1, 5), false).unwrap();
        // Unknown listener: both streams are reset.
        assert_eq!(
            t.dispatch(accepted(9, 1), false),
            Ok(vec![GUEST_STREAM_BASE + 2, GUEST_STREAM_BASE + 3])
        );
        // A flood fills the backlog, then is reset.
        for n in 2..ACCEPT_BACKLOG as u32 + 10 {
            let _ = t.dispatch(accepted(1, n), false).unwrap();
        }
        assert_eq!(queue.len(), ACCEPT_BACKLOG);
        assert_eq!(t.streams.len().0, 1 + ACCEPT_BACKLOG);
    }

    #[test]
    fn what_the_guest_sends_on_a_refused_connection_is_dropped() {
        let mut t = tables();
        let (to_guest, from_guest) = (GUEST_STREAM_BASE, GUEST_STREAM_BASE + 1);
        assert_eq!(
            t.dispatch(accepted(9, 0), false),
            Ok(vec![to_guest, from_guest])
        );
        // Sent before the guest heard of the resets.
        for msg in [
            data(from_guest, 5),
            Message::Eof { stream: from_guest },
            Message::Reset { stream: to_guest },
        ] {
            assert_eq!(t.dispatch(msg, false), Ok(vec![]));
        }
        assert_eq!(t.streams.len(), (1, 1));
    }

    #[test]
    fn goodbye_and_out_of_turn_messages_end_the_channel() {
        let mut t = tables();
        let goodbye = Message::Goodbye {
            reason: "SIGTERM".into(),
        };
        assert_eq!(
            t.dispatch(goodbye, false).unwrap_err(),
            "the guest agent shut down: SIGTERM"
        );
        let hello = || Message::Hello {
            version: PROTOCOL_VERSION,
            agent: String::new(),
        };
        assert!(t.dispatch(hello(), false).is_err());
        assert_eq!(t.dispatch(hello(), true), Ok(vec![]), "a resumed greeting");
        let request = Message::Request {
            id: 1,
            body: Request::Ping,
        };
        assert!(t.dispatch(request, false).is_err());
    }

    #[test]
    fn ending_fails_every_waiter_with_the_reason() {
        let mut t = tables();
        let exit = Arc::new(ExitSlot::default());
        t.exits.insert(1, exit.clone());
        let inbound = t.streams.inbound(1).unwrap().clone();
        t.end(Gone::Dead("QEMU exited".into()));
        t.end(Gone::Closed);
        let err = exit.wait(None).unwrap_err();
        assert!(
            matches!(&err, Error::NotRunning(why) if why == "QEMU exited"),
            "{err}"
        );
        let read = inbound.read(&mut [0u8; 4], None).unwrap_err();
        assert_eq!(read.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[test]
    fn fuzz_entry_point_survives_hostile_frames() {
        let mut wire = vec![1u8];
        for msg in [
            data(1, cc_protocol::DATA_CHUNK),
            accepted(1, 0),
            accepted(2, 1),
            Message::Credit {
                stream: 3,
                bytes: u32::MAX,
            },
            Message::Response {
                id: 999,
                body: Ok(Response::Done),
            },
            data(77, 3),
            Message::Goodbye { reason: "x".into() },
        ] {
            wire.extend(frame::encode(&msg).unwrap());
        }
        fuzz_dispatch(&wire);
        // A length at the limit with a truncated body, and garbage.
        let mut at_limit = vec![0u8];
        at_limit.extend((cc_protocol::MAX_FRAME as u32).to_le_bytes());
        at_limit.extend([3, 1, 2]);
        fuzz_dispatch(&at_limit);
        fuzz_dispatch(&[
            0, 9, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        fuzz_dispatch(&[]);
    }

    // ---- liveness against a fake agent ----

    fn connected() -> (Channel, UnixStream) {
        let (host, mut guest) = UnixStream::pair().unwrap();
        guest
            .write_all(
                &frame::encode(&Message::Hello {
                    version: PROTOCOL_VERSION,
                    agent: "test".into(),
                })
                .unwrap(),
            )
            .unwrap();
        let (channel, _) = Channel::connect(host, Duration::from_secs(5)).unwrap();
        (channel, guest)
    }

    /// Calls `check_alive` as the instance does until it fails or `limit`
    /// passes; returns the failure and when it came.
    fn watch(channel: &Channel, limit: Duration) -> Option<(String, Duration)> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Err(why) = channel.check_alive() {
                return Some((why, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    #[test]
    fn a_silent_guest_is_declared_dead_within_about_a_second() {
        let (channel, guest) = connected();
        let (why, after) = watch(&channel, Duration::from_secs(10)).expect("never declared dead");
        assert!(why.contains("stopped answering"), "{why}");
        assert!(after < Duration::from_secs(2), "took {after:?}");
        // What it was sent were pings.
        guest.set_nonblocking(true).unwrap();
        let msg = frame::read(&mut &guest, &mut Vec::new()).unwrap();
        assert!(
            matches!(
                msg,
                Some(Message::Request {
                    body: Request::Ping,
                    ..
                })
            ),
            "{msg:?}"
        );
        channel.shut_down(Gone::Closed);
    }

    #[test]
    fn a_guest_that_answers_pings_stays_alive() {
        let (channel, guest) = connected();
        let answering = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut writer = &guest;
            while let Ok(Some(Message::Request { id, .. })) = frame::read(&mut &guest, &mut buf) {
                let pong = Message::Response {
                    id,
                    body: Ok(Response::Pong),
                };
                if frame::write(&mut writer, &pong).is_err() {
                    break;
                }
            }
        });
        assert_eq!(watch(&channel, Duration::from_secs(3)), None);
        channel.shut_down(Gone::Closed);
        answering.join().unwrap();
    }

    #[test]
    fn streams_of_a_request_never_sent_end_without_a_frame() {
        let (channel, guest) = connected();
        let (id, stream) = channel.open_outbound();
        let huge = ByteBuf::from(vec![b'a'; cc_protocol::MAX_FRAME + 1]);
        let err = channel
            .begin(Request::WriteFile {
                path: huge,
                mode: 0o644,
                stream: id,
            })
            .unwrap_err();
        assert_eq!(err.code(), crate::ErrorCode::InvalidArgument, "{err}");
        channel.close_outbound(id, &stream);
        // The guest never heard of the stream: nothing about it arrives.
        guest.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let read = io::Read::read(&mut &guest, &mut byte).unwrap_err();
        assert_eq!(read.kind(), io::ErrorKind::WouldBlock);
        channel.shut_down(Gone::Closed);
    }

    #[test]
    fn senders_wait_out_a_quiet_and_follow_the_unquiesce() {
        let (channel, guest) = connected();
        let agent = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut seen = Vec::new();
            while let Ok(Some(msg)) = frame::read(&mut &guest, &mut buf) {
                if let Message::Request {
                    id,
                    body: Request::Quiesce,
                } = msg
                {
                    let done = Message::Response {
                        id,
                        body: Ok(Response::Done),
                    };
                    frame::write(&mut &guest, &done).unwrap();
                }
                seen.push(msg);
            }
            seen
        });
        let quiet = channel.quiesce(Duration::from_secs(5)).unwrap();
        std::thread::scope(|s| {
            let sender = s.spawn(|| channel.send(&Message::Eof { stream: 9 }));
            std::thread::sleep(Duration::from_millis(200));
            assert!(!sender.is_finished(), "a send waits out the quiet");
            quiet.lift();
            sender.join().unwrap().unwrap();
        });
        channel.shut_down(Gone::Closed);
        let seen = agent.join().unwrap();
        assert!(
            matches!(
                &seen[..],
                [
                    Message::Request {
                        body: Request::Quiesce,
                        ..
                    },
                    Message::Request {
                        body: Request::Unquiesce,
                        ..
                    },
                    Message::Eof { stream: 9 },
                ]
            ),
            "{seen:?}"
        );
    }

    #[test]
    fn a_quiet_ended_with_the_channel_fails_its_waiting_senders() {
        let (channel, guest) = connected();
        let agent = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Ok(Some(Message::Request { id, .. })) = frame::read(&mut &guest, &mut buf) {
                let done = Message::Response {
                    id,
                    body: Ok(Response::Done),
                };
                frame::write(&mut &guest, &done).unwrap();
            }
            guest
        });
        let quiet = channel.quiesce(Duration::from_secs(5)).unwrap();
        std::thread::scope(|s| {
            let sender = s.spawn(|| channel.send(&Message::Eof { stream: 9 }));
            std::thread::sleep(Duration::from_millis(100));
            quiet.end(Gone::Closed);
            let err = sender.join().unwrap().unwrap_err();
            assert_eq!(err.code(), crate::ErrorCode::AlreadyClosed, "{err}");
        });
        let _guest = agent.join().unwrap();
        channel.shut_down(Gone::Closed);
    }

    #[test]
    fn closing_asks_the_guest_to_shut_down_and_takes_its_answer() {
        let (channel, guest) = connected();
        let agent = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let Ok(Some(Message::Request {
                id,
                body: Request::Shutdown,
            })) = frame::read(&mut &guest, &mut buf)
            else {
                return false;
            };
            let done = Message::Response {
                id,
                body: Ok(Response::Done),
            };
            frame::write(&mut &guest, &done).is_ok()
        });
        assert!(channel.close_gracefully(Duration::from_secs(5)));
        assert!(agent.join().unwrap(), "no Shutdown came");
        channel.shut_down(Gone::Closed);
    }

    #[test]
    fn closing_a_deaf_guest_fails_waiters_as_closed_and_is_prompt() {
        let (channel, _guest) = connected();
        let exit = channel.watch_exit(1);
        let (_, inbound) = channel.open_inbound();
        let start = Instant::now();
        assert!(!channel.close_gracefully(Duration::from_secs(30)));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            exit.wait(None).unwrap_err().code(),
            crate::ErrorCode::AlreadyClosed
        );
        assert!(inbound.read(&mut [0u8; 1], None).is_err());
        assert_eq!(channel.dead(), Some(Gone::Closed));
        channel.shut_down(Gone::Closed);
    }
}
