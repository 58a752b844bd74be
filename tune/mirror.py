"""Mirror a study record into MLflow: one parent run per study, one nested child run per record trial.

The record (``tune.record``: ``study.json`` + ``optuna.db``) is the truth; MLflow is a copy of it
that :meth:`Mirror.sync` brings up to date at any time, from any process, as often as wanted,
without ever creating a second run for the same study or trial. Runs are found by tags
(``minimind.study_id``, ``minimind.trial``), never by name, so a crash between any two MLflow calls
leaves nothing that the next sync cannot pick up. A mirror that fails never fails a study:
:class:`MirrorCallback` stops live mirroring after the first error, and ``python -m tune.mirror
STUDY_DIR`` (or ``--resume``) catches MLflow up later.

Everything goes through an explicit :class:`mlflow.tracking.MlflowClient`, never ``mlflow.start_run``:
MLflow's global "active run" cannot serve many concurrent trials.

How ``tune/run.py`` uses it::

    uri = resolve_tracking_uri(spec.mlflow.tracking_uri, study_dir)
    check_tracking_server(uri)                       # fast TrackingError before any trial starts
    mirror = Mirror(uri, spec.mlflow.experiment, record, fixed_params=..., settings=..., tags=...)
    mirror.sync()                                    # parent run + every trial already in the record
    callbacks = [MirrorCallback(mirror, searcher.numbers)]
    ...
    mirror.finish("FINISHED", best=..., best_value=..., best_epoch=..., artifacts={...})
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
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, Run, RunTag, ViewType
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.utils import flatten_dict

from .record import RESUMABLE, StudyError, StudyLock, StudyRecord, TrialRecord

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = [
    "DEFAULT_EXPERIMENT",
    "ERROR_TAG",
    "PARENT_RUN_TAG",
    "ROLE_TAG",
    "STATUS_TAG",
    "STUDY_DIR_TAG",
    "STUDY_ID_TAG",
    "STUDY_TAG",
    "SYNCED_TAG",
    "TRACKING_URI_ENV",
    "TRIAL_TAG",
    "Mirror",
    "MirrorCallback",
    "TrackingError",
    "check_tracking_server",
    "default_artifact_location",
    "delete_study_runs",
    "is_http_uri",
    "main",
    "resolve_tracking_uri",
    "run_name",
    "sqlite_db_path",
    "warn_on_failure",
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
# MLflow's own tags: the UI nests a run under the run the first names, and shows the second as the
# run's description.
PARENT_RUN_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"

# Record status -> MLflow run status (``running`` depends on whether the driver is closing).
_RUN_STATUS = {
    "completed": "FINISHED",
    "stopped_early": "FINISHED",
    "failed": "FAILED",
    "diverged": "FAILED",
    "abandoned": "FAILED",
    "interrupted": "KILLED",
}
# finish(status) -> the parent's minimind.status tag.
_STUDY_STATUS = {"FINISHED": "completed", "FAILED": "failed", "KILLED": "interrupted"}

# MLflow's documented limits (mlflow.utils.validation), kept here because that module is internal.
_MAX_PARAM_VAL_LENGTH = 6000
_MAX_TAG_VAL_LENGTH = 8000
_MAX_RUN_NAME_LENGTH = 250
# Record metrics that are bookkeeping, not model metrics: the timestamp becomes the point's own.
_SKIPPED_METRICS = frozenset({"timestamp_ms", "epoch", "time_epoch_start_unix"})
# Searched keys by their last path component, shortened for run names.
_ABBREVIATIONS = {
    "learning_rate": "lr",
    "accumulation_steps": "acc",
    "grad_clip": "clip",
    "min_lr_ratio": "min_lr",
    "warmup_steps": "warmup",
    "weight_decay": "wd",
    "batch_size": "bs",
    "dropout": "drop",
    "hidden_size": "hidden",
    "num_hidden_layers": "layers",
}
_SAFE_FILTER_VALUE = re.compile(r"[0-9A-Za-z_.-]+")

# sqlite URIs this process opened through MLflow. MLflow caches one engine (and its pooled
# connections) per URI for the life of the process, so a database file it has open must not be
# deleted and recreated underneath it: the pooled connections would keep writing into the old file.
_OPENED: set[str] = set()


class TrackingError(RuntimeError):
    """The tracking backend is unusable; the message names the URI and what to do about it."""


# ---------------------------------------------------------------------------------------------------
# Where the tracking store is.


def resolve_tracking_uri(configured: str | None, study_dir: Path) -> str:
    """The study's tracking URI: the YAML value, else ``$MLFLOW_TRACKING_URI``, else ``<study_dir>/mlflow.db``
    (as a sqlite URI).

    Relative sqlite paths become absolute, so the driver, the UI and a later resume (possibly from
    another working directory) all open the same database file.
    """
    uri = (configured or os.environ.get(TRACKING_URI_ENV) or "").strip()
    if not uri:
        return f"sqlite:///{(Path(study_dir) / DEFAULT_DB).resolve()}"
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
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite db; the server decides for other URIs.

    Without this MLflow would put sqlite-backed artifacts in ``./mlruns`` of whatever directory the
    driver happened to start in.
    """
    db = sqlite_db_path(tracking_uri)
    if db is None:
        return None
    return str(db.resolve().parent / ARTIFACTS_DIR)


