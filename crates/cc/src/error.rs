//! The core's error type and the stable codes the C and Python faces map 1:1.

use std::io;

/// Stable error codes; the numbers never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum ErrorCode {
    Ok = 0,
    InvalidHandle = 1,
    InvalidArgument = 2,
    NotRunning = 3,
    AlreadyClosed = 4,
    Timeout = 5,
    HypervisorUnavailable = 6,
    Io = 7,
    Network = 8,
    Cancelled = 9,
    TooLarge = 10,
    Paused = 11,
    Unknown = 99,
}

/// Everything the core can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("instance is not running: {0}")]
    NotRunning(String),
    #[error("already closed")]
    AlreadyClosed,
    /// The instance is paused ([`Instance::pause`](crate::Instance::pause)):
    /// new requests are refused until it is resumed.
    #[error("the instance is paused: resume it first")]
    Paused,
    /// The caller's [`CancelToken`](crate::CancelToken) stopped `op`
    /// (`wait`, `accept`, `read_file`, `pull`, …).
    #[error("{op} cancelled")]
    Cancelled { op: String },
    #[error("{0} timed out")]
    Timeout(String),
    /// The program does not exist in the guest (or is not in `PATH`).
    #[error("{0}")]
    CommandNotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    UnknownUser(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: String,
        path: String,
        #[source]
        source: io::Error,
    },
    /// A connection or listener failed; `addr` is the address involved.
    #[error("{op} {addr}: {source}")]
    Net {
        op: String,
        addr: String,
        #[source]
        source: io::Error,
    },
    /// A result the library would build in memory is over
    /// [`Options::max_result_bytes`](crate::Options::max_result_bytes):
    /// `size` bytes when known (the guest reported it), else `None` (more
    /// than `limit` arrived).
    #[error("{op} {path}: {}, over max_result_bytes ({limit}); stream it instead", too_large(*.size, *.limit))]
    TooLarge {
        op: String,
        path: String,
        size: Option<u64>,
        limit: u64,
    },
    /// The guest agent reported a failure.
    #[error("{op}: {message}")]
    Guest { op: String, message: String },
    #[error("guest agent speaks protocol v{guest}, this library v{host}: rerun scripts/setup.sh to rebuild the agent")]
    ProtocolMismatch { guest: u32, host: u32 },
    #[error("guest agent protocol error: {0}")]
    Protocol(String),
    #[error("instance failed to boot: {reason}\n{diagnostics}")]
    Boot { reason: String, diagnostics: String },
    #[error(transparent)]
    Engine(#[from] cc_engine::Error),
    #[error(transparent)]
    Image(cc_image::Error),
}

impl From<cc_image::Error> for Error {
    fn from(e: cc_image::Error) -> Self {
        match e {
            cc_image::Error::Cancelled(op) => Error::Cancelled { op: op.into() },
            e => Error::Image(e),
        }
    }
}

impl Error {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) | Error::UnknownUser(_) => ErrorCode::InvalidArgument,
            Error::NotRunning(_) => ErrorCode::NotRunning,
            Error::Net { .. } => ErrorCode::Network,
            Error::AlreadyClosed => ErrorCode::AlreadyClosed,
            Error::Paused => ErrorCode::Paused,
            Error::Cancelled { .. } => ErrorCode::Cancelled,
            Error::Timeout(_) => ErrorCode::Timeout,
            Error::TooLarge { .. } => ErrorCode::TooLarge,
            Error::CommandNotFound(_)
            | Error::PermissionDenied(_)
            | Error::Io { .. }
            | Error::Guest { .. } => ErrorCode::Io,
            Error::Engine(e) => match e {
                cc_engine::Error::QemuMissing(_)
                | cc_engine::Error::KvmUnavailable(_)
                | cc_engine::Error::BadAccel(_)
                | cc_engine::Error::Unconfined(_) => ErrorCode::HypervisorUnavailable,
                cc_engine::Error::KernelMissing(_)
                | cc_engine::Error::AgentMissing(_)
                | cc_engine::Error::ToolMissing { .. }
                | cc_engine::Error::Io { .. } => ErrorCode::Io,
                _ => ErrorCode::Unknown,
            },
            Error::ProtocolMismatch { .. } | Error::Protocol(_) | Error::Boot { .. } => {
                ErrorCode::Unknown
            }
            Error::Image(e) => match e {
                cc_image::Error::Registry { .. } => ErrorCode::Network,
                cc_image::Error::Cancelled(_) => ErrorCode::Cancelled,
                cc_image::Error::BadReference(_)
                | cc_image::Error::BadPlatform(_)
                | cc_image::Error::BadDigest(_)
                | cc_image::Error::BadLimit(_)
                | cc_image::Error::RegistriesConf { .. }
                | cc_image::Error::Blocked { .. } => ErrorCode::InvalidArgument,
                _ => ErrorCode::Io,
            },
        }
    }

    /// The operation that failed, where one applies.
    pub fn op(&self) -> Option<&str> {
        match self {
            Error::Io { op, .. }
            | Error::Guest { op, .. }
            | Error::Net { op, .. }
            | Error::TooLarge { op, .. }
            | Error::Cancelled { op } => Some(op),
            Error::Image(cc_image::Error::Io { op, .. }) => Some(op),
            _ => None,
        }
    }

    /// The path involved, where one applies.
    pub fn path(&self) -> Option<&str> {
        match self {
            Error::Io { path, .. }
            | Error::Net { addr: path, .. }
            | Error::TooLarge { path, .. }
            | Error::Image(
                cc_image::Error::Io { path, .. }
                | cc_image::Error::RegistriesConf { path, .. }
                | cc_image::Error::Blocked { path, .. },
            ) => Some(path),
            _ => None,
        }
    }

    /// The OS `errno` behind this error, when one is known: the guest's
    /// for a failed guest file or network operation (`ENOENT` for a missing
    /// guest file), the host's for a host file.
    pub fn os_errno(&self) -> Option<i32> {
        let source = self.io_source()?;
        source.raw_os_error().or_else(|| {
            let guest = source.get_ref()?.downcast_ref::<GuestOsError>()?;
            Some(guest.errno)
        })
    }

    /// The class of the I/O failure behind this error, when there is one
    /// (`NotFound` for a missing guest file).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        self.io_source().map(io::Error::kind)
    }

    fn io_source(&self) -> Option<&io::Error> {
        match self {
            Error::Io { source, .. }
            | Error::Net { source, .. }
            | Error::Image(cc_image::Error::Io { source, .. })
            | Error::Engine(cc_engine::Error::Io { source, .. }) => Some(source),
            _ => None,
        }
    }

    pub(crate) fn io(
        op: &str,
        path: impl AsRef<std::path::Path>,
    ) -> impl FnOnce(io::Error) -> Error {
        let (op, path) = (op.to_string(), path.as_ref().display().to_string());
        move |source| Error::Io { op, path, source }
    }
}

