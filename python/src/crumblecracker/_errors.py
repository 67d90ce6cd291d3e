"""The exception tree: ``CCError`` and one subclass per stable error code.

Every failure reported by ``libcc.so`` becomes an instance of the class for
its code, carrying the code, the library's message, and the operation and
path involved where they apply. ``IOError`` and ``TimeoutError`` are this
package's own classes (named as the seed README names them); they shadow
the builtins only inside this package's namespace, so ``except cc.IOError``
catches exactly what the library reports. ``IOError`` is also a builtin
``OSError`` carrying the errno (and, by errno, a ``FileNotFoundError``,
``FileExistsError``, ...), so code written for Python's own file errors
handles guest files alike.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
from typing import ClassVar, Optional

__all__ = [
    "AlreadyClosedError",
    "CCError",
    "CancelledError",
    "ErrorCode",
    "HypervisorUnavailableError",
    "IOError",
    "InvalidArgumentError",
    "InvalidHandleError",
    "NetworkError",
    "NotRunningError",
    "PausedError",
    "TimeoutError",
    "TooLargeError",
    "error_for_code",
    "io_error",
]


class ErrorCode(enum.IntEnum):
    """The C API's stable error codes (``cc_error_code`` in ``cc.h``)."""

    OK = 0
    INVALID_HANDLE = 1
    INVALID_ARGUMENT = 2
    NOT_RUNNING = 3
    ALREADY_CLOSED = 4
    TIMEOUT = 5
    HYPERVISOR_UNAVAILABLE = 6
    IO = 7
    NETWORK = 8
    CANCELLED = 9
    TOO_LARGE = 10
    PAUSED = 11
    UNKNOWN = 99

    def __str__(self) -> str:
        # The number, on every Python version (3.11 changed IntEnum's str).
        return str(self.value)


def _as_code(code: int) -> int:
    try:
        return ErrorCode(code)
    except ValueError:
        return int(code)


