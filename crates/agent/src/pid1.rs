//! What the guest binary does because it is PID 1 in a VM, in the order
//! `main` calls it: the process-wide set-up before any thread exists (the
//! power-off signals blocked, the highest priority, umask 0, the kernel
//! filesystems, the console), then the agent with its watch for power-off
//! signals, then the agent's port, opened again whenever a connection is
//! lost.
//!
//! Nothing here belongs in any other process: an agent in host mode never
//! calls it.
//!
//! Busybox's `poweroff`, `reboot` and `halt` ask PID 1 with a signal
//! (SIGUSR2, SIGTERM and SIGUSR1), and the kernel sends SIGINT for
//! ctrl-alt-del. The kernel drops signals PID 1 has no handler for unless
//! they are blocked, so they are blocked in every thread and taken by one
//! thread with sigwaitinfo. Children inherit the mask (std keeps it), so
//! the exec hook clears it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use cc_protocol::AGENT_PORT_NAME;

use crate::{error, log_to_console, mounts, spawn_thread, sys, Agent, Mode};

/// The agent's nice value: the highest priority, so that it answers the
/// host's pings and kills promptly even under a fork bomb. The processes
/// it starts get 0 back.
const AGENT_NICE: i32 = -20;

/// Sets the process up as the guest's init. Must run first, before any
/// thread exists, so that all of them inherit the signal mask and the
/// priority. Failures are logged: PID 1 must go on regardless.
pub fn init() {
    log_to_console();
    let blocked = block_signals();
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
    if let Err(e) = blocked {
        log!("block power-off signals: {}", error::describe(&e));
    }
}

/// The guest's agent, with the thread that powers it off on a signal from
/// inside the guest. Waits as long as it takes for the agent to start.
pub fn start() -> Arc<Agent> {
    let agent = loop {
        match Agent::new(Mode::Guest) {
            Ok(agent) => break agent,
            Err(e) => {
                log!("start reaper: {}", error::describe(&e));
                thread::sleep(Duration::from_secs(1));
            }
        }
    };
    if let Err(e) = watch_signals(&agent) {
        log!("watch for power-off signals: {}", error::describe(&e));
    }
    agent
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
pub fn open_port() -> File {
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
fn block_signals() -> io::Result<()> {
    sys::block_signals(&sys::signal_set(&SHUTDOWN)?)
}

/// Starts the thread that powers `agent` off on a shutdown signal. Every
/// request ends the VM the same way: the host sees its instance stop.
fn watch_signals(agent: &Arc<Agent>) -> io::Result<()> {
    let agent = agent.clone();
    let set = sys::signal_set(&SHUTDOWN)?;
    spawn_thread("signals".into(), move || loop {
        match sys::wait_signal(&set) {
            Ok((signal, pid)) => {
                let reason = format!("{} from guest pid {pid}", name(signal));
                log!("{reason}: powering off");
                agent.power_off(&reason);
            }
            Err(e) => {
                log!("wait for signals: {}", error::describe(&e));
                thread::sleep(Duration::from_secs(1));
            }
        }
    })
}
