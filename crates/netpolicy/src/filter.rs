//! The per-frame filter: parses a guest frame and applies the policy.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::packet::{self, Frame};
use crate::policy::{Decision, NetworkPolicy, PolicyError, Transport};

/// How often the host's interface addresses are re-read, at most.
const HOST_ADDRS_TTL: Duration = Duration::from_secs(1);

/// What to do with one guest->stack frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it to the stack.
    Pass,
    /// Forget it.
    Drop,
    /// Forget it and send this frame back to the guest (a TCP RST or an
    /// ICMP port unreachable) so its socket fails at once.
    Refuse(Vec<u8>),
}

type AddrSource = Box<dyn FnMut() -> io::Result<Vec<Ipv4Addr>> + Send>;

/// Applies a [`NetworkPolicy`] to guest frames.
pub struct Filter {
    policy: NetworkPolicy,
    host_addrs: Vec<Ipv4Addr>,
    read_at: Option<Instant>,
    source: AddrSource,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filter")
            .field("policy", &self.policy)
            .field("host_addrs", &self.host_addrs)
            .finish_non_exhaustive()
    }
}

impl Filter {
    /// A filter that learns the host's addresses from its interfaces.
    pub fn new(policy: NetworkPolicy) -> Result<Filter, PolicyError> {
        Filter::with_host_addrs(policy, host_addrs)
    }

    /// A filter that asks `source` for the host's addresses (at most once
    /// a second, when a new flow is checked). When it fails, the last list
    /// is kept.
    pub fn with_host_addrs(
        policy: NetworkPolicy,
        source: impl FnMut() -> io::Result<Vec<Ipv4Addr>> + Send + 'static,
    ) -> Result<Filter, PolicyError> {
        policy.validate()?;
        Ok(Filter {
            policy,
            host_addrs: Vec::new(),
            read_at: None,
            source: Box::new(source),
        })
    }

    /// The policy applied.
    pub fn policy(&self) -> &NetworkPolicy {
        &self.policy
    }

    /// Classifies one Ethernet frame the guest sent.
    pub fn check(&mut self, frame: &[u8]) -> Verdict {
        let ip = match packet::parse(frame) {
            Frame::Arp => return Verdict::Pass,
            Frame::Unsupported => return Verdict::Drop,
            Frame::Ipv4(ip) => ip,
        };
        // Segments of an established TCP flow reuse the last address
        // list; anything else may open a flow, so may refresh it.
        if !matches!(ip.transport, Transport::Tcp(_)) || ip.is_syn() {
            self.refresh_host_addrs();
        }
        let is_host = self.host_addrs.contains(&ip.dst);
        match self.policy.decide(ip.dst, ip.transport, is_host) {
            Decision::Pass => Verdict::Pass,
            Decision::Refuse => match ip.transport {
                Transport::Tcp(_) if ip.is_syn() => Verdict::Refuse(ip.tcp_reset()),
                // No error replies to broadcast or multicast (RFC 1122).
                Transport::Udp(_) if !ip.dst.is_broadcast() && !ip.dst.is_multicast() => {
                    Verdict::Refuse(ip.port_unreachable())
                }
                _ => Verdict::Drop,
            },
        }
    }

    fn refresh_host_addrs(&mut self) {
        let now = Instant::now();
        if self
            .read_at
            .is_some_and(|t| now.duration_since(t) < HOST_ADDRS_TTL)
        {
            return;
        }
        match (self.source)() {
            Ok(addrs) => self.host_addrs = addrs,
            Err(e) => tracing::warn!(error = %e, "reading the host's addresses failed"),
        }
        self.read_at = Some(now);
    }
}

