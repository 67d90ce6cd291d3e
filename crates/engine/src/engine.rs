//! The boundary between the core and a VM engine: an engine-neutral
//! description of a guest ([`GuestSpec`]), the [`Engine`] that starts one,
//! and the [`Machine`] handle it returns with the agent's channel. QEMU
//! ([`Qemu`]) is one engine; the core's tests run another that serves the
//! agent in-process.
//!
//! The core decides what the guest holds (root layers, shares, network
//! policy, resources); the engine decides how it gets there (disk serials,
//! share tags, addresses, kernel, accelerator, templates) and says so in
//! the [`GuestLayout`] the core passes on to the agent.

use std::fmt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cc_netpolicy::NetworkPolicy;

use crate::migstream::SplitError;
use crate::template::{self, StartKind};
use crate::{
    detect_accel, initramfs, park, paths, upper, ConfineMode, Confinement, Disk, Error,
    GuestNetwork, MemoryFile, RunDir, Share, Vm, VmSpec, GUEST_NETWORK,
};

/// A guest, as the core describes it.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Names the guest's runtime directory.
    pub id: String,
    /// Read-only root layers (filesystem images), uppermost first.
    pub lowers: Vec<PathBuf>,
    /// Size of the writable layer the engine creates, in MiB.
    pub upper_mb: u32,
    /// Host directories the guest mounts, in order.
    pub shares: Vec<ShareSpec>,
    /// A network interface limited by this policy; `None` for none.
    pub network: Option<NetworkPolicy>,
    pub memory_mb: u32,
    pub cpus: u32,
    /// Start from a saved, booted guest when one fits (building it first
    /// when none does), through [`Hooks`].
    pub warm_start: bool,
    /// The name of the channel the guest's agent opens.
    pub agent_port: String,
    pub confine: ConfineMode,
    /// The console log keeps at most about this many of its newest bytes.
    pub console_log_max: u64,
}

/// A host directory shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

/// How the guest finds what [`GuestSpec`] asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLayout {
    /// The block device serial of each lower, in [`GuestSpec::lowers`] order.
    pub lower_serials: Vec<String>,
    /// The writable layer's serial (an empty ext4 filesystem).
    pub upper_serial: String,
    /// The mount tag of each share, in [`GuestSpec::shares`] order.
    pub share_tags: Vec<String>,
    /// The guest's network addresses, when it has an interface.
    pub network: GuestNetwork,
}

/// What the caller does with the agent channel around warm starts; the
/// engine never speaks the agent protocol itself.
pub struct Hooks<'a> {
    /// Before a saved guest is made, given the channel of the freshly
    /// booted guest (its agent greets first): prepares what depends on the
    /// image alone and leaves the channel quiet, returning what must stay
    /// open until the save is done (the channel with it).
    #[allow(clippy::type_complexity)]
    pub prepare: &'a mut dyn FnMut(UnixStream) -> Result<Box<dyn std::any::Any>, String>,
    /// After a restore, given the new channel to a guest that does not
    /// greet (it goes on reading its connection): re-establishes the
    /// conversation, tolerating lost bytes, and keeps what it made. Its
    /// failure marks the saved guest broken.
    pub resume: &'a mut dyn FnMut(UnixStream) -> Result<(), String>,
}

impl fmt::Debug for Hooks<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hooks")
    }
}

/// The agent channel of a started guest.
#[derive(Debug)]
pub enum AgentLink {
    /// A freshly booted guest: its agent greets first on this socket.
    Greeting(UnixStream),
    /// A restored guest, its conversation resumed by [`Hooks::resume`].
    Resumed,
}

/// A started guest.
#[derive(Debug)]
pub struct Started {
    pub machine: Box<dyn Machine>,
    pub agent: AgentLink,
    pub kind: StartKind,
}

/// Starts guests.
pub trait Engine: fmt::Debug + Send + Sync {
    /// How the guest will find the parts of `spec`; the same for every
    /// start of the same spec, and known before it.
    fn layout(&self, spec: &GuestSpec) -> GuestLayout;

