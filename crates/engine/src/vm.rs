//! One QEMU process: spawn, supervise, control, end.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cmdline::{fd_path, BootFiles, Wiring};
use crate::confine::{self, ConfineMode, Confinement};
use crate::qmp::{Event, Qmp};
use crate::{console, net, paths, qemu_args, Accel, Error, RunDir};
use cc_netpolicy::NetworkPolicy;

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
    /// TAP): the guest reaches out through the host's own connections,
    /// as far as this policy lets it; `None` for no interface.
    pub network: Option<NetworkPolicy>,
    /// Extra kernel command line parameters.
    pub kernel_params: Vec<String>,
    /// Guest RAM in a file instead of anonymous memory (templates).
    pub memory_file: Option<MemoryFile>,
    /// Without a `memory_file`: anonymous RAM under the name a file-backed
    /// VM gives its RAM, so that it can load a state saved by one (QEMU
    /// matches RAM by name).
    pub named_ram: bool,
    /// Start paused, waiting for [`Vm::restore`] to load a saved state.
    pub incoming: bool,
    /// The name of the virtio-serial port the guest agent opens.
    pub agent_port: String,
    /// How strictly QEMU must be confined.
    pub confine: ConfineMode,
    /// The console log keeps at most about this many bytes (the newest).
    pub console_log_max: u64,
}

/// The default cap of a VM's console log.
pub const CONSOLE_LOG_MAX: u64 = 4 << 20;

/// Guest RAM backed by a file.
#[derive(Debug, Clone)]
pub struct MemoryFile {
    pub path: PathBuf,
    /// Writes go to the file (`true`, to save a template) or stay private
    /// to this VM (`false`, to restore one: the file never changes).
    pub shared: bool,
    /// Names the RAM as QEMU names anonymous RAM (`microvm.ram`) instead
    /// of `mem`: QEMU matches RAM by name, so a state saved by a VM with
    /// anonymous RAM loads only into RAM named alike.
    pub anonymous_name: bool,
}

/// A disk image attached as a virtio block device: raw, or a qcow2
/// overlay when it has a `backing` image.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub serial: String,
    pub read_only: bool,
    /// The raw image under a qcow2 overlay at `path`, read only: a
    /// restored guest's writable disk writes only what differs from its
    /// park's (a reflink is not always possible).
    pub backing: Option<PathBuf>,
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
/// joins the supervisor, QMP and console threads.
#[derive(Debug)]
pub struct Vm {
    /// QEMU's host pid (inside bubblewrap, not the pid of bubblewrap).
    pid: u32,
    /// The process the engine spawned: bubblewrap, or QEMU itself.
    pidfd: OwnedFd,
    /// QEMU itself, when it is not the spawned process.
    qemu_pidfd: Option<OwnedFd>,
    exit: Arc<Exit>,
    supervisor: Option<JoinHandle<()>>,
    qmp: Qmp,
    console: Option<console::Console>,
    qemu_log: PathBuf,
    confinement: Confinement,
    /// The network relay and the policy filter in front of it, when the guest has a
    /// network interface.
    network: Option<net::Network>,
}

/// QEMU's id of the guest's network backend.
pub(crate) const NETDEV_ID: &str = "net0";

/// The host files one VM needs, opened by the engine and inherited by QEMU.
#[derive(Debug, Default)]
struct Inputs {
    /// (descriptor, the number QEMU sees it as).
    fds: Vec<(OwnedFd, i32)>,
}

impl Inputs {
    /// Hands `fd` to QEMU and returns the number QEMU sees it as.
    fn add(&mut self, fd: impl Into<OwnedFd>) -> i32 {
        let target = 3 + self.fds.len() as i32;
        self.fds.push((fd.into(), target));
        target
    }

    fn open(&mut self, path: &Path, options: &std::fs::OpenOptions) -> Result<i32, Error> {
        let f = options.open(path).map_err(Error::io("open", path))?;
        Ok(self.add(f))
    }

    fn plan(&self) -> Vec<(RawFd, RawFd)> {
        self.fds
            .iter()
            .map(|(fd, t)| (fd.as_raw_fd(), *t))
            .collect()
    }
}

fn read_only() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    o
}

fn read_write() -> std::fs::OpenOptions {
    let mut o = read_only();
    o.write(true);
    o
}

