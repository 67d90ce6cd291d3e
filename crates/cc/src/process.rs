//! Running processes in the guest, in the shape of `std::process`.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cc_protocol::flow::{Inbound, Outbound};
use cc_protocol::{ErrorKind, Exec, Request, Response};
use serde_bytes::ByteBuf;

use crate::channel::ExitSlot;
use cc_cancel::CancelToken;

use crate::cancel;
use crate::error::{Error, Result};
use crate::instance::{Inner, REQUEST_TIMEOUT};
use crate::pause::Deadline;

/// At a command's deadline, how long the agent gets to answer the kill
/// before the instance is declared dead, and then how long the process
/// gets to be reaped before the timeout is reported anyway.
const KILL_ANSWER: Duration = Duration::from_secs(1);
const KILL_REAPED: Duration = Duration::from_secs(1);

/// The most rows or columns a terminal may have: more is a mistake, not a
/// screen.
pub const MAX_TERMINAL_SIZE: u16 = 4096;

/// Where a process's standard stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// `/dev/null`.
    Null,
    /// A pipe to the host: [`Child::stdin`], [`Child::stdout`], [`Child::stderr`].
    Piped,
    /// stderr only: into the same pipe as stdout, in the order written.
    MergeIntoStdout,
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus(cc_protocol::ExitStatus);

impl ExitStatus {
    /// The exit code, if the process exited normally.
    pub fn code(&self) -> Option<i32> {
        match self.0 {
            cc_protocol::ExitStatus::Code(c) => Some(c),
            cc_protocol::ExitStatus::Signal(_) => None,
        }
    }

    /// The signal that ended the process, if one did.
    pub fn signal(&self) -> Option<i32> {
        match self.0 {
            cc_protocol::ExitStatus::Signal(s) => Some(s),
            cc_protocol::ExitStatus::Code(_) => None,
        }
    }

