"""Labels, reading/validation, the train/val split and batching of minimind_train.data."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FIXTURES, need_shared

from minimind_train.config import DataConfig
from minimind_train.data import (
    IGNORE_INDEX,
    DataError,
    SkipCounts,
    batch_indices,
    collate,
    encode_conversation,
    iterate_batches,
    padding_fraction,
    prepare_data,
    read_conversations,
)


@pytest.fixture(scope="module")
def tok() -> Any:
    """The bundled tokenizer, or the MiniMind2 fixture one while no bundle is present."""
    from minimind_train.tokenizer import load_tokenizer

    try:
        return load_tokenizer(None)
    except FileNotFoundError:
        return load_tokenizer(need_shared(FIXTURES))


def _msg(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


def _qa(q: str, a: str) -> dict[str, Any]:
    return {"conversations": [_msg("user", q), _msg("assistant", a)]}


def _write(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line; a str row is written verbatim (blank or malformed lines)."""
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def _supervised_text(tok: Any, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def _synthetic(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "sea", "wind", "light", "shore", "run", "waves"]
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        a = " ".join(rng.choice(words, size=int(rng.integers(1, 60))))
        rows.append(_qa(f"{i}: {q}?", a + "."))
    return rows


# ---------------------------------------------------------------------------------------------------
# encode_conversation


def test_reproduces_upstream_sft_reference(fixture_dir: Path) -> None:
    from minimind_train.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(fixture_dir)
    ref = json.loads((fixture_dir / "sft_reference.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (fixture_dir / "conversations.jsonl").read_text().splitlines()]
    assert len(rows) == len(ref["samples"]) == 4
    for row, sample in zip(rows, ref["samples"]):
        ids, labels = encode_conversation(tokenizer, row["conversations"], ref["max_length"])
        assert ids == sample["input_ids"]
        assert labels == sample["labels"]
        # Upstream's shifted triple is the same supervision seen from the target side.
        y, m = sample["upstream_Y"], sample["upstream_loss_mask"]
        assert [t for t, keep in zip(y, m) if keep] == [lab for lab in labels[1:] if lab != IGNORE_INDEX]


def test_system_message_is_a_system_message(tok: Any) -> None:
    conv = [_msg("system", "Answer briefly."), _msg("user", "Hi"), _msg("assistant", "Hello.")]
    ids, labels = encode_conversation(tok, conv, 512)
    text = tok.decode(ids)
    # Position-alternating roles (upstream) would render the system prompt as a user turn.
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi")
    assert "You are a helpful assistant" not in text
    assert _supervised_text(tok, ids, labels) == "Hello.<|im_end|>\n"


def test_assistant_first_turn_is_context_not_target(tok: Any) -> None:
    conv = [_msg("assistant", "Welcome!"), _msg("user", "Hi"), _msg("assistant", "Hello.")]
    ids, labels = encode_conversation(tok, conv, 512)
    assert "Welcome!" in tok.decode(ids)
    # The template opens no assistant header before a first assistant turn, so only "Hello." is a target.
    assert _supervised_text(tok, ids, labels) == "Hello.<|im_end|>\n"


def test_every_assistant_turn_is_supervised(tok: Any) -> None:
    conv = [_msg("user", "One?"), _msg("assistant", "1."), _msg("user", "Two?"), _msg("assistant", "2.")]
    ids, labels = encode_conversation(tok, conv, 512)
    assert _supervised_text(tok, ids, labels) == "1.<|im_end|>\n2.<|im_end|>\n"
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))


@pytest.mark.parametrize("answer", ["plain", "  leading spaces", "\nleading newline", "", "多语言 ok"])
def test_header_newline_never_supervised(tok: Any, answer: str) -> None:
    ids, labels = encode_conversation(tok, [_msg("user", "q"), _msg("assistant", answer)], 512)
    header = tok("<|im_start|>assistant", add_special_tokens=False)["input_ids"]
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    starts = [i for i in range(len(ids)) if ids[i:i + len(header)] == header]
    assert len(starts) == 1
    newline = starts[0] + len(header)
    assert tok.decode([ids[newline]]).startswith("\n")
    assert labels[:newline + 1] == [IGNORE_INDEX] * (newline + 1)
    end = ids.index(end_id, newline)
    # <|im_end|> and the newline after it are targets; the rest of the span is the answer.
    assert labels[end] == end_id and labels[end + 1] == ids[end + 1] and tok.decode([ids[end + 1]]) == "\n"
    assert all(lab != IGNORE_INDEX for lab in labels[newline + 1:end + 2])


def test_truncation_keeps_a_prefix(tok: Any) -> None:
    conv = [_msg("user", "Tell me a story."), _msg("assistant", "Once upon a time " * 20)]
    full_ids, full_labels = encode_conversation(tok, conv, 10_000)
    for max_length in (5, 30, len(full_ids) - 1, len(full_ids), len(full_ids) + 5):
        ids, labels = encode_conversation(tok, conv, max_length)
        assert len(ids) == len(labels) == min(max_length, len(full_ids))
        assert ids == full_ids[:max_length] and labels == full_labels[:max_length]
    # Cut inside the answer: everything up to the cut is still a target (no <|im_end|> needed).
    ids, labels = encode_conversation(tok, conv, len(full_ids) - 3)
    assert labels[-1] == ids[-1]


@pytest.mark.parametrize("conv", [
    [_msg("user", "q"), _msg("bot", "a")],
    [_msg("user", "q"), _msg("assistant", 42)],
    [_msg("user", "q"), {"content": "no role"}],
    [_msg("user", "q"), "not a message"],
    [],
])
def test_encode_rejects_malformed_conversations(tok: Any, conv: list[Any]) -> None:
    with pytest.raises(DataError, match="invalid conversation"):
        encode_conversation(tok, conv, 64)


# ---------------------------------------------------------------------------------------------------
# Reading and filtering


def test_malformed_json_names_file_and_line(tmp_path: Path, tok: Any) -> None:
    path = _write(tmp_path / "bad.jsonl", [_qa("a", "b"), "", '{"conversations": [', _qa("c", "d")])
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        list(read_conversations(path))
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c")), tok)


def test_invalid_utf8_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"conversations": [{"role": "user", "content": "\xe9"}]}\n')
    with pytest.raises(DataError, match=rf"{path}:1:"):
        list(read_conversations(path))


