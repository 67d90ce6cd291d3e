"""Blocking calls that Ctrl-C can interrupt, and the base of handle objects.

A foreign call cannot be interrupted: Python runs its SIGINT handler only
between bytecodes, so a ``KeyboardInterrupt`` would wait for the call to
return (forever, for ``Cmd.wait`` on a process that never ends). So calls
that may block without bound (``OCIClient.pull``, ``Instance.wait``,
``Listener.accept``, ``Cmd.wait``/``run``/``output``/``combined_output``,
``Conn`` and ``File`` reads and writes), when made on the main thread, run
in a helper thread while the main thread waits for it in short,
interruptible steps. On Ctrl-C the main thread cancels the work (a cancel
token for pulls, waits and accepts, ``cc_cmd_kill`` for commands), lets the
call end, and re-raises ``KeyboardInterrupt``. A ``Conn``/``File`` read or
write cannot be cancelled: it keeps running and the object's next call of
the same direction waits for it first (so no data is lost or reordered).
Off the main thread, where no ``KeyboardInterrupt`` is delivered, calls run
directly.

Another thread's calls can be made interruptible the same way: a thread
that installs an ``Interrupter`` (``crumblecracker.aio`` does, in the worker
thread of each call) runs them in a helper thread too, and
``Interrupter.interrupt()`` from any thread then acts as Ctrl-C does,
raising ``Interrupted`` instead of ``KeyboardInterrupt``.

``Conn`` reads and writes are independent directions: a read in one thread
and a write in another run at once, and an interrupted call holds up only
later calls of its own direction.

Calls release the GIL (``ctypes.CDLL``), so other Python threads run while
one blocks, whichever thread it is made on.
"""

from __future__ import annotations

import threading
import weakref
from types import TracebackType
from typing import Any, Callable, ClassVar, Generic, Optional, TypeVar

from ._errors import AlreadyClosedError
from ._lib import free

T = TypeVar("T")

# How long the main thread waits for a cancelled call to end before it
# re-raises KeyboardInterrupt anyway.
SETTLE_SECONDS = 10.0
_STEP = 0.1


class Interrupted(BaseException):
    """Raised in a thread whose ``Interrupter`` was interrupted, where the
    main thread would get ``KeyboardInterrupt`` (a ``BaseException``, so
    that ``except Exception`` does not swallow it)."""


class Interrupter:
    """Makes the blocking calls of the thread that installs it
    interruptible from other threads, as Ctrl-C makes the main thread's.

    Installed with ``install()`` in the thread making the calls; any thread
    may then call ``interrupt()``, once: the call in progress (or the next
    one) is cancelled as on Ctrl-C and raises ``Interrupted``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interrupted = False
        self._wake: Optional[threading.Event] = None

    def install(self) -> None:
        """Makes this the interrupter of the calling thread."""
        _local.interrupter = self

    @staticmethod
    def uninstall() -> None:
        """Removes the calling thread's interrupter."""
        _local.interrupter = None

    def interrupt(self) -> None:
        """Interrupts the thread's blocking call, now or when it starts."""
        with self._lock:
            self._interrupted = True
            wake = self._wake
        if wake is not None:
            wake.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    def check(self) -> None:
        """Raises ``Interrupted`` when interrupted."""
        if self._interrupted:
            raise Interrupted()

    def wait_for(self, call: Call[Any]) -> None:
        """Waits until CALL ends; raises ``Interrupted`` when interrupted
        first (or meanwhile: an interrupt wins over a call that just ended,
        so that its result goes where an interrupted call's goes)."""
        wake = threading.Event()
        with self._lock:
            if self._interrupted:
                raise Interrupted()
            self._wake = wake
        try:
            call._notify(wake)
            wake.wait()
        finally:
            with self._lock:
                self._wake = None
        self.check()


class _Local(threading.local):
    interrupter: Optional[Interrupter] = None


_local = _Local()


def current_interrupter() -> Optional[Interrupter]:
    """The calling thread's ``Interrupter``, if it installed one."""
    return _local.interrupter


