//! The guest's network backend. QEMU's own network namespace is empty; its
//! frames (4-byte length + Ethernet frame, `-netdev socket`) go over a
//! socketpair through the policy filter of `cc-netpolicy` to a relay: a
//! second, confined QEMU process with no machine (`-M none`) whose only
//! job is QEMU's user-mode stack (slirp), joined to the frame socket by an
//! emulated hub.
//!
//! The relay answers as the gateway (mapped to the host's loopback),
//! forwards DNS sent to [`GUEST_NETWORK`]'s `dns` to the host's resolver,
//! and otherwise connects out from the host, so by itself it reaches every
//! host address: the filter is what keeps the guest off the host's
//! services (and off link-local addresses), per the instance's
//! [`NetworkPolicy`]. The relay is confined like the VM's QEMU (seccomp,
//! no privileges, the sandbox uid, bubblewrap's namespaces) except that it
//! shares the host's network and sees the host's `resolv.conf`. It starts
//! with the first frame the filter lets out, so an instance that never
//! reaches out costs no relay; QEMU's virtio-net does not self-announce
//! after a restore, or its gratuitous ARPs would start every relay.
//!
//! (passt, Debian 12's other user-mode stack, was tried first: its build
//! there resets every guest TCP connection after about 24 s.)

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use cc_netpolicy::{Filter, NetworkPolicy, Proxy};

use crate::confine::{self, Creds};
use crate::{paths, Error, RunDir};

/// The guest's side of the user-mode network, as the core configures it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNetwork {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The stack answers here; it stands for the host itself.
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
    /// The user-mode stack's MTU.
    pub mtu: u32,
}

/// The addresses every guest gets.
pub const GUEST_NETWORK: GuestNetwork = GuestNetwork {
    address: Ipv4Addr::new(10, 0, 2, 15),
    prefix_len: 24,
    gateway: cc_netpolicy::GATEWAY,
    dns: cc_netpolicy::DNS,
    mtu: 1500,
};

/// The descriptor number the relay sees its frame socket as.
const RELAY_FD: i32 = 3;

/// Where bubblewrap writes the relay's host pid.
const INFO_FD: i32 = 4;

