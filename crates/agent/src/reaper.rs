//! Reaping every child of PID 1, orphans included, and reporting the exits
//! of the processes the host started.
//!
//! One thread waits for exits with `WNOWAIT` and reaps only under the
//! registry lock; spawns also hold that lock. So an exited pid stays a
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

use crate::{error, sys};

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

#[derive(Debug, Default)]
pub struct Reaper {
    registry: Mutex<Registry>,
    spawned: Condvar,
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> io::Result<Arc<Self>> {
        let reaper = Arc::new(Self::default());
        let r = reaper.clone();
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run())?;
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

    /// Runs `spawn` (which returns the new child's pid) with the registry
    /// locked and registers the child under `key`.
    pub fn spawn(
        &self,
        key: Key,
        spawn: impl FnOnce() -> Result<u32, RemoteError>,
    ) -> Result<u32, RemoteError> {
        let mut reg = self.lock();
        if reg.pids.contains_key(&key) || reg.exited.contains_key(&key) {
            return Err(error::invalid(format!("process {} already exists", key.1)));
        }
        let pid = spawn()?;
        reg.running.insert(pid, Running { key, on_exit: None });
        reg.pids.insert(key, pid);
        reg.spawned = true;
        self.spawned.notify_one();
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
    /// leader), or the process alone if it moved to another group.
    pub fn signal(&self, key: Key, signal: i32) -> Result<(), RemoteError> {
        Self::signal_locked(&self.lock(), key, signal)
    }

    /// Like [`signal`](Self::signal), but `None` at once when the registry
    /// is busy (a spawn holds it while it forks and execs), so that the
    /// channel's reader never waits for an exec.
    pub fn try_signal(&self, key: Key, signal: i32) -> Option<Result<(), RemoteError>> {
        let reg = match self.registry.try_lock() {
            Ok(reg) => reg,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(Self::signal_locked(&reg, key, signal))
    }

    fn signal_locked(reg: &Registry, key: Key, signal: i32) -> Result<(), RemoteError> {
        let Some(&pid) = reg.pids.get(&key) else {
            return Err(error::new(
                ErrorKind::NoSuchProcess,
                format!("no such process {}", key.1),
            ));
        };
        let pid = pid as i32;
        let result = match sys::kill(-pid, signal) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => sys::kill(pid, signal),
            other => other,
        };
        result.map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => error::invalid(format!("invalid signal {signal}")),
            _ => error::os(format_args!("signal process {}", key.1), &e),
        })
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