/// The IPv4 addresses of the host's interfaces (getifaddrs).
pub fn host_addrs() -> io::Result<Vec<Ipv4Addr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid out-pointer; on success it is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet
        // freed.
        let ifa = unsafe { &*cur };
        // SAFETY: a non-null `ifa_addr` points to a sockaddr whose family
        // says its real type; AF_INET means a sockaddr_in.
        unsafe {
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::packet::tests::*;
    use crate::policy::{Rule, DNS, GATEWAY};

    const OUTSIDE: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);
    const HOST_IF: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 7);

    fn filter(policy: NetworkPolicy) -> Filter {
        Filter::with_host_addrs(policy, || Ok(vec![HOST_IF])).unwrap()
    }

    fn refused(v: Verdict) -> Vec<u8> {
        match v {
            Verdict::Refuse(reply) => reply,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn arp_passes_ipv6_and_fragments_drop() {
        let mut f = filter(NetworkPolicy {
            deny: vec!["*".parse().unwrap()],
            ..NetworkPolicy::default()
        });
        assert_eq!(f.check(&arp()), Verdict::Pass);
        assert_eq!(f.check(&ipv6()), Verdict::Drop);
        let mut open = filter(NetworkPolicy::default());
        assert_eq!(open.check(&fragment(OUTSIDE, 0x2000)), Verdict::Drop);
        assert_eq!(open.check(&fragment(OUTSIDE, 0x4000)), Verdict::Pass);
    }

    #[test]
    fn dns_passes_outside_traffic_passes_by_default() {
        let mut f = filter(NetworkPolicy::default());
        assert_eq!(f.check(&udp(DNS, 53, b"query")), Verdict::Pass);
        assert_eq!(f.check(&syn(DNS, 53)), Verdict::Pass);
        assert_eq!(f.check(&syn(OUTSIDE, 443)), Verdict::Pass);
        assert_eq!(f.check(&udp(OUTSIDE, 123, b"")), Verdict::Pass);
        assert_eq!(f.check(&icmp_echo(OUTSIDE)), Verdict::Pass);
    }

    #[test]
    fn refused_syn_gets_a_reset() {
        let mut f = filter(NetworkPolicy::default());
        for dst in [
            GATEWAY,
            HOST_IF,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(169, 254, 169, 254),
        ] {
            let request = syn(dst, 5077);
            let reply = refused(f.check(&request));
            let tcp = check_reply(&request, &reply, 6);
            assert_eq!(tcp[13], 0x14, "RST|ACK to {dst}");
        }
    }

    #[test]
    fn refused_udp_gets_port_unreachable() {
        let mut f = filter(NetworkPolicy::default());
        let request = udp(GATEWAY, 5353, b"x");
        let icmp = check_reply(&request, &refused(f.check(&request)), 1);
        assert_eq!(&icmp[..2], &[3, 3]);
    }

    #[test]
    fn other_refused_traffic_is_dropped_silently() {
        let mut f = filter(NetworkPolicy::default());
        // Non-SYN TCP, ICMP, and UDP to broadcast or multicast.
        assert_eq!(f.check(&tcp(GATEWAY, 80, 0x10, b"data")), Verdict::Drop);
        assert_eq!(f.check(&tcp(GATEWAY, 80, 0x12, b"")), Verdict::Drop);
        assert_eq!(f.check(&icmp_echo(GATEWAY)), Verdict::Drop);
        assert_eq!(f.check(&udp(Ipv4Addr::BROADCAST, 67, b"")), Verdict::Drop);
        assert_eq!(
            f.check(&udp(Ipv4Addr::new(224, 0, 0, 251), 5353, b"")),
            Verdict::Drop
        );
        // Established flows to allowed places are not affected.
        assert_eq!(f.check(&tcp(OUTSIDE, 80, 0x10, b"data")), Verdict::Pass);
    }

    #[test]
    fn deny_and_allow_lists_apply_to_frames() {
        let mut f = filter(NetworkPolicy {
            allow_host: true,
            allow: vec!["1.1.1.1".parse::<Rule>().unwrap()],
            deny: vec!["10.0.2.2:22".parse().unwrap()],
        });
        assert!(matches!(f.check(&syn(GATEWAY, 22)), Verdict::Refuse(_)));
        assert_eq!(f.check(&syn(GATEWAY, 80)), Verdict::Pass);
        assert_eq!(f.check(&syn(HOST_IF, 80)), Verdict::Pass);
        assert_eq!(f.check(&syn(Ipv4Addr::new(1, 1, 1, 1), 80)), Verdict::Pass);
        assert!(matches!(f.check(&syn(OUTSIDE, 80)), Verdict::Refuse(_)));
    }

    #[test]
    fn malformed_frames_drop() {
        let mut f = filter(NetworkPolicy::default());
        assert_eq!(f.check(&[]), Verdict::Drop);
        assert_eq!(f.check(&[0; 13]), Verdict::Drop);
        let good = syn(GATEWAY, 80);
        for n in 0..good.len() {
            assert_eq!(f.check(&good[..n]), Verdict::Drop, "cut at {n}");
        }
    }

    #[test]
    fn invalid_policies_are_refused() {
        let policy = NetworkPolicy {
            allow: vec![Rule {
                addr: Ipv4Addr::new(10, 0, 0, 1),
                prefix: 8,
                ports: None,
            }],
            ..NetworkPolicy::default()
        };
        let e = Filter::new(policy).unwrap_err();
        assert!(e.to_string().contains("10.0.0.1/8"), "{e}");
    }

    #[test]
    fn host_addresses_are_reread_at_most_once_a_second_on_new_flows() {
        let addrs = Arc::new(Mutex::new(vec![HOST_IF]));
        let reads = Arc::new(AtomicUsize::new(0));
        let (a, r) = (addrs.clone(), reads.clone());
        let mut f = Filter::with_host_addrs(NetworkPolicy::default(), move || {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(a.lock().unwrap().clone())
        })
        .unwrap();
        let new_addr = Ipv4Addr::new(192, 168, 1, 8);
        assert_eq!(f.check(&syn(new_addr, 80)), Verdict::Pass);
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        *addrs.lock().unwrap() = vec![new_addr];
        // Within the second: the old list still applies.
        assert_eq!(f.check(&syn(new_addr, 80)), Verdict::Pass);
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        std::thread::sleep(HOST_ADDRS_TTL + Duration::from_millis(50));
        // Segments of established flows do not trigger a read...
        assert_eq!(f.check(&tcp(new_addr, 80, 0x10, b"")), Verdict::Pass);
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        // ...a new flow does, and sees the change.
        assert!(matches!(f.check(&syn(new_addr, 80)), Verdict::Refuse(_)));
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        assert_eq!(f.check(&tcp(new_addr, 80, 0x10, b"")), Verdict::Drop);
    }

    #[test]
    fn a_failed_read_keeps_the_last_list() {
        let mut first = true;
        let mut f = Filter::with_host_addrs(NetworkPolicy::default(), move || {
            if std::mem::take(&mut first) {
                Ok(vec![HOST_IF])
            } else {
                Err(io::Error::other("no"))
            }
        })
        .unwrap();
        assert!(matches!(f.check(&syn(HOST_IF, 80)), Verdict::Refuse(_)));
        f.read_at = None;
        assert!(matches!(f.check(&syn(HOST_IF, 80)), Verdict::Refuse(_)));
    }

    #[test]
    fn host_addrs_reads_the_interfaces() {
        let addrs = host_addrs().unwrap();
        assert!(addrs.iter().all(|a| !a.is_unspecified()), "{addrs:?}");
    }
}
