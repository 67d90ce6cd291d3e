//! Parking: [`Instance::park`] saves a running instance to a directory and
//! ends its VM; [`Instance::restore`] starts it again from there, with its
//! processes where they were, as many times as wanted.
//!
//! The directory holds what the engine saved (the guest's memory, device
//! state and writable disk, tied to the kernel, agent and QEMU that made
//! them) and `meta.json`, the core's part: how the instance was configured
//! and what it booted from. It is written under a temporary name beside
//! the target and renamed into place when complete, so a crash never
//! leaves a half park under the name asked for.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cc_engine::{ConfineMode, Engine, Machine, Qemu};
use cc_netpolicy::{NetworkPolicy, Rule};
use serde::{Deserialize, Serialize};

use crate::channel::{Channel, Gone};
use crate::error::{Error, Result};
use crate::instance::{
    guest_spec, plan_guest, set_up_guest, supervise, Inner, Instance, Mount, Options, RootLayers,
    REQUEST_TIMEOUT,
};
use crate::snapshot::Origin;

/// Bumped when the core's part of a park changes.
const FORMAT: u32 = 1;

/// What [`Instance::park`] wrote.
#[derive(Debug, Clone)]
pub struct Parked {
    /// The park directory.
    pub path: PathBuf,
    /// Disk space it takes (allocated, not apparent).
    pub bytes: u64,
    /// How long saving took, from quieting the agent channel to the VM's
    /// end: the guest is stopped for most of it (saving memory and
    /// devices, copying the writable disk).
    pub save: Duration,
}

/// How to run an instance restored from a park; everything else (memory,
/// CPUs, disk, network and its policy, user) is as it was parked.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// How long the restored guest may take to answer (default 60 s).
    pub boot_timeout: Duration,
    /// Ends the restored instance this long after the restore; `None`
    /// (the default) never ends it.
    pub timeout: Option<Duration>,
    /// The engine that restores it (the one that parked it).
    pub engine: Arc<dyn Engine>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            boot_timeout: Duration::from_secs(60),
            timeout: None,
            engine: Arc::new(Qemu::new()),
        }
    }
}

/// The core's part of a park.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    format: u32,
    memory_mb: u32,
    cpus: u32,
    disk_mb: u32,
    user: Option<String>,
    network: bool,
    allow_host: bool,
    allow: Vec<String>,
    deny: Vec<String>,
    confinement: String,
    console_log_max: u64,
    max_result_bytes: u64,
    lowers: Vec<PathBuf>,
    image_config: Option<ImageConfig>,
    /// Ids the parked agent may still know: the restored instance goes on
    /// from them.
    next_process: u64,
    next_handle: u64,
    /// Host directories shared in, in order: every restore shares the same
    /// ones, with the same modes.
    #[serde(default)]
    mounts: Vec<MountMeta>,
}

/// A [`Mount`], as the park keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MountMeta {
    host_path: PathBuf,
    guest_path: String,
    writable: bool,
}

/// [`cc_image::ImageConfig`], as the park keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ImageConfig {
    architecture: String,
    os: String,
    env: Vec<String>,
    working_dir: Option<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: Option<String>,
    labels: std::collections::BTreeMap<String, String>,
}

impl From<&cc_image::ImageConfig> for ImageConfig {
    fn from(c: &cc_image::ImageConfig) -> Self {
        ImageConfig {
            architecture: c.architecture.clone(),
            os: c.os.clone(),
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            user: c.user.clone(),
            labels: c.labels.clone(),
        }
    }
}

impl From<ImageConfig> for cc_image::ImageConfig {
    fn from(c: ImageConfig) -> Self {
        cc_image::ImageConfig {
            architecture: c.architecture,
            os: c.os,
            env: c.env,
            working_dir: c.working_dir,
            entrypoint: c.entrypoint,
            cmd: c.cmd,
            user: c.user,
            labels: c.labels,
        }
    }
}

fn confinement_name(mode: ConfineMode) -> &'static str {
    match mode {
        ConfineMode::BestEffort => "default",
        ConfineMode::Strict => "strict",
        ConfineMode::Off => "off",
    }
}

