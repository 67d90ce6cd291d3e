//! What this host gives instances: the facts `crumble doctor` shows and the
//! C library's capability queries report, so neither has to know how the
//! engine finds them.

use std::fmt;
use std::path::PathBuf;

use crate::{ConfineMode, Confinement, Result};

/// What runs a guest's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation: slower, but needs nothing of the host.
    Tcg,
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

/// The accelerator instances get, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceleratorChoice {
    pub accelerator: Accelerator,
    /// In words: what the host offers, or that `CC_ACCEL` forced it.
    pub reason: String,
}

/// The QEMU binary instances run under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuInfo {
    pub path: PathBuf,
    /// The first line of `qemu --version`.
    pub version: String,
}

/// The guest kernel instances boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    pub path: PathBuf,
    /// The content hash of the build (`scripts/build-kernel.sh`'s cache
    /// key), from the `kernel.json` installed beside it or its build-cache
    /// dir; `None` for a kernel from elsewhere.
    pub hash: Option<String>,
}

/// This host's facts. Each part that can be missing is a `Result` whose
/// error says what is wrong and how to fix it; the parts are independent,
/// so one missing does not hide the others.
#[derive(Debug)]
pub struct HostInfo {
    /// The per-user cache: images, root images, templates, run dirs.
    pub cache_dir: PathBuf,
    /// Fails only when `CC_ACCEL` asks for what the host cannot give.
    pub accelerator: Result<AcceleratorChoice>,
    pub qemu: Result<QemuInfo>,
    pub kernel: Result<KernelInfo>,
    /// The static guest agent that becomes the guest's PID 1.
    pub agent: Result<PathBuf>,
    /// What an instance with default options gets (see
    /// [`host_confinement`]).
    pub confinement: Confinement,
}

impl HostInfo {
    /// Whether instances can run here: QEMU, an accelerator (KVM or
    /// QEMU's TCG emulation), the guest kernel and the agent are all there.
    /// See [`HostInfo::unavailable`] for why not.
    pub fn hypervisor_available(&self) -> bool {
        self.unavailable().is_none()
    }

