//! Policy types, their text form and the decision on one destination.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The gateway address of the guest's network; the user-mode stack maps
/// it to the host's loopback.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest's nameserver; the stack forwards DNS sent there to the
/// host's resolver.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// Destinations refused unless an `allow` rule names them: link-local
/// (cloud metadata services live at 169.254.169.254), "this network",
/// multicast, and the reserved block with the limited broadcast address.
pub const BUILTIN_DENIED: [Rule; 4] = [
    Rule::net(Ipv4Addr::new(169, 254, 0, 0), 16),
    Rule::net(Ipv4Addr::new(0, 0, 0, 0), 8),
    Rule::net(Ipv4Addr::new(224, 0, 0, 0), 4),
    Rule::net(Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// What the guest may reach. The default denies the host and allows every
/// other destination except [`BUILTIN_DENIED`]; see the crate docs for the
/// order rules are applied in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Whether the guest may reach the host: the gateway address (the
    /// host's loopback), 127.0.0.0/8 and the host's interface addresses.
    pub allow_host: bool,
    /// When non-empty, only destinations matching one of these pass.
    pub allow: Vec<Rule>,
    /// Destinations refused whatever else says.
    pub deny: Vec<Rule>,
}

/// One IPv4 network, optionally narrowed to a port or port range.
///
/// Text form: `ADDR[/PREFIX][:PORT[-PORT]]`, where `*` stands for
/// `0.0.0.0/0`: `10.0.0.0/8`, `1.2.3.4` (a /32), `1.2.3.4:443`,
/// `10.0.0.0/8:8000-8999`, `*:53`. The address may not have bits set past
/// the prefix. A rule with a port matches TCP and UDP to that port only; a
/// rule without one matches every protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
    /// Inclusive port range, `None` for every port and protocol.
    pub ports: Option<(u16, u16)>,
}

/// Why a rule or a policy was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("network rule {rule:?}: {problem}")]
    Rule { rule: String, problem: RuleProblem },
    #[error("unknown network policy key {0:?} (known: allow_host, allow, deny)")]
    UnknownKey(String),
    #[error("network policy allow_host {0:?} is not true or false")]
    NotBool(String),
}

/// What is wrong with a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleProblem {
    #[error("empty")]
    Empty,
    #[error("{0:?} is not an IPv4 address")]
    BadAddress(String),
    #[error("prefix {0:?} is not a number in 0..=32")]
    BadPrefix(String),
    #[error("host bits set past the prefix (the network is {0})")]
    HostBits(String),
    #[error("port {0:?} is not a number in 1..=65535")]
    BadPort(String),
    #[error("port range {0}-{1} is reversed")]
    ReversedRange(u16, u16),
}

impl Rule {
    const fn net(addr: Ipv4Addr, prefix: u8) -> Rule {
        Rule {
            addr,
            prefix,
            ports: None,
        }
    }

    fn mask(&self) -> u32 {
        match self.prefix {
            0 => 0,
            p => u32::MAX << (32 - u32::from(p.min(32))),
        }
    }

    /// Whether `addr` is inside the network (ports aside).
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.addr)
    }

    /// Whether traffic to `dst` matches: `port` is the destination port of
    /// TCP or UDP, `None` for other protocols.
    pub fn matches(&self, dst: Ipv4Addr, port: Option<u16>) -> bool {
        self.contains(dst)
            && match (self.ports, port) {
                (None, _) => true,
                (Some((lo, hi)), Some(p)) => (lo..=hi).contains(&p),
                (Some(_), None) => false,
            }
    }

    /// Checks a rule built from its fields; parsing checks the same.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let err = |problem| PolicyError::Rule {
            rule: self.to_string(),
            problem,
        };
        if self.prefix > 32 {
            return Err(err(RuleProblem::BadPrefix(self.prefix.to_string())));
        }
        let network = Ipv4Addr::from(u32::from(self.addr) & self.mask());
        if network != self.addr {
            return Err(err(RuleProblem::HostBits(format!(
                "{network}/{}",
                self.prefix
            ))));
        }
        match self.ports {
            Some((0, _)) | Some((_, 0)) => Err(err(RuleProblem::BadPort("0".into()))),
            Some((lo, hi)) if lo > hi => Err(err(RuleProblem::ReversedRange(lo, hi))),
            _ => Ok(()),
        }
    }
}

