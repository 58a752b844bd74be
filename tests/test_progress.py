"""tune.progress: the live view's counts, trial-epoch progress and ETA, the per-step file a trial
writes, and the plain one-line events when stdout is not a terminal (all without a terminal)."""

from __future__ import annotations

import io
import json
import math
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from tune.forecast import EtaPrior
from tune.objective import Objective
from tune.progress import (
    ProgressView,
    best_recorded,
    blended_eta_s,
    count_trials,
    eta_s,
    ray_errors_to,
    read_step,
)
from tune.storage import STEP_FILE, step_writer
from tune.study import TrialRecord

PARAMS = {"train.learning_rate": 0.0023, "train.accumulation_steps": 1}


def _trial(tid: str, status: str, epoch: int = 0, number: int = 1, path: str = "/runs/run-1/t001",
           **result: float) -> SimpleNamespace:
    last = {"epoch": epoch, **result} if epoch else {}
    return SimpleNamespace(trial_id=tid, status=status, last_result=last,
                           config={"study_trial": number, "params": PARAMS}, path=path, error_file=None,
                           get_error=lambda: RuntimeError("Traceback ...\nValueError: boom"))


def _step(epoch: int, step: int, steps: int) -> SimpleNamespace:
    return SimpleNamespace(epoch=epoch, step_in_epoch=step, steps_in_epoch=steps)


def test_ended_trials_are_counted_as_the_record_has_them() -> None:
    recorded = {"a": "completed", "b": "stopped_early", "c": "interrupted", "d": "failed", "e": "diverged",
                "h": "stopped_early"}
    trials = [_trial("a", "TERMINATED", 3), _trial("b", "TERMINATED", 1), _trial("c", "TERMINATED", 1),
              _trial("d", "ERROR", 1), _trial("e", "TERMINATED", 2), _trial("f", "RUNNING", 1),
              _trial("g", "PENDING"), _trial("h", "RUNNING", 1), _trial("i", "ERROR")]
    # "h": the scheduler stopped it (the record says so) before Ray marked it ended.
    assert count_trials(trials, recorded) == {"done": 1, "running": 1, "stopped early": 2, "failed": 2,
                                              "diverged": 1, "interrupted": 1, "pending": 1}


def test_eta_is_the_remaining_trial_epochs_at_this_runs_rate() -> None:
    assert eta_s(done=4, done_at_start=1, planned=10, elapsed_s=30) == pytest.approx(6 * 30 / 3)
    assert eta_s(done=1, done_at_start=1, planned=10, elapsed_s=30) is None  # only a resumed trial's epoch
    assert eta_s(done=0, done_at_start=0, planned=10, elapsed_s=0) is None
    assert eta_s(done=10, done_at_start=0, planned=9, elapsed_s=30) == 0.0


def test_step_writer_writes_at_most_once_per_interval_and_atomically(tmp_path: Path) -> None:
    write = step_writer(tmp_path / "t001", min_interval_s=3600)
    write(_step(2, 5, 40))
    write(_step(2, 6, 40))  # within the interval: skipped
    assert read_step(tmp_path / "t001") == (2, 5, 40)
    assert [p.name for p in (tmp_path / "t001").iterdir()] == [STEP_FILE]  # no temporary file left
    assert json.loads((tmp_path / "t001" / STEP_FILE).read_text())["time"] > 0
    again = step_writer(tmp_path / "t001", min_interval_s=0)
    again(_step(2, 7, 40))
    again(_step(3, 1, 40))
    assert read_step(tmp_path / "t001") == (3, 1, 40)


def test_a_missing_or_damaged_step_file_reads_as_none(tmp_path: Path) -> None:
    assert read_step(tmp_path) is None
    (tmp_path / STEP_FILE).write_text('{"epoch": 1, "step":')
    assert read_step(tmp_path) is None
    (tmp_path / STEP_FILE).write_text('{"epoch": 1}')
    assert read_step(tmp_path) is None


