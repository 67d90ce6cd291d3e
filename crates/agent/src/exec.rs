//! The `Exec` request: resolving user, environment, working directory and
//! program, spawning with pipes, and pumping the pipes to and from the host.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cc_protocol::{ErrorKind, Exec, Message, RemoteError, Response, Stdio};
use rustix::thread::{Gid, Uid};

use crate::conn::{Conn, HeldStarted, Reply};
use crate::environ::{self, Env, Probe, SearchError};
use crate::reaper::Reaper;
use crate::stream::{discard, DrainError, Receiver, Sender};
use crate::terminal::{self, Terminals};
use crate::users::{self, Identity, UserError};
use crate::{error, sys, trace, Mode};

/// The conventional mask for processes: the agent itself runs with none, so
/// that file requests set modes exactly.
const PROCESS_UMASK: u32 = 0o022;

/// The streams of one `Exec`, registered before the process exists so that
/// input the host sends right behind the request is kept. Those not handed
/// to a pump are released when this is dropped.
#[derive(Debug)]
pub struct Streams {
    stdin: Option<Receiver>,
    stdout: Option<Sender>,
    stderr: Option<Sender>,
}

impl Streams {
    pub fn open(conn: &Arc<Conn>, exec: &Exec) -> Result<Self, RemoteError> {
        if exec.stdout == Stdio::Stdout {
            return Err(error::invalid("stdout cannot be redirected to itself"));
        }
        if let Some(size) = exec.pty {
            if exec.stderr != Stdio::Null {
                return Err(error::invalid("a terminal's output is all on stdout"));
            }
            if size.rows == 0 || size.cols == 0 {
                return Err(error::invalid(
                    "a terminal needs at least one row and column",
                ));
            }
        }
        let stdin = exec.stdin.map(|id| Receiver::open(conn, id)).transpose()?;
        let output = |stdio| match stdio {
            Stdio::Stream(id) => Sender::open(conn, id).map(Some),
            Stdio::Null | Stdio::Stdout => Ok(None),
        };
        Ok(Self {
            stdin,
            stdout: output(exec.stdout)?,
            stderr: output(exec.stderr)?,
        })
    }
}

/// The parent's ends of a spawned process's pipes.
struct Spawned {
    pid: u32,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    /// The terminal's master, for a process started with one.
    master: Option<OwnedFd>,
}

/// Starts `exec` and answers `Started` (or the error); output flows only
/// after that answer.
pub fn run(
    reply: Reply,
    reaper: &Arc<Reaper>,
    terminals: &Arc<Terminals>,
    mode: Mode,
    exec: &Exec,
    mut streams: Streams,
) {
    let conn = reply.conn().clone();
    let key = (conn.id(), exec.process);
    // Held from before the process exists: it may power the guest off
    // before this thread gets on, and its answer must still go first.
    let held = conn.hold_started();
    let mut spawned = match spawn(reaper, mode, &conn, exec, &streams) {
        Ok(s) => s,
        Err(e) => return reply.send(Err(e)),
    };
    let terminal = spawned.master.take().is_some_and(|master| {
        terminals.insert(key, spawned.pid, master);
        true
    });
    let answered = Instant::now();
    let started = reply.into_message(Ok(Response::Started { pid: spawned.pid }));
    let process = exec.process;
    // A process the host feeds or that has a terminal may wait for the
    // host, which needs `Started` first; any other may end at once, and
    // then its start and exit reach the host in one write.
    if exec.stdin.is_some() || terminal {
        let _ = conn.send(&started);
        trace::record("agent: send Started", answered);
        drop(held);
        let c = conn.clone();
        let t = terminals.clone();
        reaper.announce(
            key,
            Box::new(move |status| {
                if terminal {
                    t.remove(key);
                }
                trace::record(EXIT_REAPED, answered);
                let reaped = Instant::now();
                let _ = c.send(&Message::Exited { process, status });
                trace::record("agent: send Exited", reaped);
            }),
        );
    } else {
        announce_quick_exit(reaper, key, &conn, started, answered, held);
    }
    // A thread that fails to start drops its stream, which releases it;
    // the host is then told the stream is over.
    if let (Some(input), Some(pipe)) = (streams.stdin.take(), spawned.stdin) {
        let stream = input.id();
        if let Err(e) = conn.spawn(format!("stdin-{stream}"), move || feed(&input, pipe)) {
            log!("stream {stream}: start writer: {}", error::describe(&e));
            let _ = conn.send(&Message::Reset { stream });
        }
    }
    for (output, pipe) in [
        (streams.stdout.take(), spawned.stdout),
        (streams.stderr.take(), spawned.stderr),
    ] {
        match (output, pipe) {
            (Some(output), Some(pipe)) => {
                let stream = output.id();
                let pump = move || match terminal {
                    true => output.pump_terminal(pipe),
                    false => output.pump(pipe),
                };
                if let Err(e) = conn.spawn(format!("output-{stream}"), pump) {
                    log!("stream {stream}: start pump: {}", error::describe(&e));
                    let _ = conn.send(&Message::Eof { stream });
                }
            }
            // A terminal nobody reads would fill and stall its process.
            (None, Some(pipe)) => {
                if let Err(e) =
                    conn.spawn(format!("discard-{}", exec.process), move || discard(pipe))
                {
                    log!("terminal: start reader: {}", error::describe(&e));
                }
            }
            _ => {}
        }
    }
}

