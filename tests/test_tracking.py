"""MLflow tracking of a study through the real MLflow API on a sqlite db, driven with Ray Trial objects."""

from __future__ import annotations

import logging
import pickle
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import cloudpickle
from ray.tune.experiment import Trial

from tune.plots import PLOT_FILES, plot_study
from tune.tracking import (
    FAILURE_TAG,
    PARENT_RUN_TAG,
    ROLE_TAG,
    STATUS_TAG,
    TRIAL_ID_TAG,
    BestTrial,
    MlflowTrialCallback,
    StudyTracker,
    TrackingError,
    check_tracking_server,
    filter_metrics,
    resolve_tracking_uri,
)

EXPERIMENT = "minimind-sft"
STUDY = "lr_sweep"
PLANNED_EPOCHS = 3
PARAM_KEYS = ["train.learning_rate", "train.batch_size"]
MODEL_METRICS = {"val_loss", "train_loss", "lr", "epoch", "tokens_per_s"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Creating MLflow's schema takes a second or two; each test copies a migrated empty db instead.
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def study_dir(tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    directory = tmp_path / "studies" / STUDY
    directory.mkdir(parents=True)
    shutil.copy(template_db, directory / "mlflow.db")
    return directory


@pytest.fixture
def uri(study_dir: Path) -> str:
    return resolve_tracking_uri(None, study_dir)


def make_trial(index: int, lr: float = 1e-3, batch_size: int = 16) -> Trial:
    config = {"train": {"learning_rate": lr, "batch_size": batch_size, "epochs": PLANNED_EPOCHS},
              "data": {"max_seq_len": 128}}
    return Trial("minimind_trial", stub=True, config=config, trial_id=f"a1b2c_{index:05d}")


def ray_result(trial: Trial, epoch: int, val_loss: float) -> dict[str, Any]:
    """What Tune hands a callback: the trainable's metrics plus Ray's own keys."""
    return {
        "val_loss": val_loss,
        "train_loss": val_loss + 0.25,
        "lr": 1e-3,
        "epoch": epoch,
        "tokens_per_s": 1234.5,
        "diverged_metric": float("nan"),
        "note": "not a number",
        "done": False,
        "training_iteration": epoch,
        "trial_id": trial.trial_id,
        "date": "2026-01-01_00-00-00",
        "timestamp": 1767225600,
        "time_this_iter_s": 1.5,
        "time_total_s": 1.5 * epoch,
        "pid": 4242,
        "hostname": "node",
        "node_ip": "127.0.0.1",
        "config": dict(trial.config),
        "time_since_restore": 1.5 * epoch,
        "iterations_since_restore": epoch,
        "checkpoint_dir_name": f"checkpoint_{epoch - 1:06d}",
        "should_checkpoint": True,
        "experiment_tag": "1_learning_rate=0.001",
    }


def start_tracker(uri: str, resume: bool = False) -> StudyTracker:
    tracker = StudyTracker(uri)
    tracker.start(
        study_name=STUDY,
        experiment=EXPERIMENT,
        fixed_params={"train": {"epochs": PLANNED_EPOCHS}, "model.hidden_size": 64},
        settings={"searcher": "optuna", "num_samples": 4, "resources": {"gpu": 0.5}},
        space_text="search:\n  train.learning_rate: {loguniform: [1e-5, 1e-2]}\n",
        tags={"git_commit": "abc123", "dataset_fingerprint": "f00d", "model_params": 123456},
        resume=resume,
    )
    return tracker


def callback(tracker: StudyTracker) -> MlflowTrialCallback:
    return tracker.trial_callback(param_keys=PARAM_KEYS, planned_epochs=PLANNED_EPOCHS, strict=True)


def run_epochs(cb: MlflowTrialCallback, trial: Trial, epochs: range, start: bool = True) -> None:
    if start:
        cb.on_trial_start(iteration=0, trials=[trial], trial=trial)
    for epoch in epochs:
        result = ray_result(trial, epoch, 3.0 / epoch)
        cb.on_trial_result(iteration=epoch, trials=[trial], trial=trial, result=result)
        trial.update_last_result(result)


def all_runs(uri: str) -> list[Any]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return list(client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000))


def children_by_trial(uri: str) -> dict[str, Any]:
    runs = [run for run in all_runs(uri) if PARENT_RUN_TAG in run.data.tags]
    by_trial = {run.data.tags[TRIAL_ID_TAG]: run for run in runs}
    assert len(by_trial) == len(runs), "a trial has more than one MLflow run"
    return by_trial


def parents(uri: str) -> list[Any]:
    return [run for run in all_runs(uri) if run.data.tags.get(ROLE_TAG) == "parent"]


def steps(uri: str, run_id: str, key: str = "val_loss") -> list[int]:
    return [metric.step for metric in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)]