/// A guest `errno` in the agent's words, which say more than the errno
/// alone ("not a regular file") or differ from this host's C library: the
/// source of an [`Error::Io`] that keeps both.
#[derive(Debug)]
pub(crate) struct GuestOsError {
    pub(crate) errno: i32,
    pub(crate) reason: String,
}

impl std::fmt::Display for GuestOsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for GuestOsError {}

impl From<cc_netpolicy::PolicyError> for Error {
    fn from(e: cc_netpolicy::PolicyError) -> Error {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<cc_protocol::frame::FrameError> for Error {
    /// A message over the frame limit is the caller's: arguments,
    /// environment or data too large to send in one request.
    fn from(e: cc_protocol::frame::FrameError) -> Error {
        match e {
            cc_protocol::frame::FrameError::TooLarge(len) => Error::InvalidArgument(format!(
                "request of {len} bytes exceeds the {}-byte message limit \
                 (arguments and environment count together)",
                cc_protocol::MAX_FRAME
            )),
            other => Error::Protocol(other.to_string()),
        }
    }
}

fn too_large(size: Option<u64>, limit: u64) -> String {
    match size {
        Some(size) => format!("{size} bytes"),
        None => format!("more than {limit} bytes"),
    }
}

/// Results of the core API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_request_is_invalid_argument_naming_the_limit() {
        let msg = cc_protocol::Message::Request {
            id: 1,
            body: cc_protocol::Request::Exec(cc_protocol::Exec {
                process: 1,
                argv: vec![serde_bytes::ByteBuf::from(b"true".to_vec())],
                env: vec![serde_bytes::ByteBuf::from(vec![b'x'; 10 << 20])],
                cwd: None,
                user: None,
                stdin: None,
                stdout: cc_protocol::Stdio::Null,
                stderr: cc_protocol::Stdio::Null,
                pty: None,
                root: None,
                rlimits: Vec::new(),
            }),
        };
        let e = Error::from(cc_protocol::frame::encode(&msg).unwrap_err());
        assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
        assert!(
            e.to_string().contains(&cc_protocol::MAX_FRAME.to_string()),
            "{e}"
        );
    }

