//! The `Setup` request: clock, entropy, root filesystem, host directories,
//! name resolution files and loopback.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use cc_protocol::{NetConfig, Prepare, RemoteError, Response, RootSpec, Setup, UnixTime};

use crate::{error, mounts, net, sys, trace, Mode};

/// How far the filesystems got, and what of the guest's configuration is
/// in place. Each filesystem step is done once: a Setup retried after a
/// failure resumes at the step that failed (never switching the root
/// twice), and one after the host reconnected skips them all. What a
/// template's `Prepare` configured is not done again by the `Setup` of its
/// restored copies when it matches (under emulation each is a code path
/// the restored guest would run, and translate, for the first time).
#[derive(Debug, Default)]
pub struct Mounted {
    root: bool,
    runtime: bool,
    /// `/etc/hostname`, `/etc/hosts` (and `/etc/resolv.conf` if generated)
    /// are bound to files on a tmpfs.
    etc: bool,
    /// How many of the host directories are mounted, in order.
    host_dirs: usize,
    /// The nameservers `/etc/resolv.conf` names.
    nameservers: Option<Vec<String>>,
    loopback: bool,
    network: Option<NetConfig>,
}

/// Sets the wall clock to the host's `time` (after a resume); in host mode
/// the clock is the host's own, already right.
pub fn sync_clock(mode: Mode, time: UnixTime) -> Result<Response, RemoteError> {
    if mode == Mode::Guest {
        sys::set_realtime_clock(time.secs, time.nanos).map_err(|e| error::os("set clock", &e))?;
    }
    Ok(Response::Done)
}

/// Performs `setup`: filesystems as far as `mounted` says they are not yet
/// (`upper` keeps the overlay's writable layer), then the clock, entropy
/// and identity, which every Setup refreshes. In host mode, only checks it
/// (see [`host`]).
pub fn run(
    mode: Mode,
    mounted: &Mutex<Mounted>,
    upper: &OnceLock<OwnedFd>,
    setup: &Setup,
) -> Result<Response, RemoteError> {
    check(setup)?;
    if mode == Mode::Host {
        return host(setup);
    }
    let mut mounted = mounted.lock().unwrap_or_else(|e| e.into_inner());
    let t = Instant::now();
    sys::set_realtime_clock(setup.clock.secs, setup.clock.nanos)
        .map_err(|e| error::os("set clock", &e))?;
    trace::record_setup("agent setup: clock", t);
    let t = Instant::now();
    add_entropy(&setup.entropy);
    trace::record_setup("agent setup: entropy", t);
    let t = Instant::now();
    mount_root(
        &mut mounted,
        upper,
        setup.root.as_ref(),
        !setup.nameservers.is_empty(),
    )?;
    for m in setup.mounts.iter().skip(mounted.host_dirs) {
        mounts::host_dir(m)?;
        mounted.host_dirs += 1;
    }
    trace::record_setup("agent setup: mounts", t);
    let t = Instant::now();
    sys::sethostname(&setup.hostname)
        .map_err(|e| error::os(format_args!("set hostname {:?}", setup.hostname), &e))?;
    write_config("/etc/hostname", &format!("{}\n", setup.hostname))?;
    write_config("/etc/hosts", &hosts_file(&setup.hostname, &setup.hosts))?;
    trace::record_setup("agent setup: hostname, /etc/hosts", t);
    let t = Instant::now();
    configure(&mut mounted, &setup.nameservers, setup.network.as_ref())?;
    trace::record_setup("agent setup: resolv.conf, network", t);
    Ok(Response::Ready {
        kernel: sys::kernel_release(),
    })
}

/// Writes `/etc/resolv.conf` (unless `nameservers` is empty), brings up
/// loopback and configures `network`, each unless already as asked.
fn configure(
    mounted: &mut Mounted,
    nameservers: &[String],
    network: Option<&NetConfig>,
) -> Result<(), RemoteError> {
    if !nameservers.is_empty() && mounted.nameservers.as_deref() != Some(nameservers) {
        write_config("/etc/resolv.conf", &resolv_conf(nameservers))?;
        mounted.nameservers = Some(nameservers.to_vec());
    }
    if !mounted.loopback {
        net::up("lo").map_err(|e| error::os("bring up lo", &e))?;
        mounted.loopback = true;
    }
    if let Some(n) = network.filter(|&n| mounted.network.as_ref() != Some(n)) {
        let parse = |what: &str, v: &str| {
            v.parse::<std::net::Ipv4Addr>()
                .map_err(|_| error::invalid(format!("network {what} {v:?} is not an IPv4 address")))
        };
        let (address, gateway) = (parse("address", &n.address)?, parse("gateway", &n.gateway)?);
        net::configure(&n.interface, address, n.prefix_len, gateway, n.mtu).map_err(|e| {
            error::os(
                format_args!(
                    "configure {} as {}/{}",
                    n.interface, n.address, n.prefix_len
                ),
                &e,
            )
        })?;
        mounted.network = Some(n.clone());
    }
    Ok(())
}

