//! The task service: one container per shim, its VM one `cc::Instance`,
//! its init and exec processes guest processes of that instance; or one
//! pod per shim: the sandbox container boots the VM, and each member
//! container gets a root of its own in that running VM
//! ([`cc::Instance::mount_root`]) its processes run changed into.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use containerd_shim::api::{self, Status as TaskStatus};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, context, get_status, Code};
use containerd_shim::protos::types::mount::Mount;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};

use crate::metrics;
use crate::oom::{self, OomCount};
use crate::spec::{self, ProcessPlan};
use crate::state::{self, ShimState};
use crate::stdio;

/// How long containerd gets to take one event.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// The exit status of a process whose VM died under it, as containerd
/// reports a process whose shim died.
const VM_DIED: u32 = 255;
/// A terminal's size when neither the spec nor a resize gave one.
const DEFAULT_TTY: (u16, u16) = (24, 80);
/// Where the directories of file binds are shared in the guest.
const GUEST_FILE_BINDS: &str = "/.crumble-binds";
/// Where a pod's member containers get their roots in the guest, one
/// directory per container id: on the VM's writable disk, as the images
/// may be larger than the guest's `/run`.
const GUEST_POD_ROOTS: &str = "/.crumble-pod";

type Event = (&'static str, Box<dyn MessageDyn>);

fn rpc_err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(get_status(code, msg))
}

fn cc_err(e: cc::Error) -> ttrpc::Error {
    let code = match e.code() {
        cc::ErrorCode::InvalidArgument => Code::INVALID_ARGUMENT,
        cc::ErrorCode::NotRunning => Code::FAILED_PRECONDITION,
        _ => Code::INTERNAL,
    };
    rpc_err(code, e)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A process's exit, once known: status and time.
#[derive(Debug, Default)]
struct ExitCell {
    exit: Mutex<Option<(u32, SystemTime)>>,
    cv: Condvar,
}

impl ExitCell {
    fn set(&self, status: u32) {
        *lock(&self.exit) = Some((status, SystemTime::now()));
        self.cv.notify_all();
    }

    fn get(&self) -> Option<(u32, SystemTime)> {
        *lock(&self.exit)
    }

    fn wait(&self) -> (u32, SystemTime) {
        let mut g = lock(&self.exit);
        loop {
            if let Some(e) = *g {
                return e;
            }
            g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The init process or an exec.
#[derive(Debug)]
struct Proc {
    plan: ProcessPlan,
    stdin: String,
    stdout: String,
    stderr: String,
    fifos: Option<stdio::Fifos>,
    /// Our write end of the stdin FIFO, dropped by CloseIO.
    stdin_keep: Option<File>,
    /// Guest pid once started.
    pid: Option<u32>,
    signaller: Option<cc::Signaller>,
    tty: (u16, u16),
    exit: Arc<ExitCell>,
}

impl Proc {
    fn new(plan: ProcessPlan, stdin: String, stdout: String, stderr: String) -> TtrpcResult<Proc> {
        let fifos = stdio::open(&stdin, &stdout, &stderr)
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, format!("opening stdio: {e}")))?;
        let tty = plan.console.unwrap_or(DEFAULT_TTY);
        Ok(Proc {
            plan,
            stdin,
            stdout,
            stderr,
            fifos: Some(fifos),
            stdin_keep: None,
            pid: None,
            signaller: None,
            tty,
            exit: Arc::default(),
        })
    }

    fn status(&self) -> TaskStatus {
        if self.exit.get().is_some() {
            TaskStatus::STOPPED
        } else if self.pid.is_some() {
            TaskStatus::RUNNING
        } else {
            TaskStatus::CREATED
        }
    }

    fn running(&self) -> bool {
        self.pid.is_some() && self.exit.get().is_none()
    }
}

#[derive(Debug)]
struct Container {
    id: String,
    bundle: String,
    /// The VM: this container's own, or its pod's (shared with the
    /// sandbox and the other members).
    instance: Arc<cc::Instance>,
    /// A pod member's root in the guest: (its directory, the root).
    /// `None`: the VM is this container's and ends with it.
    root: Option<(String, String)>,
    /// QEMU's host pid: the task's pid, as VM runtimes report it.
    vm_pid: u32,
    /// The VM's OOM kills accounted for: shared as the VM is.
    oom: Arc<OomCount>,
    init: Proc,
    execs: HashMap<String, Proc>,
}

impl Container {
    fn proc(&self, exec_id: &str) -> TtrpcResult<&Proc> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| rpc_err(Code::NOT_FOUND, format!("process {exec_id} not found")))
    }

    fn proc_mut(&mut self, exec_id: &str) -> TtrpcResult<&mut Proc> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| rpc_err(Code::NOT_FOUND, format!("process {exec_id} not found")))
    }

    /// The pid reported for a process: QEMU's for init, the guest's for execs.
    fn reported_pid(&self, exec_id: &str, p: &Proc) -> u32 {
        if exec_id.is_empty() {
            self.vm_pid
        } else {
            p.pid.unwrap_or(0)
        }
    }
}

