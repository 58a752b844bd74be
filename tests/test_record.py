"""tune.study: the manifest, the Optuna storage of trials, the lock, checkpoint discovery."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from conftest import make_checkpoint

from tune.objective import Objective
from tune.status import FINISHED
from tune.storage import checkpoint_metas
from tune.study import (
    Manifest,
    Study,
    StudyError,
    diff_specs,
    no_better_reason,
    ranked,
)

LR = {"train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
SPEC = {"model": {"hidden_size": 64}, "data": {"train_path": "/a.jsonl"}, "train": {"epochs": 3},
        "search": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "tune": {"mode": "min", "metric": "val_loss", "num_samples": 2}, "mlflow": {"experiment": "x"}}


@pytest.fixture
def record(tmp_path: Path) -> Study:
    return Study.create(tmp_path / "s", "s", SPEC, "model: {}\n", {"dataset": "abc"})


def test_create_then_open_gives_the_same_manifest_and_trials(record: Study) -> None:
    n, params = record.ask(LR)
    record.record_epoch(n, 1, {"val_loss": 2.0, "train_loss": 2.5}, "val_loss")
    again = Study.open(record.dir)
    assert again.manifest == record.manifest
    assert again.manifest.spec_hash == Manifest.from_json(record.manifest.to_json(), Path("x")).spec_hash
    [trial] = again.trials()
    assert (trial.number, trial.status, trial.params) == (n, "running", params)
    assert trial.epochs[1]["val_loss"] == 2.0 and trial.curve("val_loss") == [(1, 2.0)]


def test_create_refuses_an_existing_folder(record: Study) -> None:
    with pytest.raises(FileExistsError):
        Study.create(record.dir, "s", SPEC, "", {})


def test_open_names_what_is_missing(tmp_path: Path, record: Study) -> None:
    with pytest.raises(StudyError, match="no study.json"):
        Study.open(tmp_path)
    (record.dir / "study.json").write_text("{not json")
    with pytest.raises(StudyError, match="damaged"):
        Study.open(record.dir)


def _edit_study_json(record: Study, *, keep_hash: bool = True) -> None:
    """``hidden_size: 128`` in a 64-wide study's study.json, by hand (valid JSON; ``keep_hash=False``: its
    spec_hash recomputed too, as a careful hand would)."""
    path = record.dir / "study.json"
    raw = json.loads(path.read_text())
    raw["spec"]["model"]["hidden_size"] = 128
    if not keep_hash:
        raw["spec_hash"] = Manifest(**{k: v for k, v in raw.items() if k not in ("spec_hash",)}).spec_hash
    path.write_text(json.dumps(raw, indent=2))


def test_study_json_edited_by_hand_is_refused_naming_it(record: Study) -> None:
    # Issue 21: the refusal blamed space.yaml; once it was deleted, one trial mixed 64- and 128-wide epochs.
    _edit_study_json(record)
    with pytest.raises(StudyError) as info:
        Study.open(record.dir)
    message = str(info.value)
    assert f"{record.dir / 'study.json'} was edited by hand" in message
    assert "model.hidden_size: 64 -> 128" in message and "space.yaml" not in message
    # Without optuna.db's copy (a study created before it was kept), its own spec_hash gives it away.
    record.study.set_user_attr("spec", None)
    with pytest.raises(StudyError, match=r"study\.json was edited by hand: its spec is not the one it was written"):
        Study.open(record.dir)


def test_the_definition_copy_that_disagrees_is_named(record: Study) -> None:
    db, manifest = record.dir / "optuna.db", record.dir / "study.json"
    # optuna.db's copy edited: study.json still agrees with the hash it was written with.
    record.study.set_user_attr("spec", {**SPEC, "model": {"hidden_size": 128}})
    with pytest.raises(StudyError, match=rf"{db} was edited by hand.*\n  model\.hidden_size: 128 -> 64"):
        Study.open(record.dir)
    record.study.set_user_attr("spec", SPEC)
    assert Study.open(record.dir).manifest.spec == SPEC
    # study.json rewritten whole (spec and spec_hash): it and optuna.db's copy disagree, and it is refused.
    _edit_study_json(record, keep_hash=False)
    with pytest.raises(StudyError, match=r"model\.hidden_size: 64 -> 128"):
        Study.open(record.dir)
    record.study.set_user_attr("spec", "not a spec")
    with pytest.raises(StudyError, match=rf"{db} was edited by hand"):
        Study.open(record.dir)
    assert manifest.is_file()


def test_an_epoch_is_recorded_once(record: Study) -> None:
    n, _ = record.ask(LR)
    assert record.record_epoch(n, 1, {"val_loss": 2.0}, "val_loss")
    assert not record.record_epoch(n, 1, {"val_loss": 9.0}, "val_loss")
    assert record.trial(n).epochs[1]["val_loss"] == 2.0
    assert record.study.trials[0].intermediate_values == {1: 2.0}


@pytest.mark.parametrize(("status", "state", "value"), [
    ("completed", optuna.trial.TrialState.COMPLETE, 1.5),
    ("stopped_early", optuna.trial.TrialState.PRUNED, 1.5),  # Optuna keeps the last reported value
    ("diverged", optuna.trial.TrialState.FAIL, None),
    ("interrupted", optuna.trial.TrialState.RUNNING, None),
    ("failed", optuna.trial.TrialState.RUNNING, None),
])
def test_finish_maps_statuses_to_optuna_states(record: Study, status: str, state: object,
                                               value: float | None) -> None:
    n, _ = record.ask(LR)
    record.record_epoch(n, 1, {"val_loss": 2.0}, "val_loss")
    record.record_epoch(n, 2, {"val_loss": 1.5}, "val_loss")
    record.finish(n, status, Objective("val_loss"), error="why" if status == "failed" else "")
    frozen = record.study.trials[0]
    assert frozen.state == state
    assert frozen.value == value
    assert record.trial(n).status == status
    assert (record.trial(n).error == "why") == (status == "failed")
    assert (record.trial(n) in record.unfinished()) == (status in ("interrupted", "failed"))


def test_a_completed_trial_without_a_finite_value_is_diverged(record: Study) -> None:
    n, _ = record.ask(LR)
    record.finish(n, "completed", Objective("val_loss"))
    assert record.trial(n).status == "diverged"
    assert record.study.trials[0].state == optuna.trial.TrialState.FAIL


# The instance of issue 19: the smoke model at lr 1327 (accumulation 1) collapsed to the uniform
# predictor. Its first epoch's report, as minimind_train.train makes it, and its curve.
COLLAPSED = {"val_loss": math.log(6400), "baseline_val_loss": 8.77894, "uniform_loss": math.log(6400)}


@pytest.mark.parametrize(("first", "curve", "status", "words"), [
    (COLLAPSED, [math.log(6400)] * 2, "no_better",
     "no better than the uniform predictor: val_loss 8.7641 >= 8.7641 = ln(vocabulary size)"),
    # Fine-tuning a pretrained model (init_from): the bar is its own loss before training, far below ln(V).
    ({"val_loss": 2.5, "baseline_val_loss": 2.49, "uniform_loss": 8.76}, [2.5, 2.491], "no_better",
     "no better than the untrained model: val_loss 2.4910 >= 2.4900 before training"),
    ({"val_loss": 5.0, "baseline_val_loss": 8.78, "uniform_loss": 8.76}, [5.0, 3.0], "completed", ""),
    ({"val_loss": 5.0}, [5.0, 8.9], "completed", ""),  # recorded before the trainer reported its bars
])
def test_a_trial_that_learned_nothing_is_no_better_never_completed(
        record: Study, first: dict[str, float], curve: list[float], status: str, words: str) -> None:
    n, _ = record.ask(LR)
    for epoch, value in enumerate(curve, 1):
        record.record_epoch(n, epoch, {**(first if epoch == 1 else {}), "val_loss": value}, "val_loss")
    record.finish(n, "completed", Objective("val_loss"))
    trial = record.trial(n)
    assert (trial.status, trial.error) == (status, words)
    # Told to Optuna as a complete trial with its own (bad) value: TPE puts the region among the bad ones.
    frozen = record.study.trials[0]
    assert (frozen.state, frozen.value) == (optuna.trial.TrialState.COMPLETE, min(curve))
    assert trial.status in FINISHED and trial not in record.unfinished() and record.finished_count() == 1


def test_a_trial_stopped_early_that_learned_nothing_is_no_better_and_told_once_after_a_kill(
        record: Study) -> None:
    n, _ = record.ask(LR)
    record.record_epoch(n, 1, COLLAPSED, "val_loss")
    record.finish(n, "stopped_early", Objective("val_loss"))
    assert record.trial(n).status == "no_better"
    # A driver killed between the status and Optuna's tell: the next run tells it, with its value.
    m, _ = record.ask(LR)
    record.record_epoch(m, 1, COLLAPSED, "val_loss")
    record.set_status(m, "no_better", "no better than the uniform predictor")
    assert record.tell_decided(Objective("val_loss")) == [m]
    assert record.study.trials[m].state == optuna.trial.TrialState.COMPLETE
    assert record.study.trials[m].value == COLLAPSED["val_loss"]


def test_no_better_reason_needs_a_clear_improvement_in_the_objectives_direction() -> None:
    bars = {"baseline_train_loss": 4.0, "uniform_loss": 8.0}
    assert no_better_reason(3.997, Objective("train_loss"), bars).startswith("no better than the untrained model")
    assert no_better_reason(3.99, Objective("train_loss"), bars) == ""  # (0.25% better: beyond the margin)
    assert no_better_reason(3.997, Objective("train_loss"), {}) == ""  # (no bars reported: nothing to check)
    assert no_better_reason(8.5, Objective("val_loss"), bars).startswith("no better than the uniform predictor")
    assert no_better_reason(2.0, Objective("val_loss"), bars) == ""
    # Maximised: better is higher; the uniform predictor is a bound on losses minimised only.
    assert no_better_reason(4.001, Objective("train_loss", "max"), bars).endswith("4.0010 <= 4.0000 before training")
    assert no_better_reason(9.0, Objective("train_loss", "max"), bars) == ""


def test_ranked_answers_are_completed_then_stopped_early_never_one_that_learned_nothing() -> None:
    trials = [("t0", "no_better", 0.5), ("t1", "stopped_early", 1.0), ("t2", "completed", 3.0),
              ("t3", "diverged", float("nan")), ("t4", "completed", 2.0), ("t5", "running", 0.1),
              ("t6", "completed", float("inf"))]
    ranked_names = [t[0] for t in ranked(trials, Objective(), lambda t: t[1], lambda t: t[2])]
    assert ranked_names == ["t4", "t2", "t1"]
    assert [t[0] for t in ranked(trials, Objective(mode="max"), lambda t: t[1], lambda t: t[2], statuses=("completed",))] == ["t2", "t4"]


def test_finished_trials_are_final(record: Study) -> None:
    n, _ = record.ask(LR)
    record.record_epoch(n, 1, {"val_loss": 2.0}, "val_loss")
    record.finish(n, "completed", Objective("val_loss"))
    record.finish(n, "interrupted", Objective("val_loss"))
    assert not record.record_epoch(n, 2, {"val_loss": 1.0}, "val_loss")
    assert record.trial(n).status == "completed" and record.finished_count() == 1


def test_checkpoints_skip_what_a_kill_or_full_disk_cut_short(record: Study) -> None:
    n, _ = record.ask(LR)
    run1, run2 = record.dir / "runs" / "run-1" / f"t{n:03d}", record.dir / "runs" / "run-2" / f"t{n:03d}"
    make_checkpoint(run1 / "epoch_0001", 1, 3.0)
    make_checkpoint(run1 / "epoch_0002", 2, 2.0)
    make_checkpoint(run2 / "epoch_0003", 3, 2.5)
    make_checkpoint(run2 / "epoch_0004", 4, 1.0, meta=False)  # meta never written
    make_checkpoint(run2 / "epoch_0005", 5, 1.0, state=b"")  # resume state cut short
    assert record.trial_dirs(n) == [run1, run2]
    expected = {1: run1 / "epoch_0001", 2: run1 / "epoch_0002", 3: run2 / "epoch_0003"}
    assert {e: path for e, (path, _) in checkpoint_metas(record.runs, n).items()} == {e: str(p) for e, p in expected.items()}
    # recover() puts them in the record's checkpoint index, with the results that never reached it.
    warnings = record.recover(Objective("val_loss"), 6)
    assert [w.split(": ")[0] for w in warnings] == [f"trial t{n:03d}'s checkpoint {run2 / e} cannot be continued from"
                                                     for e in ("epoch_0005", "epoch_0004")]
    trial = record.trial(n)
    assert trial.checkpoints == {e: str(p) for e, p in expected.items()} and sorted(trial.epochs) == [1, 2, 3]
    assert record.best_checkpoint(trial, Objective("val_loss")) == (2, str(run1 / "epoch_0002"))
    assert record.best_checkpoint(trial, Objective("val_loss", "max")) == (1, str(run1 / "epoch_0001"))
    assert record.next_run_index() == 3
    # The same through a filesystem URI (how a bucket storage is read): same checkpoints, same metas.
    through_uri = checkpoint_metas(f"file://{record.dir / 'runs'}", n)
    assert {e: p for e, (p, _) in through_uri.items()} == {e: str(p) for e, p in expected.items()}
    assert through_uri[2][1]["metrics"]["val_loss"] == 2.0
    shutil.rmtree(run1 / "epoch_0002")  # deleted (retention): the index's next best that is still whole
    assert record.best_checkpoint(trial, Objective("val_loss")) == (3, str(run2 / "epoch_0003"))


def test_pruner_decides_from_the_record(record: Study) -> None:
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    good, _ = record.ask(LR)
    bad, _ = record.ask(LR)
    record.record_epoch(good, 1, {"val_loss": 1.0}, "val_loss")
    assert not record.should_prune(good, pruner)
    record.record_epoch(bad, 1, {"val_loss": 5.0}, "val_loss")
    assert record.should_prune(bad, pruner)
    # Reopened (a resumed study), the rung is still known: a worse newcomer is pruned too.
    again = Study.open(record.dir)
    late, _ = again.ask(LR)
    again.record_epoch(late, 1, {"val_loss": 4.0}, "val_loss")
    assert again.should_prune(late, pruner)


def test_diff_specs_lists_each_changed_key_and_ignores_run_settings() -> None:
    new = json.loads(json.dumps(SPEC))
    new["model"]["hidden_size"] = 128
    new["tune"]["num_samples"] = 9
    new["data"]["train_path"] = "/moved/a.jsonl"
    new["search"]["train.learning_rate"]["high"] = 0.1
    new["search"]["train.grad_clip"] = {"type": "float", "low": 0.1, "high": 1.0}
    assert diff_specs(SPEC, new) == [
        "model.hidden_size: 64 -> 128",
        "search.train.grad_clip: (not searched) -> {type: float, low: 0.1, high: 1}",
        ("search.train.learning_rate: {type: float, low: 0.0001, high: 0.01, log: True} -> "
        "{type: float, low: 0.0001, high: 0.1, log: True}"),
    ]
    assert diff_specs(SPEC, json.loads(json.dumps(SPEC))) == []




def test_an_empty_or_foreign_database_is_refused_and_left_as_it_is(record: Study) -> None:
    db = record.dir / "optuna.db"
    db.write_bytes(b"")
    with pytest.raises(StudyError, match="not an Optuna database"):
        Study.open(record.dir)
    assert db.stat().st_size == 0  # nothing was created in it


def test_a_driver_killed_mid_write_leaves_a_study_that_opens_as_it_was(record: Study) -> None:
    """SIGKILL inside a write transaction leaves a hot journal; opening rolls it back, nothing is refused."""
    n, _ = record.ask(LR)
    record.record_epoch(n, 1, {"val_loss": 2.0}, "val_loss")
    writer = textwrap.dedent(f"""
        import os, signal, sqlite3
        db = sqlite3.connect({str(record.dir / "optuna.db")!r}, isolation_level=None)
        db.execute("pragma cache_size=1")  # spill the changed pages, so the journal is on disk
        db.execute("begin")
        db.execute("update trial_intermediate_values set intermediate_value = 99.0")
        db.execute("update studies set study_name = study_name")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", writer], check=False).returncode == -signal.SIGKILL
    assert (record.dir / "optuna.db-journal").stat().st_size > 0  # the hot journal a kill leaves
    assert Study.open(record.dir).trial(n).epochs[1]["val_loss"] == 2.0  # the cut write rolled back