def _running_study(tmp_path: Path, local: bool = True) -> tuple[ProgressView, list[SimpleNamespace]]:
    """5 trials of 3 epochs planned: a completed one, one stopped early after epoch 1, one running
    (epoch 1 reported, 10 of 40 steps of epoch 2 in its step.json), one pending, one not asked yet."""
    running = tmp_path / "t003"
    step_writer(running)(_step(2, 10, 40))
    trials = [_trial("a", "TERMINATED", 3, number=1), _trial("b", "TERMINATED", 1, number=2),
              _trial("c", "RUNNING", 1, number=3, path=str(running)), _trial("d", "PENDING", number=4)]
    view = ProgressView(Objective("val_loss"), planned_epochs=3, num_samples=5, local=local, stream=io.StringIO(),
                        statuses=lambda: {"a": "completed", "b": "stopped_early", "c": "running"})
    view.on_step_end(0, trials)
    return view, trials


def test_progress_counts_trial_epochs_with_the_running_trials_steps(tmp_path: Path) -> None:
    view, _ = _running_study(tmp_path)
    done, planned, _ = view.progress()
    assert done == pytest.approx(3 + 1 + 1 + 10 / 40)
    assert planned == 3 + 1 + 3 + 3 + 3  # the stopped trial plans only what it did
    view.local = False  # URI storage: epochs only
    assert view.progress()[0] == 5


def test_a_reported_epoch_counts_at_once_and_makes_the_step_file_stale(tmp_path: Path) -> None:
    view, trials = _running_study(tmp_path)
    # Ray calls back before it updates the trial's last_result; the file still says epoch 2, step 10.
    view.on_trial_result(0, trials, trials[2], {"epoch": 2, "val_loss": 2.0})
    assert view.progress()[0] == 3 + 1 + 2


def test_the_terminal_view_shows_progress_counts_and_each_running_trials_step(tmp_path: Path) -> None:
    view, trials = _running_study(tmp_path)
    view.on_trial_result(0, trials, trials[0], {"epoch": 3, "val_loss": 1.5})
    out = io.StringIO()
    Console(file=out, width=160).print(view.render())
    text = out.getvalue()
    assert "5.2/13 trial-epochs" in text
    assert "trials 4/5: done 1, running 1, stopped early 1, failed 0, diverged 0, pending 1" in text
    assert "best val_loss 1.5000 (t001)" in text
    assert "t003 lr=2.3e-3 acc=1 epoch 2/3 step 10/40" in " ".join(text.split())


def test_plain_mode_prints_each_event_once_on_its_own_line(tmp_path: Path) -> None:
    view, trials = _running_study(tmp_path)
    view.setup()
    c = trials[2]
    view.on_trial_start(0, trials, c)
    view.on_trial_result(0, trials, c, {"epoch": 1, "val_loss": 2.0})
    view.on_trial_result(0, trials, c, {"epoch": 1, "val_loss": 2.0, "restored": 1})  # a resume's repeat
    view.on_trial_result(0, trials, c, {"epoch": 3, "val_loss": 1.25})  # the last epoch: in the end line
    c.status, c.last_result = "TERMINATED", {"epoch": 3, "val_loss": 1.25}
    view.statuses = lambda: {"a": "completed", "b": "stopped_early", "c": "completed"}  # (Ray's order)
    view.on_trial_complete(0, trials, c)
    view.on_experiment_end(trials)
    lines = view._stream.getvalue().splitlines()
    assert len(lines) == 4 and len(set(lines)) == 4, lines
    assert not any("\r" in line or "\x1b" in line for line in lines)
    assert lines[0].endswith("s] t003 lr=2.3e-3 acc=1 started")
    assert "] t003 epoch 1/3 val_loss 2.0000; 5.2/13 trial-epochs, ETA " in lines[1]
    assert lines[1].endswith("| done 1, running 1, stopped early 1, failed 0, diverged 0, pending 1 | best "
                             "val_loss 2.0000 (t003)")
    assert lines[2].endswith("] t003 lr=2.3e-3 acc=1 completed at epoch 3 (val_loss 1.2500) | done 2, "
                             "running 0, "
                             "stopped early 1, failed 0, diverged 0, pending 1 | best val_loss 1.2500 (t003)")
    assert "] run ended: 7/13 trial-epochs in " in lines[3]


