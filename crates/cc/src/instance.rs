//! Instances: boot, identity, lifecycle.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cc_engine::template::StartKind;
use cc_engine::{
    AgentLink, ConfineMode, Confinement, Engine, GuestLayout, GuestSpec, Hooks, Machine, Qemu,
    ShareSpec, Started,
};
use cc_netpolicy::NetworkPolicy;
use cc_protocol::{
    Lower, NetConfig, Prepare, Request, Response, RootSpec, Setup, UnixTime, HOST_INTERNAL_ADDR,
    HOST_INTERNAL_NAME,
};
use serde_bytes::ByteBuf;

use crate::cancel;
use crate::channel::{Channel, Gone};
use crate::cmd_object::Cmd;
use crate::error::{Error, Result};
use crate::net::ExposeShared;
use crate::oci::CancelToken;
use crate::process::Command;
use crate::rootfs;
use crate::snapshot::{Origin, Snapshot};

/// Where an instance's root filesystem comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A host directory holding a root filesystem tree. It is never modified:
    /// the instance writes to its own layer.
    Dir(PathBuf),
    /// An OCI image from the store; its config supplies the defaults of
    /// every command (environment, working directory, user, entrypoint).
    Image(Box<cc_image::Image>),
    /// A filesystem snapshot of another instance.
    Snapshot(Box<Snapshot>),
}

impl From<Snapshot> for Source {
    fn from(snapshot: Snapshot) -> Source {
        Source::Snapshot(Box::new(snapshot))
    }
}

impl From<cc_image::Image> for Source {
    fn from(image: cc_image::Image) -> Source {
        Source::Image(Box::new(image))
    }
}

/// How to run an instance.
#[derive(Debug, Clone)]
pub struct Options {
    /// Guest memory in MiB (default 512; touched pages only cost host memory).
    pub memory_mb: u32,
    /// Virtual CPUs (default 1).
    pub cpus: u32,
    /// Default user for commands: `name`, `uid`, `uid:gid` or `name:group`.
    pub user: Option<String>,
    /// How long the guest may take to become ready (default 60 s).
    pub boot_timeout: Duration,
    /// Ends the instance this long after it was created; later calls fail
    /// with [`Error::NotRunning`]. Time paused ([`Instance::pause`]) does
    /// not count. `None` (the default) never ends it.
    pub timeout: Option<Duration>,
    /// Host directories shared into the guest.
    pub mounts: Vec<Mount>,
    /// Whether the guest can reach the network (default on): through a
    /// user-mode stack on the host, no root or TAP device needed. Switch it
    /// at run time with [`Instance::set_network_enabled`].
    pub network: bool,
    /// What the guest may reach through the network. The default reaches
    /// outside addresses but not the host (its loopback and interface
    /// addresses) nor link-local 169.254.0.0/16; see [`NetworkPolicy`].
    pub network_policy: NetworkPolicy,
    /// Start from a template of an already booted guest when there is one
    /// for this configuration, building it on the first start (default
    /// on). A warm instance is indistinguishable from a cold one: identity,
    /// clock, entropy, disks, mounts and network are set up after the
    /// restore. [`Instance::start_kind`] says which happened.
    pub warm_start: bool,
    /// How QEMU is confined (SECURITY.md): by default with everything the
    /// host offers, listing what it cannot give in
    /// [`Instance::confinement`]; [`ConfineMode::Strict`] refuses to start
    /// instead; [`ConfineMode::Off`] is for measurements and debugging.
    pub confinement: ConfineMode,
    /// The guest's console log (in the run dir, for boot diagnostics)
    /// keeps at most about this many of its newest bytes (default 4 MiB),
    /// however much the guest writes to its console.
    pub console_log_max: u64,
    /// Size of the instance's writable layer in MiB (default
    /// [`DEFAULT_DISK_MB`], at most 1 TiB): what the guest can write on top
    /// of its image before it gets `ENOSPC`. Sparse on the host, so only
    /// written blocks take host disk, and never more than this.
    pub disk_mb: u32,
    /// The largest result one call builds in host memory (default
    /// [`DEFAULT_MAX_RESULT_BYTES`], 1 GiB): [`Instance::read_file`],
    /// [`File::read_all`](crate::File::read_all), and the captured output
    /// of [`Command::output`] and [`Cmd::output`] (stdout and stderr
    /// together). A bigger result fails with [`Error::TooLarge`] instead
    /// of growing the host process as far as the guest likes; stream big
    /// data with [`Instance::copy_out`], [`Instance::read_file_stream`],
    /// [`Instance::read_file_to`] or [`Cmd::output_to`].
    pub max_result_bytes: u64,
    /// What runs the guest: [`Qemu`] by default. Another [`Engine`] (a
    /// native VMM, or a test double) serves the same agent protocol.
    pub engine: Arc<dyn Engine>,
}

/// Default size of an instance's writable layer: 4 GiB.
pub const DEFAULT_DISK_MB: u32 = 4096;

/// Bounds of [`Options::disk_mb`]: ext4 needs a few MiB for itself, and a
/// writable layer beyond 1 TiB is a mistake rather than a need.
const DISK_MB_RANGE: std::ops::RangeInclusive<u32> = 64..=1 << 20;

/// The default of [`Options::max_result_bytes`]: 1 GiB.
pub const DEFAULT_MAX_RESULT_BYTES: u64 = 1 << 30;

