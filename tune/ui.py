"""Serve a study's MLflow store in the MLflow UI on 127.0.0.1: ``python -m tune.ui`` (or ``make ui``).

::

    python -m tune.ui                          # the newest studies/*/mlflow.db
    python -m tune.ui --study my_study --open  # studies/my_study/mlflow.db, opened in a browser
    python -m tune.ui --tracking-uri sqlite:////abs/path/mlflow.db --port 5001

A study's own store is first brought up to date with its record (``tune.mirror``, which saves the study's
view of the runs table: best trial first); ``mlflow server`` serves it and, once it answers, the URL of that
view is printed. Ctrl-C (or SIGTERM) stops it; MLflow reports its own errors, a port in use among them. A
read-only study folder opens as it is, sorted by the objective. An ``http(s)`` tracking URI is a server already.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Sequence
from pathlib import Path

from . import mirror, tracking
from .record import MANIFEST_FILE, Manifest, StudyError
from .tracking import TRACKING_URI_ENV, TrackingError

__all__ = ["find_study_db", "main"]

_DEFAULT_STORAGE = Path("studies")  # tune.run's default --storage-path (importing it pulls in torch)
_DB_NAME = tracking.DEFAULT_DB


def find_study_db(storage: Path, study: str | None = None) -> Path:
    """The tracking db of ``study`` under ``storage``, or the most recently written one."""
    if study is not None:
        if not (db := storage / study / _DB_NAME).is_file():
            raise FileNotFoundError(f"no tracking database {db}; is the study name right?")
        return db
    dbs = [path for path in storage.glob(f"*/{_DB_NAME}") if path.is_file()]
    if not dbs:
        raise FileNotFoundError(f"no study tracking database under {storage}/ (looked for */{_DB_NAME}); "
                                f"run a study first, or pass --tracking-uri / --storage-path")
    return max(dbs, key=lambda path: path.stat().st_mtime)


def _study_db(uri: str) -> Path | None:
    """The sqlite file of ``uri`` when it is a study's own store (beside the study's study.json)."""
    db = tracking.sqlite_db_path(uri)
    return db if db is not None and (db.parent / MANIFEST_FILE).is_file() else None


def _refresh_study_mirror(uri: str) -> None:
    """Bring a study's own store up to date with its record (rebuilt when the folder was moved or copied)."""
    if (db := _study_db(uri)) is not None and mirror.main([str(db.parent), "--tracking-uri", uri]) != 0:
        print("warning: showing the MLflow store as it is", file=sys.stderr)


def _landing_url(uri: str, server_url: str) -> str:
    """The study's runs table through its saved view (written by each mirror sync), or sorted best
    first where the store could not save it; the server's root when ``uri`` is not a study's own store."""
    db = _study_db(uri)
    url = tracking.study_runs_url(server_url, db.parent, uri) if db is not None and db.is_file() else None
    if url is None or db is None:
        return server_url
    if "viewStateShareKey" not in url:  # (the UI's sort as it keeps it in its URL)
        tune = Manifest.from_json((db.parent / MANIFEST_FILE).read_text(encoding="utf-8"), db.parent).spec["tune"]
        url += "&" + urllib.parse.urlencode({"orderByKey": f"metrics.`best_{tune['metric']}`",
                                             "orderByAsc": str(tune["mode"] == "min").lower()})
    return url


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help=f"MLflow store (default: ${TRACKING_URI_ENV}, else the newest "
                        f"<storage-path>/*/{_DB_NAME})")
    parser.add_argument("--storage-path", type=Path, default=_DEFAULT_STORAGE, help="where studies live")
    parser.add_argument("--study", help=f"open <storage-path>/<study>/{_DB_NAME}")
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    parser.add_argument("--open", action="store_true", help="open the URL in a web browser")
    args = parser.parse_args(argv)
    server_url = f"http://127.0.0.1:{args.port}"
    try:
        if args.tracking_uri or (args.study is None and os.environ.get(TRACKING_URI_ENV)):
            uri = tracking.resolve_tracking_uri(args.tracking_uri, Path("."))
        else:  # (the study's own store even where $MLFLOW_TRACKING_URI is set: it was asked for)
            uri = f"sqlite:///{find_study_db(args.storage_path, args.study).resolve()}"
        if tracking.is_http_uri(uri):
            tracking.check_tracking_server(uri)
            print(f"MLflow UI: {uri}   (a running tracking server)", flush=True)
            return 0
        if _answers(server_url):  # it would pass for ours until MLflow reports the port taken
            raise TrackingError(f"a server already answers on {server_url}; pass another --port")
        _refresh_study_mirror(uri)
        url = _landing_url(uri, server_url)
    except (FileNotFoundError, StudyError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(args.port), "--workers", "1", "--uvicorn-opts", "--no-access-log"]
    if (artifacts := tracking.artifact_location(uri)) is not None:  # for runs logged through it
        command += ["--artifacts-destination", artifacts]
    # The job runner (GenAI evaluation) doubles start-up and is never used here; Starlette's deprecation
    # notice is MLflow's to act on. The caller's own settings win.
    quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
             "PYTHONWARNINGS": "ignore:starlette.middleware.wsgi is deprecated"}
    server = subprocess.Popen(command, env={**quiet, **os.environ})
    # A plain `kill` reaches this process alone; `mlflow server` stops its workers on the same signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, _: server.send_signal(signum))
    try:
        while server.poll() is None and not _answers(server_url):
            time.sleep(0.25)
        if server.poll() is None:
            print(f"MLflow UI: {url}\n(serving {uri}; Ctrl-C stops it)", flush=True)
            if args.open:
                webbrowser.open(url)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.poll() is None:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
