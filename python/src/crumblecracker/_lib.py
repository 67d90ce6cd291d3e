"""Loading ``libcc.so`` with ctypes, and the C API's structures and prototypes.

Where the library is found, first match wins:

1. ``LIBCC_PATH``: the library file (or a directory holding ``libcc.so``).
   When it is set, nothing else is tried.
2. The copy bundled in this package (``crumblecracker/_native/lib/libcc.so``),
   which ``pip install ./python`` builds and puts in the wheel.
3. Development fallback for editable installs: ``$CARGO_TARGET_DIR/release``
   and the workspace's ``target/release`` (the workspace being the parent
   of the ``python/`` directory this package is imported from).
4. The system's library search path (``libcc.so`` through ``dlopen``, then
   ``ctypes.util.find_library("cc")``).

The library is loaded on first use, not at ``import crumblecracker``; when it
cannot be found or is incompatible, that first use raises one
``LibraryLoadError`` saying what was tried and how to fix it.

The library finds the guest kernel and agent in its data dir,
``<library dir>/../share/crumblecracker``: for the bundled copy, the
wheel's ``_native/share/crumblecracker/`` (``CC_DATA_DIR``, ``CC_KERNEL``
and ``CC_AGENT`` override it; see ``cc_engine::paths::data_dir``).

Every function is called through ``ctypes.CDLL``, which releases the GIL for
the duration of each foreign call: other Python threads run while a call
blocks.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_double,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path
from typing import Any, Optional, Union

from ._errors import CCError, InvalidArgumentError, IOError, error_for_code, io_error

# The C API version this package is written against (cc.h).
API_MAJOR = 0
API_MINOR = 1

# Constants of cc.h (a test checks them against the header).
CC_PULL_IF_NOT_PRESENT = 0
CC_PULL_ALWAYS = 1
CC_PULL_NEVER = 2
CC_O_RDONLY = 0
CC_O_WRONLY = 1
CC_O_RDWR = 2
CC_O_APPEND = 8
CC_O_CREATE = 512
CC_O_TRUNC = 1024
CC_O_EXCL = 2048
CC_SEEK_SET = 0
CC_SEEK_CUR = 1
CC_SEEK_END = 2
CC_START_COLD = 0
CC_START_BUILT = 1
CC_START_WARM = 2
CC_START_RESTORED = 3
CC_DEFAULT_MAX_RESULT_BYTES = 1 << 30

# A path argument: str, bytes or os.PathLike.
PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

_NATIVE_DIR = Path(__file__).resolve().parent / "_native"
_LIB_NAME = "libcc.so"


class LibraryLoadError(RuntimeError):
    """``libcc.so`` could not be found or loaded, or is incompatible."""


# -- structures (cc.h) ---------------------------------------------------------


class _Sized(Structure):
    """A struct that grows (cc.h, "Structs that grow"): created with its
    leading ``size`` set to this layout's size, as ``CC_..._INIT`` does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.size = ctypes.sizeof(self)


class CError(_Sized):
    """``cc_error``: strings kept as raw pointers, freed by ``cc_error_free``."""

    _fields_ = [
        ("size", c_size_t),
        ("code", c_int32),
        ("message", c_void_p),
        ("op", c_void_p),
        ("path", c_void_p),
        ("os_errno", c_int32),
    ]


class CCapabilities(_Sized):
    """``cc_capabilities`` (static strings)."""

    _fields_ = [
        ("size", c_size_t),
        ("architecture", c_char_p),
        ("hypervisor_available", c_bool),
        ("accelerator", c_char_p),
        ("confined_seccomp", c_bool),
        ("confined_namespaces", c_bool),
        ("sandbox_uid", c_uint32),
        ("confinement_gaps", c_char_p),
        ("hardware_accelerated", c_bool),
        ("kernel_hash", c_char_p),
    ]


class CPullOptions(Structure):
    """``cc_pull_options``."""

    _fields_ = [
        ("platform", c_char_p),
        ("username", c_char_p),
        ("password", c_char_p),
        ("policy", c_int32),
        ("max_layer_ratio", c_uint64),
        ("max_layer_bytes", c_uint64),
        ("max_image_bytes", c_uint64),
    ]


