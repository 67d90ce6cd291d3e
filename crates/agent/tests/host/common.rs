//! A host for the agent in tests: the agent library serves one end of a
//! socket pair in host mode, and the test speaks `cc_protocol` frames on
//! the other, as the host core does.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use cc_agent::{Agent, Ended, Mode};
use cc_protocol::{
    frame, Exec, ExitStatus, FsRequest, Message, RemoteError, Request, Response, Stdio,
};
use serde_bytes::ByteBuf;

/// How long anything the agent should do may take, even on a loaded
/// machine.
pub const WAIT: Duration = Duration::from_secs(30);

/// What the reader thread hands over.
#[derive(Debug)]
enum Event {
    Message(Message),
    /// The agent closed the channel (or sent something unreadable).
    Closed(String),
}

/// How a guest → host stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    Eof,
    Reset,
}

/// The host end of one connection to an agent.
#[derive(Debug)]
pub struct Host {
    pub agent: Arc<Agent>,
    socket: UnixStream,
    inbox: mpsc::Receiver<Event>,
    /// Messages received but not asked for yet, in order.
    backlog: VecDeque<Message>,
    closed: Option<String>,
    next_id: u64,
    server: Option<JoinHandle<Ended>>,
    reader: Option<JoinHandle<()>>,
    /// The agent's greeting.
    pub hello: Message,
}

impl Host {
    /// A new host-mode agent, connected.
    pub fn new() -> Self {
        Self::connect(Agent::new(Mode::Host).expect("start a host-mode agent"))
    }

    /// Serves a new connection with `agent` on a thread and reads its
    /// greeting.
    pub fn connect(agent: Arc<Agent>) -> Self {
        let (socket, guest) = UnixStream::pair().unwrap();
        let server = {
            let agent = agent.clone();
            thread::spawn(move || agent.serve(guest))
        };
        Self::over(agent, socket, server)
    }

    /// The host end of `socket`, whose other end `server` serves.
    pub fn over(agent: Arc<Agent>, socket: UnixStream, server: JoinHandle<Ended>) -> Self {
        let (tx, inbox) = mpsc::channel();
        let mut reading = socket.try_clone().unwrap();
        let reader = thread::spawn(move || {
            let mut buf = Vec::new();
            loop {
                let event = match frame::read(&mut reading, &mut buf) {
                    Ok(Some(msg)) => Event::Message(msg),
                    Ok(None) => Event::Closed("end of channel".into()),
                    Err(e) => Event::Closed(e.to_string()),
                };
                let last = matches!(event, Event::Closed(_));
                if tx.send(event).is_err() || last {
                    return;
                }
            }
        });
        let mut host = Self {
            agent,
            socket,
            inbox,
            backlog: VecDeque::new(),
            closed: None,
            next_id: 1,
            server: Some(server),
            reader: Some(reader),
            hello: Message::Eof { stream: 0 },
        };
        host.hello = host.expect("the greeting", |m| matches!(m, Message::Hello { .. }));
        host
    }

    /// Sends `msg` as one frame.
    pub fn send(&self, msg: &Message) {
        frame::write(&mut &self.socket, msg).expect("send a frame");
    }

    /// Sends raw bytes, frames or not.
    pub fn send_raw(&self, bytes: &[u8]) {
        use std::io::Write;
        (&self.socket).write_all(bytes).expect("send bytes");
    }

    /// Receives the next message, or `None` once the agent closed the
    /// channel. Panics after [`WAIT`].
    fn receive(&mut self, what: &str) -> Option<Message> {
        if self.closed.is_some() {
            return None;
        }
        match self.inbox.recv_timeout(WAIT) {
            Ok(Event::Message(msg)) => Some(msg),
            Ok(Event::Closed(why)) => {
                self.closed = Some(why);
                None
            }
            Err(_) => panic!(
                "timed out waiting for {what}; unclaimed: {:?}",
                self.backlog.iter().take(8).collect::<Vec<_>>()
            ),
        }
    }

    /// The first message (already received or still to come) that `want`
    /// accepts; the others stay for later calls.
    pub fn expect(&mut self, what: &str, mut want: impl FnMut(&Message) -> bool) -> Message {
        if let Some(i) = self.backlog.iter().position(&mut want) {
            return self.backlog.remove(i).unwrap();
        }
        loop {
            match self.receive(what) {
                Some(msg) if want(&msg) => return msg,
                Some(msg) => self.backlog.push_back(msg),
                None => panic!(
                    "the agent closed the channel ({:?}) before {what}",
                    self.closed
                ),
            }
        }
    }

