"""The token cache (minimind_train.token_cache): validation and skip counts, keys, hits, invalidation,
layout, augmentation, parallel and concurrent builds."""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import msg, qa, synthetic_rows, write_rows

from minimind_train import chat, token_cache
from minimind_train.chat import DataError, encode_conversation
from minimind_train.config import DataConfig
from minimind_train.data import prepare_data
from minimind_train.token_cache import SkipCounts, load_or_build_cache, resolve_cache_dir
from minimind_train.tokenizer import load_tokenizer


class _CountingTokenize:
    def __init__(self) -> None:
        self.calls = 0
        self.real = chat.tokenize

    def __call__(self, tokenizer: Any, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        return self.real(tokenizer, texts)


def _cache_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir())


# ---------------------------------------------------------------------------------------------------
# Reading, validation and skip counts


def test_malformed_json_names_file_and_line(tmp_path: Path, tok: Any) -> None:
    path = write_rows(tmp_path / "bad.jsonl", [qa("a", "b"), "", '{"conversations": [', qa("c", "d")])
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_or_build_cache(path, tok, 64, tmp_path / "c")
    assert not list((tmp_path / "c").iterdir())  # the failed build left nothing behind


def test_invalid_utf8_is_a_data_error(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"conversations": [{"role": "user", "content": "\xe9"}]}\n')
    with pytest.raises(DataError, match=rf"{path}:1:"):
        load_or_build_cache(path, tok, 64, tmp_path / "c")


def test_bad_samples_are_skipped_and_counted(tmp_path: Path, tok: Any) -> None:
    path = write_rows(tmp_path / "mixed.jsonl", [
        qa("Hi", "Hello."),
        "",
        "   ",
        {"conversations": [msg("user", "only a question")]},
        {"conversations": [msg("user", "q"), msg("bot", "a")]},
        {"conversations": [msg("user", "q"), msg("assistant", ["a"])]},
        {"conversations": [msg("user", "q"), {"role": "assistant"}]},
        {"conversations": "user: q"},
        {"messages": [msg("user", "q"), msg("assistant", "a")]},
        [1, 2],
        {"conversations": [msg("assistant", "greeting only")]},
        qa("word " * 200, "too late"),
        qa("Bye", "Goodbye."),
    ])
    cache = load_or_build_cache(path, tok, 64, tmp_path / "c")
    assert cache.lines.tolist() == [1, 13]
    # (MiniMind2's template cannot join a null assistant content: upstream's fails there too.)
    assert cache.skipped == SkipCounts(invalid_format=3, unknown_role=1, non_string_content=1,
                                       no_assistant=1, template_error=1, no_supervised_tokens=1, truncated=1)
    assert cache.skipped.total == 9 and str(cache.skipped).startswith("invalid_format=3, unknown_role=1")


def test_template_errors_are_skipped(tmp_path: Path, tok: Any) -> None:
    strict_dir = tmp_path / "strict"
    shutil.copytree(tok.name_or_path, strict_dir)
    config = json.loads((strict_dir / "tokenizer_config.json").read_text())
    # A strict template in the style of those that enforce role order.
    config["chat_template"] = ("{% if messages|length > 2 %}{{ raise_exception('one exchange only') }}"
                               "{% endif %}" + config["chat_template"])
    (strict_dir / "tokenizer_config.json").write_text(json.dumps(config))
    two_rounds = {"conversations": [msg("user", "a"), msg("assistant", "b"),
                                    msg("user", "c"), msg("assistant", "d")]}
    path = write_rows(tmp_path / "d.jsonl", [two_rounds, *(qa(f"q{i}", f"a{i}") for i in range(4))])
    cache = load_or_build_cache(path, load_tokenizer(strict_dir), 64, tmp_path / "c")
    assert cache.skipped == SkipCounts(template_error=1) and cache.num_samples == 4


def test_unknown_fields_are_counted(tmp_path: Path, tok3: Any, rows3: list) -> None:
    extra = {"conversations": [msg("user", "u"), {"role": "assistant", "content": "a", "name": "bot"}]}
    legacy = {"conversations": [{"role": "system", "content": "s", "functions": "[]"},
                                msg("user", "u"), msg("assistant", "a")]}
    path = write_rows(tmp_path / "d.jsonl", [*rows3, extra, legacy, extra])
    cache = load_or_build_cache(path, tok3, 768, tmp_path / "c")
    assert cache.skipped == SkipCounts(unknown_field=3)
    assert cache.meta["unknown_fields"] == {"functions": 1, "name": 2}
    assert cache.num_samples == 6  # the tool-use conversation is kept


def test_null_content_beside_tool_calls_is_kept(tmp_path: Path, tok3: Any, rows3: list) -> None:
    # Real tool-use data: "content": null on an assistant message that only calls tools.
    rows = [{"conversations": [{**m, "content": None} if m.get("tool_calls") else m for m in r["conversations"]]}
            for r in rows3]
    assert rows != rows3
    cache = load_or_build_cache(write_rows(tmp_path / "d.jsonl", rows), tok3, 768, tmp_path / "c")
    assert cache.skipped == SkipCounts() and cache.num_samples == len(rows3)


