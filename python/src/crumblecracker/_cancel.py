"""``CancelToken``: stops blocking calls from another thread, at once.

Every blocking call takes ``cancel=`` (a token, or None): ``OCIClient.pull``,
``load_tar``/``load_dir``, ``Instance(...)``, ``Instance.wait``,
``Listener.accept``, ``Cmd.wait``, ``Conn``/``File`` ``read``/``write`` and
``Instance.read_file``/``write_file``. Cancelling the token makes the call
raise ``CancelledError`` naming the operation (``"wait cancelled"``); the
library wakes the call at once whatever it blocks on. A token stays
cancelled; one token may serve many calls.

Ctrl-C (and an ``aio`` task's cancellation) of a pull, boot, wait or accept
uses the same mechanism: each call runs with a child of the caller's token
(``cc_cancel_token_child``) that the interrupt cancels alone.

``close()`` (or leaving a ``with`` block) releases the token; using it
afterwards, to cancel it or pass it to a call, raises ``AlreadyClosedError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from ctypes import byref, c_bool, c_uint64
from typing import Optional

from . import _lib
from ._call import Handle


class CancelToken(Handle):
    """A cancellation flag for blocking calls, shared by the calls it is
    passed to as ``cancel=``; ``cancel()`` from any thread stops them with
    ``CancelledError``. A context manager: leaving the block closes it."""

    _kind = "cancel token"
    _free_fn = "cc_cancel_token_free"

    def __init__(self) -> None:
        out = c_uint64()
        _lib.call(_lib.native().cc_cancel_token_new, byref(out))
        super().__init__(int(out.value))

    def cancel(self) -> None:
        """Cancels every call using the token, now and later. Cancelling
        again does nothing."""
        _lib.call(_lib.native().cc_cancel_token_cancel, self._h("cancel"))

    @property
    def is_cancelled(self) -> bool:
        """Whether ``cancel()`` was called."""
        out = c_bool()
        _lib.call(_lib.native().cc_cancel_token_is_cancelled, self._h("is_cancelled"), byref(out))
        return bool(out.value)

    def __repr__(self) -> str:
        if self._closed:
            return "<CancelToken closed>"
        return f"<CancelToken cancelled={self.is_cancelled}>"


def check(cancel: object) -> Optional[CancelToken]:
    """CANCEL as a token, or TypeError."""
    if cancel is None or isinstance(cancel, CancelToken):
        return cancel
    raise TypeError(f"cancel must be a CancelToken or None, not {type(cancel).__name__}")


def handle(cancel: Optional[CancelToken], op: str) -> int:
    """The C handle of CANCEL for a call (0 for none)."""
    token = check(cancel)
    return 0 if token is None else token._h(op)


@contextmanager
def call_token(cancel: Optional[CancelToken], op: str) -> Iterator[int]:
    """A token for one call, freed after it: a child of CANCEL when there is
    one, so that the caller's token and the call's own interrupt (Ctrl-C)
    each stop it."""
    lib = _lib.native()
    out = c_uint64()
    if cancel is None:
        _lib.call(lib.cc_cancel_token_new, byref(out))
    else:
        _lib.call(lib.cc_cancel_token_child, handle(cancel, op), byref(out))
    try:
        yield int(out.value)
    finally:
        _lib.free("cc_cancel_token_free", out.value)
