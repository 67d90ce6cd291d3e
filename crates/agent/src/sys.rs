//! Thin wrappers over the system calls std does not offer, each returning
//! `io::Result` with the errno of the failure.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `bytes` as a C string; an interior NUL is `InvalidInput`.
pub fn cstring(bytes: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

/// The C library's text for `errno`, without Rust's "(os error N)" suffix.
pub fn strerror(errno: i32) -> String {
    let mut buf = [0u8; 128];
    // SAFETY: `buf` is writable for its whole length, which is passed along;
    // the XSI strerror_r (libc links it for this symbol) NUL-terminates it.
    let ret = unsafe { libc::strerror_r(errno, buf.as_mut_ptr().cast(), buf.len()) };
    match CStr::from_bytes_until_nul(&buf) {
        Ok(text) if ret == 0 => text.to_string_lossy().into_owned(),
        _ => format!("error {errno}"),
    }
}

pub fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstring(source)?;
    let target = cstring(target)?;
    let fstype = fstype.map(cstring).transpose()?;
    let data = data.map(cstring).transpose()?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call, or null where mount(2) allows it (fstype, data).
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    })?;
    Ok(())
}

pub fn chroot(path: &str) -> io::Result<()> {
    let path = cstring(path)?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::chroot(path.as_ptr()) })?;
    Ok(())
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`, which outlives the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

pub fn set_realtime_clock(secs: i64, nanos: u32) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos.into(),
    };
    // SAFETY: `ts` is a valid timespec that outlives the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok(())
}

/// The kernel release, as `uname -r` prints it.
pub fn kernel_release() -> io::Result<String> {
    // SAFETY: utsname is plain old data; all-zero bytes are a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    check(unsafe { libc::uname(&mut uts) })?;
    // SAFETY: uname(2) filled `release` with a NUL-terminated string.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

/// Sends `signal` to `pid` (a negative pid names a process group).
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes no pointers.
    check(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// Async-signal-safe: used between fork and exec.
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid(2) takes no arguments.
    check(unsafe { libc::setsid() })?;
    Ok(())
}

/// Sets the calling thread's nice value; threads it starts inherit it.
/// Async-signal-safe: used between fork and exec.
pub fn set_nice(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority(2) takes no pointers; who 0 is the calling thread.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) })?;
    Ok(())
}

/// Async-signal-safe: used between fork and exec.
pub fn setgroups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: the pointer and length describe `groups`, which outlives the call.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
    Ok(())
}

/// Async-signal-safe: used between fork and exec.
pub fn setgid(gid: u32) -> io::Result<()> {
    // SAFETY: setgid(2) takes no pointers.
    check(unsafe { libc::setgid(gid) })?;
    Ok(())
}

/// Async-signal-safe: used between fork and exec.
pub fn setuid(uid: u32) -> io::Result<()> {
    // SAFETY: setuid(2) takes no pointers.
    check(unsafe { libc::setuid(uid) })?;
    Ok(())
}

pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// Restarts the machine; with `reboot=t` and QEMU's `-no-reboot` that ends
/// the VM. Returns only on failure.
pub fn reboot() -> io::Error {
    // SAFETY: reboot(2) takes no pointers.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// A pipe as (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2(2) writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A non-blocking, close-on-exec eventfd used as a level-triggered flag.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Raises the flag of an [`eventfd`]; it stays readable from then on.
pub fn eventfd_raise(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes the 8 bytes of `one`, which outlives the call. The only
    // possible failure is an overflowing counter, which leaves it raised.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// Waits until one of `fds` has an event or `timeout` passes; returns how
/// many have events. Interrupted waits are retried.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let timeout = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    loop {
        // SAFETY: the pointer and length describe `fds`, which outlives the call.
        match check(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) }) {
            Ok(n) => return Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

pub fn pollfd(fd: BorrowedFd<'_>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// Shuts a socket down in both directions; on a listening socket this
/// wakes a thread blocked in `accept`.
pub fn shutdown_socket(fd: BorrowedFd<'_>) {
    // SAFETY: shutdown(2) takes no pointers; the descriptor is borrowed and
    // stays open. Failure (not a socket, already shut) leaves nothing to do.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
}

/// Makes `target` a copy of `fd` (clearing close-on-exec on it).
pub fn dup2(fd: impl AsFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2(2) takes no pointers; replacing `target` is the intent,
    // and callers pass only the standard descriptors.
    check(unsafe { libc::dup2(fd.as_fd().as_raw_fd(), target) })?;
    Ok(())
}

pub fn set_nonblocking(fd: impl AsFd, nonblocking: bool) -> io::Result<()> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: F_GETFL takes no pointer argument.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let flags = if nonblocking {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL takes an integer argument.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) })?;
    Ok(())
}

/// Blocks until some child has exited and returns its pid without reaping
/// it, so the pid cannot be reused until [`reap`] is called.
pub fn wait_exited() -> io::Result<u32> {
    // SAFETY: siginfo_t is plain old data; all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `info` is a valid, writable siginfo_t.
        let ret = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        match check(ret) {
            // SAFETY: waitid(2) succeeded for an exited child, so the
            // siginfo's child fields are the ones filled in.
            Ok(_) => return Ok(unsafe { info.si_pid() } as u32),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reaps the exited child `pid`; `None` if it was already reaped (std
/// reaps the child of a failed spawn itself).
pub fn reap(pid: u32) -> io::Result<Option<libc::c_int>> {
    let mut status = 0;
    // SAFETY: `status` is a valid, writable int.
    match check(unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) }) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(status)),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sets the file mode creation mask; returns the previous one.
/// Async-signal-safe: used between fork and exec.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask(2) takes no pointers and cannot fail.
    unsafe { libc::umask(mask) }
}

/// `openat(2)` relative to `dir`, or to the working directory for `None`.
/// `mode` applies when `flags` create a file.
pub fn openat(
    dir: Option<BorrowedFd<'_>>,
    name: &CStr,
    flags: libc::c_int,
    mode: u32,
) -> io::Result<OwnedFd> {
    let dir = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `name` is NUL-terminated and outlives the call; `mode` is the
    // variadic argument openat(2) reads when creating.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags, mode as libc::c_uint) })?;
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `unlinkat(2)`: removes `name` in `dir`, a directory with `AT_REMOVEDIR`.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

/// The target of the symlink `fd` refers to (opened with
/// `O_PATH | O_NOFOLLOW`).
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: the pointer and length describe `buf`; an empty name makes
        // readlinkat(2) read the link `fd` itself refers to.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        // A full buffer may mean a cut-off target: retry with more room.
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        buf.resize(buf.len() * 2, 0);
    }
}

/// A directory stream, closed (with its descriptor) on drop.
struct DirStream(std::ptr::NonNull<libc::DIR>);

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: the stream came from fdopendir and is closed only here.
        unsafe { libc::closedir(self.0.as_ptr()) };
    }
}

/// The names in directory `dir`, without `.` and `..`, in directory order.
/// Reads through a descriptor of its own, so `dir`'s offset is untouched.
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let own = openat(
        Some(dir),
        c".",
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )?;
    // SAFETY: `own` is an open directory descriptor.
    let stream = unsafe { libc::fdopendir(own.as_raw_fd()) };
    let stream = DirStream(std::ptr::NonNull::new(stream).ok_or_else(io::Error::last_os_error)?);
    // The stream owns the descriptor now and closes it.
    let _ = own.into_raw_fd();
    let mut names = Vec::new();
    loop {
        // readdir(3) reports errors only through errno, so clear it first.
        // SAFETY: __errno_location returns this thread's errno, always valid.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: the stream is open; the returned entry stays valid until
        // the next readdir on it, and is copied out before that.
        let entry = unsafe { libc::readdir(stream.0.as_ptr()) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(0) => Ok(names),
                _ => Err(e),
            };
        }
        // SAFETY: d_name of a returned entry is a NUL-terminated string.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
}

/// Calls `fill(buf)` as listxattr(2)/getxattr(2) are called, growing the
/// buffer while the value grows under it (`ERANGE`).
fn xattr_buffer(mut fill: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    loop {
        let size = usize::try_from(fill(&mut [])).map_err(|_| io::Error::last_os_error())?;
        let mut buf = vec![0u8; size];
        match usize::try_from(fill(&mut buf)) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(_) if io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE) => {}
            Err(_) => return Err(io::Error::last_os_error()),
        }
    }
}

/// The extended attributes of the file `fd` refers to, as (name, value).
///
/// Goes through `/proc/self/fd`, which reaches the file itself even when
/// `fd` is an `O_PATH` descriptor of a symlink or device, where the `f*xattr`
/// calls fail (`EBADF`). A filesystem without xattrs has none.
pub fn xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path = cstring(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let list = xattr_buffer(|buf| {
        // SAFETY: `path` is NUL-terminated; the pointer and length describe
        // `buf` (a zero length only asks for the size).
        unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    });
    let list = match list {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        other => other?,
    };
    let mut out = Vec::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = cstring(name)?;
        let value = xattr_buffer(|buf| {
            // SAFETY: as above, with `cname` NUL-terminated too.
            unsafe {
                libc::getxattr(
                    path.as_ptr(),
                    cname.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            }
        });
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
    let ts = |(secs, nanos): (i64, u32)| libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos.into(),
    };
    let times = [ts(atime), ts(mtime)];
    // SAFETY: `path` is NUL-terminated and `times` holds the two timespecs
    // utimensat(2) reads; both outlive the call.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) })?;
    Ok(())
}

/// `lseek(2)`; returns the new offset.
pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek(2) takes no pointers.
    let at = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    u64::try_from(at).map_err(|_| io::Error::last_os_error())
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
    }
}
