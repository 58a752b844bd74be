"""MLflow tracking for a study: one parent run per study, one nested child run per Ray Tune trial.

Everything here talks to MLflow through an explicit :class:`mlflow.tracking.MlflowClient`, never
through ``mlflow.start_run``: the driver handles many concurrent trials, and MLflow's global
"active run" would attach their metrics to whichever run was started last.

How ``tune/run.py`` wires it (in this order)::

    from tune.tracking import StudyTracker, TrackingError, check_tracking_server, resolve_tracking_uri

    uri = resolve_tracking_uri(spec.mlflow.tracking_uri, study_dir)   # YAML, $MLFLOW_TRACKING_URI, sqlite
    check_tracking_server(uri)             # before trials start: TrackingError within seconds, naming uri
    tracker = StudyTracker(uri)            # sqlite URIs keep artifacts in <db dir>/mlartifacts
    parent_id = tracker.start(
        study_name=name,
        experiment=spec.mlflow.experiment,
        fixed_params={"train.epochs": 3, ...},        # flat dotted keys (nested mappings are flattened)
        settings={"searcher": ..., "num_samples": ..., "resources": {...}},   # logged as tune.<key>
        space_text=spec.text,              # artifact space.yaml
        tags={"git_commit": ..., "dataset_fingerprint": ..., "tokenizer": ..., "model_parameters": ...},
        resume=args.resume,                # True: reopens this study's parent run (found by tag)
    )
    callback = tracker.trial_callback(
        parent_id,                         # optional; must be the id start() returned
        param_keys=["train.learning_rate", ...],   # dotted paths of the searched params
        metric_keys=None,                  # None: every numeric, finite metric except Ray's bookkeeping
        planned_epochs=run_cfg.train.epochs,
    )
    tuner = tune.Tuner(..., run_config=tune.RunConfig(callbacks=[callback]))   # or after restore
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        tracker.finish("interrupted")      # or "KILLED"; every exit path must call finish once
        raise
    ...
    tracker.finish(
        "completed",                       # completed|failed|interrupted or FINISHED|FAILED|KILLED
        best={"trial_id": ..., "metric": "val_loss", "value": 1.23, "epoch": 3,
              "params": {"train.learning_rate": 3e-4}},      # or a BestTrial; None if no trial finished
        artifacts={"best.yaml": best_yaml, "best/model.pth": ckpt / "model.pth",
                   **{f"plots/{k}": p for k, p in plot_study(...).items()}},   # run path -> local path
        summary_csv=study_dir / "summary.csv",
    )

``finish`` also marks any child run still RUNNING as KILLED (``close_dangling_runs``), so an
interrupted study never leaves runs that look alive in the UI.

Resume: ``Tuner.restore`` unpickles the callback from ``tuner.pkl``; it holds only the URI and
ids (the client and run index are rebuilt lazily), and those ids stay valid because
``tracker.start(resume=True)`` reopens the same parent run. Child runs are found again by the
``ray.trial_id`` tag under that parent, and epochs already in MLflow are not logged twice.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.tracking import MlflowClient
from ray.tune import Callback

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = [
    "FAILURE_TAG",
    "PARENT_RUN_TAG",
    "ROLE_TAG",
    "STATUS_TAG",
    "STUDY_TAG",
    "TRIAL_ID_TAG",
    "BestTrial",
    "MlflowTrialCallback",
    "StudyStatus",
    "StudyTracker",
    "TrackingError",
    "TrialStatus",
    "check_tracking_server",
    "close_dangling_runs",
    "default_artifact_location",
    "filter_metrics",
    "flatten",
    "is_http_uri",
    "resolve_tracking_uri",
    "sqlite_db_path",
]

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
STUDY_TAG = "minimind.study"
ROLE_TAG = "minimind.role"
STATUS_TAG = "minimind.status"
FAILURE_TAG = "minimind.failure_reason"
EPOCHS_TAG = "minimind.epochs"
TRIAL_ID_TAG = "ray.trial_id"
# MLflow's own tag: the UI nests a run under the run this names.
PARENT_RUN_TAG = "mlflow.parentRunId"

TrialStatus = Literal["running", "completed", "stopped_early", "failed", "interrupted"]
StudyStatus = Literal["completed", "failed", "interrupted"]

_STUDY_RUN_STATUS: dict[str, str] = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_TRIAL_RUN_STATUS: dict[str, str] = {
    "completed": "FINISHED",
    "stopped_early": "KILLED",
    "failed": "FAILED",
    "interrupted": "KILLED",
}

# MLflow's documented limits (mlflow.utils.validation), kept here because that module is internal.
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VAL_LENGTH = 6000
_MAX_TAG_VAL_LENGTH = 8000
# A one-line failure reason keeps the runs table readable; the full traceback goes to error.txt.
_MAX_REASON_LENGTH = 500

# Keys Ray Tune adds to every result; they describe the scheduler's bookkeeping, not the model.
_RAY_RESULT_KEYS = frozenset(
    {
        "done",
        "training_iteration",
        "trial_id",
        "date",
        "timestamp",
        "pid",
        "hostname",
        "node_ip",
        "experiment_id",
        "experiment_tag",
        "iterations_since_restore",
        "time_since_restore",
        "time_this_iter_s",
        "time_total_s",
        "timesteps_total",
        "timesteps_since_restore",
        "episodes_total",
        "checkpoint_dir_name",
        "should_checkpoint",
        "warmup_time",
        "trial_resources",
    }
)
_RAY_RESULT_PREFIXES = ("config/", "time_", "__")
# Ray colours the actor name in its error text ("\x1b[36mray::ImplicitFunc.train()\x1b[39m").
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class TrackingError(RuntimeError):
    """The tracking backend is unusable; the message names the URI and what to do about it."""


def resolve_tracking_uri(configured: str | None, study_dir: Path) -> str:
    """The study's tracking URI: the YAML value, else ``$MLFLOW_TRACKING_URI``, else a per-study sqlite db.

    Relative sqlite paths become absolute, so the driver, the UI and a later resume (possibly from
    another working directory) all open the same database file.
    """
    uri = configured or os.environ.get(TRACKING_URI_ENV) or ""
    uri = uri.strip()
    if not uri:
        return f"sqlite:///{(Path(study_dir) / 'mlflow.db').resolve()}"
    return _absolute_sqlite_uri(uri)


def _absolute_sqlite_uri(uri: str) -> str:
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = uri[len(prefix):]
    # "sqlite:////abs" carries the root slash in `path`; ":memory:" and query strings stay as given.
    if not path or path.startswith(("/", ":memory:")) or "?" in path:
        return uri
    return f"{prefix}{Path(path).resolve()}"


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other URIs and in-memory databases."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix):].split("?", 1)[0]
    if not path or path.startswith(":memory:"):
        return None
    return Path(path)


def is_http_uri(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (rather than a database the client opens itself)."""
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite db; the server decides for http URIs.

    Without this MLflow would put sqlite-backed artifacts in ``./mlruns`` of whatever directory the
    driver happened to start in.
    """
    db = sqlite_db_path(tracking_uri)
    if db is None:
        return None
    return str(db.resolve().parent / "mlartifacts")


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any trial starts, when ``uri`` cannot be used for tracking.

    HTTP(S) servers get one short ``GET <uri>/health`` through urllib: MLflow's own client retries
    with backoff for minutes before it reports an unreachable server. Other URIs are opened once
    through MLflow (a sqlite db is created, its folder too), which also rejects the deprecated
    folder store with MLflow's explanation.
    """
    if is_http_uri(uri):
        _check_http(uri, timeout_s)
        return
    db = sqlite_db_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the folder of the MLflow database {uri}: {exc}") from exc
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"MLflow tracking URI {uri} is not usable: {exc}") from exc