/// A host directory shared into the guest at `guest_path`. Read-only
/// unless `writable` (enforced by the host, not just the guest); writes
/// through a writable mount land in the host directory at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub host_path: PathBuf,
    pub guest_path: String,
    pub writable: bool,
}

impl Mount {
    /// A read-only mount.
    pub fn read_only(host_path: impl Into<PathBuf>, guest_path: impl Into<String>) -> Mount {
        Mount {
            host_path: host_path.into(),
            guest_path: guest_path.into(),
            writable: false,
        }
    }

    /// A writable mount.
    pub fn writable(host_path: impl Into<PathBuf>, guest_path: impl Into<String>) -> Mount {
        Mount {
            host_path: host_path.into(),
            guest_path: guest_path.into(),
            writable: true,
        }
    }

    fn validate(&self) -> Result<()> {
        let meta =
            std::fs::metadata(&self.host_path).map_err(Error::io("mount", &self.host_path))?;
        if !meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "mount source {} is not a directory",
                self.host_path.display()
            )));
        }
        let g = &self.guest_path;
        if !g.starts_with('/') || g == "/" || g.split('/').any(|c| c == "..") || g.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "mount target {g:?} must be an absolute guest path other than /"
            )));
        }
        Ok(())
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            memory_mb: 512,
            cpus: 1,
            user: None,
            boot_timeout: Duration::from_secs(60),
            timeout: None,
            mounts: Vec::new(),
            network: true,
            network_policy: NetworkPolicy::default(),
            warm_start: true,
            confinement: ConfineMode::BestEffort,
            console_log_max: cc_engine::CONSOLE_LOG_MAX,
            disk_mb: DEFAULT_DISK_MB,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            engine: Arc::new(Qemu::new()),
        }
    }
}

impl Options {
    fn validate(&self) -> Result<()> {
        if self.console_log_max < 4096 {
            return Err(Error::InvalidArgument(format!(
                "console_log_max {} is under 4096 bytes",
                self.console_log_max
            )));
        }
        if !(64..=1 << 20).contains(&self.memory_mb) {
            return Err(Error::InvalidArgument(format!(
                "memory_mb {} is outside 64..=1048576",
                self.memory_mb
            )));
        }
        if !DISK_MB_RANGE.contains(&self.disk_mb) {
            return Err(Error::InvalidArgument(format!(
                "disk_mb {} is outside {}..={}",
                self.disk_mb,
                DISK_MB_RANGE.start(),
                DISK_MB_RANGE.end()
            )));
        }
        if !(1..=64).contains(&self.cpus) {
            return Err(Error::InvalidArgument(format!(
                "cpus {} is outside 1..=64",
                self.cpus
            )));
        }
        if self
            .user
            .as_deref()
            .is_some_and(|u| u.is_empty() || u.contains('\0'))
        {
            return Err(Error::InvalidArgument(
                "user must be a non-empty name or id".into(),
            ));
        }
        if self.max_result_bytes == 0 {
            return Err(Error::InvalidArgument(
                "max_result_bytes 0 must be positive".into(),
            ));
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::InvalidArgument("timeout must be positive".into()));
        }
        for m in &self.mounts {
            m.validate()?;
        }
        self.network_policy.validate()?;
        Ok(())
    }
}

/// How long the agent gets to sync and power off before QEMU is ended.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long QEMU gets to quit over QMP before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(2);
/// Bound on control requests (exec, signal); data streams are not bounded.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the liveness thread looks at QEMU and the channel.
const LIVENESS_TICK: Duration = Duration::from_millis(50);

/// Time spent in each phase of starting an instance.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimings {
    /// Preparing kernel, initramfs, root image and writable disk.
    pub prepare: Duration,
    /// Spawning QEMU.
    pub spawn: Duration,
    /// From QEMU running to the agent's greeting (kernel boot).
    pub kernel: Duration,
    /// Root filesystem setup in the guest.
    pub setup: Duration,
}

#[derive(Debug)]
struct Live {
    vm: Arc<dyn Machine>,
    /// Ends the timeout watchdog early (by being dropped) when closing.
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    /// Ends the liveness thread (by being dropped) when closing.
    liveness: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) id: String,
    pub(crate) channel: Channel,
    pub(crate) default_user: Option<String>,
    /// The image's config, when booted from an image.
    pub(crate) image_config: Option<cc_image::ImageConfig>,
    /// What it booted from, for snapshots.
    pub(crate) origin: Origin,
    /// Whether it has a network interface.
    network: bool,
    /// [`Options::max_result_bytes`].
    pub(crate) max_result: u64,
    /// File handle ids, unique on the connection.
    pub(crate) next_handle: AtomicU64,
    /// Guest ports published on the host, stopped on close.
    exposed: Mutex<Vec<Arc<ExposeShared>>>,
    /// `None` once closed.
    live: Mutex<Option<Live>>,
    /// What it was started with, to park it.
    pub(crate) options: Options,
    /// Its root layers, uppermost first.
    pub(crate) lowers: Vec<PathBuf>,
    /// Being parked: the guest stops and QEMU ends on purpose.
    pub(crate) parking: AtomicBool,
    /// Held while pausing or resuming, so the two never interleave.
    pausing: Mutex<()>,
}

