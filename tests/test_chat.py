"""Chat format and labels (minimind_train.chat): upstream's MiniMind2 and MiniMind-3 references,
reasoning and tool calls, the supervised spans, truncation and the conversations refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES3, msg

from minimind_train.chat import IGNORE_INDEX, DataError, encode_conversation
from minimind_train.tokenizer import load_tokenizer


def _supervised_text(tok: Any, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


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


# ---------------------------------------------------------------------------------------------------
# MiniMind2


def test_reproduces_upstream_sft_reference(fixture_dir: Path) -> None:
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
    conv = [msg("system", "Answer briefly."), msg("user", "Hi"), msg("assistant", "Hello.")]
    ids, labels = encode_conversation(tok, conv, 512)
    text = tok.decode(ids)
    # Position-alternating roles (upstream) would render the system prompt as a user turn.
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi")
    assert "You are a helpful assistant" not in text
    assert _supervised_text(tok, ids, labels) == "Hello.<|im_end|>\n"


def test_assistant_first_turn_is_context_not_target(tok: Any) -> None:
    conv = [msg("assistant", "Welcome!"), msg("user", "Hi"), msg("assistant", "Hello.")]
    ids, labels = encode_conversation(tok, conv, 512)
    assert "Welcome!" in tok.decode(ids)
    # The template opens no assistant header before a first assistant turn, so only "Hello." is a target.
    assert _supervised_text(tok, ids, labels) == "Hello.<|im_end|>\n"


def test_every_assistant_turn_is_supervised(tok: Any) -> None:
    conv = [msg("user", "One?"), msg("assistant", "1."), msg("user", "Two?"), msg("assistant", "2.")]
    ids, labels = encode_conversation(tok, conv, 512)
    assert _supervised_text(tok, ids, labels) == "1.<|im_end|>\n2.<|im_end|>\n"
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))


@pytest.mark.parametrize("answer", ["plain", "  leading spaces", "\nleading newline", "", "多语言 ok"])
def test_header_newline_never_supervised(tok: Any, answer: str) -> None:
    ids, labels = encode_conversation(tok, [msg("user", "q"), msg("assistant", answer)], 512)
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
    conv = [msg("user", "Tell me a story."), msg("assistant", "Once upon a time " * 20)]
    full_ids, full_labels = encode_conversation(tok, conv, 10_000)
    for max_length in (5, 30, len(full_ids) - 1, len(full_ids), len(full_ids) + 5):
        ids, labels = encode_conversation(tok, conv, max_length)
        assert len(ids) == len(labels) == min(max_length, len(full_ids))
        assert ids == full_ids[:max_length] and labels == full_labels[:max_length]
    # Cut inside the answer: everything up to the cut is still a target (no <|im_end|> needed).
    ids, labels = encode_conversation(tok, conv, len(full_ids) - 3)
    assert labels[-1] == ids[-1]


@pytest.mark.parametrize("conv", [
    [msg("user", "q"), msg("bot", "a")],
    [msg("user", "q"), msg("assistant", 42)],
    [msg("user", "q"), {"content": "no role"}],
    [msg("user", "q"), "not a message"],
    [],
])
def test_encode_rejects_malformed_conversations(tok: Any, conv: list[Any]) -> None:
    with pytest.raises(DataError, match="invalid conversation"):
        encode_conversation(tok, conv, 64)


# ---------------------------------------------------------------------------------------------------
# MiniMind-3: reasoning, tools, augmentation


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
    supervised = _supervised_text(tok3, ids, labels)
    assert '<tool_call>\n{"name": "get_weather"' in supervised
    assert "Lisbon will be sunny" in supervised
    assert "tool_response" not in supervised and "temperature" not in supervised
    ids, labels = encode_conversation(tok3, rows3[2]["conversations"], 128)  # reasoning_content
    assert "8 × 5 = 40" in _supervised_text(tok3, ids, labels)


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


def _nulled(conv: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """``conv`` with ``field`` null wherever it is missing (``content``: where it is empty), as upstream's
    loader hands it to its template."""
    if field == "content":
        return [{**m, "content": None} if m.get("content") == "" else m for m in conv]
    return [m if field in m else {**m, field: None} for m in conv]


@pytest.mark.parametrize("field", ["content", "reasoning_content", "tools", "tool_calls"])
def test_null_fields_render_as_upstream(tok3: Any, rows3: list, field: str) -> None:
    # Upstream's loader makes every missing field null: real tool-use data has "content": null beside
    # tool_calls. Same ids and labels as upstream's SFTDataset for every reference conversation.
    ref = json.loads((FIXTURES3 / "sft_reference.json").read_text(encoding="utf-8"))
    nulled = 0
    for sample in (s for s in ref["samples"] if s["variant"] == "base"):
        conv = rows3[sample["conversation_index"]]["conversations"]
        nulled += _nulled(conv, field) != conv
        ids, labels = encode_conversation(tok3, _nulled(conv, field), sample["max_length"])
        assert ids == sample["input_ids"] and labels == sample["labels"], (field, sample["conversation_index"])
    assert nulled  # the field was null somewhere


@pytest.mark.parametrize("role", ["user", "assistant", "tool", "system"])
def test_null_content_is_a_missing_content(tok3: Any, role: str) -> None:
    # No upstream reference for these: upstream's template takes a non-string content as ''.
    def conv(content: Any) -> list[dict[str, Any]]:
        return [msg("system", "s"), msg("user", "u"), msg("assistant", "a"), msg(role, content),
                msg("assistant", "b")]
    assert encode_conversation(tok3, conv(None), 256) == encode_conversation(tok3, conv(""), 256)
    assert encode_conversation(tok3, conv(None), 256) == encode_conversation(tok3, [
        *conv("")[:3], {"role": role}, conv("")[4]], 256)


def test_null_content_the_template_cannot_render_is_refused(tok: Any, tok3: Any) -> None:
    # Upstream's templates join a first system content (MiniMind-3) and an assistant content (MiniMind2)
    # with '+': upstream's SFTDataset raises there, so the conversation is refused, naming the template.
    with pytest.raises(DataError, match="template_error"):
        encode_conversation(tok3, [msg("system", None), msg("user", "u"), msg("assistant", "a")], 64)
    with pytest.raises(DataError, match="template_error"):
        encode_conversation(tok, [msg("user", "u"), msg("assistant", None)], 64)


def test_tool_role_needs_a_template_that_renders_it(tok: Any, rows3: list) -> None:
    # The bundled MiniMind2 tokenizer: no tool branch in its template.
    with pytest.raises(DataError, match="unknown_role"):
        encode_conversation(tok, rows3[4]["conversations"], 768)
