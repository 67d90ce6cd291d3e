//! Warm start: a booted, idle guest saved once per configuration — its RAM
//! in a file plus QEMU's device state — and restored by later VMs with the
//! same configuration in a fraction of a boot.
//!
//! A template is taken after the caller's `prepare` step (the root
//! filesystem of the image, over a blank writable disk) and before the
//! guest is told anything else (no mounts, no identity, no clock or
//! entropy), so it never holds a user's data. Its writable disks are kept
//! with it: a restored instance gets a copy of each, matching what the
//! guest's memory says is on them.
//! Templates live in `<cache>/templates/<key>/`, where the key hashes
//! everything that shapes the guest's memory and devices: the QEMU binary,
//! kernel and initramfs (by file identity), accelerator, memory, CPUs, the
//! read-only disks (by file identity), the number and kinds of the other
//! devices. A change to any of them is another key. Restores map the RAM
//! file privately, so it is never written and its pages are shared by
//! every instance restored from it.
//!
//! Several processes may build the same template at once: each builds in a
//! private directory and publishes it with one atomic rename; the first
//! wins. A template that fails to restore is removed, and the caller boots
//! cold (and builds it again).

use std::any::Any;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::{AgentLink, Hooks};
use crate::{files, paths, Error, MemoryFile, RunDir, Vm, VmSpec};

/// Bumped when what a template holds or how it is used changes.
const FORMAT: u32 = 6;

/// Templates kept at most; building one more removes the least recently
/// used.
const MAX_TEMPLATES: usize = 16;

/// Disk the templates may take together, by default (each holds the
/// touched part of its guest's RAM: tens of MiB for a small idle guest,
/// far more for a large one). `CC_TEMPLATES_MAX_BYTES` overrides it.
pub const MAX_TEMPLATE_BYTES: u64 = 2 << 30;

/// The byte cap in force.
fn max_template_bytes() -> u64 {
    std::env::var("CC_TEMPLATES_MAX_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_TEMPLATE_BYTES)
}

/// How a VM came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// Booted from scratch (warm start off, or no template could be used).
    Cold,
    /// Booted from scratch to build the template, then restored from it.
    Built,
    /// Restored from an existing template.
    Warm,
    /// Restored from a parked instance.
    Restored,
}

/// What a template was made from, kept next to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub key: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub memory_mb: u32,
    pub cpus: u32,
    pub network: bool,
    pub shares: usize,
    /// The files it depends on with their identities at build time.
    pub files: Vec<(PathBuf, String)>,
}

/// One template on disk, as `crumble templates` lists it.
#[derive(Debug, Clone)]
pub struct TemplateInfo {
    pub meta: TemplateMeta,
    pub dir: PathBuf,
    /// Disk space it takes (allocated, not apparent).
    pub bytes: u64,
    /// A file it depends on changed or is gone: it can never be used again.
    pub stale: bool,
    /// When an instance last started from it.
    pub last_used: SystemTime,
}

/// A file's identity: changes whenever the file is replaced or rewritten.
pub(crate) fn identity(path: &Path) -> String {
    match fs::metadata(path) {
        Ok(m) => format!(
            "{}:{}:{}:{}.{}",
            m.dev(),
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Err(_) => "missing".into(),
    }
}

/// The files whose contents a template depends on.
fn files_of(spec: &VmSpec, qemu: PathBuf) -> Vec<PathBuf> {
    let mut files = vec![qemu, spec.kernel.clone(), spec.initrd.clone()];
    files.extend(
        spec.disks
            .iter()
            .filter(|d| d.read_only)
            .map(|d| d.path.clone()),
    );
    files
}

/// The template key of `spec` and the meta a template built for it keeps.
pub fn key(spec: &VmSpec) -> Result<TemplateMeta, Error> {
    Ok(key_with(spec, paths::qemu()?))
}

fn key_with(spec: &VmSpec, qemu: PathBuf) -> TemplateMeta {
    let files: Vec<(PathBuf, String)> = files_of(spec, qemu)
        .into_iter()
        .map(|f| {
            let id = identity(&f);
            (f, id)
        })
        .collect();
    let mut h = Sha256::new();
    h.update(key_text(spec, &files));
    let key: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    TemplateMeta {
        key,
        created: 0,
        memory_mb: spec.memory_mb,
        cpus: spec.cpus,
        network: spec.network.is_some(),
        shares: spec.shares.len(),
        files,
    }
}

/// What a template key hashes: everything that shapes the saved guest.
fn key_text(spec: &VmSpec, files: &[(PathBuf, String)]) -> String {
    use std::fmt::Write;
    // QEMU re-opens the RAM file as the uid it runs as, which owns it.
    let uid = crate::confine::creds(spec.confine, !spec.shares.is_empty()).uid;
    let mut text = format!(
        "format {FORMAT}\naccel {:?}\ncpu {}\nmemory {}\ncpus {}\nnetwork {}\nkernel {:?}\nuid {uid}\n",
        spec.accel,
        crate::cmdline::cpu_model(spec.accel),
        spec.memory_mb,
        spec.cpus,
        spec.network.is_some(),
        crate::cmdline::kernel_command_line(spec)
    );
    for (path, id) in files {
        let _ = writeln!(text, "file {} {id}", path.display());
    }
    for d in &spec.disks {
        // Writable disks are per instance: only their size and place count.
        let size = if d.read_only {
            0
        } else {
            fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0)
        };
        let _ = writeln!(text, "disk {} {} {size}", d.serial, d.read_only);
    }
    for s in &spec.shares {
        let _ = writeln!(text, "share {} {}", s.tag, s.read_only);
    }
    text
}