    /// Why no instance can start here (each missing part, `"; "`-separated),
    /// or `None` when instances can run.
    pub fn unavailable(&self) -> Option<String> {
        let missing: Vec<String> = [
            self.accelerator.as_ref().err(),
            self.qemu.as_ref().err(),
            self.kernel.as_ref().err(),
            self.agent.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    /// Whether instances get hardware virtualization (KVM) rather than
    /// software emulation (TCG).
    pub fn hardware_accelerated(&self) -> bool {
        matches!(
            self.accelerator,
            Ok(AcceleratorChoice {
                accelerator: Accelerator::Kvm,
                ..
            })
        )
    }
}

/// Reads this host's facts anew (environment overrides included). It runs
/// `qemu --version`, so it takes a few milliseconds: call it once, not per
/// instance.
pub fn host_info() -> HostInfo {
    HostInfo {
        cache_dir: cc_engine::paths::cache_dir(),
        accelerator: cc_engine::detect_accel()
            .map(accelerator_choice)
            .map_err(Into::into),
        qemu: qemu_info(),
        kernel: cc_engine::paths::kernel()
            .map(kernel_info)
            .map_err(Into::into),
        agent: cc_engine::paths::agent().map_err(Into::into),
        confinement: host_confinement(),
    }
}

/// The confinement an instance with default options gets on this host
/// (see SECURITY.md); its `gaps` say what the host cannot give and why.
pub fn host_confinement() -> Confinement {
    cc_engine::confine::expected(ConfineMode::BestEffort, false, true)
}

fn accelerator_choice(choice: cc_engine::AccelChoice) -> AcceleratorChoice {
    AcceleratorChoice {
        accelerator: match choice.accel {
            cc_engine::Accel::Kvm => Accelerator::Kvm,
            cc_engine::Accel::Tcg => Accelerator::Tcg,
        },
        reason: choice.reason,
    }
}

fn qemu_info() -> Result<QemuInfo> {
    Ok(QemuInfo {
        path: cc_engine::paths::qemu()?,
        version: cc_engine::qemu_version()?,
    })
}

fn kernel_info(path: PathBuf) -> KernelInfo {
    KernelInfo {
        hash: cc_engine::paths::kernel_hash(&path),
        path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engines_choice_keeps_its_reason() {
        let choice = accelerator_choice(cc_engine::AccelChoice {
            accel: cc_engine::Accel::Kvm,
            reason: "hardware".into(),
        });
        assert_eq!(choice.accelerator, Accelerator::Kvm);
        assert_eq!(choice.reason, "hardware");
        let tcg = accelerator_choice(cc_engine::AccelChoice {
            accel: cc_engine::Accel::Tcg,
            reason: String::new(),
        });
        assert_eq!(tcg.accelerator.to_string(), "tcg");
        assert_eq!(Accelerator::Kvm.to_string(), "kvm");
    }

    fn info(accelerator: Result<AcceleratorChoice>) -> HostInfo {
        HostInfo {
            cache_dir: PathBuf::from("/c"),
            accelerator,
            qemu: Err(crate::Error::InvalidArgument("no qemu".into())),
            kernel: Err(crate::Error::InvalidArgument("no kernel".into())),
            agent: Err(crate::Error::InvalidArgument("no agent".into())),
            confinement: host_confinement(),
        }
    }

    fn ready(accelerator: Accelerator) -> HostInfo {
        HostInfo {
            qemu: Ok(QemuInfo {
                path: PathBuf::from("/usr/bin/qemu"),
                version: "QEMU 9".into(),
            }),
            kernel: Ok(KernelInfo {
                path: PathBuf::from("/k"),
                hash: None,
            }),
            agent: Ok(PathBuf::from("/a")),
            ..info(Ok(AcceleratorChoice {
                accelerator,
                reason: String::new(),
            }))
        }
    }

    #[test]
    fn instances_run_under_kvm_or_tcg_and_only_kvm_is_hardware() {
        let kvm = ready(Accelerator::Kvm);
        assert!(kvm.hypervisor_available() && kvm.hardware_accelerated());
        assert_eq!(kvm.unavailable(), None);
        let tcg = ready(Accelerator::Tcg);
        assert!(tcg.hypervisor_available(), "TCG runs instances too");
        assert!(!tcg.hardware_accelerated());
        assert_eq!(tcg.unavailable(), None);
    }

    #[test]
    fn no_instance_runs_without_a_part_and_the_reason_names_it() {
        let forced = HostInfo {
            accelerator: Err(crate::Error::InvalidArgument("CC_ACCEL=kvm".into())),
            ..ready(Accelerator::Kvm)
        };
        assert!(!forced.hypervisor_available() && !forced.hardware_accelerated());
        assert!(forced.unavailable().unwrap().contains("CC_ACCEL=kvm"));
        let no_qemu = HostInfo {
            qemu: Err(crate::Error::InvalidArgument("no qemu".into())),
            ..ready(Accelerator::Tcg)
        };
        assert!(!no_qemu.hypervisor_available());
        assert!(no_qemu.unavailable().unwrap().contains("no qemu"));
        let no_kernel = HostInfo {
            kernel: Err(crate::Error::InvalidArgument("no kernel".into())),
            ..ready(Accelerator::Kvm)
        };
        assert!(!no_kernel.hypervisor_available() && no_kernel.hardware_accelerated());
        // Every part missing: each one named.
        let why = info(Err(crate::Error::InvalidArgument("CC_ACCEL".into())))
            .unavailable()
            .unwrap();
        for part in ["CC_ACCEL", "no qemu", "no kernel", "no agent"] {
            assert!(why.contains(part), "{why}");
        }
    }

    #[test]
    fn a_cached_kernel_is_known_by_its_build_hash() {
        let root = std::env::temp_dir().join(format!("cc-host-{}", std::process::id()));
        let build = root.join("0123abcd");
        std::fs::create_dir_all(&build).unwrap();
        std::fs::write(build.join("vmlinux"), b"").unwrap();
        std::os::unix::fs::symlink("0123abcd", root.join("current")).unwrap();
        let cached = kernel_info(root.join("current/vmlinux"));
        let elsewhere = kernel_info(root.join("missing/vmlinux"));
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(cached.hash.as_deref(), Some("0123abcd"));
        assert_eq!(cached.path, root.join("current/vmlinux"));
        assert_eq!(elsewhere.hash, None);
    }
}
