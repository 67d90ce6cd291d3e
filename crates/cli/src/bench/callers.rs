//! `crumble bench exec --phases`: the `true` round trip from the callers
//! above the core, to see what each layer adds: libcc.so's public C
//! functions (loaded with `dlopen`, called as a C program calls them) and
//! the Python package over them. Each boots an instance of its own from the
//! same root filesystem.

use std::ffi::{c_char, c_void, CStr, CString};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::Samples;

const LIBCC: &str = "libcc.so";

/// Round trips Python runs before the measured ones, as the core's row
/// does: they warm the page cache and the agent's paths.
const WARMUP: usize = 5;

/// One caller's row.
#[derive(Debug)]
pub(super) enum Outcome {
    Ran(Samples),
    /// The caller is not available on this machine, and why.
    Skipped(String),
    /// It was there, but the round trips failed.
    Failed(String),
}

/// The cargo target directory the running `crumble` was built into
/// (`target/release/crumble` → `target`).
fn target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.to_path_buf())
}

/// libcc.so: `--libcc`, else where the Python package looks in a checkout
/// (`LIBCC_PATH`, a file or a directory), next to `crumble`, then the
/// target directory's release build.
fn find_libcc(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        if !path.is_file() {
            return Err(format!("--libcc {}: no such file", path.display()));
        }
        return Ok(path.to_path_buf());
    }
    let mut tried = Vec::new();
    if let Some(path) = std::env::var_os("LIBCC_PATH").map(PathBuf::from) {
        tried.push(if path.is_dir() {
            path.join(LIBCC)
        } else {
            path
        });
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(Path::parent)
    {
        tried.push(dir.join(LIBCC));
    }
    if let Some(target) = target_dir() {
        tried.push(target.join("release").join(LIBCC));
    }
    tried.dedup();
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "{LIBCC} not found (tried {}); build it with `cargo build --release -p cc-capi` \
         or pass --libcc PATH",
        tried.join(", ")
    ))
}

/// `struct cc_error` of cc.h.
#[repr(C)]
struct CcError {
    size: usize,
    code: i32,
    message: *mut c_char,
    op: *mut c_char,
    path: *mut c_char,
    os_errno: i32,
}

type Handle = u64;

/// The functions of cc.h this benchmark calls.
struct Libcc {
    init: unsafe extern "C" fn(*mut CcError) -> i32,
    shutdown: unsafe extern "C" fn(*mut CcError) -> i32,
    error_free: unsafe extern "C" fn(*mut CcError),
    source_from_dir: unsafe extern "C" fn(*const c_char, *mut Handle, *mut CcError) -> i32,
    instance_new: unsafe extern "C" fn(Handle, *const c_void, *mut Handle, *mut CcError) -> i32,
    instance_command: unsafe extern "C" fn(
        Handle,
        *const c_char,
        *const *const c_char,
        usize,
        *mut Handle,
        *mut CcError,
    ) -> i32,
    cmd_run: unsafe extern "C" fn(Handle, *mut i32, *mut CcError) -> i32,
    cmd_free: unsafe extern "C" fn(Handle) -> i32,
}

/// The address of `name` in the library `lib` as a `T`.
///
/// # Safety
/// `lib` is a handle from `dlopen`; `T` is a function pointer type
/// matching the C declaration of `name`.
unsafe fn symbol<T>(lib: *mut c_void, name: &CStr) -> Result<T, String> {
    // SAFETY: `lib` is open (the caller's promise) and `name` a C string.
    let address = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if address.is_null() {
        return Err(format!("it lacks {}", name.to_string_lossy()));
    }
    assert_eq!(size_of::<T>(), size_of::<*mut c_void>());
    // SAFETY: `T` is a function pointer of the symbol's type (the caller's
    // promise), the same size as the address checked above.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&address) })
}

