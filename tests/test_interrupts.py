"""tune.interrupts: both signals stop the driver whatever it inherited, and an OS error (a full disk,
permissions, a locked record, a name too long) is recognised anywhere in an exception's chain."""

from __future__ import annotations

import errno
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tune import interrupts


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
        assert interrupts.disk_full(outer) is full


@pytest.fixture
def own_handlers() -> Iterator[None]:
    """The test process's SIGINT and SIGTERM handlers, put back after the test."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_both_signals_stop_the_driver_even_with_sigint_inherited_ignored(own_handlers: None, signum: int) -> None:
    """A background job of a non-interactive shell starts with SIGINT ignored: SIGTERM was forwarded to it
    (and lost), SIGINT never stopped it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    interrupts.stop_on_signals()
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signum)


def test_sigterm_while_ray_tune_holds_sigint_ends_the_trials_its_way(own_handlers: None) -> None:
    """During Tuner.fit() Ray Tune's Ctrl-C handler ends the trials gracefully: SIGTERM does the same."""
    interrupts.stop_on_signals()
    seen: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))  # (as Ray Tune's handler)
    signal.raise_signal(signal.SIGTERM)
    assert seen == [signal.SIGINT]


def test_a_signal_during_a_deferred_step_stops_right_after_it(own_handlers: None) -> None:
    interrupts.stop_on_signals()
    done = []
    with pytest.raises(KeyboardInterrupt), interrupts.signals_deferred():
        signal.raise_signal(signal.SIGTERM)
        done.append("the step")
    assert done == ["the step"]
    assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGINT)  # (the driver's, back)


def test_first_line_is_the_first() -> None:
    assert interrupts.first_line(RuntimeError("one\ntwo")) == "one"
    assert interrupts.first_line(RuntimeError()) == "RuntimeError"


def _wrapped(exc: BaseException) -> BaseException:
    """``exc`` as the driver meets it: under Ray Tune's and Optuna's own exceptions."""
    try:
        try:
            raise exc
        except BaseException as inner:
            raise RuntimeError("An exception is raised during the commit. e.g. exceeding max length.") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(("exc", "expected"), [
    (OSError(errno.EACCES, "Permission denied", "/st/s/best.yaml"), "cannot write /st/s/best.yaml (Permission denied)"),
    (OSError(errno.EROFS, "Read-only file system", "/st/s/.x.tmp"), "cannot write /st/s/.x.tmp (Read-only file system)"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "/st/" + "n" * 300), "File name too long: choose a shorter"),
    (OSError(errno.ENOSPC, "No space left on device", "/st/s/optuna.db"), "the disk holding /st/s/optuna.db is full"),
    (RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database"), "cannot be written (read-only)"),
    (RuntimeError("(sqlite3.OperationalError) unable to open database file"), "make its folder exist and be writable"),
])
def test_an_os_error_is_one_line_naming_the_path_and_what_to_do(exc: BaseException, expected: str,
                                                                tmp_path: Path) -> None:
    record = tmp_path / "optuna.db"
    record.touch()
    line = interrupts.os_problem(_wrapped(exc), record)
    assert line is not None and expected in line and "\n" not in line
    assert interrupts.os_problem(_wrapped(ValueError("a bug"))) is None


def test_the_record_deleted_under_the_driver_is_named(tmp_path: Path) -> None:
    exc = RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database")
    line = interrupts.os_problem(_wrapped(exc), tmp_path / "optuna.db")
    assert line is not None and "was deleted while the driver used it" in line, line
    assert f"move {tmp_path} away, then start the study again" in line, line  # (what to do)


def test_optuna_db_locked_by_another_process_is_one_line(tmp_path: Path) -> None:
    """The shared case optuna-db-locked (optuna#820): another process holds a write lock for longer than
    the busy timeout; Optuna's own message blames the data ("exceeding max length")."""
    import sqlite3

    import optuna

    db = tmp_path / "optuna.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 0.1}})
    study = optuna.create_study(storage=storage)
    holder = sqlite3.connect(db, timeout=0, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Exception) as caught:
            study.ask()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    line = interrupts.os_problem(caught.value, db)
    assert line is not None and f"the study record {db} stayed locked by another process" in line
