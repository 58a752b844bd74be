"""Files and folders written whole or not at all: the one write-and-rename of tune/.

Whatever a reader, or the next driver after a kill at any moment, may open while it is being written
(study.json, space.yaml, best.yaml, a trial's step.json, a checkpoint folder, a file fetched from a
bucket) is written beside its place under a hidden name (``.<name>.<pid>.tmp``) and renamed into it:
a reader finds the old content or the new one whole, never part of one. A writer killed halfway
leaves only the hidden name behind (tune.report clears a trial's leftover checkpoint copies).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["leftovers", "staged", "write_atomic"]

_SUFFIX = ".tmp"


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A hidden sibling of ``path`` to write a file or a folder into; renamed over ``path`` when the
    block ends without an error, removed otherwise. A folder replaces a folder already at ``path``
    (the same checkpoint written again): removed first, as a rename cannot replace a non-empty folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_SUFFIX}")
    _remove(tmp)  # (a leftover of a killed writer that had the same pid)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace ``path``'s content with ``text`` (UTF-8) by a rename (:func:`staged`). ``durable``: on
    disk before the rename (fsync), so a power cut cannot leave an empty file either; a file rewritten
    every second for a live view (step.json) skips it."""
    with staged(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())


def leftovers(folder: Path, prefix: str = "") -> list[Path]:
    """What killed writers left in ``folder`` of the files or folders named ``prefix*`` (never read)."""
    return sorted(folder.glob(f".{prefix}*{_SUFFIX}"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
