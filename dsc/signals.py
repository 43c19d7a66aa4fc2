"""SIGINT and SIGTERM: exceptions at a safe point, never swallowed by native code.

The CLI turns SIGTERM into `dsc.errors.Terminated` (exit 143) as Python turns SIGINT into
`KeyboardInterrupt` (exit 130); both unwind through `dsc.artifacts.atomic_dir`, which removes the
temporary directory, so the output path is left as it was.

Native code that calls back into Python can swallow those exceptions: TensorRT's builder calls
its Python logger from C++, and a KeyboardInterrupt raised there is caught and printed by the
binding while the build goes on (and the artifact was written, exit 0). `deferred()` is for such
calls and for steps that must not be cut in half (the rename of a finished artifact into place,
the removal of a temporary directory): inside it a signal is only recorded (`pending()` lets a
long native call stop early, e.g. through TensorRT's progress monitor), and when the block ends
the signal is delivered again with the handlers that were there before, so it raises as usual.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from dsc.errors import Terminated

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_pending: list[int] = []
_depth = 0


def _record(signum, frame) -> None:
    _pending.append(signum)


def _terminate(signum, frame) -> None:
    raise Terminated()


def install() -> dict:
    """The CLI's handlers: SIGINT raises KeyboardInterrupt, SIGTERM raises `Terminated`.

    Returns the previous handlers, for `restore`. A signal the parent process ignores (e.g. SIGINT
    of a background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _terminate)):
        if previous[s] is not signal.SIG_IGN:
            signal.signal(s, handler)
    _pending.clear()
    return previous


def restore(previous: dict) -> None:
    for s, handler in previous.items():
        if handler is not None:
            signal.signal(s, handler)


def pending() -> bool:
    """Whether a signal arrived inside the current `deferred()` block."""
    return bool(_pending)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver them (see the module docstring).

    Only the main thread receives signals; elsewhere this does nothing."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = None
    if _depth == 0:
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            if previous[s] is not signal.SIG_IGN:
                signal.signal(s, _record)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if previous is not None:
            restore(previous)
            received, _pending[:] = list(_pending), []
            if received:
                # Delivered again to the handlers restored above: KeyboardInterrupt, Terminated,
                # or (outside the CLI) whatever the process had, e.g. SIGTERM's default exit.
                signal.raise_signal(received[0])
