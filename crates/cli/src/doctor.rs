//! `crumble doctor`: what this machine will use, and what is missing.

use std::process::ExitCode;

use crate::CliResult;

pub(crate) fn doctor() -> CliResult<ExitCode> {
    let mut ok = true;
    let mut report = |name: &str, value: Result<String, String>| match value {
        Ok(v) => println!("{name:<12} {v}"),
        Err(e) => {
            ok = false;
            println!("{name:<12} MISSING: {e}");
        }
    };
    report(
        "cache dir",
        Ok(cc_engine::paths::cache_dir().display().to_string()),
    );
    report(
        "accelerator",
        cc_engine::detect_accel()
            .map(|c| format!("{} ({})", c.accel, c.reason))
            .map_err(|e| e.to_string()),
    );
    report(
        "qemu",
        cc_engine::paths::qemu()
            .and_then(|p| Ok(format!("{} — {}", p.display(), cc_engine::qemu_version()?)))
            .map_err(|e| e.to_string()),
    );
    report(
        "kernel",
        cc_engine::paths::kernel()
            .map(|k| {
                let hash = cc_engine::paths::kernel_hash(&k)
                    .unwrap_or_else(|| "not a cached build".into());
                format!("{} (hash {hash})", k.display())
            })
            .map_err(|e| e.to_string()),
    );
    report(
        "agent",
        cc_engine::paths::agent()
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string()),
    );
    report("protocol", Ok(format!("v{}", cc::GUEST_PROTOCOL_VERSION)));
    // Gaps are reported, not failures: instances start with what the host
    // gives (`--confinement strict` refuses instead).
    let confinement = cc::host_confinement();
    println!("{:<12} {}", "confinement", confinement.summary());
    for gap in &confinement.gaps {
        println!("{:<12} gap: {gap}", "");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
