//! Message types. Field order is wire order: append, never reorder.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Every frame carries one message.
///
/// `Hello` must stay the first variant with `version` as its first field, so
/// that any future agent's greeting still decodes far enough to report its
/// version ([`crate::frame::hello_version`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Guest → host, the first frame on a connection.
    Hello { version: u32, agent: String },
    /// Host → guest: a request the agent answers with one `Response`.
    Request { id: u64, body: Request },
    /// Guest → host: the answer to request `id`.
    Response {
        id: u64,
        body: Result<Response, RemoteError>,
    },
    /// Bytes on a stream. Never empty.
    Data { stream: u32, bytes: ByteBuf },
    /// The sender will send no more data on `stream` (end of file).
    Eof { stream: u32 },
    /// The receiver consumed `bytes` more of `stream`: the sender may send
    /// that many more.
    Credit { stream: u32, bytes: u32 },
    /// The receiving end of `stream` is gone; the sender stops sending and
    /// its writers see a broken pipe.
    Reset { stream: u32 },
    /// Guest → host: process `process` ended. Sent after its exit was reaped,
    /// independent of its output streams, which end with their own `Eof`.
    Exited { process: u64, status: ExitStatus },
    /// Guest → host: listener `listener` accepted a connection from `peer`
    /// (`address:port`). Its bytes flow on the guest-numbered streams
    /// `from_guest` (guest → host) and `to_guest` (host → guest), already
    /// open with full windows. A host that no longer has the listener
    /// resets both.
    Accepted {
        listener: u64,
        peer: String,
        to_guest: u32,
        from_guest: u32,
    },
    /// Guest → host: the agent is ending the guest for `reason` (a power-off
    /// asked for inside the guest, or the host's `Shutdown`) and sends
    /// nothing more. Sent before it kills the remaining processes, so their
    /// deaths never reach the host as exits or ends of file.
    Goodbye { reason: String },
}