class CCError(Exception):
    """Base class of every error crumblecracker reports.

    Attributes:
        code: the stable error code (an ``ErrorCode`` when known).
        message: what went wrong, for people.
        op: the operation that failed (``"stat"``, ``"remove"``, ...), or None.
        path: the path involved, or None.
    """

    default_code: ClassVar[int] = ErrorCode.UNKNOWN

    code: int
    message: str
    op: Optional[str]
    path: Optional[str]

    def __init__(
        self,
        message: str,
        *,
        code: Optional[int] = None,
        op: Optional[str] = None,
        path: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.code = _as_code(self.default_code if code is None else code)
        self.message = message
        self.op = op
        self.path = path

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        parts = [repr(self.message), f"code={int(self.code)}"]
        if self.op is not None:
            parts.append(f"op={self.op!r}")
        if self.path is not None:
            parts.append(f"path={self.path!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments: rebuild through a helper so pickling
        # (multiprocessing, concurrent.futures) keeps every attribute.
        return (_rebuild, (type(self), self.message, int(self.code), self.op, self.path))


def _rebuild(
    cls: type[CCError], message: str, code: int, op: Optional[str], path: Optional[str]
) -> CCError:
    return cls(message, code=code, op=op, path=path)


class InvalidHandleError(CCError):
    """A handle that is invalid or was freed (a bug in the caller or here)."""

    default_code = ErrorCode.INVALID_HANDLE


class InvalidArgumentError(CCError):
    """A bad argument: out of range, misuse of a command, not initialized."""

    default_code = ErrorCode.INVALID_ARGUMENT


class NotRunningError(CCError):
    """The instance's guest has ended (timed out, crashed, powered off)."""

    default_code = ErrorCode.NOT_RUNNING


class AlreadyClosedError(CCError):
    """The object (or the instance it belongs to) was closed."""

    default_code = ErrorCode.ALREADY_CLOSED


class TimeoutError(CCError):  # the seed README's name (shadows the builtin here only)
    """An operation took longer than allowed (a command's own timeout)."""

    default_code = ErrorCode.TIMEOUT


class HypervisorUnavailableError(CCError):
    """No instance can start here: QEMU, the guest kernel or the agent is
    missing, or the requested accelerator (``CC_ACCEL``) is unusable; the
    message says which."""

    default_code = ErrorCode.HYPERVISOR_UNAVAILABLE


class IOError(CCError, OSError):  # the seed README's name (shadows the builtin here only)
    """A file, directory or process failed, on the host or in the guest.

    A missing guest file is an ``IOError`` whose ``path`` names it. It is
    also an ``OSError``: ``errno`` is the OS errno behind the failure (the
    guest's for a guest file, ``errno.ENOENT`` for a missing one) or None,
    ``strerror`` its text and ``filename`` the path. By errno it is also the
    matching builtin subclass, so ``except FileNotFoundError`` catches a
    missing guest file: ``FileNotFoundError`` (ENOENT), ``FileExistsError``
    (EEXIST), ``NotADirectoryError`` (ENOTDIR), ``IsADirectoryError``
    (EISDIR), ``PermissionError`` (EACCES, EPERM); others (ENOSPC, ...)
    are plain ``OSError``.
    """

    default_code = ErrorCode.IO

    def __init__(
        self,
        message: str,
        *,
        code: Optional[int] = None,
        op: Optional[str] = None,
        path: Optional[str] = None,
        errno: Optional[int] = None,
    ) -> None:
        super().__init__(message, code=code, op=op, path=path)
        self.errno = errno
        self.strerror = os.strerror(errno) if errno else None
        self.filename = path

    def __repr__(self) -> str:
        text = super().__repr__()
        return text if self.errno is None else f"{text[:-1]}, errno={self.errno})"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_io, (self.message, int(self.code), self.op, self.path, self.errno))


class _FileNotFound(IOError, FileNotFoundError):
    """An ``IOError`` with ENOENT."""


class _FileExists(IOError, FileExistsError):
    """An ``IOError`` with EEXIST."""


class _NotADirectory(IOError, NotADirectoryError):
    """An ``IOError`` with ENOTDIR."""


class _IsADirectory(IOError, IsADirectoryError):
    """An ``IOError`` with EISDIR."""


class _Permission(IOError, PermissionError):
    """An ``IOError`` with EACCES or EPERM."""


_IO_BY_ERRNO: dict[int, type[IOError]] = {
    _errno.ENOENT: _FileNotFound,
    _errno.EEXIST: _FileExists,
    _errno.ENOTDIR: _NotADirectory,
    _errno.EISDIR: _IsADirectory,
    _errno.EACCES: _Permission,
    _errno.EPERM: _Permission,
}


def io_error(
    message: str,
    *,
    code: Optional[int] = None,
    op: Optional[str] = None,
    path: Optional[str] = None,
    errno: Optional[int] = None,
) -> IOError:
    """The ``IOError`` for ERRNO: also the builtin ``OSError`` subclass
    Python raises for it (``FileNotFoundError`` for ENOENT, ...)."""
    cls = _IO_BY_ERRNO.get(errno or 0, IOError)
    return cls(message, code=code, op=op, path=path, errno=errno)


def _rebuild_io(
    message: str, code: int, op: Optional[str], path: Optional[str], errno: Optional[int]
) -> IOError:
    return io_error(message, code=code, op=op, path=path, errno=errno)


class NetworkError(CCError):
    """A registry could not be reached or refused the request."""

    default_code = ErrorCode.NETWORK


class CancelledError(CCError):
    """The operation was cancelled."""

    default_code = ErrorCode.CANCELLED


class TooLargeError(CCError):
    """A result (a file read whole, a command's captured output) is over
    the instance's ``max_result_bytes``; the message names the size and the
    cap. Stream it instead (``Instance.copy_out``, ``read_file_stream``,
    ``Cmd.output_to``) or raise the cap."""

    default_code = ErrorCode.TOO_LARGE


class PausedError(CCError):
    """The instance is paused (``Instance.pause``): new requests are refused
    until ``Instance.resume``."""

    default_code = ErrorCode.PAUSED


_BY_CODE: dict[int, type[CCError]] = {
    cls.default_code: cls
    for cls in (
        InvalidHandleError,
        InvalidArgumentError,
        NotRunningError,
        AlreadyClosedError,
        TimeoutError,
        HypervisorUnavailableError,
        IOError,
        NetworkError,
        CancelledError,
        TooLargeError,
        PausedError,
    )
}


def error_for_code(code: int) -> type[CCError]:
    """The exception class for an error code (``CCError`` for unknown codes)."""
    return _BY_CODE.get(int(code), CCError)
