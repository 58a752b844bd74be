"""tune.dashboard: Optuna's dashboard on a snapshot of a study's record, its answer as the note."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest

from tune.dashboard import _served, answer_note, snapshot, trial_role
from tune.objective import Objective
from tune.status import TrialStatus
from tune.study import Study
from tune.ui import main

SEARCH = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
          "train.accumulation_steps": {"type": "categorical", "choices": [1, 2]}}
SPEC: dict[str, Any] = {"train": {"epochs": 2}, "search": SEARCH, "tune": {"mode": "min", "metric": "val_loss"}}
DISTRIBUTIONS = {"train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                 "train.accumulation_steps": optuna.distributions.CategoricalDistribution([1, 2])}
BEST_YAML = """\
# Best trial t001 of study from search_spaces/sft.yaml: val_loss 2.100000 at epoch 2.
# train.num_threads: 1, as the trial ran (its CPU share): on CPU a step's sums depend on the
# thread count, so another count gives slightly other losses; on GPU it does not matter.
# Over seeds 0, 43: mean val_loss 2.200000 ± 0.100000 (the best mean of the finalists).
# Run it alone: python -m minimind_train.sft --config best.yaml
train:
  learning_rate: 0.002
  accumulation_steps: 2
"""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def study(tmp_path: Path) -> Study:
    """Two search trials (one stopped early), a finalist of the best and a warm-start trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    record = Study.create(tmp_path / "studies" / "s", "s", SPEC, "train: {}\n", {})
    record.study.add_trial(optuna.trial.create_trial(
        params={"train.learning_rate": 1e-3, "train.accumulation_steps": 1}, distributions=DISTRIBUTIONS,
        value=2.9, user_attrs={"status": TrialStatus.WARM_START, "source": "old t004"}))
    for status, losses in (("completed", [2.5, 2.1]), ("stopped_early", [3.5])):
        number, _ = record.ask(DISTRIBUTIONS)
        for epoch, loss in enumerate(losses, start=1):
            record.record_epoch(number, epoch, {"val_loss": loss}, "val_loss")
        record.finish(number, status, Objective("val_loss"))
    finalist = record.add_finalist(record.trial(1), 43, DISTRIBUTIONS)
    record.record_epoch(finalist, 1, {"val_loss": 2.3}, "val_loss")
    record.finish(finalist, "completed", Objective("val_loss"))
    return record


def test_roles_and_the_note_state_the_answer(study: Study) -> None:
    trials = study.study.get_trials()
    assert [trial_role(t.user_attrs) for t in trials] == [
        "warm start: old t004 (history for the sampler)", "search", "search", "finalist: t001's config with seed 43"]
    assert "No answer yet" in answer_note(study.dir, study.manifest, trials)
    (study.dir / "best.yaml").write_text(BEST_YAML)
    note = answer_note(study.dir, study.manifest, trials)
    assert "Best trial t001" in note and "mean val_loss 2.200000 ± 0.100000" in note
    assert "- `train.learning_rate`: **0.002**" in note and "- `train.accumulation_steps`: **2**" in note
    assert f"python -m minimind_train.sft --config {study.dir.resolve() / 'best.yaml'}" in note
    assert "num_threads" not in note and "Run it alone" not in note
    assert "- t000: warm start: old t004" in note and "- t003: finalist: t001's config with seed 43" in note


def test_served_from_a_snapshot_the_record_untouched(study: Study, tmp_path: Path) -> None:
    (study.dir / "best.yaml").write_text(BEST_YAML)
    record_db = study.dir / "optuna.db"
    before = _digest(record_db)
    assert _digest(snapshot(study.dir, tmp_path)) != "" and _digest(record_db) == before
    with _served(study.dir, 0) as (server, url):
        assert url.startswith(f"http://127.0.0.1:{server.server_port}/dashboard/studies/") and url.endswith("/note")
        api = url.replace("/dashboard/studies/", "/api/studies/").removesuffix("/note") + "?after=0"
        thread = threading.Thread(target=server.handle_request)
        thread.start()
        with urllib.request.urlopen(api, timeout=30) as response:
            shown = json.loads(response.read())
        thread.join(timeout=30)
    assert "Best trial t001" in shown["note"]["body"] and shown["objective_names"] == ["val_loss"]
    assert len(shown["trials"]) == 4
    assert _digest(record_db) == before  # the note and names went into the snapshot only


def test_cli_refuses_a_tracking_uri_and_a_missing_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dashboard", "--tracking-uri", "sqlite:////x.db"]) == 2
    assert "--dashboard shows a study's record" in capsys.readouterr().err
    assert main(["--dashboard", "--storage-path", str(tmp_path), "--study", "absent"]) == 2
    assert "is the study name right?" in capsys.readouterr().err


def test_a_damaged_record_or_a_taken_port_is_one_line(study: Study, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    storage = ["--storage-path", str(study.dir.parent), "--study", "s"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["--dashboard", *storage, "--port", str(taken.getsockname()[1])]) == 2
    assert "pass another --port" in capsys.readouterr().err
    (study.dir / "optuna.db").write_bytes(b"not a database" * 100)
    assert main(["--dashboard", *storage]) == 2
    assert "optuna.db cannot be read" in capsys.readouterr().err
