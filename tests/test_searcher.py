"""tune.searcher: Ray's searcher and scheduler writing to and reading from the study record."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from conftest import DAMAGES, damage
from ray.tune.schedulers import TrialScheduler

from tune.objective import Objective
from tune.searcher import (
    NUMBER_KEY,
    PARAMS_KEY,
    RecordScheduler,
    RecordSearcher,
    ResumePlan,
    failure_reason,
    make_pruner,
    make_sampler,
    resume_plans,
)
from tune.study import Study

SPACE = {"train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
EPOCHS = 3


@pytest.fixture
def record(tmp_path: Path) -> Study:
    rec = Study.create(tmp_path / "s", "s", {"tune": {"mode": "min"}, "search": dict.fromkeys(SPACE)}, "", {})
    rec.use(sampler=make_sampler("optuna", 0, 8))
    return rec


def _pair(record: Study, plans: list[ResumePlan] | None = None) -> tuple[RecordSearcher, RecordScheduler]:
    searcher = RecordSearcher(record, SPACE, Objective("val_loss"), EPOCHS, plans)
    return searcher, RecordScheduler(searcher, make_pruner("asha", 1, 2))


def _trial(trial_id: str, config: dict[str, Any]) -> Any:
    return SimpleNamespace(trial_id=trial_id, config=config, get_error=lambda: None, error_file=None,
                           should_recover=lambda: False)


def _result(epoch: int, value: float, **extra: Any) -> dict[str, Any]:
    return {"val_loss": value, "train_loss": value + 0.5, "epoch": epoch, "evaluation": epoch,
            "training_iteration": epoch, "config/params/x": 1.0, "time_this_iter_s": 1.0, "timestamp": 1_700_000_000 + epoch, **extra}


def test_suggest_continues_unfinished_trials_first(record: Study) -> None:
    old, params = record.ask(SPACE)
    record.finish(old, "interrupted", Objective("val_loss"))
    searcher, _ = _pair(record, [ResumePlan(old, params, evaluation=2)])
    first = searcher.suggest("a")
    assert first == {PARAMS_KEY: params, NUMBER_KEY: old}
    assert record.trial(old).status == "running"
    second = searcher.suggest("b")
    assert second[NUMBER_KEY] == old + 1
    assert set(second[PARAMS_KEY]) == set(SPACE)
    assert searcher.numbers == {"a": old, "b": old + 1}


def test_scheduler_records_then_prunes_at_a_rung(record: Study) -> None:
    searcher, scheduler = _pair(record)
    good, bad = (_trial(tid, searcher.suggest(tid)) for tid in ("g", "b"))
    assert scheduler.on_trial_result(None, good, _result(1, 1.0)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, _result(1, 4.0)) == TrialScheduler.STOP
    searcher.on_trial_complete("b", _result(1, 4.0))
    stopped = record.trial(bad.config[NUMBER_KEY])
    assert stopped.status == "stopped_early"
    # The value ASHA decided on is the end of the pruned trial's curve in Optuna.
    frozen = record.study.trials[bad.config[NUMBER_KEY]]
    assert frozen.state == optuna.trial.TrialState.PRUNED and frozen.intermediate_values == {1: 4.0}
    assert stopped.epochs[1]["train_loss"] == 4.5
    assert not {"training_iteration", "config/params/x", "time_this_iter_s"} & set(stopped.epochs[1])


def test_the_last_epoch_is_never_a_prune_decision(record: Study) -> None:
    searcher, scheduler = _pair(record)
    best = _trial("x", searcher.suggest("x"))
    other = _trial("y", searcher.suggest("y"))
    for epoch in range(1, EPOCHS + 1):
        assert scheduler.on_trial_result(None, best, _result(epoch, 1.0 / epoch)) == TrialScheduler.CONTINUE
    # Worse than `best` at every rung it reaches, but its last epoch only ends it.
    for epoch in (1, 2):
        record.record_epoch(other.config[NUMBER_KEY], epoch, {"val_loss": 0.1}, "val_loss")
    assert scheduler.on_trial_result(None, other, _result(EPOCHS, 9.0)) == TrialScheduler.CONTINUE
    searcher.on_trial_complete("x", _result(EPOCHS, 1.0 / EPOCHS))
    assert record.trial(best.config[NUMBER_KEY]).status == "completed"
    assert record.study.trials[0].value == pytest.approx(1.0 / EPOCHS)


def test_diverged_and_non_finite_results_stop_the_trial_as_diverged(record: Study) -> None:
    searcher, scheduler = _pair(record)
    a, b = (_trial(tid, searcher.suggest(tid)) for tid in ("a", "b"))
    decision = scheduler.on_trial_result(None, a, _result(2, float("nan"), diverged=1,
                                                          diverged_reason="loss is nan at step 7"))
    assert decision == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, b, _result(1, float("inf"))) == TrialScheduler.STOP
    for tid in ("a", "b"):
        searcher.on_trial_complete(tid, {})
    assert [record.trial(n).status for n in (0, 1)] == ["diverged", "diverged"]
    assert record.trial(0).error == "loss is nan at step 7"
    assert [t.state for t in record.study.trials] == [optuna.trial.TrialState.FAIL] * 2


def test_end_without_all_epochs_is_interrupted_and_an_error_is_failed(record: Study) -> None:
    searcher, scheduler = _pair(record)
    a, b = (_trial(tid, searcher.suggest(tid)) for tid in ("a", "b"))
    scheduler.on_trial_result(None, a, _result(1, 1.0))
    searcher.on_trial_complete("a", _result(1, 1.0))  # Ctrl-C or the time budget
    b.get_error = lambda: RuntimeError(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
        "\x1b[36mray::ImplicitFunc.train()\x1b[39m\ntune.searcher.TrialOutOfMemory: out of GPU memory")
    scheduler.on_trial_error(SimpleNamespace(), b)
    searcher.on_trial_complete("b", None, error=True)
    assert record.trial(0).status == "interrupted"
    assert (record.trial(1).status, record.trial(1).error) == (
        "failed", "tune.searcher.TrialOutOfMemory: out of GPU memory")
    assert {t.number for t in record.unfinished()} == {0, 1}


def test_failure_reason_takes_the_exception_line() -> None:
    assert failure_reason("Traceback\n  File 'a'\nValueError: bad\n") == "ValueError: bad"
    assert failure_reason("") == ""


def test_resumed_sampler_does_not_repeat_the_first_draws(tmp_path: Path) -> None:
    first = make_sampler("random", 0, 4)
    again = make_sampler("random", 0, 4, offset=2)
    draw = optuna.distributions.FloatDistribution(0, 1)
    study = optuna.create_study()
    a = first.sample_independent(study, None, "x", draw)  # type: ignore[arg-type]
    b = again.sample_independent(study, None, "x", draw)  # type: ignore[arg-type]
    assert a != b


def test_a_trial_without_all_its_values_is_abandoned_never_run_with_defaults(tmp_path: Path) -> None:
    import optuna

    from tune.space import load_space
    from tune.study import Study

    spec = load_space("smoke")
    record = Study.create(tmp_path / "s", "s", {"tune": {"mode": "min"},
                                                      "search": {p.path: {} for p in spec.search}}, "", {})
    record.study.ask()  # a driver killed inside ask(): the trial exists, its values do not
    lr = {p.path: d for p, d in zip(spec.search, [optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                                                 optuna.distributions.CategoricalDistribution([1, 2])])}
    whole, _ = record.ask(lr)
    assert record.recover(Objective("val_loss"), 2) == ["trial t000 abandoned: its values were never all recorded"]
    plans = resume_plans(record)
    assert [p.number for p in plans] == [whole]
    assert record.trial(0).status == "abandoned" and record.finished_count() == 0
    assert record.study.trials[0].state == optuna.trial.TrialState.FAIL


@pytest.mark.parametrize("form", sorted(DAMAGES))
def test_the_resume_message_and_the_resumed_epoch_agree(record: Study, form: str) -> None:
    # Issue 21: "continuing t000 (after epoch 2)" while the trial retrained from epoch 1 or from scratch.
    from minimind_train.checkpoint import init_state, save_checkpoint
    from minimind_train.config import ModelConfig, RunConfig, TrainConfig
    from tune.searcher import _restore

    cfg = RunConfig(model=ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1), train=TrainConfig(device="cpu", dtype="float32"))
    n, _ = record.ask(SPACE)
    state, trial_dir = init_state(cfg, vocab_size=64), Path(record.runs) / "run-1" / f"t{n:03d}"
    for epoch in (1, 2):
        state.epoch = epoch
        save_checkpoint(trial_dir / f"epoch_{epoch:04d}", state, cfg, {"val_loss": 3.0 - epoch})
        record.record_epoch(n, epoch, {"val_loss": 3.0 - epoch}, "val_loss")
    record.set_status(n, "interrupted")
    words = damage(trial_dir / "epoch_0002", form)
    err = "\n".join(record.recover(Objective("val_loss"), EPOCHS))
    [plan] = resume_plans(record)
    assert f"checkpoint {trial_dir / 'epoch_0002'} cannot be continued from: {words}" in err
    assert "its newest usable checkpoint is epoch 1's" in err
    restored, point = _restore(record.runs, n, cfg, 64)  # what the trainable does with it
    assert plan.evaluation == point.evaluation == restored.epoch == point.meta["epoch"] == 1


def test_a_checkpoint_never_continues_under_another_configuration(tmp_path: Path) -> None:
    # Issue 21: whichever study file was edited, one trial's epochs never mix two configurations.
    import dataclasses

    from minimind_train.checkpoint import init_state, save_checkpoint
    from minimind_train.config import ModelConfig, RunConfig, TrainConfig
    from tune.searcher import _restore

    cfg = RunConfig(model=ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1), train=TrainConfig(device="cpu", dtype="float32"))
    state = init_state(cfg, vocab_size=64)
    state.epoch = 1
    save_checkpoint(tmp_path / "runs" / "run-1" / "t000" / "epoch_0001", state, cfg, {"val_loss": 2.0})
    moved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_threads=1))  # a run setting
    assert _restore(str(tmp_path / "runs"), 0, moved, 64)[0].epoch == 1
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, weight_decay=0.5))
    with pytest.raises(RuntimeError, match=r"another configuration .*train\.weight_decay: 0\.\d+ -> 0\.5"):
        _restore(str(tmp_path / "runs"), 0, other, 64)


def test_finalists_are_the_top_configs_with_more_seeds_and_continue_once(record: Study) -> None:
    from tune.searcher import finalist_plans

    values = {}
    for value in (3.0, 1.0, 2.0, 4.0):
        n, _ = record.ask(SPACE)
        for epoch in range(1, EPOCHS + 1):
            record.record_epoch(n, epoch, {"val_loss": value + 1 / epoch}, "val_loss")
        record.finish(n, "completed", Objective("val_loss"))
        values[n] = value
    pending = finalist_plans(record, SPACE, Objective("val_loss"), top_k=2, seeds=2, base_seed=42, create=False)
    assert [p.number for p in pending] == [-1] * 4 and record.finished_count() == 4
    plans = finalist_plans(record, SPACE, Objective("val_loss"), top_k=2, seeds=2, base_seed=42)
    best_two = sorted(values, key=values.get)[:2]
    assert [(record.trial(p.number).finalist_of, p.params["train.seed"]) for p in plans] == [
        (best_two[0], 43), (best_two[0], 44), (best_two[1], 43), (best_two[1], 44)]
    assert all(p.params["train.learning_rate"] == record.trial(p.params and record.trial(p.number).finalist_of)
               .params["train.learning_rate"] for p in plans)
    # One finished, one interrupted: only the interrupted continues (with its seed), nothing is added.
    done, cut = plans[0].number, plans[1].number
    for epoch in range(1, EPOCHS + 1):
        record.record_epoch(done, epoch, {"val_loss": 1.5}, "val_loss")
    record.finish(done, "completed", Objective("val_loss"))
    record.set_status(cut, "interrupted")
    for p in plans[2:]:
        record.finish(p.number, "diverged", Objective("val_loss"), error="nan")
    again = finalist_plans(record, SPACE, Objective("val_loss"), top_k=2, seeds=2, base_seed=42)
    assert [(p.number, p.params["train.seed"]) for p in again] == [(cut, 44)]
    assert record.finished_count() == 4  # finalists are not search trials
    assert resume_plans(record) == []  # (the search has none)


def test_a_lost_worker_is_recorded_with_its_reason_from_the_drivers_error_file(record: Study,
                                                                              tmp_path: Path) -> None:
    searcher, scheduler = _pair(record)
    config = searcher.suggest("a")
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback ...\nray.exceptions.ActorDiedError: The actor died unexpectedly\n")
    trial = SimpleNamespace(trial_id="a", config=config, error_file=str(error_file),
                            get_error=lambda: None, should_recover=lambda: False)  # (no storage copy yet)
    scheduler.on_trial_error(SimpleNamespace(), trial)
    assert "The actor died unexpectedly" in record.trial(config[NUMBER_KEY]).error


def test_a_trial_that_ray_retries_stays_running_with_its_last_failure(record: Study) -> None:
    searcher, scheduler = _pair(record)
    trial = _trial("a", searcher.suggest("a"))
    trial.get_error, trial.should_recover = lambda: RuntimeError("ActorDiedError: worker died"), lambda: True
    scheduler.on_trial_error(SimpleNamespace(), trial)  # Ray requeues it (tune.FailureConfig.max_failures)
    assert (record.trial(0).status, record.trial(0).error) == ("running", "ActorDiedError: worker died")
    trial.should_recover = lambda: False  # its last allowed failure
    scheduler.on_trial_error(SimpleNamespace(), trial)
    searcher.on_trial_complete("a", None, error=True)
    assert record.trial(0).status == "failed"


@pytest.mark.parametrize("status", ["completed", "stopped_early", "diverged", "abandoned"])
def test_a_trial_whose_driver_died_between_its_status_and_optunas_tell_is_told_on_resume(
        record: Study, status: str) -> None:
    """A SIGKILL after the record says how a trial ended but before Optuna is told leaves it RUNNING in
    Optuna: never resumed (its status is final), yet missing from TPE, the plots and warm starts."""
    import signal
    import subprocess
    import sys
    import textwrap

    n, _ = record.ask(SPACE)
    for epoch, value in enumerate([2.0, 1.5, 1.7][:EPOCHS if status == "completed" else 1], 1):
        record.record_epoch(n, epoch, {"val_loss": value}, "val_loss")
    end = (f"record.abandon({n}, 'cut')" if status == "abandoned"
           else f"record.finish({n}, {status!r}, Objective('val_loss'))")
    killed = textwrap.dedent(f"""
        import os, signal, optuna
        from pathlib import Path
        from tune.objective import Objective
        from tune.study import Study
        def tell(*args, **kwargs):  # the moment between the two writes
            os.kill(os.getpid(), signal.SIGKILL)
        optuna.Study.tell = tell
        record = Study.open(Path({str(record.dir)!r}))
        {end}
    """)
    assert subprocess.run([sys.executable, "-c", killed], check=False).returncode == -signal.SIGKILL
    assert record.trial(n).status == status  # the decision is in the record ...
    assert record.study.trials[n].state == optuna.trial.TrialState.RUNNING  # ... Optuna was not told
    again = Study.open(record.dir)
    assert again.recover(Objective("val_loss"), EPOCHS) == [] and resume_plans(again) == []
    told = Study.open(record.dir).study.trials[n]
    expected = {"completed": optuna.trial.TrialState.COMPLETE, "stopped_early": optuna.trial.TrialState.PRUNED}
    assert told.state == expected.get(status, optuna.trial.TrialState.FAIL)
    # (as an uninterrupted finish: the best epoch's value; Optuna gives a pruned trial its last one)
    assert told.value == {"completed": 1.5, "stopped_early": 2.0}.get(status)
    assert Study.open(record.dir).trial(n).status == status


def test_asha_stops_a_trial_inside_the_epoch_at_an_evaluation_rung(record: Study) -> None:
    # Issue 22: a 1-epoch trial of 8 evaluations; rungs at 1, 2, 4 evaluations (max_t 8), keyed by the
    # result's "evaluation" (its "epoch" is 1 throughout): the worse trial stops at evaluation 2.
    searcher = RecordSearcher(record, SPACE, Objective("val_loss"), 8)
    scheduler = RecordScheduler(searcher, make_pruner("asha", 1, 2))
    good, bad = (_trial(tid, searcher.suggest(tid)) for tid in ("g", "b"))
    for k in range(1, 9):
        assert scheduler.on_trial_result(None, good, {**_result(1, 2.0 - k / 10), "evaluation": k}) == \
            TrialScheduler.CONTINUE
    searcher.on_trial_complete("g")
    assert scheduler.on_trial_result(None, bad, {**_result(1, 1.85), "evaluation": 1}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, {**_result(1, 3.0), "evaluation": 2}) == TrialScheduler.STOP
    searcher.on_trial_complete("b")
    assert record.trial(good.config[NUMBER_KEY]).status == "completed"
    assert record.trial(bad.config[NUMBER_KEY]).status == "stopped_early"
    assert record.study.trials[good.config[NUMBER_KEY]].intermediate_values == {
        k: pytest.approx(2.0 - k / 10) for k in range(1, 9)}
    assert record.study.trials[bad.config[NUMBER_KEY]].intermediate_values == {1: 1.85, 2: 3.0}
    assert "evaluation" not in record.trial(good.config[NUMBER_KEY]).epochs[3]  # bookkeeping, not a metric
