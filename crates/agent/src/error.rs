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
}
