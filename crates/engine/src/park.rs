//! Parking: a running guest saved to a directory with QEMU ended, and
//! started again from it, any number of times (see [`crate::Machine::park`]
//! and [`crate::Engine::restore`]).
//!
//! A park directory holds `state` (QEMU's migration stream: the device
//! state and every page of the guest's RAM), `disk.img` (the writable disk
//! as it was when the guest stopped) and `engine.json` (the
//! [`ParkMeta`]). A branch's saved copy is in RAM-file form instead, as a
//! template is: `ram` holds the guest's memory and `state` only the device
//! state, so that its children map `ram` privately and share its pages
//! until they write them ([`into_ram_file`]). A park of a guest started
//! from a template keeps only what differs from the template's RAM
//! ([`into_template_diff`]): `ram.pages`, a bitmap of the pages that
//! differ, and `ram.diff`, a sparse file holding just those pages; a
//! restore rebuilds the RAM file from the two ([`rebuild_ram`]) and needs
//! the template unchanged. The saved guest only runs on what made it: the same QEMU,
//! kernel and initramfs (by content, so rebuilding caches does not matter),
//! accelerator and CPU model, resources and device shapes, and the same
//! read-only disks (by file identity). A restore compares them first and
//! starts nothing on a difference.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cmdline::ram_block_id;
use crate::migstream::{self, SplitError};
use crate::template::identity;
use crate::{confine, files, paths, Error, MemoryFile, RunDir, Vm, VmSpec};

/// Bumped when what a park directory holds or how it is used changes.
const FORMAT: u32 = 3;

/// The migration stream.
pub(crate) fn state(dir: &Path) -> PathBuf {
    dir.join("state")
}

/// The writable disk.
pub(crate) fn disk(dir: &Path) -> PathBuf {
    dir.join("disk.img")
}

/// The guest's memory, in RAM-file form.
pub(crate) fn ram(dir: &Path) -> PathBuf {
    dir.join("ram")
}

/// The pages of the guest's memory that differ from its template's, at
/// their offsets (a sparse file).
fn ram_diff(dir: &Path) -> PathBuf {
    dir.join("ram.diff")
}

/// One bit per page of guest memory: set where `ram.diff` holds it.
fn ram_pages(dir: &Path) -> PathBuf {
    dir.join("ram.pages")
}

/// The unit of comparison with the template.
const PAGE: usize = 4096;

fn meta_path(dir: &Path) -> PathBuf {
    dir.join("engine.json")
}

/// What a park directory's guest depends on, kept with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ParkMeta {
    pub format: u32,
    /// The guest's RAM was file-backed (a warm start), which QEMU names
    /// differently from anonymous RAM: the restore must name it alike.
    pub named_ram: bool,
    /// The network interface was switched off
    /// ([`crate::Machine::set_network_enabled`]): it stays off in every
    /// restore, from its first instruction.
    pub network_off: bool,
    /// In RAM-file form: the memory is in `ram`, `state` holds the rest.
    #[serde(default)]
    pub ram_file: bool,
    /// The memory is this template's with `ram.diff` over it.
    #[serde(default)]
    pub template: Option<TemplateRam>,
    pub fingerprint: Fingerprint,
}

/// The template RAM file a park's memory is kept against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TemplateRam {
    pub ram: PathBuf,
    /// Its file identity when parked: a template rebuilt or removed since
    /// is another file.
    pub identity: String,
}

/// Everything the saved guest's memory and devices depend on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fingerprint {
    /// sha256 of the QEMU binary, and its version line.
    pub qemu: String,
    pub qemu_version: String,
    /// sha256 of the guest kernel.
    pub kernel: String,
    /// sha256 of the initramfs (which holds the agent).
    pub initramfs: String,
    pub accel: String,
    pub cpu: String,
    pub memory_mb: u32,
    pub cpus: u32,
    pub network: bool,
    pub shares: usize,
    /// Identities of the read-only disks, in order.
    pub lowers: Vec<String>,
}