def test_evaluations_inside_an_epoch_count_as_their_fraction_of_it(tmp_path: Path) -> None:
    """A 1-epoch study of 8 evaluations: each report is 1/8 of a trial-epoch, a line names the evaluation, a
    trial's last one is in its end line, and the forecast's remaining work runs at least to the next one."""
    prior = EtaPrior(expected_epochs=0.5, s_per_trial_epoch=80.0, after_s=0.0, slots=1)
    view = ProgressView(Objective("val_loss"), planned_epochs=1, num_samples=2, stream=io.StringIO(), prior=prior,
                        evals_per_epoch=8)
    view.setup()
    a = _trial("a", "RUNNING", number=1, path=str(tmp_path / "t001"))
    view.on_trial_start(0, [a], a)
    view.on_trial_result(0, [a], a, {"epoch": 1, "evaluation": 3, "val_loss": 2.0})
    assert view.progress()[:2] == (3 / 8, 2)
    assert view._expected_remaining() == pytest.approx((0.5 - 3 / 8) + 0.5)  # a: to 1/2 epoch, b: all of it
    step_writer(tmp_path / "t001")(_step(1, 38, 64))  # 38 of the epoch's 64 steps: past evaluation 4
    assert view.progress()[0] == pytest.approx(38 / 64)
    assert view._expected_remaining() == pytest.approx((5 / 8 - 38 / 64) + 0.5)  # at least to evaluation 5
    view.on_trial_result(0, [a], a, {"epoch": 1, "evaluation": 8, "val_loss": 1.5})  # the last: no line
    a.status, a.last_result = "TERMINATED", {"epoch": 1, "evaluation": 8, "val_loss": 1.5}
    view.statuses = lambda: {"a": "completed"}
    view.on_trial_complete(0, [a], a)
    lines = view._stream.getvalue().splitlines()
    assert "] t001 evaluation 3/8 val_loss 2.0000; 0.4/2 trial-epochs, ETA " in lines[1] and len(lines) == 3
    assert "t001 lr=2.3e-3 acc=1 completed at evaluation 8 (1 epoch) (val_loss 1.5000)" in lines[2]


def test_a_failed_trial_is_one_line_with_its_reason_and_traceback_path(tmp_path: Path) -> None:
    out = io.StringIO()
    view = ProgressView(Objective("val_loss"), planned_epochs=3, num_samples=1, stream=out)
    trial = _trial("a", "ERROR")
    trial.error_file = None  # the storage's copy only
    view.on_trial_error(0, [trial], trial)
    # The driver's own copy first: Ray syncs it to the storage later.
    (tmp_path / "error.txt").write_text("Failure # 1\nThe actor died unexpectedly.\n" + "x" * 300)
    trial.error_file = str(tmp_path / "error.txt")
    view.on_trial_recover(0, [trial], trial)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "] t001 lr=2.3e-3 acc=1 failed: ValueError: boom (traceback: /runs/run-1/t001/error.txt) | " \
        in lines[0]
    retried = "t001 lr=2.3e-3 acc=1 crashed; Ray retries it from its last checkpoint"
    assert f"] {retried}: {'x' * 199}… (traceback: /runs/run-1/t001/error.txt) | " in lines[1]


def test_the_best_value_follows_the_mode() -> None:
    view = ProgressView(Objective("accuracy", "max"), planned_epochs=2, num_samples=2, stream=io.StringIO())
    a, b = _trial("a", "RUNNING", number=1), _trial("b", "RUNNING", number=2)
    view.on_trial_result(0, [a, b], a, {"epoch": 1, "accuracy": 0.5})
    view.on_trial_result(0, [a, b], b, {"epoch": 1, "accuracy": 0.25})
    view.on_trial_result(0, [a, b], b, {"epoch": 1, "accuracy": float("nan")})
    assert view.status().endswith("| best accuracy 0.5000 (t001)")


