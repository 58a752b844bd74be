"""MLflow as a mirror of the study record: one parent run per study, one nested run per trial.

The record (``tune.study``) is the truth; :meth:`Mirror.sync` copies it into MLflow at any time, from any
process, as often as wanted. Runs are found by their tags (``minimind.study_id``, ``minimind.trial``), never by
name, and nest through the ``mlflow.parentRunId`` tag as in Ray's ``MLflowLoggerCallback``: no crash between
two MLflow calls leaves a second run. A failing store never fails a study: :class:`MirrorCallback` warns once,
and ``python -m tune.mirror STUDY_DIR`` (or ``--resume``) catches MLflow up later. All calls go through an
explicit ``MlflowClient``: MLflow's global active run cannot serve concurrent trials.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.utils import flatten_dict

from . import tracking
from .interrupts import first_line
from .lock import StudyLock
from .objective import Objective
from .status import FINISHED, RESUMABLE, TrialStatus
from .study import Study, StudyError, TrialRecord, answer, finalist_configs
from .tracking import TrackingError

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["CONFIG_TAG", "ERROR_TAG", "NOTE_TAG", "PARENT_RUN_TAG", "ROLE_TAG", "STATUS_TAG", "STUDY_DIR_TAG", "STUDY_ID_TAG",
           "STUDY_TAG", "SYNCED_TAG", "TRIAL_TAG", "Mirror", "MirrorCallback", "delete_study_runs", "main",
           "run_name", "trials_compare_url", "warn_on_failure"]

logger = logging.getLogger(__name__)

MIRROR_LOCK = ".mirror.lock"

STUDY_ID_TAG, STUDY_TAG, STUDY_DIR_TAG = "minimind.study_id", "minimind.study", "minimind.study_dir"
ROLE_TAG, TRIAL_TAG, STATUS_TAG, ERROR_TAG = "minimind.role", "minimind.trial", "minimind.status", "minimind.error"
SYNCED_TAG = "minimind.synced_epochs"
BEST_TRIAL_TAG, BEST_RUN_TAG = "minimind.best_trial", "minimind.best_run_id"
# The config a trial's run trains: its search trial's run name, which a finalist shares. The saved view
# groups the runs table by it, so that a config's seeds are one group, its metrics their mean.
CONFIG_TAG = "minimind.config"
# MLflow's own: the UI nests a run under the run the first names, and shows the second as its description;
# the third is the run's name (log_batch renames the run).
PARENT_RUN_TAG, NOTE_TAG, _RUN_NAME_TAG = "mlflow.parentRunId", "mlflow.note.content", "mlflow.runName"

# Record status -> MLflow run status; "running" is RUNNING while the driver lives, else KILLED.
_RUN_STATUS = {TrialStatus.COMPLETED: "FINISHED", TrialStatus.STOPPED_EARLY: "FINISHED", TrialStatus.FAILED: "FAILED",
               TrialStatus.DIVERGED: "FAILED", TrialStatus.NO_BETTER: "FAILED", TrialStatus.ABANDONED: "FAILED",
               TrialStatus.INTERRUPTED: "KILLED"}
# finish(status) -> the parent's minimind.status tag.
_STUDY_STATUS = {"FINISHED": TrialStatus.COMPLETED, "FAILED": TrialStatus.FAILED, "KILLED": TrialStatus.INTERRUPTED}
# Record keys that are bookkeeping, not metrics: the timestamp is the point's own, the epoch its step.
_NOT_METRICS = frozenset({*AUTO_RESULT_KEYS, "epoch", "timestamp_ms", "time_epoch_start_unix"})
_MAX_RUNS = 50000  # MLflow's largest search page; no study has that many trials
# Searched keys by their last path component, shortened for run names.
_ABBREVIATIONS = {"learning_rate": "lr", "accumulation_steps": "acc", "grad_clip": "clip", "min_lr_ratio": "min_lr",
                  "warmup_steps": "warmup", "weight_decay": "wd", "batch_size": "bs", "dropout": "drop",
                  "hidden_size": "hidden", "num_hidden_layers": "layers"}


def _where(tags: Mapping[str, str]) -> str:
    """A ``search_runs`` filter matching every tag; values are study ids, roles and trial numbers."""
    for value in tags.values():
        if not re.fullmatch(r"[0-9A-Za-z_.-]+", value):
            raise ValueError(f"tag value {value!r} is not a study id, role or trial number")
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def _short_number(value: Any) -> str:
    """2-3 significant digits: ``0.0023`` -> ``2.3e-3``, ``0.9`` -> ``0.90``, ``40`` -> ``40``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value) if len(str(value)) <= 16 else str(value)[:15] + "~"
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e4) or not math.isfinite(value):
        return str(int(value)) if math.isfinite(value) else str(value)
    if 1e-2 <= abs(value) < 1e4:
        return f"{value:.{max(0, 1 - math.floor(math.log10(abs(value))))}f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def run_name(trial: TrialRecord, key_order: Sequence[str] = ()) -> str:
    """``t003 lr=2.3e-3 acc=1 clip=0.90``: the trial's name and its searched values, short (a key by
    its last component, abbreviated; the whole key where two would clash). A finalist's is
    ``t008 = t003 seed=1``: the config it trains again (its group in the runs table names the values)."""
    if trial.finalist_of is not None:
        return f"{trial.name} = t{trial.finalist_of:03d} seed={trial.seed}"
    keys = [k for k in key_order if k in trial.params] + sorted(k for k in trial.params if k not in key_order)
    short = {k: _ABBREVIATIONS.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys}
    clashes = Counter(short.values())
    return " ".join([trial.name, *(f"{short[k] if clashes[short[k]] == 1 else k}={_short_number(trial.params[k])}"
                                   for k in keys)])


