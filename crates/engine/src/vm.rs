//! One QEMU process: spawn, supervise, control, end.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::qmp::Qmp;
use crate::{paths, qemu_args, Accel, Error, RunDir};

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mb: u32,
    pub cpus: u32,
    pub accel: Accel,
    /// Block devices, found by the guest through their serial.
    pub disks: Vec<Disk>,
    /// Host directories served to the guest over virtio 9p.
    pub shares: Vec<Share>,
    /// A network interface behind a user-mode network stack (no root, no
    /// TAP): the guest reaches out through the host's own connections.
    pub network: bool,
    /// Extra kernel command line parameters.
    pub kernel_params: Vec<String>,
    /// Guest RAM in a file instead of anonymous memory (templates).
    pub memory_file: Option<MemoryFile>,
    /// Start paused, waiting for [`Vm::restore`] to load a saved state.
    pub incoming: bool,
}

/// Guest RAM backed by a file.
#[derive(Debug, Clone)]
pub struct MemoryFile {
    pub path: PathBuf,
    /// Writes go to the file (`true`, to save a template) or stay private
    /// to this VM (`false`, to restore one: the file never changes).
    pub shared: bool,
}

/// A raw disk image attached as a virtio block device.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub serial: String,
    pub read_only: bool,
}

/// A host directory the guest mounts by `tag`. QEMU serves it itself (no
/// helper daemon) and refuses writes to a read-only share, whatever the
/// guest does.
#[derive(Debug, Clone)]
pub struct Share {
    pub tag: String,
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Default)]
struct Exit {
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
}

/// A running (or ended) QEMU. Dropping it kills QEMU if it still runs and
/// joins the supervisor thread.
#[derive(Debug)]
pub struct Vm {
    pid: u32,
    pidfd: OwnedFd,
    exit: Arc<Exit>,
    supervisor: Option<JoinHandle<()>>,
    qmp: Mutex<Qmp>,
    console_log: PathBuf,
    qemu_log: PathBuf,
}

/// QEMU's id of the guest's network backend.
pub(crate) const NETDEV_ID: &str = "net0";

/// The file descriptor numbers QEMU sees its two channels on.
const AGENT_FD: RawFd = 3;
const QMP_FD: RawFd = 4;

impl Vm {
    /// Spawns QEMU for `spec` with its logs in `dir` and returns it with the
    /// host end of the agent channel. Returns as soon as QEMU runs; the guest
    /// boots in the background and speaks first on the channel.
    pub fn start(spec: &VmSpec, dir: &RunDir) -> Result<(Vm, UnixStream), Error> {
        let qemu = paths::qemu()?;
        let (agent_host, agent_guest) =
            UnixStream::pair().map_err(Error::io("socketpair", dir.path()))?;
        let (qmp_host, qmp_guest) =
            UnixStream::pair().map_err(Error::io("socketpair", dir.path()))?;
        let console_log = dir.path().join("console.log");
        let qemu_log = dir.path().join("qemu.log");
        let stderr = File::create(&qemu_log).map_err(Error::io("create", &qemu_log))?;

        let mut cmd = Command::new(&qemu);
        cmd.args(qemu_args(spec, AGENT_FD, QMP_FD, &console_log))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Terminal signals (Ctrl-C) go to the host program, which ends
            // its instances itself; QEMU must not die under it first.
            .process_group(0);
        let fds = [agent_guest.as_raw_fd(), qmp_guest.as_raw_fd()];
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid, sigprocmask, dup2, fcntl).
        unsafe {
            cmd.pre_exec(move || child_setup(parent, fds));
        }

