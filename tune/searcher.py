"""Ray's side of a study, over the study record: Optuna chooses, prunes and remembers; a trial trains.

:class:`RecordSearcher` (a Ray Tune ``Searcher``) hands out the record's unfinished trials first, so that
they continue from their checkpoints, then asks Optuna (ask-and-tell, TPE or random) for new ones.
:class:`RecordScheduler` writes every result to the record *before* deciding, and stops a trial when
Optuna's ``SuccessiveHalvingPruner`` (ASHA, Li et al. 2018, "A System for Massively Parallel
Hyperparameter Tuning") says so: a resumed study keeps its rungs, and a stopped trial's curve in Optuna
ends with the value it was stopped on.

:func:`train_trial`, the function trainable, adapts :func:`minimind_train.train.train_epochs`: at each
evaluation it writes the study's own checkpoint (``epoch_000k`` in the trial's folder, not Ray's; ``k``
the evaluation index, :func:`tune.study.evaluation_index`), then reports the metrics with that index,
the epoch and the checkpoint's path (this module's keys, :data:`CHECKPOINT_KEY` ...). A retried or resumed
trial continues from the checkpoint :func:`tune.storage.resume_point` names, mid-epoch included; a
diverged one ends with one ``diverged`` report (no retry: the same config diverges again). Its data come
memory-mapped from the driver's token cache (:func:`tune.cluster.open_study_data`).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from minimind_train.checkpoint import load_train_state, save_checkpoint
from minimind_train.config import RunConfig, run_config_from_dict, run_config_to_dict
from minimind_train.data import prepare_data
from minimind_train.train import TrainingDiverged, train_epochs

from .cluster import StudyData, current_node, open_study_data
from .interrupts import first_line
from .objective import Objective
from .status import TrialStatus
from .storage import (
    ResumePoint,
    filesystem_of,
    resume_point,
    retain_checkpoints,
    step_writer,
    trial_dirname,
    write_checkpoint,
)
from .study import PATH_KEYS, RUN_SETTINGS, Study, evaluation_index, ranked

__all__ = ["CHECKPOINT_KEY", "DIVERGED_KEY", "DIVERGED_REASON_KEY", "NUMBER_KEY", "PARAMS_KEY", "RecordScheduler",
           "RecordSearcher", "ResumePlan", "TrialOutOfMemory", "error_text", "failure_reason", "finalist_plans",
           "make_pruner", "make_sampler", "resume_plans", "train_trial"]

log = logging.getLogger(__name__)

# Keys of a trial's Ray config besides the searched values (see train_trial).
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


def resume_plans(record: Study, finalists: bool = False) -> list[ResumePlan]:
    """The record's unfinished search trials (or ``finalists``), each to continue from its newest whole
    checkpoint (:meth:`Study.resume_point`). Read only: :meth:`Study.recover` made the record
    whole at the start of the driver run."""
    return [ResumePlan(number=t.number, params=t.run_params, evaluation=record.resume_point(t.number).evaluation)
            for t in record.unfinished() if (t.finalist_of is not None) == finalists]


def finalist_plans(record: Study, distributions: Mapping[str, optuna.distributions.BaseDistribution],
                   objective: Objective, top_k: int, seeds: int, base_seed: int,
                   create: bool = True) -> list[ResumePlan]:
    """The finalists still to train: the ``top_k`` best completed search trials' configs (:func:`tune.study.ranked`), each with seeds
    ``base_seed + 1 .. base_seed + seeds`` (``train.seed``: model init and data order). Unfinished
    finalists continue; missing ones are created in the record (``create=False``: only counted, with
    number -1)."""
    plans = resume_plans(record, finalists=True)
    trials = record.trials()
    have = {(t.finalist_of, t.seed) for t in trials if t.finalist_of is not None}
    # Completed configs only (never one no better than untrained, nor one stopped early).
    search = [t for t in trials if t.finalist_of is None]
    best = ranked(search, objective, lambda t: t.status, lambda t: t.best(objective)[1],
                  statuses=(TrialStatus.COMPLETED,))
    for t in best[:top_k]:
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
    the steps of the intermediate values (:func:`tune.study.evaluation_index`; with one evaluation per
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

    def __init__(self, record: Study, distributions: Mapping[str, optuna.distributions.BaseDistribution],
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
    :func:`tune.study.evaluation_index`: what the record is keyed by and the rungs count) and ``epoch``;
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


class TrialOutOfMemory(RuntimeError):
    """The trial needed more GPU memory than its share (its neighbours are unaffected)."""


def _oom_message(gpu_share: float, cfg: RunConfig, exc: BaseException) -> str:
    partial = 0 < gpu_share < 1
    try:
        gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        size = f" ({gpu_share * gib:.1f} of {gib:.1f} GiB)" if partial else f" ({gib:.1f} GiB)"
    except (RuntimeError, AssertionError):  # no usable device to describe
        size = ""
    share = (f"its share of {gpu_share:g} of the GPU" if partial else "the whole GPU") + size
    return (f"out of GPU memory within {share} at train.batch_size={cfg.train.batch_size}: use a smaller "
            "train.batch_size (with train.accumulation_steps to keep the effective batch), a smaller "
            f"data.max_seq_len or model, or a larger tune.resources_per_trial.gpu ({first_line(exc)})")


def _release_gpu_memory() -> None:  # (cached CUDA blocks would stay reserved in a reused actor)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def _restore(runs: str, number: int, cfg: RunConfig, vocab_size: int) -> tuple[Any, ResumePoint]:
    """The train state to continue from and where it is: the checkpoint :func:`~tune.storage.resume_point`
    names (the one the driver announced); ``(None, point)`` when none.

    Raises:
        RuntimeError: that checkpoint passes the validity rule but does not load; no older one is taken
            silently, as the driver said which one the trial continues from.
    """
    point = resume_point(runs, number)
    for path, problem in point.damaged:
        log.warning("trial %s: checkpoint %s cannot be continued from: %s", number, path, problem)
    if point.path is None:
        return None, point
    # The last guard against one trial's epochs mixing two configurations (the study's files are compared
    # before Ray starts: Study.open, preflight.reconcile): its checkpoint says what it trained with.
    saved = point.meta.get("config")
    if isinstance(saved, Mapping):
        now = json.loads(json.dumps(run_config_to_dict(cfg)))  # (as meta.json holds it: lists, not tuples)
        changed = [f"{section}.{name}: {old!r} -> {now[section][name]!r}"
                   for section, values in saved.items() if isinstance(values, Mapping) and section in now
                   for name, old in values.items() if name in now[section]
                   and f"{section}.{name}" not in RUN_SETTINGS + PATH_KEYS and now[section][name] != old]
        if changed:
            raise RuntimeError(f"checkpoint {point.path} was trained with another configuration than the study's "
                               f"now ({'; '.join(changed)}); its epochs are not continued with another")
    fs, _ = filesystem_of(runs)
    try:  # (as_directory downloads from a URI; a local folder is used in place)
        with tune.Checkpoint(point.path, filesystem=fs).as_directory() as directory:
            return load_train_state(directory, cfg, vocab_size), point
    except Exception as exc:
        raise RuntimeError(f"checkpoint {point.path} (evaluation {point.evaluation}) cannot be loaded: "
                           f"{type(exc).__name__}: {exc}") from exc


def train_trial(config: dict[str, Any], *, base: Mapping[str, Any], objective: Objective, runs_dir: str,
                run_name: str, keep_checkpoints: int = 1, gpu_share: float = 0.0,
                data: StudyData | None = None) -> None:
    """Function trainable. ``config``: ``params`` (searched values by dotted path) and ``study_trial``
    (the record's trial number); ``base``: the fixed run config; ``objective``: what is optimised (NaN
    when the trial diverges; it ranks the kept checkpoints); ``data``: the driver's token cache on any node
    (:func:`tune.cluster.study_data`; None prepares the data here). Each evaluation's checkpoint goes to
    ``<runs_dir>/<run_name>/tNNN/epoch_000k`` (a folder or a URI; ``k`` its evaluation index) *before* its
    result is reported, so a recorded result always has its checkpoint; the ``keep_checkpoints`` best and
    the newest are kept.

    Raises:
        TrialOutOfMemory: CUDA ran out of memory within the trial's ``gpu_share`` (0: no cap, 1: whole GPU).
    """
    cfg = run_config_from_dict(base).with_overrides(config.get(PARAMS_KEY, {}))
    number = int(config[NUMBER_KEY])
    _release_gpu_memory()  # what a previous trial in this (reused) actor left cached
    if 0 < gpu_share < 1 and torch.cuda.is_available():  # an oversized trial fails alone, not its neighbours
        torch.cuda.set_per_process_memory_fraction(gpu_share)
    if data is None:
        sft, train_cfg = prepare_data(cfg.data, show_progress=False), cfg
    else:  # train_cfg differs from cfg only in model.init_from, when that was copied to this node
        sft, train_cfg = open_study_data(data, cfg)
    node = current_node()  # where each epoch ran, kept in the checkpoint's meta.json (not a metric)
    state, point = _restore(runs_dir, number, cfg, sft.vocab_size)
    trial_dir = f"{runs_dir}/{run_name}/{trial_dirname(number)}"
    if state is not None:
        done = point.evaluation
        log.info("trial %s continues after evaluation %d (epoch %d, optimizer step %d)", number, done,
                 state.epoch, state.step)
        # Reported again (marked, not trained again): a worker that died between writing the checkpoint
        # and reporting it left that result out of the record (which keeps an evaluation's first report).
        tune.report({**point.meta.get("metrics", {}), "epoch": -(-done // cfg.train.evals_per_epoch),
                     "evaluation": done, "restored": 1, CHECKPOINT_KEY: point.path})
    oom = diverged = None
    on_step = step_writer(trial_dir) if "://" not in runs_dir else None  # the driver's live view, local only
    try:
        for result in train_epochs(train_cfg, sft, state, on_step=on_step):
            index = evaluation_index(result.epoch, result.step_in_epoch, result.steps_in_epoch,
                                     cfg.train.evals_per_epoch)
            meta = {"data": sft.stats_dict(), "ray": node, "study_trial": number}
            save = functools.partial(save_checkpoint, state=result.state, cfg=cfg, metrics=result.metrics, meta=meta)
            path = write_checkpoint(save, trial_dir, index)
            retain_checkpoints(runs_dir, number, keep_checkpoints, objective)
            tune.report({**result.metrics, "epoch": result.epoch, "evaluation": index, CHECKPOINT_KEY: path})
    except torch.cuda.OutOfMemoryError as exc:  # raised below, outside: its traceback holds the tensors
        oom = _oom_message(gpu_share, cfg, exc)
    except TrainingDiverged as exc:
        diverged = {objective.metric: float("nan"), "epoch": exc.epoch, DIVERGED_KEY: 1,
                    DIVERGED_REASON_KEY: str(exc)}
    # Freed now (one stopped by the scheduler leaves via SystemExit in tune.report: freed at the next start).
    state = result = None
    _release_gpu_memory()
    if diverged is not None:
        tune.report(diverged)
    if oom is not None:
        raise TrialOutOfMemory(oom)
