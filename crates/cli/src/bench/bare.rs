//! The baseline guest: the same kernel booted by the engine's own QEMU
//! command line ([`cc_engine::BareSpec`]) into a busybox initramfs, with no
//! agent, root filesystem or confinement.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cc_engine::initramfs::{write_newc, Entry};
use cc_engine::BareSpec;

use super::Samples;
use crate::CliResult;

/// What the guest prints before it powers off.
const READY: &str = "cc-bare-ready";

/// How long a bare boot may take to power off.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// A guest whose `/init` echoes a marker and powers off at once.
pub(super) fn powering_off(busybox: &Path, cache: &Path, memory_mb: u32) -> CliResult<BareSpec> {
    let init = format!("#!/bin/busybox sh\n/bin/busybox echo {READY}\n/bin/busybox reboot -f\n");
    let initrd = busybox_initramfs(busybox, cache, "bare", init.as_bytes())?;
    Ok(BareSpec::new(initrd, memory_mb, 1)?)
}

/// Boots `spec` (from [`powering_off`]); returns (spawn time, spawn → QEMU
/// exit).
pub(super) fn boot_once(spec: &BareSpec) -> CliResult<(Duration, Duration)> {
    let t0 = Instant::now();
    let mut vm = spec.start()?;
    let spawn = t0.elapsed();
    let mut console = Vec::new();
    // The console ends when QEMU exits.
    vm.console().set_read_timeout(Some(BOOT_TIMEOUT))?;
    let read = vm.console().read_to_end(&mut console);
    if read.is_err() {
        vm.kill();
    }
    let (status, stderr) = vm.wait()?;
    let total = t0.elapsed();
    let diagnostics = || {
        format!(
            "QEMU {status}\n--- qemu:\n{stderr}--- guest console:\n{}",
            String::from_utf8_lossy(&console)
        )
    };
    if read.is_err() {
        return Err(format!(
            "bare boot did not power off in {} s\n{}",
            BOOT_TIMEOUT.as_secs(),
            diagnostics()
        )
        .into());
    }
    if !String::from_utf8_lossy(&console).contains(READY) {
        return Err(format!("bare boot printed no marker\n{}", diagnostics()).into());
    }
    Ok((spawn, total))
}

/// Per-command time of an interactive busybox shell on the serial console
/// of a bare guest: the host types `/bin/sh -c true; echo M<i>Q` and waits
/// for the marker. That is the guest's own cost of starting a process plus
/// one console round trip. (A `while read` loop would be slower than the
/// command: busybox `read` takes the terminal a byte at a time.)
pub(super) fn serial_shell(busybox: &Path, cache: &Path, runs: usize) -> CliResult<Samples> {
    let init = b"#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev\n/bin/busybox stty -echo\necho cc-shell-ready\nexec /bin/sh -i\n";
    let initrd = busybox_initramfs(busybox, cache, "serial-shell", init)?;
    // Dropping it at the end kills QEMU.
    let vm = BareSpec::new(initrd, 256, 1)?.start()?;
    let mut console = vm.console();
    read_until(&mut console, b"cc-shell-ready")?;
    let mut samples = Samples::default();
    for i in 0..runs + 5 {
        let t = Instant::now();
        // The quotes keep the marker out of any echo of the typed line.
        console.write_all(format!("/bin/sh -c true; echo M''{i}Q\n").as_bytes())?;
        console.flush()?;
        read_until(&mut console, format!("M{i}Q").as_bytes())?;
        // The first few warm the guest's caches.
        if i >= 5 {
            samples.0.push(t.elapsed());
        }
    }
    Ok(samples)
}

/// Per-transfer time of `len` bytes through the raw virtio-serial port of a
/// bare guest (its shell keeps the port open throughout), `runs` times each way: host → guest (the guest's `dd`
/// reads the port into `/dev/null`) and guest → host (its `dd` writes
/// zeros into the port). The channel's own speed, with no agent or framing.
pub(super) fn serial_port(
    busybox: &Path,
    cache: &Path,
    len: usize,
    runs: usize,
) -> CliResult<(Samples, Samples)> {
    const MIB: usize = 1 << 20;
    let count = len / MIB;
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev\n/bin/busybox stty -echo\n\
         exec 3<>/dev/vport0p1\necho cc-port-ready\n\
         while read line; do case $line in\n\
         in) /bin/busybox dd of=/dev/null bs=1M count={count} iflag=fullblock <&3 2>/dev/null; echo DONE;;\n\
         out) /bin/busybox dd if=/dev/zero bs=1M count={count} >&3 2>/dev/null;;\n\
         esac; done\n"
    );
    let initrd = busybox_initramfs(busybox, cache, "serial-port", init.as_bytes())?;
    // Dropping it at the end kills QEMU.
    let vm = BareSpec::new(initrd, 256, 1)?.start()?;
    let mut console = vm.console();
    let mut port = vm.port();
    let data = vec![0x5au8; count * MIB];
    let mut buf = vec![0u8; MIB];
    let (mut inward, mut outward) = (Samples::default(), Samples::default());
    // The guest drops what arrives before it opened the port.
    read_until(&mut console, b"cc-port-ready")?;
    for _ in 0..runs {
        let t = Instant::now();
        console.write_all(b"in\n")?;
        port.write_all(&data)?;
        read_until(&mut console, b"DONE")?;
        inward.0.push(t.elapsed());
        let t = Instant::now();
        console.write_all(b"out\n")?;
        let mut got = 0;
        while got < data.len() {
            match port.read(&mut buf)? {
                0 => return Err("the serial-port guest ended".into()),
                n => got += n,
            }
        }
        outward.0.push(t.elapsed());
    }
    Ok((inward, outward))
}

fn read_until(console: &mut impl Read, marker: &[u8]) -> CliResult<()> {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(marker) {
        if console.read(&mut byte)? == 0 {
            return Err("the bare guest ended".into());
        }
        seen.push(byte[0]);
    }
    Ok(())
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
