"""How a driver stops: Ctrl-C, a plain ``kill`` (SIGTERM) and a full disk.

Light on imports (no Ray, no torch): tune.run uses it before anything heavy is loaded.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from typing import Any

__all__ = ["InterruptWatch", "disk_full", "first_line", "sigterm_as_sigint"]


def sigterm_as_sigint() -> None:
    """SIGTERM (a plain `kill`, `ray job stop`) stops the study like Ctrl-C: Ray's own SIGINT handling
    ends the trials, the record is closed, and --resume continues."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))


def disk_full(exc: BaseException) -> bool:
    """Whether a full disk (or a full sqlite database) caused ``exc``, anywhere in its chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if (getattr(seen, "errno", None) == errno.ENOSPC or "No space left on device" in str(seen)
                or "database or disk is full" in str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]


def _sentinel(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class InterruptWatch:
    """Whether Ray Tune's own SIGINT/SIGUSR1 handler fired during ``Tuner.fit()``.

    On the first Ctrl-C Ray stops the trials and returns from ``fit()`` normally (the returned grid does
    not say so), putting back the handler it found: this sentinel, found again afterwards, means exactly that.
    """

    def __init__(self) -> None:
        self.seen = False
        # Ray installs no handler off the main thread or with TUNE_DISABLE_SIGINT_HANDLER=1 (KeyboardInterrupt).
        self._active = (threading.current_thread() is threading.main_thread()
                        and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") in ("", "0"))

    def __enter__(self) -> None:
        if self._active:
            self._previous = signal.signal(signal.SIGINT, _sentinel)

    def __exit__(self, *exc: object) -> None:
        if self._active:
            self.seen = exc[0] is None and signal.getsignal(signal.SIGINT) is _sentinel
            signal.signal(signal.SIGINT, self._previous)
