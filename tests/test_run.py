"""tune.run without a study: Ray's start-up retried once and explained, faults told apart."""

from __future__ import annotations

import argparse
import errno
from typing import Any

import pytest

from tune import run


class _FakeRay:
    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        self.calls: list[dict[str, Any]] = []
        self.shutdowns = 0

    def init(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        if self.failures:
            raise Exception(self.failures.pop(0))  # noqa: TRY002 - what ray.init raises for a slow start

    def shutdown(self) -> None:
        self.shutdowns += 1


TIMEOUT = ("The current node timed out during startup. This could happen because some of the raylet "
           "failed to startup or the GCS has become overloaded.")


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(address=kw.get("address"), ray_temp_dir="/tmp/rt")


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> Any:
    import ray

    def install(failures: list[str]) -> _FakeRay:
        fake = _FakeRay(failures)
        monkeypatch.setattr(ray, "init", fake.init)
        monkeypatch.setattr(ray, "shutdown", fake.shutdown)
        monkeypatch.setattr(run.time, "sleep", lambda s: None)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        return fake

    return install


def test_a_slow_ray_start_is_retried_once(fake_ray: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake = fake_ray([TIMEOUT])
    run._init_ray(_args())
    assert len(fake.calls) == 2 and fake.shutdowns == 1
    assert fake.calls[0]["_temp_dir"] == "/tmp/rt" and not fake.calls[0]["include_dashboard"]
    assert "trying once more" in capsys.readouterr().err


def test_ray_that_never_starts_is_one_clear_error(fake_ray: Any) -> None:
    fake = fake_ray([TIMEOUT, TIMEOUT])
    with pytest.raises(run.StudyError) as err:
        run._init_ray(_args())
    text = str(err.value)
    assert "could not start a local Ray: The current node timed out during startup" in text
    assert "retry" in text and "--address" in text and "\n" not in text
    assert len(fake.calls) == 2


def test_a_cluster_that_is_not_there_is_not_retried(fake_ray: Any) -> None:
    fake = fake_ray(["Could not find any running Ray instance"])
    with pytest.raises(run.StudyError, match="the Ray cluster at ray://nowhere:10001.*ray status"):
        run._init_ray(_args(address="ray://nowhere:10001"))
    assert len(fake.calls) == 1


@pytest.mark.parametrize(("exc", "full"), [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (RuntimeError("(sqlite3.OperationalError) database or disk is full"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (ValueError("bad"), False),
])
def test_disk_full_is_found_through_the_cause_chain(exc: BaseException, full: bool) -> None:
    try:
        try:
            raise exc
        except BaseException as inner:
            raise RuntimeError("Tune failed") from inner
    except RuntimeError as outer:
        assert run._disk_full(outer) is full


def test_overrides_are_validated_and_zero_budget_means_none() -> None:
    from tune.space import SpaceError, load_space

    spec = load_space("smoke")
    args = argparse.Namespace(num_samples=5, max_concurrent=3, time_budget_s=0.0)
    t = run._apply_overrides(spec, args).tune
    assert (t.num_samples, t.max_concurrent_trials, t.time_budget_s) == (5, 3, None)
    with pytest.raises(SpaceError, match="--num-samples=0"):
        run._apply_overrides(spec, argparse.Namespace(num_samples=0, max_concurrent=None, time_budget_s=None))
    with pytest.raises(SpaceError, match="--time-budget-s=-1"):
        run._apply_overrides(spec, argparse.Namespace(num_samples=None, max_concurrent=None, time_budget_s=-1.0))


def test_time_budget_counts_for_the_whole_study() -> None:
    from types import SimpleNamespace

    record = SimpleNamespace(manifest=SimpleNamespace(history=[
        {"run": 1, "started": "x"}, {"run": 1, "seconds": 400.0}, {"run": 2, "seconds": 150.5}]))
    assert run._time_budget(record, 600.0) == (pytest.approx(49.5), pytest.approx(550.5))
    assert run._time_budget(record, None) == (None, pytest.approx(550.5))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../escape", ".hidden", "x\\y", "nl\nx"])
def test_a_study_name_is_one_folder_name(name: str) -> None:
    with pytest.raises(run.StudyError, match="is not allowed: a study name is one folder name"):
        run._check_name(name)


def test_ordinary_names_pass() -> None:
    for name in ("sft", "my study", "lr-sweep_2"):
        run._check_name(name)


def test_an_address_with_nothing_listening_fails_at_once() -> None:
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(run.StudyError, match=f"--address=127.0.0.1:{port}: no Ray cluster answers"):
        run._probe_address(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 6
    run._probe_address("auto")  # left to Ray
    run._probe_address("ray://head:10001")


def _study_with(folder: Any, epochs: int) -> None:
    import optuna

    from tune.record import StudyRecord

    record = StudyRecord.create(folder, folder.name, {"tune": {"mode": "min"}}, "", {})
    number, _ = record.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    for epoch in range(1, epochs + 1):
        record.record_epoch(number, epoch, {"val_loss": 1.0}, "val_loss")


def test_a_restart_cut_short_before_any_result_gives_the_old_study_back(tmp_path: Any) -> None:
    old, new = tmp_path / ".s.replaced-20261201-000000", tmp_path / "s"
    _study_with(old, 2)
    (old / "keep.txt").write_text("the old study")
    _study_with(new, 0)  # the killed --restart had created the new study, without any result
    run._finish_pending_restart(new)
    assert (new / "keep.txt").read_text() == "the old study" and not old.exists()


def test_a_restart_cut_short_after_a_result_completes_the_replacement(tmp_path: Any) -> None:
    old, new = tmp_path / ".s.replaced-20261201-000000", tmp_path / "s"
    _study_with(old, 2)
    _study_with(new, 1)
    run._finish_pending_restart(new)
    assert not old.exists() and (new / "study.json").exists() and not (new / "keep.txt").exists()


def test_a_pending_restart_is_found_whatever_the_name(tmp_path: Any) -> None:
    old, new = tmp_path / ".r[1].replaced-20261201-000000", tmp_path / "r[1]"
    _study_with(old, 1)
    run._finish_pending_restart(new)  # the killed --restart had not created the new study yet
    assert (new / "study.json").exists() and not old.exists()


def test_a_trial_without_all_its_values_is_abandoned_never_run_with_defaults(tmp_path: Any) -> None:
    import optuna

    from tune.record import StudyRecord
    from tune.space import load_space

    spec = load_space("smoke")
    record = StudyRecord.create(tmp_path / "s", "s", {"tune": {"mode": "min"}}, "", {})
    record.study.ask()  # a driver killed inside ask(): the trial exists, its values do not
    lr = {p.path: d for p, d in zip(spec.search, [optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                                                 optuna.distributions.CategoricalDistribution([1, 2])])}
    whole, _ = record.ask(lr)
    plans = run._resume_plans(record, spec)
    assert [p.number for p in plans] == [whole]
    assert record.trial(0).status == "abandoned" and record.finished_count() == 0
    assert record.study.trials[0].state == optuna.trial.TrialState.FAIL
