//! Building the [`RemoteError`]s the agent answers failed requests with.

use std::fmt::Display;
use std::io;

use cc_protocol::{ErrorKind, RemoteError};

use crate::sys;

pub fn new(kind: ErrorKind, message: impl Into<String>) -> RemoteError {
    RemoteError {
        kind,
        message: message.into(),
        errno: None,
    }
}

pub fn invalid(message: impl Into<String>) -> RemoteError {
    new(ErrorKind::InvalidArgument, message)
}

/// `"{context}: {reason}"`, classified by the errno behind `err`.
pub fn os(context: impl Display, err: &io::Error) -> RemoteError {
    let errno = err.raw_os_error();
    let kind = match errno {
        Some(libc::ENOENT | libc::ENOTDIR) => ErrorKind::NotFound,
        Some(libc::EACCES | libc::EPERM) => ErrorKind::PermissionDenied,
        None if err.kind() == io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    };
    RemoteError {
        kind,
        message: format!("{context}: {}", describe(err)),
        errno,
    }
}

/// The class of a filesystem `errno`, as file requests report it.
pub fn errno_kind(errno: i32) -> ErrorKind {
    match errno {
        libc::ENOENT => ErrorKind::NotFound,
        libc::EACCES | libc::EPERM => ErrorKind::PermissionDenied,
        libc::EINVAL => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    }
}

/// `"{op} {path}: {reason}"` for a failed file operation. It always carries
/// an errno, so the host can rebuild the guest's error exactly: input the
/// agent refused itself (a NUL in a path) counts as `EINVAL`.
pub fn fs(op: &str, path: &[u8], err: &io::Error) -> RemoteError {
    let errno = err.raw_os_error().unwrap_or(match err.kind() {
        io::ErrorKind::InvalidInput => libc::EINVAL,
        _ => libc::EIO,
    });
    RemoteError {
        kind: errno_kind(errno),
        message: format!("{op} {}: {}", String::from_utf8_lossy(path), describe(err)),
        errno: Some(errno),
    }
}

/// A file request the agent refuses as malformed: `EINVAL`.
pub fn fs_invalid(op: &str, path: &[u8], reason: &str) -> RemoteError {
    fs(
        op,
        path,
        &io::Error::new(io::ErrorKind::InvalidInput, reason),
    )
}

/// The reason in `err` without Rust's "(os error N)" suffix.
pub fn describe(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(errno) => sys::strerror(errno),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_are_classified_and_worded_briefly() {
        let e = os(
            "mount erofs /dev/vda on /cc/lower",
            &io::Error::from_raw_os_error(libc::EINVAL),
        );
        assert_eq!(e.kind, ErrorKind::Io);
        assert_eq!(
            e.message,
            "mount erofs /dev/vda on /cc/lower: Invalid argument"
        );
        assert_eq!(e.errno, Some(libc::EINVAL));
        let e = os("x", &io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(e.kind, ErrorKind::PermissionDenied);
        let e = os("x", &sys::cstring(&b"a\0b"[..]).unwrap_err());
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert_eq!(e.message, "x: contains a NUL byte");
    }

    #[test]
    fn file_errors_carry_errno_and_op_path_reason() {
        for (errno, kind) in [
            (libc::ENOENT, ErrorKind::NotFound),
            (libc::EACCES, ErrorKind::PermissionDenied),
            (libc::EPERM, ErrorKind::PermissionDenied),
            (libc::EINVAL, ErrorKind::InvalidArgument),
            (libc::ENOTDIR, ErrorKind::Io),
            (libc::EEXIST, ErrorKind::Io),
            (libc::ENOSPC, ErrorKind::Io),
        ] {
            assert_eq!(errno_kind(errno), kind, "errno {errno}");
        }
        let e = fs(
            "stat",
            b"/no/such",
            &io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(e.message, "stat /no/such: No such file or directory");
        assert_eq!((e.kind, e.errno), (ErrorKind::NotFound, Some(libc::ENOENT)));
        let e = fs_invalid("open", b"/x", "invalid access mode 3");
        assert_eq!(e.message, "open /x: invalid access mode 3");
        assert_eq!(
            (e.kind, e.errno),
            (ErrorKind::InvalidArgument, Some(libc::EINVAL))
        );
        let e = fs("read", b"/\xff", &io::Error::other("odd"));
        assert_eq!((e.kind, e.errno), (ErrorKind::Io, Some(libc::EIO)));
        assert_eq!(e.message, "read /\u{fffd}: odd");
    }
}
