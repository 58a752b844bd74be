"""tune.plots: every finished trial is in the plots, named by the objective, the best one marked."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import optuna
import pytest
from matplotlib.artist import Artist
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text

from tune.plots import MIN_TRIALS_FOR_IMPORTANCE, PLOT_DPI, PLOT_FILES, plot_study, study_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC = "train_loss"  # not val_loss: the plots must name the study's own objective


def _study(completed: int, stopped: int, diverged: int = 0, running: int = 0, epochs: int = 3, *,
           finalists: Sequence[int] = (), more_params: bool = False) -> optuna.Study:
    """Trials as tune.study leaves them: per-epoch objective as intermediate values; COMPLETE with the
    best epoch's value, PRUNED after one epoch (stopped early), FAIL (diverged), RUNNING; then for each
    of ``finalists`` (trial numbers) two completed trials of its config with other seeds (``finalist_of``).
    ``more_params``: grad_clip and min_lr_ratio searched too (sft.yaml's four)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    kinds = ["completed"] * completed + ["stopped"] * stopped + ["diverged"] * diverged + ["running"] * running
    for index, kind in enumerate(kinds):
        trial = study.ask()
        lr = trial.suggest_float("train.learning_rate", 1e-5, 1e-2, log=True)
        acc = trial.suggest_categorical("train.accumulation_steps", [1, 2, 4])
        if more_params:
            trial.suggest_float("train.grad_clip", 0.1, 2.0)
            trial.suggest_float("train.min_lr_ratio", 0.0, 0.5)
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
    for of in finalists:
        searched = study.trials[of]
        for seed in (43, 44):
            curve = {epoch: value + seed / 1000 for epoch, value in searched.intermediate_values.items()}
            study.add_trial(optuna.trial.create_trial(
                params=searched.params, distributions=searched.distributions, intermediate_values=curve,
                value=min(curve.values()), user_attrs={"status": "completed", "finalist_of": of, "seed": seed}))
    return study


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Figure]:
    """The figures of ``_study(*param)``; a dict last in ``param``: its keywords, and ``best_trial``."""
    *args, options = request.param if isinstance(request.param[-1], dict) else (*request.param, {})
    options = dict(options)
    best_trial = options.pop("best_trial", None)
    made = study_figures(_study(*args, **options), METRIC, best_trial=best_trial)
    yield made
    for fig in made.values():
        plt.close(fig)


def _legend_texts(fig: Figure) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    return [text.get_text() for legend in legends for text in legend.get_texts()]


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


def test_curves_x_axis_is_the_records_unit_evaluations_inside_an_epoch() -> None:
    # Issue 22: with train.evals_per_epoch N the intermediate values' steps are evaluation indices.
    study = _study(2, 1, epochs=8)
    study.set_user_attr("spec", {"train": {"epochs": 1, "evals_per_epoch": 8}})  # (tune.study keeps it so)
    fig = study_figures(study, METRIC)["curves"]
    try:
        (ax,) = fig.axes
        assert ax.get_xlabel() == "evaluation (8 per epoch: 8 = 1 epoch)"
        assert max(max(line.get_xdata(), default=0) for line in ax.get_lines()) == 8
    finally:
        plt.close(fig)


@pytest.mark.parametrize("figures", [(3, 2, 1)], indirect=True)
def test_history_shows_stopped_early_trials_and_the_best(figures: dict[str, Figure]) -> None:
    ax = figures["optimization_history"].axes[0]
    assert ax.get_ylabel() == METRIC
    labels = ax.get_legend_handles_labels()[1]
    stopped = next(c for c in ax.collections if "stopped early" in str(c.get_label()))
    assert sorted(x for x, _ in stopped.get_offsets()) == [3, 4]  # trial numbers of the two stopped early
    assert any(str(label).startswith("best: t000") for label in labels)  # trial 0 has the lowest value
    assert "3 completed, 2 stopped early" in ax.get_title()


@pytest.mark.parametrize("figures", [(3, 2)], indirect=True)
def test_curves_legend_is_ranked_best_first_and_marks_stopped_early(figures: dict[str, Figure]) -> None:
    labels = _legend_texts(figures["curves"])
    assert [label.split()[0] for label in labels] == ["t000", "t001", "t002", "t003", "t004"]
    assert labels[0].endswith("(best)") and all(label.endswith("(stopped early)") for label in labels[3:])
    ax = figures["curves"].axes[0]
    best_line = next(line for line in ax.get_lines() if line.get_label().startswith("t000"))
    assert best_line.get_linewidth() > max(line.get_linewidth() for line in ax.get_lines() if line is not best_line)
    colours = [line.get_color() for line in ax.get_lines()]
    assert len(set(colours)) == len(colours)  # distinct


@pytest.mark.parametrize("figures", [(3, 2)], indirect=True)
def test_parallel_coordinates_include_stopped_early_trials_on_a_log_axis(figures: dict[str, Figure]) -> None:
    fig = figures["parallel_coordinates"]
    ax = fig.axes[0]
    names = [t.get_text().replace("\n", "") for t in ax.get_xticklabels()]
    assert names == [METRIC, "train.accumulation_steps", "train.learning_rate"]
    # Each trial a line of its own colour, or one of the grey rest in Optuna's LineCollection.
    segments = [(line.get_linestyle(), line.get_ydata()[0]) for line in ax.get_lines()] + [
        (("--" if dashes is not None else "-"), segment[0, 1])
        for lines in ax.collections
        for segment, (_, dashes) in zip(lines.get_segments(), lines.get_linestyles())]
    assert len(segments) == 5 and sum(style == "--" for style, _ in segments) == 2  # dashed: stopped early
    assert "log" in {other.get_yscale() for other in fig.axes[1:]}  # the learning rate's axis
    best = next(line for line in ax.get_lines() if line.get_label().startswith("t000 "))
    assert "(best)" in best.get_label()
    assert best.get_ydata()[0] == min(y for _, y in segments)  # its own line: t000 has the lowest value


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


