"""Blocking calls that Ctrl-C can interrupt, and the base of handle objects.

A foreign call cannot be interrupted: Python runs its SIGINT handler only
between bytecodes, so a ``KeyboardInterrupt`` would wait for the call to
return (forever, for ``Cmd.wait`` on a process that never ends). So calls
that may block without bound (``OCIClient.pull``, ``Instance.wait``,
``Cmd.wait``/``run``/``output``/``combined_output``, ``Conn`` and ``File``
reads and writes), when made on the main thread, run in a helper thread
while the main thread waits for it in short, interruptible steps. On
Ctrl-C the main thread cancels the work (a cancel token for pulls and
waits, ``cc_cmd_kill`` for commands), lets the call end, and re-raises
``KeyboardInterrupt``. A ``Conn``/``File`` read or write cannot be
cancelled: it keeps running and the object's next call waits for it first
(so no data is lost or reordered). Off the main thread, where no
``KeyboardInterrupt`` is delivered, calls run directly.

Calls release the GIL (``ctypes.CDLL``), so other Python threads run while
one blocks, whichever thread it is made on.
"""

from __future__ import annotations

import threading
import weakref
from types import TracebackType
from typing import Callable, ClassVar, Generic, Optional, TypeVar

from ._errors import AlreadyClosedError
from ._lib import free

T = TypeVar("T")

# How long the main thread waits for a cancelled call to end before it
# re-raises KeyboardInterrupt anyway.
SETTLE_SECONDS = 10.0
_STEP = 0.1


class Call(Generic[T]):
    """FN running in a daemon helper thread."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._fn = fn
        self._done = threading.Event()
        self._value: Optional[T] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(
            target=self._run, name=f"crumblecracker-{name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:
            self._error = e
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits (interruptibly, in short steps) until done or TIMEOUT."""
        if timeout is None:
            while not self._done.wait(_STEP):
                pass
            return True
        return self._done.wait(timeout)

    def result(self) -> T:
        """The value FN returned, or raises what it raised (after ``wait``)."""
        if self._error is not None:
            error = self._error
            raise error
        return self._value  # type: ignore[return-value]

    def succeeded(self) -> bool:
        return self._done.is_set() and self._error is None


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def interruptible(
    fn: Callable[[], T],
    on_interrupt: Callable[[Call[T]], None],
    name: str = "call",
) -> T:
    """Runs FN so that Ctrl-C interrupts it promptly.

    On the main thread FN runs in a helper thread; a ``KeyboardInterrupt``
    while waiting calls ON_INTERRUPT with the still-running call (to cancel
    it, wait for it, or keep it for later) and is then re-raised. Elsewhere
    FN simply runs.
    """
    if not on_main_thread():
        return fn()
    call = Call(fn, name)
    try:
        call.wait()
    except KeyboardInterrupt:
        on_interrupt(call)
        raise
    return call.result()


def cancel_then_settle(
    cancel: Callable[[Call[T]], None],
    discard: Optional[Callable[[T], None]] = None,
) -> Callable[[Call[T]], None]:
    """An ON_INTERRUPT that cancels, waits for the call to end, and
    releases what it returned if it still succeeded (DISCARD)."""

    def on_interrupt(call: Call[T]) -> None:
        try:
            cancel(call)
        except Exception:
            pass
        if call.wait(SETTLE_SECONDS) and discard is not None and call.succeeded():
            try:
                discard(call.result())
            except Exception:
                pass

    return on_interrupt


_H = TypeVar("_H", bound="Handle")


class Handle:
    """An object over one libcc handle: a context manager whose ``close()``
    is idempotent, and whose handle is freed when it is garbage collected
    (through ``weakref.finalize``: no ``__del__``)."""

    _kind: ClassVar[str] = "object"
    _free_fn: ClassVar[str] = ""

    def __init__(self, handle: int) -> None:
        self._handle = handle
        self._closed = False
        self._finalizer = weakref.finalize(self, free, self._free_fn, handle)

    def _h(self, op: str) -> int:
        """The handle, or AlreadyClosedError when this object is closed."""
        if self._closed:
            raise AlreadyClosedError(f"the {self._kind} is closed", op=op)
        return self._handle

    def _release(self) -> None:
        """Frees the handle now (idempotent, never raises)."""
        self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def close(self) -> None:
        """Releases the object. Closing again does nothing."""
        self._release()

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


class Stream(Handle):
    """A handle whose reads and writes are serialized and may block: a
    ``File`` or a ``Conn``.

    A read or write interrupted by Ctrl-C cannot be cancelled; it keeps
    running and the next call on the object waits for it first: the bytes
    an interrupted read returns are handed out by the next ``read``, and
    the error of an interrupted call is raised by the next call.
    """

    def __init__(self, handle: int) -> None:
        super().__init__(handle)
        self._pending: Optional[Call[object]] = None
        self._leftover = b""

    def _settle(self) -> None:
        call = self._pending
        if call is None:
            return
        call.wait()  # Ctrl-C here leaves the call pending
        self._pending = None
        value = call.result()
        if isinstance(value, bytes):
            self._leftover += value

    def _blocking(self, fn: Callable[[], T], name: str) -> T:
        self._settle()

        def keep(call: Call[T]) -> None:
            self._pending = call  # type: ignore[assignment]

        return interruptible(fn, keep, name)

    def _take_leftover(self, n: int) -> bytes:
        if n < 0:
            data, self._leftover = self._leftover, b""
        else:
            data, self._leftover = self._leftover[:n], self._leftover[n:]
        return data

    def _close_after_pending(self, close: Callable[[], None]) -> bool:
        """When a call is still pending, runs CLOSE (and the free) once it
        ends, in the background, and returns True."""
        call = self._pending
        if call is None or call.done():
            self._pending = None
            return False
        self._closed = True

        def later() -> None:
            call.wait(None)
            try:
                close()
            except Exception:
                pass
            self._release()

        threading.Thread(target=later, name="crumblecracker-close", daemon=True).start()
        return True
