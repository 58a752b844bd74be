"""The demo asset builder (scripts/build_demo_assets.py) and the bundled demo dataset: format, content
rules, determinism, the tokenizer trainer, and assets reproduced byte for byte."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from minimind_train import tokenizer as tokenizer_mod
from minimind_train.data import DEMO_DATA_PATH
from minimind_train.tokenizer import BUNDLED_TOKENIZER_DIR, TOKENIZER_FILES, load_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_assets.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("build_demo_assets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_demo_assets", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


demo = _load_script()
DEMO_SEED, DEMO_SIZE = demo.DEMO_SEED, demo.DEMO_SIZE
en_number, zh_number = demo.en_number, demo.zh_number
generate_demo_conversations, write_jsonl = demo.generate_demo_conversations, demo.write_jsonl

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def bundled() -> list[list[dict[str, str]]]:
    lines = DEMO_DATA_PATH.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["conversations"] for line in lines]


def test_bundled_file_is_small_and_sized_as_documented(bundled: list[list[dict[str, str]]]) -> None:
    assert len(bundled) == DEMO_SIZE
    assert DEMO_DATA_PATH.stat().st_size < 1_000_000


def test_every_conversation_is_well_formed(bundled: list[list[dict[str, str]]]) -> None:
    for messages in bundled:
        assert all(set(m) == {"role", "content"} for m in messages)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
        turns = messages[1:] if messages[0]["role"] == "system" else messages
        # user/assistant strictly alternate after an optional leading system message
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert len(turns) >= 2


def test_data_is_bilingual_multi_turn_and_has_system_prompts(bundled: list[list[dict[str, str]]]) -> None:
    first_user = [next(m["content"] for m in c if m["role"] == "user") for c in bundled]
    chinese = sum(bool(CJK.search(q)) for q in first_user) / len(bundled)
    english = sum(q.isascii() for q in first_user) / len(bundled)
    assert 0.35 < chinese < 0.65
    assert 0.35 < english < 0.65
    rounds = [sum(m["role"] == "user" for m in c) for c in bundled]
    assert sum(r >= 2 for r in rounds) / len(rounds) > 0.3
    assert sum(r == 3 for r in rounds) > 0
    with_system = sum(c[0]["role"] == "system" for c in bundled) / len(bundled)
    assert 0.03 < with_system < 0.25


def test_answers_follow_from_questions(bundled: list[list[dict[str, str]]]) -> None:
    """Spot-check the rules on every answer they apply to: wrong data cannot be learned."""
    capitals = {en: cap for en, _, cap, _ in demo._COUNTRIES}
    checked = 0
    for messages in bundled:
        for m in messages:
            if m["role"] != "assistant":
                continue
            text = m["content"]
            for a, op, b, c in re.findall(r"(\d+) ?([+-]|加|减|加上|减去) ?(\d+) ?(?:=|等于|是) ?(\d+)", text):
                expected = int(a) + int(b) if op in ("+", "加", "加上") else int(a) - int(b)
                assert int(c) == expected, text
                checked += 1
            for word, rev in re.findall(r'"(\w+)" (?:spelled )?backwards is "(\w+)"', text):
                assert rev == word[::-1], text
                checked += 1
            for word, up in re.findall(r"(\w+) 的大写是 (\w+)", text):
                assert up == word.upper(), text
                checked += 1
            for word, n in re.findall(r'"(\w+)" has (\d+) letters', text):
                assert int(n) == len(word), text
                checked += 1
            for country, capital in re.findall(r"The capital of ([\w ]+) is ([\w ]+)\.", text):
                assert capitals[country] == capital, text
                checked += 1
    assert checked > 500


def test_held_out_conversations_are_mostly_new_combinations(bundled: list[list[dict[str, str]]]) -> None:
    lines = [json.dumps(c, ensure_ascii=False) for c in bundled]
    order = list(range(len(lines)))
    random.Random(0).shuffle(order)
    val, train = order[:300], {lines[i] for i in order[300:]}
    repeated = sum(lines[i] in train for i in val)
    assert repeated / len(val) < 0.2


def test_token_lengths_with_bundled_tokenizer(bundled: list[list[dict[str, str]]]) -> None:
    tokenizer = load_tokenizer()
    lengths = [len(tokenizer.apply_chat_template(c, tokenize=True)) for c in bundled]
    assert 35 <= statistics.median(lengths) <= 70
    assert max(lengths) < 160


def test_generation_is_deterministic_by_seed() -> None:
    assert generate_demo_conversations(60, 7) == generate_demo_conversations(60, 7)
    assert generate_demo_conversations(60, 7) != generate_demo_conversations(60, 8)
    assert generate_demo_conversations(10, 7) == generate_demo_conversations(60, 7)[:10]
    assert generate_demo_conversations(0, 7) == []
    with pytest.raises(ValueError, match="n=-1"):
        generate_demo_conversations(-1, 7)


def test_generation_does_not_depend_on_hash_seed() -> None:
    code = ("import hashlib, json, sys; sys.path.insert(0, 'scripts'); "
            "from build_demo_assets import generate_demo_conversations as g; "
            "print(hashlib.sha256(json.dumps(g(300, 3), ensure_ascii=False).encode()).hexdigest())")
    digests = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
        for seed in ("1", "2")
    }
    expected = hashlib.sha256(
        json.dumps(generate_demo_conversations(300, 3), ensure_ascii=False).encode()).hexdigest()
    assert digests == {expected + "\n"}


def test_write_jsonl_round_trips(tmp_path: Path) -> None:
    conversations = generate_demo_conversations(20, 1)
    path = tmp_path / "sub" / "data.jsonl"
    write_jsonl(conversations, path)
    raw = path.read_bytes()
    assert b"\r" not in raw and b"\\u" not in raw  # plain UTF-8, \n line ends
    assert [json.loads(line) for line in raw.decode("utf-8").splitlines()] == conversations


def test_builder_reproduces_bundled_assets_byte_for_byte(tmp_path: Path) -> None:
    demo.main(["--out", str(tmp_path)])
    assert (tmp_path / demo.DEMO_FILE).read_bytes() == DEMO_DATA_PATH.read_bytes()
    assert tmp_path / demo.DEMO_FILE == tmp_path / DEMO_DATA_PATH.relative_to(demo.ASSETS_DIR)
    assert generate_demo_conversations(DEMO_SIZE, DEMO_SEED) == [
        json.loads(line) for line in DEMO_DATA_PATH.read_text(encoding="utf-8").splitlines()]
    for name in TOKENIZER_FILES:
        assert (tmp_path / "tokenizer" / name).read_bytes() == (BUNDLED_TOKENIZER_DIR / name).read_bytes(), name


@pytest.mark.parametrize(("n", "en", "zh"), [
    (0, "zero", "零"), (7, "seven", "七"), (10, "ten", "十"), (13, "thirteen", "十三"),
    (20, "twenty", "二十"), (42, "forty-two", "四十二"), (99, "ninety-nine", "九十九"),
])
def test_number_words(n: int, en: str, zh: str) -> None:
    assert en_number(n) == en
    assert zh_number(n) == zh


@pytest.mark.parametrize(("n", "zh"), [(100, "一百"), (101, "一百零一"), (110, "一百一十"),
                                       (1005, "一千零五"), (1050, "一千零五十"), (9999, "九千九百九十九")])
def test_large_chinese_numbers(n: int, zh: str) -> None:
    assert zh_number(n) == zh


def test_script_runs_from_any_folder(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--out" in proc.stdout, proc.stderr


def test_special_tokens_are_the_loaders() -> None:
    assert demo.SPECIAL_TOKENS == tokenizer_mod.SPECIAL_TOKENS


UNICODE_SAMPLES = ["Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnew lines\r\n",
                   "中文测试：机器学习是人工智能的一个分支。", "emoji 🌍🎉👩‍💻", "math ∑∫√∞ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP"]


def test_train_small_tokenizer(tmp_path: Path) -> None:
    texts = ["hello world, hello tokenizer", "你好世界，你好", "12 + 30 = 42"] * 20
    demo.train_tokenizer(iter(texts), tmp_path, vocab_size=300)
    tokenizer = load_tokenizer(tmp_path)
    assert [tokenizer.convert_tokens_to_ids(t) for t in tokenizer_mod.SPECIAL_TOKENS] == [0, 1, 2]
    assert 259 < len(tokenizer) <= 300
    assert len(tokenizer.encode("hello")) == 1  # merges were learned
    for text in UNICODE_SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["pre_tokenizer"]["type"] == "ByteLevel"
    assert data["pre_tokenizer"]["add_prefix_space"] is False
    assert data["decoder"]["type"] == "ByteLevel"
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == load_tokenizer(
        BUNDLED_TOKENIZER_DIR).apply_chat_template(conversation, tokenize=False)


def test_train_rejects_a_vocab_without_room_for_merges(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=259"):
        demo.train_tokenizer(["abc"], tmp_path, vocab_size=259)
