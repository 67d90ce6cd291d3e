//! cc-agent: the guest side of crumblecracker. It serves the `cc_protocol`
//! conversation with the host: processes (spawning, their pipes, signals,
//! exits), streams with their flow control, files, TCP connections between
//! the two sides, the root filesystem's set-up and its snapshots.
//!
//! In every instance's VM it runs as PID 1 (`/init`, the `cc-agent`
//! binary) over the `cc.agent` virtio-serial port: [`Mode::Guest`]. The
//! same server runs inside any other program over any connected stream
//! socket as [`Mode::Host`], so the host's code can be tested against the
//! real agent without a VM:
//!
//! ```no_run
//! use std::os::unix::net::UnixStream;
//!
//! let (host, guest) = UnixStream::pair()?;
//! let agent = cc_agent::Agent::new(cc_agent::Mode::Host)?;
//! let server = std::thread::spawn(move || agent.serve(guest));
//! // Speak cc_protocol frames on `host`; the agent greets first. Closing
//! // the channel ends the connection: serve returns once the processes and
//! // threads it started are gone.
//! drop(host);
//! let ended = server.join().expect("the agent does not panic");
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! The agent knows nothing of QEMU or of host paths: disks are found by
//! serial and the port by name, and it trusts only what arrives over the
//! protocol. Errors are answered over the channel or logged, never fatal.
//!
//! # Guest mode and host mode
//!
//! A guest agent owns its machine. A host agent is a guest in someone
//! else's process: it changes nothing that belongs to the process or the
//! machine (no signal handlers or masks, no process-wide umask, working
//! directory, session, priority, mounts, hostname or clock) and waits only
//! for its own children. What differs:
//!
//! | | guest mode (PID 1 in a VM) | host mode (in any program) |
//! |---|---|---|
//! | process set-up | [`pid1`]: signals, priority, umask, kernel filesystems, console | none |
//! | children | reaps every child of the process, orphans included | waits for each process it started, by its pid |
//! | exact file modes | the process runs with umask 0 | each request thread gets a umask of its own, 0 (`unshare(CLONE_FS)`) |
//! | `Exec` without a user | root, no supplementary groups, nice 0 | the host program's own ids and priority |
//! | `Exec` as a user | ids set in the child | the same, which needs the host program to be root |
//! | `Setup` | clock, entropy, root and runtime filesystems, host directories, hostname, `/etc` files, loopback, network | only checked: answers `Ready`; host directories and a network are refused |
//! | `Prepare` | mounts the root | answers `Done`: the root is the host's own filesystem |
//! | `SnapshotUpper` | the overlay's upper directory, after a sync | the directory given to [`Agent::set_upper`], without a sync |
//! | `Shutdown`, [`Agent::power_off`] | goodbye, sync, every process killed, reboot | goodbye, its processes killed; [`Agent::serve`] returns [`Ended::PoweredOff`] and serves no more |
//! | a connection ends | its processes live on, orphaned | its processes are killed, and [`Agent::serve`] returns once they and the connection's threads are gone |
//! | log lines | on the console (stderr) | through `eprintln!`, which a test harness captures |
//!
//! # Saves with commands in flight
//!
//! Before its guest is saved the host asks for quiet (`Quiesce`): the
//! frame being written goes out whole, the answer is the connection's
//! last frame, and every writer waits. The guest saved goes on after
//! `Unquiesce`. A copy restored from the save hears `Rebirth` first on its
//! new channel: the old connection closes without a held frame going out,
//! and a new one serves the same port; the processes keep running, their
//! output read and dropped, their input at end of file, their exits
//! reported to nobody.
//!
//! Paths in requests are paths of the machine the agent runs on: in host
//! mode, the host's. A socket channel is written with `MSG_NOSIGNAL`, so a
//! host that hangs up is a failed write rather than a `SIGPIPE`; writes to
//! the pipes of processes that went away rely on `SIGPIPE` being ignored,
//! as std's runtime does at the start of every Rust program (and Python at
//! its own). Host mode also expects its program not to reap children it
//! did not start (no `waitpid(-1)`): the exit of a process reaped behind
//! the agent's back is lost.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use cc_protocol::frame::{self, FrameError, FrameReader};
use cc_protocol::mux::{ReceiveError, Received};
use cc_protocol::{Message, Request, Response, PROTOCOL_VERSION};