impl Fingerprint {
    /// The fingerprint of a guest started from `spec` on this host.
    pub(crate) fn of(spec: &VmSpec) -> Result<Fingerprint, Error> {
        let qemu = paths::qemu()?;
        Ok(Fingerprint {
            qemu: content_hash(&qemu)?,
            qemu_version: crate::qemu_version()?,
            kernel: content_hash(&spec.kernel)?,
            initramfs: content_hash(&spec.initrd)?,
            accel: format!("{:?}", spec.accel),
            cpu: crate::cmdline::cpu_model(spec.accel).to_string(),
            memory_mb: spec.memory_mb,
            cpus: spec.cpus,
            network: spec.network.is_some(),
            shares: spec.shares.len(),
            lowers: spec
                .disks
                .iter()
                .filter(|d| d.read_only)
                .map(|d| identity(&d.path))
                .collect(),
        })
    }

    /// Says what differs between a park made with `self` and this host's
    /// `now`, naming the first difference; `None` when they are equal.
    pub(crate) fn difference(&self, now: &Fingerprint) -> Option<String> {
        let (Ok(serde_json::Value::Object(was)), Ok(serde_json::Value::Object(is))) =
            (serde_json::to_value(self), serde_json::to_value(now))
        else {
            return (self != now).then(|| "the host differs".to_string());
        };
        was.iter().find_map(|(name, a)| {
            let b = &is[name];
            (a != b).then(|| format!("parked with {name} {a}, this host has {b}"))
        })
    }
}

/// Writes `meta` into the park directory `dir`.
pub(crate) fn write_meta(dir: &Path, meta: &ParkMeta) -> Result<(), Error> {
    let path = meta_path(dir);
    let json = serde_json::to_vec_pretty(meta).map_err(|e| Error::Io {
        op: "encode",
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    fs::write(&path, json).map_err(Error::io("write", &path))
}

/// Reads the park directory `dir`'s meta; a directory that is not a park
/// of this format is [`Error::Parked`].
pub(crate) fn read_meta(dir: &Path) -> Result<ParkMeta, Error> {
    let path = meta_path(dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::Parked(format!(
                "{} is not a parked instance",
                dir.display()
            )))
        }
        Err(e) => return Err(Error::io("read", &path)(e)),
    };
    let meta: ParkMeta = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Parked(format!("{}: {e}", path.display())))?;
    if meta.format != FORMAT {
        return Err(Error::Parked(format!(
            "{} was parked in format {}, this build reads {FORMAT}",
            dir.display(),
            meta.format
        )));
    }
    let memory = match (&meta.template, meta.ram_file) {
        (Some(_), _) => vec![ram_diff(dir), ram_pages(dir)],
        (None, true) => vec![ram(dir)],
        (None, false) => Vec::new(),
    };
    for file in [state(dir), disk(dir)].into_iter().chain(memory) {
        if !file.is_file() {
            return Err(Error::Parked(format!("{} is missing", file.display())));
        }
    }
    Ok(meta)
}

/// The meta of a park of a guest started from `spec`.
pub(crate) fn meta_of(
    spec: &VmSpec,
    named_ram: bool,
    network_off: bool,
) -> Result<ParkMeta, Error> {
    Ok(ParkMeta {
        format: FORMAT,
        named_ram,
        network_off,
        ram_file: false,
        template: None,
        fingerprint: Fingerprint::of(spec)?,
    })
}