impl Meta {
    fn of(inner: &Inner) -> Meta {
        let o = &inner.options;
        let rules = |r: &[Rule]| r.iter().map(Rule::to_string).collect();
        Meta {
            format: FORMAT,
            memory_mb: o.memory_mb,
            cpus: o.cpus,
            disk_mb: o.disk_mb,
            user: o.user.clone(),
            network: o.network,
            allow_host: o.network_policy.allow_host,
            allow: rules(&o.network_policy.allow),
            deny: rules(&o.network_policy.deny),
            confinement: confinement_name(o.confinement).into(),
            console_log_max: o.console_log_max,
            max_result_bytes: o.max_result_bytes,
            lowers: inner.lowers.clone(),
            image_config: inner.image_config.as_ref().map(ImageConfig::from),
            next_process: inner.channel.next_process_id(),
            next_handle: inner.next_handle.load(Ordering::Relaxed),
            mounts: o
                .mounts
                .iter()
                .map(|m| MountMeta {
                    host_path: m.host_path.clone(),
                    guest_path: m.guest_path.clone(),
                    writable: m.writable,
                })
                .collect(),
        }
    }

    /// The options the parked instance ran with, under `restore`'s.
    fn options(&self, restore: &RestoreOptions) -> Result<Options> {
        let bad = |what: String| Error::InvalidArgument(format!("parked instance: {what}"));
        let rules = |r: &[String]| -> Result<Vec<Rule>> {
            r.iter()
                .map(|s| s.parse().map_err(|e| bad(format!("{e}"))))
                .collect()
        };
        Ok(Options {
            memory_mb: self.memory_mb,
            cpus: self.cpus,
            user: self.user.clone(),
            boot_timeout: restore.boot_timeout,
            timeout: restore.timeout,
            mounts: self
                .mounts
                .iter()
                .map(|m| Mount {
                    host_path: m.host_path.clone(),
                    guest_path: m.guest_path.clone(),
                    writable: m.writable,
                })
                .collect(),
            network: self.network,
            network_policy: NetworkPolicy {
                allow_host: self.allow_host,
                allow: rules(&self.allow)?,
                deny: rules(&self.deny)?,
            },
            warm_start: false,
            confinement: self.confinement.parse().map_err(bad)?,
            console_log_max: self.console_log_max,
            disk_mb: self.disk_mb,
            max_result_bytes: self.max_result_bytes,
            engine: restore.engine.clone(),
        })
    }
}

fn meta_path(dir: &Path) -> PathBuf {
    dir.join("meta.json")
}

fn read_meta(dir: &Path) -> Result<Meta> {
    let path = meta_path(dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Err(Error::InvalidArgument(format!(
                "{} is not a parked instance",
                dir.display()
            )))
        }
        Err(e) => return Err(Error::io("read", &path)(e)),
    };
    let meta: Meta = serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidArgument(format!("parked instance {}: {e}", path.display())))?;
    if meta.format != FORMAT {
        return Err(Error::InvalidArgument(format!(
            "{} was parked in format {}, this build reads {FORMAT}",
            dir.display(),
            meta.format
        )));
    }
    Ok(meta)
}

/// A park being written beside its target; removed unless published.
struct Writing {
    tmp: PathBuf,
}

