//! `crumble bench exec`: the round trip of `true` through the agent against
//! a shell loop on a bare guest's serial console.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use super::{bare, ms, Samples, Table};
use crate::CliResult;

pub(super) fn exec(rootfs: &Path, runs: usize, busybox: &Path) -> CliResult<ExitCode> {
    let host = cc::host_info();
    let accel = host.accelerator?;
    println!(
        "accelerator: {} ({}); {runs} commands of each kind",
        accel.accelerator, accel.reason
    );
    let serial = bare::serial_shell_loop(busybox, &host.cache_dir, runs)?;

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
    let table = Table::new(44, 9, 3);
    println!();
    table.header("median", "ms");
    table.row("exec `true` through the agent", &[ms(ours.median())]);
    table.row("agent ping (channel round trip)", &[ms(ping.median())]);
    table.row(
        "serial console: /bin/sh -c true (baseline)",
        &[ms(serial.median())],
    );
    println!(
        "\nexec / serial shell loop = {:.2}x (target ≤ 0.85x)",
        ours.ratio(&serial)
    );
    Ok(ExitCode::SUCCESS)
}
