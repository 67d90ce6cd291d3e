//! The core against the real agent with no hypervisor: unit tests of the
//! core's logic (commands, pipes, signals, timeouts, files and handles,
//! warm-resume handshakes, the guest's death, closing, pause) through an
//! [`Engine`] test double that serves `cc_agent` in host mode in a thread
//! of this process. Commands run on the host as the test's own user, and
//! paths are host paths (each test works in its own scratch directory).
//! What only a VM shows (mounts, network, confinement, templates under
//! QEMU) stays in the VM tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cc::engine::{
    AgentLink, DeathHandler, Engine, Error as EngineError, GuestLayout, GuestNetwork, GuestSpec,
    Hooks, Machine, Started,
};
use cc::{ErrorCode, Instance, Options, Source, StartKind, Stdio};

/// What a [`Double`] guest is, shared by its machine and the test.
#[derive(Default)]
struct GuestState {
    exit: Mutex<Option<ExitStatus>>,
    ended: Condvar,
    death: Mutex<Option<DeathHandler>>,
    /// The agent's end of the channel it serves now, to hang up on it.
    port: Mutex<Option<UnixStream>>,
    /// While paused, nothing crosses the channel either way: what a
    /// stopped guest would do.
    paused: Mutex<bool>,
    resumed: Condvar,
}

impl std::fmt::Debug for GuestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestState")
            .field("exit", &self.exit)
            .finish_non_exhaustive()
    }
}

impl GuestState {
    fn hang_up(&self) {
        if let Some(port) = self.port.lock().unwrap().as_ref() {
            let _ = port.shutdown(std::net::Shutdown::Both);
        }
    }

    fn wait(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut exit = self.exit.lock().unwrap();
        while exit.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            exit = self.ended.wait_timeout(exit, left).unwrap().0;
        }
        *exit
    }

    /// Waits while paused.
    fn gate(&self) {
        let mut paused = self.paused.lock().unwrap();
        while *paused {
            paused = self.resumed.wait(paused).unwrap();
        }
    }

    fn set_paused(&self, paused: bool) {
        *self.paused.lock().unwrap() = paused;
        self.resumed.notify_all();
    }

    /// Copies `from` to `to` as the pause gate lets it, then ends `to`.
    fn relay(self: &Arc<Self>, mut from: UnixStream, mut to: UnixStream) {
        let state = self.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                state.gate();
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
            let _ = from.shutdown(std::net::Shutdown::Read);
        });
    }

    /// The guest dies on its own: the engine reports it, then the channel
    /// goes.
    fn crash(&self, why: &str) {
        if let Some(handler) = self.death.lock().unwrap().clone() {
            handler(why.to_string());
        }
        self.hang_up();
    }
}

/// An engine whose guests are `cc_agent`s in host mode, one thread each.
/// With `warm_start`, a start goes through the same hooks as a template
/// build: the agent is prepared on one connection, which is then dropped,
/// and the conversation resumed on a second.
#[derive(Debug, Default)]
struct Double {
    guests: Mutex<Vec<Arc<GuestState>>>,
}

impl Double {
    fn last(&self) -> Arc<GuestState> {
        self.guests.lock().unwrap().last().unwrap().clone()
    }
}

impl Engine for Double {
    fn layout(&self, spec: &GuestSpec) -> GuestLayout {
        GuestLayout {
            lower_serials: (0..spec.lowers.len()).map(|i| format!("l{i}")).collect(),
            upper_serial: "u".into(),
            share_tags: (0..spec.shares.len()).map(|i| format!("s{i}")).collect(),
            network: GuestNetwork {
                address: [10, 9, 0, 2].into(),
                prefix_len: 24,
                gateway: [10, 9, 0, 1].into(),
                dns: [10, 9, 0, 1].into(),
                mtu: 1500,
            },
        }
    }

