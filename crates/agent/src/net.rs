//! Network interfaces: loopback, so that 127.0.0.1 works, and the one
//! virtio-net interface the host may give, configured statically with
//! ioctls (images need not have `ip` or a DHCP client).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

fn inet_socket() -> io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let flags = SocketFlags::CLOEXEC;
    Ok(rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        flags,
        None,
    )?)
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// `addr` as the `sockaddr` the interface ioctls take: a `sockaddr_in`
/// (family, port 0, address, zeros) laid out in the generic struct.
fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    // After the two bytes of the port, in network order.
    for (dst, src) in data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

/// Linux's `SIOCSIFMTU` (not in the libc crate for this target).
const SIOCSIFMTU: libc::c_ulong = 0x8922;

/// Gives `interface` `address/prefix_len` and `mtu`, brings it up and
/// routes everything not local through `gateway`.
pub fn configure(
    interface: &str,
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
    mtu: u32,
) -> io::Result<()> {
    if prefix_len > 32 || !(68..=65535).contains(&mtu) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let sock = inet_socket()?;
    let mut req = ifreq(interface)?;
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    // SAFETY: `req` is a valid ifreq naming the interface; the kernel reads it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFMTU, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    req.ifr_ifru.ifru_addr = sockaddr_in(address);
    // SAFETY: `req` is a valid ifreq naming the interface; the kernel reads it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    up(interface)?;
    // SAFETY: rtentry is plain old data; all-zero bytes are a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_in(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: `route` is a valid rtentry; the kernel only reads it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &route) } < 0 {
        let e = io::Error::last_os_error();
        // Set up again after a reconnect: the route is already there.
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// Sets `IFF_UP` on interface `name`.
pub fn up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name; the kernel
    // writes the flags member of its union.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: `req` is a valid ifreq; the kernel only reads it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_laid_out_as_a_sockaddr_in() {
        let sa = sockaddr_in(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let bytes: Vec<u8> = sa.sa_data.iter().map(|&b| b as u8).collect();
        assert_eq!(bytes, [0, 0, 10, 0, 2, 15, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn interface_names_must_fit_ifreq() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq(&"x".repeat(16)).is_err());
    }
}