impl Inner {
    fn live(&self) -> MutexGuard<'_, Option<Live>> {
        lock(&self.live)
    }

    /// The running guest's machine; [`Error::AlreadyClosed`] once closed.
    pub(crate) fn machine(&self) -> Result<Arc<dyn Machine>> {
        match self.live().as_ref() {
            Some(live) => Ok(live.vm.clone()),
            None => Err(Error::AlreadyClosed),
        }
    }

    /// A booted guest's state, before it is supervised.
    pub(crate) fn new(
        id: String,
        channel: Channel,
        root: RootLayers,
        options: &Options,
    ) -> Arc<Inner> {
        Arc::new(Inner {
            id,
            channel,
            default_user: options
                .user
                .clone()
                .or_else(|| root.image_config.as_ref().and_then(|c| c.user.clone())),
            image_config: root.image_config,
            origin: root.origin,
            network: options.network,
            max_result: options.max_result_bytes,
            next_handle: AtomicU64::new(1),
            exposed: Mutex::default(),
            live: Mutex::new(None),
            options: options.clone(),
            lowers: root.lowers,
            parking: AtomicBool::new(false),
            pausing: Mutex::new(()),
        })
    }

    pub(crate) fn exposed(&self) -> MutexGuard<'_, Vec<Arc<ExposeShared>>> {
        self.exposed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails unless the instance is open and its guest alive.
    pub(crate) fn check_running(&self) -> Result<()> {
        let exited = match self.live().as_ref() {
            None => return Err(Error::AlreadyClosed),
            Some(live) => live.vm.exit_status(),
        };
        match (self.channel.dead(), exited) {
            (Some(gone), _) => Err(gone.error()),
            // QEMU's exit is known a moment before the channel's reader
            // sees the socket close: report it as soon as either knows.
            (None, Some(status)) => Err(Error::NotRunning(format!(
                "the guest stopped (QEMU {status})"
            ))),
            (None, None) => Ok(()),
        }
    }

    /// Marks the instance dead for `why`: every waiting call and every
    /// later one fails with [`Error::NotRunning`] saying why, and
    /// [`Instance::is_running`] is false. The one way the core learns of a
    /// death, whoever notices it: the liveness thread (QEMU exited, the
    /// guest stopped answering), the timeout watchdog, a command whose kill
    /// went unanswered, hypervisor events. The first reason sticks;
    /// closing then ends QEMU at once.
    pub(crate) fn mark_dead(&self, why: String) {
        tracing::info!(id = %self.id, %why, "instance is dead");
        self.channel.shut_down(Gone::Dead(why));
    }
}

/// A running virtual machine with its own root filesystem.
///
/// Dropping an instance closes it. Commands started from it hold it open
/// internally but fail with [`Error::AlreadyClosed`] once it is closed.
#[derive(Debug)]
pub struct Instance {
    inner: Arc<Inner>,
    kernel_release: String,
    timings: BootTimings,
    start_kind: StartKind,
}

impl Instance {
    /// Like [`new`](Self::new); `cancel` stops the boot with
    /// [`Error::Cancelled`] (while it waits for the guest's agent at once,
    /// otherwise at the next step), and nothing of the instance remains.
    pub fn new_cancellable(
        source: &Source,
        options: Options,
        cancel: &CancelToken,
    ) -> Result<Instance> {
        cancel::scope("boot", cancel, || Self::new(source, options))
    }

    /// Boots an instance and returns once its agent is ready for commands.
    pub fn new(source: &Source, options: Options) -> Result<Instance> {
        options.validate()?;
        let t0 = Instant::now();
        let root = tracing::debug_span!("cc: root image").in_scope(|| RootLayers::of(source))?;
        let (id, spec, layout) = plan_guest(&root, &options);
        let engine = options.engine.clone();
        let prepare = t0.elapsed();

        let t1 = Instant::now();
        let (started, channel, spawn) = tracing::debug_span!("cc: start guest")
            .in_scope(|| start_guest(engine.as_ref(), &spec, &layout, &options))?;
        let machine: Arc<dyn Machine> = Arc::from(started.machine);
        let kernel_time = t1.elapsed() - spawn;

        let t2 = Instant::now();
        let kernel_release = tracing::debug_span!("cc: guest setup")
            .in_scope(|| set_up_guest(&channel, machine.as_ref(), &id, &layout, &options))?;
        let timings = BootTimings {
            prepare,
            spawn,
            kernel: kernel_time,
            setup: t2.elapsed(),
        };
        let start_kind = started.kind;
        let inner = Inner::new(id, channel, root, &options);
        tracing::debug_span!("cc: supervise")
            .in_scope(|| supervise(&inner, machine, &options, t0))?;
        Ok(Instance::assemble(
            inner,
            kernel_release,
            timings,
            start_kind,
        ))
    }

