//! Thin wrappers over the system calls std does not offer, each returning
//! `io::Result` with the errno of the failure.
//!
//! They go through rustix, which checks arguments and descriptors in its
//! types; raw `libc` remains only where rustix has no safe call: signal
//! masks and `sigwaitinfo`, `kill` with a signal number chosen by the host,
//! and the RNG ioctls.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::{EventfdFlags, PollFd};
use rustix::fs::{AtFlags, Mode, OFlags, Timestamps, CWD};
use rustix::mount::MountFlags;
use rustix::process::{Pid, WaitId, WaitIdOptions, WaitOptions};
use rustix::thread::{Gid, Uid};
use rustix::time::{ClockId, Timespec};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Retries `f` while a signal interrupts it.
fn retry<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(rustix::io::Errno::INTR) => {}
            other => return other.map_err(io::Error::from),
        }
    }
}

/// `bytes` as a C string; an interior NUL is `InvalidInput`.
pub fn cstring(bytes: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

/// The C library's text for `errno`, without Rust's "(os error N)" suffix.
pub fn strerror(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.strip_suffix(&format!(" (os error {errno})")) {
        Some(reason) => reason.to_owned(),
        None => text,
    }
}

pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: Option<&str>,
) -> io::Result<()> {
    let data = data.map(cstring).transpose()?;
    rustix::mount::mount(
        cstring(source)?,
        cstring(target)?,
        cstring(fstype)?,
        flags,
        data.as_deref(),
    )?;
    Ok(())
}

/// Moves the mount at `source` to `target` (`MS_MOVE`).
pub fn mount_move(source: &str, target: &str) -> io::Result<()> {
    rustix::mount::mount_move(cstring(source)?, cstring(target)?)?;
    Ok(())
}

pub fn chroot(path: &str) -> io::Result<()> {
    rustix::process::chroot(cstring(path)?)?;
    Ok(())
}

pub fn sethostname(name: &str) -> io::Result<()> {
    rustix::system::sethostname(name.as_bytes())?;
    Ok(())
}

pub fn set_realtime_clock(secs: i64, nanos: u32) -> io::Result<()> {
    let ts = Timespec {
        tv_sec: secs,
        tv_nsec: nanos.into(),
    };
    rustix::time::clock_settime(ClockId::Realtime, ts)?;
    Ok(())
}

/// The kernel release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

/// Sends `signal` to `pid` (a negative pid names a process group, -1 every
/// process but PID 1).
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // rustix takes only named signals safely, and the host may ask for any
    // number (a real-time signal, or 0 to probe).
    // SAFETY: kill(2) takes no pointers.
    check(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// Async-signal-safe: used between fork and exec.
pub fn setsid() -> io::Result<()> {
    rustix::process::setsid()?;
    Ok(())
}

/// Sets the calling thread's nice value; threads it starts inherit it.
/// Async-signal-safe: used between fork and exec.
pub fn set_nice(nice: i32) -> io::Result<()> {
    rustix::process::setpriority_process(None, nice)?;
    Ok(())
}

/// Sets the calling thread's supplementary groups, group and user, in that
/// order (each needs the privileges the one before may drop).
/// Async-signal-safe: used between fork and exec, where the one thread is
/// the whole process.
pub fn set_ids(groups: &[Gid], gid: Gid, uid: Uid) -> io::Result<()> {
    rustix::thread::set_thread_groups(groups)?;
    rustix::thread::set_thread_gid(gid)?;
    rustix::thread::set_thread_uid(uid)?;
    Ok(())
}

pub fn sync() {
    rustix::fs::sync();
}

/// Restarts the machine; with `reboot=t` and QEMU's `-no-reboot` that ends
/// the VM. Returns only on failure.
pub fn reboot() -> io::Error {
    match rustix::system::reboot(rustix::system::RebootCommand::Restart) {
        Ok(()) => io::Error::other("reboot returned"),
        Err(e) => e.into(),
    }
}

/// A pipe as (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// A non-blocking, close-on-exec eventfd used as a level-triggered flag.
pub fn eventfd() -> io::Result<OwnedFd> {
    let flags = EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK;
    Ok(rustix::event::eventfd(0, flags)?)
}

/// Raises the flag of an [`eventfd`]; it stays readable from then on.
pub fn eventfd_raise(fd: BorrowedFd<'_>) {
    // The only possible failure is an overflowing counter, which leaves it
    // raised.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Waits until one of `fds` has an event or `timeout` passes; returns how
/// many have events. Interrupted waits are retried.
pub fn poll(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<usize> {
    let timeout = timeout
        .map(|t| Timespec::try_from(t).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput)))
        .transpose()?;
    retry(|| rustix::event::poll(fds, timeout.as_ref()))
}

/// Shuts a socket down in both directions; on a listening socket this
/// wakes a thread blocked in `accept`.
pub fn shutdown_socket(fd: BorrowedFd<'_>) {
    // Failure (not a socket, already shut) leaves nothing to do.
    let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
}

pub fn set_nonblocking(fd: impl AsFd, nonblocking: bool) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    let flags = if nonblocking {
        flags | OFlags::NONBLOCK
    } else {
        flags - OFlags::NONBLOCK
    };
    rustix::fs::fcntl_setfl(&fd, flags)?;
    Ok(())
}