    pub fn success(&self) -> bool {
        self.code() == Some(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            cc_protocol::ExitStatus::Code(c) => write!(f, "exit status {c}"),
            cc_protocol::ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// A finished process's status and captured output.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A process to run in the guest. Defaults: stdin from `/dev/null`, stdout
/// and stderr piped; environment `PATH`, `HOME` (the user's) and `TERM`,
/// then the image's `Env`, then whatever [`Command::env`] adds; the image's
/// working directory; the instance's user, else the image's.
#[derive(Debug, Clone)]
pub struct Command {
    inst: Arc<Inner>,
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<OsString>,
    user: Option<String>,
    stdio: [Stdio; 3],
    timeout: Option<Duration>,
    /// A terminal of (rows, columns) instead of pipes.
    pty: Option<(u16, u16)>,
    /// Guest directory the process runs changed into as its root.
    root: Option<String>,
    /// Resource limits as (OCI name, soft, hard), checked at spawn.
    rlimits: Vec<(String, u64, u64)>,
}

impl Command {
    pub(crate) fn new(inst: Arc<Inner>, program: impl AsRef<OsStr>) -> Command {
        let user = inst.default_user.clone();
        let (env, cwd) = match &inst.image_config {
            Some(c) => (
                c.env
                    .iter()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                    .collect(),
                c.working_dir.as_ref().map(OsString::from),
            ),
            None => (Vec::new(), None),
        };
        Command {
            inst,
            argv: vec![program.as_ref().to_owned()],
            env,
            cwd,
            user,
            stdio: [Stdio::Null, Stdio::Piped, Stdio::Piped],
            timeout: None,
            pty: None,
            root: None,
            rlimits: Vec::new(),
        }
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Command {
        self.argv.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.argv
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets `key=value` in the process's environment (over the defaults).
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Command {
        let key = key.as_ref().to_owned();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.as_ref().to_owned()));
        self
    }

    /// The value `env` set for `key`, if any.
    pub fn get_env(&self, key: impl AsRef<OsStr>) -> Option<&OsStr> {
        self.env
            .iter()
            .find(|(k, _)| k == key.as_ref())
            .map(|(_, v)| v.as_os_str())
    }

    pub fn current_dir(&mut self, dir: impl AsRef<OsStr>) -> &mut Command {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// `name`, `uid`, `uid:gid` or `name:group`.
    pub fn user(&mut self, user: impl Into<String>) -> &mut Command {
        self.user = Some(user.into());
        self
    }

    /// Kills the process if it has not exited `limit` after it started;
    /// waiting for it then fails with [`Error::Timeout`].
    pub fn timeout(&mut self, limit: Duration) -> &mut Command {
        self.timeout = Some(limit);
        self
    }

    /// The environment set on this command (the image's `Env`, then
    /// [`Command::env`]'s), as `KEY=VALUE` entries; the guest adds `PATH`,
    /// `HOME` and `TERM` where missing.
    pub fn environ(&self) -> Vec<OsString> {
        self.env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.clone();
                kv.push("=");
                kv.push(v);
                kv
            })
            .collect()
    }

    pub fn stdin(&mut self, s: Stdio) -> &mut Command {
        self.stdio[0] = s;
        self
    }

    pub fn stdout(&mut self, s: Stdio) -> &mut Command {
        self.stdio[1] = s;
        self
    }

    pub fn stderr(&mut self, s: Stdio) -> &mut Command {
        self.stdio[2] = s;
        self
    }

    /// Runs the process on a new pseudo-terminal of `rows` × `cols` (each
    /// 1 to [`MAX_TERMINAL_SIZE`]), its controlling terminal: it reads
    /// its stdin from and writes its stdout and stderr to the terminal,
    /// as a shell in a terminal window does. [`Child::stdin`] is what is
    /// typed (when stdin is [`Stdio::Piped`]), [`Child::stdout`]
    /// everything the terminal shows (echo included), [`Child::stderr`]
    /// is `None`, and [`Child::resize`] changes the size. `TERM` is the
    /// environment's, `xterm` by default.
    pub fn pty(&mut self, rows: u16, cols: u16) -> &mut Command {
        self.pty = Some((rows, cols));
        self
    }

    /// Runs the process with guest directory `root` as its root
    /// filesystem (see [`Instance::mount_root`](crate::Instance::mount_root)):
    /// the program and the working directory are looked up in it.
    pub fn root(&mut self, root: impl Into<String>) -> &mut Command {
        self.root = Some(root.into());
        self
    }

    /// Limits the process's use of `resource` (`setrlimit(2)`): `resource`
    /// is the Linux name as OCI writes it (`"RLIMIT_NOFILE"`,
    /// `"RLIMIT_NPROC"`, ...), `soft` the limit the process meets and
    /// `hard` the ceiling up to which it may raise it; [`u64::MAX`] is
    /// unlimited. Set again for the same resource, the last one holds.
    /// An unknown resource or `soft` above `hard` fails [`Command::spawn`]
    /// with [`Error::InvalidArgument`] before the guest is asked; a limit
    /// the guest's kernel refuses (a hard limit above the current one for a
    /// process that may not raise it) fails the spawn naming the resource.
    pub fn rlimit(&mut self, resource: impl Into<String>, soft: u64, hard: u64) -> &mut Command {
        let resource = resource.into();
        self.rlimits.retain(|(r, _, _)| *r != resource);
        self.rlimits.push((resource, soft, hard));
        self
    }

    /// The instance's `max_result_bytes`.
    pub(crate) fn max_result(&self) -> u64 {
        self.inst.max_result
    }

    fn validate(&self) -> Result<()> {
        let has_nul = |s: &OsStr| s.as_bytes().contains(&0);
        if self.argv[0].is_empty() {
            return Err(Error::InvalidArgument("empty program name".into()));
        }
        if let Some(a) = self.argv.iter().find(|a| has_nul(a)) {
            return Err(Error::InvalidArgument(format!(
                "argument {a:?} contains a NUL byte"
            )));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.as_bytes().contains(&b'=') || has_nul(k) || has_nul(v) {
                return Err(Error::InvalidArgument(format!(
                    "bad environment entry {k:?}={v:?}"
                )));
            }
        }
        if self
            .cwd
            .as_deref()
            .is_some_and(|c| c.is_empty() || has_nul(c))
        {
            return Err(Error::InvalidArgument("bad working directory".into()));
        }
        if self
            .user
            .as_deref()
            .is_some_and(|u| u.is_empty() || u.contains('\0'))
        {
            return Err(Error::InvalidArgument("bad user".into()));
        }
        if let Some((rows, cols)) = self.pty {
            check_size(rows, cols)?;
        }
        self.wire_rlimits()?;
        if self.stdio[0] == Stdio::MergeIntoStdout || self.stdio[1] == Stdio::MergeIntoStdout {
            return Err(Error::InvalidArgument(
                "only stderr can be merged into stdout".into(),
            ));
        }
        if self.stdio[2] == Stdio::MergeIntoStdout && self.stdio[1] != Stdio::Piped {
            return Err(Error::InvalidArgument(
                "stderr can be merged only into a piped stdout".into(),
            ));
        }
        Ok(())
    }

    fn wire_rlimits(&self) -> Result<Vec<cc_protocol::Rlimit>> {
        self.rlimits
            .iter()
            .map(|(name, soft, hard)| rlimit(name, *soft, *hard))
            .collect()
    }

    /// Starts the process.
    pub fn spawn(&self) -> Result<Child> {
        self.validate()?;
        self.inst.check_running()?;
        let ch = &self.inst.channel;
        let process = ch.new_process_id();
        let exit = ch.watch_exit(process);
        let stdin = (self.stdio[0] == Stdio::Piped).then(|| ch.open_outbound());
        let stdout = (self.stdio[1] == Stdio::Piped).then(|| ch.open_inbound());
        // A terminal's output is one stream, stdout's.
        let stderr =
            (self.stdio[2] == Stdio::Piped && self.pty.is_none()).then(|| ch.open_inbound());
        let to_wire = |s: Stdio, stream: &Option<(u32, Arc<Inbound>)>| match (s, stream) {
            (Stdio::MergeIntoStdout, _) => cc_protocol::Stdio::Stdout,
            (_, Some((id, _))) => cc_protocol::Stdio::Stream(*id),
            _ => cc_protocol::Stdio::Null,
        };
        let exec = Exec {
            process,
            argv: self
                .argv
                .iter()
                .map(|a| ByteBuf::from(a.as_bytes()))
                .collect(),
            env: self
                .env
                .iter()
                .map(|(k, v)| ByteBuf::from([k.as_bytes(), b"=", v.as_bytes()].concat()))
                .collect(),
            cwd: self.cwd.as_ref().map(|c| ByteBuf::from(c.as_bytes())),
            user: self.user.clone(),
            stdin: stdin.as_ref().map(|(id, _)| *id),
            stdout: to_wire(self.stdio[1], &stdout),
            stderr: match self.pty {
                Some(_) => cc_protocol::Stdio::Null,
                None => to_wire(self.stdio[2], &stderr),
            },
            pty: self
                .pty
                .map(|(rows, cols)| cc_protocol::WindowSize { rows, cols }),
            root: self.root.as_ref().map(|r| ByteBuf::from(r.as_bytes())),
            rlimits: self.wire_rlimits()?,
        };
        let mut child = Child {
            inst: self.inst.clone(),
            process,
            pid: 0,
            exit,
            limit: self.timeout,
            started: Instant::now(),
            deadline: self
                .timeout
                .map(|t| self.inst.channel.pause_clock().deadline_in(t)),
            pty: self.pty.is_some(),
            stdin: stdin.map(|(id, s)| ChildStdin {
                inst: self.inst.clone(),
                id,
                stream: s,
            }),
            stdout: stdout.map(|(id, s)| ChildOutput {
                inst: self.inst.clone(),
                id,
                stream: s,
                deadline: None,
            }),
            stderr: stderr.map(|(id, s)| ChildOutput {
                inst: self.inst.clone(),
                id,
                stream: s,
                deadline: None,
            }),
        };
        // On error, dropping `child` closes the streams registered above.
        let answer = {
            let _span = tracing::debug_span!("cc: send Exec → Started").entered();
            ch.request(Request::Exec(exec), REQUEST_TIMEOUT)?
        };
        match answer {
            Ok(Response::Started { pid }) => {
                child.pid = pid;
                Ok(child)
            }
            Ok(other) => Err(Error::Protocol(format!(
                "unexpected answer to exec: {other:?}"
            ))),
            Err(e) => {
                ch.forget_exit(process);
                Err(match e.kind {
                    ErrorKind::NotFound => Error::CommandNotFound(e.message),
                    ErrorKind::PermissionDenied => Error::PermissionDenied(e.message),
                    ErrorKind::NoSuchUser => Error::UnknownUser(e.message),
                    ErrorKind::InvalidArgument => Error::InvalidArgument(e.message),
                    _ => Error::Guest {
                        op: "exec".into(),
                        message: e.message,
                    },
                })
            }
        }
    }

    /// Runs the process with stdout and stderr captured; returns when it
    /// exited and both streams ended.
    pub fn output(&self) -> Result<Output> {
        let mut cmd = self.clone();
        if cmd.stdio[2] != Stdio::MergeIntoStdout {
            cmd.stdio[2] = Stdio::Piped;
        }
        cmd.stdio[1] = Stdio::Piped;
        cmd.spawn()?.wait_with_output()
    }

    /// Runs the process with stderr merged into stdout; returns the
    /// combined output in the order it was written.
    pub fn combined_output(&self) -> Result<Output> {
        let mut cmd = self.clone();
        cmd.stdio[2] = Stdio::MergeIntoStdout;
        cmd.output()
    }

    /// Runs the process and returns its exit status. Output not redirected
    /// elsewhere is discarded.
    pub fn status(&self) -> Result<ExitStatus> {
        let mut cmd = self.clone();
        for s in &mut cmd.stdio {
            if *s == Stdio::Piped {
                *s = Stdio::Null;
            }
        }
        cmd.spawn()?.wait()
    }
}

/// A started guest process. Dropping it does not kill the process.
#[derive(Debug)]
pub struct Child {
    inst: Arc<Inner>,
    process: u64,
    pid: u32,
    exit: Arc<ExitSlot>,
    /// The command's time limit, when it started and when the limit runs
    /// out (paused time not counted).
    limit: Option<Duration>,
    started: Instant,
    deadline: Option<Deadline>,
    /// Started with [`Command::pty`].
    pty: bool,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildOutput>,
    pub stderr: Option<ChildOutput>,
}

impl Child {
    /// The process id inside the guest.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Closes stdin (the process sees end of file) and waits for the
    /// process to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        drop(self.stdin.take());
        Ok(self.wait_deadline(None)?.expect("no deadline"))
    }

    /// [`Child::wait`] that `cancel` stops with [`Error::Cancelled`]; the
    /// process keeps running.
    pub fn wait_cancellable(&mut self, cancel: &CancelToken) -> Result<ExitStatus> {
        cancel::scope("wait", cancel, || self.wait())
    }

    /// Like [`Child::wait`] but gives up after `timeout` with `Ok(None)`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        drop(self.stdin.take());
        self.wait_deadline(Some(Instant::now() + timeout))
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.wait_deadline(Some(Instant::now()))
    }