/// Host → guest requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Build the root filesystem and identity; answered by `Ready`.
    Setup(Box<Setup>),
    /// Start a process; answered by `Started` or an error.
    Exec(Exec),
    /// Send `signal` to `process`: with `group`, to its process group (and,
    /// for one started with `pty`, to every process of its session), else
    /// to that process alone; answered by `Done`.
    Signal {
        process: u64,
        signal: i32,
        group: bool,
    },
    /// Answered by `Pong`; measures the channel.
    Ping,
    /// Sync filesystems and power off; answered by `Done` just before.
    Shutdown,
    /// A filesystem operation on a guest path or open handle.
    Fs(FsRequest),
    /// Stream the file at `path` to the host on guest → host stream
    /// `stream`; answered by `Size` once the file is open, then the bytes
    /// follow on the stream, ended by `Eof` (or `Reset` on a read error).
    ReadFile { path: ByteBuf, stream: u32 },
    /// Create or truncate the file at `path` (permissions `mode` when
    /// created) and fill it with what the host sends on host → guest stream
    /// `stream` until `Eof`; answered by `Done` once written and closed. An
    /// error answers at once and resets the stream.
    WriteFile {
        path: ByteBuf,
        mode: u32,
        stream: u32,
    },
    /// Sync, then stream the root's writable layer to the host on guest →
    /// host stream `stream` as an OCI layer tarball (deletions as `.wh.`
    /// whiteouts, replaced directories as opaque markers), leaving out
    /// paths matching any of `exclude` (globs on guest paths: `*`, `?`,
    /// `**`). Answered by `Done` when the stream has started; the stream
    /// ends with `Eof` (or `Reset` on an error).
    SnapshotUpper { stream: u32, exclude: Vec<String> },
    /// Connect to the IPv4 `address` and `port` inside the guest; answered
    /// by `Connected` once connected. Bytes then flow on `from_guest` (guest →
    /// host) and `to_guest` (host → guest); `Eof` on either is a half
    /// close, `Reset` aborts the connection.
    Dial {
        address: String,
        port: u16,
        to_guest: u32,
        from_guest: u32,
    },
    /// Listen on the IPv4 `address` and `port` inside the guest (port 0
    /// picks a free one) as host-numbered listener `listener`; answered by
    /// `Bound` with the port, then each connection arrives as
    /// [`Message::Accepted`].
    Listen {
        listener: u64,
        address: String,
        port: u16,
    },
    /// Stop listener `listener`; answered by `Done`. Connections it
    /// accepted stay open.
    Unlisten { listener: u64 },
    /// Mount the root filesystem (and the runtime filesystems under it),
    /// write `/etc/resolv.conf` for `nameservers`, bring up loopback and
    /// configure `network`, ahead of a `Setup` that then leaves what
    /// matches as it is; answered by `Done`. Sent only to a guest about to
    /// be saved as a warm-start template: nothing here is per instance.
    Prepare(Box<Prepare>),
    /// Answered by `Trace` with the spans the agent recorded since the last
    /// `Trace` (at most [`crate::TRACE_LIMIT`]); recording continues while
    /// `on`. For benchmarks: recording costs a clock read per span.
    Trace { on: bool },
    /// Read up to `len` bytes of open file `handle` at its offset and
    /// stream them to the host on guest → host stream `stream`, ended by
    /// `Eof` (fewer bytes only at the end of the file); answered by `Done`
    /// once the handle is found, before the bytes follow. The path and
    /// flow control of `ReadFile`, for handles.
    ReadHandle { handle: u64, len: u64, stream: u32 },
    /// Write what the host sends on host → guest stream `stream`, until
    /// `Eof`, to open file `handle` at its offset; answered by `Done` once
    /// written. The path and flow control of `WriteFile`, for handles.
    WriteHandle { handle: u64, stream: u32 },
    /// Set the window size of the terminal of `process` (started with
    /// `pty`); its foreground process group gets `SIGWINCH`. Answered by
    /// `Done`; `NoSuchProcess` once it exited, `InvalidArgument` if it has
    /// no terminal.
    Resize { process: u64, size: WindowSize },
    /// Set the guest's wall clock to this host time (after a resume: the
    /// clock stood still while the guest was paused); answered by `Done`.
    SyncClock(UnixTime),
    /// Mount the erofs image `dir/root.erofs` (written there before, e.g.
    /// by `WriteFile`) read-only through a loop device at `dir/lower`, a
    /// tmpfs at `dir/rw` for its writable layer, their overlay at
    /// `dir/root`, and in it a `/proc`, the guest's `/dev` and a fresh
    /// `/tmp`: a root for processes started with [`Exec::root`] (a pod's
    /// container). Answered by `Done`; on failure nothing stays mounted.
    MountRoot { dir: ByteBuf },
    /// Detach everything `MountRoot` mounted under `dir` and remove `dir`
    /// (the image, the writable layer); answered by `Done`. A missing
    /// `dir` is no error.
    UnmountRoot { dir: ByteBuf },
    /// Stop sending before the guest is saved: the agent finishes the
    /// frame it is writing, holds every later one (its writers wait), and
    /// answers `Done` as its last frame. The host sends nothing more until
    /// `Unquiesce` or, in a restored copy, `Rebirth`: so no frame is half
    /// written or queued on the port when the guest is saved.
    Quiesce,
    /// After a save, in the guest that was saved: the held writers go on,
    /// as if nothing happened; answered by `Done`.
    Unquiesce,
    /// The first request on the channel of a guest restored from a save
    /// (a branch, a park, a template): the agent drops every stream, open
    /// file, listener and connection of the channel it had, keeps its
    /// processes running (their output read and dropped, their input at
    /// end of file, their exits not reported), and serves this channel
    /// afresh; answered by `Done` on it. A rebirth repeated with the same
    /// `token` (the host resends it while the agent may be re-opening its
    /// port) is answered without dropping anything again.
    Rebirth { token: u64 },
}

impl Request {
    /// The host-numbered streams this request names: from the moment the
    /// agent reads it, frames for them are no protocol violation, whether
    /// or not the request succeeds. The iterator owns the ids: the request
    /// can be moved while it is held.
    pub fn streams(&self) -> impl Iterator<Item = u32> + use<> {
        let ids = match self {
            Request::Exec(exec) => {
                let out = |s: Stdio| match s {
                    Stdio::Stream(id) => Some(id),
                    Stdio::Null | Stdio::Stdout => None,
                };
                [exec.stdin, out(exec.stdout), out(exec.stderr)]
            }
            Request::ReadFile { stream, .. }
            | Request::WriteFile { stream, .. }
            | Request::SnapshotUpper { stream, .. }
            | Request::ReadHandle { stream, .. }
            | Request::WriteHandle { stream, .. } => [Some(*stream), None, None],
            Request::Dial {
                to_guest,
                from_guest,
                ..
            } => [Some(*to_guest), Some(*from_guest), None],
            Request::Setup(_)
            | Request::Signal { .. }
            | Request::Ping
            | Request::Shutdown
            | Request::Fs(_)
            | Request::Listen { .. }
            | Request::Unlisten { .. }
            | Request::Prepare(_)
            | Request::Trace { .. }
            | Request::Resize { .. }
            | Request::SyncClock(_)
            | Request::MountRoot { .. }
            | Request::UnmountRoot { .. }
            | Request::Quiesce
            | Request::Unquiesce
            | Request::Rebirth { .. } => [None; 3],
        };
        ids.into_iter().flatten()
    }
}

