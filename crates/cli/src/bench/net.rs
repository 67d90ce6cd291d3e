//! `crumble bench net`: bulk transfers through `listen`, `dial` and the
//! guest's network, each against the same bytes through a command's pipes
//! or the guest's own loopback.
//!
//! The guest end of every transfer is `cc-netbench` (scripts/cc-netbench.c,
//! built static into the busybox tree), which moves 1 MiB per system call.
//! busybox `nc` copies 1 KiB per call with a poll before each: under
//! emulation that alone capped every path near what two `nc`s manage on the
//! guest's own loopback (6-10 MB/s), so the bench measured the guest
//! program instead of the forwarding.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::{Samples, Table};
use crate::CliResult;

const NET_MIB: usize = 256;

/// The guest program, where scripts/make-busybox-rootfs.sh installs it.
const NETBENCH: &str = "/usr/bin/cc-netbench";

/// Reads `conn` to its end through one reused buffer, as the C and Python
/// faces do; returns how many bytes came.
fn drain(conn: &cc::Conn) -> CliResult<usize> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = conn.read_into(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

fn check_len(what: &str, got: usize) -> CliResult<()> {
    if got != NET_MIB << 20 {
        return Err(format!("{what}: {got} bytes arrived, not {NET_MIB} MiB").into());
    }
    Ok(())
}

/// A guest `sh -c script` with stdout piped (and stdin, if `stdin`).
fn spawn_sh(inst: &cc::Instance, script: &str, stdin: bool) -> CliResult<cc::Child> {
    let mut cmd = inst.command("sh");
    cmd.args(["-c", script]);
    if stdin {
        cmd.stdin(cc::Stdio::Piped);
    }
    Ok(cmd.spawn()?)
}

fn wait_ok(child: cc::Child, what: &str) -> CliResult<cc::Output> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(out)
}

/// Reads a guest → host byte stream to its end; returns how many came.
fn count_all(mut from: impl Read) -> CliResult<usize> {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(got);
        }
        got += n;
    }
}

/// The byte count a guest `cc-netbench recv` or `read` printed.
fn counted(what: &str, out: &cc::Output) -> CliResult<()> {
    let text = String::from_utf8_lossy(&out.stdout);
    let count = text
        .trim()
        .parse()
        .map_err(|_| format!("{what}: guest counted {text:?}"))?;
    check_len(what, count)
}

/// Fails with how to get the guest program when the tree lacks it.
fn check_netbench(inst: &cc::Instance) -> CliResult<()> {
    let out = inst.command("test").args(["-x", NETBENCH]).output()?;
    if !out.status.success() {
        return Err(format!(
            "the root filesystem has no {NETBENCH}, the guest end of this bench: \
             build the tree with scripts/make-busybox-rootfs.sh"
        )
        .into());
    }
    Ok(())
}

/// One 256 MiB guest → host transfer through a `listen`ed connection.
fn listen_once(inst: &cc::Instance, listener: &cc::Listener) -> CliResult<Duration> {
    let t = Instant::now();
    let send = format!("{NETBENCH} send {} {NET_MIB}", listener.addr());
    let sender = spawn_sh(inst, &send, false)?;
    let conn = listener.accept(None)?;
    let got = drain(&conn)?;
    let elapsed = t.elapsed();
    conn.close();
    wait_ok(sender, "guest sender")?;
    check_len("listen", got)?;
    Ok(elapsed)
}

/// One 256 MiB transfer between two `cc-netbench`es over the guest's own
/// loopback: what the guest's TCP and the program cost without any of our
/// forwarding.
fn guest_local_once(inst: &cc::Instance) -> CliResult<Duration> {
    let t = Instant::now();
    let receiver = spawn_sh(inst, &format!("{NETBENCH} recv 7002"), false)?;
    let sender = spawn_sh(
        inst,
        &format!(
            "until netstat -ltn | grep -q ':7002 '; do usleep 10000; done; \
             {NETBENCH} send 127.0.0.1:7002 {NET_MIB}"
        ),
        false,
    )?;
    let out = wait_ok(receiver, "guest receiver")?;
    let elapsed = t.elapsed();
    wait_ok(sender, "guest sender")?;
    counted("guest loopback", &out)?;
    Ok(elapsed)
}

/// One 256 MiB guest → host transfer on a command's stdout.
fn pipe_out_once(inst: &cc::Instance) -> CliResult<Duration> {
    let t = Instant::now();
    let mut writer = spawn_sh(inst, &format!("{NETBENCH} write {NET_MIB}"), false)?;
    let got = count_all(writer.stdout.take().ok_or("no stdout pipe")?)?;
    let elapsed = t.elapsed();
    wait_ok(writer, "guest writer")?;
    check_len("pipe", got)?;
    Ok(elapsed)
}

