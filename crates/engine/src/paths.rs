//! Where the engine finds its inputs: cache dir, data dir (guest kernel,
//! guest agent), QEMU. Environment variables override every default.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// The per-user cache root: `CC_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/crumblecracker`, else `~/.cache/crumblecracker`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env_path("CC_CACHE_DIR") {
        return dir;
    }
    let base = env_path("XDG_CACHE_HOME").unwrap_or_else(|| home().join(".cache"));
    base.join("crumblecracker")
}

fn home() -> PathBuf {
    env_path("HOME").unwrap_or_else(|| PathBuf::from("/"))
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The installation's data dir, which holds the guest kernel (`vmlinux`,
/// its `config` and `kernel.json`) and the static agent (`cc-agent`): what
/// is built from the source tree, kept apart from the cache so that any
/// cache dir, even an empty one, works. The first of these that exists:
///
/// 1. `CC_DATA_DIR`, when set (then nothing else is tried);
/// 2. beside the code: `<dir>/../share/crumblecracker`, where `<dir>` holds
///    the shared library the engine is part of (`libcc.so`, found with
///    `dladdr`) or else the running executable (`/proc/self/exe`). So
///    `<prefix>/bin/crumble` and `<prefix>/lib/libcc.so` both find
///    `<prefix>/share/crumblecracker`; `target/release/crumble` finds
///    `target/share/crumblecracker`, where `scripts/setup.sh` installs; the
///    Python wheel is laid out the same way under `crumblecracker/_native/`.
///    A binary in Cargo's `deps/` or `examples/` counts as in their parent,
///    so tests find what setup installed for their target dir;
/// 3. `$XDG_DATA_HOME/crumblecracker` (`~/.local/share/crumblecracker`);
/// 4. `<d>/crumblecracker` for each `<d>` of `$XDG_DATA_DIRS`
///    (`/usr/local/share:/usr/share`).
///
/// When none exists, the first candidate: errors then name where the
/// files were expected.
pub fn data_dir() -> PathBuf {
    let mut candidates = data_dir_candidates();
    // Never empty: there is CC_DATA_DIR or else the XDG data home.
    let found = candidates.iter().position(|d| d.is_dir()).unwrap_or(0);
    candidates.swap_remove(found)
}

fn data_dir_candidates() -> Vec<PathBuf> {
    candidates(
        env_path("CC_DATA_DIR"),
        code_path().as_deref(),
        env_path("XDG_DATA_HOME").unwrap_or_else(|| home().join(".local/share")),
        std::env::var_os("XDG_DATA_DIRS").filter(|v| !v.is_empty()),
    )
}

/// [`data_dir`]'s candidates, in order, from what the environment says.
fn candidates(
    explicit: Option<PathBuf>,
    code: Option<&Path>,
    data_home: PathBuf,
    data_dirs: Option<std::ffi::OsString>,
) -> Vec<PathBuf> {
    if let Some(dir) = explicit {
        return vec![dir];
    }
    let mut dirs = Vec::new();
    if let Some(prefix) = code.and_then(prefix_of) {
        dirs.push(prefix.join("share/crumblecracker"));
    }
    dirs.push(data_home.join("crumblecracker"));
    let data_dirs = data_dirs.unwrap_or_else(|| "/usr/local/share:/usr/share".into());
    dirs.extend(
        std::env::split_paths(&data_dirs)
            .filter(|d| d.is_absolute())
            .map(|d| d.join("crumblecracker")),
    );
    dirs
}

/// The install prefix of a binary or library: the parent of its directory,
/// with Cargo's `deps/` and `examples/` counting as the profile dir.
fn prefix_of(code: &Path) -> Option<&Path> {
    let mut dir = code.parent()?;
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir = dir.parent()?;
    }
    dir.parent()
}

/// The file this code runs from: the shared library it is linked into
/// (libcc.so), else the executable.
fn code_path() -> Option<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: the address is this function's own code, so it lies in a
    // loaded object; dladdr only writes `info`, which is valid for writes.
    let found = unsafe { libc::dladdr(code_path as *const libc::c_void, info.as_mut_ptr()) };
    // SAFETY: zero-initialised, and filled in by dladdr when it succeeds.
    let info = unsafe { info.assume_init() };
    if found != 0 && !info.dli_fname.is_null() {
        // SAFETY: dladdr's file name is a NUL-terminated string owned by the
        // loader, valid while the object stays loaded (this code runs in it).
        let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
        let name = Path::new(std::ffi::OsStr::from_bytes(name.to_bytes()));
        // For the main program dladdr gives argv[0], which may not be a
        // path at all: only a shared object's name is taken.
        let shared = name
            .file_name()
            .is_some_and(|n| n.as_bytes().windows(3).any(|w| w == b".so"));
        if let Ok(lib) = std::fs::canonicalize(name) {
            if shared && Some(&lib) != exe.as_ref() {
                return Some(lib);
            }
        }
    }
    exe
}