# MLflow's artifact preview shows a PNG about this wide; text there must be at least MIN_PX high.
PREVIEW_PX, MIN_PX = 600, 10.0
# 14 trials, the configs of t001 and t002 trained again as finalists, t002 the study's best (by mean
# over seeds, as tune.report decides) though t000 has the lowest single value.
REAL = (4, 10, {"finalists": (1, 2), "more_params": True, "best_trial": 2})


def _labelled(fig: Figure) -> list[tuple[Artist, str]]:
    return [pair for ax in fig.axes for pair in zip(*ax.get_legend_handles_labels())]


def _points(artist: Artist) -> list[tuple[float, float]]:
    if isinstance(artist, Line2D):
        points = artist.get_xydata()
    elif isinstance(artist, PathCollection):
        points = artist.get_offsets()
    elif isinstance(artist, LineCollection):
        points = [point for segment in artist.get_segments() for point in segment]
    else:  # (a container: Optuna's importance bars)
        points = [(patch.get_x(), patch.get_width()) for patch in artist]
    return [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def _shows_something(artist: Artist, fig: Figure) -> bool:
    """Some point of ``artist`` is drawn and not under a marker drawn above it (a line needs two
    points unless it has markers)."""
    points = _points(artist)
    if isinstance(artist, Line2D) and artist.get_marker() in ("None", "", " ", None) and len(points) < 2:
        return False
    covered = {point for other in fig.findobj(PathCollection) if other is not artist
               and other.get_zorder() > getattr(artist, "zorder", 0) for point in _points(other)}
    return any(point not in covered for point in points)


def _colour(artist: Artist) -> tuple[float, ...]:
    return to_rgba(artist.get_color()) if isinstance(artist, Line2D) else tuple(artist.get_colors()[0])


@pytest.mark.parametrize("figures", [(1, 0), (0, 2), REAL], indirect=True,
                         ids=["one", "only-stopped-early", "real"])
def test_every_legend_entry_is_drawn_on_the_plot(figures: dict[str, Figure]) -> None:
    for name, fig in figures.items():
        labelled = _labelled(fig)
        # The legend is made of the plot's own artists (no stand-ins without data) ...
        assert sorted(_legend_texts(fig)) == sorted(label for _, label in labelled), name
        # ... and each shows something: no entry for an empty series or one hidden under another marker.
        assert [label for artist, label in labelled if not _shows_something(artist, fig)] == [], name


@pytest.mark.parametrize("figures", [REAL], indirect=True, ids=["real"])
def test_best_and_finalists_are_told_apart_by_colour_and_label(figures: dict[str, Figure]) -> None:
    colours: dict[str, dict[str, tuple[float, ...]]] = {}
    for name in ("curves", "parallel_coordinates"):
        fig = figures[name]
        labelled = _labelled(fig)
        labels = _legend_texts(fig)
        by_label = {label: _colour(artist) for artist, label in labelled}
        ranked = [by_label[label] for label in labels]
        assert labels[0].startswith("t002 ") and labels[0].endswith("(best, finalist)"), name
        assert any(label.startswith("t001 ") and label.endswith("(finalist)") for label in labels), name
        # The best's colour is no other line's; neighbouring ranks never share one.
        ax = fig.axes[0]
        others = [_colour(a) for a in [*ax.get_lines(), *ax.collections] if a.get_label() != labels[0]]
        assert ranked[0] not in others, name
        assert all(a != b for a, b in itertools.pairwise(ranked)), name
        # Beyond the first 8, one grey entry for the rest, last.
        assert len(labels) == 9 and labels[-1].startswith("6 more trials"), name
        colours[name] = {label.split()[0]: colour for label, colour in by_label.items() if label[0] == "t"}
    assert colours["curves"] == colours["parallel_coordinates"]  # a trial's colour is the same in both
    history = _legend_texts(figures["optimization_history"])
    assert any(label.startswith("best: t002 ") for label in history)
    assert "finalist: t001" in history


def test_text_is_legible_at_mlflow_preview_width(tmp_path: Path) -> None:
    """Every text of every plot, shown PREVIEW_PX wide (as MLflow's artifact preview does; a narrower
    PNG is shown as it is), is at least MIN_PX high."""
    study = _study(4, 6, finalists=(0,), more_params=True)
    paths = plot_study(study, tmp_path, metric=METRIC)
    figs = study_figures(study, METRIC)
    try:
        for name, fig in figs.items():
            width = int.from_bytes(paths[name].read_bytes()[16:20], "big")  # (the PNG header's width)
            px_per_pt = PLOT_DPI / 72 * min(1.0, PREVIEW_PX / width)
            shown = [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]
            small = {t.get_text(): round(t.get_fontsize() * px_per_pt, 1) for t in shown
                     if t.get_fontsize() * px_per_pt < MIN_PX}
            assert small == {}, (name, width)
    finally:
        for fig in figs.values():
            plt.close(fig)


def test_a_trial_no_better_than_untrained_is_not_plotted_nor_the_best() -> None:
    """tune.study tells such a trial to Optuna as COMPLETE with its value (here the lowest); the plots
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