@contextlib.contextmanager
def _db_lock(db: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``<db>.lock``.

    MLflow creates a fresh sqlite store's schema with alembic migrations on first open; two
    processes doing that at once make one of them fail ("table already exists"). The kernel drops
    the lock with its holder, so a killed driver never leaves it behind.
    """
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _has_mlflow_schema(db: Path) -> bool:
    """Whether ``db`` is a sqlite file with MLflow's tables (read-only: nothing is created or migrated)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
            row = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'").fetchone()
    except sqlite3.Error as exc:
        raise TrackingError(f"MLflow database {db} cannot be read ({exc}); move it aside, or set another "
                            f"mlflow.tracking_uri") from exc
    return row is not None


def _open_sqlite(uri: str, db: Path) -> None:
    """Open (creating and migrating if new) the sqlite store once in this process, under the db lock."""
    if uri in _OPENED:
        return
    with _db_lock(db):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _OPENED.add(uri)


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any trial starts, when ``uri`` cannot be used for tracking.

    HTTP(S) servers get one short ``GET <uri>/health`` through urllib: MLflow's own client retries
    with backoff for minutes before it reports an unreachable server. An existing sqlite store is
    checked read-only without MLflow (so that :class:`Mirror` may still replace it when it belongs
    to a moved study folder); a new one is created. Other URIs are opened once through MLflow,
    which also rejects the deprecated folder store with MLflow's explanation.
    """
    if is_http_uri(uri):
        _check_http(uri, timeout_s)
        return
    db = sqlite_db_path(uri)
    try:
        if db is not None:
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrackingError(f"cannot create the folder of the MLflow database {uri}: "
                                    f"{exc.strerror or exc}") from exc
            if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
                raise TrackingError(f"MLflow database {uri} is not writable; fix its permissions or set "
                                    f"another mlflow.tracking_uri")
            if db.is_file() and _has_mlflow_schema(db):
                return
            _open_sqlite(uri, db)
            return
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
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


# ---------------------------------------------------------------------------------------------------
# Small helpers.


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    return first[:300] + ("..." if len(first) > 300 else "")


def _param_value(value: Any) -> str:
    return str(value)[:_MAX_PARAM_VAL_LENGTH]


def _tag_value(value: Any) -> str:
    return str(value)[:_MAX_TAG_VAL_LENGTH]


def _short_number(value: Any) -> str:
    """2-3 significant digits: ``0.0023`` -> ``2.3e-3``, ``0.9`` -> ``0.90``, ``40`` -> ``40``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = str(value)
        return text if len(text) <= 16 else text[:15] + "~"
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e4):
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if 1e-2 <= magnitude < 1e4:
        decimals = max(0, 1 - math.floor(math.log10(magnitude)))
        return f"{value:.{decimals}f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Dotted key -> short label: its last component, abbreviated; the whole key where two would clash."""
    short = {key: _ABBREVIATIONS.get(key.rsplit(".", 1)[-1], key.rsplit(".", 1)[-1]) for key in keys}
    counts: dict[str, int] = {}
    for label in short.values():
        counts[label] = counts.get(label, 0) + 1
    return {key: (label if counts[label] == 1 else key) for key, label in short.items()}