/// Logs one line.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log_line(::std::format_args!($($arg)*))
    };
}

mod conn;
mod environ;
mod error;
mod exec;
mod forward;
mod fs;
mod glob;
mod mounts;
mod net;
pub mod pid1;
mod reaper;
mod roots;
mod setup;
mod snapshot;
mod stream;
mod sys;
mod tasks;
mod terminal;
mod trace;
mod transfer;
mod users;

pub use conn::Port;

use conn::{Conn, PortReader, Reply};
use reaper::Reaper;
use stream::{Receiver, Sender};

/// Whether log lines go to the console: set in the guest, where a failed
/// write must not panic PID 1. Elsewhere they go through `eprintln!`, so
/// that a test harness shows them with the test that caused them.
static CONSOLE: AtomicBool = AtomicBool::new(false);

fn log_to_console() {
    CONSOLE.store(true, Ordering::Relaxed);
}

fn log_line(args: fmt::Arguments<'_>) {
    if CONSOLE.load(Ordering::Relaxed) {
        // Nowhere to report a console failure to.
        let _ = writeln!(io::stderr().lock(), "cc-agent: {args}");
    } else {
        eprintln!("cc-agent: {args}");
    }
}

/// Starts a detached thread, for the guest's own chores.
fn spawn_thread(name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    thread::Builder::new().name(name).spawn(f).map(drop)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the agent runs (see the crate documentation for what differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a guest VM: the machine is the agent's.
    Guest,
    /// Inside another program, such as a host test: nothing outside its
    /// own doing is touched.
    Host,
}

/// Why [`Agent::serve`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The channel is gone: the host closed it, it failed, or a newer
    /// channel replaced it. Says why.
    Lost(String),
    /// The agent powered off (host mode: the host's `Shutdown`, or
    /// [`Agent::power_off`]), giving this reason in its goodbye. It serves
    /// no more.
    PoweredOff(String),
}

/// The agent: its processes and filesystem state, which outlive any one
/// connection. A host that reconnects (a guest restored from a template
/// re-opens its port) is served by the same agent.
#[derive(Debug)]
pub struct Agent {
    mode: Mode,
    reaper: Arc<Reaper>,
    /// The terminals of running processes started with one.
    terminals: Arc<terminal::Terminals>,
    /// How far the filesystems are set up.
    mounted: Mutex<setup::Mounted>,
    /// The root overlay's upper directory, once there is one.
    upper: OnceLock<OwnedFd>,
    /// The connection being served, for a power-off to say goodbye on.
    current: Mutex<Option<Arc<Conn>>>,
    /// Held while a connection is served: one at a time, as a virtio port
    /// opens only once.
    serving: Mutex<()>,
    /// Why a host-mode agent powered off.
    powered_off: OnceLock<String>,
    /// A request thread could not get its own umask (reported once).
    umask_shared: AtomicBool,
}

/// How long a goodbye may wait for room on the channel.
const GOODBYE_GRACE: Duration = Duration::from_millis(500);

/// How long a power-off waits for `Started` answers held back for a quick
/// exit: they go out within a few milliseconds, unless the host stopped
/// reading.
const HELD_STARTED_GRACE: Duration = Duration::from_millis(250);

/// How long the end of a host-mode connection waits for its threads: a
/// dial in progress may need its whole connect timeout (10 s) to notice.
const DRAIN_LIMIT: Duration = Duration::from_secs(15);

