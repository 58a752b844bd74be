"""MLflow as a mirror of the study record: one parent run per study, one nested run per trial.

The record (``tune.record``: ``study.json`` + ``optuna.db``) is the truth. :meth:`Mirror.sync` copies
it into MLflow at any time, from any process, as often as wanted, and never makes a second run for a
study or a trial: runs are found by their tags (``minimind.study_id``, ``minimind.trial``) through
MLflow's own ``search_runs``, and a trial's run nests under the study's through the
``mlflow.parentRunId`` tag, as Ray's ``MLflowLoggerCallback`` does. A crash between any two MLflow
calls leaves nothing the next sync cannot pick up, and a failing tracking store never fails a study:
:class:`MirrorCallback` warns once and stops, and ``python -m tune.mirror STUDY_DIR`` (or
``--resume``) catches MLflow up later. Everything goes through an explicit ``MlflowClient``, never
``mlflow.start_run``: MLflow's global "active run" cannot serve many concurrent trials.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import math
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.utils import flatten_dict

from .record import FINISHED, MANIFEST_FILE, RESUMABLE, RecordError, StudyLock, StudyRecord, TrialRecord

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = [
    "DEFAULT_EXPERIMENT", "ERROR_TAG", "NOTE_TAG", "PARENT_RUN_TAG", "ROLE_TAG", "STATUS_TAG", "STUDY_DIR_TAG",
    "STUDY_ID_TAG", "STUDY_TAG", "SYNCED_TAG", "TRACKING_URI_ENV", "TRIAL_TAG", "Mirror", "MirrorCallback",
    "TrackingError", "check_tracking_server", "delete_study_runs", "is_http_uri", "main", "resolve_tracking_uri",
    "run_name", "runs_table_url", "sqlite_db_path", "study_runs_url",
]

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "minimind-sft"
DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MIRROR_LOCK = ".mirror.lock"

STUDY_ID_TAG = "minimind.study_id"
STUDY_TAG = "minimind.study"
STUDY_DIR_TAG = "minimind.study_dir"
ROLE_TAG = "minimind.role"
TRIAL_TAG = "minimind.trial"
STATUS_TAG = "minimind.status"
ERROR_TAG = "minimind.error"
SYNCED_TAG = "minimind.synced_epochs"
BEST_TRIAL_TAG = "minimind.best_trial"
BEST_RUN_TAG = "minimind.best_run_id"
# MLflow's own tags: the UI nests a run under the run the first names, and shows the second as the
# run's description.
PARENT_RUN_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"

# Record status -> MLflow run status; "running" is RUNNING while the driver lives, else KILLED.
_RUN_STATUS = {"completed": "FINISHED", "stopped_early": "FINISHED", "failed": "FAILED", "diverged": "FAILED",
               "abandoned": "FAILED", "interrupted": "KILLED"}
# finish(status) -> the parent's minimind.status tag.
_STUDY_STATUS = {"FINISHED": "completed", "FAILED": "failed", "KILLED": "interrupted"}
# Record keys that are bookkeeping, not model metrics (the timestamp becomes the point's own; the
# epoch is the step).
_NOT_METRICS = frozenset({*AUTO_RESULT_KEYS, "epoch", "timestamp_ms", "time_epoch_start_unix"})
# MLflow's largest search page; no study has that many trials.
_MAX_RUNS = 50000
# Searched keys by their last path component, shortened for run names.
_ABBREVIATIONS = {"learning_rate": "lr", "accumulation_steps": "acc", "grad_clip": "clip", "min_lr_ratio": "min_lr",
                  "warmup_steps": "warmup", "weight_decay": "wd", "batch_size": "bs", "dropout": "drop",
                  "hidden_size": "hidden", "num_hidden_layers": "layers"}


class TrackingError(RuntimeError):
    """The tracking backend is unusable; the message names the URI and what to do about it."""


# ---------------------------------------------------------------------------------------------------
# Where the tracking store is.


def resolve_tracking_uri(configured: str | None, study_dir: Path) -> str:
    """The study's tracking URI: the YAML value, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<study_dir>/mlflow.db``. Relative sqlite paths become absolute, so the driver, the UI
    and a later resume from another working directory all open the same file."""
    uri = (configured or os.environ.get(TRACKING_URI_ENV) or "").strip()
    if not uri:
        return f"sqlite:///{(Path(study_dir) / DEFAULT_DB).resolve()}"
    db = sqlite_db_path(uri)
    return uri if db is None or db.is_absolute() or "?" in uri else f"sqlite:///{db.resolve()}"


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other URIs and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and not path.startswith(":memory:") else None


def is_http_uri(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[IO[str] | None]:
    """An exclusive ``fcntl.flock`` on ``path`` (the kernel drops it with a killed holder); yields the
    open file, or None where the folder is read-only (then nothing else writes there either)."""
    try:
        fh = path.open("a+", encoding="utf-8")
    except OSError:
        yield None
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield fh


def _open_sqlite(uri: str, db: Path) -> None:
    """Open a sqlite store (MLflow creates and migrates a new one) under ``<db>.lock``.

    Two processes migrating one new file at once make one of them fail. The lock file also keeps
    the folder the store was written from: a study's own store copied or moved with its folder
    (its artifact paths point into the old one) is deleted here, before MLflow opens it (MLflow
    keeps one engine per URI for the life of the process), and the next sync rebuilds it.
    """
    db.parent.mkdir(parents=True, exist_ok=True)
    here = str(db.parent.resolve())
    own = db.name == DEFAULT_DB and (db.parent / MANIFEST_FILE).is_file()
    with _locked(db.with_name(db.name + ".lock")) as fh:
        written_from = ""
        if fh is not None:
            fh.seek(0)
            written_from = fh.read().strip()
        if own and written_from not in ("", here) and db.exists():
            logger.warning("MLflow store %s was written from %s; rebuilding it from the record", db, written_from)
            for suffix in ("", "-journal", "-wal", "-shm"):
                db.with_name(db.name + suffix).unlink(missing_ok=True)
            shutil.rmtree(db.parent / ARTIFACTS_DIR, ignore_errors=True)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        if own and fh is not None and written_from != here:
            fh.truncate(0)
            fh.write(here)


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any trial starts, with a :class:`TrackingError` when ``uri`` is unusable.

    HTTP(S) servers get one short ``GET <uri>/health`` (MLflow's client retries for minutes before it
    reports an unreachable server); a sqlite store is opened (created if new); other URIs are opened
    once through MLflow, which also rejects the deprecated folder store with its own explanation.
    """
    if is_http_uri(uri):
        _check_http(uri, timeout_s)
        return
    db = sqlite_db_path(uri)
    try:
        if db is None:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            return
        db.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(f"MLflow database {uri} is not writable; fix its permissions or set another "
                                f"mlflow.tracking_uri")
        _open_sqlite(uri, db)
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"MLflow tracking URI {uri} is not usable: {_one_line(exc)}") from exc