    fn wait_deadline(&self, deadline: Option<Instant>) -> Result<Option<ExitStatus>> {
        // A closed instance says so (AlreadyClosed) rather than NotRunning.
        if let Some(status) = self.exit.wait(Some(Instant::now())).or_else(|e| {
            self.inst.check_running()?;
            Err(e)
        })? {
            return Ok(Some(ExitStatus(status)));
        }
        self.inst.check_running()?;
        let clock = self.inst.channel.pause_clock();
        let _span = tracing::debug_span!("cc: Started → Exited").entered();
        loop {
            // A pause moves the command's deadline: wait, then look again.
            let until = match (deadline, self.deadline.map(|d| d.now(clock))) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(status) = self.exit.wait(until)? {
                return Ok(Some(ExitStatus(status)));
            }
            if self.deadline.is_some_and(|d| d.passed(clock)) {
                return Err(self.expire());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }

    /// The command ran out of time: kill it (and its group) and say so,
    /// promptly whatever the guest does. A kill the agent does not answer
    /// within [`KILL_ANSWER`] means the guest is deaf: the instance is
    /// marked dead.
    fn expire(&self) -> Error {
        match self.signaller().signal_within(libc::SIGKILL, KILL_ANSWER) {
            Err(Error::Timeout(_)) => self.inst.mark_dead(format!(
                "the guest did not answer a kill within {} s at a command's deadline",
                KILL_ANSWER.as_secs_f64()
            )),
            _ => {
                let _ = self.exit.wait(Some(Instant::now() + KILL_REAPED));
            }
        }
        Error::Timeout(format!(
            "command (guest pid {}) after {:.3} s (its limit: {:.3} s); it was killed",
            self.pid,
            self.started.elapsed().as_secs_f64(),
            self.limit.unwrap_or_default().as_secs_f64()
        ))
    }

    /// Sends `signal` to the process's whole process group (on a
    /// terminal, see [`Command::pty`], to every process of its session:
    /// a shell's jobs have groups of their own).
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.signaller().signal(signal)
    }

    /// Kills the process and its process group (`SIGKILL`).
    pub fn kill(&mut self) -> Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Sets the window size of the process's terminal (see
    /// [`Command::pty`]); the programs in its foreground get `SIGWINCH`.
    /// A process that already exited is not an error; one without a
    /// terminal is [`Error::InvalidArgument`].
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.signaller().resize(rows, cols)
    }