    fn start(&self, spec: &GuestSpec, hooks: Hooks<'_>) -> Result<Started, EngineError> {
        let io = |e| EngineError::Io {
            op: "start the agent double",
            path: PathBuf::from(&spec.id),
            source: e,
        };
        let agent = cc_agent::Agent::new(cc_agent::Mode::Host).map_err(io)?;
        let state = Arc::new(GuestState::default());
        let (ports, next_port) = mpsc::channel::<UnixStream>();
        let server = {
            let state = state.clone();
            std::thread::spawn(move || {
                for port in next_port {
                    *state.port.lock().unwrap() = port.try_clone().ok();
                    if let cc_agent::Ended::PoweredOff(_) = agent.serve(port) {
                        break;
                    }
                }
                *state.exit.lock().unwrap() = Some(ExitStatus::from_raw(0));
                state.ended.notify_all();
            })
        };
        let connect = || -> Result<UnixStream, EngineError> {
            let (host, host_relay) = UnixStream::pair().map_err(io)?;
            let (guest_relay, guest) = UnixStream::pair().map_err(io)?;
            let clone = |s: &UnixStream| s.try_clone().map_err(io);
            state.relay(clone(&host_relay)?, clone(&guest_relay)?);
            state.relay(guest_relay, host_relay);
            ports
                .send(guest)
                .map_err(|_| EngineError::Template("the agent double ended".into()))?;
            Ok(host)
        };
        let (agent_link, kind) = if spec.warm_start {
            let quiet = (hooks.prepare)(connect()?).map_err(EngineError::Template)?;
            drop(quiet);
            (hooks.resume)(connect()?).map_err(EngineError::Template)?;
            (AgentLink::Resumed, StartKind::Built)
        } else {
            (AgentLink::Greeting(connect()?), StartKind::Cold)
        };
        self.guests.lock().unwrap().push(state.clone());
        Ok(Started {
            machine: Box::new(DoubleMachine {
                state,
                ports: Mutex::new(Some(ports)),
                server: Mutex::new(Some(server)),
            }),
            agent: agent_link,
            kind,
        })
    }
}

#[derive(Debug)]
struct DoubleMachine {
    state: Arc<GuestState>,
    /// Dropped to let the server thread end after its connection.
    ports: Mutex<Option<mpsc::Sender<UnixStream>>>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Machine for DoubleMachine {
    fn exit_status(&self) -> Option<ExitStatus> {
        *self.state.exit.lock().unwrap()
    }

    fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        self.state.wait(timeout)
    }

    fn kill(&self) {
        self.ports.lock().unwrap().take();
        self.state.set_paused(false);
        self.state.hang_up();
    }

    fn terminate(&self, _grace: Duration) -> ExitStatus {
        self.kill();
        loop {
            if let Some(status) = self.state.wait(Duration::from_secs(1)) {
                return status;
            }
        }
    }

    fn set_network_enabled(&self, _enabled: bool) -> Result<(), EngineError> {
        Ok(())
    }

    fn on_death(&self, handler: DeathHandler) {
        *self.state.death.lock().unwrap() = Some(handler);
    }

    fn confinement(&self) -> cc::Confinement {
        cc::host_confinement()
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    fn run_dir(&self) -> Option<&Path> {
        None
    }

    fn diagnostics(&self) -> String {
        "(agent double)".into()
    }

    fn pause(&self) -> Result<(), EngineError> {
        self.state.set_paused(true);
        Ok(())
    }

    fn resume(&self) -> Result<(), EngineError> {
        self.state.set_paused(false);
        Ok(())
    }
}

impl Drop for DoubleMachine {
    fn drop(&mut self) {
        self.kill();
        if let Some(server) = self.server.lock().unwrap().take() {
            let _ = server.join();
        }
    }
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "cc-double-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, rel: &str) -> String {
        self.0.join(rel).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Points the core's cache at a directory of these tests' own, once,
/// before any test's threads read the environment.
fn private_cache() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var("CC_CACHE_DIR", std::env::temp_dir().join("cc-double-cache"));
    });
}

/// An instance on the double, its root a tiny directory (the core still
/// builds its root image, in a private cache).
fn boot_with(engine: &Arc<Double>, scratch: &Scratch, options: Options) -> Instance {
    private_cache();
    let root = scratch.0.join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let options = Options {
        network: false,
        warm_start: false,
        engine: engine.clone(),
        ..options
    };
    Instance::new(&Source::Dir(root), options).unwrap()
}

/// An instance that ends `limit` after it was created.
fn boot_with_timeout(scratch: &Scratch, limit: Duration) -> Instance {
    let options = Options {
        timeout: Some(limit),
        ..Options::default()
    };
    boot_with(&Arc::new(Double::default()), scratch, options)
}

fn boot(scratch: &Scratch) -> (Arc<Double>, Instance) {
    let engine = Arc::new(Double::default());
    let inst = boot_with(&engine, scratch, Options::default());
    (engine, inst)
}