def _check_http(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}, after "
            f"{time.monotonic() - started:.1f}s). Start it (e.g. `python -m tune.ui`, or `mlflow server --host "
            f"127.0.0.1 --port N`), fix mlflow.tracking_uri in the study YAML or ${TRACKING_URI_ENV}, or leave "
            f"both unset to track into the study's own sqlite db.") from exc
    # A proxy may not route /health (404) or may want credentials (401/403): a server still answers,
    # and MLflow's client reports auth problems precisely.
    if status >= 500:
        raise TrackingError(f"MLflow tracking server {uri} answered HTTP {status} on {url}; is it healthy?")


def runs_table_url(tracking_server_url: str, experiment_id: str, *, study_id: str | None = None,
                   objective: str | None = None, mode: str = "min") -> str:
    """The MLflow UI address of an experiment's runs table in the model-training view (MLflow 3 opens
    an experiment on its GenAI overview otherwise), filtered to one study's runs and sorted by
    ``best_<objective>`` (each run's best value so far; the parent's is the study's), best first.

    The query keys are the runs page's URL state in MLflow 3.17's frontend (``searchFilter``,
    ``orderByKey``, ``orderByAsc``); a UI that does not know one ignores it.
    """
    query = {"workflowType": "machine_learning"}
    if study_id is not None:
        query["searchFilter"] = _where({STUDY_ID_TAG: study_id})
    if objective is not None:
        query.update(orderByKey=f"metrics.`best_{objective}`", orderByAsc="true" if mode == "min" else "false")
    encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    return f"{tracking_server_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{encoded}"


