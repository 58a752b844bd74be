"""tune.interrupts: a full disk is recognised anywhere in an exception's chain."""

from __future__ import annotations

import errno

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
