//! The guest network policy of crumblecracker and the frame filter that
//! enforces it.
//!
//! Guest egress travels as length-prefixed Ethernet frames from QEMU's
//! stream netdev to a user-mode stack (the engine's slirp relay) running outside QEMU's
//! sandbox. The stack can reach the host itself: it maps the gateway
//! 10.0.2.2 to the host's loopback and connects out from the host, so the
//! host's interface addresses are reachable through it. The [`Proxy`]
//! between the two is the single point where the [`NetworkPolicy`] holds.
//!
//! This crate owns the policy types, their text form and the filter. It
//! does not start QEMU or the stack and knows nothing of the agent
//! protocol; whoever starts them hands it the two connected sockets.
//!
//! # Decision order
//!
//! Each IPv4 frame the guest sends is judged by its destination address,
//! protocol and (for TCP and UDP) destination port; the first step that
//! applies decides:
//!
//! 1. ARP passes.
//! 2. DNS to [`DNS`] (10.0.2.3) port 53, UDP or TCP, passes.
//! 3. A `deny` rule that matches refuses it.
//! 4. The host, meaning the gateway [`GATEWAY`], the DNS address on any
//!    other port, 127.0.0.0/8 and every IPv4 address of the host's
//!    interfaces, passes only with `allow_host` (no `allow` rule opens it).
//!    The interface addresses are re-read at most once a second, when a
//!    new flow (a TCP SYN, any UDP or other datagram) is checked, so
//!    addresses the host gains later are covered.
//! 5. When `allow` is non-empty, only destinations it matches pass. An
//!    explicit allow may re-open the built-in denials of the next step.
//! 6. [`BUILTIN_DENIED`] is refused: 169.254.0.0/16 (link-local, cloud
//!    metadata), 0.0.0.0/8, 224.0.0.0/4 (multicast), 240.0.0.0/4 (reserved,
//!    with the broadcast address).
//! 7. Everything else passes.
//!
//! A refused TCP SYN is answered with a RST so the guest's `connect` fails
//! at once ("Connection refused"); refused unicast UDP gets an ICMP port
//! unreachable. Other refused traffic (later TCP segments, ICMP, broadcast
//! and multicast) is dropped silently.
//!
//! The guest is IPv4-only: IPv6 frames are dropped, and so are IPv4
//! fragments, since a fragment after the first carries no port to judge
//! (Linux sets don't-fragment on TCP; UDP datagrams must fit the MTU).
//! Malformed or truncated frames are dropped; none makes the filter panic.
//!
//! # Rules
//!
//! `ADDR[/PREFIX][:PORT[-PORT]]`, with `*` for `0.0.0.0/0`: `10.0.0.0/8`,
//! `1.2.3.4` (a /32), `1.2.3.4:443`, `10.0.0.0/8:8000-8999`, `*:53`. See
//! [`Rule`].

mod filter;
mod packet;
mod policy;
mod proxy;

pub use filter::{host_addrs, Filter, Verdict};
pub use policy::{
    Decision, NetworkPolicy, PolicyError, Rule, RuleProblem, Transport, BUILTIN_DENIED, DNS,
    GATEWAY,
};
pub use proxy::{FrameReader, Proxy, ProxyError, MAX_FRAME};
