"""Value types: options, results and enums."""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from . import _lib
from ._errors import InvalidArgumentError

__all__ = [
    "O_APPEND",
    "O_CREATE",
    "O_EXCL",
    "O_RDONLY",
    "O_RDWR",
    "O_TRUNC",
    "O_WRONLY",
    "Auth",
    "Capabilities",
    "DirEntry",
    "FileInfo",
    "ImageConfig",
    "InstanceOptions",
    "Mount",
    "PullOptions",
    "PullPolicy",
    "PullProgress",
    "SeekWhence",
    "StartKind",
]

# File open flags (``Instance.open_file``): one fixed numbering, the C API's.
O_RDONLY: int = _lib.CC_O_RDONLY
O_WRONLY: int = _lib.CC_O_WRONLY
O_RDWR: int = _lib.CC_O_RDWR
O_APPEND: int = _lib.CC_O_APPEND
O_CREATE: int = _lib.CC_O_CREATE
O_TRUNC: int = _lib.CC_O_TRUNC
O_EXCL: int = _lib.CC_O_EXCL


class PullPolicy(enum.IntEnum):
    """When ``OCIClient.pull`` contacts the registry."""

    IF_NOT_PRESENT = _lib.CC_PULL_IF_NOT_PRESENT
    """Use the stored image when the name is known, else pull."""
    ALWAYS = _lib.CC_PULL_ALWAYS
    """Always ask the registry (stored layers are not downloaded again)."""
    NEVER = _lib.CC_PULL_NEVER
    """Never contact the registry; a missing image is an error."""


class SeekWhence(enum.IntEnum):
    """Where ``File.seek`` counts from."""

    SET = _lib.CC_SEEK_SET
    CUR = _lib.CC_SEEK_CUR
    END = _lib.CC_SEEK_END


class StartKind(enum.IntEnum):
    """How an instance's guest came to run (``Instance.start_kind``)."""

    COLD = _lib.CC_START_COLD
    """Booted from scratch (warm start off, or no template usable)."""
    BUILT = _lib.CC_START_BUILT
    """Booted from scratch to build this configuration's template, then
    restored from it: the first start of a configuration."""
    WARM = _lib.CC_START_WARM
    """Restored from an existing template."""


def _check_int(name: str, value: object, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidArgumentError(f"{name} must be between {minimum} and {maximum}, not {value}")
    return value


def _check_opt_str(name: str, value: object) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Mount:
    """A host directory shared into the guest (read-only unless ``writable``)."""

    host_path: str
    guest_path: str
    writable: bool = False

    def __post_init__(self) -> None:
        host = self.host_path
        if isinstance(host, os.PathLike):
            object.__setattr__(self, "host_path", os.fspath(host))
        if not isinstance(self.host_path, str):
            raise TypeError(f"Mount.host_path must be a str, not {type(self.host_path).__name__}")
        if not isinstance(self.guest_path, str):
            raise TypeError(f"Mount.guest_path must be a str, not {type(self.guest_path).__name__}")
        if not self.host_path:
            raise InvalidArgumentError("Mount.host_path is empty")
        if not self.guest_path.startswith("/") or self.guest_path.rstrip("/") == "":
            raise InvalidArgumentError(
                f"Mount.guest_path must be an absolute path other than /, not {self.guest_path!r}"
            )
        object.__setattr__(self, "writable", bool(self.writable))


MountLike = Union[Mount, tuple[str, str], tuple[str, str, bool]]


def _mount(value: Any) -> Mount:
    if isinstance(value, Mount):
        return value
    if isinstance(value, tuple) and len(value) in (2, 3):
        return Mount(*value)
    raise TypeError(
        "each mount must be a crumblecracker.Mount or a (host_path, guest_path[, writable]) "
        f"tuple, not {value!r}"
    )


@dataclass
class InstanceOptions:
    """How to run an instance.

    Args:
        memory_mb: guest memory in MiB.
        cpus: virtual CPUs.
        timeout_seconds: end the instance this long after it was created
            (later calls raise ``NotRunningError``); None for never.
        user: default user of commands (``name``, ``uid``, ``uid:gid``,
            ``name:group``); None for the image's.
        mounts: host directories to share: ``Mount`` objects or
            ``(host_path, guest_path)`` / ``(host_path, guest_path, writable)``
            tuples.
        network: give the guest a network interface (egress through the
            host; switch it with ``Instance.set_network_enabled``).
        warm_start: start from a template of an already booted guest with
            the same configuration when there is one (built on the first
            start); False always boots cold. Warm instances get their own
            identity, clock, entropy and writable layer like cold ones.
        max_result_bytes: the largest result one call builds in memory:
            ``read_file``, ``File.read()`` of the rest of a file, and the
            captured output of ``Cmd.output``/``combined_output``. A bigger
            result raises ``TooLargeError`` (naming the size and this cap)
            instead of growing this process as far as the guest likes;
            stream big data with ``Instance.copy_out``,
            ``Instance.read_file_stream`` or ``Cmd.output_to``. Default 1 GiB.
    """

    memory_mb: int = 512
    cpus: int = 1
    timeout_seconds: Optional[float] = None
    user: Optional[str] = None
    mounts: Optional[Sequence[MountLike]] = None
    network: bool = True
    warm_start: bool = True
    max_result_bytes: int = _lib.CC_DEFAULT_MAX_RESULT_BYTES

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        _check_int("memory_mb", self.memory_mb, 1, 2**32 - 1)
        _check_int("cpus", self.cpus, 1, 2**32 - 1)
        _check_int("max_result_bytes", self.max_result_bytes, 1, 2**64 - 1)
        t = self.timeout_seconds
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"timeout_seconds must be a number or None, not {type(t).__name__}")
            if not t > 0 or t != t or t == float("inf"):
                raise InvalidArgumentError(
                    f"timeout_seconds must be a positive number of seconds, not {t}"
                )
        _check_opt_str("user", self.user)
        if self.mounts is not None:
            if isinstance(self.mounts, (str, bytes, Mount, tuple)) or not isinstance(
                self.mounts, Iterable
            ):
                raise TypeError("mounts must be a list of Mount objects or tuples")
            self.mounts = [_mount(m) for m in self.mounts]

    def _to_c(self) -> tuple[_lib.CInstanceOptions, list[Any]]:
        """The C struct and the objects it points into (keep them alive)."""
        self._validate()
        keep: list[Any] = []
        opts = _lib.CInstanceOptions()
        opts.memory_mb = self.memory_mb
        opts.cpus = self.cpus
        opts.timeout_seconds = float(self.timeout_seconds or 0.0)
        opts.no_network = not self.network
        opts.no_warm_start = not self.warm_start
        opts.max_result_bytes = self.max_result_bytes
        if self.user is not None:
            user = _lib.encode_str(self.user, "user")
            keep.append(user)
            opts.user = user
        mounts = [_mount(m) for m in self.mounts or []]
        if mounts:
            arr = (_lib.CMount * len(mounts))()
            for i, m in enumerate(mounts):
                host = _lib.encode_path(m.host_path, "Mount.host_path")
                guest = _lib.encode_str(m.guest_path, "Mount.guest_path")
                keep += [host, guest]
                arr[i].host_path = host
                arr[i].guest_path = guest
                arr[i].writable = m.writable
            keep.append(arr)
            opts.mounts = arr
            opts.mount_count = len(mounts)
        return opts, keep


