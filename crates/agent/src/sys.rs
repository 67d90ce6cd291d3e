//! Thin wrappers over the system calls std does not offer, each returning
//! `io::Result` with the errno of the failure.
//!
//! They go through rustix, which checks arguments and descriptors in its
//! types; raw `libc` remains only where rustix has no safe call: signal
//! masks and `sigwaitinfo`, `kill` with a signal number chosen by the host,
//! the RNG ioctls, and [`spawn`]'s `clone` and `execve`.

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

/// Detaches the mount at `target` (`MNT_DETACH`): it lives on for as long
/// as something uses it.
pub fn unmount_detach(target: &str) -> io::Result<()> {
    rustix::mount::unmount(cstring(target)?, rustix::mount::UnmountFlags::DETACH)?;
    Ok(())
}

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
/// The device lets go of its file when its last user (the mount) is gone.
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// Attaches `image` read-only to a free loop device, which lets go of it
/// when its last user closes it; returns the device's path and an open
/// descriptor of it, which must stay open until the device has another
/// user (a mount), or the device is cleared at once.
pub fn loop_attach(image: BorrowedFd<'_>) -> io::Result<(String, std::fs::File)> {
    let control = std::fs::File::open("/dev/loop-control")?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
    let number = check(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
    let path = format!("/dev/loop{number}");
    let device = std::fs::File::options().read(true).open(&path)?;
    let config = LoopConfig {
        fd: u32::try_from(image.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        block_size: 0,
        info: LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset: 0,
            sizelimit: 0,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
            file_name: [0; 64],
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
    // `config` is (repr(C), the kernel's layout), alive for the call.
    check(unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) })?;
    Ok((path, device))
}

/// The metadata of `path` resolved with `root` as its root directory
/// (`RESOLVE_IN_ROOT`: `..` and absolute symbolic links stay inside),
/// following a final symbolic link.
pub fn metadata_in_root(
    root: BorrowedFd<'_>,
    path: &std::path::Path,
) -> io::Result<std::fs::Metadata> {
    let fd = retry(|| {
        rustix::fs::openat2(
            root,
            path,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            rustix::fs::ResolveFlags::IN_ROOT,
        )
    })?;
    std::fs::File::from(fd).metadata()
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

/// Sets the calling thread's nice value; threads it starts inherit it.
pub fn set_nice(nice: i32) -> io::Result<()> {
    rustix::process::setpriority_process(None, nice)?;
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
    set_flag(fd, OFlags::NONBLOCK, nonblocking)
}

/// Turns `O_DIRECT` on or off; `EINVAL` where the filesystem has no
/// direct I/O (tmpfs).
pub fn set_direct(fd: impl AsFd, direct: bool) -> io::Result<()> {
    set_flag(fd, OFlags::DIRECT, direct)
}

fn set_flag(fd: impl AsFd, flag: OFlags, on: bool) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    let flags = if on { flags | flag } else { flags - flag };
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

/// A process image to start with [`spawn`]: everything the child needs,
/// built before it exists, because the child may not allocate.
pub struct SpawnPlan<'a> {
    pub program: &'a CStr,
    /// Null-terminated, as `execve` takes them ([`CStrings::pointers`]).
    pub argv: &'a [*const libc::c_char],
    pub envp: &'a [*const libc::c_char],
    pub cwd: &'a CStr,
    /// The directory the child changes root into before `cwd`, if any.
    pub root: Option<&'a CStr>,
    /// What becomes the child's descriptors 0, 1 and 2.
    pub stdio: [BorrowedFd<'a>; 3],
    /// Make the terminal on descriptor 0 the child's controlling terminal
    /// (`TIOCSCTTY`; the child leads a new session).
    pub controlling_terminal: bool,
    pub umask: u32,
    /// The child's nice value; `None` keeps the caller's.
    pub nice: Option<i32>,
    /// Supplementary groups, group and user; `None` keeps the caller's.
    pub ids: Option<(&'a [Gid], Gid, Uid)>,
    /// Resource limits (`RLIMIT_*` number, limits) set in this order.
    pub rlimits: &'a [(u32, libc::rlimit)],
}

/// Owned C strings and the null-terminated pointer array `execve` wants.
pub struct CStrings {
    _strings: Vec<CString>,
    pointers: Vec<*const libc::c_char>,
}

impl CStrings {
    /// An interior NUL is `InvalidInput`.
    pub fn new<I: IntoIterator<Item = Vec<u8>>>(items: I) -> io::Result<CStrings> {
        let strings = items
            .into_iter()
            .map(cstring)
            .collect::<io::Result<Vec<_>>>()?;
        let pointers = strings
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Ok(CStrings {
            _strings: strings,
            pointers,
        })
    }

    /// Valid while `self` lives: the strings never move (each `CString`
    /// owns its heap buffer).
    pub fn pointers(&self) -> &[*const libc::c_char] {
        &self.pointers
    }
}

/// What the child of [`spawn`] reports back through the memory it shares
/// with its parent until it execs.
struct SpawnShared<'a> {
    plan: &'a SpawnPlan<'a>,
    /// The step that failed and its errno; 0 while none has.
    step: std::sync::atomic::AtomicU8,
    errno: std::sync::atomic::AtomicI32,
    /// The index in `plan.rlimits` of the limit that failed to be set.
    rlimit: std::sync::atomic::AtomicUsize,
}

/// The steps of a child's setup, as reported when one fails.
const SPAWN_STEPS: [&str; 11] = [
    "",
    "start a session",
    "set user and groups",
    "set priority",
    "set up standard descriptors",
    "change directory",
    "reset signals",
    EXEC_STEP,
    "set the controlling terminal",
    "change root",
    "set resource limit",
];

/// The step of a spawn's child that sets its resource limits.
const RLIMIT_STEP: u8 = 10;

/// The last step of a spawn's child: running the program.
pub const EXEC_STEP: &str = "exec";

/// Stack for the child until it execs: its frames are small and make no
/// allocations.
const SPAWN_STACK: usize = 64 << 10;

/// Starts `plan` as a child sharing the caller's memory until it execs
/// (`CLONE_VM | CLONE_VFORK`, as `posix_spawn` does): nothing is copied
/// (forking the agent costs a copy of its page tables and a fault on each
/// page either side writes next, a millisecond under emulation), and the
/// call returns once the program runs. The child is a new session with
/// no signals blocked or ignored. Returns its pid; a failure in the child
/// is the error of the step that failed, and the child is reaped.
pub fn spawn(plan: &SpawnPlan<'_>) -> io::Result<u32> {
    use std::sync::atomic::Ordering;
    // A source already at 0, 1 or 2 could be overwritten by another's
    // dup2 or kept close-on-exec; the Rust runtime keeps those three open,
    // so the caller's pipes never land there.
    if plan.stdio.iter().any(|fd| fd.as_raw_fd() <= 2) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a standard descriptor of the child is one of 0, 1 or 2",
        ));
    }
    let shared = SpawnShared {
        plan,
        step: 0.into(),
        errno: 0.into(),
        rlimit: 0.into(),
    };
    let mut stack = vec![0u8; SPAWN_STACK];
    // The stack grows down from its (16-byte aligned) end.
    let top = (stack.as_mut_ptr() as usize + SPAWN_STACK) & !15;
    let all = full_signal_set()?;
    // SAFETY: an all-zero sigset_t is a valid value to be overwritten.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // Signals stay blocked while the child runs on this thread's memory:
    // no handler of the agent's may run in it. It sets its own mask.
    // SAFETY: both pointers are to live sigset_t values.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    if blocked != 0 {
        return Err(io::Error::from_raw_os_error(blocked));
    }
    // SAFETY: `spawn_child` runs on `stack`, which outlives it: with
    // CLONE_VFORK this thread is suspended until the child execs or exits,
    // and `stack` and `shared` live until after that. The child only makes
    // system calls on memory prepared before (see `spawn_child`).
    let pid = unsafe {
        libc::clone(
            spawn_child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_ref(&shared).cast_mut().cast(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: `old` holds the mask read above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid == -1 {
        return Err(clone_error);
    }
    let step = usize::from(shared.step.load(Ordering::Acquire));
    if step == 0 {
        return Ok(pid.unsigned_abs());
    }
    // The child exited at once: reap it, it is nobody else's business.
    if let Some(child) = Pid::from_raw(pid) {
        let _ = retry(|| rustix::process::waitpid(Some(child), WaitOptions::empty()));
    }
    let errno = io::Error::from_raw_os_error(shared.errno.load(Ordering::Acquire));
    let failed_limit = (step == usize::from(RLIMIT_STEP))
        .then(|| plan.rlimits.get(shared.rlimit.load(Ordering::Acquire)))
        .flatten();
    let step = match failed_limit {
        Some((resource, limit)) => {
            let name = cc_protocol::rlimit_name(*resource)
                .map_or_else(|| format!("resource {resource}"), str::to_owned);
            format!(
                "set {name} to soft {} hard {}",
                limit_text(limit.rlim_cur),
                limit_text(limit.rlim_max)
            )
        }
        None => SPAWN_STEPS
            .get(step)
            .copied()
            .unwrap_or("set up")
            .to_owned(),
    };
    Err(io::Error::new(errno.kind(), SpawnError { step, errno }))
}

/// A resource limit as `ulimit` prints it.
fn limit_text(limit: libc::rlim_t) -> String {
    match limit {
        libc::RLIM_INFINITY => "unlimited".to_owned(),
        n => n.to_string(),
    }
}

/// A failure of the child of [`spawn`] before its program ran.
#[derive(Debug)]
pub struct SpawnError {
    pub step: String,
    pub errno: io::Error,
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.errno)
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.errno)
    }
}