def test_the_best_so_far_starts_from_what_earlier_runs_recorded() -> None:
    trials = [TrialRecord(0, "completed", {}, {1: {"val_loss": 2.5}, 2: {"val_loss": 1.9564}}),
              TrialRecord(1, "diverged", {}, {1: {"val_loss": float("nan")}}), TrialRecord(2, "running", {}, {})]
    assert best_recorded(trials, Objective("val_loss")) == (1.9564, "t000")
    assert best_recorded(trials, Objective("val_loss", "max")) == (2.5, "t000")
    assert best_recorded(trials[1:], Objective("val_loss")) is None
    view = ProgressView(Objective("val_loss"), planned_epochs=2, num_samples=1, stream=io.StringIO(),
                        best=best_recorded(trials, Objective("val_loss")))
    a = _trial("a", "RUNNING", number=3)
    view.on_trial_result(0, [a], a, {"epoch": 1, "val_loss": 3.5138})  # worse than t000's: t000 stays best
    assert view.status().endswith("| best val_loss 1.9564 (t000)")
    view.on_trial_result(0, [a], a, {"epoch": 2, "val_loss": 1.5})
    assert view.status().endswith("| best val_loss 1.5000 (t003)")


def test_only_epochs_trained_in_this_run_set_the_eta_rate() -> None:
    view = ProgressView(Objective("val_loss"), planned_epochs=3, num_samples=2, local=False, stream=io.StringIO())
    a, b = _trial("a", "RUNNING", number=1), _trial("b", "RUNNING", number=2)
    for t in (a, b):
        view.on_trial_start(0, [a, b], t)
    view.on_trial_result(0, [a, b], a, {"epoch": 2, "val_loss": 2.0, "restored": 1})  # continued by --resume
    assert view.progress() == (2, 6, None)  # nothing trained in this run yet
    view.on_trial_result(0, [a, b], b, {"epoch": 1, "val_loss": 3.0})
    view.on_trial_result(0, [a, b], b, {"epoch": 1, "val_loss": 3.0, "restored": 1})  # Ray retried it
    done, planned, eta = view.progress()
    assert (done, planned) == (3, 6) and eta is not None and eta > 0


def test_the_blended_eta_starts_at_the_forecast_and_moves_to_the_measured_rate() -> None:
    prior = EtaPrior(expected_epochs=1.5, s_per_trial_epoch=10.0, after_s=50.0, start_s=4.0, slots=2)
    # Before anything trained: the forecast, its worker start and what follows the phase.
    assert blended_eta_s(6, done=0, elapsed_s=0, prior=prior, weight=4) == pytest.approx(6 * 10 + 50 + 4)
    # Trained twice as slowly as forecast (20 s per trial-epoch after the start): the rate moves towards 20
    # as the forecast's 4 trial-epochs of weight are outweighed, and the later phases scale with it.
    rate = (4 * 10 + 2 * 20) / (4 + 2)
    assert blended_eta_s(6, done=2, elapsed_s=44, prior=prior, weight=4) == pytest.approx(6 * rate + 50 * rate / 10)
    late = blended_eta_s(6, done=400, elapsed_s=4 + 400 * 20, prior=prior, weight=4)
    assert late == pytest.approx(6 * 20 + 100, rel=0.01)
    assert blended_eta_s(0, done=10, elapsed_s=104, prior=prior, weight=4) == pytest.approx(50)  # phase done


def test_with_a_forecast_the_eta_counts_the_trial_epochs_asha_is_expected_to_leave() -> None:
    prior = EtaPrior(expected_epochs=1.5, s_per_trial_epoch=10.0, after_s=0.0, start_s=0.0, slots=2)
    view = ProgressView(Objective("val_loss"), planned_epochs=2, num_samples=4, local=False, stream=io.StringIO(),
                        prior=prior)
    assert view.progress() == (0, 8, pytest.approx(4 * 1.5 * 10))  # the forecast alone, not 8 epochs' worth
    a, b = _trial("a", "RUNNING", number=1), _trial("b", "RUNNING", number=2)
    for t in (a, b):
        view.on_trial_start(0, [a, b], t)
    view.on_trial_result(0, [a, b], a, {"epoch": 1, "val_loss": 2.0})
    a.status = "TERMINATED"  # stopped by ASHA after epoch 1: nothing left of it
    view.on_trial_result(0, [a, b], b, {"epoch": 1, "val_loss": 1.0})  # b continues: at least epoch 2 is left
    assert view._expected_remaining() == pytest.approx(0 + 1 + 2 * 1.5)
    done, planned, eta = view.progress()
    assert (done, planned) == (2, 1 + 2 + 2 * 2) and eta is not None and eta > 0