def test_time_budget_counts_for_the_whole_study(record: Study) -> None:
    for entry in ({"run": 1, "started": "x"}, {"run": 1, "seconds": 400.0}, {"run": 2, "seconds": 150.5}):
        record.add_history(entry)
    assert record.seconds_used() == pytest.approx(550.5)
    assert Study.open(record.dir).seconds_used() == pytest.approx(550.5)


def test_a_runs_length_is_rewritten_as_it_goes_and_each_run_counts_once(record: Study) -> None:
    record.add_history({"run": 1, "started": "x"})
    for seconds in (5.0, 10.0, 15.04):
        record.record_run_seconds(1, seconds)
    record.add_history({"run": 1, "started": "y"})  # a run killed before Ray made run-1/ takes its index again
    record.record_run_seconds(1, 7.0)
    history = Study.open(record.dir).manifest.history
    assert [h.get("seconds") for h in history] == [None, 15.0, None, 7.0]
    assert Study.open(record.dir).seconds_used() == pytest.approx(22.0)


def test_a_driver_killed_mid_write_of_space_yaml_leaves_the_old_one_whole(record: Study) -> None:
    """--resume rewrites space.yaml; cut short, ``--resume --name`` read half of it and refused the study."""
    from conftest import killed_mid_write

    before = (record.dir / "space.yaml").read_text()
    killed_mid_write(f"""
        from pathlib import Path
        from tune.study import Study
        record = Study.open(Path({str(record.dir)!r}))
        cut()
        record.write_space("model: {{hidden_size: 64}}\\ntrain: {{epochs: 3}}\\n" * 4)
    """)
    assert (record.dir / "space.yaml").read_text() == before


