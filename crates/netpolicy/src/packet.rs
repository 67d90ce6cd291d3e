//! Just enough Ethernet/IPv4/TCP/UDP/ICMP to classify a guest frame and
//! build the replies that refuse it. Every read is bounds-checked: frames
//! come from an untrusted guest.

use std::net::Ipv4Addr;

use crate::policy::Transport;

pub(crate) const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
pub(crate) const ETHERTYPE_ARP: u16 = 0x0806;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What a frame is, as far as the filter cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    Arp,
    Ipv4(Ipv4<'a>),
    /// IPv6, fragments, malformed or truncated frames, other ethertypes.
    Unsupported,
}

/// A parsed, unfragmented IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ipv4<'a> {
    pub(crate) frame: &'a [u8],
    /// The IP header (options included).
    pub(crate) header: &'a [u8],
    /// The IP payload, cut to the header's total length.
    pub(crate) payload: &'a [u8],
    pub(crate) dst: Ipv4Addr,
    pub(crate) transport: Transport,
    /// For TCP: the flags byte.
    tcp_flags: u8,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(crate) fn parse(frame: &[u8]) -> Frame<'_> {
    parse_inner(frame).unwrap_or(Frame::Unsupported)
}

fn parse_inner(frame: &[u8]) -> Option<Frame<'_>> {
    match be16(frame, 12)? {
        ETHERTYPE_ARP => return Some(Frame::Arp),
        ETHERTYPE_IPV4 => {}
        _ => return None,
    }
    let ip = frame.get(ETH_HEADER..)?;
    let first = *ip.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    let total = usize::from(be16(ip, 2)?);
    if first >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    // More-fragments set or a non-zero offset: a fragment.
    if be16(ip, 6)? & 0x3fff != 0 {
        return None;
    }
    let (header, payload) = (&ip[..ihl], &ip[ihl..total]);
    let dst = Ipv4Addr::from(be32(ip, 16)?);
    let (transport, tcp_flags) = match ip[9] {
        PROTO_TCP => {
            let offset = usize::from(*payload.get(12)? >> 4) * 4;
            if offset < 20 || offset > payload.len() {
                return None;
            }
            (Transport::Tcp(be16(payload, 2)?), payload[13])
        }
        PROTO_UDP => {
            if payload.len() < 8 {
                return None;
            }
            (Transport::Udp(be16(payload, 2)?), 0)
        }
        _ => (Transport::Other, 0),
    };
    Some(Frame::Ipv4(Ipv4 {
        frame,
        header,
        payload,
        dst,
        transport,
        tcp_flags,
    }))
}

impl Ipv4<'_> {
    /// A TCP segment that opens a connection (SYN without ACK).
    pub(crate) fn is_syn(&self) -> bool {
        matches!(self.transport, Transport::Tcp(_))
            && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    fn src(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            self.header[12],
            self.header[13],
            self.header[14],
            self.header[15],
        )
    }

    /// The RST|ACK that refuses this SYN, as the destination would send it.
    pub(crate) fn tcp_reset(&self) -> Vec<u8> {
        let p = self.payload;
        let data_offset = usize::from(p[12] >> 4) * 4;
        // SYN and FIN each take a sequence number, as does every data byte.
        let consumed = (p.len() - data_offset) as u32
            + u32::from(self.tcp_flags & TCP_SYN != 0)
            + u32::from(self.tcp_flags & TCP_FIN != 0);
        let ack = be32(p, 4).unwrap_or(0).wrapping_add(consumed);
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&p[2..4]);
        tcp[2..4].copy_from_slice(&p[0..2]);
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = TCP_RST | TCP_ACK;
        self.reply(PROTO_TCP, &tcp, 16)
    }

    /// The ICMP port unreachable that refuses this UDP datagram: the
    /// original IP header and the first 8 bytes of its payload (RFC 792).
    pub(crate) fn port_unreachable(&self) -> Vec<u8> {
        let quoted = self.header.len() + self.payload.len().min(8);
        let original = &self.frame[ETH_HEADER..ETH_HEADER + quoted];
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(original);
        self.reply(PROTO_ICMP, &icmp, 2)
    }

    /// A frame back to the sender carrying `body` over IP protocol
    /// `proto`, with the body's checksum at `checksum_at` filled in.
    fn reply(&self, proto: u8, body: &[u8], checksum_at: usize) -> Vec<u8> {
        let (src, dst) = (self.dst, self.src());
        let mut out = Vec::with_capacity(ETH_HEADER + 20 + body.len());
        out.extend_from_slice(&self.frame[6..12]);
        out.extend_from_slice(&self.frame[0..6]);
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        out.extend_from_slice(&ipv4_header(src, dst, proto, body.len(), DONT_FRAGMENT));
        let mut body = body.to_vec();
        let sum = match proto {
            PROTO_ICMP => checksum(&[&body]),
            _ => checksum(&[&pseudo_header(src, dst, proto, body.len()), &body]),
        };
        body[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// The flags-and-offset field of an unfragmented packet that may not be.
pub(crate) const DONT_FRAGMENT: u16 = 0x4000;

/// A 20-byte IPv4 header (TTL 64, checksum filled in) for `body_len`
/// bytes of payload; `frag` is the flags-and-offset field.
pub(crate) fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    body_len: usize,
    frag: u16,
) -> [u8; 20] {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + body_len) as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

/// The IPv4 pseudo-header TCP and UDP checksums cover.
pub(crate) fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&src.octets());
    h[4..8].copy_from_slice(&dst.octets());
    h[9] = proto;
    h[10..12].copy_from_slice(&(len as u16).to_be_bytes());
    h
}

