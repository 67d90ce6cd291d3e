"""Open guest files."""

from __future__ import annotations

import ctypes
from ctypes import byref, c_size_t, c_uint64, c_void_p
from typing import TYPE_CHECKING, Optional, Union

from . import _lib
from ._call import Stream
from ._cancel import CancelToken
from ._cancel import handle as cancel_handle
from ._errors import AlreadyClosedError, InvalidArgumentError
from ._types import FileInfo, SeekWhence

if TYPE_CHECKING:
    from ._instance import Instance

__all__ = ["File"]

# Bytes asked for per cc_file_read (the library may return fewer).
_CHUNK = 256 << 10

Data = Union[bytes, bytearray, memoryview, str]


def as_bytes(data: Data, what: str = "data") -> bytes:
    """DATA as bytes: bytes-like objects as they are, str encoded UTF-8."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{what} must be bytes or str, not {type(data).__name__}")


def file_info(c: _lib.CFileInfo) -> FileInfo:
    """A FileInfo from a filled cc_file_info (whose name it frees)."""
    try:
        name = ctypes.string_at(c.name).decode("utf-8", "surrogateescape") if c.name else ""
        return FileInfo(
            name=name,
            size=int(c.size),
            mode=int(c.mode),
            mtime=int(c.mtime_unix) + int(c.mtime_nsec) / 1e9,
            is_dir=bool(c.is_dir),
            is_symlink=bool(c.is_symlink),
            uid=int(c.uid),
            gid=int(c.gid),
        )
    finally:
        _lib.native().cc_file_info_free(byref(c))


class File(Stream):
    """An open guest file (``Instance.open``, ``create``, ``open_file``).

    A context manager; ``close()`` is idempotent. Use it from one thread at
    a time. ``read`` returns ``b""`` at end of file.
    """

    _kind = "file"
    _free_fn = "cc_file_free"

    def __init__(self, handle: int, instance: Instance, path: str, flags: int) -> None:
        super().__init__(handle)
        self._instance = instance  # keeps the instance open while the file is
        self._path = path
        self._flags = flags

    @property
    def name(self) -> str:
        """The guest path the file was opened with."""
        return self._path

    def read(self, n: int = -1, cancel: Optional[CancelToken] = None) -> bytes:
        """Reads up to N bytes (all the rest when N is negative); fewer only
        at end of file, ``b""`` there. All the rest is built once, at the
        size left in the file, and may be at most
        ``InstanceOptions.max_result_bytes`` (else ``TooLargeError``).
        Cancelling CANCEL stops a read of N >= 0 bytes with
        ``CancelledError`` ("read cancelled"); a read of all the rest
        (negative N) does not take a token."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if cancel is not None and n < 0:
            raise InvalidArgumentError("cancel= needs a read of N >= 0 bytes")
        handle = self._h("read")
        token = cancel_handle(cancel, "read")
        self._settle()  # bytes of a read Ctrl-C interrupted come first
        data = self._take_leftover(n)
        if n >= 0 and len(data) == n:
            return data
        lib = _lib.native()
        if n < 0:

            def run_all() -> bytes:
                ptr = c_void_p()
                length = c_size_t()
                _lib.call(lib.cc_file_read_all, handle, byref(ptr), byref(length))
                return _lib.take_bytes(ptr, length.value)

            rest: bytes = self._blocking(run_all, "file-read")
            return data + rest if data else rest
        want = n - len(data)

        def run() -> bytes:
            parts: list[bytes] = []
            got = 0
            buf = ctypes.create_string_buffer(min(_CHUNK, want))
            count = c_size_t()
            while got < want:
                cap = min(len(buf), want - got)
                _lib.call(lib.cc_file_read_cancellable, handle, token, buf, cap, byref(count))
                if count.value == 0:
                    break
                parts.append(buf.raw[: count.value])
                got += count.value
            return b"".join(parts)

        return data + self._blocking(run, "file-read")

    def write(self, data: Data, cancel: Optional[CancelToken] = None) -> int:
        """Writes all of DATA (bytes, or str encoded UTF-8) at the file
        offset; returns how many bytes. Cancelling CANCEL raises
        ``CancelledError`` ("write cancelled"); part of DATA may have been
        written."""
        raw = as_bytes(data)
        handle = self._h("write")
        token = cancel_handle(cancel, "write")
        lib = _lib.native()

        def run() -> int:
            written = c_size_t()
            _lib.call(lib.cc_file_write_cancellable, handle, token, raw, len(raw), byref(written))
            return int(written.value)

        return self._blocking(run, "file-write")

    def seek(self, offset: int, whence: Union[SeekWhence, int] = SeekWhence.SET) -> int:
        """Moves the file offset; returns the new offset from the start."""
        try:
            whence = SeekWhence(whence)
        except ValueError:
            raise InvalidArgumentError(f"unknown whence {whence!r}", op="seek") from None
        handle = self._h("seek")
        self._settle()
        if whence == SeekWhence.CUR and self._leftover:
            # Bytes read ahead by an interrupted read are not consumed yet.
            offset -= len(self._leftover)
        self._leftover = b""
        out = c_uint64()
        _lib.call(_lib.native().cc_file_seek, handle, offset, int(whence), byref(out))
        return int(out.value)

    def tell(self) -> int:
        """The current file offset."""
        return self.seek(0, SeekWhence.CUR)

    def stat(self) -> FileInfo:
        """Metadata of the open file."""
        handle = self._h("stat")
        self._settle()
        info = _lib.CFileInfo()
        _lib.call(_lib.native().cc_file_stat, handle, byref(info))
        return file_info(info)

    def truncate(self, size: int) -> None:
        """Sets the file's length to SIZE bytes."""
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        if size < 0:
            raise InvalidArgumentError(f"size must not be negative, not {size}", op="truncate")
        handle = self._h("truncate")
        self._settle()
        _lib.call(_lib.native().cc_file_truncate, handle, size)

    def sync(self) -> None:
        """Flushes the file to the guest's disk."""
        handle = self._h("sync")
        self._settle()
        _lib.call(_lib.native().cc_file_sync, handle)

    def close(self) -> None:
        """Closes the file. Closing again does nothing."""
        if self._closed:
            return
        lib = _lib.native()
        handle = self._handle
        if self._close_after_pending(lambda: _lib.call(lib.cc_file_close, handle)):
            return
        self._closed = True
        try:
            _lib.call(lib.cc_file_close, handle)
        except AlreadyClosedError:
            pass  # its instance was closed, which closed the file
        finally:
            self._release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<File {self._path!r} {state}>"