/// The guest kernel: `CC_KERNEL`, else `vmlinux` in the [`data_dir`].
pub fn kernel() -> Result<PathBuf, Error> {
    let path = env_path("CC_KERNEL").unwrap_or_else(|| data_dir().join("vmlinux"));
    existing(path, Error::KernelMissing)
}

/// The static guest agent: `CC_AGENT`, else `cc-agent` in the
/// [`data_dir`].
pub fn agent() -> Result<PathBuf, Error> {
    let path = env_path("CC_AGENT").unwrap_or_else(|| data_dir().join("cc-agent"));
    existing(path, Error::AgentMissing)
}

/// The kernel's content hash: the key `scripts/build-kernel.sh` builds it
/// under, from the `kernel.json` installed beside it, else the name of its
/// build-cache directory (`<cache>/kernel/<hash>/vmlinux`). `None` for a
/// kernel from elsewhere.
pub fn kernel_hash(kernel: &Path) -> Option<String> {
    let from_json = std::fs::read(kernel.with_file_name("kernel.json"))
        .ok()
        .and_then(|bytes| hash_from_json(&bytes));
    from_json.or_else(|| {
        let dir = std::fs::canonicalize(kernel).ok()?;
        let name = dir.parent()?.file_name()?.to_str()?;
        (name.len() <= 64 && is_hash(name)).then(|| name.to_string())
    })
}

/// The `hash` of a `kernel.json`; anything but a hex string is no hash.
fn hash_from_json(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let hash = value.get("hash")?.as_str()?;
    (hash.len() <= 64 && is_hash(hash)).then(|| hash.to_string())
}

