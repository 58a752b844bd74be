"""Batching (minimind_train.batches): deterministic length-grouped batch order, padded batches that
equal the direct encoding, datasets that pickle by path."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import synthetic_rows, write_rows

from minimind_train.batches import TokenizedDataset, batch_indices
from minimind_train.chat import IGNORE_INDEX, encode_conversation
from minimind_train.config import DataConfig
from minimind_train.data import prepare_data
from minimind_train.token_cache import load_or_build_cache


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 500, size=n)


def _padding(lengths: np.ndarray, batches: list[list[int]]) -> float:
    """Share of padded positions when each batch is padded to its longest sample."""
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - int(lengths.sum()) / padded


@pytest.mark.parametrize("group", [True, False])
def test_batch_indices_deterministic_permutation(group: bool) -> None:
    lengths = _lengths(1000)
    a = batch_indices(lengths, 16, seed=1, epoch=2, group_by_length=group)
    assert a == batch_indices(lengths, 16, seed=1, epoch=2, group_by_length=group)
    assert a != batch_indices(lengths, 16, seed=1, epoch=3, group_by_length=group)
    assert a != batch_indices(lengths, 16, seed=2, epoch=2, group_by_length=group)
    assert sorted(i for b in a for i in b) == list(range(1000))
    sizes = sorted(len(b) for b in a)
    # 1000 = 62 * 16 + 8: one short batch is kept, every other batch is full.
    assert sizes == [8] + [16] * 62
    assert all(isinstance(i, int) for i in a[0])


def test_grouping_reduces_padding() -> None:
    lengths = _lengths(2000)
    grouped = batch_indices(lengths, 16, seed=0, epoch=0, group_by_length=True)
    random_ = batch_indices(lengths, 16, seed=0, epoch=0, group_by_length=False)
    assert _padding(lengths, grouped) < _padding(lengths, random_) / 5
    # Grouping is local: different epochs still mix samples into different batches.
    other = batch_indices(lengths, 16, seed=0, epoch=1, group_by_length=True)
    assert {tuple(sorted(b)) for b in grouped} != {tuple(sorted(b)) for b in other}


def test_batch_indices_without_shuffle() -> None:
    lengths = np.array([3, 1, 2, 9, 4])
    assert batch_indices(lengths, 2, seed=0, epoch=0, shuffle=False, group_by_length=False) == \
        [[0, 1], [2, 3], [4]]
    grouped = batch_indices(lengths, 2, seed=5, epoch=7, shuffle=False)
    assert grouped == batch_indices(lengths, 2, seed=0, epoch=0, shuffle=False)
    assert sorted(i for b in grouped for i in b) == list(range(5))
    assert batch_indices(np.array([], dtype=np.int64), 4, seed=0, epoch=0) == []
    with pytest.raises(ValueError):
        batch_indices(lengths, 0, seed=0, epoch=0)


def test_cached_batches_equal_direct_encoding(tmp_path: Path, tok: Any) -> None:
    rows = synthetic_rows(60, seed=4)
    rows[7]["conversations"][-1]["content"] = "word " * 300  # truncated to max_seq_len
    path = write_rows(tmp_path / "d.jsonl", rows)
    data = prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "cache"),
                                   max_seq_len=96, val_fraction=0.2), tok)
    for ds in (data.train, data.val):
        lines = ds.cache.lines[ds.indices]
        direct = [encode_conversation(tok, rows[int(line) - 1]["conversations"], 96) for line in lines]
        order = batch_indices(ds.lengths, 8, seed=1, epoch=0)
        for items in order:
            x, y = ds.batch(items, data.pad_id)
            assert x.dtype == y.dtype == torch.long
            assert x.shape == y.shape == (len(items), max(len(direct[i][0]) for i in items))
            for row, i in enumerate(items):
                ids, labels = direct[i]
                n = len(ids)
                assert x[row, :n].tolist() == ids and y[row, :n].tolist() == labels
                # Right padding: pad_id inputs that the loss ignores.
                assert (x[row, n:] == data.pad_id).all() and (y[row, n:] == IGNORE_INDEX).all()
    assert max(data.train.lengths.max(), data.val.lengths.max()) == 96


def test_dataset_pickles_by_path(tmp_path: Path, tok: Any) -> None:
    path = write_rows(tmp_path / "d.jsonl", synthetic_rows(12))
    ds = TokenizedDataset(load_or_build_cache(path, tok, 64, tmp_path / "cache"), [3, 1, 7])
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # the token arrays stay on disk
    copy = pickle.loads(blob)
    assert len(copy) == 3 and np.array_equal(copy.lengths, ds.lengths)
    for a, b in zip(copy.batch([0, 1, 2], 0), ds.batch([0, 1, 2], 0)):
        assert torch.equal(a, b)
    with pytest.raises(IndexError):
        TokenizedDataset(ds.cache, [12])