    fn io_error() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    #[test]
    fn every_kind_has_its_stable_code() {
        use ErrorCode as C;
        let cases: Vec<(Error, C)> = vec![
            (Error::InvalidArgument("x".into()), C::InvalidArgument),
            (Error::UnknownUser("bob".into()), C::InvalidArgument),
            (Error::NotRunning("gone".into()), C::NotRunning),
            (Error::AlreadyClosed, C::AlreadyClosed),
            (Error::Paused, C::Paused),
            (Error::Timeout("exec".into()), C::Timeout),
            (Error::CommandNotFound("nope".into()), C::Io),
            (Error::PermissionDenied("/x".into()), C::Io),
            (Error::io("read", "/x")(io_error()), C::Io),
            (
                Error::Guest {
                    op: "stat".into(),
                    message: "no".into(),
                },
                C::Io,
            ),
            (
                Error::Net {
                    op: "dial".into(),
                    addr: "tcp:1".into(),
                    source: io_error(),
                },
                C::Network,
            ),
            (
                Error::TooLarge {
                    op: "read".into(),
                    path: "/f".into(),
                    size: Some(10),
                    limit: 5,
                },
                C::TooLarge,
            ),
            (Error::Protocol("bad".into()), C::Unknown),
            (Error::ProtocolMismatch { guest: 1, host: 2 }, C::Unknown),
            (
                Error::Boot {
                    reason: "r".into(),
                    diagnostics: "d".into(),
                },
                C::Unknown,
            ),
            (
                cc_engine::Error::QemuMissing("qemu".into()).into(),
                C::HypervisorUnavailable,
            ),
            (
                cc_engine::Error::KvmUnavailable("no".into()).into(),
                C::HypervisorUnavailable,
            ),
            (
                cc_engine::Error::Unconfined("no bwrap".into()).into(),
                C::HypervisorUnavailable,
            ),
            (cc_engine::Error::KernelMissing("/k".into()).into(), C::Io),
            (
                cc_engine::Error::ToolMissing {
                    tool: "mkfs.ext4",
                    package: "e2fsprogs",
                    source: io_error(),
                }
                .into(),
                C::Io,
            ),
            (cc_engine::Error::Qmp("x".into()).into(), C::Unknown),
            (cc_image::Error::Cancelled("pull").into(), C::Cancelled),
            (
                cc_image::Error::BadReference("::".into()).into(),
                C::InvalidArgument,
            ),
            (
                cc_image::Error::RegistriesConf {
                    path: "/etc/containers/registries.conf".into(),
                    line: Some(3),
                    message: "expected `=`".into(),
                }
                .into(),
                C::InvalidArgument,
            ),
            (
                cc_image::Error::Blocked {
                    reference: "example.org/a:1".into(),
                    prefix: "example.org".into(),
                    path: "/etc/containers/registries.conf".into(),
                }
                .into(),
                C::InvalidArgument,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
        }
    }

    #[test]
    fn op_and_path_come_from_the_failing_call() {
        let e = Error::io("open rootfs", "/srv/root")(io_error());
        assert_eq!(e.op(), Some("open rootfs"));
        assert_eq!(e.path(), Some("/srv/root"));
        assert!(e.to_string().starts_with("open rootfs /srv/root: "), "{e}");
        let e = Error::Net {
            op: "dial".into(),
            addr: "tcp:10.0.0.1:80".into(),
            source: io_error(),
        };
        assert_eq!((e.op(), e.path()), (Some("dial"), Some("tcp:10.0.0.1:80")));
        assert_eq!(
            (Error::AlreadyClosed.op(), Error::AlreadyClosed.path()),
            (None, None)
        );
        let e = Error::TooLarge {
            op: "read_file".into(),
            path: "/big".into(),
            size: None,
            limit: 1024,
        };
        assert!(e.to_string().contains("more than 1024 bytes"), "{e}");
        assert_eq!(e.path(), Some("/big"));
    }

    #[test]
    fn the_os_errno_and_kind_survive_every_io_wrapping() {
        let raw = Error::io("read", "/x")(io_error());
        assert_eq!(raw.os_errno(), Some(libc::ENOENT));
        assert_eq!(raw.io_kind(), Some(io::ErrorKind::NotFound));
        let worded = Error::io("read_file", "/d")(io::Error::new(
            io::ErrorKind::InvalidInput,
            GuestOsError {
                errno: libc::EINVAL,
                reason: "not a regular file".into(),
            },
        ));
        assert_eq!(worded.os_errno(), Some(libc::EINVAL));
        assert_eq!(worded.io_kind(), Some(io::ErrorKind::InvalidInput));
        assert!(
            worded.to_string().ends_with(": not a regular file"),
            "{worded}"
        );
        let net = Error::Net {
            op: "dial".into(),
            addr: "tcp:1".into(),
            source: io::Error::from_raw_os_error(libc::ECONNREFUSED),
        };
        assert_eq!(net.os_errno(), Some(libc::ECONNREFUSED));
        let host: Error = cc_image::Error::Io {
            op: "open".into(),
            path: "/l".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        }
        .into();
        assert_eq!(host.os_errno(), Some(libc::EACCES));
        let textual = Error::io("read", "/x")(io::Error::other("gone"));
        assert_eq!(textual.os_errno(), None);
        assert_eq!(Error::AlreadyClosed.os_errno(), None);
        assert_eq!(Error::AlreadyClosed.io_kind(), None);
    }

    #[test]
    fn the_cause_stays_chained() {
        use std::error::Error as _;
        let e = Error::io("read", "/x")(io_error());
        let source = e.source().expect("an io source");
        assert!(source.to_string().contains("No such file"), "{source}");
        let e: Error = cc_engine::Error::ToolMissing {
            tool: "mkfs.ext4",
            package: "e2fsprogs",
            source: io_error(),
        }
        .into();
        assert!(e.to_string().contains("apt-get install e2fsprogs"), "{e}");
    }
}