impl Libcc {
    /// Opens the library, never to close it: a Rust library's thread-local
    /// destructors may still be pending in its threads after `cc_shutdown`,
    /// and unloading it under them would crash.
    fn load(path: &Path) -> Result<Libcc, String> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| format!("{}: a NUL in the path", path.display()))?;
        // SAFETY: a C string; the library's load-time initializers are
        // Rust std's, which only note the process's arguments.
        let lib = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            // SAFETY: dlerror returns NULL or a C string valid until the
            // next dl call on this thread, copied at once.
            let why = unsafe { libc::dlerror() };
            let why = if why.is_null() {
                "unknown dlopen failure".into()
            } else {
                // SAFETY: non-NULL: a C string from dlerror.
                unsafe { CStr::from_ptr(why) }.to_string_lossy()
            };
            return Err(format!("cannot load {}: {why}", path.display()));
        }
        let incompatible =
            |e: String| format!("{} is not a compatible {LIBCC}: {e}", path.display());
        // SAFETY: `lib` is open, and each type is the function's declaration
        // in include/cc.h (cc_error_code is int32_t, handles uint64_t; the
        // options pointer is passed NULL only).
        unsafe {
            Ok(Libcc {
                init: symbol(lib, c"cc_init").map_err(incompatible)?,
                shutdown: symbol(lib, c"cc_shutdown").map_err(incompatible)?,
                error_free: symbol(lib, c"cc_error_free").map_err(incompatible)?,
                source_from_dir: symbol(lib, c"cc_source_from_dir").map_err(incompatible)?,
                instance_new: symbol(lib, c"cc_instance_new").map_err(incompatible)?,
                instance_command: symbol(lib, c"cc_instance_command").map_err(incompatible)?,
                cmd_run: symbol(lib, c"cc_cmd_run").map_err(incompatible)?,
                cmd_free: symbol(lib, c"cc_cmd_free").map_err(incompatible)?,
            })
        }
    }

    /// Runs one fallible call with an error struct of its own; a failure
    /// becomes "`name`: message (error N)".
    fn call(&self, name: &str, f: impl FnOnce(*mut CcError) -> i32) -> Result<(), String> {
        let mut err = CcError {
            size: std::mem::size_of::<CcError>(),
            code: 0,
            message: std::ptr::null_mut(),
            op: std::ptr::null_mut(),
            path: std::ptr::null_mut(),
            os_errno: 0,
        };
        let code = f(&mut err);
        if code == 0 {
            return Ok(());
        }
        let message = if err.message.is_null() {
            "no message".into()
        } else {
            // SAFETY: the library set `message` to a C string on failure.
            unsafe { CStr::from_ptr(err.message) }
                .to_string_lossy()
                .into_owned()
        };
        let errno = match err.os_errno {
            0 => String::new(),
            n => format!(", errno {n}"),
        };
        // SAFETY: `err` was filled by the failed call and is freed once.
        unsafe { (self.error_free)(&mut err) };
        Err(format!("{name}: {message} (error {code}{errno})"))
    }

    /// Boots an instance of `rootfs` with the default options.
    fn boot(&self, rootfs: &Path) -> Result<Handle, String> {
        let rootfs = CString::new(rootfs.as_os_str().as_bytes())
            .map_err(|_| format!("{}: a NUL in the path", rootfs.display()))?;
        // SAFETY: `err` comes from `call`, valid for writing.
        self.call("cc_init", |err| unsafe { (self.init)(err) })?;
        let (mut source, mut inst) = (0, 0);
        self.call("cc_source_from_dir", |err| {
            // SAFETY: a C string, a writable handle, `err` from `call`.
            unsafe { (self.source_from_dir)(rootfs.as_ptr(), &mut source, err) }
        })?;
        self.call("cc_instance_new", |err| {
            // SAFETY: NULL options are the defaults; a writable handle.
            unsafe { (self.instance_new)(source, std::ptr::null(), &mut inst, err) }
        })?;
        Ok(inst)
    }

    /// One round trip of `true`, as a C program runs a command:
    /// `cc_instance_command`, `cc_cmd_run`, `cc_cmd_free`.
    fn round_trip(&self, inst: Handle) -> Result<Duration, String> {
        let t = Instant::now();
        let mut cmd = 0;
        self.call("cc_instance_command", |err| {
            // SAFETY: a C string, no arguments (NULL, 0), a writable
            // handle, `err` from `call`.
            unsafe {
                (self.instance_command)(inst, c"true".as_ptr(), std::ptr::null(), 0, &mut cmd, err)
            }
        })?;
        let mut code = -1;
        // SAFETY: a writable int, `err` from `call`.
        let ran = self.call("cc_cmd_run", |err| unsafe {
            (self.cmd_run)(cmd, &mut code, err)
        });
        // SAFETY: frees the handle made above, once; it takes no pointers.
        unsafe { (self.cmd_free)(cmd) };
        let elapsed = t.elapsed();
        ran?;
        if code != 0 {
            return Err(format!("`true` exited with {code}"));
        }
        Ok(elapsed)
    }

    /// Closes every instance and releases every handle.
    fn shutdown(&self) -> Result<(), String> {
        // SAFETY: `err` comes from `call`, valid for writing.
        self.call("cc_shutdown", |err| unsafe { (self.shutdown)(err) })
    }
}

