"""tune.forecast: the cost model's arithmetic on a given probe, the time budget check, the live view's
priors, and (one small real probe) that ``--dry-run`` prints the ``forecast:`` line."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import pytest

from tune import forecast as fc
from tune.preflight import expected_shape
from tune.space import load_space


def _probe(padded: tuple[int, ...] = (100,) * 10, **changes: float) -> fc.Probe:
    values = {"concurrent": 1, "device": "cpu", "threads": 1, "start_s": 3.0, "init_s": 0.5, "s_per_token": 0.01,
              "eval_s": 2.0, "checkpoint_s": 0.5, "padded": padded, "wall_s": 4.0, **changes}
    return fc.Probe(**values)  # type: ignore[arg-type]


def _spec(name: str = "smoke.yaml", run: dict | None = None, **tune: object):
    spec = load_space(name)
    train = dataclasses.replace(spec.run.train, **(run or {}))
    return dataclasses.replace(spec, run=dataclasses.replace(spec.run, train=train),
                               tune=dataclasses.replace(spec.tune, **tune))


def test_one_slot_without_asha_is_trials_times_their_length_plus_the_fixed_costs() -> None:
    spec = _spec(scheduler=dataclasses.replace(load_space("smoke.yaml").tune.scheduler, type="none"),
                 max_concurrent_trials=1, num_samples=3)
    spec = dataclasses.replace(spec, search=tuple(p for p in spec.search if p.path != "train.accumulation_steps"))
    spec = _spec_run(spec, max_steps_per_epoch=0, accumulation_steps=1)
    f = fc.forecast(spec, _probe())
    epoch = 10 * 100 * 0.01 + 1 * (2.0 + 0.5)  # every batch's padded tokens + one evaluation and checkpoint
    trial = fc.TRIAL_OVERHEAD_S + 0.5 + 2.0  # scheduling, model build, the untrained model's evaluation
    assert f.epoch_s == pytest.approx(epoch) and f.trial_s == pytest.approx(trial)
    assert f.search_s == pytest.approx(fc.RAY_START_S + 3.0 + 3 * (trial + 2 * epoch))
    assert f.total_s == pytest.approx(f.search_s + fc.END_S) and f.finalists_s == 0
    assert (f.trial_epochs, f.steps_per_epoch, f.gpu_hours) == (6, 10, None)


def _spec_run(spec, **train: object):
    return dataclasses.replace(spec, run=dataclasses.replace(spec.run, train=dataclasses.replace(spec.run.train,
                                                                                                 **train)))


def test_a_step_costs_a_fixed_part_and_a_part_per_padded_token() -> None:
    assert fc.step_cost([100, 200, 300], [0.3, 0.5, 0.7]) == pytest.approx((0.1, 0.002))
    assert fc.step_cost([100, 200, 300], [0.7, 0.5, 0.3]) == pytest.approx((0.5, 0.0))  # noise: no slope
    assert fc.step_cost([100, 200, 300], [0.1, 0.5, 0.9]) == pytest.approx((0.0, 1.5 / 600))  # no intercept
    assert fc.step_cost([100, 100], [0.2, 0.4]) == pytest.approx((0.3, 0.0))  # one size only
    spec = load_space("sft.yaml")
    per_batch = fc.forecast(spec, _probe(s_per_batch=0.05)).epoch_s - fc.forecast(spec, _probe()).epoch_s
    assert per_batch == pytest.approx(0.05 * 10)  # ten batches of an epoch


def test_an_epoch_counts_the_capped_batches_of_each_searched_accumulation_and_its_evaluations() -> None:
    # smoke.yaml: max_steps_per_epoch 10, accumulation searched over {1, 2}: 10 or 20 of the 30 batches.
    spec = _spec_run(load_space("smoke.yaml"), evals_per_epoch=4)
    padded = tuple(range(1, 31))
    f = fc.forecast(spec, _probe(padded))
    tokens = (sum(padded[:10]) + sum(padded[:20])) / 2
    assert f.epoch_s == pytest.approx(tokens * 0.01 + 4 * 2.5)
    assert (f.steps_per_epoch, f.evals_per_epoch) == (10, 4)


def test_asha_and_finalists_use_the_plans_expected_shape_and_waves_of_slots() -> None:
    spec = load_space("sft.yaml")  # 12 trials, 2 at once, ASHA at evaluation 1 of 2 (one epoch), finalists 2 x 1
    t = spec.tune
    f = fc.forecast(spec, _probe())
    shape = expected_shape(t.num_samples, t.scheduler, evals_per_epoch=spec.run.train.evals_per_epoch)
    assert f.search_trial_epochs == pytest.approx(shape.trial_epochs)
    assert f.finalists == 2 and f.epochs == 1 and f.trial_epochs == pytest.approx(shape.trial_epochs + 2 * 1)
    work = (12 * f.trial_s + shape.trial_epochs * f.epoch_s) / 2
    tail = 0.5 * (f.trial_s + shape.trial_epochs / 12 * f.epoch_s) / 2  # the last trials end unevenly
    assert f.search_s == pytest.approx(fc.RAY_START_S + 3.0 + work + tail)
    assert f.finalists_s == pytest.approx(3.0 + 1 * (f.trial_s + 1 * f.epoch_s))  # both at once: one wave


def test_a_resume_counts_the_finalists_of_the_trials_completed_before_less_those_trained() -> None:
    """--resume once the search is over: the finalists are what is left to run (the forecast had said 6 s and
    no finalist for a resume with 2 finalists to train); mid-search, the completed trials count too."""
    spec = load_space("sft.yaml")  # finalists: top 2 x 1 seed
    cases = {(0, 2, 0): 2, (0, 2, 1): 1, (0, 2, 2): 0, (0, 1, 0): 1, (0, 5, 0): 2}
    for (new, completed_before, done), finalists in cases.items():
        f = fc.forecast(spec, _probe(), new, completed_before=completed_before, finalists_done=done)
        assert (f.trials, f.finalists) == (0, finalists)
        assert (f.finalists_s > fc.RAY_START_S) == (finalists > 0) and f.total_s > f.finalists_s
    one_left = fc.forecast(spec, _probe(), 1, completed_before=2)
    assert one_left.finalists == 2 and fc.forecast(spec, _probe(), 1).finalists == 1


def test_gpu_hours_are_the_trials_time_times_their_gpu_share() -> None:
    base = load_space("sft.yaml")
    spec = _spec("sft.yaml", resources_per_trial=dataclasses.replace(base.tune.resources_per_trial, gpu=0.5))
    f = fc.forecast(spec, _probe())
    busy = (f.trials + f.finalists) * f.trial_s + f.trial_epochs * f.epoch_s
    assert f.gpu_hours == pytest.approx(0.5 * busy / 3600)
    assert "GPU-hours" in f.line() and "GPU-hours" not in fc.forecast(base, _probe()).line()


def test_the_line_starts_with_forecast_and_the_wall_time_as_h_mm_ss() -> None:
    line = fc.forecast(load_space("sft.yaml"), _probe()).line()
    assert line.startswith("forecast: 0:") and "search 0:" in line and "finalists 0:" in line
    # An epoch's steps averaged over the searched accumulation say so (--dry-run gives the fixed config's: a
    # user read "99 steps" here against "about 169 per epoch" there); a fixed accumulation's are plain.
    assert "steps on average over accumulation_steps 1, 2, 4," in line
    fixed = load_space("sft.yaml")
    fixed = dataclasses.replace(fixed, search=tuple(p for p in fixed.search if p.path != "train.accumulation_steps"))
    assert re.search(r"\(\d+ steps, 2 evaluation", fc.forecast(fixed, _probe()).line())
    assert fc.duration(3725.4) == "1:02:05" and fc.duration(-1) == "0:00:00"


def test_a_budget_shorter_than_the_forecast_warns_with_the_num_samples_that_fits() -> None:
    spec = load_space("sft.yaml")
    probe = _probe()
    budget = (fc.forecast(spec, probe, 5).total_s + fc.forecast(spec, probe, 6).total_s) / 2
    spec = _spec("sft.yaml", time_budget_s=budget)
    assert fc.fitting_samples(spec, probe, budget) == 5
    warning = fc.budget_warning(spec, probe, fc.forecast(spec, probe))
    assert warning is not None and warning.startswith("warning: the forecast ") and "--num-samples 5" in warning
    assert fc.budget_warning(spec, probe, fc.forecast(spec, probe, 5)) is None  # it fits
    assert fc.budget_warning(load_space("smoke.yaml"), probe, fc.forecast(load_space("smoke.yaml"), probe)) is None
    tiny = _spec("sft.yaml", time_budget_s=1.0)
    assert "not even one trial fits" in fc.budget_warning(tiny, probe, fc.forecast(tiny, probe))


def test_the_eta_priors_spread_each_phase_over_its_expected_trial_epochs() -> None:
    f = fc.forecast(load_space("sft.yaml"), _probe())
    search, finals = f.prior("search"), f.prior("finalists")
    assert search.expected_epochs * f.trials == pytest.approx(f.search_trial_epochs)
    assert search.s_per_trial_epoch * f.search_trial_epochs == pytest.approx(
        (f.trials * f.trial_s + f.search_trial_epochs * f.epoch_s) / f.slots)
    assert search.after_s == pytest.approx(f.finalists_s + f.end_s) and search.slots == 2
    assert (finals.expected_epochs, finals.after_s, finals.slots) == (1, f.end_s, 2)


def test_dry_run_prints_a_forecast_line_from_a_real_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from tune import run

    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MINIMIND_TUNE_FORECAST", "1")  # (tests/conftest.py turns it off for the others)
    assert run.main(["--space", "smoke.yaml", "--dry-run", "--max-concurrent", "1",
                     "--storage-path", str(tmp_path / "studies")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("forecast: ")]
    assert lines[-1].startswith("forecast: 0:") and "probe: 1 at once on cpu, 1 thread(s) each" in lines[-1]
    seconds = [float(x) for x in lines[-1].split("an epoch ")[1].split(" s")[:1]]
    assert seconds and math.isfinite(seconds[0]) and seconds[0] > 0
    assert not (tmp_path / "studies").exists()
    monkeypatch.setenv("MINIMIND_TUNE_FORECAST", "0")  # the setting, as --no-forecast
    assert run.main(["--space", "smoke.yaml", "--dry-run", "--storage-path", str(tmp_path / "studies")]) == 0
    assert "forecast:" not in capsys.readouterr().out


def test_evaluations_inside_an_epoch_are_counted_in_epochs(tmp_path: Path) -> None:
    """ASHA's max_t and rungs count evaluations: a 1-epoch study of 8 evaluations plans trials of one epoch
    (with 8 evaluations in it), not of 8."""
    import yaml

    raw = yaml.safe_load((Path(fc.__file__).parents[1] / "search_spaces" / "sft.yaml").read_text())
    raw["train"].update(epochs=1, evals_per_epoch=8)
    (tmp_path / "evals8.yaml").write_text(yaml.safe_dump(raw))
    spec = load_space(tmp_path / "evals8.yaml")
    f = fc.forecast(spec, _probe())
    shape = expected_shape(12, spec.tune.scheduler, evals_per_epoch=8)
    assert f.epochs == 1 and f.search_trial_epochs == pytest.approx(shape.trial_epochs) and shape.trial_epochs < 12
    assert f.trial_epochs == pytest.approx(shape.trial_epochs + 2 * 1)  # 2 finalists of one epoch each
    assert f.epoch_s == pytest.approx(fc.forecast(_spec_run(spec, evals_per_epoch=1), _probe()).epoch_s + 7 * 2.5)
    assert f.prior("finalists").expected_epochs == 1


def test_the_probe_times_its_steps_after_the_warm_up() -> None:
    """A fresh process's first steps are slower (section 7: steps 10-19 still ~1.3x): only the steps after
    WARMUP_STEPS set the rate; with fewer batches, all but the first."""
    padded = [100 + 10 * (i % 3) for i in range(fc.WARMUP_STEPS + fc.PROBE_STEPS)]
    seconds = [(0.03 if i < fc.WARMUP_STEPS else 0.01) * p for i, p in enumerate(padded)]  # 3x slower at first
    stamps = list(itertools.accumulate(seconds))
    assert fc.steady_cost(stamps, padded) == pytest.approx((0.0, 0.01))
    few = stamps[:12]  # 12 batches: the last 10 are timed (8 of them still warm)
    a, b = fc.steady_cost(few, padded[:12])
    assert a * 10 + b * sum(padded[2:12]) == pytest.approx(sum(seconds[2:12]))


def test_a_capped_epoch_whose_cost_follows_the_drawn_accumulation_gives_the_range() -> None:
    # smoke.yaml: 10 optimizer steps per epoch, accumulation searched over {1, 2}: 10 or 20 micro-batches.
    spec = load_space("smoke.yaml")
    f = fc.forecast(spec, _probe(tuple([100] * 30)))
    cheap, dear = (fc.forecast(spec, _probe(tuple([100] * 30)), accumulations=(a,)) for a in (1, 2))
    assert f.total_range_s == pytest.approx((cheap.total_s, dear.total_s))
    assert f.epoch_range_s == pytest.approx((cheap.epoch_s, dear.epoch_s))
    assert cheap.total_s < f.total_s < dear.total_s
    assert f"{fc.duration(cheap.total_s)} to {fc.duration(dear.total_s)} by the accumulation" in f.line()
    # uncapped, every accumulation trains the same data: no range
    uncapped = fc.forecast(_spec_run(spec, max_steps_per_epoch=0), _probe(tuple([100] * 30)))
    assert uncapped.total_range_s is None and "by the accumulation" not in uncapped.line()
