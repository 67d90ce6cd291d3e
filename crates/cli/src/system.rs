//! `crumble system`: the cache directory as a whole, as `docker system`.

use std::process::ExitCode;

use clap::Subcommand;

use crate::images::human;
use crate::CliResult;

#[derive(Debug, Subcommand)]
pub(crate) enum SystemCmd {
    /// Show the bytes each kind of cached file takes, and what a prune frees.
    Df,
    /// Remove what nothing uses: image content no named image refers to,
    /// stale templates, leftovers of dead processes, boot files of other
    /// agents.
    Prune {
        /// Also remove every template, root image of a host directory,
        /// blank writable disk and boot file (rebuilt at the next start,
        /// more slowly). Named images always stay: remove them with `rmi`.
        #[arg(short, long)]
        all: bool,
    },
}

pub(crate) fn system(cmd: SystemCmd) -> CliResult<ExitCode> {
    match cmd {
        SystemCmd::Df => {
            println!("cache: {}", cc::cache::dir().display());
            println!(
                "{:<16}  {:>6}  {:>10}  {:>11}",
                "TYPE", "COUNT", "SIZE", "RECLAIMABLE"
            );
            let mut total = cc::cache::Usage::default();
            for row in cc::cache::usage()? {
                let u = row.usage;
                println!(
                    "{:<16}  {:>6}  {:>10}  {:>11}",
                    row.kind.to_string(),
                    u.count,
                    human(u.bytes),
                    human(u.reclaimable)
                );
                total.bytes += u.bytes;
                total.reclaimable += u.reclaimable;
            }
            println!(
                "{:<16}  {:>6}  {:>10}  {:>11}",
                "total",
                "",
                human(total.bytes),
                human(total.reclaimable)
            );
        }
        SystemCmd::Prune { all } => {
            let mut bytes = 0;
            for row in cc::cache::prune(all)? {
                let r = row.removed;
                if r.count > 0 {
                    println!("removed {} ({}): {}", row.kind, r.count, human(r.bytes));
                }
                bytes += r.bytes;
            }
            println!("reclaimed {}", human(bytes));
        }
    }
    Ok(ExitCode::SUCCESS)
}
