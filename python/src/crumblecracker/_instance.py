"""Instances (running VMs), their filesystem, and snapshots."""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence
from ctypes import byref, c_bool, c_int32, c_size_t, c_uint64, c_void_p
from typing import Optional, Union

from . import _lib
from ._call import Call, Handle, cancel_then_settle, interruptible
from ._cancel import CancelToken, call_token
from ._cancel import check as check_cancel
from ._cancel import handle as cancel_handle
from ._cmd import Cmd, Conn
from ._errors import AlreadyClosedError, CCError, ErrorCode, InvalidArgumentError
from ._file import Data, File, as_bytes, file_info
from ._net import ExposedPort, Listener, check_port
from ._oci import ImageSource
from ._types import (
    O_CREATE,
    O_RDONLY,
    O_RDWR,
    O_TRUNC,
    DirEntry,
    FileInfo,
    InstanceOptions,
    StartKind,
)

__all__ = ["Instance", "Snapshot"]

GuestPath = Union[str, "os.PathLike[str]"]


def _guest(path: GuestPath, what: str = "path") -> bytes:
    return _lib.encode_path(path, what)


def _mode(mode: int, what: str = "mode") -> int:
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"{what} must be an int, not {type(mode).__name__}")
    if not 0 <= mode <= 0o7777:
        raise InvalidArgumentError(f"{what} must be between 0 and 0o7777, not {oct(mode)}")
    return mode


def _split_time(t: float, what: str) -> tuple[int, int]:
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(t).__name__}")
    if isinstance(t, int):
        return t, 0
    if not math.isfinite(t):
        raise InvalidArgumentError(f"{what} must be finite, not {t}")
    secs = math.floor(t)
    nsec = min(round((t - secs) * 1e9), 999_999_999)
    return secs, nsec


