"""tune.progress: the live status line counts trials as the study record sees them."""

from __future__ import annotations

import io
from types import SimpleNamespace

from tune.progress import ProgressLine


def _trial(tid: str, status: str, epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, status=status, last_result={"epoch": epoch}, config={"study_trial": 1},
                           path="/runs/run-1/t001", get_error=lambda: RuntimeError("ValueError: boom"))


def test_interrupted_trials_are_not_counted_as_stopped_early() -> None:
    statuses = {"a": "completed", "b": "stopped_early", "c": "interrupted", "d": "failed", "e": "diverged"}
    line = ProgressLine("val_loss", "min", planned_epochs=3, num_samples=7, statuses=lambda: statuses)
    trials = [_trial("a", "TERMINATED", 3), _trial("b", "TERMINATED", 1), _trial("c", "TERMINATED", 1),
              _trial("d", "ERROR", 1), _trial("e", "TERMINATED", 2), _trial("f", "RUNNING", 1),
              _trial("g", "PENDING")]
    text = line._line(trials)
    assert "trials 7/7: done 1, running 1, stopped early 1, failed 2, interrupted 1, pending 1 |" in text


def test_a_failed_trial_is_one_line_with_its_reason(monkeypatch) -> None:
    out = io.StringIO()
    line = ProgressLine("val_loss", "min", planned_epochs=3, num_samples=1)
    monkeypatch.setattr(ProgressLine, "_stream", property(lambda self: out))
    line.on_trial_error(0, [], _trial("a", "ERROR"))
    first = out.getvalue().splitlines()[0]
    assert first == "trial t001 failed: ValueError: boom (traceback: /runs/run-1/t001/error.txt)"