    /// Starts `spec` and returns as soon as the guest runs; its agent
    /// connects in the background.
    fn start(&self, spec: &GuestSpec, hooks: Hooks<'_>) -> Result<Started, Error>;

    /// Starts the guest [`Machine::park`] saved in `dir` again, as `spec`
    /// (the spec it was started with, under a new id), and resumes its
    /// agent channel with `resume`. The directory is only read, so it can
    /// be restored any number of times. A directory made by another
    /// kernel, agent or QEMU, or for another guest shape, is
    /// [`Error::Parked`] and nothing is started.
    fn restore(
        &self,
        spec: &GuestSpec,
        dir: &Path,
        resume: &mut dyn FnMut(UnixStream) -> Result<(), String>,
    ) -> Result<Started, Error> {
        let _ = (spec, dir, resume);
        Err(Error::Unsupported("restore a parked guest"))
    }
}

/// Why a guest ended, as its engine saw it, for [`Machine::on_death`].
pub type DeathHandler = Arc<dyn Fn(String) + Send + Sync>;

/// A running (or ended) guest. Dropping it ends the guest at once and
/// removes everything the engine made for it.
pub trait Machine: fmt::Debug + Send + Sync {
    /// The guest's exit, once it has ended.
    fn exit_status(&self) -> Option<ExitStatus>;
    /// Waits up to `timeout` for the guest to end.
    fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus>;
    /// Ends the guest at once; safe after it ended.
    fn kill(&self);
    /// Asks the engine to end the guest, killing it after `grace`;
    /// returns once it has ended.
    fn terminate(&self, grace: Duration) -> ExitStatus;
    /// Connects or disconnects the network interface.
    fn set_network_enabled(&self, enabled: bool) -> Result<(), Error>;
    /// Calls `handler` with the reason whenever the engine sees the guest
    /// die on its own (shut down, reset, panicked, halted by the engine),
    /// before its channel tells. Runs on an engine thread; must be quick.
    fn on_death(&self, handler: DeathHandler);
    /// How the engine's process is confined.
    fn confinement(&self) -> Confinement;
    /// The host pid of the process running the guest, if there is one.
    fn pid(&self) -> Option<u32>;
    /// The guest's runtime directory on the host, if it has one.
    fn run_dir(&self) -> Option<&Path>;
    /// The engine's and the guest console's last words, for errors.
    fn diagnostics(&self) -> String;
    /// Saves the running guest (memory, devices, writable disk; memory
    /// against its template's when it has one) into the empty directory
    /// `dir` and ends it, without a death report. The
    /// agent channel must be quiet (nothing in flight either way). On
    /// failure the guest runs on.
    fn park(&self, dir: &Path) -> Result<(), Error> {
        let _ = dir;
        Err(Error::Unsupported("park a guest"))
    }
    /// Saves the running guest into `dir` as [`park`](Self::park) does,
    /// then lets it run on: `dir` restores copies of it, which may share
    /// the saved memory copy-on-write.
    fn save_copy(&self, dir: &Path) -> Result<(), Error> {
        let _ = dir;
        Err(Error::Unsupported("save a copy of a running guest"))
    }
    /// Stops the guest's CPUs in place: its clocks and timers stand still
    /// and it uses no CPU, while the process, memory and channel stay.
    /// Not a death: [`Machine::on_death`] stays silent about it, but still
    /// sees the guest's process end while paused. Idempotent.
    fn pause(&self) -> Result<(), Error> {
        Err(Error::Unsupported("pause a guest"))
    }
    /// Lets a paused guest run again; returns once it runs. Idempotent.
    fn resume(&self) -> Result<(), Error> {
        Err(Error::Unsupported("resume a guest"))
    }
}

/// The QEMU engine: one confined QEMU process per guest (see the crate
/// docs), with warm starts from templates in the cache directory.
#[derive(Debug, Clone)]
pub struct Qemu {
    cache: PathBuf,
    /// Saves for branches and parks are split by the engine, not loaded
    /// by a capture QEMU (see [`Qemu::capturing_saves_in_qemu`]).
    split_saves: bool,
}

impl Qemu {
    /// The engine, keeping its templates, writable disks and runtime
    /// directories under the cache directory.
    pub fn new() -> Qemu {
        Qemu {
            cache: paths::cache_dir(),
            split_saves: true,
        }
    }

