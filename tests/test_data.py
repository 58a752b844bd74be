"""A run's SFT data (minimind_train.data): the train/val split, an explicit validation file, the
validation cap, the stats and warnings about skipped samples, and reopening from the cache folders."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import msg, qa, synthetic_rows, write_rows

from minimind_train.config import DataConfig
from minimind_train.data import DEMO_DATA_PATH, DataError, open_prepared, prepare_data
from minimind_train.token_cache import SkipCounts


def test_split_is_deterministic_disjoint_and_complete(tmp_path: Path, tok: Any) -> None:
    path = write_rows(tmp_path / "d.jsonl", synthetic_rows(50))
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"), val_fraction=0.2, split_seed=3)
    a, b = prepare_data(cfg, tok), prepare_data(cfg, tok)
    assert np.array_equal(a.train.indices, b.train.indices)
    assert np.array_equal(a.val.indices, b.val.indices)
    assert len(a.val) == 10 and len(a.train) == 40
    assert sorted([*a.train.indices.tolist(), *a.val.indices.tolist()]) == list(range(50))
    c = prepare_data(dataclasses.replace(cfg, split_seed=4), tok)
    assert not np.array_equal(a.val.indices, c.val.indices)
    cache = a.train.cache
    spans = [(cache.offsets[i], cache.offsets[i + 1]) for i in a.train.indices]
    assert a.stats.train_supervised_tokens == sum(int(cache.mask[lo:hi].sum()) for lo, hi in spans)
    assert a.stats.train_tokens == int(a.train.lengths.sum()) == sum(int(hi - lo) for lo, hi in spans)
    assert a.pad_id == tok.pad_token_id and a.vocab_size == len(tok)


def test_split_that_would_be_empty_is_an_error(tmp_path: Path, tok: Any) -> None:
    path = write_rows(tmp_path / "d.jsonl", synthetic_rows(4))
    with pytest.raises(DataError, match="validation split is empty"):
        prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path), val_fraction=0.1), tok)
    with pytest.raises(DataError, match="training split is empty"):
        prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path), val_fraction=0.9), tok)


def test_explicit_val_path(tmp_path: Path, tok: Any) -> None:
    train = write_rows(tmp_path / "train.jsonl", synthetic_rows(6, seed=1))
    val = write_rows(tmp_path / "val.jsonl", [*synthetic_rows(3, seed=2), {"conversations": [msg("user", "q")]}])
    data = prepare_data(DataConfig(train_path=str(train), val_path=str(val),
                                   cache_dir=str(tmp_path / "c")), tok)
    assert (len(data.train), len(data.val)) == (6, 3)
    assert data.stats.val_skipped == SkipCounts(no_assistant=1)
    assert data.stats.val_cache_key not in (None, data.stats.cache_key)
    empty = write_rows(tmp_path / "empty.jsonl", [{"conversations": [msg("user", "q")]}])
    with pytest.raises(DataError, match="empty.jsonl"):
        prepare_data(DataConfig(train_path=str(train), val_path=str(empty),
                                cache_dir=str(tmp_path / "c")), tok)


def test_val_max_samples_caps_the_validation_split(tmp_path: Path, tok: Any) -> None:
    path = write_rows(tmp_path / "d.jsonl", synthetic_rows(100))
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"), val_fraction=0.3)
    full = prepare_data(cfg, tok)
    capped = prepare_data(dataclasses.replace(cfg, val_max_samples=7), tok)
    assert full.stats.val_samples == 30 and capped.stats.val_samples == 7
    assert set(capped.val.indices) <= set(full.val.indices)
    assert np.array_equal(capped.train.indices, full.train.indices)


def test_skipped_samples_are_in_the_stats(tmp_path: Path, tok: Any) -> None:
    path = write_rows(tmp_path / "mixed.jsonl", [
        qa("Hi", "Hello."), "", {"conversations": [msg("user", "only a question")]},
        {"conversations": "user: q"}, qa("word " * 200, "too late"), qa("Bye", "Goodbye.")])
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"), max_seq_len=64, val_fraction=0.5)
    data = prepare_data(cfg, tok)
    assert data.stats.skipped == SkipCounts(invalid_format=1, no_assistant=1, truncated=1)
    assert data.stats.train_samples + data.stats.val_samples == 2
    assert data.stats_dict()["skipped.truncated"] == 1 and data.stats_dict()["skipped.no_assistant"] == 1
    assert json.loads(json.dumps(data.stats_dict())) == data.stats_dict()


def test_unknown_fields_are_reported(tmp_path: Path, tok3: Any, rows3: list,
                                     caplog: pytest.LogCaptureFixture) -> None:
    extra = {"conversations": [msg("user", "u"), {"role": "assistant", "content": "a", "name": "bot"}]}
    legacy = {"conversations": [{"role": "system", "content": "s", "functions": "[]"},
                                msg("user", "u"), msg("assistant", "a")]}
    path = write_rows(tmp_path / "d.jsonl", [*rows3, extra, legacy, extra])
    with caplog.at_level(logging.WARNING, logger="minimind_train.data"):
        data = prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"),
                                       val_fraction=0.2, max_seq_len=768), tok3)
    assert data.stats.skipped.unknown_field == 3
    assert data.stats.unknown_fields == "functions x1, name x2"
    assert data.stats.train_samples + data.stats.val_samples == 6  # the tool-use conversation is kept
    warnings = [r.getMessage() for r in caplog.records if "unknown message fields" in r.getMessage()]
    assert len(warnings) == 1 and "name x2" in warnings[0]


def test_empty_after_filtering_is_an_error(tmp_path: Path, tok: Any) -> None:
    path = write_rows(tmp_path / "empty.jsonl", [{"conversations": [msg("user", "q")]}, "",
                                                 {"conversations": [msg("user", "q"), msg("x", "a")]}])
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable SFT samples; all 2 were skipped "
                                        r"\(unknown_role=1, no_assistant=1\)"):
        prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c")), tok)
    path = write_rows(tmp_path / "long.jsonl", [qa("word " * 200, "too late")])
    with pytest.raises(DataError, match="with data.max_seq_len=64 no answer token is left in the window"):
        prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"), max_seq_len=64), tok)


def test_an_unusable_file_says_what_to_change(tmp_path: Path, tok: Any) -> None:
    """Each kind of wholly unusable file names its cure in the one error line (a user sees no warning)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    tool = {"conversations": [msg("user", "1+1?"), {"role": "assistant", "content": None, "tool_calls": "[]"},
                              msg("tool", "2"), msg("assistant", "2")]}
    field = {"conversations": [msg("user", "q"), {"role": "assistant", "content": "a", "name": "bot"}]}
    cases = {empty: "no SFT samples: the file is empty",
             write_rows(tmp_path / "tool.jsonl", [tool] * 3): r"unknown_role=3\); roles are system, user, "
                                                                r"assistant, and tool only where .* MiniMind2's does not",
             write_rows(tmp_path / "field.jsonl", [field] * 2): r"unknown message fields \(name x2\)"}
    for path, expected in cases.items():
        with pytest.raises(DataError, match=expected):
            prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c")), tok)


