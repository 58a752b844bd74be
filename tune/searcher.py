"""Ray's searcher and scheduler over the study record: Optuna chooses, prunes and remembers.

:class:`RecordSearcher` is a Ray Tune ``Searcher`` that asks Optuna (ask-and-tell, TPE or random
sampler) for each new trial and, first, hands out the record's unfinished trials so that they continue
from their checkpoints. :class:`RecordScheduler` is a FIFO scheduler that writes every result to the
record *before* deciding, and stops a trial when Optuna's ``SuccessiveHalvingPruner`` (ASHA, Li et al.
2018, "A System for Massively Parallel Hyperparameter Tuning") says so. Because rungs and values
live in the record, a resumed study keeps its ASHA history, and a stopped trial's curve in Optuna
ends with the value it was stopped on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from .objective import Objective
from .record import StudyRecord, TrialRecord, ranked
from .status import TrialStatus

__all__ = ["CHECKPOINT_KEY", "DIVERGED_KEY", "DIVERGED_REASON_KEY", "NUMBER_KEY", "PARAMS_KEY", "RecordScheduler", "RecordSearcher", "ResumePlan", "error_text",
           "failure_reason", "finalist_plans", "make_pruner", "make_sampler", "resume_plans"]

# Keys of a trial's Ray config besides the searched values (see tune.trainable.train_trial).
NUMBER_KEY = "study_trial"
PARAMS_KEY = "params"
# A diverged trial's last report holds {DIVERGED_KEY: 1, DIVERGED_REASON_KEY: why}; the scheduler ends it so.
DIVERGED_KEY = str(TrialStatus.DIVERGED)
DIVERGED_REASON_KEY = f"{DIVERGED_KEY}_reason"
# Each evaluation's report names the checkpoint written there (the record's checkpoint index).
CHECKPOINT_KEY = "checkpoint"


@dataclass(frozen=True)
class ResumePlan:
    """An unfinished trial to continue: its number, params, and the evaluation index of its newest whole
    checkpoint, where it continues (the trainable finds the checkpoint itself)."""

    number: int
    params: dict[str, Any]
    evaluation: int = 0


def resume_plans(record: StudyRecord, finalists: bool = False) -> list[ResumePlan]:
    """The record's unfinished search trials (or ``finalists``), each to continue from its newest whole
    checkpoint (:meth:`StudyRecord.resume_point`). Read only: :meth:`StudyRecord.recover` made the record
    whole at the start of the driver run."""
    return [ResumePlan(number=t.number, params=t.run_params, evaluation=record.resume_point(t.number).evaluation)
            for t in record.unfinished() if (t.finalist_of is not None) == finalists]


def finalist_plans(record: StudyRecord, distributions: Mapping[str, optuna.distributions.BaseDistribution],
                   objective: Objective, top_k: int, seeds: int, base_seed: int,
                   create: bool = True) -> list[ResumePlan]:
    """The finalists still to train: the ``top_k`` best completed search trials' configs (:func:`tune.record.ranked`), each with seeds
    ``base_seed + 1 .. base_seed + seeds`` (``train.seed``: model init and data order). Unfinished
    finalists continue; missing ones are created in the record (``create=False``: only counted, with
    number -1)."""
    plans = resume_plans(record, finalists=True)
    trials = record.trials()
    have = {(t.finalist_of, t.seed) for t in trials if t.finalist_of is not None}
    def best(t: TrialRecord) -> float:
        value = objective.best_of(v for _, v in t.curve(objective.metric))
        return objective.worst if value is None else value

    # Completed configs only (never one no better than untrained, nor one stopped early).
    search = [t for t in trials if t.finalist_of is None]
    for t in ranked(search, objective, lambda t: t.status, best, statuses=(TrialStatus.COMPLETED,))[:top_k]:
        for seed in range(base_seed + 1, base_seed + 1 + seeds):
            if (t.number, seed) not in have:
                number = record.add_finalist(t, seed, distributions) if create else -1
                plans.append(ResumePlan(number=number, params={**t.params, "train.seed": seed}))
    return plans


def make_sampler(kind: str, seed: int, num_samples: int, offset: int = 0) -> optuna.samplers.BaseSampler:
    """TPE (``optuna``) or ``random``. ``offset`` (trials already in the record) shifts the seed, so a
    resumed study does not draw its first run's values again."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed + offset)
    return optuna.samplers.TPESampler(seed=seed + offset, n_startup_trials=min(4, max(1, num_samples // 3)))


def make_pruner(kind: str, grace_period: int, reduction_factor: int) -> optuna.pruners.BasePruner:
    """ASHA as Optuna's SuccessiveHalvingPruner: rungs at ``grace_period * reduction_factor**k`` evaluations,
    the steps of the intermediate values (:func:`tune.record.evaluation_index`; with one evaluation per
    epoch, epochs)."""
    if kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=grace_period, reduction_factor=reduction_factor,
                                                  min_early_stopping_rate=0)


class RecordSearcher(Searcher):
    """Suggests trials from the record: first ``resume`` plans, then new Optuna trials.

    Ray calls ``suggest`` at most ``num_samples`` times (``TuneConfig.num_samples``): the driver passes
    unfinished + new trials. ``planned``: the evaluation index that ends a whole trial
    (``tune.scheduler.max_t``).
    """

    def __init__(self, record: StudyRecord, distributions: Mapping[str, optuna.distributions.BaseDistribution],
                 objective: Objective, planned: int, resume: list[ResumePlan] | None = None) -> None:
        super().__init__(metric=objective.metric, mode=objective.mode)
        self.objective = objective
        self.record = record
        self.distributions = dict(distributions)
        self.planned = planned
        self._resume = list(resume or [])
        self.numbers: dict[str, int] = {}  # Ray trial id -> record trial number

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._resume:
            plan = self._resume.pop(0)
            number, params = plan.number, plan.params
            self.record.set_status(number, TrialStatus.RUNNING)
        else:
            number, params = self.record.ask(self.distributions)
        self.numbers[trial_id] = number
        return {PARAMS_KEY: params, NUMBER_KEY: number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.numbers.get(trial_id)
        if number is None:
            return
        current = self.record.trial(number)
        if current.status in (TrialStatus.STOPPED_EARLY, TrialStatus.DIVERGED):  # decided by RecordScheduler
            status = current.status
        elif error:
            status = TrialStatus.FAILED
        elif self.planned in current.epochs:
            status = TrialStatus.COMPLETED
        else:
            status = TrialStatus.INTERRUPTED  # Ctrl-C or the time budget ended it: --resume continues it
        self.record.finish(number, status, self.objective, error=current.error)

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the record is the state (a study resumes from it, never from Ray's snapshot)."""
        Path(checkpoint_path).write_text("state is in the study record (optuna.db)\n")


class RecordScheduler(FIFOScheduler):
    """Records each result, then stops the trial if it diverged or Optuna's pruner prunes it.

    Results carry ``evaluation`` (the trial's real evaluation index across resumes,
    :func:`tune.record.evaluation_index`: what the record is keyed by and the rungs count) and ``epoch``;
    Ray's ``training_iteration`` restarts at 1 in each driver run, so it is not used.
    """

    def __init__(self, searcher: RecordSearcher, pruner: optuna.pruners.BasePruner) -> None:
        super().__init__()
        self.searcher = searcher
        self.pruner = pruner

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        number = self.searcher.numbers.get(trial.trial_id)
        if number is None or "epoch" not in result:
            return TrialScheduler.CONTINUE
        record, metric = self.searcher.record, self.searcher.metric
        if result.get(DIVERGED_KEY):
            record.set_status(number, TrialStatus.DIVERGED, str(result.get(DIVERGED_REASON_KEY, DIVERGED_KEY)))
            return TrialScheduler.STOP
        index = int(result["evaluation"])
        record.record_epoch(number, index, _metrics(result), metric, checkpoint=result.get(CHECKPOINT_KEY))
        value = result.get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            epoch = int(result["epoch"])
            where = f"epoch {epoch}" if index == epoch else f"evaluation {index} (epoch {epoch})"
            record.set_status(number, TrialStatus.DIVERGED, f"{metric}={value!r} at {where}")
            return TrialScheduler.STOP
        if index < self.searcher.planned and record.should_prune(number, self.pruner):
            record.set_status(number, TrialStatus.STOPPED_EARLY)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        number = self.searcher.numbers.get(trial.trial_id)
        if number is not None:  # (Ray calls this also when it retries the trial: then it is still running)
            self.searcher.record.set_status(number, TrialStatus.RUNNING if trial.should_recover() else TrialStatus.FAILED,
                                            failure_reason(error_text(trial)) or "the trial crashed")
        super().on_trial_error(tune_controller, trial)


def error_text(trial: Trial) -> str:
    """A failed trial's error text: the driver's own copy (``error_file``), which exists at once; the
    storage's (``get_error``) comes only with Ray's next sync. "" when neither can be read."""
    try:
        return Path(trial.error_file).read_text(errors="replace") if trial.error_file else str(trial.get_error() or "")
    except Exception:  # noqa: BLE001 - an unreadable error file must not end the study
        return ""


def failure_reason(text: str) -> str:
    """The exception line of a trial's error text (Ray wraps it in a traceback and ANSI colours)."""
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("File ", "Traceback", "^", "~"))]
    exceptions = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Diverged|Memory|Interrupt)\b", ln)]
    reason = (exceptions or lines or [""])[-1]
    return reason if len(reason) <= 500 else reason[:499] + "…"  # (the whole text is in the trial's error file)


def _metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """What the trainable reported (Ray adds bookkeeping keys; ``ray.tune.result`` names them)."""
    from ray.tune.result import AUTO_RESULT_KEYS, DONE, TRIAL_ID

    skip = {*AUTO_RESULT_KEYS, TRIAL_ID, DONE, "epoch", "evaluation", "restored", CHECKPOINT_KEY}  # (the trainable's bookkeeping)
    # "config/..." keys are Ray's flattened copy of the trial's config, not metrics.
    out = {k: float(v) for k, v in result.items()
           if k not in skip and "/" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(result.get("timestamp"), (int, float)):
        out["timestamp_ms"] = float(result["timestamp"]) * 1000.0
    return out