def run_name(trial: TrialRecord, key_order: Sequence[str] = ()) -> str:
    """``t003 lr=2.3e-3 acc=1 clip=0.90``: the trial's record name and its searched values, short."""
    keys = [k for k in key_order if k in trial.params] + sorted(k for k in trial.params if k not in key_order)
    labels = _short_keys(keys)
    parts = [trial.name, *(f"{labels[k]}={_short_number(trial.params[k])}" for k in keys)]
    return " ".join(parts)[:_MAX_RUN_NAME_LENGTH]


def _desired_status(status: str, closing: bool) -> str:
    if status in _RUN_STATUS:
        return _RUN_STATUS[status]
    # "running" (or a status this version does not know): alive while the driver is, else cut short.
    return "KILLED" if closing else "RUNNING"


def _epoch_metrics(trial: TrialRecord, objective: str) -> dict[int, list[tuple[str, float, int]]]:
    """Per epoch: ``(key, value, timestamp_ms)``, the objective first; ``aux_loss`` only if ever non-zero."""
    aux_used = any(m.get("aux_loss", 0.0) != 0.0 for m in trial.epochs.values())
    out: dict[int, list[tuple[str, float, int]]] = {}
    for epoch, metrics in sorted(trial.epochs.items()):
        stamp = metrics.get("timestamp_ms")
        # The recorded timestamp makes a re-logged point identical to the first one (MLflow keeps
        # one row per key/step/timestamp/value); without one, a fixed stamp keeps that property.
        stamp_ms = int(stamp) if stamp is not None and math.isfinite(stamp) else 0
        keys = [k for k in metrics if k not in _SKIPPED_METRICS and (k != "aux_loss" or aux_used)]
        keys.sort(key=lambda k: (k != objective, k))
        out[epoch] = [(k, float(metrics[k]), stamp_ms) for k in keys]
    return out


def _run_key(run: Run) -> tuple[int, str]:
    return (run.info.start_time or 0, run.info.run_id)


@dataclass
class _Child:
    # Mutable on purpose: sync advances it as the record moves on.
    run_id: str
    synced: int
    status: str
    tags: dict[str, str]
    params: set[str]


# ---------------------------------------------------------------------------------------------------
# The mirror.


