"""The study lock: one driver at a time per study, never a stale lock.

``fcntl.flock`` on ``.<name>.lock`` beside the study folder (so that ``--restart`` can move the
folder while holding it): atomic, and released by the kernel when the holder dies, so a lock left by
a killed driver never blocks the next one. The file names its holder for the refusal message.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from .study import StudyError

__all__ = ["StudyLock", "lock_path"]

# What flock raises, with LOCK_NB, for a lock another process holds (EAGAIN; EACCES on some systems).
_HELD = (BlockingIOError, PermissionError)


def lock_path(study_dir: Path) -> Path:
    return study_dir.parent / f".{study_dir.name}.lock"


class StudyLock:
    """An exclusive lock on one study, held for the driver's life (or a ``with`` block)."""

    def __init__(self, study_dir: Path) -> None:
        self.path = lock_path(study_dir)
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock and write the holder (pid, host, start time) into its file; creates the
        storage folder. Raises :class:`StudyError`: the lock is held (naming the holder), or its file
        cannot be created."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = self.path.open("a+", encoding="utf-8")
        except OSError as exc:
            raise StudyError(f"cannot create the study's lock file {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            if isinstance(exc, _HELD):
                raise StudyError(f"study {self.path.name[1:-5]!r} is in use by {holder} "
                                  f"(lock {self.path}); wait for it to end or stop it first") from exc
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{_dt.datetime.now().isoformat(timespec='seconds')}\n")
        fh.flush()
        self._fh = fh

    @staticmethod
    def held(study_dir: Path) -> bool:
        """Whether a live driver holds the lock of the study at ``study_dir`` (a shared, non-blocking
        probe, released at once; writes nothing)."""
        try:
            fh = lock_path(study_dir).open("r", encoding="utf-8")
        except FileNotFoundError:
            return False
        with fh:  # (closing the file releases the probe's own shared lock)
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except _HELD:
                return True
        return False

    def __enter__(self) -> StudyLock:  # noqa: PYI034 - Self needs Python 3.11
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the flock
            self._fh = None
