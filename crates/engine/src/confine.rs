//! Confinement of QEMU: what a guest that escapes into the VMM may do.
//!
//! Every QEMU this engine starts runs
//! - under QEMU's own seccomp filter (`-sandbox on,obsolete=deny,
//!   elevateprivileges=deny,spawn=deny,resourcecontrol=deny`): it cannot
//!   start processes, change credentials or use obsolete system calls;
//! - with `PR_SET_NO_NEW_PRIVS`, no capabilities, `RLIMIT_CORE` 0, a 077
//!   umask and only the descriptors it needs;
//! - as an unprivileged uid when the caller is root (an instance with host
//!   directory mounts keeps uid 0, without any capability, because serving
//!   those mounts needs the caller's own file access);
//! - inside bubblewrap's user, mount, PID, network, IPC, UTS and cgroup
//!   namespaces, where its root holds only its binary, the system library
//!   directories it loads from, its modules and firmware, `/dev` and
//!   `/proc`. Every other file reaches it as
//!   a descriptor the engine opened (`/proc/self/fd/N`, `/dev/fdset/N`), so
//!   nothing else of the host is visible.
//!
//! Bubblewrap (Debian's `bubblewrap`) does the namespaces: it is the tool
//! Flatpak trusts for the same job, it is small, and it costs ≈25 ms a
//! start against ≈210 ms for the same view built with `unshare` and one
//! `mount` per file (`shared/reference/confinement-measurements.md`).
//! Where the host cannot give a part (no bubblewrap, user namespaces
//! disabled, a QEMU built without seccomp), the VM still starts and the
//! part is listed in [`Confinement::gaps`]; [`ConfineMode::Strict`] turns
//! any gap into an error instead.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::template::identity;
use crate::{hostfacts, Error};

/// The uid and gid QEMU (and its network relay) run as when the caller is root:
/// `CC_SANDBOX_UID` (and `CC_SANDBOX_GID`, default the same number), else
/// this one. It is above the ranges Debian gives to users, system users,
/// systemd's dynamic users and the usual subordinate id blocks, so no file
/// on the host belongs to it.
pub const DEFAULT_SANDBOX_ID: u32 = 2_145_000_000;

/// How strictly to confine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConfineMode {
    /// Everything the host offers; what it cannot give is reported in
    /// [`Confinement::gaps`] and the VM starts anyway.
    #[default]
    BestEffort,
    /// Refuse to start when any part is unavailable.
    Strict,
    /// QEMU runs with the caller's rights (still with only the
    /// descriptors it needs): for measuring what confinement costs and
    /// for debugging, never for untrusted guests.
    Off,
}

impl std::str::FromStr for ConfineMode {
    type Err = String;

    /// `default`, `strict` or `off`.
    fn from_str(s: &str) -> Result<ConfineMode, String> {
        match s {
            "default" => Ok(ConfineMode::BestEffort),
            "strict" => Ok(ConfineMode::Strict),
            "off" => Ok(ConfineMode::Off),
            other => Err(format!(
                "confinement {other:?}: expected default, strict or off"
            )),
        }
    }
}

/// The confinement a VM runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// QEMU's seccomp filter is on.
    pub seccomp: bool,
    /// The host uid QEMU runs as.
    pub uid: u32,
    /// QEMU has its own user, mount, PID, network, IPC and UTS namespaces
    /// and sees only its own files.
    pub namespaces: bool,
    /// Guest traffic leaves only through the network relay behind the
    /// policy filter.
    pub network_filter: bool,
    /// What could not be applied, in words; empty when fully confined.
    pub gaps: Vec<String>,
}