impl FromStr for Rule {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Rule, PolicyError> {
        let err = |problem| PolicyError::Rule {
            rule: s.to_string(),
            problem,
        };
        if s.trim().is_empty() {
            return Err(err(RuleProblem::Empty));
        }
        let (net, ports) = match s.split_once(':') {
            Some((net, ports)) => (net, Some(ports)),
            None => (s, None),
        };
        let (addr, prefix) = match net {
            "*" => (Ipv4Addr::UNSPECIFIED, 0),
            _ => {
                let (addr, prefix) = match net.split_once('/') {
                    Some((a, p)) => (a, Some(p)),
                    None => (net, None),
                };
                let addr = addr
                    .parse::<Ipv4Addr>()
                    .map_err(|_| err(RuleProblem::BadAddress(addr.to_string())))?;
                let prefix = match prefix {
                    None => 32,
                    Some(p) => p
                        .parse::<u8>()
                        .ok()
                        .filter(|n| *n <= 32 && !p.starts_with('+'))
                        .ok_or_else(|| err(RuleProblem::BadPrefix(p.to_string())))?,
                };
                (addr, prefix)
            }
        };
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n != 0 && !p.starts_with('+'))
                .ok_or_else(|| err(RuleProblem::BadPort(p.to_string())))
        };
        let ports = match ports {
            None => None,
            Some(range) => Some(match range.split_once('-') {
                Some((lo, hi)) => (port(lo)?, port(hi)?),
                None => {
                    let p = port(range)?;
                    (p, p)
                }
            }),
        };
        let rule = Rule {
            addr,
            prefix,
            ports,
        };
        rule.validate().map_err(|e| match e {
            PolicyError::Rule { problem, .. } => err(problem),
            other => other,
        })?;
        Ok(rule)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix {
            0 if self.addr.is_unspecified() => f.write_str("*")?,
            32 => write!(f, "{}", self.addr)?,
            p => write!(f, "{}/{p}", self.addr)?,
        }
        match self.ports {
            None => Ok(()),
            Some((lo, hi)) if lo == hi => write!(f, ":{lo}"),
            Some((lo, hi)) => write!(f, ":{lo}-{hi}"),
        }
    }
}

/// The outcome of the policy for one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pass,
    Refuse,
}

/// A transport protocol, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp(u16),
    Udp(u16),
    /// ICMP or any other protocol: no port.
    Other,
}

impl Transport {
    fn port(self) -> Option<u16> {
        match self {
            Transport::Tcp(p) | Transport::Udp(p) => Some(p),
            Transport::Other => None,
        }
    }
}

