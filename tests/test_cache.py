"""The token cache of minimind_train.data: keys, hits, invalidation, layout and concurrent builds."""

from __future__ import annotations

import json
import logging
import multiprocessing
import pickle
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FIXTURES, need_shared

import minimind_train.data as data_mod
from minimind_train.config import DataConfig
from minimind_train.data import (
    TokenizedDataset,
    batch_indices,
    collate,
    encode_conversation,
    iterate_batches,
    load_or_build_cache,
    prepare_data,
    resolve_cache_dir,
)


@pytest.fixture(scope="module")
def tok() -> Any:
    """The bundled tokenizer, or the MiniMind2 fixture one while no bundle is present."""
    from minimind_train.tokenizer import load_tokenizer

    try:
        return load_tokenizer(None)
    except FileNotFoundError:
        return load_tokenizer(need_shared(FIXTURES))


def _rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    words = ["sun", "rain", "river", "stone", "light", "green", "cloud", "north", "quiet", "swift"]
    rows = []
    for i in range(n):
        convs: list[dict[str, str]] = []
        if i % 5 == 0:
            convs.append({"role": "system", "content": "Be terse."})
        for _ in range(int(rng.integers(1, 3))):
            convs.append({"role": "user", "content": " ".join(rng.choice(words, int(rng.integers(1, 10))))})
            convs.append({"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(1, 40))))})
        rows.append({"conversations": convs})
    return rows


def _write(path: Path, rows: list[dict[str, Any]], extra_lines: tuple[str, ...] = ()) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return path


class _CountingTokenize:
    def __init__(self) -> None:
        self.calls = 0
        self.real = data_mod._tokenize

    def __call__(self, tokenizer: Any, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        return self.real(tokenizer, texts)


def _cache_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir())


def test_second_prepare_is_a_hit(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "d.jsonl", _rows(30))
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "cache"))
    counter = _CountingTokenize()
    monkeypatch.setattr(data_mod, "_tokenize", counter)
    first = prepare_data(cfg, tok)
    assert counter.calls > 0
    meta = Path(first.stats.cache_path) / "meta.json"
    stamp = meta.stat().st_mtime_ns
    counter.calls = 0
    second = prepare_data(cfg, tok)
    assert counter.calls == 0
    assert meta.stat().st_mtime_ns == stamp
    assert second.stats == first.stats
    assert _cache_dirs(tmp_path / "cache") == [Path(first.stats.cache_path)]


def test_layout_is_memory_mapped_npy(tmp_path: Path, tok: Any) -> None:
    path = _write(tmp_path / "d.jsonl", _rows(20), extra_lines=('{"conversations": []}',))
    cache = load_or_build_cache(path, tok, 64, tmp_path / "cache")
    assert cache.path.parent == tmp_path / "cache" and cache.path.name.startswith("d-")
    assert sorted(p.name for p in cache.path.iterdir()) == sorted(
        ["meta.json", "tokens.npy", "mask.npy", "offsets.npy", "lines.npy", "supervised.npy"])
    expected_dtype = np.uint16 if len(tok) < 2**16 else np.int32
    assert isinstance(cache.tokens, np.memmap) and cache.tokens.dtype == expected_dtype
    assert cache.mask.dtype == bool and cache.offsets.dtype == np.int64
    assert cache.offsets[0] == 0 and cache.offsets[-1] == cache.tokens.size == cache.meta["num_tokens"]
    assert cache.num_samples == 20 and cache.lines.tolist() == list(range(1, 21))
    assert cache.supervised.sum() == cache.mask.sum() == cache.meta["num_supervised"]
    assert cache.lengths.max() <= 64
    meta = cache.meta
    assert meta["source"] == str(path.resolve()) and meta["key"] in cache.path.name
    assert meta["skipped"]["no_assistant"] == 1
    assert set(meta["key_parts"]) >= {"data_sha256", "tokenizer", "max_seq_len", "chat_template_sha256",
                                      "version"}


