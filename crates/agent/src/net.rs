//! Network interfaces: loopback, so that 127.0.0.1 works, and the one
//! virtio-net interface the host may give, configured statically with
//! ioctls (images need not have `ip` or a DHCP client).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux and
    // sockaddr is plain old data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
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
