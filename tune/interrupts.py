"""How a driver stops: Ctrl-C, a plain ``kill`` (SIGTERM), and the OS errors it can meet.

One rule for the signals (:func:`stop_on_signals`): SIGINT and SIGTERM both stop the driver at every
moment, whatever it inherited (a background job of a non-interactive shell starts with SIGINT ignored);
while Ray Tune runs trials its own Ctrl-C handler ends them gracefully, for either signal. One rule for
the OS errors (:func:`os_problem`): an error anywhere in an exception's chain (Ray and Optuna wrap them)
becomes one line that names the path and what to do; tune.run turns it into the exit status.

Light on imports (no Ray, no torch): tune.run uses it before anything heavy is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from minimind_train.signals import signals_deferred  # (one rule, shared with the tokeniser's pool)

__all__ = ["RECORD_WAIT_ENV", "InterruptWatch", "StudyStopped", "chain", "disk_full", "first_line", "os_problem",
           "record_wait_s", "signals_deferred", "stop_on_signals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long a read or write of a study's optuna.db waits while another process holds its lock (a database
# browser's open transaction, a second writer: optuna#820) before the driver stops with one line.
RECORD_WAIT_ENV = "MINIMIND_TUNE_RECORD_WAIT_S"
_RECORD_WAIT_S = "60"


def record_wait_s() -> float:
    """Seconds to wait for another process's lock on optuna.db (sqlite's busy timeout): ``$MINIMIND_TUNE_RECORD_WAIT_S``,
    else 60. ValueError: it is not a number of seconds >= 0 (tune.run refuses that before any work)."""
    text = os.environ.get(RECORD_WAIT_ENV, "").strip() or _RECORD_WAIT_S
    with contextlib.suppress(ValueError):
        if math.isfinite(seconds := float(text)) and seconds >= 0:
            return seconds
    raise ValueError(f"${RECORD_WAIT_ENV}={text!r} is not allowed: expected seconds >= 0 (default {_RECORD_WAIT_S})")


def _stop(signum: int, frame: FrameType | None) -> None:
    """The driver's handler of both signals: stop here (KeyboardInterrupt), or, for SIGTERM while a
    handler of Ray Tune's holds SIGINT, do what Ctrl-C does now (called here, not re-sent: SIGINT may be
    ignored by the process's disposition, and a signal sent to oneself is handled later)."""
    if signum != signal.SIGINT:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not _stop:
            handler(signal.SIGINT, frame)
            return
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """Install the driver's handler for SIGINT and SIGTERM (main thread only; again after a library
    such as ``ray.init`` installed its own). Installed for SIGINT too when it was inherited ignored."""
    if threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            signal.signal(signum, _stop)


class StudyStopped(Exception):
    """A driver run stopped after its trials began (by a signal or an error: the ``__cause__``), with the
    study left for ``--resume``: trials still running marked interrupted, the MLflow parent closed."""

    def __init__(self, resume: str, record: Path) -> None:
        super().__init__(f"stopped; continue with {resume}")
        self.resume = resume  # the command that continues the study
        self.record = record  # its optuna.db


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, outermost first (the wrapping Ray and Optuna add included)."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def disk_full(exc: BaseException) -> bool:
    """Whether a full disk (or a full sqlite database) caused ``exc``, anywhere in its chain."""
    return any(getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(seen)
               or "database or disk is full" in str(seen) for seen in chain(exc))


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), cut at ``limit`` characters."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return first[:limit] + ("..." if len(first) > limit else "")


def os_problem(exc: BaseException, record: Path | None = None) -> str | None:
    """One line for the OS error behind ``exc`` (anywhere in its chain): what happened to which path and
    what to do about it; None when no OS error is behind it. ``record``: the study's ``optuna.db``, which
    sqlite's messages do not name."""
    if disk_full(exc):
        where = next((seen.filename for seen in chain(exc) if getattr(seen, "filename", None)), None) or record
        return f"the disk holding {where} is full: free space"
    for seen in chain(exc):
        text, code = str(seen), getattr(seen, "errno", None)
        path = getattr(seen, "filename", None)
        if "database is locked" in text:  # sqlite's busy timeout ran out (optuna#820)
            return (f"the study record {record} stayed locked by another process for longer than the driver waits "
                    f"({record_wait_s():g} s, ${RECORD_WAIT_ENV}): close what holds it (a database browser, a second "
                    "writer)")
        if "readonly database" in text:  # sqlite: a read-only file or folder, or the file deleted under it
            if record is not None and not record.exists():
                # Nothing can continue the study (--resume and --restart refuse a folder without it).
                return (f"the study record {record} was deleted while the driver used it, so the study cannot "
                        f"be continued; its trials' checkpoints are still in runs/: move {record.parent} "
                        "away, then start the study again")
            return f"the study record {record} cannot be written (read-only): make it and its folder writable"
        if "unable to open database file" in text:  # sqlite: its folder gone or unwritable, or its path too long
            return (f"SQLite cannot open the study record {record} or its journal beside it: make its folder exist "
                    "and be writable (its path shorter than 512 bytes)")
        if isinstance(seen, OSError) and path is not None:
            reason = seen.strerror or text
            if code in (errno.EACCES, errno.EPERM, errno.EROFS):
                return f"cannot write {path} ({reason}): make it writable, or choose another --storage-path"
            if code == errno.ENAMETOOLONG:
                return f"{path}: {reason}: choose a shorter --name or --storage-path"
            return f"{path}: {reason}"
    return None


def _sentinel(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class InterruptWatch:
    """Whether Ray Tune's own SIGINT/SIGUSR1 handler fired during ``Tuner.fit()``.

    On the first Ctrl-C (or SIGTERM: :func:`_stop` calls Ray's handler) Ray stops the trials and returns
    from ``fit()`` normally (the returned grid does not say so), putting back the handler it found: this
    sentinel, found again afterwards, means exactly that.
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