fn is_hash(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The QEMU binary: `CC_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn qemu() -> Result<PathBuf, Error> {
    let name = std::env::var("CC_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    if name.contains('/') {
        return existing(PathBuf::from(&name), |_| Error::QemuMissing(name.clone()));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(&name))
        .find(|p| p.is_file())
        .ok_or(Error::QemuMissing(name))
}

/// A system administration tool such as `mkfs.ext4`: on `PATH`, else in
/// `/usr/sbin` or `/sbin`, which a normal user's `PATH` lacks on Debian
/// although e2fsprogs is in every base system. The bare name when it is
/// nowhere, so running it fails with "not found".
pub fn sbin_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn existing(path: PathBuf, missing: impl FnOnce(PathBuf) -> Error) -> Result<PathBuf, Error> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(missing(path))
    }
}

/// A file name for an in-flight write next to its final place: unique per
/// process and call, so concurrent builders (threads or processes) never
/// write the same temporary file.
pub fn temp_name(stem: &str) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{stem}.{}-{n}.tmp", owner_tag())
}

/// This process as the owner of files it may leave behind if it dies:
/// `PID.STARTTIME`, which no other process has, even after the pid is
/// reused.
pub fn owner_tag() -> String {
    let pid = std::process::id();
    format!("{pid}.{}", start_time(pid).unwrap_or(0))
}

/// Whether the process an [`owner_tag`] names still runs (a zombie does
/// not). A tag without a start time is judged by the pid alone.
pub fn owner_alive(tag: &str) -> bool {
    let (pid, start) = match tag.split_once('.') {
        Some((p, s)) => (p, s.parse::<u64>().ok()),
        None => (tag, None),
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return true; // not ours to judge
    };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    match parse_stat(&stat) {
        Some((state, _)) if state == 'Z' || state == 'X' => false,
        Some((_, started)) => start.is_none_or(|s| s == started),
        None => true,
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, start)| start)
}

/// The state and start time (field 22) from `/proc/PID/stat`; the command
/// name (field 2) may hold spaces and parentheses, so fields are counted
/// from its closing parenthesis.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=21 lie between the state and the start time.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_dir_is_looked_for_beside_the_code_then_in_xdg_dirs() {
        let p = PathBuf::from;
        let home = p("/h/.local/share");
        assert_eq!(
            candidates(
                Some(p("/d")),
                Some(Path::new("/usr/bin/crumble")),
                home.clone(),
                None
            ),
            [p("/d")],
            "CC_DATA_DIR alone"
        );
        assert_eq!(
            candidates(
                None,
                Some(Path::new("/opt/cc/lib/libcc.so")),
                home.clone(),
                None
            ),
            [
                p("/opt/cc/share/crumblecracker"),
                p("/h/.local/share/crumblecracker"),
                p("/usr/local/share/crumblecracker"),
                p("/usr/share/crumblecracker"),
            ]
        );
        assert_eq!(
            candidates(None, None, home, Some("/x:relative:".into())),
            [p("/h/.local/share/crumblecracker"), p("/x/crumblecracker")],
            "relative XDG_DATA_DIRS entries are ignored"
        );
    }

    #[test]
    fn sbin_tools_are_found_off_path() {
        // e2fsprogs is installed by scripts/setup.sh; a user's PATH may lack
        // /usr/sbin, which the lookup adds.
        let tool = sbin_tool("mkfs.ext4");
        assert!(tool.is_absolute() && tool.is_file(), "{}", tool.display());
        assert_eq!(sbin_tool("no-such-tool-cc"), Path::new("no-such-tool-cc"));
    }

    #[test]
    fn cargo_build_dirs_share_their_profiles_prefix() {
        for (code, prefix) in [
            ("/w/target/release/crumble", Some("/w/target")),
            ("/w/target/debug/deps/vm-0123", Some("/w/target")),
            ("/w/target/debug/examples/x", Some("/w/target")),
            (
                "/v/crumblecracker/_native/lib/libcc.so",
                Some("/v/crumblecracker/_native"),
            ),
            ("/crumble", None),
        ] {
            assert_eq!(prefix_of(Path::new(code)), prefix.map(Path::new), "{code}");
        }
    }

    #[test]
    fn the_code_runs_from_this_test_binary() {
        let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(code_path(), Some(exe));
    }

    #[test]
    fn kernel_json_gives_the_hash_and_nothing_else_counts() {
        assert_eq!(
            hash_from_json(br#"{"hash":"0123abcdef456789","source":"x"}"#).as_deref(),
            Some("0123abcdef456789")
        );
        for bad in [
            &br#"{"hash":""}"#[..],
            br#"{"hash":"../../etc"}"#,
            br#"{"hash":12}"#,
            br#"{"source":"x"}"#,
            br#"["hash"]"#,
            b"not json",
            b"",
        ] {
            assert_eq!(
                hash_from_json(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(r#"{{"hash":"{}"}}"#, "a".repeat(65));
        assert_eq!(hash_from_json(long.as_bytes()), None);
    }

    #[test]
    fn a_kernel_is_known_by_its_kernel_json_or_build_cache_dir() {
        let root = std::env::temp_dir().join(format!("cc-kernel-hash-{}", std::process::id()));
        let build = root.join("0123456789abcdef");
        let installed = root.join("share");
        let other = root.join("other");
        for d in [&build, &installed, &other] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("vmlinux"), b"").unwrap();
        }
        std::fs::write(
            installed.join("kernel.json"),
            br#"{"hash":"fedcba9876543210"}"#,
        )
        .unwrap();
        std::os::unix::fs::symlink("0123456789abcdef", root.join("current")).unwrap();
        let hashes = [
            kernel_hash(&installed.join("vmlinux")),
            kernel_hash(&root.join("current/vmlinux")),
            kernel_hash(&other.join("vmlinux")),
            kernel_hash(&root.join("missing/vmlinux")),
        ];
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            hashes,
            [
                Some("fedcba9876543210".to_string()),
                Some("0123456789abcdef".to_string()),
                None,
                None
            ]
        );
    }

    #[test]
    fn owners_are_told_apart_by_start_time() {
        assert!(owner_alive(&owner_tag()));
        let pid = std::process::id();
        assert!(!owner_alive(&format!("{pid}.1")), "same pid, other start");
        assert!(!owner_alive("999999999.5"));
        assert!(owner_alive(&pid.to_string()), "old names: pid alone");
        assert_eq!(
            parse_stat("7 (a) b) c) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 4242 0 0"),
            Some(('S', 4242))
        );
    }
}
