"""``--restart``: the old study is moved aside, not deleted, until the new one has a result.

Every input is checked before the move (tune.preflight). The old study is deleted once the new
study's first trial has reported (:class:`RestartCleanup`), and comes back when the new one ends
without any result. A driver killed in between leaves ``.<name>.replaced-<time>`` beside the study:
the next start finishes the job (:func:`finish_pending_restart`).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from ray.tune import Callback

from .mirror import delete_study_runs, warn_on_failure
from .study import MANIFEST_FILE, Manifest, Study, StudyError
from .tracking import resolve_tracking_uri, sqlite_db_path

__all__ = ["RestartCleanup", "finish_pending_restart", "move_aside", "settle"]


def move_aside(study_dir: Path) -> Path:
    """Move the study to ``.<name>.replaced-<time>`` beside it; returns where."""
    aside = study_dir.with_name(f".{study_dir.name}.replaced-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    os.replace(study_dir, aside)  # (a move, not a write: tune.atomic is for writes)
    print(f"--restart: the old study is kept at {aside} until the new one has a result")
    return aside


def settle(aside: Path, study_dir: Path, tracking_uri: str | None) -> None:
    """End a ``--restart``: delete the old study when the new one has a result, else put it back."""
    if not aside.exists():
        return
    has_result = False  # (no new study: a study is created whole, by a rename, or not at all)
    if study_dir.exists():
        try:
            has_result = any(t.epochs for t in Study.open(study_dir).trials())
        except StudyError as exc:  # nothing is deleted that could not be checked: both stay
            print(f"--restart: neither study deleted: the new one cannot be read ({exc}); the old one is "
                  f"kept at {aside}", file=sys.stderr)
            return
    if has_result:
        delete_replaced(aside, study_dir, tracking_uri)
        return
    if study_dir.exists():
        shutil.rmtree(study_dir)  # created by the restart, without any result
    os.replace(aside, study_dir)
    # (the driver's last line offers --resume: that continues the old study, not the restart the user asked for)
    print(f"--restart: no trial of the new study reported; the old study is back at {study_dir}, unchanged: "
          "run the same --restart again to replace it", file=sys.stderr)


def finish_pending_restart(study_dir: Path) -> None:
    """Complete a ``--restart`` whose driver was killed (what that driver would have done)."""
    pattern = re.compile(rf"\.{re.escape(study_dir.name)}\.replaced-\d{{8}}-\d{{6}}")
    for aside in sorted(p for p in study_dir.parent.glob(".*.replaced-*") if pattern.fullmatch(p.name)):
        settle(aside, study_dir, tracking_uri=None)


def delete_replaced(aside: Path, study_dir: Path, tracking_uri: str | None) -> None:
    """Delete the study ``--restart`` replaced: its folder, and its runs in a store outside it
    (``tracking_uri``; None: the store the old study's own space names, as a start that finishes a
    killed ``--restart`` has no other)."""
    if not aside.exists():
        return
    try:
        old = Manifest.from_json((aside / MANIFEST_FILE).read_text(encoding="utf-8"), aside)
        old_id: str | None = old.study_id
        if tracking_uri is None:
            tracking_uri = resolve_tracking_uri((old.spec.get("mlflow") or {}).get("tracking_uri"), study_dir)
    except (OSError, StudyError):
        old_id = None  # not a study of this version: none of its runs carries a study id
    db = sqlite_db_path(tracking_uri) if tracking_uri else None
    own_store = db is None or db.parent == study_dir  # (the old runs went aside with the folder)
    if old_id is not None and not own_store:
        warn_on_failure(lambda: delete_study_runs(tracking_uri, old_id))
    shutil.rmtree(aside, ignore_errors=True)
    print(f"--restart: the new study has a result; deleted the old one ({aside})")


class RestartCleanup(Callback):
    """Deletes the study ``--restart`` replaced once the new one's first trial has reported."""

    def __init__(self, aside: Path, study_dir: Path, tracking_uri: str) -> None:
        self.aside, self.study_dir, self.tracking_uri = aside, study_dir, tracking_uri

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        delete_replaced(self.aside, self.study_dir, self.tracking_uri)