/// Setup in host mode: the machine is the host's, so its clock, entropy,
/// names and loopback are left alone, and the root is the host's own
/// filesystem (a root spec is accepted as already in place). What only a
/// guest can have, host directories mounted in and a network interface,
/// is refused.
fn host(setup: &Setup) -> Result<Response, RemoteError> {
    if !setup.mounts.is_empty() {
        return Err(error::invalid(
            "host directory mounts need a guest; this agent runs in host mode",
        ));
    }
    if setup.network.is_some() {
        return Err(error::invalid(
            "a network interface needs a guest; this agent runs in host mode",
        ));
    }
    Ok(Response::Ready {
        kernel: sys::kernel_release(),
    })
}

/// The `Prepare` request: the root and runtime filesystems, the tmpfs
/// behind the generated `/etc` files, name resolution and network, ahead
/// of the `Setup` that a restored template gets. In host mode the root is
/// the host's own: there is nothing to do.
pub fn prepare(
    mode: Mode,
    mounted: &Mutex<Mounted>,
    upper: &OnceLock<OwnedFd>,
    prepare: &Prepare,
) -> Result<Response, RemoteError> {
    if let Some(ns) = prepare.nameservers.iter().find(|ns| !is_word(ns)) {
        return Err(error::invalid(format!("invalid nameserver {ns:?}")));
    }
    if mode == Mode::Host {
        return Ok(Response::Done);
    }
    let mut mounted = mounted.lock().unwrap_or_else(|e| e.into_inner());
    mount_root(
        &mut mounted,
        upper,
        Some(&prepare.root),
        !prepare.nameservers.is_empty(),
    )?;
    configure(&mut mounted, &prepare.nameservers, prepare.network.as_ref())?;
    Ok(Response::Done)
}

fn make_etc() -> Result<(), RemoteError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create("/etc")
        .map_err(|e| error::os("mkdir /etc", &e))
}

/// Switches to `root` (unless `None`), mounts the runtime filesystems and
/// binds the generated `/etc` files (`resolv.conf` too when `resolv`),
/// each once.
fn mount_root(
    mounted: &mut Mounted,
    upper: &OnceLock<OwnedFd>,
    root: Option<&RootSpec>,
    resolv: bool,
) -> Result<(), RemoteError> {
    if !mounted.root {
        if let Some(root) = root {
            // Set only here, and this runs once.
            let _ = upper.set(mounts::switch_root(root)?);
        }
        mounted.root = true;
    }
    if !mounted.runtime {
        mounts::runtime()?;
        mounted.runtime = true;
    }
    if !mounted.etc {
        make_etc()?;
        let files: &[&str] = if resolv {
            &["hostname", "hosts", "resolv.conf"]
        } else {
            &["hostname", "hosts"]
        };
        mounts::bind_etc_files(files)?;
        mounted.etc = true;
    }
    Ok(())
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
    if let Err(e) = sys::reseed_crng(random.as_fd()) {
        log!("reseed the CRNG: {}", error::describe(&e));
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
    let write = || {
        // Explicit, as the agent's umask is 0.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(p)?;
        file.write_all(contents.as_bytes())
    };
    write().map_err(|e| error::os(format_args!("write {path}"), &e))
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
    for m in &setup.mounts {
        if let Some(why) = mounts::check_mount_path(&m.guest_path) {
            return Err(error::invalid(format!(
                "mount 9p tag {:?} on {}: {why}",
                m.tag, m.guest_path
            )));
        }
        if m.tag.is_empty() || m.tag.contains('\0') {
            return Err(error::invalid(format!("invalid mount tag {:?}", m.tag)));
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
    use cc_protocol::{Mount, UnixTime};
    use serde_bytes::ByteBuf;

    fn sample() -> Setup {
        Setup {
            hostname: "box".into(),
            root: None,
            clock: UnixTime { secs: 0, nanos: 0 },
            entropy: ByteBuf::new(),
            nameservers: vec!["10.0.2.3".into()],
            hosts: vec![("10.0.0.5".into(), "db db.local".into())],
            mounts: vec![Mount {
                tag: "m0".into(),
                guest_path: "/data".into(),
                read_only: true,
            }],
            network: None,
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

    #[test]
    fn mounts_need_a_tag_and_a_plain_absolute_path() {
        let mut s = sample();
        s.mounts[0].guest_path = "data".into();
        let e = check(&s).unwrap_err();
        assert_eq!(e.kind, cc_protocol::ErrorKind::InvalidArgument);
        assert_eq!(
            e.message,
            "mount 9p tag \"m0\" on data: not an absolute path"
        );
        let mut s = sample();
        s.mounts[0].guest_path = "/data/../etc".into();
        assert!(check(&s).is_err());
        let mut s = sample();
        s.mounts[0].tag = String::new();
        assert!(check(&s).is_err());
    }
}
