//! `crumble bench files`: `write_file` and `read_file` throughput.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::Samples;
use crate::CliResult;

pub(super) fn files(rootfs: &Path, runs: usize) -> CliResult<ExitCode> {
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
