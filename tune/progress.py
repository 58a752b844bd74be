"""The driver's live view of a study (rich on a terminal, one line per event elsewhere), with each
trial's step as its ``step.json`` tells it (:func:`tune.storage.step_writer`)."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from .forecast import EtaPrior, duration
from .mirror import run_name
from .objective import Objective
from .searcher import DIVERGED_REASON_KEY, error_text, failure_reason
from .status import TrialStatus
from .storage import STEP_FILE
from .study import TrialRecord, evaluation_name, no_better_reason

__all__ = ["RAY_ERRORS_FILE", "ProgressView", "best_recorded", "blended_eta_s", "count_trials", "eta_s",
           "ray_errors_to", "read_step"]

RAY_ERRORS_FILE = "ray_errors.log"  # in the study folder: what Ray's driver printed about lost workers
# Ray's driver prints the cluster's error messages (a lost worker: "(raylet) A worker died ...", ~7 lines)
# from a thread of this name straight to sys.stdout: there is no logger for them and no ray.init switch
# (log_to_driver covers only the workers' own output). The name is the one Ray detail relied on here;
# tests/test_faults.py fails if those lines reach the terminal again.
_RAY_ERROR_THREAD = "ray_listen_error_messages"
# The counts' labels: the record's status as people read it (a completed trial is "done"), else Ray's.
_DONE, _S = "done", TrialStatus
_SHOWN = (_DONE, _S.RUNNING.label, _S.STOPPED_EARLY.label, _S.FAILED.label, _S.DIVERGED.label)  # others when non-zero
_FINAL = {s: _DONE if s is _S.COMPLETED else s.label
          for s in (_S.COMPLETED, _S.STOPPED_EARLY, _S.FAILED, _S.DIVERGED, _S.NO_BETTER)}
_RAY = {"PENDING": "pending", "PAUSED": "pending", "RUNNING": _S.RUNNING.label, "ERROR": _S.FAILED.label}


def read_step(trial_dir: str | Path) -> tuple[int, int, int] | None:
    """``(epoch in progress (1-based), step, steps_per_epoch)`` from a trial's :data:`STEP_FILE`;
    None when it is missing or unreadable."""
    try:
        d = json.loads((Path(trial_dir) / STEP_FILE).read_text(encoding="utf-8"))
        return int(d["epoch"]), int(d["step"]), max(1, int(d["steps_per_epoch"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def count_trials(trials: list[Any], recorded: Mapping[str, str]) -> dict[str, int]:
    """Trials by state. How a trial ended is the study record's word (``recorded``: Ray trial id ->
    tune.study status; it is set before Ray's own status, and tells an interrupted trial from a
    stopped one); otherwise Ray's status says pending or running."""
    count = dict.fromkeys(_SHOWN, 0)
    for t in trials:
        status = recorded.get(t.trial_id)
        key = _FINAL.get(status or "") or _RAY.get(t.status) or (_S.INTERRUPTED.label if status else _DONE)
        count[key] = count.get(key, 0) + 1
    return count


def best_recorded(trials: Iterable[TrialRecord], objective: Objective) -> tuple[float, str] | None:
    """``(value, "t003")``: the best finite objective any epoch of the record's ``trials``
    (:class:`tune.study.TrialRecord`) reported, leaving out values no better than their
    trial's model before training (:func:`tune.study.no_better_reason`); None before any."""
    values = [(v, f"t{t.number:03d}") for t in trials for _, v in t.curve(objective.metric)
              if math.isfinite(v) and not no_better_reason(v, objective, t.first_metrics)]
    return objective.best_of(values, lambda item: item[0])


def eta_s(done: float, done_at_start: float, planned: float, elapsed_s: float) -> float | None:
    """Seconds left at this run's rate: ``(planned - done) * elapsed_s / (done - done_at_start)``, in
    trial-epochs (those done by earlier runs do not count for the rate); None before any progress."""
    if done - done_at_start <= 0 or elapsed_s <= 0:
        return None
    return max(0.0, planned - done) * elapsed_s / (done - done_at_start)


