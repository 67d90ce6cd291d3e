//! `crumble`, the command line of crumblecracker.
//!
//! This crate owns argument parsing, terminal I/O, signal forwarding and
//! exit codes; every capability comes from the `cc` core (and, for the
//! benchmarks' bare-QEMU baseline, `cc-engine`). It is the only crate
//! allowed to end the process.

mod bench;
mod doctor;
mod images;
mod run;
mod system;
mod templates;
mod terminal;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "crumble",
    version,
    about = "Run container root filesystems in lightweight VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot an instance, run one command in it, exit with its status.
    // Boxed: its many flags dwarf the other variants.
    Run(Box<run::RunArgs>),
    /// Restore an instance parked by `run --park`, run one command in it
    /// (its background processes go on), exit with the command's status.
    Restore(Box<run::RestoreArgs>),
    /// Pull an image from a registry into the local store.
    Pull(images::PullArgs),
    /// List stored images.
    Images,
    /// Remove image names, then the content no image uses.
    Rmi(images::RmiArgs),
    /// Load a `docker save` archive or an OCI layout (archive or directory).
    Load(images::LoadArgs),
    /// Write a stored image as an OCI layout directory.
    Export(images::ExportArgs),
    /// Show the accelerator, kernel, QEMU and cache this machine uses.
    Doctor,
    /// List or remove warm-start templates (booted guests saved per
    /// configuration, restored by later starts).
    Templates {
        #[command(subcommand)]
        cmd: Option<templates::TemplatesCmd>,
    },
    /// Show and prune what the cache directory holds.
    System {
        #[command(subcommand)]
        cmd: system::SystemCmd,
    },
    /// Measure boot and command latency.
    Bench {
        #[command(subcommand)]
        what: bench::What,
    },
}

fn main() -> ExitCode {
    // Warnings (a warm start falling back to a cold boot, say) show by
    // default; CC_LOG chooses otherwise.
    let filter = tracing_subscriber::EnvFilter::try_from_env("CC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run::run(*args),
        Cmd::Restore(args) => run::restore(*args),
        Cmd::Pull(args) => images::pull(args),
        Cmd::Images => images::images(),
        Cmd::Rmi(args) => images::rmi(args),
        Cmd::Load(args) => images::load(args),
        Cmd::Export(args) => images::export(args),
        Cmd::Doctor => doctor::doctor(),
        Cmd::Templates { cmd } => templates::templates(cmd),
        Cmd::System { cmd } => system::system(cmd),
        Cmd::Bench { what } => bench::bench(what),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Errors may quote untrusted bytes (archives, guest output).
            eprintln!("crumble: {}", cc::printable(&e.to_string()));
            let mut source = std::error::Error::source(&*e);
            while let Some(s) = source {
                eprintln!("  caused by: {}", cc::printable(&s.to_string()));
                source = s.source();
            }
            ExitCode::from(125)
        }
    }
}

/// Errors the subcommands report before exiting non-zero.
pub(crate) type CliResult<T> = Result<T, Box<dyn std::error::Error>>;