impl Vm {
    /// Spawns QEMU for `spec`, confined (see [`crate::confine`]), with its
    /// logs in `dir`, and returns it with the host end of the agent
    /// channel. Returns as soon as QEMU runs; the guest boots in the
    /// background and speaks first on the channel.
    pub fn start(spec: &VmSpec, dir: &RunDir) -> Result<(Vm, UnixStream), Error> {
        let _span = tracing::debug_span!("engine: start QEMU").entered();
        let qemu = paths::qemu()?;
        let support = confine::host_support();
        let creds = confine::creds(spec.confine, !spec.shares.is_empty());
        let off = spec.confine == ConfineMode::Off;
        let has_network = spec.network.is_some();
        let confinement = confine::expected(spec.confine, !spec.shares.is_empty(), has_network);
        let (seccomp, namespaces) = (confinement.seccomp, confinement.namespaces);
        confine::enforce(spec.confine, &confinement)?;

        let socketpair = || UnixStream::pair().map_err(Error::io("socketpair", dir.path()));
        let (agent_host, agent_guest) =
            agent_socketpair().map_err(Error::io("socketpair", dir.path()))?;
        let (qmp_host, qmp_guest) = socketpair()?;
        let (console_host, console_guest) = socketpair()?;
        let mut inputs = Inputs::default();
        let agent_fd = inputs.add(agent_guest);
        let qmp_fd = inputs.add(qmp_guest);
        let console_fd = inputs.add(console_guest);
        let boot = if spec.incoming {
            None
        } else {
            if creds.switch {
                for file in [&spec.kernel, &spec.initrd] {
                    readable_by_all(file)?;
                }
            }
            Some(BootFiles {
                kernel: fd_path(inputs.open(&spec.kernel, &read_only())?),
                initrd: fd_path(inputs.open(&spec.initrd, &read_only())?),
            })
        };
        let memory_file = match &spec.memory_file {
            Some(file) => Some(fd_path(open_memory_file(&mut inputs, file, creds)?)),
            None => None,
        };
        let mut disk_fds = Vec::new();
        let mut backing_fds = Vec::new();
        for disk in &spec.disks {
            let mut fds = vec![inputs.open(&disk.path, &read_only())?];
            if !disk.read_only {
                fds.push(inputs.open(&disk.path, &read_write())?);
            }
            disk_fds.push(fds);
            backing_fds.push(match &disk.backing {
                Some(base) => Some(inputs.open(base, &read_only())?),
                None => None,
            });
        }
        let mut shares = Vec::new();
        for share in &spec.shares {
            let dir_fd = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(&share.path)
                .map_err(Error::io("open", &share.path))?;
            shares.push(fd_path(inputs.add(dir_fd)));
        }
        let network = match &spec.network {
            Some(policy) => Some(
                tracing::debug_span!("engine: network filter")
                    .in_scope(|| net::Network::start(dir, creds, namespaces, policy))?,
            ),
            None => None,
        };
        let net_fd = match &network {
            Some(n) => Some(inputs.add(n.qemu_end()?)),
            None => None,
        };
        let wiring = Wiring {
            agent_fd,
            qmp_fd,
            console_fd,
            boot,
            memory_file,
            disk_fds,
            backing_fds,
            shares,
            net_fd,
            seccomp,
        };
        let qemu_args = qemu_args(spec, &wiring);
        let (info_host, mut cmd) = match (&support.bwrap, namespaces) {
            (Some(bwrap), true) => {
                let (info_host, info_guest) = socketpair()?;
                let info_fd = inputs.add(info_guest);
                let files = confine::qemu_files(&qemu);
                let kvm = matches!(spec.accel, Accel::Kvm);
                let mut cmd = Command::new(bwrap);
                cmd.args(confine::bwrap_args(files, creds, kvm, info_fd))
                    .arg("--")
                    .arg(&qemu);
                (Some(info_host), cmd)
            }
            _ => (None, Command::new(&qemu)),
        };
        cmd.args(qemu_args);

        let qemu_log = dir.path().join("qemu.log");
        let stderr = create_private(&qemu_log)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Terminal signals (Ctrl-C) go to the host program, which ends
            // its instances itself; QEMU must not die under it first.
            .process_group(0);
        let mut plan = confine::ChildPlan::new(creds, inputs.plan(), Some(libc::SIGKILL));
        plan.no_new_privs = !off;
        // SAFETY: ChildPlan::apply runs between fork and exec and only makes
        // async-signal-safe system calls on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || plan.apply());
        }