def _mixed_rows() -> list[Any]:
    return [
        _qa("Hi", "Hello."),
        "",
        "   ",
        {"conversations": [_msg("user", "only a question")]},
        {"conversations": [_msg("user", "q"), _msg("bot", "a")]},
        {"conversations": [_msg("user", "q"), _msg("assistant", ["a"])]},
        {"conversations": [_msg("user", "q"), {"role": "assistant"}]},
        {"conversations": "user: q"},
        {"messages": [_msg("user", "q"), _msg("assistant", "a")]},
        [1, 2],
        {"conversations": [_msg("assistant", "greeting only")]},
        _qa("word " * 200, "too late"),
        _qa("Bye", "Goodbye."),
    ]


def test_bad_samples_are_skipped_and_counted(tmp_path: Path, tok: Any) -> None:
    path = _write(tmp_path / "mixed.jsonl", _mixed_rows())
    skipped: Counter[str] = Counter()
    lines = [line for line, _ in read_conversations(path, skipped)]
    # The reader drops what it can judge without a tokenizer; the last two need one.
    assert lines == [1, 11, 12, 13]
    assert skipped == {"no_assistant": 1, "unknown_role": 1, "non_string_content": 2, "invalid_format": 3}

    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"), max_seq_len=64, val_fraction=0.5)
    data = prepare_data(cfg, tok)
    assert data.stats.skipped == SkipCounts(invalid_format=3, unknown_role=1, non_string_content=2,
                                            no_assistant=1, no_supervised_tokens=1, truncated=1)
    assert data.stats.skipped.total == 9
    assert data.stats.train_samples + data.stats.val_samples == 2
    assert data.stats_dict()["skipped.truncated"] == 1
    assert json.loads(json.dumps(data.stats_dict())) == data.stats_dict()


def test_empty_after_filtering_is_an_error(tmp_path: Path, tok: Any) -> None:
    path = _write(tmp_path / "empty.jsonl", [{"conversations": [_msg("user", "q")]}, "",
                                             {"conversations": [_msg("user", "q"), _msg("x", "a")]}])
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable SFT samples; all 2 were skipped \(unknown_role=1, no_assistant=1\)"):
        prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c")), tok)


def test_missing_file_is_a_data_error(tmp_path: Path, tok: Any) -> None:
    with pytest.raises(DataError, match="not found"):
        prepare_data(DataConfig(train_path=str(tmp_path / "nope.jsonl"), cache_dir=str(tmp_path)), tok)


# ---------------------------------------------------------------------------------------------------
# Split