fn full_signal_set() -> io::Result<libc::sigset_t> {
    // SAFETY: an all-zero sigset_t is a valid value to be initialised.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t.
    check(unsafe { libc::sigfillset(&mut set) })?;
    Ok(set)
}

/// The child of [`spawn`]. It shares the parent's memory and runs on the
/// parent's thread-local storage, so it may only make system calls: no
/// allocation, no locks, no panics. rustix makes its calls directly,
/// without libc's per-process bookkeeping (libc's `setuid` would signal
/// the parent's threads); the libc calls here are plain system call
/// wrappers.
extern "C" fn spawn_child(arg: *mut libc::c_void) -> libc::c_int {
    use std::sync::atomic::Ordering;
    // SAFETY: `arg` is the `SpawnShared` that `spawn` keeps alive until
    // this child has exec'd or exited.
    let shared = unsafe { &*arg.cast::<SpawnShared<'_>>() };
    let plan = shared.plan;
    let fail = |step: u8, errno: i32| -> libc::c_int {
        shared.errno.store(errno, Ordering::Release);
        shared.step.store(step, Ordering::Release);
        // SAFETY: ends this child only; _exit runs no handlers.
        unsafe { libc::_exit(127) }
    };
    let errno = |e: rustix::io::Errno| e.raw_os_error();
    if let Err(e) = rustix::process::setsid() {
        return fail(1, errno(e));
    }
    // Before the ids change: changing root takes CAP_SYS_CHROOT.
    if let Some(root) = plan.root {
        if let Err(e) = rustix::process::chroot(root) {
            return fail(9, errno(e));
        }
    }
    // Before the ids change too: raising a hard limit takes
    // CAP_SYS_RESOURCE, which a user other than root does not have.
    for (i, (resource, limit)) in plan.rlimits.iter().enumerate() {
        // SAFETY: setrlimit(2) reads the one `rlimit` passed, prepared
        // before the clone; glibc's wrapper is the bare system call.
        if unsafe { libc::setrlimit(*resource, limit) } == -1 {
            shared.rlimit.store(i, Ordering::Release);
            let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return fail(RLIMIT_STEP, e);
        }
    }
    if let Some((groups, gid, uid)) = plan.ids {
        let set = rustix::thread::set_thread_groups(groups)
            .and_then(|()| rustix::thread::set_thread_gid(gid))
            .and_then(|()| rustix::thread::set_thread_uid(uid));
        if let Err(e) = set {
            return fail(2, errno(e));
        }
    }
    if let Some(nice) = plan.nice {
        if let Err(e) = rustix::process::setpriority_process(None, nice) {
            return fail(3, errno(e));
        }
    }
    rustix::process::umask(Mode::from_raw_mode(plan.umask));
    let [stdin, stdout, stderr] = plan.stdio;
    let dups = rustix::stdio::dup2_stdin(stdin)
        .and_then(|()| rustix::stdio::dup2_stdout(stdout))
        .and_then(|()| rustix::stdio::dup2_stderr(stderr));
    if let Err(e) = dups {
        return fail(4, errno(e));
    }
    if plan.controlling_terminal {
        if let Err(e) = rustix::process::ioctl_tiocsctty(rustix::stdio::stdin()) {
            return fail(8, errno(e));
        }
    }
    if let Err(e) = rustix::process::chdir(plan.cwd) {
        return fail(5, errno(e));
    }
    // SAFETY: plain system call wrappers on values prepared before the
    // clone. SIGPIPE is ignored by the Rust runtime and an ignored signal
    // stays ignored across exec; programs expect the default.
    let reset = unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL) == libc::SIG_ERR
            || libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) == -1
    };
    if reset {
        return fail(6, io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: the program, argv and envp are NUL-terminated strings and
    // null-terminated arrays that outlive the call.
    unsafe {
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        )
    };
    fail(7, io::Error::last_os_error().raw_os_error().unwrap_or(0))
}