impl Confinement {
    /// One line for logs and `crumble doctor`.
    pub fn summary(&self) -> String {
        let mut parts = vec![
            format!("seccomp {}", on_off(self.seccomp)),
            "no-new-privs on".to_string(),
            "capabilities none".to_string(),
            format!("uid {}", self.uid),
            format!("namespaces {}", on_off(self.namespaces)),
        ];
        if self.network_filter {
            parts.push("network filtered".into());
        }
        parts.join(", ")
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// What this host offers for confinement, probed once per process.
#[derive(Debug, Clone)]
pub struct HostSupport {
    /// Bubblewrap, when installed (`CC_BWRAP` overrides the path).
    pub bwrap: Option<PathBuf>,
    /// QEMU was built with seccomp (`-sandbox`).
    pub seccomp: bool,
    /// Bubblewrap can create user namespaces as the uid QEMU runs as.
    pub user_namespaces: bool,
    /// Why a part is missing, for `crumble doctor`.
    pub notes: Vec<String>,
}

/// The credentials QEMU gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Switch to `uid`/`gid` in the child (only when the caller is root).
    pub switch: bool,
    /// The caller is root and QEMU keeps uid 0: every capability must go.
    pub drop_root_caps: bool,
}

/// The credentials for a VM with or without host directory shares.
pub(crate) fn creds(mode: ConfineMode, has_shares: bool) -> Creds {
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid != 0 || mode == ConfineMode::Off {
        return Creds {
            uid: euid,
            gid: egid,
            switch: false,
            drop_root_caps: false,
        };
    }
    if has_shares {
        return Creds {
            uid: 0,
            gid: egid,
            switch: false,
            drop_root_caps: true,
        };
    }
    let (uid, gid) = sandbox_ids();
    Creds {
        uid,
        gid,
        switch: true,
        drop_root_caps: false,
    }
}

/// The unprivileged ids for QEMU and its network relay under a root caller.
pub fn sandbox_ids() -> (u32, u32) {
    let id = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    let uid = id("CC_SANDBOX_UID")
        .filter(|&u| u != 0)
        .unwrap_or(DEFAULT_SANDBOX_ID);
    let gid = id("CC_SANDBOX_GID").filter(|&g| g != 0).unwrap_or(uid);
    (uid, gid)
}

/// The host's confinement support (probed on first use, then cached).
pub fn host_support() -> &'static HostSupport {
    static SUPPORT: OnceLock<HostSupport> = OnceLock::new();
    SUPPORT.get_or_init(probe)
}

fn probe() -> HostSupport {
    let mut notes = Vec::new();
    let bwrap = tool("CC_BWRAP", "bwrap");
    if bwrap.is_none() {
        notes.push("bubblewrap not found (apt-get install bubblewrap, or set CC_BWRAP)".into());
    }
    let seccomp = match crate::paths::qemu() {
        Ok(qemu) => {
            let has = hostfacts::remembered(
                &hostfacts::dir(),
                "qemu-sandbox",
                &[qemu.display().to_string(), identity(&qemu)],
                || {
                    let help = Command::new(&qemu)
                        .arg("-help")
                        .stdin(Stdio::null())
                        .stderr(Stdio::null())
                        .output();
                    help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("-sandbox"))
                },
                |_| true,
            );
            if !has {
                notes.push(format!("{} was built without seccomp", qemu.display()));
            }
            has
        }
        Err(_) => false,
    };
    let user_namespaces = match &bwrap {
        // Only a success is kept: a failure may be mended (a sysctl, a
        // profile) without anything in the key changing.
        Some(bwrap) => match hostfacts::remembered(
            &hostfacts::dir(),
            "bwrap-userns",
            &userns_depends_on(bwrap),
            || userns_probe(bwrap),
            Result::is_ok,
        ) {
            Ok(()) => true,
            Err(why) => {
                notes.push(format!("bubblewrap cannot create namespaces here: {why}"));
                false
            }
        },
        None => false,
    };
    HostSupport {
        bwrap,
        seccomp,
        user_namespaces,
        notes,
    }
}

/// What decides whether bubblewrap can make namespaces here: the binary,
/// this boot, who asks, and the sysctls that allow or restrict them.
fn userns_depends_on(bwrap: &Path) -> Vec<String> {
    let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
    let mut facts = vec![
        bwrap.display().to_string(),
        identity(bwrap),
        read("/proc/sys/kernel/random/boot_id"),
        // SAFETY: geteuid has no preconditions.
        format!("euid {}", unsafe { libc::geteuid() }),
    ];
    for sysctl in [
        "/proc/sys/user/max_user_namespaces",
        "/proc/sys/kernel/unprivileged_userns_clone",
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
    ] {
        facts.push(format!("{sysctl} {}", read(sysctl)));
    }
    facts
}