class Call(Generic[T]):
    """FN running in a daemon helper thread."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._fn = fn
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._wakers: list[threading.Event] = []
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
            with self._lock:
                self._done.set()
                wakers, self._wakers = self._wakers, []
            for w in wakers:
                w.set()

    def _notify(self, event: threading.Event) -> None:
        """Sets EVENT when the call ends (now, if it has)."""
        with self._lock:
            if not self._done.is_set():
                self._wakers.append(event)
                return
        event.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits until done or TIMEOUT. Without a timeout the wait is
        interruptible: by Ctrl-C (on the main thread, in short steps) or by
        the thread's ``Interrupter`` (``Interrupted``)."""
        if timeout is not None:
            return self._done.wait(timeout)
        interrupter = current_interrupter()
        if interrupter is not None:
            interrupter.wait_for(self)
            return True
        while not self._done.wait(_STEP):
            pass
        return True

    def join(self) -> None:
        """Waits until done, uninterruptibly (for background threads)."""
        self._done.wait()

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
    """Runs FN so that Ctrl-C (or the thread's ``Interrupter``) interrupts
    it promptly.

    On the main thread, or in a thread with an ``Interrupter``, FN runs in
    a helper thread; a ``KeyboardInterrupt`` (or ``Interrupted``) while
    waiting calls ON_INTERRUPT with the still-running call (to cancel it,
    wait for it, or keep it for later) and is then re-raised. Elsewhere FN
    simply runs.
    """
    interrupter = current_interrupter()
    if interrupter is None:
        if not on_main_thread():
            return fn()
    else:
        interrupter.check()  # interrupted already: start nothing
    call = Call(fn, name)
    try:
        call.wait()
    except (KeyboardInterrupt, Interrupted):
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
    """A handle whose reads and writes may block: a ``File`` or a ``Conn``.

    Calls go in directions (``_READ``/``_WRITE`` for a ``Conn``, whose read
    and write may run at once in two threads; one direction, ``_ALL``, for
    a ``File``, whose reads and writes share the offset). Within a
    direction calls are serialized: a read or write interrupted by Ctrl-C
    (or an ``Interrupter``) cannot be cancelled; it keeps running and the
    next call of its direction waits for it first: the bytes an interrupted
    read returns are handed out by the next ``read``, and the error of an
    interrupted call is raised by the next call of its direction.
    """

    _ALL: ClassVar[str] = "all"
    _READ: ClassVar[str] = "all"
    _WRITE: ClassVar[str] = "all"

    def __init__(self, handle: int) -> None:
        super().__init__(handle)
        self._pending: dict[str, Call[object]] = {}
        self._leftover = b""

    def _settle(self, direction: Optional[str] = None) -> None:
        """Waits for the interrupted call of DIRECTION (of every direction
        when None) and takes its result."""
        directions = list(self._pending) if direction is None else [direction]
        for d in directions:
            call = self._pending.get(d)
            if call is None:
                continue
            call.wait()  # an interrupt here leaves the call pending
            self._pending.pop(d, None)
            value = call.result()
            if isinstance(value, bytes):
                self._leftover += value

    def _blocking(self, fn: Callable[[], T], name: str, direction: Optional[str] = None) -> T:
        d = self._ALL if direction is None else direction
        self._settle(d)

        def keep(call: Call[T]) -> None:
            self._pending[d] = call  # type: ignore[assignment]

        return interruptible(fn, keep, name)

    def _take_leftover(self, n: int) -> bytes:
        if n < 0:
            data, self._leftover = self._leftover, b""
        else:
            data, self._leftover = self._leftover[:n], self._leftover[n:]
        return data

    def _unread(self, data: bytes) -> None:
        """Puts DATA back in front of what the next read returns."""
        self._leftover = data + self._leftover

    def _close_after_pending(self, close: Callable[[], None]) -> bool:
        """When a call that must finish before closing is still pending (any
        interrupted call of a ``File``, an interrupted write of a ``Conn``:
        its data is on its way), runs CLOSE (and the free) once it ends, in
        the background, and returns True. A pending read of a ``Conn`` does
        not wait: closing ends it."""
        waits = [
            c
            for d, c in list(self._pending.items())
            if not c.done() and (d == self._WRITE or self._READ == self._WRITE)
        ]
        if not waits:
            self._pending.clear()
            return False
        self._closed = True

        def later() -> None:
            for c in waits:
                c.join()
            try:
                close()
            except Exception:
                pass
            self._release()

        threading.Thread(target=later, name="crumblecracker-close", daemon=True).start()
        return True