    /// The engine, but a branch or a park of a warm-started guest has a
    /// capture QEMU load the saved guest into its RAM file, as it does for
    /// a stream the engine cannot split: slower, for comparison.
    pub fn capturing_saves_in_qemu(self) -> Qemu {
        Qemu {
            split_saves: false,
            ..self
        }
    }
}

impl Default for Qemu {
    fn default() -> Qemu {
        Qemu::new()
    }
}

/// Disk serials and share tags, fixed by position.
fn lower_serial(i: usize) -> String {
    format!("cc-lower{i}")
}
const UPPER_SERIAL: &str = "cc-upper";
fn share_tag(i: usize) -> String {
    format!("ccm{i}")
}

impl Engine for Qemu {
    fn layout(&self, spec: &GuestSpec) -> GuestLayout {
        GuestLayout {
            lower_serials: (0..spec.lowers.len()).map(lower_serial).collect(),
            upper_serial: UPPER_SERIAL.into(),
            share_tags: (0..spec.shares.len()).map(share_tag).collect(),
            network: GUEST_NETWORK,
        }
    }

    fn start(&self, spec: &GuestSpec, hooks: Hooks<'_>) -> Result<Started, Error> {
        let span = tracing::debug_span!("engine: kernel, agent, initramfs").entered();
        let host = self.host_parts()?;
        drop(span);
        let span = tracing::debug_span!("engine: run dir, writable disk").entered();
        let run_dir = RunDir::create(&self.cache, &spec.id)?;
        let upper_disk = run_dir.path().join("upper.img");
        upper::create(&self.cache, &upper_disk, spec.upper_mb)?;
        drop(span);
        let vm_spec = self.vm_spec(spec, host, upper_disk);
        let (vm, agent, kind, template) =
            template::start(&vm_spec, &run_dir, &self.cache, spec.warm_start, hooks)?;
        tracing::debug!(id = %spec.id, accel = %vm_spec.accel, ?kind, "QEMU started");
        Ok(Started {
            machine: Box::new(QemuMachine::new(vm, run_dir, vm_spec, kind, self, template)),
            agent,
            kind,
        })
    }

    fn restore(
        &self,
        spec: &GuestSpec,
        dir: &Path,
        resume: &mut dyn FnMut(UnixStream) -> Result<(), String>,
    ) -> Result<Started, Error> {
        let meta = park::read_meta(dir)?;
        let host = self.host_parts()?;
        let run_dir = RunDir::create(&self.cache, &spec.id)?;
        let upper_disk = run_dir.path().join("upper.img");
        let mut vm_spec = self.vm_spec(spec, host, upper_disk.clone());
        park::check(&meta, &vm_spec)?;
        let backing = tracing::debug_span!("engine: writable disk from the park")
            .in_scope(|| upper::from_park(&self.cache, &park::disk(dir), &upper_disk))?;
        if let Some(d) = vm_spec.disks.iter_mut().find(|d| !d.read_only) {
            d.backing = backing;
        }
        vm_spec.named_ram = meta.named_ram;
        if let Some(t) = &meta.template {
            // The template's pages with the park's own over them, in a
            // file of this guest's.
            let ram = run_dir.path().join("ram");
            tracing::debug_span!("engine: RAM from the template and the park")
                .in_scope(|| park::rebuild_ram(t, dir, &ram))?;
            vm_spec.memory_file = Some(MemoryFile {
                path: ram,
                shared: false,
                anonymous_name: !meta.named_ram,
            });
        } else if meta.ram_file {
            // Mapped privately: children of one branch share its pages
            // until they write them.
            vm_spec.memory_file = Some(MemoryFile {
                path: park::ram(dir),
                shared: false,
                anonymous_name: !meta.named_ram,
            });
        }
        vm_spec.incoming = true;
        let (vm, socket) = Vm::start(&vm_spec, &run_dir)?;
        if meta.network_off {
            vm.set_network_link(false)?;
        }
        tracing::debug_span!("engine: load parked state, resume vCPUs")
            .in_scope(|| vm.restore(&park::state(dir)))?;
        vm_spec.incoming = false;
        resume(socket).map_err(Error::Parked)?;
        tracing::debug!(id = %spec.id, "QEMU restored from a park");
        Ok(Started {
            machine: Box::new(QemuMachine::new(
                vm,
                run_dir,
                vm_spec,
                StartKind::Restored,
                self,
                meta.template.map(|t| t.ram),
            )),
            agent: AgentLink::Resumed,
            kind: StartKind::Restored,
        })
    }
}

/// What every guest on this host runs on.
#[derive(Debug)]
struct HostParts {
    kernel: PathBuf,
    initrd: PathBuf,
    accel: crate::Accel,
}

impl Qemu {
    fn host_parts(&self) -> Result<HostParts, Error> {
        let kernel = paths::kernel()?;
        let agent = paths::agent()?;
        let accel = detect_accel()?.accel;
        let initrd = initramfs::for_agent(&agent, &self.cache)?;
        Ok(HostParts {
            kernel,
            initrd,
            accel,
        })
    }