/// The Internet checksum (RFC 1071) of the concatenated parts; every part
/// but the last has even length.
pub(crate) fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
        // Fold as we go so a 64 KiB part cannot overflow.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    pub(crate) const STACK_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0, 2, 2];
    pub(crate) const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    fn ip_frame(dst: Ipv4Addr, proto: u8, body: &[u8], frag: u16) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&STACK_MAC);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f.extend_from_slice(&ipv4_header(GUEST_IP, dst, proto, body.len(), frag));
        f.extend_from_slice(body);
        f
    }

    /// A TCP segment from the guest's port 40000 with `flags`, sequence
    /// number 1000 and `data`.
    pub(crate) fn tcp(dst: Ipv4Addr, port: u16, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&port.to_be_bytes());
        t[4..8].copy_from_slice(&1000u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t.extend_from_slice(data);
        ip_frame(dst, PROTO_TCP, &t, DONT_FRAGMENT)
    }

    pub(crate) fn syn(dst: Ipv4Addr, port: u16) -> Vec<u8> {
        tcp(dst, port, TCP_SYN, &[])
    }

    pub(crate) fn udp(dst: Ipv4Addr, port: u16, data: &[u8]) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&40001u16.to_be_bytes());
        u[2..4].copy_from_slice(&port.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        u.extend_from_slice(data);
        ip_frame(dst, PROTO_UDP, &u, 0)
    }

    pub(crate) fn icmp_echo(dst: Ipv4Addr) -> Vec<u8> {
        ip_frame(dst, PROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0, 1], 0)
    }

    pub(crate) fn fragment(dst: Ipv4Addr, frag: u16) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[2..4].copy_from_slice(&80u16.to_be_bytes());
        ip_frame(dst, PROTO_UDP, &u, frag)
    }

    pub(crate) fn arp() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&GUEST_IP.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 2, 2]);
        f
    }

    pub(crate) fn ipv6() -> Vec<u8> {
        let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60; 40]);
        f
    }

    /// Checks a reply the filter built: addresses swapped, every checksum
    /// right (recomputed over the packet with its checksum field in place
    /// sums to zero). Returns the IP payload.
    pub(crate) fn check_reply(request: &[u8], reply: &[u8], proto: u8) -> Vec<u8> {
        assert_eq!(&reply[0..6], &request[6..12], "to the sender's MAC");
        assert_eq!(&reply[6..12], &request[0..6], "from the destination's MAC");
        assert_eq!(be16(reply, 12), Some(ETHERTYPE_IPV4));
        let ip = &reply[ETH_HEADER..];
        assert_eq!(ip[0], 0x45);
        assert_eq!(
            usize::from(be16(ip, 2).unwrap()),
            ip.len(),
            "IP total length"
        );
        assert_eq!(ip[9], proto);
        assert_eq!(
            &ip[12..16],
            &request[ETH_HEADER + 16..ETH_HEADER + 20],
            "source"
        );
        assert_eq!(
            &ip[16..20],
            &request[ETH_HEADER + 12..ETH_HEADER + 16],
            "destination"
        );
        assert_eq!(checksum(&[&ip[..20]]), 0, "IP header checksum");
        let body = &ip[20..];
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let sum = match proto {
            PROTO_ICMP => checksum(&[body]),
            _ => checksum(&[&pseudo_header(src, dst, proto, body.len()), body]),
        };
        assert_eq!(sum, 0, "protocol checksum");
        body.to_vec()
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is ddf2, so the
        // checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        // Odd lengths pad with a zero byte.
        assert_eq!(checksum(&[&[0xab]]), !0xab00);
        // Split parts sum as one.
        assert_eq!(checksum(&[&data[..4], &data[4..]]), checksum(&[&data]));
        // A large buffer of 0xff bytes folds without overflowing.
        assert_eq!(checksum(&[&vec![0xff; 65536]]), 0);
    }

    #[test]
    fn tcp_reset_answers_the_syn() {
        let dst = Ipv4Addr::new(10, 0, 2, 2);
        let request = syn(dst, 5077);
        let Frame::Ipv4(p) = parse(&request) else {
            panic!("not parsed")
        };
        assert!(p.is_syn());
        let reply = p.tcp_reset();
        let tcp = check_reply(&request, &reply, PROTO_TCP);
        assert_eq!(tcp.len(), 20);
        assert_eq!(be16(&tcp, 0), Some(5077), "from the refused port");
        assert_eq!(be16(&tcp, 2), Some(40000), "to the guest's port");
        assert_eq!(be32(&tcp, 8), Some(1001), "acknowledges the SYN");
        assert_eq!(tcp[13], TCP_RST | TCP_ACK);
    }

    #[test]
    fn tcp_reset_acknowledges_data_and_fin() {
        let request = tcp(Ipv4Addr::new(10, 0, 2, 2), 80, TCP_SYN | TCP_FIN, b"hello");
        let Frame::Ipv4(p) = parse(&request) else {
            panic!("not parsed")
        };
        let tcp = check_reply(&request, &p.tcp_reset(), PROTO_TCP);
        assert_eq!(be32(&tcp, 8), Some(1000 + 5 + 2));
    }

    #[test]
    fn port_unreachable_quotes_the_datagram() {
        // An odd-length datagram exercises the checksum's padding.
        let request = udp(Ipv4Addr::new(10, 0, 2, 2), 9999, b"abcde");
        let Frame::Ipv4(p) = parse(&request) else {
            panic!("not parsed")
        };
        let icmp = check_reply(&request, &p.port_unreachable(), PROTO_ICMP);
        assert_eq!(&icmp[..2], &[3, 3], "destination port unreachable");
        assert_eq!(
            &icmp[8..],
            &request[ETH_HEADER..ETH_HEADER + 28],
            "IP header + 8"
        );
        let short = udp(Ipv4Addr::new(10, 0, 2, 2), 9999, b"");
        let Frame::Ipv4(p) = parse(&short) else {
            panic!("not parsed")
        };
        let icmp = check_reply(&short, &p.port_unreachable(), PROTO_ICMP);
        assert_eq!(&icmp[8..], &short[ETH_HEADER..]);
    }

    #[test]
    fn classifies_frames() {
        let dst = Ipv4Addr::new(1, 2, 3, 4);
        assert_eq!(parse(&arp()), Frame::Arp);
        assert_eq!(parse(&ipv6()), Frame::Unsupported);
        let datagram = udp(dst, 53, b"q");
        let Frame::Ipv4(p) = parse(&datagram) else {
            panic!()
        };
        assert_eq!((p.dst, p.transport), (dst, Transport::Udp(53)));
        let echo = icmp_echo(dst);
        let Frame::Ipv4(p) = parse(&echo) else {
            panic!()
        };
        assert_eq!(p.transport, Transport::Other);
        let ack = tcp(dst, 80, TCP_ACK, b"x");
        let Frame::Ipv4(p) = parse(&ack) else {
            panic!()
        };
        assert!(!p.is_syn());
        let synack = tcp(dst, 80, TCP_SYN | TCP_ACK, b"");
        let Frame::Ipv4(p) = parse(&synack) else {
            panic!()
        };
        assert!(!p.is_syn());
    }

    #[test]
    fn fragments_are_unsupported() {
        let dst = Ipv4Addr::new(1, 2, 3, 4);
        // More fragments; a later fragment; DF alone is fine.
        assert_eq!(parse(&fragment(dst, 0x2000)), Frame::Unsupported);
        assert_eq!(parse(&fragment(dst, 0x0010)), Frame::Unsupported);
        assert!(matches!(
            parse(&fragment(dst, DONT_FRAGMENT)),
            Frame::Ipv4(_)
        ));
    }

    #[test]
    fn malformed_frames_are_unsupported_not_a_panic() {
        let good = tcp(Ipv4Addr::new(1, 2, 3, 4), 80, TCP_SYN, b"data");
        // Every truncation.
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
        }
        for n in 0..ETH_HEADER + 20 + 20 {
            assert_eq!(parse(&good[..n]), Frame::Unsupported, "cut at {n}");
        }
        let mutate = |at: usize, value: u8| {
            let mut f = good.clone();
            f[at] = value;
            parse(&f) == Frame::Unsupported
        };
        assert!(mutate(ETH_HEADER, 0x65), "version 6");
        assert!(mutate(ETH_HEADER, 0x44), "IHL 16 bytes");
        assert!(mutate(ETH_HEADER, 0x4f), "IHL past the end");
        assert!(mutate(ETH_HEADER + 2, 0xff), "length past the end");
        assert!(mutate(ETH_HEADER + 3, 10), "length under the header");
        assert!(mutate(ETH_HEADER + 20 + 12, 0x40), "TCP offset 16");
        assert!(mutate(ETH_HEADER + 20 + 12, 0xf0), "TCP offset 60");
        let mut short_udp = udp(Ipv4Addr::new(1, 2, 3, 4), 53, b"");
        short_udp.truncate(short_udp.len() - 1);
        short_udp[ETH_HEADER + 3] -= 1;
        assert_eq!(parse(&short_udp), Frame::Unsupported, "UDP header cut");
    }
}