class Mirror:
    """The MLflow copy of one study record; connects on first use.

    Every public method raises :class:`TrackingError` (naming the URI) on any MLflow failure, and
    forgets what it knew of MLflow's state then, so the next call starts again from what MLflow has.
    """

    def __init__(self, tracking_uri: str, experiment: str, record: StudyRecord, *,
                 fixed_params: Mapping[str, Any], settings: Mapping[str, Any],
                 tags: Mapping[str, str]) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.record = record
        self.params = {**flatten_dict(dict(fixed_params), delimiter="."),
                       **{f"tune.{k}": v for k, v in flatten_dict(dict(settings), delimiter=".").items()}}
        self.tags = {str(k): _tag_value(v) for k, v in tags.items()}
        spec = record.manifest.spec
        tune_spec = spec.get("tune") if isinstance(spec.get("tune"), Mapping) else {}
        self.objective = str(tune_spec.get("metric") or "val_loss")
        search = spec.get("search") if isinstance(spec.get("search"), Mapping) else {}
        self.search_keys = [str(k) for k in search]
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        self._parent_status: str | None = None
        self._children: dict[int, _Child] | None = None

    @property
    def study_id(self) -> str:
        return self.record.manifest.study_id

    @property
    def study_dir(self) -> str:
        return str(Path(self.record.dir).resolve())

    @property
    def parent_run_id(self) -> str | None:
        """The parent run's id once a sync found or created it."""
        return self._parent_id

    @property
    def parent_status(self) -> str | None:
        """The parent run's MLflow status as of the last sync (None before one)."""
        return self._parent_status

    # -- public --------------------------------------------------------------------------------------

    def sync(self, numbers: Iterable[int] | None = None, *, closing: bool = False) -> None:
        """Bring the parent run and the given trials' runs (None: every trial) up to date with the record.

        Without ``closing`` the driver is alive: the parent run is RUNNING, and so are the runs of
        ``running`` trials. With ``closing`` the parent's status is left to :meth:`finish` and
        ``running`` trials become KILLED (their driver is gone).
        """
        with self._guard("sync"), self._study_lock():
            client = self._connect()
            parent_id = self._ensure_parent(client, running=not closing)
            wanted = None if numbers is None else set(numbers)
            trials = [t for t in self.record.trials() if wanted is None or t.number in wanted]
            children = self._index(client, parent_id)
            for trial in trials:
                self._sync_trial(client, parent_id, children, trial, closing)

    def finish(self, status: str, *, best: TrialRecord | None, best_value: float | None,
               best_epoch: int | None, artifacts: Mapping[str, Path], description: str = "",
               study_metrics: Mapping[str, float] | None = None) -> None:
        """Close the mirror: every trial synced (``closing``), results attached, parent run ended.

        ``status`` is the parent's MLflow status (FINISHED, FAILED or KILLED). ``artifacts`` maps a
        path inside the run to a local file or folder (a path without a suffix takes the file's); a
        missing one is a warning (this runs in the driver's ``finally``). ``description`` becomes
        the parent's note in the UI. ``study_metrics`` (e.g. ``rung_fidelity_epoch_1``) are logged on
        the parent at step 0, stamped now: a later finish after more trials adds the newer value.
        """
        if status not in _STUDY_STATUS:
            raise ValueError(f"status must be one of {sorted(_STUDY_STATUS)}, got {status!r}")
        self.sync(closing=True)
        with self._guard("finish"), self._study_lock():
            client = self._connect()
            parent_id = self._ensure_parent(client, running=False)
            tags: dict[str, str] = {STATUS_TAG: _STUDY_STATUS[status]}
            if description:
                tags[NOTE_TAG] = _tag_value(description)
            if best is not None:
                tags.update({"best.trial": best.name, "best.number": str(best.number),
                             "best.metric": self.objective})
                child = self._index(client, parent_id).get(best.number)
                if child is not None:
                    tags["best.run_id"] = child.run_id
                if best_value is not None:
                    tags["best.value"] = repr(float(best_value))
                if best_epoch is not None:
                    tags["best.epoch"] = str(best_epoch)
                tags.update({f"best.{k}": _tag_value(v) for k, v in best.params.items()})
            client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
            if best is not None and best_value is not None and math.isfinite(best_value):
                # The best epoch's own timestamp: finishing twice with the same best adds no point.
                stamp = best.epochs.get(best_epoch or 0, {}).get("timestamp_ms", 0.0)
                metric = Metric(f"best_{self.objective}", float(best_value),
                                int(stamp) if math.isfinite(stamp) else 0, int(best_epoch or 0))
                client.log_batch(parent_id, metrics=[metric], synchronous=True)
            extra = [Metric(k, float(v), int(time.time() * 1000), 0)
                     for k, v in (study_metrics or {}).items() if math.isfinite(float(v))]
            if extra:
                client.log_batch(parent_id, metrics=extra, synchronous=True)
            for target, path in artifacts.items():
                self._log_artifact(client, parent_id, Path(path), target)
            client.set_terminated(parent_id, status=status)
            self._parent_status = status

    # -- connection ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            # Whatever was cached may no longer match MLflow: the next call reads it again.
            self._parent_id = self._parent_status = None
            self._children = None
            if isinstance(exc, TrackingError) or not isinstance(exc, Exception):
                raise
            raise TrackingError(
                f"MLflow mirror {what} at {self.tracking_uri} failed "
                f"({type(exc).__name__}: {_one_line(exc)}); "
                f"the study record is unaffected: fix the tracking store, then `python -m tune.mirror "
                f"{self.study_dir}` catches MLflow up"
            ) from exc

    @contextlib.contextmanager
    def _study_lock(self) -> Iterator[None]:
        """One sync at a time per study on this host (the driver and ``python -m tune.mirror``).

        Two syncs at once could each create a run for the same new trial; the next sync would keep
        the older and delete the other, but the process logging into the deleted one would fail.
        """
        with contextlib.ExitStack() as stack:
            try:
                fh = stack.enter_context(open(Path(self.record.dir) / MIRROR_LOCK, "a", encoding="utf-8"))
            except OSError:
                fh = None  # a read-only study folder: nothing else can be writing its record either
            if fh is not None:
                fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
            yield

    def _own_default_db(self) -> Path | None:
        """The study's own default store (``<study dir>/mlflow.db``) when that is the tracking URI."""
        db = sqlite_db_path(self.tracking_uri)
        if db is None:
            return None
        own = Path(self.record.dir).resolve() / DEFAULT_DB
        return own if db.resolve() == own else None

    def _connect(self) -> MlflowClient:
        if self._client is not None:
            return self._client
        if is_http_uri(self.tracking_uri):
            # One short health check: MLflow's own client would retry for minutes.
            _check_http(self.tracking_uri, 5.0)
        db = sqlite_db_path(self.tracking_uri)
        if db is not None:
            own = self._own_default_db()
            if own is not None:
                with _db_lock(own):
                    self._drop_if_moved(own)
            _open_sqlite(self.tracking_uri, db)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        self._experiment_id = self._experiment(client)
        self._client = client
        return client

    def _drop_if_moved(self, db: Path) -> None:
        """Delete the study's own store when it was written from another folder (moved or copied).

        Its artifact paths are absolute and point into the old folder; the store is only a mirror,
        so it is rebuilt from the record. Read with sqlite3 before MLflow opens it (see ``_OPENED``).
        """
        if not db.is_file() or not _has_mlflow_schema(db):
            return
        here = Path(self.study_dir)
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
                dirs = [row[0] for row in conn.execute(
                    "SELECT d.value FROM tags AS s JOIN tags AS d ON s.run_uuid = d.run_uuid "
                    "WHERE s.key = ? AND s.value = ? AND d.key = ?",
                    (STUDY_ID_TAG, self.study_id, STUDY_DIR_TAG))]
                locations = [row[0] for row in conn.execute(
                    "SELECT artifact_location FROM experiments WHERE name = ?", (self.experiment,))]
        except sqlite3.Error as exc:
            raise TrackingError(f"MLflow database {db} cannot be read ({exc}); it is only a mirror of the "
                                f"study record: delete it and run `python -m tune.mirror {here}`") from exc
        stale = any(Path(d) != here for d in dirs)
        # An experiment created from the old folder keeps artifacts there, even before any parent run.
        stale = stale or any(_local_path(loc) is not None and _local_path(loc) != here / ARTIFACTS_DIR
                             for loc in locations if loc)
        if not stale:
            return
        if self.tracking_uri in _OPENED:
            raise TrackingError(f"MLflow store {db} was written from another folder and is open in this "
                                f"process, so it cannot be rebuilt here; run `python -m tune.mirror {here}`")
        logger.warning("MLflow store %s was written from another folder (%s); rebuilding it from the record",
                       db, ", ".join(sorted({*dirs})) or "its experiments' artifact paths")
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                db.with_name(db.name + suffix).unlink()
        shutil.rmtree(db.parent / ARTIFACTS_DIR, ignore_errors=True)

    def _experiment(self, client: MlflowClient) -> str:
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                location = default_artifact_location(self.tracking_uri)
                return client.create_experiment(self.experiment, artifact_location=location)
            except Exception:
                # Another driver created it between the lookup and the creation.
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {self.experiment!r} in {self.tracking_uri} is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set "
                f"another mlflow.experiment"
            )
        return experiment.experiment_id

    # -- runs ----------------------------------------------------------------------------------------

    def _search(self, client: MlflowClient, role: str) -> list[Run]:
        assert self._experiment_id is not None
        where = f"tags.`{ROLE_TAG}` = '{role}'"
        if _SAFE_FILTER_VALUE.fullmatch(self.study_id):
            where += f" and tags.`{STUDY_ID_TAG}` = '{self.study_id}'"
        runs: list[Run] = []
        token: str | None = None
        while True:
            page = client.search_runs([self._experiment_id], filter_string=where,
                                      run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            runs.extend(r for r in page if r.data.tags.get(STUDY_ID_TAG) == self.study_id)
            token = page.token
            if not token:
                return runs

    def _ensure_parent(self, client: MlflowClient, running: bool) -> str:
        if self._parent_id is None:
            self._parent_id = self._load_parent(client)
        if running and self._parent_status != "RUNNING":
            client.update_run(self._parent_id, status="RUNNING")
            client.set_tag(self._parent_id, STATUS_TAG, "running")
            self._parent_status = "RUNNING"
        return self._parent_id

    def _load_parent(self, client: MlflowClient) -> str:
        assert self._experiment_id is not None
        found = sorted(self._search(client, "parent"), key=_run_key)
        tags = {**self.tags, STUDY_ID_TAG: self.study_id, STUDY_TAG: self.record.manifest.name,
                ROLE_TAG: "parent", STUDY_DIR_TAG: self.study_dir}
        if not found:
            run = client.create_run(self._experiment_id, run_name=self.record.manifest.name,
                                    tags={**tags, STATUS_TAG: "running"})
            self._parent_status = run.info.status
            self._log_params(client, run.info.run_id, self.params, {})
            return run.info.run_id
        run, extra = found[0], found[1:]
        for other in extra:
            # Only two processes creating it at the same moment can get here; keep the oldest.
            logger.warning("MLflow run %s duplicates the parent run %s of study %s; deleted",
                           other.info.run_id, run.info.run_id, self.study_id)
            client.delete_run(other.info.run_id)
        run_id = run.info.run_id
        self._parent_status = run.info.status
        changed = {k: v for k, v in tags.items() if run.data.tags.get(k) != v}
        if changed:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in changed.items()], synchronous=True)
        self._log_params(client, run_id, self.params, run.data.params)
        return run_id

    def _log_params(self, client: MlflowClient, run_id: str, params: Mapping[str, Any],
                    logged: Mapping[str, str]) -> None:
        # MLflow params are immutable: log the missing ones, and keep a changed value as a tag.
        missing = [Param(k, _param_value(v)) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"minimind.latest.{k}", _tag_value(v)) for k, v in params.items()
                   if k in logged and logged[k] != _param_value(v)]
        if missing or changed:
            client.log_batch(run_id, params=missing, tags=changed, synchronous=True)

    def _index(self, client: MlflowClient, parent_id: str) -> dict[int, _Child]:
        if self._children is not None:
            return self._children
        by_number: dict[int, list[Run]] = {}
        for run in self._search(client, "trial"):
            number = run.data.tags.get(TRIAL_TAG, "")
            if number.isdigit():
                by_number.setdefault(int(number), []).append(run)
        children: dict[int, _Child] = {}
        for number, runs in by_number.items():
            runs.sort(key=_run_key)
            for other in runs[1:]:
                logger.warning("MLflow run %s duplicates the run %s of trial %d; deleted", other.info.run_id,
                               runs[0].info.run_id, number)
                client.delete_run(other.info.run_id)
            run = runs[0]
            synced = run.data.tags.get(SYNCED_TAG, "0")
            children[number] = _Child(run.info.run_id, int(synced) if synced.isdigit() else 0,
                                      run.info.status, dict(run.data.tags), set(run.data.params))
        self._children = children
        return children

    def _sync_trial(self, client: MlflowClient, parent_id: str, children: dict[int, _Child],
                    trial: TrialRecord, closing: bool) -> None:
        assert self._experiment_id is not None
        name = run_name(trial, self.search_keys)
        identity = {STUDY_ID_TAG: self.study_id, STUDY_TAG: self.record.manifest.name, ROLE_TAG: "trial",
                    TRIAL_TAG: str(trial.number), PARENT_RUN_TAG: parent_id}
        child = children.get(trial.number)
        if child is None:
            # Identity tags go in with the run itself (one request, one transaction): no crash can
            # leave a run that the next sync would not find.
            run = client.create_run(self._experiment_id, run_name=name,
                                    tags={**identity, STATUS_TAG: trial.status})
            child = _Child(run.info.run_id, 0, run.info.status, {**identity, STATUS_TAG: trial.status,
                                                                  "mlflow.runName": name}, set())
            children[trial.number] = child
        tags = {**identity, STATUS_TAG: trial.status}
        if trial.status in ("failed", "diverged") and trial.error:
            tags[ERROR_TAG] = _tag_value(trial.error)
        changed = {k: v for k, v in tags.items() if child.tags.get(k) != v}
        missing = {k: v for k, v in trial.params.items() if k not in child.params}
        if changed or missing:
            client.log_batch(child.run_id, params=[Param(k, _param_value(v)) for k, v in missing.items()],
                             tags=[RunTag(k, v) for k, v in changed.items()], synchronous=True)
            child.tags.update(changed)
            child.params.update(missing)
        if ERROR_TAG in child.tags and ERROR_TAG not in tags:
            # A trial that failed once and then completed on --resume carries no stale error.
            client.delete_tag(child.run_id, ERROR_TAG)
            del child.tags[ERROR_TAG]
        if child.tags.get("mlflow.runName") != name:
            client.update_run(child.run_id, name=name)
            child.tags["mlflow.runName"] = name
        new = {e: points for e, points in _epoch_metrics(trial, self.objective).items() if e > child.synced}
        if new:
            metrics = [Metric(key, value, stamp, epoch) for epoch, points in new.items()
                       for key, value, stamp in points]
            if metrics:
                client.log_batch(child.run_id, metrics=metrics, synchronous=True)
            # A crash before this tag only means the same points are logged again: identical
            # (key, step, timestamp, value) rows are stored once by MLflow.
            child.synced = max(new)
            client.set_tag(child.run_id, SYNCED_TAG, str(child.synced))
            child.tags[SYNCED_TAG] = str(child.synced)
        status = _desired_status(trial.status, closing)
        if status != child.status:
            if status == "RUNNING":
                client.update_run(child.run_id, status="RUNNING")
            else:
                client.set_terminated(child.run_id, status=status)
            child.status = status

    def _log_artifact(self, client: MlflowClient, run_id: str, source: Path, target: str) -> None:
        target = target.strip("/")
        if source.is_dir():
            client.log_artifacts(run_id, str(source), target or None)
            return
        if not source.is_file():
            logger.warning("artifact %s does not exist; not logged to MLflow", source)
            return
        path = PurePosixPath(target) if target else PurePosixPath(source.name)
        if not path.suffix and source.suffix:
            # ``{"plots/curves": curves.png}`` (as tune.plots names its files) lands as plots/curves.png.
            path = path.with_name(path.name + source.suffix)
        folder = None if str(path.parent) == "." else str(path.parent)
        if path.name == source.name:
            client.log_artifact(run_id, str(source), folder)
            return
        # MLflow names an artifact after its file; a symlink renames it without copying a checkpoint.
        with tempfile.TemporaryDirectory(prefix="minimind-artifact-") as tmp:
            link = Path(tmp) / path.name
            link.symlink_to(source.resolve())
            client.log_artifact(run_id, str(link), folder)


