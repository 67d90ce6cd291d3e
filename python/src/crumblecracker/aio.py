"""crumblecracker for asyncio: the same API with ``async def`` methods.

    import asyncio
    import crumblecracker as cc
    from crumblecracker import aio

    async def main() -> None:
        cc.init()
        async with aio.OCIClient() as client:
            source = await client.pull("alpine:latest")
            async with aio.Instance(source, cc.InstanceOptions()) as inst:
                print(await inst.command("echo", "hello").output())
                async with await inst.listen("tcp", ":8080") as listener:
                    conn = await listener.accept()
                    await conn.write(b"hello, guest\\n")
        await aio.shutdown()

    asyncio.run(main())

Every class here (``OCIClient``, ``ImageSource``, ``Instance``, ``Cmd``,
``Conn``, ``File``, ``Listener``, ``ExposedPort``, ``Snapshot``) wraps one
object of the synchronous API and is generated from it: each public method
of the synchronous class becomes an ``async def`` that runs it in a worker
thread (so the event loop never blocks), except a few cheap ones that stay
plain methods (``Instance.command``/``entrypoint_command`` and ``Cmd``'s
setters, ``get_env``, ``environ`` and pipes). Properties (``id``,
``is_running``, ``addr``, ``port``, ``exit_code``, ...) stay properties.
Resources a method returns come back wrapped (``await inst.listen(...)``
is an ``aio.Listener``, its ``accept()`` an ``aio.Conn``); arguments may be
wrapped or synchronous objects. Value types, exceptions and constants are
the synchronous API's, re-exported here.

``aio.OCIClient(...)`` opens the store at once; ``aio.Instance(source,
options)`` boots when entered (``async with``) or awaited
(``inst = await aio.Instance(source, options)``). ``close()`` is a
coroutine; ``async with`` closes on exit. ``aio.wrap(obj)`` wraps an object
of the synchronous API; ``.wrapped`` is the object a wrapper wraps.

Cancelling a task that awaits a call (``task.cancel()``,
``asyncio.wait_for`` timing out) interrupts the call as Ctrl-C does in the
synchronous API, then raises ``asyncio.CancelledError`` once the worker
thread is done with it:

- a pull is cancelled; ``Instance.wait`` and ``Listener.accept`` stop (a
  connection accepted at that moment is closed); a command being run or
  waited for (``run``, ``wait``, ``output``, ``combined_output``) is
  killed;
- a ``Conn`` or ``File`` read or write cannot be stopped: it goes on in
  the background and the next call of its direction (read or write) waits
  for it, so nothing is lost or reordered: the next ``read`` returns the
  bytes a cancelled read got;
- booting is stopped too (pulls, boots, waits and accepts run with a child
  of their ``cancel=`` token that the task's cancellation cancels);
- other calls (file system calls, ``close``) run to the end first; a
  resource a cancelled call created (a booted instance, a pulled source)
  is closed.

Every call that takes ``cancel=`` in the synchronous API takes it here
(``aio.Instance(source, options, cancel=token)`` too): cancelling the
``CancelToken`` raises ``CancelledError`` in the awaiting task.

Type checkers see every generated member with the synchronous signature
(as a coroutine where it is one, resources as their wrappers): each class
holds declarations generated from the synchronous class under
``TYPE_CHECKING`` (``python -m crumblecracker.aio`` regenerates them after
the synchronous API changes; a test checks they are current).

Many calls may be in flight at once: each runs in a thread of its own, not
in a bounded pool, so connections blocked in ``read`` or ``accept`` cannot
starve other calls. A pull's progress callback is called in a worker
thread (use ``loop.call_soon_threadsafe`` to reach the loop from it).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, TypeVar, Union

from . import (
    _call,
    _cmd,
    _file,
    _instance,
    _net,
    _oci,
    api_version,
    api_version_compatible,
    guest_protocol_version,
    init,
    library_path,
    query_capabilities,
    supports_hypervisor,
)
from . import shutdown as _sync_shutdown
from ._cancel import CancelToken
from ._errors import (
    AlreadyClosedError,
    CancelledError,
    CCError,
    ErrorCode,
    HypervisorUnavailableError,
    InvalidArgumentError,
    InvalidHandleError,
    IOError,
    NetworkError,
    NotRunningError,
    PausedError,
    TimeoutError,
    TooLargeError,
)
from ._file import Data
from ._instance import GuestPath
from ._lib import LibraryLoadError, PathArg
from ._oci import ProgressCallback
from ._types import (
    O_APPEND,
    O_CREATE,
    O_EXCL,
    O_RDONLY,
    O_RDWR,
    O_TRUNC,
    O_WRONLY,
    Auth,
    Capabilities,
    DirEntry,
    FileInfo,
    ImageConfig,
    InstanceOptions,
    Mount,
    NetworkPolicy,
    PullOptions,
    PullPolicy,
    PullProgress,
    SeekWhence,
    StartKind,
)

__all__ = [
    "O_APPEND",
    "O_CREATE",
    "O_EXCL",
    "O_RDONLY",
    "O_RDWR",
    "O_TRUNC",
    "O_WRONLY",
    "AlreadyClosedError",
    "Auth",
    "CCError",
    "CancelToken",
    "CancelledError",
    "Capabilities",
    "Cmd",
    "Conn",
    "DirEntry",
    "ErrorCode",
    "ExposedPort",
    "File",
    "FileInfo",
    "HypervisorUnavailableError",
    "IOError",
    "ImageConfig",
    "ImageSource",
    "Instance",
    "InstanceOptions",
    "InvalidArgumentError",
    "InvalidHandleError",
    "LibraryLoadError",
    "Listener",
    "Mount",
    "NetworkError",
    "NetworkPolicy",
    "NotRunningError",
    "OCIClient",
    "PausedError",
    "ProgressCallback",
    "PullOptions",
    "PullPolicy",
    "PullProgress",
    "SeekWhence",
    "Snapshot",
    "StartKind",
    "TimeoutError",
    "TooLargeError",
    "api_version",
    "api_version_compatible",
    "guest_protocol_version",
    "init",
    "library_path",
    "query_capabilities",
    "run_in_thread",
    "shutdown",
    "supports_hypervisor",
    "wrap",
]

T = TypeVar("T")
_A = TypeVar("_A", bound="_Async")

# What instances boot from and images are exported from: wrapped or not.
SourceLike = Union["ImageSource", "Snapshot", _oci.ImageSource, _instance.Snapshot]


# -- running blocking calls ----------------------------------------------------


def _close_quietly(value: object) -> None:
    """Closes VALUE, if it is a resource, in a background thread (closing
    an instance takes a while)."""
    if not isinstance(value, _call.Handle):
        return

    def close() -> None:
        try:
            value.close()
        except Exception:
            pass

    threading.Thread(target=close, name="crumblecracker-aio-close", daemon=True).start()


async def run_in_thread(fn: Callable[[], T], salvage: Optional[Callable[[T], None]] = None) -> T:
    """Runs FN in a worker thread of its own and returns what it returns.

    Cancelling the awaiting task interrupts FN's blocking crumblecracker
    calls as Ctrl-C would (see the module's documentation), waits for the
    thread to finish with it, and raises ``asyncio.CancelledError``. When
    FN still returned a value, SALVAGE (by default: close it if it is a
    resource) gets it.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()
    interrupter = _call.Interrupter()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def work() -> None:
        interrupter.install()
        ok = True
        value: Any
        try:
            value = fn()
        except BaseException as e:
            ok, value = False, e
        finally:
            interrupter.uninstall()
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is closed: nobody takes the value
            if ok:
                (salvage or _close_quietly)(value)

    threading.Thread(target=work, name="crumblecracker-aio", daemon=True).start()
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        interrupter.interrupt()
        while not fut.done():
            try:
                await asyncio.wait((fut,))
            except asyncio.CancelledError:
                pass  # cancelled again: still let the thread finish first
        if not fut.cancelled():
            if fut.exception() is None:
                (salvage or _close_quietly)(fut.result())
        raise


# -- wrappers ------------------------------------------------------------------

# Synchronous class -> the class wrapping it here.
_WRAPPERS: dict[type[Any], type[_Async]] = {}


def wrap(obj: Any) -> Any:
    """OBJ wrapped for asyncio when it is an object of the synchronous API
    (an ``Instance``, ``Conn``, ...), or a list of them (``branch``);
    anything else as it is."""
    if isinstance(obj, list):
        return [wrap(o) for o in obj]
    cls = _WRAPPERS.get(type(obj))
    return obj if cls is None else cls._of(obj)


def _unwrap(value: Any) -> Any:
    return value._require() if isinstance(value, _Async) else value


def _async_method(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def method(self: _Async, *args: Any, **kwargs: Any) -> Any:
        bound = getattr(self._require(), name)
        call = functools.partial(
            bound, *map(_unwrap, args), **{k: _unwrap(v) for k, v in kwargs.items()}
        )
        result = await run_in_thread(call, functools.partial(self._salvage, name))
        return self._wrap_result(result)

    doc = fn.__doc__ or ""
    method.__doc__ = f"Coroutine: runs ``{fn.__qualname__}`` in a worker thread.\n\n{doc}"
    return method


def _inline_method(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def method(self: _Async, *args: Any, **kwargs: Any) -> Any:
        bound = getattr(self._require(), name)
        result = bound(*map(_unwrap, args), **{k: _unwrap(v) for k, v in kwargs.items()})
        return self._wrap_result(result)

    return method


# What the base class defines itself, for every wrapper.
_OWN = frozenset({"close", "closed"})


def _generated_members(cls: type[_Async]) -> list[tuple[str, Any]]:
    """(name, property or function) of the public members of the class CLS
    wraps that CLS gets generated: all but those it or the base defines."""
    sync_type = cls._sync_type
    members = []
    for name in dir(sync_type):
        if name.startswith("_") or name in cls.__dict__:
            continue
        if hasattr(_Async, name):
            if name not in _OWN:
                raise TypeError(f"aio.{cls.__name__} would hide {sync_type.__name__}.{name}")
            continue
        member = inspect.getattr_static(sync_type, name)
        if isinstance(member, property) or inspect.isfunction(member):
            members.append((name, member))
    return members


def _forward_property(name: str, prop: property) -> property:
    def get(self: _Async) -> Any:
        return self._wrap_result(getattr(self._require(), name))

    return property(get, doc=prop.__doc__)


class _Async:
    """Wraps one object of the synchronous API: see the module's
    documentation. Subclasses name the class they wrap (``_sync_type``);
    their methods and properties are generated from it."""

    _sync_type: ClassVar[type[Any]]
    # Methods cheap enough to run in the event loop's thread.
    _inline: ClassVar[frozenset[str]] = frozenset()
    # (name, property or function of the synchronous class) generated here.
    _generated: ClassVar[tuple[tuple[str, Any], ...]] = ()

    _wrapped: Any  # the synchronous object; None until started

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        sync_type = cls.__dict__.get("_sync_type")
        if sync_type is None:
            return
        _WRAPPERS[sync_type] = cls
        cls._generated = tuple(_generated_members(cls))
        for name, member in cls._generated:
            if isinstance(member, property):
                setattr(cls, name, _forward_property(name, member))
            else:
                make = _inline_method if name in cls._inline else _async_method
                setattr(cls, name, make(name, member))

    def __init__(self, sync: Any) -> None:
        """Wraps SYNC, an object of the synchronous API (see ``wrap``)."""
        if not isinstance(sync, self._sync_type):
            raise TypeError(
                f"aio.{type(self).__name__} wraps a crumblecracker.{self._sync_type.__name__}, "
                f"not {type(sync).__name__}"
            )
        self._wrapped = sync

    @classmethod
    def _of(cls: type[_A], sync: Any) -> _A:
        obj = cls.__new__(cls)
        obj._wrapped = sync
        return obj

    def _require(self) -> Any:
        sync = self._wrapped
        if sync is None:
            name = type(self).__name__
            raise InvalidArgumentError(
                f"the {name.lower()} is not started: use `async with aio.{name}(...)` "
                f"or `await aio.{name}(...)`"
            )
        return sync

    def _wrap_result(self, result: Any) -> Any:
        return self if result is self._wrapped else wrap(result)

    def _salvage(self, method: str, result: Any) -> None:
        """Takes what a call whose task was cancelled returned anyway."""
        _close_quietly(result)

    async def _start(self: _A) -> _A:
        return self

    @property
    def wrapped(self) -> Any:
        """The object of the synchronous API this wraps."""
        return self._require()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        sync = self._wrapped
        return bool(sync is not None and sync.closed)

    async def close(self) -> None:
        """Closes the object (in a worker thread). Closing again does
        nothing."""
        sync = self._wrapped
        if sync is not None and not sync.closed:
            await run_in_thread(sync.close)

    def __await__(self: _A) -> Generator[Any, None, _A]:
        return self._start().__await__()

    async def __aenter__(self: _A) -> _A:
        return await self._start()

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        sync = self._wrapped
        if sync is None:
            return f"<aio.{type(self).__name__} not started>"
        return f"<aio.{repr(sync)[1:]}"


class _AsyncStream(_Async):
    def _salvage(self, method: str, result: Any) -> None:
        # The bytes of a read whose task was cancelled come first next time.
        if method == "read" and isinstance(result, bytes) and result:
            self._require()._unread(result)


class OCIClient(_Async):
    """``crumblecracker.OCIClient`` for asyncio: ``pull``, ``load_tar``,
    ``load_dir``, ``export_dir`` and ``close`` are coroutines; ``pull`` and
    the loads return ``aio.ImageSource``s."""

    _sync_type = _oci.OCIClient

    def __init__(self, cache_dir: Optional[PathArg] = None) -> None:
        super().__init__(_oci.OCIClient(cache_dir))

    if TYPE_CHECKING:
        # -- generated from the synchronous class by `python -m crumblecracker.aio` --
        @property
        def cache_dir(self) -> str: ...

        async def export_dir(self, source: SourceLike, path: PathArg) -> None: ...

        async def load_dir(
            self,
            path: PathArg,
            cancel: Optional[CancelToken] = None,
        ) -> ImageSource: ...

        async def load_tar(
            self,
            path: PathArg,
            cancel: Optional[CancelToken] = None,
        ) -> ImageSource: ...

        async def pull(
            self,
            ref: str,
            options: Optional[PullOptions] = None,
            progress_callback: Optional[ProgressCallback] = None,
            cancel: Optional[CancelToken] = None,
        ) -> ImageSource: ...

        # -- end of generated declarations --


class ImageSource(_Async):
    """``crumblecracker.ImageSource`` for asyncio (``get_config`` and
    ``close`` are coroutines)."""

    _sync_type = _oci.ImageSource

    if TYPE_CHECKING:
        # -- generated from the synchronous class by `python -m crumblecracker.aio` --
        async def get_config(self) -> ImageConfig: ...

        @property
        def name(self) -> str: ...

        # -- end of generated declarations --


class Snapshot(_Async):
    """``crumblecracker.Snapshot`` for asyncio (``as_source``,
    ``export_dir`` and ``close`` are coroutines)."""

    _sync_type = _instance.Snapshot

    if TYPE_CHECKING:
        # -- generated from the synchronous class by `python -m crumblecracker.aio` --
        async def as_source(self) -> ImageSource: ...

        async def export_dir(self, path: PathArg) -> None: ...

        @property
        def name(self) -> str: ...

        # -- end of generated declarations --


class Instance(_Async):
    """``crumblecracker.Instance`` for asyncio.

    ``aio.Instance(source, options)`` boots when entered
    (``async with``) or awaited (``await aio.Instance(...)``). Every method
    is a coroutine except ``command`` and ``entrypoint_command``, which
    return an ``aio.Cmd`` at once; ``listen``, ``dial``, ``expose``, the
    file handles and snapshots return wrapped objects.
    """

    _sync_type = _instance.Instance
    _inline = frozenset({"command", "entrypoint_command"})

    def __init__(
        self,
        source: SourceLike,
        options: Optional[InstanceOptions] = None,
        cancel: Optional[CancelToken] = None,
    ) -> None:
        if not isinstance(source, (ImageSource, Snapshot, _oci.ImageSource, _instance.Snapshot)):
            raise TypeError(
                f"source must be an ImageSource or a Snapshot, not {type(source).__name__}"
            )
        self._wrapped = None
        self._boot_args = (source, options, cancel)
        self._booting = False

    async def _start(self: _A) -> _A:
        inst: Instance = self  # type: ignore[assignment]
        if inst._wrapped is None:
            if inst._booting:
                raise InvalidArgumentError("the instance is already booting in another task")
            source, options, cancel = inst._boot_args
            boot = functools.partial(_instance.Instance, _unwrap(source), options, cancel)
            inst._booting = True
            try:
                inst._wrapped = await run_in_thread(boot)
            finally:
                inst._booting = False
        return self

    @classmethod
    async def restore(cls, path: PathArg, timeout_seconds: Optional[float] = None) -> Instance:
        """Coroutine: runs ``Instance.restore`` in a worker thread and
        returns the restored instance, started (see ``Instance.restore``)."""
        restore = functools.partial(_instance.Instance.restore, path, timeout_seconds)
        return cls._of(await run_in_thread(restore, _instance.Instance.close))

    if TYPE_CHECKING:
        # -- generated from the synchronous class by `python -m crumblecracker.aio` --
        async def branch(self, n: int = 1) -> list[Instance]: ...

        async def chmod(self, path: GuestPath, mode: int) -> None: ...

        async def chown(self, path: GuestPath, uid: int, gid: int) -> None: ...

        async def chtimes(self, path: GuestPath, atime: float, mtime: float) -> None: ...

        def command(self, program: str, *args: str) -> Cmd: ...

        async def copy_in(
            self,
            host_path: PathArg,
            guest_path: GuestPath,
            mode: int = 420,
        ) -> int: ...

        async def copy_out(self, guest_path: GuestPath, host_path: PathArg) -> int: ...

        async def create(self, path: GuestPath) -> File: ...

        async def dial(self, network: str, address: str) -> Conn: ...

        def entrypoint_command(self, *args: str) -> Cmd: ...

        async def expose(self, guest_port: int, host_port: int = 0) -> ExposedPort: ...

        @property
        def id(self) -> str: ...

        @property
        def is_paused(self) -> bool: ...

        @property
        def is_running(self) -> bool: ...

        async def listen(self, network: str, address: str) -> Listener: ...

        async def lstat(self, path: GuestPath) -> FileInfo: ...

        async def mkdir(self, path: GuestPath, mode: int = 493) -> None: ...

        async def mkdir_all(self, path: GuestPath, mode: int = 493) -> None: ...

        async def open(self, path: GuestPath) -> File: ...

        async def open_file(self, path: GuestPath, flags: int = 0, mode: int = 420) -> File: ...

        async def park(self, path: PathArg) -> int: ...

        async def pause(self) -> None: ...

        async def read_dir(self, path: GuestPath) -> list[DirEntry]: ...

        async def read_file(
            self,
            path: GuestPath,
            cancel: Optional[CancelToken] = None,
        ) -> bytes: ...

        async def read_file_stream(self, path: GuestPath) -> Conn: ...

        async def readlink(self, path: GuestPath) -> str: ...

        async def remove(self, path: GuestPath) -> None: ...

        async def remove_all(self, path: GuestPath) -> None: ...

        async def rename(self, src: GuestPath, dst: GuestPath) -> None: ...

        async def resume(self) -> None: ...

        async def set_network_enabled(self, enabled: bool) -> None: ...

        async def snapshot_filesystem(
            self,
            excludes: Optional[Sequence[str]] = None,
        ) -> Snapshot: ...

        @property
        def start_kind(self) -> StartKind: ...

        async def stat(self, path: GuestPath) -> FileInfo: ...

        async def symlink(self, target: GuestPath, link: GuestPath) -> None: ...

        async def wait(self, cancel: Optional[CancelToken] = None) -> None: ...

        async def write_file(
            self,
            path: GuestPath,
            data: Data,
            mode: int = 420,
            cancel: Optional[CancelToken] = None,
        ) -> None: ...

        # -- end of generated declarations --


class Cmd(_Async):
    """``crumblecracker.Cmd`` for asyncio: ``start``, ``wait``, ``run``,
    ``output``, ``combined_output``, ``output_to``, ``resize``, ``kill`` and
    ``close`` are coroutines;
    the setters (``pty`` too), ``get_env``, ``environ`` and the pipes (``aio.Conn``s) are
    plain methods. Cancelling a task waiting for the command kills it."""

    _sync_type = _cmd.Cmd
    _inline = frozenset(
        {
            "set_dir",
            "set_env",
            "set_user",
            "set_timeout",
            "pty",
            "get_env",
            "environ",
            "stdin_pipe",
            "stdout_pipe",
            "stderr_pipe",
        }
    )

    if TYPE_CHECKING:
        # -- generated from the synchronous class by `python -m crumblecracker.aio` --
        @property
        def args(self) -> list[str]: ...

        async def combined_output(self) -> bytes: ...

        def environ(self) -> list[str]: ...

        @property
        def exit_code(self) -> Optional[int]: ...

        def get_env(self, key: str) -> Optional[str]: ...

        async def kill(self) -> None: ...

        async def output(self) -> bytes: ...

        async def output_to(self, host_path: PathArg, merged: bool = False) -> int: ...

        def pty(self, rows: int = 24, cols: int = 80, term: Optional[str] = None) -> Cmd: ...

        async def resize(self, rows: int, cols: int) -> None: ...

        async def run(self) -> int: ...

        def set_dir(self, dir: str) -> Cmd: ...

        def set_env(self, key: str, value: str) -> Cmd: ...

        def set_timeout(self, seconds: float) -> Cmd: ...

        def set_user(self, user: str) -> Cmd: ...

        async def start(self) -> None: ...

        def stderr_pipe(self) -> Conn: ...

        def stdin_pipe(self) -> Conn: ...

        def stdout_pipe(self) -> Conn: ...

        async def wait(self, cancel: Optional[CancelToken] = None) -> int: ...

        # -- end of generated declarations --


class Conn(_AsyncStream):
    """``crumblecracker.Conn`` for asyncio: ``read``, ``write``,
    ``close_write`` and ``close`` are coroutines. One task may read while
    another writes."""

    _sync_type = _cmd.Conn

    if TYPE_CHECKING:
        # -- generated from the synchronous class by `python -m crumblecracker.aio` --
        async def close_write(self) -> None: ...

        @property
        def local_addr(self) -> Optional[str]: ...

        async def read(self, n: int = 65536, cancel: Optional[CancelToken] = None) -> bytes: ...

        @property
        def remote_addr(self) -> Optional[str]: ...

        async def write(self, data: Data, cancel: Optional[CancelToken] = None) -> int: ...

        # -- end of generated declarations --


class File(_AsyncStream):
    """``crumblecracker.File`` for asyncio (every method is a coroutine)."""

    _sync_type = _file.File

    if TYPE_CHECKING:
        # -- generated from the synchronous class by `python -m crumblecracker.aio` --
        @property
        def name(self) -> str: ...

        async def read(self, n: int = -1, cancel: Optional[CancelToken] = None) -> bytes: ...

        async def seek(
            self,
            offset: int,
            whence: Union[SeekWhence, int] = SeekWhence.SET,
        ) -> int: ...

        async def stat(self) -> FileInfo: ...

        async def sync(self) -> None: ...

        async def tell(self) -> int: ...

        async def truncate(self, size: int) -> None: ...

        async def write(self, data: Data, cancel: Optional[CancelToken] = None) -> int: ...

        # -- end of generated declarations --


class Listener(_Async):
    """``crumblecracker.Listener`` for asyncio: ``accept`` (an
    ``aio.Conn``) and ``close`` are coroutines; ``addr`` and ``port`` are
    properties. Closing it from another task ends a pending ``accept`` with
    ``AlreadyClosedError``; cancelling the accepting task stops it."""

    _sync_type = _net.Listener

    if TYPE_CHECKING:
        # -- generated from the synchronous class by `python -m crumblecracker.aio` --
        async def accept(self, cancel: Optional[CancelToken] = None) -> Conn: ...

        @property
        def addr(self) -> str: ...

        @property
        def port(self) -> int: ...

        # -- end of generated declarations --


class ExposedPort(_Async):
    """``crumblecracker.ExposedPort`` for asyncio (``close`` is a
    coroutine; ``host_port`` and ``guest_port`` are properties)."""

    _sync_type = _net.ExposedPort

    if TYPE_CHECKING:
        # -- generated from the synchronous class by `python -m crumblecracker.aio` --
        @property
        def guest_port(self) -> int: ...

        @property
        def host_port(self) -> int: ...

        # -- end of generated declarations --


async def shutdown() -> None:
    """``crumblecracker.shutdown()`` in a worker thread (it closes every
    instance still open)."""
    await run_in_thread(_sync_shutdown)


# -- typing: declarations of the generated members -----------------------------
#
# For type checkers, each wrapper class declares the members generated for it
# (under TYPE_CHECKING, so they do not exist at run time). The declarations
# are generated too, from the synchronous classes' signatures: running
# `python -m crumblecracker.aio` rewrites them in this file, and a test checks
# they are current.

_BEGIN = "# -- generated from the synchronous class by `python -m crumblecracker.aio` --"
_END = "# -- end of generated declarations --"
_RENAMES = {"_lib.PathArg": "PathArg"}


def _annotation(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        raise TypeError("a generated member needs annotations")
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    for old, new in _RENAMES.items():
        text = text.replace(old, new)
    return text


def _default(value: object) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)


def _declaration(cls: type[_Async], name: str, member: Any) -> list[str]:
    if isinstance(member, property):
        assert member.fget is not None
        returns = _annotation(inspect.signature(member.fget).return_annotation)
        return ["@property", f"def {name}(self) -> {returns}: ..."]
    sig = inspect.signature(member)
    params: list[str] = []
    star = False
    for p in sig.parameters.values():
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text, star = f"*{text}", True
        elif p.kind is p.VAR_KEYWORD:
            text = f"**{text}"
        elif p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        if p.name != "self":
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}"
        params.append(text)
    returns = _annotation(sig.return_annotation)
    head = "def" if name in cls._inline else "async def"
    line = f"{head} {name}({', '.join(params)}) -> {returns}: ..."
    if len(line) <= 100 - 8:
        return [line]
    return [f"{head} {name}(", *(f"    {p}," for p in params), f") -> {returns}: ..."]


def _declarations(cls: type[_Async]) -> list[str]:
    """The declarations of the members generated for CLS, as lines."""
    lines: list[str] = []
    for name, member in cls._generated:
        if lines:
            lines.append("")
        lines += _declaration(cls, name, member)
    return lines


def _regenerate(source: str) -> str:
    """SOURCE (this module's text) with every wrapper's declarations
    brought up to date."""
    indent = " " * 8
    for cls in _WRAPPERS.values():
        start = source.index(f"\nclass {cls.__name__}(")
        begin = source.index(_BEGIN, start) + len(_BEGIN)
        end = source.index(_END, begin)
        body = "".join(f"{indent}{line}\n" if line else "\n" for line in _declarations(cls))
        source = source[:begin] + "\n" + body + "\n" + indent + source[end:]
    return source


if __name__ == "__main__":
    _path = Path(__file__)
    _path.write_text(_regenerate(_path.read_text()))
