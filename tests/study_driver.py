"""Helpers for tests that run ``python -m tune.run`` as a subprocess and read what a study leaves.

Each driver runs in its own session (``start_new_session=True``) with its own short Ray temp dir,
storage folder and MLflow sqlite (the default one inside the study folder); the token cache is the test
session's one (:data:`SHARED_TOKENS`, set by conftest.py), so the bundled data is tokenised once per session. Ray's
daemons inherit the driver's session but its workers move to process groups of their own, so
teardown kills every process of the driver's *session* by pid, and checks that none is left: a
SIGKILLed driver would otherwise leave a raylet and its workers behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPACES = Path(__file__).resolve().parent / "spaces"
# The test session's token cache folder (conftest.py sets it). The cache is content-keyed and published by
# one rename, so drivers may share it; each tokenising the same bundled data again cost seconds per test.
SHARED_TOKENS = "MINIMIND_TEST_TOKEN_CACHE"


def session_pids(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (read from /proc, so no name matching)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def kill_session(sid: int, timeout_s: float = 20.0) -> list[int]:
    """SIGKILL every process of session ``sid`` (our driver and what it started); returns survivors."""
    try:
        os.killpg(sid, signal.SIGKILL)  # the session leader's group: driver, gcs_server, raylet, ...
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while True:
        left = session_pids(sid)
        if not left or time.monotonic() > deadline:
            return left
        for pid in left:  # workers sit in process groups of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


@dataclass
class Workspace:
    """Per-test folders: study storage, Ray temp dir (short: socket paths < 107 bytes); the token cache:
    the session's (:data:`SHARED_TOKENS`), else a folder of its own."""

    root: Path
    storage: Path = field(init=False)
    cache: Path = field(init=False)
    ray_tmp: Path = field(init=False)

    def __post_init__(self) -> None:
        self.storage = self.root / "studies"
        self.cache = Path(os.environ.get(SHARED_TOKENS) or self.root / "tokens")
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MINIMIND_TUNE_STORAGE")}
        env.update({
            "RAY_USAGE_STATS_ENABLED": "0",
            "MINIMIND_CACHE": str(self.cache),  # inherited by Ray's workers through the raylet
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(self.ray_tmp),
            **extra,
        })
        return env

    def study_dir(self, name: str) -> Path:
        return self.storage / name

    def cleanup(self) -> None:
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def main_in_process(ws: Workspace, args: Sequence[str], cwd: Path | None = None,
                    storage: bool = True) -> subprocess.CompletedProcess:
    """``python -m tune.run ARGS`` as :class:`Driver` runs it, but by ``tune.run.main`` in this process:
    for a command that stops before Ray starts (a refusal, a dry run), whose cost was mostly a new
    interpreter's start and imports. Its stdout and stderr are read at the file descriptors (what a
    terminal shows, from Python or not); the environment (``ws.env()`` meanwhile), working directory,
    signal and log handlers are put back afterwards, and a Ray started by mistake is shut down again.
    ``storage``: pass ``ws.storage`` as --storage-path, as :class:`Driver` does."""
    import logging

    from tune.run import main

    argv = [*(["--storage-path", str(ws.storage)] if storage else []), "--ray-temp-dir", str(ws.ray_tmp), *args]
    environ, handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    log_handlers, here = logging.getLogger().handlers[:], os.getcwd()
    streams, fds = (sys.stdout, sys.stderr), (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            os.environ.clear()
            os.environ.update(ws.env())
            os.chdir(cwd or REPO)
            for stream in streams:
                stream.flush()
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))  # noqa: SIM115
            try:
                code = main(list(argv))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
        finally:
            sys.stdout, sys.stderr = streams
            for fd, saved in zip((1, 2), fds, strict=True):
                os.dup2(saved, fd)
                os.close(saved)
            os.chdir(here)
            os.environ.clear()
            os.environ.update(environ)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            logging.getLogger().handlers[:] = log_handlers
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()
        text = [f.seek(0) or f.read().decode(errors="replace") for f in (out, err)]
    return subprocess.CompletedProcess(argv, code, text[0], text[1])


class Driver:
    """One ``python -m tune.run`` process; stdout/stderr go to files so they can be read while it runs."""

    def __init__(self, ws: Workspace, args: Sequence[str], *, cwd: Path = REPO, tag: str = "run",
                 env: dict[str, str] | None = None, sigint_ignored: bool = False, prefix: Sequence[str] = ()) -> None:
        """``sigint_ignored``: started as a background job of a non-interactive shell is (`cmd &`:
        SIGINT ignored, which the driver inherits). ``prefix``: a command the driver runs under
        (:func:`file_modes_apply`'s)."""
        self.ws = ws
        self.args = list(args)
        n = len(list(ws.root.glob(f"{tag}-*.out")))
        self.out_path = ws.root / f"{tag}-{n}.out"
        self.err_path = ws.root / f"{tag}-{n}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        cmd = [*prefix, sys.executable, "-m", "tune.run", "--storage-path", str(ws.storage),
               "--ray-temp-dir", str(ws.ray_tmp), *self.args]
        self.started = time.monotonic()
        # (an ignored signal stays ignored across exec; this test process's own handler is put back at once)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint_ignored else None
        try:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=ws.env(**(env or {})), stdout=self._out,
                                         stderr=self._err, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        self.pid = self.proc.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def output(self, tail: int = 6000) -> str:
        """Both streams, for failure messages."""
        return (f"\n--- driver {' '.join(self.args)} (pid {self.pid}, rc {self.proc.returncode}) ---\n"
                f"--- stdout ---\n{self.stdout[-tail:]}\n--- stderr ---\n{self.stderr[-tail:]}")

    def tracebacks(self) -> list[str]:
        """The traceback lines the driver printed, stdout and stderr together (:func:`traceback_lines`)."""
        return traceback_lines(self.stdout + self.stderr)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.teardown()
            raise AssertionError(f"driver did not finish within {timeout_s:.0f}s{self.output()}") from None

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout_s: float,
                 poll_s: float = 0.1) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"driver exited (rc {self.proc.returncode}) before {what}{self.output()}")
            if time.monotonic() > deadline:
                self.teardown()
                raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{self.output()}")
            time.sleep(poll_s)

    def children(self) -> list[int]:
        """Pids of the driver's live child processes (e.g. its tokeniser workers)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def teardown(self) -> None:
        """Kill whatever of this driver's session is still alive and insist that nothing is left."""
        left = kill_session(self.pid)
        self.proc.wait(timeout=10) if self.proc.poll() is None else None
        self._out.close()
        self._err.close()
        assert not left, f"processes of driver session {self.pid} survived SIGKILL: {left}"


