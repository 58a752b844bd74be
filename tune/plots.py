"""Study plots as PNG files that answer "which config?" at a glance (matplotlib Agg: no display).

Optuna draws what it can (``optuna.visualization.matplotlib``, the objective as ``target_name``) on a
copy of the study in which a trial stopped early by ASHA (Optuna ``PRUNED``) counts with its last
value, marked as such; the per-epoch curves, best trial highlighted, are drawn here. ``plot_study``
always writes :data:`PLOT_FILES`; a plot without enough data is a figure that says why.

Read in 5 seconds, also in MLflow's artifact preview (about 600 px wide): where each trial is a line
(curves, parallel coordinates) a trial has one colour and label in both, by rank (the best black, the
next ranks and the finalists a qualitative palette, the rest grey under one legend entry); legends go
below the plot and list only artists that show something; every text is large enough for the preview.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import NamedTuple

import matplotlib

if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")  # Optuna's plots go through pyplot: no GUI window; a notebook keeps its backend
import matplotlib.pyplot as plt
import optuna
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.text import Text
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as optuna_plots

from .objective import Objective
from .status import TrialStatus
from .storage import trial_dirname
from .study import evals_per_epoch, ranked

__all__ = ["MIN_TRIALS_FOR_IMPORTANCE", "PLOT_DPI", "PLOT_FILES", "plot_study", "study_figures"]

logger = logging.getLogger(__name__)

PLOT_FILES: dict[str, str] = {
    "optimization_history": "optimization_history.png", "parallel_coordinates": "parallel_coordinates.png",
    "param_importances": "param_importances.png", "curves": "objective_curves.png",
}
# fANOVA's forest on fewer completed trials ranks parameters by noise.
MIN_TRIALS_FOR_IMPORTANCE = 5
PLOT_DPI = 110
# MLflow's artifact preview shows a PNG about 600 px wide: every text is at least _FONT_PT and figures
# are at most ~9.5 in wide (legends below the axes, not beside them), so text there is >= 10 px.
_FONT_PT = 12.5
# The best trial is black; the next ranks take tab10's colours (without its grey), neighbours never alike;
# from rank _NAMED on, trials are grey with one legend entry ("N more trials"), finalists excepted.
_BEST = "black"
_COLOURS = [f"C{i}" for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
_GREY = "0.72"
_NAMED = 8


class _Point(NamedTuple):
    """A trial as the plots show it: its value is Optuna's, or the last epoch's for one stopped early."""

    trial: FrozenTrial
    value: float
    stopped_early: bool
    name: str


class _Style(NamedTuple):
    """How a trial is drawn where each trial is a line (per-epoch curves, parallel coordinates): the same
    colour and label in both. ``label`` None: one of the grey rest, which share one legend entry."""

    colour: str
    label: str | None
    width: float
    zorder: float


def _points(study: optuna.Study) -> list[_Point]:
    """Completed and stopped-early search trials with a finite value, best first (:func:`tune.study.ranked`;
    an earlier study's warm-start history, the finalists' extra seeds and trials no better than untrained
    stay out)."""
    points = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        epochs = t.intermediate_values
        value = t.value if t.state == TrialState.COMPLETE else epochs[max(epochs)] if epochs else None
        if "finalist_of" not in t.user_attrs and value is not None:
            points.append(_Point(t, float(value), t.state == TrialState.PRUNED, trial_dirname(t.number)))
    # (the record's status; a trial recorded before statuses by its Optuna state)
    return ranked(points, Objective.of_study(study),
                  lambda p: TrialStatus.of(p.trial.user_attrs.get("status"), p.trial.state), lambda p: p.value)


def _finalist_configs(study: optuna.Study) -> set[int]:
    """The search trials whose configs were trained again with other seeds (``finalist_of``)."""
    return {int(t.user_attrs["finalist_of"]) for t in study.get_trials(deepcopy=False)
            if "finalist_of" in t.user_attrs}


def _styled(study: optuna.Study, points: list[_Point], best: _Point | None) -> list[tuple[_Point, _Style]]:
    """Each of ``points`` with its style, by rank: the best first (it may be a finalist config chosen by its
    mean over seeds), then ``points``' order."""
    finalists, palette, styled = _finalist_configs(study), iter(_COLOURS), []
    for rank, p in enumerate(sorted(points, key=lambda p: p is not best)):
        tags = ["best"] * (p is best) + ["finalist"] * (p.trial.number in finalists) \
            + ["stopped early"] * p.stopped_early
        label = f"{p.name} {p.value:.4g}" + (f" ({', '.join(tags)})" if tags else "")
        if p is best:
            styled.append((p, _Style(_BEST, label, 3.5, 4)))
        elif (rank < _NAMED or p.trial.number in finalists) and (colour := next(palette, None)):
            styled.append((p, _Style(colour, label, 2.0, 3)))
        else:
            styled.append((p, _Style(_GREY, None, 1.2, 2)))
    return styled