def test_missing_file_is_a_data_error(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(DataError, match="not found"):
        prepare_data(DataConfig(train_path=str(tmp_path / "nope.jsonl"), cache_dir=str(tmp_path)), tok)


def test_default_train_path_is_the_bundled_demo_set(tmp_path: Path, tok: Any) -> None:
    data = prepare_data(DataConfig(cache_dir=str(tmp_path)), tok)
    assert data.train.cache.meta["source"] == str(DEMO_DATA_PATH)
    assert len(data.train) + len(data.val) == len(DEMO_DATA_PATH.read_text(encoding="utf-8").splitlines())


def test_open_prepared_reopens_the_same_splits(tmp_path: Path, tok: Any) -> None:
    train = write_rows(tmp_path / "train.jsonl", synthetic_rows(20, seed=1))
    val = write_rows(tmp_path / "val.jsonl", synthetic_rows(5, seed=2))
    for cfg in (DataConfig(train_path=str(train), cache_dir=str(tmp_path / "c"), val_max_samples=4),
                DataConfig(train_path=str(train), val_path=str(val), cache_dir=str(tmp_path / "c"))):
        data = prepare_data(cfg, tok)
        again = open_prepared(cfg, data.stats.cache_path, data.stats.val_cache_path, pad_id=data.pad_id,
                              vocab_size=data.vocab_size)
        assert again.stats == data.stats and (again.pad_id, again.vocab_size) == (data.pad_id, data.vocab_size)
        assert np.array_equal(again.train.indices, data.train.indices)
        assert np.array_equal(again.val.indices, data.val.indices)
    with pytest.raises(ValueError, match="does not match data.val_path"):
        open_prepared(cfg, data.stats.cache_path, None, pad_id=0, vocab_size=1)