def _stamp(metrics: Mapping[str, float]) -> int:
    # The recorded time makes a point logged again identical to the first, which MLflow stores once
    # (one row per key, step, timestamp and value); without one, a fixed stamp does the same.
    stamp = metrics.get("timestamp_ms", 0.0)
    return int(stamp) if math.isfinite(stamp) else 0


def _update(client: MlflowClient, run: Run, tags: Mapping[str, str], params: Mapping[str, Any],
            metrics: Sequence[Metric] = ()) -> None:
    """Log ``metrics`` and what ``run`` lacks of ``tags`` and ``params`` (MLflow params are immutable)."""
    changed = [RunTag(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
    missing = [Param(k, str(v)) for k, v in params.items() if k not in run.data.params]
    if changed or missing or metrics:
        client.log_batch(run.info.run_id, metrics=metrics, params=missing, tags=changed)


def _ms(moment: datetime | None) -> int | None:
    """Milliseconds since the Unix epoch (MLflow's run times) of Optuna's naive local datetime."""
    return None if moment is None else int(moment.timestamp() * 1000)


def _set_status(client: MlflowClient, run: Run, status: str, end_time: int | None = None) -> None:
    """Give ``run`` MLflow ``status``; a terminal one with ``end_time`` (ms; None: now), which is
    corrected when it differs (a trial resumed and ended again, a store synced by an older mirror)."""
    if status == "RUNNING":
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
    elif status != run.info.status or (end_time is not None and run.info.end_time != end_time):
        client.set_terminated(run.info.run_id, status=status, end_time=end_time)


class Mirror:
    """The MLflow copy of one study record. Its methods raise :class:`TrackingError` (naming the URI) on
    any MLflow failure; nothing of MLflow's state is cached but the connection."""

    def __init__(self, tracking_uri: str, experiment: str, record: Study, *, fixed_params: Mapping[str, Any],
                 settings: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self.tracking_uri, self.experiment, self.record = tracking_uri, experiment, record
        self.study_id, self.study_dir = record.manifest.study_id, str(Path(record.dir).resolve())
        # The study's start (ms since the Unix epoch): its parent run's start time.
        self.created = int(datetime.fromisoformat(record.manifest.created).timestamp() * 1000)
        # The parent's params: the fixed config and the tuner's settings (the trials' runs hold only
        # their searched values).
        self.params = {**flatten_dict(dict(fixed_params), delimiter="."),
                       **{f"tune.{k}": v for k, v in flatten_dict(dict(settings), delimiter=".").items()}}
        self.tags = {k if k.startswith(("minimind.", "mlflow.")) else f"minimind.{k}": str(v) for k, v in tags.items()}
        tune = record.manifest.spec.get("tune") or {}
        self.objective = Objective.of(tune)
        self.search_keys = [str(k) for k in record.manifest.spec.get("search") or {}]
        self.experiment_id: str | None = None
        self.parent_status: str | None = None  # the parent run's MLflow status as of the last call
        self._client: MlflowClient | None = None

    def sync(self, numbers: Iterable[int] | None = None, *, closing: bool = False) -> None:
        """Bring the parent run and the given trials' runs (None: every trial) up to date with the record.

        ``running`` trials' runs are RUNNING, as is the parent, while the driver lives; with ``closing``
        they become KILLED (their driver is gone) and the parent's status is left to :meth:`finish`."""
        wanted = None if numbers is None else set(numbers)
        with self._session("sync") as client:
            parent = self._parent(client, running=not closing)
            runs = self._runs(client, "trial", min(wanted) if wanted and len(wanted) == 1 else None)
            trials = self.record.trials()
            spans = self._spans(trials)
            configs = {t.number: run_name(t, self.search_keys) for t in trials if t.finalist_of is None}
            for trial in trials:
                if wanted is None or trial.number in wanted:
                    config = configs.get(trial.number if trial.finalist_of is None else trial.finalist_of, "")
                    self._sync_trial(client, parent.info.run_id, runs.get(str(trial.number)), trial,
                                     spans[trial.number], closing, config)

    def _spans(self, trials: Iterable[TrialRecord]) -> dict[int, tuple[int | None, int | None]]:
        """Each trial's start and end as the record has them (ms since the Unix epoch), by number.

        The start is the trial's first training step (its first epoch's ``time_epoch_start_unix``;
        before any epoch, when Optuna asked it); the end is Optuna's completion, else its last epoch's
        report, else its start. Not the mirror's sync times: a trial's run is made at its first report
        and closed at a later sync. The trainer's set-up before the first step (seconds) is left out;
        a trial resumed in a later driver run spans both runs and the pause between them."""
        spans: dict[int, tuple[int | None, int | None]] = {}
        for trial in trials:
            first = trial.epochs[min(trial.epochs)] if trial.epochs else {}
            last = trial.epochs[max(trial.epochs)] if trial.epochs else {}
            step = first.get("time_epoch_start_unix", math.nan)
            start = int(step * 1000) if math.isfinite(step) else _ms(trial.started)
            report = last.get("timestamp_ms", math.nan)
            spans[trial.number] = (start, _ms(trial.completed)
                                   or (int(report) if math.isfinite(report) else start))
        return spans

    def finish(self, status: str, *, best: TrialRecord | None, best_value: float | None, best_epoch: int | None,
               artifacts: Mapping[str, Path], study_metrics: Mapping[str, float] | None = None,
               end_time: int | None = None) -> None:
        """Close the mirror: every trial synced (``closing``), the results on the parent run, which ends
        with ``status`` (FINISHED, FAILED or KILLED) at ``end_time`` (ms since the Unix epoch; None: now)
        and starts when the study was created, so that its duration spans every driver run.

        The parent's description names the best trial, its ``best_value`` (at ``best_epoch``) and the
        command that retrains it. ``artifacts`` maps a path in the run to a local file, which keeps its
        name in that path's folder; a missing one is a warning (this runs in the driver's ``finally``).
        ``study_best_<objective>`` (not the trials' ``best_<objective>``, which the runs table sorts by:
        MLflow sorts a run lacking it last) and ``study_metrics`` (e.g. ``rung_fidelity_epoch_1``) are
        logged at step = the number of finished trials, so that a finish after more trials adds a point.
        """
        if status not in _STUDY_STATUS:
            raise ValueError(f"status must be one of {sorted(_STUDY_STATUS)}, got {status!r}")
        self.sync(closing=True)
        study_metrics = study_metrics or {}
        with self._session("finish") as client:
            parent, trials = self._parent(client, running=False), self.record.trials()
            step, now = sum(t.status in FINISHED for t in trials), int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, step) for k, v in study_metrics.items()]
            best_run = None if best is None else self._runs(client, "trial", best.number).get(str(best.number))
            tags = {STATUS_TAG: _STUDY_STATUS[status], _RUN_NAME_TAG: self._answer(trials, best, best_value, study_metrics),
                    NOTE_TAG: self._note(trials, best, best_value, best_epoch, best_run, artifacts, study_metrics)}
            if best is not None:
                tags[BEST_TRIAL_TAG] = best.name
            if best_run is not None:
                tags[BEST_RUN_TAG] = best_run.info.run_id
            if best is not None and best_value is not None:  # stamped as its epoch: finishing again adds no point
                metrics.append(Metric(f"study_best_{self.objective.metric}", float(best_value),
                                      _stamp(best.epochs.get(best_epoch or 0, {})), step))
            _update(client, parent, tags, {}, [m for m in metrics if math.isfinite(m.value)])
            for target, path in artifacts.items():
                if Path(path).is_file():
                    client.log_artifact(parent.info.run_id, str(path), target.strip("/").rpartition("/")[0] or None)
                else:
                    logger.warning("artifact %s does not exist; not logged to MLflow", path)
            client.set_terminated(parent.info.run_id, status=status, end_time=end_time)
            self.parent_status = status

    def _answer(self, trials: list[TrialRecord], best: TrialRecord | None, value: float | None,
                study_metrics: Mapping[str, float]) -> str:
        """The parent's run name, which the runs table shows in full: the study and its answer, e.g.
        ``smoke: best t003 lr=9.4e-3 acc=2, mean val_loss 4.644 over 2 seeds`` (the mean is the answer
        when finalists ran, else ``, val_loss 4.767``)."""
        if best is None or value is None:
            return self.record.manifest.name
        answer = f"{self.record.manifest.name}: best {run_name(best, self.search_keys)}"
        mean = study_metrics.get(f"best_mean_{self.objective.metric}")
        if mean is None or not math.isfinite(mean):
            return f"{answer}, {self.objective.metric} {value:.4g}"
        seeds = 1 + sum(t.finalist_of == best.number and t.status in FINISHED for t in trials)
        return f"{answer}, mean {self.objective.metric} {mean:.4g} over {seeds} seeds"

    def _note(self, trials: list[TrialRecord], best: TrialRecord | None, value: float | None, epoch: int | None,
              best_run: Run | None, artifacts: Mapping[str, Path], study_metrics: Mapping[str, float]) -> str:
        """The parent's description (Markdown): the best trial, its value (and mean over seeds when
        finalists ran), how to retrain it, the tally of search trials and finalist runs."""
        search = [t for t in trials if t.finalist_of is None]
        counts = Counter("unfinished" if t.status == TrialStatus.RUNNING else t.status.replace("_", " ")
                         for t in search)
        tally = f"{len(search)} trials: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + "."
        if finalists := len(trials) - len(search):
            tally += f" {finalists} finalist runs (top configs with other seeds)."
        if best is None:
            return f"No trial completed. {tally}"
        name = run_name(best, self.search_keys)
        link = f"[{name}](#/experiments/{self.experiment_id}/runs/{best_run.info.run_id})" if best_run else name
        shown = "" if value is None else f": {self.objective.metric} {value:.4g}" + (f" at epoch {epoch}" if epoch else "")
        mean = study_metrics.get(f"best_mean_{self.objective.metric}")
        if mean is not None and math.isfinite(mean):
            shown += f"; over seeds, mean {mean:.4g} ± {study_metrics.get(f'best_std_{self.objective.metric}', 0.0):.2g}"
        config = Path(artifacts.get("best.yaml", Path(self.record.dir) / "best.yaml")).resolve()
        return (f"**Best trial {link}**{shown}.\n\n"
                f"Retrain it: `python -m minimind_train.sft --config {config}`\n\n{tally}")

    @contextlib.contextmanager
    def _session(self, what: str) -> Iterator[MlflowClient]:
        """The connection, under the study's mirror lock (two syncs at once could each create a run for
        one new trial); any failure becomes a :class:`TrackingError`, and the next call reconnects."""
        try:
            with tracking.locked_file(Path(self.record.dir) / MIRROR_LOCK):
                if self._client is None:
                    # Fast: MLflow's client retries for minutes.
                    tracking.check_tracking_server(self.tracking_uri)
                    client = MlflowClient(tracking_uri=self.tracking_uri)
                    self.experiment_id, self._client = self._experiment(client), client
                yield self._client
        except Exception as exc:
            self._client = None
            if isinstance(exc, TrackingError):
                raise
            raise TrackingError(
                f"MLflow mirror {what} at {self.tracking_uri} failed ({type(exc).__name__}: {first_line(exc)}); "
                f"the study record is unaffected: fix the tracking store, then `python -m tune.mirror "
                f"{self.study_dir}` catches MLflow up") from exc

    def _experiment(self, client: MlflowClient) -> str:
        """The experiment's id, created if new, with the study's saved view."""
        if client.get_experiment_by_name(self.experiment) is None:
            try:
                location = tracking.artifact_location(self.tracking_uri)
                client.create_experiment(self.experiment, artifact_location=location)
            except Exception:
                if client.get_experiment_by_name(self.experiment) is None:  # (else made meanwhile by another driver)
                    raise
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {self.experiment!r} in {self.tracking_uri} is deleted; restore it "
                                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set "
                                f"another mlflow.experiment")
        key, view = self.saved_view()
        if experiment.tags.get(key) != view:
            client.set_experiment_tag(experiment.experiment_id, key, view)
        return experiment.experiment_id

    def saved_view(self) -> tuple[str, str]:
        """The study's saved view of the runs table, as ``(experiment tag, value)``: its runs grouped by
        config (:data:`CONFIG_TAG`: a config's group row, labelled with its searched values, holds the
        mean over its seeds), best mean first, with the objective, its best so far, the searched values
        and the status as columns; the study's own run, which names the answer, in the group of runs
        without a config, open. The name and objective columns are wide enough for a label and a whole
        value. MLflow 3.17's UI lists it under "Views" and opens it by ``viewStateShareKey=<study id>``
        (its own format: an envelope with the table state as a JSON string; a UI that differs ignores it)."""
        best_key = f"metrics.`best_{self.objective.metric}`"
        selected = [best_key, f"metrics.`{self.objective.metric}`", *(f"params.`{k}`" for k in self.search_keys),
                    f"tags.`{STATUS_TAG}`"]
        # ~6 px a character of the longest name: a group's label "Group: t000 k=v ..." beside its expander,
        # colour and count, or the study's run's (:meth:`_answer`).
        config = len("t000") + sum(len(_ABBREVIATIONS.get(k.rsplit(".", 1)[-1], k)) + 9 for k in self.search_keys)
        label = max(len("Group: ") + config + 10, len(f"{self.record.manifest.name}: best , mean {self.objective.metric} "
                                                      f"0.0000 over 2 seeds") + config)
        state = {"searchFilter": _where({STUDY_ID_TAG: self.study_id}), "orderByKey": best_key,
                 "orderByAsc": self.objective.minimize, "selectedColumns": selected,
                 # (MLflow's column ids: the name, the selected ones, then its "Created" and "Duration")
                 "columnOrder": ["attributes.`Run Name`", *selected, "runDateAndNestInfo", "duration"],
                 "columnWidths": {"attributes.`Run Name`": min(560, 60 + 6 * label), best_key: 170},
                 "groupBy": {"aggregateFunction": "average",
                             "groupByKeys": [{"mode": "tag", "groupByData": CONFIG_TAG}]},
                 # (the id of the group of runs without the tag: "mode.key"; MLflow folds it by default)
                 "groupsExpanded": {f"tag.{CONFIG_TAG}": True}}
        return tracking.VIEW_TAG_PREFIX + self.study_id, json.dumps(
            {"name": f"{self.record.manifest.name}: best {self.objective.metric} first", "createdAt": self.created,
             "updatedAt": self.created, "state": json.dumps(state)})

    def _runs(self, client: MlflowClient, role: str, number: int | None = None) -> dict[str, Run]:
        """The study's active runs of ``role`` (of trial ``number`` alone if given) by trial number, or
        "parent"; of duplicates (two processes creating one run at once) the oldest, the others deleted."""
        tags = {STUDY_ID_TAG: self.study_id, ROLE_TAG: role, **({} if number is None else {TRIAL_TAG: str(number)})}
        found: dict[str, Run] = {}
        for run in client.search_runs([str(self.experiment_id)], _where(tags), ViewType.ACTIVE_ONLY, _MAX_RUNS,
                                      ["attributes.start_time ASC"]):
            kept = found.setdefault(run.data.tags.get(TRIAL_TAG, "parent"), run)
            if kept is not run:
                logger.warning("MLflow run %s duplicates run %s; deleted", run.info.run_id, kept.info.run_id)
                client.delete_run(run.info.run_id)
        return found

    def _parent(self, client: MlflowClient, running: bool) -> Run:
        """The parent run, found or created, its tags and params up to date."""
        tags = {**self.tags, STUDY_ID_TAG: self.study_id, STUDY_TAG: self.record.manifest.name, ROLE_TAG: "parent",
                STUDY_DIR_TAG: self.study_dir}
        run = self._runs(client, "parent").get("parent") or client.create_run(
            str(self.experiment_id), start_time=self.created, run_name=self.record.manifest.name,
            tags={**tags, STATUS_TAG: TrialStatus.RUNNING})
        # A setting changed by a later driver run stays as a tag beside the first value's param.
        tags.update({f"minimind.latest.{k}": str(v) for k, v in self.params.items()
                     if k in run.data.params and run.data.params[k] != str(v)})
        _update(client, run, {**tags, STATUS_TAG: TrialStatus.RUNNING} if running else tags, self.params)
        if running:
            _set_status(client, run, "RUNNING")
        self.parent_status = "RUNNING" if running else run.info.status
        return run

    def _sync_trial(self, client: MlflowClient, parent_id: str, run: Run | None, trial: TrialRecord,
                    span: tuple[int | None, int | None], closing: bool, config: str) -> None:
        name = run_name(trial, self.search_keys)
        tags = {STUDY_ID_TAG: self.study_id, STUDY_TAG: self.record.manifest.name, ROLE_TAG: "trial",
                TRIAL_TAG: str(trial.number), PARENT_RUN_TAG: parent_id, STATUS_TAG: trial.status, CONFIG_TAG: config}
        # The identity tags go in with the run (one request): no crash leaves a run no sync can find.
        run = run or client.create_run(str(self.experiment_id), start_time=span[0], tags=tags, run_name=name)
        if trial.status in (TrialStatus.FAILED, TrialStatus.DIVERGED, TrialStatus.NO_BETTER) and trial.error:
            tags[ERROR_TAG] = trial.error
        elif ERROR_TAG in run.data.tags:  # failed once, then completed on --resume
            client.delete_tag(run.info.run_id, ERROR_TAG)
        synced = run.data.tags.get(SYNCED_TAG, "0")
        metrics = self._metrics(trial, after=int(synced) if synced.isdigit() else 0)
        _update(client, run, {**tags, _RUN_NAME_TAG: name}, trial.params, metrics)
        if metrics:  # after the points: a crash in between logs them again, which adds nothing (_stamp)
            client.set_tag(run.info.run_id, SYNCED_TAG, str(max(trial.epochs)))
        _set_status(client, run, _RUN_STATUS.get(trial.status, "KILLED" if closing else "RUNNING"), span[1])

    def _metrics(self, trial: TrialRecord, after: int) -> list[Metric]:
        """The trial's evaluations after ``after`` at step = the evaluation index (the record's key,
        :func:`tune.study.evaluation_index`; with one evaluation per epoch, the epoch): the objective first, then its best so far
        (``best_<objective>``, what the runs table sorts by), then the rest; ``aux_loss`` only where it
        was ever non-zero (a MoE model)."""
        aux = any(m.get("aux_loss", 0.0) != 0.0 for m in trial.epochs.values())
        objective, best, out = self.objective, None, []
        best_key = f"best_{objective.metric}"
        for epoch, values in sorted(trial.epochs.items()):
            value = values.get(objective.metric, math.nan)
            best = objective.best_of([value] if best is None else [best, value])
            row = {k: v for k, v in values.items() if k not in _NOT_METRICS and (aux or k != "aux_loss")}
            if best is not None:
                row[best_key] = best
            if epoch > after:
                out += [Metric(k, float(row[k]), _stamp(values), epoch)
                        for k in sorted(row, key=lambda k: (k != objective.metric, k != best_key, k))]
        return out


