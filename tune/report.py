"""What a finished study leaves behind: ranked trials, ``best.yaml``, a CSV, bounded disk use."""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minimind_train.checkpoint import MODEL_FILE, STATE_FILE, drop_resume_state
from minimind_train.config import run_config_to_dict

from .record import CHECKPOINT_PREFIX, FINISHED, StudyRecord
from .space import StudySpec

__all__ = [
    "RUNG_FIDELITY_WARNING",
    "RungFidelity",
    "TrialSummary",
    "dir_bytes",
    "format_table",
    "prune_resume_state",
    "rung_fidelity",
    "summarize_trials",
    "write_best_yaml",
    "write_summary_csv",
]


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    name: str
    status: str  # a tune.record status: completed | stopped_early | diverged | failed | interrupted | running
    epochs: int
    best_value: float  # the study metric at the trial's best epoch (inf/-inf when none)
    best_epoch: int
    params: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, metric)
    checkpoint: str | None = None  # folder of the best checkpoint (a path on the runs' filesystem)
    error: str = ""
    number: int = -1  # the record's trial number
    checkpoint_epoch: int | None = None  # the epoch of ``checkpoint`` (best_epoch unless that one is gone)


def _worst(mode: str) -> float:
    return math.inf if mode == "min" else -math.inf


def summarize_trials(record: StudyRecord, metric: str, mode: str) -> list[TrialSummary]:
    """Ranked summaries of the record's trials, best first: completed trials by their best epoch, then
    trials stopped early, then unfinished ones, diverged and failed last."""
    out: list[TrialSummary] = []
    for t in record.trials():
        curve = t.curve(metric)
        finite = [(e, v) for e, v in curve if math.isfinite(v)]
        if finite:
            pick = min if mode == "min" else max
            best_epoch, best_value = pick(finite, key=lambda ev: ev[1])
        else:
            best_epoch, best_value = 0, _worst(mode)
        checkpoint, checkpoint_epoch = None, None
        if finite:
            metas = record.checkpoint_metas(t.number)
            if best_epoch in metas:  # the best epoch's own weights, when kept
                checkpoint, checkpoint_epoch = metas[best_epoch][0], best_epoch
            elif (checkpoint := record.best_checkpoint(t.number, metric, mode)) is not None:
                checkpoint_epoch = next(e for e, (path, _) in metas.items() if path == checkpoint)
        out.append(TrialSummary(
            trial_id=t.name, name=t.name, status=t.status, epochs=max(t.epochs, default=0),
            best_value=best_value, best_epoch=best_epoch, params=t.params, curve=curve,
            checkpoint=checkpoint, checkpoint_epoch=checkpoint_epoch, error=t.error, number=t.number,
        ))
    sign = 1.0 if mode == "min" else -1.0
    order = {"completed": 0, "stopped_early": 1, "interrupted": 2, "running": 2, "failed": 3, "diverged": 3,
             "abandoned": 4}
    out.sort(key=lambda s: (order.get(s.status, 3), sign * s.best_value, s.number))
    return out


# Below this Spearman correlation a rung's ranking says little about the final one (documented in the
# README): early stopping may then drop configs that would have ended best.
RUNG_FIDELITY_WARNING = 0.5


@dataclass(frozen=True)
class RungFidelity:
    """How well the ranking of trials at an ASHA rung predicts their final ranking."""

    epoch: int
    trials: int  # completed trials with a value at this rung
    spearman: float | None  # None with fewer than 3 such trials


def rung_fidelity(summaries: Sequence[TrialSummary], rungs: Sequence[float]) -> list[RungFidelity]:
    """Spearman rank correlation, per rung epoch, between the trials' objective at that epoch and at
    their last epoch, over the trials that completed (the ones that reached the budget). Ties take
    their average rank (pandas ``rank``)."""
    import pandas as pd

    completed = [s for s in summaries if s.status == "completed" and s.curve and math.isfinite(s.curve[-1][1])]
    out = []
    for rung in rungs:
        epoch = int(rung)
        pairs = [(dict(s.curve).get(epoch), s.curve[-1][1]) for s in completed]
        pairs = [(a, b) for a, b in pairs if a is not None and math.isfinite(a)]
        rho = None
        if len(pairs) >= 3:
            at_rung, final = (pd.Series(x) for x in zip(*pairs))
            value = at_rung.rank().corr(final.rank())
            rho = None if math.isnan(value) else float(value)
        out.append(RungFidelity(epoch=epoch, trials=len(pairs), spearman=rho))
    return out


def format_table(summaries: Sequence[TrialSummary], metric: str, top: int = 10) -> str:
    if not summaries:
        return "(no trials)"
    keys = sorted({k for s in summaries for k in s.params})
    header = ["rank", "trial", "status", "epochs", f"best {metric}"] + keys
    rows = []
    for i, s in enumerate(summaries[:top], 1):
        vals = [_fmt(s.params.get(k)) for k in keys]
        rows.append([str(i), s.trial_id, s.status, str(s.epochs),
                     f"{s.best_value:.4f}" if math.isfinite(s.best_value) else "-"] + vals)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_best_yaml(path: Path, spec: StudySpec, best: TrialSummary) -> Path:
    """The complete run config of the best trial, runnable by ``python -m minimind_train.sft``."""
    cfg = spec.run.with_overrides(best.params)
    body = yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    head = (f"# Best trial {best.trial_id} of study from {spec.source}: "
            f"{spec.tune.metric} {best.best_value:.6f} at epoch {best.best_epoch}.\n"
            f"# Run it alone: python -m minimind_train.sft --config {path.name}\n")
    path.write_text(head + body, encoding="utf-8")
    return path


def write_summary_csv(path: Path, summaries: Sequence[TrialSummary], metric: str) -> Path:
    keys = sorted({k for s in summaries for k in s.params})
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "trial_id", "status", "epochs", f"best_{metric}", "best_epoch",
                    "checkpoint", "error"] + keys)
        for i, s in enumerate(summaries, 1):
            w.writerow([i, s.trial_id, s.status, s.epochs, s.best_value, s.best_epoch,
                        s.checkpoint or "", s.error] + [s.params.get(k, "") for k in keys])
    return path


def prune_resume_state(record: StudyRecord, summaries: Sequence[TrialSummary], keep_top: int) -> int:
    """Bound a study's disk use; returns bytes freed.

    The ``keep_top`` best trials keep everything, and so does every unfinished trial (``--resume``
    continues it). Every other finished trial keeps only the fp16 weights of its best checkpoint.
    """
    freed = 0
    for s in summaries[keep_top:]:
        if s.status not in FINISHED:
            continue
        for trial_dir in record.trial_dirs(s.number):
            for ckpt in trial_dir.glob(f"{CHECKPOINT_PREFIX}*"):
                if str(ckpt) == s.checkpoint:
                    freed += drop_resume_state(ckpt)
                elif (ckpt / MODEL_FILE).exists() or (ckpt / STATE_FILE).exists():
                    freed += dir_bytes(ckpt)
                    shutil.rmtree(ckpt, ignore_errors=True)
    return freed


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total