    /// The VM that runs `spec` with its writable disk at `upper_disk`.
    fn vm_spec(&self, spec: &GuestSpec, host: HostParts, upper_disk: PathBuf) -> VmSpec {
        VmSpec {
            kernel: host.kernel,
            initrd: host.initrd,
            memory_mb: spec.memory_mb,
            cpus: spec.cpus,
            accel: host.accel,
            disks: spec
                .lowers
                .iter()
                .enumerate()
                .map(|(i, path)| Disk {
                    path: path.clone(),
                    serial: lower_serial(i),
                    read_only: true,
                    backing: None,
                })
                .chain([Disk {
                    path: upper_disk,
                    serial: UPPER_SERIAL.into(),
                    read_only: false,
                    backing: None,
                }])
                .collect(),
            shares: spec
                .shares
                .iter()
                .enumerate()
                .map(|(i, s)| Share {
                    tag: share_tag(i),
                    path: s.path.clone(),
                    read_only: s.read_only,
                })
                .collect(),
            network: spec.network.clone(),
            kernel_params: crate::clock::guest_params(host.accel, &self.cache),
            memory_file: None,
            named_ram: false,
            incoming: false,
            agent_port: spec.agent_port.clone(),
            confine: spec.confine,
            console_log_max: spec.console_log_max,
        }
    }
}

/// A guest under QEMU, and its runtime directory (removed after QEMU ends:
/// fields drop in order).
#[derive(Debug)]
struct QemuMachine {
    vm: Vm,
    /// Whoever stops the guest on purpose holds it, so its `STOP` is not
    /// taken for a death.
    held: Holds,
    /// The hold of [`Machine::pause`], while paused.
    paused: Mutex<Option<Hold>>,
    run_dir: RunDir,
    /// What it runs, for parking.
    spec: VmSpec,
    /// Its RAM is named as a file-backed VM's (see [`VmSpec::named_ram`]).
    named_ram: bool,
    /// Being parked: the stop and the end that follow are not deaths.
    parking: Arc<AtomicBool>,
    /// The engine's cache directory, for the run directories of captures.
    cache: PathBuf,
    /// See [`Qemu::capturing_saves_in_qemu`].
    split_saves: bool,
    /// The RAM file of the template its memory started from: a park keeps
    /// only the pages that differ from it.
    template: Option<PathBuf>,
}

impl QemuMachine {
    fn new(
        vm: Vm,
        run_dir: RunDir,
        spec: VmSpec,
        kind: StartKind,
        engine: &Qemu,
        template: Option<PathBuf>,
    ) -> QemuMachine {
        QemuMachine {
            template,
            vm,
            held: Holds::default(),
            paused: Mutex::new(None),
            run_dir,
            named_ram: spec.named_ram || matches!(kind, StartKind::Warm | StartKind::Built),
            spec,
            parking: Arc::default(),
            cache: engine.cache.clone(),
            split_saves: engine.split_saves,
        }
    }
}

/// How many parties hold the guest stopped on purpose (a pause, a capture):
/// while any does, QEMU's `STOP` event is expected, not a death.
#[derive(Debug, Clone, Default)]
pub(crate) struct Holds(Arc<AtomicUsize>);

impl Holds {
    /// Takes a hold, to keep until the guest runs again (after `cont` and
    /// its `RESUME`), or until the `stop` failed.
    pub(crate) fn hold(&self) -> Hold {
        self.0.fetch_add(1, Ordering::SeqCst);
        Hold(self.0.clone())
    }

