"""A step that a stop signal must not cut in two: SIGINT and SIGTERM deferred to its end.

Light on imports (the standard library only): tune.interrupts uses it before anything heavy is loaded.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["STOP_SIGNALS", "signals_deferred"]

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Run the body whole: SIGINT and SIGTERM received meanwhile act right after it, through the handlers
    that were in place (a callable one is called; the default one is raised again; an ignored one stays
    ignored), as if received then. Main thread only (elsewhere Python cannot handle signals): in any
    other thread the body runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        handler = previous[received[0]]
        if callable(handler):
            handler(received[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(received[0])