impl NetworkPolicy {
    /// Builds a policy from key/value pairs: `allow_host` (`true` or
    /// `false`), and `allow` and `deny`, one rule per pair, repeatable.
    /// Unknown keys are refused, naming the key.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<NetworkPolicy, PolicyError> {
        let mut policy = NetworkPolicy::default();
        for (key, value) in pairs {
            match key {
                "allow_host" => {
                    policy.allow_host = match value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        other => return Err(PolicyError::NotBool(other.into())),
                    }
                }
                "allow" => policy.allow.push(value.parse()?),
                "deny" => policy.deny.push(value.parse()?),
                other => return Err(PolicyError::UnknownKey(other.into())),
            }
        }
        Ok(policy)
    }

    /// Checks every rule (a policy built field by field may hold rules
    /// that parsing would have refused).
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.allow
            .iter()
            .chain(&self.deny)
            .try_for_each(Rule::validate)
    }

    /// The decision for traffic to `dst`; `is_host` says whether `dst` is
    /// one of the host's own interface addresses. The order is the one the
    /// crate docs give.
    pub fn decide(&self, dst: Ipv4Addr, transport: Transport, is_host: bool) -> Decision {
        let port = transport.port();
        let pass = |yes: bool| {
            if yes {
                Decision::Pass
            } else {
                Decision::Refuse
            }
        };
        if dst == DNS && matches!(transport, Transport::Tcp(53) | Transport::Udp(53)) {
            return Decision::Pass;
        }
        if self.deny.iter().any(|r| r.matches(dst, port)) {
            return Decision::Refuse;
        }
        if is_host || dst == GATEWAY || dst == DNS || dst.is_loopback() {
            return pass(self.allow_host);
        }
        if !self.allow.is_empty() {
            return pass(self.allow.iter().any(|r| r.matches(dst, port)));
        }
        pass(!BUILTIN_DENIED.iter().any(|r| r.contains(dst)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{Pass, Refuse};
    use Transport::{Other, Tcp, Udp};

    fn rule(s: &str) -> Rule {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_documented_forms() {
        let cases = [
            ("10.0.0.0/8", Rule::net(Ipv4Addr::new(10, 0, 0, 0), 8)),
            ("1.2.3.4", Rule::net(Ipv4Addr::new(1, 2, 3, 4), 32)),
            (
                "1.2.3.4:443",
                Rule {
                    ports: Some((443, 443)),
                    ..Rule::net(Ipv4Addr::new(1, 2, 3, 4), 32)
                },
            ),
            (
                "10.0.0.0/8:8000-8999",
                Rule {
                    ports: Some((8000, 8999)),
                    ..Rule::net(Ipv4Addr::new(10, 0, 0, 0), 8)
                },
            ),
            (
                "*:53",
                Rule {
                    ports: Some((53, 53)),
                    ..Rule::net(Ipv4Addr::UNSPECIFIED, 0)
                },
            ),
            ("0.0.0.0/0", Rule::net(Ipv4Addr::UNSPECIFIED, 0)),
            ("*", Rule::net(Ipv4Addr::UNSPECIFIED, 0)),
        ];
        for (text, want) in cases {
            assert_eq!(rule(text), want, "{text}");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "10.0.0.0/8",
            "1.2.3.4",
            "1.2.3.4:443",
            "10.0.0.0/8:8000-8999",
            "*:53",
            "*",
            "0.0.0.0/0:1-65535",
            "192.168.1.0/24:1",
        ] {
            let r = rule(text);
            assert_eq!(rule(&r.to_string()), r, "{text}");
        }
        assert_eq!(rule("0.0.0.0/0:53").to_string(), "*:53");
        assert_eq!(rule("1.2.3.4/32").to_string(), "1.2.3.4");
    }

    #[test]
    fn bad_rules_name_the_value_and_the_problem() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("10.0.0/8", "\"10.0.0\" is not an IPv4 address"),
            ("300.1.1.1", "not an IPv4 address"),
            ("::1", "not an IPv4 address"),
            ("example.com", "not an IPv4 address"),
            ("10.0.0.0/33", "prefix \"33\""),
            ("10.0.0.0/", "prefix \"\""),
            ("10.0.0.0/x", "prefix \"x\""),
            ("10.0.0.0/+8", "prefix \"+8\""),
            (
                "10.0.0.1/8",
                "host bits set past the prefix (the network is 10.0.0.0/8)",
            ),
            ("1.2.3.4:0", "port \"0\""),
            ("1.2.3.4:65536", "port \"65536\""),
            ("1.2.3.4:", "port \"\""),
            ("1.2.3.4:-5", "port \"\""),
            ("1.2.3.4:http", "port \"http\""),
            ("1.2.3.4:9000-8000", "port range 9000-8000 is reversed"),
            ("1.2.3.4:1-2-3", "port \"2-3\""),
        ];
        for (text, problem) in cases {
            let e = text.parse::<Rule>().unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{text:?}")) && msg.contains(problem),
                "{text}: {msg}"
            );
        }
    }

    #[test]
    fn validate_checks_rules_built_from_fields() {
        let bad = [
            Rule::net(Ipv4Addr::new(10, 0, 0, 0), 33),
            Rule::net(Ipv4Addr::new(10, 0, 0, 1), 24),
            Rule {
                ports: Some((0, 10)),
                ..Rule::net(Ipv4Addr::new(10, 0, 0, 0), 8)
            },
            Rule {
                ports: Some((10, 9)),
                ..Rule::net(Ipv4Addr::new(10, 0, 0, 0), 8)
            },
        ];
        for r in bad {
            let policy = NetworkPolicy {
                deny: vec![r],
                ..NetworkPolicy::default()
            };
            assert!(policy.validate().is_err(), "{r:?}");
        }
        let good = NetworkPolicy {
            allow: vec![rule("10.0.0.0/8:1-2")],
            ..NetworkPolicy::default()
        };
        assert_eq!(good.validate(), Ok(()));
    }

    #[test]
    fn from_pairs_builds_and_refuses_unknown_keys() {
        let p = NetworkPolicy::from_pairs([
            ("allow_host", "true"),
            ("allow", "10.0.0.0/8"),
            ("allow", "1.2.3.4:443"),
            ("deny", "10.1.0.0/16"),
        ])
        .unwrap();
        assert!(p.allow_host);
        assert_eq!(p.allow, [rule("10.0.0.0/8"), rule("1.2.3.4:443")]);
        assert_eq!(p.deny, [rule("10.1.0.0/16")]);
        let e = NetworkPolicy::from_pairs([("alow", "1.2.3.4")]).unwrap_err();
        assert_eq!(e, PolicyError::UnknownKey("alow".into()));
        assert!(e.to_string().contains("\"alow\""));
        let e = NetworkPolicy::from_pairs([("allow_host", "yes")]).unwrap_err();
        assert!(e.to_string().contains("\"yes\""), "{e}");
        let e = NetworkPolicy::from_pairs([("deny", "1.2.3.4:99999")]).unwrap_err();
        assert!(e.to_string().contains("\"1.2.3.4:99999\""), "{e}");
    }

    const OUTSIDE: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);

    #[test]
    fn dns_passes_even_when_everything_is_denied() {
        let p = NetworkPolicy {
            deny: vec![rule("*")],
            ..NetworkPolicy::default()
        };
        assert_eq!(p.decide(DNS, Udp(53), false), Pass);
        assert_eq!(p.decide(DNS, Tcp(53), false), Pass);
        // Only DNS: other ports of the DNS address are the host's.
        let open = NetworkPolicy::default();
        assert_eq!(open.decide(DNS, Tcp(22), false), Refuse);
        assert_eq!(open.decide(DNS, Other, false), Refuse);
    }

    #[test]
    fn deny_wins_over_allow_and_allow_host() {
        let p = NetworkPolicy {
            allow_host: true,
            allow: vec![rule("93.184.0.0/16")],
            deny: vec![rule("93.184.216.34:443"), rule("10.0.2.2")],
        };
        assert_eq!(p.decide(OUTSIDE, Tcp(443), false), Refuse);
        assert_eq!(p.decide(OUTSIDE, Tcp(80), false), Pass);
        assert_eq!(p.decide(GATEWAY, Tcp(80), false), Refuse);
        // A port rule does not match portless protocols.
        assert_eq!(p.decide(OUTSIDE, Other, false), Pass);
    }

    #[test]
    fn the_host_passes_only_with_allow_host() {
        let host_addr = Ipv4Addr::new(192, 168, 1, 7);
        let denied = NetworkPolicy::default();
        // An allow rule covering the host does not open it.
        let allow_all = NetworkPolicy {
            allow: vec![rule("*")],
            ..NetworkPolicy::default()
        };
        let allowed = NetworkPolicy {
            allow_host: true,
            // allow_host opens the host even when `allow` does not list it.
            allow: vec![rule("1.1.1.1")],
            ..NetworkPolicy::default()
        };
        for (dst, is_host) in [
            (GATEWAY, false),
            (Ipv4Addr::LOCALHOST, false),
            (Ipv4Addr::new(127, 1, 2, 3), false),
            (host_addr, true),
        ] {
            for t in [Tcp(80), Udp(5353), Other] {
                assert_eq!(denied.decide(dst, t, is_host), Refuse, "{dst}");
                assert_eq!(allow_all.decide(dst, t, is_host), Refuse, "{dst}");
                assert_eq!(allowed.decide(dst, t, is_host), Pass, "{dst}");
            }
        }
        // The same address is just another destination when it is not the
        // host's.
        assert_eq!(denied.decide(host_addr, Tcp(80), false), Pass);
    }

    #[test]
    fn a_non_empty_allow_list_passes_only_its_matches() {
        let p = NetworkPolicy {
            allow: vec![rule("10.0.0.0/8:8000-8999"), rule("1.1.1.1")],
            ..NetworkPolicy::default()
        };
        let ten = Ipv4Addr::new(10, 9, 8, 7);
        assert_eq!(p.decide(ten, Tcp(8000), false), Pass);
        assert_eq!(p.decide(ten, Udp(8999), false), Pass);
        assert_eq!(p.decide(ten, Tcp(9000), false), Refuse);
        assert_eq!(p.decide(ten, Other, false), Refuse);
        assert_eq!(p.decide(Ipv4Addr::new(1, 1, 1, 1), Other, false), Pass);
        assert_eq!(p.decide(OUTSIDE, Tcp(80), false), Refuse);
    }

    #[test]
    fn an_explicit_allow_reopens_builtin_denials() {
        let metadata = Ipv4Addr::new(169, 254, 169, 254);
        let p = NetworkPolicy {
            allow: vec![rule("169.254.169.254:80")],
            ..NetworkPolicy::default()
        };
        assert_eq!(p.decide(metadata, Tcp(80), false), Pass);
        assert_eq!(p.decide(metadata, Tcp(81), false), Refuse);
    }

    #[test]
    fn builtin_denials_and_the_default_pass() {
        let p = NetworkPolicy::default();
        for dst in [
            Ipv4Addr::new(169, 254, 169, 254),
            Ipv4Addr::new(0, 1, 2, 3),
            Ipv4Addr::new(224, 0, 0, 251),
            Ipv4Addr::new(239, 255, 255, 250),
            Ipv4Addr::new(240, 0, 0, 1),
            Ipv4Addr::BROADCAST,
        ] {
            assert_eq!(p.decide(dst, Udp(9), false), Refuse, "{dst}");
        }
        for dst in [
            OUTSIDE,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(172, 16, 0, 1),
        ] {
            assert_eq!(p.decide(dst, Tcp(80), false), Pass, "{dst}");
        }
    }
}
