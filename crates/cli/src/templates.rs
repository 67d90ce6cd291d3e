//! `crumble templates`: the warm-start templates in the cache.

use std::process::ExitCode;

use clap::Subcommand;

use crate::CliResult;

#[derive(Debug, Subcommand)]
pub(crate) enum TemplatesCmd {
    /// List templates (the default).
    Ls,
    /// Remove templates by key.
    Rm {
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Remove templates whose image, kernel or QEMU changed or is gone.
    Prune,
    /// Remove every template (they are rebuilt on the next start).
    Clear,
}

pub(crate) fn templates(cmd: Option<TemplatesCmd>) -> CliResult<ExitCode> {
    match cmd.unwrap_or(TemplatesCmd::Ls) {
        TemplatesCmd::Ls => {
            let all = cc::templates::list()?;
            println!(
                "{:<32}  {:>7}  {:>4}  {:>7}  {:>8}  {:<5}  CREATED",
                "KEY", "MEMORY", "CPUS", "NETWORK", "SIZE", "STATE"
            );
            for t in &all {
                println!(
                    "{:<32}  {:>4} MiB  {:>4}  {:>7}  {:>4} MiB  {:<5}  {}",
                    t.meta.key,
                    t.meta.memory_mb,
                    t.meta.cpus,
                    if t.meta.network { "on" } else { "off" },
                    t.bytes >> 20,
                    if t.stale { "stale" } else { "ok" },
                    age(t.meta.created)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TemplatesCmd::Rm { keys } => {
            let mut code = ExitCode::SUCCESS;
            for key in keys {
                if cc::templates::remove(&key)? {
                    println!("removed {key}");
                } else {
                    eprintln!("crumble: no template {key}");
                    code = ExitCode::FAILURE;
                }
            }
            Ok(code)
        }
        TemplatesCmd::Prune => {
            println!("removed {} stale templates", cc::templates::prune()?);
            Ok(ExitCode::SUCCESS)
        }
        TemplatesCmd::Clear => {
            println!("removed {} templates", cc::templates::clear()?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// "5 minutes ago" for a Unix time.
fn age(created: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = now.saturating_sub(created);
    match secs {
        0..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}
