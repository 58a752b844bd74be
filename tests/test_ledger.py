"""The ended-trial ledger: a trial that ended before a driver kill is replayed after --resume, never retrained.

The end-to-end race (Ray's saved state lagging behind a trial's end) is exercised by
tests/test_faults.py; these tests pin down each piece without Ray's controller.
"""

from __future__ import annotations

import json
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
    read_ended,
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
    EndedLedger().on_trial_complete(iteration=7, trials=[trial], trial=trial)

    record = read_ended(trial_uri(str(tmp_path / "study"), "abc_00001"))
    assert record is not None and (record.trial_id, record.epochs) == ("abc_00001", 3)
    # Only the trainable's own keys: Ray adds its bookkeeping again when they are reported.
    assert record.results == tuple({"val_loss": 3.0 - e / 10, "train_loss": 3.5 - e / 10, "epoch": e}
                                   for e in (1, 2, 3))
    assert [p.name for p in (tmp_path / "study" / "trial_abc_00001").iterdir()] == [ENDED_FILE]


def test_ledger_does_not_claim_an_end_it_cannot_replay(tmp_path: Path) -> None:
    trial = _trial(tmp_path, [_row(1)], last=_row(3))  # epoch 2 is not on record
    EndedLedger().on_trial_complete(iteration=7, trials=[trial], trial=trial)
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