    /// Whether a message `want` accepts arrives within `within`.
    pub fn arrives(&mut self, within: Duration, mut want: impl FnMut(&Message) -> bool) -> bool {
        if self.backlog.iter().any(&mut want) {
            return true;
        }
        let deadline = Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.inbox.recv_timeout(left) {
                Ok(Event::Message(msg)) => {
                    let found = want(&msg);
                    self.backlog.push_back(msg);
                    if found {
                        return true;
                    }
                }
                Ok(Event::Closed(why)) => {
                    self.closed = Some(why);
                    return false;
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Forgets the messages received and not asked for yet.
    pub fn clear_backlog(&mut self) {
        self.backlog.clear();
    }

    /// Waits until the agent closes the channel; returns the messages
    /// that came before, unclaimed ones included.
    pub fn until_closed(&mut self) -> Vec<Message> {
        while let Some(msg) = self.receive("the end of the channel") {
            self.backlog.push_back(msg);
        }
        self.backlog.drain(..).collect()
    }

    /// Sends request `body`; returns its id.
    pub fn begin(&mut self, body: Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&Message::Request { id, body });
        id
    }

    /// The answer to request `id`.
    pub fn answer(&mut self, id: u64) -> Result<Response, RemoteError> {
        let what = format!("the answer to request {id}");
        match self.expect(
            &what,
            |m| matches!(m, Message::Response { id: i, .. } if *i == id),
        ) {
            Message::Response { body, .. } => body,
            _ => unreachable!(),
        }
    }

    pub fn request(&mut self, body: Request) -> Result<Response, RemoteError> {
        let id = self.begin(body);
        self.answer(id)
    }

    pub fn fs(&mut self, request: FsRequest) -> Result<Response, RemoteError> {
        self.request(Request::Fs(request))
    }

    /// Starts `exec`; its guest pid.
    pub fn start(&mut self, exec: Exec) -> Result<u32, RemoteError> {
        match self.request(Request::Exec(exec))? {
            Response::Started { pid } => Ok(pid),
            other => panic!("unexpected answer to exec: {other:?}"),
        }
    }

    /// How process `process` ended.
    pub fn exited(&mut self, process: u64) -> ExitStatus {
        let what = format!("the exit of process {process}");
        match self.expect(
            &what,
            |m| matches!(m, Message::Exited { process: p, .. } if *p == process),
        ) {
            Message::Exited { status, .. } => status,
            _ => unreachable!(),
        }
    }

    /// Everything on guest → host `stream` until it ends, with credit
    /// returned for every chunk as it arrives.
    pub fn collect(&mut self, stream: u32) -> (Vec<u8>, StreamEnd) {
        let mut data = Vec::new();
        let what = format!("data on stream {stream}");
        loop {
            let msg = self.expect(&what, |m| {
                matches!(m, Message::Data { stream: s, .. } | Message::Eof { stream: s } | Message::Reset { stream: s } if *s == stream)
            });
            match msg {
                Message::Data { bytes, .. } => {
                    self.send(&Message::Credit {
                        stream,
                        bytes: bytes.len() as u32,
                    });
                    data.extend_from_slice(&bytes);
                }
                Message::Eof { .. } => return (data, StreamEnd::Eof),
                Message::Reset { .. } => return (data, StreamEnd::Reset),
                _ => unreachable!(),
            }
        }
    }

    /// Like [`collect`](Self::collect), for a stream that must end cleanly.
    pub fn read_stream(&mut self, stream: u32) -> Vec<u8> {
        let (data, end) = self.collect(stream);
        assert_eq!(end, StreamEnd::Eof, "stream {stream} was reset");
        data
    }

    /// Sends `bytes` on host → guest `stream` in chunks, then its end.
    /// The agent's window is larger than anything the tests send.
    pub fn write_stream(&mut self, stream: u32, bytes: &[u8]) {
        for chunk in bytes.chunks(cc_protocol::DATA_CHUNK) {
            self.send(&Message::Data {
                stream,
                bytes: ByteBuf::from(chunk.to_vec()),
            });
        }
        self.send(&Message::Eof { stream });
    }

    /// Runs `argv` with stdout and stderr on streams: (exit, stdout,
    /// stderr).
    pub fn run(&mut self, argv: &[&str]) -> (ExitStatus, Vec<u8>, Vec<u8>) {
        self.run_exec(exec(argv))
    }

    /// Runs `exec` with stdout and stderr on fresh streams.
    pub fn run_exec(&mut self, mut exec: Exec) -> (ExitStatus, Vec<u8>, Vec<u8>) {
        let (out, err) = (stream_id(), stream_id());
        exec.process = u64::from(out);
        exec.stdout = Stdio::Stream(out);
        exec.stderr = Stdio::Stream(err);
        let process = exec.process;
        self.start(exec).expect("start the process");
        let stdout = self.read_stream(out);
        let stderr = self.read_stream(err);
        (self.exited(process), stdout, stderr)
    }

    /// Ends the connection as a host does: hangs up, and returns why the
    /// agent's serve ended.
    pub fn hang_up(mut self) -> Ended {
        self.finish().expect("the agent's serve panicked")
    }

    fn finish(&mut self) -> thread::Result<Ended> {
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        match self.server.take() {
            Some(server) => server.join(),
            None => Ok(Ended::Lost("already finished".into())),
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let result = self.finish();
        if !thread::panicking() {
            result.expect("the agent's serve panicked");
        }
    }
}

/// Host-chosen stream ids, unique within the test process.
pub fn stream_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// An exec of `argv` with nothing attached, as process 1.
pub fn exec(argv: &[&str]) -> Exec {
    Exec {
        process: 1,
        argv: argv.iter().map(|a| ByteBuf::from(a.as_bytes())).collect(),
        env: Vec::new(),
        cwd: None,
        user: None,
        stdin: None,
        stdout: Stdio::Null,
        stderr: Stdio::Null,
        pty: None,
        root: None,
        rlimits: Vec::new(),
    }
}

pub fn bytes(s: impl AsRef<[u8]>) -> ByteBuf {
    ByteBuf::from(s.as_ref().to_vec())
}

/// A fresh directory, removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cc-agent-host-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// `rel` as the path bytes a request carries.
    pub fn path(&self, rel: &str) -> ByteBuf {
        bytes(self.0.join(rel).as_os_str().as_bytes())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether process `pid` is gone (or a zombie nobody reaped).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => panic!("read /proc/{pid}/stat: {e}"),
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Waits until `done` holds, for up to [`WAIT`].
pub fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Reads all of `r`.
pub fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    out
}