impl Agent {
    /// An agent for `mode`. In guest mode this starts the reaper thread,
    /// which reaps every child of the process: only PID 1 may do that.
    pub fn new(mode: Mode) -> io::Result<Arc<Self>> {
        if mode == Mode::Guest {
            log_to_console();
        }
        Ok(Arc::new(Self {
            mode,
            reaper: Reaper::start(mode)?,
            terminals: Arc::default(),
            mounted: Mutex::default(),
            upper: OnceLock::new(),
            current: Mutex::new(None),
            serving: Mutex::new(()),
            powered_off: OnceLock::new(),
            umask_shared: AtomicBool::new(false),
        }))
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Host mode: makes `dir` the directory `SnapshotUpper` streams, in the
    /// place of a guest's writable overlay layer. It can be set once; a
    /// guest's is its root overlay's.
    pub fn set_upper(&self, dir: &Path) -> io::Result<()> {
        if self.mode == Mode::Guest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a guest's upper directory is its root overlay's",
            ));
        }
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)?;
        self.upper
            .set(dir.into())
            .map_err(|_| io::Error::new(io::ErrorKind::AlreadyExists, "the upper directory is set"))
    }

    fn current(&self) -> MutexGuard<'_, Option<Arc<Conn>>> {
        lock(&self.current)
    }

    /// Serves one connection on `port` until it is lost: greets the host,
    /// then answers its requests. A connection still being served is ended
    /// first, as a re-opened port ends the old one (a socket is hung up; a
    /// plain file cannot be, so its connection goes on until its host
    /// hangs up).
    ///
    /// In host mode it returns once the connection's processes are killed
    /// and reaped and its threads have ended; a thread stuck in a system
    /// call (an open of a FIFO nobody writes, say) is waited for 15 s at
    /// most, then logged and left.
    pub fn serve(self: &Arc<Self>, port: impl Into<Port>) -> Ended {
        let began = Instant::now();
        let port = port.into();
        let _serving = self.take_over();
        if let Some(reason) = self.powered_off.get() {
            return Ended::PoweredOff(reason.clone());
        }
        let (conn, reader) = match connect(port) {
            Ok(connected) => connected,
            Err(e) => {
                log!("send hello: {e}");
                // The guest's port may be there before a host is: pace the
                // retries.
                if self.mode == Mode::Guest {
                    thread::sleep(Duration::from_secs(1));
                }
                return Ended::Lost(format!("send hello: {e}"));
            }
        };
        trace::record_setup("agent: serve → Hello sent", began);
        *self.current() = Some(conn.clone());
        let mut conn = conn;
        let why = panic::catch_unwind(AssertUnwindSafe(|| read_frames(self, &mut conn, reader)))
            .unwrap_or_else(|_| "reader panicked".into());
        log!("connection lost: {why}");
        self.current().take();
        if self.mode == Mode::Guest {
            // Its processes live on: their output is read and dropped.
            conn.orphan();
        }
        conn.close();
        self.end_connection(&conn);
        match self.powered_off.get() {
            Some(reason) => Ended::PoweredOff(reason.clone()),
            None => Ended::Lost(why),
        }
    }

    /// Waits for its turn to serve, ending the connection being served
    /// meanwhile: a connection just starting may not be the current one
    /// yet, so it is ended as soon as it is.
    fn take_over(&self) -> MutexGuard<'_, ()> {
        loop {
            match self.serving.try_lock() {
                Ok(serving) => return serving,
                Err(TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    if let Some(old) = self.current().as_ref() {
                        old.close();
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Settles the processes of a lost connection. A guest keeps them
    /// running, orphaned; a host-mode agent ends them and waits for every
    /// thread of the connection, so that nothing it started outlives it.
    fn end_connection(&self, conn: &Conn) {
        if self.mode == Mode::Host {
            let deadline = Instant::now() + DRAIN_LIMIT;
            // Killed again each round: a spawn under way when the
            // connection was lost registers its process late.
            loop {
                self.reaper.kill(Some(conn.id()));
                if conn.tasks().wait_idle(Duration::from_millis(50)) {
                    break;
                }
                if Instant::now() >= deadline {
                    let left = conn.tasks().live();
                    log!("connection {}: {left} threads still busy", conn.id());
                    break;
                }
            }
        }
        self.reaper.forget(conn.id());
    }

    /// Ends the machine, or in host mode the agent: tells the host why and
    /// falls silent, then kills the processes (a guest: all of them, then
    /// reboots, which with `reboot=t` and QEMU's `-no-reboot` stops QEMU).
    /// Silent first, so that the processes killed here never reach the
    /// host as exits or ends of file: it sees the guest go away, not
    /// commands that finished.
    pub fn power_off(&self, reason: &str) {
        if self.mode == Mode::Host {
            let _ = self.powered_off.set(reason.to_string());
        }
        if let Some(conn) = self.current().take() {
            conn.await_held_started(HELD_STARTED_GRACE);
            // A host that stopped reading must not hold the power-off up.
            let _ = conn.close_after(GOODBYE_GRACE);
            let _ = conn.send(&Message::Goodbye {
                reason: reason.to_string(),
            });
            conn.close();
        }
        match self.mode {
            Mode::Guest => {
                sys::sync();
                // Everything but PID 1 itself.
                let _ = sys::kill(-1, libc::SIGKILL);
                sys::sync();
                let e = sys::reboot();
                log!("reboot: {}", error::describe(&e));
            }
            Mode::Host => self.reaper.kill(None),
        }
    }

    /// Answers the host's `Shutdown` and powers off. A guest syncs first,
    /// and powers off after a grace period even if the host never takes
    /// the answer.
    fn shutdown(self: &Arc<Self>, reply: Reply) {
        const REASON: &str = "the host asked to shut down";
        if self.mode == Mode::Host {
            reply.send(Ok(Response::Done));
            return self.power_off(REASON);
        }
        sys::sync();
        let agent = self.clone();
        let grace = spawn_thread("poweroff".into(), move || {
            thread::sleep(Duration::from_secs(1));
            agent.power_off(REASON);
        });
        if let Err(e) = grace {
            log!("start poweroff timer: {}", error::describe(&e));
        }
        reply.send_flushed(Ok(Response::Done));
        self.power_off(REASON);
    }

    /// Prepares a request thread: in host mode it gets a umask of its own,
    /// 0, so that files are created with exactly the modes asked for.
    fn enter_request_thread(&self) {
        if self.mode == Mode::Guest {
            return;
        }
        if let Err(e) = sys::exact_modes_in_this_thread() {
            if !self.umask_shared.swap(true, Ordering::Relaxed) {
                let e = error::describe(&e);
                log!("a request thread's own umask: {e}; files get the process's");
            }
        }
    }
}

/// Serves one connection on `stream` with a new agent in `mode` (for a
/// host program, [`Mode::Host`]); see [`Agent::serve`].
pub fn serve(stream: UnixStream, mode: Mode) -> io::Result<Ended> {
    Ok(Agent::new(mode)?.serve(stream))
}

/// Greets the host on `port` and sets up the connection: the writing half,
/// and the reading half for [`read_frames`].
fn connect(port: Port) -> Result<(Arc<Conn>, PortReader), String> {
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        agent: format!("cc-agent {}", env!("CARGO_PKG_VERSION")),
    };
    // The port is still blocking: this waits until a host is connected.
    frame::write(&mut &port, &hello).map_err(|e| describe_frame_error(&e))?;
    let setup = || {
        sys::set_nonblocking(&port, true)?;
        Conn::new(port.try_clone()?)
    };
    let conn = setup().map_err(|e| error::describe(&e))?;
    Ok((Arc::new(conn), PortReader(port)))
}

fn describe_frame_error(e: &FrameError) -> String {
    match e {
        FrameError::Io(io) => error::describe(io),
        FrameError::Decode(p) | FrameError::Encode(p) => format!("{e}: {p}"),
        FrameError::TooLarge(_) | FrameError::Truncated => e.to_string(),
    }
}

/// Reads and dispatches frames; returns why the connection ended. A host
/// that breaks the protocol is told why before the connection is closed.
/// A rebirth replaces `conn` with its successor.
fn read_frames(agent: &Arc<Agent>, conn: &mut Arc<Conn>, port: PortReader) -> String {
    let mut reader = FrameReader::new(port);
    loop {
        match conn.receive(&mut reader) {
            Ok(Some(Received::Message(msg))) => {
                if let Some(next) = dispatch(agent, conn, msg) {
                    *conn = next;
                }
            }
            Ok(Some(Received::Stream)) => {}
            Ok(Some(Received::Payload { since })) => {
                trace::record("guest: read payloads out of the port", since);
            }
            Ok(None) => return "the host closed the port".into(),
            Err(ReceiveError::Frame(e)) => return describe_frame_error(&e),
            Err(ReceiveError::Violation(v)) => {
                let reason = format!("closing the channel: the host {v}");
                let _ = conn.send(&Message::Goodbye {
                    reason: reason.clone(),
                });
                return reason;
            }
        }
    }
}

/// A request's handling, run on its own thread.
type Job = Box<dyn FnOnce(&Arc<Agent>, Reply) + Send>;

/// Handles one message. Stream messages, pings and most signals are
/// handled inline (they never block, and need no thread when none can be
/// made: a fork bomb leaves no pids for one);
/// other requests run on a thread of their own (an idle one reused, see
/// [`tasks`]), so a slow one never stalls reading.
/// Streams are registered here, before the next frame is read, so data the
/// host sends right behind a request is kept. Returns the connection that
/// replaces `conn` after a rebirth.
fn dispatch(agent: &Arc<Agent>, conn: &Arc<Conn>, msg: Message) -> Option<Arc<Conn>> {
    let Message::Request { id, body } = msg else {
        // Only a guest sends the rest: harmless, and ignored.
        log!("ignoring unexpected message {msg:?}");
        return None;
    };
    match body {
        Request::Quiesce => {
            let quiet = Message::Response {
                id,
                body: Ok(Response::Done),
            };
            if let Err(e) = conn.quiesce(&quiet) {
                log!("quiesce: {}", error::describe(&e));
            }
            return None;
        }
        Request::Unquiesce => {
            conn.unquiesce();
            conn.reply(id).send(Ok(Response::Done));
            return None;
        }
        Request::Rebirth { token } => return rebirth(agent, conn, id, token),
        _ => {}
    }
    dispatch_request(agent, conn, id, body);
    None
}

/// Serves the channel of a restored copy of the guest in place of `conn`
/// (see [`Request::Rebirth`]); the answer goes out on the new connection.
fn rebirth(agent: &Arc<Agent>, conn: &Arc<Conn>, id: u64, token: u64) -> Option<Arc<Conn>> {
    if conn.token() == Some(token) {
        conn.reply(id).send(Ok(Response::Done));
        return None;
    }
    match conn.reborn(token) {
        Ok(next) => {
            *agent.current() = Some(next.clone());
            next.reply(id).send(Ok(Response::Done));
            Some(next)
        }
        Err(e) => {
            log!("rebirth: {}", error::describe(&e));
            None
        }
    }
}

/// Handles a request other than the channel's own (see [`dispatch`]).
fn dispatch_request(agent: &Arc<Agent>, conn: &Arc<Conn>, id: u64, body: Request) {
    conn.announce(body.streams());
    let reply = conn.reply(id);
    let job: Job = match body {
        // The channel's own, answered by `dispatch` before it gets here.
        Request::Quiesce | Request::Unquiesce | Request::Rebirth { .. } => {
            return reply.send(Err(error::invalid("not a request for a thread")));
        }
        Request::Ping => return reply.send(Ok(Response::Pong)),
        Request::Trace { on } => return reply.send(Ok(Response::Trace(trace::take(on)))),
        Request::SyncClock(time) => return reply.send(setup::sync_clock(agent.mode, time)),
        Request::Exec(exec) => match exec::Streams::open(conn, &exec) {
            Ok(streams) => {
                let received = Instant::now();
                Box::new(move |agent, reply| {
                    trace::record("agent: request thread started", received);
                    exec::run(
                        reply,
                        &agent.reaper,
                        &agent.terminals,
                        agent.mode,
                        &exec,
                        streams,
                    );
                })
            }
            Err(e) => return reply.send(Err(e)),
        },
        Request::Setup(setup) => Box::new(move |agent, reply| {
            reply.send(setup::run(agent.mode, &agent.mounted, &agent.upper, &setup));
        }),
        Request::Prepare(prepare) => Box::new(move |agent, reply| {
            // What this boot recorded would be in every restored copy.
            trace::take(false);
            reply.send(setup::prepare(
                agent.mode,
                &agent.mounted,
                &agent.upper,
                &prepare,
            ));
        }),
        Request::Signal {
            process,
            signal,
            group,
        } => {
            let key = (conn.id(), process);
            match agent.reaper.try_signal(key, signal, group) {
                Some(result) => {
                    if result.is_ok() && group {
                        agent.terminals.signal_session(key, signal);
                    }
                    return reply.send(result.map(|()| Response::Done));
                }
                None => Box::new(move |agent, reply| {
                    let result = agent.reaper.signal(key, signal, group);
                    if result.is_ok() && group {
                        agent.terminals.signal_session(key, signal);
                    }
                    reply.send(result.map(|()| Response::Done));
                }),
            }
        }
        Request::Resize { process, size } => {
            let result = agent.terminals.resize((conn.id(), process), size);
            return reply.send(result.map(|()| Response::Done));
        }
        Request::Shutdown => Box::new(|agent, reply| agent.shutdown(reply)),
        Request::Fs(request) => Box::new(move |_, reply| {
            let result = fs::handle(reply.conn().handles(), request);
            reply.send(result);
        }),
        Request::ReadFile { path, stream } => match Sender::open(conn, stream) {
            Ok(sender) => Box::new(move |_, reply| transfer::read_file(reply, &path, sender)),
            Err(e) => return reply.send(Err(e)),
        },
        Request::WriteFile { path, mode, stream } => match Receiver::open(conn, stream) {
            Ok(receiver) => {
                Box::new(move |_, reply| transfer::write_file(reply, &path, mode, receiver))
            }
            // The stream is someone else's: resetting it would break theirs.
            Err(e) => return reply.send(Err(e)),
        },
        Request::ReadHandle {
            handle,
            len,
            stream,
        } => match Sender::open(conn, stream) {
            Ok(sender) => {
                Box::new(move |_, reply| transfer::read_handle(reply, handle, len, sender))
            }
            Err(e) => return reply.send(Err(e)),
        },
        Request::WriteHandle { handle, stream } => match Receiver::open(conn, stream) {
            Ok(receiver) => {
                Box::new(move |_, reply| transfer::write_handle(reply, handle, receiver))
            }
            Err(e) => return reply.send(Err(e)),
        },
        Request::SnapshotUpper { stream, exclude } => match Sender::open(conn, stream) {
            Ok(sender) => Box::new(move |agent, reply| {
                let upper = agent.upper.get().map(|fd| fd.as_fd());
                snapshot::run(reply, agent.mode, upper, &exclude, sender);
            }),
            Err(e) => return reply.send(Err(e)),
        },
        Request::Dial {
            address,
            port,
            to_guest,
            from_guest,
        } => match Sender::open(conn, from_guest)
            .and_then(|s| Ok((s, Receiver::open(conn, to_guest)?)))
        {
            Ok((sender, receiver)) => Box::new(move |_, reply| {
                forward::dial(reply, &address, port, sender, receiver);
            }),
            Err(e) => return reply.send(Err(e)),
        },
        Request::Listen {
            listener,
            address,
            port,
        } => Box::new(move |_, reply| forward::listen(reply, listener, &address, port)),
        Request::MountRoot { dir } => {
            Box::new(move |agent, reply| reply.send(roots::mount(agent.mode, &dir)))
        }
        Request::UnmountRoot { dir } => Box::new(move |_, reply| reply.send(roots::unmount(&dir))),
        Request::Unlisten { listener } => {
            return reply.send(if conn.remove_listener(listener) {
                Ok(Response::Done)
            } else {
                Err(error::invalid(format!("no listener {listener}")))
            });
        }
    };
    let agent = agent.clone();
    // On failure the closure, and with it the reply, is dropped: that
    // answers with an error.
    let started = conn.spawn(format!("request-{id}"), move || {
        agent.enter_request_thread();
        job(&agent, reply);
    });
    if let Err(e) = started {
        log!("start request {id}: {}", error::describe(&e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_errors_read_without_rust_suffixes() {
        let e = FrameError::Io(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(describe_frame_error(&e), "Input/output error");
        let e = FrameError::TooLarge(5 << 20);
        assert_eq!(
            describe_frame_error(&e),
            "frame of 5242880 bytes exceeds the 4194304-byte limit"
        );
    }
}