class CPullProgress(Structure):
    """``cc_pull_progress``."""

    _fields_ = [
        ("current", c_uint64),
        ("total", c_uint64),
        ("blob", c_char_p),
        ("blob_index", c_size_t),
        ("blob_count", c_size_t),
        ("bytes_per_second", c_double),
        ("eta_seconds", c_double),
    ]


PROGRESS_FN = CFUNCTYPE(c_int, POINTER(CPullProgress), c_void_p)


class CImageConfig(Structure):
    """``cc_image_config`` (freed as a whole by ``cc_image_config_free``)."""

    _fields_ = [
        ("architecture", c_char_p),
        ("os", c_char_p),
        ("env", POINTER(c_char_p)),
        ("env_count", c_size_t),
        ("working_dir", c_char_p),
        ("entrypoint", POINTER(c_char_p)),
        ("entrypoint_count", c_size_t),
        ("cmd", POINTER(c_char_p)),
        ("cmd_count", c_size_t),
        ("user", c_char_p),
        ("label_keys", POINTER(c_char_p)),
        ("label_values", POINTER(c_char_p)),
        ("label_count", c_size_t),
    ]


class CMount(Structure):
    """``cc_mount``."""

    _fields_ = [
        ("host_path", c_char_p),
        ("guest_path", c_char_p),
        ("writable", c_bool),
    ]


class CInstanceOptions(_Sized):
    """``cc_instance_options``."""

    _fields_ = [
        ("size", c_size_t),
        ("memory_mb", c_uint32),
        ("cpus", c_uint32),
        ("timeout_seconds", c_double),
        ("user", c_char_p),
        ("mounts", POINTER(CMount)),
        ("mount_count", c_size_t),
        ("no_network", c_bool),
        ("no_warm_start", c_bool),
        ("allow_host", c_bool),
        ("net_allow", POINTER(c_char_p)),
        ("net_allow_count", c_size_t),
        ("net_deny", POINTER(c_char_p)),
        ("net_deny_count", c_size_t),
        ("disk_mb", c_uint32),
        ("confinement", c_uint32),
        ("max_result_bytes", c_uint64),
    ]


class CFileInfo(Structure):
    """``cc_file_info`` (``name`` freed by ``cc_file_info_free``)."""

    _fields_ = [
        ("name", c_void_p),
        ("size", c_uint64),
        ("mode", c_uint32),
        ("uid", c_uint32),
        ("gid", c_uint32),
        ("mtime_unix", c_int64),
        ("mtime_nsec", c_uint32),
        ("is_dir", c_bool),
        ("is_symlink", c_bool),
    ]


class CDirEntry(Structure):
    """``cc_dir_entry`` (the array freed by ``cc_dir_entries_free``)."""

    _fields_ = [
        ("name", c_char_p),
        ("is_dir", c_bool),
        ("mode", c_uint32),
    ]


# -- prototypes ----------------------------------------------------------------

_H = c_uint64  # every handle kind
_HP = POINTER(c_uint64)
_ERR = POINTER(CError)
_CODE = c_int32
_STRS = POINTER(c_char_p)  # const char *const *