def test_changes_invalidate(tmp_path: Path, tok: Any) -> None:
    root = tmp_path / "cache"
    path = _write(tmp_path / "d.jsonl", _rows(10))
    base = load_or_build_cache(path, tok, 64, root)
    assert load_or_build_cache(path, tok, 64, root).key == base.key
    assert load_or_build_cache(path, tok, 65, root).key != base.key

    # Same size and same path, one byte different: the content hash, not the mtime, decides.
    text = path.read_text()
    changed = text.replace("sun", "sum", 1) if "sun" in text else text.replace("rain", "raid", 1)
    assert len(changed) == len(text) and changed != text
    path.write_text(changed)
    edited = load_or_build_cache(path, tok, 64, root)
    assert edited.key != base.key
    assert not np.array_equal(np.asarray(edited.tokens), np.asarray(base.tokens))

    tok_dir = tmp_path / "tok"
    shutil.copytree(tok.name_or_path, tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["model_max_length"] = 1024
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    from minimind_train.tokenizer import load_tokenizer

    other = load_or_build_cache(path, load_tokenizer(tok_dir), 64, root)
    assert other.key != edited.key
    assert len(_cache_dirs(root)) == 4


def test_cached_batches_equal_direct_encoding(tmp_path: Path, tok: Any) -> None:
    rows = _rows(60, seed=4)
    rows[7]["conversations"][-1]["content"] = "word " * 300  # truncated to max_seq_len
    path = _write(tmp_path / "d.jsonl", rows)
    data = prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "cache"),
                                   max_seq_len=96, val_fraction=0.2), tok)
    for ds in (data.train, data.val):
        lines = ds.cache.lines[ds.indices]
        direct = [encode_conversation(tok, rows[int(line) - 1]["conversations"], 96) for line in lines]
        for i, (ids, labels) in enumerate(direct):
            x, y = ds[i]
            assert x.tolist() == ids and y.tolist() == labels
        order = batch_indices(ds.lengths, 8, seed=1, epoch=0)
        for items, (x, y) in zip(order, iterate_batches(ds, order, data.pad_id), strict=True):
            ref_x, ref_y = collate([(torch.tensor(direct[i][0]), torch.tensor(direct[i][1])) for i in items],
                                   data.pad_id)
            assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    assert max(data.train.lengths.max(), data.val.lengths.max()) == 96


def test_unreadable_cache_is_rebuilt(tmp_path: Path, tok: Any) -> None:
    path = _write(tmp_path / "d.jsonl", _rows(10))
    first = load_or_build_cache(path, tok, 64, tmp_path / "cache")
    expected = np.asarray(first.tokens).copy()
    (first.path / "tokens.npy").unlink()
    again = load_or_build_cache(path, tok, 64, tmp_path / "cache")
    assert again.path == first.path and np.array_equal(np.asarray(again.tokens), expected)
    assert _cache_dirs(tmp_path / "cache") == [first.path]


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("MINIMIND_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir(None) == tmp_path / "home" / ".cache" / "minimind-tune" / "tokens"


def test_dataset_pickles_by_path(tmp_path: Path, tok: Any) -> None:
    path = _write(tmp_path / "d.jsonl", _rows(12))
    ds = TokenizedDataset(load_or_build_cache(path, tok, 64, tmp_path / "cache"), [3, 1, 7])
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # the token arrays stay on disk
    copy = pickle.loads(blob)
    assert len(copy) == 3 and np.array_equal(copy.lengths, ds.lengths)
    for i in range(3):
        assert all(torch.equal(a, b) for a, b in zip(copy[i], ds[i]))


def _gate_publish(monkeypatch: pytest.MonkeyPatch, barrier: Any) -> None:
    """Hold every builder at the publish step until all have built: a forced publish race."""
    real = data_mod._publish

    def gated(tmp: Path, final: Path) -> None:
        barrier.wait(timeout=60)
        real(tmp, final)

    monkeypatch.setattr(data_mod, "_publish", gated)


def _assert_single_valid_cache(root: Path, keys: list[str], path: Path, tok: Any) -> None:
    assert len(set(keys)) == 1
    assert [p.name for p in _cache_dirs(root)] == [f"{path.stem}-{keys[0]}"]  # no temp folders left
    cache = load_or_build_cache(path, tok, 64, root)
    assert cache.key == keys[0] and cache.num_samples == 40


def test_concurrent_threads_build_one_cache(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="minimind_train.data")
    path = _write(tmp_path / "d.jsonl", _rows(40))
    root = tmp_path / "cache"
    _gate_publish(monkeypatch, threading.Barrier(2))
    keys: list[str] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            cache = load_or_build_cache(path, tok, 64, root)
            keys.append(cache.key)
            assert cache.num_samples == 40
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(keys) == 2
    assert "published concurrently" in caplog.text  # the losing builder kept the winner's cache
    _assert_single_valid_cache(root, keys, path, tok)


def _build_in_child(path: str, tok: Any, root: str, queue: Any) -> None:
    try:
        queue.put(load_or_build_cache(path, tok, 64, root).key)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(f"error: {exc!r}")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_processes_build_one_cache(tmp_path: Path, tok: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = multiprocessing.get_context("fork")
    path = _write(tmp_path / "d.jsonl", _rows(40))
    root = tmp_path / "cache"
    _gate_publish(monkeypatch, ctx.Barrier(2))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(path), tok, str(root), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    keys = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert not [k for k in keys if k.startswith("error")], keys
    _assert_single_valid_cache(root, keys, path, tok)
