"""tune.storage: where a study lives (local or URI), its trials' checkpoints, the driver's outputs."""

from __future__ import annotations

import errno
import functools
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DAMAGES, damage, make_checkpoint, mount_tmpfs

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


def test_write_checkpoint_writes_once_in_place_and_retention_keeps_best_and_newest(tmp_path: Path) -> None:
    from tune.storage import retain_checkpoints, write_checkpoint

    runs = tmp_path / "runs"
    trial = runs / "run-1" / "t000"
    written: list[Path] = []

    def save(folder: Path, epoch: int, val: float) -> Path:
        written.append(folder)
        return make_checkpoint(folder, epoch, val)

    for epoch, val in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)):
        path = write_checkpoint(functools.partial(save, epoch=epoch, val=val), str(trial), epoch)
        assert path == str(trial / f"epoch_{epoch:04d}")
    # Locally written once, in its place (save_checkpoint publishes its folder by a rename), never copied.
    assert written == [trial / f"epoch_{epoch:04d}" for epoch in (1, 2, 3, 4)]
    # Over a URI too (a bucket): written in a temporary folder, then uploaded meta.json last, the same layout.
    uri_trial = f"file://{tmp_path / 'bucket' / 'run-1' / 't000'}"
    write_checkpoint(functools.partial(save, epoch=1, val=9.0), uri_trial, 1)
    assert sorted(p.name for p in (tmp_path / "bucket" / "run-1" / "t000" / "epoch_0001").iterdir()) == [
        "meta.json", "model.pth", "train_state.pt"]
    assert not written[-1].exists()  # (the temporary folder is gone)
    deleted = retain_checkpoints(str(runs), 0, keep=1, objective=Objective("val_loss"))
    assert sorted(Path(p).name for p in deleted) == ["epoch_0001", "epoch_0003"]  # best (2) and newest (4) stay
    assert sorted(p.name for p in trial.iterdir()) == ["epoch_0002", "epoch_0004"]
    assert retain_checkpoints(str(runs), 0, keep=1, objective=Objective("val_loss")) == []


@pytest.mark.parametrize("where", ["writing", "replacing"])
def test_a_checkpoint_write_killed_midway_leaves_only_what_the_end_report_clears(tmp_path: Path, where: str) -> None:
    """A worker killed inside save_checkpoint (writing a new folder, or replacing one of the same evaluation
    between its two renames) leaves hidden folders only, which tune.atomic.leftovers finds (tune.report
    deletes them at the end) and nothing reads as a checkpoint."""
    from tune.atomic import leftovers
    from tune.storage import checkpoint_metas

    trial = tmp_path / "runs" / "run-1" / "t000"
    if where == "replacing":
        make_checkpoint(trial / "epoch_0001", 1, 3.0)
    kill = "checkpoint.os.replace = lambda *a: os._exit(9) if a[1].name.startswith('epoch_') else replace(*a)" \
        if where == "replacing" else "checkpoint.torch.save = lambda *a, **k: os._exit(9)"
    killed = textwrap.dedent(f"""
        import os, types
        from pathlib import Path
        from minimind_train import checkpoint
        from minimind_train.config import RunConfig
        replace = os.replace
        {kill}
        state = types.SimpleNamespace(model=types.SimpleNamespace(state_dict=dict), epoch=1, step=1)
        checkpoint.save_checkpoint(Path({str(trial / "epoch_0001")!r}), state, RunConfig(), resume_state=False)
    """)
    assert subprocess.run([sys.executable, "-c", killed], check=False).returncode == 9
    assert [p.name.startswith(".epoch_0001.") for p in leftovers(trial, "epoch_")] == [True] * (1 + (where == "replacing"))
    assert checkpoint_metas(str(tmp_path / "runs"), 0) == {}


@pytest.mark.parametrize("fills", ["model.pth", "train_state.pt"])
def test_a_checkpoint_that_fills_the_disk_fails_as_disk_full(tmp_path: Path, fills: str) -> None:
    """torch.save onto a full disk (a 1 MiB tmpfs; root only) fails as the OSError ENOSPC, whichever file
    fills it, as the driver's 'disk full' line needs (given a path, PyTorch reports RuntimeError 'unexpected
    pos'), and leaves no checkpoint, whole or half, behind."""
    import torch

    from minimind_train.checkpoint import save_checkpoint
    from minimind_train.config import RunConfig
    from tune.interrupts import disk_full
    from tune.searcher import failure_reason
    from tune.storage import write_checkpoint

    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        # fp16 weights of 2 MiB fill it at model.pth; of 0.6 MiB, the fp32 resume state (1.2 MiB) fills it.
        weights = {"w": torch.ones(2**20 if fills == "model.pth" else 300_000)}
        state = SimpleNamespace(model=SimpleNamespace(state_dict=lambda: weights), scaler=None, epoch=1, step=1,
                                optimizer=SimpleNamespace(state_dict=dict), first_loss=None)
        with pytest.raises(OSError) as raised:
            write_checkpoint(functools.partial(save_checkpoint, state=state, cfg=RunConfig()), str(disk / "t0"), 1)
        assert raised.value.errno == errno.ENOSPC and disk_full(raised.value), raised.value
        # What the trial's error file says last is what the end report reads (tune.report: 'disk is full').
        assert "No space left on device" in failure_reason("".join(traceback.format_exception(raised.value)))
        assert list((disk / "t0").iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True, timeout=30)


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

