"""Start the MLflow UI on a study's tracking database: ``python -m tune.ui`` (or ``make ui``).

::

    python -m tune.ui                          # newest studies/*/mlflow.db
    python -m tune.ui --study my_study         # studies/my_study/mlflow.db
    python -m tune.ui --tracking-uri sqlite:////abs/path/mlflow.db --port 5000
    python -m tune.ui --host 0.0.0.0           # reachable from other machines (think twice)

It runs ``mlflow server`` as a child process in its own process group, bound to 127.0.0.1 on a
free port unless told otherwise, prints the URL once the server answers, and on Ctrl-C (or
SIGTERM) terminates that process group, escalating to SIGKILL if it does not exit. The server's
own output goes to ``mlflow-server.log`` beside the database. When the tracking URI is already an
http(s) server, that server serves the UI itself and this command just checks and prints it.

For a shared tracking server on a cluster, ``start_mlflow_server`` / ``stop_server`` are the same
steps from Python; point every study at it with ``mlflow.tracking_uri: http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .mirror import (
    TRACKING_URI_ENV,
    TrackingError,
    check_tracking_server,
    is_http_uri,
    resolve_tracking_uri,
    sqlite_db_path,
)

__all__ = ["ServerError", "find_study_db", "free_port", "main", "start_mlflow_server", "stop_server"]

logger = logging.getLogger(__name__)

# Mirrors tune.run.DEFAULT_STORAGE; not imported from there because that module pulls in torch
# and Ray just to print a URL.
_DEFAULT_STORAGE = Path("studies")
_DB_NAME = "mlflow.db"
# The first start of a fresh database runs MLflow's schema migrations, which take a while on a
# busy machine; a later start answers in a few seconds.
_STARTUP_TIMEOUT_S = 120.0
# A picked free port can be taken by someone else before the server binds it: try a new one.
_PORT_ATTEMPTS = 3


class ServerError(RuntimeError):
    """``mlflow server`` did not come up; the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _url(host: str, port: int) -> str:
    # A wildcard bind is reached through loopback from this machine.
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


def _default_artifacts_dir(backend_uri: str) -> Path:
    db = sqlite_db_path(backend_uri)
    base = db.resolve().parent if db is not None else Path.cwd()
    return base / "mlartifacts"


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Stop a server started by :func:`start_mlflow_server`: SIGTERM its process group, then SIGKILL.

    The group, not just ``proc``: ``mlflow server`` runs uvicorn (and its workers) as children.
    """
    pgid = proc.pid  # start_new_session=True made the server the leader of its own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # Once the leader is reaped and no member is left, the id may belong to someone else.
        if proc.poll() is not None and not _group_alive(pgid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.1)
        if not _group_alive(pgid):
            return
        logger.warning("mlflow server (pgid %d) ignored %s", pgid, signal.Signals(sig).name)
    proc.wait(timeout=timeout_s)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs; zombies (already dead, not yet reaped) don't count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc_fs = Path("/proc")
    if not proc_fs.is_dir():
        return True
    for stat in proc_fs.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError, IndexError):
            continue
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def start_mlflow_server(
    backend_uri: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    artifacts_dir: Path | None = None,
    *,
    workers: int = 1,
    timeout_s: float = _STARTUP_TIMEOUT_S,
    log_path: Path | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``mlflow server`` on ``backend_uri``; returns the process and its URL once it answers.

    ``port`` None or 0 picks a free port. Artifacts logged through the server go to
    ``artifacts_dir`` (default: ``mlartifacts`` beside a sqlite db); runs logged straight into the
    db keep their own artifact folder, which the server reads in place. Raises
    :class:`ServerError` with the end of the server log if it exits or stays silent.
    """
    artifacts = Path(artifacts_dir) if artifacts_dir is not None else _default_artifacts_dir(backend_uri)
    with contextlib.suppress(OSError):  # a read-only study folder: the existing artifacts are read in place
        artifacts.mkdir(parents=True, exist_ok=True)
    log_file = Path(log_path) if log_path is not None else artifacts.parent / "mlflow-server.log"
    if not os.access(log_file.parent, os.W_OK) or (log_file.exists() and not os.access(log_file, os.W_OK)):
        # A read-only study folder (a mounted copy): the server's log goes to the temp folder.
        log_file = Path(tempfile.gettempdir()) / f"mlflow-server-{os.getpid()}.log"
    db = sqlite_db_path(backend_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port else _PORT_ATTEMPTS
    last_error: ServerError | None = None
    for _ in range(attempts):
        chosen = port or free_port(host)
        try:
            return _launch(backend_uri, host, chosen, artifacts, workers, timeout_s, log_file)
        except ServerError as exc:
            last_error = exc
            logger.info("mlflow server did not start on port %d: %s", chosen, exc)
    assert last_error is not None
    raise last_error


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    # The job runner (GenAI evaluation, trace archival) starts seven huey consumer processes and
    # doubles the start-up time; comparing training runs never uses it. An explicit setting wins.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def _launch(
    backend_uri: str, host: str, port: int, artifacts: Path, workers: int, timeout_s: float, log_file: Path
) -> tuple[subprocess.Popen[bytes], str]:
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
        "--artifacts-destination", str(artifacts),
    ]
    url = _url(host, port)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        # Own session: Ctrl-C in the terminal reaches only us, and we stop the whole group.
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=_server_env(),
        )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(
                    f"mlflow server exited with code {proc.returncode} before answering on {url}; "
                    f"log {log_file}:\n{_log_tail(log_file)}"
                )
            if _answers(url):
                logger.info("mlflow server (pid %d) answers on %s", proc.pid, url)
                return proc, url
            time.sleep(0.25)
        raise ServerError(
            f"mlflow server did not answer on {url} within {timeout_s:.0f}s; log {log_file}:\n"
            f"{_log_tail(log_file)}"
        )
    except BaseException:
        stop_server(proc)
        raise


