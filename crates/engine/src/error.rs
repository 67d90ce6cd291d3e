use std::io;
use std::path::PathBuf;

/// Engine failures; each names its cause and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found: install QEMU (apt-get install qemu-system-x86) or set CC_QEMU")]
    QemuMissing(String),
    #[error("guest kernel not found at {}: run scripts/setup.sh, or set CC_KERNEL or CC_DATA_DIR", .0.display())]
    KernelMissing(PathBuf),
    #[error("guest agent not found at {}: run scripts/setup.sh, or set CC_AGENT or CC_DATA_DIR", .0.display())]
    AgentMissing(PathBuf),
    #[error("CC_ACCEL={0}: expected kvm or tcg")]
    BadAccel(String),
    #[error("KVM requested by CC_ACCEL=kvm but unusable here: {0}")]
    KvmUnavailable(String),
    #[error("QEMU exited before the guest connected ({status})\n{log}")]
    QemuDied { status: String, log: String },
    #[error("the guest did not connect within {secs} s\n{log}")]
    ConnectTimeout { secs: u64, log: String },
    #[error("QEMU cannot be fully confined here: {0}")]
    Unconfined(String),
    #[error("{} must be readable by all users for the sandboxed QEMU (chmod a+r)", .0.display())]
    Unreadable(PathBuf),
    #[error("network policy: {0}")]
    Policy(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("this engine cannot {0}")]
    Unsupported(&'static str),
    #[error("warm-start template: {0}")]
    Template(String),
    /// A park directory that cannot be restored here (not one, or made
    /// with another kernel, agent, QEMU or guest shape).
    #[error("parked instance: {0}")]
    Parked(String),
    #[error("{tool} not found: apt-get install {package}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}
