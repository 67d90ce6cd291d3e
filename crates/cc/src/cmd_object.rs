//! `Cmd`: a command as one stateful object (configure, start, wait), the
//! shape the C and Python faces expose. It wraps [`Command`] and
//! [`Child`]; misuse (starting twice, a pipe after start, waiting before
//! start) is [`Error::InvalidArgument`].

use std::ffi::OsString;
use std::io::{Read, Write};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::conn::Conn;
use cc_cancel::CancelToken;

use crate::cancel;
use crate::error::{Error, Result};
use crate::process::{Child, Command, ExitStatus, Signaller, Stdio};

/// The exit code a [`Cmd`] reports: the process's status, or minus the
/// signal that ended it (as Python's `subprocess` does).
fn code_of(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| -status.signal().unwrap_or(0))
}

#[derive(Debug)]
enum Stage {
    Ready(Box<Command>),
    Running { signaller: Signaller },
    Done(ExitStatus),
}

#[derive(Debug)]
struct State {
    stage: Stage,
    pipes: [Option<Conn>; 3],
}

/// A command in a guest, configured then started once.
#[derive(Debug)]
pub struct Cmd {
    state: Mutex<State>,
    /// Held only by `wait`, so `kill` and the pipes work while it blocks.
    child: Mutex<Option<Child>>,
    /// The instance's `max_result_bytes`.
    max_result: u64,
    /// Set by [`Cmd::set_pty`].
    pty: std::sync::atomic::AtomicBool,
}

pub(crate) fn misuse(what: &str) -> Error {
    Error::InvalidArgument(what.to_string())
}