def _check_http(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}, after "
            f"{time.monotonic() - started:.1f}s). Start it (e.g. `python -m tune.ui`, or "
            f"`mlflow server --host 127.0.0.1 --port N`), fix mlflow.tracking_uri in the study YAML "
            f"or ${TRACKING_URI_ENV}, or leave both unset to track into the study's own sqlite db."
        ) from exc
    # A proxy in front of MLflow may not route /health (404) or may want credentials (401/403);
    # those still prove a server answers, and MLflow's client reports auth problems precisely.
    if status >= 500:
        raise TrackingError(f"MLflow tracking server {uri} answered HTTP {status} on {url}; is it healthy?")


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (``{'train': {'lr': 1}}`` -> ``{'train.lr': 1}``).

    Ray's flattened ``a/b`` keys become ``a.b`` too, so searched params match the run config paths.
    """
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}".replace("/", ".")
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _flatten_result(result: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    # Ray's own convention for nested results is '/', which also keeps 'config/...' recognisable.
    flat: dict[str, Any] = {}
    for key, value in result.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_result(value, f"{path}/"))
        else:
            flat[path] = value
    return flat


def _is_noise(key: str) -> bool:
    return key in _RAY_RESULT_KEYS or key.startswith(_RAY_RESULT_PREFIXES)


def _finite_number(value: Any) -> float | None:
    # bool is an int subclass, but "done: True" is not a metric.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def filter_metrics(result: Mapping[str, Any], metric_keys: Sequence[str] | None = None) -> dict[str, float]:
    """The model metrics in a Tune result: numeric and finite, without Ray's bookkeeping keys.

    With ``metric_keys`` only those keys are kept (still numeric and finite).
    """
    flat = _flatten_result(result)
    if metric_keys is not None:
        candidates = {key: flat[key] for key in metric_keys if key in flat}
    else:
        candidates = {key: value for key, value in flat.items() if not _is_noise(key)}
    metrics: dict[str, float] = {}
    for key, value in candidates.items():
        number = _finite_number(value)
        if number is not None:
            metrics[key] = number
    return metrics


def _param_value(value: Any) -> str:
    return str(value)[:_MAX_PARAM_VAL_LENGTH]


def _tag_value(value: Any) -> str:
    return str(value)[:_MAX_TAG_VAL_LENGTH]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    entries = [Param(key, _param_value(value)) for key, value in params.items()]
    for chunk in _chunks(entries, _MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk, synchronous=True)


def _log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    entries = [RunTag(key, _tag_value(value)) for key, value in tags.items()]
    for chunk in _chunks(entries, _MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk, synchronous=True)


def _log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    stamp = _now_ms()
    entries = [Metric(key, value, stamp, step) for key, value in metrics.items()]
    for chunk in _chunks(entries, _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk, synchronous=True)


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000, page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _children_filter(parent_run_id: str) -> str:
    # Run ids are hex, so quoting is safe; tag keys with dots need backticks in MLflow's grammar.
    return f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"


def close_dangling_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> list[str]:
    """Mark every child of ``parent_run_id`` that is still RUNNING as KILLED; returns their run ids.

    Such runs belong to trials that never reported completion or failure (a Ctrl-C, a dead driver,
    a time budget), and would otherwise look alive in the UI forever.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    closed: list[str] = []
    for run in _search_all(client, experiment_id, _children_filter(parent_run_id)):
        if run.info.status != "RUNNING":
            continue
        _log_tags(client, run.info.run_id, {STATUS_TAG: "interrupted"})
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    if closed:
        logger.info("marked %d unfinished trial run(s) as KILLED", len(closed))
    return closed


