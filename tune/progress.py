"""A compact live view of a study: one status line instead of Ray's wide tables."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from ray.tune import Callback

__all__ = ["ProgressLine"]


class ProgressLine(Callback):
    """Prints ``done / running / stopped early / failed, best so far, elapsed`` when anything changes.

    On a terminal the line is redrawn in place; otherwise (CI, ``ray job submit`` logs) a new line is
    printed at most every ``min_interval_s`` seconds and on every trial end.
    """

    def __init__(self, metric: str, mode: str, planned_epochs: int, num_samples: int,
                 min_interval_s: float = 5.0, statuses: Callable[[], Mapping[str, str]] | None = None) -> None:
        """``statuses()`` maps Ray trial ids to their study-record status (tune.record)."""
        self.statuses = statuses
        self.metric = metric
        self.mode = mode
        self.planned_epochs = planned_epochs
        self.num_samples = num_samples
        self.min_interval_s = min_interval_s
        self._start = time.monotonic()
        self._last_print = 0.0
        self._best = math.inf if mode == "min" else -math.inf
        self._best_trial = ""

    def setup(self, **info: Any) -> None:
        # Also runs on --resume, in a new process whose monotonic clock has another origin.
        self._start = time.monotonic()

    @property
    def _stream(self) -> TextIO:
        return sys.stdout

    def _better(self, value: float) -> bool:
        return value < self._best if self.mode == "min" else value > self._best

    def _line(self, trials: list[Any]) -> str:
        # How a trial ended is the study record's word (an interrupted trial is not stopped early).
        statuses = self.statuses() if self.statuses is not None else {}
        count = {"done": 0, "running": 0, "stopped early": 0, "failed": 0, "interrupted": 0, "pending": 0}
        for t in trials:
            recorded = statuses.get(t.trial_id)
            if t.status == "PENDING":
                count["pending"] += 1
            elif t.status == "RUNNING":
                count["running"] += 1
            elif recorded == "completed":
                count["done"] += 1
            elif recorded == "stopped_early":
                count["stopped early"] += 1
            elif recorded in ("failed", "diverged") or t.status == "ERROR":
                count["failed"] += 1
            else:
                count["interrupted" if recorded else "done"] += 1
        elapsed = time.monotonic() - self._start
        best = f"{self.metric} {self._best:.4f} ({self._best_trial})" if self._best_trial else "-"
        shown = ", ".join(f"{k} {v}" for k, v in count.items() if v or k in ("done", "running", "stopped early",
                                                                             "failed"))
        return f"[{elapsed:6.0f}s] trials {len(trials)}/{self.num_samples}: {shown} | best {best}"

    def _show(self, trials: list[Any], force: bool = False) -> None:
        now = time.monotonic()
        tty = self._stream.isatty()
        if not force and not tty and now - self._last_print < self.min_interval_s:
            return
        self._last_print = now
        line = self._line(trials)
        if tty:
            self._stream.write("\r\x1b[2K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict,
                        **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and self._better(value):
            number = trial.config.get("study_trial")
            self._best = float(value)
            self._best_trial = f"t{number:03d}" if isinstance(number, int) else trial.trial_id
        self._show(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._event(trial, "failed")
        self._show(trials, force=True)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._event(trial, "crashed; Ray retries it from its last checkpoint")

    def _event(self, trial: Any, what: str) -> None:
        """One line for a trial's failure: its reason and where the full traceback is."""
        from .searcher import failure_reason

        try:
            reason = failure_reason(str(trial.get_error() or "")) or "no error text"
        except Exception:  # noqa: BLE001 - an unreadable error file must not end the study
            reason = "no error text"
        number = trial.config.get("study_trial")
        name = f"t{number:03d}" if isinstance(number, int) else trial.trial_id
        if self._stream.isatty():
            self._stream.write("\r\x1b[2K")
        self._stream.write(f"trial {name} {what}: {reason} (traceback: {trial.path}/error.txt)\n")
        self._stream.flush()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._show(trials, force=True)
        if self._stream.isatty():
            self._stream.write("\n")
