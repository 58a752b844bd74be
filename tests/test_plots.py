"""tune.plots: the study plots are PNGs whatever the number and kind of trials."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tune.plots import PLOT_FILES, plot_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
