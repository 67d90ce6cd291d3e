//! `crumble` end to end. The tests that boot VMs run when
//! `CC_RUN_VM_TESTS=1` (see crates/cc/tests/vm.rs for what they need);
//! without it they are reported ignored, with the reason. `main` runs the
//! tests with libtest's arguments and output (libtest-mimic), which, unlike
//! libtest, can decide at run time that a test is ignored.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use cc_testsupport::Screen;
use libtest_mimic::{Arguments, Completion, Trial};

fn cache() -> PathBuf {
    cc_testsupport::cache_dir()
}

fn rootfs() -> PathBuf {
    std::env::var_os("CC_TEST_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache().join("trees/busybox"))
}

fn crumble() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crumble"))
}

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = crumble()
        .arg("run")
        .arg("--rootfs")
        .arg(rootfs())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn usage_errors_need_no_vm() {
    let out = crumble()
        .args(["run", "--rootfs", "/no/such/dir"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs a command"),
        "a directory has no entrypoint: {err}"
    );
    let out = crumble().arg("run").output().unwrap();
    assert!(!out.status.success(), "an image or --rootfs is required");
    let out = crumble().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["run", "doctor", "bench"] {
        assert!(help.contains(sub), "{help}");
    }
}

fn park_and_restore_usage_errors_need_no_vm() {
    let taken = std::env::temp_dir().join(format!("cc-cli-park-taken-{}", std::process::id()));
    std::fs::create_dir_all(&taken).unwrap();
    // Refused before anything boots: the command's work would be lost.
    let fails_saying = |cmd: &mut Command, what: &str| {
        let out = cmd.args(["--", "true"]).output().unwrap();
        assert_eq!(out.status.code(), Some(125));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(what), "{err}");
    };
    fails_saying(
        crumble()
            .args(["run", "--rootfs"])
            .arg(rootfs())
            .arg("--park")
            .arg(&taken),
        "already exists",
    );
    // Not a park: the directory exists but holds none.
    fails_saying(
        crumble().arg("restore").arg(&taken),
        "not a parked instance",
    );
    let out = crumble().arg("restore").arg(&taken).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a restore needs a command");
    std::fs::remove_dir_all(&taken).unwrap();
}

