//! `crumble bench`: medians of our phases against a baseline measured in the
//! same invocation.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cc_engine::initramfs::{write_newc, Entry};
use clap::Subcommand;

use crate::CliResult;

#[derive(Debug, Subcommand)]
pub(crate) enum What {
    /// Cold start, phase by phase, against a bare QEMU boot of the same
    /// kernel into an initramfs that only echoes and powers off; warm start
    /// (from a template) against the cold start; idle memory of each.
    Boot {
        /// Root filesystem directory to boot.
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        /// Boots of each kind (at least 5).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Guest memory in MiB, for both kinds.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Static busybox for the bare initramfs.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
    },
    /// Round trip of `true` in a running instance, against a shell loop on
    /// the serial console of a bare guest running `/bin/sh -c true`.
    Exec {
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        /// Commands of each kind.
        #[arg(long, default_value_t = 200)]
        runs: usize,
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
    },
    /// write_file and read_file of 64 MiB, in MiB/s.
    Files {
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        /// Transfers of each kind.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// 256 MiB through `listen` (guest → host) and `dial` (host → guest),
    /// against the same bytes through a command's pipes; and guest → host
    /// egress through the user-mode network. In MB/s.
    Net {
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        /// Transfers of each kind.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

pub(crate) fn bench(what: What) -> CliResult<ExitCode> {
    match what {
        What::Boot {
            rootfs,
            runs,
            memory,
            busybox,
        } => boot(&rootfs, runs.max(5), memory, &busybox),
        What::Exec {
            rootfs,
            runs,
            busybox,
        } => exec(&rootfs, runs.max(10), &busybox),
        What::Files { rootfs, runs } => files(&rootfs, runs.max(3)),
        What::Net { rootfs, runs } => net(&rootfs, runs.max(3)),
    }
}

#[derive(Debug, Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn median(&self) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }
}

fn boot(rootfs: &Path, runs: usize, memory: u32, busybox: &Path) -> CliResult<ExitCode> {
    let cache = cc_engine::paths::cache_dir();
    let bare_initrd = bare_initramfs(busybox, &cache)?;
    let accel = cc_engine::detect_accel()?;
    println!(
        "accelerator: {} ({}); {runs} boots of each kind, {memory} MiB, 1 vCPU",
        accel.accel, accel.reason
    );
    let bare_spec = cc_engine::VmSpec {
        kernel: cc_engine::paths::kernel()?,
        initrd: bare_initrd,
        memory_mb: memory,
        cpus: 1,
        accel: accel.accel,
        disks: Vec::new(),
        shares: Vec::new(),
        network: None,
        kernel_params: Vec::new(),
        memory_file: None,
        incoming: false,
        // The bare guest runs no agent; the port is never opened.
        agent_port: "cc.agent".into(),
        // The baseline is QEMU as anyone would start it by hand.
        confine: cc_engine::ConfineMode::Off,
        console_log_max: cc_engine::CONSOLE_LOG_MAX,
    };
    let source = cc::Source::Dir(rootfs.to_path_buf());
    let cold = cc::Options {
        memory_mb: memory,
        warm_start: false,
        ..Default::default()
    };
    let warm = cc::Options {
        warm_start: true,
        ..cold.clone()
    };
    // The same starts with QEMU unconfined: what confinement costs.
    let unconfined = |o: &cc::Options| cc::Options {
        confinement: cc::ConfineMode::Off,
        ..o.clone()
    };
    let (cold_off, warm_off) = (unconfined(&cold), unconfined(&warm));
    // Unmeasured: builds the cached root image and the templates, and
    // warms the host's caches.
    for options in [&cold, &warm, &cold_off, &warm_off] {
        cc::Instance::new(&source, options.clone())?.close()?;
    }

    let names = [
        "prepare",
        "qemu spawn",
        "kernel → agent",
        "root setup",
        "exec → first output",
        "cold start",
        "close",
        "warm: restore",
        "warm: root setup",
        "warm: exec → first output",
        "warm start",
        "unconfined: cold start",
        "unconfined: warm start",
    ];
    let mut ours: Vec<Samples> = names.iter().map(|_| Samples::default()).collect();
    let (mut bare_spawn, mut bare_total) = (Samples::default(), Samples::default());
    for _ in 0..runs {
        let (spawn, total) = bare_boot(&bare_spec, &cache)?;
        bare_spawn.0.push(spawn);
        bare_total.0.push(total);

        let (inst, started, first_output) = start_and_echo(&source, &cold)?;
        let t = inst.boot_timings();
        let t2 = Instant::now();
        inst.close()?;
        let closed = t2.elapsed();

        let (w, warm_started, warm_output) = start_and_echo(&source, &warm)?;
        if w.start_kind() != cc::StartKind::Warm {
            return Err(format!("a warm start was {:?}", w.start_kind()).into());
        }
        let wt = w.boot_timings();
        w.close()?;
        let (off, cold_unconfined, _) = start_and_echo(&source, &cold_off)?;
        off.close()?;
        let (off, warm_unconfined, _) = start_and_echo(&source, &warm_off)?;
        off.close()?;
        for (s, d) in ours.iter_mut().zip([
            t.prepare,
            t.spawn,
            t.kernel,
            t.setup,
            first_output,
            started,
            closed,
            wt.spawn + wt.kernel,
            wt.setup,
            warm_output,
            warm_started,
            cold_unconfined,
            warm_unconfined,
        ]) {
            s.0.push(d);
        }
    }
    println!("\n{:<26} {:>10}", "phase (median)", "ms");
    for (name, s) in names.iter().zip(&ours) {
        println!("{name:<26} {:>10.1}", ms(s.median()));
    }
    println!(
        "{:<26} {:>10.1}",
        "bare: qemu spawn",
        ms(bare_spawn.median())
    );
    println!(
        "{:<26} {:>10.1}",
        "bare: spawn → exit",
        ms(bare_total.median())
    );
    println!("\nidle PSS per instance, MiB: alone, and median of {PSS_INSTANCES} side by side");
    for (name, options) in [("cold", &cold), ("warm", &warm)] {
        println!(
            "{name:<26} {:>10.1} {:>10.1}",
            idle_pss(&source, options, 1)?,
            idle_pss(&source, options, PSS_INSTANCES)?
        );
    }
    println!("(target for warm ≤ 45 MiB)");
    let ratio = |a: &Samples, b: &Samples| a.median().as_secs_f64() / b.median().as_secs_f64();
    println!(
        "\ncold start / bare boot = {:.2}x (target ≤ 1.2x)",
        ratio(&ours[5], &bare_total)
    );
    println!(
        "warm start / cold start = {:.2}x (target ≤ 0.15x)",
        ratio(&ours[10], &ours[5])
    );
    println!(
        "confined / unconfined: cold {:.2}x, warm {:.2}x (target ≤ 1.05x)",
        ratio(&ours[5], &ours[11]),
        ratio(&ours[10], &ours[12])
    );
    Ok(ExitCode::SUCCESS)
}

/// Starts an instance and runs `echo` in it; returns it with the time from
/// the start to the first byte of output, and from exec to that byte.
fn start_and_echo(
    source: &cc::Source,
    options: &cc::Options,
) -> CliResult<(cc::Instance, Duration, Duration)> {
    let t0 = Instant::now();
    let inst = cc::Instance::new(source, options.clone())?;
    let t1 = Instant::now();
    let mut child = inst.command("echo").arg("ready").spawn()?;
    let mut first = [0u8; 1];
    child
        .stdout
        .as_mut()
        .ok_or("no stdout")?
        .read_exact(&mut first)?;
    let (started, output) = (t0.elapsed(), t1.elapsed());
    child.wait()?;
    Ok((inst, started, output))
}

/// Instances measured at once for idle memory.
const PSS_INSTANCES: usize = 4;

/// Median proportional set size of QEMU, in MiB, over `count` instances
/// idling side by side (pages they share are split between them).
fn idle_pss(source: &cc::Source, options: &cc::Options, count: usize) -> CliResult<f64> {
    let all = (0..count)
        .map(|_| start_and_echo(source, options).map(|(inst, ..)| inst))
        .collect::<CliResult<Vec<_>>>()?;
    std::thread::sleep(Duration::from_secs(3));
    let mut pss = Vec::new();
    for inst in &all {
        let pid = inst.vm_pid().ok_or("instance not running")?;
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        let kib: f64 = rollup
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or("no Pss in smaps_rollup")?;
        pss.push(kib / 1024.0);
    }
    for inst in all {
        inst.close()?;
    }
    pss.sort_by(f64::total_cmp);
    Ok(pss[pss.len() / 2])
}

/// Boots the bare initramfs; returns (spawn time, spawn → QEMU exit).
fn bare_boot(spec: &cc_engine::VmSpec, cache: &Path) -> CliResult<(Duration, Duration)> {
    let dir = cc_engine::RunDir::create(cache, "bench-bare")?;
    let t0 = Instant::now();
    let (vm, _agent) = cc_engine::Vm::start(spec, &dir)?;
    let spawn = t0.elapsed();
    let status = vm.wait_timeout(Duration::from_secs(60));
    let total = t0.elapsed();
    if status.is_none() {
        return Err(format!("bare boot did not power off in 60 s\n{}", vm.diagnostics()).into());
    }
    if !std::fs::read_to_string(dir.path().join("console.log"))
        .unwrap_or_default()
        .contains("cc-bare-ready")
    {
        return Err(format!("bare boot printed no marker\n{}", vm.diagnostics()).into());
    }
    Ok((spawn, total))
}

/// An initramfs of static busybox (also as `/bin/sh`) whose `/init` is
/// `init`, cached as `<cache>/bench/<name>.cpio`.
fn busybox_initramfs(busybox: &Path, cache: &Path, name: &str, init: &[u8]) -> CliResult<PathBuf> {
    let bin = std::fs::read(busybox).map_err(|e| {
        format!(
            "{}: {e} (apt-get install busybox-static)",
            busybox.display()
        )
    })?;
    let mut archive = Vec::new();
    write_newc(
        &mut archive,
        &[
            Entry::dir("dev"),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::dir("bin"),
            Entry::file("bin/busybox", 0o755, &bin),
            Entry::file("bin/sh", 0o755, &bin),
            Entry::file("init", 0o755, init),
        ],
    )?;
    let path = cache.join("bench").join(format!("{name}.cpio"));
    std::fs::create_dir_all(path.parent().unwrap_or(cache))?;
    std::fs::write(&path, archive)?;
    Ok(path)
}

/// An initramfs whose `/init` echoes a marker and powers off at once.
fn bare_initramfs(busybox: &Path, cache: &Path) -> CliResult<PathBuf> {
    let init = b"#!/bin/busybox sh\n/bin/busybox echo cc-bare-ready\n/bin/busybox reboot -f\n";
    busybox_initramfs(busybox, cache, "bare", init)
}

fn exec(rootfs: &Path, runs: usize, busybox: &Path) -> CliResult<ExitCode> {
    let cache = cc_engine::paths::cache_dir();
    let accel = cc_engine::detect_accel()?;
    println!(
        "accelerator: {} ({}); {runs} commands of each kind",
        accel.accel, accel.reason
    );
    let serial = serial_shell_loop(busybox, &cache, runs)?;

    let inst = cc::Instance::new(
        &cc::Source::Dir(rootfs.to_path_buf()),
        cc::Options::default(),
    )?;
    let cmd = inst.command("true");
    for _ in 0..5 {
        cmd.status()?; // warm the page cache and the agent's paths
    }
    let mut ours = Samples::default();
    for _ in 0..runs {
        let t = Instant::now();
        let status = cmd.status()?;
        ours.0.push(t.elapsed());
        if !status.success() {
            return Err(format!("`true` exited with {status}").into());
        }
    }
    let mut ping = Samples::default();
    for _ in 0..runs {
        ping.0.push(inst.ping()?);
    }
    inst.close()?;
    println!("\n{:<44} {:>9}", "median", "ms");
    println!(
        "{:<44} {:>9.3}",
        "exec `true` through the agent",
        ms(ours.median())
    );
    println!(
        "{:<44} {:>9.3}",
        "agent ping (channel round trip)",
        ms(ping.median())
    );
    println!(
        "{:<44} {:>9.3}",
        "serial console: /bin/sh -c true (baseline)",
        ms(serial.median())
    );
    let ratio = ours.median().as_secs_f64() / serial.median().as_secs_f64();
    println!("\nexec / serial shell loop = {ratio:.2}x (target ≤ 0.85x)");
    Ok(ExitCode::SUCCESS)
}

/// Per-command time of a shell loop on the serial console of a bare guest:
/// the host sends a line, the guest runs `/bin/sh -c true` and answers.
fn serial_shell_loop(busybox: &Path, cache: &Path, runs: usize) -> CliResult<Samples> {
    use std::io::Write;
    let init = b"#!/bin/busybox sh\n/bin/busybox stty -echo\necho cc-shell-ready\nwhile read line; do /bin/sh -c true; echo M; done\n";
    let initrd = busybox_initramfs(busybox, cache, "serial-shell", init)?;
    let accel = cc_engine::detect_accel()?;
    let mut qemu = std::process::Command::new(cc_engine::paths::qemu()?)
        .args([
            "-accel",
            &accel.accel.to_string(),
            "-M",
            "microvm,acpi=off",
            "-m",
            "256",
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(cc_engine::paths::kernel()?)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet reboot=t panic=-1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let result = (|| -> CliResult<Samples> {
        let mut input = qemu.stdin.take().ok_or("no stdin")?;
        let mut output = qemu.stdout.take().ok_or("no stdout")?;
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"cc-shell-ready") {
            if output.read(&mut byte)? == 0 {
                return Err("the serial-console guest ended before its shell started".into());
            }
            seen.push(byte[0]);
        }
        let mut samples = Samples::default();
        for i in 0..runs + 5 {
            let t = Instant::now();
            input.write_all(b"x\n")?;
            input.flush()?;
            loop {
                if output.read(&mut byte)? == 0 {
                    return Err("the serial-console guest ended".into());
                }
                if byte[0] == b'M' {
                    break;
                }
            }
            if i >= 5 {
                samples.0.push(t.elapsed());
            }
        }
        Ok(samples)
    })();
    let _ = qemu.kill();
    let _ = qemu.wait();
    result
}

fn files(rootfs: &Path, runs: usize) -> CliResult<ExitCode> {
    const LEN: usize = 64 << 20;
    let inst = cc::Instance::new(
        &cc::Source::Dir(rootfs.to_path_buf()),
        cc::Options::default(),
    )?;
    let data: Vec<u8> = (0..LEN)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (mut write, mut read) = (Samples::default(), Samples::default());
    for _ in 0..runs {
        let t = Instant::now();
        inst.write_file("/var/bench.bin", &data, 0o644)?;
        write.0.push(t.elapsed());
        let t = Instant::now();
        let back = inst.read_file("/var/bench.bin")?;
        read.0.push(t.elapsed());
        if back.len() != LEN {
            return Err("read back a different length".into());
        }
    }
    inst.close()?;
    let mib_s = |d: Duration| (LEN as f64 / (1 << 20) as f64) / d.as_secs_f64();
    println!("64 MiB transfers, median of {runs}");
    println!(
        "write_file: {:>8.1} MiB/s (target ≥ 400; channel ≈ 670)",
        mib_s(write.median())
    );
    println!(
        "read_file:  {:>8.1} MiB/s (target ≥ 800; channel ≈ 1400)",
        mib_s(read.median())
    );
    Ok(ExitCode::SUCCESS)
}

const NET_MIB: usize = 256;

/// Reads `conn` to its end; returns how many bytes came.
fn drain(conn: &cc::Conn) -> CliResult<usize> {
    let mut total = 0;
    loop {
        let n = conn.read(1 << 20)?.len();
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

fn check_len(what: &str, got: usize) -> CliResult<()> {
    if got != NET_MIB << 20 {
        return Err(format!("{what}: {got} bytes arrived, not {NET_MIB} MiB").into());
    }
    Ok(())
}

/// A guest `sh -c script` with stdout piped (and stdin, if `stdin`).
fn spawn_sh(inst: &cc::Instance, script: &str, stdin: bool) -> CliResult<cc::Child> {
    let mut cmd = inst.command("sh");
    cmd.args(["-c", script]);
    if stdin {
        cmd.stdin(cc::Stdio::Piped);
    }
    Ok(cmd.spawn()?)
}

fn wait_ok(child: cc::Child, what: &str) -> CliResult<cc::Output> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(out)
}

/// Reads a guest → host byte stream to its end; returns how many came.
fn count_all(mut from: impl Read) -> CliResult<usize> {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(got);
        }
        got += n;
    }
}

/// The guest command that writes the transfer to its stdout.
fn zeros() -> String {
    format!("dd if=/dev/zero bs=1M count={NET_MIB} 2>/dev/null")
}

/// One 256 MiB guest → host transfer through a `listen`ed connection.
fn listen_once(inst: &cc::Instance, listener: &cc::Listener, to: &str) -> CliResult<Duration> {
    let t = Instant::now();
    let nc = spawn_sh(inst, &format!("{} | nc {to}", zeros()), false)?;
    let conn = listener.accept(None)?;
    let got = drain(&conn)?;
    let elapsed = t.elapsed();
    conn.close();
    wait_ok(nc, "guest nc")?;
    check_len("listen", got)?;
    Ok(elapsed)
}

/// One 256 MiB transfer between two `nc`s over the guest's own loopback:
/// what the guest programs cost without any of our forwarding.
fn guest_local_once(inst: &cc::Instance) -> CliResult<Duration> {
    // The receiver's stdin stays open: at its end of file busybox nc would
    // half-close, and the sending nc would stop at once.
    let mut receiver = spawn_sh(inst, "nc -l -p 7002 | wc -c", true)?;
    let stdin = receiver.stdin.take();
    let t = Instant::now();
    let sender = spawn_sh(
        inst,
        &format!(
            "until netstat -ltn | grep -q ':7002 '; do usleep 10000; done; {} | nc 127.0.0.1 7002",
            zeros()
        ),
        false,
    )?;
    let out = wait_ok(receiver, "guest receiver")?;
    let elapsed = t.elapsed();
    drop(stdin);
    wait_ok(sender, "guest sender")?;
    let text = String::from_utf8_lossy(&out.stdout);
    check_len("guest loopback", text.trim().parse().unwrap_or(0))?;
    Ok(elapsed)
}

/// One 256 MiB guest → host transfer on a command's stdout.
fn pipe_out_once(inst: &cc::Instance) -> CliResult<Duration> {
    let t = Instant::now();
    let mut dd = spawn_sh(inst, &zeros(), false)?;
    let got = count_all(dd.stdout.take().ok_or("no stdout pipe")?)?;
    let elapsed = t.elapsed();
    wait_ok(dd, "guest dd")?;
    check_len("pipe", got)?;
    Ok(elapsed)
}

/// One 256 MiB guest → host transfer through the user-mode network.
fn egress_once(inst: &cc::Instance, server: &std::net::TcpListener) -> CliResult<Duration> {
    let to = format!("10.0.2.2 {}", server.local_addr()?.port());
    let t = Instant::now();
    let nc = spawn_sh(inst, &format!("{} | nc {to}", zeros()), false)?;
    let (peer, _) = server.accept()?;
    let got = count_all(peer)?;
    let elapsed = t.elapsed();
    wait_ok(nc, "guest nc (egress)")?;
    check_len("egress", got)?;
    Ok(elapsed)
}

/// One 256 MiB host → guest transfer: `write` sends it, the guest's
/// `wc -c` (which `child` runs) counts it; timed until the guest has it all.
fn host_to_guest_once(
    child: cc::Child,
    mut write: impl FnMut(&[u8]) -> CliResult<()>,
) -> CliResult<Duration> {
    let block = vec![0u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..NET_MIB {
        write(&block)?;
    }
    write(&[])?;
    let out = wait_ok(child, "guest wc")?;
    let elapsed = t.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let count = text
        .trim()
        .parse()
        .map_err(|_| format!("guest counted {text:?}"))?;
    check_len("host → guest", count)?;
    Ok(elapsed)
}

/// One 256 MiB host → guest transfer through a `dial`ed connection.
fn dial_once(inst: &cc::Instance) -> CliResult<Duration> {
    let nc = spawn_sh(inst, "nc -l -p 7000 | wc -c", false)?;
    let conn = loop {
        match inst.dial("tcp", "127.0.0.1:7000") {
            Ok(c) => break c,
            // Not listening yet.
            Err(e) if e.code() == cc::ErrorCode::Network => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e.into()),
        }
    };
    host_to_guest_once(nc, |block| {
        if block.is_empty() {
            conn.close_write();
        } else {
            conn.write(block)?;
        }
        Ok(())
    })
}

/// One 256 MiB host → guest transfer on a command's stdin.
fn pipe_in_once(inst: &cc::Instance) -> CliResult<Duration> {
    let mut wc = spawn_sh(inst, "wc -c", true)?;
    let mut stdin = Some(wc.stdin.take().ok_or("no stdin pipe")?);
    host_to_guest_once(wc, |block| {
        if block.is_empty() {
            stdin = None;
        } else if let Some(s) = stdin.as_mut() {
            std::io::Write::write_all(s, block)?;
        }
        Ok(())
    })
}

fn net(rootfs: &Path, runs: usize) -> CliResult<ExitCode> {
    // Egress is measured against a host listener: the policy must let the
    // guest reach the host.
    let options = cc::Options {
        network_policy: cc::NetworkPolicy {
            allow_host: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let inst = cc::Instance::new(&cc::Source::Dir(rootfs.to_path_buf()), options)?;
    let listener = inst.listen("tcp", ":0")?;
    let to_listener = format!("host.internal {}", listener.port());
    let server = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut s = [(); 6].map(|()| Samples::default());
    for _ in 0..runs {
        s[0].0.push(listen_once(&inst, &listener, &to_listener)?);
        s[1].0.push(pipe_out_once(&inst)?);
        s[2].0.push(dial_once(&inst)?);
        s[3].0.push(pipe_in_once(&inst)?);
        s[4].0.push(egress_once(&inst, &server)?);
        s[5].0.push(guest_local_once(&inst)?);
    }
    drop(listener);
    inst.close()?;
    let mb_s = |d: Duration| (NET_MIB << 20) as f64 / 1e6 / d.as_secs_f64();
    let rows = [
        "listen: guest nc → host accept",
        "  baseline: guest dd → command stdout",
        "dial: host → guest nc -l",
        "  baseline: host → command stdin",
        "egress: guest nc → 10.0.2.2 (filter + relay)",
        "guest only: nc → nc on the guest's loopback",
    ];
    println!("{NET_MIB} MiB transfers, median of {runs}\n");
    println!("{:<46} {:>9}", "", "MB/s");
    for (name, samples) in rows.iter().zip(&s) {
        println!("{name:<46} {:>9.1}", mb_s(samples.median()));
    }
    let ratio = |a: &Samples, b: &Samples| mb_s(a.median()) / mb_s(b.median());
    println!(
        "\nlisten / pipe = {:.2}x   listen / guest-only nc = {:.2}x   dial / pipe = {:.2}x   \
         egress / listen = {:.2}x",
        ratio(&s[0], &s[1]),
        ratio(&s[0], &s[5]),
        ratio(&s[2], &s[3]),
        ratio(&s[4], &s[0])
    );
    Ok(ExitCode::SUCCESS)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
