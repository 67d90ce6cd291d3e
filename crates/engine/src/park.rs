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
//! until they write them ([`into_ram_file`]). The saved guest only runs on what made it: the same QEMU,
//! kernel and initramfs (by content, so rebuilding caches does not matter),
//! accelerator and CPU model, resources and device shapes, and the same
//! read-only disks (by file identity). A restore compares them first and
//! starts nothing on a difference.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::template::identity;
use crate::{paths, Error, MemoryFile, RunDir, Vm, VmSpec};

/// Bumped when what a park directory holds or how it is used changes.
const FORMAT: u32 = 1;

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
    pub fingerprint: Fingerprint,
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
    let ram_file = meta.ram_file.then(|| ram(dir));
    for file in [state(dir), disk(dir)].into_iter().chain(ram_file) {
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
        fingerprint: Fingerprint::of(spec)?,
    })
}

/// Turns the park directory `dir`, saved by [`Vm::save_all`] from a guest
/// run as `spec`, into RAM-file form: a capture VM, never run, loads the
/// saved stream into `ram` (shared) and saves its device state apart, as
/// a template is saved. Its logs go to a run directory `name`d under
/// `cache`, removed with it.
pub(crate) fn into_ram_file(
    spec: &VmSpec,
    meta: &mut ParkMeta,
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
    fs::rename(&devices, state(dir)).map_err(Error::io("rename", &devices))?;
    meta.ram_file = true;
    write_meta(dir, meta)
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
}