class Snapshot(Handle):
    """A captured instance filesystem, stored in the image store
    independently of the instance: boot new instances from it
    (``Instance(snapshot, options)`` or ``as_source()``) or export it.

    A context manager; ``close()`` is idempotent. Sources made from it and
    the stored image outlive it.
    """

    _kind = "snapshot"
    _free_fn = "cc_snapshot_free"

    def __init__(self, handle: int, name: str) -> None:
        super().__init__(handle)
        self._name = name

    @property
    def name(self) -> str:
        """The snapshot's name in the image store
        (``localhost/cc-snapshots:<instance>-<n>``)."""
        return self._name

    def as_source(self) -> ImageSource:
        """A source booting from the snapshot."""
        out = c_uint64()
        _lib.call(_lib.native().cc_snapshot_as_source, self._h("as_source"), byref(out))
        return ImageSource(out.value, self._name)

    def export_dir(self, path: _lib.PathArg) -> None:
        """Writes the snapshot as an OCI image layout directory (readable by
        skopeo, docker and ``OCIClient.load_dir``)."""
        raw = _lib.encode_path(path, "path")
        _lib.call(_lib.native().cc_snapshot_export_dir, self._h("export_dir"), raw)

    def close(self) -> None:
        """Closes the snapshot. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            _lib.call(_lib.native().cc_snapshot_close, self._handle)
        finally:
            self._release()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Snapshot {self._name!r}{state}>"


class Instance(Handle):
    """A running virtual machine booted from an image or a snapshot.

    ``Instance(source, options)`` boots it and returns once it is ready for
    commands. A context manager: leaving the block (or ``close()``) powers
    the guest off, and nothing of it remains; ``close()`` is idempotent and
    every other call afterwards raises ``AlreadyClosedError``. After the
    guest ended (``timeout_seconds``, a crash), calls raise
    ``NotRunningError``. Usable from several threads at once.
    """

    _kind = "instance"
    _free_fn = "cc_instance_free"

    def __init__(
        self,
        source: Union[ImageSource, Snapshot],
        options: Optional[InstanceOptions] = None,
        cancel: Optional[CancelToken] = None,
    ) -> None:
        check_cancel(cancel)
        if options is None:
            options = InstanceOptions()
        elif not isinstance(options, InstanceOptions):
            raise TypeError(
                f"options must be an InstanceOptions or None, not {type(options).__name__}"
            )
        c_opts, keep = options._to_c()
        lib = _lib.native()
        if isinstance(source, Snapshot):
            with source.as_source() as src:
                handle = self._boot(lib, src, c_opts, keep, cancel)
        elif isinstance(source, ImageSource):
            handle = self._boot(lib, source, c_opts, keep, cancel)
        else:
            raise TypeError(
                f"source must be an ImageSource or a Snapshot, not {type(source).__name__}"
            )
        super().__init__(handle)
        self._options = options
        try:
            out = c_void_p()
            _lib.call(lib.cc_instance_id, handle, byref(out))
            self._id = _lib.take_string(out)
        except BaseException:
            self._release()
            raise

    @staticmethod
    def _boot(
        lib: ctypes.CDLL,
        source: ImageSource,
        c_opts: _lib.CInstanceOptions,
        keep: object,
        cancel: Optional[CancelToken],
    ) -> int:
        src = source._h("Instance")

        def discard(handle: int) -> None:
            _lib.free("cc_instance_free", handle)

        with call_token(cancel, "Instance") as token:

            def run() -> int:
                _ = keep  # the option strings stay alive for the call
                out = c_uint64()
                _lib.call(lib.cc_instance_new_cancellable, src, byref(c_opts), token, byref(out))
                return int(out.value)

            def stop(_call: Call[int]) -> None:
                _lib.call(lib.cc_cancel_token_cancel, token)

            return interruptible(run, cancel_then_settle(stop, discard), "boot")

    # -- identity and lifecycle ------------------------------------------------

    @property
    def id(self) -> str:
        """The instance's unique id."""
        return self._id

    @property
    def start_kind(self) -> StartKind:
        """Whether the guest booted cold or was restored from a template."""
        out = c_int32()
        _lib.call(_lib.native().cc_instance_start_kind, self._handle, byref(out))
        return StartKind(out.value)

    @property
    def is_running(self) -> bool:
        """Whether the instance is open and its guest alive (False once
        closed, timed out, crashed, shut down or found not answering: a
        dead or deaf guest is noticed within about a second, and every
        waiting and later call then raises ``NotRunningError`` saying
        why)."""
        if self._closed:
            return False
        out = c_bool()
        _lib.call(_lib.native().cc_instance_is_running, self._handle, byref(out))
        return bool(out.value)

    def wait(self, cancel: Optional[CancelToken] = None) -> None:
        """Waits until the guest ends (powers off, crashes, times out or
        stops answering).
        Cancelling CANCEL raises ``CancelledError`` ("wait cancelled");
        Ctrl-C stops waiting (the instance keeps running) and raises
        ``KeyboardInterrupt``; closing the instance from another thread
        ends the wait with ``AlreadyClosedError``."""
        handle = self._h("wait")
        lib = _lib.native()
        with call_token(cancel, "wait") as token:

            def run() -> None:
                _lib.call(lib.cc_instance_wait, handle, token)

            def stop(_call: Call[None]) -> None:
                _lib.call(lib.cc_cancel_token_cancel, token)

            try:
                interruptible(run, cancel_then_settle(stop), "wait")
            except CCError as e:
                if self._closed and e.code == ErrorCode.INVALID_HANDLE:
                    raise AlreadyClosedError("the instance is closed", op="wait") from None
                raise

    @property
    def is_paused(self) -> bool:
        """Whether the instance is paused (``pause``); False once closed."""
        if self._closed:
            return False
        out = c_bool()
        _lib.call(_lib.native().cc_instance_is_paused, self._handle, byref(out))
        return bool(out.value)

    def pause(self) -> None:
        """Stops the guest's CPUs in place: its processes, clocks and timers
        stand still and it uses no host CPU, while its memory, files and
        connections stay. Until ``resume``, every new request (commands,
        file operations, signals, ``listen``, ``dial``, snapshots) raises
        ``PausedError`` at once; calls that only wait for the guest
        (``Cmd.wait``, reading output, ``accept``, ``wait``) keep waiting.
        Paused time counts towards no time limit (``timeout_seconds``,
        command timeouts). Pausing a paused instance does nothing; a closed
        one raises ``AlreadyClosedError``, a dead one ``NotRunningError``.
        Closing a paused instance is prompt."""
        _lib.call(_lib.native().cc_instance_pause, self._h("pause"))

    def resume(self) -> None:
        """Lets a paused guest run on where it stopped, and sets its clock
        from the host's. Resuming a running instance does nothing; a closed
        one raises ``AlreadyClosedError``, a dead one ``NotRunningError``."""
        _lib.call(_lib.native().cc_instance_resume, self._h("resume"))

    def set_network_enabled(self, enabled: bool) -> None:
        """Connects or disconnects the guest's network interface; while
        disconnected no packet leaves the guest."""
        _lib.call(
            _lib.native().cc_instance_set_network_enabled,
            self._h("set_network_enabled"),
            bool(enabled),
        )

    def close(self) -> None:
        """Closes the instance: with a writable mount the guest syncs and
        powers off first, without one the VM ends at once. Closing again
        does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            _lib.call(_lib.native().cc_instance_close, self._handle)
        finally:
            self._release()

    def park(self, path: _lib.PathArg) -> int:
        """Saves the running instance to the new directory PATH and closes
        it: its VM ends and its memory is released. ``Instance.restore(PATH)``
        starts it again, processes intact. Returns the disk space the park
        takes, in bytes.

        Commands may be running: their guest processes go on in every
        restore, while their ``Cmd``s, listeners and connections raise
        ``AlreadyClosedError``. No guest process may have a file open on a
        mount (``InvalidArgumentError``; the instance runs on). Mounts are
        kept: every restore shares the same host directories with the same
        modes; one whose directory is gone is ``InvalidArgumentError``."""
        raw = _lib.encode_path(path, "path")
        out = c_uint64()
        _lib.call(_lib.native().cc_instance_park, self._h("park"), raw, byref(out))
        self._closed = True
        self._release()
        return int(out.value)

    def branch(self, n: int = 1) -> list[Instance]:
        """Starts N (1 to 64) new instances that are copies of this one at
        the moment of the call (memory, guest processes, files), each
        diverging on its own, with a new id and hostname, clock and RNG;
        this instance is stopped only while it is saved, then runs on.

        The children share the saved memory copy-on-write. As for
        ``park``, no guest process may have a file open on a mount
        (``InvalidArgumentError``; it runs on); the source and the children
        keep the mounts. Commands, files, listeners and connections in
        flight stay with this instance and carry on; in the children the
        running guest processes go on, their output dropped and their input
        at end of file. Calls from other threads meanwhile wait for the
        save."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if not 1 <= n <= 64:
            raise InvalidArgumentError(f"branch count {n} is outside 1..=64")
        lib = _lib.native()
        out = (c_uint64 * n)()
        _lib.call(lib.cc_instance_branch, self._h("branch"), n, out)
        children = []
        try:
            for handle in out:
                children.append(Instance._adopt(int(handle)))
        except BaseException:
            for child in children:
                child.close()
            for handle in out[len(children) :]:
                _lib.free("cc_instance_free", int(handle))
            raise
        return children

    @classmethod
    def _adopt(cls, handle: int) -> Instance:
        """The instance of a new handle."""
        inst = cls.__new__(cls)
        Handle.__init__(inst, handle)
        inst._options = InstanceOptions()
        try:
            id_out = c_void_p()
            _lib.call(_lib.native().cc_instance_id, handle, byref(id_out))
            inst._id = _lib.take_string(id_out)
        except BaseException:
            inst._release()
            raise
        return inst

    @classmethod
    def restore(cls, path: _lib.PathArg, timeout_seconds: Optional[float] = None) -> Instance:
        """A new, independent instance started from the park at PATH (made
        by ``park``): its processes, memory and files as they were parked,
        with a new id and hostname, the clock set from the host and the RNG
        reseeded. A park can be restored any number of times. Memory, CPUs,
        disk, network and user are the parked instance's;
        TIMEOUT_SECONDS ends the restored instance that long after the
        restore. A park made by another kernel, agent or QEMU, a PATH that
        is not a park, one whose mount directory is gone, or the park of a
        warm-started instance whose template was removed or rebuilt since
        (such a park keeps only the memory that differs from it), raises
        ``InvalidArgumentError`` and nothing starts."""
        raw = _lib.encode_path(path, "path")
        if timeout_seconds is None:
            seconds = 0.0
        elif isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, (int, float)):
            raise TypeError(
                f"timeout_seconds must be a number or None, not {type(timeout_seconds).__name__}"
            )
        elif not timeout_seconds > 0:
            raise InvalidArgumentError(
                f"timeout_seconds must be a positive number of seconds, not {timeout_seconds}"
            )
        else:
            seconds = float(timeout_seconds)
        out = c_uint64()
        _lib.call(_lib.native().cc_instance_restore, raw, seconds, byref(out))
        return cls._adopt(int(out.value))

    # -- filesystem ------------------------------------------------------------

    def read_file(self, path: GuestPath, cancel: Optional[CancelToken] = None) -> bytes:
        """The whole contents of a guest file, built once at the size the
        guest reports (any size up to the cap: the host holds it about
        once). A file over ``InstanceOptions.max_result_bytes`` raises
        ``TooLargeError`` before any of it is read; stream such files with
        ``copy_out`` or ``read_file_stream``. Cancelling CANCEL raises
        ``CancelledError`` ("read_file cancelled")."""
        data = c_void_p()
        length = c_size_t()
        _lib.call(
            _lib.native().cc_instance_read_file_cancellable,
            self._h("read_file"),
            _guest(path),
            cancel_handle(cancel, "read_file"),
            byref(data),
            byref(length),
        )
        return _lib.take_bytes(data, length.value)

    def read_file_stream(self, path: GuestPath) -> Conn:
        """Starts streaming a guest file of any size: a readable ``Conn``
        (``read(n)`` until ``b""``; closing it early stops the transfer).
        Only a bounded window is in memory at a time and
        ``max_result_bytes`` does not apply::

            with inst.read_file_stream("/var/log/big.log") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    sink.write(chunk)
        """
        raw = _guest(path)
        out = c_uint64()
        _lib.call(
            _lib.native().cc_instance_read_file_stream,
            self._h("read_file_stream"),
            raw,
            byref(out),
            None,
        )
        return Conn(out.value, self, f"read of {_lib.decode(raw)!r}")

    def copy_out(self, guest_path: GuestPath, host_path: _lib.PathArg) -> int:
        """Copies a guest file to HOST_PATH (created, or truncated) in
        constant memory whatever its size; runs of zero bytes become holes.
        Returns the bytes copied. On failure the host file may hold part of
        the contents."""
        copied = c_uint64()
        _lib.call(
            _lib.native().cc_instance_copy_out,
            self._h("copy_out"),
            _guest(guest_path, "guest_path"),
            _lib.encode_path(host_path, "host_path"),
            byref(copied),
        )
        return int(copied.value)

    def copy_in(self, host_path: _lib.PathArg, guest_path: GuestPath, mode: int = 0o644) -> int:
        """Copies the host file HOST_PATH to GUEST_PATH (created or
        replaced, permission bits MODE) in constant memory whatever its
        size. Returns the bytes copied."""
        copied = c_uint64()
        _lib.call(
            _lib.native().cc_instance_copy_in,
            self._h("copy_in"),
            _lib.encode_path(host_path, "host_path"),
            _guest(guest_path, "guest_path"),
            _mode(mode),
            byref(copied),
        )
        return int(copied.value)

    def write_file(
        self,
        path: GuestPath,
        data: Data,
        mode: int = 0o644,
        cancel: Optional[CancelToken] = None,
    ) -> None:
        """Creates or replaces a guest file with DATA (bytes, or str encoded
        UTF-8) and permission bits MODE. Cancelling CANCEL raises
        ``CancelledError`` ("write_file cancelled"); the file may then hold
        part of DATA."""
        raw = as_bytes(data)
        _lib.call(
            _lib.native().cc_instance_write_file_cancellable,
            self._h("write_file"),
            _guest(path),
            raw,
            len(raw),
            _mode(mode),
            cancel_handle(cancel, "write_file"),
        )

    def _stat(self, fn: str, op: str, path: GuestPath) -> FileInfo:
        info = _lib.CFileInfo()
        _lib.call(getattr(_lib.native(), fn), self._h(op), _guest(path), byref(info))
        return file_info(info)

    def stat(self, path: GuestPath) -> FileInfo:
        """Metadata of PATH, following a final symlink."""
        return self._stat("cc_instance_stat", "stat", path)

    def lstat(self, path: GuestPath) -> FileInfo:
        """Metadata of PATH itself, not following a final symlink."""
        return self._stat("cc_instance_lstat", "lstat", path)

    def mkdir(self, path: GuestPath, mode: int = 0o755) -> None:
        """Creates a directory; its parent must exist."""
        _lib.call(_lib.native().cc_instance_mkdir, self._h("mkdir"), _guest(path), _mode(mode))

    def mkdir_all(self, path: GuestPath, mode: int = 0o755) -> None:
        """Creates a directory and any missing parents; an existing
        directory is fine."""
        _lib.call(
            _lib.native().cc_instance_mkdir_all, self._h("mkdir_all"), _guest(path), _mode(mode)
        )

    def remove(self, path: GuestPath) -> None:
        """Removes a file, symlink or empty directory."""
        _lib.call(_lib.native().cc_instance_remove, self._h("remove"), _guest(path))

    def remove_all(self, path: GuestPath) -> None:
        """Removes PATH and everything under it (never following symlinks);
        a missing path is fine."""
        _lib.call(_lib.native().cc_instance_remove_all, self._h("remove_all"), _guest(path))

    def read_dir(self, path: GuestPath) -> list[DirEntry]:
        """The entries of a directory, sorted by name."""
        lib = _lib.native()
        entries = ctypes.POINTER(_lib.CDirEntry)()
        count = c_size_t()
        _lib.call(
            lib.cc_instance_read_dir,
            self._h("read_dir"),
            _guest(path),
            byref(entries),
            byref(count),
        )
        try:
            return [
                DirEntry(
                    name=_lib.decode(entries[i].name),
                    is_dir=bool(entries[i].is_dir),
                    mode=int(entries[i].mode),
                )
                for i in range(count.value)
            ]
        finally:
            lib.cc_dir_entries_free(entries, count.value)

    def rename(self, src: GuestPath, dst: GuestPath) -> None:
        """Renames (moves) SRC to DST."""
        _lib.call(
            _lib.native().cc_instance_rename,
            self._h("rename"),
            _guest(src, "src"),
            _guest(dst, "dst"),
        )

    def symlink(self, target: GuestPath, link: GuestPath) -> None:
        """Creates LINK as a symlink to TARGET (stored as given)."""
        _lib.call(
            _lib.native().cc_instance_symlink,
            self._h("symlink"),
            _guest(target, "target"),
            _guest(link, "link"),
        )

    def readlink(self, path: GuestPath) -> str:
        """The target of a symlink."""
        out = c_void_p()
        _lib.call(_lib.native().cc_instance_readlink, self._h("readlink"), _guest(path), byref(out))
        return _lib.take_string(out)

    def chmod(self, path: GuestPath, mode: int) -> None:
        """Sets the permission bits (``0o7777``)."""
        _lib.call(_lib.native().cc_instance_chmod, self._h("chmod"), _guest(path), _mode(mode))

    def chown(self, path: GuestPath, uid: int, gid: int) -> None:
        """Sets the owner and group; -1 leaves one unchanged."""
        for name, value in (("uid", uid), ("gid", gid)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if not -1 <= value < 2**32:
                raise InvalidArgumentError(f"{name} out of range: {value}", op="chown")
        _lib.call(_lib.native().cc_instance_chown, self._h("chown"), _guest(path), uid, gid)

    def chtimes(self, path: GuestPath, atime: float, mtime: float) -> None:
        """Sets the access and modification times (seconds since the epoch,
        as ``time.time()`` gives)."""
        a_sec, a_nsec = _split_time(atime, "atime")
        m_sec, m_nsec = _split_time(mtime, "mtime")
        _lib.call(
            _lib.native().cc_instance_chtimes,
            self._h("chtimes"),
            _guest(path),
            a_sec,
            a_nsec,
            m_sec,
            m_nsec,
        )

    # -- file handles ----------------------------------------------------------

    def open(self, path: GuestPath) -> File:
        """Opens a guest file for reading."""
        return self._open("cc_instance_open", "open", path, O_RDONLY)

    def create(self, path: GuestPath) -> File:
        """Creates (or truncates) a guest file for reading and writing
        (mode 0666)."""
        return self._open("cc_instance_create", "create", path, O_RDWR | O_CREATE | O_TRUNC)

    def open_file(self, path: GuestPath, flags: int = O_RDONLY, mode: int = 0o644) -> File:
        """Opens a guest file with ``O_*`` flags (``cc.O_RDWR | cc.O_CREATE``,
        ...) and, when it is created, permission bits MODE."""
        if isinstance(flags, bool) or not isinstance(flags, int):
            raise TypeError(f"flags must be an int, not {type(flags).__name__}")
        if not 0 <= flags < 2**32:
            raise InvalidArgumentError(f"unknown flags {flags}", op="open_file")
        raw = _guest(path)
        out = c_uint64()
        _lib.call(
            _lib.native().cc_instance_open_file,
            self._h("open_file"),
            raw,
            flags,
            _mode(mode),
            byref(out),
        )
        return File(out.value, self, _lib.decode(raw), flags)

    def _open(self, fn: str, op: str, path: GuestPath, flags: int) -> File:
        raw = _guest(path)
        out = c_uint64()
        _lib.call(getattr(_lib.native(), fn), self._h(op), raw, byref(out))
        return File(out.value, self, _lib.decode(raw), flags)

    # -- commands --------------------------------------------------------------

    def command(self, program: str, *args: str) -> Cmd:
        """A command running PROGRAM (looked up in the guest's ``PATH``)
        with ARGS. The image's environment, working directory and user apply
        unless set on the command."""
        raw_program = _lib.encode_str(program, "program")
        raw_args = [_lib.encode_str(a, f"argument {i + 1}") for i, a in enumerate(args)]
        arr = _lib.string_array(raw_args)
        out = c_uint64()
        _lib.call(
            _lib.native().cc_instance_command,
            self._h("command"),
            raw_program,
            arr,
            len(raw_args),
            byref(out),
        )
        return Cmd(out.value, self, [program, *args])

    def entrypoint_command(self, *args: str) -> Cmd:
        """A command running the image's entrypoint: ``Entrypoint`` + ARGS,
        or ``Entrypoint`` + ``Cmd`` without ARGS."""
        raw_args = [_lib.encode_str(a, f"argument {i + 1}") for i, a in enumerate(args)]
        arr = _lib.string_array(raw_args)
        out = c_uint64()
        _lib.call(
            _lib.native().cc_instance_entrypoint_command,
            self._h("entrypoint_command"),
            arr,
            len(raw_args),
            byref(out),
        )
        return Cmd(out.value, self, ["<entrypoint>", *args])

    # -- networking ------------------------------------------------------------

    def listen(self, network: str, address: str) -> Listener:
        """Listens for connections from guest programs, which connect to
        ``host.internal`` (in the guest's ``/etc/hosts``) at the port.
        NETWORK is ``"tcp"`` or ``"tcp4"``; ADDRESS is ``":PORT"`` or
        ``"host.internal:PORT"`` (port 0 picks a free one: see
        ``Listener.port``). Works with the network off. Bad input raises
        ``InvalidArgumentError``; a port taken in the guest ``NetworkError``.
        """
        raw_network = _lib.encode_str(network, "network")
        raw_address = _lib.encode_str(address, "address")
        out = c_uint64()
        _lib.call(
            _lib.native().cc_instance_listen,
            self._h("listen"),
            raw_network,
            raw_address,
            byref(out),
        )
        return Listener(out.value, self)

    def dial(self, network: str, address: str) -> Conn:
        """Connects to a TCP service inside the guest and returns the
        connection (readable and writable). ADDRESS is ``"IP:PORT"`` as the
        guest sees it (``"127.0.0.1:8080"``; ``":8080"`` is the guest's
        loopback). Nothing listening there raises ``NetworkError``."""
        raw_network = _lib.encode_str(network, "network")
        raw_address = _lib.encode_str(address, "address")
        out = c_uint64()
        _lib.call(
            _lib.native().cc_instance_dial,
            self._h("dial"),
            raw_network,
            raw_address,
            byref(out),
        )
        return Conn(out.value, self, f"dialed {_lib.decode(raw_address)}", tcp=True)

    def expose(self, guest_port: int, host_port: int = 0) -> ExposedPort:
        """Publishes the guest's TCP port GUEST_PORT at
        ``127.0.0.1:HOST_PORT`` on the host (0 picks a free port: see
        ``ExposedPort.host_port``). Exposing a guest port twice raises
        ``InvalidArgumentError``; a host port in use ``NetworkError``."""
        guest = check_port(guest_port, "guest_port")
        host = check_port(host_port, "host_port")
        out = c_uint64()
        bound = ctypes.c_uint16()
        _lib.call(
            _lib.native().cc_instance_expose,
            self._h("expose"),
            guest,
            host,
            byref(out),
            byref(bound),
        )
        return ExposedPort(out.value, self, guest, int(bound.value))

    # -- snapshots -------------------------------------------------------------

    def snapshot_filesystem(self, excludes: Optional[Sequence[str]] = None) -> Snapshot:
        """Captures the whole filesystem without stopping the instance,
        leaving out paths matching the EXCLUDES globs (``*``, ``?``, ``**``;
        without a leading ``/`` they match at any depth)."""
        if isinstance(excludes, (str, bytes)):
            raise TypeError("excludes must be a sequence of glob strings, not a single string")
        raw = [_lib.encode_str(e, "exclude") for e in excludes or []]
        arr = _lib.string_array(raw)
        lib = _lib.native()
        out = c_uint64()
        _lib.call(
            lib.cc_instance_snapshot, self._h("snapshot_filesystem"), arr, len(raw), byref(out)
        )
        handle = out.value
        name = c_void_p()
        try:
            _lib.call(lib.cc_snapshot_name, handle, byref(name))
        except BaseException:
            _lib.free("cc_snapshot_free", handle)
            raise
        return Snapshot(handle, _lib.take_string(name))

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Instance {self._id!r} {state}>"
