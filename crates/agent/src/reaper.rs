//! Reaping the agent's children and reporting the exits of the processes
//! the host started.
//!
//! As PID 1 (guest mode), one thread waits for any child's exit, orphans
//! included. In host mode the agent shares its process with a host
//! program, whose children are not its business: one thread per process
//! it started waits for that pid alone.
//!
//! Either way exits are waited for with `WNOWAIT` and reaped only under
//! the registry lock; spawns also hold that lock. So an exited pid stays a
//! zombie, and cannot be reused, until its registration is settled: no exit
//! is misattributed, signals never hit a recycled pid, and std, which reaps
//! the child of a failed spawn itself, never races the reaper for it.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread;
use std::time::Duration;

use cc_protocol::{ErrorKind, ExitStatus, RemoteError};

use crate::tasks::Tasks;
use crate::{error, sys, Mode};

/// A process as the host knows it: (connection, process id).
pub type Key = (u64, u64);

/// Called once with the exit status, outside the registry lock.
pub type OnExit = Box<dyn FnOnce(ExitStatus) + Send>;

struct Running {
    key: Key,
    /// Set once the host was told the process started.
    on_exit: Option<OnExit>,
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running")
            .field("key", &self.key)
            .field("announced", &self.on_exit.is_some())
            .finish()
    }
}

#[derive(Debug, Default)]
struct Registry {
    running: HashMap<u32, Running>,
    pids: HashMap<Key, u32>,
    /// Exits reaped before the start was announced.
    exited: HashMap<Key, ExitStatus>,
    /// A child was spawned since the reaper last found none.
    spawned: bool,
}

impl Registry {
    fn forget_pid(&mut self, pid: u32) {
        if let Some(running) = self.running.remove(&pid) {
            self.pids.remove(&running.key);
        }
    }

    /// Records that `pid` exited with `status`: the report to make now, if
    /// its start was announced, else keeps the status for the announcement.
    fn settle(&mut self, pid: u32, status: ExitStatus) -> Option<(OnExit, ExitStatus)> {
        let running = self.running.remove(&pid)?;
        self.pids.remove(&running.key);
        match running.on_exit {
            Some(on_exit) => Some((on_exit, status)),
            None => {
                self.exited.insert(running.key, status);
                None
            }
        }
    }
}

#[derive(Debug)]
pub struct Reaper {
    mode: Mode,
    registry: Mutex<Registry>,
    spawned: Condvar,
}