def delete_study_runs(tracking_uri: str, study_id: str) -> int:
    """Soft-delete every run of study ``study_id`` in the store (``mlflow runs restore`` undoes it), for
    ``--restart`` with a store outside the study folder; returns how many went. Raises ValueError for
    a value that is not a study id, :class:`TrackingError` when MLflow fails."""
    where, client = _where({STUDY_ID_TAG: study_id}), MlflowClient(tracking_uri=tracking_uri)
    try:
        experiments = [e.experiment_id for e in client.search_experiments(max_results=_MAX_RUNS)]
        runs = client.search_runs(experiments, where, ViewType.ACTIVE_ONLY, _MAX_RUNS) if experiments else []
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")
            client.delete_run(run.info.run_id)
        return len(runs)
    except Exception as exc:
        raise TrackingError(f"MLflow at {tracking_uri}: could not delete the runs of study {study_id}: "
                            f"{first_line(exc)}") from exc


def trials_compare_url(tracking_server_url: str, tracking_uri: str, study_dir: Path) -> str | None:
    """The MLflow UI's compare view of the study's trial runs that report its objective, best first;
    None while the store has none. The study's own run stays out: it holds every fixed setting (ticking
    the runs table's header box selects it too, and the compare view then opens on settings that only
    it has, with no metric)."""
    manifest = Study.open(Path(study_dir)).manifest
    spec = manifest.spec
    tune = spec.get("tune") or {}
    objective = Objective.of(tune)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(str((spec.get("mlflow") or {}).get("experiment")
                                                   or tracking.DEFAULT_EXPERIMENT))
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], _where({STUDY_ID_TAG: manifest.study_id, ROLE_TAG: "trial"}),
                              ViewType.ACTIVE_ONLY, _MAX_RUNS,
                              [f"metrics.`best_{objective.metric}` {'ASC' if objective.minimize else 'DESC'}"])
    ids = [run.info.run_id for run in runs if objective.metric in run.data.metrics]
    return tracking.compare_runs_url(tracking_server_url, experiment.experiment_id, ids) if ids else None


