"""Study plots as PNG files, drawn with matplotlib's Agg renderer: no browser, no display.

``plot_study`` always writes the same four files, so the artifact list of every study looks alike;
when there is too little data for a plot (no completed trial, a single trial for importances), the
file is a figure that says so instead of an exception. Called by ``tune/run.py`` after the study::

    paths = plot_study(optuna_study, curves, study_dir / "plots", best_trial=best_name)
    # curves: {trial_name: [(epoch, val_loss), ...]} from the trial results
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

__all__ = ["PLOT_FILES", "plot_study", "plot_val_loss_curves"]

logger = logging.getLogger(__name__)

# name -> file written by plot_study
PLOT_FILES: dict[str, str] = {
    "optimization_history": "optimization_history.png",
    "param_importances": "param_importances.png",
    "parallel_coordinates": "parallel_coordinates.png",
    "val_loss_curves": "val_loss_curves.png",
}

_DPI = 110
# More lines than this make a legend unreadable; the best trial is still labelled.
_MAX_LEGEND_ENTRIES = 12


def _headless() -> None:
    # Optuna's matplotlib plots go through pyplot, which would pick a GUI backend on a desktop.
    # Only decide when nobody did: a notebook that already imported pyplot keeps its backend.
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")


def _message_figure(title: str, message: str) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=11, transform=ax.transAxes)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    if fig.canvas.manager is not None:
        # Created through pyplot (optuna): pyplot keeps it alive until closed.
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def _completed(study: optuna.Study | None) -> list[optuna.trial.FrozenTrial]:
    if study is None:
        return []
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _count_summary(study: optuna.Study | None) -> str:
    if study is None:
        return "no Optuna study"
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    if not counts:
        return "no trials"
    return ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))


def _optuna_figure(title: str, draw: Callable[[], object]) -> Figure:
    """Run one of optuna's matplotlib plots; a failure becomes a figure naming the reason."""
    import optuna

    try:
        with warnings.catch_warnings():
            # Optuna flags its matplotlib backend as experimental on every call, and matplotlib
            # warns about the flat axes of a single trial; neither tells the user anything.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            ax = draw()
    except Exception as exc:  # noqa: BLE001 - a plot is never worth failing the study for
        logger.warning("%s plot failed: %s", title, exc)
        return _message_figure(title, f"could not draw this plot:\n{exc}")
    return ax.figure  # type: ignore[attr-defined,no-any-return]


def _history(study: optuna.Study | None) -> Figure:
    title = "Optimization history"
    if not _completed(study):
        return _message_figure(title, f"No completed trials yet ({_count_summary(study)}).")
    assert study is not None
    if len(study.directions) > 1:
        return _message_figure(title, "Multi-objective studies are not plotted.")
    from optuna.visualization.matplotlib import plot_optimization_history

    return _optuna_figure(title, lambda: plot_optimization_history(study))


def _importances(study: optuna.Study | None) -> Figure:
    title = "Hyperparameter importances"
    completed = _completed(study)
    if len(completed) < 2:
        return _message_figure(
            title,
            f"Needs at least 2 completed trials; this study has {len(completed)} "
            f"({_count_summary(study)}).",
        )
    assert study is not None
    if len(study.directions) > 1:
        return _message_figure(title, "Multi-objective studies are not plotted.")
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            importances = optuna.importance.get_param_importances(study)
    except Exception as exc:  # noqa: BLE001 - evaluators raise assorted errors on degenerate data
        # e.g. every completed trial used the same values: nothing to attribute the spread to.
        logger.info("parameter importances unavailable: %s", exc)
        return _message_figure(title, f"Not computable for these trials:\n{exc}")
    if not importances:
        return _message_figure(title, "No searched parameter varied across the completed trials.")
    from matplotlib.figure import Figure

    names = list(importances)[::-1]
    values = [importances[name] for name in names]
    fig = Figure(figsize=(7, 0.6 + 0.45 * len(names)))
    ax = fig.add_subplot()
    bars = ax.barh(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{value:.2f}" for value in values], padding=3)
    ax.set_xlim(0, max(1.0, max(values) * 1.15))
    ax.set_xlabel("importance (share of the objective's variation)")
    ax.set_title(f"{title} ({len(completed)} completed trials)")
    return fig


def _parallel(study: optuna.Study | None) -> Figure:
    title = "Parallel coordinates"
    if not _completed(study):
        return _message_figure(title, f"No completed trials yet ({_count_summary(study)}).")
    assert study is not None
    if len(study.directions) > 1:
        return _message_figure(title, "Multi-objective studies are not plotted.")
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    return _optuna_figure(title, lambda: plot_parallel_coordinate(study))


def plot_val_loss_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    best_trial: str | None = None,
    metric_name: str = "val_loss",
) -> Figure:
    """One line per trial, epoch on x; non-finite points (diverged trials) are left out."""
    from matplotlib.figure import Figure

    title = f"{metric_name} per epoch"
    lines = {
        name: sorted((int(epoch), float(value)) for epoch, value in points if math.isfinite(float(value)))
        for name, points in curves.items()
    }
    lines = {name: points for name, points in lines.items() if points}
    if not lines:
        return _message_figure(title, f"No trial has reported {metric_name} yet.")
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    legend = len(lines) <= _MAX_LEGEND_ENTRIES
    for name, points in sorted(lines.items()):
        epochs, values = zip(*points)
        is_best = name == best_trial
        ax.plot(
            epochs, values, marker="o", markersize=3,
            linewidth=2.5 if is_best else 1.0,
            alpha=1.0 if is_best or best_trial is None else 0.55,
            color="black" if is_best else None,
            label=f"{name} (best)" if is_best else (name if legend else None),
            zorder=3 if is_best else 2,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric_name)
    ax.set_title(f"{title} ({len(lines)} trials)")
    ax.grid(True, alpha=0.3)
    # Epochs are whole numbers; matplotlib would otherwise tick 1.5, 2.5 for short studies.
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return fig


def plot_study(
    study: optuna.Study | None,
    curves: Mapping[str, Sequence[tuple[int, float]]],
    out_dir: Path,
    *,
    best_trial: str | None = None,
    metric_name: str = "val_loss",
) -> dict[str, Path]:
    """Write the study's PNG plots into ``out_dir``; returns ``{name: path}`` for all of PLOT_FILES."""
    _headless()
    out_dir = Path(out_dir)
    figures: dict[str, Callable[[], Figure]] = {
        "optimization_history": lambda: _history(study),
        "param_importances": lambda: _importances(study),
        "parallel_coordinates": lambda: _parallel(study),
        "val_loss_curves": lambda: plot_val_loss_curves(curves, best_trial, metric_name),
    }
    paths: dict[str, Path] = {}
    for name, make in figures.items():
        paths[name] = _save(make(), out_dir / PLOT_FILES[name])
    return paths
