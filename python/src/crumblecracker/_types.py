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
    "NetworkPolicy",
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
    RESTORED = _lib.CC_START_RESTORED
    """Restored from a parked instance (``Instance.restore``)."""


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


def _rules(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"NetworkPolicy.{name} must be a list of rule strings")
    rules = tuple(value)
    for rule in rules:
        if not isinstance(rule, str):
            raise TypeError(f"NetworkPolicy.{name} rules must be str, not {type(rule).__name__}")
    return rules


@dataclass(frozen=True)
class NetworkPolicy:
    """What the guest may reach through the network.

    By default the guest reaches outside addresses but not the host (its
    loopback, reachable as 10.0.2.2, and its interface addresses) nor
    169.254.0.0/16, 0.0.0.0/8, multicast and 240.0.0.0/4. DNS through
    10.0.2.3 always works.

    A rule is ``ADDR[/PREFIX][:PORT[-PORT]]`` with ``*`` for any address:
    ``"10.0.0.0/8"``, ``"1.2.3.4"``, ``"1.2.3.4:443"``,
    ``"10.0.0.0/8:8000-8999"``, ``"*:53"``. Rules are checked when the
    instance is created: a bad one raises ``InvalidArgumentError`` naming
    it.

    Args:
        allow_host: let the guest reach the host.
        allow: when not empty, the guest reaches only destinations matching
            one of these rules (an explicit rule may re-open 169.254.0.0/16
            and the other built-in denials, never the host).
        deny: destinations never reached; they win over ``allow`` and
            ``allow_host``.
    """

    allow_host: bool = False
    allow: Sequence[str] = ()
    deny: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.allow_host, bool):
            raise TypeError(
                f"NetworkPolicy.allow_host must be a bool, not {type(self.allow_host).__name__}"
            )
        object.__setattr__(self, "allow", _rules("allow", self.allow))
        object.__setattr__(self, "deny", _rules("deny", self.deny))

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> NetworkPolicy:
        """A policy from a dict with the keys ``allow_host``, ``allow`` and
        ``deny`` (each optional); any other key raises
        ``InvalidArgumentError`` naming it."""
        for key in value:
            if key not in ("allow_host", "allow", "deny"):
                raise InvalidArgumentError(
                    f"unknown network policy key {key!r} (known: allow_host, allow, deny)"
                )
        return cls(**value)


NetworkPolicyLike = Union[NetworkPolicy, Mapping[str, Any]]


def _network_policy(value: object) -> NetworkPolicy:
    if isinstance(value, NetworkPolicy):
        return value
    if isinstance(value, Mapping):
        return NetworkPolicy.from_dict(value)
    raise TypeError(f"network_policy must be a NetworkPolicy or a dict, not {type(value).__name__}")


# `cc_instance_options.confinement` by name.
_CONFINEMENT = {"default": 0, "strict": 1, "off": 2}


@dataclass
class InstanceOptions:
    """How to run an instance.

    Args:
        memory_mb: guest memory in MiB.
        cpus: virtual CPUs.
        timeout_seconds: end the instance this long after it was created
            (later calls raise ``NotRunningError``), time paused not
            counted; None for never.
        user: default user of commands (``name``, ``uid``, ``uid:gid``,
            ``name:group``); None for the image's.
        mounts: host directories to share: ``Mount`` objects or
            ``(host_path, guest_path)`` / ``(host_path, guest_path, writable)``
            tuples.
        network: give the guest a network interface (egress through the
            host; switch it with ``Instance.set_network_enabled``).
        network_policy: what the guest may reach: a ``NetworkPolicy`` or a
            dict of its fields; the default denies the host.
        warm_start: start from a template of an already booted guest with
            the same configuration when there is one (built on the first
            start); False always boots cold. Warm instances get their own
            identity, clock, entropy and writable layer like cold ones.
        disk_mb: size of the writable layer in MiB (64 to 1048576): what
            the guest can write on top of its image before it gets
            ``ENOSPC``. Sparse on the host: only written blocks take space.
        confinement: how QEMU is confined (SECURITY.md): ``"default"``
            (everything the host offers; ``query_capabilities()`` lists the
            gaps), ``"strict"`` (refuse to start with any gap, raising
            ``HypervisorUnavailableError``) or ``"off"`` (measurements and
            debugging only, never for untrusted guests).
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
    network_policy: NetworkPolicyLike = field(default_factory=NetworkPolicy)
    warm_start: bool = True
    disk_mb: int = 4096
    confinement: str = "default"
    max_result_bytes: int = _lib.CC_DEFAULT_MAX_RESULT_BYTES

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        _check_int("memory_mb", self.memory_mb, 1, 2**32 - 1)
        _check_int("cpus", self.cpus, 1, 2**32 - 1)
        _check_int("disk_mb", self.disk_mb, 1, 2**32 - 1)
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
        self.network_policy = _network_policy(self.network_policy)
        if self.confinement not in _CONFINEMENT:
            raise InvalidArgumentError(
                f"confinement {self.confinement!r}: expected 'default', 'strict' or 'off'"
            )

    def _to_c(self) -> tuple[_lib.CInstanceOptions, list[Any]]:
        """The C struct and the objects it points into (keep them alive)."""
        self._validate()
        keep: list[Any] = []
        opts = _lib.CInstanceOptions()
        opts.memory_mb = self.memory_mb
        opts.cpus = self.cpus
        opts.disk_mb = self.disk_mb
        opts.confinement = _CONFINEMENT[self.confinement]
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
        policy = _network_policy(self.network_policy)
        opts.allow_host = policy.allow_host
        for name, rules in (("net_allow", policy.allow), ("net_deny", policy.deny)):
            if rules:
                encoded = [_lib.encode_str(r, f"NetworkPolicy.{name[4:]}") for r in rules]
                arr = _lib.string_array(encoded)
                keep += [encoded, arr]
                setattr(opts, name, arr)
                setattr(opts, f"{name}_count", len(rules))
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
        max_layer_ratio: a layer may expand to this many times its
            compressed size (or 64 MiB, whichever is more) when unpacked;
            a decompression bomb is refused with ``IOError`` naming the
            layer and the sizes.
        max_layer_bytes: bound on one layer unpacked, in bytes.
        max_image_bytes: bound on all of the image's layers unpacked.
    """

    platform: Optional[str] = None
    auth: Optional[Auth] = None
    policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    max_layer_ratio: int = 100
    max_layer_bytes: int = 32 << 30
    max_image_bytes: int = 32 << 30

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
        for name in ("max_layer_ratio", "max_layer_bytes", "max_image_bytes"):
            _check_int(name, getattr(self, name), 1, 2**64 - 1)

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
        opts.max_layer_ratio = self.max_layer_ratio
        opts.max_layer_bytes = self.max_layer_bytes
        opts.max_image_bytes = self.max_image_bytes
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
    instances can run (``hypervisor_available``, as ``supports_hypervisor()``),
    the accelerator instances use (``"kvm"`` or ``"tcg"``) and whether it is
    hardware-accelerated (KVM), and how QEMU is confined (see SECURITY.md):
    its seccomp filter, its own namespaces, the uid it runs as, and what of
    that this host cannot give (``confinement_gaps``, empty when fully
    confined); and the guest kernel's content hash (``kernel_hash``, the key
    it was built under; None when unknown)."""

    architecture: str
    hypervisor_available: bool
    accelerator: str
    confined_seccomp: bool = False
    confined_namespaces: bool = False
    sandbox_uid: int = 0
    confinement_gaps: tuple[str, ...] = ()
    hardware_accelerated: bool = False
    kernel_hash: Optional[str] = None
