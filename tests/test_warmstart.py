"""tune.warmstart: an earlier study's trials as Optuna history, its best configs asked first."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tune import run
from tune.objective import Objective
from tune.study import Study, StudyError
from tune.warmstart import check_warm_start, warm_start

SPACE = {"train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
         "train.accumulation_steps": optuna.distributions.CategoricalDistribution([1, 2, 4])}


def _spec(metric: str = "val_loss", search: tuple[str, ...] = tuple(SPACE), epochs: int = 1) -> dict:
    return {"train": {"epochs": epochs}, "search": {p: {"type": "float"} for p in search},
            "tune": {"metric": metric, "mode": "min"}}


def _study(folder: Path, trials: list[tuple[float, int, float, str]], epochs: int = 1) -> Study:
    """A study whose trials are (learning rate, accumulation, value, status)."""
    record = Study.create(folder, folder.name, _spec(epochs=epochs), "", {})
    wider = {**SPACE, "train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for lr, acc, value, status in trials:
        record.study.enqueue_trial({"train.learning_rate": lr, "train.accumulation_steps": acc})
        n, _ = record.ask(wider)
        record.record_epoch(n, 1, {"val_loss": value}, "val_loss")
        record.finish(n, status, Objective("val_loss"))
    return record


SCOUT = [(1e-4, 1, 4.0, "completed"), (5e-4, 2, 3.0, "completed"), (1e-3, 4, 2.0, "completed"),
         (5e-3, 1, 1.0, "completed"), (2e-3, 2, 9.0, "stopped_early"), (2e-2, 1, 0.5, "completed")]


def test_history_is_copied_and_the_best_configs_are_asked_first(tmp_path: Path) -> None:
    scout = _study(tmp_path / "scout", SCOUT)
    full = Study.create(tmp_path / "full", "full", _spec(epochs=4), "", {})
    other = check_warm_start(scout.dir, _spec(epochs=4))  # other epochs and model: allowed
    line = warm_start(full, other, SPACE, top_k=2)
    # 2e-2 lies outside the new learning-rate range: left out, so the best in range is 5e-3 (1.0).
    assert "5 trial(s) as history (1 outside" in line
    assert full.trials() == [] and full.finished_count() == 0  # history is not the study's own
    states = [t.state for t in full.study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4 and states.count(optuna.trial.TrialState.PRUNED) == 1
    first, _ = full.ask(SPACE)
    second, _ = full.ask(SPACE)
    asked = [full.trial(n).params["train.learning_rate"] for n in (first, second)]
    assert asked == [5e-3, 1e-3]
    assert [t.number for t in full.trials()] == [first, second]


@pytest.mark.parametrize(("scout_evals", "curve", "full_evals", "expected"), [
    (1, {1: 3.0, 2: 2.0}, 4, {4: 3.0, 8: 2.0}), (4, {4: 3.0, 8: 2.0}, 1, {1: 3.0, 2: 2.0}),
    (1, {1: 3.0, 2: 2.0}, 1, {1: 3.0, 2: 2.0}), (4, {3: 3.0, 4: 2.0}, 1, {1: 2.0}),
    (2, {2: 3.0, 3: 2.5, 4: 2.0}, 3, {3: 3.0, 4: 2.5, 6: 2.0})])
def test_history_moves_to_the_new_studys_evaluation_unit(tmp_path: Path, scout_evals: int, curve: dict[int, float],
                                                         full_evals: int, expected: dict[int, float]) -> None:
    # Issue 22: a step is an evaluation index (k / N epochs): epoch 1 of a scouting study with one
    # evaluation per epoch is evaluation 4 of a study with 4 per epoch.
    def study(name: str, evals: int) -> Study:
        return Study.create(tmp_path / name, name, {**_spec(), "train": {"evals_per_epoch": evals}}, "", {})

    scout = study("scout", scout_evals)
    n, _ = scout.ask(SPACE)
    for step, value in curve.items():
        scout.record_epoch(n, step, {"val_loss": value}, "val_loss")
    scout.finish(n, "stopped_early", Objective("val_loss"))
    full = study("full", full_evals)
    warm_start(full, scout, SPACE)
    (copied,) = full.study.get_trials()
    assert copied.intermediate_values == expected


def test_a_study_with_another_objective_or_space_is_refused_naming_what_differs(tmp_path: Path) -> None:
    scout = _study(tmp_path / "scout", SCOUT[:1])
    with pytest.raises(StudyError, match=r"tune.metric: val_loss -> train_loss"):
        check_warm_start(scout.dir, _spec(metric="train_loss"))
    with pytest.raises(StudyError, match=r"searched parameters: .*train.learning_rate -> train.learning_rate$"):
        check_warm_start(scout.dir, _spec(search=("train.learning_rate",)))
    with pytest.raises(StudyError, match="--warm-start=.*nowhere.*not a study folder"):
        check_warm_start(tmp_path / "nowhere", _spec())


def test_an_earlier_studys_finalists_and_history_are_not_copied_and_configs_queue_once(tmp_path: Path) -> None:
    scout = _study(tmp_path / "scout", SCOUT[:4])
    best = min(scout.trials(), key=lambda t: min(v for _, v in t.curve("val_loss")))
    for seed in (1, 2):  # its finalists: the best config again with other seeds
        number = scout.add_finalist(best, seed, SPACE)
        scout.record_epoch(number, 1, {"val_loss": 0.9}, "val_loss")
        scout.finish(number, "completed", Objective("val_loss"))
    full = Study.create(tmp_path / "full", "full", _spec(epochs=4), "", {})
    line = warm_start(full, check_warm_start(scout.dir, _spec()), SPACE, top_k=3)
    assert "4 trial(s) as history (0 outside" in line and "its 3 best config(s)" in line
    asked = [full.trial(full.ask(SPACE)[0]).params["train.learning_rate"] for _ in range(3)]
    assert asked == [5e-3, 1e-3, 5e-4]  # three distinct configs, best first


def test_dry_run_counts_the_trials_the_warm_start_will_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    scout = _study(tmp_path / "scout", SCOUT[:4])  # smoke.yaml searches accumulation 1 or 2: the 4 is outside
    for seed in (1, 2):  # finalists are not history
        number = scout.add_finalist(scout.trials()[0], seed, SPACE)
        scout.finish(number, "completed", Objective("val_loss"))
    assert run.main(["--space", "smoke.yaml", "--dry-run", "--warm-start", str(scout.dir),
                     "--storage-path", str(tmp_path / "studies")]) == 0
    out = capsys.readouterr().out
    assert "warm start: 3 finished trial(s) of study 'scout'" in out and "(1 outside this space's ranges" in out


def test_an_empty_warm_start_is_refused() -> None:
    with pytest.raises(StudyError, match="--warm-start='' is not allowed: expected the folder of an earlier study"):
        check_warm_start("", _spec())


def test_an_earlier_trial_that_learned_nothing_is_history_but_never_asked_first(tmp_path: Path) -> None:
    """Its bad value teaches TPE the region is bad; its config is no earlier best to try again."""
    scout = _study(tmp_path / "scout", [(1e-4, 1, 4.0, "completed"), (5e-3, 2, 3.0, "completed")])
    collapsed = {"val_loss": 8.7641, "baseline_val_loss": 8.78, "uniform_loss": 8.7641}
    scout.study.enqueue_trial({"train.learning_rate": 1e-2, "train.accumulation_steps": 1})
    n, _ = scout.ask(SPACE)
    scout.record_epoch(n, 1, collapsed, "val_loss")
    scout.finish(n, "completed", Objective("val_loss"))
    assert scout.trial(n).status == "no_better"
    full = Study.create(tmp_path / "full", "full", _spec(), "", {})
    assert "3 trial(s) as history" in warm_start(full, check_warm_start(scout.dir, _spec()), SPACE, top_k=3)
    asked = [full.trial(full.ask(SPACE)[0]).params["train.learning_rate"] for _ in range(2)]
    assert asked == [5e-3, 1e-4]
