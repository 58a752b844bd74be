"""tune.ui: a study's store served by a real ``mlflow server`` on 127.0.0.1, landing on its runs table."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tune.objective import Objective
from tune.study import Study
from tune.tracking import TRACKING_URI_ENV, VIEW_TAG_PREFIX, runs_table_url
from tune.ui import (
    SERVER_LOG,
    _refresh_study_mirror,
    _urls,
    find_study,
    main,
    study_store,
)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "ui-test"
SEARCH = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
          "train.accumulation_steps": {"type": "categorical", "choices": [1, 2]}}
SPEC: dict[str, Any] = {
    "model": {"hidden_size": 64}, "train": {"epochs": 2}, "search": SEARCH,
    "tune": {"mode": "min", "metric": "val_loss", "num_samples": 3},
    "mlflow": {"tracking_uri": None, "experiment": EXPERIMENT},
}
DISTRIBUTIONS = {"train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                 "train.accumulation_steps": optuna.distributions.CategoricalDistribution([1, 2])}


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)


def _make_study(storage: Path) -> Path:
    """A finished study record of three trials (two completed, one stopped early) and its mirror."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    record = Study.create(storage / "s", "s", SPEC, "train: {}\n", {})
    for number, status, losses in ((0, "completed", [3.0, 2.5]), (1, "stopped_early", [3.5]),
                                   (2, "completed", [2.8, 2.1])):
        assert record.ask(DISTRIBUTIONS)[0] == number
        for epoch, loss in enumerate(losses, start=1):
            record.record_epoch(number, epoch, {"val_loss": loss, "train_loss": loss + 0.2}, "val_loss")
        record.finish(number, status, Objective("val_loss"))
    _refresh_study_mirror(f"sqlite:///{record.dir / 'mlflow.db'}")
    return record.dir


@pytest.fixture(scope="session")
def template_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Building MLflow's schema takes seconds; the fast tests copy one finished study instead.
    return _make_study(tmp_path_factory.mktemp("template"))


def _study(tmp_path: Path, template: Path) -> Path:
    shutil.copytree(template, tmp_path / "studies" / "s")
    return tmp_path / "studies" / "s"


def test_find_study_prefers_named_then_newest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run a study first"):
        find_study(tmp_path)
    # A study whose store is elsewhere has no mlflow.db in its folder: its study.json marks it.
    old, new = tmp_path / "old" / "mlflow.db", tmp_path / "new" / "study.json"
    for index, path in enumerate((old, new)):
        path.parent.mkdir()
        path.write_bytes(b"")
        os.utime(path, (1_000_000 + index, 1_000_000 + index))
    assert find_study(tmp_path) == new.parent
    assert find_study(tmp_path, "old") == old.parent
    with pytest.raises(FileNotFoundError, match="study name"):
        find_study(tmp_path, "absent")


def _recording(tmp_path: Path, template: Path, uri: str | None) -> Path:
    """A copy of the template study whose driver run recorded ``uri`` as its store (None: its own)."""
    folder = _study(tmp_path, template)
    Study.open(folder).add_history({"run": 1, "started": "2026-12-01T08:00:00", "tracking_uri": uri})
    return folder


def test_a_study_opens_in_the_store_its_runs_went_to(tmp_path: Path, template_study: Path) -> None:
    """A space's mlflow.tracking_uri (or $MLFLOW_TRACKING_URI when the study ran) naming a sqlite file
    elsewhere: study.json records it, and tune.ui opens it, brought up to date, on the study's runs."""
    elsewhere = f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}"
    folder = _recording(tmp_path, template_study, elsewhere)
    (folder / "mlflow.db").unlink()  # the study never had its own store
    assert find_study(tmp_path / "studies", "s") == folder
    uri, which = study_store(folder)
    assert uri == elsewhere and "study.json" in which
    _refresh_study_mirror(uri, folder)
    experiment = MlflowClient(tracking_uri=elsewhere).get_experiment_by_name(EXPERIMENT)
    assert not (folder / "mlflow.db").exists()
    url = _urls(uri, "http://127.0.0.1:5001", folder)[0]
    assert url.startswith(runs_table_url("http://127.0.0.1:5001", experiment.experiment_id) + "&")
    assert _query(url)["viewStateShareKey"] == Study.open(folder).manifest.study_id


def test_a_recorded_own_store_follows_a_moved_folder_and_old_studies_open_theirs(
        tmp_path: Path, template_study: Path) -> None:
    folder = _recording(tmp_path, template_study, None)  # null: the study's own store, wherever it is now
    assert study_store(folder) == (f"sqlite:///{folder / 'mlflow.db'}", "study s's own store")
    old = _study(tmp_path / "old", template_study)  # a study from before the store was recorded
    assert study_store(old)[0] == f"sqlite:///{old / 'mlflow.db'}"