impl Cmd {
    pub(crate) fn new(command: Command) -> Cmd {
        Cmd {
            max_result: command.max_result(),
            state: Mutex::new(State {
                stage: Stage::Ready(Box::new(command)),
                pipes: [None, None, None],
            }),
            child: Mutex::new(None),
            pty: false.into(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn configure(&self, f: impl FnOnce(&mut Command)) -> Result<()> {
        match &mut self.state().stage {
            Stage::Ready(cmd) => {
                f(cmd);
                Ok(())
            }
            _ => Err(misuse("the command was already started")),
        }
    }

    /// Sets the working directory.
    pub fn set_dir(&self, dir: &str) -> Result<()> {
        self.configure(|c| {
            c.current_dir(dir);
        })
    }

    pub fn set_env(&self, key: &str, value: &str) -> Result<()> {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(misuse(&format!("bad environment entry {key:?}")));
        }
        self.configure(|c| {
            c.env(key, value);
        })
    }

    /// The value set for `key` (by the image or [`Cmd::set_env`]).
    pub fn get_env(&self, key: &str) -> Option<String> {
        match &self.state().stage {
            Stage::Ready(c) => c.get_env(key).map(|v| v.to_string_lossy().into_owned()),
            _ => None,
        }
    }

    /// The environment set on the command, as `KEY=VALUE` entries.
    pub fn environ(&self) -> Vec<String> {
        match &self.state().stage {
            Stage::Ready(c) => c
                .environ()
                .into_iter()
                .map(|e: OsString| e.to_string_lossy().into_owned())
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn set_user(&self, user: &str) -> Result<()> {
        self.configure(|c| {
            c.user(user);
        })
    }

    /// Kills the process if it runs longer than `limit`; waiting then
    /// fails with [`Error::Timeout`].
    pub fn set_timeout(&self, limit: Duration) -> Result<()> {
        self.configure(|c| {
            c.timeout(limit);
        })
    }

    /// Runs the command on a terminal of `rows` × `cols` (see
    /// [`Command::pty`]), with `TERM` set to `term` when given: its stdout
    /// pipe (or output) is everything the terminal shows, its stdin pipe
    /// what is typed; it has no stderr pipe.
    pub fn set_pty(&self, rows: u16, cols: u16, term: Option<&str>) -> Result<()> {
        crate::process::check_size(rows, cols)?;
        if let Some(term) = term {
            self.set_env("TERM", term)?;
        }
        self.configure(|c| {
            c.pty(rows, cols);
        })?;
        self.pty.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Sets the window size of the started command's terminal (see
    /// [`Child::resize`]); a command that ended is fine.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        if !self.pty.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(misuse("resize of a command without a terminal"));
        }
        crate::process::check_size(rows, cols)?;
        match &self.state().stage {
            Stage::Ready(_) => Err(misuse("the command was not started")),
            Stage::Running { signaller } => signaller.resize(rows, cols),
            Stage::Done(_) => Ok(()),
        }
    }

    fn pipe(&self, fd: usize) -> Result<Conn> {
        let mut state = self.state();
        if !matches!(state.stage, Stage::Ready(_)) {
            return Err(misuse("pipes must be requested before start"));
        }
        if state.pipes[fd].is_some() {
            return Err(misuse("that pipe was already requested"));
        }
        let conn = Conn::unbound(fd);
        state.pipes[fd] = Some(conn.clone());
        Ok(conn)
    }

    /// The process's stdin, writable once started; closing it sends EOF.
    pub fn stdin_pipe(&self) -> Result<Conn> {
        self.pipe(0)
    }

    /// The process's stdout, readable once started.
    pub fn stdout_pipe(&self) -> Result<Conn> {
        self.pipe(1)
    }

    pub fn stderr_pipe(&self) -> Result<Conn> {
        self.pipe(2)
    }

    /// Starts the process. Output not taken as a pipe is discarded.
    pub fn start(&self) -> Result<()> {
        self.start_with(|_| {})
    }

    fn start_with(&self, adjust: impl FnOnce(&mut Command)) -> Result<()> {
        let mut state = self.state();
        if self.pty.load(std::sync::atomic::Ordering::Relaxed) && state.pipes[2].is_some() {
            return Err(misuse("a command on a terminal has no stderr pipe"));
        }
        let Stage::Ready(cmd) = &mut state.stage else {
            return Err(misuse("the command was already started"));
        };
        let mut cmd = (**cmd).clone();
        for (fd, pipe) in state.pipes.iter().enumerate() {
            let s = if pipe.is_some() {
                Stdio::Piped
            } else {
                Stdio::Null
            };
            match fd {
                0 => cmd.stdin(s),
                1 => cmd.stdout(s),
                _ => cmd.stderr(s),
            };
        }
        adjust(&mut cmd);
        let mut child = cmd.spawn()?;
        for pipe in state.pipes.iter().flatten() {
            pipe.bind(&mut child);
        }
        state.stage = Stage::Running {
            signaller: child.signaller(),
        };
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }

    /// Waits for the started process; returns its exit code (minus the
    /// signal number if a signal ended it). Waiting again returns the same.
    pub fn wait(&self) -> Result<i32> {
        if let Stage::Done(status) = self.state().stage {
            return Ok(code_of(status));
        }
        let mut slot = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Stage::Done(status) = self.state().stage {
            return Ok(code_of(status));
        }
        let child = slot
            .as_mut()
            .ok_or_else(|| misuse("the command was not started"))?;
        // A stdin pipe was moved into its Conn at start: the caller decides
        // when it ends, not this wait.
        let status = child.wait()?;
        self.state().stage = Stage::Done(status);
        Ok(code_of(status))
    }

    /// [`wait`](Self::wait) that `cancel` stops with [`Error::Cancelled`];
    /// the process keeps running and can be waited for again.
    pub fn wait_cancellable(&self, cancel: &CancelToken) -> Result<i32> {
        cancel::scope("wait", cancel, || self.wait())
    }

    /// Starts the process and waits for it.
    pub fn run(&self) -> Result<i32> {
        self.start()?;
        self.wait()
    }

    /// Runs the process and returns its stdout (a non-zero exit is not an
    /// error: see [`Cmd::exit_code`]). Output over
    /// [`Options::max_result_bytes`](crate::Options::max_result_bytes)
    /// kills the process and fails with [`Error::TooLarge`]; stream big
    /// output with [`Cmd::output_to`].
    pub fn output(&self) -> Result<Vec<u8>> {
        self.collect(false)
    }

    /// Runs the process and returns stdout and stderr interleaved in the
    /// order written, bounded as [`Cmd::output`].
    pub fn combined_output(&self) -> Result<Vec<u8>> {
        self.collect(true)
    }

    /// Runs the process and streams its stdout (with stderr interleaved
    /// when `merged`) into `out` as it comes, in constant host memory
    /// whatever its size; returns the bytes written. A failing `out` kills
    /// the process.
    pub fn output_to(&self, merged: bool, out: &mut impl Write) -> Result<u64> {
        self.capture(merged, |read| {
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                let n = read(&mut buf)?;
                if n == 0 {
                    return Ok(total);
                }
                out.write_all(&buf[..n]).map_err(|e| Error::Io {
                    op: "output_to (writing the copy)".into(),
                    path: "command".into(),
                    source: e,
                })?;
                total += n as u64;
            }
        })
    }

    fn collect(&self, merged: bool) -> Result<Vec<u8>> {
        let limit = self.max_result;
        self.capture(merged, |read| {
            let mut total = 0u64;
            crate::fs::collect(0, |buf| {
                let n = read(buf)?;
                total += n as u64;
                if total > limit {
                    return Err(crate::fs::too_large("output of", "command", None, limit));
                }
                Ok(n)
            })
        })
    }

    /// Starts the process with stdout piped and gives `consume` a reader
    /// of it; waits for the exit once `consume` is done. If `consume`
    /// fails, the process is killed.
    fn capture<T>(
        &self,
        merged: bool,
        consume: impl FnOnce(&mut dyn FnMut(&mut [u8]) -> Result<usize>) -> Result<T>,
    ) -> Result<T> {
        if self.state().pipes[1].is_some() || (merged && self.state().pipes[2].is_some()) {
            return Err(misuse("output is already taken by a pipe"));
        }
        self.start_with(|c| {
            c.stdout(Stdio::Piped);
            if merged {
                c.stderr(Stdio::MergeIntoStdout);
            }
        })?;
        let mut stdout = {
            let mut slot = self.child.lock().unwrap_or_else(|e| e.into_inner());
            slot.as_mut().and_then(|c| {
                let deadline = c.deadline();
                c.stdout.take().map(|mut s| {
                    // The command's time limit bounds reading its output too.
                    s.set_deadline(deadline);
                    s
                })
            })
        };
        let mut read = |buf: &mut [u8]| -> Result<usize> {
            let Some(s) = stdout.as_mut() else {
                return Ok(0);
            };
            s.read(buf).map_err(|e| {
                s.stop();
                // Past the deadline, wait kills the process and reports it.
                if let Err(waited) = self.wait() {
                    return waited;
                }
                Error::Io {
                    op: "read output".into(),
                    path: "command".into(),
                    source: e,
                }
            })
        };
        let result = consume(&mut read);
        drop(stdout);
        match result {
            Ok(value) => {
                self.wait()?;
                Ok(value)
            }
            Err(e) => {
                let _ = self.kill();
                let _ = self.wait();
                Err(e)
            }
        }
    }

    /// Kills the process and its process group.
    pub fn kill(&self) -> Result<()> {
        match &self.state().stage {
            Stage::Ready(_) => Err(misuse("the command was not started")),
            Stage::Running { signaller } => signaller.signal(libc::SIGKILL),
            Stage::Done(_) => Ok(()),
        }
    }

    /// The exit code once [`Cmd::wait`] has returned.
    pub fn exit_code(&self) -> Option<i32> {
        match self.state().stage {
            Stage::Done(status) => Some(code_of(status)),
            _ => None,
        }
    }
}