def test_tool_role_needs_a_template_that_renders_it(tmp_path: Path, tok: Any, rows3: list) -> None:
    # The bundled MiniMind2 tokenizer: no tool branch in its template.
    cache = load_or_build_cache(write_rows(tmp_path / "d.jsonl", rows3), tok, 768, tmp_path / "c")
    assert cache.skipped == SkipCounts(unknown_role=1) and cache.num_samples == 5


# ---------------------------------------------------------------------------------------------------
# Keys, hits, layout


def test_second_prepare_is_a_hit(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_rows(tmp_path / "d.jsonl", synthetic_rows(30))
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "cache"))
    counter = _CountingTokenize()
    monkeypatch.setattr(chat, "tokenize", counter)
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
    path = write_rows(tmp_path / "d.jsonl", [*synthetic_rows(20), '{"conversations": []}'])
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
    assert np.diff(cache.offsets).max() <= 64
    meta = cache.meta
    assert meta["source"] == str(path.resolve()) and meta["key"] in cache.path.name
    assert meta["skipped"]["no_assistant"] == 1
    assert set(meta["key_parts"]) >= {"data_sha256", "tokenizer", "max_seq_len", "chat_template_sha256",
                                      "version"}


def test_changes_invalidate(tmp_path: Path, tok: Any) -> None:
    root = tmp_path / "cache"
    path = write_rows(tmp_path / "d.jsonl", synthetic_rows(10))
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
    other = load_or_build_cache(path, load_tokenizer(tok_dir), 64, root)
    assert other.key != edited.key
    assert len(_cache_dirs(root)) == 4


def test_unreadable_cache_is_rebuilt(tmp_path: Path, tok: Any) -> None:
    path = write_rows(tmp_path / "d.jsonl", synthetic_rows(10))
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


def test_augmentation_is_off_by_default_and_seeded(tmp_path: Path, tok3: Any, rows3: list) -> None:
    rows = rows3[:4] * 50
    path = write_rows(tmp_path / "d.jsonl", rows)
    root = tmp_path / "c"
    plain = load_or_build_cache(path, tok3, 128, root)
    aug = load_or_build_cache(path, tok3, 128, root, augment=True, augment_seed=1)
    again = load_or_build_cache(path, tok3, 128, root, augment=True, augment_seed=1)
    other = load_or_build_cache(path, tok3, 128, root, augment=True, augment_seed=2)
    assert len({plain.key, aug.key, other.key}) == 3 and again.key == aug.key
    base = [encode_conversation(tok3, r["conversations"], 128)[0] for r in rows]
    plain_rows = [plain.tokens[plain.offsets[i]:plain.offsets[i + 1]].tolist() for i in range(len(rows))]
    assert plain_rows == base
    # Conversations 0 and 1 carry an empty think block, stripped with p 0.8: about 80 of 100.
    shorter = sum(int(aug.offsets[i + 1] - aug.offsets[i]) < len(base[i])
                  for i in range(len(rows)) if i % 4 in (0, 1))
    assert 60 <= shorter <= 95
    assert not np.array_equal(np.asarray(aug.tokens), np.asarray(other.tokens))
    # A per-sample draw equals encode_conversation with the same seeded generator.
    ids, _ = encode_conversation(tok3, rows[0]["conversations"], 128, rng=random.Random("1:1"))
    assert aug.tokens[aug.offsets[0]:aug.offsets[1]].tolist() == ids


def test_parallel_cache_equals_serial(tmp_path: Path, tok3: Any, rows3: list) -> None:
    path = write_rows(tmp_path / "d.jsonl", rows3 * 700)  # several chunks
    serial = load_or_build_cache(path, tok3, 128, tmp_path / "a", workers=1)
    parallel = load_or_build_cache(path, tok3, 128, tmp_path / "b", workers=2)
    assert parallel.meta["workers"] == 2 and serial.meta["workers"] == 1
    for name in ("tokens", "mask", "offsets", "lines", "supervised"):
        assert np.array_equal(getattr(serial, name), getattr(parallel, name)), name
    assert serial.meta["skipped"] == parallel.meta["skipped"]


# ---------------------------------------------------------------------------------------------------
# Concurrent builds


def _gate_publish(monkeypatch: pytest.MonkeyPatch, barrier: Any) -> None:
    """Hold every builder at the publish step until all have built: a forced publish race."""
    real = token_cache._publish

    def gated(tmp: Path, final: Path) -> None:
        barrier.wait(timeout=60)
        real(tmp, final)

    monkeypatch.setattr(token_cache, "_publish", gated)


def _assert_single_valid_cache(root: Path, keys: list[str], path: Path, tok: Any) -> None:
    assert len(set(keys)) == 1
    assert [p.name for p in _cache_dirs(root)] == [f"{path.stem}-{keys[0]}"]  # no temp folders left
    cache = load_or_build_cache(path, tok, 64, root)
    assert cache.key == keys[0] and cache.num_samples == 40


def test_concurrent_threads_build_one_cache(tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="minimind_train.token_cache")
    path = write_rows(tmp_path / "d.jsonl", synthetic_rows(40))
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
    path = write_rows(tmp_path / "d.jsonl", synthetic_rows(40))
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
