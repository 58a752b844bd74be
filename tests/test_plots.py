"""tune.plots: every finished trial is in the plots, named by the objective, the best one marked."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import optuna
import pytest
from matplotlib.figure import Figure

from tune.plots import MIN_TRIALS_FOR_IMPORTANCE, PLOT_FILES, plot_study, study_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC = "train_loss"  # not val_loss: the plots must name the study's own objective


def _study(completed: int, stopped: int, diverged: int = 0, running: int = 0, epochs: int = 3) -> optuna.Study:
    """Trials as tune.record leaves them: per-epoch objective as intermediate values; COMPLETE with the
    best epoch's value, PRUNED after one epoch (stopped early), FAIL (diverged), RUNNING."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    kinds = ["completed"] * completed + ["stopped"] * stopped + ["diverged"] * diverged + ["running"] * running
    for index, kind in enumerate(kinds):
        trial = study.ask()
        lr = trial.suggest_float("train.learning_rate", 1e-5, 1e-2, log=True)
        acc = trial.suggest_categorical("train.accumulation_steps", [1, 2, 4])
        curve = [5.0 + index * 0.1 + math.log10(lr) / 10 + acc / 10 - epoch * 0.2 for epoch in range(1, epochs + 1)]
        reported = curve[:1] if kind in ("stopped", "diverged") else curve
        for epoch, value in enumerate(reported, start=1):
            trial.report(value, epoch)
        if kind == "completed":
            study.tell(trial, min(curve))
        elif kind == "stopped":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif kind == "diverged":
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return study


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Figure]:
    made = study_figures(_study(*request.param), METRIC)
    yield made
    for fig in made.values():
        plt.close(fig)


def _texts(fig: Figure) -> str:
    parts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize(
    ("trials", "shown"),
    # (fewer than MIN_TRIALS_FOR_IMPORTANCE completed trials each: fANOVA takes seconds, tested once below)
    [((0, 0), 0), ((0, 0, 1, 1), 0), ((1, 0), 1), ((3, 0), 3), ((0, 2), 2), ((3, 5, 1, 1), 8), ((4, 10), 14)],
    ids=["empty", "only-unfinished", "one", "three", "only-stopped-early", "mixed", "many"],
)
def test_plots_are_png_for_any_number_and_kind_of_trials(trials: tuple[int, ...], shown: int, tmp_path: Path) -> None:
    paths = plot_study(_study(*trials), tmp_path / "plots", metric=METRIC)
    assert set(paths) == set(PLOT_FILES)
    for name, path in paths.items():
        assert path == tmp_path / "plots" / PLOT_FILES[name]
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, path
    figs = study_figures(_study(*trials), METRIC)
    try:
        curves = figs["curves"]
        if shown:
            (ax,) = curves.axes
            assert ax.get_ylabel() == METRIC and ax.get_xlabel() == "epoch"
            # Every finished trial is a line; beyond ten, the rest are grey and unlabelled.
            assert sum(len(line.get_xdata()) > 0 for line in ax.get_lines()) == shown
        else:
            assert f"No trial has a {METRIC} yet" in _texts(curves)
    finally:
        for fig in figs.values():
            plt.close(fig)


@pytest.mark.parametrize("figures", [(3, 2, 1)], indirect=True)
def test_history_shows_stopped_early_trials_and_the_best(figures: dict[str, Figure]) -> None:
    ax = figures["optimization_history"].axes[0]
    assert ax.get_ylabel() == METRIC
    labels = ax.get_legend_handles_labels()[1]
    stopped = next(c for c, label in zip(ax.collections, labels) if "stopped early" in str(label))
    assert sorted(x for x, _ in stopped.get_offsets()) == [3, 4]  # trial numbers of the two stopped early
    assert any(str(label).startswith("best: t000") for label in labels)  # trial 0 has the lowest value
    assert "3 completed, 2 stopped early" in ax.get_title()


@pytest.mark.parametrize("figures", [(3, 2)], indirect=True)
def test_curves_legend_is_ranked_best_first_and_marks_stopped_early(figures: dict[str, Figure]) -> None:
    ax = figures["curves"].axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert [label.split()[0] for label in labels] == ["t000", "t001", "t002", "t003", "t004"]
    assert labels[0].endswith("best") and all(label.endswith("stopped early") for label in labels[3:])
    best_line = next(line for line in ax.get_lines() if line.get_label().startswith("t000"))
    assert best_line.get_linewidth() > max(line.get_linewidth() for line in ax.get_lines() if line is not best_line)
    colours = [line.get_color() for line in ax.get_lines()]
    assert len(set(colours)) == len(colours)  # distinct


@pytest.mark.parametrize("figures", [(3, 2)], indirect=True)
def test_parallel_coordinates_include_stopped_early_trials_on_a_log_axis(figures: dict[str, Figure]) -> None:
    fig = figures["parallel_coordinates"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [METRIC, "train.accumulation_steps", "train.learning_rate"]
    (lines,) = ax.collections
    assert len(lines.get_segments()) == 5
    assert sum(dashes is not None for _, dashes in lines.get_linestyles()) == 2  # dashed: stopped early
    assert "log" in {other.get_yscale() for other in fig.axes[1:]}  # the learning rate's axis
    assert any(str(label).startswith("best: t000") for label in ax.get_legend_handles_labels()[1])


@pytest.mark.parametrize(("completed", "drawn"), [(MIN_TRIALS_FOR_IMPORTANCE - 1, False), (MIN_TRIALS_FOR_IMPORTANCE, True)])
def test_importances_need_enough_completed_trials(completed: int, drawn: bool) -> None:
    figs = study_figures(_study(completed, 3), METRIC)
    try:
        text = _texts(figs["param_importances"])
        assert ("Needs at least" in text) is not drawn
        if drawn:
            assert f"({completed} completed trials)" in text
        else:
            assert f"this study has {completed}" in text
    finally:
        for fig in figs.values():
            plt.close(fig)


def test_the_given_best_trial_is_highlighted_even_if_stopped_early() -> None:
    figs = study_figures(_study(0, 3), METRIC, best_trial=1)
    try:
        labels = figs["curves"].axes[0].get_legend_handles_labels()[1]
        assert [label for label in labels if "best" in label] == [next(l for l in labels if l.startswith("t001"))]
    finally:
        for fig in figs.values():
            plt.close(fig)


def test_a_trial_no_better_than_untrained_is_not_plotted_nor_the_best() -> None:
    """tune.record tells such a trial to Optuna as COMPLETE with its value (here the lowest); the plots
    leave it out, and the best highlighted is the best trial that learned."""
    study = _study(2, 0)
    trial = study.ask()
    trial.suggest_float("train.learning_rate", 1e-5, 1e-2, log=True)
    trial.suggest_categorical("train.accumulation_steps", [1, 2, 4])
    trial.report(0.1, 1)
    trial.set_user_attr("status", "no_better")
    study.tell(trial, 0.1)
    figs = study_figures(study, METRIC)
    try:
        labels = figs["curves"].axes[0].get_legend_handles_labels()[1]
        assert not any(label.startswith("t002") for label in labels), labels
        best = min(study.trials[:2], key=lambda t: t.value).number
        assert [label.split()[0] for label in labels if "best" in label] == [f"t{best:03d}"], labels
    finally:
        for fig in figs.values():
            plt.close(fig)
