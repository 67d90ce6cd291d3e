//! Pseudo-terminals for processes started with `pty`: opening a pair, and
//! the masters of running processes, kept for `Resize`.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use cc_protocol::{ErrorKind, RemoteError, WindowSize};
use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;

use crate::reaper::Key;
use crate::{error, sys};

/// A new terminal of `size`: (master, slave). The slave is not yet anyone's
/// controlling terminal (`O_NOCTTY`); the child takes it with `TIOCSCTTY`.
pub fn open(size: WindowSize) -> io::Result<(OwnedFd, OwnedFd)> {
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    set_size(&master, size)?;
    Ok((master, slave))
}

fn set_size(master: &OwnedFd, size: WindowSize) -> io::Result<()> {
    rustix::termios::tcsetwinsize(
        master,
        Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )?;
    Ok(())
}

/// The running processes that have a terminal: their pid (which is their
/// session's id) and the terminal's master.
#[derive(Debug, Default)]
pub struct Terminals {
    masters: Mutex<HashMap<Key, (u32, OwnedFd)>>,
}

impl Terminals {
    pub fn insert(&self, key: Key, pid: u32, master: OwnedFd) {
        crate::lock(&self.masters).insert(key, (pid, master));
    }

    /// Sends `signal` to every process of the session `key` leads, when it
    /// has a terminal: an interactive shell puts its jobs in process groups
    /// of their own, which a signal to the shell's group would miss. The
    /// session's id is not reused while any process is in it.
    pub fn signal_session(&self, key: Key, signal: i32) {
        let Some(sid) = crate::lock(&self.masters).get(&key).map(|(pid, _)| *pid) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let in_session = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| session_of(&stat))
                .is_some_and(|s| u32::try_from(s) == Ok(sid));
            if in_session {
                // Gone since: nothing to do.
                let _ = sys::kill(pid, signal);
            }
        }
    }

    /// Forgets (and closes) the master kept for `key`: its process ended.
    pub fn remove(&self, key: Key) {
        crate::lock(&self.masters).remove(&key);
    }

    /// Sets the window size of `key`'s terminal; the kernel sends
    /// `SIGWINCH` to its foreground process group.
    pub fn resize(&self, key: Key, size: WindowSize) -> Result<(), RemoteError> {
        let masters = crate::lock(&self.masters);
        let (_, master) = masters.get(&key).ok_or_else(|| {
            error::new(
                ErrorKind::NoSuchProcess,
                format!("no running process {} with a terminal", key.1),
            )
        })?;
        set_size(master, size).map_err(|e| error::os("set the window size", &e))
    }
}

/// The session id in the text of a `/proc/PID/stat`: the fourth field
/// after the command name, which is in parentheses and may hold anything
/// (spaces and parentheses too), so fields are counted from its last `)`.
fn session_of(stat: &str) -> Option<i32> {
    let (_, rest) = stat.rsplit_once(')')?;
    // state, ppid, pgrp, session
    rest.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_from_proc_stat() {
        let stat = "53 (sleep) S 40 53 40 34816 53 4194304 93 0 0 0";
        assert_eq!(session_of(stat), Some(40));
        // A command name may hold ") " and digits.
        let odd = "7 (a) 1 2 3 (b) R 1 7 99 0 -1";
        assert_eq!(session_of(odd), Some(99));
    }

    #[test]
    fn malformed_stat_has_no_session() {
        for bad in [
            "",
            "53 sleep S 40 53 40",
            "53 (sleep) S 40 53",
            "53 (sleep) S 40 53 x 1",
        ] {
            assert_eq!(session_of(bad), None, "{bad:?}");
        }
    }
}