/// Where templates live.
pub fn dir(cache: &Path) -> PathBuf {
    cache.join("templates")
}

fn ram(dir: &Path) -> PathBuf {
    dir.join("ram")
}

fn state(dir: &Path) -> PathBuf {
    dir.join("state")
}

fn meta_path(dir: &Path) -> PathBuf {
    dir.join("meta.json")
}

/// The saved copy of writable disk `i`.
fn disk(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("disk{i}.img"))
}

/// Indexes of `spec`'s writable disks.
pub(crate) fn writable(spec: &VmSpec) -> impl Iterator<Item = (usize, &Path)> {
    spec.disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.read_only)
        .map(|(i, d)| (i, d.path.as_path()))
}

/// The complete template for `key`, if there is one.
fn find(cache: &Path, key: &str) -> Option<PathBuf> {
    let d = dir(cache).join(key);
    [ram(&d), state(&d), meta_path(&d)]
        .iter()
        .all(|f| f.is_file())
        .then_some(d)
}

/// Every template, newest first.
pub fn list(cache: &Path) -> Result<Vec<TemplateInfo>, Error> {
    let base = dir(cache);
    let entries = match fs::read_dir(&base) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read", &base)(e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let d = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let Some(meta) = fs::read(meta_path(&d))
            .ok()
            .and_then(|b| serde_json::from_slice::<TemplateMeta>(&b).ok())
        else {
            continue;
        };
        let stale = meta.files.iter().any(|(f, id)| identity(f) != *id);
        let bytes = crate::cache::allocated(&d);
        let last_used = fs::metadata(meta_path(&d))
            .and_then(|m| m.modified())
            .unwrap_or(UNIX_EPOCH);
        out.push(TemplateInfo {
            meta,
            dir: d,
            bytes,
            stale,
            last_used,
        });
    }
    out.sort_by_key(|t| std::cmp::Reverse(t.meta.created));
    Ok(out)
}

/// Removes the template `key`; `false` if there was none. A VM restored
/// from it keeps running (it holds the files open).
pub fn remove(cache: &Path, key: &str) -> Result<bool, Error> {
    if key.is_empty() || key.contains('/') || key.starts_with('.') {
        return Ok(false);
    }
    let d = dir(cache).join(key);
    // Renamed away first, so nobody finds it half removed.
    let trash = dir(cache).join(paths::temp_name("trash"));
    match fs::rename(&d, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("remove", &d)(e)),
    }
    fs::remove_dir_all(&trash).map_err(Error::io("remove", &trash))?;
    Ok(true)
}

/// A template being built in a private directory; removed unless published.
#[derive(Debug)]
struct Building {
    tmp: PathBuf,
}