        let exit = Arc::new(Exit::default());
        let (tx, rx) = mpsc::channel();
        let exit2 = exit.clone();
        // PR_SET_PDEATHSIG fires when the thread that forked the child
        // ends, so the thread that spawns it is the one that lives as long
        // as it.
        let supervisor = std::thread::Builder::new()
            .name("cc-qemu".into())
            .spawn(move || {
                let spawned = cmd.spawn();
                drop(inputs);
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
        let span = tracing::debug_span!("engine: fork and exec QEMU").entered();
        let (spawned_pid, pidfd) = match rx.recv() {
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
        drop(span);
        let console = console::Console::start(console_host, dir.path(), spec.console_log_max)
            .map_err(Error::io("start console log in", dir.path()))?;
        let qmp =
            tracing::debug_span!("engine: QEMU's QMP greeting").in_scope(|| Qmp::new(qmp_host))?;
        let mut vm = Vm {
            pid: spawned_pid,
            pidfd,
            qemu_pidfd: None,
            exit,
            supervisor: Some(supervisor),
            qmp,
            console: Some(console),
            qemu_log,
            confinement,
            network,
        };
        if let Some(info) = info_host {
            // Bubblewrap reports QEMU's host pid once the sandbox stands;
            // without it (bubblewrap failed) QEMU's exit says why.
            let pid = tracing::debug_span!("engine: sandbox's QEMU pid")
                .in_scope(|| read_child_pid(info));
            if let Some(pid) = pid {
                vm.pid = pid;
                vm.qemu_pidfd = pidfd_open(pid).ok();
            }
        }
        Ok((vm, agent_host))
    }

    /// The confinement QEMU runs under.
    pub fn confinement(&self) -> &Confinement {
        &self.confinement
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
        kill_sandboxed(&self.pidfd, self.qemu_pidfd.as_ref());
    }

    /// Asks QEMU to quit over QMP, killing it if it has not exited after
    /// `grace`; returns once it has exited.
    pub fn terminate(&self, grace: Duration) -> ExitStatus {
        if self.exit_status().is_none() {
            let quit = self.qmp.execute("quit", None, grace);
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
        self.qmp.execute(command, args, Duration::from_secs(10))
    }

    /// Connects or disconnects the guest's network interface: while
    /// disconnected, no packet leaves or arrives. (The filter drops them:
    /// QEMU's `set_link` on the frame socket left a user-mode stack's traffic stuck
    /// once the link came back.)
    pub fn set_network_link(&self, up: bool) -> Result<(), Error> {
        match &self.network {
            Some(n) => {
                n.set_enabled(up);
                Ok(())
            }
            None => Err(Error::Policy("the VM has no network interface".into())),
        }
    }

    /// Whether the network interface is connected (`false` also without
    /// one).
    pub fn network_link(&self) -> bool {
        self.network.as_ref().is_some_and(net::Network::is_enabled)
    }

    /// Calls `handler` with every QMP event QEMU sends (at once for those
    /// already received): `SHUTDOWN`, `RESET`, `STOP`, `GUEST_PANICKED`...
    /// It runs on the QMP reader thread and must return quickly.
    pub fn on_event(&self, handler: impl Fn(&Event) + Send + Sync + 'static) {
        self.qmp.set_handler(Arc::new(handler));
    }

    /// Saves this booted guest as a template, then ends QEMU. Its RAM must
    /// be a shared [`MemoryFile`] (which then holds the template's memory);
    /// the device state goes to `state`, written through a descriptor QEMU
    /// is handed (it never spawns a process or opens a path for it). The
    /// agent channel stays connected and must be quiet (nothing in flight
    /// either way): a restored guest finds its channel connected again and
    /// goes on reading it.
    pub fn save_template(&self, state: &Path) -> Result<(), Error> {
        self.save(state)?;
        // QEMU may close QMP before answering `quit`.
        let _ = self.qmp.execute("quit", None, QMP_TIMEOUT);
        if self.wait_timeout(QMP_TIMEOUT).is_none() {
            self.kill();
        }
        Ok(())
    }

    /// Stops the guest and writes its state to `state`: the device state,
    /// and every page of RAM that is not in a shared [`MemoryFile`]. QEMU
    /// flushes its disks and stays, stopped; [`cont`](Self::cont) lets the
    /// guest run on. The agent channel must be quiet, as for
    /// [`save_template`](Self::save_template).
    pub fn save(&self, state: &Path) -> Result<(), Error> {
        self.save_stream(state, true)
    }

    /// Saves as [`save`](Self::save) does, but every page of RAM, in a
    /// form only [`receive`](Self::receive) loads: into RAM in a shared
    /// file, which turns it into a template-like RAM file and state.
    pub fn save_all(&self, state: &Path) -> Result<(), Error> {
        self.save_stream(state, false)
    }

    fn save_stream(&self, state: &Path, ignore_shared: bool) -> Result<(), Error> {
        let qmp = &self.qmp;
        migration_capabilities(qmp, ignore_shared)?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 100u64 << 30, "downtime-limit": 5000 })),
            QMP_TIMEOUT,
        )?;
        qmp.execute("stop", None, QMP_TIMEOUT)?;
        let file = create_private(state)?;
        let fdname = Some(json!({ "fdname": MIGRATION_FD }));
        qmp.execute_with_fd("getfd", fdname, Some(file.as_fd()), QMP_TIMEOUT)?;
        drop(file);
        let mark = qmp.event_mark();
        let uri = json!({ "uri": format!("fd:{MIGRATION_FD}") });
        qmp.execute("migrate", Some(uri), QMP_TIMEOUT)?;
        wait_migrated(qmp, mark)?;
        // QEMU reports the migration complete a moment before it leaves
        // `finish-migrate`, and refuses `cont` until it has.
        let deadline = Instant::now() + QMP_TIMEOUT;
        while qmp.execute("query-status", None, QMP_TIMEOUT)?["status"] == "finish-migrate" {
            if Instant::now() > deadline {
                return Err(Error::Qmp("the guest stayed in finish-migrate".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Loads a template's device state from `state` into this VM, started
    /// with `incoming` and the template's RAM file mapped privately, and
    /// lets it run.
    pub fn restore(&self, state: &Path) -> Result<(), Error> {
        self.load(state, true)?;
        // The template was saved stopped, so the guest arrives paused.
        self.cont()
    }

    /// Loads a state [`save_all`](Self::save_all) wrote into this VM,
    /// started with `incoming`, and leaves the guest paused: with its RAM
    /// a shared [`MemoryFile`], the file then holds the guest's memory.
    pub fn receive(&self, state: &Path) -> Result<(), Error> {
        self.load(state, false)
    }

    fn load(&self, state: &Path, ignore_shared: bool) -> Result<(), Error> {
        let qmp = &self.qmp;
        migration_capabilities(qmp, ignore_shared)?;
        let file = File::open(state).map_err(Error::io("open", state))?;
        let fdname = Some(json!({ "fdname": MIGRATION_FD }));
        qmp.execute_with_fd("getfd", fdname, Some(file.as_fd()), QMP_TIMEOUT)?;
        drop(file);
        let mark = qmp.event_mark();
        let uri = json!({ "uri": format!("fd:{MIGRATION_FD}") });
        qmp.execute("migrate-incoming", Some(uri), QMP_TIMEOUT)?;
        wait_migrated(qmp, mark)
    }

    /// Stops the guest's vCPUs (QMP `stop`): its clocks and timers stand
    /// still and it uses no CPU; devices and the agent channel stay open.
    /// QEMU sends a `STOP` event, which [`Vm::on_event`] handlers see.
    pub fn stop(&self) -> Result<(), Error> {
        self.qmp.execute("stop", None, QMP_TIMEOUT).map(drop)
    }

    /// Lets a stopped guest run again (QMP `cont`); returns once QEMU says
    /// it runs (the `RESUME` event).
    pub fn cont(&self) -> Result<(), Error> {
        let mark = self.qmp.event_mark();
        self.qmp.execute("cont", None, QMP_TIMEOUT)?;
        self.qmp
            .wait_event(mark, "RESUME", QMP_TIMEOUT, |e| e.name == "RESUME")
            .map(drop)
    }

    /// QEMU's own messages and the tail of the guest console, for errors.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        let qemu = tail(&self.qemu_log, 10);
        if !qemu.is_empty() {
            out.push_str("--- qemu:\n");
            out.push_str(&qemu);
        }
        let console = self
            .console
            .as_ref()
            .map(|c| c.tail(30))
            .unwrap_or_default();
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
        // QEMU is gone: its sockets are closed, so these threads end.
        drop(self.console.take());
        drop(self.network.take());
    }
}

/// How long bubblewrap may take to exit once the process it runs is killed.
const BWRAP_PATIENCE: Duration = Duration::from_secs(2);

/// Kills a spawned process (`outer`), the process it runs inside its
/// sandbox (`inner`) first: bubblewrap then reaps it and exits on its own.
/// Killing bubblewrap first would orphan the inner process, and a zombie
/// would stay until the host's init, or a subreaper such as a containerd
/// shim, reaped it. Bubblewrap is killed too if it lingers. Safe after
/// either exited.
pub(crate) fn kill_sandboxed(outer: &OwnedFd, inner: Option<&OwnedFd>) {
    if let Some(inner) = inner {
        kill_pidfd(inner);
        if exits_within(outer, BWRAP_PATIENCE) {
            return;
        }
    }
    kill_pidfd(outer);
}

/// Whether the process behind `pidfd` exits (or has exited) within
/// `timeout`.
fn exits_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `poll` is one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, ms) };
        if ready >= 0 {
            return ready > 0;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Sends SIGKILL through a pidfd: safe after the process exited, since a
/// pidfd never names another process.
pub(crate) fn kill_pidfd(fd: &OwnedFd) {
    // SAFETY: fd is an open pidfd; the null siginfo pointer is allowed by
    // pidfd_send_signal.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<u8>(),
            0,
        );
    }
}

