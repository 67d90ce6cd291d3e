//! Power-off requests from inside the guest.
//!
//! Busybox's `poweroff`, `reboot` and `halt` ask PID 1 with a signal
//! (SIGUSR2, SIGTERM and SIGUSR1), and the kernel sends SIGINT for
//! ctrl-alt-del. The kernel drops signals PID 1 has no handler for unless
//! they are blocked, so they are blocked in every thread and taken by one
//! thread with sigwaitinfo. Children inherit the mask (std keeps it), so
//! the exec hook clears it.

use std::io;
use std::thread;
use std::time::Duration;

use crate::{error, spawn_thread, sys};

const SHUTDOWN: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2, libc::SIGINT];

fn name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM (reboot)",
        libc::SIGUSR1 => "SIGUSR1 (halt)",
        libc::SIGUSR2 => "SIGUSR2 (poweroff)",
        libc::SIGINT => "SIGINT (ctrl-alt-del)",
        _ => "a signal",
    }
}

/// Blocks the shutdown signals. Must run before any thread is started, so
/// that every thread inherits the mask and none takes them by default.
pub fn block() -> io::Result<()> {
    sys::block_signals(&sys::signal_set(&SHUTDOWN)?)
}

/// Starts the thread that powers off on a shutdown signal. Every request
/// ends the VM the same way: the host sees its instance stop.
pub fn watch() -> io::Result<()> {
    let set = sys::signal_set(&SHUTDOWN)?;
    spawn_thread("signals".into(), move || loop {
        match sys::wait_signal(&set) {
            Ok((signal, pid)) => {
                let reason = format!("{} from guest pid {pid}", name(signal));
                log!("{reason}: powering off");
                crate::power_off(&reason);
            }
            Err(e) => {
                log!("wait for signals: {}", error::describe(&e));
                thread::sleep(Duration::from_secs(1));
            }
        }
    })
}
