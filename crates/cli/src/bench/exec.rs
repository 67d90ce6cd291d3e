//! `crumble bench exec`: the round trip of `true` through the agent against
//! an interactive shell on a bare guest's serial console; with `--phases`,
//! where its time goes, from the callers (C, Python) down to the agent.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use super::callers::{self, CAbi, Outcome, PythonRun};
use super::phases::Phases;
use super::{bare, ms, Samples, Table};
use crate::CliResult;

/// What `--phases` measures the callers above the core with.
#[derive(Debug)]
pub(super) struct Callers<'a> {
    /// libcc.so to load, instead of looking for it.
    pub(super) libcc: Option<&'a Path>,
    /// The Python interpreter, instead of the development venv.
    pub(super) python: Option<&'a Path>,
}

/// `callers` is `Some` with `--phases`.
pub(super) fn exec(
    rootfs: &Path,
    runs: usize,
    busybox: &Path,
    callers: Option<Callers<'_>>,
) -> CliResult<ExitCode> {
    let show_phases = callers.is_some();
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
    // In turns with the core's round trips: on this noisy host, load that
    // comes and goes then slows both alike.
    let mut c_abi = callers
        .as_ref()
        .map(|callers| CAbi::start(callers.libcc, rootfs));
    let cmd = inst.command("true");
    for _ in 0..5 {
        cmd.status()?; // warm the page cache and the agent's paths
        if let Some(c) = &mut c_abi {
            c.round_trip(false);
        }
    }
    let mut ours = Samples::default();
    for _ in 0..runs {
        let t = Instant::now();
        let status = cmd.status()?;
        ours.0.push(t.elapsed());
        if !status.success() {
            return Err(format!("`true` exited with {status}").into());
        }
        if let Some(c) = &mut c_abi {
            c.round_trip(true);
        }
    }
    let c_abi = c_abi.map(CAbi::finish);
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
    // After the core's instance is closed: a process of its own cannot
    // take turns with it.
    let above = callers.zip(c_abi).map(|(callers, (libcc, c))| {
        let python = callers::python(callers.python, libcc.as_deref().ok(), rootfs, runs);
        (libcc, c, python)
    });
    let table = Table::new(52, 9, 3);
    println!();
    table.header("median", "ms");
    table.row("exec `true` through the agent", &[ms(ours.median())]);
    table.row("agent ping (channel round trip)", &[ms(ping.median())]);
    table.row(
        "serial console shell: /bin/sh -c true (baseline)",
        &[ms(serial.median())],
    );
    let mut failed = false;
    if let Some((libcc, c, python)) = &above {
        failed = print_callers(&ours, libcc, c, python);
        phases.print("phases of a traced exec (median)");
    }
    println!(
        "\nexec / interactive serial shell = {:.2}x (target ≤ 0.85x)",
        ours.ratio(&serial)
    );
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The round trip by caller, each against the core's; true when a caller
/// that was there failed.
fn print_callers(
    core: &Samples,
    libcc: &Result<std::path::PathBuf, String>,
    c: &Outcome,
    python: &PythonRun,
) -> bool {
    let table = Table::new(52, 9, 3);
    println!(
        "\nexec `true` by caller (median; the C and the Python rows each boot \
         an instance of their own from the same --rootfs; the C one's round \
         trips take turns with the core's, Python's run after them)"
    );
    table.header_units("caller", &["ms", "× core"]);
    table.row("Rust core: Command::status", &[ms(core.median()), 1.0]);
    let rows = [
        ("C ABI", "C ABI: cc_instance_command, _run, _free", c),
        (
            "Python",
            "Python: inst.command(\"true\").run()",
            &python.outcome,
        ),
    ];
    let mut adds = Vec::new();
    let mut failed = false;
    for (short, name, outcome) in rows {
        match outcome {
            Outcome::Ran(samples) => {
                table.row(name, &[ms(samples.median()), samples.ratio(core)]);
                let more = ms(samples.median()) - ms(core.median());
                adds.push(format!("{short} adds {more:.3} ms"));
            }
            Outcome::Skipped(why) => table.note(name, &format!("skipped: {why}")),
            Outcome::Failed(why) => {
                table.note(name, &format!("failed: {why}"));
                failed = true;
            }
        }
    }
    if !adds.is_empty() {
        println!("{} over the core", adds.join(", "));
    }
    if let Ok(lib) = libcc {
        println!("C ABI library: {}", lib.display());
    }
    match &python.loaded {
        Some((lib, package)) => println!(
            "Python interpreter: {}, package {package}, library {lib}",
            python.interpreter.display()
        ),
        None => println!("Python interpreter: {}", python.interpreter.display()),
    }
    failed
}