def artifact_paths(uri: str, run_id: str) -> set[str]:
    client = MlflowClient(tracking_uri=uri)
    found: set[str] = set()
    pending = [""]
    while pending:
        for info in client.list_artifacts(run_id, pending.pop() or None):
            if info.is_dir:
                pending.append(info.path)
            else:
                found.add(info.path)
    return found


def test_resolve_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path / "s") == f"sqlite:///{tmp_path / 's' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("http://mlflow:80", tmp_path) == "http://mlflow:80"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///rel/m.db", tmp_path) == f"sqlite:///{tmp_path / 'rel' / 'm.db'}"


def test_filter_metrics_drops_ray_bookkeeping_and_non_numbers() -> None:
    trial = make_trial(0)
    result = ray_result(trial, 2, 1.5)
    assert filter_metrics(result) == {
        "val_loss": 1.5, "train_loss": 1.75, "lr": 1e-3, "epoch": 2.0, "tokens_per_s": 1234.5,
    }
    assert filter_metrics(result, ["val_loss", "note", "diverged_metric", "absent"]) == {"val_loss": 1.5}


def test_study_runs_statuses_params_metrics_and_artifacts(uri: str, study_dir: Path) -> None:
    tracker = start_tracker(uri)
    cb = callback(tracker)
    cb.setup()
    done, early, failed, dangling = (make_trial(i, lr=10.0 ** -(i + 2), batch_size=8 * (i + 1)) for i in range(4))

    run_epochs(cb, done, range(1, 4))
    cb.on_trial_complete(iteration=3, trials=[done], trial=done)
    run_epochs(cb, early, range(1, 2))
    cb.on_trial_complete(iteration=4, trials=[early], trial=early)
    run_epochs(cb, failed, range(1, 3))
    failed.get_error = lambda: (  # the text Ray writes, colours included
        "Failure # 1 (occurred at x)\n\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1)\n  File x\n"
        "RuntimeError: CUDA out of memory\n"
    )
    cb.on_trial_error(iteration=5, trials=[failed], trial=failed)
    run_epochs(cb, dangling, range(1, 2))

    children = children_by_trial(uri)
    assert set(children) == {t.trial_id for t in (done, early, failed, dangling)}
    for trial in (done, early, failed, dangling):
        run = children[trial.trial_id]
        assert run.data.tags[PARENT_RUN_TAG] == tracker.parent_run_id
        assert run.info.run_name == str(trial)
        assert run.data.params == {
            "train.learning_rate": str(trial.config["train"]["learning_rate"]),
            "train.batch_size": str(trial.config["train"]["batch_size"]),
        }
        assert set(run.data.metrics) == MODEL_METRICS
    assert steps(uri, children[done.trial_id].info.run_id) == [1, 2, 3]
    assert children[done.trial_id].data.metrics["val_loss"] == pytest.approx(1.0)
    expected = {done: ("FINISHED", "completed"), early: ("KILLED", "stopped_early"),
                failed: ("FAILED", "failed"), dangling: ("RUNNING", "running")}
    for trial, (status, tag) in expected.items():
        assert (children[trial.trial_id].info.status, children[trial.trial_id].data.tags[STATUS_TAG]) == (status, tag)
    assert children[failed.trial_id].data.tags[FAILURE_TAG] == "RuntimeError: CUDA out of memory"
    error_txt = Path(children[failed.trial_id].info.artifact_uri) / "error.txt"
    assert error_txt.read_text().startswith("Failure # 1 (occurred at x)\nray::ImplicitFunc.train() (pid=1)")

    checkpoint = study_dir / "best" / "model.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"fp16 weights")
    best_yaml = study_dir / "best.yaml"
    best_yaml.write_text("train:\n  learning_rate: 0.01\n")
    plots = plot_study(None, {str(done): [(1, 3.0), (2, 1.5), (3, 1.0)]}, study_dir / "plots")
    summary = study_dir / "summary.csv"
    summary.write_text("trial,val_loss\nx,1.0\n")
    tracker.finish(
        "completed",
        best={"trial_name": str(done), "trial_id": done.trial_id, "metric": "val_loss", "value": 1.0,
              "epoch": 3, "params": {"train": {"learning_rate": 0.01}}, "checkpoint": checkpoint,
              "best_yaml": best_yaml},
        artifacts={
            "plots": study_dir / "plots",                                   # a folder
            "report/history": plots["optimization_history"],                # renamed, suffix kept
            "trial_table.csv": summary,                                     # renamed at the root
            "gone.txt": study_dir / "missing.txt",                          # warned about, skipped
        },
        summary_csv=summary,
    )

    (parent,) = parents(uri)
    assert parent.info.run_id == tracker.parent_run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[STATUS_TAG] == "completed"
    assert parent.data.tags["git_commit"] == "abc123"
    assert parent.data.tags["minimind.best_run_id"] == children[done.trial_id].info.run_id
    assert parent.data.tags["best.train.learning_rate"] == "0.01"
    assert parent.data.metrics["best_val_loss"] == 1.0
    assert parent.data.params["train.epochs"] == str(PLANNED_EPOCHS)
    assert parent.data.params["tune.resources.gpu"] == "0.5"
    assert parent.data.tags["minimind.best_epoch"] == "3"
    assert artifact_paths(uri, parent.info.run_id) == {
        "space.yaml", "best/model.pth", "best/best.yaml", "summary.csv", "trial_table.csv",
        "report/history.png", *(f"plots/{path.name}" for path in plots.values()),
    }
    artifact_dir = Path(parent.info.artifact_uri)
    assert (artifact_dir / "best" / "model.pth").read_bytes() == b"fp16 weights"
    assert not (artifact_dir / "report" / "history.png").is_symlink()
    after = children_by_trial(uri)
    assert after[dangling.trial_id].info.status == "KILLED"
    assert after[dangling.trial_id].data.tags[STATUS_TAG] == "interrupted"
    assert after[done.trial_id].info.status == "FINISHED"
    assert not [run for run in all_runs(uri) if run.info.status == "RUNNING"]
    # Artifacts of a sqlite-backed study stay beside its database, not in the working directory.
    assert Path(parent.info.artifact_uri).is_relative_to(study_dir / "mlartifacts")