class MirrorCallback(Callback):
    """Ray Tune callback (driver side): syncs a trial's run on each of its results and at its end.

    ``numbers`` maps Ray trial ids to record trial numbers (the searcher fills it). The first failure
    prints one warning and ends live mirroring (with a dead server each attempt costs MLflow's full
    timeout). Pickled copies (Ray keeps callbacks in ``tuner.pkl``) are inert."""

    def __init__(self, mirror: Mirror, numbers: Mapping[str, int]) -> None:
        self.mirror: Mirror | None = mirror
        self.numbers = numbers
        self.live = True

    def __getstate__(self) -> dict[str, Any]:
        return {"mirror": None, "numbers": {}, "live": False}

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, *_: Any, **__: Any) -> None:
        number = self.numbers.get(trial.trial_id)
        if not self.live or self.mirror is None or number is None:
            return
        try:
            self.mirror.sync([number])
        except Exception as exc:  # noqa: BLE001 - a mirror failure must never fail the study
            self.live = False
            # The cause, not TrackingError's advice: the warning gives its own.
            cause = exc.__cause__ if isinstance(exc, TrackingError) and exc.__cause__ is not None else exc
            print(f"warning: MLflow mirror unavailable ({self.mirror.tracking_uri}: {first_line(cause)}); the study "
                  f"goes on, and `python -m tune.mirror {self.mirror.study_dir}` or --resume catches MLflow up later",
                  file=sys.stderr, flush=True)

    on_trial_complete = on_trial_error = on_trial_result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tune.mirror STUDY_DIR [--tracking-uri URI]``: sync the study's mirror; without a live
    driver, also close its parent run as the record stands. Returns the exit status (2: an error)."""
    parser = argparse.ArgumentParser(prog="python -m tune.mirror", description="Bring the MLflow mirror of a study "
                                     "up to date with its record (idempotent).")
    parser.add_argument("study_dir", type=Path, help="the study folder (holds study.json)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the one the study's "
                        "last run used, as study.json records it; for a study that records none, its "
                        f"mlflow.tracking_uri, else ${tracking.TRACKING_URI_ENV}, else sqlite in the study folder)")
    args = parser.parse_args(argv)
    try:
        record = Study.open(args.study_dir.resolve())
        spec, held = record.manifest.spec, StudyLock.held(record.dir)
        configured = spec.get("mlflow") or {}
        uri = (args.tracking_uri and tracking.resolve_tracking_uri(args.tracking_uri, record.dir)) or (
            tracking.recorded_tracking_uri(record.dir, record.manifest)
            or tracking.resolve_tracking_uri(configured.get("tracking_uri"), record.dir))
        experiment = str(configured.get("experiment") or tracking.DEFAULT_EXPERIMENT)
        sections = {s: dict(spec[s]) for s in ("model", "data", "train") if isinstance(spec.get(s), Mapping)}
        fixed = {k: v for k, v in flatten_dict(sections, delimiter=".").items() if k not in (spec.get("search") or {})}
        mirror = Mirror(uri, experiment, record, fixed_params=fixed, settings=spec.get("tune") or {}, tags={})
        mirror.sync(closing=not held)
        # Without a driver, a parent left RUNNING (by a killed driver, or created just now) is closed
        # as the record stands; one a driver closed keeps its status.
        if not held and mirror.parent_status == "RUNNING":
            trials, objective = record.trials(), mirror.objective
            # The answer by the end report's rule (the seeds' labels, the only use of train.seed here, are not shown).
            finalist = next((f for f in finalist_configs(trials, objective, 0)[:1] if math.isfinite(f.mean)), None)
            best = answer(trials, objective, [finalist] if finalist else [])
            epoch, value = best.best(objective) if best is not None else (None, None)
            mean = {} if finalist is None else {  # (then its config is the answer)
                f"best_mean_{objective.metric}": finalist.mean, f"best_std_{objective.metric}": finalist.std}
            status = ("KILLED" if any(t.status in RESUMABLE for t in trials) else "FINISHED" if best else "FAILED")
            found = {name: record.dir / name for name in ("best.yaml", "summary.csv")}
            found.update({f"plots/{p.name}": p for p in sorted((record.dir / "plots").glob("*.png"))})
            # The study ended with its last recorded trial time (its driver is gone).
            ends = [end for _, end in mirror._spans(trials).values() if end is not None]
            mirror.finish(status, best=best, best_value=value, best_epoch=epoch,
                          end_time=max(ends, default=None), study_metrics=mean,
                          artifacts={k: p for k, p in found.items() if p.is_file()})
    except (StudyError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow mirror of {record.dir} is up to date ({len(record.trials())} trial runs, "
          f"{'a driver is running the study' if held else 'closed'}): experiment {experiment!r} at {uri}")
    return 0


def warn_on_failure(call: Callable[[], object]) -> bool:
    """Run a mirror call; a tracking failure is a warning on stderr, never the study's failure.
    Returns whether it succeeded."""
    try:
        call()
        return True
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; none may fail the study
        advice = "" if isinstance(exc, TrackingError) else (
            "; the study's record is complete: `python -m tune.mirror <study dir>` catches MLflow up later")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        print(f"warning: MLflow was not updated: {reason}{advice}", file=sys.stderr)
        return False


if __name__ == "__main__":
    sys.exit(main())
