"""MLflow as a mirror of the study record: one parent run per study, one nested run per trial.

The record (``tune.study``) is the truth; :meth:`Mirror.sync` copies it into MLflow from any process, as
often as wanted. Runs are found by their tags (``minimind.study_id``, ``minimind.trial``), never by name,
and nest through the ``mlflow.parentRunId`` tag: no crash between two MLflow calls leaves a second run.
A failing store never fails a study: :class:`MirrorCallback` warns once, and ``python -m tune.mirror
STUDY_DIR`` (or ``--resume``) catches MLflow up later. All calls go through an explicit ``MlflowClient``:
MLflow's global active run cannot serve concurrent trials.
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
import urllib.parse
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

__all__ = ["CONFIG_TAG", "ERROR_TAG", "NOTE_TAG", "PARENT_RUN_TAG", "ROLE_TAG", "STATUS_TAG", "STUDY_DIR_TAG",
           "STUDY_ID_TAG", "STUDY_TAG", "SYNCED_TAG", "TRIAL_TAG", "Mirror", "MirrorCallback", "delete_study_runs",
           "main", "run_name", "study_urls", "warn_on_failure"]

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


def _span(trial: TrialRecord) -> tuple[int | None, int | None]:
    """The trial's start and end as the record has them (ms since the Unix epoch), not the mirror's sync
    times: its first training step (else when Optuna asked it) to Optuna's completion, else its last
    report, else its start; a trial resumed in a later driver run spans both and the pause between."""
    step = trial.first_metrics.get("time_epoch_start_unix", math.nan)
    start = int(step * 1000) if math.isfinite(step) else _ms(trial.started)
    report = trial.epochs[max(trial.epochs)].get("timestamp_ms", math.nan) if trial.epochs else math.nan
    return start, _ms(trial.completed) or (int(report) if math.isfinite(report) else start)


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
        self.name = record.manifest.name
        # The study's start (ms since the Unix epoch): its parent run's start time.
        self.created = int(datetime.fromisoformat(record.manifest.created).timestamp() * 1000)
        # The parent's params (the trials' runs hold only their searched values).
        self.params = {**flatten_dict(dict(fixed_params), delimiter="."),
                       **{f"tune.{k}": v for k, v in flatten_dict(dict(settings), delimiter=".").items()}}
        self.tags = {k if k.startswith(("minimind.", "mlflow.")) else f"minimind.{k}": str(v) for k, v in tags.items()}
        self.objective = Objective.of(record.manifest.spec.get("tune") or {})
        self.search_keys = [str(k) for k in record.manifest.spec.get("search") or {}]
        self.experiment_id: str | None = None
        self.parent_status: str | None = None  # the parent run's MLflow status as of the last call
        self._client: MlflowClient | None = None

    @classmethod
    def of_record(cls, record: Study, tracking_uri: str | None = None) -> Mirror:
        """The mirror as the study's spec defines it (its fixed config and tune section as the parent's
        params), in ``tracking_uri`` (default: the store it recorded, else its spec's)."""
        spec = record.manifest.spec
        sections = {s: dict(spec[s]) for s in ("model", "data", "train") if isinstance(spec.get(s), Mapping)}
        fixed = {k: v for k, v in flatten_dict(sections, delimiter=".").items() if k not in (spec.get("search") or {})}
        configured = spec.get("mlflow") or {}
        uri = (tracking_uri and tracking.resolve_tracking_uri(tracking_uri, record.dir)) or tracking.recorded_tracking_uri(
            record.dir, record.manifest) or tracking.resolve_tracking_uri(configured.get("tracking_uri"), record.dir)
        return cls(uri, str(configured.get("experiment") or tracking.DEFAULT_EXPERIMENT), record,
                   fixed_params=fixed, settings=spec.get("tune") or {}, tags={})

    def sync(self, numbers: Iterable[int] | None = None, *, closing: bool = False) -> None:
        """Bring the parent run and the given trials' runs (None: every trial) up to date with the record.
        ``running`` trials' runs are RUNNING, as is the parent, while the driver lives; with ``closing``
        they become KILLED (their driver is gone) and the parent's status is left to :meth:`finish`."""
        wanted = None if numbers is None else set(numbers)
        with self._session("sync") as client:
            parent = self._parent(client, running=not closing)
            runs = self._runs(client, "trial", min(wanted) if wanted and len(wanted) == 1 else None)
            trials = self.record.trials()
            configs = {t.number: run_name(t, self.search_keys) for t in trials if t.finalist_of is None}
            for trial in trials:
                if wanted is None or trial.number in wanted:
                    config = configs.get(trial.number if trial.finalist_of is None else trial.finalist_of, "")
                    self._sync_trial(client, parent.info.run_id, runs.get(str(trial.number)), trial, closing, config)

    def finish(self, status: str, *, artifacts: Mapping[str, Path], study_metrics: Mapping[str, float] | None = None,
               end_time: int | None = None) -> None:
        """Close the mirror: every trial synced (``closing``), the study's answer (:func:`tune.study.answer`)
        on the parent run, which ends with ``status`` (FINISHED, FAILED or KILLED; FINISHED without an answer
        is FAILED) at ``end_time`` (ms since the Unix epoch; None: now) and starts when the study was created.

        The parent's name and description state the answer (its value, the mean over seeds where finalists
        ran, the command that retrains it). ``artifacts`` maps a path in the run to a local file (a missing
        one is a warning: this runs in the driver's ``finally``). ``study_best_<objective>`` (not the trials'
        ``best_<objective>``, which the runs table sorts by), the finalists' ``best_mean_``/``best_std_`` and
        ``study_metrics`` are logged at step = the number of finished trials: a later finish adds a point."""
        if status not in _STUDY_STATUS:
            raise ValueError(f"status must be one of {sorted(_STUDY_STATUS)}, got {status!r}")
        self.sync(closing=True)
        trials, objective, metric = self.record.trials(), self.objective, self.objective.metric
        finalists = finalist_configs(trials, objective, 0)  # (base seed 0: only the seeds' labels use it)
        best = answer(trials, objective, finalists)
        status = "FAILED" if status == "FINISHED" and best is None else status
        mean = finalists[0] if best is not None and finalists and math.isfinite(finalists[0].mean) else None
        values = {**({} if mean is None else {f"best_mean_{metric}": mean.mean, f"best_std_{metric}": mean.std}),
                  **(study_metrics or {})}
        search = [t for t in trials if t.finalist_of is None]
        counts = Counter("unfinished" if t.status == TrialStatus.RUNNING else t.status.replace("_", " ")
                         for t in search)
        tally = f"{len(search)} trials: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + "."
        if len(trials) > len(search):
            tally += f" {len(trials) - len(search)} finalist runs (top configs with other seeds)."
        with self._session("finish") as client:
            parent, step = self._parent(client, running=False), sum(t.status in FINISHED for t in trials)
            metrics = [Metric(k, float(v), int(time.time() * 1000), step) for k, v in values.items()]
            tags = {STATUS_TAG: _STUDY_STATUS[status], _RUN_NAME_TAG: self.name, NOTE_TAG: f"No trial completed. {tally}"}
            if best is not None:
                epoch, value = best.best(objective)
                config, run = run_name(best, self.search_keys), self._runs(client, "trial", best.number).get(str(best.number))
                link = f"[{config}](#/experiments/{self.experiment_id}/runs/{run.info.run_id})" if run else config
                retrain = Path(artifacts.get("best.yaml", self.record.dir / "best.yaml")).resolve()
                tags |= {BEST_TRIAL_TAG: best.name, **({} if run is None else {BEST_RUN_TAG: run.info.run_id}),
                         _RUN_NAME_TAG: f"{self.name}: best {config}, " + (
                             f"{metric} {value:.4g}" if mean is None else
                             f"mean {metric} {mean.mean:.4g} over {len(mean.values)} seeds"),
                         NOTE_TAG: f"**Best trial {link}**: {metric} {value:.4g}{f' at epoch {epoch}' if epoch else ''}"
                                   + ("" if mean is None else f"; over seeds, mean {mean.mean:.4g} ± {mean.std:.2g}")
                                   + f".\n\nRetrain it: `python -m minimind_train.sft --config {retrain}`\n\n{tally}"}
                # Stamped as its epoch: finishing again adds no point.
                metrics.append(Metric(f"study_best_{metric}", value, _stamp(best.epochs.get(epoch, {})), step))
            _update(client, parent, tags, {}, [m for m in metrics if math.isfinite(m.value)])
            for target, path in artifacts.items():
                if Path(path).is_file():
                    client.log_artifact(parent.info.run_id, str(path), target.strip("/").rpartition("/")[0] or None)
                else:
                    logger.warning("artifact %s does not exist; not logged to MLflow", path)
            client.set_terminated(parent.info.run_id, status=status, end_time=end_time)
            self.parent_status = status

    @contextlib.contextmanager
    def _session(self, what: str) -> Iterator[MlflowClient]:
        """The connection, under the study's mirror lock (two syncs at once could each create a run for
        one new trial); any failure becomes a :class:`TrackingError`, and the next call reconnects."""
        try:
            with tracking.locked_file(Path(self.record.dir) / MIRROR_LOCK):
                if self._client is None:
                    tracking.check_tracking_server(self.tracking_uri)  # (fast: MLflow's client retries for minutes)
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
                client.create_experiment(self.experiment, artifact_location=tracking.artifact_location(self.tracking_uri))
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
        """The study's saved view of the runs table as ``(experiment tag, value)``: its runs grouped by
        :data:`CONFIG_TAG` (a group's row: the mean over its seeds), best first, the study's own run in
        the open group of runs without one. MLflow 3.17's UI lists it under "Views" and opens it by
        ``viewStateShareKey=<study id>`` (its format: an envelope with the table state as a JSON string)."""
        best_key = f"metrics.`best_{self.objective.metric}`"
        selected = [best_key, f"metrics.`{self.objective.metric}`", *(f"params.`{k}`" for k in self.search_keys),
                    f"tags.`{STATUS_TAG}`"]
        # ~6 px a character of the longest name: a group's label "Group: t000 k=v ..." beside its expander,
        # colour and count, or the study's run's (:meth:`finish`).
        config = len("t000") + sum(len(_ABBREVIATIONS.get(k.rsplit(".", 1)[-1], k)) + 9 for k in self.search_keys)
        label = max(len("Group: ") + config + 10,
                    len(f"{self.name}: best , mean {self.objective.metric} 0.0000 over 2 seeds") + config)
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
            {"name": f"{self.name}: best {self.objective.metric} first", "createdAt": self.created,
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
        tags = {**self.tags, STUDY_ID_TAG: self.study_id, STUDY_TAG: self.name, ROLE_TAG: "parent",
                STUDY_DIR_TAG: self.study_dir}
        run = self._runs(client, "parent").get("parent") or client.create_run(
            str(self.experiment_id), start_time=self.created, run_name=self.name,
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
                    closing: bool, config: str) -> None:
        name, (start, end) = run_name(trial, self.search_keys), _span(trial)
        tags = {STUDY_ID_TAG: self.study_id, STUDY_TAG: self.name, ROLE_TAG: "trial",
                TRIAL_TAG: str(trial.number), PARENT_RUN_TAG: parent_id, STATUS_TAG: trial.status, CONFIG_TAG: config}
        # The identity tags go in with the run (one request): no crash leaves a run no sync can find.
        run = run or client.create_run(str(self.experiment_id), start_time=start, tags=tags, run_name=name)
        if trial.status in (TrialStatus.FAILED, TrialStatus.DIVERGED, TrialStatus.NO_BETTER) and trial.error:
            tags[ERROR_TAG] = trial.error
        elif ERROR_TAG in run.data.tags:  # failed once, then completed on --resume
            client.delete_tag(run.info.run_id, ERROR_TAG)
        synced = run.data.tags.get(SYNCED_TAG, "0")
        metrics = self._metrics(trial, after=int(synced) if synced.isdigit() else 0)
        _update(client, run, {**tags, _RUN_NAME_TAG: name}, trial.params, metrics)
        if metrics:  # after the points: a crash in between logs them again, which adds nothing (_stamp)
            client.set_tag(run.info.run_id, SYNCED_TAG, str(max(trial.epochs)))
        _set_status(client, run, _RUN_STATUS.get(trial.status, "KILLED" if closing else "RUNNING"), end)

    def _metrics(self, trial: TrialRecord, after: int) -> list[Metric]:
        """The trial's evaluations after ``after`` at step = the evaluation index: the objective first, then
        its best so far (``best_<objective>``, which the runs table sorts by), then the rest; ``aux_loss``
        only where it was ever non-zero (a MoE model)."""
        aux = any(m.get("aux_loss", 0.0) != 0.0 for m in trial.epochs.values())
        objective, best_key, best, out = self.objective, f"best_{self.objective.metric}", None, []
        for epoch, values in sorted(trial.epochs.items()):
            best = objective.best_of([v for v in (best, values.get(objective.metric, math.nan)) if v is not None])
            row = {k: v for k, v in values.items() if k not in _NOT_METRICS and (aux or k != "aux_loss")}
            row |= {} if best is None else {best_key: best}
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


def study_urls(server_url: str, study_dir: Path, tracking_uri: str | None = None) -> tuple[str | None, str | None]:
    """The MLflow UI's addresses of the study at ``study_dir`` (its runs in ``tracking_uri``; default: the
    store it recorded): its runs table, through its saved view once a sync wrote it, else sorted best
    first; and the compare view of its trial runs that report the objective, best first. None: the store
    has no experiment of the study, or no such runs. The study's own run stays out of the comparison: it
    holds every fixed setting, and the compare view would open on settings only it has, with no metric."""
    mirror = Mirror.of_record(Study.open(Path(study_dir)), tracking_uri)
    client, objective = MlflowClient(tracking_uri=mirror.tracking_uri), mirror.objective
    experiment = client.get_experiment_by_name(mirror.experiment)
    if experiment is None:
        return None, None
    view = mirror.study_id if tracking.VIEW_TAG_PREFIX + mirror.study_id in experiment.tags else None
    table, order = tracking.runs_table_url(server_url, experiment.experiment_id, view), f"metrics.`best_{objective.metric}`"
    if view is None:  # (the UI's sort as it keeps it in its URL)
        table += "&" + urllib.parse.urlencode({"orderByKey": order, "orderByAsc": str(objective.minimize).lower()})
    runs = client.search_runs([experiment.experiment_id], _where({STUDY_ID_TAG: mirror.study_id, ROLE_TAG: "trial"}),
                              ViewType.ACTIVE_ONLY, _MAX_RUNS, [f"{order} {'ASC' if objective.minimize else 'DESC'}"])
    ids = [run.info.run_id for run in runs if objective.metric in run.data.metrics]
    return table, tracking.compare_runs_url(server_url, experiment.experiment_id, ids) if ids else None


class MirrorCallback(Callback):
    """Ray Tune callback (driver side): syncs a trial's run on each of its results and at its end.
    ``numbers`` maps Ray trial ids to record trial numbers (the searcher fills it). The first failure
    warns once and ends live mirroring (each call to a dead server costs MLflow's full timeout).
    Pickled copies (Ray keeps callbacks in ``tuner.pkl``) are inert."""

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
        mirror, held = Mirror.of_record(record, args.tracking_uri), StudyLock.held(record.dir)
        mirror.sync(closing=not held)
        # Without a driver, a parent left RUNNING (by a killed driver, or created just now) is closed
        # as the record stands, at its last recorded trial time; one a driver closed keeps its status.
        if not held and mirror.parent_status == "RUNNING":
            trials = record.trials()
            found = {name: record.dir / name for name in ("best.yaml", "summary.csv")}
            found.update({f"plots/{p.name}": p for p in sorted((record.dir / "plots").glob("*.png"))})
            ends = [end for _, end in map(_span, trials) if end is not None]
            mirror.finish("KILLED" if any(t.status in RESUMABLE for t in trials) else "FINISHED",
                          artifacts={k: p for k, p in found.items() if p.is_file()}, end_time=max(ends, default=None))
    except (StudyError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow mirror of {record.dir} is up to date ({len(record.trials())} trial runs, "
          f"{'a driver is running the study' if held else 'closed'}): experiment {mirror.experiment!r} at "
          f"{mirror.tracking_uri}")
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
