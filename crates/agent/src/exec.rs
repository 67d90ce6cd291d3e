//! The `Exec` request: resolving user, environment, working directory and
//! program, spawning with pipes, and pumping the pipes to and from the host.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{self, Command};
use std::sync::Arc;

use cc_protocol::flow::Inbound;
use cc_protocol::{ErrorKind, Exec, Message, RemoteError, Response, Stdio, DATA_CHUNK};
use serde_bytes::ByteBuf;

use crate::conn::{Conn, Output, Reply};
use crate::environ::{self, Env, Probe, SearchError};
use crate::reaper::Reaper;
use crate::users::{self, Identity, UserError};
use crate::{error, spawn_thread, sys};

/// The streams of one `Exec`, registered before the process exists so that
/// input the host sends right behind the request is kept. Those not handed
/// to a pump when this is dropped are released.
#[derive(Debug)]
pub struct Streams {
    conn: Arc<Conn>,
    stdin: Option<(u32, Arc<Inbound>)>,
    stdout: Option<(u32, Arc<Output>)>,
    stderr: Option<(u32, Arc<Output>)>,
}

impl Streams {
    pub fn open(conn: &Arc<Conn>, exec: &Exec) -> Result<Self, RemoteError> {
        if exec.stdout == Stdio::Stdout {
            return Err(error::invalid("stdout cannot be redirected to itself"));
        }
        let mut streams = Self {
            conn: conn.clone(),
            stdin: None,
            stdout: None,
            stderr: None,
        };
        if let Some(id) = exec.stdin {
            streams.stdin = Some((id, conn.open_input(id)?));
        }
        if let Stdio::Stream(id) = exec.stdout {
            streams.stdout = Some((id, conn.open_output(id)?));
        }
        if let Stdio::Stream(id) = exec.stderr {
            streams.stderr = Some((id, conn.open_output(id)?));
        }
        Ok(streams)
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        if let Some((id, _)) = self.stdin.take() {
            self.conn.close_input(id);
        }
        for (id, _) in self.stdout.take().into_iter().chain(self.stderr.take()) {
            self.conn.close_output(id);
        }
    }
}

/// The parent's ends of a spawned process's pipes.
struct Spawned {
    pid: u32,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
}

/// Starts `exec` and answers `Started` (or the error); output flows only
/// after that answer.
pub fn run(reply: Reply, reaper: &Reaper, exec: &Exec, mut streams: Streams) {
    let conn = reply.conn().clone();
    let key = (conn.id(), exec.process);
    let spawned = match spawn(reaper, key, exec, &streams) {
        Ok(s) => s,
        Err(e) => return reply.send(Err(e)),
    };
    reply.send(Ok(Response::Started { pid: spawned.pid }));
    let process = exec.process;
    let c = conn.clone();
    reaper.announce(
        key,
        Box::new(move |status| {
            let _ = c.send(&Message::Exited { process, status });
        }),
    );
    if let (Some((stream, input)), Some(pipe)) = (streams.stdin.take(), spawned.stdin) {
        let c = conn.clone();
        if let Err(e) = spawn_thread(format!("stdin-{stream}"), move || {
            feed(&c, stream, &input, pipe)
        }) {
            log!("stream {stream}: start writer: {}", error::describe(&e));
            conn.close_input(stream);
            let _ = conn.send(&Message::Reset { stream });
        }
    }
    for (stream, pipe) in [
        (streams.stdout.take(), spawned.stdout),
        (streams.stderr.take(), spawned.stderr),
    ] {
        if let (Some((stream, output)), Some(pipe)) = (stream, pipe) {
            let c = conn.clone();
            if let Err(e) = spawn_thread(format!("output-{stream}"), move || {
                pump(&c, stream, &output, pipe)
            }) {
                log!("stream {stream}: start pump: {}", error::describe(&e));
                conn.close_output(stream);
                let _ = conn.send(&Message::Eof { stream });
            }
        }
    }
}

fn lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