    /// When the command's time limit runs out, if it has one, as things
    /// stand (a later pause moves it).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let clock = self.inst.channel.pause_clock();
        self.deadline.map(|d| d.now(clock))
    }

    /// A handle that signals this process from another thread.
    pub fn signaller(&self) -> Signaller {
        Signaller {
            inst: self.inst.clone(),
            process: self.process,
            exit: self.exit.clone(),
            pty: self.pty,
        }
    }

    /// Reads stdout and stderr to their ends while waiting for the exit.
    /// Together they may hold at most
    /// [`Options::max_result_bytes`](crate::Options::max_result_bytes):
    /// past that the process is killed and this fails with
    /// [`Error::TooLarge`] (stream big output from [`Child::stdout`]).
    pub fn wait_with_output(mut self) -> Result<Output> {
        drop(self.stdin.take());
        let (stdout, stderr) = (self.stdout.take(), self.stderr.take());
        let deadline = self.deadline();
        let limit = self.inst.max_result;
        let total = AtomicU64::new(0);
        let signaller = self.signaller();
        let read_all = |s: Option<ChildOutput>| -> std::result::Result<Vec<u8>, Stop> {
            let Some(mut s) = s else {
                return Ok(Vec::new());
            };
            s.set_deadline(deadline);
            crate::fs::collect(0, |buf| {
                let n = s.receive(buf).map_err(Stop::Io)?;
                if total.fetch_add(n as u64, Ordering::Relaxed) + n as u64 > limit {
                    // Ends both streams, so the other reader stops too.
                    let _ = signaller.signal(libc::SIGKILL);
                    return Err(Stop::TooLarge);
                }
                Ok(n)
            })
        };
        let (out, err) = std::thread::scope(|scope| {
            let err = scope.spawn(|| read_all(stderr));
            (
                read_all(stdout),
                err.join()
                    .unwrap_or_else(|_| Err(Stop::Io(io::Error::other("stderr reader panicked")))),
            )
        });
        let lost = |stop: Stop| match stop {
            Stop::TooLarge => {
                let _ = self.exit.wait(Some(Instant::now() + REQUEST_TIMEOUT));
                crate::fs::too_large("output of", "process", None, limit)
            }
            Stop::Io(e) => match self.inst.check_running() {
                Err(not_running) => not_running,
                Ok(()) if e.kind() == io::ErrorKind::TimedOut => self.expire(),
                Ok(()) => Error::Io {
                    op: "read output of".into(),
                    path: "process".into(),
                    source: e,
                },
            },
        };
        let (stdout, stderr) = match (out, err) {
            (Err(Stop::TooLarge), _) | (_, Err(Stop::TooLarge)) => {
                return Err(lost(Stop::TooLarge))
            }
            (out, err) => (out.map_err(lost)?, err.map_err(lost)?),
        };
        let status = self.wait()?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}

