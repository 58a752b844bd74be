"""What a study leaves behind at the end of a driver run, read from its record: the ranked trials
(a table and ``summary.csv``), ``best.yaml`` and the best checkpoint, plots, ASHA's rung fidelity,
the closed MLflow mirror, and bounded disk use (:func:`finish_study`)."""

from __future__ import annotations

import csv
import math
import os
import shutil
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minimind_train.checkpoint import MODEL_FILE, STATE_FILE, drop_resume_state
from minimind_train.config import run_config_to_dict

from .mirror import Mirror, warn_on_failure
from .record import FINISHED, StudyRecord
from .space import StudySpec
from .storage import CHECKPOINT_PREFIX, StudyPaths

__all__ = [
    "RUNG_FIDELITY_WARNING",
    "Finalist",
    "RungFidelity",
    "TrialSummary",
    "dir_bytes",
    "finish_study",
    "format_table",
    "prune_resume_state",
    "rank_finalists",
    "rung_fidelity",
    "summarize_finalists",
    "summarize_trials",
    "write_best_yaml",
    "write_finalists_csv",
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


@dataclass(frozen=True)
class Finalist:
    """A config re-checked across seeds (``tune.finalists``): search trial ``number`` and its finalist
    trials. ``values`` are the best objective per seed, in ``seeds`` order (the search trial's first);
    a diverged or failed seed counts as the worst value, so an unstable config ranks last."""

    trial_id: str
    number: int
    params: dict[str, Any]
    seeds: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (0 for one seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 and math.isfinite(self.mean) else 0.0


def rank_finalists(finalists: Sequence[Finalist], mode: str) -> list[Finalist]:
    """Best mean objective first: the study's answer when finalists ran."""
    return sorted(finalists, key=lambda f: f.mean if mode == "min" else -f.mean)


def summarize_finalists(record: StudyRecord, summaries: Sequence[TrialSummary], base_seed: int,
                        mode: str) -> list[Finalist]:
    """The configs with finished finalist trials, ranked (:func:`rank_finalists`)."""
    by_number = {s.number: s for s in summaries}
    extra: dict[int, list[tuple[int, float]]] = {}
    for t in record.trials():
        s = by_number.get(t.number)
        if t.finalist_of is not None and t.seed is not None and s is not None and s.status in FINISHED:
            value = s.best_value if s.status == "completed" and math.isfinite(s.best_value) else _worst(mode)
            extra.setdefault(t.finalist_of, []).append((t.seed, value))
    out = []
    for number, seeded in extra.items():
        base = by_number[number]
        pairs = [(base_seed, base.best_value), *sorted(seeded)]
        out.append(Finalist(base.trial_id, number, base.params, tuple(p for p, _ in pairs),
                            tuple(v for _, v in pairs)))
    return rank_finalists(out, mode)


def write_finalists_csv(path: Path, finalists: Sequence[Finalist], metric: str) -> Path:
    """``finalists.csv``: trial, its config values, seeds, mean, std and the per-seed values."""
    keys = sorted({k for f in finalists for k in f.params})
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", *keys, "seeds", f"mean_{metric}", f"std_{metric}", f"{metric}_per_seed"])
        for f in finalists:
            w.writerow([f.trial_id, *(f.params.get(k) for k in keys), " ".join(map(str, f.seeds)),
                        f.mean, f.std, " ".join(f"{v:.6g}" for v in f.values)])
    return path


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


def write_best_yaml(path: Path, spec: StudySpec, best: TrialSummary, finalist: Finalist | None = None) -> Path:
    """The complete run config of the best trial, runnable by ``python -m minimind_train.sft``; its header
    records the trial's value and, when finalists ran, the config's mean ± std over seeds."""
    cfg = spec.run.with_overrides(best.params)
    body = yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    head = (f"# Best trial {best.trial_id} of study from {spec.source}: "
            f"{spec.tune.metric} {best.best_value:.6f} at epoch {best.best_epoch}.\n")
    if finalist is not None:
        head += (f"# Over seeds {', '.join(map(str, finalist.seeds))}: mean {spec.tune.metric} "
                 f"{finalist.mean:.6f} ± {finalist.std:.6f} (the best mean of the finalists).\n")
    head += f"# Run it alone: python -m minimind_train.sft --config {path.name}\n"
    path.write_text(head + body, encoding="utf-8")
    return path


def write_summary_csv(path: Path, summaries: Sequence[TrialSummary], metric: str,
                      finalists: Mapping[int, tuple[int, int]] | None = None) -> Path:
    """``summary.csv``: every trial ranked; a finalist's row says whose config it is and its seed
    (``finalists``: trial number -> (search trial number, seed))."""
    keys = sorted({k for s in summaries for k in s.params})
    seeded = dict(finalists or {})
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "trial_id", "status", "epochs", f"best_{metric}", "best_epoch",
                    "checkpoint", "error", "finalist_of", "seed"] + keys)
        for i, s in enumerate(summaries, 1):
            of, seed = seeded.get(s.number, (None, None))
            w.writerow([i, s.trial_id, s.status, s.epochs, s.best_value, s.best_epoch, s.checkpoint or "",
                        s.error, "" if of is None else f"t{of:03d}", "" if seed is None else seed]
                       + [s.params.get(k, "") for k in keys])
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


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def finish_study(spec: StudySpec, paths: StudyPaths, record: StudyRecord, mirror: Mirror, status: str) -> int:
    """Write and print the study's outputs from its record; returns the driver's exit status
    (0: a trial completed, 1: none did or the disk is full)."""
    from .plots import plot_study  # (matplotlib: only when a study ends)

    t = spec.tune
    study_dir = paths.local_dir
    summaries = summarize_trials(record, t.metric, t.mode)
    seeded = {r.number: (r.finalist_of, r.seed) for r in record.trials() if r.finalist_of is not None}
    search = [s for s in summaries if s.number not in seeded]  # (finalists are seeds of search configs)
    unfinished = [s for s in summaries if s.status in ("interrupted", "running", "failed")]
    print()
    print(format_table(search, t.metric))
    eligible = [s for s in search if s.status == "completed" and math.isfinite(s.best_value)]
    eligible = eligible or [s for s in search if s.status == "stopped_early" and math.isfinite(s.best_value)]
    artifacts: dict[str, Path] = {}
    finalists = summarize_finalists(record, summaries, spec.run.train.seed, t.mode)
    study_metrics: dict[str, float] = {}
    if finalists:
        print(f"\nfinalists: the top configs trained again with other seeds, best mean {t.metric} first")
        for f in finalists:
            mean = f"mean {f.mean:.4f} ± {f.std:.4f}" if math.isfinite(f.mean) else "unstable (a seed diverged)"
            print(f"  {f.trial_id}  {mean}  seeds {' '.join(map(str, f.seeds))}: "
                  + " ".join(f"{v:.4f}" for v in f.values))
        artifacts["finalists.csv"] = write_finalists_csv(study_dir / "finalists.csv", finalists, t.metric)
        if math.isfinite(finalists[0].mean):
            study_metrics = {f"best_mean_{t.metric}": finalists[0].mean, f"best_std_{t.metric}": finalists[0].std}
            eligible = [s for s in search if s.number == finalists[0].number]
        else:
            print("warning: every finalist config diverged or failed with another seed: no config is stable "
                  "across seeds; best.yaml is the best single trial's config (lower the learning rate range "
                  "before trusting it)", file=sys.stderr)
            finalists = []
    best = eligible[0] if eligible else None
    best_model: Path | None = None
    if best is not None:
        artifacts["best.yaml"] = write_best_yaml(study_dir / "best.yaml", spec, best,
                                                 finalists[0] if finalists else None)
        if best.checkpoint is not None and paths.is_local:
            best_model = Path(best.checkpoint) / "model.pth"
        elif best.checkpoint is not None:  # in the bucket: MLflow logs (and the user gets) a local copy
            from .storage import fetch_file

            best_model = fetch_file(paths.uri, f"{best.checkpoint}/model.pth", study_dir / "best" / "model.pth")
        if best_model is not None:
            artifacts["best/model.pth"] = best_model
    artifacts["summary.csv"] = write_summary_csv(study_dir / "summary.csv", summaries, t.metric, seeded)
    plots = plot_study(record.study, study_dir / "plots", metric=t.metric, best_trial=best.number if best else None)
    artifacts.update({f"plots/{p.name}": p for p in plots.values()})
    study_metrics.update(_print_rung_fidelity(spec, search))
    warn_on_failure(lambda: mirror.finish(status if best is not None else "FAILED",
                                          best=record.trial(best.number) if best is not None else None,
                                          best_value=best.best_value if best else None,
                                          best_epoch=best.best_epoch if best else None, artifacts=artifacts,
                                          study_metrics=study_metrics))
    freed = prune_resume_state(record, summaries, t.keep_top_trials)  # (local trial folders only)
    print()
    if best is not None and best.checkpoint is None:
        print(f"warning: no checkpoint of trial {best.trial_id} is left; best.yaml still retrains its config",
              file=sys.stderr)
    if best is not None and best.checkpoint_epoch not in (None, best.best_epoch):
        print(f"warning: the checkpoint of trial {best.trial_id}'s best epoch {best.best_epoch} is gone; "
              f"best/model.pth is its epoch {best.checkpoint_epoch} checkpoint", file=sys.stderr)
    sign = 1 if t.mode == "min" else -1
    for s in unfinished:
        if best is not None and math.isfinite(s.best_value) and sign * s.best_value < sign * best.best_value:
            print(f"note: unfinished trial {s.trial_id} already reached {t.metric} {s.best_value:.4f} after "
                  f"{s.epochs} epoch(s): --resume finishes it")
    if best is not None:
        mean = f"; mean over {len(finalists[0].seeds)} seeds {finalists[0].mean:.4f} ± {finalists[0].std:.4f}" \
            if finalists else ""
        print(f"best: trial {best.trial_id}  {t.metric} {best.best_value:.4f} (epoch {best.best_epoch}){mean}")
        for k, v in best.params.items():
            print(f"  {k}: {v}")
        print(f"best config: {study_dir / 'best.yaml'}")
        if best_model is not None:
            print(f"best fp16 checkpoint: {best_model}"
                  + ("" if paths.is_local else f" (copied from {best.checkpoint}/model.pth)"))
    print(f"disk: {_human_bytes(dir_bytes(study_dir))} in {study_dir} "
          f"({_human_bytes(freed)} of resume state pruned; top {t.keep_top_trials} trials keep theirs)")
    print(f"compare trials: python -m tune.ui --tracking-uri {mirror.tracking_uri}")
    if unfinished:
        print(f"{len(unfinished)} trial(s) unfinished ({', '.join(s.trial_id for s in unfinished)}): "
              f"--resume continues them", file=sys.stderr)
        for s in unfinished:
            if s.error:
                print(f"  {s.trial_id}: {s.status}: {s.error}", file=sys.stderr)
    full = [s for s in unfinished if "No space left on device" in s.error or "disk is full" in s.error]
    if full:
        print(f"error: the disk holding {study_dir} is full: {len(full)} trial(s) could not save "
              "(finished trials are kept); free space, then continue with --resume", file=sys.stderr)
        return 1
    if best is None:
        print("error: no trial completed:", file=sys.stderr)
        for s in summaries:
            print(f"  {s.trial_id}: {s.status} {s.error}", file=sys.stderr)
        return 1
    return 0


