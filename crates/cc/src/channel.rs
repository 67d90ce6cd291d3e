//! The host end of the agent connection: one reader thread demultiplexes
//! frames into request replies, stream buffers and process exits; callers
//! write frames under one lock.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cc_protocol::flow::{Broken, Inbound, Outbound};
use cc_protocol::{
    frame, ExitStatus, Message, RemoteError, Request, Response, DATA_CHUNK, GUEST_STREAM_BASE,
    PROTOCOL_VERSION,
};

use crate::error::{Error, Result};

type Reply = std::result::Result<Response, RemoteError>;

const WRITE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the first resuming ping waits before it is sent again; each
/// retry waits twice as long, up to [`PING_RETRY_MAX`]. A restored agent
/// usually sees its port reset and re-opens it, and a ping sent meanwhile
/// is lost: retrying early keeps that cheap.
const PING_RETRY: Duration = Duration::from_millis(10);
const PING_RETRY_MAX: Duration = Duration::from_millis(250);

/// Where a process's exit is delivered.
#[derive(Debug, Default)]
pub(crate) struct ExitSlot {
    status: Mutex<Option<std::result::Result<ExitStatus, String>>>,
    set: Condvar,
}

impl ExitSlot {
    fn fill(&self, value: std::result::Result<ExitStatus, String>) {
        let mut s = lock(&self.status);
        if s.is_none() {
            *s = Some(value);
        }
        self.set.notify_all();
    }

