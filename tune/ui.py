"""Serve a study's MLflow store in the MLflow UI on 127.0.0.1: ``python -m tune.ui`` (or ``make ui``).

A study opens in the store its runs went to, as its study.json records it (a study that records none:
its own ``mlflow.db``), first brought up to date with the record (``tune.mirror``). ``mlflow server``
serves it, its output in ``mlflow-server.log`` in the study folder (printed when it fails). Once it
answers, the URL of the study's saved view of the runs table is printed, then the compare view of the
trials, then the store and why that one; Ctrl-C (or SIGTERM) stops it. An ``http(s)`` store is a
server already: its URLs are printed. ``--dashboard`` serves Optuna's dashboard instead (tune.dashboard).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import webbrowser
from collections.abc import Sequence
from pathlib import Path

from . import dashboard, mirror, tracking
from .study import MANIFEST_FILE, Manifest, StudyError
from .tracking import TRACKING_URI_ENV, TrackingError

__all__ = ["SERVER_LOG", "find_study", "main", "study_store"]

_DEFAULT_STORAGE = Path("studies")  # tune.run's default --storage-path (importing it pulls in torch)
_DB_NAME = tracking.DEFAULT_DB
SERVER_LOG = "mlflow-server.log"  # mlflow server's output: in the study folder (see _server_log)


def find_study(storage: Path, name: str | None = None) -> Path:
    """The folder of study ``name`` under ``storage``, or the most recently written study there (one with a
    study.json or an own tracking db)."""
    def marks(folder: Path) -> list[Path]:
        return [path for path in (folder / MANIFEST_FILE, folder / _DB_NAME) if path.is_file()]

    if name is not None:
        if not marks(folder := storage / name):
            raise FileNotFoundError(f"no study {folder} (neither {MANIFEST_FILE} nor {_DB_NAME} there); is the "
                                    f"study name right?")
        return folder
    found = {folder: max(p.stat().st_mtime for p in paths) for folder in storage.glob("*")
             if (paths := marks(folder))}
    if not found:
        raise FileNotFoundError(f"no study under {storage}/ (looked for */{MANIFEST_FILE} and */{_DB_NAME}); "
                                f"run a study first, or pass --tracking-uri / --storage-path")
    return max(found, key=lambda folder: found[folder])


def study_store(study_dir: Path) -> tuple[str, str]:
    """The tracking URI of the store the study's runs went to, and why that one (for the user): as its
    study.json records it, else (a study from before that record) its own ``mlflow.db``."""
    own = tracking.own_store_uri(study_dir)
    try:
        manifest = Manifest.from_json((study_dir / MANIFEST_FILE).read_text(encoding="utf-8"), study_dir)
        recorded = tracking.recorded_tracking_uri(study_dir, manifest)
    except (OSError, StudyError):  # no record or a damaged one: the store as it is
        recorded = None
    if recorded is not None and recorded != own:
        return recorded, f"the store study {study_dir.name} tracked into, as its {MANIFEST_FILE} records"
    if not (study_dir / _DB_NAME).is_file() and not (study_dir / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"no tracking database {study_dir / _DB_NAME}; is the study name right?")
    return own, f"study {study_dir.name}'s own store"


def _study_dir(uri: str) -> Path | None:
    """The study folder of ``uri`` when it is a study's own store (beside the study's study.json)."""
    db = tracking.sqlite_db_path(uri)
    return db.parent if db is not None and db.name == _DB_NAME and (db.parent / MANIFEST_FILE).is_file() else None


def _refresh_study_mirror(uri: str, study_dir: Path | None = None) -> None:
    """Bring the store of ``study_dir`` (default: the study whose own store ``uri`` is) up to date with its
    record (rebuilt when the folder was moved or copied)."""
    study_dir = study_dir or _study_dir(uri)
    if study_dir is not None and (study_dir / MANIFEST_FILE).is_file() and \
            mirror.main([str(study_dir), "--tracking-uri", uri]) != 0:
        print("warning: showing the MLflow store as it is", file=sys.stderr)


def _urls(uri: str, server_url: str, study_dir: Path | None = None) -> tuple[str, str | None]:
    """The runs table of ``study_dir`` (default: the study whose own store ``uri`` is; see
    :func:`tune.mirror.study_urls`) and the compare view of its trials; the server's root and None
    without a study, or where the store has none of its runs."""
    study_dir, db = study_dir or _study_dir(uri), tracking.sqlite_db_path(uri)
    if study_dir is None or not (study_dir / MANIFEST_FILE).is_file() or (db is not None and not db.is_file()):
        return server_url, None
    try:
        table, compare = mirror.study_urls(server_url, study_dir, uri)
    except Exception:  # noqa: BLE001 - MLflow raises many kinds; the server's root still works
        return server_url, None
    return table or server_url, compare


def _server_log(uri: str, study_dir: Path | None) -> Path:
    """Where ``mlflow server`` writes its output (its start-up lines would bury the URL): in the study
    folder, else beside a sqlite store, else (or where neither is writable) a new temporary file."""
    db = tracking.sqlite_db_path(uri)
    for folder in (study_dir, None if db is None else db.parent):
        if folder is not None and os.access(folder, os.W_OK):
            return folder / SERVER_LOG
    handle, path = tempfile.mkstemp(prefix="mlflow-server-", suffix=".log")
    os.close(handle)
    return Path(path)


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
    parser.add_argument("--study", help="open study STUDY under --storage-path, in the MLflow store it recorded "
                        f"(a study from before that record: its {_DB_NAME})")
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: 5000; 8080 with --dashboard)")
    parser.add_argument("--open", action="store_true", help="open the URL in a web browser")
    parser.add_argument("--dashboard", action="store_true", help="Optuna's dashboard on a snapshot of the study's "
                        "record instead of the MLflow UI (see tune.dashboard)")
    args = parser.parse_args(argv)
    port = args.port if args.port is not None else 8080 if args.dashboard else 5000
    server_url = f"http://127.0.0.1:{port}"
    try:
        study_dir: Path | None = None
        if args.dashboard and args.tracking_uri:
            raise StudyError("--dashboard shows a study's record, not an MLflow store: pass --study (and "
                             "--storage-path), not --tracking-uri")
        if args.dashboard:
            return dashboard.serve(find_study(args.storage_path, args.study).resolve(), port,
                                   opened=webbrowser.open if args.open else None)
        if args.tracking_uri or (args.study is None and os.environ.get(TRACKING_URI_ENV)):
            uri = tracking.resolve_tracking_uri(args.tracking_uri, Path("."))
            which = "from --tracking-uri" if args.tracking_uri else f"from ${TRACKING_URI_ENV}"
        else:  # (the study's store even where $MLFLOW_TRACKING_URI is set: the study was asked for)
            study_dir = find_study(args.storage_path, args.study).resolve()
            uri, which = study_store(study_dir)
        if tracking.is_http_uri(uri):
            tracking.check_tracking_server(uri)
            url, compare = _urls(uri, uri.rstrip("/"), study_dir)
            print(f"MLflow UI: {url}   (a running tracking server, {which})",
                  *([f"compare the trials: {compare}"] if compare else []), sep="\n", flush=True)
            return 0
        if _answers(server_url):  # it would pass for ours until MLflow reports the port taken
            raise TrackingError(f"a server already answers on {server_url}; pass another --port")
        _refresh_study_mirror(uri, study_dir)
        url, compare = _urls(uri, server_url, study_dir)
    except (FileNotFoundError, StudyError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--uvicorn-opts", "--no-access-log"]
    if (artifacts := tracking.artifact_location(uri)) is not None:  # for runs logged through it
        command += ["--artifacts-destination", artifacts]
    # The job runner (GenAI evaluation) doubles start-up and is never used here; Starlette's deprecation
    # notice is MLflow's to act on. The caller's own settings win.
    quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
             "PYTHONWARNINGS": "ignore:starlette.middleware.wsgi is deprecated"}
    log, stopped = _server_log(uri, study_dir), []
    with log.open("w", encoding="utf-8") as out:  # (the server keeps its own handle)
        server = subprocess.Popen(command, env={**quiet, **os.environ}, stdout=out, stderr=subprocess.STDOUT)

    def stop(signum: int, _: object) -> None:
        # A plain `kill` reaches this process alone; `mlflow server` stops its workers on the same signal.
        stopped.append(signum)
        server.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while server.poll() is None and not _answers(server_url):
            time.sleep(0.25)
        if server.poll() is None:
            print(f"MLflow UI: {url}", *([f"compare the trials: {compare}"] if compare else []),
                  f"(serving {uri}, {which}; server log {log}; Ctrl-C stops it)", sep="\n", flush=True)
            if args.open:
                webbrowser.open(url)
        code = server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.poll() is None:
            server.terminate()
            server.wait()
    if code != 0 and not stopped:  # MLflow's own error, e.g. the port in use
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        print("\n".join([f"error: mlflow server exited with {code}; the end of {log}:", *tail]), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