def _print_rung_fidelity(spec: StudySpec, summaries: Sequence[TrialSummary]) -> dict[str, float]:
    """Did ASHA's early rankings predict the final one? (Spearman per rung, completed trials.)
    Returns ``{"rung_fidelity_epoch_E": rho}`` for the MLflow parent run."""
    sched = spec.tune.scheduler
    rungs = [r for r in sched.rungs if r < spec.run.train.epochs] if sched.type == "asha" else []
    if not rungs:
        return {}
    found = rung_fidelity(summaries, rungs)
    shown = ", ".join(f"epoch {f.epoch}: {f.spearman:+.2f} (n={f.trials})" if f.spearman is not None
                      else f"epoch {f.epoch}: n/a ({f.trials} completed trials, "
                      + ("needs 3)" if f.trials < 3 else "their values tie)") for f in found)
    print(f"rung fidelity (Spearman of each rung's ranking with the final one): {shown}")
    for f in found:
        if f.spearman is not None and f.spearman < RUNG_FIDELITY_WARNING:
            print(f"warning: at epoch {f.epoch} the trials ranked unlike at their end ({f.spearman:+.2f} < "
                  f"{RUNG_FIDELITY_WARNING}): ASHA may have stopped configs that would have ended best; raise "
                  "tune.scheduler.grace_period or lower reduction_factor", file=sys.stderr)
    return {f"rung_fidelity_epoch_{f.epoch}": f.spearman for f in found if f.spearman is not None}