def study_runs_url(tracking_server_url: str, study_dir: Path, tracking_uri: str | None = None) -> str | None:
    """:func:`runs_table_url` of the study at ``study_dir`` (its runs, sorted by its objective) in the
    store at ``tracking_uri`` (default: the study's own); None when that store has no such experiment."""
    manifest = StudyRecord.open(Path(study_dir)).manifest
    spec = manifest.spec
    uri = tracking_uri or resolve_tracking_uri((spec.get("mlflow") or {}).get("tracking_uri"), Path(study_dir))
    name = str((spec.get("mlflow") or {}).get("experiment") or DEFAULT_EXPERIMENT)
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if experiment is None:
        return None
    tune_spec = spec.get("tune") or {}
    return runs_table_url(tracking_server_url, experiment.experiment_id, study_id=manifest.study_id,
                          objective=str(tune_spec.get("metric") or "val_loss"), mode=str(tune_spec.get("mode") or "min"))


# ---------------------------------------------------------------------------------------------------
# Small helpers.


def _one_line(exc: BaseException) -> str:
    first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return first[:300] + ("..." if len(first) > 300 else "")


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
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e4):
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    if 1e-2 <= abs(value) < 1e4:
        return f"{value:.{max(0, 1 - math.floor(math.log10(abs(value))))}f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def run_name(trial: TrialRecord, key_order: Sequence[str] = ()) -> str:
    """``t003 lr=2.3e-3 acc=1 clip=0.90``: the trial's name and its searched values, short (a key by
    its last component, abbreviated; the whole key where two would clash)."""
    keys = [k for k in key_order if k in trial.params] + sorted(k for k in trial.params if k not in key_order)
    short = {k: _ABBREVIATIONS.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys}
    clashes = Counter(short.values())
    labels = {k: label if clashes[label] == 1 else k for k, label in short.items()}
    return " ".join([trial.name, *(f"{labels[k]}={_short_number(trial.params[k])}" for k in keys)])


def _stamp(metrics: Mapping[str, float]) -> int:
    # The recorded time makes a point logged again identical to the first (MLflow stores one row
    # per key, step, timestamp and value); without one, a fixed stamp keeps that property.
    stamp = metrics.get("timestamp_ms", 0.0)
    return int(stamp) if math.isfinite(stamp) else 0


# ---------------------------------------------------------------------------------------------------
# The mirror.