/// The span from the `Started` answer being ready (sent, or waiting for
/// a quick exit) to the process's exit being reaped.
const EXIT_REAPED: &str = "agent: Started ready → exit reaped";

/// How long `Started` waits for the exit of a process that cannot be
/// waiting for the host. Its frame costs the guest about as much as the
/// `true` it announces takes to run (0.15 of 3 ms under TCG); a process
/// that lives longer is announced this much later.
const QUICK_EXIT: Duration = Duration::from_millis(5);

/// Sends `started` together with the process's `Exited` if it exits
/// within [`QUICK_EXIT`], else alone once that passed (and `Exited` when
/// it comes).
fn announce_quick_exit(
    reaper: &Reaper,
    key: crate::reaper::Key,
    conn: &Arc<Conn>,
    started: Message,
    since: Instant,
    _held: HeldStarted,
) {
    let pending = Arc::new((Mutex::new(Some(started)), Condvar::new()));
    let (c, p) = (conn.clone(), pending.clone());
    reaper.announce(
        key,
        Box::new(move |status| {
            let exited = Message::Exited {
                process: key.1,
                status,
            };
            let reaped = Instant::now();
            // Held while sending, so that `Started` never follows `Exited`.
            let mut started = p.0.lock().unwrap_or_else(|e| e.into_inner());
            match started.take() {
                Some(started) => {
                    let _ = c.send_all(&[started, exited]);
                    trace::record(EXIT_REAPED, since);
                    trace::record("agent: send Started and Exited in one write", reaped);
                    p.1.notify_all();
                }
                None => {
                    let _ = c.send(&exited);
                    trace::record(EXIT_REAPED, since);
                    trace::record("agent: send Exited", reaped);
                }
            }
        }),
    );
    let (started, exited) = &*pending;
    let started = started.lock().unwrap_or_else(|e| e.into_inner());
    let (mut started, _) = exited
        .wait_timeout_while(started, QUICK_EXIT, |s| s.is_some())
        .unwrap_or_else(|e| e.into_inner());
    if let Some(msg) = started.take() {
        let sending = Instant::now();
        let _ = conn.send(&msg);
        trace::record("agent: send Started", sending);
    }
}

fn lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

