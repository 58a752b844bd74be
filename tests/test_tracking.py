"""tune.tracking: which MLflow store a study tracks into, and whether it is usable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tune.tracking import resolve_tracking_uri, sqlite_db_path


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.chdir(tmp_path)
    expected = f"sqlite:///{tmp_path.resolve() / 'rel/m.db'}"
    assert resolve_tracking_uri("sqlite:///rel/m.db", Path("x")) == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:1")
    assert resolve_tracking_uri(None, tmp_path) == "http://server:1"
    assert resolve_tracking_uri("http://yaml:2", tmp_path) == "http://yaml:2"
    assert sqlite_db_path("sqlite:////a/b/mlflow.db") == Path("/a/b/mlflow.db")
    assert sqlite_db_path("sqlite:///:memory:") is None
    assert sqlite_db_path("http://x") is None


@pytest.mark.slow  # two interpreters import MLflow and Ray, one builds the schema: about 10 s on 2 cores
def test_two_processes_create_one_fresh_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    code = "import sys; from tune.tracking import check_tracking_server as c; c(sys.argv[1]); print('ok')"
    repo = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], cwd=repo, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "ok"
    assert MlflowClient(tracking_uri=uri).search_experiments()


def test_the_store_a_study_used_is_recorded_so_that_it_follows_a_moved_folder(tmp_path: Path) -> None:
    from tune.study import Manifest
    from tune.tracking import own_store_uri, recorded_tracking_uri, uri_to_record

    study = tmp_path / "s"
    assert uri_to_record(own_store_uri(study), study) is None  # null: the study's own, wherever it is
    assert uri_to_record("sqlite:////team/mlflow.db", study) == "sqlite:////team/mlflow.db"
    assert uri_to_record("https://me:secret@mlflow.example:8443/x", study) == "https://me@mlflow.example:8443/x"

    def manifest(*history: dict[str, object]) -> Manifest:
        return Manifest(study_id="id", name="s", created="2026-12-01T08:00:00", spec={}, history=list(history))

    moved = tmp_path / "moved"
    assert recorded_tracking_uri(moved, manifest()) is None  # a study from before the record
    assert recorded_tracking_uri(moved, manifest({"run": 1, "tracking_uri": None}, {"run": 1, "seconds": 3})) == \
        own_store_uri(moved)
    assert recorded_tracking_uri(moved, manifest({"run": 1, "tracking_uri": None},
                                                 {"run": 2, "tracking_uri": "http://h:5000"})) == "http://h:5000"
