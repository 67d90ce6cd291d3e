//! What the shim leaves in the bundle for containerd's cleanup after a
//! dead shim (`shim delete`): the VM's run dir and QEMU's pid.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE: &str = "crumble-state.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub run_dir: Option<PathBuf>,
    pub vm_pid: u32,
}

impl ShimState {
    pub fn save(&self, bundle: &Path) -> io::Result<()> {
        let json = serde_json::to_vec(self).map_err(io::Error::other)?;
        std::fs::write(bundle.join(FILE), json)
    }

    pub fn load(bundle: &Path) -> io::Result<ShimState> {
        let json = std::fs::read(bundle.join(FILE))?;
        serde_json::from_slice(&json).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Forgets the state: the VM is gone.
pub fn remove(bundle: &Path) {
    let _ = std::fs::remove_file(bundle.join(FILE));
}

/// Detaches whatever is mounted at `path` (nothing there is fine).
pub fn unmount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 reads a NUL-terminated path we own.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Mounts one of containerd's rootfs mounts (an overlay of snapshots, or
/// a bind) at `target`. Here rather than the shim framework's
/// `mount_rootfs`, which forks and waits through the reaper this shim
/// turns off.
pub fn mount(typ: &str, source: &str, options: &[String], target: &Path) -> io::Result<()> {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= libc::MS_BIND,
            "rbind" => flags |= libc::MS_BIND | libc::MS_REC,
            other => data.push(other),
        }
    }
    let c = |s: &str| {
        std::ffi::CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (source, typ, data) = (c(source)?, c(typ)?, c(&data.join(","))?);
    let target = c(&target.to_string_lossy())?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            typ.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The bundle's directory of staged file binds, one subdirectory each.
pub const FILE_BINDS: &str = "crumble-binds";

/// Stages host file `source` as the only entry of a fresh directory
/// `bundle/crumble-binds/<index>`, so that directory can be shared with
/// the guest without the file's siblings: a hard link where the file's
/// filesystem allows one, a bind of the file otherwise. Returns the
/// directory and the file's name in it.
pub fn stage_file(bundle: &Path, index: usize, source: &Path) -> io::Result<(PathBuf, String)> {
    let dir = bundle.join(FILE_BINDS).join(index.to_string());
    std::fs::create_dir_all(&dir)?;
    let name = source
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let staged = dir.join(&name);
    if std::fs::hard_link(source, &staged).is_err() {
        std::fs::File::create(&staged)?;
        let src = source.to_string_lossy();
        mount("none", &src, &["bind".into()], &staged)?;
    }
    Ok((dir, name))
}

/// Removes the staged file binds: each file's bind (if any) is detached
/// before its name is removed, so nothing is removed through a mount.
pub fn remove_staged_files(bundle: &Path) {
    let root = bundle.join(FILE_BINDS);
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return;
    };
    for dir in dirs.flatten() {
        for file in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            unmount(&file.path());
            let _ = std::fs::remove_file(file.path());
        }
        let _ = std::fs::remove_dir(dir.path());
    }
    let _ = std::fs::remove_dir(&root);
}

/// The layers of an overlay rootfs mount whose upper dir is empty (a
/// container's fresh snapshot), uppermost first; `None` for anything else.
pub fn fresh_overlay_lowers(
    typ: &str,
    options: &[String],
    empty: impl Fn(&Path) -> bool,
) -> Option<Vec<String>> {
    if typ != "overlay" {
        return None;
    }
    let value = |key: &str| options.iter().find_map(|o| o.strip_prefix(key));
    let lowers: Vec<String> = value("lowerdir=")?
        .split(':')
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let upper_empty = value("upperdir=").is_none_or(|u| empty(Path::new(u)));
    (!lowers.is_empty() && upper_empty).then_some(lowers)
}

/// Whether `dir` is a directory with nothing in it.
pub fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

/// After the shim died: ends a QEMU that is still there (it normally died
/// with the shim) and removes the VM's run dir and the rootfs mount. Run
/// in the bundle.
pub fn clean_up_after_dead_shim(bundle: &Path) -> ShimState {
    unmount(&bundle.join("rootfs"));
    remove_staged_files(bundle);
    let Ok(st) = ShimState::load(bundle) else {
        return ShimState {
            run_dir: None,
            vm_pid: 0,
        };
    };
    if let Some(run_dir) = &st.run_dir {
        if st.vm_pid > 0 && qemu_of(st.vm_pid, run_dir) {
            // SAFETY: kill with a pid and a signal number has no memory effects.
            unsafe { libc::kill(st.vm_pid as i32, libc::SIGKILL) };
        }
        // The run dir holds no mounts (the VM's host directories are
        // passed to QEMU by descriptor), so removing it crosses none.
        let _ = std::fs::remove_dir_all(run_dir);
    }
    remove(bundle);
    st
}

/// Whether `pid` is still the QEMU of this run dir (not a reused pid).
fn qemu_of(pid: u32, run_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let dir = run_dir.as_os_str().as_encoded_bytes();
    cmdline.windows(dir.len()).any(|w| w == dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_overlays_are_read_through_their_layers() {
        let opts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let snapshot = opts(&[
            "index=off",
            "workdir=/s/2/work",
            "upperdir=/s/2/fs",
            "lowerdir=/s/1/fs:/s/0/fs",
        ]);
        assert_eq!(
            fresh_overlay_lowers("overlay", &snapshot, |_| true),
            Some(vec!["/s/1/fs".to_string(), "/s/0/fs".to_string()])
        );
        // A snapshot with writes in it is mounted whole.
        assert_eq!(fresh_overlay_lowers("overlay", &snapshot, |_| false), None);
        assert_eq!(
            fresh_overlay_lowers("bind", &opts(&["rbind"]), |_| true),
            None
        );
        assert_eq!(
            fresh_overlay_lowers("overlay", &opts(&["upperdir=/u"]), |_| true),
            None
        );
        assert_eq!(
            fresh_overlay_lowers("overlay", &opts(&["lowerdir="]), |_| true),
            None
        );
    }

    #[test]
    fn state_round_trips_and_cleanup_removes_it() {
        let bundle = std::env::temp_dir().join(format!("cc-shim-state-{}", std::process::id()));
        let run_dir = bundle.join("run");
        std::fs::create_dir_all(run_dir.join("sub")).unwrap();
        let st = ShimState {
            run_dir: Some(run_dir.clone()),
            vm_pid: u32::MAX,
        };
        st.save(&bundle).unwrap();
        assert_eq!(ShimState::load(&bundle).unwrap(), st);
        assert_eq!(clean_up_after_dead_shim(&bundle), st);
        assert!(!run_dir.exists());
        assert!(ShimState::load(&bundle).is_err());
        std::fs::remove_dir_all(&bundle).unwrap();
    }

    #[test]
    fn a_staged_file_is_alone_in_its_directory_and_removed_without_its_source() {
        let base = std::env::temp_dir().join(format!("cc-shim-stage-{}", std::process::id()));
        let (host, bundle) = (base.join("host"), base.join("bundle"));
        std::fs::create_dir_all(&host).unwrap();
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(host.join("f"), "data").unwrap();
        std::fs::write(host.join("sibling"), "private").unwrap();
        let (dir, name) = stage_file(&bundle, 0, &host.join("f")).unwrap();
        assert_eq!(name, "f");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"]);
        assert_eq!(std::fs::read_to_string(dir.join("f")).unwrap(), "data");
        remove_staged_files(&bundle);
        assert!(!bundle.join(FILE_BINDS).exists());
        assert_eq!(std::fs::read_to_string(host.join("f")).unwrap(), "data");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
