"""tune.experiment without a study: Ray's start-up retried once and explained, faults told apart."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tune import experiment
from tune.study import StudyError


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


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> Any:
    import ray

    def install(failures: list[str]) -> _FakeRay:
        fake = _FakeRay(failures)
        monkeypatch.setattr(ray, "init", fake.init)
        monkeypatch.setattr(ray, "shutdown", fake.shutdown)
        monkeypatch.setattr(experiment.time, "sleep", lambda s: None)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        return fake

    return install


def test_a_slow_ray_start_is_retried_once(fake_ray: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake = fake_ray([TIMEOUT])
    experiment.init_ray(None, "/tmp/rt")
    assert len(fake.calls) == 2 and fake.shutdowns == 1
    assert fake.calls[0]["_temp_dir"] == "/tmp/rt" and not fake.calls[0]["include_dashboard"]
    assert "trying once more" in capsys.readouterr().err


def test_ray_that_never_starts_is_one_clear_error(fake_ray: Any) -> None:
    fake = fake_ray([TIMEOUT, TIMEOUT])
    with pytest.raises(StudyError) as err:
        experiment.init_ray(None, "/tmp/rt")
    text = str(err.value)
    assert "could not start a local Ray: The current node timed out during startup" in text
    assert "retry" in text and "--address" in text and "\n" not in text
    assert len(fake.calls) == 2


def test_a_cluster_that_is_not_there_is_not_retried(fake_ray: Any) -> None:
    fake = fake_ray(["Could not find any running Ray instance"])
    with pytest.raises(StudyError, match="the Ray cluster at ray://nowhere:10001.*ray status"):
        experiment.init_ray("ray://nowhere:10001", None)
    assert len(fake.calls) == 1


def test_an_address_with_nothing_listening_fails_at_once() -> None:
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(StudyError, match=f"--address=127.0.0.1:{port}: no Ray cluster answers"):
        experiment.probe_address(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 6
    experiment.probe_address("auto")  # left to Ray
    experiment.probe_address("ray://head:10001")


def test_a_driver_run_keeps_its_length_in_the_record_as_it_goes(tmp_path: Any) -> None:
    """What a SIGKILL would leave at any moment: the run's time so far (to a beat), counted for the budget."""
    import time

    from tune.study import Study

    record = Study.create(tmp_path / "s", "s", {"tune": {"mode": "min"}}, "", {})
    record.add_history({"run": 1, "seconds": 40.0})
    record.add_history({"run": 2, "started": "2026-12-01T08:00:00"})
    clock = experiment.RunClock(record, 2, started=time.monotonic() - 12.0, every_s=5.0)
    clock.on_step_end(1, [])
    assert Study.open(record.dir).seconds_used() == pytest.approx(52.0, abs=1.0)
    clock.started -= 30.0  # 30 s later, but within a beat of the last write: nothing written
    clock.on_step_end(2, [])
    assert Study.open(record.dir).seconds_used() == pytest.approx(52.0, abs=1.0)
    clock.last -= 5.0
    clock.on_step_end(3, [])
    again = Study.open(record.dir)
    assert again.seconds_used() == pytest.approx(82.0, abs=1.0)
    assert len(again.manifest.history) == 3  # the run's one entry, rewritten
    import pickle

    assert pickle.loads(pickle.dumps(clock)).record is None  # Ray's tuner.pkl copy writes nothing


def test_sigterm_while_ray_starts_stops_like_ctrl_c(fake_ray: Any) -> None:
    """ray.init installs its own SIGTERM handler first thing (sys.exit(15)): the driver exited 15 and said
    nothing (the shared case sigterm-sigint-ignored, 2.). Now: KeyboardInterrupt, what started of Ray
    shut down, and the driver's own handler back."""
    import signal

    from tune import interrupts

    fake = fake_ray([])

    def ray_init_killed(**kwargs: Any) -> None:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # (as ray.init does)
        signal.raise_signal(signal.SIGTERM)

    fake.init = ray_init_killed
    import ray

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        interrupts.stop_on_signals()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ray, "init", ray_init_killed)
            with pytest.raises(KeyboardInterrupt):
                experiment.init_ray(None, "/tmp/rt")
        assert fake.shutdowns == 1
        assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_continuing_names_where_each_trial_continues() -> None:
    """The --resume line: after its newest checkpoint's evaluation, or from its start when it saved none
    (it said 'after evaluation 0 (0 epochs)', a new user's finding)."""
    from tune.searcher import ResumePlan

    plans = [ResumePlan(0, {}, 2), ResumePlan(2, {}, 0)]
    assert experiment._continuing(plans, 1) == ("continuing 2 unfinished trial(s) from their checkpoints: "
                                                "t000 (after epoch 2), t002 (from its start: it saved no checkpoint)")
    assert "t000 (after evaluation 2 (0.25 epochs))" in experiment._continuing(plans, 8)
