//! A guest with nothing but a kernel and an initramfs: the baseline
//! `crumble bench` measures the engine against.
//!
//! Its command line is the one every VM gets ([`qemu_args`] of a
//! [`VmSpec`] without disks, shares or network), and QEMU starts the way
//! [`Vm::start`](crate::Vm::start) starts it with [`ConfineMode::Off`]:
//! the same descriptor plan, process setup and kernel parameters. So a
//! baseline differs from an instance only in what the engine adds (the
//! agent, the root filesystem, confinement, supervision), and no caller
//! has to know a QEMU flag to get one.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::cmdline::{fd_path, BootFiles, Wiring};
use crate::confine::{self, ChildPlan, ConfineMode};
use crate::{detect_accel, paths, qemu_args, Accel, Error, VmSpec, CONSOLE_LOG_MAX};

/// The descriptor numbers QEMU gets, in the order [`Vm::start`](crate::Vm::start)
/// hands them out.
const AGENT_FD: i32 = 3;
const QMP_FD: i32 = 4;
const CONSOLE_FD: i32 = 5;
const KERNEL_FD: i32 = 6;
const INITRD_FD: i32 = 7;

/// The virtio-serial port the command line declares, where an instance's
/// agent port is. The bare guest runs no agent; a benchmark of the channel
/// itself opens it as `/dev/vport0p1`.
const UNUSED_PORT: &str = "bare";

/// What to boot bare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BareSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub accel: Accel,
    pub memory_mb: u32,
    pub cpus: u32,
}

impl BareSpec {
    /// `initrd` under the kernel and accelerator an instance would get
    /// (`CC_KERNEL`/the data dir's, `CC_ACCEL`/the host's choice).
    pub fn new(initrd: PathBuf, memory_mb: u32, cpus: u32) -> Result<BareSpec, Error> {
        Ok(BareSpec {
            kernel: paths::kernel()?,
            initrd,
            accel: detect_accel()?.accel,
            memory_mb,
            cpus,
        })
    }

    /// QEMU's arguments: the engine's command line for this guest.
    pub fn qemu_args(&self) -> Vec<OsString> {
        let spec = VmSpec {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            memory_mb: self.memory_mb,
            cpus: self.cpus,
            accel: self.accel,
            disks: Vec::new(),
            shares: Vec::new(),
            network: None,
            kernel_params: crate::clock::guest_params(self.accel, &paths::cache_dir()),
            memory_file: None,
            named_ram: false,
            incoming: false,
            agent_port: UNUSED_PORT.into(),
            confine: ConfineMode::Off,
            console_log_max: CONSOLE_LOG_MAX,
        };
        let wiring = Wiring {
            agent_fd: AGENT_FD,
            qmp_fd: QMP_FD,
            console_fd: CONSOLE_FD,
            boot: Some(BootFiles {
                kernel: fd_path(KERNEL_FD),
                initrd: fd_path(INITRD_FD),
            }),
            memory_file: None,
            disk_fds: Vec::new(),
            backing_fds: Vec::new(),
            shares: Vec::new(),
            net_fd: None,
            seccomp: false,
        };
        qemu_args(&spec, &wiring)
    }