def test_split_is_deterministic_disjoint_and_complete(tmp_path: Path, tok: Any) -> None:
    path = _write(tmp_path / "d.jsonl", _synthetic(50))
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"), val_fraction=0.2, split_seed=3)
    a, b = prepare_data(cfg, tok), prepare_data(cfg, tok)
    assert np.array_equal(a.train.indices, b.train.indices)
    assert np.array_equal(a.val.indices, b.val.indices)
    assert len(a.val) == 10 and len(a.train) == 40
    assert sorted([*a.train.indices.tolist(), *a.val.indices.tolist()]) == list(range(50))
    c = prepare_data(dataclasses.replace(cfg, split_seed=4), tok)
    assert not np.array_equal(a.val.indices, c.val.indices)
    assert a.stats.train_supervised_tokens == int(sum((y != IGNORE_INDEX).sum() for _, y in a.train))
    assert a.stats.train_tokens == int(a.train.lengths.sum())
    assert a.pad_id == tok.pad_token_id and a.vocab_size == len(tok)


def test_split_that_would_be_empty_is_an_error(tmp_path: Path, tok: Any) -> None:
    path = _write(tmp_path / "d.jsonl", _synthetic(4))
    with pytest.raises(DataError, match="validation split is empty"):
        prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path), val_fraction=0.1), tok)
    with pytest.raises(DataError, match="training split is empty"):
        prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path), val_fraction=0.9), tok)


def test_explicit_val_path(tmp_path: Path, tok: Any) -> None:
    train = _write(tmp_path / "train.jsonl", _synthetic(6, seed=1))
    val = _write(tmp_path / "val.jsonl", [*_synthetic(3, seed=2), {"conversations": [_msg("user", "q")]}])
    data = prepare_data(DataConfig(train_path=str(train), val_path=str(val),
                                   cache_dir=str(tmp_path / "c")), tok)
    assert (len(data.train), len(data.val)) == (6, 3)
    assert data.stats.val_skipped == SkipCounts(no_assistant=1)
    assert data.stats.val_cache_key not in (None, data.stats.cache_key)
    empty = _write(tmp_path / "empty.jsonl", [{"conversations": [_msg("user", "q")]}])
    with pytest.raises(DataError, match="empty.jsonl"):
        prepare_data(DataConfig(train_path=str(train), val_path=str(empty),
                                cache_dir=str(tmp_path / "c")), tok)


# ---------------------------------------------------------------------------------------------------
# Batching


def test_collate_pads_to_longest_sample() -> None:
    samples = [(torch.tensor([5, 6, 7]), torch.tensor([-100, 6, 7])), (torch.tensor([8]), torch.tensor([8]))]
    ids, labels = collate(samples, pad_id=0)
    assert ids.dtype == labels.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, -100, -100]]


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 500, size=n)


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
    assert padding_fraction(lengths, grouped) < padding_fraction(lengths, random_) / 5
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


def test_iterate_batches_matches_collate(tmp_path: Path, tok: Any) -> None:
    path = _write(tmp_path / "d.jsonl", _synthetic(40))
    data = prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"), val_fraction=0.25), tok)
    order = batch_indices(data.train.lengths, 7, seed=0, epoch=0)
    for items, (ids, labels) in zip(order, iterate_batches(data.train, order, data.pad_id), strict=True):
        ref_ids, ref_labels = collate([data.train[i] for i in items], data.pad_id)
        assert torch.equal(ids, ref_ids) and torch.equal(labels, ref_labels)
        assert ids.dtype == torch.long and ids.shape[1] == max(int(data.train.lengths[i]) for i in items)


def test_template_errors_are_skipped(tmp_path: Path, tok: Any) -> None:
    from minimind_train.tokenizer import load_tokenizer

    strict_dir = tmp_path / "strict"
    shutil.copytree(tok.name_or_path, strict_dir)
    config = json.loads((strict_dir / "tokenizer_config.json").read_text())
    # A strict template in the style of those that enforce role order.
    config["chat_template"] = ("{% if messages|length > 2 %}{{ raise_exception('one exchange only') }}"
                               "{% endif %}" + config["chat_template"])
    (strict_dir / "tokenizer_config.json").write_text(json.dumps(config))
    strict = load_tokenizer(strict_dir)
    two_rounds = {"conversations": [_msg("user", "a"), _msg("assistant", "b"),
                                    _msg("user", "c"), _msg("assistant", "d")]}
    path = _write(tmp_path / "d.jsonl", [two_rounds, *_synthetic(4)])
    data = prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"), val_fraction=0.25),
                        strict)
    assert data.stats.skipped == SkipCounts(template_error=1)
    assert len(data.train) + len(data.val) == 4
