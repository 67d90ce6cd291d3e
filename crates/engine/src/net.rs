//! The guest's network backend: passt, Debian's user-mode network stack,
//! run outside QEMU's sandbox (QEMU's own network namespace is empty),
//! behind the policy filter of `cc-netpolicy`. QEMU, the filter and passt
//! are joined by socketpairs carrying length-prefixed Ethernet frames.
//!
//! passt answers as the gateway (mapped to the host's loopback), forwards
//! DNS sent to [`GUEST_NETWORK`]'s `dns`, and otherwise connects out from
//! the host, so its own view reaches every host address: the filter is
//! what keeps the guest off the host's services (and off link-local
//! addresses), per the instance's [`NetworkPolicy`]. passt confines
//! itself: its own namespaces and seccomp filter, and, under a root
//! caller, the same unprivileged uid as QEMU.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use cc_netpolicy::{Filter, NetworkPolicy, Proxy};

use crate::confine::{self, Creds};
use crate::{Error, RunDir};

/// The guest's side of the user-mode network, as the core configures it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNetwork {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The stack answers here; it stands for the host itself.
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
    /// passt's frames are up to 64 KiB: a large MTU carries bulk data in
    /// few frames (≈2.5× the throughput of 1500 here).
    pub mtu: u32,
}

/// The addresses every guest gets.
pub const GUEST_NETWORK: GuestNetwork = GuestNetwork {
    address: Ipv4Addr::new(10, 0, 2, 15),
    prefix_len: 24,
    gateway: cc_netpolicy::GATEWAY,
    dns: cc_netpolicy::DNS,
    mtu: 65520,
};

/// A running passt for one VM.
#[derive(Debug)]
pub(crate) struct Network {
    passt: Child,
    proxy: Option<Proxy>,
    /// QEMU's end, until it is handed over.
    qemu_end: Option<UnixStream>,
}

impl Network {
    pub(crate) fn start(
        run: &RunDir,
        creds: Creds,
        policy: &NetworkPolicy,
    ) -> Result<Network, Error> {
        let filter = Filter::new(policy.clone()).map_err(|e| Error::Policy(e.to_string()))?;
        let passt = confine::host_support()
            .passt
            .clone()
            .ok_or(Error::PasstMissing)?;
        let pair = || UnixStream::pair().map_err(Error::io("socketpair", run.path()));
        let (qemu_end, guest_side) = pair()?;
        let (stack_side, passt_end) = pair()?;
        let log = run.path().join("passt.log");
        let stderr = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&log)
            .map_err(Error::io("create", &log))?;
        let g = GUEST_NETWORK;
        let mut cmd = Command::new(&passt);
        cmd.args([
            "--foreground",
            "--quiet",
            "--stderr",
            "--ipv4-only",
            "--fd",
            "3",
        ])
        .args(["--address", &g.address.to_string()])
        .args(["--netmask", &g.prefix_len.to_string()])
        .args(["--gateway", &g.gateway.to_string()])
        .args(["--dns-forward", &g.dns.to_string()])
        .args(["--mtu", &g.mtu.to_string()])
        // No port of the host is forwarded into the guest.
        .args(["-t", "none", "-u", "none"]);
        if creds.switch {
            cmd.args(["--runas", &format!("{}:{}", creds.uid, creds.gid)]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        let fd: OwnedFd = passt_end.into();
        // passt drops privileges itself: it starts with the caller's.
        let caller = Creds {
            switch: false,
            drop_root_caps: false,
            ..creds
        };
        let mut plan =
            confine::ChildPlan::new(caller, vec![(fd.as_raw_fd(), 3)], Some(libc::SIGKILL));
        // SAFETY: ChildPlan::apply runs between fork and exec and only makes
        // async-signal-safe system calls on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || plan.apply());
        }
        let mut child = cmd.spawn().map_err(Error::io("start", &passt))?;
        drop(fd);
        let proxy = match Proxy::start(guest_side, stack_side, filter) {
            Ok(p) => p,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::io("start the network filter for", run.path())(e));
            }
        };
        Ok(Network {
            passt: child,
            proxy: Some(proxy),
            qemu_end: Some(qemu_end),
        })
    }

    /// Connects (`true`) or disconnects the guest: while disconnected no
    /// frame passes either way.
    pub(crate) fn set_enabled(&self, enabled: bool) {
        if let Some(p) = &self.proxy {
            p.set_enabled(enabled);
        }
    }

    /// QEMU's end of the frame socket.
    pub(crate) fn qemu_end(&self) -> Result<OwnedFd, Error> {
        let end = self
            .qemu_end
            .as_ref()
            .ok_or_else(|| Error::Qmp("network already attached".into()))?;
        end.try_clone()
            .map(OwnedFd::from)
            .map_err(|e| Error::Qmp(format!("network socket: {e}")))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        drop(self.qemu_end.take());
        drop(self.proxy.take());
        let _ = self.passt.kill();
        let _ = self.passt.wait();
    }
}