def test_resume_reuses_parent_and_trial_runs(uri: str) -> None:
    first = start_tracker(uri)
    cb = callback(first)
    interrupted, finished = make_trial(0), make_trial(1)
    run_epochs(cb, interrupted, range(1, 3))
    run_epochs(cb, finished, range(1, 4))
    cb.on_trial_complete(iteration=3, trials=[finished], trial=finished)
    # The driver died here: no finish(), the parent and one child are still RUNNING.

    with pytest.raises(TrackingError, match="already has a parent run"):
        StudyTracker(uri).start(STUDY, EXPERIMENT, {}, {}, "", {}, resume=False)

    second = start_tracker(uri, resume=True)
    assert second.parent_run_id == first.parent_run_id
    resumed = callback(second)
    resumed.setup()
    newcomer = make_trial(2)
    # Tune re-reports the last checkpointed epoch on restore; it must not be logged twice.
    run_epochs(resumed, interrupted, range(2, 4))
    resumed.on_trial_complete(iteration=9, trials=[interrupted], trial=interrupted)
    run_epochs(resumed, newcomer, range(1, 2))
    second.finish("KILLED")  # MLflow's status names are accepted too

    assert len(parents(uri)) == 1
    (parent,) = parents(uri)
    assert (parent.info.status, parent.data.tags[STATUS_TAG]) == ("KILLED", "interrupted")
    assert parent.data.tags["minimind.resumes"] == "1"
    children = children_by_trial(uri)
    assert set(children) == {interrupted.trial_id, finished.trial_id, newcomer.trial_id}
    assert steps(uri, children[interrupted.trial_id].info.run_id) == [1, 2, 3]
    assert steps(uri, children[interrupted.trial_id].info.run_id, "train_loss") == [1, 2, 3]
    assert children[interrupted.trial_id].info.status == "FINISHED"
    assert children[finished.trial_id].info.status == "FINISHED"
    assert children[newcomer.trial_id].info.status == "KILLED"
    assert not [run for run in all_runs(uri) if run.info.status == "RUNNING"]


def test_callback_survives_pickling_and_reopens_a_closed_run(uri: str) -> None:
    tracker = start_tracker(uri)
    cb = callback(tracker)
    trial = make_trial(0)
    run_epochs(cb, trial, range(1, 2))
    cb.on_trial_complete(iteration=1, trials=[trial], trial=trial)  # stopped early after epoch 1

    # Tune stores callbacks in tuner.pkl with (cloud)pickle; no client or run cache may travel.
    restored = cloudpickle.loads(cloudpickle.dumps(cb))
    assert restored._client is None and restored._runs is None
    assert pickle.loads(pickle.dumps(cb)).parent_run_id == tracker.parent_run_id
    # resume_errored/restart: the same trial starts again and continues its closed run.
    run_epochs(restored, trial, range(2, 4))
    assert children_by_trial(uri)[trial.trial_id].info.status == "RUNNING"
    restored.on_trial_complete(iteration=3, trials=[trial], trial=trial)

    (run,) = children_by_trial(uri).values()
    assert (run.info.status, run.data.tags[STATUS_TAG]) == ("FINISHED", "completed")
    assert steps(uri, run.info.run_id) == [1, 2, 3]