# name -> (restype, argtypes): every function of cc.h (a test checks the
# list against the header).
PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    # library
    "cc_init": (_CODE, [_ERR]),
    "cc_shutdown": (_CODE, [_ERR]),
    "cc_api_version": (c_char_p, []),
    "cc_api_version_compatible": (c_bool, [c_uint32, c_uint32]),
    "cc_guest_protocol_version": (c_uint32, []),
    "cc_supports_hypervisor": (c_bool, []),
    "cc_query_capabilities": (_CODE, [POINTER(CCapabilities), _ERR]),
    # memory
    "cc_error_free": (None, [_ERR]),
    "cc_string_free": (None, [c_void_p]),
    "cc_bytes_free": (None, [c_void_p]),
    "cc_bytes_move": (_CODE, [c_void_p, c_size_t, c_void_p, _ERR]),
    "cc_strings_free": (None, [_STRS, c_size_t]),
    # cancel tokens
    "cc_cancel_token_new": (_CODE, [_HP, _ERR]),
    "cc_cancel_token_cancel": (_CODE, [_H, _ERR]),
    "cc_cancel_token_is_cancelled": (_CODE, [_H, POINTER(c_bool), _ERR]),
    "cc_cancel_token_free": (_CODE, [_H]),
    "cc_cancel_token_child": (_CODE, [_H, _HP, _ERR]),
    # OCI clients and sources
    "cc_oci_client_new": (_CODE, [c_char_p, _HP, _ERR]),
    "cc_oci_client_cache_dir": (_CODE, [_H, POINTER(c_void_p), _ERR]),
    "cc_oci_pull": (
        _CODE,
        [_H, c_char_p, POINTER(CPullOptions), PROGRESS_FN, c_void_p, _H, _HP, _ERR],
    ),
    "cc_oci_load_tar": (_CODE, [_H, c_char_p, _HP, _ERR]),
    "cc_oci_load_dir": (_CODE, [_H, c_char_p, _HP, _ERR]),
    "cc_oci_load_tar_cancellable": (_CODE, [_H, c_char_p, _H, _HP, _ERR]),
    "cc_oci_load_dir_cancellable": (_CODE, [_H, c_char_p, _H, _HP, _ERR]),
    "cc_oci_export_dir": (_CODE, [_H, _H, c_char_p, _ERR]),
    "cc_oci_client_close": (_CODE, [_H, _ERR]),
    "cc_oci_client_free": (_CODE, [_H]),
    "cc_source_from_dir": (_CODE, [c_char_p, _HP, _ERR]),
    "cc_source_free": (_CODE, [_H]),
    "cc_source_image_config": (_CODE, [_H, POINTER(POINTER(CImageConfig)), _ERR]),
    "cc_image_config_free": (None, [POINTER(CImageConfig)]),
    # instances
    "cc_instance_new": (_CODE, [_H, POINTER(CInstanceOptions), _HP, _ERR]),
    "cc_instance_new_cancellable": (_CODE, [_H, POINTER(CInstanceOptions), _H, _HP, _ERR]),
    "cc_instance_id": (_CODE, [_H, POINTER(c_void_p), _ERR]),
    "cc_instance_start_kind": (_CODE, [_H, POINTER(c_int32), _ERR]),  # enum cc_start_kind
    "cc_instance_is_running": (_CODE, [_H, POINTER(c_bool), _ERR]),
    "cc_instance_wait": (_CODE, [_H, _H, _ERR]),
    "cc_instance_close": (_CODE, [_H, _ERR]),
    "cc_instance_park": (_CODE, [_H, c_char_p, POINTER(c_uint64), _ERR]),
    "cc_instance_restore": (_CODE, [c_char_p, c_double, _HP, _ERR]),
    "cc_instance_branch": (_CODE, [_H, c_size_t, POINTER(c_uint64), _ERR]),
    "cc_instance_set_network_enabled": (_CODE, [_H, c_bool, _ERR]),
    "cc_instance_pause": (_CODE, [_H, _ERR]),
    "cc_instance_resume": (_CODE, [_H, _ERR]),
    "cc_instance_is_paused": (_CODE, [_H, POINTER(c_bool), _ERR]),
    "cc_instance_free": (_CODE, [_H]),
    # filesystem
    "cc_file_info_free": (None, [POINTER(CFileInfo)]),
    "cc_dir_entries_free": (None, [POINTER(CDirEntry), c_size_t]),
    "cc_instance_read_file": (
        _CODE,
        [_H, c_char_p, POINTER(c_void_p), POINTER(c_size_t), _ERR],
    ),
    "cc_instance_read_file_cancellable": (
        _CODE,
        [_H, c_char_p, _H, POINTER(c_void_p), POINTER(c_size_t), _ERR],
    ),
    "cc_instance_read_file_stream": (_CODE, [_H, c_char_p, _HP, POINTER(c_uint64), _ERR]),
    "cc_instance_copy_out": (_CODE, [_H, c_char_p, c_char_p, POINTER(c_uint64), _ERR]),
    "cc_instance_copy_in": (_CODE, [_H, c_char_p, c_char_p, c_uint32, POINTER(c_uint64), _ERR]),
    "cc_instance_write_file": (_CODE, [_H, c_char_p, c_char_p, c_size_t, c_uint32, _ERR]),
    "cc_instance_write_file_cancellable": (
        _CODE,
        [_H, c_char_p, c_char_p, c_size_t, c_uint32, _H, _ERR],
    ),
    "cc_instance_stat": (_CODE, [_H, c_char_p, POINTER(CFileInfo), _ERR]),
    "cc_instance_lstat": (_CODE, [_H, c_char_p, POINTER(CFileInfo), _ERR]),
    "cc_instance_mkdir": (_CODE, [_H, c_char_p, c_uint32, _ERR]),
    "cc_instance_mkdir_all": (_CODE, [_H, c_char_p, c_uint32, _ERR]),
    "cc_instance_remove": (_CODE, [_H, c_char_p, _ERR]),
    "cc_instance_remove_all": (_CODE, [_H, c_char_p, _ERR]),
    "cc_instance_chmod": (_CODE, [_H, c_char_p, c_uint32, _ERR]),
    "cc_instance_chown": (_CODE, [_H, c_char_p, c_int64, c_int64, _ERR]),
    "cc_instance_chtimes": (
        _CODE,
        [_H, c_char_p, c_int64, c_uint32, c_int64, c_uint32, _ERR],
    ),
    "cc_instance_read_dir": (
        _CODE,
        [_H, c_char_p, POINTER(POINTER(CDirEntry)), POINTER(c_size_t), _ERR],
    ),
    "cc_instance_rename": (_CODE, [_H, c_char_p, c_char_p, _ERR]),
    "cc_instance_symlink": (_CODE, [_H, c_char_p, c_char_p, _ERR]),
    "cc_instance_readlink": (_CODE, [_H, c_char_p, POINTER(c_void_p), _ERR]),
    # files
    "cc_instance_open": (_CODE, [_H, c_char_p, _HP, _ERR]),
    "cc_instance_create": (_CODE, [_H, c_char_p, _HP, _ERR]),
    "cc_instance_open_file": (_CODE, [_H, c_char_p, c_uint32, c_uint32, _HP, _ERR]),
    "cc_file_read": (_CODE, [_H, POINTER(c_char), c_size_t, POINTER(c_size_t), _ERR]),
    "cc_file_read_cancellable": (
        _CODE,
        [_H, _H, POINTER(c_char), c_size_t, POINTER(c_size_t), _ERR],
    ),
    "cc_file_read_all": (_CODE, [_H, POINTER(c_void_p), POINTER(c_size_t), _ERR]),
    "cc_file_write": (_CODE, [_H, c_char_p, c_size_t, POINTER(c_size_t), _ERR]),
    "cc_file_write_cancellable": (_CODE, [_H, _H, c_char_p, c_size_t, POINTER(c_size_t), _ERR]),
    "cc_file_seek": (_CODE, [_H, c_int64, c_int, POINTER(c_uint64), _ERR]),
    "cc_file_stat": (_CODE, [_H, POINTER(CFileInfo), _ERR]),
    "cc_file_truncate": (_CODE, [_H, c_uint64, _ERR]),
    "cc_file_sync": (_CODE, [_H, _ERR]),
    "cc_file_close": (_CODE, [_H, _ERR]),
    "cc_file_free": (_CODE, [_H]),
    # commands
    "cc_instance_command": (_CODE, [_H, c_char_p, _STRS, c_size_t, _HP, _ERR]),
    "cc_instance_entrypoint_command": (_CODE, [_H, _STRS, c_size_t, _HP, _ERR]),
    "cc_cmd_set_dir": (_CODE, [_H, c_char_p, _ERR]),
    "cc_cmd_set_env": (_CODE, [_H, c_char_p, c_char_p, _ERR]),
    "cc_cmd_get_env": (_CODE, [_H, c_char_p, POINTER(c_void_p), _ERR]),
    "cc_cmd_environ": (_CODE, [_H, POINTER(_STRS), POINTER(c_size_t), _ERR]),
    "cc_cmd_set_user": (_CODE, [_H, c_char_p, _ERR]),
    "cc_cmd_set_timeout": (_CODE, [_H, c_double, _ERR]),
    "cc_cmd_stdin_pipe": (_CODE, [_H, _HP, _ERR]),
    "cc_cmd_stdout_pipe": (_CODE, [_H, _HP, _ERR]),
    "cc_cmd_stderr_pipe": (_CODE, [_H, _HP, _ERR]),
    "cc_cmd_start": (_CODE, [_H, _ERR]),
    "cc_cmd_wait": (_CODE, [_H, POINTER(c_int32), _ERR]),
    "cc_cmd_wait_cancellable": (_CODE, [_H, _H, POINTER(c_int32), _ERR]),
    "cc_cmd_run": (_CODE, [_H, POINTER(c_int32), _ERR]),
    "cc_cmd_output": (
        _CODE,
        [_H, POINTER(c_void_p), POINTER(c_size_t), POINTER(c_int32), _ERR],
    ),
    "cc_cmd_combined_output": (
        _CODE,
        [_H, POINTER(c_void_p), POINTER(c_size_t), POINTER(c_int32), _ERR],
    ),
    "cc_cmd_output_to_file": (
        _CODE,
        [_H, c_char_p, c_bool, POINTER(c_uint64), POINTER(c_int32), _ERR],
    ),
    "cc_cmd_kill": (_CODE, [_H, _ERR]),
    "cc_cmd_set_pty": (_CODE, [_H, c_uint16, c_uint16, c_char_p, _ERR]),
    "cc_cmd_resize": (_CODE, [_H, c_uint16, c_uint16, _ERR]),
    "cc_cmd_exit_code": (_CODE, [_H, POINTER(c_int32), POINTER(c_bool), _ERR]),
    "cc_cmd_free": (_CODE, [_H]),
    # connections
    "cc_conn_read": (_CODE, [_H, POINTER(c_char), c_size_t, POINTER(c_size_t), _ERR]),
    "cc_conn_read_cancellable": (
        _CODE,
        [_H, _H, POINTER(c_char), c_size_t, POINTER(c_size_t), _ERR],
    ),
    "cc_conn_read_all": (_CODE, [_H, POINTER(c_void_p), POINTER(c_size_t), _ERR]),
    "cc_conn_write": (_CODE, [_H, c_char_p, c_size_t, _ERR]),
    "cc_conn_write_cancellable": (_CODE, [_H, _H, c_char_p, c_size_t, _ERR]),
    "cc_conn_close": (_CODE, [_H, _ERR]),
    "cc_conn_close_write": (_CODE, [_H, _ERR]),
    "cc_conn_addrs": (_CODE, [_H, POINTER(c_void_p), POINTER(c_void_p), _ERR]),
    "cc_conn_free": (_CODE, [_H]),
    # networking
    "cc_instance_listen": (_CODE, [_H, c_char_p, c_char_p, _HP, _ERR]),
    "cc_listener_accept": (_CODE, [_H, _H, _HP, _ERR]),
    "cc_listener_addr": (_CODE, [_H, POINTER(c_void_p), POINTER(c_uint16), _ERR]),
    "cc_listener_close": (_CODE, [_H, _ERR]),
    "cc_listener_free": (_CODE, [_H]),
    "cc_instance_dial": (_CODE, [_H, c_char_p, c_char_p, _HP, _ERR]),
    "cc_instance_expose": (_CODE, [_H, c_uint16, c_uint16, _HP, POINTER(c_uint16), _ERR]),
    "cc_exposed_port": (_CODE, [_H, POINTER(c_uint16), _ERR]),
    "cc_exposed_close": (_CODE, [_H, _ERR]),
    "cc_exposed_free": (_CODE, [_H]),
    # snapshots
    "cc_instance_snapshot": (_CODE, [_H, _STRS, c_size_t, _HP, _ERR]),
    "cc_snapshot_as_source": (_CODE, [_H, _HP, _ERR]),
    "cc_snapshot_name": (_CODE, [_H, POINTER(c_void_p), _ERR]),
    "cc_snapshot_export_dir": (_CODE, [_H, c_char_p, _ERR]),
    "cc_snapshot_close": (_CODE, [_H, _ERR]),
    "cc_snapshot_free": (_CODE, [_H]),
}