def _grey_label(styled: list[tuple[_Point, _Style]]) -> str:
    """The one legend entry of the grey trials among ``styled``."""
    grey = [p for p, style in styled if style.label is None]
    dashed = ", dashed: stopped early" * any(p.stopped_early for p in grey)
    return f"{len(grey)} more trial{'s' * (len(grey) > 1)} (grey{dashed})"


def _view(study: optuna.Study, points: list[_Point], stopped_complete: bool) -> optuna.Study:
    """An in-memory copy of ``points`` in their order. Optuna plots only complete trials: a trial stopped
    early is complete with its last value when ``stopped_complete``, else pruned (a place on the x axis)."""
    view = optuna.create_study(direction=study.direction)
    for p in points:
        pruned = p.stopped_early and not stopped_complete
        view.add_trial(optuna.trial.create_trial(params=p.trial.params, distributions=p.trial.distributions,
                                                 state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
                                                 value=None if pruned else p.value))
    return view


def _note(title: str, message: str) -> Figure:
    ax = Figure(figsize=(8, 3)).add_subplot(title=title)
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)
    return ax.figure  # type: ignore[return-value]


def _counts(points: list[_Point]) -> str:
    stopped = sum(p.stopped_early for p in points)
    return f"{len(points) - stopped} completed, {stopped} stopped early"


def _legend_below(ax: Axes, ncols: int) -> None:
    """The axes' labelled artists as a legend below the plot in at most ``ncols`` columns (a legend
    beside it widens the figure, which MLflow's preview then shrinks), the topmost first (the best, the
    ranks, the grey rest last); Optuna's own legend goes."""
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if pairs := sorted(zip(*ax.get_legend_handles_labels()),
                       key=lambda pair: -pair[0].get_zorder() if isinstance(pair[0], Artist) else 0):
        handles, labels = zip(*pairs)
        fig = ax.figure
        fig.set_layout_engine("constrained")  # (makes room for an "outside" legend)
        # As many columns (up to ``ncols``) as fit the figure's width: a wider legend would widen it.
        for columns in range(min(ncols, len(handles)), 0, -1):
            legend = fig.legend(handles, labels, loc="outside lower center", ncols=columns, frameon=False,
                                fontsize=_FONT_PT)
            if columns == 1 or legend.get_window_extent().width <= fig.bbox.width:
                break
            legend.remove()


def _drop_invisible(ax: Axes, hidden: AbstractSet[tuple[float, float]] = frozenset()) -> None:
    """Remove the lines and markers that show nothing (no finite point, a line of one point without a
    marker) and the markers at ``hidden`` points (covered by another marker): a legend entry must point
    at something on the plot."""
    for line in list(ax.get_lines()):
        finite = [(x, y) for x, y in line.get_xydata() if math.isfinite(x) and math.isfinite(y)]
        if len(finite) < (1 if line.get_marker() not in ("None", "", " ", None) else 2):
            line.remove()
    for dots in [c for c in ax.collections if isinstance(c, PathCollection)]:
        kept = [(x, y) for x, y in dots.get_offsets() if math.isfinite(x) and math.isfinite(y) and (x, y) not in hidden]
        if kept:
            dots.set_offsets(kept)
        else:
            dots.remove()