/// A terminal size [`Command::pty`] and [`Child::resize`] accept.
/// The limit of resource `name` (`RLIMIT_NOFILE`) as the guest takes it.
fn rlimit(name: &str, soft: u64, hard: u64) -> Result<cc_protocol::Rlimit> {
    let resource = cc_protocol::rlimit_resource(name)
        .ok_or_else(|| Error::InvalidArgument(format!("unknown resource limit {name:?}")))?;
    if soft > hard {
        return Err(Error::InvalidArgument(format!(
            "{name}: soft limit {soft} is above hard limit {hard}"
        )));
    }
    Ok(cc_protocol::Rlimit {
        resource,
        soft,
        hard,
    })
}

pub(crate) fn check_size(rows: u16, cols: u16) -> Result<()> {
    let ok = |n: u16| (1..=MAX_TERMINAL_SIZE).contains(&n);
    if ok(rows) && ok(cols) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "terminal size {rows}x{cols}: rows and columns must be 1 to {MAX_TERMINAL_SIZE}"
    )))
}

/// Why reading a captured stream stopped early.
#[derive(Debug)]
enum Stop {
    Io(io::Error),
    /// The output went over the instance's `max_result_bytes`.
    TooLarge,
}

/// Signals one guest process; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct Signaller {
    inst: Arc<Inner>,
    process: u64,
    exit: Arc<ExitSlot>,
    pty: bool,
}