# -- finding and loading -------------------------------------------------------

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[str] = None


def _workspace_dir() -> Optional[Path]:
    """The Cargo workspace this package's source lives in, if it does."""
    # <workspace>/python/src/crumblecracker/_lib.py
    parents = Path(__file__).resolve().parents
    if len(parents) < 4:
        return None
    root = parents[3]
    if (root / "Cargo.toml").is_file() and (root / "crates" / "capi").is_dir():
        return root
    return None


def _candidates() -> list[tuple[str, str]]:
    """(how, path-or-name) in lookup order, LIBCC_PATH excluded."""
    found: list[tuple[str, str]] = [("bundled copy", str(_NATIVE_DIR / "lib" / _LIB_NAME))]
    dev_dirs: list[Path] = []
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        dev_dirs.append(Path(target))
    workspace = _workspace_dir()
    if workspace is not None:
        dev_dirs.append(workspace / "target")
    for d in dev_dirs:
        found.append(("development build", str(d / "release" / _LIB_NAME)))
    return found


_FIX = (
    "Set LIBCC_PATH=/path/to/libcc.so, or build it with "
    "`cargo build --release -p cc-capi` in the crumblecracker workspace "
    "(it writes target/release/libcc.so), or install the package with "
    "`pip install ./python`, which builds and bundles it."
)