#[test]
fn a_command_runs_with_its_arguments_environment_and_directory() {
    let s = Scratch::new("cmd");
    let (_, inst) = boot(&s);
    assert_eq!(inst.start_kind(), StartKind::Cold);
    let out = inst
        .command("sh")
        .args([
            "-c",
            "echo \"$1 $GREETING\"; pwd; echo oops >&2; exit 3",
            "sh",
            "hi",
        ])
        .env("GREETING", "there")
        .current_dir(&s.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("hi there\n{}\n", s.0.display())
    );
    assert_eq!(out.stderr, b"oops\n");
    inst.close().unwrap();
}

#[test]
fn a_missing_program_is_command_not_found() {
    let s = Scratch::new("missing");
    let (_, inst) = boot(&s);
    let err = inst.command("/no/such/program").status().unwrap_err();
    assert!(matches!(err, cc::Error::CommandNotFound(_)), "{err}");
    let err = inst.command("ok").arg("nul\0byte").status().unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
}

#[test]
fn stdin_streams_through_to_stdout_with_back_pressure() {
    let s = Scratch::new("pipes");
    let (_, inst) = boot(&s);
    let mut child = inst
        .command("cat")
        .stdin(Stdio::Piped)
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            stdin.write_all(&data).unwrap();
        })
    };
    let mut got = Vec::new();
    stdout.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the bytes arrive in order, unchanged");
    assert!(child.wait().unwrap().success());
}

#[test]
fn kill_and_signals_end_a_running_command() {
    let s = Scratch::new("kill");
    let (_, inst) = boot(&s);
    let mut child = inst.command("sleep").arg("100").spawn().unwrap();
    assert_eq!(child.try_wait().unwrap(), None);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let mut child = inst.command("sleep").arg("100").spawn().unwrap();
    child.signal(libc::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGTERM));
}

#[test]
fn a_command_timeout_kills_it_on_time() {
    let s = Scratch::new("timeout");
    let (_, inst) = boot(&s);
    let t = Instant::now();
    let err = inst
        .command("sleep")
        .arg("100")
        .timeout(Duration::from_millis(300))
        .status()
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::Timeout, "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(inst.is_running(), "only the command ends");
}

#[test]
fn files_round_trip_and_errors_name_the_path() {
    let s = Scratch::new("files");
    let (_, inst) = boot(&s);
    let path = s.path("a.txt");
    inst.write_file(&path, b"hello", 0o640).unwrap();
    assert_eq!(inst.read_file(&path).unwrap(), b"hello");
    assert_eq!(inst.stat(&path).unwrap().permissions(), 0o640);
    inst.mkdir_all(&s.path("d/e"), 0o755).unwrap();
    inst.rename(&path, &s.path("d/e/b.txt")).unwrap();
    let names: Vec<String> = inst
        .read_dir(&s.path("d/e"))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["b.txt"]);
    let missing = s.path("nope");
    let err = inst.read_file(&missing).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Io, "{err}");
    assert_eq!(err.path(), Some(missing.as_str()), "{err}");
}

