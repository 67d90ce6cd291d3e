//! `crumble bench boot`: cold and warm starts phase by phase against a bare
//! boot of the same kernel, and the idle memory of each kind.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::phases::Phases;
use super::{bare, ms, Samples, Table};
use crate::CliResult;

pub(super) fn boot(
    rootfs: &Path,
    runs: usize,
    memory: u32,
    busybox: &Path,
    show_phases: bool,
) -> CliResult<ExitCode> {
    let host = cc::host_info();
    let bare_spec = bare::powering_off(busybox, &host.cache_dir, memory)?;
    let accel = host.accelerator?;
    println!(
        "accelerator: {} ({}); {runs} boots of each kind, {memory} MiB, 1 vCPU",
        accel.accelerator, accel.reason
    );
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
        let (spawn, total) = bare::boot_once(&bare_spec)?;
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
    // Apart from the runs above, so that recording never slows them.
    let phases = [("cold", &cold), ("warm", &warm)]
        .map(|(kind, options)| (kind, options, Phases::default()));
    if show_phases {
        for _ in 0..runs {
            for (_, options, phases) in &phases {
                phases.record_host(|| -> CliResult<()> {
                    let t = Instant::now();
                    let (inst, ..) = start_and_echo(&source, options)?;
                    phases.add("start and first output of `echo`", t.elapsed());
                    for (name, d) in inst.agent_trace(false)? {
                        phases.add(&name, d);
                    }
                    let t = Instant::now();
                    inst.close()?;
                    phases.add("close", t.elapsed());
                    Ok(())
                })?;
            }
        }
    }
    let table = Table::new(26, 10, 1);
    println!();
    table.header("phase (median)", "ms");
    for (name, s) in names.iter().zip(&ours) {
        table.row(name, &[ms(s.median())]);
    }
    table.row("bare: qemu spawn", &[ms(bare_spawn.median())]);
    table.row("bare: spawn → exit", &[ms(bare_total.median())]);
    if show_phases {
        for (kind, _, phases) in &phases {
            phases.print(&format!("{kind} start, host phases (median)"));
        }
    }
    println!(
        "\nidle PSS per instance, MiB: of QEMU alone, and median of {PSS_INSTANCES} side by \
         side; of all its host processes alone (QEMU, network relay, sandbox)"
    );
    for (name, options) in [("cold", &cold), ("warm", &warm)] {
        let (alone, all_alone) = idle_pss(&source, options, 1)?;
        let (side_by_side, _) = idle_pss(&source, options, PSS_INSTANCES)?;
        table.row(name, &[alone, side_by_side, all_alone]);
    }
    println!("(target for warm ≤ 45 MiB)");
    println!(
        "\ncold start / bare boot = {:.2}x (target ≤ 1.2x)",
        ours[5].ratio(&bare_total)
    );
    println!(
        "warm start / cold start = {:.2}x (target ≤ 0.15x)",
        ours[10].ratio(&ours[5])
    );
    println!(
        "confined / unconfined: cold {:.2}x, warm {:.2}x (target ≤ 1.05x)",
        ours[5].ratio(&ours[11]),
        ours[10].ratio(&ours[12])
    );
    Ok(ExitCode::SUCCESS)
}

/// Starts an instance and runs `echo` in it; returns it with the time from
/// the start to the first byte of output, and from exec to that byte.
pub(super) fn start_and_echo(
    source: &cc::Source,
    options: &cc::Options,
) -> CliResult<(cc::Instance, Duration, Duration)> {
    let t0 = Instant::now();
    let inst = cc::Instance::new(source, options.clone())?;
    let t1 = Instant::now();
    let first = first_echo(&inst)?;
    Ok((inst, first - t0, first - t1))
}

/// Runs `echo` in `inst` and returns when the first byte of its output
/// came (after waiting for it to end).
pub(super) fn first_echo(inst: &cc::Instance) -> CliResult<Instant> {
    let mut child = inst.command("echo").arg("ready").spawn()?;
    let mut first = [0u8; 1];
    child
        .stdout
        .as_mut()
        .ok_or("no stdout")?
        .read_exact(&mut first)?;
    let at = Instant::now();
    child.wait()?;
    Ok(at)
}

/// Instances measured at once for idle memory.
const PSS_INSTANCES: usize = 4;

/// Median proportional set size of QEMU, in MiB, over `count` instances
/// idling side by side (pages they share are split between them), and
/// that of all their host processes over `count`.
fn idle_pss(source: &cc::Source, options: &cc::Options, count: usize) -> CliResult<(f64, f64)> {
    let all = (0..count)
        .map(|_| start_and_echo(source, options).map(|(inst, ..)| inst))
        .collect::<CliResult<Vec<_>>>()?;
    std::thread::sleep(Duration::from_secs(3));
    let mut pss = Vec::new();
    for inst in &all {
        pss.push(pss_mib(inst.vm_pid().ok_or("instance not running")?)?);
    }
    let host = host_pss_mib()? / count as f64;
    for inst in all {
        inst.close()?;
    }
    pss.sort_by(f64::total_cmp);
    Ok((pss[pss.len() / 2], host))
}

/// The proportional set size of every process this one started, and
/// theirs (QEMUs, network relays, bubblewrap), in MiB.
pub(super) fn host_pss_mib() -> CliResult<f64> {
    let me = std::process::id();
    let parent_of = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The name is in parentheses and may hold spaces: the parent is
        // the second field after it.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let procs: Vec<(u32, u32)> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect();
    let (mut total, mut parents) = (0.0, vec![me]);
    while let Some(parent) = parents.pop() {
        for &(pid, _) in procs.iter().filter(|(_, ppid)| *ppid == parent) {
            // One that ended meanwhile holds no memory.
            total += pss_mib(pid).unwrap_or(0.0);
            parents.push(pid);
        }
    }
    Ok(total)
}

/// The proportional set size of process `pid`, in MiB.
pub(super) fn pss_mib(pid: u32) -> CliResult<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let kib: f64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no Pss in smaps_rollup")?;
    Ok(kib / 1024.0)
}