def _open(path: str) -> ctypes.CDLL:
    return ctypes.CDLL(path, mode=getattr(os, "RTLD_NOW", 2) | ctypes.RTLD_LOCAL)


def _locate_and_open() -> tuple[ctypes.CDLL, str]:
    explicit = os.environ.get("LIBCC_PATH")
    if explicit:
        path = Path(explicit)
        if path.is_dir():
            path = path / _LIB_NAME
        if not path.exists():
            raise LibraryLoadError(f"LIBCC_PATH={explicit}: {path} does not exist. {_FIX}")
        try:
            return _open(str(path)), str(path)
        except OSError as e:
            raise LibraryLoadError(f"LIBCC_PATH={explicit}: cannot load {path}: {e}. {_FIX}") from e

    tried: list[str] = ["LIBCC_PATH (not set)"]
    for how, candidate in _candidates():
        if not os.path.exists(candidate):
            tried.append(f"{how} {candidate} (missing)")
            continue
        try:
            return _open(candidate), candidate
        except OSError as e:
            tried.append(f"{how} {candidate} ({e})")
    try:
        return _open(_LIB_NAME), _LIB_NAME
    except OSError as e:
        tried.append(f"system library path ({e})")
    name = ctypes.util.find_library("cc")
    if name:
        try:
            return _open(name), name
        except OSError as e:
            tried.append(f"find_library('cc') -> {name} ({e})")
    raise LibraryLoadError(f"libcc.so not found. Tried: {'; '.join(tried)}. {_FIX}")