def test_experiment_end_closes_unfinished_trials(uri: str) -> None:
    tracker = start_tracker(uri)
    cb = callback(tracker)
    trial = make_trial(0)
    run_epochs(cb, trial, range(1, 2))
    cb.on_experiment_end(trials=[trial])
    (run,) = children_by_trial(uri).values()
    assert (run.info.status, run.data.tags[STATUS_TAG]) == ("KILLED", "interrupted")


def test_non_strict_callback_logs_mlflow_errors_and_training_continues(
    uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = start_tracker(uri)
    missing_parent = "0" * 32
    lenient = MlflowTrialCallback(uri, str(tracker.experiment_id), missing_parent, PARAM_KEYS,
                                  planned_epochs=PLANNED_EPOCHS)
    with caplog.at_level(logging.WARNING, logger="tune.tracking"):
        lenient.setup()
    assert "MLflow setup failed" in caplog.text
    strict = MlflowTrialCallback(uri, str(tracker.experiment_id), missing_parent, PARAM_KEYS,
                                 planned_epochs=PLANNED_EPOCHS, strict=True)
    with pytest.raises(MlflowException):
        strict.setup()

    no_experiment = MlflowTrialCallback(uri, "999999", tracker.parent_run_id or "", PARAM_KEYS,
                                        planned_epochs=PLANNED_EPOCHS)
    trial = make_trial(0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tune.tracking"):
        run_epochs(no_experiment, trial, range(1, 2))
    assert "MLflow on_trial_result failed" in caplog.text


def test_unreachable_server_fails_fast_naming_the_uri() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"{uri} is unreachable"):
        check_tracking_server(uri, timeout_s=2)
    assert time.monotonic() - started < 10


def test_silent_server_times_out_fast() -> None:
    # Accepts TCP connections (backlog) but never answers HTTP: only the timeout can end the wait.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingError, match="unreachable"):
            check_tracking_server(uri, timeout_s=1)
        assert time.monotonic() - started < 10


def test_check_rejects_folder_store_and_creates_sqlite_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingError, match="not usable"):
        check_tracking_server(f"file://{tmp_path / 'mlruns'}")
    check_tracking_server(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert (tmp_path / "new" / "mlflow.db").is_file()


def test_best_trial_mapping_is_validated() -> None:
    with pytest.raises(TrackingError, match="unknown keys"):
        BestTrial.from_mapping({"trial_name": "t", "metric": "val_loss", "value": 1.0, "lr": 1})
    with pytest.raises(TrackingError, match="missing 'value'"):
        BestTrial.from_mapping({"trial_id": "t"})
    best = BestTrial.from_mapping({"value": 0.5, "trial_id": "t", "checkpoint": "ckpt/model.pth"})
    assert best.checkpoint == Path("ckpt/model.pth")


def test_finish_rejects_unknown_status(uri: str) -> None:
    tracker = start_tracker(uri)
    with pytest.raises(ValueError, match="study status"):
        tracker.finish("done")
    with pytest.raises(TrackingError, match="not this study"):
        tracker.trial_callback("0" * 32, param_keys=PARAM_KEYS, planned_epochs=1)


def _study(completed: int, pruned: int) -> optuna.Study:
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    for index in range(completed + pruned):
        trial = study.ask()
        lr = trial.suggest_float("train.learning_rate", 1e-5, 1e-2, log=True)
        batch = trial.suggest_int("train.batch_size", 4, 64)
        if index < completed:
            study.tell(trial, lr * 100 + batch / 100)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return study


@pytest.mark.parametrize(
    ("trials", "n_curves"),
    [(None, 0), ((0, 0), 0), ((1, 0), 1), ((2, 0), 2), ((3, 0), 3), ((0, 2), 2)],
    ids=["no-study", "empty", "one", "two", "three", "only-pruned"],
)
def test_plots_are_png_for_any_number_of_trials(
    trials: tuple[int, int] | None, n_curves: int, tmp_path: Path
) -> None:
    study = None if trials is None else _study(*trials)
    # trial_1 diverged in epoch 2: its NaN point is left out, not plotted as a gap-causing error.
    curves = {f"trial_{i}": [(1, 3.0 + i), (2, float("nan") if i == 1 else 2.0 + i)] for i in range(n_curves)}
    paths = plot_study(study, curves, tmp_path / "plots", best_trial="trial_0")
    assert set(paths) == set(PLOT_FILES)
    for path in paths.values():
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, path