pub(crate) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
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

/// The name QEMU knows the migration stream's descriptor by.
const MIGRATION_FD: &str = "migration";

/// With `ignore_shared`, skips the shared RAM file in the migration stream
/// (it is the template's memory, on both sides); without, a receiver with
/// shared RAM takes every page (QEMU refuses pages for RAM it ignores, and
/// both ends must agree). Progress comes as events.
fn migration_capabilities(qmp: &Qmp, ignore_shared: bool) -> Result<(), Error> {
    let caps = json!({ "capabilities": [
        { "capability": "x-ignore-shared", "state": ignore_shared },
        { "capability": "events", "state": true },
    ] });
    qmp.execute("migrate-set-capabilities", Some(caps), QMP_TIMEOUT)
        .map(drop)
}

/// Waits for the migration started after event `mark` to end.
fn wait_migrated(qmp: &Qmp, mark: u64) -> Result<(), Error> {
    let ended = |e: &Event| {
        e.name == "MIGRATION"
            && matches!(
                e.data["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
    };
    let event = qmp.wait_event(mark, "the migration", QMP_TIMEOUT, ended)?;
    if event.data["status"] == "completed" {
        return Ok(());
    }
    let info = qmp
        .execute("query-migrate", None, QMP_TIMEOUT)
        .unwrap_or_default();
    Err(Error::Qmp(format!(
        "migration failed: {}",
        info["error-desc"].as_str().unwrap_or("no reason given")
    )))
}

/// Creates (or truncates) `path`, readable and writable by its owner only.
pub(crate) fn create_private(path: &Path) -> Result<File, Error> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("create", path))
}