def _declare(lib: ctypes.CDLL, path: str) -> None:
    missing = []
    for name, (restype, argtypes) in PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            missing.append(name)
            continue
        fn.restype = restype
        fn.argtypes = argtypes
    if missing:
        raise LibraryLoadError(
            f"{path} is not a compatible libcc.so: it lacks {', '.join(missing)}. "
            f"Rebuild it from the same checkout as this package. {_FIX}"
        )
    if not lib.cc_api_version_compatible(API_MAJOR, API_MINOR):
        version = lib.cc_api_version().decode()
        raise LibraryLoadError(
            f"{path} implements C API {version}; this package needs "
            f"{API_MAJOR}.{API_MINOR}.x. Rebuild it from the same checkout. {_FIX}"
        )


def native() -> ctypes.CDLL:
    """The loaded library (loading it on first use)."""
    global _lib, _lib_path
    lib = _lib
    if lib is not None:
        return lib
    with _lock:
        if _lib is None:
            lib, path = _locate_and_open()
            _declare(lib, path)
            _lib, _lib_path = lib, path
            atexit.register(_shutdown_at_exit)
        return _lib


def library_path() -> str:
    """Where the loaded library came from (loading it if needed)."""
    native()
    assert _lib_path is not None
    return _lib_path


def _shutdown_at_exit() -> None:
    # Close whatever instances the program left open, so no QEMU outlives it.
    lib = _lib
    if lib is not None:
        try:
            lib.cc_shutdown(None)
        except Exception:
            pass


