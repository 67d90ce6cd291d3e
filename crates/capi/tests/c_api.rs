//! The C API from C: compiles `tests/c/api_test.c` and the README's example
//! (`examples/hello.c`) with the system C compiler (`$CC`, else `cc`)
//! against `include/cc.h` and the `libcc.so` built with this test, and runs
//! them with a leak checker (leaks are errors): the part without VMs under
//! valgrind, the VM part (ignored unless `--include-ignored`: a local
//! registry serves the busybox test image, the program pulls it and boots
//! VMs) built with AddressSanitizer, whose LeakSanitizer checks every
//! allocation in the process, the library's included. (Valgrind 3.19, Debian 12's, lacks the
//! `pidfd_open` system call the engine uses to supervise QEMU.)
//!
//! (This file does not name the library crate: it and the core are both
//! `cc` to Rust, so it sticks to the C ABI.)

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_dir() -> PathBuf {
    crate_dir().join("../..")
}

/// The `libcc.so` of this source tree. Asked of `cargo build` every time:
/// a `libcc.so` found next to this test may be left from an earlier build
/// (`cargo test` does not always rebuild the cdylib), and a stale library
/// against a new header fails in ways that point nowhere near the cause.
fn libcc() -> PathBuf {
    build_libcc()
}

/// `cargo build -p cc-capi` and the cdylib path it reports.
fn build_libcc() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "-p", "cc-capi", "--message-format=json"])
        .current_dir(repo_dir())
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo build");
    assert!(out.status.success(), "cargo build -p cc-capi failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "cc")
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
        })
        .find(|f| f.extension().is_some_and(|e| e == "so"))
        .expect("cargo build reported no libcc.so")
}

/// A fresh temporary directory, removed when dropped (also when a test
/// fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("cc-capi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Compiles `source` into `out_dir` with warnings as errors, with
/// AddressSanitizer when `asan`.
fn compile(source: &Path, out_dir: &Path, asan: bool) -> PathBuf {
    let lib = libcc();
    let lib_dir = lib.parent().unwrap();
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut name = source.file_stem().unwrap().to_os_string();
    if asan {
        name.push("-asan");
    }
    let exe = out_dir.join(name);
    let sanitize: &[&str] = if asan {
        &["-fsanitize=address", "-fno-omit-frame-pointer"]
    } else {
        &[]
    };
    let out = Command::new(&compiler)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .args(sanitize)
        .arg("-I")
        .arg(repo_dir().join("include"))
        .arg(source)
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lcc", "-lpthread"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{compiler}`: {e}"));
    assert!(
        out.status.success(),
        "{compiler} failed on {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn valgrind() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("valgrind"))
        .find(|p| p.is_file())
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `exe ARGS` (under valgrind if asked and installed) with
/// `LD_LIBRARY_PATH` set, killing it after `limit`.
fn run(
    exe: &Path,
    args: &[String],
    under_valgrind: bool,
    envs: &[(&str, PathBuf)],
    limit: Duration,
) -> Run {
    let lib = libcc();
    let mut cmd = match (under_valgrind, valgrind()) {
        (true, Some(vg)) => {
            let mut c = Command::new(vg);
            c.args([
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
                "--show-leak-kinds=definite",
                "--error-exitcode=1",
                "--trace-children=no",
                "--num-callers=30",
            ])
            .arg(exe);
            c
        }
        (true, None) => {
            eprintln!(
                "warning: valgrind is not installed; running {} without it",
                exe.display()
            );
            Command::new(exe)
        }
        (false, _) => Command::new(exe),
    };
    cmd.args(args)
        .env("LD_LIBRARY_PATH", lib.parent().unwrap())
        .env("ASAN_OPTIONS", "detect_leaks=1")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
    let reader = |mut s: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            text
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, mut stderr) = (out.join().unwrap(), err.join().unwrap());
    if status.is_none() {
        stderr.push_str(&format!("\n(killed after {limit:?})"));
    }
    Run {
        ok: status.is_some_and(|s| s.success()),
        stdout,
        stderr,
    }
}