def test_a_recorded_server_is_named_and_no_server_is_started(tmp_path: Path, template_study: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    server = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    _recording(tmp_path, template_study, server)
    assert main(["--storage-path", str(tmp_path / "studies"), "--study", "s"]) == 2
    err = capsys.readouterr().err
    assert f"MLflow tracking server {server} is unreachable" in err


def test_cli_reports_missing_study_without_starting_anything(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--storage-path", str(tmp_path)]) == 2
    assert "no study under" in capsys.readouterr().err


def test_runs_table_url_opens_the_model_training_view() -> None:
    url = runs_table_url("http://127.0.0.1:5001/", "7")
    fragment = urllib.parse.urlsplit(urllib.parse.urlsplit(url).fragment)
    assert url.startswith("http://127.0.0.1:5001/#/")
    assert fragment.path == "/experiments/7/runs"
    assert urllib.parse.parse_qs(fragment.query) == {"workflowType": ["machine_learning"]}


def _query(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(urllib.parse.urlsplit(url).fragment).query))


def test_landing_url_is_the_study_saved_view_best_first(tmp_path: Path, template_study: Path) -> None:
    folder = _study(tmp_path, template_study)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    url = _urls(uri, "http://127.0.0.1:5001")[0]
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT)
    study_id = Study.open(folder).manifest.study_id
    assert url.startswith(runs_table_url("http://127.0.0.1:5001", experiment.experiment_id) + "&")
    assert _query(url)["viewStateShareKey"] == study_id
    state = json.loads(json.loads(experiment.tags[VIEW_TAG_PREFIX + study_id])["state"])
    assert state["orderByKey"] == "metrics.`best_val_loss`" and state["orderByAsc"] is True
    assert "params.`train.learning_rate`" in state["selectedColumns"]
    # Not a study's own store: the server's root, where the experiments are listed.
    assert _urls(f"sqlite:///{tmp_path / 'other.db'}", "http://127.0.0.1:5001") == ("http://127.0.0.1:5001", None)


def test_without_a_saved_view_the_table_is_sorted_best_first(tmp_path: Path, template_study: Path) -> None:
    folder = _study(tmp_path, template_study)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    client.delete_experiment_tag(experiment.experiment_id,
                                 VIEW_TAG_PREFIX + Study.open(folder).manifest.study_id)
    # A share key that is not in the store would make the UI show an error: the URL sorts instead.
    assert _query(_urls(uri, "http://127.0.0.1:5001")[0]) == {
        "workflowType": "machine_learning", "orderByKey": "metrics.`best_val_loss`", "orderByAsc": "true"}


def test_the_compare_url_holds_the_trials_best_first_not_the_study_run(tmp_path: Path,
                                                                       template_study: Path) -> None:
    """The study's own run in a comparison (the runs table's header box selects it) makes MLflow's
    chart open on the fixed settings only it has, with no metric."""
    folder = _study(tmp_path, template_study)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    url = _urls(uri, "http://127.0.0.1:5001")[1]
    assert url is not None and url.startswith("http://127.0.0.1:5001/#/compare-runs?")
    query = _query(url)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    names = {r.info.run_id: r.info.run_name.split()[0] for r in client.search_runs([experiment.experiment_id])}
    assert [names[run_id] for run_id in json.loads(query["runs"])] == ["t002", "t000", "t001"]
    assert json.loads(query["experiments"]) == [experiment.experiment_id]
    assert query["workflowType"] == "machine_learning"
    assert _urls(f"sqlite:///{tmp_path / 'other.db'}", "http://127.0.0.1:5001")[1] is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.slow  # the server imports MLflow and opens the store: 10-30 s on a small machine
def test_serves_the_study_writes_nothing_else_and_stops_on_sigterm(tmp_path: Path) -> None:
    study = _make_study(tmp_path / "studies")
    files_before = sorted(p.relative_to(study) for p in study.rglob("*"))
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "tune.ui", "--storage-path", str(tmp_path / "studies"), "--port",
                           str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert ui.stdout is not None
        lines = []
        for line in ui.stdout:
            lines.append(line)
            if line.startswith("MLflow UI: "):
                break
        url = lines[-1].split()[2]
        # Only our lines (the mirror's one) before the URL: MLflow's own go to its log in the study folder.
        assert [line.split()[:2] for line in lines] == [["MLflow", "mirror"], ["MLflow", "UI:"]], lines
        assert (study / SERVER_LOG).stat().st_size > 0
        server = f"http://127.0.0.1:{port}"
        assert url.startswith(server + "/#/experiments/") and "viewStateShareKey=" in url, lines
        assert _health(server)

        # The trials as the UI reads them, over http; a run logged through the server keeps its
        # artifacts beside the study's database.
        remote = MlflowClient(tracking_uri=server)
        experiment = remote.get_experiment_by_name(EXPERIMENT)
        trials = {r.info.run_name.split()[0]: r for r in remote.search_runs([experiment.experiment_id])
                  if "minimind.trial" in r.data.tags}
        assert {name: r.data.metrics["val_loss"] for name, r in trials.items()} == {
            "t000": 2.5, "t001": 3.5, "t002": 2.1}
        run = remote.create_run(remote.create_experiment("through-the-server"))
        remote.log_text(run.info.run_id, "hello", "note.txt")
        assert (study / "mlartifacts").is_dir() and list((study / "mlartifacts").rglob("note.txt"))
        files_after = sorted(p.relative_to(study) for p in study.rglob("*") if "note.txt" not in p.parts
                             and not p.name.endswith("-journal"))
        assert [p for p in files_after if p not in files_before and p.parts[0] != "mlartifacts"] == [
            Path(SERVER_LOG)]

        os.kill(ui.pid, signal.SIGTERM)  # tune.ui alone, as a plain `kill` does
        assert ui.wait(timeout=60) is not None
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
    deadline = time.monotonic() + 30
    while _health(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _health(server)
    with pytest.raises(ProcessLookupError):
        os.killpg(ui.pid, 0)  # the MLflow server and its workers are gone with it