@dataclass(frozen=True)
class Auth:
    """Registry credentials (the password is left out of ``repr``)."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.username, str) or not isinstance(self.password, str):
            raise TypeError("Auth.username and Auth.password must be str")


@dataclass
class PullOptions:
    """How to pull.

    Args:
        platform: ``"os/arch[/variant]"`` to pick from a multi-platform image;
            None for the host's.
        auth: ``(username, password)`` or an ``Auth``; None to use
            ``~/.docker/config.json`` (``DOCKER_CONFIG``) or no credentials.
        policy: a ``PullPolicy``.
    """

    platform: Optional[str] = None
    auth: Optional[Auth] = None
    policy: PullPolicy = PullPolicy.IF_NOT_PRESENT

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        _check_opt_str("platform", self.platform)
        auth: Any = self.auth
        if isinstance(auth, tuple):
            if len(auth) != 2:
                raise TypeError("auth must be a (username, password) tuple or an Auth")
            self.auth = Auth(*auth)
        elif auth is not None and not isinstance(auth, Auth):
            raise TypeError(f"auth must be a (username, password) tuple or an Auth, not {auth!r}")
        try:
            self.policy = PullPolicy(self.policy)
        except ValueError:
            raise InvalidArgumentError(f"unknown pull policy {self.policy!r}") from None

    def _to_c(self) -> tuple[_lib.CPullOptions, list[Any]]:
        self._validate()
        keep: list[Any] = []
        opts = _lib.CPullOptions()
        if self.platform is not None:
            platform = _lib.encode_str(self.platform, "platform")
            keep.append(platform)
            opts.platform = platform
        if self.auth is not None:
            user = _lib.encode_str(self.auth.username, "auth username")
            password = _lib.encode_str(self.auth.password, "auth password")
            keep += [user, password]
            opts.username = user
            opts.password = password
        opts.policy = int(self.policy)
        return opts, keep


@dataclass(frozen=True)
class PullProgress:
    """Where a pull is, passed to the progress callback.

    ``current``/``total`` count bytes of all blobs (``total`` is 0 until
    known); ``blob`` is the digest being downloaded, ``blob_index`` its index
    among ``blob_count``; ``eta_seconds`` is None when unknown.
    """

    current: int
    total: int
    blob: str
    blob_index: int
    blob_count: int
    bytes_per_second: float
    eta_seconds: Optional[float]


@dataclass(frozen=True)
class FileInfo:
    """Metadata of a guest file. ``mode`` holds type and permission bits
    (as ``st_mode``); ``mtime`` is seconds since the Unix epoch."""

    name: str
    size: int
    mode: int
    mtime: float
    is_dir: bool
    is_symlink: bool
    uid: int = 0
    gid: int = 0

    @property
    def permissions(self) -> int:
        """The permission bits (``mode & 0o7777``)."""
        return self.mode & 0o7777


@dataclass(frozen=True)
class DirEntry:
    """One directory entry (symlinks not followed)."""

    name: str
    is_dir: bool
    mode: int


@dataclass(frozen=True)
class ImageConfig:
    """An image's configuration (OCI ``config``)."""

    architecture: str
    os: str
    env: list[str]
    working_dir: Optional[str]
    entrypoint: list[str]
    cmd: list[str]
    user: Optional[str]
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Capabilities:
    """What this host offers: the architecture guests run as, whether
    hardware virtualization is usable, and the accelerator instances use
    (``"kvm"`` or ``"tcg"``)."""

    architecture: str
    hypervisor_available: bool
    accelerator: str
