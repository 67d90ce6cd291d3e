//! `crumble run`: one command in a fresh instance, I/O forwarded live.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Args;

use crate::{terminal, CliResult};

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Image to boot (pulled if not stored); or use --rootfs.
    #[arg(required_unless_present = "rootfs", conflicts_with = "rootfs")]
    image: Option<String>,
    /// Root filesystem directory to boot instead of an image (never modified).
    #[arg(long, value_name = "DIR")]
    rootfs: Option<PathBuf>,
    #[command(flatten)]
    pull: crate::images::PullFlags,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MB", default_value_t = 512)]
    memory: u32,
    /// Virtual CPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Size of the writable layer in MiB (the guest gets ENOSPC beyond it).
    #[arg(long, value_name = "MB", default_value_t = cc::DEFAULT_DISK_MB)]
    disk_mb: u32,
    /// Share a host directory: HOST:GUEST (read-only) or HOST:GUEST:rw (repeatable).
    #[arg(long = "mount", short = 'v', value_name = "HOST:GUEST[:rw]", value_parser = parse_mount)]
    mounts: Vec<cc::Mount>,
    /// No network interface (egress is on by default).
    #[arg(long)]
    no_network: bool,
    /// Let the guest reach the host: its loopback (as 10.0.2.2) and its
    /// interface addresses, denied by default.
    #[arg(long)]
    allow_host: bool,
    /// Reach only destinations matching these rules (repeatable):
    /// ADDR[/PREFIX][:PORT[-PORT]], `*` for any address.
    #[arg(long = "net-allow", value_name = "RULE")]
    net_allow: Vec<String>,
    /// Never reach destinations matching this rule (repeatable; wins over
    /// --net-allow and --allow-host).
    #[arg(long = "net-deny", value_name = "RULE")]
    net_deny: Vec<String>,
    /// How QEMU is confined: `default` (everything the host offers, gaps
    /// reported by `crumble doctor`), `strict` (refuse to start with any
    /// gap) or `off` (measurements and debugging only).
    #[arg(long, value_name = "MODE", default_value = "default", value_parser = parse_confinement)]
    confinement: cc::ConfineMode,
    /// Boot cold, not from a warm-start template.
    #[arg(long)]
    cold: bool,
    #[command(flatten)]
    life: LifeArgs,
    #[command(flatten)]
    process: ProcessArgs,
    /// The command and its arguments; without one, an image's entrypoint
    /// runs (Entrypoint + Cmd).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// `crumble restore`: one command in an instance restored from a park.
#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// A park made by `crumble run --park` (or the API's `park`); only
    /// read, so it can be restored any number of times.
    #[arg(value_name = "PARK")]
    from: PathBuf,
    #[command(flatten)]
    life: LifeArgs,
    #[command(flatten)]
    process: ProcessArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// How long the instance lives and how it ends, for `run` and `restore`.
#[derive(Debug, Args)]
pub(crate) struct LifeArgs {
    /// End the instance after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Once the command exits, park the instance in DIR (a new directory)
    /// instead of ending it: `crumble restore DIR -- CMD` goes on from
    /// there, with its background processes and files.
    #[arg(long, value_name = "DIR")]
    park: Option<PathBuf>,
}

/// How the command runs, for `run` and `restore` alike.
#[derive(Debug, Args)]
pub(crate) struct ProcessArgs {
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<OsString>,
    /// User to run as: name, uid, uid:gid or name:group.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Keep stdin open. Accepted as `docker run -i` is: crumble always
    /// forwards its stdin to the command.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Run the command on a terminal: the host terminal is put in raw mode
    /// (keys, Ctrl-C included, go to the command as typed) and its size
    /// follows the host window. Needs stdin to be a terminal.
    #[arg(long, short = 't')]
    tty: bool,
}

pub(crate) fn run(args: RunArgs) -> CliResult<ExitCode> {
    let network_policy = network_policy(&args)?;
    let session = Session::begin(args.process, args.life.park)?;
    let source = match (args.rootfs, &args.image) {
        // A directory has no entrypoint: say so before building anything.
        (Some(_), _) if args.command.is_empty() => {
            return Err("--rootfs needs a command after --".into())
        }
        (Some(dir), _) => cc::Source::Dir(dir),
        (None, Some(reference)) => {
            let client = cc::OciClient::new(None)?;
            cc::Source::from(crate::images::pull_with_progress(
                &client, reference, &args.pull,
            )?)
        }
        (None, None) => return Err("give an IMAGE or --rootfs DIR".into()),
    };
    let options = cc::Options {
        memory_mb: args.memory,
        cpus: args.cpus,
        disk_mb: args.disk_mb,
        timeout: timeout(args.life.timeout)?,
        mounts: args.mounts,
        network: !args.no_network,
        network_policy,
        warm_start: !args.cold,
        confinement: args.confinement,
        ..Default::default()
    };
    let inst = cc::Instance::new(&source, options)?;
    let cmd = match args.command.split_first() {
        Some((program, rest)) => {
            let mut cmd = inst.command(program);
            cmd.args(rest);
            cmd
        }
        None => inst.entrypoint_command::<&str>(&[])?,
    };
    session.run(&inst, cmd)
}

