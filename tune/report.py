"""What a study leaves behind at the end of a driver run, read from its record: the ranked trials
(a table and ``summary.csv``), ``best.yaml`` and the best checkpoint, plots, ASHA's rung fidelity,
the closed MLflow mirror, and bounded disk use (:func:`finish_study`)."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.filesize import decimal as human_bytes

from minimind_train.checkpoint import MODEL_FILE, STATE_FILE, drop_resume_state
from minimind_train.config import run_config_to_dict

from .atomic import leftovers, write_atomic
from .interrupts import signals_deferred
from .mirror import Mirror, warn_on_failure
from .objective import Objective
from .space import StudySpec
from .status import FINISHED, RESUMABLE, TrialStatus
from .storage import CHECKPOINT_PREFIX, StudyPaths, fetch_file
from .study import Finalist, Study, TrialRecord, answer, evaluation_name, finalist_configs, rank_key

__all__ = [
    "RUNG_FIDELITY_WARNING", "RungFidelity", "TrialSummary", "dir_bytes", "finish_study", "format_table",
    "prune_resume_state", "rung_fidelity", "summarize_trials", "write_best_yaml", "write_finalists_csv", "write_summary_csv",
]


@dataclass(frozen=True)
class TrialSummary:
    """A trial as the end report ranks it: its record, the evaluation index and value of its best objective
    (``(0, objective.worst)`` when none is finite) and the checkpoint that stands for it."""

    trial: TrialRecord
    best_epoch: int
    best_value: float
    checkpoint_epoch: int | None = None  # the evaluation of ``checkpoint``: best_epoch's unless that one is gone
    checkpoint: str | None = None  # folder of its best checkpoint still whole (a path on the runs' filesystem)

    @property
    def epochs(self) -> int:
        """The last evaluation recorded (0: none)."""
        return max(self.trial.epochs, default=0)


def summarize_trials(record: Study, objective: Objective) -> list[TrialSummary]:
    """Ranked summaries of the record's trials, best first (:func:`tune.study.rank_key`): by status
    (completed, stopped early, unfinished, then no better than untrained, diverged and failed), then by
    the objective at the trial's best epoch."""
    out = []
    for t in record.trials():
        best_epoch, best_value = t.best(objective)
        # The best kept checkpoint by the record's index: the best epoch's own weights, unless deleted.
        found = record.best_checkpoint(t, objective) if math.isfinite(best_value) else None
        out.append(TrialSummary(t, best_epoch, best_value, *(found or ())))
    return sorted(out, key=lambda s: (*rank_key(s.trial.status, s.best_value, objective), s.trial.number))


# Below this Spearman correlation a rung's ranking says little about the final one (documented in the
# README): early stopping may then drop configs that would have ended best.
RUNG_FIDELITY_WARNING = 0.5


@dataclass(frozen=True)
class RungFidelity:
    """How well the ranking of trials at an ASHA rung predicts their final ranking."""

    epoch: int  # the rung: an evaluation index (tune.study.evaluation_index; the epoch with one per epoch)
    trials: int  # completed trials with a value at this rung
    spearman: float | None  # None with fewer than 3 such trials


def rung_fidelity(trials: Iterable[TrialRecord], metric: str, rungs: Sequence[float]) -> list[RungFidelity]:
    """Spearman rank correlation, per rung (an evaluation index), between the trials' ``metric`` at that
    rung and at their last evaluation, over the trials that completed (the ones that reached the budget).
    A trial's value at a rung is its first at or past it, the one ASHA judged (an epoch with fewer steps
    than evaluations skips indices). Ties take their average rank (pandas ``corr("spearman")``)."""
    import pandas as pd

    curves = [curve for t in trials if t.status == TrialStatus.COMPLETED
              and (curve := t.curve(metric)) and math.isfinite(curve[-1][1])]
    out = []
    for epoch in map(int, rungs):
        pairs = [(next((v for e, v in curve if e >= epoch), math.nan), curve[-1][1]) for curve in curves]
        pairs = [pair for pair in pairs if math.isfinite(pair[0])]
        rho = pd.DataFrame(pairs).corr("spearman").iat[0, 1] if len(pairs) >= 3 else math.nan
        out.append(RungFidelity(epoch, len(pairs), None if math.isnan(rho) else float(rho)))
    return out


