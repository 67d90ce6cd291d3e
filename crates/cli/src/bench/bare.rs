//! The baseline guest: the same kernel booted bare into a busybox
//! initramfs, with no agent, root filesystem or confinement.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cc_engine::initramfs::{write_newc, Entry};

use super::Samples;
use crate::CliResult;

/// Boots the bare initramfs; returns (spawn time, spawn → QEMU exit).
pub(super) fn bare_boot(spec: &cc_engine::VmSpec, cache: &Path) -> CliResult<(Duration, Duration)> {
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
pub(super) fn bare_initramfs(busybox: &Path, cache: &Path) -> CliResult<PathBuf> {
    let init = b"#!/bin/busybox sh\n/bin/busybox echo cc-bare-ready\n/bin/busybox reboot -f\n";
    busybox_initramfs(busybox, cache, "bare", init)
}

/// Per-command time of a shell loop on the serial console of a bare guest:
/// the host sends a line, the guest runs `/bin/sh -c true` and answers.
pub(super) fn serial_shell_loop(busybox: &Path, cache: &Path, runs: usize) -> CliResult<Samples> {
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
