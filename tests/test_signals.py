"""minimind_train.signals: a stop signal received inside a deferred step acts right after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from minimind_train.signals import signals_deferred


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_acts_after_the_step_through_the_handler_in_place(signum: int) -> None:
    seen: list[str] = []
    previous = signal.signal(signum, lambda n, f: seen.append("handler"))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # (Python runs handlers between bytecodes: give it many)
                pass
            seen.append("step done")
        assert seen == ["step done", "handler"]
        assert signal.getsignal(signum) is not None and seen.count("handler") == 1
    finally:
        signal.signal(signum, previous)


def test_an_ignored_signal_stays_ignored() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_default_action_is_taken_after_the_step() -> None:
    """With SIGTERM's default action the process ends by it, but only once the step is done."""
    code = ("import os, signal, sys\nfrom minimind_train.signals import signals_deferred\n"
            "with signals_deferred():\n    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    print('step done', flush=True)\nprint('after')\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM and done.stdout == "step done\n", done


def test_outside_the_main_thread_the_step_runs_as_it_is() -> None:
    ran: list[bool] = []

    def body() -> None:
        with signals_deferred():
            ran.append(True)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert ran == [True]