def _param_keys(params: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted({k for p in params for k in p})


def _write_csv(path: Path, rows: Iterable[Sequence[Any]]) -> Path:
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    write_atomic(path, text.getvalue())  # (never half a file, whenever the driver is killed)
    return path


def write_finalists_csv(path: Path, finalists: Sequence[Finalist], metric: str) -> Path:
    """``finalists.csv``: trial, its config values, seeds, mean, std and the per-seed values."""
    keys = _param_keys(f.params for f in finalists)
    return _write_csv(path, [
        ["trial", *keys, "seeds", f"mean_{metric}", f"std_{metric}", f"{metric}_per_seed"],
        *([f.trial_id, *(f.params.get(k) for k in keys), " ".join(map(str, f.seeds)), f.mean, f.std,
           " ".join(f"{v:.6g}" for v in f.values)] for f in finalists)])


def write_summary_csv(path: Path, summaries: Sequence[TrialSummary], metric: str, evals_per_epoch: int = 1) -> Path:
    """``summary.csv``: every trial ranked; a finalist's row names the search trial whose config it
    trains again (``finalist_of``) and its ``seed``. Its ``epochs``/``best_epoch`` columns are
    ``evaluations``/``best_evaluation`` (evaluation indices) with evaluations inside an epoch."""
    keys = _param_keys(s.trial.params for s in summaries)
    done, best = ("epochs", "best_epoch") if evals_per_epoch == 1 else ("evaluations", "best_evaluation")
    return _write_csv(path, [  # (None is an empty cell)
        ["rank", "trial_id", "status", done, f"best_{metric}", best, "checkpoint", "error",
         "finalist_of", "seed", *keys],
        *([i, s.trial.name, s.trial.status, s.epochs, s.best_value, s.best_epoch, s.checkpoint, s.trial.error,
           None if s.trial.finalist_of is None else f"t{s.trial.finalist_of:03d}", s.trial.seed,
           *(s.trial.params.get(k) for k in keys)]
          for i, s in enumerate(summaries, 1))])


def format_table(summaries: Sequence[TrialSummary], metric: str, top: int = 10, evals_per_epoch: int = 1) -> str:
    """The ``top`` trials as a plain-text table, columns aligned: rank, trial, status, epochs (with
    evaluations inside an epoch: evaluations and the epochs they make, ``5 (0.625)``), best objective and
    the searched values."""
    if not summaries:
        return "(no trials)"
    keys, n = _param_keys(s.trial.params for s in summaries), evals_per_epoch
    rows = [["rank", "trial", "status", "epochs" if n == 1 else "evaluations (epochs)", f"best {metric}", *keys]]
    rows += [[str(i), s.trial.name, s.trial.status, str(s.epochs) if n == 1 else f"{s.epochs} ({s.epochs / n:g})",
              f"{s.best_value:.4f}" if math.isfinite(s.best_value) else "-",
              *(f"{v:.4g}" if isinstance(v := s.trial.params.get(k), float) else str(v) for k in keys)]
             for i, s in enumerate(summaries[:top], 1)]
    widths = [max(map(len, column)) for column in zip(*rows)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def write_best_yaml(path: Path, spec: StudySpec, best: TrialSummary, finalist: Finalist | None = None) -> Path:
    """The complete run config of the best trial as it ran (``StudySpec.trial_run``: its thread count
    too), runnable by ``python -m minimind_train.sft``; its header records the trial's value and, when
    finalists ran, the config's mean ± std over seeds."""
    run = spec.trial_run.with_overrides(best.trial.params)
    body = yaml.safe_dump(run_config_to_dict(run), sort_keys=False, allow_unicode=True)
    head = (f"# Best trial {best.trial.name} of study from {spec.source}: {spec.tune.metric} {best.best_value:.6f} "
            f"at {evaluation_name(best.best_epoch, spec.run.train.evals_per_epoch)}.\n"
            f"# train.num_threads: {run.train.num_threads}, as the trial ran (its CPU share): on CPU a step's sums "
            "depend on the\n# thread count, so another count gives slightly other losses; on GPU it does not matter.\n")
    if finalist is not None:
        head += (f"# Over seeds {', '.join(map(str, finalist.seeds))}: mean {spec.tune.metric} "
                 f"{finalist.mean:.6f} ± {finalist.std:.6f} (the best mean of the finalists).\n")
    write_atomic(path, f"{head}# Run it alone: python -m minimind_train.sft --config {path.resolve()}\n{body}")
    return path


def prune_resume_state(record: Study, summaries: Sequence[TrialSummary], keep_top: int) -> int:
    """Bound a study's disk use; returns bytes freed.

    The ``keep_top`` best trials keep everything, and so does every unfinished trial (``--resume``
    continues it). Every other finished trial keeps only the fp16 weights of its best checkpoint. A
    finished trial's checkpoint folders that a killed worker left half written (:func:`tune.atomic.leftovers`
    of :func:`minimind_train.checkpoint.save_checkpoint`, never read) are deleted.
    """
    freed = 0
    for rank, s in enumerate(summaries):
        for trial_dir in record.trial_dirs(s.trial.number) if s.trial.status in FINISHED else []:
            doomed = list(leftovers(trial_dir, CHECKPOINT_PREFIX))
            for ckpt in trial_dir.glob(f"{CHECKPOINT_PREFIX}*") if rank >= keep_top else ():
                if str(ckpt) == s.checkpoint:
                    freed += drop_resume_state(ckpt)
                elif (ckpt / MODEL_FILE).exists() or (ckpt / STATE_FILE).exists():
                    doomed.append(ckpt)
            for path in doomed:
                freed += dir_bytes(path)
                shutil.rmtree(path, ignore_errors=True)
    return freed


def dir_bytes(path: Path) -> int:
    """Bytes in the files under ``path`` (one removed while counted counts 0)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _answer(search: Sequence[TrialSummary], finalists: Sequence[Finalist],
            objective: Objective) -> tuple[TrialSummary | None, Finalist | None]:
    """The study's answer (:func:`tune.study.answer`) as its summary, with the finalists' best config when
    that is the answer; prints the finalists."""
    if finalists:
        print(f"\nfinalists: the top configs trained again with other seeds, best mean {objective.metric} first")
        for f in finalists:
            mean = f"mean {f.mean:.4f} ± {f.std:.4f}" if math.isfinite(f.mean) else "unstable (a seed diverged)"
            print(f"  {f.trial_id}  {mean}  seeds {' '.join(map(str, f.seeds))}: "
                  + " ".join(f"{v:.4f}" for v in f.values))
        if not math.isfinite(finalists[0].mean):
            print("warning: every finalist config diverged or failed with another seed: no config is stable "
                  "across seeds; best.yaml is the best single trial's config (lower the learning rate range "
                  "before trusting it)", file=sys.stderr)
    best = answer([s.trial for s in search], objective, finalists)
    summary = next((s for s in search if best is not None and s.trial.number == best.number), None)
    return summary, next((f for f in finalists[:1] if math.isfinite(f.mean)), None)  # (then it is the answer)


def _best_model(paths: StudyPaths, best: TrialSummary) -> Path | None:
    """The best checkpoint's fp16 weights on this machine: from a bucket, a local copy (which MLflow logs)."""
    if best.checkpoint is None:
        return None
    if paths.is_local:
        return Path(best.checkpoint) / MODEL_FILE
    return fetch_file(paths.uri, f"{best.checkpoint}/{MODEL_FILE}", paths.local_dir / "best" / MODEL_FILE)


def finish_study(spec: StudySpec, paths: StudyPaths, record: Study, mirror: Mirror, status: str) -> int:
    """Write and print the study's outputs from its record; returns the driver's exit status
    (0: a trial completed, 1: none did or the disk is full)."""
    t, study_dir, per_epoch = spec.tune, paths.local_dir, spec.run.train.evals_per_epoch
    # The answer of what finished is written whole first: a Ctrl-C or SIGTERM during the report stops
    # the driver right after it (the plots, the MLflow parent's results and the pruning: on --resume).
    with signals_deferred():
        summaries = summarize_trials(record, t.objective)
        search = [s for s in summaries if s.trial.finalist_of is None]  # (finalists are seeds of search configs)
        print()
        print(format_table(search, t.metric, evals_per_epoch=per_epoch))
        finalists = finalist_configs([s.trial for s in summaries], t.objective, spec.run.train.seed)
        best, finalist = _answer(search, finalists, t.objective)
        artifacts: dict[str, Path] = {}
        if finalists:
            artifacts["finalists.csv"] = write_finalists_csv(study_dir / "finalists.csv", finalists, t.metric)
        if best is not None:
            artifacts["best.yaml"] = write_best_yaml(study_dir / "best.yaml", spec, best, finalist)
        artifacts["summary.csv"] = write_summary_csv(study_dir / "summary.csv", summaries, t.metric, per_epoch)
    # (matplotlib: only when a study ends, and after the answer: its import takes seconds on a busy machine,
    # in which a Ctrl-C right after the last trial's end would otherwise stop the driver before best.yaml)
    from .plots import plot_study

    best_model = None if best is None else _best_model(paths, best)
    if best_model is not None:
        artifacts["best/model.pth"] = best_model
    plots = plot_study(record.study, study_dir / "plots", metric=t.metric,
                       best_trial=None if best is None else best.trial.number)
    artifacts.update({f"plots/{p.name}": p for p in plots.values()})
    # (the mirror adds the answer and its mean over seeds)
    study_metrics = _print_rung_fidelity(spec, [s.trial for s in search])
    warn_on_failure(lambda: mirror.finish("FAILED" if best is None else status, artifacts=artifacts,
                                          study_metrics=study_metrics))
    freed = prune_resume_state(record, summaries, t.keep_top_trials)  # (local trial folders only)
    unfinished = [s for s in summaries if s.trial.status in RESUMABLE]
    print()
    if best is not None:
        _print_best(spec, paths, best, finalist, best_model, unfinished)
    print(f"disk: {human_bytes(dir_bytes(study_dir))} in {study_dir} "
          f"({human_bytes(freed)} of resume state pruned; top {t.keep_top_trials} trials keep theirs)")
    print(f"compare trials: python -m tune.ui --tracking-uri {mirror.tracking_uri}")
    budget = _budget_used_up(spec, paths, record)
    if best is not None and unfinished:
        print(f"{len(unfinished)} trial(s) unfinished ({', '.join(s.trial.name for s in unfinished)}): "
              + (budget or "--resume continues them"), *(f"  {_reason(s.trial, budget)}" for s in unfinished),
              sep="\n", file=sys.stderr)
    elif best is not None and budget and record.finished_count() < t.num_samples:
        print(f"note: {record.finished_count()} of {t.num_samples} trials ran: {budget}", file=sys.stderr)
    if full := [s for s in unfinished if "No space left on device" in s.trial.error or "disk is full" in s.trial.error]:
        print(f"error: the disk holding {study_dir} is full: {len(full)} trial(s) could not save "
              "(finished trials are kept); free space, then continue with --resume", file=sys.stderr)
        return 1
    if best is None:
        then = budget or ("--resume continues the unfinished ones" if unfinished else "")
        if learned_nothing := [s for s in search if s.trial.status == TrialStatus.NO_BETTER]:
            # Trials ran to their end and learned nothing: exporting one would hand over an untrained model.
            head = (f"error: no trial beat the untrained model: {len(learned_nothing)} trial(s) ended no better "
                    "than before training; no best.yaml or checkpoint is exported (lower the learning rate "
                    f"range or check the data) {then}")
        else:
            head = f"error: no trial completed: {then}"
        print(head.rstrip(), *(f"  {_reason(s.trial, budget)}" for s in summaries), sep="\n", file=sys.stderr)
        return 1
    return 0


def _budget_used_up(spec: StudySpec, paths: StudyPaths, record: Study) -> str:
    """How to continue a study whose time budget (over all its driver runs) is used up; "" when it is not."""
    budget, used = spec.tune.time_budget_s, record.seconds_used()
    if budget is None or used < budget:
        return ""
    return (f"the study's time budget (tune.time_budget_s={budget:g}) is used up ({used:.0f} s); to continue, "
            f"raise it and resume: python -m tune.run --resume --name {paths.name} --storage-path "
            f"{paths.storage} --time-budget-s {math.ceil(used + budget)}")


def _reason(t: TrialRecord, budget: str) -> str:
    """``tNNN: status: reason`` for the summary on stderr; an interrupted trial without a recorded reason
    was stopped by the time budget when ``budget`` (:func:`_budget_used_up`) is used up."""
    why = f": {t.error}" if t.error else " (time budget)" if budget and t.status == TrialStatus.INTERRUPTED else ""
    return f"{t.name}: {t.status}{why}"


def _print_best(spec: StudySpec, paths: StudyPaths, best: TrialSummary, finalist: Finalist | None,
                best_model: Path | None, unfinished: Sequence[TrialSummary]) -> None:
    """The study's answer, after warnings about its checkpoint and the unfinished trials that beat it."""
    objective, name = spec.tune.objective, best.trial.name
    # An evaluation index as the study counts it ("epoch 2" with one per epoch).
    at = functools.partial(evaluation_name, evals_per_epoch=spec.run.train.evals_per_epoch)
    if best.checkpoint is None:
        print(f"warning: no checkpoint of trial {name} is left; best.yaml still retrains its config", file=sys.stderr)
    elif best.checkpoint_epoch != best.best_epoch:
        print(f"warning: the checkpoint of trial {name}'s best {at(best.best_epoch)} is gone; "
              f"best/model.pth is its {at(best.checkpoint_epoch)} checkpoint", file=sys.stderr)
    for s in unfinished:
        if objective.better(s.best_value, best.best_value):
            print(f"note: unfinished trial {s.trial.name} already reached {objective.metric} {s.best_value:.4f} "
                  f"after {f'{s.epochs} epoch(s)' if spec.run.train.evals_per_epoch == 1 else at(s.epochs)}: "
                  "--resume finishes it")
    mean = "" if finalist is None else (f"; mean over {len(finalist.seeds)} seeds {finalist.mean:.4f} ± "
                                        f"{finalist.std:.4f}")
    print(f"best: trial {name}  {objective.metric} {best.best_value:.4f} ({at(best.best_epoch)}){mean}",
          *(f"  {k}: {v}" for k, v in best.trial.params.items()), f"best config: {paths.local_dir / 'best.yaml'}",
          sep="\n")
    if best_model is not None:
        copied = "" if paths.is_local else f" (copied from {best.checkpoint}/{MODEL_FILE})"
        print(f"best fp16 checkpoint: {best_model}{copied}")


def _print_rung_fidelity(spec: StudySpec, search: Sequence[TrialRecord]) -> dict[str, float]:
    """Did ASHA's early rankings predict the final one? (Spearman per rung, completed trials.)
    Returns ``{"rung_fidelity_epoch_E": rho}`` (``rung_fidelity_evaluation_K`` with evaluations inside an
    epoch) for the MLflow parent run."""
    sched, per_epoch = spec.tune.scheduler, spec.run.train.evals_per_epoch
    rungs = [r for r in sched.rungs if r < sched.max_t] if sched.type == "asha" else []
    if not rungs:
        return {}
    found = rung_fidelity(search, spec.tune.metric, rungs)
    at = functools.partial(evaluation_name, evals_per_epoch=per_epoch)
    shown = ", ".join(f"{at(f.epoch)}: {f.spearman:+.2f} (n={f.trials})" if f.spearman is not None else
                      f"{at(f.epoch)}: n/a ({f.trials} completed trials, "
                      + ("needs 3)" if f.trials < 3 else "their values tie)") for f in found)
    print(f"rung fidelity (Spearman of each rung's ranking with the final one): {shown}")
    for f in found:
        if f.spearman is not None and f.spearman < RUNG_FIDELITY_WARNING:
            print(f"warning: at {at(f.epoch)} the trials ranked unlike at their end ({f.spearman:+.2f} < "
                  f"{RUNG_FIDELITY_WARNING}): ASHA may have stopped configs that would have ended best; "
                  "raise tune.scheduler.grace_period or lower reduction_factor", file=sys.stderr)
    unit = "epoch" if per_epoch == 1 else "evaluation"
    return {f"rung_fidelity_{unit}_{f.epoch}": f.spearman for f in found if f.spearman is not None}