/// Turns the park directory `dir`, in RAM-file form, into a diff against
/// the template RAM file `template`: the pages that differ go to
/// `ram.diff` (all-zero ones stay holes) and their bits to `ram.pages`,
/// and `ram` is removed.
pub(crate) fn into_template_diff(
    meta: &mut ParkMeta,
    dir: &Path,
    template: &Path,
) -> Result<(), Error> {
    let full_path = ram(dir);
    let full = fs::File::open(&full_path).map_err(Error::io("open", &full_path))?;
    let base = fs::File::open(template).map_err(Error::io("open", template))?;
    let len = full
        .metadata()
        .map_err(Error::io("stat", &full_path))?
        .len();
    let base_len = base.metadata().map_err(Error::io("stat", template))?.len();
    if len != base_len || len % PAGE as u64 != 0 {
        return Err(Error::Parked(format!(
            "the guest's memory ({len} bytes) does not match its template's ({base_len})"
        )));
    }
    let diff_path = ram_diff(dir);
    let diff = crate::vm::create_private(&diff_path)?;
    diff.set_len(len).map_err(Error::io("size", &diff_path))?;
    let pages = (len / PAGE as u64) as usize;
    let mut bits = vec![0u8; pages.div_ceil(8)];
    let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut offset = 0u64;
    while offset < len {
        let n = CHUNK.min((len - offset) as usize);
        // Holes in both files are zeros in both: most of an idle guest's
        // memory, skipped without reading.
        let end = offset + n as u64;
        if next_data(&full, offset) >= end && next_data(&base, offset) >= end {
            offset = end;
            continue;
        }
        full.read_exact_at(&mut a[..n], offset)
            .map_err(Error::io("read", &full_path))?;
        base.read_exact_at(&mut b[..n], offset)
            .map_err(Error::io("read", template))?;
        for (i, (page, was)) in a[..n].chunks(PAGE).zip(b[..n].chunks(PAGE)).enumerate() {
            if page == was {
                continue;
            }
            let at = offset + (i * PAGE) as u64;
            let index = (at / PAGE as u64) as usize;
            bits[index / 8] |= 1 << (index % 8);
            if page.iter().any(|&x| x != 0) {
                diff.write_all_at(page, at)
                    .map_err(Error::io("write", &diff_path))?;
            }
        }
        offset += n as u64;
    }
    let pages_path = ram_pages(dir);
    fs::write(&pages_path, &bits).map_err(Error::io("write", &pages_path))?;
    fs::remove_file(&full_path).map_err(Error::io("remove", &full_path))?;
    meta.template = Some(TemplateRam {
        ram: template.to_path_buf(),
        identity: identity(template),
    });
    write_meta(dir, meta)
}

/// Bytes compared or copied per read.
const CHUNK: usize = 1 << 20;

/// The offset of the first data at or after `offset` in `file`; `u64::MAX`
/// when only a hole follows, and `offset` when the filesystem cannot say.
fn next_data(file: &fs::File, offset: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let Ok(at) = i64::try_from(offset) else {
        return offset;
    };
    // SAFETY: lseek on an open descriptor with a valid whence.
    let found = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
    if found >= 0 {
        found as u64
    } else if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
        u64::MAX
    } else {
        offset
    }
}

/// Makes `dst` the memory of the park `dir` kept against template `t`:
/// a copy of the template's RAM file with the park's pages written over
/// it. A template gone or changed since the park is [`Error::Parked`].
pub(crate) fn rebuild_ram(t: &TemplateRam, dir: &Path, dst: &Path) -> Result<(), Error> {
    if identity(&t.ram) != t.identity {
        return Err(Error::Parked(format!(
            "its template {} is gone or was rebuilt",
            t.ram.display()
        )));
    }
    files::clone_file(&t.ram, dst).map_err(Error::io("copy", dst))?;
    let out = fs::File::options()
        .write(true)
        .open(dst)
        .map_err(Error::io("open", dst))?;
    // Owned as the template's: by QEMU's own user when it runs as one,
    // which opens the file again by its descriptor's path.
    let owner = fs::metadata(&t.ram).map_err(Error::io("stat", &t.ram))?;
    std::os::unix::fs::fchown(&out, Some(owner.uid()), Some(owner.gid()))
        .map_err(Error::io("chown", dst))?;
    let diff_path = ram_diff(dir);
    let diff = fs::File::open(&diff_path).map_err(Error::io("open", &diff_path))?;
    let pages_path = ram_pages(dir);
    let bits = fs::read(&pages_path).map_err(Error::io("read", &pages_path))?;
    let mut page = vec![0u8; PAGE];
    for (byte, &set) in bits.iter().enumerate().filter(|(_, &b)| b != 0) {
        for bit in (0..8).filter(|bit| set & (1 << bit) != 0) {
            let at = ((byte * 8 + bit) * PAGE) as u64;
            diff.read_exact_at(&mut page, at)
                .map_err(Error::io("read", &diff_path))?;
            out.write_all_at(&page, at)
                .map_err(Error::io("write", dst))?;
        }
    }
    Ok(())
}

