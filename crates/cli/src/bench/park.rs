//! `crumble bench park` and `crumble bench branch`: parking a running
//! instance and restoring it, and branching one, against a warm start
//! measured in the same run.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::boot::{first_echo, start_and_echo};
use super::phases::Phases;
use super::{ms, Live, Samples, Table};
use crate::CliResult;

/// A guest process that keeps counting, so the park holds a live program.
const COUNTER: &str = "(i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.1; done) \
                       </dev/null >/dev/null 2>&1 &";

/// The source and options of the runs (the template made, unmeasured)
/// and the phases to record, if shown.
fn prepare(l: &Live) -> CliResult<(cc::Source, cc::Options, Option<Phases>)> {
    let runs = l.runs.max(3);
    let source = cc::Source::Dir(l.rootfs.clone());
    let warm = cc::Options {
        memory_mb: l.memory,
        ..Default::default()
    };
    println!(
        "{runs} runs, {} MiB, 1 vCPU; the source runs a counting loop",
        l.memory
    );
    cc::Instance::new(&source, warm.clone())?.close()?;
    Ok((source, warm, l.phases.then(Phases::default)))
}

/// A warm instance running the counting loop, and how long its start
/// took to the first output.
fn counting(source: &cc::Source, warm: &cc::Options) -> CliResult<(cc::Instance, Duration)> {
    let (inst, warm_started, _) = start_and_echo(source, warm)?;
    let status = inst.command("sh").args(["-c", COUNTER]).status()?;
    if !status.success() {
        return Err(format!("the counter did not start: {status}").into());
    }
    std::thread::sleep(Duration::from_secs(1));
    Ok((inst, warm_started))
}

/// Runs `f` with the host's phases recorded into `phases` when shown.
fn timed<T>(phases: &Option<Phases>, f: impl FnOnce() -> T) -> T {
    match phases {
        Some(p) => p.record_host(f),
        None => f(),
    }
}

pub(super) fn park(l: &Live) -> CliResult<ExitCode> {
    let (source, warm, phases) = prepare(l)?;
    let runs = l.runs.max(3);
    let scratch = std::env::temp_dir().join(format!("cc-bench-park-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let names = [
        "warm start → first output",
        "park (call)",
        "park: quiet, save, end VM",
        "restore → first output",
        "second restore → first output",
    ];
    let mut ours: Vec<Samples> = names.iter().map(|_| Samples::default()).collect();
    let mut bytes = Vec::new();
    for run in 0..runs {
        let (inst, warm_started) = counting(&source, &warm)?;
        let pid = inst.vm_pid().ok_or("instance not running")?;
        let dir = scratch.join(format!("p{run}"));
        let t = Instant::now();
        let parked = timed(&phases, || inst.park(&dir))?;
        let park_call = t.elapsed();
        if Path::new(&format!("/proc/{pid}")).exists() {
            return Err("QEMU still runs after the park".into());
        }
        bytes.push(parked.bytes as f64 / 1e6);
        let mut restores = Vec::new();
        for _ in 0..2 {
            let t = Instant::now();
            let r = timed(&phases, || {
                cc::Instance::restore(&dir, cc::RestoreOptions::default())
            })?;
            restores.push(first_echo(&r)? - t);
            r.close()?;
        }
        std::fs::remove_dir_all(&dir)?;
        for (s, d) in ours.iter_mut().zip([
            warm_started,
            park_call,
            parked.save,
            restores[0],
            restores[1],
        ]) {
            s.0.push(d);
        }
    }
    std::fs::remove_dir_all(&scratch)?;
    bytes.sort_by(f64::total_cmp);
    let table = Table::new(30, 10, 1);
    println!();
    table.header("phase (median)", "ms");
    for (name, s) in names.iter().zip(&ours) {
        table.row(name, &[ms(s.median())]);
    }
    table.header("park size (median)", "MB");
    table.row("bytes on disk", &[bytes[bytes.len() / 2]]);
    println!(
        "\nrestore / warm start = {:.2}x (target ≤ 2x)",
        ours[3].ratio(&ours[0])
    );
    if let Some(p) = phases {
        p.print("park and restores, host phases (median)");
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn branch(l: &Live) -> CliResult<ExitCode> {
    let (source, warm, phases) = prepare(l)?;
    let runs = l.runs.max(3);
    let names = [
        "warm start → first output",
        "branch 1 → child's first output",
        "branch 4 → all children's output",
    ];
    let mut ours: Vec<Samples> = names.iter().map(|_| Samples::default()).collect();
    let (mut pss, mut extra) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (src, warm_started) = counting(&source, &warm)?;
        let mut times = vec![warm_started];
        let mut family = Vec::new();
        for n in [1, 4] {
            let t = Instant::now();
            let kids = timed(&phases, || src.branch(n))?;
            let mut last = t;
            for k in &kids {
                last = last.max(first_echo(k)?);
            }
            times.push(last - t);
            if let (Some(p), 1) = (&phases, n) {
                for (name, d) in kids[0].agent_trace(false)? {
                    p.add(&format!("child: {name}"), d);
                }
            }
            // Idle: the source and its children, all sharing what they
            // can; every host process of theirs counts.
            std::thread::sleep(Duration::from_secs(3));
            family.push(super::boot::host_pss_mib()?);
            if n == 4 {
                let mut children = 0.0;
                for k in &kids {
                    children += super::boot::pss_mib(k.vm_pid().ok_or("child not running")?)?;
                }
                pss.push(children / n as f64);
            }
            for k in kids {
                k.close()?;
            }
        }
        // What each of the 3 more children costs the host.
        extra.push((family[1] - family[0]) / 3.0);
        src.close()?;
        for (s, d) in ours.iter_mut().zip(times) {
            s.0.push(d);
        }
    }
    pss.sort_by(f64::total_cmp);
    extra.sort_by(f64::total_cmp);
    let table = Table::new(34, 10, 1);
    println!();
    table.header("phase (median)", "ms");
    for (name, s) in names.iter().zip(&ours) {
        table.row(name, &[ms(s.median())]);
    }
    table.header("idle PSS (median)", "MiB");
    table.row("child's QEMU, per child of 4", &[pss[pss.len() / 2]]);
    table.row("extra per child: (4 - 1) / 3", &[extra[extra.len() / 2]]);
    println!(
        "\nbranch 1 / warm start = {:.2}x (target ≤ 2x)",
        ours[1].ratio(&ours[0])
    );
    println!(
        "extra PSS per child = {:.1} MiB (target ≤ 20 MiB): the PSS of every host \
         process (QEMUs, network relays, sandboxes) after a branch into 4, less after \
         a branch into 1, over 3",
        extra[extra.len() / 2]
    );
    if let Some(p) = phases {
        p.print("branches, host phases (median)");
    }
    Ok(ExitCode::SUCCESS)
}
