"""The ended-trial ledger: a trial that ended before a driver kill is replayed after --resume, never retrained.

The end-to-end race (Ray's saved state lagging behind a trial's end) is exercised by
tests/test_faults.py; these tests pin down each piece without Ray's controller.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs
import pytest
from ray import tune as ray_tune

from tune import trainable
from tune.ledger import (
    ENDED_FILE,
    EndedLedger,
    EndedRecord,
    fetch_checkpoint,
    keep_tuner_backup,
    prune_checkpoints,
    read_ended,
    repair_saved_state,
    replay_plan,
    trial_uri,
)


def _row(epoch: int, **ray: Any) -> dict[str, Any]:
    return {"val_loss": 3.0 - epoch / 10, "train_loss": 3.5 - epoch / 10, "epoch": epoch,
            "training_iteration": epoch, "timestamp": 1_700_000_000 + epoch, "pid": 4242,
            "time_this_iter_s": 1.5, "done": False, "trial_id": "abc_00001", "config": {"x": 1}, **ray}


def _trial(tmp_path: Path, rows: list[dict[str, Any]], last: dict[str, Any]) -> SimpleNamespace:
    staging = tmp_path / "staging" / "trial_abc_00001"
    staging.mkdir(parents=True)
    # As Ray's JSON logger leaves it: one row per line, the last one possibly cut by a kill.
    (staging / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"val_lo')
    return SimpleNamespace(trial_id="abc_00001", last_result=last, local_path=str(staging),
                           path=str(tmp_path / "study" / "trial_abc_00001"),
                           storage=SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem()))


def test_ledger_records_what_the_trainable_reported(tmp_path: Path) -> None:
    rows = [_row(1), _row(2)]
    trial = _trial(tmp_path, rows, last=_row(3, done=True))
    EndedLedger(1, "val_loss", "min").on_trial_complete(iteration=7, trials=[trial], trial=trial)

    record = read_ended(trial_uri(str(tmp_path / "study"), "abc_00001"))
    assert record is not None and (record.trial_id, record.epochs) == ("abc_00001", 3)
    # Only the trainable's own keys: Ray adds its bookkeeping again when they are reported.
    assert record.results == tuple({"val_loss": 3.0 - e / 10, "train_loss": 3.5 - e / 10, "epoch": e}
                                   for e in (1, 2, 3))
    assert [p.name for p in (tmp_path / "study" / "trial_abc_00001").iterdir()] == [ENDED_FILE]


def test_ledger_does_not_claim_an_end_it_cannot_replay(tmp_path: Path) -> None:
    trial = _trial(tmp_path, [_row(1)], last=_row(3))  # epoch 2 is not on record
    EndedLedger(1, "val_loss", "min").on_trial_complete(iteration=7, trials=[trial], trial=trial)
    assert read_ended(trial.path) is None


def test_unended_trial_has_no_record(tmp_path: Path) -> None:
    assert read_ended(str(tmp_path / "nowhere")) is None


def test_replay_plan_is_what_the_saved_state_misses() -> None:
    record = EndedRecord("t", 3, tuple({"val_loss": float(e)} for e in (1, 2, 3)))
    assert replay_plan(record, 0) == [{"val_loss": 1.0}, {"val_loss": 2.0}, {"val_loss": 3.0}]
    assert replay_plan(record, 2) == [{"val_loss": 3.0}]
    assert replay_plan(record, 3) == []
    with pytest.raises(ValueError, match="restored at epoch 4"):
        replay_plan(record, 4)


def _checkpoint(folder: Path, epoch: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {}}))
    (folder / "model.pth").write_bytes(b"weights of epoch %d" % epoch)
    return folder


def test_fetch_checkpoint_finds_the_epoch_by_its_meta(tmp_path: Path) -> None:
    trial_dir = tmp_path / "trial_x"
    _checkpoint(trial_dir / "checkpoint_000000", 1)
    _checkpoint(trial_dir / "checkpoint_000002", 3)  # epoch 2's was deleted by retention
    (trial_dir / "checkpoint_000005").mkdir()  # not ours: no meta.json

    got = fetch_checkpoint(str(trial_dir), 3, tmp_path / "out")
    assert got == tmp_path / "out" and (got / "model.pth").read_bytes() == b"weights of epoch 3"
    assert fetch_checkpoint(str(trial_dir), 2, tmp_path / "none") is None
    assert fetch_checkpoint(str(tmp_path / "missing"), 1, tmp_path / "none") is None


def test_restarted_ended_trial_replays_instead_of_training(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray restored it from epoch 1's checkpoint; it had ended after epoch 3: report 2 and 3, train nothing."""
    trial_dir = tmp_path / "trial_abc_00001"
    restored = _checkpoint(tmp_path / "restored", 1)
    _checkpoint(trial_dir / "checkpoint_000002", 3)
    record = [{"val_loss": 2.9, "epoch": 1}, {"val_loss": 2.8, "epoch": 2}, {"val_loss": 2.7, "epoch": 3}]
    (trial_dir / ENDED_FILE).write_text(json.dumps({"trial_id": "abc_00001", "epochs": 3, "results": record}))
    reports: list[tuple[dict[str, Any], bytes | None]] = []

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        weights = None
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                weights = (Path(d) / "model.pth").read_bytes()
        reports.append((metrics, weights))

    monkeypatch.setattr(trainable.tune, "report", report)
    assert trainable._replay_ended(str(trial_dir), ray_tune.Checkpoint.from_directory(str(restored)))
    assert reports == [({"val_loss": 2.8, "epoch": 2}, None), ({"val_loss": 2.7, "epoch": 3}, b"weights of epoch 3")]

    reports.clear()
    assert not trainable._replay_ended(str(tmp_path / "trial_other"), None)
    assert reports == []