fn spawn(
    reaper: &Reaper,
    key: (u64, u64),
    exec: &Exec,
    streams: &Streams,
) -> Result<Spawned, RemoteError> {
    let (argv0, args) = exec
        .argv
        .split_first()
        .ok_or_else(|| error::invalid("empty argv"))?;
    if argv0.is_empty() {
        return Err(error::invalid("empty program name"));
    }
    if let Some(i) = exec.argv.iter().position(|a| a.contains(&0)) {
        return Err(error::invalid(format!("argument {i} contains a NUL byte")));
    }
    let who = identity(exec.user.as_deref())?;
    let env = environ::build(who.home.as_bytes(), &exec.env).map_err(error::invalid)?;
    let cwd = working_dir(exec.cwd.as_ref().map(|c| c.as_slice()), &who.home)?;
    let program = program(argv0, &env, &cwd)?;

    let pipe = || sys::pipe().map_err(|e| error::os("create pipe", &e));
    let (stdin_child, stdin) = match streams.stdin {
        Some(_) => {
            let (r, w) = pipe()?;
            (r.into(), Some(File::from(w)))
        }
        None => (process::Stdio::null(), None),
    };
    let (stdout_writer, stdout) = match streams.stdout {
        Some(_) => {
            let (r, w) = pipe()?;
            (Some(w), Some(File::from(r)))
        }
        None => (None, None),
    };
    let (stderr_child, stderr) = match (exec.stderr, &stdout_writer) {
        (Stdio::Stdout, Some(w)) => {
            let w = w.try_clone().map_err(|e| error::os("duplicate pipe", &e))?;
            (w.into(), None)
        }
        (Stdio::Stream(_), _) => {
            let (r, w) = pipe()?;
            (w.into(), Some(File::from(r)))
        }
        _ => (process::Stdio::null(), None),
    };
    let stdout_child = stdout_writer.map_or_else(process::Stdio::null, process::Stdio::from);

    let mut cmd = Command::new(&program);
    cmd.arg0(OsStr::from_bytes(argv0))
        .args(args.iter().map(|a| OsStr::from_bytes(a)))
        .env_clear()
        .envs(
            env.iter()
                .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))),
        )
        .current_dir(&cwd)
        .stdin(stdin_child)
        .stdout(stdout_child)
        .stderr(stderr_child);
    let Identity {
        uid, gid, groups, ..
    } = who;
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes four syscalls and does
    // not allocate (`groups` was allocated before the fork). The ids are
    // set here rather than with `CommandExt::uid`, because std would drop
    // root before this hook could set the supplementary groups.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session and process group, so signals reach the
            // whole tree it starts.
            sys::setsid()?;
            sys::setgroups(&groups)?;
            sys::setgid(gid)?;
            sys::setuid(uid)
        });
    }
    let pid = reaper.spawn(key, || {
        // Dropping the child does not wait for it: the reaper reaps it.
        cmd.spawn()
            .map(|child| child.id())
            .map_err(|e| error::os(format_args!("exec {:?}", program.display().to_string()), &e))
    })?;
    // The command holds the child's ends of the pipes; without closing them
    // the output pipes would never reach end of file.
    drop(cmd);
    Ok(Spawned {
        pid,
        stdin,
        stdout,
        stderr,
    })
}

fn read_file(path: &str) -> Result<String, RemoteError> {
    match fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(error::os(format_args!("read {path}"), &e)),
    }
}

fn identity(user: Option<&str>) -> Result<Identity, RemoteError> {
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
fn working_dir(cwd: Option<&[u8]>, home: &str) -> Result<PathBuf, RemoteError> {
    let Some(cwd) = cwd else {
        let home = Path::new(home);
        return Ok(if home.is_dir() { home } else { Path::new("/") }.to_path_buf());
    };
    let context = format!("working directory {:?}", lossy(cwd));
    if cwd.contains(&0) {
        return Err(error::invalid(format!("{context} contains a NUL byte")));
    }
    let path = PathBuf::from(OsStr::from_bytes(cwd));
    match fs::metadata(&path) {
        Ok(m) if m.is_dir() => Ok(path),
        Ok(_) => Err(error::os(
            context,
            &io::Error::from_raw_os_error(libc::ENOTDIR),
        )),
        Err(e) => Err(error::os(context, &e)),
    }
}

/// The program to execute: `argv0` itself if it has a `/`, else its match
/// in the command's `PATH`, searched here for a precise error.
fn program(argv0: &[u8], env: &Env, cwd: &Path) -> Result<PathBuf, RemoteError> {
    if argv0.contains(&b'/') {
        return Ok(PathBuf::from(OsStr::from_bytes(argv0)));
    }
    let path = environ::get(env, b"PATH").unwrap_or_default();
    environ::search(argv0, path, cwd, probe).map_err(|e| match e {
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

fn probe(path: &Path) -> Probe {
    match fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Probe::Executable,
        Ok(m) if m.is_file() => Probe::NotExecutable,
        _ => Probe::Missing,
    }
}

/// Copies `pipe` to the host as `stream`, reading only as much as the
/// host's credit allows, so a slow host reader stalls the process rather
/// than the agent's memory.
fn pump(conn: &Conn, stream: u32, output: &Output, mut pipe: File) {
    let mut buf = vec![0; DATA_CHUNK];
    while let Some(credit) = output.acquire(DATA_CHUNK) {
        match output.wait_readable(pipe.as_fd()) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                log!("stream {stream}: poll: {}", error::describe(&e));
                break;
            }
        }
        let got = loop {
            match pipe.read(&mut buf[..credit]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log!("stream {stream}: read: {}", error::describe(&e));
                    break 0;
                }
                Ok(n) => break n,
            }
        };
        output.give_back(credit - got);
        if !output.is_open() {
            break;
        }
        let msg = if got == 0 {
            Message::Eof { stream }
        } else {
            Message::Data {
                stream,
                bytes: ByteBuf::from(buf[..got].to_vec()),
            }
        };
        if conn.send(&msg).is_err() || got == 0 {
            break;
        }
    }
    // Closing the read end here is what gives the writer EPIPE after a reset.
    conn.close_output(stream);
}

/// Copies host stream `stream` into the process's stdin pipe, returning
/// credit as the data is taken.
fn feed(conn: &Conn, stream: u32, input: &Inbound, mut pipe: File) {
    let mut buf = vec![0; DATA_CHUNK];
    while let Ok(r) = input.read(&mut buf, None) {
        if r.credit > 0 {
            let _ = conn.send(&Message::Credit {
                stream,
                bytes: r.credit,
            });
        }
        if r.len == 0 {
            break;
        }
        if let Err(e) = pipe.write_all(&buf[..r.len]) {
            if e.kind() != io::ErrorKind::BrokenPipe {
                log!("stream {stream}: write: {}", error::describe(&e));
            }
            // The process closed its stdin: tell the host to stop sending.
            conn.close_input(stream);
            let _ = conn.send(&Message::Reset { stream });
            return;
        }
    }
    conn.close_input(stream);
}
