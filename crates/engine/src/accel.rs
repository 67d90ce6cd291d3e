//! Accelerator choice: KVM when the host can run ordinary guests with it,
//! TCG (software emulation) otherwise.

use std::fmt;

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The accelerator and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// What the host offers, read from the system.
#[derive(Debug, Clone, Default)]
struct HostFacts {
    cpu_has_vmx_or_svm: bool,
    kvm_vendor_module: bool,
    dev_kvm_writable: bool,
}

/// Chooses the accelerator from `CC_ACCEL` and the host's facts.
pub fn detect_accel() -> Result<AccelChoice, Error> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let facts = HostFacts {
        cpu_has_vmx_or_svm: cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm")),
        kvm_vendor_module: ["/sys/module/kvm_intel", "/sys/module/kvm_amd"]
            .iter()
            .any(|p| std::path::Path::new(p).exists()),
        dev_kvm_writable: dev_kvm_writable(),
    };
    decide(std::env::var("CC_ACCEL").ok().as_deref(), &facts)
}

fn dev_kvm_writable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn decide(forced: Option<&str>, facts: &HostFacts) -> Result<AccelChoice, Error> {
    let usable = kvm_usable(facts);
    match forced.map(str::trim).filter(|s| !s.is_empty()) {
        Some("tcg") => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "forced by CC_ACCEL=tcg".into(),
        }),
        Some("kvm") => match usable {
            Ok(()) => Ok(AccelChoice {
                accel: Accel::Kvm,
                reason: "forced by CC_ACCEL=kvm".into(),
            }),
            Err(why) => Err(Error::KvmUnavailable(why)),
        },
        Some(other) => Err(Error::BadAccel(other.to_string())),
        None => Ok(match usable {
            Ok(()) => AccelChoice {
                accel: Accel::Kvm,
                reason: "hardware virtualization with /dev/kvm".into(),
            },
            Err(why) => AccelChoice {
                accel: Accel::Tcg,
                reason: format!("software emulation: {why}"),
            },
        }),
    }
}

/// KVM runs ordinary guests only with the CPU's own virtualization (a
/// software-nested `/dev/kvm`, such as KVM-PVM, crashes them).
fn kvm_usable(f: &HostFacts) -> Result<(), String> {
    if !f.cpu_has_vmx_or_svm {
        return Err("the CPU has no vmx/svm flag".into());
    }
    if !f.kvm_vendor_module {
        return Err("neither kvm_intel nor kvm_amd is loaded".into());
    }
    if !f.dev_kvm_writable {
        return Err("/dev/kvm is missing or not writable by this user".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HW: HostFacts = HostFacts {
        cpu_has_vmx_or_svm: true,
        kvm_vendor_module: true,
        dev_kvm_writable: true,
    };

    #[test]
    fn hardware_kvm_is_chosen_by_default() {
        assert_eq!(decide(None, &HW).unwrap().accel, Accel::Kvm);
    }

    #[test]
    fn nested_or_missing_kvm_falls_back_to_tcg_with_a_reason() {
        let pvm = HostFacts {
            cpu_has_vmx_or_svm: false,
            ..HW
        };
        let c = decide(None, &pvm).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("vmx/svm"), "{}", c.reason);
        let no_dev = HostFacts {
            dev_kvm_writable: false,
            ..HW
        };
        assert!(decide(None, &no_dev).unwrap().reason.contains("/dev/kvm"));
    }

    #[test]
    fn cc_accel_forces_and_is_validated() {
        assert_eq!(decide(Some("tcg"), &HW).unwrap().accel, Accel::Tcg);
        assert!(matches!(
            decide(Some("kvm"), &HostFacts::default()),
            Err(Error::KvmUnavailable(_))
        ));
        assert!(matches!(decide(Some("hvf"), &HW), Err(Error::BadAccel(_))));
        assert_eq!(decide(Some(""), &HW).unwrap().accel, Accel::Kvm);
    }
}