/// The round trip through libcc.so, run in turns with the core's so that
/// both see the same load on the host.
pub(super) struct CAbi {
    /// Where libcc.so was found, or why it was not.
    pub(super) lib: Result<PathBuf, String>,
    state: State,
}

enum State {
    Running {
        c: Libcc,
        inst: Handle,
        samples: Samples,
    },
    Over(Outcome),
}

impl CAbi {
    /// Finds and loads libcc.so (`--libcc` is `explicit`) and boots an
    /// instance of `rootfs` through it.
    pub(super) fn start(explicit: Option<&Path>, rootfs: &Path) -> CAbi {
        let lib = find_libcc(explicit);
        let state = match lib.as_deref().map_err(Clone::clone).and_then(Libcc::load) {
            Err(why) => State::Over(Outcome::Skipped(why)),
            Ok(c) => match c.boot(rootfs) {
                Ok(inst) => State::Running {
                    c,
                    inst,
                    samples: Samples::default(),
                },
                Err(why) => State::Over(Outcome::Failed(shut_down(&c, why))),
            },
        };
        CAbi { lib, state }
    }

    /// One round trip, kept when `keep` (not a warm-up). After a failure
    /// the rest are not run.
    pub(super) fn round_trip(&mut self, keep: bool) {
        let State::Running { c, inst, samples } = &mut self.state else {
            return;
        };
        match c.round_trip(*inst) {
            Ok(d) if keep => samples.0.push(d),
            Ok(_) => {}
            Err(why) => self.state = State::Over(Outcome::Failed(shut_down(c, why))),
        }
    }

    /// Shuts the library down and gives the row.
    pub(super) fn finish(self) -> (Result<PathBuf, String>, Outcome) {
        let outcome = match self.state {
            State::Over(outcome) => outcome,
            State::Running { c, samples, .. } => match c.shutdown() {
                Ok(()) => Outcome::Ran(samples),
                Err(why) => Outcome::Failed(why),
            },
        };
        (self.lib, outcome)
    }
}

/// Shuts the library down after `why`, which is returned, with the
/// shutdown's own failure if it had one.
fn shut_down(c: &Libcc, why: String) -> String {
    match c.shutdown() {
        Ok(()) => why,
        Err(also) => format!("{why}; {also}"),
    }
}

/// Exit status of the script when the package or its library is missing:
/// a reason to skip, not a failure.
const UNAVAILABLE: i32 = 3;

/// Boots an instance of `argv[1]` and prints the path of the library, of
/// the package, and the median of `argv[2]` round trips in nanoseconds.
const PYTHON_SCRIPT: &str = r#"
import ctypes, sys, time
rootfs, runs, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    import crumblecracker as cc
    from crumblecracker import _lib
    lib_path = cc.library_path()
    cc.init()