impl Reaper {
    /// A reaper for an agent in `mode`: in guest mode, with its thread
    /// started.
    pub fn start(mode: Mode) -> io::Result<Arc<Self>> {
        let reaper = Arc::new(Self {
            mode,
            registry: Mutex::default(),
            spawned: Condvar::new(),
        });
        if mode == Mode::Guest {
            let r = reaper.clone();
            thread::Builder::new()
                .name("reaper".into())
                .spawn(move || r.run())?;
        }
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        loop {
            match sys::wait_any_exited() {
                Ok(()) => self.reap_exited(),
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    let mut reg = self.lock();
                    while !reg.spawned {
                        reg = self.spawned.wait(reg).unwrap_or_else(|e| e.into_inner());
                    }
                    reg.spawned = false;
                }
                Err(e) => {
                    log!("waitid: {}", error::describe(&e));
                    thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Reaps every child that has exited, under the registry lock, and
    /// reports the exits of registered ones after releasing it.
    fn reap_exited(&self) {
        let mut reports = Vec::new();
        let mut reg = self.lock();
        loop {
            match sys::reap_any() {
                Ok(Some((pid, raw))) => reports.extend(reg.settle(pid, exit_status(raw))),
                Ok(None) => break,
                Err(e) => {
                    log!("waitpid: {}", error::describe(&e));
                    break;
                }
            }
        }
        drop(reg);
        for (on_exit, status) in reports {
            on_exit(status);
        }
    }

    /// Waits for the child `pid` to exit, reaps it and reports its exit
    /// (host mode).
    fn wait_for(&self, pid: u32) {
        let exited = sys::wait_exited(pid);
        let mut reg = self.lock();
        let status = match exited.and_then(|()| sys::reap(pid)) {
            Ok(Some(raw)) => exit_status(raw),
            // Reaped by someone else in the process (a `waitpid(-1)`).
            Ok(None) => {
                log!("process {pid} was reaped behind the agent's back; its exit is lost");
                reg.forget_pid(pid);
                return;
            }
            Err(e) => {
                log!("wait for process {pid}: {}", error::describe(&e));
                reg.forget_pid(pid);
                return;
            }
        };
        let report = reg.settle(pid, status);
        drop(reg);
        if let Some((on_exit, status)) = report {
            on_exit(status);
        }
    }

    /// Runs `spawn` (which returns the new child's pid) with the registry
    /// locked and registers the child under `key`. In host mode the thread
    /// that waits for it is one of `tasks`.
    pub fn spawn(
        self: &Arc<Self>,
        key: Key,
        tasks: &Arc<Tasks>,
        spawn: impl FnOnce() -> Result<u32, RemoteError>,
    ) -> Result<u32, RemoteError> {
        let mut reg = self.lock();
        if reg.pids.contains_key(&key) || reg.exited.contains_key(&key) {
            return Err(error::invalid(format!("process {} already exists", key.1)));
        }
        let pid = spawn()?;
        reg.running.insert(pid, Running { key, on_exit: None });
        reg.pids.insert(key, pid);
        match self.mode {
            Mode::Guest => {
                reg.spawned = true;
                self.spawned.notify_one();
            }
            Mode::Host => {
                let reaper = self.clone();
                let watched = tasks.spawn(format!("wait-{pid}"), move || reaper.wait_for(pid));
                if let Err(e) = watched {
                    // Nothing would reap it: end it now rather than leave
                    // a zombie behind.
                    reg.forget_pid(pid);
                    drop(reg);
                    let _ = sys::kill(pid as i32, libc::SIGKILL);
                    if sys::wait_exited(pid).is_ok() {
                        let _ = sys::reap(pid);
                    }
                    return Err(error::os("watch the process", &e));
                }
            }
        }
        Ok(pid)
    }

    /// The host was told `key` started: report its exit through `on_exit`,
    /// now if it already happened.
    pub fn announce(&self, key: Key, on_exit: OnExit) {
        let mut guard = self.lock();
        let reg = &mut *guard;
        if let Some(status) = reg.exited.remove(&key) {
            drop(guard);
            on_exit(status);
        } else if let Some(running) = reg.pids.get(&key).and_then(|pid| reg.running.get_mut(pid)) {
            running.on_exit = Some(on_exit);
        }
    }

    /// Signals the process group of `key` (its pid, as it is a session
    /// leader), or the process alone if it moved to another group; without
    /// `group`, the process alone.
    pub fn signal(&self, key: Key, signal: i32, group: bool) -> Result<(), RemoteError> {
        Self::signal_locked(&self.lock(), key, signal, group)
    }

    /// Like [`signal`](Self::signal), but `None` at once when the registry
    /// is busy (a spawn holds it while it forks and execs), so that the
    /// channel's reader never waits for an exec.
    pub fn try_signal(
        &self,
        key: Key,
        signal: i32,
        group: bool,
    ) -> Option<Result<(), RemoteError>> {
        let reg = match self.registry.try_lock() {
            Ok(reg) => reg,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(Self::signal_locked(&reg, key, signal, group))
    }

    fn signal_locked(
        reg: &Registry,
        key: Key,
        signal: i32,
        group: bool,
    ) -> Result<(), RemoteError> {
        let Some(&pid) = reg.pids.get(&key) else {
            return Err(error::new(
                ErrorKind::NoSuchProcess,
                format!("no such process {}", key.1),
            ));
        };
        let pid = pid as i32;
        let result = if group {
            match sys::kill(-pid, signal) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => sys::kill(pid, signal),
                other => other,
            }
        } else {
            sys::kill(pid, signal)
        };
        result.map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => error::invalid(format!("invalid signal {signal}")),
            _ => error::os(format_args!("signal process {}", key.1), &e),
        })
    }

    /// Kills (with their process groups) the processes of `connection`, or
    /// all of them for `None`.
    pub fn kill(&self, connection: Option<u64>) {
        let reg = self.lock();
        let keys = reg.pids.keys();
        for &key in keys.filter(|key| connection.is_none() || connection == Some(key.0)) {
            // Gone already, or exited and not reaped yet: nothing to do.
            let _ = Self::signal_locked(&reg, key, libc::SIGKILL, true);
        }
    }

    /// Drops every registration of `connection`: its processes become
    /// orphans, reaped silently.
    pub fn forget(&self, connection: u64) {
        let mut reg = self.lock();
        reg.running.retain(|_, r| r.key.0 != connection);
        reg.pids.retain(|k, _| k.0 != connection);
        reg.exited.retain(|k, _| k.0 != connection);
    }
}

fn exit_status(raw: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(raw) {
        ExitStatus::Signal(libc::WTERMSIG(raw))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(exit_status(0), ExitStatus::Code(0));
        assert_eq!(exit_status(3 << 8), ExitStatus::Code(3));
        assert_eq!(exit_status(libc::SIGKILL), ExitStatus::Signal(9));
        // Core-dumped SIGSEGV.
        assert_eq!(exit_status(0x80 | libc::SIGSEGV), ExitStatus::Signal(11));
    }
}