    pub(crate) fn assemble(
        inner: Arc<Inner>,
        kernel_release: String,
        timings: BootTimings,
        start_kind: StartKind,
    ) -> Instance {
        Instance {
            inner,
            kernel_release,
            timings,
            start_kind,
        }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Whether the guest booted cold or was restored from a template.
    pub fn start_kind(&self) -> StartKind {
        self.start_kind
    }

    /// Unique id of this instance.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The guest kernel's release string.
    pub fn kernel_release(&self) -> &str {
        &self.kernel_release
    }

    /// How long each boot phase took.
    pub fn boot_timings(&self) -> BootTimings {
        self.timings
    }

    /// Whether the instance is open and its guest alive (paused or not).
    pub fn is_running(&self) -> bool {
        self.inner.check_running().is_ok()
    }

    /// Stops the guest's CPUs in place: its processes, clocks and timers
    /// stand still and it uses no host CPU, while its memory, files and
    /// connections stay. Until [`resume`](Self::resume), every new request
    /// (commands, file operations, signals, `listen`, `dial`, snapshots)
    /// fails at once with [`Error::Paused`]; calls that only wait for the
    /// guest (`Child::wait`, reading a command's output, `accept`,
    /// [`wait`](Self::wait)) keep waiting. Paused time counts towards no
    /// time limit ([`Options::timeout`], [`Command::timeout`], request
    /// bounds). Pausing a paused instance does nothing; a closed one fails
    /// with [`Error::AlreadyClosed`], a dead one with
    /// [`Error::NotRunning`]. Closing a paused instance is prompt.
    pub fn pause(&self) -> Result<()> {
        let _serial = lock(&self.inner.pausing);
        let vm = self.inner.machine()?;
        self.inner.check_running()?;
        let clock = self.inner.channel.pause_clock();
        if !clock.pause_at(Instant::now()) {
            return Ok(());
        }
        if let Err(e) = vm.pause() {
            clock.resume_at(Instant::now());
            return Err(e.into());
        }
        tracing::debug!(id = %self.inner.id, "paused");
        Ok(())
    }

    /// Lets a paused guest run on where it stopped, and sets its clock
    /// from the host's (it stood still while paused). Resuming a running
    /// instance does nothing; a closed one fails with
    /// [`Error::AlreadyClosed`], a dead one with [`Error::NotRunning`].
    pub fn resume(&self) -> Result<()> {
        let _serial = lock(&self.inner.pausing);
        let vm = self.inner.machine()?;
        self.inner.check_running()?;
        let channel = &self.inner.channel;
        if !channel.pause_clock().is_paused() {
            return Ok(());
        }
        vm.resume()?;
        channel.reset_liveness();
        channel.pause_clock().resume_at(Instant::now());
        tracing::debug!(id = %self.inner.id, "resumed");
        match channel.request(Request::SyncClock(now()), REQUEST_TIMEOUT)? {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::Guest {
                op: "set the clock".into(),
                message: e.message,
            }),
        }
    }

    /// Whether the instance is paused ([`pause`](Self::pause)); `false`
    /// once closed.
    pub fn is_paused(&self) -> bool {
        self.inner.live().is_some() && self.inner.channel.pause_clock().is_paused()
    }