impl Signaller {
    /// [`Child::resize`], from any thread.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        if !self.pty {
            return Err(Error::InvalidArgument(
                "resize of a command without a terminal".into(),
            ));
        }
        check_size(rows, cols)?;
        if self.exit.wait(Some(Instant::now()))?.is_some() {
            return Ok(());
        }
        self.inst.check_running()?;
        let size = cc_protocol::WindowSize { rows, cols };
        let request = Request::Resize {
            process: self.process,
            size,
        };
        match self.inst.channel.request(request, REQUEST_TIMEOUT)? {
            Ok(_) => Ok(()),
            // It exited between our check and the request.
            Err(e) if e.kind == ErrorKind::NoSuchProcess => Ok(()),
            Err(e) => Err(Error::Guest {
                op: "resize".into(),
                message: e.message,
            }),
        }
    }

    /// Sends `signal` to the process's whole process group; a process that
    /// already exited is not an error.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.send(signal, true, REQUEST_TIMEOUT)
    }

    /// Sends `signal` to the process alone, not to its children or the
    /// rest of its group (what `kill(pid)` does, as container runtimes
    /// signal a container's process); a process that already exited is
    /// not an error.
    pub fn signal_process(&self, signal: i32) -> Result<()> {
        self.send(signal, false, REQUEST_TIMEOUT)
    }

    /// Like [`signal`](Self::signal), failing with [`Error::Timeout`] if
    /// the agent does not answer within `timeout`.
    pub(crate) fn signal_within(&self, signal: i32, timeout: Duration) -> Result<()> {
        self.send(signal, true, timeout)
    }

    fn send(&self, signal: i32, group: bool, timeout: Duration) -> Result<()> {
        let exited = self.exit.wait(Some(Instant::now())).or_else(|e| {
            self.inst.check_running()?;
            Err(e)
        })?;
        if exited.is_some() {
            return Ok(());
        }
        self.inst.check_running()?;
        match self.inst.channel.request(
            Request::Signal {
                process: self.process,
                signal,
                group,
            },
            timeout,
        )? {
            Ok(_) => Ok(()),
            // It exited between our check and the signal.
            Err(e) if e.kind == ErrorKind::NoSuchProcess => Ok(()),
            Err(e) => Err(Error::Guest {
                op: "signal".into(),
                message: e.message,
            }),
        }
    }
}

/// The writable end of a process's stdin. Dropping it sends end of file.
#[derive(Debug)]
pub struct ChildStdin {
    inst: Arc<Inner>,
    id: u32,
    stream: Arc<Outbound>,
}

