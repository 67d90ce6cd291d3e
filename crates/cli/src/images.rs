//! `crumble pull`, `images`, `rmi`, `load`, `export`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::CliResult;

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// Image reference: `alpine`, `host:port/repo:tag`, `repo@sha256:…`.
    pub(crate) reference: String,
    #[command(flatten)]
    pub(crate) options: PullFlags,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct PullFlags {
    /// Platform to pull from a multi-platform image: os/arch[/variant].
    #[arg(long)]
    platform: Option<String>,
    /// Registry user name (the password is read from CC_REGISTRY_PASSWORD).
    #[arg(long)]
    username: Option<String>,
    /// When to contact the registry: missing (default), always, never.
    #[arg(long, default_value = "missing", value_parser = ["missing", "always", "never"])]
    pull: String,
}

impl PullFlags {
    fn to_options(&self) -> CliResult<cc::PullOptions> {
        let auth = match &self.username {
            Some(user) => Some(cc::Auth {
                username: user.clone(),
                password: std::env::var("CC_REGISTRY_PASSWORD")
                    .map_err(|_| "--username needs the password in CC_REGISTRY_PASSWORD")?,
            }),
            None => None,
        };
        Ok(cc::PullOptions {
            platform: self
                .platform
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(cc::Error::from)?,
            auth,
            policy: match self.pull.as_str() {
                "always" => cc::PullPolicy::Always,
                "never" => cc::PullPolicy::Never,
                _ => cc::PullPolicy::IfNotPresent,
            },
            ..Default::default()
        })
    }
}

/// Pulls with a progress bar on a terminal (plain lines otherwise).
pub(crate) fn pull_with_progress(
    client: &cc::OciClient,
    reference: &str,
    flags: &PullFlags,
) -> CliResult<cc::Image> {
    let options = flags.to_options()?;
    let bar = ProgressBar::new(0);
    if std::io::stderr().is_terminal() {
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last_blob = String::new();
    let mut on_progress = |p: &cc::Progress| {
        bar.set_length(p.total);
        bar.set_position(p.current);
        if p.blob != last_blob {
            last_blob = p.blob.clone();
            let short = p
                .blob
                .trim_start_matches("sha256:")
                .get(..12)
                .unwrap_or("")
                .to_string();
            bar.set_message(format!(
                "blob {}/{} {short}",
                p.blob_index + 1,
                p.blob_count
            ));
            if bar.is_hidden() {
                eprintln!(
                    "pulling blob {}/{} {}",
                    p.blob_index + 1,
                    p.blob_count,
                    p.blob
                );
            }
        }
    };
    let image = client.pull(
        reference,
        &options,
        &mut on_progress,
        &cc::CancelToken::new(),
    );
    bar.finish_and_clear();
    let image = image?;
    eprintln!("{} {}", image.name().unwrap_or(reference), image.digest());
    Ok(image)
}

pub(crate) fn pull(args: PullArgs) -> CliResult<ExitCode> {
    let client = cc::OciClient::new(None)?;
    pull_with_progress(&client, &args.reference, &args.options)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn images() -> CliResult<ExitCode> {
    let client = cc::OciClient::new(None)?;
    println!("{:<56} {:<19} {:>10}", "NAME", "DIGEST", "SIZE");
    for i in client.images()? {
        let digest = format!("sha256:{}", &i.digest.hex()[..12]);
        println!("{:<56} {:<19} {:>10}", i.name, digest, human(i.size));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub(crate) struct RmiArgs {
    /// Image names to remove.
    #[arg(required = true)]
    names: Vec<String>,
}

pub(crate) fn rmi(args: RmiArgs) -> CliResult<ExitCode> {
    let client = cc::OciClient::new(None)?;
    let mut code = ExitCode::SUCCESS;
    for name in &args.names {
        if client.remove(name)? {
            println!("untagged {name}");
        } else {
            eprintln!("crumble: no image named {name}");
            code = ExitCode::FAILURE;
        }
    }
    let stats = client.prune()?;
    println!(
        "removed {} blobs and {} root images ({})",
        stats.blobs,
        stats.root_images,
        human(stats.bytes)
    );
    Ok(code)
}

#[derive(Debug, Args)]
pub(crate) struct LoadArgs {
    /// A `docker save` archive, an OCI layout archive, or an OCI layout directory.
    path: PathBuf,
}

pub(crate) fn load(args: LoadArgs) -> CliResult<ExitCode> {
    let client = cc::OciClient::new(None)?;
    let image = if args.path.is_dir() {
        client.load_dir(&args.path)?
    } else {
        client.load_tar(&args.path)?
    };
    println!(
        "loaded {} {}",
        image.name().unwrap_or("(unnamed)"),
        image.digest()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// Image name or digest.
    image: String,
    /// Directory to write the OCI layout to (new or empty).
    dir: PathBuf,
}

pub(crate) fn export(args: ExportArgs) -> CliResult<ExitCode> {
    let client = cc::OciClient::new(None)?;
    let image = client.image(&args.image)?;
    client.export_dir(&image, &args.dir)?;
    println!("exported {} to {}", image.digest(), args.dir.display());
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}