impl Writing {
    fn start(target: &Path) -> Result<Writing> {
        let name = target
            .file_name()
            .ok_or_else(|| {
                Error::InvalidArgument(format!("park path {} has no name", target.display()))
            })?
            .to_string_lossy();
        if fs::symlink_metadata(target).is_ok() {
            return Err(Error::InvalidArgument(format!(
                "park path {} already exists",
                target.display()
            )));
        }
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = target.with_file_name(format!(
            ".{name}.parking-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(Error::io("create", &tmp))?;
        Ok(Writing { tmp })
    }

    fn publish(self, target: &Path) -> Result<()> {
        fs::rename(&self.tmp, target).map_err(Error::io("publish", target))
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

/// Disk space taken by the files in `dir`.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

impl Instance {
    /// Saves the running instance to the new directory `path` and closes
    /// it: its VM ends and its memory is released. [`Instance::restore`]
    /// starts it again from there, processes intact.
    ///
    /// Commands may be running: their guest processes go on in every
    /// restore (output read and dropped, input at end of file), while this
    /// handle's `Child`s, pipes, listeners and connections fail with
    /// `AlreadyClosed`, as the instance is closed. Mounts are released in
    /// the guest for the save (a guest process with a file open on one is
    /// `InvalidArgument`) and every restore has them again, with their
    /// modes. On an error the instance runs on, unless the VM failed while
    /// it was being saved.
    pub fn park(&self, path: impl AsRef<Path>) -> Result<Parked> {
        let path = path.as_ref();
        let inner = self.inner();
        let vm = saveable(inner)?;
        let writing = Writing::start(path)?;
        let t = Instant::now();
        unmount_shares(self)?;
        inner.parking.store(true, Ordering::Release);
        let saved = save(inner, &writing.tmp, After::Ends, |d| vm.park(d));
        let save_time = t.elapsed();
        inner.parking.store(false, Ordering::Release);
        let meta = match saved {
            Ok(meta) => meta,
            Err(e) => {
                if vm.exit_status().is_some() {
                    self.close()?;
                } else {
                    mount_shares(self, 0)?;
                }
                return Err(e);
            }
        };
        // The VM has ended: closing only removes what is left of it.
        self.close()?;
        write_meta(&writing.tmp, &meta)?;
        let bytes = allocated(&writing.tmp);
        writing.publish(path)?;
        Ok(Parked {
            path: path.to_path_buf(),
            bytes,
            save: save_time,
        })
    }

    /// Starts a new, independent instance from the park at `path`, with
    /// its guest processes, memory and files as they were parked, and a
    /// new id and hostname; the clock is set from the host and the RNG
    /// reseeded. The park is only read: it can be restored any number of
    /// times. A park made by another kernel, agent or QEMU than this
    /// host's, one that is not a park, one whose mount source directory is
    /// gone, or the park of a warm-started instance whose template was
    /// removed or rebuilt since (it keeps only the memory that differs from
    /// the template), is `InvalidArgument` and nothing starts.
    pub fn restore(path: impl AsRef<Path>, options: RestoreOptions) -> Result<Instance> {
        let path = path.as_ref();
        let t0 = Instant::now();
        let meta = read_meta(path)?;
        let options = meta.options(&options)?;
        for m in &options.mounts {
            if !m.host_path.is_dir() {
                return Err(Error::InvalidArgument(format!(
                    "parked instance: its mount source {} is gone",
                    m.host_path.display()
                )));
            }
        }
        let root = RootLayers {
            lowers: meta.lowers.clone(),
            image_config: meta.image_config.clone().map(Into::into),
            origin: Origin::Restored,
        };
        for lower in &root.lowers {
            if !lower.is_file() {
                return Err(Error::InvalidArgument(format!(
                    "parked instance: its root layer {} is gone",
                    lower.display()
                )));
            }
        }
        let (id, spec, layout) = plan_guest(&root, &options);
        let engine = options.engine.clone();
        let prepare = t0.elapsed();
        let t1 = Instant::now();
        let timeout = options.boot_timeout;
        let resumed: Mutex<Option<Channel>> = Mutex::new(None);
        let mut resume = |socket| {
            let channel = tracing::debug_span!("core: resume agent channel")
                .in_scope(|| Channel::resume(socket, timeout))
                .map_err(|e| e.to_string())?;
            *resumed.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel);
            Ok(())
        };
        let started = engine
            .restore(&spec, path, &mut resume)
            .map_err(|e| match e {
                cc_engine::Error::Parked(why) => {
                    Error::InvalidArgument(format!("parked instance: {why}"))
                }
                e => e.into(),
            })?;
        let channel = resumed
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .ok_or_else(|| {
                Error::Protocol("the engine restored a guest without resuming its channel".into())
            })?;
        channel.continue_process_ids(meta.next_process);
        let machine: Arc<dyn Machine> = Arc::from(started.machine);
        let spawn = t1.elapsed();
        let t2 = Instant::now();
        let kernel_release = tracing::debug_span!("cc: guest setup")
            .in_scope(|| set_up_guest(&channel, machine.as_ref(), &id, &layout, &options))?;
        let timings = crate::BootTimings {
            prepare,
            spawn,
            kernel: Duration::ZERO,
            setup: t2.elapsed(),
        };
        let inner = Inner::new(id, channel, root, &options);
        inner
            .next_handle
            .fetch_max(meta.next_handle, Ordering::Relaxed);
        supervise(&inner, machine, &options, t0)?;
        let restored = Instance::assemble(inner, kernel_release, timings, started.kind);
        // Dropped (and closed) on a failure.
        mount_shares(&restored, 0)?;
        Ok(restored)
    }
}

impl Instance {
    /// Starts `n` (1 to 64) new instances that are copies of this one at
    /// the moment of the call: its memory, guest processes and files, each
    /// diverging on its own afterwards, with a new id and hostname, the
    /// clock set from the host and the RNG reseeded. This instance is
    /// stopped only while it is saved, then runs on.
    ///
    /// The children map one saved copy of the memory copy-on-write: they
    /// share its pages until they write them. No guest process may have a
    /// file open on a mount (`InvalidArgument` otherwise; it runs on); it
    /// and its children keep the mounts. Commands, files, listeners and
    /// connections in flight stay with this handle and carry on as if
    /// nothing happened; calls made meanwhile from other threads wait for
    /// the save. In the children the running guest processes go on, their
    /// output read and dropped, their input at end of file and their exits
    /// reported to nobody.
    pub fn branch(&self, n: usize) -> Result<Vec<Instance>> {
        if !(1..=64).contains(&n) {
            return Err(Error::InvalidArgument(format!(
                "branch count {n} is outside 1..=64"
            )));
        }
        let inner = self.inner();
        let vm = saveable(inner)?;
        let base = cc_engine::paths::cache_dir().join("branches");
        fs::create_dir_all(&base).map_err(Error::io("create", &base))?;
        sweep_abandoned_copies(&base);
        let tmp = base.join(cc_engine::paths::temp_name("branch"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(Error::io("create", &tmp))?;
        // Never published: dropping it removes the saved copy.
        let writing = Writing { tmp };
        unmount_shares(self)?;
        inner.parking.store(true, Ordering::Release);
        let saved = save(inner, &writing.tmp, After::RunsOn, |d| vm.save_copy(d));
        inner.parking.store(false, Ordering::Release);
        let remounted = mount_shares(self, 0);
        let meta = saved?;
        remounted?;
        write_meta(&writing.tmp, &meta)?;
        let options = RestoreOptions {
            boot_timeout: inner.options.boot_timeout,
            timeout: inner.options.timeout,
            engine: inner.options.engine.clone(),
        };
        // The caller's `tracing` subscriber sees the children's starts.
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let children: Vec<Result<Instance>> = std::thread::scope(|s| {
            let started: Vec<_> = (0..n)
                .map(|_| {
                    s.spawn(|| {
                        tracing::dispatcher::with_default(&dispatch, || {
                            Instance::restore(&writing.tmp, options.clone())
                        })
                    })
                })
                .collect();
            started
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(Error::Protocol("a branch panicked".into())))
                })
                .collect()
        });
        // All or nothing: the children made are closed on drop.
        children.into_iter().collect()
    }
}

/// Removes the saved copies of branches whose process died meanwhile.
fn sweep_abandoned_copies(base: &Path) {
    for entry in fs::read_dir(base).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix(".branch.")
            .and_then(|rest| rest.rsplit_once('-'))
            .map(|(owner, _)| owner);
        if owner.is_some_and(|o| !cc_engine::paths::owner_alive(o)) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The machine of an instance that can be saved (running).
fn saveable(inner: &Inner) -> Result<Arc<dyn Machine>> {
    inner.check_running()?;
    inner.machine()
}

/// Options of the guest's 9p mounts, as the agent mounts them at setup.
const NINEP_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=524288,cache=none";

/// Unmounts the instance's host directories in the guest, innermost
/// first. QEMU refuses to save a guest while one is mounted (the 9p server
/// keeps the guest's open files, which a saved state cannot carry), so
/// they are unmounted for the save and mounted again after. One still in
/// use (a guest process has a file or its directory open on it) is
/// `InvalidArgument`, with the others mounted again.
fn unmount_shares(instance: &Instance) -> Result<()> {
    let mounts = &instance.inner().options.mounts;
    for (done, m) in mounts.iter().enumerate().rev() {
        let out = as_root(instance, "umount", &[&m.guest_path]);
        if let Err(e) = out {
            mount_shares(instance, done + 1)?;
            return Err(match e {
                Error::Guest { message, .. } => Error::InvalidArgument(format!(
                    "mount {} cannot be released for the save (a guest process uses it?): {message}",
                    m.guest_path
                )),
                e => e,
            });
        }
    }
    Ok(())
}

/// Mounts the instance's host directories in the guest again, from the
/// `from`th on, with their modes.
fn mount_shares(instance: &Instance, from: usize) -> Result<()> {
    let inner = instance.inner();
    let options = &inner.options;
    if options.mounts.len() <= from {
        return Ok(());
    }
    let root = RootLayers {
        lowers: inner.lowers.clone(),
        image_config: None,
        origin: Origin::Restored,
    };
    let layout = options
        .engine
        .layout(&guest_spec(&inner.id, &root, options));
    for (m, tag) in options.mounts.iter().zip(&layout.share_tags).skip(from) {
        let mode = if m.writable { "" } else { ",ro" };
        as_root(
            instance,
            "mount",
            &[
                "-t",
                "9p",
                "-o",
                &format!("{NINEP_OPTIONS}{mode}"),
                tag,
                &m.guest_path,
            ],
        )?;
    }
    Ok(())
}

/// Runs `program` with `args` as root in the guest; a failure is
/// [`Error::Guest`] with what it printed.
fn as_root(instance: &Instance, program: &str, args: &[&str]) -> Result<()> {
    let out = instance
        .command(program)
        .args(args)
        .user("0")
        .combined_output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Guest {
        op: program.into(),
        message: String::from_utf8_lossy(&out.stdout).trim().to_string(),
    })
}

fn write_meta(dir: &Path, meta: &Meta) -> Result<()> {
    let m = meta_path(dir);
    let json = serde_json::to_vec_pretty(meta)
        .map_err(|e| Error::io("encode", &m)(io::Error::other(e)))?;
    fs::write(&m, json).map_err(Error::io("write", &m))
}

/// What becomes of the saved guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// It runs on (a branch): its channel carries on where it stopped.
    RunsOn,
    /// It ended (a park): its channel closes.
    Ends,
}

/// Quiesces the channel, so that no frame of either side is in flight,
/// and has `engine_save` save the guest into `dir`; returns the core's
/// part of the save. Senders meanwhile wait for the quiet to end.
fn save(
    inner: &Inner,
    dir: &Path,
    after: After,
    engine_save: impl FnOnce(&Path) -> std::result::Result<(), cc_engine::Error>,
) -> Result<Meta> {
    let quiet = tracing::debug_span!("cc: quiesce the channel")
        .in_scope(|| inner.channel.quiesce(REQUEST_TIMEOUT))?;
    // Taken in the quiet: every process id the saved agent heard of is
    // below the next one recorded.
    let meta = Meta::of(inner);
    let saved = engine_save(dir);
    match (&saved, after) {
        (Ok(()), After::Ends) => quiet.end(Gone::Closed),
        _ => quiet.lift(),
    }
    saved?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_survive_the_meta_round_trip() {
        let meta = Meta {
            format: FORMAT,
            memory_mb: 256,
            cpus: 2,
            disk_mb: 1024,
            user: Some("nobody".into()),
            network: true,
            allow_host: true,
            allow: vec!["10.0.0.0/8:80".into()],
            deny: vec!["1.2.3.4".into()],
            confinement: "strict".into(),
            console_log_max: 8192,
            max_result_bytes: 1 << 20,
            lowers: vec!["/l0".into()],
            image_config: None,
            next_process: 7,
            next_handle: 3,
            mounts: vec![MountMeta {
                host_path: "/srv/data".into(),
                guest_path: "/data".into(),
                writable: false,
            }],
        };
        let json = serde_json::to_vec(&meta).unwrap();
        let back: Meta = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, meta);
        let o = back.options(&RestoreOptions::default()).unwrap();
        assert_eq!((o.memory_mb, o.cpus, o.disk_mb), (256, 2, 1024));
        assert_eq!(o.confinement, ConfineMode::Strict);
        assert_eq!(o.network_policy.allow[0].to_string(), "10.0.0.0/8:80");
        assert!(o.network_policy.allow_host && !o.warm_start);
        assert_eq!(o.mounts.len(), 1);
        let m = &o.mounts[0];
        assert_eq!(m.host_path, PathBuf::from("/srv/data"));
        assert!(m.guest_path == "/data" && !m.writable);
        let mut bad = meta.clone();
        bad.deny = vec!["not a rule".into()];
        assert!(matches!(
            bad.options(&RestoreOptions::default()),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn what_is_not_a_park_is_invalid_argument() {
        let d = std::env::temp_dir().join(format!("cc-park-core-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let err = read_meta(&d.join("nothing")).unwrap_err();
        assert!(
            err.to_string().contains("is not a parked instance"),
            "{err}"
        );
        fs::write(meta_path(&d), b"[1, 2").unwrap();
        assert!(matches!(read_meta(&d), Err(Error::InvalidArgument(_))));
        // A park already there is never overwritten.
        let err = Writing::start(&d).err().unwrap();
        assert!(err.to_string().contains("already exists"), "{err}");
        let target = d.join("p");
        let w = Writing::start(&target).unwrap();
        fs::write(w.tmp.join("x"), b"x").unwrap();
        w.publish(&target).unwrap();
        assert!(target.join("x").is_file());
        // An abandoned one leaves nothing.
        drop(Writing::start(&d.join("q")).unwrap());
        let mut names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["meta.json", "p"]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn copies_of_dead_branchers_are_swept_and_live_ones_kept() {
        let d = std::env::temp_dir().join(format!("cc-park-sweep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let mine = d.join(cc_engine::paths::temp_name("branch"));
        // Pid 0x7ffffffe is never a live process here.
        let dead = d.join(".branch.2147483646.1-0.tmp");
        let other = d.join("kept");
        for dir in [&mine, &dead, &other] {
            fs::create_dir(dir).unwrap();
        }
        sweep_abandoned_copies(&d);
        assert!(mine.is_dir() && other.is_dir());
        assert!(!dead.exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