def find_study_db(storage: Path, study: str | None = None) -> Path:
    """The tracking db of ``study`` under ``storage``, or the most recently written one."""
    if study is not None:
        db = storage / study / _DB_NAME
        if not db.is_file():
            raise FileNotFoundError(f"no tracking database {db}; is the study name right?")
        return db
    dbs = [path for path in storage.glob(f"*/{_DB_NAME}") if path.is_file()]
    if not dbs:
        raise FileNotFoundError(
            f"no study tracking database under {storage}/ (looked for */{_DB_NAME}); run a study first, "
            f"or pass --tracking-uri / --storage-path"
        )
    return max(dbs, key=lambda path: path.stat().st_mtime)


def _backend_uri(args: argparse.Namespace) -> str:
    if args.tracking_uri:
        return resolve_tracking_uri(args.tracking_uri, Path("."))
    if args.study is not None:
        db = find_study_db(args.storage_path, args.study)
        return resolve_tracking_uri(None, db.parent)
    if os.environ.get(TRACKING_URI_ENV):
        return resolve_tracking_uri(None, Path("."))
    return resolve_tracking_uri(None, find_study_db(args.storage_path).parent)


def _refresh_study_mirror(uri: str) -> None:
    """A study's own store is a mirror of its record: bring it up to date before showing it (and
    rebuild it when the study folder was moved or copied here, so its artifacts resolve)."""
    db = sqlite_db_path(uri)
    if db is None or not (db.parent / "study.json").is_file():
        return
    from .mirror import main as sync_mirror

    if sync_mirror([str(db.parent), "--tracking-uri", uri]) != 0:
        print("warning: showing the MLflow store as it is", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help=f"MLflow backend (default: ${TRACKING_URI_ENV}, else the "
                        f"newest <storage-path>/*/{_DB_NAME})")
    parser.add_argument("--storage-path", type=Path, default=_DEFAULT_STORAGE,
                        help=f"where studies live (default: {_DEFAULT_STORAGE})")
    parser.add_argument("--study", help=f"open <storage-path>/<study>/{_DB_NAME}")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--artifacts-dir", type=Path, help="where artifacts logged through this server go")
    parser.add_argument("--timeout", type=float, default=_STARTUP_TIMEOUT_S,
                        help="seconds to wait for the server to answer")
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, through the `finally` that stops the server's process group;
    # installed before start-up, and put back after, since tests call main() in-process.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _serve(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(args: argparse.Namespace) -> int:
    try:
        uri = _backend_uri(args)
        if is_http_uri(uri):
            check_tracking_server(uri)
            print(f"{uri} is an MLflow server already; open it in a browser.", flush=True)
            return 0
        _refresh_study_mirror(uri)
        proc, url = start_mlflow_server(uri, args.host, args.port or None, args.artifacts_dir,
                                        timeout_s=args.timeout)
    except (FileNotFoundError, ServerError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # start_mlflow_server already stopped the half-started server.
        return 130
    print(f"MLflow UI: {url}   (backend {uri}; pid {proc.pid}); Ctrl-C to stop", flush=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        print("\nstopping the MLflow server...", flush=True)
        return 0
    finally:
        stop_server(proc)
    print(f"error: mlflow server exited with code {code}; see mlflow-server.log beside the database",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
