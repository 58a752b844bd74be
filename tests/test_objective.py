"""tune.objective: the one place that knows which way the objective is better."""

from __future__ import annotations

import math

import pytest

from tune.objective import Objective


def test_min_and_max_compare_sort_and_pick_each_their_way() -> None:
    low, high = Objective("val_loss"), Objective("accuracy", "max")
    assert (low.sign, low.optuna_direction, low.worst, low.not_better) == (1.0, "minimize", math.inf, ">=")
    assert (high.sign, high.optuna_direction, high.worst, high.not_better) == (-1.0, "maximize", -math.inf, "<=")
    assert low.better(1.0, 2.0) and not low.better(2.0, 2.0) and high.better(2.0, 1.0)
    assert not low.better(math.nan, 2.0) and low.better(1.0, math.inf)
    values = [2.0, math.nan, 1.0, math.inf, 3.0]
    assert sorted(values, key=low.sort_key)[:3] == [1.0, 2.0, 3.0]  # (non-finite last)
    assert sorted(values, key=high.sort_key)[:3] == [3.0, 2.0, 1.0]
    assert (low.best_of(values), high.best_of(values), low.best_of([math.nan])) == (1.0, 3.0, None)
    # Items by a value: the first one on a tie (the earliest epoch).
    assert low.best_of([(1, 2.0), (2, 1.0), (3, 1.0)], lambda ev: ev[1]) == (2, 1.0)


def test_the_objective_of_a_stored_spec_and_of_a_study() -> None:
    optuna = pytest.importorskip("optuna")

    assert Objective.of({}) == Objective("val_loss", "min")
    assert Objective.of({"metric": "train_loss", "mode": "max"}) == Objective("train_loss", "max")
    assert Objective.of_study(optuna.create_study(direction="maximize"), "m") == Objective("m", "max")
    with pytest.raises(ValueError, match="tune.mode: 'minimize' is not one of min, max"):
        Objective("val_loss", "minimize")  # type: ignore[arg-type]