/// Runs `true` in the same kind of sandbox QEMU gets, as the same uid.
fn userns_probe(bwrap: &Path) -> Result<(), String> {
    let creds = creds(ConfineMode::BestEffort, false);
    let mut cmd = Command::new(bwrap);
    // `--as-pid-1` as for QEMU: without it bubblewrap puts an init of its
    // own in the namespace, which outlives the outer bubblewrap and would
    // be left to a subreaper (or the host's init) to reap.
    cmd.args([
        "--unshare-all",
        "--unshare-user",
        "--die-with-parent",
        "--as-pid-1",
        "--ro-bind",
        "/",
        "/",
        "true",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let plan = ChildPlan::new(creds, Vec::new(), None);
    let mut plan = Some(plan);
    // SAFETY: the closure only runs ChildPlan::apply, which makes
    // async-signal-safe system calls and does not allocate.
    unsafe {
        cmd.pre_exec(move || match plan.as_mut() {
            Some(p) => p.apply(),
            None => Ok(()),
        });
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// `name` on `PATH`, or the path in the environment variable `var`.
fn tool(var: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The files QEMU needs in its sandbox: its binary, the directories of the
/// libraries it links, its modules and firmware (probed once with `ldd`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct QemuFiles {
    /// Read-only binds, each at the same path inside.
    pub binds: BTreeSet<PathBuf>,
    /// Top-level symlinks to recreate (`/lib` → `usr/lib` on merged-usr).
    pub symlinks: Vec<(PathBuf, PathBuf)>,
}

pub(crate) fn qemu_files(qemu: &Path) -> &'static QemuFiles {
    static FILES: OnceLock<QemuFiles> = OnceLock::new();
    FILES.get_or_init(|| {
        hostfacts::remembered(
            &hostfacts::dir(),
            "qemu-files",
            &qemu_files_depend_on(qemu),
            || collect_qemu_files(qemu),
            |_| true,
        )
    })
}

/// What [`collect_qemu_files`] reads: QEMU, the loader's cache (which
/// changes whenever libraries are installed), and the directories it
/// looks for modules and data in.
fn qemu_files_depend_on(qemu: &Path) -> Vec<String> {
    let mut facts = vec![qemu.display().to_string(), identity(qemu)];
    for path in std::iter::once("/etc/ld.so.cache")
        .chain(MODULE_DIRS)
        .chain(DATA_DIRS)
        .chain(TOP_LINKS)
    {
        let link = std::fs::read_link(path).unwrap_or_default();
        facts.push(format!(
            "{path} {} {}",
            identity(Path::new(path)),
            link.display()
        ));
    }
    facts
}

/// Where Debian, Fedora and others keep QEMU's loadable modules.
const MODULE_DIRS: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/qemu",
    "/usr/lib64/qemu",
    "/usr/lib/qemu",
];

/// QEMU's firmware and option ROMs.
const DATA_DIRS: [&str; 3] = [
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/lib/ipxe/qemu",
];

/// Top-level directories that are symlinks on merged-usr systems.
const TOP_LINKS: [&str; 6] = ["/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"];

fn collect_qemu_files(qemu: &Path) -> QemuFiles {
    let mut files = QemuFiles::default();
    files.binds.insert(qemu.to_path_buf());
    let module_dirs: Vec<PathBuf> = MODULE_DIRS
        .iter()
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .collect();
    let mut linked = vec![qemu.to_path_buf()];
    for dir in &module_dirs {
        files.binds.insert(dir.clone());
        // Only the accelerator modules are loaded for our machines.
        if let Ok(entries) = std::fs::read_dir(dir) {
            linked.extend(entries.flatten().map(|e| e.path()).filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("accel-"))
            }));
        }
    }
    // The directories the libraries live in, not each library: one mount
    // instead of ~50 (measured: 27 against 18 ms a start), and they hold
    // only system libraries, nothing of the host's users or secrets.
    for object in &linked {
        for lib in ldd(object) {
            if let Some(dir) = lib.parent() {
                files
                    .binds
                    .insert(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
            }
        }
    }
    for data in DATA_DIRS {
        let data = PathBuf::from(data);
        if data.is_dir() {
            files.binds.insert(data);
        }
    }
    for top in TOP_LINKS {
        if let Ok(target) = std::fs::read_link(top) {
            files.symlinks.push((target, PathBuf::from(top)));
        }
    }
    // A bind under a symlinked top-level directory must go to its real
    // place: bubblewrap creates the symlink first.
    let binds = std::mem::take(&mut files.binds);
    files.binds = binds.into_iter().map(|p| real_parent(&p)).collect();
    files
}