/// Blocks until some child has exited, without reaping it; `ECHILD` when
/// there is no child.
pub fn wait_any_exited() -> io::Result<()> {
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
    retry(|| rustix::process::waitid(WaitId::All, options)).map(drop)
}

/// Reaps one exited child, whichever it is: its pid and wait status, or
/// `None` when no child has exited (or there is none).
pub fn reap_any() -> io::Result<Option<(u32, i32)>> {
    match retry(|| rustix::process::wait(WaitOptions::NOHANG)) {
        Ok(reaped) => {
            Ok(reaped.map(|(pid, status)| (pid.as_raw_nonzero().get() as u32, status.as_raw())))
        }
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Blocks until the child `pid` has exited, without reaping it.
pub fn wait_exited(pid: u32) -> io::Result<()> {
    let pid = pid_of(pid)?;
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
    retry(|| rustix::process::waitid(WaitId::Pid(pid), options)).map(drop)
}

/// Reaps the exited child `pid`: its wait status, or `None` if it has not
/// exited or was already reaped.
pub fn reap(pid: u32) -> io::Result<Option<i32>> {
    match retry(|| rustix::process::waitpid(Some(pid_of(pid)?), WaitOptions::NOHANG)) {
        Ok(reaped) => Ok(reaped.map(|(_, status)| status.as_raw())),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(None),
        Err(e) => Err(e),
    }
}

fn pid_of(pid: u32) -> rustix::io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(rustix::io::Errno::INVAL)
}

/// Gives the calling thread a filesystem context of its own (umask,
/// working directory and root, which `unshare(CLONE_FS)` separates from
/// the other threads') with umask 0: files it creates get exactly the
/// modes asked for, and the rest of the process keeps its umask.
pub fn exact_modes_in_this_thread() -> io::Result<()> {
    // SAFETY: the contract of unshare_unsafe is about CLONE_FILES, which
    // would leave this thread unable to use descriptors the others open;
    // CLONE_FS separates only the umask, working directory and root.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }?;
    umask(0);
    Ok(())
}

/// Sets the file mode creation mask; returns the previous one.
/// Async-signal-safe: used between fork and exec.
pub fn umask(mask: u32) -> u32 {
    rustix::process::umask(Mode::from_raw_mode(mask)).as_raw_mode()
}

/// `openat(2)` relative to `dir`, or to the working directory for `None`.
/// `mode` applies when `flags` create a file.
pub fn openat(
    dir: Option<BorrowedFd<'_>>,
    name: &CStr,
    flags: OFlags,
    mode: u32,
) -> io::Result<OwnedFd> {
    let mode = Mode::from_raw_mode(mode);
    Ok(rustix::fs::openat(dir.unwrap_or(CWD), name, flags, mode)?)
}

/// `unlinkat(2)`: removes `name` in `dir`, a directory with `REMOVEDIR`.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: AtFlags) -> io::Result<()> {
    rustix::fs::unlinkat(dir, name, flags)?;
    Ok(())
}

/// The target of the symlink `fd` refers to (opened with
/// `O_PATH | O_NOFOLLOW`).
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    // An empty name makes readlinkat(2) read the link `fd` itself refers to.
    Ok(rustix::fs::readlinkat(fd, c"", Vec::new())?.into_bytes())
}

/// The names in directory `dir`, without `.` and `..`, in directory order.
/// Reads through a descriptor of its own, so `dir`'s offset is untouched.
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    Ok(names)
}