struct Inner {
    /// By id: one, or a pod's sandbox and members.
    containers: Mutex<HashMap<String, Container>>,
    exit: Arc<ExitSignal>,
    events: Mutex<Option<Sender<Event>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("containers", &self.containers)
            .finish_non_exhaustive()
    }
}

/// The shim's task service.
#[derive(Debug, Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(exit: Arc<ExitSignal>) -> Service {
        Service {
            inner: Arc::new(Inner {
                containers: Mutex::new(HashMap::new()),
                exit,
                events: Mutex::new(None),
            }),
        }
    }

    /// A service publishing its events through `publisher`, in the
    /// namespace `namespace`, from a thread of its own so no request waits
    /// on containerd.
    pub fn with_publisher(&self, publisher: RemotePublisher, namespace: String) -> Service {
        let (tx, rx) = mpsc::channel::<Event>();
        let spawned = std::thread::Builder::new()
            .name("cc-shim-events".into())
            .spawn(move || {
                for (topic, event) in rx {
                    let ctx = context::with_duration(PUBLISH_TIMEOUT);
                    if let Err(e) = publisher.publish(ctx, topic, &namespace, event) {
                        log::error!("publishing {topic}: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("no event thread: {e}");
        } else {
            *lock(&self.inner.events) = Some(tx);
        }
        self.clone()
    }

    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        if let Some(tx) = lock(&self.inner.events).as_ref() {
            let _ = tx.send((topic, event));
        }
    }

    fn with_container<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> TtrpcResult<R>,
    ) -> TtrpcResult<R> {
        let mut g = lock(&self.inner.containers);
        match g.get_mut(id) {
            Some(c) => f(c),
            None => Err(rpc_err(
                Code::NOT_FOUND,
                format!("container {id} not found"),
            )),
        }
    }

    /// A pod member: its root, from the rootfs containerd mounted in its
    /// bundle, goes into the sandbox's running VM; its file binds are
    /// copied in (the VM's shared directories are fixed at boot).
    fn create_member(
        &self,
        req: &api::CreateTaskRequest,
        plan: spec::Plan,
        sandbox: &str,
    ) -> TtrpcResult<Container> {
        let (instance, oom) = lock(&self.inner.containers)
            .get(sandbox)
            .filter(|c| c.root.is_none())
            .map(|c| (c.instance.clone(), c.oom.clone()))
            .ok_or_else(|| {
                rpc_err(
                    Code::FAILED_PRECONDITION,
                    format!("pod sandbox {sandbox} not found: create the sandbox first"),
                )
            })?;
        if let Some(m) = plan
            .mounts
            .iter()
            .find(|m| !m.read_only && std::fs::metadata(&m.source).map_or(true, |md| md.is_dir()))
        {
            return Err(rpc_err(
                Code::INVALID_ARGUMENT,
                format!(
                    "refused: mount {}: a pod's containers cannot share a writable host directory (the VM's shares are fixed at the sandbox's boot); read-only directories and files are copied in",
                    m.destination
                ),
            ));
        }
        let bundle = Path::new(&req.bundle);
        let init = Proc::new(
            plan.process,
            req.stdin.clone(),
            req.stdout.clone(),
            req.stderr.clone(),
        )?;
        let tree = self.mount_rootfs(bundle, &plan.root, &req.rootfs)?;
        let dir = format!("{GUEST_POD_ROOTS}/{}", req.id);
        let started = std::time::Instant::now();
        let mounted = instance.mount_root(&tree, &dir);
        if tree == bundle.join("rootfs") && !req.rootfs.is_empty() {
            state::unmount(&tree);
        }
        let (root, bytes) = mounted.map_err(cc_err)?;
        log::info!(
            "root of {} in the pod's VM: {bytes} bytes in {:?}",
            req.id,
            started.elapsed()
        );
        if let Err(e) = copy_binds(&instance, &root, &plan.mounts) {
            let _ = instance.unmount_root(&dir);
            return Err(e);
        }
        Ok(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            vm_pid: instance.vm_pid().unwrap_or(0),
            instance,
            root: Some((dir, root)),
            oom,
            init,
            execs: HashMap::new(),
        })
    }

    fn create_container(&self, req: &api::CreateTaskRequest) -> TtrpcResult<Container> {
        let bundle = Path::new(&req.bundle);
        let json = std::fs::read(bundle.join("config.json"))
            .map_err(|e| rpc_err(Code::INVALID_ARGUMENT, format!("reading config.json: {e}")))?;
        let plan = spec::plan(&json).map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        if req.terminal != plan.process.terminal {
            return Err(rpc_err(
                Code::INVALID_ARGUMENT,
                "the request's terminal and config.json's process.terminal differ",
            ));
        }
        if let Some(spec::PodRole::Member(sandbox)) = &plan.pod {
            let sandbox = sandbox.clone();
            return self.create_member(req, plan, &sandbox);
        }
        let mut options = cc::Options::default();
        let links = match self.share_mounts(bundle, &plan.mounts, &mut options) {
            Ok(links) => links,
            Err(e) => {
                state::remove_staged_files(bundle);
                return Err(e);
            }
        };
        // The stdio is opened before the VM boots: a bad path fails fast.
        let booted = Proc::new(
            plan.process,
            req.stdin.clone(),
            req.stdout.clone(),
            req.stderr.clone(),
        )
        .and_then(|init| {
            let rootfs = self.mount_rootfs(bundle, &plan.root, &req.rootfs)?;
            let booted = cc::Instance::new(&cc::Source::Dir(rootfs.clone()), options);
            // The VM reads its own image of the tree from now on.
            if rootfs == bundle.join("rootfs") && !req.rootfs.is_empty() {
                state::unmount(&rootfs);
            }
            let instance = booted.map_err(cc_err)?;
            if let Err(e) = link_files(&instance, &links) {
                let _ = instance.close();
                return Err(e);
            }
            Ok((init, instance))
        });
        let (init, instance) = booted.inspect_err(|_| state::remove_staged_files(bundle))?;
        let vm_pid = instance.vm_pid().unwrap_or(0);
        let saved = ShimState {
            run_dir: instance.run_dir(),
            vm_pid,
        };
        if let Err(e) = saved.save(bundle) {
            log::warn!("saving the shim state: {e}");
        }
        Ok(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            instance: Arc::new(instance),
            root: None,
            vm_pid,
            oom: Arc::default(),
            init,
            execs: HashMap::new(),
        })
    }

    /// Adds the bind mounts to `options`: a directory as itself, a file
    /// through a directory of its own (see [`state::stage_file`]) shared
    /// under [`GUEST_FILE_BINDS`]. Returns the guest links the files need:
    /// (the staged file in the guest, the mount's destination).
    fn share_mounts(
        &self,
        bundle: &Path,
        mounts: &[spec::BindMount],
        options: &mut cc::Options,
    ) -> TtrpcResult<Vec<(String, String)>> {
        let mut links = Vec::new();
        for (i, m) in mounts.iter().enumerate() {
            let is_dir = std::fs::metadata(&m.source).map_or(true, |md| md.is_dir());
            let (host, guest) = if is_dir {
                (m.source.clone(), m.destination.clone())
            } else {
                let (dir, name) = state::stage_file(bundle, i, &m.source).map_err(|e| {
                    rpc_err(
                        Code::INTERNAL,
                        format!("staging the file bind of {}: {e}", m.destination),
                    )
                })?;
                let guest = format!("{GUEST_FILE_BINDS}/{i}");
                links.push((format!("{guest}/{name}"), m.destination.clone()));
                (dir, guest)
            };
            options.mounts.push(if m.read_only {
                cc::Mount::read_only(host, guest)
            } else {
                cc::Mount::writable(host, guest)
            });
        }
        Ok(links)
    }

    /// Mounts containerd's rootfs mounts at `bundle/rootfs`, or takes the
    /// spec's root directory when there are none. A fresh snapshot (an
    /// overlay with an empty upper) is read through its layers alone: the
    /// VM never writes to it, and the tree's metadata (the root's mtime is
    /// the upper's otherwise) then stays the same from one container to
    /// the next, so the cached image and warm-start template are reused.
    fn mount_rootfs(&self, bundle: &Path, root: &Path, mounts: &[Mount]) -> TtrpcResult<PathBuf> {
        if mounts.is_empty() {
            return Ok(bundle.join(root));
        }
        let target = bundle.join("rootfs");
        let mount_err = |e: std::io::Error| {
            state::unmount(&target);
            rpc_err(Code::INTERNAL, format!("mounting the rootfs: {e}"))
        };
        if let [m] = mounts {
            match state::fresh_overlay_lowers(&m.type_, &m.options, state::is_empty_dir) {
                Some(lowers) if lowers.len() == 1 => return Ok(PathBuf::from(&lowers[0])),
                Some(lowers) => {
                    let options = [format!("lowerdir={}", lowers.join(":")), "ro".into()];
                    state::mount("overlay", "overlay", &options, &target).map_err(mount_err)?;
                    return Ok(target);
                }
                None => {}
            }
        }
        for m in mounts {
            state::mount(&m.type_, &m.source, &m.options, &target).map_err(mount_err)?;
        }
        Ok(target)
    }

    /// Starts `p` in `inst`: the copies between its FIFOs and the guest
    /// process, and a thread that waits for its exit, lets the output
    /// drain, publishes a TaskOOM for the container if the exit was the
    /// guest's OOM killer's (counted in `oom`), then records and publishes
    /// the exit.
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        inst: &Arc<cc::Instance>,
        oom: &Arc<OomCount>,
        root: Option<&str>,
        p: &mut Proc,
        container_id: &str,
        exec_id: &str,
        reported_pid: Option<u32>,
    ) -> TtrpcResult<u32> {
        let plan = &p.plan;
        let mut cmd = inst.command(&plan.args[0]);
        cmd.args(&plan.args[1..])
            .current_dir(&plan.cwd)
            .user(plan.user.clone());
        if let Some(root) = root {
            cmd.root(root);
        }
        for (k, v) in &plan.env {
            cmd.env(k, v);
        }
        for (resource, soft, hard) in &plan.rlimits {
            cmd.rlimit(resource, *soft, *hard);
        }
        let mut fifos = p.fifos.take().unwrap_or_default();
        let piped = |on: bool| {
            if on {
                cc::Stdio::Piped
            } else {
                cc::Stdio::Null
            }
        };
        cmd.stdin(piped(fifos.stdin.is_some()))
            .stdout(piped(fifos.stdout.is_some()))
            .stderr(piped(fifos.stderr.is_some()));
        if plan.terminal {
            cmd.pty(p.tty.0, p.tty.1);
        }
        let mut child = cmd.spawn().map_err(cc_err)?;
        let pid = child.id();
        let io_err = |e: std::io::Error| rpc_err(Code::INTERNAL, format!("stdio thread: {e}"));
        if let (Some(from), Some(to)) = (fifos.stdin.take(), child.stdin.take()) {
            stdio::pump("cc-shim-stdin", from, to, None).map_err(io_err)?;
        }
        p.stdin_keep = fifos.stdin_keep.take();
        let mut copies = Vec::new();
        if let (Some(from), Some((to, keep))) = (child.stdout.take(), fifos.stdout.take()) {
            copies.push(stdio::pump("cc-shim-stdout", from, to, Some(keep)).map_err(io_err)?);
        }
        if let (Some(from), Some((to, keep))) = (child.stderr.take(), fifos.stderr.take()) {
            copies.push(stdio::pump("cc-shim-stderr", from, to, Some(keep)).map_err(io_err)?);
        }
        p.signaller = Some(child.signaller());
        p.pid = Some(pid);
        let exit = p.exit.clone();
        let (inst, oom) = (inst.clone(), oom.clone());
        let this = self.clone();
        let (cid, eid) = (container_id.to_string(), exec_id.to_string());
        let event_pid = reported_pid.unwrap_or(pid);
        std::thread::Builder::new()
            .name("cc-shim-wait".into())
            .spawn(move || {
                let status = match child.wait() {
                    Ok(s) => match (s.code(), s.signal()) {
                        (Some(c), _) => c as u32,
                        (None, Some(sig)) => 128 + sig as u32,
                        (None, None) => VM_DIED,
                    },
                    Err(e) => {
                        log::error!("waiting for {cid}/{eid}: {e}");
                        VM_DIED
                    }
                };
                stdio::drain(copies);
                let oom_killed = oom.claim(status, || {
                    let vmstat = inst
                        .read_file(oom::VMSTAT)
                        .inspect_err(|e| log::warn!("reading the guest's OOM kills: {e}"))
                        .ok()?;
                    oom::oom_kills(&String::from_utf8_lossy(&vmstat))
                });
                if oom_killed {
                    // Before the exit: a client has the cause when the exit arrives.
                    this.publish(
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(TaskOOM {
                            container_id: cid.clone(),
                            ..Default::default()
                        }),
                    );
                }
                exit.set(status);
                let (_, at) = exit.get().expect("just set");
                this.publish(
                    topics::TASK_EXIT_EVENT_TOPIC,
                    Box::new(TaskExit {
                        container_id: cid.clone(),
                        id: if eid.is_empty() { cid } else { eid },
                        pid: event_pid,
                        exit_status: status,
                        exited_at: MessageField::some(Timestamp::from(at)),
                        ..Default::default()
                    }),
                );
            })
            .map_err(|e| rpc_err(Code::INTERNAL, format!("wait thread: {e}")))?;
        Ok(pid)
    }
}