fn spawn(
    reaper: &Arc<Reaper>,
    mode: Mode,
    conn: &Conn,
    exec: &Exec,
    streams: &Streams,
) -> Result<Spawned, RemoteError> {
    let resolving = Instant::now();
    let argv0 = exec
        .argv
        .first()
        .ok_or_else(|| error::invalid("empty argv"))?;
    if argv0.is_empty() {
        return Err(error::invalid("empty program name"));
    }
    if let Some(i) = exec.argv.iter().position(|a| a.contains(&0)) {
        return Err(error::invalid(format!("argument {i} contains a NUL byte")));
    }
    // In host mode a process started without a user runs as the host
    // program does: the agent is no init to hand out identities.
    let own_ids = mode == Mode::Host && exec.user.is_none();
    let who = if own_ids {
        identity(Some(&rustix::process::geteuid().as_raw().to_string()))?
    } else {
        identity(exec.user.as_deref())?
    };
    let env = environ::build(who.home.as_bytes(), &exec.env).map_err(error::invalid)?;
    let root = exec
        .root
        .as_ref()
        .map(|r| PathBuf::from(OsStr::from_bytes(r)));
    // Paths the process names are looked up in its root, where it runs:
    // symbolic links in them (an image's absolute ones) resolve there too.
    let root_dir = root
        .as_ref()
        .map(|r| {
            File::open(r).map_err(|e| error::os(format_args!("open root {}", r.display()), &e))
        })
        .transpose()?;
    let inside = |p: &Path| -> io::Result<fs::Metadata> {
        match &root_dir {
            Some(dir) => sys::metadata_in_root(dir.as_fd(), p),
            None => fs::metadata(p),
        }
    };
    let cwd = match (&root, &exec.cwd) {
        (Some(_), None) => PathBuf::from("/"),
        (_, cwd) => working_dir(cwd.as_ref().map(|c| c.as_slice()), &who.home, &inside)?,
    };
    let program = program(argv0, &env, &cwd, &inside)?;
    trace::record("agent: resolve user, environment, program", resolving);
    let spawning = Instant::now();

    let fail = |what: &str, e: io::Error| error::os(what, &e);
    let pipe = || sys::pipe().map_err(|e| fail("create pipe", e));
    // Standard descriptors the process does not share with the host read
    // and write /dev/null.
    let null = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| fail("open /dev/null", e))?;
    // A terminal is the child's 0, 1 and 2; the master is all the host's
    // streams.
    let terminal = exec
        .pty
        .map(terminal::open)
        .transpose()
        .map_err(|e| fail("open a terminal", e))?;
    let (master, slave) = terminal.unzip();
    let master_file = |wanted: bool| -> Result<Option<File>, RemoteError> {
        match (&master, wanted) {
            (Some(m), true) => Ok(Some(File::from(
                m.try_clone()
                    .map_err(|e| fail("duplicate the terminal", e))?,
            ))),
            _ => Ok(None),
        }
    };
    // Read even when the host does not want the output, or the terminal
    // fills up and its process stalls.
    let (master_in, master_out) = (master_file(streams.stdin.is_some())?, master_file(true)?);
    let (stdin_child, stdin) = match streams.stdin {
        Some(_) if master.is_none() => {
            let (r, w) = pipe()?;
            (Some(r), Some(File::from(w)))
        }
        _ => (None, None),
    };
    let (stdout_child, stdout) = match streams.stdout {
        Some(_) if master.is_none() => {
            let (r, w) = pipe()?;
            (Some(w), Some(File::from(r)))
        }
        _ => (None, None),
    };
    let (stderr_child, stderr) = match exec.stderr {
        Stdio::Stream(_) => {
            let (r, w) = pipe()?;
            (Some(w), Some(File::from(r)))
        }
        _ => (None, None),
    };
    let stderr_fd = match (exec.stderr, &stdout_child, &stderr_child) {
        (Stdio::Stdout, Some(out), _) => out.as_fd(),
        (_, _, Some(err)) => err.as_fd(),
        _ => null.as_fd(),
    };
    let stdio = match &slave {
        Some(slave) => [slave.as_fd(); 3],
        None => [
            or_null(stdin_child.as_ref(), &null),
            or_null(stdout_child.as_ref(), &null),
            stderr_fd,
        ],
    };

    let c = |bytes: &[u8], what: &str| {
        sys::cstring(bytes.to_vec())
            .map_err(|_| error::invalid(format!("{what} contains a NUL byte")))
    };
    let path = c(program.as_os_str().as_bytes(), "program path")?;
    let cwd_c = c(cwd.as_os_str().as_bytes(), "working directory")?;
    let root_c = root
        .as_ref()
        .map(|r| c(r.as_os_str().as_bytes(), "root"))
        .transpose()?;
    let argv = sys::CStrings::new(exec.argv.iter().map(|a| a.to_vec()))
        .map_err(|_| error::invalid("an argument contains a NUL byte"))?;
    let envp = sys::CStrings::new(
        env.iter()
            .map(|(k, v)| [k.as_slice(), b"=", v.as_slice()].concat()),
    )
    .map_err(|_| error::invalid("an environment variable contains a NUL byte"))?;
    let Identity {
        uid, gid, groups, ..
    } = who;
    // Unchecked: an id of -1 then fails in the kernel (EINVAL), as any
    // other id it refuses.
    let groups: Vec<Gid> = groups.into_iter().map(Gid::from_raw_unchecked).collect();
    let rlimits = rlimits(&exec.rlimits)?;
    let plan = sys::SpawnPlan {
        program: &path,
        argv: argv.pointers(),
        envp: envp.pointers(),
        cwd: &cwd_c,
        root: root_c.as_deref(),
        stdio,
        controlling_terminal: slave.is_some(),
        umask: PROCESS_UMASK,
        // The guest's agent runs at a high priority (to answer the host
        // whatever its processes do); theirs is the usual one. In host
        // mode the process keeps the host program's, which it may not
        // have the right to lower.
        nice: (mode == Mode::Guest).then_some(0),
        ids: (!own_ids).then_some((
            groups.as_slice(),
            Gid::from_raw_unchecked(gid),
            Uid::from_raw_unchecked(uid),
        )),
        rlimits: &rlimits,
    };
    let key = (conn.id(), exec.process);
    let pid = reaper.spawn(key, conn.tasks(), || {
        sys::spawn(&plan).map_err(|e| {
            let what = format!("exec {:?}", program.display().to_string());
            match e
                .get_ref()
                .and_then(|i| i.downcast_ref::<sys::SpawnError>())
            {
                Some(s) if s.step == sys::EXEC_STEP => error::os(&what, &s.errno),
                Some(s) => error::os(format_args!("{what}: {}", s.step), &s.errno),
                None => error::os(&what, &e),
            }
        })
    })?;
    trace::record("agent: pipes, spawn and exec", spawning);
    // The child's ends of the pipes close here, so that the output pipes
    // reach end of file when the process ends.
    drop((stdin_child, stdout_child, stderr_child, slave));
    if master.is_some() {
        return Ok(Spawned {
            pid,
            stdin: master_in,
            stdout: master_out,
            stderr: None,
            master,
        });
    }
    Ok(Spawned {
        pid,
        stdin,
        stdout,
        stderr,
        master: None,
    })
}