/// A list or value of extended attributes: `size()` tells how big it is,
/// `fill(buf)` reads it; the buffer grows while the value grows under it
/// (`ERANGE`).
fn xattr_buffer(
    size: impl Fn() -> rustix::io::Result<usize>,
    fill: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<Vec<u8>> {
    loop {
        let mut buf = vec![0u8; size()?];
        match fill(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The extended attributes of the file `fd` refers to, as (name, value).
///
/// Goes through `/proc/self/fd`, which reaches the file itself even when
/// `fd` is an `O_PATH` descriptor of a symlink or device, where the `f*xattr`
/// calls fail (`EBADF`). A filesystem without xattrs has none.
pub fn xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use rustix::fs::{getxattr, getxattr_query, listxattr, listxattr_query};
    let path = cstring(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let path = path.as_c_str();
    let list = xattr_buffer(|| listxattr_query(path), |buf| listxattr(path, buf));
    let list = match list {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        other => other?,
    };
    let mut out = Vec::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = cstring(name)?;
        let cname = cname.as_c_str();
        let value = xattr_buffer(
            || getxattr_query(path, cname),
            |buf| getxattr(path, cname, buf),
        );
        match value {
            Ok(value) => out.push((name.to_vec(), value)),
            // Removed since it was listed.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Sets access and modification times of `path`, following symlinks.
pub fn utimens(path: &CStr, atime: (i64, u32), mtime: (i64, u32)) -> io::Result<()> {
    let ts = |(secs, nanos): (i64, u32)| Timespec {
        tv_sec: secs,
        tv_nsec: nanos.into(),
    };
    let times = Timestamps {
        last_access: ts(atime),
        last_modification: ts(mtime),
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::empty())?;
    Ok(())
}

/// The set of `signals`.
pub fn signal_set(signals: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain old data; sigemptyset initializes it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    check(unsafe { libc::sigemptyset(&mut set) })?;
    for &signal in signals {
        // SAFETY: `set` is an initialized sigset_t.
        check(unsafe { libc::sigaddset(&mut set, signal) })?;
    }
    Ok(set)
}

/// Blocks `set` in the calling thread, and so in the threads it starts.
pub fn block_signals(set: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: `set` is an initialized sigset_t; the old mask is not wanted.
    match unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, set, std::ptr::null_mut()) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Makes `set` the calling process's signal mask. Async-signal-safe (it
/// is sigprocmask): used between fork and exec.
pub fn set_signal_mask(set: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: `set` is an initialized sigset_t; the old mask is not wanted.
    check(unsafe { libc::sigprocmask(libc::SIG_SETMASK, set, std::ptr::null_mut()) })?;
    Ok(())
}

/// Waits for one of the (blocked) signals in `set`; returns it and the pid
/// of its sender.
pub fn wait_signal(set: &libc::sigset_t) -> io::Result<(libc::c_int, i32)> {
    // SAFETY: siginfo_t is plain old data; all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `set` is initialized and `info` is writable.
        match check(unsafe { libc::sigwaitinfo(set, &mut info) }) {
            // SAFETY: sigwaitinfo filled `info`; for signals sent with
            // kill(2) the sender's pid is set (0 for the kernel's own).
            Ok(signal) => return Ok((signal, unsafe { info.si_pid() })),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `_IOW('R', 0x03, int[2])` from <linux/random.h>.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;

/// `_IO('R', 0x07)` from <linux/random.h>.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

/// Reseeds the kernel's CRNG from its input pool now, rather than at its
/// next scheduled reseed: what [`add_entropy`] added reaches the very next
/// read. Matters after a restore from a template, when every clone starts
/// with the same CRNG state.
pub fn reseed_crng(random: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: this ioctl takes no argument.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) })?;
    Ok(())
}

/// Mixes `bytes` into the kernel RNG, crediting each bit as entropy.
pub fn add_entropy(random: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    let len = libc::c_int::try_from(bytes.len())
        .ok()
        .filter(|len| len.checked_mul(8).is_some())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&(len * 8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: `info` holds a complete rand_pool_info whose buf_size matches
    // the bytes that follow; the kernel only reads it (copy_from_user, which
    // needs no alignment).
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_has_no_rust_suffix() {
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
        assert_eq!(strerror(libc::EPERM), "Operation not permitted");
    }
}
