"""A real ``mlflow server`` on 127.0.0.1: it answers, shows runs logged over http, and stops by PID."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tune.mirror import TRACKING_URI_ENV, check_tracking_server
from tune.ui import find_study_db, main, start_mlflow_server, stop_server


@pytest.mark.slow  # the server imports MLflow and builds its schema: 10-30 s on a small machine
def test_server_serves_ui_and_runs_then_stops(tmp_path: Path) -> None:
    db = tmp_path / "study" / "mlflow.db"
    backend = f"sqlite:///{db}"
    proc, url = start_mlflow_server(backend)
    try:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert b"<html" in response.read().lower()
        check_tracking_server(url)

        remote = MlflowClient(tracking_uri=url)
        experiment_id = remote.create_experiment("ui-check")
        run = remote.create_run(experiment_id, run_name="over-http")
        remote.log_metric(run.info.run_id, "val_loss", 1.25, step=1)
        remote.log_text(run.info.run_id, "hello", "note.txt")
        remote.set_terminated(run.info.run_id)

        # Visible both through the server and in the database file it was pointed at.
        (seen,) = remote.search_runs([experiment_id])
        assert seen.data.metrics == {"val_loss": 1.25}
        (stored,) = MlflowClient(tracking_uri=backend).search_runs([experiment_id])
        assert stored.info.run_id == run.info.run_id
        assert [a.path for a in remote.list_artifacts(run.info.run_id)] == ["note.txt"]
        assert (tmp_path / "study" / "mlartifacts").is_dir()
    finally:
        stop_server(proc)
    assert proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # the whole group (uvicorn included) is gone
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_find_study_db_prefers_named_then_newest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run a study first"):
        find_study_db(tmp_path)
    old, new = tmp_path / "old" / "mlflow.db", tmp_path / "new" / "mlflow.db"
    for index, path in enumerate((old, new)):
        path.parent.mkdir()
        path.write_bytes(b"")
        os.utime(path, (1_000_000 + index, 1_000_000 + index))
    assert find_study_db(tmp_path) == new
    assert find_study_db(tmp_path, "old") == old
    with pytest.raises(FileNotFoundError, match="study name"):
        find_study_db(tmp_path, "absent")


def test_cli_reports_missing_study_without_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    assert main(["--storage-path", str(tmp_path)]) == 2
    assert "no study tracking database" in capsys.readouterr().err
