//! cc-agent: the guest side of crumblecracker, running as PID 1 (`/init`)
//! in every instance's VM.
//!
//! It owns everything inside the guest: boot (the kernel filesystems and the
//! console), the root filesystem (an overlay of the host's disks, switched
//! into), the processes the host starts (spawning, their pipes, reaping
//! every child), and serving the `cc_protocol` conversation over the
//! `cc.agent` virtio-serial port.
//!
//! It knows nothing of QEMU or of host paths: disks are found by serial and
//! the port by name, and it trusts only what arrives over the protocol. As
//! PID 1 it must never exit: errors are answered over the channel or logged
//! to the console, and a lost connection is reopened. A power-off asked for
//! inside the guest (busybox `poweroff`) ends the VM like `Shutdown`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use cc_protocol::frame::{self, FrameError};
use cc_protocol::{Message, Request, Response, AGENT_PORT_NAME, PROTOCOL_VERSION};

/// Logs one line to the console.
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
mod reaper;
mod setup;
mod signals;
mod snapshot;
mod stream;
mod sys;
mod transfer;
mod users;

use conn::{Conn, PortReader, Reply};
use reaper::Reaper;
use stream::{Receiver, Sender};

fn log_line(args: fmt::Arguments<'_>) {
    // Nowhere to report a console failure to.
    let _ = writeln!(io::stderr().lock(), "cc-agent: {args}");
}

/// Starts a detached thread.
fn spawn_thread(name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    thread::Builder::new().name(name).spawn(f).map(drop)
}

/// State shared by all connections.
#[derive(Debug)]
struct Agent {
    reaper: Arc<Reaper>,
    /// How far the filesystems are set up.
    mounted: Mutex<setup::Mounted>,
    /// The root overlay's upper directory, once there is one.
    upper: OnceLock<OwnedFd>,
}

/// The agent's nice value: the highest priority, so that it answers the
/// host's pings and kills promptly even under a fork bomb. The processes
/// it starts get 0 back.
const AGENT_NICE: i32 = -20;

/// The connection being served, for a power-off to say goodbye on.
static CURRENT: Mutex<Option<Arc<Conn>>> = Mutex::new(None);

fn main() {
    // Before any thread exists, so that all of them inherit the mask and
    // the priority.
    let blocked = signals::block();
    let nice = sys::set_nice(AGENT_NICE);
    // File requests create files with exactly the modes asked for; the
    // processes the agent starts get the usual 022 back.
    sys::umask(0);
    mounts::boot();
    attach_console();
    log!("cc-agent {} starting", env!("CARGO_PKG_VERSION"));
    if let Err(e) = nice {
        log!("raise the agent's priority: {}", error::describe(&e));
    }
    if let Err(e) = blocked.and_then(|()| signals::watch()) {
        log!("watch for power-off signals: {}", error::describe(&e));
    }
    let reaper = loop {
        match Reaper::start() {
            Ok(r) => break r,
            Err(e) => {
                log!("start reaper: {}", error::describe(&e));
                thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let agent = Arc::new(Agent {
        reaper,
        mounted: Mutex::default(),
        upper: OnceLock::new(),
    });
    loop {
        serve(&agent, open_port());
    }
}

/// Points stdin at /dev/null and stdout and stderr at the console, whatever
/// the kernel left there.
fn attach_console() {
    let open = |path: &str, write: bool| {
        OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
    };
    type Dup = fn(&File) -> rustix::io::Result<()>;
    let (stdin, stdout, stderr): (Dup, Dup, Dup) = (
        |f| rustix::stdio::dup2_stdin(f),
        |f| rustix::stdio::dup2_stdout(f),
        |f| rustix::stdio::dup2_stderr(f),
    );
    for (path, write, targets) in [
        ("/dev/null", false, &[stdin][..]),
        ("/dev/console", true, &[stdout, stderr]),
    ] {
        match open(path, write) {
            Ok(file) => {
                for dup in targets {
                    if let Err(e) = dup(&file) {
                        log!("dup {path}: {}", error::describe(&e.into()));
                    }
                }
            }
            Err(e) => log!("open {path}: {}", error::describe(&e)),
        }
    }
}

/// The device node of the agent port, if it exists yet.
fn find_port() -> io::Result<Option<String>> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports")? {
        let entry = entry?;
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == AGENT_PORT_NAME {
            return Ok(Some(format!(
                "/dev/{}",
                entry.file_name().to_string_lossy()
            )));
        }
    }
    Ok(None)
}

/// Opens the agent port, waiting for it as long as it takes: quickly at
/// first (it appears during boot), then slowly and saying so.
fn open_port() -> File {
    const QUICK: Duration = Duration::from_secs(5);
    let start = Instant::now();
    let mut reported = false;
    loop {
        let problem = match find_port() {
            Ok(Some(path)) => match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(port) => return port,
                Err(e) => format!("open {path}: {}", error::describe(&e)),
            },
            Ok(None) => format!("no virtio port named {AGENT_PORT_NAME}"),
            Err(e) => format!("read /sys/class/virtio-ports: {}", error::describe(&e)),
        };
        let slow = start.elapsed() > QUICK;
        if slow && !reported {
            log!("{problem}; still waiting");
            reported = true;
        }
        thread::sleep(if slow {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(5)
        });
    }
}

