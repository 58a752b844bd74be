"""tune.lock: one driver per study, and a lock a killed driver held is free at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tune.lock import StudyLock, lock_path
from tune.study import StudyError


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    study = tmp_path / "studies" / "dup"
    with StudyLock(study):
        assert lock_path(study).is_file() and not study.exists()  # nothing of the study is written
        with pytest.raises(StudyError, match=rf"in use by pid {os.getpid()} on .* since"):
            StudyLock(study).acquire()
    with StudyLock(study):  # released
        pass


def test_lock_of_a_killed_process_is_not_stale(tmp_path: Path) -> None:
    study = tmp_path / "dup"
    code = ("import sys, time; from pathlib import Path; from tune.lock import StudyLock; "
            f"lock = StudyLock(Path({str(study)!r})); lock.acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(StudyError, match=f"pid {proc.pid}"):
            StudyLock(study).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(0.1)
        with StudyLock(study):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
