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
    /// kernel into an initramfs that only echoes and powers off.
    Boot {
        /// Root filesystem directory to boot.
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        /// Boots of each kind (at least 5).
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// Guest memory in MiB, for both kinds.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Static busybox for the bare initramfs.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
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
        kernel_params: Vec::new(),
    };
    let source = cc::Source::Dir(rootfs.to_path_buf());
    let options = cc::Options {
        memory_mb: memory,
        ..Default::default()
    };
    // One unmeasured boot builds the cached root image and warms caches.
    cc::Instance::new(&source, options.clone())?.close()?;

    let names = [
        "prepare",
        "qemu spawn",
        "kernel → agent",
        "root setup",
        "exec → first output",
        "cold start",
        "close",
    ];
    let mut ours: Vec<Samples> = names.iter().map(|_| Samples::default()).collect();
    let (mut bare_spawn, mut bare_total) = (Samples::default(), Samples::default());
    for _ in 0..runs {
        let (spawn, total) = bare_boot(&bare_spec, &cache)?;
        bare_spawn.0.push(spawn);
        bare_total.0.push(total);

        let t0 = Instant::now();
        let inst = cc::Instance::new(&source, options.clone())?;
        let t = inst.boot_timings();
        let t1 = Instant::now();
        let mut child = inst.command("echo").arg("ready").spawn()?;
        let mut first = [0u8; 1];
        child
            .stdout
            .as_mut()
            .ok_or("no stdout")?
            .read_exact(&mut first)?;
        let cold = t0.elapsed();
        let first_output = t1.elapsed();
        child.wait()?;
        let t2 = Instant::now();
        inst.close()?;
        for (s, d) in ours.iter_mut().zip([
            t.prepare,
            t.spawn,
            t.kernel,
            t.setup,
            first_output,
            cold,
            t2.elapsed(),
        ]) {
            s.0.push(d);
        }
    }
    println!("\n{:<24} {:>10}", "phase (median)", "ms");
    for (name, s) in names.iter().zip(&ours) {
        println!("{name:<24} {:>10.1}", ms(s.median()));
    }
    println!(
        "{:<24} {:>10.1}",
        "bare: qemu spawn",
        ms(bare_spawn.median())
    );
    println!(
        "{:<24} {:>10.1}",
        "bare: spawn → exit",
        ms(bare_total.median())
    );
    let ratio = ours[5].median().as_secs_f64() / bare_total.median().as_secs_f64();
    println!("\ncold start / bare boot = {ratio:.2}x (target ≤ 1.2x)");
    Ok(ExitCode::SUCCESS)
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

/// An initramfs whose `/init` echoes a marker and powers off at once.
fn bare_initramfs(busybox: &Path, cache: &Path) -> CliResult<PathBuf> {
    let bin = std::fs::read(busybox).map_err(|e| {
        format!(
            "{}: {e} (apt-get install busybox-static)",
            busybox.display()
        )
    })?;
    let init = b"#!/bin/busybox sh\n/bin/busybox echo cc-bare-ready\n/bin/busybox reboot -f\n";
    let mut archive = Vec::new();
    write_newc(
        &mut archive,
        &[
            Entry::dir("dev"),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::dir("bin"),
            Entry::file("bin/busybox", 0o755, &bin),
            Entry::file("init", 0o755, init),
        ],
    )?;
    let path = cache.join("bench").join("bare.cpio");
    std::fs::create_dir_all(path.parent().unwrap_or(cache))?;
    std::fs::write(&path, archive)?;
    Ok(path)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