/// Filesystem operations. Paths are absolute guest paths (bytes). Errors
/// carry the guest `errno`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsRequest {
    /// `Stat`; `follow: false` is `lstat`.
    Stat {
        path: ByteBuf,
        follow: bool,
    },
    /// `Entries`, sorted by name, without `.` and `..`.
    ReadDir {
        path: ByteBuf,
    },
    /// `Done`; `all` creates missing parents and accepts an existing directory.
    Mkdir {
        path: ByteBuf,
        mode: u32,
        all: bool,
    },
    /// `Done`; `all` removes a directory tree and accepts a missing path.
    Remove {
        path: ByteBuf,
        all: bool,
    },
    Rename {
        from: ByteBuf,
        to: ByteBuf,
    },
    /// Creates `link` pointing at `target`.
    Symlink {
        target: ByteBuf,
        link: ByteBuf,
    },
    /// `Link`.
    Readlink {
        path: ByteBuf,
    },
    /// Permission bits (`0o7777`).
    Chmod {
        path: ByteBuf,
        mode: u32,
    },
    /// `None` leaves that id unchanged; never follows a final symlink.
    Chown {
        path: ByteBuf,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    Chtimes {
        path: ByteBuf,
        atime: UnixTime,
        mtime: UnixTime,
    },
    /// Opens `path` as handle `handle` (chosen by the host); `flags` use
    /// the `O_*` numbering of this crate. `Stat` of the opened file.
    Open {
        handle: u64,
        path: ByteBuf,
        flags: u32,
        mode: u32,
    },
    Close {
        handle: u64,
    },
    /// `Offset`; `whence` 0 = start, 1 = current, 2 = end.
    Seek {
        handle: u64,
        offset: i64,
        whence: u8,
    },
    Fstat {
        handle: u64,
    },
    Truncate {
        handle: u64,
        len: u64,
    },
    Sync {
        handle: u64,
    },
}

/// Open flags, in this protocol's own numbering (the agent translates them
/// to the guest's). Access mode is the low two bits.
pub mod open_flags {
    pub const O_RDONLY: u32 = 0;
    pub const O_WRONLY: u32 = 1;
    pub const O_RDWR: u32 = 2;
    pub const O_APPEND: u32 = 0x8;
    pub const O_CREATE: u32 = 0x200;
    pub const O_TRUNC: u32 = 0x400;
    pub const O_EXCL: u32 = 0x800;
    /// Every flag this protocol knows.
    pub const ALL: u32 = O_WRONLY | O_RDWR | O_APPEND | O_CREATE | O_TRUNC | O_EXCL;
}

/// What `stat` says of a guest file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// Type and permission bits, as `st_mode`.
    pub mode: u32,
    pub size: u64,
    pub mtime: UnixTime,
    pub uid: u32,
    pub gid: u32,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: ByteBuf,
    /// Type and permission bits of the entry itself (not followed).
    pub mode: u32,
}

/// A host directory shared into the guest (virtio 9p, tag `tag`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub tag: String,
    /// Absolute guest path; created if missing.
    pub guest_path: String,
    pub read_only: bool,
}

/// Guest → host answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Setup finished; the guest runs `kernel` (its `uname -r`).
    Ready {
        kernel: String,
    },
    /// The process runs with guest pid `pid`.
    Started {
        pid: u32,
    },
    Done,
    Pong,
    Stat(FileStat),
    Entries(Vec<DirEntry>),
    Link(ByteBuf),
    Offset(u64),
    /// `ReadFile`: the file is open and this long.
    Size(u64),
    /// `Listen`: listening on this port.
    Bound {
        port: u16,
    },
    /// `Dial`: connected from this guest address (`ip:port`).
    Connected {
        local: String,
    },
    /// `Trace`: the spans recorded, in the order they ended.
    Trace(Vec<Span>),
}

/// A measured phase of the agent's work (see [`Request::Trace`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// What was measured, e.g. `exec.spawn`.
    pub name: String,
    pub nanos: u64,
}

/// What a warm-start template's guest sets up before it is saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub root: RootSpec,
    pub nameservers: Vec<String>,
    pub network: Option<NetConfig>,
}

/// What the guest is told at boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    pub hostname: String,
    /// Where the root filesystem comes from; `None` keeps the initramfs.
    pub root: Option<RootSpec>,
    /// Host wall clock at the time of the request.
    pub clock: UnixTime,
    /// Fresh host entropy to credit to the guest's RNG.
    pub entropy: ByteBuf,
    /// Nameservers for `/etc/resolv.conf`; empty leaves the image's file.
    pub nameservers: Vec<String>,
    /// Extra `/etc/hosts` lines: (address, names).
    pub hosts: Vec<(String, String)>,
    /// Host directories to mount, in order (a later one may sit inside an
    /// earlier one).
    pub mounts: Vec<Mount>,
    /// The guest's network interface, when it has one.
    pub network: Option<NetConfig>,
}