def _history(study: optuna.Study, points: list[_Point], metric: str, best: _Point | None) -> Figure:
    own = sorted(points, key=lambda p: p.trial.number)  # (the x axis is the trial, named below)
    at = {p.trial.number: i for i, p in enumerate(own)}
    ax = optuna_plots.plot_optimization_history(_view(study, own, stopped_complete=False), target_name=metric)
    ax.figure.set_size_inches(8, 5.5)
    for artist in ax.get_lines():  # Optuna's running best is of single values, the best trial may not be
        artist.set_label(f"best {metric} so far")
    for dots in ax.collections:
        if dots.get_label() == metric:
            dots.set_label(f"{metric}, completed")
    # The best trial's star covers its dot: the dot goes (a trial alone under the star: no empty entry).
    _drop_invisible(ax, hidden=set() if best is None else {(at[best.trial.number], best.value)})
    if stopped := [p for p in points if p.stopped_early]:
        ax.scatter([at[p.trial.number] for p in stopped], [p.value for p in stopped], marker="x", s=50,
                   color="tab:gray", label=f"{metric}, stopped early (last epoch)", zorder=3)
    finalists = _finalist_configs(study)
    if others := [p for p in own if p.trial.number in finalists and p is not best]:
        ax.scatter([at[p.trial.number] for p in others], [p.value for p in others], s=220,
                   facecolors="none", edgecolors="tab:purple", linewidths=2.5, zorder=4,
                   label=f"finalist: {', '.join(p.name for p in others)}")
    if best is not None:
        label = f"best: {best.name} {best.value:.4g}" + " (finalist)" * (best.trial.number in finalists)
        ax.scatter([at[best.trial.number]], [best.value], marker="*", s=400, color="gold", edgecolors="black",
                   label=label, zorder=5)
    ax.set_xticks(range(len(own)), [p.name for p in own], rotation=90 if len(own) > 8 else 0)
    ax.set(xlabel="trial", ylabel=metric)
    ax.set_title(f"{metric} by trial ({_counts(points)})")  # (in place of Optuna's)
    _legend_below(ax, ncols=2)
    return ax.figure  # type: ignore[return-value]


def _parallel(study: optuna.Study, points: list[_Point], metric: str, best: _Point | None) -> Figure:
    view = _view(study, points, stopped_complete=True)
    ax = optuna_plots.plot_parallel_coordinate(view, target_name=metric)
    params = sorted({name for p in points for name in p.trial.params})  # Optuna's axis order
    # A name on two lines ("train." above the key): five axes side by side in a preview's width.
    ax.set_xticks(range(len(params) + 1), [metric, *(name.replace(".", ".\n", 1) for name in params)])
    ax.set_title(f"{metric} and the searched parameters ({_counts(points)})")  # (in place of Optuna's)
    ax.figure.set_size_inches(min(9.0, max(7.0, 1.9 * (len(params) + 1))), 6)
    # One LineCollection, a segment per trial in an order of Optuna's own, coloured by objective; each
    # starts at the trial's value on the objective axis, which tells whose it is. The trials with a
    # colour of their own (_styled) are drawn again as lines with a label, the rest stay in it, grey
    # (two trials of one value may swap lines: the objective axis cannot tell them apart either).
    lines = ax.collections[0]
    if lines.colorbar is not None:  # (the colours are the trials' now, not a scale)
        lines.colorbar.remove()  # (which gives ax its place back, not the parameters' twin axes)
        for other in ax.figure.axes:
            other.set_subplotspec(ax.get_subplotspec())
    styled = _styled(study, points, best)
    rest = list(lines.get_segments())
    for p, style in styled:
        mine = next((i for i, segment in enumerate(rest) if segment[0, 1] == p.value), None)
        if style.label is not None and mine is not None:
            ax.plot(*rest.pop(mine).T, color=style.colour, linewidth=style.width, zorder=style.zorder,
                    linestyle="--" if p.stopped_early else "-", label=style.label)
    if rest:
        stopped = {p.value for p in points if p.stopped_early}
        lines.set_array(None)
        lines.set_segments(rest)
        lines.set_color(_GREY)
        lines.set_linewidth(1.2)
        lines.set_linestyles(["--" if segment[0, 1] in stopped else "-" for segment in rest])
        lines.set_label(_grey_label(styled))
    else:
        lines.remove()
    _legend_below(ax, ncols=3)
    return ax.figure  # type: ignore[return-value]


def _importances(study: optuna.Study, points: list[_Point], metric: str, best: _Point | None) -> Figure:
    completed = len(points) - sum(p.stopped_early for p in points)
    title = f"Parameter importance for {metric}"
    if completed < MIN_TRIALS_FOR_IMPORTANCE:
        return _note(title, f"Needs at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials; this study has "
                            f"{completed}.\nTrials stopped early do not count: their values are from "
                            "fewer epochs.")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # the same figure for the same trials
    ax = optuna_plots.plot_param_importances(study, evaluator=evaluator, target_name=metric)
    ax.figure.set_size_inches(8, 4.5)
    ax.set_title(f"{title} ({completed} completed trials)", loc="left")  # (where Optuna put its own)
    _drop_invisible(ax)
    _legend_below(ax, ncols=1)
    return ax.figure  # type: ignore[return-value]