def blended_eta_s(remaining: float, done: float, elapsed_s: float, prior: EtaPrior, weight: float) -> float:
    """Seconds left from a forecast corrected by this run's measured rate (``prior``: a
    :class:`tune.forecast.EtaPrior`; ``remaining``/``done``: trial-epochs of the phase, ``done`` trained in
    this run in ``elapsed_s`` since its first trial started).

    The forecast counts as ``weight`` trial-epochs of observation at its rate ``r_f``, so the rate is
    ``(weight x r_f + (elapsed_s - start_s)) / (weight + done)``: the forecast's at the start, the measured
    one once ``done`` outweighs ``weight``. The phase's worker start (``prior.start_s``) is not a rate: it is
    left out of the elapsed time, and what is left of it is added. What follows the phase (``after_s``:
    finalists, end report) scales by the same correction ``rate / r_f``."""
    training_s = max(0.0, elapsed_s - prior.start_s)
    rate = (weight * prior.s_per_trial_epoch + training_s) / (weight + max(0.0, done))
    correction = rate / prior.s_per_trial_epoch if prior.s_per_trial_epoch > 0 else 1.0
    return (max(0.0, remaining) * rate + prior.after_s * correction
            + max(0.0, prior.start_s - elapsed_s))


class _RayErrorsToFile:
    """A stand-in for ``sys.stdout`` that appends what Ray's error thread writes to ``path`` (when it can:
    the study's one line per failed trial already says what happened) and passes the rest through."""

    def __init__(self, terminal: TextIO, path: Path) -> None:
        self.terminal, self.path = terminal, path

    def write(self, text: str) -> int:
        if threading.current_thread().name != _RAY_ERROR_THREAD:
            return self.terminal.write(text)
        with contextlib.suppress(OSError), self.path.open("a", encoding="utf-8") as log:
            log.write(re.sub(r"\x1b\[[0-9;]*m", "", text))  # (without the terminal's colour codes)
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding: the terminal's
        return getattr(self.terminal, name)


def ray_errors_to(path: Path) -> contextlib.redirect_stdout[Any]:
    """While active, Ray's driver-side error messages go to ``path`` instead of the terminal (appended;
    nothing is written while ``path``'s folder does not exist)."""
    return contextlib.redirect_stdout(_RayErrorsToFile(sys.stdout, path))  # type: ignore[type-var]


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else duration(seconds)