    fn any(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }
}

/// One hold of [`Holds`], released on drop.
#[derive(Debug)]
pub(crate) struct Hold(Arc<AtomicUsize>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Machine for QemuMachine {
    fn exit_status(&self) -> Option<ExitStatus> {
        self.vm.exit_status()
    }

    fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        self.vm.wait_timeout(timeout)
    }

    fn kill(&self) {
        self.vm.kill()
    }

    fn terminate(&self, grace: Duration) -> ExitStatus {
        self.vm.terminate(grace)
    }

    fn set_network_enabled(&self, enabled: bool) -> Result<(), Error> {
        self.vm.set_network_link(enabled)
    }

    fn on_death(&self, handler: DeathHandler) {
        let parking = self.parking.clone();
        let held = self.held.clone();
        self.vm.on_event(move |event| {
            if parking.load(Ordering::Acquire) {
                return;
            }
            if let Some(why) = death_of(event, held.any()) {
                handler(why);
            }
        });
    }

    fn confinement(&self) -> Confinement {
        self.vm.confinement().clone()
    }

    fn pid(&self) -> Option<u32> {
        Some(self.vm.pid())
    }

    fn run_dir(&self) -> Option<&Path> {
        Some(self.run_dir.path())
    }

    fn diagnostics(&self) -> String {
        self.vm.diagnostics()
    }

    fn pause(&self) -> Result<(), Error> {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_none() {
            let hold = self.held.hold();
            self.vm.stop()?;
            *paused = Some(hold);
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), Error> {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_some() {
            self.vm.cont()?;
            *paused = None;
        }
        Ok(())
    }

    fn park(&self, dir: &Path) -> Result<(), Error> {
        match self.template.as_deref().filter(|t| t.is_file()) {
            Some(template) => {
                let (mut meta, split) = self.save_stopped(dir, true)?;
                // The guest stays stopped while its memory is compared.
                let diffed = self
                    .make_ram_file(&mut meta, dir, split)
                    .and_then(|()| park::into_template_diff(&mut meta, dir, template));
                if let Err(e) = diffed {
                    if let Err(c) = self.vm.cont() {
                        tracing::warn!("could not resume the guest after a failed park: {c}");
                    }
                    self.parking.store(false, Ordering::Release);
                    return Err(e);
                }
            }
            None => {
                self.save_stopped(dir, false)?;
            }
        }
        self.vm.terminate(PARK_QUIT_GRACE);
        Ok(())
    }

    fn save_copy(&self, dir: &Path) -> Result<(), Error> {
        let (mut meta, split) = self.save_stopped(dir, true)?;
        let resumed = self.vm.cont();
        self.parking.store(false, Ordering::Release);
        resumed?;
        // While the guest runs on: its children map the RAM file this
        // makes and share its pages.
        self.make_ram_file(&mut meta, dir, split)
    }
}

/// A run directory name for a capture VM, unique in this process.
fn capture_name() -> String {
    static CAPTURES: AtomicUsize = AtomicUsize::new(0);
    format!("capture{}", CAPTURES.fetch_add(1, Ordering::Relaxed))
}

impl QemuMachine {
    /// [`park::into_ram_file`] for this guest's save in `dir`.
    fn make_ram_file(
        &self,
        meta: &mut park::ParkMeta,
        dir: &Path,
        split: Option<Result<(), SplitError>>,
    ) -> Result<(), Error> {
        park::into_ram_file(&self.spec, meta, dir, split, &self.cache, &capture_name())
    }

    /// Saves the guest into the park directory `dir` and leaves it
    /// stopped, its stop and end not reported as deaths; on failure it
    /// runs on as before. With `for_ram_file`, in the form
    /// [`park::into_ram_file`] takes, split while it is written; the
    /// split's outcome comes with the meta.
    fn save_stopped(
        &self,
        dir: &Path,
        for_ram_file: bool,
    ) -> Result<(park::ParkMeta, Option<Result<(), SplitError>>), Error> {
        // Hashed while the guest still runs.
        let network_off = self.spec.network.is_some() && !self.vm.network_link();
        let meta = park::meta_of(&self.spec, self.named_ram, network_off)?;
        let splitting = if for_ram_file && self.split_saves {
            Some(park::Splitting::start(&self.spec, meta.named_ram, dir)?)
        } else {
            None
        };
        self.parking.store(true, Ordering::Release);
        let state = park::state(dir);
        let saved = tracing::debug_span!("engine: save the running guest").in_scope(|| {
            if for_ram_file {
                self.vm.save_all(&state)
            } else {
                self.vm.save(&state)
            }
        });
        let qemu_saved = saved.is_ok();
        let saved = saved
            .and_then(|()| {
                // QEMU flushed it when it stopped the guest: the copy
                // matches the memory just saved.
                let _span = tracing::debug_span!("engine: copy the writable disk").entered();
                let upper = self
                    .spec
                    .disks
                    .iter()
                    .find(|d| !d.read_only)
                    .ok_or(Error::Unsupported("park a guest without a writable disk"))?;
                upper::save(&upper.path, upper.backing.as_deref(), &park::disk(dir))
            })
            .and_then(|()| park::write_meta(dir, &meta));
        // Last, so that the split overlaps the disk's copy too.
        let split = splitting.map(|s| s.finish(qemu_saved));
        if let Err(e) = saved {
            if let Err(c) = self.vm.cont() {
                tracing::warn!("could not resume the guest after a failed save: {c}");
            }
            self.parking.store(false, Ordering::Release);
            return Err(e);
        }
        Ok((meta, split))
    }
}

/// How long a parked QEMU gets to quit before it is killed.
const PARK_QUIT_GRACE: Duration = Duration::from_secs(2);

/// Why a QMP event means the guest is gone, if it does; `held` when the
/// guest is stopped on purpose (its `STOP` is expected).
fn death_of(event: &crate::Event, held: bool) -> Option<String> {
    let reason = event.data["reason"].as_str().unwrap_or("unknown");
    match event.name.as_str() {
        "SHUTDOWN" => Some(format!("the guest shut down ({reason})")),
        "RESET" => Some(format!("the guest reset ({reason})")),
        "GUEST_PANICKED" => Some("the guest kernel panicked".into()),
        // Unless held, a stop is QEMU halting the guest (an emulation or
        // I/O error).
        "STOP" if !held => Some("the hypervisor stopped the guest".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(lowers: usize, shares: usize) -> GuestSpec {
        GuestSpec {
            id: "t".into(),
            lowers: (0..lowers).map(|i| format!("/l{i}").into()).collect(),
            upper_mb: 64,
            shares: (0..shares)
                .map(|i| ShareSpec {
                    path: format!("/s{i}").into(),
                    read_only: true,
                })
                .collect(),
            network: None,
            memory_mb: 128,
            cpus: 1,
            warm_start: false,
            agent_port: "p".into(),
            confine: ConfineMode::Off,
            console_log_max: 1 << 20,
        }
    }

    #[test]
    fn qemu_names_each_disk_and_share_by_position() {
        let layout = Qemu::new().layout(&spec(2, 3));
        assert_eq!(layout.lower_serials, ["cc-lower0", "cc-lower1"]);
        assert_eq!(layout.upper_serial, "cc-upper");
        assert_eq!(layout.share_tags, ["ccm0", "ccm1", "ccm2"]);
        assert_eq!(layout.network, GUEST_NETWORK);
    }

    #[test]
    fn hypervisor_events_that_mean_death() {
        let event = |name: &str, data: serde_json::Value| crate::Event {
            name: name.into(),
            data,
        };
        let shutdown = event(
            "SHUTDOWN",
            serde_json::json!({"guest": true, "reason": "guest-reset"}),
        );
        assert_eq!(
            death_of(&shutdown, false).as_deref(),
            Some("the guest shut down (guest-reset)")
        );
        assert!(death_of(&event("GUEST_PANICKED", serde_json::json!({})), false).is_some());
        assert!(death_of(&event("STOP", serde_json::Value::Null), false).is_some());
        assert!(death_of(
            &event("RESET", serde_json::json!({"reason": "guest-reset"})),
            false
        )
        .is_some());
        for harmless in [
            "RESUME",
            "MIGRATION",
            "VSERPORT_CHANGE",
            "NIC_RX_FILTER_CHANGED",
        ] {
            assert_eq!(
                death_of(&event(harmless, serde_json::json!({})), false),
                None,
                "{harmless}"
            );
        }
    }

    #[test]
    fn a_held_guest_may_stop_but_still_dies() {
        let event = |name: &str| crate::Event {
            name: name.into(),
            data: serde_json::json!({"reason": "host-qmp-quit"}),
        };
        let holds = Holds::default();
        let first = holds.hold();
        let second = holds.hold();
        assert_eq!(death_of(&event("STOP"), holds.any()), None);
        assert!(death_of(&event("SHUTDOWN"), holds.any()).is_some());
        assert!(death_of(&event("GUEST_PANICKED"), holds.any()).is_some());
        drop(first);
        assert_eq!(death_of(&event("STOP"), holds.any()), None);
        drop(second);
        assert!(death_of(&event("STOP"), holds.any()).is_some());
    }
}