def run_driver(ws: Workspace, args: Sequence[str], timeout_s: float = 240, **kwargs: Any) -> Driver:
    """Run a driver to completion (teardown included); the caller checks ``proc.returncode``."""
    driver = Driver(ws, args, **kwargs)
    try:
        driver.wait(timeout_s)
    finally:
        driver.teardown()
    return driver


# Root writes through any file mode (CAP_DAC_OVERRIDE), so a driver meant to meet "Permission denied" runs, as
# root, with that capability and CAP_DAC_READ_SEARCH dropped from its bounding set: its python has neither, its
# uid stays. Not as another user (nobody): the interpreter, the test's temporary folders and the token cache are
# root's, often below folders only root may enter (/root/.pyenv, /tmp/pytest-of-root).
_UNPRIVILEGED = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")


def file_modes_apply(scratch: Path) -> tuple[list[str], str | None]:
    """(the command prefix under which a driver meets file modes as any user does, why not: None when it does),
    checked by a python under it writing into a read-only folder made in ``scratch``."""
    prefix = list(_UNPRIVILEGED) if os.geteuid() == 0 else []
    if prefix and shutil.which(prefix[0]) is None:
        return prefix, "running as root, and setpriv (util-linux), which drops root's override of file modes, is missing"
    probe = scratch / "read-only-probe"
    probe.mkdir(mode=0o555)
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", "import sys, tempfile; tempfile.TemporaryFile(dir=sys.argv[1])",
                               str(probe)], capture_output=True, text=True, timeout=120, check=False)
    finally:
        probe.rmdir()
    if "PermissionError" not in done.stderr:
        said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return prefix, f"file modes do not stop {' '.join([*prefix, 'python'])} writing in a read-only folder ({said})"
    return prefix, None


# What of a traceback reaches a terminal: Python's header and its frame lines, and the forms in which Ray
# passes a worker's error or log on to its driver (a RayTaskError or RayActorError, a "(raylet)" block,
# a worker's lines prefixed "(train_trial pid=N)").
_TRACEBACK = re.compile(r'Traceback \(most recent call last\)|^\s*File "[^"]*", line \d+|Ray(?:Task|Actor)Error|'
                        r'\(raylet\)|^\(\w+ pid=\d+')


def traceback_lines(text: str) -> list[str]:
    """The lines of ``text`` that belong to a traceback (the README's "traceback lines" figure)."""
    return [line for line in text.splitlines() if _TRACEBACK.search(line)]


# --- reading a study ---------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    """The lines of a trial's result.json that are complete JSON (the last may be half written)."""
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def stored_results(study_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """trial name (t000, ...) -> the epochs the study record holds, each ``{**metrics, "epoch": e}``."""
    from tune.study import Study

    record = Study.open(study_dir)
    return {t.name: [{**m, "epoch": e} for e, m in sorted(t.epochs.items())] for t in record.trials()}


def trained_epochs(study_dir: Path) -> list[tuple[str, int]]:
    """(trial name, evaluation index) for every evaluation any driver run trained: a pair that occurs twice
    was trained twice. With one evaluation per epoch the index is the epoch. A run trained an evaluation when
    its Ray ``result.json`` reports it (a continued trial first reports the evaluation of the checkpoint it
    continues from again, marked ``restored``: not training) or when the run's trial folder holds its
    checkpoint (written before the report: a Ctrl-C or kill in between leaves a checkpoint whose result never
    arrived, which ``--resume`` records; retention deletes checkpoints, the report stays)."""
    from tune.storage import CHECKPOINT_PREFIX

    pairs = []
    for folder in sorted(study_dir.glob("runs/run-*/t[0-9][0-9][0-9]")):
        reported = [int(row.get("evaluation", row["epoch"])) for row in read_results(folder / "result.json")
                    if "epoch" in row and not row.get("diverged") and not row.get("restored")]
        saved = {int(p.name.removeprefix(CHECKPOINT_PREFIX)) for p in folder.glob(f"{CHECKPOINT_PREFIX}[0-9]*")}
        pairs += [(folder.name, index) for index in reported + sorted(saved - set(reported))]
    return pairs


def folder_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below ``folder`` (byte-identical checks)."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def mlflow_runs(study_dir: Path) -> tuple[Any, list[Any], list[Any]]:
    """(client, parent runs, child runs) of the study's own sqlite store, via the real MLflow API."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{study_dir / 'mlflow.db'}")
    runs: list[Any] = []
    for exp in client.search_experiments(view_type=ViewType.ALL):
        runs += client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    parents = [r for r in runs if r.data.tags.get("minimind.role") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children