/// The limits to set in the child; a resource Linux does not know is
/// refused here, where it can be named.
fn rlimits(limits: &[cc_protocol::Rlimit]) -> Result<Vec<(u32, libc::rlimit)>, RemoteError> {
    limits
        .iter()
        .map(|l| match cc_protocol::rlimit_name(l.resource) {
            Some(_) => Ok((
                l.resource,
                libc::rlimit {
                    rlim_cur: l.soft,
                    rlim_max: l.hard,
                },
            )),
            None => Err(error::invalid(format!(
                "unknown resource limit {}",
                l.resource
            ))),
        })
        .collect()
}

fn or_null<'a>(fd: Option<&'a OwnedFd>, null: &'a File) -> BorrowedFd<'a> {
    fd.map_or(null.as_fd(), AsFd::as_fd)
}

fn read_file(path: &str) -> Result<String, RemoteError> {
    match fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(error::os(format_args!("read {path}"), &e)),
    }
}

/// What an identity was resolved from: the user spec and the state of
/// `/etc/passwd` and `/etc/group` (`None`: missing).
#[derive(Debug, Clone, PartialEq, Eq)]
struct IdentityKey {
    user: Option<String>,
    files: [Option<FileStamp>; 2],
}

/// Enough of a file's metadata to tell it was replaced or written.
type FileStamp = (u64, u64, u64, i64, i64, i64, i64);

fn stamp(path: &str) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// Identities resolved lately. Every command resolves one; two stats
/// instead of reading and parsing both files save a tenth of a
/// millisecond under emulation.
static IDENTITIES: Mutex<Vec<(IdentityKey, Identity)>> = Mutex::new(Vec::new());

/// Identities kept: one per user spec in use, a handful in practice.
const IDENTITIES_KEPT: usize = 16;

