"""OCI images: the client (image store), pulls with progress, image sources."""

from __future__ import annotations

import ctypes
from ctypes import byref, c_uint64, c_void_p
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from . import _lib
from ._call import Call, Handle, cancel_then_settle, interruptible
from ._cancel import CancelToken, call_token
from ._cancel import handle as cancel_handle
from ._errors import CCError
from ._types import ImageConfig, PullOptions, PullProgress

if TYPE_CHECKING:
    from ._instance import Snapshot

__all__ = ["ImageSource", "OCIClient", "ProgressCallback"]

ProgressCallback = Callable[[PullProgress], object]
"""Called with a ``PullProgress`` as a pull makes progress. An exception it
raises cancels the pull and is re-raised by ``pull``."""


def _strings(arr: Any, count: int) -> list[str]:
    """COUNT strings of a ``char **`` field."""
    return [_lib.decode(arr[i]) for i in range(count)]


class ImageSource(Handle):
    """What an instance boots from: a pulled or loaded image, or a snapshot.

    Immutable and usable from any thread; a context manager whose ``close()``
    releases it (instances already booted from it are unaffected).
    """

    _kind = "image source"
    _free_fn = "cc_source_free"

    def __init__(self, handle: int, description: str) -> None:
        super().__init__(handle)
        self._description = description

    @property
    def name(self) -> str:
        """The reference, path or snapshot name this source came from."""
        return self._description

    def get_config(self) -> ImageConfig:
        """The image's configuration (architecture, env, entrypoint, ...)."""
        lib = _lib.native()
        out = ctypes.POINTER(_lib.CImageConfig)()
        _lib.call(lib.cc_source_image_config, self._h("get_config"), byref(out))
        try:
            c = out.contents
            keys = _strings(c.label_keys, c.label_count)
            values = _strings(c.label_values, c.label_count)
            return ImageConfig(
                architecture=_lib.decode(c.architecture),
                os=_lib.decode(c.os),
                env=_strings(c.env, c.env_count),
                working_dir=None if c.working_dir is None else _lib.decode(c.working_dir),
                entrypoint=_strings(c.entrypoint, c.entrypoint_count),
                cmd=_strings(c.cmd, c.cmd_count),
                user=None if c.user is None else _lib.decode(c.user),
                labels=dict(zip(keys, values)),
            )
        finally:
            lib.cc_image_config_free(out)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<ImageSource {self._description!r}{state}>"


SourceLike = Union[ImageSource, "Snapshot"]