#[test]
fn file_handles_read_write_seek_and_close() {
    let s = Scratch::new("handles");
    let (_, inst) = boot(&s);
    let path = s.path("h.bin");
    let f = inst.create(&path).unwrap();
    f.write_all_bytes(b"0123456789").unwrap();
    assert_eq!(f.seek_to(std::io::SeekFrom::Start(4)).unwrap(), 4);
    let mut buf = [0u8; 3];
    assert_eq!(f.read_some(&mut buf).unwrap(), 3);
    assert_eq!(&buf, b"456");
    f.truncate(5).unwrap();
    assert_eq!(f.stat().unwrap().size, 5);
    f.close().unwrap();
    let err = f.read_some(&mut buf).unwrap_err();
    assert_eq!(err.code(), ErrorCode::AlreadyClosed, "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"01234");
}

#[test]
fn the_cmd_object_refuses_misuse() {
    let s = Scratch::new("cmdobj");
    let (_, inst) = boot(&s);
    let cmd = inst.cmd("sh", &["-c", "cat; exit 4"]);
    let err = cmd.wait().unwrap_err();
    assert_eq!(
        err.code(),
        ErrorCode::InvalidArgument,
        "waiting before start: {err}"
    );
    let stdin = cmd.stdin_pipe().unwrap();
    cmd.start().unwrap();
    assert_eq!(cmd.start().unwrap_err().code(), ErrorCode::InvalidArgument);
    assert_eq!(
        cmd.stdout_pipe().unwrap_err().code(),
        ErrorCode::InvalidArgument
    );
    stdin.write(b"x").unwrap();
    stdin.close_write();
    assert_eq!(cmd.wait().unwrap(), 4);
}

#[test]
fn a_small_read_holds_only_what_came() {
    let s = Scratch::new("smallread");
    let (_, inst) = boot(&s);
    let cmd = inst.cmd("sh", &["-c", "echo hi; sleep 0.1; echo there"]);
    let out = cmd.stdout_pipe().unwrap();
    cmd.start().unwrap();
    let mut got = Vec::new();
    loop {
        let piece = out.read(1 << 20).unwrap();
        // A read used to hand back the whole 1 MiB it asked for, truncated:
        // every few-byte read kept a megabyte allocated.
        assert!(
            piece.capacity() < 64 << 10,
            "{} bytes held for {}",
            piece.capacity(),
            piece.len()
        );
        if piece.is_empty() {
            break;
        }
        got.extend_from_slice(&piece);
    }
    assert_eq!(got, b"hi\nthere\n");
    assert_eq!(cmd.wait().unwrap(), 0);
}

#[test]
fn a_warm_start_resumes_the_conversation_on_a_new_channel() {
    let s = Scratch::new("warm");
    let engine = Arc::new(Double::default());
    let root = s.0.join("root");
    std::fs::create_dir_all(&root).unwrap();
    private_cache();
    let options = Options {
        network: false,
        warm_start: true,
        engine: engine.clone(),
        ..Options::default()
    };
    let inst = Instance::new(&Source::Dir(root), options).unwrap();
    assert_eq!(inst.start_kind(), StartKind::Built);
    let out = inst.command("echo").arg("resumed").output().unwrap();
    assert_eq!(out.stdout, b"resumed\n");
    inst.ping().unwrap();
}

#[test]
fn a_guest_that_dies_is_not_running_within_two_seconds() {
    let s = Scratch::new("death");
    let (engine, inst) = boot(&s);
    let mut child = inst.command("sleep").arg("100").spawn().unwrap();
    let t = Instant::now();
    engine.last().crash("the guest kernel panicked");
    let err = child.wait().unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotRunning, "{err}");
    assert!(err.to_string().contains("panicked"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(!inst.is_running());
    let err = inst.command("true").status().unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotRunning, "{err}");
    // A dead guest cannot be copied or saved either (issue 18).
    assert_eq!(inst.branch(1).unwrap_err().code(), ErrorCode::NotRunning);
    let park = s.0.join("park");
    assert_eq!(inst.park(&park).unwrap_err().code(), ErrorCode::NotRunning);
    assert!(!park.exists(), "a failed park left {park:?}");
    inst.wait(None).unwrap();
    inst.close().unwrap();
}

#[test]
fn a_channel_that_breaks_is_noticed_without_the_engine() {
    let s = Scratch::new("hangup");
    let (engine, inst) = boot(&s);
    engine.last().hang_up();
    let deadline = Instant::now() + Duration::from_secs(2);
    while inst.is_running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!inst.is_running(), "a lost channel is a dead instance");
    let err = inst.ping().unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotRunning, "{err}");
}