/// Copies each bind's host file or read-only directory to its
/// destination in a pod member's root (`root`, a guest path): a copy as of
/// Create, read-only by its modes.
fn copy_binds(inst: &cc::Instance, root: &str, mounts: &[spec::BindMount]) -> TtrpcResult<()> {
    for m in mounts {
        let fail = |e: String| rpc_err(Code::INTERNAL, format!("bind {}: {e}", m.destination));
        let dest = format!("{root}/{}", m.destination.trim_start_matches('/'));
        if let Some(parent) = Path::new(&dest).parent() {
            inst.mkdir_all(&parent.to_string_lossy(), 0o755)
                .map_err(|e| fail(e.to_string()))?;
        }
        let is_dir = std::fs::metadata(&m.source).is_ok_and(|md| md.is_dir());
        if is_dir {
            let mut budget = CopyBudget::default();
            copy_tree(inst, &m.source, &dest, &mut budget).map_err(fail)?;
        } else {
            let mode = if m.read_only { 0o444 } else { 0o644 };
            inst.copy_in(&m.source, &dest, mode)
                .map_err(|e| fail(e.to_string()))?;
        }
    }
    Ok(())
}

/// How much of a host directory a member's read-only bind may copy: what
/// Kubernetes mounts this way (secrets, config maps, service account
/// tokens) is small, and the copy lives in guest memory.
#[derive(Debug)]
struct CopyBudget {
    entries: usize,
    bytes: u64,
}

