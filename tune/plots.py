"""Study plots as PNG files that answer "which config?" at a glance (matplotlib Agg: no display).

Optuna draws what it can (``optuna.visualization.matplotlib``, the objective as ``target_name``) on a
copy of the study in which a trial stopped early by ASHA (Optuna ``PRUNED``) counts with its last
value, marked as such; the per-epoch curves, best trial highlighted, are drawn here. ``plot_study``
always writes :data:`PLOT_FILES`; a plot without enough data is a figure that says why.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import matplotlib

if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")  # Optuna's plots go through pyplot: no GUI window; a notebook keeps its backend
import matplotlib.pyplot as plt
import optuna
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as optuna_plots

from .record import ranked
from .storage import trial_dirname

__all__ = ["MIN_TRIALS_FOR_IMPORTANCE", "PLOT_FILES", "plot_study", "study_figures"]

logger = logging.getLogger(__name__)

PLOT_FILES: dict[str, str] = {
    "optimization_history": "optimization_history.png", "parallel_coordinates": "parallel_coordinates.png",
    "param_importances": "param_importances.png", "curves": "objective_curves.png",
}
# fANOVA's forest on fewer completed trials ranks parameters by noise.
MIN_TRIALS_FOR_IMPORTANCE = 5
# tab10 without its grey: the best trial is black, the next ones these, the rest grey with one legend entry.
_COLOURS = [f"C{i}" for i in (1, 2, 3, 4, 5, 6, 8, 9, 0)]
# Optuna's parallel coordinates use Blues, whose low end is white on a white background.
_LINE_COLOURS = ListedColormap(plt.get_cmap("Blues")(list(range(90, 256))))


class _Point(NamedTuple):
    """A trial as the plots show it: its value is Optuna's, or the last epoch's for one stopped early."""

    trial: FrozenTrial
    value: float
    stopped_early: bool
    name: str


def _points(study: optuna.Study) -> list[_Point]:
    """Completed and stopped-early search trials with a finite value, best first (:func:`tune.record.ranked`;
    an earlier study's warm-start history, the finalists' extra seeds and trials no better than untrained
    stay out)."""
    points = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        epochs = t.intermediate_values
        value = t.value if t.state == TrialState.COMPLETE else epochs[max(epochs)] if epochs else None
        if "finalist_of" not in t.user_attrs and value is not None:
            points.append(_Point(t, float(value), t.state == TrialState.PRUNED, trial_dirname(t.number)))
    mode = "min" if study.direction == optuna.study.StudyDirection.MINIMIZE else "max"
    return ranked(points, mode, _status, lambda p: p.value)


def _status(point: _Point) -> str:
    """The record's status of a plotted trial (one recorded before statuses: by its Optuna state)."""
    return str(point.trial.user_attrs.get("status", "stopped_early" if point.stopped_early else "completed"))


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
    ax = Figure(figsize=(7, 3)).add_subplot(title=title)
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11, transform=ax.transAxes)
    return ax.figure  # type: ignore[return-value]


def _counts(points: list[_Point]) -> str:
    stopped = sum(p.stopped_early for p in points)
    return f"{len(points) - stopped} completed, {stopped} stopped early"