def test_a_diverged_trial_is_one_line_with_its_reason() -> None:
    out = io.StringIO()
    view = ProgressView(Objective("val_loss"), planned_epochs=3, num_samples=1, stream=out,
                        statuses=lambda: {"a": "diverged"})  # recorded by the scheduler, before the callbacks
    a = _trial("a", "RUNNING")
    result = {"epoch": 2, "val_loss": float("nan"), "diverged": 1, "diverged_reason": "loss 41.0 > 4 x 10.2"}
    view.on_trial_result(0, [a], a, result)
    a.status, a.last_result = "TERMINATED", result
    view.on_trial_complete(0, [a], a)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "] t001 lr=2.3e-3 acc=1 diverged at epoch 2: loss 41.0 > 4 x 10.2 | done 0, " \
        "running 0, stopped early 0, failed 0, diverged 1 | best -" in lines[0], lines


def _print_from(thread_name: str, text: str) -> None:
    thread = threading.Thread(target=lambda: print(text), name=thread_name)
    thread.start()
    thread.join()


def test_ray_error_messages_go_to_the_study_log_and_everything_else_to_the_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "ray_errors.log"
    with ray_errors_to(log):
        _print_from("ray_listen_error_messages", "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task")
        _print_from("some-other-thread", "t001 failed: ValueError: boom")
        print("study line")
        assert sys.stdout.isatty() is False  # (what the view asks the terminal passes through)
    _print_from("ray_listen_error_messages", "after: to the terminal again")
    out = capsys.readouterr().out
    assert "worker died" not in out and "t001 failed: ValueError: boom" in out and "study line" in out
    assert "after: to the terminal again" in out
    assert "(raylet) A worker died" in log.read_text()


def test_ray_error_messages_are_dropped_while_the_study_folder_does_not_exist(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ray_errors_to(tmp_path / "not-yet" / "ray_errors.log"):
        _print_from("ray_listen_error_messages", "(raylet) A worker died")
    assert "worker died" not in capsys.readouterr().out and not (tmp_path / "not-yet").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_live_view_keeps_ray_error_messages_out_of_the_terminal(tmp_path: Path) -> None:
    terminal, log = _Terminal(), tmp_path / "ray_errors.log"
    view = ProgressView(Objective("val_loss"), 3, 2, stream=terminal, ray_errors=log)
    before = sys.stdout
    view.setup()
    try:
        assert sys.stdout is not before  # Live's stand-in, and ours in front of it
        _print_from("ray_listen_error_messages", "(raylet) A worker died or was killed")
        print("a line the driver prints")
    finally:
        view.close()
    assert sys.stdout is before
    assert "worker died" not in terminal.getvalue() and "a line the driver prints" in terminal.getvalue()
    assert "(raylet) A worker died" in log.read_text()


def test_a_value_no_better_than_its_trials_untrained_model_is_never_best_so_far() -> None:
    """Issue 19's instance: a trial collapsed to the uniform predictor (val_loss ln(6400)) beside one that
    diverged: the live view and the best recorded so far show no best rather than the collapse."""
    collapsed = {"val_loss": math.log(6400), "baseline_val_loss": 8.779, "uniform_loss": math.log(6400)}
    view = ProgressView(Objective("val_loss"), planned_epochs=2, num_samples=2, stream=io.StringIO())
    a = _trial("a", "RUNNING", number=0)
    view.on_trial_result(0, [a], a, {"epoch": 1, **collapsed})
    view.on_trial_result(0, [a], a, {"epoch": 2, "val_loss": math.log(6400)})
    assert view.status().endswith("| best -")
    trials = [TrialRecord(0, "no_better", {}, {1: collapsed, 2: {"val_loss": math.log(6400)}}),
              TrialRecord(1, "running", {}, {1: {**collapsed, "val_loss": 5.0}})]
    assert best_recorded(trials, Objective("val_loss")) == (5.0, "t001")