impl Default for CopyBudget {
    fn default() -> Self {
        CopyBudget {
            entries: 10_000,
            bytes: 64 << 20,
        }
    }
}

/// Copies host directory `from` to guest path `to`: directories, regular
/// files (without write permission) and symbolic links as they are;
/// anything else, or more than the budget, fails naming the path.
fn copy_tree(
    inst: &cc::Instance,
    from: &Path,
    to: &str,
    budget: &mut CopyBudget,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("{}: {e}", from.display());
    inst.mkdir_all(to, 0o555).map_err(|e| e.to_string())?;
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .map_err(io)?
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let host = entry.path();
        let guest = format!("{to}/{}", entry.file_name().to_string_lossy());
        let md = std::fs::symlink_metadata(&host).map_err(io)?;
        budget.entries = budget
            .entries
            .checked_sub(1)
            .ok_or_else(|| format!("{}: more entries than a copy takes", from.display()))?;
        let kind = md.file_type();
        if kind.is_dir() {
            copy_tree(inst, &host, &guest, budget)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&host).map_err(io)?;
            inst.symlink(&target.to_string_lossy(), &guest)
                .map_err(|e| e.to_string())?;
        } else if kind.is_file() {
            budget.bytes = budget
                .bytes
                .checked_sub(md.len())
                .ok_or_else(|| format!("{}: more bytes than a copy takes", host.display()))?;
            let mode = std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o555;
            inst.copy_in(&host, &guest, mode)
                .map_err(|e| e.to_string())?;
        } else {
            return Err(format!(
                "{}: a special file, which cannot be copied",
                host.display()
            ));
        }
    }
    Ok(())
}

