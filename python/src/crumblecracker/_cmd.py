"""Commands in a guest and the pipes to their standard streams."""

from __future__ import annotations

import ctypes
import math
import time
from ctypes import byref, c_bool, c_int32, c_size_t, c_uint64, c_void_p
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import _lib
from ._call import SETTLE_SECONDS, Call, Handle, Stream, cancel_then_settle, interruptible
from ._cancel import CancelToken
from ._cancel import handle as cancel_handle
from ._errors import AlreadyClosedError, CCError, ErrorCode, InvalidArgumentError
from ._file import Data, as_bytes

if TYPE_CHECKING:
    from ._instance import Instance

__all__ = ["Cmd", "Conn"]

# Largest read asked of the library at once.
_CHUNK = 1 << 20


class Conn(Stream):
    """One end of a byte stream to the guest: a command's stdin (writable)
    or its stdout/stderr (readable), or a TCP connection (both:
    ``Listener.accept``, ``Instance.dial``).

    ``read`` returns what is available (up to N bytes, blocking until some
    arrive) and ``b""`` at end of stream; ``write`` blocks while the reader
    is behind. Closing stdin sends end of file; ``close_write()`` ends only
    the writing direction of a TCP connection (the guest reads end of
    file, replies can still be read). A context manager; ``close()`` is
    idempotent and, from any thread, ends a read or write blocked in
    another.

    Reading and writing are independent: one thread may read while another
    writes. Within a direction, use it from one thread at a time.
    """

    _kind = "connection"
    _free_fn = "cc_conn_free"
    _READ = "read"
    _WRITE = "write"

    def __init__(self, handle: int, instance: Instance, label: str, tcp: bool = False) -> None:
        super().__init__(handle)
        self._instance = instance  # keeps the instance open while the conn is
        self._label = label
        self._local: Optional[str] = None
        self._remote: Optional[str] = None
        if tcp:
            local = c_void_p()
            remote = c_void_p()
            _lib.call(_lib.native().cc_conn_addrs, handle, byref(local), byref(remote))
            self._local = _lib.take_string(local) if local.value else None
            self._remote = _lib.take_string(remote) if remote.value else None

    @property
    def local_addr(self) -> Optional[str]:
        """This end's address (``"IP:PORT"``) of a TCP connection; None for
        a pipe."""
        return self._local

    @property
    def remote_addr(self) -> Optional[str]:
        """The peer's address (``"IP:PORT"``) of a TCP connection; None for
        a pipe."""
        return self._remote

    def _call(self, op: str, fn: Any, *args: Any) -> None:
        try:
            _lib.call(fn, *args)
        except CCError as e:
            # Closed by another thread between the check and the call.
            if self._closed and e.code == ErrorCode.INVALID_HANDLE:
                raise AlreadyClosedError("the connection is closed", op=op) from None
            raise

    def read(self, n: int = 65536, cancel: Optional[CancelToken] = None) -> bytes:
        """Reads up to N bytes, blocking until some arrive; ``b""`` at end of
        stream. A negative N reads everything until end of stream, into one
        buffer of at most ``InstanceOptions.max_result_bytes`` (more raises
        ``TooLargeError`` and stops the stream). Cancelling CANCEL stops a
        read of N >= 0 bytes with ``CancelledError`` ("read cancelled");
        what was not read stays to be read. A read of everything (negative
        N) does not take a token."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if cancel is not None and n < 0:
            raise InvalidArgumentError("cancel= needs a read of N >= 0 bytes")
        handle = self._h("read")
        token = cancel_handle(cancel, "read")
        self._settle(self._READ)
        if self._leftover:
            if n >= 0:
                return self._take_leftover(n)
            head = self._take_leftover(-1)
        else:
            head = b""
        if n == 0:
            return b""
        lib = _lib.native()

        def run() -> bytes:
            if n < 0:
                ptr = c_void_p()
                length = c_size_t()
                self._call("read", lib.cc_conn_read_all, handle, byref(ptr), byref(length))
                return _lib.take_bytes(ptr, length.value)
            cap = min(n, _CHUNK)
            buf = ctypes.create_string_buffer(cap)
            count = c_size_t()
            self._call("read", lib.cc_conn_read_cancellable, handle, token, buf, cap, byref(count))
            return buf.raw[: count.value]

        return head + self._blocking(run, "conn-read", self._READ)

    def write(self, data: Data, cancel: Optional[CancelToken] = None) -> int:
        """Writes all of DATA (bytes, or str encoded UTF-8); returns how many
        bytes. Cancelling CANCEL raises ``CancelledError`` ("write
        cancelled") while it waits for the guest; part of DATA may have
        been sent."""
        raw = as_bytes(data)
        handle = self._h("write")
        token = cancel_handle(cancel, "write")
        lib = _lib.native()

        def run() -> int:
            self._call("write", lib.cc_conn_write_cancellable, handle, token, raw, len(raw))
            return len(raw)

        return self._blocking(run, "conn-write", self._WRITE)

    def close_write(self) -> None:
        """Ends the writing direction only (a TCP half close): the guest
        reads end of file and this end can still read. On a stdin pipe it
        is ``close()``; on an output pipe it does nothing. Waits for a
        write Ctrl-C interrupted to finish first."""
        handle = self._h("close_write")
        self._settle(self._WRITE)
        self._call("close_write", _lib.native().cc_conn_close_write, handle)

    def close(self) -> None:
        """Closes this end: a writer sends end of file, a reader stops the
        stream; a read or write blocked in another thread ends. Closing
        again does nothing."""
        if self._closed:
            return
        lib = _lib.native()
        handle = self._handle
        if self._close_after_pending(lambda: _lib.call(lib.cc_conn_close, handle)):
            return
        self._closed = True
        try:
            _lib.call(lib.cc_conn_close, handle)
        except AlreadyClosedError:
            pass
        finally:
            self._release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        if self._local is not None or self._remote is not None:
            return f"<Conn tcp local={self._local!r} remote={self._remote!r} {state}>"
        return f"<Conn {self._label} {state}>"


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return value


def _window(name: str, value: object, op: str) -> int:
    """A terminal dimension as the C call takes it (16 bits); the library
    judges the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 0xFFFF:
        raise InvalidArgumentError(f"{name} {value}: a terminal has 1 to 4096", op=op)
    return value


class Cmd(Handle):
    """A command in a guest (``Instance.command``): configured, then
    started once.

    ``run()`` returns the exit status; ``output()``/``combined_output()``
    return the captured bytes (the status is then in ``exit_code``). A
    non-zero status is never an exception; a process killed by signal N
    reports ``-N``. Misuse (starting twice, a pipe after start, waiting
    before start) raises ``InvalidArgumentError``. Ctrl-C while waiting
    kills the process and raises ``KeyboardInterrupt``.

    ``close()`` releases the handle; a process still running keeps running
    and its pipes stay usable.
    """

    _kind = "command"
    _free_fn = "cc_cmd_free"

    def __init__(self, handle: int, instance: Instance, argv: list[str]) -> None:
        super().__init__(handle)
        self._instance = instance  # keeps the instance open while the command is
        self._argv = argv
        self._exit_code: Optional[int] = None

    @property
    def args(self) -> list[str]:
        """The program and its arguments (for an entrypoint command, the
        arguments given)."""
        return list(self._argv)

    # -- configuration ---------------------------------------------------------

    def set_dir(self, dir: str) -> Cmd:
        """Sets the working directory (before start). Returns the command."""
        raw = _lib.encode_str(_check_str("dir", dir), "dir")
        _lib.call(_lib.native().cc_cmd_set_dir, self._h("set_dir"), raw)
        return self

    def set_env(self, key: str, value: str) -> Cmd:
        """Sets an environment variable (before start). Returns the command."""
        k = _lib.encode_str(_check_str("key", key), "key")
        v = _lib.encode_str(_check_str("value", value), "value")
        _lib.call(_lib.native().cc_cmd_set_env, self._h("set_env"), k, v)
        return self

    def set_user(self, user: str) -> Cmd:
        """Sets the user to run as (``name``, ``uid``, ``uid:gid``,
        ``name:group``), before start. Returns the command."""
        raw = _lib.encode_str(_check_str("user", user), "user")
        _lib.call(_lib.native().cc_cmd_set_user, self._h("set_user"), raw)
        return self

    def set_timeout(self, seconds: float) -> Cmd:
        """Kills the process if it runs longer than SECONDS (before start);
        waiting then raises ``TimeoutError``. Returns the command."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"seconds must be a number, not {type(seconds).__name__}")
        if not seconds > 0 or math.isinf(seconds):
            raise InvalidArgumentError(
                f"timeout must be a positive number of seconds, not {seconds}", op="set_timeout"
            )
        _lib.call(_lib.native().cc_cmd_set_timeout, self._h("set_timeout"), float(seconds))
        return self

    def pty(self, rows: int = 24, cols: int = 80, term: Optional[str] = None) -> Cmd:
        """Runs the command on a pseudo-terminal of ROWS x COLS (each 1 to
        4096), before start, with ``TERM`` set to TERM when given (else the
        environment's, ``xterm`` by default). The terminal is the process's
        stdin, stdout and stderr: ``stdout_pipe``/``output`` give everything
        it shows (the echo of typed input included, lines ending ``\\r\\n``),
        ``stdin_pipe`` is what is typed (``b"\\x03"`` is Ctrl-C); there is no
        ``stderr_pipe``. Returns the command."""
        r, c = _window("rows", rows, "pty"), _window("cols", cols, "pty")
        raw = None if term is None else _lib.encode_str(_check_str("term", term), "term")
        _lib.call(_lib.native().cc_cmd_set_pty, self._h("pty"), r, c, raw)
        return self

    def get_env(self, key: str) -> Optional[str]:
        """The value of KEY in the command's environment (the image's or
        set), or None when unset."""
        raw = _lib.encode_str(_check_str("key", key), "key")
        out = c_void_p()
        _lib.call(_lib.native().cc_cmd_get_env, self._h("get_env"), raw, byref(out))
        return None if not out.value else _lib.take_string(out)

    def environ(self) -> list[str]:
        """The command's environment as ``KEY=VALUE`` strings."""
        lib = _lib.native()
        arr = ctypes.POINTER(ctypes.c_char_p)()
        count = c_size_t()
        _lib.call(lib.cc_cmd_environ, self._h("environ"), byref(arr), byref(count))
        try:
            return [_lib.decode(arr[i]) for i in range(count.value)]
        finally:
            lib.cc_strings_free(arr, count.value)

    # -- pipes -----------------------------------------------------------------

    def _pipe(self, fn: str, op: str, label: str) -> Conn:
        out = c_uint64()
        _lib.call(getattr(_lib.native(), fn), self._h(op), byref(out))
        return Conn(out.value, self._instance, f"{label} of {self._argv!r}")

    def stdin_pipe(self) -> Conn:
        """The process's stdin as a writable ``Conn`` (before start);
        closing it sends end of file."""
        return self._pipe("cc_cmd_stdin_pipe", "stdin_pipe", "stdin")

    def stdout_pipe(self) -> Conn:
        """The process's stdout as a readable ``Conn`` (before start)."""
        return self._pipe("cc_cmd_stdout_pipe", "stdout_pipe", "stdout")

    def stderr_pipe(self) -> Conn:
        """The process's stderr as a readable ``Conn`` (before start)."""
        return self._pipe("cc_cmd_stderr_pipe", "stderr_pipe", "stderr")

    # -- running ---------------------------------------------------------------

    def start(self) -> None:
        """Starts the process; output not taken by a pipe is discarded."""
        _lib.call(_lib.native().cc_cmd_start, self._h("start"))

    def _killer(self, handle: int) -> Callable[[Call[Any]], None]:
        lib = _lib.native()

        def kill_until_done(call: Call[Any]) -> None:
            # Until the process ends: a kill before the helper thread
            # started it fails, so try again.
            deadline = time.monotonic() + SETTLE_SECONDS
            while not call.done() and time.monotonic() < deadline:
                try:
                    _lib.call(lib.cc_cmd_kill, handle)
                except CCError:
                    pass
                call.wait(0.2)

        return cancel_then_settle(kill_until_done)

    def _status(self, fn: str, op: str, *args: Any) -> int:
        handle = self._h(op)
        lib = _lib.native()

        def run() -> int:
            code = c_int32()
            _lib.call(getattr(lib, fn), handle, *args, byref(code))
            return int(code.value)

        code: int = interruptible(run, self._killer(handle), op)
        self._exit_code = code
        return code

    def wait(self, cancel: Optional[CancelToken] = None) -> int:
        """Waits for the started process; returns its exit status. Raises
        ``NotRunningError`` if the guest dies or stops answering meanwhile
        (never a made-up status), ``AlreadyClosedError`` if the instance is
        closed from another thread. Cancelling CANCEL raises
        ``CancelledError`` ("wait cancelled"); the process keeps running
        and can be waited for again (Ctrl-C kills it)."""
        token = cancel_handle(cancel, "wait")
        return self._status("cc_cmd_wait_cancellable", "wait", token)

    def run(self) -> int:
        """Starts the process and waits for it; returns its exit status."""
        return self._status("cc_cmd_run", "run")

    def _capture(self, fn: str, op: str) -> bytes:
        handle = self._h(op)
        lib = _lib.native()

        def run() -> tuple[bytes, int]:
            data = c_void_p()
            length = c_size_t()
            code = c_int32()
            _lib.call(getattr(lib, fn), handle, byref(data), byref(length), byref(code))
            return _lib.take_bytes(data, length.value), int(code.value)

        result: tuple[bytes, int] = interruptible(run, self._killer(handle), op)
        out, code = result
        self._exit_code = code
        return out

    def output(self) -> bytes:
        """Runs the process and returns its stdout (the exit status is then
        in ``exit_code``). Output over ``InstanceOptions.max_result_bytes``
        kills the process and raises ``TooLargeError``; stream big output
        with ``output_to`` or ``stdout_pipe``."""
        return self._capture("cc_cmd_output", "output")

    def combined_output(self) -> bytes:
        """Runs the process and returns its stdout and stderr interleaved in
        the order written, bounded as ``output``."""
        return self._capture("cc_cmd_combined_output", "combined_output")

    def output_to(self, host_path: _lib.PathArg, merged: bool = False) -> int:
        """Runs the process and streams its stdout (with stderr interleaved
        in the order written when MERGED) into HOST_PATH (created, or
        truncated) as it comes, in constant memory whatever its size.
        Returns the bytes written; the exit status is then in
        ``exit_code``. If the file cannot be written the process is
        killed."""
        handle = self._h("output_to")
        raw_path = _lib.encode_path(host_path, "host_path")
        lib = _lib.native()

        def run() -> tuple[int, int]:
            written = c_uint64()
            code = c_int32()
            _lib.call(
                lib.cc_cmd_output_to_file,
                handle,
                raw_path,
                bool(merged),
                byref(written),
                byref(code),
            )
            return int(written.value), int(code.value)

        result: tuple[int, int] = interruptible(run, self._killer(handle), "output_to")
        written, code = result
        self._exit_code = code
        return written

    def resize(self, rows: int, cols: int) -> None:
        """Sets the window size of the started command's terminal (see
        ``pty``); its foreground programs get ``SIGWINCH``. A command that
        ended is fine; one without a terminal raises
        ``InvalidArgumentError``."""
        r, c = _window("rows", rows, "resize"), _window("cols", cols, "resize")
        _lib.call(_lib.native().cc_cmd_resize, self._h("resize"), r, c)

    def kill(self) -> None:
        """Kills the started process and its process group (SIGKILL); a
        process that has ended is fine."""
        _lib.call(_lib.native().cc_cmd_kill, self._h("kill"))

    @property
    def exit_code(self) -> Optional[int]:
        """The exit status once a wait returned, else None."""
        if self._closed:
            return self._exit_code
        code = c_int32()
        exited = c_bool()
        _lib.call(_lib.native().cc_cmd_exit_code, self._handle, byref(code), byref(exited))
        if exited.value:
            self._exit_code = int(code.value)
        return self._exit_code

    def close(self) -> None:
        """Releases the command handle. Closing again does nothing."""
        self._release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"exit_code={self._exit_code}"
        return f"<Cmd {self._argv!r} {state}>"