def _history(study: optuna.Study, points: list[_Point], metric: str, best: _Point | None) -> Figure:
    own = sorted(points, key=lambda p: p.trial.number)  # (the x axis is the trial, named below)
    at = {p.trial.number: i for i, p in enumerate(own)}
    ax = optuna_plots.plot_optimization_history(_view(study, own, stopped_complete=False), target_name=metric)
    if stopped := [p for p in points if p.stopped_early]:
        ax.scatter([at[p.trial.number] for p in stopped], [p.value for p in stopped], marker="x",
                   color="tab:gray", label=f"{metric}, stopped early (last epoch)", zorder=3)
    if best is not None:
        ax.scatter([at[best.trial.number]], [best.value], marker="*", s=300, color="gold", edgecolors="black",
                   label=f"best: {best.name} {best.value:.4g}", zorder=4)
    ax.set_xticks(range(len(own)), [p.name for p in own], rotation=45 if len(own) > 12 else 0, fontsize=8)
    ax.set(xlabel="trial", ylabel=metric, title=f"{metric} by trial ({_counts(points)})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return ax.figure  # type: ignore[return-value]


def _parallel(study: optuna.Study, points: list[_Point], metric: str, best: _Point | None) -> Figure:
    view = _view(study, points, stopped_complete=True)
    ax = optuna_plots.plot_parallel_coordinate(view, target_name=metric)
    params = sorted({name for p in points for name in p.trial.params})  # Optuna's axis order
    ax.set_xticks(range(len(params) + 1), [metric, *params], rotation=12, ha="right")
    ax.set_title(f"{metric} and the searched parameters ({_counts(points)})")
    ax.figure.set_size_inches(max(7.0, 2.4 * (len(params) + 1)), 5)
    # One LineCollection, a segment per trial in an order of Optuna's own; each starts at the
    # trial's value on the objective axis, which tells whose it is.
    lines = ax.collections[0]
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    lines.set_cmap(_LINE_COLOURS.reversed() if minimize else _LINE_COLOURS)  # the best is the darkest
    stopped = {p.value for p in points if p.stopped_early}
    segments = lines.get_segments()
    lines.set_linestyles(["--" if segment[0, 1] in stopped else "-" for segment in segments])
    handles = [Line2D([], [], color="tab:blue", label="completed"),
               Line2D([], [], color="tab:blue", linestyle="--", label="stopped early (last epoch)")]
    if best is not None and (own := [segment for segment in segments if segment[0, 1] == best.value]):
        handles += ax.plot(*own[0].T, color="black", linewidth=3, zorder=5,
                           label=f"best: {best.name} {best.value:.4g}")
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.08), ncol=3, fontsize=8,
              frameon=False)
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
    ax.set_title(f"{title} ({completed} completed trials)", loc="left")  # (where Optuna put its own)
    return ax.figure  # type: ignore[return-value]


def _curves(study: optuna.Study, points: list[_Point], metric: str, best: _Point | None) -> Figure:
    ranked = sorted((p for p in points if p.trial.intermediate_values), key=lambda p: p is not best)
    ax = Figure(figsize=(9, 5)).add_subplot(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch, "
                                            f"best first in the legend ({_counts(ranked)})")
    colours, grey = iter(_COLOURS), 0
    for p in ranked:
        epochs, values = zip(*sorted(p.trial.intermediate_values.items()))
        colour = "black" if p is best else next(colours, "0.75")
        grey += colour == "0.75"
        label = " ".join([p.name, f"{p.value:.4g}"] + ["best"] * (p is best)
                         + ["stopped early"] * p.stopped_early)
        ax.plot(epochs, values, marker="o", markersize=4 if len(epochs) > 1 else 7,  # (a lone point: seen)
                linestyle="--" if p.stopped_early else "-", color=colour, linewidth=3 if p is best else 1.3,
                zorder=3 if p is best else 2, label=None if colour == "0.75" else label)
    if grey:
        ax.plot([], [], color="0.75", label=f"{grey} more trials")
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax.figure  # type: ignore[return-value]


_DRAW = {"optimization_history": _history, "parallel_coordinates": _parallel,
         "param_importances": _importances, "curves": _curves}


def study_figures(study: optuna.Study, metric: str, best_trial: int | None = None) -> dict[str, Figure]:
    """The study's figures by the names of :data:`PLOT_FILES`: ``metric`` names the objective (the trials'
    values and intermediate values), ``best_trial`` is the trial number to highlight (default: the best
    completed trial). Close them with ``matplotlib.pyplot.close`` (Optuna's are pyplot figures)."""
    points = _points(study)
    if not points:
        why = f"No trial has a {metric} yet ({len(study.trials)} trials in the study)."
        return {name: _note(name.replace("_", " "), why) for name in PLOT_FILES}
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
                figures[name] = draw(study, points, metric, best)
        except Exception as exc:  # noqa: BLE001 - a plot is never worth failing the study for
            logger.warning("the %s plot failed: %s", name.replace("_", " "), exc)
            figures[name] = _note(name.replace("_", " "), f"Could not draw this plot:\n{exc}")
    return figures


def plot_study(study: optuna.Study, out_dir: Path, *, metric: str,
               best_trial: int | None = None) -> dict[str, Path]:
    """Write :func:`study_figures` into ``out_dir``; returns ``{name: path}``, one per :data:`PLOT_FILES`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, fig in study_figures(study, metric, best_trial).items():
        fig.savefig(out_dir / PLOT_FILES[name], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return {name: out_dir / file for name, file in PLOT_FILES.items()}