        let exit = Arc::new(Exit::default());
        let (tx, rx) = mpsc::channel();
        let exit2 = exit.clone();
        // QEMU's PR_SET_PDEATHSIG fires when the thread that forked it ends,
        // so the thread that spawns QEMU is the one that lives as long as it.
        let supervisor = std::thread::Builder::new()
            .name("cc-qemu".into())
            .spawn(move || {
                let spawned = cmd.spawn();
                drop((agent_guest, qmp_guest));
                let mut child = match spawned {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let pidfd = match pidfd_open(child.id()) {
                    Ok(fd) => fd,
                    Err(e) => {
                        // Without a pidfd nobody could end it: do it now.
                        let _ = child.kill();
                        let _ = child.wait();
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok((child.id(), pidfd)));
                let status = child.wait();
                let mut slot = exit2.status.lock().unwrap_or_else(|e| e.into_inner());
                *slot = Some(status.unwrap_or_else(|_| ExitStatus::default()));
                exit2.changed.notify_all();
            })
            .map_err(Error::io("spawn supervisor thread for", &qemu))?;
        let (pid, pidfd) = match rx.recv() {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => {
                let _ = supervisor.join();
                return Err(if e.kind() == std::io::ErrorKind::NotFound {
                    Error::QemuMissing(qemu.display().to_string())
                } else {
                    Error::Io {
                        op: "spawn",
                        path: qemu,
                        source: e,
                    }
                });
            }
            Err(_) => {
                let _ = supervisor.join();
                return Err(Error::Qmp("QEMU supervisor ended unexpectedly".into()));
            }
        };
        let vm = Vm {
            pid,
            pidfd,
            exit,
            supervisor: Some(supervisor),
            qmp: Mutex::new(Qmp::new(qmp_host)?),
            console_log,
            qemu_log,
        };
        Ok((vm, agent_host))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// QEMU's exit status, once it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for QEMU to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut status = self.exit.status.lock().unwrap_or_else(|e| e.into_inner());
        while status.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            status = self
                .exit
                .changed
                .wait_timeout(status, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *status
    }

    /// Sends SIGKILL to QEMU. Safe after it exited: the pidfd never names
    /// another process.
    pub fn kill(&self) {
        // SAFETY: pidfd is an open pidfd owned by self; the null siginfo
        // pointer is allowed by pidfd_send_signal.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<u8>(),
                0,
            );
        }
    }

    /// Asks QEMU to quit over QMP, killing it if it has not exited after
    /// `grace`; returns once it has exited.
    pub fn terminate(&self, grace: Duration) -> ExitStatus {
        if self.exit_status().is_none() {
            let quit = self
                .qmp
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .execute("quit", None, grace);
            if let Err(e) = quit {
                tracing::debug!(error = %e, "QMP quit failed; killing QEMU");
            }
        }
        if let Some(status) = self.wait_timeout(grace) {
            return status;
        }
        self.kill();
        loop {
            if let Some(status) = self.wait_timeout(Duration::from_secs(1)) {
                return status;
            }
        }
    }

    /// Runs a QMP command.
    pub fn qmp(
        &self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, Error> {
        self.qmp.lock().unwrap_or_else(|e| e.into_inner()).execute(
            command,
            args,
            Duration::from_secs(10),
        )
    }

    /// Connects or disconnects the guest's network interface: while
    /// disconnected, no packet leaves or arrives.
    pub fn set_network_link(&self, up: bool) -> Result<(), Error> {
        self.qmp(
            "set_link",
            Some(serde_json::json!({ "name": NETDEV_ID, "up": up })),
        )
        .map(drop)
    }

    /// Saves this booted guest as a template, then ends QEMU. Its RAM must
    /// be a shared [`MemoryFile`] (which then holds the template's memory);
    /// the device state goes to `state`. The agent channel stays connected
    /// and must be quiet (nothing in flight either way): a restored guest
    /// finds its channel connected again and goes on reading it.
    pub fn save_template(&self, state: &Path) -> Result<(), Error> {
        let mut qmp = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        ignore_shared_ram(&mut qmp)?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 100u64 << 30, "downtime-limit": 5000 })),
            QMP_TIMEOUT,
        )?;
        qmp.execute("stop", None, QMP_TIMEOUT)?;
        let uri = format!("exec:cat > {}", shell_quote(state));
        qmp.execute("migrate", Some(json!({ "uri": uri })), QMP_TIMEOUT)?;
        wait_migrated(&mut qmp)?;
        // QEMU may close QMP before answering `quit`.
        let _ = qmp.execute("quit", None, QMP_TIMEOUT);
        drop(qmp);
        if self.wait_timeout(QMP_TIMEOUT).is_none() {
            self.kill();
        }
        Ok(())
    }

    /// Loads a template's device state from `state` into this VM, started
    /// with `incoming` and the template's RAM file mapped privately, and
    /// lets it run.
    pub fn restore(&self, state: &Path) -> Result<(), Error> {
        let mut qmp = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        ignore_shared_ram(&mut qmp)?;
        let uri = format!("exec:cat {}", shell_quote(state));
        qmp.execute("migrate-incoming", Some(json!({ "uri": uri })), QMP_TIMEOUT)?;
        wait_migrated(&mut qmp)?;
        // The template was saved stopped, so the guest arrives paused, a
        // moment after the migration reports completion: a `cont` sent
        // while QEMU still says `inmigrate` would be overruled by that.
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            let status = qmp.execute("query-status", None, QMP_TIMEOUT)?;
            match status["status"].as_str() {
                Some("running") => return Ok(()),
                Some("inmigrate") if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Some("paused") if Instant::now() < deadline => {
                    qmp.execute("cont", None, QMP_TIMEOUT)?;
                }
                other => {
                    return Err(Error::Qmp(format!(
                        "the restored guest did not run (status {})",
                        other.unwrap_or("unknown")
                    )))
                }
            }
        }
    }

    /// QEMU's own messages and the tail of the guest console, for errors.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        let qemu = tail(&self.qemu_log, 10);
        if !qemu.is_empty() {
            out.push_str("--- qemu:\n");
            out.push_str(&qemu);
        }
        let console = tail(&self.console_log, 30);
        out.push_str("--- guest console:\n");
        out.push_str(if console.is_empty() {
            "(empty)\n"
        } else {
            &console
        });
        out
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            self.kill();
        }
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.join();
        }
    }
}