fn identity(user: Option<&str>) -> Result<Identity, RemoteError> {
    let key = IdentityKey {
        user: user.map(str::to_owned),
        files: [stamp("/etc/passwd"), stamp("/etc/group")],
    };
    if let Some((_, who)) = crate::lock(&IDENTITIES).iter().find(|(k, _)| *k == key) {
        return Ok(who.clone());
    }
    let who = resolve_identity(user)?;
    let mut cache = crate::lock(&IDENTITIES);
    cache.retain(|(k, _)| k.user != key.user);
    if cache.len() >= IDENTITIES_KEPT {
        cache.remove(0);
    }
    cache.push((key, who.clone()));
    Ok(who)
}

fn resolve_identity(user: Option<&str>) -> Result<Identity, RemoteError> {
    let (passwd, group) = match user {
        // Root needs only its home, and no group file.
        None => (read_file("/etc/passwd")?, String::new()),
        Some(_) => (read_file("/etc/passwd")?, read_file("/etc/group")?),
    };
    users::resolve(user, &passwd, &group).map_err(|e| match e {
        UserError::Invalid(_) => error::invalid(e.to_string()),
        _ => error::new(ErrorKind::NoSuchUser, e.to_string()),
    })
}

/// The requested directory, which must exist, else the user's home if it
/// exists, else `/`.
fn working_dir(
    cwd: Option<&[u8]>,
    home: &str,
    inside: &dyn Fn(&Path) -> io::Result<fs::Metadata>,
) -> Result<PathBuf, RemoteError> {
    let Some(cwd) = cwd else {
        let home = Path::new(home);
        return Ok(if home.is_dir() { home } else { Path::new("/") }.to_path_buf());
    };
    let context = format!("working directory {:?}", lossy(cwd));
    if cwd.contains(&0) {
        return Err(error::invalid(format!("{context} contains a NUL byte")));
    }
    let path = PathBuf::from(OsStr::from_bytes(cwd));
    // Kind Io, not NotFound: the host reads NotFound on Exec as "no such
    // program", which a missing directory is not.
    let fail = |e: &io::Error| RemoteError {
        kind: ErrorKind::Io,
        ..error::os(&context, e)
    };
    match inside(&path) {
        Ok(m) if m.is_dir() => Ok(path),
        Ok(_) => Err(fail(&io::Error::from_raw_os_error(libc::ENOTDIR))),
        Err(e) => Err(fail(&e)),
    }
}

/// The program to execute: `argv0` itself if it has a `/`, else its match
/// in the command's `PATH`, searched here (in the process's root, through
/// `inside`) for a precise error.
fn program(
    argv0: &[u8],
    env: &Env,
    cwd: &Path,
    inside: &dyn Fn(&Path) -> io::Result<fs::Metadata>,
) -> Result<PathBuf, RemoteError> {
    if argv0.contains(&b'/') {
        return Ok(PathBuf::from(OsStr::from_bytes(argv0)));
    }
    let path = environ::get(env, b"PATH").unwrap_or_default();
    environ::search(argv0, path, cwd, |p| probe(inside(p))).map_err(|e| match e {
        SearchError::NotFound => error::new(
            ErrorKind::NotFound,
            format!("executable file not found in $PATH: {:?}", lossy(argv0)),
        ),
        SearchError::NotExecutable(p) => error::os(
            format_args!("exec {:?}", p.display().to_string()),
            &io::Error::from_raw_os_error(libc::EACCES),
        ),
    })
}

fn probe(meta: io::Result<fs::Metadata>) -> Probe {
    match meta {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Probe::Executable,
        Ok(m) if m.is_file() => Probe::NotExecutable,
        _ => Probe::Missing,
    }
}

/// Copies the host's stdin stream into the process's stdin pipe.
fn feed(input: &Receiver, mut pipe: File) {
    match input.drain(|bytes| pipe.write_all(bytes)) {
        // The process closed its stdin; the host was told to stop sending.
        Err(DrainError::Sink(e)) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(DrainError::Sink(e)) => {
            log!("stream {}: write: {}", input.id(), error::describe(&e));
        }
        // Closing the pipe below gives the process its end of file.
        Ok(()) | Err(DrainError::Broken) => {}
    }
}