except Exception as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)
# The package makes sources of images only; --rootfs is a directory, which
# the C function the CLI's --rootfs uses as well turns into a source.
out = ctypes.c_uint64()
_lib.call(_lib.native().cc_source_from_dir, _lib.encode_path(rootfs, "rootfs"), ctypes.byref(out))
samples = []
with cc.ImageSource(out.value, rootfs) as source, cc.Instance(source) as inst:
    for i in range(warmup + runs):
        t = time.perf_counter_ns()
        code = inst.command("true").run()
        elapsed = time.perf_counter_ns() - t
        if code != 0:
            sys.exit(f"`true` exited with {code}")
        if i >= warmup:
            samples.append(elapsed)
samples.sort()
print(lib_path)
print(cc.__file__)
print(samples[len(samples) // 2])
"#;

/// What the Python row ran with, for the output.
#[derive(Debug)]
pub(super) struct PythonRun {
    pub(super) interpreter: PathBuf,
    /// The library and the package it loaded, when it got that far.
    pub(super) loaded: Option<(String, String)>,
    pub(super) outcome: Outcome,
}

/// The round trip from Python, timed in Python: with `interpreter`, else
/// the checkout's development venv (`target/py-venv`, scripts/test.sh
/// makes it), else `python3`. The checkout's package comes first on the
/// path and `libcc` is its library, so that all rows measure one build.
pub(super) fn python(
    interpreter: Option<&Path>,
    libcc: Option<&Path>,
    rootfs: &Path,
    runs: usize,
) -> PythonRun {
    let target = target_dir();
    let venv = target.as_ref().map(|t| t.join("py-venv/bin/python"));
    let interpreter = match (interpreter, venv) {
        (Some(given), _) => given.to_path_buf(),
        (None, Some(venv)) if venv.is_file() => venv,
        _ => PathBuf::from("python3"),
    };
    let mut cmd = Command::new(&interpreter);
    cmd.arg("-c")
        .arg(PYTHON_SCRIPT)
        .arg(rootfs)
        .arg(runs.to_string())
        .arg(WARMUP.to_string());
    let package = target
        .as_ref()
        .and_then(|t| t.parent())
        .map(|checkout| checkout.join("python/src"))
        .filter(|src| src.join("crumblecracker/__init__.py").is_file());
    if let Some(src) = package {
        let mut path = vec![src];
        path.extend(
            std::env::var_os("PYTHONPATH")
                .iter()
                .flat_map(std::env::split_paths),
        );
        cmd.env("PYTHONPATH", std::env::join_paths(path).unwrap_or_default());
    }
    if let Some(lib) = libcc {
        cmd.env("LIBCC_PATH", lib);
    }
    let (loaded, outcome) = match cmd.output() {
        Err(e) if e.kind() == ErrorKind::NotFound => (
            None,
            Outcome::Skipped(format!("{}: no such interpreter", interpreter.display())),
        ),
        Err(e) => (
            None,
            Outcome::Failed(format!("{}: {e}", interpreter.display())),
        ),
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr
                .trim()
                .lines()
                .last()
                .unwrap_or("no message")
                .to_owned();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = stdout.lines().collect();
            match (out.status.code(), lines.as_slice()) {
                (Some(0), [lib, package, median]) => match median.parse::<u64>() {
                    Ok(ns) => (
                        Some((lib.to_string(), package.to_string())),
                        // The median Python computed, as the one sample.
                        Outcome::Ran(Samples(vec![Duration::from_nanos(ns)])),
                    ),
                    Err(_) => (
                        None,
                        Outcome::Failed(format!("unexpected output: {stdout}")),
                    ),
                },
                (Some(UNAVAILABLE), _) => (None, Outcome::Skipped(last)),
                _ => (None, Outcome::Failed(format!("{}: {last}", out.status))),
            }
        }
    };
    PythonRun {
        interpreter,
        loaded,
        outcome,
    }
}