/// In the forked child: die with the parent, move the channel sockets to
/// fixed descriptor numbers without close-on-exec.
fn child_setup(parent: u32, fds: [RawFd; 2]) -> std::io::Result<()> {
    // SAFETY: prctl/getppid/sigprocmask/dup2/fcntl are async-signal-safe;
    // the sigset is a live local; the fds are open in the child (inherited).
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have died before prctl took effect.
        if libc::getppid() as u32 != parent {
            return Err(std::io::Error::other("parent exited"));
        }
        // QEMU asks for transparent huge pages for guest RAM and its code
        // cache; a 2 MiB page is all resident once one byte of it is
        // touched, which multiplies an idle guest's memory.
        if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // A host program may block signals it handles in a thread (the CLI
        // does); QEMU must not inherit that mask.
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // Move both out of the way of the target numbers first.
        let high: Vec<RawFd> = fds
            .iter()
            .map(|&fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10))
            .collect();
        for (target, fd) in [AGENT_FD, QMP_FD].into_iter().zip(high) {
            if fd < 0 || libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// How long one QMP step of saving or restoring may take (generous: a
/// loaded host slows emulated guests a lot).
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// Skips the shared RAM file in the migration stream: it is the template's
/// memory, on both sides.
fn ignore_shared_ram(qmp: &mut Qmp) -> Result<(), Error> {
    let caps = json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] });
    qmp.execute("migrate-set-capabilities", Some(caps), QMP_TIMEOUT)
        .map(drop)
}

/// Polls `query-migrate` until the migration completed.
fn wait_migrated(qmp: &mut Qmp) -> Result<(), Error> {
    let deadline = Instant::now() + QMP_TIMEOUT;
    loop {
        let info = qmp.execute("query-migrate", None, QMP_TIMEOUT)?;
        match info["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed" | "cancelled") => {
                return Err(Error::Qmp(format!(
                    "migration failed: {}",
                    info["error-desc"].as_str().unwrap_or("no reason given")
                )))
            }
            _ if Instant::now() > deadline => {
                return Err(Error::Qmp("migration did not finish in time".into()))
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// `path` as one word for `/bin/sh` (QEMU runs `exec:` URIs with it).
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', "'\\''"))
}

/// The last `lines` lines of a log file (lossy UTF-8).
fn tail(path: &Path, lines: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// `qemu-system-x86_64 --version`'s first line.
pub fn qemu_version() -> Result<String, Error> {
    let qemu = paths::qemu()?;
    let out = Command::new(&qemu)
        .arg("--version")
        .output()
        .map_err(Error::io("run", &qemu))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}