def _local_path(location: str) -> Path | None:
    """A local artifact location as a path; None for remote ones (s3://, mlflow-artifacts:, ...)."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "" and location.startswith("/"):
        return Path(location)
    return None


# ---------------------------------------------------------------------------------------------------
# Live mirroring from the driver.


def delete_study_runs(tracking_uri: str, study_id: str) -> int:
    """Soft-delete every run of study ``study_id`` in the store (``mlflow runs restore`` undoes it).

    For ``--restart`` with a store outside the study folder (a server, ``$MLFLOW_TRACKING_URI``): the
    replaced study's runs leave the UI once the new study has a result. Returns how many runs went.
    """
    if not _SAFE_FILTER_VALUE.fullmatch(study_id):
        raise ValueError(f"study_id={study_id!r} is not a study id")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        deleted = 0
        for start in range(0, len(experiments), 100):
            runs = client.search_runs(experiments[start:start + 100],
                                      filter_string=f"tags.`{STUDY_ID_TAG}` = '{study_id}'",
                                      run_view_type=ViewType.ACTIVE_ONLY, max_results=50000)
            for run in runs:
                if run.info.status == "RUNNING":
                    client.set_terminated(run.info.run_id, status="KILLED")
                client.delete_run(run.info.run_id)
                deleted += 1
        return deleted
    except Exception as exc:
        raise TrackingError(f"MLflow at {tracking_uri}: could not delete the runs of study {study_id}: "
                            f"{_one_line(exc)}") from exc


class MirrorCallback(Callback):
    """Ray Tune callback (driver side): syncs a trial's run on each of its results and at its end.

    ``numbers`` maps Ray trial ids to record trial numbers (the searcher fills it as it suggests).
    The first failure prints one warning and ends live mirroring for the rest of the driver run:
    with a dead server, each further attempt would cost MLflow's full timeout per result.
    Pickled copies (Ray keeps callbacks in ``tuner.pkl``) are inert: the record is not picklable,
    and nothing of Ray's saved state is read back.
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
        if not self.live or self.mirror is None:
            return
        number = self.numbers.get(trial.trial_id)
        if number is None:
            return
        try:
            self.mirror.sync([number])
        except Exception as exc:  # noqa: BLE001 - a mirror failure must never fail the study
            self.live = False
            # The cause, not TrackingError's advice: the warning gives its own.
            cause = exc.__cause__ if isinstance(exc, TrackingError) and exc.__cause__ is not None else exc
            reason = f"{self.mirror.tracking_uri}: {_one_line(cause)}"
            print(f"warning: MLflow mirror unavailable ({reason}); the study goes on, and "
                  f"`python -m tune.mirror {self.mirror.study_dir}` or --resume catches MLflow up later",
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


def _best(record: StudyRecord) -> tuple[TrialRecord | None, float | None, int | None]:
    """The record's best completed trial, its value (Optuna's: the best epoch's objective) and epoch."""
    try:
        frozen = record.study.best_trial
    except ValueError:  # no completed trial
        return None, None, None
    trial = record.trial(frozen.number)
    value = frozen.value
    metric = str((record.manifest.spec.get("tune") or {}).get("metric") or "val_loss")
    epoch = next((e for e, v in trial.curve(metric) if value is not None and v == value), None)
    return trial, value, epoch


def _folder_artifacts(study_dir: Path) -> dict[str, Path]:
    found = {name: study_dir / name for name in ("best.yaml", "summary.csv") if (study_dir / name).is_file()}
    plots = study_dir / "plots"
    if plots.is_dir():
        found.update({f"plots/{p.name}": p for p in sorted(plots.glob("*.png"))})
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tune.mirror",
        description="Bring the MLflow mirror of a study up to date with its record (idempotent).")
    parser.add_argument("study_dir", type=Path, help="the study folder (holds study.json)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: the study's mlflow.tracking_uri, else "
                             f"${TRACKING_URI_ENV}, else sqlite in the study folder)")
    args = parser.parse_args(argv)
    try:
        record = StudyRecord.open(args.study_dir.resolve())
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = record.manifest.spec
    mlflow_spec = spec.get("mlflow") if isinstance(spec.get("mlflow"), Mapping) else {}
    uri = resolve_tracking_uri(args.tracking_uri or mlflow_spec.get("tracking_uri"), record.dir)
    experiment = str(mlflow_spec.get("experiment") or DEFAULT_EXPERIMENT)
    searched = set(spec.get("search") or {})
    sections = {s: dict(spec[s]) for s in ("model", "data", "train") if isinstance(spec.get(s), Mapping)}
    fixed = {k: v for k, v in flatten_dict(sections, delimiter=".").items() if k not in searched}
    settings = spec.get("tune") if isinstance(spec.get("tune"), Mapping) else {}
    try:
        check_tracking_server(uri)
        mirror = Mirror(uri, experiment, record, fixed_params=fixed, settings=settings, tags={})
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
                best, value, epoch = _best(record)
                mirror.finish(status, best=best, best_value=value, best_epoch=epoch,
                              artifacts=_folder_artifacts(record.dir))
            state = "closed"
    except TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow mirror of {record.dir} is up to date ({len(record.trials())} trial runs, {state}): "
          f"experiment {experiment!r} at {uri}")
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
