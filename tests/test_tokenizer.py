"""The bundled tokenizer, loading MiniMind2-format folders, and fingerprints."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import SHARED, need_shared
from transformers import PreTrainedTokenizerFast

from minimind_train.data import DEMO_DATA_PATH
from minimind_train.tokenizer import (
    BUNDLED_TOKENIZER_DIR,
    SPECIAL_TOKENS,
    load_tokenizer,
    tokenizer_fingerprint,
)

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
    [{"role": "system", "content": "Answer in Chinese."},
     {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2加3等于5。"}],
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "12 + 30 = 42."},
     {"role": "user", "content": "And doubled?"}, {"role": "assistant", "content": "Doubled, it is 84."},
     {"role": "user", "content": "再加1呢？"}, {"role": "assistant", "content": "85。"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi\nthere"}],
    [{"role": "user", "content": "only a question"}],
]

UNICODE_SAMPLES = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n",
    "中文测试：机器学习是人工智能的一个分支。",
    "emoji 🌍🎉👩‍💻 and flags 🇨🇳🇬🇧",
    "naïve café Ωμέγα русский עברית العربية 日本語 한국어",
    "math ∑∫√∞ ≠ ≤ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP",
    "zero\u200bwidth and \u00a0nbsp",
    "<|im_start|> inside text",
]


@pytest.fixture(scope="module")
def bundled() -> PreTrainedTokenizerFast:
    return load_tokenizer()


def _demo_texts() -> list[str]:
    lines = DEMO_DATA_PATH.read_text(encoding="utf-8").splitlines()
    return [m["content"] for line in lines for m in json.loads(line)["conversations"]]


def test_bundled_special_tokens(bundled: PreTrainedTokenizerFast) -> None:
    assert [bundled.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (bundled.pad_token_id, bundled.unk_token_id, bundled.bos_token_id, bundled.eos_token_id) == (0, 0, 1, 2)
    assert bundled.model_max_length == 32768
    assert 1000 < len(bundled) <= 6400
    # add_bos_token/add_eos_token are off, as in MiniMind2: encode adds nothing.
    assert bundled.encode("hi") == bundled.encode("hi", add_special_tokens=False)
    assert bundled.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert bundled.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2


def test_bundled_template_renders_chatml_with_default_system_prompt(bundled: PreTrainedTokenizerFast) -> None:
    rendered = bundled.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|>\n")
    rendered = bundled.apply_chat_template(CONVERSATIONS[3], tokenize=False)
    assert rendered == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                        "<|im_start|>user\nHi\nthere<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_template_renders_exactly_like_minimind2(
        bundled: PreTrainedTokenizerFast, fixture_dir: Path, index: int) -> None:
    reference = load_tokenizer(fixture_dir)
    messages = CONVERSATIONS[index]
    assert (bundled.apply_chat_template(messages, tokenize=False)
            == reference.apply_chat_template(messages, tokenize=False))


def test_template_matches_minimind2_on_fixture_conversations(
        bundled: PreTrainedTokenizerFast, fixture_dir: Path) -> None:
    reference = load_tokenizer(fixture_dir)
    lines = (fixture_dir / "conversations.jsonl").read_text(encoding="utf-8").splitlines()
    for line in lines:
        messages = json.loads(line)["conversations"]
        assert (bundled.apply_chat_template(messages, tokenize=False)
                == reference.apply_chat_template(messages, tokenize=False))


def test_bundled_files_have_minimind2_structure(fixture_dir: Path) -> None:
    ours = json.loads((BUNDLED_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    theirs = json.loads((fixture_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours[key] == theirs[key], key
    settings = {k: v for k, v in ours["model"].items() if k not in ("vocab", "merges")}
    assert settings == {k: v for k, v in theirs["model"].items() if k not in ("vocab", "merges")}
    config = json.loads((BUNDLED_TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == json.loads((fixture_dir / "tokenizer_config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_round_trip_arbitrary_unicode(bundled: PreTrainedTokenizerFast, text: str) -> None:
    ids = bundled.encode(text)
    assert bundled.decode(ids) == text
    if "<|" not in text:
        assert 0 not in ids  # byte-level: nothing is ever unknown


def test_demo_data_tokenises_without_unk(bundled: PreTrainedTokenizerFast) -> None:
    texts = _demo_texts()
    for text in texts:
        ids = bundled.encode(text)
        assert 0 not in ids and bundled.decode(ids) == text
    for char in sorted({c for text in texts for c in text if re.match(r"[\u4e00-\u9fff]", c)}):
        ids = bundled.encode(char)
        assert 0 not in ids and bundled.decode(ids) == char


def test_round_trip_real_chinese_data(bundled: PreTrainedTokenizerFast) -> None:
    path = need_shared(SHARED / "data" / "alpaca_zh_demo.jsonl")
    for line in path.read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["conversations"]:
            ids = bundled.encode(message["content"])
            assert 0 not in ids and bundled.decode(ids) == message["content"]


def test_load_fixture_dir(fixture_dir: Path) -> None:
    tokenizer = load_tokenizer(fixture_dir)
    assert len(tokenizer) == 6400
    assert tokenizer.decode(tokenizer.encode("你好，world")) == "你好，world"
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(fixture_dir)
    assert tokenizer_fingerprint(fixture_dir) != tokenizer_fingerprint(BUNDLED_TOKENIZER_DIR)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tokenizer(missing)


def test_missing_file_is_named(tmp_path: Path) -> None:
    shutil.copy(BUNDLED_TOKENIZER_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"lacks tokenizer_config\.json"):
        load_tokenizer(tmp_path)


def test_corrupt_file_is_a_value_error(tmp_path: Path) -> None:
    shutil.copy(BUNDLED_TOKENIZER_DIR / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)


def _bundled_json() -> tuple[dict, dict]:
    tokenizer = json.loads((BUNDLED_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((BUNDLED_TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    return tokenizer, config


def _write(dst: Path, tokenizer: dict, config: dict) -> None:
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (dst / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def test_wrong_special_token_ids_are_rejected(tmp_path: Path) -> None:
    tokenizer, config = _bundled_json()
    # Swap <|im_start|> and <|im_end|> everywhere the ids are stored.
    for entry in tokenizer["added_tokens"]:
        entry["id"] = {1: 2, 2: 1}.get(entry["id"], entry["id"])
    vocab = tokenizer["model"]["vocab"]
    vocab["<|im_start|>"], vocab["<|im_end|>"] = 2, 1
    decoder = config["added_tokens_decoder"]
    decoder["1"], decoder["2"] = decoder["2"], decoder["1"]
    _write(tmp_path, tokenizer, config)
    with pytest.raises(ValueError, match=r"<\|im_start\|> has id 2, expected 1"):
        load_tokenizer(tmp_path)


def test_missing_chat_template_is_rejected(tmp_path: Path) -> None:
    tokenizer, config = _bundled_json()
    del config["chat_template"]
    _write(tmp_path, tokenizer, config)
    with pytest.raises(ValueError, match="no chat_template"):
        load_tokenizer(tmp_path)


def test_wrong_pad_token_is_rejected(tmp_path: Path) -> None:
    tokenizer, config = _bundled_json()
    config["pad_token"] = "<|im_end|>"
    _write(tmp_path, tokenizer, config)
    with pytest.raises(ValueError, match="pad_token"):
        load_tokenizer(tmp_path)


def test_fingerprint_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    base = tokenizer_fingerprint(BUNDLED_TOKENIZER_DIR)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert tokenizer_fingerprint(load_tokenizer()) == base
    assert tokenizer_fingerprint(str(BUNDLED_TOKENIZER_DIR)) == base

    tokenizer, config = _bundled_json()
    # Whitespace and key order do not matter ...
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer, indent=4), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(dict(reversed(list(config.items())))), encoding="utf-8")
    assert tokenizer_fingerprint(tmp_path) == base
    # ... content does.
    config["chat_template"] += " "
    _write(tmp_path, tokenizer, config)
    assert tokenizer_fingerprint(tmp_path) != base
    config["chat_template"] = config["chat_template"][:-1]
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:-1]
    _write(tmp_path, tokenizer, config)
    assert tokenizer_fingerprint(tmp_path) != base


def test_fingerprint_of_missing_files_names_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizer_fingerprint(tmp_path)