#[test]
fn an_instance_timeout_ends_it() {
    let s = Scratch::new("deadline");
    let inst = boot_with_timeout(&s, Duration::from_millis(500));
    let err = inst.command("sleep").arg("100").status().unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotRunning, "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[test]
fn close_ends_the_guest_and_later_calls_are_already_closed() {
    let s = Scratch::new("close");
    let (engine, inst) = boot(&s);
    let child = inst.command("sleep").arg("100").spawn().unwrap();
    let guest = engine.last();
    inst.close().unwrap();
    assert!(
        guest.wait(Duration::from_secs(5)).is_some(),
        "the agent ended"
    );
    let err = inst.command("true").status().unwrap_err();
    assert_eq!(err.code(), ErrorCode::AlreadyClosed, "{err}");
    assert_eq!(
        child.signaller().signal(libc::SIGTERM).unwrap_err().code(),
        ErrorCode::AlreadyClosed
    );
    inst.close().unwrap();
}

#[test]
fn the_guest_is_told_the_engines_layout() {
    let s = Scratch::new("layout");
    let (_, inst) = boot(&s);
    // The double's agent runs on the host, where the hostname is the
    // host's; what the core sent shows in the kernel release it got back.
    assert!(!inst.kernel_release().is_empty());
    assert!(inst.vm_pid().is_none() && inst.run_dir().is_none());
    assert!(
        inst.set_network_enabled(true).is_err(),
        "created without a network"
    );
}

/// Pauses `inst`, checking it says so.
fn pause(inst: &Instance) {
    inst.pause().unwrap();
    assert!(inst.is_paused() && inst.is_running());
}

#[test]
fn a_paused_instance_refuses_new_requests_at_once_until_resumed() {
    let s = Scratch::new("paused");
    let (_, inst) = boot(&s);
    let path = s.path("f");
    inst.write_file(&path, b"x", 0o644).unwrap();
    pause(&inst);
    inst.pause().unwrap();
    assert!(inst.is_paused(), "pausing again changes nothing");
    let t = Instant::now();
    for err in [
        inst.command("true").status().unwrap_err(),
        inst.read_file(&path).unwrap_err(),
        inst.write_file(&path, b"y", 0o644).unwrap_err(),
        inst.ping().unwrap_err(),
    ] {
        assert_eq!(err.code(), ErrorCode::Paused, "{err}");
        assert!(matches!(err, cc::Error::Paused), "{err}");
        assert!(err.to_string().contains("paused"), "{err}");
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    inst.resume().unwrap();
    inst.resume().unwrap();
    assert!(!inst.is_paused());
    assert_eq!(inst.read_file(&path).unwrap(), b"x");
    assert!(inst.command("true").status().unwrap().success());
}

#[test]
fn waits_keep_waiting_while_paused() {
    let s = Scratch::new("pausewait");
    let (_, inst) = boot(&s);
    let mut child = inst
        .command("sh")
        .args(["-c", "sleep 0.3; echo done"])
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    pause(&inst);
    // The command ends meanwhile, but a paused guest tells nothing.
    assert_eq!(child.wait_timeout(Duration::from_secs(1)).unwrap(), None);
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        out
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!reader.is_finished(), "a read waits for the resume");
    inst.resume().unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(reader.join().unwrap(), "done\n");
}

#[test]
fn paused_time_counts_towards_no_command_timeout() {
    let s = Scratch::new("pausecmd");
    let (_, inst) = boot(&s);
    let t = Instant::now();
    let mut child = inst
        .command("sleep")
        .arg("100")
        .timeout(Duration::from_millis(600))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    pause(&inst);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(child.try_wait().unwrap(), None, "not over while paused");
    inst.resume().unwrap();
    assert_eq!(child.try_wait().unwrap(), None, "time left after resume");
    let err = child.wait().unwrap_err();
    assert_eq!(err.code(), ErrorCode::Timeout, "{err}");
    assert!(
        t.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );
    assert!(inst.is_running(), "only the command ends");
}

#[test]
fn paused_time_counts_towards_no_instance_timeout_and_is_not_silence() {
    let s = Scratch::new("pauselimit");
    let inst = boot_with_timeout(&s, Duration::from_millis(1500));
    let t = Instant::now();
    pause(&inst);
    // Longer than the instance's timeout and than a liveness check waits
    // for an answer.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(inst.is_running(), "paused, it neither timed out nor died");
    inst.resume().unwrap();
    assert!(inst.command("true").status().unwrap().success());
    inst.wait(None).unwrap();
    assert!(!inst.is_running());
    assert!(
        t.elapsed() >= Duration::from_millis(3500),
        "{:?}",
        t.elapsed()
    );
    let err = inst.command("true").status().unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[test]
fn closing_a_paused_instance_is_prompt_and_ends_its_guest() {
    let s = Scratch::new("pauseclose");
    let (engine, inst) = boot(&s);
    let mut child = inst.command("sleep").arg("100").spawn().unwrap();
    pause(&inst);
    let t = Instant::now();
    inst.close().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(engine.last().wait(Duration::from_secs(5)).is_some());
    assert!(!inst.is_paused());
    assert_eq!(child.wait().unwrap_err().code(), ErrorCode::AlreadyClosed);
    assert_eq!(inst.pause().unwrap_err().code(), ErrorCode::AlreadyClosed);
    assert_eq!(inst.resume().unwrap_err().code(), ErrorCode::AlreadyClosed);
}

#[test]
fn a_guest_that_dies_while_paused_is_seen_dead() {
    let s = Scratch::new("pausedeath");
    let (engine, inst) = boot(&s);
    let mut child = inst.command("sleep").arg("100").spawn().unwrap();
    pause(&inst);
    engine.last().crash("the guest kernel panicked");
    let err = child.wait().unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotRunning, "{err}");
    assert!(!inst.is_running());
    assert_eq!(inst.resume().unwrap_err().code(), ErrorCode::NotRunning);
    assert_eq!(inst.pause().unwrap_err().code(), ErrorCode::NotRunning);
    inst.close().unwrap();
}