class OCIClient(Handle):
    """An image store: pulls, loads and exports images.

    ``cache_dir`` is the store's directory; None for the per-user store
    (``$CC_CACHE_DIR/oci``, by default ``~/.cache/crumblecracker/oci``).
    Closing the client cancels its pulls in flight; sources it returned stay
    usable.
    """

    _kind = "OCI client"
    _free_fn = "cc_oci_client_free"

    def __init__(self, cache_dir: Optional[_lib.PathArg] = None) -> None:
        lib = _lib.native()
        raw = None if cache_dir is None else _lib.encode_path(cache_dir, "cache_dir")
        out = c_uint64()
        _lib.call(lib.cc_oci_client_new, raw, byref(out))
        super().__init__(out.value)
        try:
            where = c_void_p()
            _lib.call(lib.cc_oci_client_cache_dir, out.value, byref(where))
            self._cache_dir = _lib.take_string(where)
        except BaseException:
            self._release()
            raise

    @property
    def cache_dir(self) -> str:
        """The store's directory, absolute (also after ``close()``)."""
        return self._cache_dir

    def pull(
        self,
        ref: str,
        options: Optional[PullOptions] = None,
        progress_callback: Optional[ProgressCallback] = None,
        cancel: Optional[CancelToken] = None,
    ) -> ImageSource:
        """Pulls REF (``alpine``, ``docker.io/library/alpine:3.20``,
        ``127.0.0.1:5000/img:tag``; loopback registries speak plain HTTP)
        into the store and returns it as a source.

        PROGRESS_CALLBACK, if given, is called with a ``PullProgress`` as
        bytes arrive (on a helper thread when ``pull`` is called on the main
        thread). An exception it raises cancels the pull and is re-raised
        here. Cancelling CANCEL raises ``CancelledError`` ("pull
        cancelled"). Ctrl-C cancels the pull and raises ``KeyboardInterrupt``.
        Registry failures raise ``NetworkError``.
        """
        lib = _lib.native()
        handle = self._h("pull")
        raw_ref = _lib.encode_str(ref, "ref")
        if options is None:
            options = PullOptions()
        elif not isinstance(options, PullOptions):
            raise TypeError(f"options must be a PullOptions or None, not {type(options).__name__}")
        c_opts, keep = options._to_c()

        raised: list[BaseException] = []
        callback = _lib.PROGRESS_FN()  # NULL: no callback
        if progress_callback is not None:
            user_fn = progress_callback

            def trampoline(p: Any, _user_data: Any) -> int:
                if raised:
                    return 1
                try:
                    c = p.contents
                    eta = float(c.eta_seconds)
                    user_fn(
                        PullProgress(
                            current=int(c.current),
                            total=int(c.total),
                            blob=_lib.decode(c.blob),
                            blob_index=int(c.blob_index),
                            blob_count=int(c.blob_count),
                            bytes_per_second=float(c.bytes_per_second),
                            eta_seconds=None if eta < 0 else eta,
                        )
                    )
                except BaseException as e:  # re-raised by pull()
                    raised.append(e)
                    return 1
                return 0

            callback = _lib.PROGRESS_FN(trampoline)

        with call_token(cancel, "pull") as token:

            def run() -> int:
                out = c_uint64()
                # `keep` and `callback` stay referenced by this closure for the
                # whole call, also when it outlives an interrupted pull().
                _ = keep
                _lib.call(
                    lib.cc_oci_pull,
                    handle,
                    raw_ref,
                    byref(c_opts),
                    callback,
                    None,
                    token,
                    byref(out),
                )
                return out.value

            def stop(_call: Call[int]) -> None:
                _lib.call(lib.cc_cancel_token_cancel, token)

            def discard(source: int) -> None:
                _lib.free("cc_source_free", source)

            try:
                source = interruptible(run, cancel_then_settle(stop, discard), "pull")
            except CCError:
                if not raised:
                    raise
                source = 0
        if raised:
            _lib.free("cc_source_free", source)
            error = raised[0]
            raise error
        return ImageSource(source, ref)

    def load_tar(self, path: _lib.PathArg, cancel: Optional[CancelToken] = None) -> ImageSource:
        """Loads a ``docker save`` archive or an OCI layout archive (.tar).
        Cancelling CANCEL raises ``CancelledError`` ("load cancelled")."""
        return self._load("cc_oci_load_tar_cancellable", "load_tar", path, cancel)

    def load_dir(self, path: _lib.PathArg, cancel: Optional[CancelToken] = None) -> ImageSource:
        """Loads an OCI image layout directory; CANCEL as for ``load_tar``."""
        return self._load("cc_oci_load_dir_cancellable", "load_dir", path, cancel)

    def _load(
        self, fn: str, op: str, path: _lib.PathArg, cancel: Optional[CancelToken]
    ) -> ImageSource:
        lib = _lib.native()
        raw = _lib.encode_path(path, "path")
        out = c_uint64()
        _lib.call(getattr(lib, fn), self._h(op), raw, cancel_handle(cancel, op), byref(out))
        return ImageSource(out.value, _lib.decode(raw))

    def export_dir(self, source: SourceLike, path: _lib.PathArg) -> None:
        """Writes SOURCE (an image or a snapshot) as an OCI image layout
        directory that skopeo, docker and ``load_dir`` read."""
        from ._instance import Snapshot

        lib = _lib.native()
        handle = self._h("export_dir")
        raw = _lib.encode_path(path, "path")
        if isinstance(source, Snapshot):
            with source.as_source() as src:
                _lib.call(lib.cc_oci_export_dir, handle, src._h("export_dir"), raw)
            return
        if not isinstance(source, ImageSource):
            raise TypeError(
                f"source must be an ImageSource or a Snapshot, not {type(source).__name__}"
            )
        _lib.call(lib.cc_oci_export_dir, handle, source._h("export_dir"), raw)

    def close(self) -> None:
        """Closes the client (cancelling pulls in flight). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            _lib.call(_lib.native().cc_oci_client_close, self._handle)
        finally:
            self._release()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<OCIClient {self._cache_dir!r}{state}>"