/// `path` with its directory resolved (the file name itself kept, so a
/// library's soname stays the name it is loaded by).
fn real_parent(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// The absolute paths of the libraries `object` loads, as `ldd` lists them.
fn ldd(object: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd")
        .arg(object)
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    parse_ldd(&String::from_utf8_lossy(&out.stdout))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Bubblewrap's arguments for a QEMU that sees only `files`, `/dev` (with
/// `/dev/kvm` when `kvm`), `/proc`, and the descriptors it inherits.
/// `info_fd` receives bubblewrap's JSON with QEMU's host pid.
pub(crate) fn bwrap_args(
    files: &QemuFiles,
    creds: Creds,
    kvm: bool,
    info_fd: i32,
) -> Vec<OsString> {
    sandbox_args(files, creds, kvm, Some(info_fd), &[])
}

/// Bubblewrap's arguments for the network relay: QEMU's own view, plus the
/// host's network (the relay connects out for the guest) and the host's
/// resolver configuration (its DNS forwarder reads it).
pub(crate) fn relay_bwrap_args(files: &QemuFiles, creds: Creds, info_fd: i32) -> Vec<OsString> {
    let mut extra = Vec::new();
    if let Ok(resolv) = std::fs::canonicalize("/etc/resolv.conf") {
        extra.push((resolv, PathBuf::from("/etc/resolv.conf")));
    }
    let mut a = sandbox_args(files, creds, false, Some(info_fd), &extra);
    a.insert(1, "--share-net".into());
    a
}

fn sandbox_args(
    files: &QemuFiles,
    creds: Creds,
    kvm: bool,
    info_fd: Option<i32>,
    extra: &[(PathBuf, PathBuf)],
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    for s in [
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--clearenv",
    ] {
        push(s);
    }
    if creds.drop_root_caps {
        push("--cap-drop");
        push("ALL");
    }
    if let Some(fd) = info_fd {
        push("--info-fd");
        push(&fd.to_string());
    }
    for (target, link) in &files.symlinks {
        a.extend(["--symlink".into(), target.into(), link.into()]);
    }
    for p in &files.binds {
        a.extend(["--ro-bind".into(), p.into(), p.into()]);
    }
    for (from, to) in extra {
        a.extend(["--ro-bind".into(), from.into(), to.into()]);
    }
    a.extend(["--dev".into(), "/dev".into()]);
    if kvm {
        a.extend(["--dev-bind".into(), "/dev/kvm".into(), "/dev/kvm".into()]);
    }
    a.extend(["--proc".into(), "/proc".into()]);
    a.extend([
        "--remount-ro".into(),
        "/".into(),
        "--chdir".into(),
        "/".into(),
    ]);
    a
}

/// QEMU's own seccomp filter.
pub(crate) const SANDBOX_ARG: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// What the forked child does before `exec`: credentials, limits, the
/// descriptors QEMU keeps. Everything is computed before the fork; `apply`
/// only makes system calls (no allocation, no locks), as required between
/// `fork` and `exec` in a multi-threaded program.
#[derive(Debug)]
pub(crate) struct ChildPlan {
    parent: u32,
    creds: Creds,
    /// (inherited fd, the number QEMU sees it as).
    fds: Vec<(i32, i32)>,
    /// Scratch space for `apply`, sized before the fork.
    scratch: Vec<i32>,
    /// First descriptor number above every target.
    first_free: i32,
    /// Kill the child when the thread that forked it ends.
    pdeathsig: Option<i32>,
    /// Set `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
}

impl ChildPlan {
    pub(crate) fn new(creds: Creds, fds: Vec<(i32, i32)>, pdeathsig: Option<i32>) -> ChildPlan {
        let first_free = fds.iter().map(|&(_, t)| t + 1).max().unwrap_or(3).max(3);
        ChildPlan {
            // SAFETY: getpid cannot fail.
            parent: unsafe { libc::getpid() } as u32,
            creds,
            scratch: vec![-1; fds.len()],
            fds,
            first_free,
            pdeathsig,
            no_new_privs: true,
        }
    }

    /// Runs in the child between `fork` and `exec`.
    pub(crate) fn apply(&mut self) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        // SAFETY: every call below is an async-signal-safe system call on
        // plain integers or on live locals and fields of `self` (allocated
        // before the fork); nothing allocates or takes a lock.
        unsafe {
            libc::umask(0o077);
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
                return Err(err());
            }
            // A host program may block signals it handles in a thread (the
            // CLI does); the child must not inherit that mask.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            // QEMU asks for transparent huge pages for guest RAM and its
            // code cache; a 2 MiB page is all resident once one byte of it
            // is touched, which multiplies an idle guest's memory.
            if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                return Err(err());
            }
            if self.creds.switch
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(self.creds.gid, self.creds.gid, self.creds.gid) != 0
                    || libc::setresuid(self.creds.uid, self.creds.uid, self.creds.uid) != 0)
            {
                return Err(err());
            }
            if self.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(err());
            }
            // After the credential change, which clears it.
            if let Some(sig) = self.pdeathsig {
                if libc::prctl(libc::PR_SET_PDEATHSIG, sig) != 0 {
                    return Err(err());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != self.parent {
                    return Err(std::io::Error::other("parent exited"));
                }
            }
            // Move every source out of the way of the target numbers, then
            // onto them (dup2 clears close-on-exec on the target).
            for (i, &(src, _)) in self.fds.iter().enumerate() {
                let high = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, self.first_free);
                if high < 0 {
                    return Err(err());
                }
                self.scratch[i] = high;
            }
            for (i, &(_, target)) in self.fds.iter().enumerate() {
                if libc::dup2(self.scratch[i], target) < 0 {
                    return Err(err());
                }
            }
            // Nothing else the host process has open reaches QEMU.
            if libc::syscall(
                libc::SYS_close_range,
                self.first_free as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                return Err(err());
            }
        }
        Ok(())
    }
}

