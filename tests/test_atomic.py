"""tune.atomic: files written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from tune.atomic import leftovers, staged, write_atomic


def test_a_file_replaces_the_old_one_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "study.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError), staged(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed halfway")
    assert target.read_text() == "old"  # (the failed write left the old file, and no hidden copy)
    write_atomic(target, "new", durable=False)
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]  # (nor did the good ones)


def test_a_killed_writers_leftovers_are_found(tmp_path: Path) -> None:
    (tmp_path / ".epoch_0002.123.tmp").mkdir()
    (tmp_path / ".study.json.9.tmp").write_text("")
    assert [p.name for p in leftovers(tmp_path, "epoch_")] == [".epoch_0002.123.tmp"]
    assert len(leftovers(tmp_path)) == 2
