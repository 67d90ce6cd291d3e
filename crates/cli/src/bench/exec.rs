//! `crumble bench exec`: the round trip of `true` through the agent against
//! an interactive shell on a bare guest's serial console.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use super::phases::Phases;
use super::{bare, ms, Samples, Table};
use crate::CliResult;

pub(super) fn exec(
    rootfs: &Path,
    runs: usize,
    busybox: &Path,
    show_phases: bool,
) -> CliResult<ExitCode> {
    let host = cc::host_info();
    let accel = host.accelerator?;
    println!(
        "accelerator: {} ({}); {runs} commands of each kind",
        accel.accelerator, accel.reason
    );
    let serial = bare::serial_shell(busybox, &host.cache_dir, runs)?;

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
    // Apart from the runs above, so that recording never slows them.
    let phases = Phases::default();
    if show_phases {
        inst.agent_trace(true)?;
        phases.record_host(|| -> CliResult<()> {
            for _ in 0..runs {
                let t = Instant::now();
                cmd.status()?;
                phases.add("whole round trip (traced)", t.elapsed());
            }
            Ok(())
        })?;
        for (name, d) in inst.agent_trace(false)? {
            phases.add(&name, d);
        }
    }
    inst.close()?;
    let table = Table::new(52, 9, 3);
    println!();
    table.header("median", "ms");
    table.row("exec `true` through the agent", &[ms(ours.median())]);
    table.row("agent ping (channel round trip)", &[ms(ping.median())]);
    table.row(
        "serial console shell: /bin/sh -c true (baseline)",
        &[ms(serial.median())],
    );
    if show_phases {
        phases.print("phases of a traced exec (median)");
    }
    println!(
        "\nexec / interactive serial shell = {:.2}x (target ≤ 0.85x)",
        ours.ratio(&serial)
    );
    Ok(ExitCode::SUCCESS)
}