/// The confinement a VM started in `mode` gets on this host.
pub fn expected(mode: ConfineMode, has_shares: bool, network: bool) -> Confinement {
    let support = host_support();
    let off = mode == ConfineMode::Off;
    let creds = creds(mode, has_shares);
    let seccomp = !off && support.seccomp;
    let namespaces = !off && support.bwrap.is_some() && support.user_namespaces;
    let mut gaps = Vec::new();
    if off {
        gaps.push("confinement is off".to_string());
    } else {
        if !seccomp {
            gaps.push("QEMU has no seccomp filter".to_string());
        }
        if !namespaces {
            gaps.push("QEMU shares the host's namespaces and file system view".to_string());
        }
        gaps.extend(support.notes.iter().cloned());
    }
    if creds.drop_root_caps {
        gaps.push(
            "QEMU keeps uid 0 (without capabilities) to serve host directory mounts".to_string(),
        );
    }
    Confinement {
        seccomp,
        uid: creds.uid,
        namespaces,
        network_filter: network,
        gaps,
    }
}

/// Checks `confinement` against `mode`.
pub(crate) fn enforce(mode: ConfineMode, confinement: &Confinement) -> Result<(), Error> {
    if mode == ConfineMode::Strict && !confinement.gaps.is_empty() {
        return Err(Error::Unconfined(confinement.gaps.join("; ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parses_to_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \tlibmissing.so => not found\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn bwrap_view_is_only_what_qemu_needs() {
        let mut files = QemuFiles::default();
        files.binds.insert("/usr/bin/qemu-system-x86_64".into());
        files.symlinks.push(("usr/lib".into(), "/lib".into()));
        let creds = Creds {
            uid: 5,
            gid: 5,
            switch: true,
            drop_root_caps: false,
        };
        let args: Vec<String> = bwrap_args(&files, creds, false, 9)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for want in [
            "--unshare-all --unshare-user --disable-userns --die-with-parent",
            "--info-fd 9",
            "--symlink usr/lib /lib",
            "--ro-bind /usr/bin/qemu-system-x86_64 /usr/bin/qemu-system-x86_64",
            "--dev /dev --proc /proc --remount-ro /",
        ] {
            assert!(joined.contains(want), "{want:?} missing from {joined}");
        }
        assert!(!joined.contains("/dev/kvm"));
        assert!(!joined.contains("--cap-drop"));
        let root = Creds {
            drop_root_caps: true,
            switch: false,
            uid: 0,
            gid: 0,
        };
        let joined = bwrap_args(&files, root, true, 9)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("--cap-drop ALL"));
        assert!(joined.contains("--dev-bind /dev/kvm /dev/kvm"));
    }

    #[test]
    fn modes_parse_by_name() {
        assert_eq!("default".parse(), Ok(ConfineMode::BestEffort));
        assert_eq!("strict".parse(), Ok(ConfineMode::Strict));
        assert_eq!("off".parse(), Ok(ConfineMode::Off));
        let err = "loose".parse::<ConfineMode>().unwrap_err();
        assert!(err.contains("\"loose\""), "{err}");
    }

    #[test]
    fn strict_policy_refuses_gaps() {
        let mut c = Confinement {
            seccomp: true,
            uid: 1000,
            namespaces: true,
            network_filter: true,
            gaps: Vec::new(),
        };
        assert!(enforce(ConfineMode::Strict, &c).is_ok());
        c.gaps.push("no bubblewrap".into());
        assert!(enforce(ConfineMode::BestEffort, &c).is_ok());
        let err = enforce(ConfineMode::Strict, &c).unwrap_err();
        assert!(err.to_string().contains("no bubblewrap"), "{err}");
    }

    #[test]
    fn sandbox_ids_are_never_root() {
        let (uid, gid) = sandbox_ids();
        assert_ne!(uid, 0);
        assert_ne!(gid, 0);
    }
}