class ProgressView(Callback):
    """Progress in trial-epochs (done / planned, ETA), each running trial's epoch and step, counts and the best
    value so far: on a terminal a rich Live view redrawn twice a second under a line per ended trial; elsewhere
    (CI, ``ray job submit`` logs, pipes) one line per evaluation and per ended trial.

    ``planned_epochs`` per trial, ``num_samples`` trials in this run; ``statuses()``: Ray trial id -> record
    status; ``local``: the trial folders are on this machine (steps shown); ``best``: ``(value, "t003")`` from
    earlier runs; ``ray_errors``: :func:`ray_errors_to` while the terminal view runs; ``prior``: this phase's
    forecast, which the ETA starts from (:func:`blended_eta_s`), else this run's rate alone (:func:`eta_s`)."""

    def __init__(self, objective: Objective, planned_epochs: int, num_samples: int,
                 statuses: Callable[[], Mapping[str, str]] | None = None, local: bool = True,
                 stream: TextIO | None = None, ray_errors: Path | None = None,
                 best: tuple[float, str] | None = None, prior: EtaPrior | None = None,
                 evals_per_epoch: int = 1) -> None:
        self.metric, self.objective, self.statuses, self.local = objective.metric, objective, statuses, local
        self.prior, self.per_epoch = prior, max(1, evals_per_epoch)
        self.planned_epochs, self.num_samples = planned_epochs, num_samples
        self._stream = stream  # None: sys.stdout at each use (ours stands in for it during a run)
        self._start, self._first = time.monotonic(), None  # _first: the first trial's start (for the ETA)
        self._best, self._best_trial = best or (self.objective.worst, "")
        self._trials: list[Any] = []
        self._recorded: Mapping[str, str] = {}
        self._labels: dict[str, str] = {}  # Ray trial id -> "t003 lr=2.3e-3 acc=1"
        self._reported: dict[str, int] = {}  # Ray trial id -> its last evaluation (Ray's last_result lags)
        self._restored: dict[str, float] = {}  # Ray trial id -> epochs it had done before this run
        self._first_epoch: dict[str, Mapping[str, Any]] = {}  # Ray trial id -> its epoch-1 report (its baseline)
        self._live: Any = None
        self._ray_errors = ray_errors
        self._live_stdout: TextIO | None = None  # what Live put in sys.stdout (restored before Live stops)

    def setup(self, **info: Any) -> None:
        self._start = time.monotonic()  # this process's clock (a --resume is another process)
        if (self._stream or sys.stdout).isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self._stream or sys.stdout), get_renderable=self.render,
                              refresh_per_second=2, transient=True)
            self._live.start()
            if self._ray_errors is not None:  # Live put its own stand-in in sys.stdout: divert before it
                self._live_stdout, sys.stdout = sys.stdout, _RayErrorsToFile(sys.stdout, self._ray_errors)

    def close(self) -> None:
        """Stop the terminal view (idempotent; the driver calls it however the run ends)."""
        if self._live_stdout is not None:
            sys.stdout, self._live_stdout = self._live_stdout, None
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _label(self, trial: Any, short: bool = False) -> str:
        if trial.trial_id not in self._labels:
            params, number = dict(trial.config.get("params") or {}), trial.config.get("study_trial")
            self._labels[trial.trial_id] = (run_name(TrialRecord(number, "", params, {}), list(params))
                                            if isinstance(number, int) else trial.trial_id)
        return self._labels[trial.trial_id].split(" ")[0] if short else self._labels[trial.trial_id]

    def _evaluation(self, result: Mapping[str, Any]) -> int:
        """A report's evaluation index (tune.study.evaluation_index; a diverged trial's has only its epoch)."""
        return int(result.get("evaluation", int(result.get("epoch", 0)) * self.per_epoch))

    def _epoch(self, trial: Any) -> float:
        """The epochs a trial's reports cover (an evaluation inside an epoch counts as its fraction)."""
        return max(self._reported.get(trial.trial_id, 0), self._evaluation(trial.last_result or {})) / self.per_epoch

    def _step(self, trial: Any) -> tuple[int, int, int] | None:
        """A running trial's :func:`read_step` when its folder is local and the step is past its last report."""
        step = read_step(trial.path) if self.local and trial.path and trial.status == "RUNNING" else None
        return step if step and step[0] - 1 + step[1] / step[2] > self._epoch(trial) else None

    def _done(self, trial: Any) -> float:
        """Trial-epochs a trial trained: its reports', or its step's when that is further."""
        step = self._step(trial)
        return step[0] - 1 + step[1] / step[2] if step else self._epoch(trial)

    def progress(self) -> tuple[float, float, float | None]:
        """``(done, planned, eta_s)`` in trial-epochs: a running trial adds its steps as a fraction of an
        epoch, an ended one plans what it did, a trial not yet started all ``planned_epochs``."""
        done = planned = 0.0
        for t in self._trials:
            done += self._done(t)
            planned += self._epoch(t) if t.status in ("TERMINATED", "ERROR") else self.planned_epochs
        planned += max(0, self.num_samples - len(self._trials)) * self.planned_epochs
        elapsed = time.monotonic() - (self._first or time.monotonic())
        if self.prior is None:
            return done, planned, eta_s(done, sum(self._restored.values()), planned, elapsed)
        return done, planned, blended_eta_s(self._expected_remaining(), done - sum(self._restored.values()),
                                            elapsed, self.prior, weight=2.0 * self.slots)

    @property
    def slots(self) -> int:
        """Trials that run at once in this phase (what the forecast's weight is counted in)."""
        return max(1, min(self.num_samples, self.prior.slots if self.prior is not None else 1))

    def _expected_remaining(self) -> float:
        """Trial-epochs still to train, expected under the plan: a trial not yet started the prior's
        ``expected_epochs``, a running one the rest of that (at least up to its next evaluation), an ended one
        none."""
        assert self.prior is not None
        expected, left = self.prior.expected_epochs, 0.0
        for t in self._trials:
            if t.status in ("TERMINATED", "ERROR"):
                continue
            d, n = self._done(t), self.per_epoch
            left += max(expected - d, min(math.floor(d * n) + 1, self.planned_epochs * n) / n - d, 0.0)
        return left + max(0, self.num_samples - len(self._trials)) * expected

    def status(self) -> str:
        """``done 1, running 2, stopped early 0, failed 0, diverged 0 | best val_loss 7.4992 (t001)``."""
        count = count_trials(self._trials, self._recorded)
        best = f"{self.metric} {self._best:.4f} ({self._best_trial})" if self._best_trial else "-"
        return ", ".join(f"{k} {v}" for k, v in count.items() if v or k in _SHOWN) + f" | best {best}"

    def render(self) -> Any:
        """The terminal view, rebuilt from the trials' current state at each redraw."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        done, planned, eta = self.progress()
        bar, running = Table.grid(padding=(0, 2)), Table.grid(padding=(0, 2))
        elapsed = _duration(time.monotonic() - self._start)
        bar.add_row(ProgressBar(total=max(planned, 1), completed=done, width=40),
                    f"{done:.1f}/{planned:g} trial-epochs  {elapsed} elapsed  ETA {_duration(eta)}")
        for t in [t for t in self._trials if t.status == "RUNNING"]:
            step = self._step(t)
            epoch = step[0] if step else min(math.floor(self._epoch(t)) + 1, self.planned_epochs)
            running.add_row(f"  {self._label(t)}", f"epoch {epoch}/{self.planned_epochs}"
                            + (f"  step {step[1]}/{step[2]}" if step else ""))
        # The counts on a line of their own: under the bar's column they wrapped on a narrow terminal.
        return Group(bar, Text(f"trials {len(self._trials)}/{self.num_samples}: {self.status()}"), running)

    def _event(self, text: str, counts: bool = True) -> None:
        """A line that stays: above the terminal view, or with the time (and counts) without one."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
            return
        status = f" | {self.status()}" if counts else ""
        print(f"[{time.monotonic() - self._start:6.0f}s] {text}{status}", file=self._stream or sys.stdout, flush=True)

    def _refresh(self, trials: list[Any]) -> None:
        self._trials = trials
        self._recorded = self.statuses() if self.statuses is not None else {}

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._trials = trials

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._refresh(trials)
        self._first = self._first or time.monotonic()  # the ETA's rate leaves Ray's start-up out
        if self._live is None and trial.trial_id not in self._labels:  # (not again when Ray retries it)
            self._event(f"{self._label(trial)} started", counts=False)  # (Ray says RUNNING after this)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict,
                        **info: Any) -> None:
        self._refresh(trials)
        index, value = self._evaluation(result), result.get(self.metric)
        self._reported[trial.trial_id] = index
        # A run's first report of a continued trial is its checkpoint's evaluation again (not trained now;
        # a repeat after Ray retried it in this run was).
        self._restored.setdefault(trial.trial_id, index / self.per_epoch if result.get("restored") else 0)
        if index == 1:
            self._first_epoch[trial.trial_id] = result
        if result.get("restored"):
            return
        # A value no better than the trial's untrained model is never "best so far" (it is no answer).
        if isinstance(value, (int, float)) and math.isfinite(value) and (
                self.objective.better(value, self._best)) and not no_better_reason(
                    value, self.objective, self._first_epoch.get(trial.trial_id, {})):
            self._best, self._best_trial = float(value), self._label(trial, short=True)
        # Plain lines only; a trial's last evaluation is in its end line, next.
        last = self.planned_epochs * self.per_epoch
        ended = index >= last or self._recorded.get(trial.trial_id) in _FINAL
        if self._live is None and not ended:
            done, planned, eta = self.progress()
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            where = f"epoch {index}/{last}" if self.per_epoch == 1 else f"evaluation {index}/{last}"
            self._event(f"{self._label(trial, short=True)} {where} {self.metric} "
                        f"{shown}; {done:.1f}/{planned:g} trial-epochs, ETA {_duration(eta)}")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._refresh(trials)
        status, last = self._recorded.get(trial.trial_id, TrialStatus.COMPLETED), trial.last_result or {}
        value = last.get(self.metric)
        why = (f": {last.get(DIVERGED_REASON_KEY, '')}" if status == TrialStatus.DIVERGED else
               f" ({self.metric} {value:.4f})" if isinstance(value, (int, float)) else "")
        at = evaluation_name(max(self._reported.get(trial.trial_id, 0), self._evaluation(last)), self.per_epoch)
        self._event(f"{self._label(trial)} {status.replace('_', ' ')} at {at}{why}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._refresh(trials)
        self.on_trial_recover(iteration, trials, trial, what=TrialStatus.FAILED.label)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any,
                         what: str = "crashed; Ray retries it from its last checkpoint", **info: Any) -> None:
        """One line for a trial's failure: its reason and where the full traceback is."""
        reason = failure_reason(error_text(trial)) or "no error text"
        reason = reason if len(reason) <= 200 else reason[:199] + "…"  # (all of it is in the file)
        self._event(f"{self._label(trial)} {what}: {reason} (traceback: {trial.path}/error.txt)")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._refresh(trials)
        self.close()
        done, planned, _ = self.progress()
        took = _duration(time.monotonic() - self._start)
        self._event(f"run ended: {done:g}/{planned:g} trial-epochs in {took}")
