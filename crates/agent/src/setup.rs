//! The `Setup` request: clock, entropy, root filesystem, name resolution
//! files and loopback.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Mutex;

use cc_protocol::{RemoteError, Response, Setup};

use crate::{error, mounts, net, sys};

/// Performs `setup`. Filesystems are set up by the first successful Setup
/// only (`mounted` records it); a later one, after the host reconnected,
/// refreshes the clock, entropy and identity.
pub fn run(mounted: &Mutex<bool>, setup: &Setup) -> Result<Response, RemoteError> {
    check(setup)?;
    let mut mounted = mounted.lock().unwrap_or_else(|e| e.into_inner());
    sys::set_realtime_clock(setup.clock.secs, setup.clock.nanos)
        .map_err(|e| error::os("set clock", &e))?;
    add_entropy(&setup.entropy);
    if !*mounted {
        if let Some(root) = &setup.root {
            mounts::switch_root(root)?;
        }
        mounts::runtime()?;
        *mounted = true;
    }
    sys::sethostname(&setup.hostname)
        .map_err(|e| error::os(format_args!("set hostname {:?}", setup.hostname), &e))?;
    fs::create_dir_all("/etc").map_err(|e| error::os("mkdir /etc", &e))?;
    write_config("/etc/hostname", &format!("{}\n", setup.hostname))?;
    write_config("/etc/hosts", &hosts_file(&setup.hostname, &setup.hosts))?;
    if !setup.nameservers.is_empty() {
        write_config("/etc/resolv.conf", &resolv_conf(&setup.nameservers))?;
    }
    net::up("lo").map_err(|e| error::os("bring up lo", &e))?;
    let kernel = sys::kernel_release().map_err(|e| error::os("uname", &e))?;
    Ok(Response::Ready { kernel })
}

/// Credits `bytes` to the kernel RNG. Failure is not fatal (the guest has
/// virtio-rng too), so it is only logged.
fn add_entropy(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let random = match OpenOptions::new().write(true).open("/dev/urandom") {
        Ok(f) => f,
        Err(e) => {
            log!("open /dev/urandom: {}", error::describe(&e));
            return;
        }
    };
    if let Err(e) = sys::add_entropy(random.as_fd(), bytes) {
        log!("credit entropy: {}", error::describe(&e));
        // Without credit the bytes still improve the pool.
        if let Err(e) = (&random).write_all(bytes) {
            log!("write /dev/urandom: {}", error::describe(&e));
        }
    }
}

/// Writes a generated file, replacing a symlink rather than writing through
/// it: images often link these into /run, which is empty here.
fn write_config(path: &str, contents: &str) -> Result<(), RemoteError> {
    let p = Path::new(path);
    if p.symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        fs::remove_file(p).map_err(|e| error::os(format_args!("remove {path}"), &e))?;
    }
    fs::write(p, contents).map_err(|e| error::os(format_args!("write {path}"), &e))
}

/// A word that may go into a generated file: no whitespace or controls,
/// which would let it add lines or fields.
fn is_word(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn check(setup: &Setup) -> Result<(), RemoteError> {
    if !is_word(&setup.hostname) {
        return Err(error::invalid(format!(
            "invalid hostname {:?}",
            setup.hostname
        )));
    }
    if let Some(ns) = setup.nameservers.iter().find(|ns| !is_word(ns)) {
        return Err(error::invalid(format!("invalid nameserver {ns:?}")));
    }
    for (addr, names) in &setup.hosts {
        if !is_word(addr) || names.trim().is_empty() || names.chars().any(char::is_control) {
            return Err(error::invalid(format!(
                "invalid hosts entry {addr:?} {names:?}"
            )));
        }
    }
    Ok(())
}

fn hosts_file(hostname: &str, extra: &[(String, String)]) -> String {
    let mut out = format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n");
    for (addr, names) in extra {
        out += &format!("{addr}\t{names}\n");
    }
    out
}

fn resolv_conf(nameservers: &[String]) -> String {
    nameservers
        .iter()
        .map(|ns| format!("nameserver {ns}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cc_protocol::UnixTime;
    use serde_bytes::ByteBuf;

    fn sample() -> Setup {
        Setup {
            hostname: "box".into(),
            root: None,
            clock: UnixTime { secs: 0, nanos: 0 },
            entropy: ByteBuf::new(),
            nameservers: vec!["10.0.2.3".into()],
            hosts: vec![("10.0.0.5".into(), "db db.local".into())],
        }
    }

    #[test]
    fn hosts_has_localhost_the_hostname_and_extras() {
        let s = sample();
        assert_eq!(
            hosts_file(&s.hostname, &s.hosts),
            "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\tbox\n10.0.0.5\tdb db.local\n"
        );
    }

    #[test]
    fn resolv_conf_lists_nameservers() {
        assert_eq!(
            resolv_conf(&["1.1.1.1".into(), "::1".into()]),
            "nameserver 1.1.1.1\nnameserver ::1\n"
        );
    }

    #[test]
    fn values_that_would_inject_lines_are_refused() {
        assert!(check(&sample()).is_ok());
        let mut s = sample();
        s.hostname = "a\nb".into();
        assert_eq!(check(&s).unwrap_err().message, "invalid hostname \"a\\nb\"");
        let mut s = sample();
        s.hostname = String::new();
        assert!(check(&s).is_err());
        let mut s = sample();
        s.nameservers.push("1.2.3.4 x".into());
        assert!(check(&s).is_err());
        let mut s = sample();
        s.hosts.push(("1.2.3.4".into(), "x\n5.6.7.8 y".into()));
        assert!(check(&s).is_err());
        let mut s = sample();
        s.hosts.push(("1.2.3.4".into(), " ".into()));
        assert!(check(&s).is_err());
    }
}
