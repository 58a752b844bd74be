"""Files written whole or not at all: the one write-and-rename of tune/.

Whatever a reader, or the next driver after a kill at any moment, may open while it is being written
(study.json, space.yaml, best.yaml, a trial's step.json, a file fetched from a bucket) is written beside
its place under a hidden name (``.<name>.<pid>.tmp``) and renamed into it: a reader finds the old content
or the new one whole, never part of one. A writer killed halfway leaves only the hidden name behind, as
does a trial's checkpoint folder (:func:`minimind_train.checkpoint.save_checkpoint`, which names it
alike; tune.report clears those).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["leftovers", "staged", "write_atomic"]

_SUFFIX = ".tmp"


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A hidden sibling of the file ``path`` to write into; renamed over ``path`` when the block ends
    without an error, removed otherwise."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_SUFFIX}")
    tmp.unlink(missing_ok=True)  # (a leftover of a killed writer that had the same pid)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
