"""MiniMind-3 data: upstream's labels (reasoning, tools), its input shapes, augmentation, parallel cache."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SHARED, need_shared

from minimind_train.config import DataConfig
from minimind_train.data import (
    DataError,
    encode_conversation,
    load_or_build_cache,
    prepare_data,
)
from minimind_train.tokenizer import load_tokenizer

FIXTURES3 = SHARED / "fixtures" / "minimind3"


@pytest.fixture(scope="module")
def tok3() -> Any:
    return load_tokenizer(need_shared(FIXTURES3))


@pytest.fixture(scope="module")
def rows3() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES3 / "conversations.jsonl").read_text().splitlines()]


class Scripted:
    """Replays the draws upstream made (recorded in sft_reference.json) and checks their order."""

    def __init__(self, draws: list[dict[str, Any]]) -> None:
        self.draws = list(draws)

    def random(self) -> float:
        draw = self.draws.pop(0)
        assert draw["call"] == "random()", draw
        return float(draw["returned"])

    def choice(self, seq: Any) -> Any:
        draw = self.draws.pop(0)
        assert draw["call"].startswith("choice"), draw
        return seq[draw["returned_index"]]


def test_reproduces_upstream_minimind3_sft_reference(tok3: Any, rows3: list[dict[str, Any]]) -> None:
    ref = json.loads((FIXTURES3 / "sft_reference.json").read_text(encoding="utf-8"))
    variants = set()
    for sample in ref["samples"]:
        conv = rows3[sample["conversation_index"]]["conversations"]
        if sample["variant"] == "base":  # augmentation off: upstream's base branch, no draws needed
            ids, labels = encode_conversation(tok3, conv, sample["max_length"])
            assert ids == sample["input_ids"] and labels == sample["labels"]
        rng = Scripted(sample["random_draws"])
        ids, labels = encode_conversation(tok3, conv, sample["max_length"], rng=rng)
        assert ids == sample["input_ids"], (sample["conversation_index"], sample["variant"])
        assert labels == sample["labels"], (sample["conversation_index"], sample["variant"])
        assert not rng.draws  # the same number of draws as upstream
        variants.add(sample["variant"])
    assert variants == {"base", "strip_empty_think", "system_injected_prompt0"}


def test_reasoning_and_tool_calls_are_supervised_tool_responses_not(tok3: Any, rows3: list) -> None:
    ids, labels = encode_conversation(tok3, rows3[4]["conversations"], 768)  # tool_use
    supervised = tok3.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert '<tool_call>\n{"name": "get_weather"' in supervised
    assert "Lisbon will be sunny" in supervised
    assert "tool_response" not in supervised and "temperature" not in supervised
    ids, labels = encode_conversation(tok3, rows3[2]["conversations"], 128)  # reasoning_content
    supervised = tok3.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert "8 × 5 = 40" in supervised


def test_format_probe_accepts_and_refuses_what_upstream_does(tok3: Any) -> None:
    probe = json.loads((FIXTURES3 / "format_probe.json").read_text(encoding="utf-8"))
    assert probe["results"]  # the probe lists both outcomes
    for name, conv in probe["conversation_inputs"].items():
        result = probe["results"][name]
        if result["accepted"]:
            ids, _ = encode_conversation(tok3, conv, 4096)
            assert tok3.decode(ids) == result["prompt_text"], name
        else:
            with pytest.raises(DataError, match="invalid conversation"):
                encode_conversation(tok3, conv, 4096)


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_unknown_fields_are_counted_and_reported(tmp_path: Path, tok3: Any, rows3: list,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    extra = {"conversations": [{"role": "user", "content": "u"},
                               {"role": "assistant", "content": "a", "name": "bot"}]}
    legacy = {"conversations": [{"role": "system", "content": "s", "functions": "[]"},
                                {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    path = _write(tmp_path / "d.jsonl", [*rows3, extra, legacy, extra])
    with caplog.at_level(logging.WARNING, logger="minimind_train.data"):
        data = prepare_data(DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"),
                                       val_fraction=0.2, max_seq_len=768), tok3)
    assert data.stats.skipped.unknown_field == 3
    assert data.stats.unknown_fields == "functions x1, name x2"
    assert data.stats.train_samples + data.stats.val_samples == 6  # the tool-use conversation is kept
    warnings = [r.getMessage() for r in caplog.records if "unknown message fields" in r.getMessage()]
    assert len(warnings) == 1 and "name x2" in warnings[0]


def test_tool_role_needs_a_template_that_renders_it(tmp_path: Path, rows3: list) -> None:
    mm2 = load_tokenizer(None)  # the bundled MiniMind2 tokenizer: no tool branch in its template
    with pytest.raises(DataError, match="unknown_role"):
        encode_conversation(mm2, rows3[4]["conversations"], 768)
    path = _write(tmp_path / "d.jsonl", rows3)
    cache = load_or_build_cache(path, mm2, 768, tmp_path / "c")
    assert cache.skipped.unknown_role == 1 and cache.num_samples == 5


def test_augmentation_is_off_by_default_and_seeded(tmp_path: Path, tok3: Any, rows3: list) -> None:
    rows = rows3[:4] * 50
    path = _write(tmp_path / "d.jsonl", rows)
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
    path = _write(tmp_path / "d.jsonl", rows3 * 700)  # several chunks
    serial = load_or_build_cache(path, tok3, 128, tmp_path / "a", workers=1)
    parallel = load_or_build_cache(path, tok3, 128, tmp_path / "b", workers=2)
    assert parallel.meta["workers"] == 2 and serial.meta["workers"] == 1
    for name in ("tokens", "mask", "offsets", "lines", "supervised"):
        assert np.array_equal(getattr(serial, name), getattr(parallel, name)), name
    assert serial.meta["skipped"] == parallel.meta["skipped"]


def test_val_max_samples_caps_the_validation_split(tmp_path: Path, tok3: Any, rows3: list) -> None:
    path = _write(tmp_path / "d.jsonl", rows3[:4] * 25)
    cfg = DataConfig(train_path=str(path), cache_dir=str(tmp_path / "c"), val_fraction=0.3, max_seq_len=128)
    full = prepare_data(cfg, tok3)
    capped = prepare_data(DataConfig(**{**cfg.__dict__, "val_max_samples": 7}), tok3)
    assert full.stats.val_samples == 30 and capped.stats.val_samples == 7
    assert set(capped.val.indices) <= set(full.val.indices)
    assert np.array_equal(capped.train.indices, full.train.indices)