/// The relay's arguments: a hub joining the frame socket on
/// [`RELAY_FD`] and the user-mode stack, under QEMU's seccomp filter.
fn relay_args() -> Vec<String> {
    let g = GUEST_NETWORK;
    let net = Ipv4Addr::from(u32::from(g.address) & (u32::MAX << (32 - g.prefix_len)));
    [
        "-M",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-sandbox",
        confine::SANDBOX_ARG,
        "-netdev",
        &format!("socket,id=vm,fd={RELAY_FD}"),
        "-netdev",
        &format!(
            "user,id=out,ipv6=off,net={net}/{},host={},dns={}",
            g.prefix_len, g.gateway, g.dns
        ),
        "-netdev",
        "hubport,id=p0,hubid=0,netdev=vm",
        "-netdev",
        "hubport,id=p1,hubid=0,netdev=out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The filter for one VM, and the relay behind it once the guest has sent
/// something the filter lets out.
#[derive(Debug)]
pub(crate) struct Network {
    relay: Arc<Mutex<Option<Relay>>>,
    proxy: Option<Proxy>,
    /// QEMU's end, until it is handed over.
    qemu_end: Option<UnixStream>,
}

impl Network {
    /// Sets up the filter. The relay starts with the first frame the
    /// filter passes (its QEMU costs about 8 MiB and a start-up beside the
    /// VM's): an instance that never reaches out has none.
    pub(crate) fn start(
        run: &RunDir,
        creds: Creds,
        namespaces: bool,
        policy: &NetworkPolicy,
    ) -> Result<Network, Error> {
        let filter = Filter::new(policy.clone()).map_err(|e| Error::Policy(e.to_string()))?;
        let pair = || UnixStream::pair().map_err(Error::io("socketpair", run.path()));
        let (qemu_end, guest_side) = pair()?;
        let (stack_side, relay_end) = pair()?;
        let plan = RelayPlan {
            qemu: paths::qemu()?,
            creds,
            namespaces,
            log: crate::vm::create_private(&run.path().join("relay.log"))?,
            socket: relay_end.into(),
        };
        let relay = Arc::new(Mutex::new(None));
        let slot = relay.clone();
        let connect = move || {
            let started = plan.spawn()?;
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(started);
            Ok(())
        };
        let proxy = Proxy::start_lazy(guest_side, stack_side, filter, connect)
            .map_err(Error::io("start the network filter for", run.path()))?;
        Ok(Network {
            relay,
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

    /// Whether the guest is connected, as last set.
    pub(crate) fn is_enabled(&self) -> bool {
        self.proxy.as_ref().is_none_or(Proxy::is_enabled)
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
        // Joins the thread that may be starting the relay.
        drop(self.proxy.take());
        drop(
            self.relay
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

/// What starting the relay takes, prepared with the VM.
#[derive(Debug)]
struct RelayPlan {
    qemu: PathBuf,
    creds: Creds,
    namespaces: bool,
    log: File,
    /// The relay's end of the frame socket.
    socket: OwnedFd,
}

impl RelayPlan {
    fn spawn(self) -> std::io::Result<Relay> {
        let RelayPlan {
            qemu,
            creds,
            namespaces,
            log,
            socket,
        } = self;
        let mut fds = vec![(socket.as_raw_fd(), RELAY_FD)];
        let (info, mut cmd) = match (&confine::host_support().bwrap, namespaces) {
            (Some(bwrap), true) => {
                let (info_host, info_relay) = UnixStream::pair()?;
                let info_relay: OwnedFd = info_relay.into();
                fds.push((info_relay.as_raw_fd(), INFO_FD));
                let mut cmd = Command::new(bwrap);
                let files = confine::qemu_files(&qemu);
                cmd.args(confine::relay_bwrap_args(files, creds, INFO_FD))
                    .arg("--")
                    .arg(&qemu);
                (Some((info_host, info_relay)), cmd)
            }
            _ => (None, Command::new(&qemu)),
        };
        cmd.args(relay_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let mut plan = confine::ChildPlan::new(creds, fds, Some(libc::SIGKILL));
        // SAFETY: ChildPlan::apply runs between fork and exec and only makes
        // async-signal-safe system calls on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || plan.apply());
        }
        let (info_host, info_relay) = info.unzip();
        let (tx, rx) = mpsc::channel();
        // PR_SET_PDEATHSIG follows the thread that forks, so the thread
        // that spawns the relay is the one that waits for it.
        let supervisor = std::thread::Builder::new()
            .name("cc-net-relay".into())
            .spawn(move || {
                let spawned = cmd.spawn();
                drop((socket, info_relay));
                let mut child = match spawned {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                match crate::vm::pidfd_open(child.id()) {
                    Ok(pidfd) => {
                        let _ = tx.send(Ok(pidfd));
                    }
                    Err(e) => {
                        let _ = child.kill();
                        let _ = tx.send(Err(e));
                    }
                }
                let _ = child.wait();
            })?;
        let outer = match rx.recv() {
            Ok(Ok(pidfd)) => pidfd,
            Ok(Err(e)) => {
                let _ = supervisor.join();
                return Err(e);
            }
            Err(_) => {
                let _ = supervisor.join();
                return Err(std::io::Error::other("the network relay's thread ended"));
            }
        };
        // Bubblewrap reports the relay's host pid once the sandbox stands.
        let inner = info_host
            .and_then(crate::vm::read_child_pid)
            .and_then(|pid| crate::vm::pidfd_open(pid).ok());
        Ok(Relay {
            outer,
            inner,
            supervisor: Some(supervisor),
        })
    }
}

/// A running relay. Dropping it ends it.
#[derive(Debug)]
struct Relay {
    /// The spawned process: bubblewrap, or the relay itself.
    outer: OwnedFd,
    /// The relay itself, when `outer` is the bubblewrap around it.
    inner: Option<OwnedFd>,
    /// The thread that spawned the relay and waits for it.
    supervisor: Option<JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        crate::vm::kill_sandboxed(&self.outer, self.inner.as_ref());
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_is_a_machineless_hub_to_the_user_mode_stack() {
        let args = relay_args().join(" ");
        assert!(args.starts_with("-M none -nodefaults"), "{args}");
        assert!(args.contains("-sandbox on,obsolete=deny"), "{args}");
        assert!(args.contains("-netdev socket,id=vm,fd=3"), "{args}");
        assert!(
            args.contains(
                "-netdev user,id=out,ipv6=off,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3"
            ),
            "{args}"
        );
        assert!(args.contains("hubport,id=p0,hubid=0,netdev=vm"), "{args}");
        assert!(args.contains("hubport,id=p1,hubid=0,netdev=out"), "{args}");
    }
}
