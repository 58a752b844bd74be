"""Where a study's MLflow data lives: the tracking URI (the space file's, else ``$MLFLOW_TRACKING_URI``,
else the study's own sqlite store) and which one a study used (study.json's history), a fast check that
it is usable before any trial starts, the study's own store rebuilt when its folder was moved or copied,
and the MLflow UI's URLs. What goes into the store is tune.mirror's job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from mlflow.tracking import MlflowClient

from .interrupts import first_line
from .study import MANIFEST_FILE, Manifest

__all__ = ["ARTIFACTS_DIR", "DEFAULT_DB", "DEFAULT_EXPERIMENT", "HISTORY_KEY", "TRACKING_URI_ENV", "VIEW_TAG_PREFIX",
           "TrackingError", "artifact_location", "check_tracking_server", "compare_runs_url", "is_http_uri",
           "locked_file", "own_store_uri", "recorded_tracking_uri", "resolve_tracking_uri", "runs_table_url", "sqlite_db_path",
           "uri_to_record"]

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "minimind-sft"
DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # an experiment tag: a saved view of the runs table (MLflow 3 UI)
# The key of a driver run's study.json history entry that names the MLflow store it used (null: the study's own).
HISTORY_KEY = "tracking_uri"


class TrackingError(RuntimeError):
    """The tracking backend is unusable; the message names the URI and what to do about it."""


def resolve_tracking_uri(configured: str | None, study_dir: Path) -> str:
    """The YAML value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<study_dir>/mlflow.db``; a relative
    sqlite path made absolute, so that the driver, the UI and a resume from elsewhere open one file."""
    uri = (configured or os.environ.get(TRACKING_URI_ENV) or "").strip()
    if not uri:
        return own_store_uri(study_dir)
    db = sqlite_db_path(uri)
    return uri if db is None or db.is_absolute() or "?" in uri else f"sqlite:///{db.resolve()}"


def own_store_uri(study_dir: Path) -> str:
    """The study's own store: ``sqlite:///<study_dir>/mlflow.db``, absolute."""
    return f"sqlite:///{(Path(study_dir) / DEFAULT_DB).resolve()}"


def uri_to_record(uri: str, study_dir: Path) -> str | None:
    """What a driver run's history entry keeps of its store ``uri`` (:data:`HISTORY_KEY`): None for the
    study's own (a null follows a moved folder), else the URI without a password (study.json is copied
    around; MLflow also takes credentials from ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``)."""
    if uri == own_store_uri(study_dir):
        return None
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def recorded_tracking_uri(study_dir: Path, manifest: Manifest) -> str | None:
    """The store the study's latest driver run used, as its ``history`` records it (a null: the study's
    own, where it is now); None where no run recorded one (a study made before that record)."""
    for entry in reversed(manifest.history):
        if HISTORY_KEY in entry:
            return own_store_uri(study_dir) if entry[HISTORY_KEY] is None else str(entry[HISTORY_KEY])
    return None


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for other URIs and in-memory databases."""
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return Path(path) if path and not path.startswith(":memory:") else None


def artifact_location(uri: str) -> str | None:
    """Where a study's runs keep artifacts: ``mlartifacts/`` beside a sqlite store (MLflow would use
    ``./mlruns`` of whatever folder the process started in); the server decides for other URIs."""
    db = sqlite_db_path(uri)
    return None if db is None else str(db.resolve().parent / ARTIFACTS_DIR)


def is_http_uri(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


@contextlib.contextmanager
def locked_file(path: Path) -> Iterator[IO[str] | None]:
    """An exclusive ``fcntl.flock`` on ``path`` (the kernel drops it with a killed holder): the open
    file, or None in a read-only folder (where nothing else writes either)."""
    try:
        fh = path.open("a+", encoding="utf-8")
    except OSError:
        yield None
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield fh


def _open_sqlite(uri: str, db: Path) -> None:
    """Open a sqlite store under ``<db>.lock`` (two processes migrating a new file at once make one fail).
    The lock file keeps the folder the store was written from: a study's own store moved or copied with
    its folder (its artifact paths point into the old one) is deleted before MLflow opens it (MLflow keeps
    an engine per URI for the process's life) and rebuilt from the record by the next sync."""
    db.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
        raise TrackingError(f"MLflow database {uri} is not writable; fix its permissions or set another "
                            f"mlflow.tracking_uri")
    here, own = str(db.parent.resolve()), db.name == DEFAULT_DB and (db.parent / MANIFEST_FILE).is_file()
    with locked_file(db.with_name(db.name + ".lock")) as fh:
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
    """Fail fast with a :class:`TrackingError` when ``uri`` is unusable: a server gets one short ``GET
    <uri>/health`` (MLflow's client retries a dead one for minutes), a store is opened (created if new)."""
    if is_http_uri(uri):
        return _check_http(uri, timeout_s)
    try:
        if (db := sqlite_db_path(uri)) is not None:
            _open_sqlite(uri, db)
        else:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"MLflow tracking URI {uri} is not usable: {first_line(exc)}") from exc


def _check_http(uri: str, timeout_s: float) -> None:
    url, started = uri.rstrip("/") + "/health", time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:  # (URLError among them)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}, after "
            f"{time.monotonic() - started:.1f}s). Start it (e.g. `python -m tune.ui`, or `mlflow server --host "
            f"127.0.0.1 --port N`), fix mlflow.tracking_uri in the study YAML or ${TRACKING_URI_ENV}, or leave "
            f"both unset to track into the study's own sqlite db.") from exc
    # A proxy may not route /health (404) or may want credentials (401/403): a server still answers.
    if status >= 500:
        raise TrackingError(f"MLflow tracking server {uri} answered HTTP {status} on {url}; is it healthy?")


def runs_table_url(tracking_server_url: str, experiment_id: str, view: str | None = None) -> str:
    """The MLflow UI's runs table of an experiment in the model-training view (MLflow 3 opens an
    experiment on its GenAI overview), through the saved ``view`` (a study id) if given."""
    share = "" if view is None else f"&viewStateShareKey={urllib.parse.quote(view)}"
    return f"{tracking_server_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning{share}"


def compare_runs_url(tracking_server_url: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The MLflow UI's compare view of ``run_ids`` (parallel coordinates, scatter and contour plots)."""
    compact = {"separators": (",", ":")}  # (no spaces to encode)
    query = urllib.parse.urlencode({"runs": json.dumps(list(run_ids), **compact),
                                    "experiments": json.dumps([experiment_id], **compact),
                                    "workflowType": "machine_learning"})
    return f"{tracking_server_url.rstrip('/')}/#/compare-runs?{query}"