impl ChildStdin {
    pub(crate) fn new(inst: Arc<Inner>, id: u32, stream: Arc<Outbound>) -> ChildStdin {
        ChildStdin { inst, id, stream }
    }

    /// Writes all of `data`, waiting for the guest to make room.
    pub(crate) fn send(&self, data: &[u8]) -> io::Result<()> {
        self.inst.channel.write(self.id, &self.stream, data)
    }

    /// Why writing failed, when it is the instance that is gone (closed:
    /// [`Error::AlreadyClosed`]; dead: [`Error::NotRunning`]).
    pub(crate) fn gone(&self) -> Option<Error> {
        self.inst.check_running().err()
    }

    /// Sends end of file now; a write blocked in another thread and later
    /// writes fail. Idempotent.
    pub(crate) fn finish(&self) {
        self.inst.channel.close_outbound(self.id, &self.stream);
    }
}

impl Write for ChildStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ChildStdin {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The readable end of a process's stdout or stderr. End of file reads as
/// 0 bytes. Dropping it early gives the writer a broken pipe.
#[derive(Debug)]
pub struct ChildOutput {
    inst: Arc<Inner>,
    id: u32,
    stream: Arc<Inbound>,
    deadline: Option<Deadline>,
}

impl ChildOutput {
    pub(crate) fn new(inst: Arc<Inner>, id: u32, stream: Arc<Inbound>) -> ChildOutput {
        ChildOutput {
            inst,
            id,
            stream,
            deadline: None,
        }
    }

    /// Bounds later reads: a read with nothing by `deadline` fails with
    /// `ErrorKind::TimedOut`. Time the instance spends paused from now on
    /// moves it later.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        let clock = self.inst.channel.pause_clock();
        self.deadline = deadline.map(|at| clock.deadline_at(at));
    }

    /// The instance's `max_result_bytes`.
    pub(crate) fn max_result(&self) -> u64 {
        self.inst.max_result
    }

    /// Reads what is there (0 bytes at end of file), waiting for some.
    pub(crate) fn receive(&self, buf: &mut [u8]) -> io::Result<usize> {
        let channel = &self.inst.channel;
        let clock = channel.pause_clock();
        loop {
            let until = self.deadline.map(|d| d.now(clock));
            match channel.read(self.id, &self.stream, buf, until) {
                // Paused meanwhile: the deadline moved on.
                Err(e)
                    if e.kind() == io::ErrorKind::TimedOut
                        && self.deadline.is_some_and(|d| !d.passed(clock)) => {}
                r => return r,
            }
        }
    }

    /// Why reading failed, when it is the instance that is gone (closed:
    /// [`Error::AlreadyClosed`]; dead: [`Error::NotRunning`]).
    pub(crate) fn gone(&self) -> Option<Error> {
        self.inst.check_running().err()
    }

    /// Stops the stream: a read blocked in another thread and later reads
    /// fail, and the guest's writer sees a broken pipe. Idempotent.
    pub(crate) fn stop(&self) {
        self.inst.channel.close_inbound(self.id, &self.stream);
    }
}

impl Read for ChildOutput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.receive(buf)
    }
}

impl Drop for ChildOutput {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_limit_is_checked_on_the_host() {
        assert_eq!(
            rlimit("RLIMIT_NOFILE", 100, 200).unwrap(),
            cc_protocol::Rlimit {
                resource: libc::RLIMIT_NOFILE,
                soft: 100,
                hard: 200,
            }
        );
        assert_eq!(
            rlimit("RLIMIT_CORE", 0, u64::MAX).unwrap().resource,
            libc::RLIMIT_CORE
        );
        for (name, soft, hard) in [
            ("RLIMIT_NOPE", 1, 1),
            ("nofile", 1, 1),
            ("", 1, 1),
            ("RLIMIT_NOFILE", 300, 200),
        ] {
            let e = rlimit(name, soft, hard).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{name}: {e}");
        }
        let e = rlimit("RLIMIT_NOFILE", 300, 200).unwrap_err();
        assert!(e.to_string().contains("RLIMIT_NOFILE"), "{e}");
    }
}