/// Opens a RAM file for QEMU, which re-opens it read-write through
/// `/proc/self/fd`: it must belong to the uid QEMU runs as. A template's
/// source creates it.
fn open_memory_file(
    inputs: &mut Inputs,
    file: &MemoryFile,
    creds: confine::Creds,
) -> Result<i32, Error> {
    let f = if file.shared {
        create_private(&file.path)?
    } else {
        File::open(&file.path).map_err(Error::io("open", &file.path))?
    };
    if creds.switch && file.shared {
        std::os::unix::fs::fchown(&f, Some(creds.uid), Some(creds.gid))
            .map_err(Error::io("chown", &file.path))?;
    }
    Ok(inputs.add(f))
}

/// QEMU opens the kernel and initramfs by their descriptors' paths, as its
/// own uid: they must be readable by every user (they hold nothing secret).
fn readable_by_all(path: &Path) -> Result<(), Error> {
    let mode = std::fs::metadata(path)
        .map_err(Error::io("stat", path))?
        .permissions()
        .mode();
    if mode & 0o004 == 0 {
        return Err(Error::Unreadable(path.to_path_buf()));
    }
    Ok(())
}

/// Reads QEMU's host pid from bubblewrap's info JSON.
pub(crate) fn read_child_pid(info: UnixStream) -> Option<u32> {
    info.set_read_timeout(Some(QMP_TIMEOUT)).ok()?;
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    let mut reader = &info;
    while !text.contains(&b'}') && text.len() < 4096 {
        match std::io::Read::read(&mut reader, &mut buf) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            // A signal meant for the host program (its Ctrl-C, say) may
            // land on this thread.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v["child-pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}

/// The last `lines` lines of a log file (lossy UTF-8).
fn tail(path: &Path, lines: usize) -> String {
    std::fs::read(path)
        .map(|bytes| console::last_lines(&bytes, lines))
        .unwrap_or_default()
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
/// What each end of the agent channel may have queued towards the other:
/// QEMU hands the host a whole guest buffer (up to a 512 KiB frame) per
/// write, and with room for several frames it rarely stops to wait for the
/// reader. The kernel caps it at `net.core.wmem_max`.
const CHANNEL_SOCKET_BUFFER: usize = 4 << 20;

/// The socket pair the agent channel runs on: host end, QEMU's end.
pub(crate) fn agent_socketpair() -> std::io::Result<(UnixStream, UnixStream)> {
    let (host, guest) = UnixStream::pair()?;
    for end in [&host, &guest] {
        rustix::net::sockopt::set_socket_send_buffer_size(end, CHANNEL_SOCKET_BUFFER)?;
    }
    Ok((host, guest))
}