def _session(study: Path, stamp: str, *, cut: str | None = None) -> None:
    files = {f"experiment_state-{stamp}.json": json.dumps({"trial_data": [], "stamp": stamp}).encode(),
             f"searcher-state-{stamp}.pkl": pickle.dumps({"stamp": stamp}),
             # A pickle despite its name, as Ray writes it.
             f"search_gen_state-{stamp}.json": pickle.dumps({"stamp": stamp})}
    for name, body in files.items():
        (study / name).write_bytes(body[: len(body) // 2] if name == cut else body)


def test_repair_sets_aside_a_session_cut_short_and_keeps_the_last_whole_one(tmp_path: Path) -> None:
    _session(tmp_path, "2026-11-28_01-00-00")
    assert repair_saved_state(tmp_path) == []
    _session(tmp_path, "2026-11-28_02-00-00", cut="searcher-state-2026-11-28_02-00-00.pkl")
    done = repair_saved_state(tmp_path)
    assert len(done) == 1 and "2026-11-28_02-00-00" in done[0] and "searcher-state" in done[0]
    assert sorted(p.name for p in tmp_path.glob("*-*")) == [
        "experiment_state-2026-11-28_01-00-00.json", "search_gen_state-2026-11-28_01-00-00.json",
        "searcher-state-2026-11-28_01-00-00.pkl"]
    assert len(list((tmp_path / ".minimind" / "torn").iterdir())) == 3
    assert repair_saved_state(tmp_path) == []  # now whole


def test_repair_restores_a_cut_tuner_pkl_from_the_backup(tmp_path: Path) -> None:
    tuner = tmp_path / "tuner.pkl"
    body = pickle.dumps({"run_config": list(range(100))})
    tuner.write_bytes(body)
    keep_tuner_backup(tmp_path)
    _session(tmp_path, "2026-11-28_01-00-00")
    assert repair_saved_state(tmp_path) == []
    tuner.write_bytes(body[:-7])
    keep_tuner_backup(tmp_path)  # a cut file never replaces the good copy
    done = repair_saved_state(tmp_path)
    assert len(done) == 1 and "tuner.pkl" in done[0]
    assert tuner.read_bytes() == body


def test_repair_leaves_a_lone_cut_session_to_fail_loudly(tmp_path: Path) -> None:
    _session(tmp_path, "2026-11-28_01-00-00", cut="experiment_state-2026-11-28_01-00-00.json")
    done = repair_saved_state(tmp_path)
    assert len(done) == 1 and "nothing older" in done[0]
    assert (tmp_path / "experiment_state-2026-11-28_01-00-00.json").exists()


def _saved_state(study: Path, trials: dict[str, tuple[str, Path, int]]) -> None:
    """An experiment_state file as Ray 2.60 writes it: trial_id -> (status, latest checkpoint, epoch)."""
    from ray.train import CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    data = []
    for trial_id, (status, path, epoch) in trials.items():
        manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
        manager._latest_checkpoint_result = _TrainingResult(
            checkpoint=ray_tune.Checkpoint.from_directory(str(path)), metrics={"training_iteration": epoch})
        meta = {"last_result": {"training_iteration": epoch},
                "checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(manager).hex()}}
        data.append([json.dumps({"trial_id": trial_id, "status": status}), json.dumps(meta)])
    (study / "experiment_state-2026-11-28_01-00-00.json").write_text(json.dumps({"trial_data": data}))


def test_repair_stands_in_for_a_deleted_checkpoint_of_an_ended_trial(tmp_path: Path) -> None:
    """Retention deleted checkpoint_000000 after epoch 2's registered; the saved state still names it."""
    ended, running = tmp_path / "trial_ended", tmp_path / "trial_running"
    for trial in (ended, running):
        _checkpoint(trial / "checkpoint_000001", 2)
    (ended / ENDED_FILE).write_text(json.dumps({"trial_id": "ended", "epochs": 2, "results": [{}, {}]}))
    _saved_state(tmp_path, {"ended": ("RUNNING", ended / "checkpoint_000000", 1),
                            "running": ("RUNNING", running / "checkpoint_000000", 1)})

    done = repair_saved_state(tmp_path)
    assert len(done) == 1 and "trial ended" in done[0], done
    assert json.loads((ended / "checkpoint_000000" / "meta.json").read_text())["epoch"] == 1
    assert not (running / "checkpoint_000000").exists()  # it needs real weights: left to fail as before
    assert repair_saved_state(tmp_path) == []


def test_an_ended_trial_keeps_its_best_checkpoints_and_its_last(tmp_path: Path) -> None:
    trial = _trial(tmp_path, [_row(e) for e in (1, 2, 3)], last=_row(4))
    study_trial = Path(trial.path)
    for epoch, val in zip((1, 2, 3, 4), (3.0, 1.0, 2.0, 2.5)):
        folder = _checkpoint(study_trial / f"checkpoint_{epoch - 1:06d}", epoch)
        (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_loss": val}}))
    EndedLedger(1, "val_loss", "min").on_trial_complete(iteration=9, trials=[trial], trial=trial)
    assert sorted(p.name for p in study_trial.glob("checkpoint_*")) == ["checkpoint_000001", "checkpoint_000003"]

    fs = pyarrow.fs.LocalFileSystem()
    assert prune_checkpoints(fs, str(study_trial), 1, "val_loss", "max") == [str(study_trial / "checkpoint_000001")]
    with pytest.raises(ValueError, match="keep=0"):
        EndedLedger(0, "val_loss", "min")


def test_scheduler_never_stops_a_replay_before_its_recorded_end(tmp_path: Path) -> None:
    """Replayed results reach ASHA in another order than the first time; its STOP must not cut them."""
    from ray.tune.schedulers import TrialScheduler

    from tune.ledger import _LedgerAwareScheduler

    class AlwaysStop:
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            return TrialScheduler.STOP

    class Scheduler(_LedgerAwareScheduler, AlwaysStop):
        pass

    trial = SimpleNamespace(has_reported_at_least_once=True, path=str(tmp_path),
                            storage=SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem()))
    scheduler = Scheduler()
    assert scheduler.on_trial_result(None, trial, {"training_iteration": 1}) == TrialScheduler.STOP
    (tmp_path / ENDED_FILE).write_text(json.dumps({"trial_id": "t", "epochs": 3, "results": [{}] * 3}))
    assert scheduler.on_trial_result(None, trial, {"training_iteration": 1}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trial, {"training_iteration": 3}) == TrialScheduler.STOP