/// Turns the park directory `dir`, saved by [`Vm::save_all`] from a guest
/// run as `spec`, into RAM-file form: `ram` holds the guest's memory
/// (shared by whatever maps it) and `state` only the device state, as a
/// template is saved. `split` is how [`Splitting`] fared with the stream;
/// one it could not read, or did not try, is loaded by a capture VM, never
/// run, which saves its device state apart. Its logs go to a run directory `name`d
/// under `cache`, removed with it.
pub(crate) fn into_ram_file(
    spec: &VmSpec,
    meta: &mut ParkMeta,
    dir: &Path,
    split: Option<Result<(), SplitError>>,
    cache: &Path,
    name: &str,
) -> Result<(), Error> {
    match split {
        Some(Ok(())) => {}
        None => capture(spec, meta, dir, cache, name)?,
        Some(Err(SplitError::Unsupported(why))) => {
            tracing::debug!("saved guest loaded by QEMU instead: {why}");
            capture(spec, meta, dir, cache, name)?;
        }
        Some(Err(e)) => {
            return Err(Error::Parked(format!(
                "the saved guest cannot be split: {e}"
            )))
        }
    }
    meta.ram_file = true;
    write_meta(dir, meta)
}

/// A split of a park directory's `state` into `ram` and the device state
/// ([`migstream`]), read as QEMU writes it: the save and the split overlap.
#[derive(Debug)]
pub(crate) struct Splitting {
    save: Arc<SaveProgress>,
    thread: Option<JoinHandle<Result<(), SplitError>>>,
}

/// How far the save the split follows has got.
#[derive(Debug, Default)]
struct SaveProgress {
    /// 0 while QEMU writes, then [`WRITTEN`] or [`ABANDONED`].
    state: AtomicU8,
}

const WRITTEN: u8 = 1;
const ABANDONED: u8 = 2;

impl Splitting {
    /// Starts splitting `dir`'s `state`, about to be written by a save of
    /// a guest run as `spec`.
    pub(crate) fn start(spec: &VmSpec, named_ram: bool, dir: &Path) -> Result<Splitting, Error> {
        let save = Arc::new(SaveProgress::default());
        let (progress, spec, dir2) = (save.clone(), spec.clone(), dir.to_path_buf());
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let thread = std::thread::Builder::new()
            .name("cc-split".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    tracing::debug_span!("engine: split the saved guest into a RAM file")
                        .in_scope(|| split_state(&spec, named_ram, &dir2, &progress))
                })
            })
            .map_err(Error::io("spawn", dir))?;
        Ok(Splitting {
            save,
            thread: Some(thread),
        })
    }

    /// Waits for the split once the save ended, `saved` or not.
    pub(crate) fn finish(mut self, saved: bool) -> Result<(), SplitError> {
        self.end(if saved { WRITTEN } else { ABANDONED })
    }

    fn end(&mut self, how: u8) -> Result<(), SplitError> {
        self.save.state.store(how, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(done)) => done,
            Some(Err(_)) => Err(SplitError::Malformed("the split panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Splitting {
    fn drop(&mut self) {
        let _ = self.end(ABANDONED);
    }
}

/// Reads a file as it is written, to its end once the writer is done.
struct Follow<'a> {
    file: fs::File,
    save: &'a SaveProgress,
}

impl io::Read for Follow<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // The state is read before the file: once written, a read
            // that finds nothing is the end.
            let state = self.save.state.load(Ordering::Acquire);
            let n = self.file.read(buf)?;
            if n > 0 || state == WRITTEN {
                return Ok(n);
            }
            if state == ABANDONED {
                return Err(io::Error::other("the save failed"));
            }
            std::thread::sleep(FOLLOW_POLL);
        }
    }
}

