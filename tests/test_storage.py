"""tune.storage: where a study lives (local or URI), its trials' checkpoints, the driver's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DAMAGES, damage, make_checkpoint

from tune.objective import Objective


def test_local_path_and_staging_dir(monkeypatch, tmp_path):
    from tune.storage import local_path, staging_dir

    assert local_path("s3://bucket/x") is None and local_path("gs://b/x") is None
    assert local_path("/shared/studies") == local_path("file:///shared/studies") == Path("/shared/studies")
    assert local_path("studies") == Path("studies")
    monkeypatch.setenv("MINIMIND_TUNE_STAGING", str(tmp_path))
    a, b = staging_dir("s3://bucket/a/smoke"), staging_dir("s3://other/a/smoke")
    assert a.parent == tmp_path and a.name.startswith("smoke-") and a != b


def test_outputs_round_trip_through_a_uri(tmp_path):
    from tune.storage import download_outputs, fetch_file, upload_outputs

    local = tmp_path / "local"
    (local / "plots").mkdir(parents=True)
    (local / "best.yaml").write_text("a: 1\n")
    (local / "plots" / "history.png").write_bytes(b"png")
    (local / "mlflow.db").write_bytes(b"db")
    (local / "mlartifacts" / "1").mkdir(parents=True)
    (local / "mlartifacts" / "1" / "x.txt").write_text("x")
    uri = f"file://{tmp_path}/remote/study"
    assert upload_outputs(local, uri) == 2 + 3 + 1 + 5
    remote = tmp_path / "remote" / "study"
    assert (remote / "plots" / "history.png").read_bytes() == b"png"
    back = tmp_path / "back"
    assert sorted(download_outputs(uri, back)) == ["mlartifacts", "mlflow.db"]
    assert (back / "mlflow.db").read_bytes() == b"db"
    assert (back / "mlartifacts" / "1" / "x.txt").read_text() == "x"
    assert not (back / "best.yaml").exists()  # rewritten by every run; not needed to resume
    got = fetch_file(uri, remote / "plots" / "history.png", tmp_path / "best" / "model.pth")
    assert got.read_bytes() == b"png"


def test_write_checkpoint_publishes_whole_folders_and_retention_keeps_best_and_newest(tmp_path: Path) -> None:
    from tune.storage import retain_checkpoints, write_checkpoint

    runs = tmp_path / "runs"
    trial = runs / "run-1" / "t000"
    for epoch, val in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)):
        staged = make_checkpoint(tmp_path / "tmp" / str(epoch), epoch, val)
        assert write_checkpoint(staged, str(trial), epoch) == str(trial / f"epoch_{epoch:04d}")
    assert not list(trial.glob(".*"))  # nothing half-published is left
    # Over a URI too (a bucket): meta.json last, the same folder layout.
    staged = make_checkpoint(tmp_path / "tmp" / "u", 1, 9.0)
    uri_trial = f"file://{tmp_path / 'bucket' / 'run-1' / 't000'}"
    write_checkpoint(staged, uri_trial, 1)
    assert sorted(p.name for p in (tmp_path / "bucket" / "run-1" / "t000" / "epoch_0001").iterdir()) == [
        "meta.json", "model.pth", "train_state.pt"]
    deleted = retain_checkpoints(str(runs), 0, keep=1, objective=Objective("val_loss"))
    assert sorted(Path(p).name for p in deleted) == ["epoch_0001", "epoch_0003"]  # best (2) and newest (4) stay
    assert sorted(p.name for p in trial.iterdir()) == ["epoch_0002", "epoch_0004"]
    assert retain_checkpoints(str(runs), 0, keep=1, objective=Objective("val_loss")) == []


@pytest.mark.parametrize("form", sorted(DAMAGES))
def test_resume_point_is_the_newest_whole_checkpoint_and_names_the_damaged(tmp_path: Path, form: str) -> None:
    from tune.storage import resume_point

    runs = tmp_path / "runs"
    make_checkpoint(runs / "run-1" / "t000" / "epoch_0001", 1, 3.0)
    newest = make_checkpoint(runs / "run-1" / "t000" / "epoch_0002", 2, 2.0)
    assert resume_point(str(runs), 0).epoch == 2
    words = damage(newest, form)
    for location in (str(runs), f"file://{runs}"):  # (a bucket is read through pyarrow the same way)
        point = resume_point(location, 0)
        assert (point.epoch, point.path, point.meta["epoch"]) == (1, str(runs / "run-1" / "t000" / "epoch_0001"), 1)
        assert [(path, problem.startswith(words)) for path, problem in point.damaged] == [(str(newest), True)]
    damage(runs / "run-1" / "t000" / "epoch_0001", form)
    assert resume_point(str(runs), 0).epoch == 0 and len(resume_point(str(runs), 0).damaged) == 2


def test_a_resume_keeps_the_staging_record_a_killed_driver_left_newer_than_the_storages(tmp_path: Path) -> None:
    """A driver on a URI storage uploads its record at its end; SIGKILLed, its staging copy is the newest.
    Overwritten by the storage's older copy, the trials asked since were forgotten, their numbers asked
    again, and those new trials restored the killed run's checkpoints of other configs."""
    import json

    from tune.storage import download_outputs

    remote, staging = tmp_path / "remote" / "study", tmp_path / "staging"

    def write(folder: Path, runs: int, db: bytes) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        history = [{"run": k, "started": f"2026-12-01T0{k}:00:00"} for k in range(1, runs + 1)]
        (folder / "study.json").write_text(json.dumps({"format": 1, "history": history}))
        (folder / "optuna.db").write_bytes(db)

    write(remote, 1, b"uploaded by run 1")
    write(staging, 2, b"run 2, killed before its upload")
    assert download_outputs(str(remote), staging) == []
    assert (staging / "optuna.db").read_bytes() == b"run 2, killed before its upload"
    write(remote, 3, b"run 3, on another machine")  # the storage's record is the newer one
    assert "optuna.db" in download_outputs(str(remote), staging)
    assert (staging / "optuna.db").read_bytes() == b"run 3, on another machine"


def test_a_download_cut_short_is_done_again_by_the_next_resume(tmp_path: Path, monkeypatch) -> None:
    """Killed while fetching the record, a resume must not take the half-copied databases for the record."""
    import json

    from tune import storage

    remote, staging = tmp_path / "remote" / "study", tmp_path / "staging"
    remote.mkdir(parents=True)
    (remote / "study.json").write_text(json.dumps({"format": 1, "history": [{"run": 1}]}))
    (remote / "optuna.db").write_bytes(b"trials")
    (remote / "mlflow.db").write_bytes(b"runs")
    real = storage.copy_path

    def cut(src: str, dst: str, *args: object) -> None:
        if dst.endswith("mlflow.db"):
            Path(dst).write_bytes(b"ru")  # half a copy, then the driver dies
            raise KeyboardInterrupt
        real(src, dst, *args)

    monkeypatch.setattr(storage, "copy_path", cut)
    with pytest.raises(KeyboardInterrupt):
        storage.download_outputs(str(remote), staging)
    monkeypatch.setattr(storage, "copy_path", real)
    assert sorted(storage.download_outputs(str(remote), staging)) == ["mlflow.db", "optuna.db", "study.json"]
    assert (staging / "mlflow.db").read_bytes() == b"runs"

