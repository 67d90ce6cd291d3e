//! VM tests through a real containerd: one containerd per test binary, a
//! child of this process with its own root, state dir and socket under a
//! temp dir (no system service), the test image pulled into it from a
//! loopback registry, and `ctr` driving the shim. They run when
//! `CC_RUN_VM_TESTS=1`, as root, with `containerd` and `ctr` installed
//! (`scripts/setup.sh`); otherwise each is reported ignored, with the
//! reason.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cc_testsupport::{Auth, Registry};
use libtest_mimic::{Arguments, Failed, Trial};

const RUNTIME: &str = "io.containerd.crumble.v1";
const NS: &str = "cc";

/// The containerd every test talks to, and the image it holds.
struct Containerd {
    dir: PathBuf,
    child: Child,
    image: String,
    _registry: Registry,
}

static CONTAINERD: OnceLock<Mutex<Option<Containerd>>> = OnceLock::new();

fn shim_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_containerd-shim-crumble-v1"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn start_containerd() -> Containerd {
    let dir = std::env::temp_dir().join(format!("cc-shim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let config = format!(
        "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n"
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let path = format!(
        "{}:{}",
        shim_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let mut cmd = Command::new("containerd");
    cmd.arg("--config")
        .arg(dir.join("config.toml"))
        .env("PATH", path)
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start containerd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctr_in(&dir, &["version"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "containerd did not answer: {}",
            std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let registry = Registry::start(Auth::Anonymous);
    registry.push(
        &cc_testsupport::test_images().busybox,
        "latest",
        "busybox:latest",
    );
    let image = format!("{}/busybox:latest", registry.addr());
    let pull = ctr_in(&dir, &["images", "pull", "--plain-http", &image]);
    assert!(pull.status.success(), "pull: {}", text(&pull.stderr));
    Containerd {
        dir,
        child,
        image,
        _registry: registry,
    }
}

fn with_containerd<R>(f: impl FnOnce(&Containerd) -> R) -> R {
    let m = CONTAINERD.get_or_init(|| Mutex::new(None));
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    let c = g.get_or_insert_with(start_containerd);
    f(c)
}

fn ctr_in(dir: &Path, args: &[&str]) -> Output {
    ctr_cmd(dir, args).output().expect("run ctr")
}

fn ctr_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg("-a")
        .arg(dir.join("c.sock"))
        .args(["-n", NS])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Containerd {
    fn ctr(&self, args: &[&str]) -> Output {
        ctr_in(&self.dir, args)
    }

    /// `ctr run --rm` of the test image as `id` with `extra` options.
    fn run(&self, extra: &[&str], id: &str, argv: &[&str]) -> Output {
        let mut args = vec!["run", "--runtime", RUNTIME, "--rm"];
        args.extend(extra);
        args.extend([self.image.as_str(), id]);
        args.extend(argv);
        self.ctr(&args)
    }

    /// `ctr run --rm --config` of the OCI spec `spec` (JSON) as `id`.
    fn run_spec(&self, spec: &str, id: &str) -> Output {
        let file = self.dir.join(format!("{id}.json"));
        std::fs::write(&file, spec).unwrap();
        let config = file.to_str().unwrap();
        self.ctr(&["run", "--runtime", RUNTIME, "--rm", "--config", config, id])
    }

    /// `ctr run --rm` of the test image as `id`, to spawn with stdio of
    /// the caller's choice.
    fn run_cmd(&self, id: &str, argv: &[&str]) -> Command {
        let mut args = vec!["run", "--runtime", RUNTIME, "--rm", &self.image, id];
        args.extend(argv);
        ctr_cmd(&self.dir, &args)
    }

    /// `ctr run -d`: a task left running.
    fn run_detached(&self, id: &str, argv: &[&str]) {
        let mut args = vec!["run", "--runtime", RUNTIME, "-d", &self.image, id];
        args.extend(argv);
        let out = self.ctr(&args);
        assert!(out.status.success(), "run -d: {}", text(&out.stderr));
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task")
            .join(NS)
            .join(id)
    }

    /// The task's pid (QEMU's) and the VM's run dir, from the bundle.
    fn vm_of(&self, id: &str) -> (u32, PathBuf) {
        let json = std::fs::read(self.bundle(id).join("crumble-state.json")).expect("shim state");
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        (
            v["vm_pid"].as_u64().unwrap() as u32,
            PathBuf::from(v["run_dir"].as_str().unwrap()),
        )
    }

    /// Deletes the task and container (whatever state they are in).
    fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.ctr(&["task", "delete", id]).status.success() && Instant::now() < deadline {
            let ls = self.ctr(&["task", "ls"]);
            if !text(&ls.stdout).contains(id) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let rm = self.ctr(&["container", "rm", id]);
        assert!(rm.status.success(), "container rm: {}", text(&rm.stderr));
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Mount points under `dir`, from this mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

fn assert_no_shim(id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while shim_pid(id).is_some() {
        assert!(Instant::now() < deadline, "the shim of {id} still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_nothing_left(c: &Containerd, id: &str, vm_pid: u32, run_dir: &Path) {
    assert_no_shim(id);
    assert!(
        wait_gone(vm_pid, Duration::from_secs(10)),
        "QEMU {vm_pid} still runs"
    );
    assert!(!run_dir.exists(), "run dir {} left", run_dir.display());
    assert!(!c.bundle(id).exists(), "bundle left");
    assert_eq!(mounts_under(&c.dir.join("state")), Vec::<String>::new());
}

// ---- the tests ----

fn echo_prints_hi(c: &Containerd) {
    let out = c.run(&[], "echo", &["echo", "hi"]);
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "hi\n");
}

fn exit_code_propagates(c: &Containerd) {
    let out = c.run(&[], "exit7", &["sh", "-c", "echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("err"));
}

fn delete_leaves_nothing(c: &Containerd) {
    c.run_detached("del", &["sleep", "600"]);
    let (vm_pid, run_dir) = c.vm_of("del");
    assert!(alive(vm_pid));
    let ls = text(&c.ctr(&["task", "ls"]).stdout);
    assert!(
        ls.contains(&vm_pid.to_string()) && ls.contains("RUNNING"),
        "{ls}"
    );
    let busy = c.ctr(&["task", "delete", "del"]);
    assert!(!busy.status.success(), "a running task was deleted");
    c.remove("del");
    assert_nothing_left(c, "del", vm_pid, &run_dir);
}

fn killing_the_shim_ends_its_vm(c: &Containerd) {
    c.run_detached("shimkill", &["sleep", "600"]);
    let (vm_pid, run_dir) = c.vm_of("shimkill");
    let shim = shim_pid("shimkill").expect("the shim process");
    // SAFETY: kill with a pid and a signal number has no memory effects.
    unsafe { libc::kill(shim as i32, libc::SIGKILL) };
    assert!(
        wait_gone(vm_pid, Duration::from_secs(10)),
        "QEMU outlived its shim"
    );
    c.remove("shimkill");
    assert_nothing_left(c, "shimkill", vm_pid, &run_dir);
}

/// The shim daemon of container `id`: its command line says `-id ID` and
/// `-socket`.
fn shim_pid(id: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-crumble-v1"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"-id" && w[1] == id.as_bytes());
        (is_shim && ours && args.contains(&&b"-socket"[..])).then_some(pid)
    })
}

/// Waits until `ctr task ls` shows task `id` running.
fn wait_running(c: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let running = |ls: String| {
        ls.lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
    };
    while !running(text(&c.ctr(&["task", "ls"]).stdout)) {
        assert!(Instant::now() < deadline, "task {id} never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stdin_round_trips(c: &Containerd) {
    let mut cmd = ctr_cmd(
        &c.dir,
        &[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            &c.image,
            "stdin",
            "sh",
            "-c",
            "cat; echo done",
        ],
    );
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"piped data\n").unwrap();
    // ctr asks the shim to close the task's stdin at end of input only
    // once the task exists: before, the end is its own.
    wait_running(c, "stdin");
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "piped data\ndone\n");
}

fn terminal_takes_the_clients_size(c: &Containerd) {
    use std::os::fd::AsFd;
    let (master, slave) = cc_testsupport::openpty(30, 100);
    // ctr resizes the task's terminal once it started: ask until the
    // guest sees the client's size.
    let script = "for i in $(seq 40); do s=$(stty size); [ \"$s\" = \"30 100\" ] && break; \
                  sleep 0.25; done; echo size=$s; tty";
    let term = |f: &std::os::fd::OwnedFd| Stdio::from(f.as_fd().try_clone_to_owned().unwrap());
    let mut child = ctr_cmd(
        &c.dir,
        &[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            "-t",
            &c.image,
            "tty",
            "sh",
            "-c",
            script,
        ],
    )
    .stdin(term(&slave))
    .stdout(term(&slave))
    .stderr(term(&slave))
    .spawn()
    .unwrap();
    let shown = cc_testsupport::Screen::watch(master);
    let status = child.wait().unwrap();
    shown.expect("/dev/pts/");
    assert!(status.success(), "{}", shown.text());
    assert!(shown.text().contains("size=30 100"), "{}", shown.text());
}

fn env_and_cwd_from_image_and_flags(c: &Containerd) {
    let script = "echo $CC_IMAGE $FOO; pwd";
    let out = c.run(
        &["--env", "FOO=bar", "--cwd", "/tmp"],
        "envcwd",
        &["sh", "-c", script],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "busybox bar\n/tmp\n");
}

fn exec_ps_and_kill_statuses(c: &Containerd) {
    for (signal, status) in [("SIGTERM", 143), ("SIGKILL", 137)] {
        let id = format!("kill{status}");
        let mut run = c
            .run_cmd(&id, &["sleep", "600"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        wait_running(c, &id);
        if status == 143 {
            let exec = c.ctr(&[
                "task",
                "exec",
                "--exec-id",
                "x",
                &id,
                "sh",
                "-c",
                "echo exec; exit 3",
            ]);
            assert_eq!(exec.status.code(), Some(3), "{}", text(&exec.stderr));
            assert_eq!(text(&exec.stdout), "exec\n");
            let ps = text(&c.ctr(&["task", "ps", &id]).stdout);
            assert_eq!(ps.lines().count(), 2, "one process: {ps}");
        }
        // SIGKILL goes to every process of the task (`--all`).
        let mut kill = vec!["task", "kill", "-s", signal, &id];
        if status == 137 {
            kill.insert(2, "--all");
        }
        let kill = c.ctr(&kill);
        assert!(kill.status.success(), "{}", text(&kill.stderr));
        let out = run.wait().unwrap();
        assert_eq!(out.code(), Some(status), "{signal}");
    }
}

/// A kill without `--all` reaches the task's process alone: the child of
/// the shell that init runs sees no SIGTERM (a signal to the group would
/// reach it too), only the USR1 its parent's trap sends it.
fn kill_without_all_signals_the_process_alone(c: &Containerd) {
    use std::io::{BufRead, BufReader};
    let child = "t=; u=; trap 't=\"$t TERM\"' TERM; trap u=1 USR1; echo ready; \
                 while [ -z \"$u\" ]; do sleep 0.1; done; echo \"child:$t\"";
    let script = format!(
        "sh -c '{}' & c=$!; trap 'kill -USR1 $c; wait $c; exit 3' TERM; wait",
        child.replace('\'', "'\\''")
    );
    let mut run = c
        .run_cmd("killone", &["sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let kill = c.ctr(&["task", "kill", "-s", "SIGTERM", "killone"]);
    assert!(kill.status.success(), "{}", text(&kill.stderr));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(rest, "child:\n", "the child got the task's SIGTERM");
    assert_eq!(run.wait().unwrap().code(), Some(3));
}

fn read_only_bind_mount(c: &Containerd) {
    let src = c.dir.join("bind-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "from host\n").unwrap();
    let mount = format!("type=bind,src={},dst=/d,options=rbind:ro", src.display());
    let script = "cat /d/f; touch /d/x 2>/dev/null && echo wrote || echo refused";
    let out = c.run(&["--mount", &mount], "bind", &["sh", "-c", script]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from host\nrefused\n");
    assert!(!src.join("x").exists());
}

/// A file bind reaches the guest alone (not its directory's other files),
/// read-only, in place of the image's file at the destination; a writable
/// one from another filesystem (staged by a bind, as it cannot be
/// hard-linked) takes writes, and its bind is gone after the run.
fn file_bind_mounts(c: &Containerd) {
    let src = c.dir.join("file-bind-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "file from host\n").unwrap();
    std::fs::write(src.join("sibling"), "private\n").unwrap();
    let other_fs = PathBuf::from(format!("/dev/shm/cc-shim-test-{}", std::process::id()));
    std::fs::write(&other_fs, "shm\n").unwrap();
    let ro = format!(
        "type=bind,src={},dst=/etc/group,options=rbind:ro",
        src.join("f").display()
    );
    let rw = format!(
        "type=bind,src={},dst=/srv/w,options=rbind:rw",
        other_fs.display()
    );
    let script = "cat /etc/group; echo x >> /etc/group 2>/dev/null && echo wrote || echo refused; \
                  ls /.crumble-binds/0; echo more >> /srv/w && cat /srv/w";
    let out = c.run(
        &["--mount", &ro, "--mount", &rw],
        "filebind",
        &["sh", "-c", script],
    );
    let written = std::fs::read_to_string(&other_fs);
    let _ = std::fs::remove_file(&other_fs);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "file from host\nrefused\nf\nshm\nmore\n");
    assert_eq!(
        std::fs::read_to_string(src.join("f")).unwrap(),
        "file from host\n"
    );
    assert_eq!(written.unwrap(), "shm\nmore\n");
    assert_no_shim("filebind");
    assert!(!c.bundle("filebind").exists(), "bundle left");
    assert_eq!(mounts_under(&c.dir.join("state")), Vec::<String>::new());
}

/// `ctr task metrics` decodes the task's metrics (cgroup v2 ones) and
/// shows the VM's memory in use.
fn metrics_show_memory_in_use(c: &Containerd) {
    c.run_detached("metrics", &["sleep", "600"]);
    let out = c.ctr(&["task", "metrics", "metrics"]);
    c.remove("metrics");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let value = |name: &str| {
        shown.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(name)).then(|| f.next()?.parse::<u64>().ok())?
        })
    };
    assert!(value("memory.usage").is_some_and(|v| v > 0), "{shown}");
    assert!(
        value("memory.usage_limit").is_some_and(|v| v > 0),
        "{shown}"
    );
    assert!(value("cpu.usage_usec").is_some(), "{shown}");
}

/// `ctr events`, subscribed: its lines as they come.
struct Events {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Events {
    fn subscribe(c: &Containerd) -> Events {
        use std::io::{BufRead, BufReader};
        let mut child = ctr_cmd(&c.dir, &["events"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut events = Events { child, lines };
        // Events of our own first (labelling a namespace): the stream is
        // subscribed once one shows.
        let probe = c.ctr(&["namespaces", "create", "cc-events-probe"]);
        assert!(probe.status.success(), "{}", text(&probe.stderr));
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in 0.. {
            assert!(Instant::now() < deadline, "ctr events shows no event");
            let label = format!("n={n}");
            let _ = c.ctr(&["namespaces", "label", "cc-events-probe", &label]);
            let probed = |l: &str| l.contains("cc-events-probe");
            if events.until(&probed, Duration::from_secs(1)).is_some() {
                break;
            }
        }
        let _ = c.ctr(&["namespaces", "remove", "cc-events-probe"]);
        events
    }

    /// The lines up to and with the first that `what` matches, within
    /// `within`; `None` when none did.
    fn until(&mut self, what: &dyn Fn(&str) -> bool, within: Duration) -> Option<Vec<String>> {
        let deadline = Instant::now() + within;
        let mut lines = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = what(&line);
                    lines.push(line);
                    if found {
                        return Some(lines);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `line` of `ctr events` is an event of `topic` for container `id`.
fn event_of(line: &str, topic: &str, id: &str) -> bool {
    line.contains(&format!(" {topic} ")) && line.contains(&format!("\"container_id\":\"{id}\""))
}

/// containerd's event stream carries the shim's TaskExit with the status.
fn events_show_task_exit(c: &Containerd) {
    let mut events = Events::subscribe(c);
    let out = c.run(&[], "events", &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let exited = |l: &str| event_of(l, "/tasks/exit", "events");
    let seen = events.until(&exited, Duration::from_secs(30));
    let exit = seen
        .and_then(|l| l.last().cloned())
        .expect("no TaskExit event");
    assert!(exit.contains("\"exit_status\":7"), "{exit}");
}

/// An awk program that outgrows the VM's default 512 MiB in 2 MiB
/// strings, so the kernel's OOM killer ends it (no allocation is too
/// large to fail instead).
const MEMORY_HOG: &str =
    "BEGIN { s = \"x\"; for (i = 0; i < 20; i++) s = s s; while (1) a[n++] = s s }";

/// A task the guest kernel's OOM killer ends shows a TaskOOM before its
/// TaskExit (status 137); one killed by `ctr task kill -s SIGKILL` shows
/// none.
fn events_show_task_oom_before_exit(c: &Containerd) {
    let mut events = Events::subscribe(c);
    let out = c.run(&[], "oom", &["awk", MEMORY_HOG]);
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    let exited = |l: &str| event_of(l, "/tasks/exit", "oom");
    let seen = events
        .until(&exited, Duration::from_secs(60))
        .expect("no TaskExit event");
    let exit = seen.last().unwrap();
    assert!(exit.contains("\"exit_status\":137"), "{exit}");
    assert!(
        seen.iter().any(|l| event_of(l, "/tasks/oom", "oom")),
        "no TaskOOM before the TaskExit: {seen:#?}"
    );

    c.run_detached("sigkill", &["sleep", "600"]);
    let kill = c.ctr(&["task", "kill", "-s", "SIGKILL", "sigkill"]);
    assert!(kill.status.success(), "{}", text(&kill.stderr));
    let exited = |l: &str| event_of(l, "/tasks/exit", "sigkill");
    let seen = events.until(&exited, Duration::from_secs(30));
    c.remove("sigkill");
    let seen = seen.expect("no TaskExit event");
    assert!(
        seen.last().unwrap().contains("\"exit_status\":137"),
        "{seen:#?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("/tasks/oom")),
        "a plain SIGKILL showed a TaskOOM: {seen:#?}"
    );
    // Nor after its exit, up to its delete.
    let deleted = |l: &str| event_of(l, "/tasks/delete", "sigkill");
    let seen = events.until(&deleted, Duration::from_secs(30));
    let seen = seen.expect("no TaskDelete event");
    assert!(
        !seen.iter().any(|l| l.contains("/tasks/oom")),
        "a plain SIGKILL showed a TaskOOM: {seen:#?}"
    );
}

fn unsupported_requests_are_refused_and_leave_nothing(c: &Containerd) {
    for (flags, says) in [
        (&["--privileged"][..], "privileged"),
        (&["--net-host"][..], "host network namespace"),
        (&["--with-ns", "pid:/proc/1/ns/pid"][..], "/proc/1/ns/pid"),
    ] {
        let out = c.run(flags, "refused", &["true"]);
        assert!(!out.status.success(), "{flags:?} ran");
        assert!(
            text(&out.stderr).contains(says),
            "{flags:?}: {}",
            text(&out.stderr)
        );
        let _ = c.ctr(&["container", "rm", "refused"]);
        assert_no_shim("refused");
        assert!(!c.bundle("refused").exists(), "{flags:?} left its bundle");
        assert_eq!(mounts_under(&c.dir.join("state")), Vec::<String>::new());
    }
}

/// containerd writes the bundle's config.json from a spec it parsed, so a
/// malformed one comes from `ctr --config` with what Go's spec types take
/// and the OCI spec does not define (an unknown rlimit).
fn malformed_config_is_refused_and_leaves_nothing(c: &Containerd) {
    let spec = r#"{"ociVersion": "1.0.2", "root": {"path": "rootfs"},
        "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                    "rlimits": [{"type": "RLIMIT_NONSENSE", "hard": 1, "soft": 1}]},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "mount"}]}}"#;
    let out = c.run_spec(spec, "malformed");
    assert!(!out.status.success(), "a malformed spec ran");
    let err = text(&out.stderr);
    assert!(err.contains("config.json is malformed"), "{err}");
    assert!(err.contains("RLIMIT_NONSENSE"), "{err}");
    let _ = c.ctr(&["container", "rm", "malformed"]);
    assert_no_shim("malformed");
    assert!(!c.bundle("malformed").exists(), "the bundle was left");
    assert_eq!(mounts_under(&c.dir.join("state")), Vec::<String>::new());
}

/// `ctr run` has no rlimit flag, so the spec comes from `ctr --config`,
/// its root a host directory holding a static busybox.
fn rlimits_of_the_spec_apply(c: &Containerd) {
    let root = c.dir.join("rlimit-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let spec = format!(
        r#"{{"ociVersion": "1.0.2", "root": {{"path": {root:?}}},
        "process": {{"args": ["/bin/busybox", "sh", "-c", "ulimit -Sn; ulimit -Hn"],
                    "cwd": "/", "user": {{"uid": 0, "gid": 0}},
                    "rlimits": [{{"type": "RLIMIT_NOFILE", "hard": 456, "soft": 123}}]}},
        "linux": {{"namespaces": [{{"type": "pid"}}, {{"type": "network"}}, {{"type": "ipc"}}, {{"type": "mount"}}]}}}}"#,
        root = root.to_str().unwrap()
    );
    let out = c.run_spec(&spec, "rlimit");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "123\n456\n");
}

/// CRI's annotations for a pod's sandbox `sandbox`, or for a member of it.
fn pod_flags(kind: &'static str, sandbox: &str) -> Vec<String> {
    vec![
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={sandbox}"),
    ]
}

/// Starts pod sandbox `sandbox` (a `sleep`); returns its VM's QEMU pid
/// and run dir.
fn start_pod(c: &Containerd, sandbox: &str) -> (u32, PathBuf) {
    run_detached_with(
        c,
        &pod_flags("sandbox", sandbox),
        sandbox,
        &["sleep", "600"],
    );
    c.vm_of(sandbox)
}

/// `ctr run --rm` of `argv` as `id`, a member of pod `sandbox` with
/// `extra` options too.
fn run_member(c: &Containerd, sandbox: &str, extra: &[String], id: &str, argv: &[&str]) -> Output {
    let flags = pod_flags("container", sandbox);
    let all: Vec<&str> = flags.iter().chain(extra).map(String::as_str).collect();
    c.run(&all, id, argv)
}

/// `ctr run -d` of the test image as `id` with `extra` options.
fn run_detached_with(c: &Containerd, extra: &[String], id: &str, argv: &[&str]) {
    let mut args = vec!["run", "--runtime", RUNTIME, "-d"];
    args.extend(extra.iter().map(String::as_str));
    args.extend([c.image.as_str(), id]);
    args.extend(argv);
    let out = c.ctr(&args);
    assert!(out.status.success(), "run -d {id}: {}", text(&out.stderr));
}

/// The pid `ctr task ls` shows for task `id`.
fn task_pid(c: &Containerd, id: &str) -> u32 {
    let ls = text(&c.ctr(&["task", "ls"]).stdout);
    ls.lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols[1].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no task {id}: {ls}"))
}

/// QEMU processes running a VM (not QEMU's `-M none` helpers) that
/// descend from process `ancestor`.
fn qemus_under(ancestor: u32) -> Vec<u32> {
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
    };
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = args.split(|b| *b == 0).collect();
            args.first()
                .is_some_and(|a| a.ends_with(b"qemu-system-x86_64"))
                && !args.windows(2).any(|w| w == [&b"-M"[..], &b"none"[..]])
        })
        .filter(|&pid| {
            let mut p = pid;
            while let Some(pp) = parent(p) {
                if pp == ancestor {
                    return true;
                }
                if pp <= 1 {
                    break;
                }
                p = pp;
            }
            false
        })
        .collect()
}

/// `ctr task exec` of `argv` in task `id`: its stdout, after checking it
/// succeeded.
fn exec_in(c: &Containerd, id: &str, exec_id: &str, argv: &[&str]) -> String {
    let mut args = vec!["task", "exec", "--exec-id", exec_id, id];
    args.extend(argv);
    let out = c.ctr(&args);
    assert!(
        out.status.success(),
        "exec in {id}: {:?} {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn pod_containers_share_one_vm_with_separate_roots(c: &Containerd) {
    let (vm_pid, run_dir) = start_pod(c, "podsb");
    let member = pod_flags("container", "podsb");
    run_detached_with(c, &member, "poda", &["sleep", "600"]);
    run_detached_with(c, &member, "podb", &["sleep", "600"]);
    // One shim, one QEMU: the members joined the sandbox's.
    let shim = shim_pid("podsb").expect("the pod's shim");
    assert_eq!(shim_pid("poda"), None, "a member got a shim of its own");
    assert_eq!(shim_pid("podb"), None, "a member got a shim of its own");
    assert_eq!(qemus_under(shim), vec![vm_pid]);
    for id in ["poda", "podb"] {
        assert_eq!(task_pid(c, id), vm_pid, "{id} runs in another VM");
    }
    // Separate roots: a file one writes is not in the other's (nor in the
    // sandbox's), and each has its own /proc and /tmp.
    let wrote = exec_in(
        c,
        "poda",
        "w",
        &["sh", "-c", "echo from-a > /mine; cat /mine"],
    );
    assert_eq!(wrote, "from-a\n");
    let probe = "test -e /mine && echo shared || echo separate";
    assert_eq!(exec_in(c, "podb", "r", &["sh", "-c", probe]), "separate\n");
    assert_eq!(exec_in(c, "podsb", "r", &["sh", "-c", probe]), "separate\n");
    let mounts = exec_in(c, "podb", "m", &["cat", "/proc/self/mounts"]);
    for m in [" /proc proc ", " /tmp tmpfs ", " /dev "] {
        assert!(mounts.contains(m), "{m} missing: {mounts}");
    }
    // Killing and deleting one member leaves the other running.
    c.remove("poda");
    assert_eq!(exec_in(c, "podb", "after", &["echo", "still"]), "still\n");
    // Its root is gone from the guest: no mount, no directory.
    let gone = "grep -c /.crumble-pod/poda /proc/mounts; test -e /.crumble-pod/poda || echo gone";
    assert_eq!(
        exec_in(c, "podsb", "gone", &["sh", "-c", gone]),
        "0\ngone\n"
    );
    assert!(alive(vm_pid), "the pod's VM ended with a member");
    let ls = text(&c.ctr(&["task", "ls"]).stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("podb") && l.contains("RUNNING")),
        "{ls}"
    );
    // Deleting the rest, the sandbox last, leaves nothing.
    c.remove("podb");
    c.remove("podsb");
    assert_nothing_left(c, "podsb", vm_pid, &run_dir);
    assert!(!c.bundle("poda").exists() && !c.bundle("podb").exists());
}

/// In a pod's VM the OOM kill is the member's whose process it killed,
/// not the sandbox's. The hog runs from a copy of busybox in the member's
/// `/tmp` (guest memory): run from the member's image (erofs on a loop
/// device over a file on the VM's disk), the guest took ten minutes in a
/// trial to kill it, reclaiming and rereading busybox's pages meanwhile.
fn pod_member_oom_is_its_own(c: &Containerd) {
    let mut events = Events::subscribe(c);
    let (vm_pid, run_dir) = start_pod(c, "oomsb");
    let hog = "cp /bin/busybox /tmp/busybox && exec /tmp/busybox awk \"$0\"";
    let out = run_member(c, "oomsb", &[], "oomhog", &["sh", "-c", hog, MEMORY_HOG]);
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    let exited = |l: &str| event_of(l, "/tasks/exit", "oomhog");
    let seen = events.until(&exited, Duration::from_secs(60));
    c.remove("oomsb");
    assert_nothing_left(c, "oomsb", vm_pid, &run_dir);
    let seen = seen.expect("no TaskExit event");
    assert!(
        seen.iter().any(|l| event_of(l, "/tasks/oom", "oomhog")),
        "no TaskOOM for the member: {seen:#?}"
    );
    assert!(
        !seen.iter().any(|l| event_of(l, "/tasks/oom", "oomsb")),
        "a TaskOOM for the sandbox: {seen:#?}"
    );
}

/// A pod member's read-only directory bind (a Kubernetes secret or
/// config map, say) is copied into its root as of create, symbolic links
/// kept; a writable one, which could not be shared, is refused and leaves
/// nothing.
fn member_directory_binds(c: &Containerd) {
    let host = c.dir.join("volume");
    std::fs::create_dir_all(host.join("..data/sub")).unwrap();
    std::fs::write(host.join("..data/token"), "secret\n").unwrap();
    std::fs::write(host.join("..data/sub/deep"), "deep\n").unwrap();
    std::os::unix::fs::symlink("..data/token", host.join("token")).unwrap();
    let (vm_pid, run_dir) = start_pod(c, "volsb");
    let bind = |options: &str| {
        format!(
            "type=bind,src={},dst=/var/run/secrets/vol,options=rbind:{options}",
            host.display()
        )
    };
    let mut member = pod_flags("container", "volsb");
    member.extend(["--mount".to_string(), bind("ro")]);
    run_detached_with(c, &member, "volro", &["sleep", "600"]);
    let script = "cd /var/run/secrets/vol && cat token ..data/sub/deep && readlink token";
    assert_eq!(
        exec_in(c, "volro", "r", &["sh", "-c", script]),
        "secret\ndeep\n..data/token\n"
    );
    let writable = ["--mount".to_string(), bind("rw")];
    let out = run_member(c, "volsb", &writable, "volrw", &["true"]);
    assert!(!out.status.success(), "a writable directory bind ran");
    let err = text(&out.stderr);
    assert!(err.contains("writable host directory"), "{err}");
    let _ = c.ctr(&["container", "rm", "volrw"]);
    assert!(!c.bundle("volrw").exists(), "the bundle was left");
    c.remove("volro");
    c.remove("volsb");
    assert_nothing_left(c, "volsb", vm_pid, &run_dir);
}

fn member_without_its_sandbox_is_refused(c: &Containerd) {
    let out = run_member(c, "nosuchpod", &[], "orphan", &["true"]);
    assert!(!out.status.success(), "a member without a sandbox ran");
    let err = text(&out.stderr);
    assert!(err.contains("pod sandbox nosuchpod not found"), "{err}");
    let _ = c.ctr(&["container", "rm", "orphan"]);
    assert_no_shim("orphan");
    assert!(!c.bundle("orphan").exists(), "the bundle was left");
    assert_eq!(mounts_under(&c.dir.join("state")), Vec::<String>::new());
}

fn skip_reason() -> Option<&'static str> {
    if std::env::var("CC_RUN_VM_TESTS").as_deref() != Ok("1") {
        return Some("VM test: set CC_RUN_VM_TESTS=1 to boot real VMs");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root: containerd mounts snapshots");
    }
    let found = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    if !found("containerd") || !found("ctr") {
        return Some("needs containerd and ctr: run scripts/setup.sh");
    }
    None
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One containerd and one VM at a time: the machine's cores are few.
    args.test_threads = Some(1);
    let skip = skip_reason();
    type Test = fn(&Containerd);
    let tests: &[(&str, Test)] = &[
        ("echo_prints_hi", echo_prints_hi),
        ("exit_code_propagates", exit_code_propagates),
        ("delete_leaves_nothing", delete_leaves_nothing),
        ("killing_the_shim_ends_its_vm", killing_the_shim_ends_its_vm),
        ("stdin_round_trips", stdin_round_trips),
        (
            "terminal_takes_the_clients_size",
            terminal_takes_the_clients_size,
        ),
        (
            "env_and_cwd_from_image_and_flags",
            env_and_cwd_from_image_and_flags,
        ),
        ("exec_ps_and_kill_statuses", exec_ps_and_kill_statuses),
        (
            "kill_without_all_signals_the_process_alone",
            kill_without_all_signals_the_process_alone,
        ),
        ("read_only_bind_mount", read_only_bind_mount),
        ("file_bind_mounts", file_bind_mounts),
        ("metrics_show_memory_in_use", metrics_show_memory_in_use),
        ("events_show_task_exit", events_show_task_exit),
        (
            "events_show_task_oom_before_exit",
            events_show_task_oom_before_exit,
        ),
        (
            "malformed_config_is_refused_and_leaves_nothing",
            malformed_config_is_refused_and_leaves_nothing,
        ),
        ("rlimits_of_the_spec_apply", rlimits_of_the_spec_apply),
        (
            "unsupported_requests_are_refused_and_leave_nothing",
            unsupported_requests_are_refused_and_leave_nothing,
        ),
        (
            "pod_containers_share_one_vm_with_separate_roots",
            pod_containers_share_one_vm_with_separate_roots,
        ),
        ("pod_member_oom_is_its_own", pod_member_oom_is_its_own),
        ("member_directory_binds", member_directory_binds),
        (
            "member_without_its_sandbox_is_refused",
            member_without_its_sandbox_is_refused,
        ),
    ];
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            Trial::test(name, move || {
                with_containerd(test);
                Ok::<(), Failed>(())
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(m) = CONTAINERD.get() {
        if let Some(mut c) = m.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = c.child.kill();
            let _ = c.child.wait();
            let left = mounts_under(&c.dir);
            if left.is_empty() {
                let _ = std::fs::remove_dir_all(&c.dir);
            } else {
                eprintln!("error: mounts left under {}: {left:?}", c.dir.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(reason) = skip {
        eprintln!("ignored: {reason}");
    }
    conclusion.exit_code()
}