    /// Spawns QEMU and returns as soon as it runs; the guest's serial
    /// console is [`BareVm::console`]. QEMU gets `SIGKILL` when the thread
    /// that called this ends (as every QEMU of the engine does when its
    /// supervisor thread ends), so call it from a thread that outlives it.
    pub fn start(&self) -> Result<BareVm, Error> {
        let qemu = paths::qemu()?;
        let socketpair = || UnixStream::pair().map_err(Error::io("socketpair for", &qemu));
        // As an instance's, so the port is measured as instances get it.
        let (agent_host, agent_guest) =
            crate::vm::agent_socketpair().map_err(Error::io("socketpair for", &qemu))?;
        let (qmp_host, qmp_guest) = socketpair()?;
        let (console_host, console_guest) = socketpair()?;
        let open = |path: &PathBuf| File::open(path).map_err(Error::io("open", path));
        let inherited: Vec<(OwnedFd, i32)> = vec![
            (agent_guest.into(), AGENT_FD),
            (qmp_guest.into(), QMP_FD),
            (console_guest.into(), CONSOLE_FD),
            (open(&self.kernel)?.into(), KERNEL_FD),
            (open(&self.initrd)?.into(), INITRD_FD),
        ];
        let fds = inherited
            .iter()
            .map(|(fd, target)| (fd.as_raw_fd(), *target))
            .collect();
        let mut plan = ChildPlan::new(
            confine::creds(ConfineMode::Off, false),
            fds,
            Some(libc::SIGKILL),
        );
        // As `Vm::start` with confinement off: QEMU keeps the caller's rights.
        plan.no_new_privs = false;
        let mut cmd = Command::new(&qemu);
        cmd.args(self.qemu_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // As under the engine: terminal signals go to the caller, which
            // ends QEMU itself.
            .process_group(0);
        // SAFETY: ChildPlan::apply runs between fork and exec and only makes
        // async-signal-safe system calls on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || plan.apply());
        }
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::QemuMissing(qemu.display().to_string())
            } else {
                Error::io("spawn", &qemu)(e)
            }
        })?;
        // QEMU holds its own copies now; the console must end when it exits.
        drop(inherited);
        Ok(BareVm {
            child,
            console: console_host,
            port: agent_host,
            _qmp: qmp_host,
        })
    }
}

/// A running bare QEMU. Dropping it kills QEMU and reaps it.
#[derive(Debug)]
pub struct BareVm {
    child: Child,
    console: UnixStream,
    /// The host end of the virtio-serial port an agent would use.
    port: UnixStream,
    /// QMP, which the command line wires: held open and never used, so
    /// QEMU runs as it does under the engine.
    _qmp: UnixStream,
}

impl BareVm {
    /// The guest's serial console, both ways: what the guest writes comes
    /// out of it, what is written goes to the guest. It reads end of file
    /// once QEMU has exited.
    pub fn console(&self) -> &UnixStream {
        &self.console
    }

    /// The host end of the guest's virtio-serial port (`/dev/vport0p1` in
    /// the guest): the raw channel an instance's agent speaks over.
    pub fn port(&self) -> &UnixStream {
        &self.port
    }

    /// Sends `SIGKILL` to QEMU (nothing, once it has exited).
    pub fn kill(&mut self) {
        // Fails only when QEMU was already reaped, which is what was wanted.
        let _ = self.child.kill();
    }

    /// Waits for QEMU to exit, however long the guest runs ([`kill`](Self::kill)
    /// it first not to wait); returns its status and what it wrote on
    /// stderr (its reason, when it failed).
    pub fn wait(&mut self) -> Result<(ExitStatus, String), Error> {
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            // Read to the end first: QEMU blocked on a full pipe never exits.
            let _ = pipe.read_to_string(&mut stderr);
        }
        let status = self.child.wait().map_err(Error::io("wait for", "qemu"))?;
        Ok((status, stderr))
    }
}

impl Drop for BareVm {
    fn drop(&mut self) {
        self.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(accel: Accel) -> BareSpec {
        BareSpec {
            kernel: PathBuf::from("/k/vmlinux"),
            initrd: PathBuf::from("/b/bare.cpio"),
            accel,
            memory_mb: 256,
            cpus: 1,
        }
    }

    fn joined(spec: &BareSpec) -> String {
        spec.qemu_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_engines_command_line_without_disks_network_or_confinement() {
        let cmd = joined(&spec(Accel::Tcg));
        assert!(
            cmd.starts_with("-accel tcg -cpu max,-erms -M microvm,acpi=off -m 256 -smp 1"),
            "{cmd}"
        );
        assert!(
            cmd.contains(&format!("-append {}", crate::KERNEL_PARAMS)),
            "{cmd}"
        );
        assert!(cmd.contains("-kernel /proc/self/fd/6 -initrd /proc/self/fd/7"));
        assert!(cmd.contains("-chardev socket,id=con,fd=5 -serial chardev:con"));
        for absent in ["-sandbox", "-drive", "-netdev", "-fsdev", "/k/", "/b/"] {
            assert!(!cmd.contains(absent), "{absent} in {cmd}");
        }
        assert!(joined(&spec(Accel::Kvm)).starts_with("-accel kvm -cpu host"));
    }
}