/// Puts each staged file at its mount's destination in the guest, as a
/// symbolic link to the file's share (a directory of its own).
fn link_files(inst: &cc::Instance, links: &[(String, String)]) -> TtrpcResult<()> {
    for (target, dest) in links {
        let fail = |e: cc::Error| rpc_err(Code::INTERNAL, format!("file bind {dest}: {e}"));
        if let Some(parent) = Path::new(dest).parent() {
            inst.mkdir_all(&parent.to_string_lossy(), 0o755)
                .map_err(fail)?;
        }
        // An image's file at the destination is replaced, as a bind hides it.
        match inst.remove(dest) {
            Err(e) if e.io_kind() != Some(std::io::ErrorKind::NotFound) => return Err(fail(e)),
            _ => {}
        }
        inst.symlink(target, dest).map_err(fail)?;
    }
    Ok(())
}

/// Whether the request's bundle is a pod's member container.
fn is_member(req: &api::CreateTaskRequest) -> bool {
    std::fs::read(Path::new(&req.bundle).join("config.json"))
        .is_ok_and(|json| spec::shim_group(&json).is_some())
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        {
            let containers = lock(&self.inner.containers);
            if containers.contains_key(&req.id) {
                return Err(rpc_err(
                    Code::ALREADY_EXISTS,
                    format!("container {} exists", req.id),
                ));
            }
            // Only a pod's members join a shim that has a container.
            if containers.values().any(|c| c.root.is_none()) && !is_member(&req) {
                return Err(rpc_err(
                    Code::ALREADY_EXISTS,
                    "this shim already runs a container",
                ));
            }
        }
        let c = self.create_container(&req)?;
        let pid = c.vm_pid;
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        lock(&self.inner.containers).insert(req.id.clone(), c);
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.with_container(&req.id, |c| {
            let vm_pid = c.vm_pid;
            let Container {
                instance,
                oom,
                init,
                execs,
                id,
                root,
                ..
            } = c;
            let root = root.as_ref().map(|(_, r)| r.as_str());
            let (p, reported) = if req.exec_id.is_empty() {
                (init, Some(vm_pid))
            } else {
                let p = execs.get_mut(&req.exec_id).ok_or_else(|| {
                    rpc_err(
                        Code::NOT_FOUND,
                        format!("process {} not found", req.exec_id),
                    )
                })?;
                (p, None)
            };
            if p.pid.is_some() {
                return Err(rpc_err(Code::FAILED_PRECONDITION, "already started"));
            }
            let guest = self.spawn(instance, oom, root, p, id, &req.exec_id, reported)?;
            Ok(reported.unwrap_or(guest))
        })?;
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut g = lock(&self.inner.containers);
        let Some(c) = g.get_mut(&req.id) else {
            return Err(rpc_err(
                Code::NOT_FOUND,
                format!("container {} not found", req.id),
            ));
        };
        let p = c.proc(&req.exec_id)?;
        if p.running() {
            return Err(rpc_err(
                Code::FAILED_PRECONDITION,
                "the process is running: kill it first",
            ));
        }
        let (status, at) = p.exit.get().unwrap_or((0, SystemTime::now()));
        let pid = c.reported_pid(&req.exec_id, p);
        let resp = api::DeleteResponse {
            pid,
            exit_status: status,
            exited_at: MessageField::some(Timestamp::from(at)),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            c.execs.remove(&req.exec_id);
            return Ok(resp);
        }
        let c = g.remove(&req.id).expect("found above");
        drop(g);
        if let Some((dir, _)) = &c.root {
            // Its execs end with it, as they would with its own VM.
            for p in c.execs.values().filter(|p| p.running()) {
                if let Some(s) = &p.signaller {
                    let _ = s.signal(libc::SIGKILL);
                }
            }
            if let Err(e) = c.instance.unmount_root(dir) {
                log::warn!("removing the root of {}: {e}", c.id);
            }
        } else if let Err(e) = c.instance.close() {
            log::warn!("closing the VM: {e}");
        }
        state::remove(Path::new(&c.bundle));
        state::remove_staged_files(Path::new(&c.bundle));
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: c.id.clone(),
                id: c.id.clone(),
                pid,
                exit_status: status,
                exited_at: MessageField::some(Timestamp::from(at)),
                ..Default::default()
            }),
        );
        Ok(resp)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        self.with_container(&req.id, |c| {
            let processes = std::iter::once(&c.init)
                .chain(c.execs.values())
                .filter(|p| p.running())
                .filter_map(|p| p.pid)
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect();
            Ok(api::PidsResponse {
                processes,
                ..Default::default()
            })
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.with_container(&req.id, |c| {
            let signal = i32::try_from(req.signal)
                .ok()
                .filter(|s| (1..=64).contains(s))
                .ok_or_else(|| rpc_err(Code::INVALID_ARGUMENT, "bad signal number"))?;
            let targets: Vec<&Proc> = if req.all {
                std::iter::once(&c.init).chain(c.execs.values()).collect()
            } else {
                vec![c.proc(&req.exec_id)?]
            };
            let mut signalled = false;
            for p in targets.into_iter().filter(|p| p.running()) {
                if let Some(s) = &p.signaller {
                    // Without `all`, the process alone, as runc's kill(pid).
                    if req.all {
                        s.signal(signal)
                    } else {
                        s.signal_process(signal)
                    }
                    .map_err(cc_err)?;
                    signalled = true;
                }
            }
            if signalled || req.all {
                Ok(api::Empty::default())
            } else {
                Err(rpc_err(Code::NOT_FOUND, "process not running"))
            }
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let spec_json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        let plan = spec::exec_plan(&spec_json).map_err(|e| rpc_err(Code::INVALID_ARGUMENT, e))?;
        self.with_container(&req.id, |c| {
            if req.exec_id.is_empty() || c.execs.contains_key(&req.exec_id) {
                return Err(rpc_err(
                    Code::ALREADY_EXISTS,
                    format!("exec id {:?} is empty or taken", req.exec_id),
                ));
            }
            let p = Proc::new(
                plan,
                req.stdin.clone(),
                req.stdout.clone(),
                req.stderr.clone(),
            )?;
            c.execs.insert(req.exec_id.clone(), p);
            Ok(())
        })?;
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.with_container(&req.id, |c| {
            let p = c.proc_mut(&req.exec_id)?;
            if !p.plan.terminal {
                return Err(rpc_err(
                    Code::INVALID_ARGUMENT,
                    "the process has no terminal",
                ));
            }
            let clamp = |n: u32| n.clamp(1, u32::from(cc::MAX_TERMINAL_SIZE)) as u16;
            p.tty = (clamp(req.height), clamp(req.width));
            match &p.signaller {
                Some(s) if p.exit.get().is_none() => s.resize(p.tty.0, p.tty.1).map_err(cc_err)?,
                _ => {}
            }
            Ok(api::Empty::default())
        })
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        self.with_container(&req.id, |c| {
            let p = c.proc_mut(&req.exec_id)?;
            if req.stdin {
                drop(p.stdin_keep.take());
                if let Some(f) = p.fifos.as_mut() {
                    drop(f.stdin_keep.take());
                }
            }
            Ok(api::Empty::default())
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = self.with_container(&req.id, |c| Ok(c.proc(&req.exec_id)?.exit.clone()))?;
        let (status, at) = exit.wait();
        Ok(api::WaitResponse {
            exit_status: status,
            exited_at: MessageField::some(Timestamp::from(at)),
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.with_container(&req.id, |c| {
            let p = c.proc(&req.exec_id)?;
            let exit = p.exit.get();
            Ok(api::StateResponse {
                id: req.id.clone(),
                bundle: c.bundle.clone(),
                pid: c.reported_pid(&req.exec_id, p),
                status: p.status().into(),
                stdin: p.stdin.clone(),
                stdout: p.stdout.clone(),
                stderr: p.stderr.clone(),
                terminal: p.plan.terminal,
                exit_status: exit.map_or(0, |e| e.0),
                exited_at: exit.map_or_else(MessageField::none, |e| {
                    MessageField::some(Timestamp::from(e.1))
                }),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let (meminfo, stat) = self.with_container(&req.id, |c| {
            let read = |path: &str| {
                c.instance
                    .read_file(path)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .map_err(cc_err)
            };
            Ok((read("/proc/meminfo")?, read("/proc/stat")?))
        })?;
        Ok(api::StatsResponse {
            stats: MessageField::some(metrics::pack(
                metrics::memory(&meminfo),
                metrics::cpu(&stat),
            )),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = lock(&self.inner.containers)
            .values()
            .next()
            .map_or(0, |c| c.vm_pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // A shim with a container stays for it (containerd asks again
        // after Delete).
        if lock(&self.inner.containers).is_empty() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::default())
    }
}