fn assert_ran(what: &str, r: &Run) {
    assert!(
        r.ok,
        "{what} failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
        r.stdout, r.stderr
    );
}

#[test]
fn c_program_walks_the_api_without_vms() {
    let dir = TempDir::new("novm");
    let exe = compile(&crate_dir().join("tests/c/api_test.c"), &dir, false);
    let r = run(&exe, &[], true, &[], Duration::from_secs(600));
    assert_ran("api_test", &r);
    assert!(r.stdout.contains(", 0 failed"), "{}", r.stdout);
    println!("{}", r.stdout.trim());
}

/// The ```c block of the README's "The C library" section.
fn readme_example() -> String {
    let readme = std::fs::read_to_string(repo_dir().join("README.md")).unwrap();
    let section = &readme[readme
        .find("## The C library")
        .expect("a C library section")..];
    let start = section.find("```c\n").expect("a ```c block") + "```c\n".len();
    let len = section[start..].find("```").expect("the block ends");
    section[start..start + len].to_string()
}

#[test]
fn readme_example_is_examples_hello_c() {
    let file = std::fs::read_to_string(crate_dir().join("examples/hello.c")).unwrap();
    assert!(
        readme_example() == file,
        "the README's C example differs from crates/capi/examples/hello.c: keep them the same"
    );
}

#[test]
fn readme_example_compiles() {
    let dir = TempDir::new("hello-build");
    compile(&crate_dir().join("examples/hello.c"), &dir, false);
}

/// Whether the guest kernel was built with 9p (host directory mounts).
fn kernel_has_9p() -> bool {
    let Ok(kernel) = cc::host_info().kernel else {
        return false;
    };
    let config = kernel.path.with_file_name("config");
    std::fs::read_to_string(config).is_ok_and(|c| c.lines().any(|l| l == "CONFIG_9P_FS=y"))
}

// Ignored unless asked for, rather than gated on CC_RUN_VM_TESTS: libtest
// decides ignoring at compile time only, and a test that returned early
// would be counted as passed. scripts/test.sh passes --include-ignored
// when CC_RUN_VM_TESTS=1.
#[test]
#[ignore = "VM test: boots real VMs; run with `-- --include-ignored` (scripts/test.sh does with CC_RUN_VM_TESTS=1)"]
fn c_program_walks_the_api_with_vms() {
    let images = cc_testsupport::test_images();
    let registry = cc_testsupport::Registry::start(cc_testsupport::Auth::Anonymous);
    registry.push(&images.busybox, "latest", "capi/busybox:1");
    let reference = format!("{}/capi/busybox:1", registry.addr());
    let cache = cc_testsupport::cache_dir();
    let dir = TempDir::new("vm");

    let exe = compile(&crate_dir().join("tests/c/api_test.c"), &dir, true);
    let mut args = vec![
        "--vm".to_string(),
        reference.clone(),
        cache.display().to_string(),
    ];
    if kernel_has_9p() {
        args.push("--mounts".into());
    }
    let r = run(&exe, &args, false, &[], Duration::from_secs(900));
    assert_ran("api_test --vm", &r);
    assert!(r.stdout.contains(", 0 failed (with VMs)"), "{}", r.stdout);
    println!("{}", r.stdout.trim());

    // The README example, with a store of its own, empty (the kernel and
    // agent from the library's data dir).
    let hello = compile(&crate_dir().join("examples/hello.c"), &dir, true);
    let own_cache = dir.join("cache");
    let envs = [("CC_CACHE_DIR", own_cache.clone())];
    let r = run(&hello, &[reference], false, &envs, Duration::from_secs(300));
    assert_ran("hello", &r);
    assert_eq!(
        r.stdout,
        "hello from Linux\n(exit status 3)\nwritten from C\n\
         stat failed on /no/such/file: stat /no/such/file: No such file or directory (os error 2) (errno 2)\n"
    );
    drop(registry);
}