impl Building {
    fn start(cache: &Path) -> Result<Building, Error> {
        let base = dir(cache);
        crate::rundir::private_dirs(&base)?;
        sweep_abandoned(&base);
        let tmp = base.join(paths::temp_name("build"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(Error::io("create", &tmp))?;
        Ok(Building { tmp })
    }

    /// Moves the template into place under its key; if another process was
    /// first, theirs stays and this one is dropped.
    fn publish(self, cache: &Path, mut meta: TemplateMeta) -> Result<PathBuf, Error> {
        meta.created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Io {
            op: "encode",
            path: meta_path(&self.tmp),
            source: io::Error::other(e),
        })?;
        let m = meta_path(&self.tmp);
        fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&m)
            .and_then(|mut f| io::Write::write_all(&mut f, &json))
            .map_err(Error::io("write", &m))?;
        let target = dir(cache).join(&meta.key);
        match fs::rename(&self.tmp, &target) {
            Ok(()) => {}
            // Someone else published the same key first.
            Err(_) if find(cache, &meta.key).is_some() => {}
            Err(e) => return Err(Error::io("publish", &target)(e)),
        }
        Ok(target)
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

/// Removes build directories of processes that died while building.
fn sweep_abandoned(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix(".build.")
            .or_else(|| name.strip_prefix(".trash."))
            .and_then(|rest| rest.split('-').next());
        if owner.is_some_and(|o| !paths::owner_alive(o)) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Boots `spec` in `run`, from a template when `warm` (building it first,
/// with `hooks.prepare`, if there is none), and returns the VM, its agent
/// channel, how it started and the RAM file of the template it maps. Any trouble with a template falls back to
/// a cold boot; only a cold boot's own failure is an error.
pub(crate) fn start(
    spec: &VmSpec,
    run: &RunDir,
    cache: &Path,
    warm: bool,
    hooks: Hooks<'_>,
) -> Result<(Vm, AgentLink, StartKind, Option<PathBuf>), Error> {
    if warm && spec.memory_file.is_none() && !spec.incoming {
        match start_warm(spec, run, cache, hooks) {
            Ok((vm, kind, t)) => return Ok((vm, AgentLink::Resumed, kind, Some(ram(&t)))),
            Err(e) => tracing::warn!("warm start failed, booting cold: {e}"),
        }
    }
    let (vm, socket) = Vm::start(spec, run)?;
    Ok((vm, AgentLink::Greeting(socket), StartKind::Cold, None))
}

fn start_warm(
    spec: &VmSpec,
    run: &RunDir,
    cache: &Path,
    hooks: Hooks<'_>,
) -> Result<(Vm, StartKind, PathBuf), Error> {
    let meta = tracing::debug_span!("engine: template key").in_scope(|| key(spec))?;
    if let Some(t) = find(cache, &meta.key) {
        match restore(spec, run, &t, true, hooks.resume) {
            Ok(vm) => return Ok((vm, StartKind::Warm, t)),
            // The host refused before the template was read: it is as good
            // as it was.
            Err(e) if refused_before_restoring(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(template = %meta.key, "removing a template that failed to restore: {e}");
                remove(cache, &meta.key)?;
            }
        }
    }
    let key = meta.key.clone();
    let t = build(spec, run, cache, meta, hooks.prepare)?;
    // The writable disks are the ones the template was built with.
    match restore(spec, run, &t, false, hooks.resume) {
        Ok(vm) => Ok((vm, StartKind::Built, t)),
        Err(e) => {
            let _ = remove(cache, &key);
            Err(e)
        }
    }
}

/// Whether `e` comes from what the host lacks or forbids (a tool, the
/// accelerator, the confinement asked for), which fails before QEMU reads
/// a template and says nothing about it.
fn refused_before_restoring(e: &Error) -> bool {
    matches!(
        e,
        Error::QemuMissing(_)
            | Error::KernelMissing(_)
            | Error::AgentMissing(_)
            | Error::BadAccel(_)
            | Error::KvmUnavailable(_)
            | Error::Unconfined(_)
            | Error::Policy(_)
            | Error::ToolMissing { .. }
    )
}

/// Boots `spec` with its RAM in a new template's file, lets `prepare` do
/// its part, and saves the template with copies of the writable disks.
fn build(
    spec: &VmSpec,
    run: &RunDir,
    cache: &Path,
    meta: TemplateMeta,
    prepare: &mut dyn FnMut(UnixStream) -> Result<Box<dyn Any>, String>,
) -> Result<PathBuf, Error> {
    let building = Building::start(cache)?;
    let mut source = spec.clone();
    source.memory_file = Some(MemoryFile {
        path: ram(&building.tmp),
        shared: true,
        anonymous_name: false,
    });
    let (vm, socket) = Vm::start(&source, run)?;
    let channel = prepare(socket).map_err(Error::Template)?;
    vm.save_template(&state(&building.tmp))?;
    drop(vm);
    drop(channel);
    // QEMU flushed them when the migration completed, and has exited.
    for (i, path) in writable(spec) {
        let copy = disk(&building.tmp, i);
        files::clone_file(path, &copy).map_err(Error::io("copy", &copy))?;
    }
    let published = building.publish(cache, meta)?;
    tidy(cache);
    Ok(published)
}

/// Removes templates that can never be used again, and the least recently
/// used beyond [`MAX_TEMPLATES`] or beyond the byte cap (the most recently
/// used one always stays).
fn tidy(cache: &Path) {
    let Ok(all) = list(cache) else { return };
    for t in doomed(all, MAX_TEMPLATES, max_template_bytes()) {
        if let Err(e) = remove(cache, &t.meta.key) {
            tracing::warn!(template = %t.meta.key, "could not remove: {e}");
        }
    }
}

/// Which of `all` to remove to keep at most `count` templates and
/// `bytes` of disk, least recently used first.
fn doomed(mut all: Vec<TemplateInfo>, count: usize, bytes: u64) -> Vec<TemplateInfo> {
    all.sort_by_key(|t| std::cmp::Reverse(t.last_used));
    let (mut kept, mut used) = (0usize, 0u64);
    all.into_iter()
        .filter(|t| {
            let keep =
                !t.stale && (kept == 0 || (kept < count && used.saturating_add(t.bytes) <= bytes));
            if keep {
                kept += 1;
                used = used.saturating_add(t.bytes);
            }
            !keep
        })
        .collect()
}

/// Starts `spec` from the template in `t` and resumes the agent channel.
/// With `fresh_disks`, the writable disks first become copies of the
/// template's.
fn restore(
    spec: &VmSpec,
    run: &RunDir,
    t: &Path,
    fresh_disks: bool,
    resume: &mut dyn FnMut(UnixStream) -> Result<(), String>,
) -> Result<Vm, Error> {
    if fresh_disks {
        let _span = tracing::debug_span!("engine: copy template's writable disk").entered();
        for (i, path) in writable(spec) {
            files::clone_file(&disk(t, i), path).map_err(Error::io("copy", path))?;
        }
    }
    let mut target = spec.clone();
    target.memory_file = Some(MemoryFile {
        path: ram(t),
        shared: false,
        anonymous_name: false,
    });
    target.incoming = true;
    let (vm, socket) = Vm::start(&target, run)?;
    tracing::debug_span!("engine: load state, resume vCPUs").in_scope(|| vm.restore(&state(t)))?;
    tracing::debug_span!("core: resume agent channel")
        .in_scope(|| resume(socket))
        .map_err(Error::Template)?;
    // Its meta file's time says when it was last used, for tidying.
    if let Ok(f) = fs::File::options().append(true).open(meta_path(t)) {
        let _ = f.set_modified(SystemTime::now());
    }
    Ok(vm)
}

#[cfg(test)]
pub(crate) mod tests {
    //! Keys and the directory life cycle (no QEMU: a plain file stands in
    //! for its binary).
    use super::*;
    use crate::{Accel, Disk, Share};

    /// A guest's spec whose files are small stand-ins made in `dir`.
    pub(crate) fn spec(dir: &Path) -> VmSpec {
        let file = |name: &str| {
            let p = dir.join(name);
            fs::write(&p, name).unwrap();
            p
        };
        VmSpec {
            kernel: file("vmlinux"),
            initrd: file("initrd"),
            memory_mb: 256,
            cpus: 1,
            accel: Accel::Tcg,
            disks: vec![
                Disk {
                    path: file("lower.erofs"),
                    serial: "cc-lower0".into(),
                    read_only: true,
                    backing: None,
                },
                Disk {
                    path: file("upper.img"),
                    serial: "cc-upper".into(),
                    read_only: false,
                    backing: None,
                },
            ],
            shares: vec![Share {
                tag: "ccm0".into(),
                path: dir.to_path_buf(),
                read_only: true,
            }],
            network: Some(Default::default()),
            kernel_params: Vec::new(),
            memory_file: None,
            named_ram: false,
            incoming: false,
            agent_port: "cc.agent".into(),
            confine: crate::ConfineMode::default(),
            console_log_max: crate::CONSOLE_LOG_MAX,
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cc-template-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn keys_follow_what_shapes_the_guest() {
        let d = scratch("keys");
        let s = spec(&d);
        let key = |s: &VmSpec| key_with(s, d.join("vmlinux"));
        let k = key(&s).key;
        assert_eq!(key(&s).key, k, "stable");
        // Per-instance parts do not change the key.
        let mut other = s.clone();
        other.shares[0].path = PathBuf::from("/elsewhere");
        other.disks[1].path = d.join("upper.img");
        assert_eq!(key(&other).key, k);
        // Everything else does.
        let changed = |f: &dyn Fn(&mut VmSpec)| {
            let mut c = s.clone();
            f(&mut c);
            key(&c).key
        };
        assert_ne!(changed(&|c| c.memory_mb = 512), k);
        assert_ne!(changed(&|c| c.cpus = 2), k);
        assert_ne!(changed(&|c| c.network = None), k);
        assert_ne!(changed(&|c| c.kernel_params.push("x=1".into())), k);
        // A restored guest keeps the command line it booted with.
        assert!(key_text(&s, &[]).contains(crate::KERNEL_PARAMS));
        assert_ne!(changed(&|c| c.shares.clear()), k);
        assert_ne!(changed(&|c| c.shares[0].read_only = false), k);
        assert_ne!(
            changed(&|c| {
                c.disks.remove(0);
            }),
            k
        );
        // A rewritten lower disk is another template.
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&s.disks[0].path, "new contents").unwrap();
        assert_ne!(key(&s).key, k);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_failures_of_the_restore_itself_condemn_a_template() {
        assert!(refused_before_restoring(&Error::Unconfined(
            "no user namespaces".into()
        )));
        assert!(refused_before_restoring(&Error::QemuMissing("qemu".into())));
        assert!(!refused_before_restoring(&Error::QemuDied {
            status: "exit status: 1".into(),
            log: "qemu: Unknown savevm section".into(),
        }));
        assert!(!refused_before_restoring(&Error::Template("bad".into())));
    }

    #[test]
    fn tidying_keeps_the_newest_within_count_and_bytes() {
        let info = |key: &str, age: u64, bytes: u64, stale: bool| TemplateInfo {
            meta: TemplateMeta {
                key: key.into(),
                created: 0,
                memory_mb: 256,
                cpus: 1,
                network: true,
                shares: 0,
                files: Vec::new(),
            },
            dir: PathBuf::from(key),
            bytes,
            stale,
            last_used: UNIX_EPOCH + std::time::Duration::from_secs(1000 - age),
        };
        let keys = |v: Vec<TemplateInfo>| {
            let mut k: Vec<String> = v.into_iter().map(|t| t.meta.key).collect();
            k.sort();
            k
        };
        let all = || {
            vec![
                info("a", 1, 60, false),
                info("b", 2, 60, false),
                info("c", 3, 60, true),
                info("d", 4, 10, false),
            ]
        };
        // Count: the two most recently used usable ones stay.
        assert_eq!(keys(doomed(all(), 2, u64::MAX)), ["c", "d"]);
        // Bytes: 60 + 60 is over 100; d still fits after a.
        assert_eq!(keys(doomed(all(), 16, 100)), ["b", "c"]);
        // The newest stays even when it alone is over the cap.
        assert_eq!(keys(doomed(all(), 16, 1)), ["b", "c", "d"]);
    }

    #[test]
    fn publish_list_stale_and_remove() {
        let d = scratch("life");
        let cache = d.join("cache");
        let s = spec(&d);
        let meta = key_with(&s, d.join("vmlinux"));
        let publish = || {
            let b = Building::start(&cache).unwrap();
            fs::write(ram(&b.tmp), "ram").unwrap();
            fs::write(state(&b.tmp), "state").unwrap();
            b.publish(&cache, meta.clone()).unwrap()
        };
        let first = publish();
        // A second builder of the same key loses quietly.
        assert_eq!(publish(), first);
        assert_eq!(find(&cache, &meta.key), Some(first.clone()));
        let listed = list(&cache).unwrap();
        assert_eq!(listed.len(), 1);
        assert!(!listed[0].stale);
        // No build directories are left behind.
        assert_eq!(fs::read_dir(dir(&cache)).unwrap().count(), 1);
        fs::write(&s.disks[0].path, "rewritten").unwrap();
        assert!(list(&cache).unwrap()[0].stale);
        assert!(remove(&cache, &meta.key).unwrap());
        assert!(!remove(&cache, &meta.key).unwrap());
        assert!(!remove(&cache, "../escape").unwrap());
        assert!(list(&cache).unwrap().is_empty());
        fs::remove_dir_all(&d).unwrap();
    }
}