    /// Waits for the exit until `deadline`; `Ok(None)` on timeout.
    pub(crate) fn wait(&self, deadline: Option<Instant>) -> Result<Option<ExitStatus>> {
        let mut s = lock(&self.status);
        loop {
            match &*s {
                Some(Ok(status)) => return Ok(Some(*status)),
                Some(Err(why)) => return Err(Error::NotRunning(why.clone())),
                None => {}
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
    /// The channel went down for this reason.
    Lost(String),
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

    fn end(&self, why: Ended) -> VecDeque<Accepted> {
        let mut s = lock(&self.state);
        s.ended.get_or_insert(why);
        self.ready.notify_all();
        std::mem::take(&mut s.waiting)
    }

    /// The next connection, waiting until `deadline`: `Ok(None)` on timeout,
    /// `Err` once the queue ended (connections already queued still come
    /// first unless the listener was closed).
    pub(crate) fn pop(&self, deadline: Instant) -> std::result::Result<Option<Accepted>, Ended> {
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
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            s = self
                .ready
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[derive(Debug, Default)]
struct Tables {
    pending: HashMap<u64, mpsc::SyncSender<Reply>>,
    inbound: HashMap<u32, Arc<Inbound>>,
    outbound: HashMap<u32, Arc<Outbound>>,
    exits: HashMap<u64, Arc<ExitSlot>>,
    listeners: HashMap<u64, Arc<AcceptQueue>>,
    /// Why the connection is gone, once it is.
    dead: Option<String>,
}

#[derive(Debug)]
struct Shared {
    writer: Mutex<UnixStream>,
    tables: Mutex<Tables>,
    next_request: AtomicU64,
    next_stream: AtomicU32,
    next_process: AtomicU64,
    next_listener: AtomicU64,
    /// Resumed after a restore: the agent may greet again, harmlessly.
    resumed: bool,
}

/// A request sent and not yet answered.
#[derive(Debug)]
pub(crate) struct Pending {
    id: u64,
    rx: mpsc::Receiver<Reply>,
}

impl Pending {
    pub(crate) fn wait(self, channel: &Channel, timeout: Duration) -> Result<Reply> {
        match self.rx.recv_timeout(timeout) {
            Ok(reply) => Ok(reply),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                lock(&channel.shared.tables).pending.remove(&self.id);
                Err(Error::Timeout("request to the guest agent".into()))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(channel.not_running()),
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
        let mut buf = Vec::new();
        let agent = match frame::read(&mut reader, &mut buf) {
            Ok(Some(Message::Hello { version, agent })) if version == PROTOCOL_VERSION => agent,
            Ok(Some(Message::Hello { version, .. })) => {
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
            Err(frame::FrameError::Decode(_)) => match frame::hello_version(&buf) {
                Some(version) => {
                    return Err(Error::ProtocolMismatch {
                        guest: version,
                        host: PROTOCOL_VERSION,
                    })
                }
                None => return Err(Error::Protocol("undecodable greeting".into())),
            },
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

    /// Resumes the conversation with an agent restored from a template:
    /// pings are sent until one is answered, for up to `timeout`, so a
    /// ping lost while the agent re-opens its port is simply sent again.
    /// The greeting of an agent that did start over is accepted too.
    pub(crate) fn resume(socket: UnixStream, timeout: Duration) -> Result<Channel> {
        let reader = frame_reader(&socket)?;
        let channel = Channel::start(socket, reader, true)?;
        let deadline = Instant::now() + timeout;
        let mut retry = PING_RETRY;
        loop {
            let answer = channel.begin(Request::Ping)?.wait(&channel, retry);
            retry = (retry * 2).min(PING_RETRY_MAX);
            match answer {
                Ok(Ok(Response::Pong)) => return Ok(channel),
                Ok(other) => {
                    return Err(Error::Protocol(format!(
                        "unexpected answer to a ping: {other:?}"
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
    fn start(socket: UnixStream, reader: BufReader<UnixStream>, resumed: bool) -> Result<Channel> {
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
            writer: Mutex::new(writer),
            tables: Mutex::new(Tables::default()),
            next_request: AtomicU64::new(1),
            next_stream: AtomicU32::new(1),
            next_process: AtomicU64::new(1),
            next_listener: AtomicU64::new(1),
            resumed,
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
    pub(crate) fn dead(&self) -> Option<String> {
        lock(&self.shared.tables).dead.clone()
    }

    /// Sends `body` and waits up to `timeout` for its reply.
    pub(crate) fn request(&self, body: Request, timeout: Duration) -> Result<Reply> {
        self.begin(body)?.wait(self, timeout)
    }

    /// Sends `body` without waiting: for requests whose answer comes after
    /// stream traffic (`WriteFile`).
    pub(crate) fn begin(&self, body: Request) -> Result<Pending> {
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut t = lock(&self.shared.tables);
            if let Some(why) = &t.dead {
                return Err(Error::NotRunning(why.clone()));
            }
            t.pending.insert(id, tx);
        }
        self.send(&Message::Request { id, body })?;
        Ok(Pending { id, rx })
    }

    fn not_running(&self) -> Error {
        Error::NotRunning(
            self.dead()
                .unwrap_or_else(|| "the guest agent is gone".into()),
        )
    }

    pub(crate) fn send(&self, msg: &Message) -> Result<()> {
        let bytes = frame::encode(msg)?;
        self.send_frame(&bytes)
    }

    fn send_frame(&self, bytes: &[u8]) -> Result<()> {
        send_frame(&self.shared, bytes).map_err(|()| self.not_running())
    }

    pub(crate) fn new_process_id(&self) -> u64 {
        self.shared.next_process.fetch_add(1, Ordering::Relaxed)
    }

    fn new_stream_id(&self) -> u32 {
        self.shared.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers where process `id`'s exit goes, before it is started.
    pub(crate) fn watch_exit(&self, id: u64) -> Arc<ExitSlot> {
        let slot = Arc::new(ExitSlot::default());
        let mut t = lock(&self.shared.tables);
        match &t.dead {
            Some(why) => slot.fill(Err(why.clone())),
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
            Some(why) => {
                queue.end(Ended::Lost(why.clone()));
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

    /// A new guest → host stream.
    pub(crate) fn open_inbound(&self) -> (u32, Arc<Inbound>) {
        let id = self.new_stream_id();
        let stream = Arc::new(Inbound::new());
        let mut t = lock(&self.shared.tables);
        match &t.dead {
            Some(_) => stream.break_off(Broken::Lost),
            None => {
                t.inbound.insert(id, stream.clone());
            }
        }
        (id, stream)
    }

    /// A new host → guest stream.
    pub(crate) fn open_outbound(&self) -> (u32, Arc<Outbound>) {
        let id = self.new_stream_id();
        let stream = Arc::new(Outbound::new());
        let mut t = lock(&self.shared.tables);
        match &t.dead {
            Some(_) => stream.break_off(Broken::Lost),
            None => {
                t.outbound.insert(id, stream.clone());
            }
        }
        (id, stream)
    }

    /// Reads from an inbound stream, returning credit to the guest.
    pub(crate) fn read(
        &self,
        id: u32,
        stream: &Inbound,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        let r = stream.read(buf, deadline)?;
        if r.credit > 0 {
            // A lost channel surfaces on the next read; credit is moot then.
            let _ = self.send(&Message::Credit {
                stream: id,
                bytes: r.credit,
            });
        }
        if r.len == 0 && !buf.is_empty() {
            lock(&self.shared.tables).inbound.remove(&id);
        }
        Ok(r.len)
    }

    /// Stops an inbound stream early; the guest's writer sees a broken pipe.
    pub(crate) fn close_inbound(&self, id: u32, stream: &Inbound) {
        if lock(&self.shared.tables).inbound.remove(&id).is_some() && !stream.is_drained() {
            stream.break_off(Broken::Closed);
            let _ = self.send(&Message::Reset { stream: id });
        }
    }

    /// Writes all of `data` to an outbound stream within its credit.
    pub(crate) fn write(&self, id: u32, stream: &Outbound, data: &[u8]) -> io::Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            let n = stream.acquire(rest.len().min(DATA_CHUNK), None)?;
            // Header and payload in one buffer: one copy, one write.
            let mut header = [0u8; frame::DATA_HEADER_MAX];
            let len = frame::data_header(id, n, &mut header);
            let mut bytes = Vec::with_capacity(len + n);
            bytes.extend_from_slice(&header[frame::DATA_HEADER_MAX - len..]);
            bytes.extend_from_slice(&rest[..n]);
            self.send_frame(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Ends an outbound stream: the guest reader sees end of file.
    pub(crate) fn close_outbound(&self, id: u32, stream: &Outbound) {
        stream.break_off(Broken::Closed);
        if lock(&self.shared.tables).outbound.remove(&id).is_some() {
            let _ = self.send(&Message::Eof { stream: id });
        }
    }

    /// Marks the channel gone, unblocks everyone and joins the reader.
    pub(crate) fn shut_down(&self, why: &str) {
        mark_dead(&self.shared, why.to_string());
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = lock(&self.reader).take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.shut_down("the instance was closed");
    }
}

/// A buffered reader of the channel's frames, on a second handle of it.
fn frame_reader(socket: &UnixStream) -> Result<BufReader<UnixStream>> {
    let handle = socket
        .try_clone()
        .map_err(Error::io("dup", "agent channel"))?;
    Ok(BufReader::with_capacity(256 << 10, handle))
}

fn read_loop(shared: &Shared, mut reader: BufReader<UnixStream>) {
    let mut buf = Vec::new();
    let why = loop {
        let msg = match frame::read(&mut reader, &mut buf) {
            Ok(Some(msg)) => msg,
            Ok(None) => break "the guest stopped".to_string(),
            Err(e) => break format!("agent channel failed: {e}"),
        };
        if let Err(why) = dispatch(shared, msg) {
            break why;
        }
    };
    mark_dead(shared, why);
}

fn dispatch(shared: &Shared, msg: Message) -> std::result::Result<(), String> {
    let mut t = lock(&shared.tables);
    match msg {
        Message::Response { id, body } => {
            if let Some(tx) = t.pending.remove(&id) {
                let _ = tx.try_send(body);
            }
        }
        Message::Data { stream, bytes } => {
            if let Some(s) = t.inbound.get(&stream) {
                s.push(bytes.into_vec()).map_err(|e| e.to_string())?;
            }
        }
        Message::Eof { stream } => {
            if let Some(s) = t.inbound.get(&stream) {
                s.finish();
            }
        }
        Message::Credit { stream, bytes } => {
            if let Some(s) = t.outbound.get(&stream) {
                s.grant(bytes);
            }
        }
        // The guest stops reading a stream we send, or aborts one it sends
        // (a read error, a connection reset): either way it is over.
        Message::Reset { stream } => {
            if let Some(s) = t.outbound.remove(&stream) {
                s.break_off(Broken::Closed);
            }
            if let Some(s) = t.inbound.remove(&stream) {
                s.break_off(Broken::Closed);
            }
        }
        Message::Accepted {
            listener,
            peer,
            to_guest,
            from_guest,
        } => {
            let known = |id: u32| t.inbound.contains_key(&id) || t.outbound.contains_key(&id);
            if to_guest < GUEST_STREAM_BASE
                || from_guest < GUEST_STREAM_BASE
                || to_guest == from_guest
                || known(to_guest)
                || known(from_guest)
            {
                return Err(format!(
                    "the guest agent accepted a connection on bad streams {to_guest}/{from_guest}"
                ));
            }
            let Some(queue) = t.listeners.get(&listener).cloned() else {
                // Closed meanwhile: abort the guest's connection.
                drop(t);
                for stream in [to_guest, from_guest] {
                    let frame =
                        frame::encode(&Message::Reset { stream }).map_err(|e| e.to_string())?;
                    send_frame(shared, &frame).map_err(|()| "writing to the guest agent failed")?;
                }
                return Ok(());
            };
            let inbound = Arc::new(Inbound::new());
            let outbound = Arc::new(Outbound::new());
            t.inbound.insert(from_guest, inbound.clone());
            t.outbound.insert(to_guest, outbound.clone());
            queue.push(Accepted {
                peer,
                to_guest: (to_guest, outbound),
                from_guest: (from_guest, inbound),
            });
        }
        Message::Exited { process, status } => {
            if let Some(slot) = t.exits.remove(&process) {
                slot.fill(Ok(status));
            }
        }
        Message::Hello { version, .. } if shared.resumed && version == PROTOCOL_VERSION => {}
        Message::Hello { .. } | Message::Request { .. } => {
            return Err("the guest agent sent a message out of turn".into());
        }
    }
    Ok(())
}

/// Writes one frame; on failure the channel is marked dead.
fn send_frame(shared: &Shared, bytes: &[u8]) -> std::result::Result<(), ()> {
    let mut w = lock(&shared.writer);
    io::Write::write_all(&mut *w, bytes).map_err(|e| {
        drop(w);
        mark_dead(shared, format!("writing to the guest agent: {e}"));
    })
}

/// Fails everything waiting on the channel with `why`.
fn mark_dead(shared: &Shared, why: String) {
    let mut t = lock(&shared.tables);
    if t.dead.is_some() {
        return;
    }
    tracing::debug!(%why, "agent channel down");
    t.pending.clear();
    for (_, s) in t.inbound.drain() {
        s.break_off(Broken::Lost);
    }
    for (_, s) in t.outbound.drain() {
        s.break_off(Broken::Lost);
    }
    for (_, slot) in t.exits.drain() {
        slot.fill(Err(why.clone()));
    }
    for (_, queue) in t.listeners.drain() {
        // Their streams were broken off above.
        queue.end(Ended::Lost(why.clone()));
    }
    t.dead = Some(why);
}

#[cfg(test)]
mod tests {
    //! Handshake checks against a fake agent on a socketpair (no VM).
    use super::*;
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
        channel.shut_down("test over");
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
}