pub(crate) fn restore(args: RestoreArgs) -> CliResult<ExitCode> {
    let session = Session::begin(args.process, args.life.park)?;
    let options = cc::RestoreOptions {
        timeout: timeout(args.life.timeout)?,
        ..Default::default()
    };
    let inst = cc::Instance::restore(&args.from, options)?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or("restore needs a command after --")?;
    let mut cmd = inst.command(program);
    cmd.args(rest);
    session.run(&inst, cmd)
}

fn timeout(seconds: Option<f64>) -> CliResult<Option<std::time::Duration>> {
    match seconds {
        Some(t) if t.is_finite() && t > 0.0 => Ok(Some(std::time::Duration::from_secs_f64(t))),
        Some(t) => Err(format!("--timeout {t}: expected a positive number of seconds").into()),
        None => Ok(None),
    }
}

/// What a run needs before its instance starts: the command's flags
/// checked, signals handled and where to park, if asked.
struct Session {
    env: Vec<(String, String)>,
    process: ProcessArgs,
    window: Option<(u16, u16)>,
    target: Arc<Mutex<Option<cc::Signaller>>>,
    park: Option<PathBuf>,
}

impl Session {
    fn begin(process: ProcessArgs, park: Option<PathBuf>) -> CliResult<Session> {
        let mut env = Vec::new();
        for kv in &process.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
            env.push((k.to_string(), v.to_string()));
        }
        // Checked before anything boots, as `docker run -t` does, and so
        // is the park: the command's work is not to be lost at the end.
        let window = match process.tty {
            true => Some(terminal::window_size(STDIN).ok_or("the input device is not a TTY")?),
            false => None,
        };
        if let Some(dir) = &park {
            if std::fs::symlink_metadata(dir).is_ok() {
                return Err(format!("--park {}: already exists", dir.display()).into());
            }
        }
        // Signals are handled by a thread of ours (forwarded to the guest
        // process), so block them before any thread exists to inherit the
        // mask.
        let signals = block_signals(process.tty);
        // Until the command runs, a signal ends crumble (QEMU dies with
        // it); after, it goes to the command's process group.
        let target: Arc<Mutex<Option<cc::Signaller>>> = Arc::default();
        let forward_to = target.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || forward_signals(signals, &forward_to))?;
        Ok(Session {
            env,
            process,
            window,
            target,
            park,
        })
    }

    /// Runs `cmd` in `inst` with I/O forwarded live, then ends or parks
    /// `inst`; exits with the command's status.
    fn run(self, inst: &cc::Instance, mut cmd: cc::Command) -> CliResult<ExitCode> {
        let Session {
            env,
            process: args,
            window,
            target,
            park,
        } = self;
        cmd.stdin(cc::Stdio::Piped);
        if let Some((rows, cols)) = window {
            cmd.pty(rows, cols);
            // The guest draws for the host's terminal.
            if let Some(term) = std::env::var_os("TERM").filter(|t| !t.is_empty()) {
                cmd.env("TERM", term);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(dir) = args.workdir {
            cmd.current_dir(dir);
        }
        if let Some(user) = args.user {
            cmd.user(user);
        }
        // Like a shell: 127 when the program does not exist, 126 when it
        // cannot be executed.
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e @ (cc::Error::CommandNotFound(_) | cc::Error::PermissionDenied(_))) => {
                eprintln!("crumble: {e}");
                let code = if matches!(e, cc::Error::CommandNotFound(_)) {
                    127
                } else {
                    126
                };
                inst.close()?;
                return Ok(ExitCode::from(code));
            }
            Err(e) => return Err(e.into()),
        };
        *lock(&target) = Some(child.signaller());
        // Restored when `run` returns, by any path (an unwinding panic too).
        let _raw = match args.tty {
            true => Some(terminal::RawMode::enter(STDIN)?),
            false => None,
        };

        let mut stdin = child.stdin.take();
        // Host stdin may never end (a terminal): this thread is not joined.
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut host = std::io::stdin().lock();
                while let (Some(guest), Ok(n)) = (stdin.as_mut(), host.read(&mut buf)) {
                    if n == 0 || guest.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                drop(stdin);
            })?;
        let (done, drained) = std::sync::mpsc::channel();
        let copies: Vec<_> = [
            child
                .stdout
                .take()
                .map(|s| copy_thread(s, std::io::stdout(), done.clone())),
            child
                .stderr
                .take()
                .map(|s| copy_thread(s, std::io::stderr(), done.clone())),
        ]
        .into_iter()
        .flatten()
        .collect();
        // The run ends when the command exits, as with containers: background
        // processes still holding its output get a moment to flush, no more.
        let status = child.wait()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        for _ in 0..copies.len() {
            if drained
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .is_err()
            {
                break;
            }
        }
        match &park {
            Some(dir) => drop(inst.park(dir)?),
            None => inst.close()?,
        }
        for copy in copies {
            let _ = copy.join();
        }
        Ok(match (status.code(), status.signal()) {
            (Some(code), _) => ExitCode::from(code as u8),
            (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
            _ => ExitCode::FAILURE,
        })
    }
}