class Mirror:
    """The MLflow copy of one study record; connects on first use.

    Every public method raises :class:`TrackingError` (naming the URI) on any MLflow failure; it
    caches nothing of MLflow's state but the connection, so each call starts from what MLflow has.
    """

    def __init__(self, tracking_uri: str, experiment: str, record: StudyRecord, *, fixed_params: Mapping[str, Any],
                 settings: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.record = record
        # The parent's params: the fixed config, and the tuner's settings under "tune." (the trials'
        # runs hold only their searched values).
        self.params = {**flatten_dict(dict(fixed_params), delimiter="."),
                       **{f"tune.{k}": v for k, v in flatten_dict(dict(settings), delimiter=".").items()}}
        self.tags = {k if k.startswith(("minimind.", "mlflow.")) else f"minimind.{k}": str(v) for k, v in tags.items()}
        spec = record.manifest.spec
        self.objective = str((spec.get("tune") or {}).get("metric") or "val_loss")
        self.mode = str((spec.get("tune") or {}).get("mode") or "min")
        self.search_keys = [str(k) for k in spec.get("search") or {}]
        self.experiment_id: str | None = None
        self.parent_status: str | None = None  # the parent run's MLflow status as of the last call
        self._client: MlflowClient | None = None

    @property
    def study_id(self) -> str:
        return self.record.manifest.study_id

    @property
    def study_dir(self) -> str:
        return str(Path(self.record.dir).resolve())

    def sync(self, numbers: Iterable[int] | None = None, *, closing: bool = False) -> None:
        """Bring the parent run and the given trials' runs (None: every trial) up to date with the record.

        Without ``closing`` the driver is alive: the parent run is RUNNING, and so are the runs of
        ``running`` trials. With ``closing`` the parent's status is left to :meth:`finish` and
        ``running`` trials become KILLED (their driver is gone).
        """
        wanted = None if numbers is None else set(numbers)
        with self._guard("sync"), _locked(Path(self.record.dir) / MIRROR_LOCK):
            client = self._connect()
            parent = self._parent(client, running=not closing)
            runs = self._trial_runs(client, wanted)
            for trial in self.record.trials():
                if wanted is None or trial.number in wanted:
                    self._sync_trial(client, parent, runs.get(trial.number), trial, closing)

    def finish(self, status: str, *, best: TrialRecord | None, best_value: float | None, best_epoch: int | None,
               artifacts: Mapping[str, Path], study_metrics: Mapping[str, float] | None = None) -> None:
        """Close the mirror: every trial synced (``closing``), results attached, the parent run ended.

        ``status`` is the parent's MLflow status (FINISHED, FAILED or KILLED). The parent's description
        names the best trial, its ``best_value`` (at ``best_epoch``) and the command that retrains it.
        ``artifacts`` maps a path inside the run to a local file, which keeps its own name in that
        path's folder; a missing one is a warning (this runs in the driver's ``finally``).
        ``best_<objective>`` and ``study_metrics`` (e.g. ``rung_fidelity_epoch_1``) are logged on the
        parent at step = the number of finished trials: finishing again after more trials adds a point.
        """
        if status not in _STUDY_STATUS:
            raise ValueError(f"status must be one of {sorted(_STUDY_STATUS)}, got {status!r}")
        self.sync(closing=True)
        with self._guard("finish"), _locked(Path(self.record.dir) / MIRROR_LOCK):
            client = self._connect()
            parent = self._parent(client, running=False)
            trials = self.record.trials()
            step = sum(t.status in FINISHED for t in trials)
            tags = {STATUS_TAG: _STUDY_STATUS[status]}
            metrics = [Metric(k, float(v), int(time.time() * 1000), step) for k, v in (study_metrics or {}).items()]
            best_run = None
            if best is not None:
                best_run = self._trial_runs(client, {best.number}).get(best.number)
                tags[BEST_TRIAL_TAG] = best.name
                if best_run is not None:
                    tags[BEST_RUN_TAG] = best_run.info.run_id
                if best_value is not None:
                    # The best epoch's own timestamp: finishing twice with the same best adds no point.
                    stamp = _stamp(best.epochs.get(best_epoch or 0, {}))
                    metrics.append(Metric(f"best_{self.objective}", float(best_value), stamp, step))
            tags[NOTE_TAG] = self._note(trials, best, best_value, best_epoch, best_run, artifacts)
            client.log_batch(parent, metrics=[m for m in metrics if math.isfinite(m.value)],
                             tags=[RunTag(k, v) for k, v in tags.items()])
            for target, path in artifacts.items():
                if not Path(path).is_file():
                    logger.warning("artifact %s does not exist; not logged to MLflow", path)
                    continue
                folder = str(PurePosixPath(target.strip("/")).parent)
                client.log_artifact(parent, str(path), None if folder == "." else folder)
            client.set_terminated(parent, status=status)
            self.parent_status = status

    def _note(self, trials: list[TrialRecord], best: TrialRecord | None, value: float | None, epoch: int | None,
              best_run: Run | None, artifacts: Mapping[str, Path]) -> str:
        """The parent's description (Markdown): the best trial, its value, how to retrain it, the tally."""
        counts = Counter({"running": "unfinished"}.get(t.status, t.status).replace("_", " ") for t in trials)
        tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        if best is None:
            return f"No trial completed. {len(trials)} trials: {tally}."
        name = f"[{best.name}](#/experiments/{self.experiment_id}/runs/{best_run.info.run_id})" if best_run else best.name
        shown = "" if value is None else f": {self.objective} {value:.4g}" + ("" if epoch is None else f" at epoch {epoch}")
        config = Path(artifacts.get("best.yaml", Path(self.record.dir) / "best.yaml")).resolve()
        return (f"**Best trial {name}** `{run_name(best, self.search_keys)}`{shown}.\n\n"
                f"Retrain it: `python -m minimind_train.sft --config {config}`\n\n{len(trials)} trials: {tally}.")

    # -- MLflow ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            self._client = None  # the next call connects (and checks the server) again
            if isinstance(exc, TrackingError):
                raise
            raise TrackingError(
                f"MLflow mirror {what} at {self.tracking_uri} failed ({type(exc).__name__}: {_one_line(exc)}); "
                f"the study record is unaffected: fix the tracking store, then `python -m tune.mirror "
                f"{self.study_dir}` catches MLflow up") from exc

    def _connect(self) -> MlflowClient:
        if self._client is None:
            if is_http_uri(self.tracking_uri):
                _check_http(self.tracking_uri, 5.0)  # MLflow's own client would retry for minutes
            db = sqlite_db_path(self.tracking_uri)
            if db is not None:
                _open_sqlite(self.tracking_uri, db)
            client = MlflowClient(tracking_uri=self.tracking_uri)
            self.experiment_id = self._experiment(client, db)
            self._client = client
        return self._client

    def _experiment(self, client: MlflowClient, db: Path | None) -> str:
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            # Artifacts beside a sqlite db (MLflow would use ./mlruns of whatever folder the driver
            # started in); a server decides for itself.
            location = str(db.resolve().parent / ARTIFACTS_DIR) if db is not None else None
            try:
                return client.create_experiment(self.experiment, artifact_location=location)
            except Exception:
                experiment = client.get_experiment_by_name(self.experiment)  # created meanwhile by another driver
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {self.experiment!r} in {self.tracking_uri} is deleted; restore it "
                                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set "
                                f"another mlflow.experiment")
        return experiment.experiment_id

    def _search(self, client: MlflowClient, tags: Mapping[str, str]) -> list[Run]:
        """The study's active runs with ``tags``, oldest first."""
        assert self.experiment_id is not None
        return list(client.search_runs([self.experiment_id], _where({STUDY_ID_TAG: self.study_id, **tags}),
                                       ViewType.ACTIVE_ONLY, _MAX_RUNS, ["attributes.start_time ASC"]))

    @staticmethod
    def _oldest(client: MlflowClient, runs: list[Run], what: str) -> Run:
        # Only two processes creating a run at the same moment make duplicates; keep the oldest.
        for other in runs[1:]:
            logger.warning("MLflow run %s duplicates run %s of %s; deleted", other.info.run_id, runs[0].info.run_id,
                           what)
            client.delete_run(other.info.run_id)
        return runs[0]

    def _parent(self, client: MlflowClient, running: bool) -> str:
        """The parent run's id, found or created, its tags and params up to date."""
        assert self.experiment_id is not None
        tags = {**self.tags, STUDY_ID_TAG: self.study_id, STUDY_TAG: self.record.manifest.name, ROLE_TAG: "parent",
                STUDY_DIR_TAG: self.study_dir}
        found = self._search(client, {ROLE_TAG: "parent"})
        if found:
            run = self._oldest(client, found, f"study {self.study_id}")
        else:
            run = client.create_run(self.experiment_id, run_name=self.record.manifest.name,
                                    tags={**tags, STATUS_TAG: "running"})
        if running:
            tags[STATUS_TAG] = "running"
        # MLflow params are immutable: a value changed by a later driver run is kept as a tag.
        logged = run.data.params
        tags.update({f"minimind.latest.{k}": str(v) for k, v in self.params.items()
                     if k in logged and logged[k] != str(v)})
        changed = [RunTag(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
        params = [Param(k, str(v)) for k, v in self.params.items() if k not in logged]
        if changed or params:
            client.log_batch(run.info.run_id, params=params, tags=changed)
        if running and run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        self.parent_status = "RUNNING" if running else run.info.status
        return run.info.run_id

    def _trial_runs(self, client: MlflowClient, numbers: set[int] | None) -> dict[int, Run]:
        """Trial number -> its run (duplicates deleted), for ``numbers`` (None: every trial)."""
        only = {TRIAL_TAG: str(next(iter(numbers)))} if numbers is not None and len(numbers) == 1 else {}
        by_number: dict[int, list[Run]] = {}
        for run in self._search(client, {ROLE_TAG: "trial", **only}):
            by_number.setdefault(int(run.data.tags[TRIAL_TAG]), []).append(run)
        return {n: self._oldest(client, runs, f"trial {n}") for n, runs in by_number.items()
                if numbers is None or n in numbers}

    def _sync_trial(self, client: MlflowClient, parent: str, run: Run | None, trial: TrialRecord,
                    closing: bool) -> None:
        assert self.experiment_id is not None
        name = run_name(trial, self.search_keys)
        tags = {STUDY_ID_TAG: self.study_id, STUDY_TAG: self.record.manifest.name, ROLE_TAG: "trial",
                TRIAL_TAG: str(trial.number), PARENT_RUN_TAG: parent, STATUS_TAG: trial.status}
        if run is None:
            # The identity tags go in with the run (one request): no crash leaves a run that the next
            # sync cannot find.
            run = client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        if trial.status in ("failed", "diverged") and trial.error:
            tags[ERROR_TAG] = trial.error
        elif ERROR_TAG in run.data.tags:  # failed once, then completed on --resume
            client.delete_tag(run_id, ERROR_TAG)
        synced = run.data.tags.get(SYNCED_TAG, "0")
        synced_epochs = int(synced) if synced.isdigit() else 0
        metrics = self._metrics(trial, after=synced_epochs)
        changed = [RunTag(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
        params = [Param(k, str(v)) for k, v in trial.params.items() if k not in run.data.params]
        if metrics or params or changed:
            client.log_batch(run_id, metrics=metrics, params=params, tags=changed)
        if metrics:
            # After the points: a crash in between only logs the same points again, which MLflow
            # stores once (see _stamp).
            client.set_tag(run_id, SYNCED_TAG, str(max(trial.epochs)))
        if run.info.run_name != name:
            client.update_run(run_id, name=name)
        status = _RUN_STATUS.get(trial.status, "KILLED" if closing else "RUNNING")
        if status != run.info.status:
            if status == "RUNNING":
                client.update_run(run_id, status="RUNNING")
            else:
                client.set_terminated(run_id, status=status)

    def _metrics(self, trial: TrialRecord, after: int) -> list[Metric]:
        """The trial's epochs after ``after`` at step = epoch: the objective first, then its best so far
        (``best_<objective>``, what the runs table sorts by), then the rest; ``aux_loss`` only if ever
        non-zero (a MoE model)."""
        aux = any(m.get("aux_loss", 0.0) != 0.0 for m in trial.epochs.values())
        sign = 1.0 if self.mode == "min" else -1.0
        best = math.inf
        out = []
        for epoch, values in sorted(trial.epochs.items()):
            value = values.get(self.objective, math.nan)
            best = min(best, sign * value) if math.isfinite(value) else best
            if epoch <= after:
                continue
            keys = sorted((k for k in values if k not in _NOT_METRICS and (aux or k != "aux_loss")),
                          key=lambda k: (k != self.objective, k))
            points = [Metric(k, float(values[k]), _stamp(values), epoch) for k in keys]
            if math.isfinite(best):
                points.insert(1 if self.objective in values else 0,
                              Metric(f"best_{self.objective}", sign * best, _stamp(values), epoch))
            out += points
        return out


# ---------------------------------------------------------------------------------------------------
# Live mirroring from the driver; deleting a study's runs.


def delete_study_runs(tracking_uri: str, study_id: str) -> int:
    """Soft-delete every run of study ``study_id`` in the store (``mlflow runs restore`` undoes it).

    For ``--restart`` with a store outside the study folder (a server, ``$MLFLOW_TRACKING_URI``): the
    replaced study's runs leave the UI once the new study has a result. Returns how many runs went.
    Raises ValueError for a value that is not a study id, TrackingError when MLflow fails.
    """
    where = _where({STUDY_ID_TAG: study_id})
    client = MlflowClient(tracking_uri=tracking_uri)
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
                            f"{_one_line(exc)}") from exc


class MirrorCallback(Callback):
    """Ray Tune callback (driver side): syncs a trial's run on each of its results and at its end.

    ``numbers`` maps Ray trial ids to record trial numbers (the searcher fills it as it suggests).
    The first failure prints one warning and ends live mirroring for the rest of the driver run:
    with a dead server, each further attempt would cost MLflow's full timeout per result.
    Pickled copies (Ray keeps callbacks in ``tuner.pkl``) are inert: nothing of Ray's saved state
    is read back.
    """

    def __init__(self, mirror: Mirror, numbers: Mapping[str, int]) -> None:
        self.mirror: Mirror | None = mirror
        self.numbers = numbers
        self.live = True

    def __getstate__(self) -> dict[str, Any]:
        return {"mirror": None, "numbers": {}, "live": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _sync(self, trial: Trial) -> None:
        number = self.numbers.get(trial.trial_id)
        if not self.live or self.mirror is None or number is None:
            return
        try:
            self.mirror.sync([number])
        except Exception as exc:  # noqa: BLE001 - a mirror failure must never fail the study
            self.live = False
            # The cause, not TrackingError's advice: the warning gives its own.
            cause = exc.__cause__ if isinstance(exc, TrackingError) and exc.__cause__ is not None else exc
            print(f"warning: MLflow mirror unavailable ({self.mirror.tracking_uri}: {_one_line(cause)}); the study "
                  f"goes on, and `python -m tune.mirror {self.mirror.study_dir}` or --resume catches MLflow up later",
                  file=sys.stderr, flush=True)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any],
                        **info: Any) -> None:
        self._sync(trial)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._sync(trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._sync(trial)


# ---------------------------------------------------------------------------------------------------
# python -m tune.mirror STUDY_DIR


def _best(record: StudyRecord, objective: str) -> tuple[TrialRecord | None, float | None, int | None]:
    """The record's best completed trial, its value (Optuna's: the best epoch's objective) and epoch."""
    try:
        frozen = record.study.best_trial
    except ValueError:  # no completed trial
        return None, None, None
    trial = record.trial(frozen.number)
    epoch = next((e for e, v in trial.curve(objective) if v == frozen.value), None)
    return trial, frozen.value, epoch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tune.mirror",
        description="Bring the MLflow mirror of a study up to date with its record (idempotent).")
    parser.add_argument("study_dir", type=Path, help="the study folder (holds study.json)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the study's "
                        f"mlflow.tracking_uri, else ${TRACKING_URI_ENV}, else sqlite in the study folder)")
    args = parser.parse_args(argv)
    try:
        record = StudyRecord.open(args.study_dir.resolve())
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = record.manifest.spec
    uri = resolve_tracking_uri(args.tracking_uri or (spec.get("mlflow") or {}).get("tracking_uri"), record.dir)
    experiment = str((spec.get("mlflow") or {}).get("experiment") or DEFAULT_EXPERIMENT)
    sections = {s: dict(spec[s]) for s in ("model", "data", "train") if isinstance(spec.get(s), Mapping)}
    fixed = {k: v for k, v in flatten_dict(sections, delimiter=".").items() if k not in (spec.get("search") or {})}
    try:
        check_tracking_server(uri)
        mirror = Mirror(uri, experiment, record, fixed_params=fixed, settings=spec.get("tune") or {}, tags={})
        if StudyLock.held(record.dir):
            mirror.sync()
            state = "a driver is running the study"
        else:
            mirror.sync(closing=True)
            # A parent left RUNNING by a killed driver (or created just now) is closed as the record
            # stands; one a driver already closed keeps its status.
            if mirror.parent_status == "RUNNING":
                trials = record.trials()
                status = ("KILLED" if any(t.status in RESUMABLE for t in trials)
                          else "FINISHED" if any(t.status == "completed" for t in trials) else "FAILED")
                best, value, epoch = _best(record, mirror.objective)
                found = {name: record.dir / name for name in ("best.yaml", "summary.csv")}
                found.update({f"plots/{p.name}": p for p in sorted((record.dir / "plots").glob("*.png"))})
                mirror.finish(status, best=best, best_value=value, best_epoch=epoch,
                              artifacts={k: p for k, p in found.items() if p.is_file()})
            state = "closed"
    except TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow mirror of {record.dir} is up to date ({len(record.trials())} trial runs, {state}): "
          f"experiment {experiment!r} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
