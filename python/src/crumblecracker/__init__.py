"""crumblecracker: run OCI container images inside lightweight virtual machines.

    import crumblecracker as cc

    cc.init()
    with cc.OCIClient() as client:
        source = client.pull("alpine:latest")
        with cc.Instance(source, cc.InstanceOptions(memory_mb=512)) as inst:
            print(inst.command("echo", "hello").output().decode())
    cc.shutdown()

A pure-Python package over ``libcc.so`` (the C library of the Rust core)
through ctypes. ``import crumblecracker`` always works; the library is
found and loaded on first use (``LIBCC_PATH``, then the copy bundled in the
package, then a development build, then the system's library path), and a
missing or incompatible library raises one ``LibraryLoadError`` that says
how to fix it.

Threads and Ctrl-C: every foreign call releases the GIL, so other Python
threads run while one blocks. Calls that can block without bound (``pull``,
``Instance.wait``, ``Listener.accept``,
``Cmd.wait``/``run``/``output``/``combined_output``, ``Conn`` and ``File``
reads and writes) run, when made on the main thread, in a helper thread
while the main thread waits in short interruptible steps: Ctrl-C then
cancels the work (the pull, the wait or accept, or kills the command) and
raises ``KeyboardInterrupt`` at once. A ``Conn`` may be read in one thread
while another writes to it. Every resource (``OCIClient``, ``ImageSource``,
``Instance``, ``Cmd``, ``Conn``, ``File``, ``Listener``, ``ExposedPort``,
``Snapshot``) is a context manager whose ``close()`` is idempotent; handles
are also released when objects are garbage collected, and instances still
open when the interpreter exits are closed.

Cancel tokens: ``cc.CancelToken()`` passed as ``cancel=`` to a blocking
call (``pull``, ``load_tar``/``load_dir``, ``Instance(...)``, ``wait``,
``accept``, ``Cmd.wait``, ``Conn``/``File`` ``read``/``write``,
``read_file``/``write_file``) stops it from any thread at once:
``token.cancel()`` makes the call raise ``CancelledError`` naming the
operation ("wait cancelled"). A token is a context manager; one used after
``close()`` raises ``AlreadyClosedError``.

``crumblecracker.aio`` is the same API for asyncio: ``async def`` methods
running the blocking calls in worker threads.
"""

from __future__ import annotations

from ctypes import byref

from . import _lib
from ._cancel import CancelToken
from ._cmd import Cmd, Conn
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
from ._file import File
from ._instance import Instance, Snapshot
from ._lib import LibraryLoadError
from ._net import ExposedPort, Listener
from ._oci import ImageSource, OCIClient, ProgressCallback
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

__version__ = "0.1.0"

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
    "__version__",
    "api_version",
    "api_version_compatible",
    "guest_protocol_version",
    "init",
    "library_path",
    "query_capabilities",
    "shutdown",
    "supports_hypervisor",
]


def init() -> None:
    """Initializes the library; required before any other call. Calling it
    again does nothing; after ``shutdown()`` it initializes anew."""
    _lib.call(_lib.native().cc_init)


def shutdown() -> None:
    """Shuts the library down: closes every instance, client and other
    object still open and cancels pulls in flight. Until ``init()`` is
    called again, other calls raise ``InvalidArgumentError``."""
    _lib.call(_lib.native().cc_shutdown)


def api_version() -> str:
    """The C API version, ``"MAJOR.MINOR.PATCH"``."""
    raw: bytes = _lib.native().cc_api_version()
    return raw.decode()


def api_version_compatible(major: int, minor: int) -> bool:
    """Whether a program written against API ``major.minor`` can use this
    library (same major, minor at most this library's)."""
    for name, value in (("major", major), ("minor", minor)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if not 0 <= value < 2**32:
            return False
    return bool(_lib.native().cc_api_version_compatible(major, minor))


def guest_protocol_version() -> int:
    """The version of the host-guest agent protocol this library speaks."""
    return int(_lib.native().cc_guest_protocol_version())


def supports_hypervisor() -> bool:
    """Whether instances can run here: QEMU and an accelerator (KVM, or
    QEMU's TCG software emulation where there is none), the guest kernel
    and the agent are usable. ``query_capabilities()`` says which
    accelerator and whether it is hardware-accelerated, or raises
    ``HypervisorUnavailableError`` saying what is missing."""
    return bool(_lib.native().cc_supports_hypervisor())


def query_capabilities() -> Capabilities:
    """The host's capabilities: architecture, the accelerator instances use
    and whether it is hardware-accelerated. Raises
    ``HypervisorUnavailableError`` when no instance can start here, saying
    what is missing."""
    caps = _lib.CCapabilities()
    _lib.call(_lib.native().cc_query_capabilities, byref(caps))
    return Capabilities(
        architecture=_lib.decode(caps.architecture),
        hypervisor_available=bool(caps.hypervisor_available),
        accelerator=_lib.decode(caps.accelerator),
        confined_seccomp=bool(caps.confined_seccomp),
        confined_namespaces=bool(caps.confined_namespaces),
        sandbox_uid=int(caps.sandbox_uid),
        confinement_gaps=tuple(g for g in _lib.decode(caps.confinement_gaps).split("; ") if g),
        hardware_accelerated=bool(caps.hardware_accelerated),
        kernel_hash=_lib.decode(caps.kernel_hash) or None,
    )


def library_path() -> str:
    """Where the loaded ``libcc.so`` came from (loading it if needed)."""
    return _lib.library_path()