/// The policy the flags describe; parsed here rather than by clap so a bad
/// rule is a crumble failure (125) naming the flag and the rule.
fn parse_confinement(mode: &str) -> Result<cc::ConfineMode, String> {
    mode.parse()
}

fn network_policy(args: &RunArgs) -> CliResult<cc::NetworkPolicy> {
    let rules = |flag: &str, list: &[String]| {
        list.iter()
            .map(|r| r.parse::<cc::Rule>().map_err(|e| format!("{flag}: {e}")))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(cc::NetworkPolicy {
        allow_host: args.allow_host,
        allow: rules("--net-allow", &args.net_allow)?,
        deny: rules("--net-deny", &args.net_deny)?,
    })
}

fn parse_mount(spec: &str) -> Result<cc::Mount, String> {
    let (host, rest) = spec.split_once(':').ok_or("expected HOST:GUEST[:rw]")?;
    let (guest, writable) = match rest.rsplit_once(':') {
        Some((guest, "rw")) => (guest, true),
        Some((guest, "ro")) => (guest, false),
        _ => (rest, false),
    };
    if host.is_empty() || guest.is_empty() {
        return Err("expected HOST:GUEST[:rw]".into());
    }
    let host = std::fs::canonicalize(host).map_err(|e| format!("{host}: {e}"))?;
    Ok(cc::Mount {
        host_path: host,
        guest_path: guest.to_string(),
        writable,
    })
}

fn copy_thread(
    mut from: cc::ChildOutput,
    mut to: impl Write + Send + 'static,
    done: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).and_then(|_| to.flush()).is_err() {
                break;
            }
        }
        let _ = done.send(());
    })
}

/// The descriptor `-t` needs to be a terminal.
const STDIN: i32 = 0;

/// The signals `run` handles; with a terminal also `SIGWINCH`.
fn block_signals(tty: bool) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it
    // and pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, sig);
        }
        if tty {
            libc::sigaddset(&mut set, libc::SIGWINCH);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Delivers terminal and termination signals to the guest process group,
/// which then ends and lets `run` close the instance normally. Before there
/// is a process (pulling, booting) a signal ends crumble itself. With `-t`
/// the host terminal is raw, so Ctrl-C is a byte typed rather than a
/// signal; a change of the window (`SIGWINCH`) resizes the guest's.
fn forward_signals(set: libc::sigset_t, to: &Mutex<Option<cc::Signaller>>) {
    loop {
        let mut sig = 0;
        // SAFETY: set was initialised by block_signals; sig is a live local.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        let signaller = lock(to).clone();
        match signaller {
            Some(s) if sig == libc::SIGWINCH => {
                if let Some((rows, cols)) = terminal::window_size(STDIN) {
                    let _ = s.resize(rows, cols);
                }
            }
            // Before the command runs the window size is read at its start.
            None if sig == libc::SIGWINCH => {}
            Some(s) => {
                if s.signal(sig).is_err() {
                    return;
                }
            }
            None => {
                eprintln!("crumble: interrupted");
                // The CLI is the one crate that may end the process; QEMU
                // goes with it (PR_SET_PDEATHSIG) and the next run sweeps
                // its run directory.
                #[allow(clippy::exit)]
                std::process::exit(128 + sig);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