    /// A command to run `program` in the guest.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        Command::new(self.inner.clone(), program)
    }

    /// Gives the running guest a second root filesystem, as a pod's
    /// container needs one: a read-only erofs image of host tree `tree`
    /// (built and cached as for [`Source::Dir`]) is written into guest
    /// directory `guest_dir` and mounted there through a loop device, with
    /// a writable layer in guest memory and its own `/proc`, `/dev` and
    /// `/tmp`. Returns the root's guest path, for [`Command::root`], and
    /// the image's size in bytes (what crossed the channel).
    /// [`unmount_root`](Self::unmount_root) removes it.
    pub fn mount_root(&self, tree: &Path, guest_dir: &str) -> Result<(String, u64)> {
        let image = rootfs::image_for_dir(tree, &cc_engine::paths::cache_dir())?;
        let mut file = std::fs::File::open(&image).map_err(Error::io("open", &image))?;
        let dir = guest_dir.trim_end_matches('/');
        self.mkdir_all(dir, 0o700)?;
        let mounted = self
            .write_file_from(&format!("{dir}/root.erofs"), &mut file, 0o400)
            .and_then(|bytes| {
                let request = Request::MountRoot {
                    dir: ByteBuf::from(dir.as_bytes()),
                };
                self.root_request("mount a container root", request)?;
                Ok(bytes)
            });
        match mounted {
            Ok(bytes) => Ok((format!("{dir}/root"), bytes)),
            Err(e) => {
                let _ = self.unmount_root(dir);
                Err(e)
            }
        }
    }

    /// Unmounts a root [`mount_root`](Self::mount_root) made in
    /// `guest_dir` and removes the directory with its image and writes.
    /// Processes still running in it keep their view until they end.
    pub fn unmount_root(&self, guest_dir: &str) -> Result<()> {
        let request = Request::UnmountRoot {
            dir: ByteBuf::from(guest_dir.trim_end_matches('/').as_bytes()),
        };
        self.root_request("unmount a container root", request)
    }

    fn root_request(&self, op: &str, request: Request) -> Result<()> {
        self.inner.check_running()?;
        match self.inner.channel.request(request, REQUEST_TIMEOUT)? {
            Ok(Response::Done) => Ok(()),
            Ok(other) => Err(Error::Protocol(format!(
                "unexpected answer to {op}: {other:?}"
            ))),
            Err(e) => Err(Error::Guest {
                op: op.into(),
                message: e.message,
            }),
        }
    }

    /// A [`Cmd`]: a command as one stateful object, as the C and Python
    /// faces use it.
    pub fn cmd(&self, program: &str, args: &[&str]) -> Cmd {
        let mut command = self.command(program);
        command.args(args);
        Cmd::new(command)
    }

    /// A command running the image's entrypoint: `Entrypoint + args`, or
    /// `Entrypoint + Cmd` without args.
    pub fn entrypoint_command<S: AsRef<str>>(&self, args: &[S]) -> Result<Command> {
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
        let argv = self
            .inner
            .image_config
            .as_ref()
            .map(|c| c.entrypoint_argv(&args))
            .unwrap_or(args);
        let Some((program, rest)) = argv.split_first() else {
            return Err(Error::InvalidArgument(
                "the image has no entrypoint or cmd, and no command was given".into(),
            ));
        };
        let mut cmd = self.command(program);
        cmd.args(rest);
        Ok(cmd)
    }

    /// The config of the image this instance booted from.
    pub fn image_config(&self) -> Option<&cc_image::ImageConfig> {
        self.inner.image_config.as_ref()
    }

    /// Measures one round trip to the agent.
    pub fn ping(&self) -> Result<Duration> {
        self.inner.check_running()?;
        let t = Instant::now();
        match self.inner.channel.request(Request::Ping, REQUEST_TIMEOUT)? {
            Ok(_) => Ok(t.elapsed()),
            Err(e) => Err(Error::Guest {
                op: "ping".into(),
                message: e.message,
            }),
        }
    }

    /// Starts (`on`) or stops recording how long each phase of the guest
    /// agent's work takes, and returns what it recorded since the last
    /// call, oldest first: `(phase, duration)`. For profiling, as
    /// `crumble bench exec --phases` does; the agent keeps at most 65,536
    /// spans between two calls.
    pub fn agent_trace(&self, on: bool) -> Result<Vec<(String, Duration)>> {
        self.inner.check_running()?;
        match self
            .inner
            .channel
            .request(Request::Trace { on }, REQUEST_TIMEOUT)?
        {
            Ok(Response::Trace(spans)) => Ok(spans
                .into_iter()
                .map(|s| (s.name, Duration::from_nanos(s.nanos)))
                .collect()),
            Ok(other) => Err(Error::Protocol(format!(
                "unexpected answer to trace: {other:?}"
            ))),
            Err(e) => Err(Error::Guest {
                op: "trace".into(),
                message: e.message,
            }),
        }
    }

    /// Waits until the guest ends (it powered off, crashed, timed out or
    /// stopped answering). `cancel` stops the wait with
    /// [`Error::Cancelled`]; closing the instance from another thread ends
    /// it with [`Error::AlreadyClosed`].
    pub fn wait(&self, cancel: Option<&CancelToken>) -> Result<()> {
        cancel::maybe("wait", cancel, || {
            if self.inner.live().is_none() {
                return Err(Error::AlreadyClosed);
            }
            // The channel goes down when QEMU exits (the liveness thread
            // and the socket's end both tell), the guest dies or the
            // instance is closed: one event to block on.
            match self.inner.channel.wait_down() {
                Some(Gone::Dead(_)) => Ok(()),
                Some(Gone::Closed) => Err(Error::AlreadyClosed),
                None => Err(cancel::cancelled("wait")),
            }
        })
    }

    /// Connects or disconnects the guest from the network at run time; while
    /// disconnected no packet leaves it. Instances restored from a park or
    /// branched from this one start in the same state. Fails for an
    /// instance created with `network: false`.
    pub fn set_network_enabled(&self, enabled: bool) -> Result<()> {
        self.inner.check_running()?;
        if !self.inner.network {
            return Err(Error::InvalidArgument(
                "the instance was created without a network".into(),
            ));
        }
        let vm = match self.inner.live().as_ref() {
            Some(live) => live.vm.clone(),
            None => return Err(Error::AlreadyClosed),
        };
        Ok(vm.set_network_enabled(enabled)?)
    }

    /// The confinement QEMU runs under (the gaps name what this host
    /// could not give), while the instance is open.
    pub fn confinement(&self) -> Option<Confinement> {
        self.inner.live().as_ref().map(|l| l.vm.confinement())
    }

    /// Host pid of the VM process, while it runs.
    pub fn vm_pid(&self) -> Option<u32> {
        self.inner.live().as_ref().and_then(|l| l.vm.pid())
    }

    /// The per-instance runtime directory, while open.
    pub fn run_dir(&self) -> Option<PathBuf> {
        self.inner
            .live()
            .as_ref()
            .and_then(|l| l.vm.run_dir().map(Path::to_path_buf))
    }

    /// Ends the instance: every call waiting on it fails with
    /// [`Error::AlreadyClosed`] at once, and QEMU ends. With a writable
    /// mount, the agent first syncs and powers off the guest, so that what
    /// it wrote there reaches the host (QEMU is killed if it does not exit
    /// in time, at once if the guest was already dead or stops answering);
    /// without one, QEMU is killed at once, as nothing the guest wrote
    /// outlives it. Nothing of the instance remains afterwards. Closing
    /// again does nothing.
    pub fn close(&self) -> Result<()> {
        let Some(mut live) = self.inner.live().take() else {
            return Ok(());
        };
        for (stop, thread) in [live.watchdog.take(), live.liveness.take()]
            .into_iter()
            .flatten()
        {
            drop(stop);
            let _ = thread.join();
        }
        let exposed = std::mem::take(&mut *self.inner.exposed());
        for e in exposed {
            e.stop();
        }
        // A paused guest runs again to shut down as usual (syncing what its
        // page cache holds for writable mounts); one that cannot is killed.
        let clock = self.inner.channel.pause_clock();
        if clock.is_paused() {
            if let Err(e) = live.vm.resume() {
                tracing::debug!(id = %self.inner.id, error = %e, "resume to close failed");
                live.vm.kill();
            }
            self.inner.channel.reset_liveness();
            clock.resume_at(Instant::now());
        }
        let alive = live.vm.exit_status().is_none() && self.inner.channel.dead().is_none();
        // Only a writable mount keeps anything of the guest's (in its page
        // cache until synced); without one, all it wrote goes with it, and
        // there is nothing to wait for.
        let keeps = self.inner.options.mounts.iter().any(|m| m.writable);
        if alive && !keeps {
            self.inner.channel.shut_down(Gone::Closed);
            kill_now(live.vm.as_ref());
        } else if alive && self.inner.channel.close_gracefully(SHUTDOWN_GRACE) {
            if live.vm.wait_timeout(SHUTDOWN_GRACE).is_none() {
                tracing::warn!(id = %self.inner.id, "guest did not power off; ending QEMU");
                live.vm.terminate(QUIT_GRACE);
            }
        } else {
            // Dead or deaf: nothing to wait for.
            kill_now(live.vm.as_ref());
        }
        self.inner.channel.shut_down(Gone::Closed);
        drop(live);
        Ok(())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// What an instance boots from: its root layers and what the core keeps
/// of the source.
pub(crate) struct RootLayers {
    /// Read-only root filesystem images, uppermost first.
    pub(crate) lowers: Vec<PathBuf>,
    pub(crate) image_config: Option<cc_image::ImageConfig>,
    pub(crate) origin: Origin,
}

impl RootLayers {
    /// Builds or finds the root images of `source`.
    fn of(source: &Source) -> Result<RootLayers> {
        Ok(match source {
            Source::Dir(dir) => {
                let image = rootfs::image_for_dir(dir, &cc_engine::paths::cache_dir())?;
                RootLayers {
                    lowers: vec![image.clone()],
                    image_config: None,
                    origin: Origin::Dir {
                        dir: dir.clone(),
                        image,
                    },
                }
            }
            Source::Image(image) => RootLayers {
                lowers: vec![image.rootfs()?],
                image_config: Some(image.config()),
                origin: Origin::Image(image.clone()),
            },
            Source::Snapshot(s) => RootLayers {
                lowers: s.lowers()?,
                image_config: Some(s.image().config()),
                origin: Origin::Snapshot(s.clone()),
            },
        })
    }
}

/// A new guest's id, its spec and where its engine puts what it asks for.
pub(crate) fn plan_guest(root: &RootLayers, options: &Options) -> (String, GuestSpec, GuestLayout) {
    let id = random_id();
    let spec = guest_spec(&id, root, options);
    let layout = options.engine.layout(&spec);
    (id, spec, layout)
}

/// The engine-neutral description of the guest `options` ask for.
pub(crate) fn guest_spec(id: &str, root: &RootLayers, options: &Options) -> GuestSpec {
    GuestSpec {
        id: id.to_string(),
        lowers: root.lowers.clone(),
        upper_mb: options.disk_mb,
        shares: options
            .mounts
            .iter()
            .map(|m| ShareSpec {
                path: m.host_path.clone(),
                read_only: !m.writable,
            })
            .collect(),
        network: options.network.then(|| options.network_policy.clone()),
        memory_mb: options.memory_mb,
        cpus: options.cpus,
        warm_start: options.warm_start,
        agent_port: cc_protocol::AGENT_PORT_NAME.into(),
        confine: options.confinement,
        console_log_max: options.console_log_max,
    }
}

/// How the guest's agent assembles the root from the engine's layout.
fn root_spec(layout: &GuestLayout) -> RootSpec {
    RootSpec {
        lowers: layout
            .lower_serials
            .iter()
            .map(|serial| Lower {
                serial: serial.clone(),
                fstype: rootfs::LOWER_FSTYPE.into(),
            })
            .collect(),
        upper_serial: layout.upper_serial.clone(),
    }
}

/// Starts the guest and connects to its agent (a fresh guest greets; a
/// restored one is resumed). Returns how long the engine took to start it.
fn start_guest(
    engine: &dyn Engine,
    spec: &GuestSpec,
    layout: &GuestLayout,
    options: &Options,
) -> Result<(Started, Channel, Duration)> {
    let t = Instant::now();
    // Before a template is saved, its guest mounts the image's root and
    // configures what every instance shares (not identity, clock and the
    // rest, which are per instance).
    let prepare = Prepare {
        root: root_spec(layout),
        nameservers: nameservers(layout),
        network: net_config(layout, options),
    };
    let timeout = options.boot_timeout;
    let mut prepare_template = |socket| {
        prepare_guest(socket, &prepare, timeout).map(|c| Box::new(c) as Box<dyn std::any::Any>)
    };
    let mut resumed = None;
    let mut resume = |socket| {
        resumed = Some(Channel::resume(socket, timeout).map_err(|e| e.to_string())?);
        Ok(())
    };
    let hooks = Hooks {
        prepare: &mut prepare_template,
        resume: &mut resume,
    };
    let mut started = engine.start(spec, hooks)?;
    let spawn = t.elapsed();
    let channel = match std::mem::replace(&mut started.agent, AgentLink::Resumed) {
        AgentLink::Resumed => resumed.ok_or_else(|| {
            Error::Protocol("the engine resumed a guest without resuming its channel".into())
        })?,
        AgentLink::Greeting(socket) => {
            match tracing::debug_span!("cc: kernel boot → agent greeting")
                .in_scope(|| Channel::connect(socket, options.boot_timeout))
            {
                Ok((channel, agent)) => {
                    tracing::debug!(id = %spec.id, %agent, "guest agent connected");
                    channel
                }
                Err(e @ Error::ProtocolMismatch { .. }) => return Err(e),
                Err(e) => return Err(boot_failed(started.machine.as_ref(), e.to_string())),
            }
        }
    };
    Ok((started, channel, spawn))
}

/// A boot failure for `reason`, with what the engine and the guest's
/// console said.
fn boot_failed(machine: &dyn Machine, reason: String) -> Error {
    // Let the engine finish writing why it died before quoting its logs.
    let reason = match machine.wait_timeout(Duration::from_millis(200)) {
        Some(status) => format!("the VM exited ({status}): {reason}"),
        None => reason,
    };
    Error::Boot {
        reason,
        diagnostics: machine.diagnostics(),
    }
}

/// Gives the guest its identity, clock, entropy, mounts and network, and
/// returns its kernel's release.
pub(crate) fn set_up_guest(
    channel: &Channel,
    machine: &dyn Machine,
    id: &str,
    layout: &GuestLayout,
    options: &Options,
) -> Result<String> {
    let setup = Setup {
        hostname: format!("cc-{}", &id[..8]),
        root: Some(root_spec(layout)),
        clock: now(),
        entropy: ByteBuf::from(random_bytes(64)),
        nameservers: nameservers(layout),
        hosts: vec![(HOST_INTERNAL_ADDR.into(), HOST_INTERNAL_NAME.into())],
        mounts: options
            .mounts
            .iter()
            .zip(&layout.share_tags)
            .map(|(m, tag)| cc_protocol::Mount {
                tag: tag.clone(),
                guest_path: m.guest_path.clone(),
                read_only: !m.writable,
            })
            .collect(),
        network: net_config(layout, options),
    };
    match channel.request(Request::Setup(Box::new(setup)), options.boot_timeout) {
        Ok(Ok(Response::Ready { kernel })) => Ok(kernel),
        Ok(Ok(other)) => Err(boot_failed(
            machine,
            format!("unexpected answer to setup: {other:?}"),
        )),
        Ok(Err(e)) => Err(boot_failed(machine, format!("guest setup failed: {e}"))),
        Err(e) => Err(boot_failed(machine, e.to_string())),
    }
}

fn nameservers(layout: &GuestLayout) -> Vec<String> {
    vec![layout.network.dns.to_string()]
}

/// The guest's network interface, when it has one.
fn net_config(layout: &GuestLayout, options: &Options) -> Option<NetConfig> {
    let net = layout.network;
    options.network.then(|| NetConfig {
        interface: "eth0".into(),
        address: net.address.to_string(),
        prefix_len: net.prefix_len,
        gateway: net.gateway.to_string(),
        mtu: net.mtu,
    })
}

/// Starts what watches a booted instance (liveness, engine events, the
/// timeout counted from `t0`) and makes it live.
pub(crate) fn supervise(
    inner: &Arc<Inner>,
    machine: Arc<dyn Machine>,
    options: &Options,
    t0: Instant,
) -> Result<()> {
    let liveness = Some(start_liveness(inner, &machine)?);
    let weak = Arc::downgrade(inner);
    machine.on_death(Arc::new(move |why| {
        if let Some(inner) = weak.upgrade() {
            inner.mark_dead(why);
        }
    }));
    let watchdog = match options.timeout {
        Some(limit) => Some(start_watchdog(
            inner,
            &machine,
            (t0 + limit).saturating_duration_since(Instant::now()),
            limit,
        )?),
        None => None,
    };
    *inner.live() = Some(Live {
        vm: machine,
        watchdog,
        liveness,
    });
    Ok(())
}

/// A template's last step: the agent does `prepare` and runs `true` once.
/// Returns the channel, quiet, to be kept open until the guest is saved
/// (so that the restored guest finds it connected and goes on reading).
fn prepare_guest(
    socket: std::os::unix::net::UnixStream,
    prepare: &Prepare,
    timeout: Duration,
) -> std::result::Result<Channel, String> {
    let (channel, _) = Channel::connect(socket, timeout).map_err(|e| e.to_string())?;
    match channel.request(Request::Prepare(Box::new(prepare.clone())), timeout) {
        Ok(Ok(Response::Done)) => {}
        Ok(Ok(other)) => return Err(format!("unexpected answer to prepare: {other:?}")),
        Ok(Err(e)) => return Err(format!("the guest could not mount its root: {e}")),
        Err(e) => return Err(e.to_string()),
    }
    // One command run before the save leaves the guest's page cache and
    // the agent's allocations as the first user command wants them, which
    // makes that command a third faster after a restore. Images without a
    // `true` simply skip it.
    let process = channel.new_process_id();
    let exit = channel.watch_exit(process);
    let warm = cc_protocol::Exec {
        process,
        argv: vec![ByteBuf::from(&b"true"[..])],
        env: Vec::new(),
        cwd: None,
        user: None,
        stdin: None,
        stdout: cc_protocol::Stdio::Null,
        stderr: cc_protocol::Stdio::Null,
        pty: None,
        root: None,
        rlimits: Vec::new(),
    };
    if let Ok(Ok(Response::Started { .. })) = channel.request(Request::Exec(warm), timeout) {
        // Its exit is the last frame the agent sends.
        let _ = exit.wait(Some(Instant::now() + timeout));
    }
    Ok(channel)
}

/// Ends the instance when its time is up (paused time not counted),
/// unless closed first (which drops the sender and wakes the watchdog).
fn start_watchdog(
    inner: &Arc<Inner>,
    vm: &Arc<dyn Machine>,
    left: Duration,
    limit: Duration,
) -> Result<(mpsc::Sender<()>, JoinHandle<()>)> {
    let (stop, stopped) = mpsc::channel::<()>();
    let deadline = inner.channel.pause_clock().deadline_in(left);
    let (inner, vm) = (Arc::downgrade(inner), vm.clone());
    let thread = std::thread::Builder::new()
        .name("cc-timeout".into())
        .spawn(move || {
            loop {
                let Some(inner) = inner.upgrade() else { return };
                let clock = inner.channel.pause_clock();
                if deadline.passed(clock) {
                    break;
                }
                // While paused, the deadline moves: look again after this.
                let left = deadline
                    .now(clock)
                    .saturating_duration_since(Instant::now());
                drop(inner);
                if stopped.recv_timeout(left.max(LIVENESS_TICK))
                    != Err(mpsc::RecvTimeoutError::Timeout)
                {
                    return;
                }
            }
            if let Some(inner) = inner.upgrade() {
                inner.mark_dead(format!(
                    "the instance timed out after {} s",
                    limit.as_secs_f64()
                ));
            }
            vm.terminate(QUIT_GRACE);
        })
        .map_err(Error::io("spawn", "timeout watchdog"))?;
    Ok((stop, thread))
}

/// Watches for the guest's death until closed (which drops the sender):
/// QEMU exiting, and a guest that stops answering the channel's pings.
fn start_liveness(
    inner: &Arc<Inner>,
    vm: &Arc<dyn Machine>,
) -> Result<(mpsc::Sender<()>, JoinHandle<()>)> {
    let (stop, stopped) = mpsc::channel::<()>();
    let (inner, vm) = (Arc::downgrade(inner), vm.clone());
    let thread = std::thread::Builder::new()
        .name("cc-liveness".into())
        .spawn(move || {
            while stopped.recv_timeout(LIVENESS_TICK) == Err(mpsc::RecvTimeoutError::Timeout) {
                let Some(inner) = inner.upgrade() else { return };
                if inner.channel.dead().is_some() {
                    return;
                }
                if inner.parking.load(Ordering::Acquire) {
                    continue;
                }
                if let Some(status) = vm.exit_status() {
                    return inner.mark_dead(format!("QEMU exited ({status})"));
                }
                // A paused guest is not asked (check_alive skips it).
                if let Err(why) = inner.channel.check_alive() {
                    return inner.mark_dead(why);
                }
            }
        })
        .map_err(Error::io("spawn", "liveness thread"))?;
    Ok((stop, thread))
}

/// Kills the VM and waits until it is gone.
fn kill_now(vm: &dyn Machine) {
    vm.kill();
    while vm.wait_timeout(Duration::from_secs(1)).is_none() {
        vm.kill();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> UnixTime {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    UnixTime {
        secs: d.as_secs() as i64,
        nanos: d.subsec_nanos(),
    }
}

pub(crate) fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: the pointer and length describe the unfilled tail of buf.
        let r = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if r > 0 {
            filled += r as usize;
        }
    }
    buf
}

fn random_id() -> String {
    rootfs::hex(&random_bytes(8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    /// Options are checked before anything is prepared, so no VM is needed.
    fn new_fails(options: Options) -> Error {
        let source = Source::Dir("/nonexistent/rootfs".into());
        Instance::new(&source, options).unwrap_err()
    }

    #[test]
    fn a_bad_network_rule_is_invalid_argument_naming_it() {
        let bad = [
            cc_netpolicy::Rule {
                addr: "10.0.0.1".parse().unwrap(),
                prefix: 8,
                ports: None,
            },
            cc_netpolicy::Rule {
                addr: "10.0.0.0".parse().unwrap(),
                prefix: 33,
                ports: None,
            },
            cc_netpolicy::Rule {
                addr: "1.2.3.4".parse().unwrap(),
                prefix: 32,
                ports: Some((0, 80)),
            },
        ];
        for rule in bad {
            for deny in [false, true] {
                let mut policy = NetworkPolicy::default();
                if deny {
                    policy.deny.push(rule);
                } else {
                    policy.allow.push(rule);
                }
                let err = new_fails(Options {
                    network_policy: policy,
                    ..Options::default()
                });
                assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
                assert!(err.to_string().contains(&rule.to_string()), "{err}");
            }
        }
    }

    #[test]
    fn parse_errors_convert_to_invalid_argument() {
        let err: Error = "10.0.0.0/8:70000"
            .parse::<cc_netpolicy::Rule>()
            .unwrap_err()
            .into();
        assert_eq!(err.code(), ErrorCode::InvalidArgument);
        assert!(err.to_string().contains("\"10.0.0.0/8:70000\""), "{err}");
        let err: Error = NetworkPolicy::from_pairs([("allow_hosts", "true")])
            .unwrap_err()
            .into();
        assert_eq!(err.code(), ErrorCode::InvalidArgument);
        assert!(err.to_string().contains("\"allow_hosts\""), "{err}");
    }

    #[test]
    fn a_good_policy_gets_past_validation() {
        let policy =
            NetworkPolicy::from_pairs([("allow", "10.0.0.0/8:80"), ("deny", "*:25")]).unwrap();
        let err = new_fails(Options {
            network_policy: policy,
            ..Options::default()
        });
        assert_ne!(err.code(), ErrorCode::InvalidArgument, "{err}");
    }
}