/// Static configuration of the guest's one network interface (the host's
/// user-mode network stack answers on `gateway` and forwards out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Interface name in the guest (`eth0`).
    pub interface: String,
    /// IPv4 address, e.g. `10.0.2.15`.
    pub address: String,
    pub prefix_len: u8,
    /// Default route, e.g. `10.0.2.2`.
    pub gateway: String,
    /// The interface's MTU (the user-mode stack's frames are up to 64 KiB).
    pub mtu: u32,
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixTime {
    pub secs: i64,
    pub nanos: u32,
}

/// Read-only lower block devices plus a writable upper block device,
/// combined by overlayfs into the root. Devices are found by virtio serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSpec {
    /// Lower layers, uppermost first (a filesystem snapshot's layer sits
    /// above the image it was taken from).
    pub lowers: Vec<Lower>,
    pub upper_serial: String,
}

/// One read-only layer of the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lower {
    pub serial: String,
    /// Filesystem type (`erofs`, `ext4`).
    pub fstype: String,
}

/// A process to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// Host-chosen id, unique on the connection; names it in `Exited` and `Signal`.
    pub process: u64,
    /// Program and arguments; the program is looked up in `PATH` if it has no `/`.
    pub argv: Vec<ByteBuf>,
    /// `KEY=VALUE` entries over the defaults (`PATH`, `HOME` of the user, `TERM`).
    pub env: Vec<ByteBuf>,
    /// Working directory; `None` is the user's home, or `/`.
    pub cwd: Option<ByteBuf>,
    /// `name`, `uid`, `uid:gid` or `name:group`; `None` is root.
    pub user: Option<String>,
    /// Stream the host writes stdin on; `None` is `/dev/null`.
    pub stdin: Option<u32>,
    pub stdout: Stdio,
    pub stderr: Stdio,
    /// Run on a new pseudo-terminal of this size as the controlling
    /// terminal of its session: stdin, stdout and stderr are its slave;
    /// `stdin` feeds its master and `stdout` carries everything the
    /// terminal prints (`stderr` must be `Null`). `TERM` comes from `env`.
    pub pty: Option<WindowSize>,
    /// Run changed into this guest directory as its root (`chroot`, e.g.
    /// one `MountRoot` made); `cwd` and the program are then looked up
    /// inside it. `None` is the guest's root.
    pub root: Option<ByteBuf>,
    /// Resource limits set in the process before it runs, in order; one
    /// the kernel refuses fails the start.
    pub rlimits: Vec<Rlimit>,
}

/// One resource limit of a process (`setrlimit(2)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// The Linux `RLIMIT_*` number (x86_64 numbering, the guest's).
    pub resource: u32,
    /// `u64::MAX` is unlimited (`RLIM_INFINITY`).
    pub soft: u64,
    pub hard: u64,
}

/// The OCI (and C) names of the Linux resource limits, indexed by their
/// `RLIMIT_*` number.
pub const RLIMIT_NAMES: [&str; 16] = [
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_CORE",
    "RLIMIT_RSS",
    "RLIMIT_NPROC",
    "RLIMIT_NOFILE",
    "RLIMIT_MEMLOCK",
    "RLIMIT_AS",
    "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
];

/// The name of resource limit number `resource`, if Linux has one.
pub fn rlimit_name(resource: u32) -> Option<&'static str> {
    RLIMIT_NAMES.get(usize::try_from(resource).ok()?).copied()
}

/// The number of the resource limit named `name` (`RLIMIT_NOFILE`).
pub fn rlimit_resource(name: &str) -> Option<u32> {
    let i = RLIMIT_NAMES.iter().position(|n| *n == name)?;
    u32::try_from(i).ok()
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// Where a process's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stdio {
    /// `/dev/null`.
    Null,
    /// A guest → host stream.
    Stream(u32),
    /// The same pipe as stdout (stderr only): one ordered stream.
    Stdout,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// An error the agent reports for a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    pub kind: ErrorKind,
    pub message: String,
    /// The guest `errno`, when one caused it.
    pub errno: Option<i32>,
}

/// Classes of agent errors the host maps to its own error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    NotFound,
    PermissionDenied,
    InvalidArgument,
    NoSuchUser,
    NoSuchProcess,
    Io,
    Protocol,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RemoteError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_limit_names_and_numbers_match_linux() {
        for (n, name) in [
            (0, "RLIMIT_CPU"),
            (7, "RLIMIT_NOFILE"),
            (15, "RLIMIT_RTTIME"),
        ] {
            assert_eq!(rlimit_name(n), Some(name));
            assert_eq!(rlimit_resource(name), Some(n));
        }
        assert_eq!(rlimit_name(16), None);
        assert_eq!(rlimit_resource("RLIMIT_NONSENSE"), None);
        assert_eq!(rlimit_resource("nofile"), None);
    }
}
