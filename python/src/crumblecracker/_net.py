"""TCP between the host and the guest: listeners guest programs reach at
``host.internal``, and guest ports exposed on the host's loopback.
(Connections, from ``Listener.accept`` and ``Instance.dial``, are ``Conn``s.)
"""

from __future__ import annotations

from ctypes import byref, c_uint16, c_uint64, c_void_p
from typing import TYPE_CHECKING, Optional

from . import _lib
from ._call import Call, Handle, cancel_then_settle, interruptible
from ._cancel import CancelToken, call_token
from ._cmd import Conn
from ._errors import AlreadyClosedError, CCError, ErrorCode, InvalidArgumentError, NotRunningError

if TYPE_CHECKING:
    from ._instance import Instance

__all__ = ["ExposedPort", "Listener", "check_port"]


def check_port(value: object, what: str) -> int:
    """VALUE as a TCP port (0 to 65535); refused here rather than wrapped
    around by ``c_uint16``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 0xFFFF:
        raise InvalidArgumentError(f"{what} must be between 0 and 65535, not {value}")
    return value


class Listener(Handle):
    """Listens for connections from guest programs (``Instance.listen``),
    which connect to ``host.internal`` at ``port`` (``addr``).

    ``accept()`` returns each connection as a readable and writable
    ``Conn``. Usable from any thread: ``close()`` from another thread ends
    a blocked ``accept`` with ``AlreadyClosedError``; Ctrl-C stops it with
    ``KeyboardInterrupt``. A context manager; ``close()`` is idempotent and
    leaves connections already accepted open. Closing the instance closes
    its listeners (``accept`` then raises ``NotRunningError`` or
    ``AlreadyClosedError``).
    """

    _kind = "listener"
    _free_fn = "cc_listener_free"

    def __init__(self, handle: int, instance: Instance) -> None:
        super().__init__(handle)
        self._instance = instance  # keeps the instance open while the listener is
        addr = c_void_p()
        port = c_uint16()
        _lib.call(_lib.native().cc_listener_addr, handle, byref(addr), byref(port))
        self._addr = _lib.take_string(addr)
        self._port = int(port.value)

    @property
    def addr(self) -> str:
        """The address guest programs connect to: ``"host.internal:PORT"``
        (``"IP:PORT"`` for a listener on another guest address)."""
        return self._addr

    @property
    def port(self) -> int:
        """The port listened on (the one picked when asked for port 0)."""
        return self._port

    def accept(self, cancel: Optional[CancelToken] = None) -> Conn:
        """Waits for the next guest connection and returns it. Cancelling
        CANCEL raises ``CancelledError`` ("accept cancelled")."""
        handle = self._h("accept")
        lib = _lib.native()

        def discard(conn: int) -> None:
            _lib.free("cc_conn_free", conn)

        with call_token(cancel, "accept") as token:

            def run() -> int:
                out = c_uint64()
                _lib.call(lib.cc_listener_accept, handle, token, byref(out))
                return int(out.value)

            def stop(_call: Call[int]) -> None:
                _lib.call(lib.cc_cancel_token_cancel, token)

            try:
                conn = interruptible(run, cancel_then_settle(stop, discard), "accept")
            except CCError as e:
                # Closed (and freed) by another thread before the call began.
                if self._closed and e.code == ErrorCode.INVALID_HANDLE:
                    raise AlreadyClosedError("the listener is closed", op="accept") from None
                raise
        return Conn(conn, self._instance, f"accepted on {self._addr}", tcp=True)

    def close(self) -> None:
        """Stops listening (guest connections to the port are refused);
        connections already accepted stay open. Closing again does
        nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            _lib.call(_lib.native().cc_listener_close, self._handle)
        except (AlreadyClosedError, NotRunningError):
            pass  # the instance was closed or ended, which closed the listener
        finally:
            self._release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Listener {self._addr!r} {state}>"


class ExposedPort(Handle):
    """A guest TCP port published on the host's loopback
    (``Instance.expose``): connections to ``127.0.0.1:host_port`` on the
    host reach ``guest_port`` in the guest.

    A context manager; ``close()`` (idempotent) unpublishes the port and
    closes its connections, as closing the instance does.
    """

    _kind = "exposed port"
    _free_fn = "cc_exposed_free"

    def __init__(self, handle: int, instance: Instance, guest_port: int, host_port: int) -> None:
        super().__init__(handle)
        self._instance = instance  # keeps the instance open while the port is
        self._guest_port = guest_port
        self._host_port = host_port

    @property
    def host_port(self) -> int:
        """The host port (on ``127.0.0.1``) that reaches the guest port."""
        return self._host_port

    @property
    def guest_port(self) -> int:
        """The guest port published."""
        return self._guest_port

    def close(self) -> None:
        """Unpublishes the port and closes its connections. Closing again
        does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            _lib.call(_lib.native().cc_exposed_close, self._handle)
        except (AlreadyClosedError, NotRunningError):
            pass
        finally:
            self._release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ExposedPort 127.0.0.1:{self._host_port} -> guest port {self._guest_port} {state}>"
