//! `crumble doctor`: what this machine will use, and what is missing.

use std::process::ExitCode;

use crate::CliResult;

pub(crate) fn doctor() -> CliResult<ExitCode> {
    let (text, ok) = report(&cc::host_info());
    print!("{text}");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The report on `host`, and whether nothing instances need is missing.
fn report(host: &cc::HostInfo) -> (String, bool) {
    let mut text = String::new();
    let mut ok = true;
    let mut line = |name: &str, value: Result<String, &cc::Error>| match value {
        Ok(v) => text.push_str(&format!("{name:<12} {v}\n")),
        Err(e) => {
            ok = false;
            text.push_str(&format!("{name:<12} MISSING: {e}\n"));
        }
    };
    line("cache dir", Ok(host.cache_dir.display().to_string()));
    line(
        "accelerator",
        host.accelerator
            .as_ref()
            .map(|c| format!("{} ({})", c.accelerator, c.reason)),
    );
    line(
        "qemu",
        host.qemu
            .as_ref()
            .map(|q| format!("{} — {}", q.path.display(), q.version)),
    );
    line(
        "kernel",
        host.kernel.as_ref().map(|k| {
            let hash = k.hash.as_deref().unwrap_or("unknown");
            format!("{} (hash {hash})", k.path.display())
        }),
    );
    line(
        "agent",
        host.agent.as_ref().map(|p| p.display().to_string()),
    );
    line("protocol", Ok(format!("v{}", cc::GUEST_PROTOCOL_VERSION)));
    // Gaps are reported, not failures: instances start with what the host
    // gives (`--confinement strict` refuses instead).
    let confinement = &host.confinement;
    text.push_str(&format!(
        "{:<12} {}\n",
        "confinement",
        confinement.summary()
    ));
    for gap in &confinement.gaps {
        text.push_str(&format!("{:<12} gap: {gap}\n", ""));
    }
    // What `cc_supports_hypervisor` / `cc.supports_hypervisor()` answer.
    let verdict = match host.unavailable() {
        None if host.hardware_accelerated() => "yes, hardware-accelerated (kvm)".to_string(),
        None => "yes, software emulation (tcg): slower, not hardware-accelerated".to_string(),
        Some(why) => format!("NO: instances cannot run: {why}"),
    };
    text.push_str(&format!("{:<12} {verdict}\n", "hypervisor"));
    (text, ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn host() -> cc::HostInfo {
        cc::HostInfo {
            cache_dir: PathBuf::from("/c"),
            accelerator: Ok(cc::AcceleratorChoice {
                accelerator: cc::Accelerator::Tcg,
                reason: "software emulation: no kvm".into(),
            }),
            qemu: Ok(cc::QemuInfo {
                path: PathBuf::from("/usr/bin/qemu"),
                version: "QEMU emulator version 7.2".into(),
            }),
            kernel: Ok(cc::KernelInfo {
                path: PathBuf::from("/c/kernel/current/vmlinux"),
                hash: None,
            }),
            agent: Ok(PathBuf::from("/c/agent/cc-agent")),
            confinement: cc::Confinement {
                seccomp: true,
                uid: 1000,
                namespaces: false,
                network_filter: true,
                gaps: vec!["no bubblewrap".into()],
            },
        }
    }

    #[test]
    fn every_fact_on_its_own_line() {
        let (text, ok) = report(&host());
        assert!(ok);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "cache dir    /c");
        assert_eq!(lines[1], "accelerator  tcg (software emulation: no kvm)");
        assert_eq!(
            lines[2],
            "qemu         /usr/bin/qemu — QEMU emulator version 7.2"
        );
        assert_eq!(
            lines[3],
            "kernel       /c/kernel/current/vmlinux (hash unknown)"
        );
        assert_eq!(lines[4], "agent        /c/agent/cc-agent");
        assert!(lines[5].starts_with("protocol     v"), "{}", lines[5]);
        assert!(
            lines[6].starts_with("confinement  seccomp on,"),
            "{}",
            lines[6]
        );
        assert_eq!(lines[7], "             gap: no bubblewrap");
        assert_eq!(
            lines[8],
            "hypervisor   yes, software emulation (tcg): slower, not hardware-accelerated"
        );
        let mut kvm = host();
        kvm.accelerator = Ok(cc::AcceleratorChoice {
            accelerator: cc::Accelerator::Kvm,
            reason: "hardware".into(),
        });
        let (text, _) = report(&kvm);
        assert!(
            text.ends_with("hypervisor   yes, hardware-accelerated (kvm)\n"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_part_fails_the_check_but_not_the_report() {
        let mut h = host();
        h.kernel = Err(cc::Error::InvalidArgument("no kernel".into()));
        let (text, ok) = report(&h);
        assert!(!ok);
        assert!(
            text.contains("kernel       MISSING: invalid argument: no kernel\n"),
            "{text}"
        );
        assert!(text.contains("agent        /c/agent/cc-agent"), "{text}");
        assert!(
            text.ends_with("hypervisor   NO: instances cannot run: invalid argument: no kernel\n"),
            "{text}"
        );
    }
}