# -- calling -------------------------------------------------------------------


def _take_string(ptr: Optional[int]) -> Optional[str]:
    if not ptr:
        return None
    return ctypes.string_at(ptr).decode("utf-8", "replace")


def error_from(code: int, err: CError) -> CCError:
    """The exception for a failed call; frees the strings in ``err``."""
    message = _take_string(err.message) or f"libcc error {code}"
    op = _take_string(err.op)
    path = _take_string(err.path)
    os_errno = int(err.os_errno)
    native().cc_error_free(ctypes.byref(err))
    if "call cc_init" in message:
        message = message.replace("call cc_init", "call crumblecracker.init() first")
    cls = error_for_code(code)
    if issubclass(cls, IOError):
        return io_error(message, code=code, op=op, path=path, errno=os_errno or None)
    return cls(message, code=code, op=op, path=path)


def call(fn: Any, *args: Any) -> None:
    """Calls FN(*ARGS, &err) and raises the matching ``CCError`` on failure."""
    err = CError()
    code = fn(*args, ctypes.byref(err))
    if code != 0:
        raise error_from(code, err)


def free(name: str, handle: int) -> None:
    """Calls the free function NAME on HANDLE, ignoring every failure.

    Used by finalizers and idempotent closes: never raises.
    """
    lib = _lib
    if lib is None or not handle:
        return
    try:
        getattr(lib, name)(handle)
    except Exception:
        pass


def take_string(ptr: c_void_p) -> str:
    """Copies and frees a string the library returned."""
    value = ptr.value
    if not value:
        return ""
    try:
        return ctypes.string_at(value).decode("utf-8", "surrogateescape")
    finally:
        native().cc_string_free(value)


# Up to this size a result is simply copied; above it, moved (see take_bytes).
_COPY_MAX = 1 << 20

# A bytes object of a given size, its contents not yet set (the C API's
# documented way to build one to fill): size_t lengths, unlike
# ctypes.string_at, whose C int length fails from 2 GiB on.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [c_void_p, ctypes.c_ssize_t]


def take_bytes(ptr: c_void_p, length: int) -> bytes:
    """The byte buffer the library returned, as bytes; the buffer is freed.

    Large results are moved into a new bytes object by ``cc_bytes_move``,
    which gives back the buffer's pages as it copies: the peak is about the
    result's size once, not twice, whatever the size.
    """
    value = ptr.value
    if not value:
        return b""
    lib = native()
    if length <= _COPY_MAX:
        try:
            return ctypes.string_at(value, length)
        finally:
            lib.cc_bytes_free(value)
    try:
        out: bytes = _new_bytes(None, length)
    except BaseException:
        lib.cc_bytes_free(value)
        raise
    # Written in place before anyone else sees it; the buffer is freed
    # whatever happens.
    call(lib.cc_bytes_move, value, length, out)
    return out


def decode(raw: Optional[bytes]) -> str:
    return "" if raw is None else raw.decode("utf-8", "surrogateescape")


def encode_str(value: Union[str, bytes], what: str) -> bytes:
    """A C string for VALUE: UTF-8, refusing embedded NULs."""
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
    elif isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    else:
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if b"\0" in raw:
        raise InvalidArgumentError(f"{what} contains a NUL byte: {value!r}")
    return raw


def encode_path(value: PathArg, what: str) -> bytes:
    """A C string for a path: str, bytes or os.PathLike."""
    if isinstance(value, bytearray):
        value = bytes(value)
    try:
        raw = os.fsencode(value)
    except TypeError:
        raise TypeError(
            f"{what} must be a str or os.PathLike, not {type(value).__name__}"
        ) from None
    return encode_str(raw, what)


def string_array(values: list[bytes]) -> Any:
    """A ``const char *const *`` array (NULL-terminated) for VALUES."""
    arr = (c_char_p * (len(values) + 1))()
    for i, v in enumerate(values):
        arr[i] = v
    arr[len(values)] = None
    return arr