def test_a_driver_killed_while_creating_a_study_leaves_no_half_study(tmp_path: Path) -> None:
    """Killed between optuna.db and study.json, creation used to leave ``<name>/`` without a manifest,
    which every later start refused (plain, --resume, --restart) as "a study without its study.json"."""
    killed = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from tune import study as record
        write = record.write_atomic
        def write_killed(path, text):
            if path.name == "study.json":  # the last step of a creation
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, text)
        record.write_atomic = write_killed
        record.Study.create(Path({str(tmp_path / "s")!r}), "s", {SPEC!r}, "model: {{}}\\n", {{}})
    """)
    assert subprocess.run([sys.executable, "-c", killed], check=False).returncode == -signal.SIGKILL
    assert not (tmp_path / "s").exists()  # no study, and nothing that looks like one half made
    made = Study.create(tmp_path / "s", "s", SPEC, "model: {}\n", {})  # the next start creates it
    assert Study.open(tmp_path / "s").manifest == made.manifest
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # the cut creation's leftovers are gone


@pytest.mark.parametrize(("steps", "per_epoch"), [(8, 8), (13, 8), (100, 16), (3, 8), (1, 4), (5, 1), (7, 3)])
def test_an_evaluations_index_is_its_place_on_the_grid_of_evals_per_epoch(steps: int, per_epoch: int) -> None:
    # Issue 22: the one unit of a study's reports. Where the trainer evaluates (evaluation_steps), the
    # index counts its evaluations when the epoch has enough steps; otherwise (fewer steps than
    # evaluations) each takes the grid's largest index at its step, so an index is always a fraction of
    # an epoch, and the epoch's last is epoch x N whatever the batch size.
    from minimind_train.train import evaluation_steps
    from tune.study import evaluation_index

    at = evaluation_steps(steps, per_epoch)
    for epoch in (1, 2):
        indices = [evaluation_index(epoch, s, steps, per_epoch) for s in at]
        assert indices == sorted(set(indices)) and indices[-1] == epoch * per_epoch
        if steps >= per_epoch:
            assert indices == list(range((epoch - 1) * per_epoch + 1, epoch * per_epoch + 1))
        for s, k in zip(at, indices):  # the trainer evaluates index k after ceil(k * S / N) steps
            assert s == -(-((k - 1) % per_epoch + 1) * steps // per_epoch)
    assert [evaluation_index(e, steps, steps, 1) for e in (1, 2, 3)] == [1, 2, 3]  # one per epoch: the epoch
    with pytest.raises(ValueError, match="no evaluation after step 0"):
        evaluation_index(1, 0, steps, per_epoch)


def test_a_study_made_before_a_config_field_existed_defines_the_same_study() -> None:
    # Issue 22: a study made before train.evals_per_epoch must --resume; its absent field is the default.
    new = json.loads(json.dumps(SPEC))
    new["train"] = {**new["train"], "evals_per_epoch": 1}
    assert diff_specs(SPEC, new) == [] and diff_specs(new, SPEC) == []
    new["train"]["evals_per_epoch"] = 8
    assert diff_specs(SPEC, new) == ["train.evals_per_epoch: 1 -> 8"]
    assert diff_specs({**SPEC, "tune": {"mode": "min"}}, SPEC) != []  # (the tune section has no such default)


def test_evaluations_inside_an_epoch_are_recorded_at_their_index(tmp_path: Path) -> None:
    from tune.study import evals_per_epoch

    spec = {**SPEC, "train": {"epochs": 1, "evals_per_epoch": 4}}
    record = Study.create(tmp_path / "e", "e", spec, "", {})
    n, _ = record.ask(LR)
    for k in (1, 2, 3, 4):
        assert record.record_epoch(n, k, {"val_loss": 5.0 - k, "optimizer_steps": 2.0 * k}, "val_loss")
    assert not record.record_epoch(n, 2, {"val_loss": 0.0}, "val_loss")  # recorded once
    record.finish(n, "completed", Objective("val_loss"))
    frozen = record.study.trials[n]
    assert frozen.intermediate_values == {1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0} and frozen.value == 1.0
    assert [m["optimizer_steps"] for _, m in sorted(record.trial(n).epochs.items())] == [2.0, 4.0, 6.0, 8.0]
    assert evals_per_epoch(record.study) == 4 and evals_per_epoch(Study.open(tmp_path / "e").study) == 4
    old = Study.create(tmp_path / "o", "o", SPEC, "", {})  # a study made before the field
    assert evals_per_epoch(old.study) == 1


def test_the_manifest_lives_in_optuna_db_and_study_json_is_its_export(record: Study) -> None:
    record.add_history({"run": 1, "started": "x"})
    attrs = optuna.load_study(study_name="study", storage=f"sqlite:///{record.dir / 'optuna.db'}").user_attrs
    assert attrs["history"] == [{"run": 1, "started": "x"}] and attrs["spec"] == SPEC
    assert attrs["manifest"]["fingerprints"] == {"dataset": "abc"} and attrs["study_id"] == record.manifest.study_id
    assert Manifest.from_json((record.dir / "study.json").read_text(), Path("x")) == record.manifest
    # A kill between the two writes leaves the export one write behind: the record is optuna.db's.
    exported = (record.dir / "study.json").read_text()
    record.record_run_seconds(1, 30.0)
    (record.dir / "study.json").write_text(exported)
    again = Study.open(record.dir)
    assert again.seconds_used() == 30.0
    again.recover(Objective("val_loss"), 3)  # (and the next driver run exports it again)
    assert json.loads((record.dir / "study.json").read_text())["history"][-1] == {"run": 1, "seconds": 30.0}


def test_a_study_made_before_the_manifest_moved_into_optuna_db_opens_and_is_migrated(record: Study) -> None:
    """A study made at 2af3102: study.json holds the manifest; optuna.db only the study id."""
    record.add_history({"run": 1, "seconds": 12.0})
    n, _ = record.ask(LR)  # a finished trial whose checkpoints the record does not index (Optuna: never again)
    make_checkpoint(record.dir / "runs" / "run-1" / f"t{n:03d}" / "epoch_0001", 1, 2.0)
    record.record_epoch(n, 1, {"val_loss": 2.0}, "val_loss")
    record.finish(n, "completed", Objective("val_loss"))
    for key in ("spec", "manifest", "history"):  # (Optuna has no delete: an old db never had them)
        with sqlite3.connect(record.dir / "optuna.db") as db:
            db.execute("delete from study_user_attributes where key = ?", (key,))
    old = Study.open(record.dir)
    assert old.manifest == record.manifest and old.seconds_used() == 12.0  # read from study.json
    assert not old.migrated
    assert old.recover(Objective("val_loss"), 3) == []
    assert old.best_checkpoint(old.trial(n), Objective("val_loss")) == (1, str(record.dir / "runs" / "run-1" / "t000" / "epoch_0001"))
    attrs = optuna.load_study(study_name="study", storage=f"sqlite:///{record.dir / 'optuna.db'}").user_attrs
    assert attrs["spec"] == SPEC and attrs["history"] == [{"run": 1, "seconds": 12.0}]
    assert Study.open(record.dir).manifest == record.manifest and Study.open(record.dir).migrated
    _edit_study_json(record)  # its export edited by hand is still refused, naming it
    with pytest.raises(StudyError, match=r"study\.json was edited by hand"):
        Study.open(record.dir)