/// How long a split waits for QEMU to write more.
const FOLLOW_POLL: Duration = Duration::from_micros(500);

/// Splits `state` into `ram` and the device state, which replaces it.
fn split_state(
    spec: &VmSpec,
    named_ram: bool,
    dir: &Path,
    save: &SaveProgress,
) -> Result<(), SplitError> {
    let state_path = state(dir);
    let devices_path = dir.join("state.devices");
    let ram_path = ram(dir);
    let split = || -> Result<(), SplitError> {
        // Created by the save: until then there is nothing to read.
        let file = loop {
            match fs::File::open(&state_path) {
                Ok(f) => break f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if save.state.load(Ordering::Acquire) != 0 {
                        return Err(e.into());
                    }
                    std::thread::sleep(FOLLOW_POLL);
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut stream = io::BufReader::with_capacity(CHUNK, Follow { file, save });
        let ram = crate::vm::create_private(&ram_path).map_err(io::Error::other)?;
        // QEMU opens it again by its descriptor's path, as its own user.
        let creds = confine::creds(spec.confine, !spec.shares.is_empty());
        if creds.switch {
            std::os::unix::fs::fchown(&ram, Some(creds.uid), Some(creds.gid))?;
        }
        let mut devices = io::BufWriter::new(fs::File::create(&devices_path)?);
        migstream::split(&mut stream, ram_block_id(!named_ram), &ram, &mut devices)?;
        devices.into_inner().map_err(|e| e.into_error())?;
        fs::rename(&devices_path, &state_path)?;
        Ok(())
    };
    let done = split();
    if done.is_err() {
        let _ = fs::remove_file(&devices_path);
        let _ = fs::remove_file(&ram_path);
    }
    done
}

/// Loads `state` into `ram` in a capture VM and saves its device state
/// apart.
fn capture(
    spec: &VmSpec,
    meta: &ParkMeta,
    dir: &Path,
    cache: &Path,
    name: &str,
) -> Result<(), Error> {
    let run = RunDir::create(cache, name)?;
    let mut capture = spec.clone();
    capture.memory_file = Some(MemoryFile {
        path: ram(dir),
        shared: true,
        anonymous_name: !meta.named_ram,
    });
    capture.named_ram = false;
    capture.incoming = true;
    // The capture never runs: it may open the saved disk, not the guest's.
    for d in capture.disks.iter_mut().filter(|d| !d.read_only) {
        d.path = disk(dir);
        d.backing = None;
    }
    let (vm, agent) = Vm::start(&capture, &run)?;
    tracing::debug_span!("engine: load the saved guest into a RAM file")
        .in_scope(|| vm.receive(&state(dir)))?;
    let devices = dir.join("state.devices");
    // The agent channel stays connected until the save: the saved device
    // state says so, as the children's will.
    tracing::debug_span!("engine: save the device state apart")
        .in_scope(|| vm.save_template(&devices))?;
    drop(vm);
    drop(agent);
    fs::rename(&devices, state(dir)).map_err(Error::io("rename", &devices))
}

/// Fails unless a guest parked with `meta` can run as `spec` on this host.
pub(crate) fn check(meta: &ParkMeta, spec: &VmSpec) -> Result<(), Error> {
    match meta.fingerprint.difference(&Fingerprint::of(spec)?) {
        Some(why) => Err(Error::Parked(why)),
        None => Ok(()),
    }
}

/// sha256 of `path`'s contents, remembered per file identity: kernel,
/// initramfs and QEMU are tens of MiB, hashed once per process.
fn content_hash(path: &Path) -> Result<String, Error> {
    static KNOWN: Mutex<Option<HashMap<(PathBuf, String), String>>> = Mutex::new(None);
    let key = (path.to_path_buf(), identity(path));
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(hash) = known.get_or_insert_with(HashMap::new).get(&key) {
        return Ok(hash.clone());
    }
    let mut file = fs::File::open(path).map_err(Error::io("open", path))?;
    let mut h = Sha256::new();
    io::copy(&mut file, &mut h).map_err(Error::io("read", path))?;
    let hash: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    known
        .get_or_insert_with(HashMap::new)
        .insert(key, hash.clone());
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint() -> Fingerprint {
        Fingerprint {
            qemu: "q1".into(),
            qemu_version: "QEMU 7.2".into(),
            kernel: "k1".into(),
            initramfs: "i1".into(),
            accel: "Tcg".into(),
            cpu: "max".into(),
            memory_mb: 512,
            cpus: 1,
            network: true,
            shares: 0,
            lowers: vec!["1:2:3:4.5".into()],
        }
    }

    #[test]
    fn a_difference_names_what_changed() {
        let was = fingerprint();
        assert_eq!(was.difference(&fingerprint()), None);
        let mut now = fingerprint();
        now.kernel = "k2".into();
        assert_eq!(
            was.difference(&now).as_deref(),
            Some("parked with kernel \"k1\", this host has \"k2\"")
        );
        now.memory_mb = 256;
        assert!(was.difference(&now).is_some());
    }

    #[test]
    fn a_park_keeps_only_the_pages_that_differ_from_its_template() {
        let d = std::env::temp_dir().join(format!("cc-park-diff-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let template = d.join("template-ram");
        let pages = 600;
        let mut base = vec![0u8; pages * PAGE];
        for (i, page) in base
            .chunks_mut(PAGE)
            .enumerate()
            .filter(|(i, _)| i % 3 == 0)
        {
            page.fill(i as u8 | 1);
        }
        // Changed: a page written, one zeroed, one filled where the
        // template has zeros.
        let mut guest = base.clone();
        guest[5 * PAGE + 7] = 0xee;
        guest[3 * PAGE..4 * PAGE].fill(0);
        guest[500 * PAGE..501 * PAGE].fill(0x42);
        // Then a megabyte-aligned stretch of holes in both, with one page
        // of the guest's written in it.
        let aligned = pages.next_multiple_of(CHUNK / PAGE);
        let total = aligned + 2 * CHUNK / PAGE;
        let extended = |bytes: &mut Vec<u8>| bytes.resize(total * PAGE, 0);
        extended(&mut base);
        extended(&mut guest);
        let late = aligned + CHUNK / PAGE + 44;
        guest[late * PAGE..(late + 1) * PAGE].fill(0x17);
        for (path, bytes) in [(&template, &base), (&ram(&d), &guest)] {
            let f = fs::File::create(path).unwrap();
            f.set_len(bytes.len() as u64).unwrap();
            for (i, page) in bytes.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    f.write_all_at(page, (i * PAGE) as u64).unwrap();
                }
            }
        }
        let mut meta = ParkMeta {
            format: FORMAT,
            named_ram: true,
            network_off: false,
            ram_file: true,
            template: None,
            fingerprint: fingerprint(),
        };
        into_template_diff(&mut meta, &d, &template).unwrap();
        assert!(!ram(&d).exists());
        let bits = fs::read(ram_pages(&d)).unwrap();
        let set: Vec<usize> = (0..total)
            .filter(|i| bits[i / 8] & (1 << (i % 8)) != 0)
            .collect();
        assert_eq!(set, [3, 5, 500, late]);
        use std::os::unix::fs::MetadataExt;
        let diff_bytes = fs::metadata(ram_diff(&d)).unwrap().blocks() * 512;
        assert!(diff_bytes <= 5 * PAGE as u64, "{diff_bytes}");
        assert_eq!(read_meta_unchecked(&d).template, meta.template);
        let t = meta.template.clone().unwrap();
        let rebuilt = d.join("rebuilt");
        rebuild_ram(&t, &d, &rebuilt).unwrap();
        assert!(
            fs::read(&rebuilt).unwrap() == guest,
            "rebuilt memory differs"
        );
        // A template rebuilt since (another file) is refused.
        fs::remove_file(&template).unwrap();
        fs::write(&template, &base).unwrap();
        let err = rebuild_ram(&t, &d, &rebuilt).unwrap_err();
        assert!(matches!(err, Error::Parked(_)), "{err}");
        assert!(err.to_string().contains("template"), "{err}");
        fs::remove_dir_all(&d).unwrap();
    }

    fn read_meta_unchecked(d: &Path) -> ParkMeta {
        serde_json::from_slice(&fs::read(meta_path(d)).unwrap()).unwrap()
    }

    #[test]
    fn bad_park_directories_are_refused_before_anything_starts() {
        let d = std::env::temp_dir().join(format!("cc-park-meta-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let err = read_meta(&d).unwrap_err().to_string();
        assert!(err.contains("is not a parked instance"), "{err}");
        fs::write(meta_path(&d), b"{not json").unwrap();
        assert!(matches!(read_meta(&d), Err(Error::Parked(_))));
        let mut meta = ParkMeta {
            format: FORMAT + 1,
            named_ram: true,
            network_off: false,
            ram_file: false,
            template: None,
            fingerprint: fingerprint(),
        };
        write_meta(&d, &meta).unwrap();
        let err = read_meta(&d).unwrap_err().to_string();
        assert!(err.contains("format"), "{err}");
        meta.format = FORMAT;
        write_meta(&d, &meta).unwrap();
        let err = read_meta(&d).unwrap_err().to_string();
        assert!(err.contains("state is missing"), "{err}");
        fs::write(state(&d), b"s").unwrap();
        fs::write(disk(&d), b"d").unwrap();
        assert_eq!(read_meta(&d).unwrap(), meta);
        meta.ram_file = true;
        write_meta(&d, &meta).unwrap();
        let err = read_meta(&d).unwrap_err().to_string();
        assert!(err.contains("ram is missing"), "{err}");
        fs::write(ram(&d), b"r").unwrap();
        assert_eq!(read_meta(&d).unwrap(), meta);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_follow_reads_what_is_written_until_the_save_ends() {
        use std::io::{Read, Write};
        let d = std::env::temp_dir().join(format!("cc-follow-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let path = d.join("state");
        let mut writer = fs::File::create(&path).unwrap();
        let save = Arc::new(SaveProgress::default());
        let reader = {
            let (save, path) = (save.clone(), path.clone());
            std::thread::spawn(move || {
                let file = fs::File::open(&path).unwrap();
                let mut got = Vec::new();
                let r = Follow { file, save: &save }.read_to_end(&mut got);
                (r.map_err(|e| e.to_string()), got)
            })
        };
        for chunk in [&b"abc"[..], b"", b"defg"] {
            writer.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        writer.write_all(b"h").unwrap();
        save.state.store(WRITTEN, Ordering::Release);
        assert_eq!(reader.join().unwrap(), (Ok(8), b"abcdefgh".to_vec()));

        // An abandoned save ends the read with an error, not a hang.
        let save = Arc::new(SaveProgress::default());
        let waiting = {
            let (save, path) = (save.clone(), path.clone());
            std::thread::spawn(move || {
                let file = fs::File::open(&path).unwrap();
                let mut all = Vec::new();
                Follow { file, save: &save }.read_to_end(&mut all).is_err()
            })
        };
        std::thread::sleep(Duration::from_millis(5));
        save.state.store(ABANDONED, Ordering::Release);
        assert!(waiting.join().unwrap());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_split_of_a_save_that_never_began_ends_when_it_is_abandoned() {
        let d = std::env::temp_dir().join(format!("cc-split-none-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let spec = crate::template::tests::spec(&d);
        let splitting = Splitting::start(&spec, true, &d).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(splitting.finish(false), Err(SplitError::Io(_))));
        assert!(!ram(&d).exists() && !d.join("state.devices").exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
