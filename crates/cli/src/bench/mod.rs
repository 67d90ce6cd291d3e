//! `crumble bench`: medians of our phases against a baseline measured in the
//! same invocation. One module per benchmark; [`bare`] is the bare-QEMU
//! guest that `boot` and `exec` measure against.

mod bare;
mod boot;
mod callers;
mod exec;
mod files;
mod net;
mod park;
mod phases;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::CliResult;

#[derive(Debug, Subcommand)]
pub(crate) enum What {
    /// Cold start, phase by phase, against a bare QEMU boot of the same
    /// kernel into an initramfs that only echoes and powers off; warm start
    /// (from a template) against the cold start; idle memory of each.
    Boot {
        /// Root filesystem directory to boot.
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        /// Boots of each kind (at least 5).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Guest memory in MiB, for both kinds.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Static busybox for the bare initramfs.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Also time each phase of cold and warm starts on the host.
        #[arg(long)]
        phases: bool,
    },
    /// Round trip of `true` in a running instance, against an interactive
    /// shell on the serial console of a bare guest running `/bin/sh -c
    /// true`.
    Exec {
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        /// Commands of each kind.
        #[arg(long, default_value_t = 200)]
        runs: usize,
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Also time each phase of the round trip, host and guest, and the
        /// round trip through the C library and from Python.
        #[arg(long)]
        phases: bool,
        /// libcc.so for the C row of --phases (default: LIBCC_PATH, next
        /// to crumble, or the build's target/release).
        #[arg(long, value_name = "PATH")]
        libcc: Option<PathBuf>,
        /// Python for the Python row of --phases (default: the build's
        /// target/py-venv, else python3).
        #[arg(long, value_name = "PATH")]
        python: Option<PathBuf>,
    },
    /// write_file and read_file of 64 MiB, in MiB/s, against the raw
    /// virtio-serial port of a bare guest.
    Files {
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        /// Transfers of each kind.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Static busybox for the bare guest.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Also print where each transfer's time goes, host and guest.
        #[arg(long)]
        phases: bool,
    },
    /// 256 MiB through `listen` (guest → host) and `dial` (host → guest),
    /// against the same bytes through a command's pipes; and guest → host
    /// egress through the user-mode network. In MB/s. The guest end is
    /// `/usr/bin/cc-netbench`, which scripts/make-busybox-rootfs.sh builds
    /// into the tree.
    Net {
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        /// Transfers of each kind.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Parking a running instance (time, time the guest is stopped, bytes
    /// on disk) and restoring it twice from the same park, against a warm
    /// start measured in the same run.
    Park(Live),
    /// Branching a running instance into 1 and into 4 children (time until
    /// every child answers), and the idle memory of each child, against a
    /// warm start measured in the same run.
    Branch(Live),
}

/// A benchmark of a running instance's copies.
#[derive(Debug, Args)]
pub(crate) struct Live {
    #[arg(long, value_name = "DIR")]
    rootfs: PathBuf,
    /// Cycles (at least 3).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Also time each phase of the park or branch on the host.
    #[arg(long)]
    phases: bool,
}

pub(crate) fn bench(what: What) -> CliResult<ExitCode> {
    match what {
        What::Boot {
            rootfs,
            runs,
            memory,
            busybox,
            phases,
        } => boot::boot(&rootfs, runs.max(5), memory, &busybox, phases),
        What::Exec {
            rootfs,
            runs,
            busybox,
            phases,
            libcc,
            python,
        } => exec::exec(
            &rootfs,
            runs.max(10),
            &busybox,
            phases.then_some(exec::Callers {
                libcc: libcc.as_deref(),
                python: python.as_deref(),
            }),
        ),
        What::Files {
            rootfs,
            runs,
            busybox,
            phases,
        } => files::files(&rootfs, runs.max(3), &busybox, phases),
        What::Net { rootfs, runs } => net::net(&rootfs, runs.max(3)),
        What::Park(l) => park::park(&l),
        What::Branch(l) => park::branch(&l),
    }
}

/// The durations of one measured step, one per run.
#[derive(Debug, Default)]
struct Samples(Vec<Duration>);

impl Samples {
    /// The middle sample (the upper one of an even count): unmoved by a
    /// few runs the noisy host slowed down.
    fn median(&self) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }

    /// How many times `baseline`'s median this median is.
    fn ratio(&self, baseline: &Samples) -> f64 {
        self.median().as_secs_f64() / baseline.median().as_secs_f64()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A table of names and numbers, each column at a fixed width, so rows
/// printed apart line up under one header.
struct Table {
    name_width: usize,
    value_width: usize,
    decimals: usize,
}

impl Table {
    /// Names padded to `name_width`, numbers right-aligned in `value_width`
    /// with `decimals` digits after the point.
    fn new(name_width: usize, value_width: usize, decimals: usize) -> Table {
        Table {
            name_width,
            value_width,
            decimals,
        }
    }

    fn header(&self, name: &str, unit: &str) {
        self.header_units(name, &[unit]);
    }

    fn header_units(&self, name: &str, units: &[&str]) {
        let (w, v) = (self.name_width, self.value_width);
        let mut line = format!("{name:<w$}");
        for unit in units {
            line.push_str(&format!(" {unit:>v$}"));
        }
        println!("{line}");
    }

    /// A row with words where the numbers would be.
    fn note(&self, name: &str, text: &str) {
        let w = self.name_width;
        println!("{name:<w$} {text}");
    }

    fn row(&self, name: &str, values: &[f64]) {
        let (w, v, d) = (self.name_width, self.value_width, self.decimals);
        let mut line = format!("{name:<w$}");
        for value in values {
            line.push_str(&format!(" {value:>v$.d$}"));
        }
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_middle_sample_and_ratios_compare_medians() {
        let s = |ms: &[u64]| Samples(ms.iter().map(|&m| Duration::from_millis(m)).collect());
        assert_eq!(s(&[9, 1, 5]).median(), Duration::from_millis(5));
        assert_eq!(s(&[4, 1, 3, 2]).median(), Duration::from_millis(3));
        assert_eq!(s(&[]).median(), Duration::ZERO);
        assert_eq!(s(&[30, 10, 20]).ratio(&s(&[10])), 2.0);
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
    }
}