@dataclass(frozen=True)
class BestTrial:
    """The study's best trial, as the driver found it; ``finish`` attaches it to the parent run.

    ``metric`` names the parent's metric ``best_<metric>`` (``best_value`` without it);
    ``checkpoint`` (the fp16 ``model.pth``) and ``best_yaml`` are logged under ``best/``.
    """

    value: float
    trial_id: str | None = None
    trial_name: str | None = None
    metric: str | None = None
    epoch: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    best_yaml: Path | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> BestTrial:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrackingError(f"best trial has unknown keys {unknown}; allowed: {sorted(known)}")
        if "value" not in data:
            raise TrackingError("best trial is missing 'value'")
        values = dict(data)
        for name in ("checkpoint", "best_yaml"):
            if values.get(name) is not None:
                values[name] = Path(values[name])
        return cls(**values)


@dataclass
class _TrialRun:
    # Mutable on purpose: the callback advances last_step as epochs arrive.
    run_id: str
    last_step: int


class MlflowTrialCallback(Callback):
    """Ray Tune callback (driver side): one nested MLflow run per trial, metrics per epoch.

    Child runs carry ``mlflow.parentRunId`` (so the UI nests them), ``ray.trial_id`` (so a resumed
    study finds them again) and the run name of the trial. Params are the searched values only,
    by dotted config path; the fixed config lives on the parent. ``step`` is Ray's
    ``training_iteration``, i.e. the epoch, since the trainable reports once per epoch.

    End states (tag ``minimind.status`` / MLflow status): ``completed`` / FINISHED when the trial
    reached ``planned_epochs``; ``stopped_early`` / KILLED when it ended sooner (scheduler, stopper);
    ``failed`` / FAILED with ``minimind.failure_reason`` and the full error in ``error.txt``.
    At the experiment's end, runs of trials Ray no longer knows (lost with a killed driver) are
    tagged ``lost`` and soft-deleted.

    MLflow errors are logged and swallowed unless ``strict``: losing a metric point must not kill
    hours of training. The instance pickles without its client or run index (Tune stores callbacks
    in ``tuner.pkl``); both are rebuilt from MLflow on first use.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        param_keys: Sequence[str],
        metric_keys: Sequence[str] | None = None,
        *,
        planned_epochs: int,
        study_name: str | None = None,
        strict: bool = False,
    ) -> None:
        if planned_epochs < 1:
            raise ValueError(f"planned_epochs must be >= 1, got {planned_epochs}")
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.param_keys = list(param_keys)
        self.metric_keys = None if metric_keys is None else list(metric_keys)
        self.planned_epochs = planned_epochs
        self.study_name = study_name
        self.strict = strict
        self._client: MlflowClient | None = None
        # trial_id -> its run; None until the parent's children were looked up in MLflow.
        self._runs: dict[str, _TrialRun] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_runs"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @contextmanager
    def _guard(self, hook: str, trial: Trial | None) -> Iterator[None]:
        try:
            yield
        except Exception:
            if self.strict:
                raise
            logger.warning("MLflow %s failed for trial %s; training continues", hook, trial, exc_info=True)

    # --- run index -------------------------------------------------------------------------------

    def _index(self) -> dict[str, _TrialRun]:
        if self._runs is None:
            runs: dict[str, _TrialRun] = {}
            for run in _search_all(self.client, self.experiment_id, _children_filter(self.parent_run_id)):
                trial_id = run.data.tags.get(TRIAL_ID_TAG)
                if trial_id is None:
                    continue
                if trial_id in runs:
                    logger.warning("two MLflow runs for trial %s; logging into %s", trial_id,
                                   runs[trial_id].run_id)
                    continue
                runs[trial_id] = _TrialRun(run.info.run_id, self._last_step(run))
            self._runs = runs
        return self._runs

    def _last_step(self, run: Run) -> int:
        # The metric history is the truth after a crash: whatever reached MLflow is not re-logged.
        last = 0
        for key in run.data.metrics:
            for metric in self.client.get_metric_history(run.info.run_id, key):
                last = max(last, int(metric.step))
        return last

    def _run_for(self, trial: Trial) -> _TrialRun:
        runs = self._index()
        entry = runs.get(trial.trial_id)
        if entry is None:
            entry = _TrialRun(self._create_run(trial), 0)
            runs[trial.trial_id] = entry
        return entry

    def _create_run(self, trial: Trial) -> str:
        tags = {
            PARENT_RUN_TAG: self.parent_run_id,
            TRIAL_ID_TAG: trial.trial_id,
            ROLE_TAG: "trial",
            STATUS_TAG: "running",
        }
        if self.study_name:
            tags[STUDY_TAG] = self.study_name
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=str(trial))
        params = self._trial_params(trial)
        if params:
            _log_params(self.client, run.info.run_id, params)
        logger.debug("MLflow run %s for trial %s", run.info.run_id, trial)
        return run.info.run_id

    def _trial_params(self, trial: Trial) -> dict[str, Any]:
        config = flatten(trial.config or {})
        return {key: config[key] for key in self.param_keys if key in config}

    def _reopen(self, run_id: str) -> None:
        run = self.client.get_run(run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
            _log_tags(self.client, run_id, {STATUS_TAG: "running"})

    def _end(self, run_id: str, status: TrialStatus, extra_tags: Mapping[str, Any]) -> None:
        _log_tags(self.client, run_id, {STATUS_TAG: status, **extra_tags})
        self.client.set_terminated(run_id, status=_TRIAL_RUN_STATUS[status])

    # --- Tune hooks ------------------------------------------------------------------------------

    def setup(self, **info: Any) -> None:
        with self._guard("setup", None):
            parent = self.client.get_run(self.parent_run_id)
            if parent.info.lifecycle_stage != "active":
                raise TrackingError(f"parent run {self.parent_run_id} in {self.tracking_uri} was deleted")

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        with self._guard("on_trial_start", trial):
            # A resumed or retried trial continues in its old run, which may have been closed.
            self._reopen(self._run_for(trial).run_id)

    def on_trial_restore(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.on_trial_start(iteration, trials, trial)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        with self._guard("on_trial_result", trial):
            entry = self._run_for(trial)
            step = result.get("training_iteration")
            step = int(step) if isinstance(step, numbers.Integral) else entry.last_step + 1
            if step <= entry.last_step:
                logger.debug("trial %s epoch %d already in MLflow; not logged again", trial, step)
                return
            metrics = filter_metrics(result, self.metric_keys)
            if metrics:
                _log_metrics(self.client, entry.run_id, metrics, step)
            entry.last_step = step

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        with self._guard("on_trial_complete", trial):
            entry = self._run_for(trial)
            reported = (trial.last_result or {}).get("training_iteration")
            epochs = max(entry.last_step, int(reported) if isinstance(reported, numbers.Integral) else 0)
            status: TrialStatus = "completed" if epochs >= self.planned_epochs else "stopped_early"
            self._end(entry.run_id, status, {EPOCHS_TAG: epochs})

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        with self._guard("on_trial_error", trial):
            entry = self._run_for(trial)
            text = _error_text(trial)
            if text:
                self.client.log_text(entry.run_id, text, "error.txt")
            self._end(entry.run_id, "failed", {FAILURE_TAG: _failure_reason(text), EPOCHS_TAG: entry.last_step})

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # Tune retries the trial (max_failures); the run stays open and records why it restarted.
        with self._guard("on_trial_recover", trial):
            run_id = self._run_for(trial).run_id
            failures = getattr(getattr(trial, "run_metadata", None), "num_failures", None)
            tags: dict[str, Any] = {"minimind.last_error": _failure_reason(_error_text(trial))}
            if failures is not None:
                tags["minimind.failures"] = failures
            _log_tags(self.client, run_id, tags)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # Trials Tune never completed (time budget, interrupt) stay PENDING/PAUSED/RUNNING in Ray.
        with self._guard("on_experiment_end", None):
            for trial in trials:
                entry = self._index().get(trial.trial_id)
                if entry is None:
                    continue
                if self.client.get_run(entry.run_id).info.status == "RUNNING":
                    self._end(entry.run_id, "interrupted", {EPOCHS_TAG: entry.last_step})
            self._delete_lost_runs({trial.trial_id for trial in trials})

    def _delete_lost_runs(self, known: set[str]) -> None:
        # A driver killed after a trial started but before Ray's next experiment snapshot leaves an
        # MLflow run for a trial that --resume never sees again: Ray resumes from the snapshot, and
        # its searcher may suggest the same values under a new trial id. Kept, that run would be a
        # duplicate "interrupted" trial forever; soft-deleted it stays restorable (`mlflow runs restore`).
        for trial_id, entry in list(self._index().items()):
            if trial_id in known:
                continue
            logger.warning("MLflow run %s: trial %s was lost with a killed driver (Ray resumed without "
                           "it); the run is deleted", entry.run_id, trial_id)
            if self.client.get_run(entry.run_id).info.status == "RUNNING":
                self.client.set_terminated(entry.run_id, status="KILLED")
            _log_tags(self.client, entry.run_id, {STATUS_TAG: "lost"})
            self.client.delete_run(entry.run_id)
            del self._index()[trial_id]


def _error_text(trial: Trial) -> str:
    """The trial's error as Ray stored it, without terminal colours; empty when unreadable."""
    return _ANSI_ESCAPE.sub("", _raw_error_text(trial))


