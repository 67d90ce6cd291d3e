//! `crumble bench files`: `write_file` and `read_file` throughput against
//! the raw virtio-serial port of a bare guest, measured in the same run;
//! with `--phases`, where each transfer's time goes on both sides.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::{bare, ms, Samples, Table};
use crate::CliResult;

const LEN: usize = 64 << 20;

/// Per-phase totals of one kind of transfer, one sample per run, in the
/// order the phases were first seen.
#[derive(Default)]
struct PhaseSamples {
    order: Vec<String>,
    samples: BTreeMap<String, Samples>,
}

impl PhaseSamples {
    fn add(&mut self, totals: Vec<(String, Duration)>) {
        for (name, total) in totals {
            if !self.samples.contains_key(&name) {
                self.order.push(name.clone());
            }
            self.samples.entry(name).or_default().0.push(total);
        }
    }

    /// Host totals and the agent's spans, summed by phase, since the
    /// last call; agent tracing stays on.
    fn take(&mut self, inst: &cc::Instance) -> CliResult<()> {
        self.add(cc::take_host_phases());
        let mut agent: Vec<(String, Duration)> = Vec::new();
        for (name, d) in inst.agent_trace(true)? {
            match agent.iter_mut().find(|(n, _)| *n == name) {
                Some((_, total)) => *total += d,
                None => agent.push((name, d)),
            }
        }
        self.add(agent);
        Ok(())
    }

    fn print(&self, title: &str, wall: &Samples) {
        let table = Table::new(44, 9, 1);
        println!();
        table.header(title, "ms");
        table.row("whole transfer (wall clock)", &[ms(wall.median())]);
        for name in &self.order {
            let median = self.samples[name].median();
            // Phases of the other direction's path stay near zero.
            if median >= Duration::from_micros(500) {
                table.row(&format!("  {name}"), &[ms(median)]);
            }
        }
    }
}

pub(super) fn files(
    rootfs: &Path,
    runs: usize,
    busybox: &Path,
    phases: bool,
) -> CliResult<ExitCode> {
    let host = cc::host_info();
    let accel = host.accelerator?;
    println!(
        "accelerator: {} ({}); 64 MiB transfers, median of {runs}",
        accel.accelerator, accel.reason
    );
    let (port_in, port_out) = bare::serial_port(busybox, &host.cache_dir, LEN, runs)?;

    let inst = cc::Instance::new(
        &cc::Source::Dir(rootfs.to_path_buf()),
        cc::Options::default(),
    )?;
    let data: Vec<u8> = (0..LEN)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (mut write, mut read) = (Samples::default(), Samples::default());
    let (mut write_phases, mut read_phases) = (PhaseSamples::default(), PhaseSamples::default());
    // Whatever starting the instance moved is not a transfer's; this
    // also starts the agent's tracing, when phases are asked for.
    if phases {
        PhaseSamples::default().take(&inst)?;
    }
    for _ in 0..runs {
        let t = Instant::now();
        inst.write_file("/var/bench.bin", &data, 0o644)?;
        write.0.push(t.elapsed());
        if phases {
            write_phases.take(&inst)?;
        }
        let t = Instant::now();
        let back = inst.read_file("/var/bench.bin")?;
        read.0.push(t.elapsed());
        if phases {
            read_phases.take(&inst)?;
        }
        if back != data {
            return Err("read back different bytes".into());
        }
    }
    inst.close()?;

    let mib_s = |s: &Samples| (LEN as f64 / (1 << 20) as f64) / s.median().as_secs_f64();
    let table = Table::new(44, 9, 1);
    println!();
    table.header("median", "MiB/s");
    table.row("write_file (host → guest)", &[mib_s(&write)]);
    table.row("virtio-serial port in (baseline)", &[mib_s(&port_in)]);
    table.row("read_file (guest → host)", &[mib_s(&read)]);
    table.row("virtio-serial port out (baseline)", &[mib_s(&port_out)]);
    println!(
        "\nwrite_file / port in = {:.2}x of the channel (target ≥ 400 MiB/s)",
        port_in.ratio(&write)
    );
    println!(
        "read_file / port out = {:.2}x of the channel (target ≥ 800 MiB/s)",
        port_out.ratio(&read)
    );
    if phases {
        println!("\nPhases: time each step took in one transfer (median); steps on");
        println!("different threads overlap, so they add up to more than the whole.");
        write_phases.print("write_file", &write);
        read_phases.print("read_file", &read);
    }
    Ok(ExitCode::SUCCESS)
}