def _curves(study: optuna.Study, points: list[_Point], metric: str, best: _Point | None) -> Figure:
    drawn = [(p, style) for p, style in _styled(study, points, best) if p.trial.intermediate_values]
    # The x axis is the record's unit, the evaluation index (tune.study.evaluation_index): the epoch when
    # there is one evaluation per epoch, as in every study made before evaluations inside an epoch.
    per_epoch = evals_per_epoch(study)
    unit = "epoch" if per_epoch == 1 else "evaluation"
    xlabel = unit if per_epoch == 1 else f"evaluation ({per_epoch} per epoch: {per_epoch} = 1 epoch)"
    ax = Figure(figsize=(8, 5.5)).add_subplot(xlabel=xlabel, ylabel=metric)
    ax.set_title(f"{metric} per {unit}, best first in the legend ({_counts([p for p, _ in drawn])})", loc="left")
    grey: str | None = _grey_label(drawn)
    # The named trials first, then the grey rest: the legend's order, its last entry the grey lines'.
    for p, style in sorted(drawn, key=lambda pair: pair[1].label is None):
        epochs, values = zip(*sorted(p.trial.intermediate_values.items()))
        label, grey = (style.label, grey) if style.label is not None else (grey, None)
        ax.plot(epochs, values, marker="o", markersize=5 if len(epochs) > 1 else 8,  # (a lone point: seen)
                linestyle="--" if p.stopped_early else "-", color=style.colour, linewidth=style.width,
                zorder=style.zorder, label=label)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)  # whole evaluations
    _legend_below(ax, ncols=2)
    return ax.figure  # type: ignore[return-value]


def _legible(fig: Figure) -> None:
    """Every text of ``fig`` at least _FONT_PT (Optuna's style sheet sets 10 pt)."""
    for ax in fig.axes:
        ax.tick_params(which="both", labelsize=_FONT_PT)  # (ticks made at draw time take this too)
    for text in fig.findobj(Text):
        if text.get_text():
            text.set_fontsize(max(text.get_fontsize(), _FONT_PT))


_DRAW = {"optimization_history": _history, "parallel_coordinates": _parallel,
         "param_importances": _importances, "curves": _curves}


def study_figures(study: optuna.Study, metric: str, best_trial: int | None = None) -> dict[str, Figure]:
    """The study's figures by the names of :data:`PLOT_FILES`: ``metric`` names the objective (the trials'
    values and intermediate values), ``best_trial`` is the trial number to highlight (default: the best
    completed trial). Close them with ``matplotlib.pyplot.close`` (Optuna's are pyplot figures)."""
    points = _points(study)
    best = next((p for p in points if (p.trial.number == best_trial if best_trial is not None
                                       else not p.stopped_early)), None)
    figures = {}
    for name, draw in _DRAW.items():
        try:
            with warnings.catch_warnings(), plt.style.context("default"):
                # Optuna flags its matplotlib plots experimental on every call, and matplotlib warns
                # about the flat axes of a single trial; neither tells the user anything.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                figures[name] = draw(study, points, metric, best) if points else _note(
                    name.replace("_", " "), f"No trial has a {metric} yet ({len(study.trials)} trials in the study).")
        except Exception as exc:  # noqa: BLE001 - a plot is never worth failing the study for
            logger.warning("the %s plot failed: %s", name.replace("_", " "), exc)
            figures[name] = _note(name.replace("_", " "), f"Could not draw this plot:\n{exc}")
        _legible(figures[name])
    return figures


def plot_study(study: optuna.Study, out_dir: Path, *, metric: str,
               best_trial: int | None = None) -> dict[str, Path]:
    """Write :func:`study_figures` into ``out_dir``; returns ``{name: path}``, one per :data:`PLOT_FILES`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, fig in study_figures(study, metric, best_trial).items():
        fig.savefig(out_dir / PLOT_FILES[name], dpi=PLOT_DPI, bbox_inches="tight")
        plt.close(fig)
    return {name: out_dir / file for name, file in PLOT_FILES.items()}