def _raw_error_text(trial: Trial) -> str:
    # At on_trial_error time Ray has written error.txt into the driver's staging folder only;
    # get_error() reads the synced copy in storage, which appears later.
    try:
        local = getattr(trial, "error_file", None)
        if local and Path(local).is_file():
            return Path(local).read_text(errors="replace")
    except (OSError, AttributeError):
        logger.debug("trial %s: local error file unreadable", trial, exc_info=True)
    for getter in ("get_error", "get_pickled_error"):
        method = getattr(trial, getter, None)
        if method is None:
            continue
        try:
            error = method()
        except Exception:
            logger.debug("trial %s: %s() failed", trial, getter, exc_info=True)
            continue
        if error:
            return str(error)
    return ""


def _failure_reason(text: str) -> str:
    """The last meaningful line of a traceback, e.g. ``TrialDiverged: loss is nan at step 12``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Ray's error file starts each entry with "Failure # n (occurred at ...)".
    lines = [line for line in lines if not line.startswith("Failure #")]
    if not lines:
        return "unknown error (Ray recorded no error text)"
    return lines[-1][:_MAX_REASON_LENGTH]


class StudyTracker:
    """The parent run of one study, owned by the driver process."""

    def __init__(self, tracking_uri: str, artifact_location: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location or default_artifact_location(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.study_name: str | None = None

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, artifact_location=self.artifact_location)
        if experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {name!r} in {self.tracking_uri} is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set "
                f"another mlflow.experiment"
            )
        return experiment.experiment_id

    def _find_parent(self, experiment_id: str, study_name: str) -> Run | None:
        # Study names are user text; matching in Python avoids quoting them into a filter string.
        candidates = [
            run
            for run in _search_all(self.client, experiment_id, f"tags.`{ROLE_TAG}` = 'parent'")
            if run.data.tags.get(STUDY_TAG) == study_name
        ]
        if not candidates:
            return None
        candidates.sort(key=lambda run: run.info.start_time or 0, reverse=True)
        if len(candidates) > 1:
            logger.warning(
                "%d parent runs for study %r; reopening the newest (%s)",
                len(candidates), study_name, candidates[0].info.run_id,
            )
        return candidates[0]

    def _delete_study_runs(self, experiment_id: str, study_name: str) -> None:
        # A store outside the study folder (a server, $MLFLOW_TRACKING_URI) outlives --restart's rmtree.
        parents = [run for run in _search_all(self.client, experiment_id, f"tags.`{ROLE_TAG}` = 'parent'")
                   if run.data.tags.get(STUDY_TAG) == study_name]
        for parent in parents:
            runs = [*_search_all(self.client, experiment_id, _children_filter(parent.info.run_id)), parent]
            for run in runs:
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, status="KILLED")
                self.client.delete_run(run.info.run_id)
            logger.warning("--restart: deleted MLflow run %s of study %r and its %d trial run(s)",
                           parent.info.run_id, study_name, len(runs) - 1)

    def start(
        self,
        study_name: str,
        experiment: str,
        fixed_params: Mapping[str, Any],
        settings: Mapping[str, Any],
        space_text: str,
        tags: Mapping[str, Any],
        resume: bool = False,
        restart: bool = False,
    ) -> str:
        """Create (or, with ``resume``, reopen) the study's parent run; returns its run id.

        ``fixed_params`` are logged as they are (nested mappings as dotted keys), ``settings`` under
        ``tune.``. MLflow params are immutable: on resume a changed value keeps the original param
        and records the new one as the tag ``minimind.resumed_with.<key>``. ``restart`` soft-deletes
        the study's earlier parent and trial runs (``mlflow runs restore`` brings them back).
        """
        self.study_name = study_name
        self.experiment_id = self._experiment_id(experiment)
        if restart and not resume:
            self._delete_study_runs(self.experiment_id, study_name)
        existing = self._find_parent(self.experiment_id, study_name)
        if existing is not None and not resume:
            raise TrackingError(
                f"study {study_name!r} already has a parent run ({existing.info.run_id}) in experiment "
                f"{experiment!r} at {self.tracking_uri}; resume it (--resume), discard it (--restart) "
                f"or choose another study name (--name)"
            )
        params = {**flatten(fixed_params), **flatten(settings, "tune.")}
        all_tags = {**tags, STUDY_TAG: study_name, ROLE_TAG: "parent"}
        if existing is None:
            if resume:
                logger.warning("no parent run for study %r in %s; starting a new one", study_name,
                               self.tracking_uri)
            run = self.client.create_run(
                self.experiment_id,
                tags={key: _tag_value(value) for key, value in {**all_tags, STATUS_TAG: "running"}.items()},
                run_name=study_name,
            )
            run_id = run.info.run_id
            _log_params(self.client, run_id, params)
        else:
            run_id = existing.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            logged = existing.data.params
            changed = {key: value for key, value in params.items()
                       if key in logged and logged[key] != _param_value(value)}
            for key, value in changed.items():
                logger.warning("param %s changed on resume (%s -> %s); MLflow keeps %s",
                               key, logged[key], value, logged[key])
            _log_params(self.client, run_id, {k: v for k, v in params.items() if k not in logged})
            resumes = int(existing.data.tags.get("minimind.resumes", "0")) + 1
            _log_tags(self.client, run_id, {
                **all_tags,
                STATUS_TAG: "running",
                "minimind.resumes": resumes,
                **{f"minimind.resumed_with.{key}": value for key, value in changed.items()},
            })
        self.client.log_text(run_id, space_text, "space.yaml")
        self.parent_run_id = run_id
        return run_id

    def _require_started(self) -> tuple[str, str]:
        if self.experiment_id is None or self.parent_run_id is None:
            raise TrackingError("StudyTracker.start() must be called first")
        return self.experiment_id, self.parent_run_id

    def trial_callback(
        self,
        parent_run_id: str | None = None,
        *,
        param_keys: Sequence[str],
        metric_keys: Sequence[str] | None = None,
        planned_epochs: int,
        strict: bool = False,
    ) -> MlflowTrialCallback:
        """The Tune callback logging this study's trials under its parent run.

        ``parent_run_id`` may be passed for clarity; it must be the id ``start`` returned.
        """
        experiment_id, own_parent = self._require_started()
        if parent_run_id is not None and parent_run_id != own_parent:
            raise TrackingError(f"parent run {parent_run_id} is not this study's ({own_parent})")
        return MlflowTrialCallback(
            self.tracking_uri, experiment_id, own_parent, param_keys, metric_keys,
            planned_epochs=planned_epochs, study_name=self.study_name, strict=strict,
        )

    def finish(
        self,
        status: StudyStatus | str,
        best: BestTrial | Mapping[str, Any] | None = None,
        artifacts: Mapping[str, Path] | None = None,
        summary_csv: Path | None = None,
    ) -> None:
        """Attach the study's results to the parent run and end it (FINISHED / FAILED / KILLED).

        ``status`` is ``completed`` / ``failed`` / ``interrupted``, or the MLflow run status
        ``FINISHED`` / ``FAILED`` / ``KILLED``. ``artifacts`` maps a path inside the run to a local
        file or folder: ``{"best.yaml": p, "plots": plot_dir, "plots/history": png}``; a key without
        a suffix takes the file's (so ``plot_study``'s ``{name: png}`` can be passed through).
        ``summary_csv`` lands at the run's root. A missing file is a warning: ``finish`` runs in the
        driver's ``finally`` and must still end the runs. Child runs left RUNNING are marked KILLED.
        """
        minimind_status = _study_status(status)
        experiment_id, run_id = self._require_started()
        best_trial = BestTrial.from_mapping(best) if isinstance(best, Mapping) else best
        try:
            close_dangling_runs(self.tracking_uri, experiment_id, run_id)
            if best_trial is not None:
                self._log_best(run_id, experiment_id, best_trial)
            for target, path in (artifacts or {}).items():
                self._log_as(run_id, Path(path), target)
            if summary_csv is not None:
                self._log_as(run_id, Path(summary_csv), Path(summary_csv).name)
        finally:
            _log_tags(self.client, run_id, {STATUS_TAG: minimind_status})
            self.client.set_terminated(run_id, status=_STUDY_RUN_STATUS[minimind_status])

    def _log_best(self, run_id: str, experiment_id: str, best: BestTrial) -> None:
        tags: dict[str, Any] = {}
        if best.trial_name or best.trial_id:
            tags["minimind.best_trial"] = best.trial_name or best.trial_id
        if best.metric:
            tags["minimind.best_metric"] = best.metric
        if best.epoch is not None:
            tags["minimind.best_epoch"] = best.epoch
        if best.trial_id:
            tags["minimind.best_trial_id"] = best.trial_id
            child = [
                run for run in _search_all(self.client, experiment_id, _children_filter(run_id))
                if run.data.tags.get(TRIAL_ID_TAG) == best.trial_id
            ]
            if child:
                tags["minimind.best_run_id"] = child[0].info.run_id
        tags.update({f"best.{key}": value for key, value in flatten(best.params).items()})
        _log_tags(self.client, run_id, tags)
        value = _finite_number(best.value)
        if value is not None:
            name = f"best_{best.metric}" if best.metric else "best_value"
            self.client.log_metric(run_id, name, value, timestamp=_now_ms(), step=0)
        for path in (best.checkpoint, best.best_yaml):
            if path is not None:
                self._log_as(run_id, Path(path), f"best/{Path(path).name}")

    def _log_as(self, run_id: str, source: Path, target: str) -> None:
        target = target.strip("/")
        if source.is_dir():
            self.client.log_artifacts(run_id, str(source), target or None)
            return
        if not source.is_file():
            logger.warning("artifact %s does not exist; not logged", source)
            return
        path = PurePosixPath(target) if target else PurePosixPath(source.name)
        if not path.suffix and source.suffix:
            path = path.with_name(path.name + source.suffix)
        folder = None if str(path.parent) == "." else str(path.parent)
        if path.name == source.name:
            self.client.log_artifact(run_id, str(source), folder)
            return
        # MLflow names an artifact after its file; a symlink renames it without copying a checkpoint.
        with tempfile.TemporaryDirectory(prefix="minimind-artifact-") as tmp:
            link = Path(tmp) / path.name
            link.symlink_to(source.resolve())
            self.client.log_artifact(run_id, str(link), folder)


def _study_status(status: str) -> StudyStatus:
    by_mlflow_name = {mlflow_name: name for name, mlflow_name in _STUDY_RUN_STATUS.items()}
    if status in _STUDY_RUN_STATUS:
        return status  # type: ignore[return-value]
    if status in by_mlflow_name:
        return by_mlflow_name[status]  # type: ignore[return-value]
    allowed = sorted(_STUDY_RUN_STATUS) + sorted(by_mlflow_name)
    raise ValueError(f"study status must be one of {allowed}, got {status!r}")