fn run_park_and_restore_go_on_from_the_park() {
    let dir = std::env::temp_dir().join(format!("cc-cli-park-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (first, second) = (dir.join("first"), dir.join("second"));
    let counter = "echo kept > /root/f; \
        (i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.1; done) \
        </dev/null >/dev/null 2>&1 &";
    let out = run(
        &["--park", first.to_str().unwrap(), "--", "sh", "-c", counter],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(first.join("engine.json").is_file());
    let restore = |park: &std::path::Path, extra: &[&str], script: &str| {
        crumble()
            .arg("restore")
            .arg(park)
            .args(extra)
            .args(["--", "sh", "-c", script])
            .output()
            .unwrap()
    };
    // The file and the counting process are there, twice from one park.
    for _ in 0..2 {
        let out = restore(&first, &[], "cat /root/f; a=$(cat /tmp/c); sleep 0.5; b=$(cat /tmp/c); [ $b -gt $a ] && echo counting");
        assert_eq!(out.stdout, b"kept\ncounting\n", "{out:?}");
        assert_eq!(out.status.code(), Some(0));
    }
    // Parked again with what the command wrote; its status still counts.
    let out = restore(
        &first,
        &["--park", second.to_str().unwrap()],
        "echo more >> /root/f; exit 3",
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = restore(&second, &[], "cat /root/f");
    assert_eq!(out.stdout, b"kept\nmore\n", "{out:?}");
    // The first park is unchanged by its restores.
    let out = restore(&first, &[], "cat /root/f");
    assert_eq!(out.stdout, b"kept\n", "{out:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn bad_network_rules_need_no_vm() {
    let cases: [(&str, &str, &str); 5] = [
        ("--net-allow", "10.0.0.1/8", "host bits set"),
        ("--net-allow", "300.1.2.3", "not an IPv4 address"),
        ("--net-deny", "1.2.3.4:70000", "port \"70000\""),
        ("--net-deny", "10.0.0.0/33", "prefix \"33\""),
        ("--net-allow", "1.2.3.4:90-80", "reversed"),
    ];
    for (flag, rule, why) in cases {
        // A missing rootfs would fail too, later: the rule is checked first.
        let out = crumble()
            .args(["run", "--rootfs", "/no/such/dir", flag, rule, "--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125), "{flag} {rule}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(flag) && err.contains(&format!("{rule:?}")) && err.contains(why),
            "{flag} {rule}: {err}"
        );
    }
    let out = crumble().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--allow-host", "--net-allow", "--net-deny"] {
        assert!(help.contains(flag), "{help}");
    }
}

fn doctor_reports_the_accelerator() {
    let out = crumble().arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("accelerator"), "{text}");
    assert!(text.contains("cache dir"), "{text}");
}

fn tty_without_a_terminal_is_a_clear_error() {
    // Stdin is a pipe: refused before anything boots.
    let out = run(&["-it", "--", "sh"], b"");
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the input device is not a TTY"), "{err}");
}

/// A pseudo-terminal of the test's, standing in for the user's terminal:
/// crumble gets the slave as its controlling terminal, the test types
/// into and reads from the master.
struct HostTerminal {
    master: std::fs::File,
    slave: std::os::fd::OwnedFd,
}

impl HostTerminal {
    fn open(rows: u16, cols: u16) -> HostTerminal {
        let (master, slave) = cc_testsupport::openpty(rows, cols);
        HostTerminal { master, slave }
    }

    /// The terminal's settings, as `stty -g` shows them.
    fn settings(&self) -> Vec<u32> {
        use std::os::fd::AsRawFd;
        // SAFETY: termios is plain data, filled by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios through a live pointer.
        let got = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(got, 0);
        let mut all = vec![t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag];
        all.extend(t.c_cc.iter().map(|&c| u32::from(c)));
        all
    }

    fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize through a live pointer.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(r, 0);
    }

    /// `crumble` with the slave as its controlling terminal and its
    /// stdin, stdout and stderr.
    fn spawn(&self, cmd: &mut Command) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let io = || Stdio::from(self.slave.try_clone().unwrap());
        cmd.stdin(io()).stdout(io()).stderr(io());
        // SAFETY: setsid and ioctl are async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        cmd.spawn().unwrap()
    }
}

/// Waits for crumble to end (a bound against hangs, not a speed test).
fn exit_of(child: &mut std::process::Child, shown: &Screen) -> std::process::ExitStatus {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < end,
            "crumble did not end: {}",
            shown.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_it_drives_a_shell_on_the_host_terminal() {
    let term = HostTerminal::open(30, 100);
    let before = term.settings();
    let mut child = term.spawn(
        crumble()
            .args(["run", "-it", "--rootfs"])
            .arg(rootfs())
            .args(["--", "sh"]),
    );
    let shown = Screen::watch(term.master.try_clone().unwrap());
    let mut keys = term.master.try_clone().unwrap();
    shown.expect("# ");
    // Raw while the command runs: the guest's terminal echoes and edits.
    let raw = term.settings();
    assert_eq!(raw[3] & (libc::ECHO | libc::ICANON | libc::ISIG), 0);
    // Arithmetic tells a command's output from the echo of its typing.
    keys.write_all(b"tty; echo cli_$((20+3)) $(stty size)\n")
        .unwrap();
    shown.expect("cli_23 30 100");
    assert!(shown.text().contains("/dev/pts/"), "{}", shown.text());
    assert!(
        shown.text().contains("echo cli_$((20+3))"),
        "typed input is echoed: {}",
        shown.text()
    );
    // The window change reaches crumble as SIGWINCH, asynchronously: ask
    // until the guest sees it.
    term.resize(40, 120);
    let end = Instant::now() + Duration::from_secs(60);
    for i in 0.. {
        keys.write_all(format!("echo win_$(({i}+1000)) $(stty size)\n").as_bytes())
            .unwrap();
        let marker = format!("win_{} ", i + 1000);
        shown.expect(&marker);
        if shown.text().contains(&format!("{marker}40 120")) {
            break;
        }
        assert!(Instant::now() < end, "the resize never reached the guest");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Ctrl-C is a byte typed: the guest's terminal interrupts the sleep,
    // not the shell or crumble.
    keys.write_all(b"sleep 1000\n").unwrap();
    shown.expect("sleep 1000");
    std::thread::sleep(Duration::from_millis(500));
    keys.write_all(b"\x03").unwrap();
    keys.write_all(b"echo after_$((3+4))\n").unwrap();
    shown.expect("after_7");
    keys.write_all(b"exit 3\n").unwrap();
    let status = exit_of(&mut child, &shown);
    assert_eq!(status.code(), Some(3), "{}", shown.text());
    assert_eq!(
        term.settings(),
        before,
        "the host terminal's settings are restored"
    );
}

fn run_it_restores_the_terminal_when_signalled() {
    let term = HostTerminal::open(24, 80);
    let before = term.settings();
    let mut child = term.spawn(
        crumble()
            .args(["run", "-it", "--rootfs"])
            .arg(rootfs())
            .args(["--", "sh", "-c", "echo sleeping; exec sleep 1000"]),
    );
    let shown = Screen::watch(term.master.try_clone().unwrap());
    shown.expect("sleeping");
    assert_ne!(term.settings(), before, "raw while the command runs");
    // SAFETY: kill(2) takes no pointers; the pid is our unreaped child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = exit_of(&mut child, &shown);
    // The command got the signal and ended by it, as without -t.
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", shown.text());
    assert_eq!(
        term.settings(),
        before,
        "the host terminal's settings are restored"
    );
}

fn run_forwards_output_stdin_and_status() {
    let out = run(&["--", "echo", "hello"], b"");
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.status.code(), Some(0));

    let out = run(
        &["--", "sh", "-c", "cat; echo err >&2; exit 7"],
        b"from stdin",
    );
    assert_eq!(out.stdout, b"from stdin");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code(), Some(7));

    let out = run(&["--", "sh", "-c", "kill -TERM $$"], b"");
    assert_eq!(out.status.code(), Some(128 + 15));
}

fn run_applies_env_workdir_user_and_resources() {
    let out = run(
        &[
            "--env",
            "A=1",
            "-e",
            "B=x=y",
            "--workdir",
            "/tmp",
            "--user",
            "alice",
            "--memory",
            "128",
            "--cpus",
            "2",
            "--",
        ]
        .into_iter()
        .chain([
            "sh",
            "-c",
            "echo $A $B; pwd; id -un; nproc; grep MemTotal /proc/meminfo",
        ])
        .collect::<Vec<_>>(),
        b"",
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(&lines[..4], ["1 x=y", "/tmp", "alice", "2"], "{text}");
    let kib: u64 = lines[4].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        kib > 64 << 10 && kib <= 128 << 10,
        "MemTotal {kib} kB for --memory 128"
    );
}

fn run_errors_are_clear() {
    let out = run(&["--", "no-such-program"], b"");
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-program"));

    let out = crumble()
        .args(["run", "--rootfs", "/no/such/dir", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/dir"));

    let out = run(&["--env", "NOEQUALS", "--", "true"], b"");
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
}

/// Every process below `pid` (QEMU sits under bubblewrap, the network relay beside
/// it), with its command name.
fn descendants(pid: u32) -> Vec<(u32, String)> {
    let all: Vec<(u32, u32, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // comm is in parentheses; ppid is the second field after it.
            let (comm, rest) = stat.rsplit_once(')')?;
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((p, ppid, comm.split_once('(')?.1.to_string()))
        })
        .collect();
    let mut found = Vec::new();
    let mut parents = vec![pid];
    while let Some(parent) = parents.pop() {
        for (p, ppid, comm) in &all {
            if *ppid == parent {
                found.push((*p, comm.clone()));
                parents.push(*p);
            }
        }
    }
    found
}

fn killing_the_host_process_ends_qemu_and_the_next_run_sweeps_its_dir() {
    let mut child = crumble()
        .arg("run")
        .arg("--rootfs")
        .arg(rootfs())
        // The ping sends a frame out, which starts the network relay.
        .args([
            "--",
            "sh",
            "-c",
            "ping -c 1 -W 1 10.0.2.3 >/dev/null; echo started; sleep 1000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    let below = descendants(child.id());
    let qemus = below.iter().filter(|(_, c)| c.contains("qemu")).count();
    // The VM's QEMU and the network relay's.
    if qemus != 2 {
        let _ = child.kill();
        let _ = child.wait();
        panic!("two QEMUs under crumble: {below:?}");
    }
    let run_dirs = || -> Vec<PathBuf> {
        std::fs::read_dir(cache().join("run"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    // Named <pid>.<start time>-<id>.
    let prefix = format!("{}.", child.id());
    let mine = |dirs: Vec<PathBuf>| {
        dirs.into_iter()
            .filter(|d| {
                d.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&prefix)
            })
            .count()
    };
    assert_eq!(mine(run_dirs()), 1);

    child.kill().unwrap();
    child.wait().unwrap();
    // QEMU, bubblewrap and the network relay all end with it.
    let alive = || {
        below
            .iter()
            .filter(|(p, _)| PathBuf::from(format!("/proc/{p}")).exists())
            .cloned()
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !alive().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(alive(), Vec::new(), "outlived their host process");

    assert_eq!(run(&["--", "true"], b"").status.code(), Some(0));
    assert_eq!(
        mine(run_dirs()),
        0,
        "the dead process's run dir was not swept"
    );
}

fn missing_pieces_name_the_fix() {
    let fail = |var: &str, value: &str| {
        let out = crumble()
            .env(var, value)
            .args(["run", "--rootfs"])
            .arg(rootfs())
            .args(["--", "true"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125), "{var}={value}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = fail("CC_QEMU", "/no/qemu-system-x86_64");
    assert!(e.contains("apt-get install qemu-system-x86"), "{e}");
    let e = fail("CC_KERNEL", "/no/vmlinux");
    assert!(
        e.contains("/no/vmlinux") && e.contains("scripts/setup.sh"),
        "{e}"
    );
    let e = fail("CC_AGENT", "/no/cc-agent");
    assert!(
        e.contains("/no/cc-agent") && e.contains("scripts/setup.sh"),
        "{e}"
    );
    let e = fail("CC_ACCEL", "hvf");
    assert!(
        e.contains("CC_ACCEL=hvf") && e.contains("kvm or tcg"),
        "{e}"
    );
}

fn qemu_dying_at_boot_is_reported_with_its_logs() {
    // Not a kernel: QEMU refuses it and exits at once.
    let bogus = std::env::temp_dir().join(format!("cc-bogus-kernel-{}", std::process::id()));
    std::fs::write(&bogus, b"not a kernel").unwrap();
    let out = crumble()
        .env("CC_KERNEL", &bogus)
        .args(["run", "--rootfs"])
        .arg(rootfs())
        .args(["--", "true"])
        .output()
        .unwrap();
    std::fs::remove_file(&bogus).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("failed to boot") && err.contains("--- qemu:"),
        "{err}"
    );
}

/// `crumble` with a fresh, empty image store; the kernel and agent come
/// from the data dir (or `CC_KERNEL`/`CC_AGENT` when set, say for an agent
/// just built).
fn crumble_in(store_cache: &std::path::Path) -> Command {
    let mut cmd = crumble();
    cmd.env("CC_CACHE_DIR", store_cache);
    cmd
}

fn the_data_dir_holds_the_kernel_and_agent() {
    let dir = std::env::temp_dir().join(format!("cc-cli-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let doctor = || {
        crumble()
            .env("CC_DATA_DIR", &dir)
            .env_remove("CC_KERNEL")
            .env_remove("CC_AGENT")
            .arg("doctor")
            .output()
            .unwrap()
    };
    let empty = doctor();
    let text = String::from_utf8_lossy(&empty.stdout).into_owned();
    assert!(!empty.status.success(), "{text}");
    assert!(
        text.contains(&format!("{}/vmlinux", dir.display())) && text.contains("CC_DATA_DIR"),
        "{text}"
    );
    std::fs::write(dir.join("vmlinux"), b"").unwrap();
    std::fs::write(dir.join("kernel.json"), br#"{"hash": "00ff00ff00ff00ff"}"#).unwrap();
    std::fs::write(dir.join("cc-agent"), b"").unwrap();
    let text = String::from_utf8_lossy(&doctor().stdout).into_owned();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        text.contains(&format!(
            "{}/vmlinux (hash 00ff00ff00ff00ff)",
            dir.display()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("agent        {}/cc-agent", dir.display())),
        "{text}"
    );
}

/// Nothing an instance needs lives in the cache: a new, empty cache dir
/// boots. The kernel and agent come from a data dir: the installed one, or
/// one made of `CC_KERNEL` and `CC_AGENT` when those are set.
fn an_empty_cache_dir_boots() {
    let dir = std::env::temp_dir().join(format!("cc-cli-empty-cache-{}", std::process::id()));
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let mut cmd = crumble();
    cmd.env("CC_CACHE_DIR", &cache)
        .env_remove("CC_KERNEL")
        .env_remove("CC_AGENT");
    let given = [("CC_KERNEL", "vmlinux"), ("CC_AGENT", "cc-agent")];
    if given.iter().any(|(var, _)| std::env::var_os(var).is_some()) {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        for (var, name) in given {
            let path = std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| installed(name));
            std::os::unix::fs::symlink(path, data.join(name)).unwrap();
        }
        cmd.env("CC_DATA_DIR", &data);
    }
    let out = cmd
        .args(["run", "--rootfs"])
        .arg(rootfs())
        .args(["--", "cat", "/proc/version"])
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(out.stdout.starts_with(b"Linux version "), "{err}");
}

/// A file `crumble` finds in its data dir without any variable.
fn installed(name: &str) -> PathBuf {
    let out = crumble()
        .env_remove("CC_KERNEL")
        .env_remove("CC_AGENT")
        .arg("doctor")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = if name == "vmlinux" {
        "kernel "
    } else {
        "agent "
    };
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    assert!(path.ends_with(name), "no installed {name}: {text}");
    PathBuf::from(path)
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn disk_mb_is_checked() {
    let out = crumble()
        .args([
            "run",
            "--rootfs",
            "/no/such/dir",
            "--disk-mb",
            "0",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("disk_mb 0"), "{err}");
}

fn disk_mb_sizes_the_writable_layer() {
    let out = run(
        &[
            "--cold",
            "--disk-mb",
            "96",
            "--",
            "sh",
            "-c",
            "df -k / | tail -1",
        ],
        b"",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(kib > 0 && kib <= 96 << 10, "{text}");
}

fn load_of_random_bytes_prints_text_not_binary() {
    let dir = std::env::temp_dir().join(format!("cc-cli-random-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Deterministic noise with every byte value, escape sequences included.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..64 << 10)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    for seed in 0..4 {
        let file = dir.join(format!("noise{seed}.bin"));
        std::fs::write(&file, &noise[seed * 512..]).unwrap();
        let out = crumble_in(&dir.join("cache"))
            .arg("load")
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125));
        let err = String::from_utf8(out.stderr).expect("stderr is UTF-8");
        assert!(
            err.chars()
                .all(|c| c == '\n' || !(c.is_control() || c == char::REPLACEMENT_CHARACTER)),
            "raw bytes on stderr: {err:?}"
        );
        assert!(err.starts_with("crumble: "), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn pull_follows_registries_conf() {
    let images = cc_testsupport::test_images();
    let mirror = cc_testsupport::Registry::start(cc_testsupport::Auth::Anonymous);
    mirror.push(&images.busybox, "latest", "alpine:latest");
    let cache = std::env::temp_dir().join(format!("cc-cli-conf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    // Nothing listens at the registry's own location: only the mirror can serve.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let conf = cache.join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "unqualified-search-registries = [\"registry.invalid\"]\n\
             [[registry]]\nprefix = \"registry.invalid\"\nlocation = \"{dead}\"\n\
             [[registry.mirror]]\nlocation = \"{}\"\n\
             [[registry]]\nprefix = \"blocked.invalid\"\nblocked = true\n",
            mirror.addr()
        ),
    )
    .unwrap();
    let pull = |name: &str| {
        crumble_in(&cache)
            .env("CC_REGISTRIES_CONF", &conf)
            .args(["pull", name])
            .output()
            .unwrap()
    };
    let out = pull("alpine");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&mirror.digest("alpine:latest")), "{err}");
    assert!(ok(crumble_in(&cache).arg("images")).contains("registry.invalid/alpine:latest"));
    // The short name finds the stored image as the pull resolved it.
    let exported = cache.join("exported");
    let out = ok(crumble_in(&cache)
        .env("CC_REGISTRIES_CONF", &conf)
        .args(["export", "alpine"])
        .arg(&exported));
    assert!(out.contains(&mirror.digest("alpine:latest")), "{out}");

    let out = pull("blocked.invalid/x:1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("blocked") && err.contains(&conf.display().to_string()),
        "{err}"
    );

    std::fs::write(&conf, "[[registry]]\nlocation = \"a.test\"\ninsecure = 1\n").unwrap();
    let out = pull("alpine");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("{} line 3", conf.display())), "{err}");
    std::fs::remove_dir_all(&cache).unwrap();
}

fn image_commands_end_to_end() {
    let images = cc_testsupport::test_images();
    let registry = cc_testsupport::Registry::start(cc_testsupport::Auth::Anonymous);
    registry.push(&images.busybox, "latest", "cli/busybox:1");
    let cache = std::env::temp_dir().join(format!("cc-cli-images-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let reference = format!("{}/cli/busybox:1", registry.addr());

    let out = crumble_in(&cache)
        .args(["pull", &reference])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&registry.digest("cli/busybox:1")));
    assert!(ok(crumble_in(&cache).arg("images")).contains(&reference));
    assert_eq!(
        ok(crumble_in(&cache).args(["run", &reference, "--", "sh", "-c", "echo $CC_IMAGE"])),
        "busybox\n"
    );

    let exported = cache.join("exported");
    ok(crumble_in(&cache)
        .args(["export", &reference])
        .arg(&exported));
    assert!(exported.join("index.json").is_file());
    let removed = ok(crumble_in(&cache).args(["rmi", &reference]));
    assert!(
        removed.contains("untagged") && removed.contains("removed"),
        "{removed}"
    );
    assert!(!ok(crumble_in(&cache).arg("images")).contains(&reference));
    let out = crumble_in(&cache)
        .args(["run", "--pull", "never", &reference, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NEVER"));

    assert!(
        ok(crumble_in(&cache).arg("load").arg(&exported)).contains(&reference),
        "export → load keeps the name"
    );
    assert!(ok(crumble_in(&cache)
        .arg("load")
        .arg(&images.busybox_docker_tar))
    .contains("docker.io/library/busybox:latest"));
    ok(crumble_in(&cache).arg("load").arg(&images.busybox_layers));
    let entry =
        ok(crumble_in(&cache).args(["run", "--pull", "never", "localhost/busybox-layers:latest"]));
    assert_eq!(
        entry, "entry: default-arg\n",
        "no command runs the entrypoint"
    );
    std::fs::remove_dir_all(&cache).unwrap();
}

fn run_mounts_and_timeout() {
    let dir = std::env::temp_dir().join(format!("cc-cli-mount-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("in.txt"), b"host data").unwrap();
    let ro = format!("{}:/mnt/in", dir.display());
    let rw = format!("{}:/mnt/out:rw", dir.display());
    let out = run(
        &[
            "--mount",
            &ro,
            "-v",
            &rw,
            "--",
            "sh",
            "-c",
            "cat /mnt/in/in.txt; echo made > /mnt/out/made.txt; echo x > /mnt/in/no",
        ],
        b"",
    );
    assert_eq!(out.stdout, b"host data");
    assert_ne!(
        out.status.code(),
        Some(0),
        "the read-only mount refused the last write"
    );
    assert_eq!(std::fs::read(dir.join("made.txt")).unwrap(), b"made\n");
    assert!(!dir.join("no").exists());

    let started = Instant::now();
    let out = run(&["--timeout", "2", "--", "sleep", "100"], b"");
    assert_eq!(
        out.status.code(),
        Some(125),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
    assert!(started.elapsed() < Duration::from_secs(60));

    let out = run(&["--mount", "/no/such/dir:/x", "--", "true"], b"");
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap rejects a missing mount source"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn templates_are_built_listed_used_and_removed() {
    let dir = std::env::temp_dir().join(format!("cc-cli-templates-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let echo = |extra: &[&str]| {
        let root = rootfs();
        let mut cmd = crumble_in(&dir);
        cmd.args(["run", "--rootfs"])
            .arg(root)
            .args(extra)
            .args(["--", "echo", "hi"]);
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.stdout, b"hi\n", "{stderr}");
        // A failed warm start falls back to a cold boot, with a warning.
        assert!(!stderr.contains("warm start failed"), "{stderr}");
    };
    echo(&["--cold"]);
    let listed = ok(crumble_in(&dir).arg("templates"));
    assert_eq!(
        listed.lines().count(),
        1,
        "a cold run builds none: {listed}"
    );
    echo(&[]);
    echo(&[]);
    let listed = ok(crumble_in(&dir).args(["templates", "ls"]));
    let rows: Vec<&str> = listed.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{listed}");
    assert!(rows[0].contains(" ok "), "{listed}");
    let key = rows[0].split_whitespace().next().unwrap();
    assert!(ok(crumble_in(&dir).args(["templates", "rm", key])).contains(key));
    let out = crumble_in(&dir)
        .args(["templates", "rm", key])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no template"));
    echo(&[]);
    assert!(ok(crumble_in(&dir).args(["templates", "clear"])).contains("removed 1 templates"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `crumble system df` rows as (kind, count, reclaimable is zero).
fn system_df(dir: &std::path::Path) -> Vec<(String, usize, bool)> {
    let listed = ok(crumble_in(dir).args(["system", "df"]));
    listed
        .lines()
        .skip(2)
        .filter(|l| !l.starts_with("total"))
        .map(|l| {
            let (kind, rest) = l.split_at(16);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(
                fields.len(),
                5,
                "count, size and unit, reclaimable and unit: {l}"
            );
            (
                kind.trim().to_string(),
                fields[0].parse().unwrap(),
                fields[3] == "0",
            )
        })
        .collect()
}

fn system_df_and_prune_account_for_every_kind() {
    let dir = std::env::temp_dir().join(format!("cc-cli-system-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let echo = |extra: &[&str]| {
        let out = crumble_in(&dir)
            .args(["run", "--rootfs"])
            .arg(rootfs())
            .args(extra)
            .args(["--", "echo", "hi"])
            .output()
            .unwrap();
        assert_eq!(
            out.stdout,
            b"hi\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    echo(&[]);
    // Leftovers: a run dir of a process long gone, an earlier agent's
    // initramfs.
    let dead = dir.join("run/0.1-gone");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(dead.join("upper.img"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(dir.join("initramfs/000000000000000000000000.cpio"), b"old").unwrap();
    let row = |rows: &[(String, usize, bool)], kind: &str| {
        rows.iter()
            .find(|r| r.0 == kind)
            .map(|r| (r.1, r.2))
            .unwrap_or_else(|| panic!("no {kind} row: {rows:?}"))
    };
    let rows = system_df(&dir);
    assert_eq!(row(&rows, "images"), (0, true), "{rows:?}");
    assert_eq!(
        row(&rows, "root images"),
        (1, true),
        "the host dir's: {rows:?}"
    );
    assert_eq!(row(&rows, "templates"), (1, true), "{rows:?}");
    assert_eq!(
        row(&rows, "writable layers"),
        (2, false),
        "blank disk, dead run dir: {rows:?}"
    );
    assert_eq!(row(&rows, "boot files"), (2, false), "{rows:?}");

    let pruned = ok(crumble_in(&dir).args(["system", "prune"]));
    assert!(pruned.contains("removed writable layers (1)"), "{pruned}");
    assert!(pruned.contains("removed boot files (1)"), "{pruned}");
    assert!(!dead.exists());
    let rows = system_df(&dir);
    assert_eq!(row(&rows, "templates"), (1, true), "in use: kept: {rows:?}");
    assert_eq!(
        row(&rows, "boot files"),
        (1, true),
        "the current agent's: {rows:?}"
    );

    let pruned = ok(crumble_in(&dir).args(["system", "prune", "--all"]));
    assert!(pruned.contains("removed templates (1)"), "{pruned}");
    let rows = system_df(&dir);
    assert!(rows.iter().all(|r| r.1 == 0), "all gone: {rows:?}");
    // Everything is rebuilt on the next start.
    echo(&[]);
    echo(&[]);
    assert_eq!(row(&system_df(&dir), "templates"), (1, true));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `bench exec --phases` adds the round trip through the C library and
/// from Python; a caller that is not there is named with the reason, never
/// left out. Numbers are not checked: they depend on the machine's load.
fn bench_exec_phases_names_each_caller() {
    let bench = |extra: &[&str]| {
        let mut cmd = crumble();
        cmd.args(["bench", "exec", "--runs", "10", "--phases", "--rootfs"])
            .arg(rootfs())
            .arg("--busybox")
            .arg(rootfs().join("bin/busybox"))
            .args(extra);
        ok(&mut cmd)
    };
    let caller = |text: &str, name: &str| -> String {
        let line = text.lines().find(|l| l.starts_with(name));
        line.unwrap_or_else(|| panic!("no {name} row: {text}"))
            .to_owned()
    };
    let text = bench(&[
        "--libcc",
        "/no/such/libcc.so",
        "--python",
        "/no/such/python",
    ]);
    assert!(caller(&text, "Rust core").contains("1.000"), "{text}");
    assert!(
        caller(&text, "C ABI:").contains("skipped: --libcc /no/such/libcc.so: no such file"),
        "{text}"
    );
    assert!(
        caller(&text, "Python:").contains("skipped: /no/such/python: no such interpreter"),
        "{text}"
    );
    assert!(text.contains("phases of a traced exec"), "{text}");

    // Found or not, each caller has a row: a median, or why it was skipped.
    let text = bench(&[]);
    for name in ["C ABI:", "Python:"] {
        let row = caller(&text, name);
        let measured = row
            .split_whitespace()
            .last()
            .unwrap()
            .parse::<f64>()
            .is_ok();
        assert!(measured || row.contains("skipped: "), "{text}");
    }
}

/// Why the VM tests do not run, or `None` when they do: they boot real VMs
/// (QEMU, the guest kernel and agent; minutes under TCG), so they wait to
/// be asked. The same words as the VM tests' and the Python tests' reason.
fn vm_skip_reason() -> Option<&'static str> {
    (std::env::var("CC_RUN_VM_TESTS").as_deref() != Ok("1"))
        .then_some("VM test: set CC_RUN_VM_TESTS=1 to boot real VMs (QEMU, guest kernel, agent)")
}

/// `[(name, function), ...]` from function names.
macro_rules! named {
    ($($test:ident),* $(,)?) => {
        &[$((stringify!($test), $test as _)),*]
    };
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let no_vm: &[(&str, fn())] = named![
        usage_errors_need_no_vm,
        park_and_restore_usage_errors_need_no_vm,
        bad_network_rules_need_no_vm,
        doctor_reports_the_accelerator,
        missing_pieces_name_the_fix,
        disk_mb_is_checked,
        load_of_random_bytes_prints_text_not_binary,
        pull_follows_registries_conf,
        the_data_dir_holds_the_kernel_and_agent,
        tty_without_a_terminal_is_a_clear_error,
    ];
    let vm: &[(&str, fn())] = named![
        run_forwards_output_stdin_and_status,
        run_park_and_restore_go_on_from_the_park,
        run_it_drives_a_shell_on_the_host_terminal,
        run_it_restores_the_terminal_when_signalled,
        run_applies_env_workdir_user_and_resources,
        run_errors_are_clear,
        killing_the_host_process_ends_qemu_and_the_next_run_sweeps_its_dir,
        qemu_dying_at_boot_is_reported_with_its_logs,
        disk_mb_sizes_the_writable_layer,
        image_commands_end_to_end,
        run_mounts_and_timeout,
        templates_are_built_listed_used_and_removed,
        system_df_and_prune_account_for_every_kind,
        bench_exec_phases_names_each_caller,
        an_empty_cache_dir_boots,
    ];
    let skip = vm_skip_reason();
    let trials = no_vm
        .iter()
        .map(|&(name, test)| (name, test, None))
        .chain(vm.iter().map(|&(name, test)| (name, test, skip)))
        .map(|(name, test, skip)| {
            Trial::ignorable_test(name, move || {
                Ok(match skip {
                    Some(reason) => Completion::ignored_with(reason),
                    None => {
                        test();
                        Completion::Completed
                    }
                })
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
