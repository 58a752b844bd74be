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

from minimind_train.checkpoint import MODEL_FILE, STATE_FILE, drop_resume_state, read_meta
from minimind_train.config import run_config_to_dict

from .space import StudySpec, apply_params

__all__ = [
    "TrialSummary",
    "dir_bytes",
    "format_table",
    "prune_resume_state",
    "remove_lost_trials",
    "summarize_trials",
    "write_best_yaml",
    "write_summary_csv",
]


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    name: str
    status: str  # completed | stopped_early | failed
    epochs: int
    best_value: float  # the study metric at the trial's best epoch (inf/-inf when none)
    best_epoch: int
    params: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, metric)
    checkpoint: Path | None = None  # folder of the best checkpoint
    error: str = ""


def _worst(mode: str) -> float:
    return math.inf if mode == "min" else -math.inf


def summarize_trials(results: Sequence[Any], spec: StudySpec, params_of: Any) -> list[TrialSummary]:
    """Ranked summaries (best first) from Ray ``Result`` objects.

    ``params_of(config) -> dict`` maps a trial's Ray config to dotted-path params.
    """
    metric, mode = spec.tune.metric, spec.tune.mode
    planned = spec.run.train.epochs
    out: list[TrialSummary] = []
    for r in results:
        df = r.metrics_dataframe
        curve: list[tuple[int, float]] = []
        if df is not None and metric in df.columns:
            # A restored trial may report an epoch twice; the later report wins.
            by_epoch = {int(e): float(v) for e, v in zip(df["training_iteration"], df[metric])}
            curve = sorted(by_epoch.items())
        finite = [(e, v) for e, v in curve if math.isfinite(v)]
        if finite:
            pick = min if mode == "min" else max
            best_epoch, best_value = pick(finite, key=lambda ev: ev[1])
        else:
            best_epoch, best_value = 0, _worst(mode)
        epochs = int((r.metrics or {}).get("training_iteration", 0))
        if r.error is not None:
            status = "failed"
        elif epochs < planned:
            status = "stopped_early"
        else:
            status = "completed"
        checkpoint = None
        if finite:
            try:
                best_ckpt = r.get_best_checkpoint(metric, mode)
            except Exception:  # noqa: BLE001 - Ray raises various errors when no checkpoint was kept
                best_ckpt = None
            if best_ckpt is not None:
                checkpoint = Path(best_ckpt.path)
            if checkpoint is None or not (checkpoint / MODEL_FILE).is_file():
                checkpoint = _best_kept_checkpoint(Path(r.path), metric, mode)
        trial_id = str((r.metrics or {}).get("trial_id") or Path(r.path).name)
        out.append(TrialSummary(
            trial_id=trial_id, name=Path(r.path).name, status=status, epochs=epochs,
            best_value=best_value, best_epoch=best_epoch, params=params_of(r.config or {}),
            curve=curve, checkpoint=checkpoint,
            error=(str(r.error).strip().splitlines() or [""])[-1] if r.error is not None else "",
        ))
    sign = 1.0 if mode == "min" else -1.0
    out.sort(key=lambda s: (s.status == "failed", sign * s.best_value))
    return out


def _best_kept_checkpoint(trial_dir: Path, metric: str, mode: str) -> Path | None:
    """The best checkpoint on disk by its own meta.json, when Ray's record names a deleted one
    (a saved state older than its checkpoint retention, after a driver was killed)."""
    scored = []
    for folder in trial_dir.glob("checkpoint_*"):
        try:
            value = float(read_meta(folder)["metrics"][metric])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (folder / MODEL_FILE).is_file() and math.isfinite(value):
            scored.append((value if mode == "min" else -value, folder.name, folder))
    return min(scored)[2] if scored else None


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
    cfg = apply_params(spec.run, best.params)
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


def prune_resume_state(summaries: Sequence[TrialSummary], keep_top: int) -> int:
    """Bound a finished study's disk use; returns bytes freed.

    The ``keep_top`` best trials keep everything. Every other trial keeps only the fp16 weights of
    its best checkpoint: other checkpoint folders go, and so does the resume state of the best one.
    """
    freed = 0
    for s in summaries[keep_top:]:
        trial_dir = s.checkpoint.parent if s.checkpoint is not None else None
        if trial_dir is None:
            continue
        for ckpt in trial_dir.glob("checkpoint_*"):
            if ckpt == s.checkpoint:
                freed += drop_resume_state(ckpt)
            elif (ckpt / MODEL_FILE).exists() or (ckpt / STATE_FILE).exists():
                freed += dir_bytes(ckpt)
                shutil.rmtree(ckpt, ignore_errors=True)
    return freed


def remove_lost_trials(study_dir: Path, summaries: Sequence[TrialSummary]) -> int:
    """Delete trial folders the study does not know; returns bytes freed.

    A driver killed after a trial started but before Ray's next experiment snapshot leaves that
    trial's folder (checkpoints included) behind, while ``--resume`` never sees the trial again.
    """
    known = {s.name for s in summaries}
    freed = 0
    for folder in study_dir.glob("trial_*"):
        if folder.is_dir() and folder.name not in known:
            freed += dir_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
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