/// One 256 MiB guest → host transfer through the user-mode network.
fn egress_once(inst: &cc::Instance, server: &std::net::TcpListener) -> CliResult<Duration> {
    let to = format!("10.0.2.2:{}", server.local_addr()?.port());
    let t = Instant::now();
    let sender = spawn_sh(inst, &format!("{NETBENCH} send {to} {NET_MIB}"), false)?;
    let (peer, _) = server.accept()?;
    let got = count_all(peer)?;
    let elapsed = t.elapsed();
    wait_ok(sender, "guest sender (egress)")?;
    check_len("egress", got)?;
    Ok(elapsed)
}

/// One 256 MiB host → guest transfer: `write` sends it, the guest's
/// `cc-netbench` (which `child` runs) counts it; timed until the guest has
/// it all.
fn host_to_guest_once(
    child: cc::Child,
    mut write: impl FnMut(&[u8]) -> CliResult<()>,
) -> CliResult<Duration> {
    let block = vec![0u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..NET_MIB {
        write(&block)?;
    }
    write(&[])?;
    let out = wait_ok(child, "guest receiver")?;
    let elapsed = t.elapsed();
    counted("host → guest", &out)?;
    Ok(elapsed)
}

/// One 256 MiB host → guest transfer through a `dial`ed connection.
fn dial_once(inst: &cc::Instance) -> CliResult<Duration> {
    let receiver = spawn_sh(inst, &format!("{NETBENCH} recv 7000"), false)?;
    let conn = loop {
        match inst.dial("tcp", "127.0.0.1:7000") {
            Ok(c) => break c,
            // Not listening yet.
            Err(e) if e.code() == cc::ErrorCode::Network => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e.into()),
        }
    };
    host_to_guest_once(receiver, |block| {
        if block.is_empty() {
            conn.close_write();
        } else {
            conn.write(block)?;
        }
        Ok(())
    })
}

/// One 256 MiB host → guest transfer on a command's stdin.
fn pipe_in_once(inst: &cc::Instance) -> CliResult<Duration> {
    let mut reader = spawn_sh(inst, &format!("{NETBENCH} read"), true)?;
    let mut stdin = Some(reader.stdin.take().ok_or("no stdin pipe")?);
    host_to_guest_once(reader, |block| {
        if block.is_empty() {
            stdin = None;
        } else if let Some(s) = stdin.as_mut() {
            std::io::Write::write_all(s, block)?;
        }
        Ok(())
    })
}

pub(super) fn net(rootfs: &Path, runs: usize) -> CliResult<ExitCode> {
    // Egress is measured against a host listener: the policy must let the
    // guest reach the host.
    let options = cc::Options {
        network_policy: cc::NetworkPolicy {
            allow_host: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let inst = cc::Instance::new(&cc::Source::Dir(rootfs.to_path_buf()), options)?;
    check_netbench(&inst)?;
    let listener = inst.listen("tcp", ":0")?;
    let server = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut s = [(); 6].map(|()| Samples::default());
    for _ in 0..runs {
        s[0].0.push(listen_once(&inst, &listener)?);
        s[1].0.push(pipe_out_once(&inst)?);
        s[2].0.push(dial_once(&inst)?);
        s[3].0.push(pipe_in_once(&inst)?);
        s[4].0.push(egress_once(&inst, &server)?);
        s[5].0.push(guest_local_once(&inst)?);
    }
    drop(listener);
    inst.close()?;
    let mb_s = |d: Duration| (NET_MIB << 20) as f64 / 1e6 / d.as_secs_f64();
    let rows = [
        "listen: guest send → host accept",
        "  baseline: guest write → command stdout",
        "dial: host → guest recv",
        "  baseline: host → command stdin",
        "egress: guest send → 10.0.2.2 (filter + relay)",
        "guest only: send → recv on the guest's loopback",
    ];
    println!(
        "{NET_MIB} MiB transfers, median of {runs}; the guest end is {NETBENCH} \
         (1 MiB per system call)\n"
    );
    let table = Table::new(46, 9, 1);
    table.header("", "MB/s");
    for (name, samples) in rows.iter().zip(&s) {
        table.row(name, &[mb_s(samples.median())]);
    }
    // Throughputs: the inverse of the ratio of their times.
    let ratio = |a: &Samples, b: &Samples| b.ratio(a);
    println!(
        "\nlisten / pipe = {:.2}x   dial / pipe = {:.2}x   listen / guest-only = {:.2}x   \
         egress / listen = {:.2}x",
        ratio(&s[0], &s[1]),
        ratio(&s[2], &s[3]),
        ratio(&s[0], &s[5]),
        ratio(&s[4], &s[0])
    );
    Ok(ExitCode::SUCCESS)
}