/// Serves one connection until it is lost.
fn serve(agent: &Arc<Agent>, port: File) {
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        agent: format!("cc-agent {}", env!("CARGO_PKG_VERSION")),
    };
    // The port is still blocking: this waits until a host is connected.
    let ready = frame::write(&mut &port, &hello)
        .map_err(|e| describe_frame_error(&e))
        .and_then(|()| {
            sys::set_nonblocking(&port, true).map_err(|e| error::describe(&e))?;
            port.try_clone().map_err(|e| error::describe(&e))
        });
    let writer = match ready {
        Ok(w) => w,
        Err(e) => {
            log!("send hello: {e}");
            thread::sleep(Duration::from_secs(1));
            return;
        }
    };
    let conn = Arc::new(Conn::new(writer));
    *current() = Some(conn.clone());
    let reader = PortReader(port);
    match panic::catch_unwind(AssertUnwindSafe(|| read_frames(agent, &conn, reader))) {
        Ok(why) => log!("connection lost: {why}"),
        Err(_) => log!("connection lost: reader panicked"),
    }
    current().take();
    conn.close();
    agent.reaper.forget(conn.id());
}

fn current() -> std::sync::MutexGuard<'static, Option<Arc<Conn>>> {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner())
}

fn describe_frame_error(e: &FrameError) -> String {
    match e {
        FrameError::Io(io) => error::describe(io),
        FrameError::Decode(p) | FrameError::Encode(p) => format!("{e}: {p}"),
        FrameError::TooLarge(_) | FrameError::Truncated => e.to_string(),
    }
}

/// Reads and dispatches frames; returns why the connection ended.
fn read_frames(agent: &Arc<Agent>, conn: &Arc<Conn>, mut port: PortReader) -> String {
    let mut buf = Vec::new();
    loop {
        match frame::read(&mut port, &mut buf) {
            Ok(Some(msg)) => dispatch(agent, conn, msg),
            Ok(None) => return "the host closed the port".into(),
            Err(e) => return describe_frame_error(&e),
        }
    }
}

/// A request's handling, run on its own thread.
type Job = Box<dyn FnOnce(&Agent, Reply) + Send>;

/// Handles one message. Stream messages, pings and most signals are
/// handled inline (they never block, and need no thread when none can be
/// made: a fork bomb leaves no pids for one);
/// other requests get a thread each, so a slow one never stalls reading.
/// Streams are registered here, before the next frame is read, so data the
/// host sends right behind a request is kept.
fn dispatch(agent: &Arc<Agent>, conn: &Arc<Conn>, msg: Message) {
    let Message::Request { id, body } = msg else {
        conn.on_stream_message(msg);
        return;
    };
    let reply = conn.reply(id);
    let job: Job = match body {
        Request::Ping => return reply.send(Ok(Response::Pong)),
        Request::Exec(exec) => match exec::Streams::open(conn, &exec) {
            Ok(streams) => {
                Box::new(move |agent, reply| exec::run(reply, &agent.reaper, &exec, streams))
            }
            Err(e) => return reply.send(Err(e)),
        },
        Request::Setup(setup) => Box::new(move |agent, reply| {
            reply.send(setup::run(&agent.mounted, &agent.upper, &setup));
        }),
        Request::Prepare { root } => Box::new(move |agent, reply| {
            reply.send(setup::prepare(&agent.mounted, &agent.upper, &root));
        }),
        Request::Signal { process, signal } => {
            let key = (conn.id(), process);
            match agent.reaper.try_signal(key, signal) {
                Some(result) => return reply.send(result.map(|()| Response::Done)),
                None => Box::new(move |agent, reply| {
                    reply.send(agent.reaper.signal(key, signal).map(|()| Response::Done));
                }),
            }
        }
        Request::Shutdown => Box::new(|_, reply| shutdown(reply)),
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
        Request::SnapshotUpper { stream, exclude } => match Sender::open(conn, stream) {
            Ok(sender) => Box::new(move |agent, reply| {
                let upper = agent.upper.get().map(|fd| fd.as_fd());
                snapshot::run(reply, upper, &exclude, sender);
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
    if let Err(e) = spawn_thread(format!("request-{id}"), move || job(&agent, reply)) {
        log!("start request {id}: {}", error::describe(&e));
    }
}

/// Syncs, answers, and powers off. If the host never takes the answer, the
/// power-off happens anyway after a grace period.
fn shutdown(reply: Reply) {
    sys::sync();
    let grace = spawn_thread("poweroff".into(), || {
        thread::sleep(Duration::from_secs(1));
        power_off("the host asked to shut down");
    });
    if let Err(e) = grace {
        log!("start poweroff timer: {}", error::describe(&e));
    }
    reply.send_flushed(Ok(Response::Done));
    power_off("the host asked to shut down");
}

/// How long a goodbye may wait for room on the channel.
const GOODBYE_GRACE: Duration = Duration::from_millis(500);

/// Ends the VM: tells the host why and falls silent, syncs, kills every
/// process, and reboots, which with `reboot=t` and QEMU's `-no-reboot`
/// stops QEMU. Silent first, so that the processes killed here never
/// reach the host as exits or ends of file: it sees the guest go away,
/// not commands that finished.
fn power_off(reason: &str) {
    if let Some(conn) = current().take() {
        let closer = conn.clone();
        // A host that stopped reading must not hold the power-off up.
        let _ = spawn_thread("goodbye".into(), move || {
            thread::sleep(GOODBYE_GRACE);
            closer.close();
        });
        let _ = conn.send(&Message::Goodbye {
            reason: reason.to_string(),
        });
        conn.close();
    }
    sys::sync();
    // Everything but PID 1 itself.
    let _ = sys::kill(-1, libc::SIGKILL);
    sys::sync();
    let e = sys::reboot();
    log!("reboot: {}", error::describe(&e));
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
