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
}

/// Host → guest requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Build the root filesystem and identity; answered by `Ready`.
    Setup(Setup),
    /// Start a process; answered by `Started` or an error.
    Exec(Exec),
    /// Send `signal` to the process group of `process`; answered by `Done`.
    Signal { process: u64, signal: i32 },
    /// Answered by `Pong`; measures the channel.
    Ping,
    /// Sync filesystems and power off; answered by `Done` just before.
    Shutdown,
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
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixTime {
    pub secs: i64,
    pub nanos: u32,
}

/// A read-only lower block device plus a writable upper block device,
/// combined by overlayfs into the root. Devices are found by virtio serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSpec {
    pub lower_serial: String,
    /// Filesystem type of the lower device (`erofs`, `ext4`).
    pub lower_fstype: String,
    pub upper_serial: String,
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
