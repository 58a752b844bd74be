"""Chat format and labels: a MiniMind conversation -> the chat template's text -> token ids and labels.

Labels follow the Hugging Face convention: aligned with ``input_ids``, the token id where supervised,
:data:`IGNORE_INDEX` elsewhere (the loss shifts). As upstream, everything after each
``<|im_start|>assistant\\n`` through the next ``<|im_end|>`` and its ``\\n`` is supervised (MiniMind-3:
``<think>`` blocks and tool calls too); tool responses, user and system turns never are.

Messages carry upstream's fields ``role, content, reasoning_content, tools, tool_calls`` (the last two
JSON strings, parsed as upstream's ``SFTDataset`` does); a message with any other field is refused. As
upstream's loader makes every missing field null, a null field is a missing one: the template renders it
(MiniMind-3's renders a null content as ``''``), and where the template cannot, the conversation is refused
as upstream's would fail.
Upstream's random augmentation runs only when :func:`render` is given a generator.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from random import Random

__all__ = ["ADD_SYSTEM_RATIO", "EMPTY_THINK_KEEP_RATIO", "IGNORE_INDEX", "SYSTEM_PROMPTS", "BadToolJSON",
           "DataError", "check_messages", "encode_conversation", "label_markers", "render", "supervision_mask",
           "template_roles", "tokenize"]

# The label of a token the loss ignores (torch's cross_entropy default ignore_index).
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# Upstream's message schema (SFTDataset's ``features``): all strings, missing ones null.
FIELDS = ("role", "content", "reasoning_content", "tools", "tool_calls")
_JSON_FIELDS = ("reasoning_content", "tools", "tool_calls")
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"

# Upstream's system prompts for augmentation (dataset/lm_dataset.py at d65ef2c), in its order.
SYSTEM_PROMPTS: tuple[str, ...] = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)
ADD_SYSTEM_RATIO = 0.2
EMPTY_THINK_KEEP_RATIO = 0.2
_EMPTY_THINK = "<think>\n\n</think>\n\n"


class DataError(ValueError):
    """The SFT data cannot be used as given; the message names the file (and line) and the reason."""


class BadToolJSON(ValueError):
    """A ``tools``/``tool_calls`` string is not JSON."""


def check_messages(obj: Any, unknown: Counter[str] | None = None
                   ) -> tuple[list[dict[str, Any]] | None, str | None]:
    """``(messages, None)`` for a well-formed message list, else ``(None, reason)`` (a
    :class:`~minimind_train.token_cache.SkipCounts` field). Each message comes back with exactly
    upstream's five fields (missing ones None); names of unknown fields are counted in ``unknown``."""
    if not isinstance(obj, (list, tuple)):
        return None, "invalid_format"
    messages: list[dict[str, Any]] = []
    for message in obj:
        if not isinstance(message, Mapping) or "role" not in message:
            return None, "invalid_format"
        extra = [k for k in message if k not in FIELDS]
        if extra:
            if unknown is not None:
                unknown.update(str(k) for k in extra)
            return None, "unknown_field"
        if message["role"] not in ROLES:
            return None, "unknown_role"
        # Null is what upstream's loader gives for a missing field; the template decides what it renders.
        if message.get("content") is not None and not isinstance(message["content"], str):
            return None, "non_string_content"
        if any(message.get(k) is not None and not isinstance(message[k], str) for k in _JSON_FIELDS):
            return None, "non_string_field"
        messages.append({k: message.get(k) for k in FIELDS})
    return messages, None


def template_roles(tokenizer: Any) -> frozenset[str]:
    """Roles the tokenizer's template renders: ``tool`` only where the template names it (MiniMind2's
    template would silently drop a tool message, MiniMind-3's renders it as a tool response)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return frozenset(ROLES if "'tool'" in template or '"tool"' in template else ROLES[:3])


def render(tokenizer: Any, messages: list[dict[str, Any]], rng: Random | None = None) -> str:
    """The text upstream tokenises: the messages through the chat template with their tools.

    ``tools`` comes from a system message's JSON string (the last one wins) and each ``tool_calls``
    string is parsed, as upstream's SFTDataset does; :class:`BadToolJSON` when one is not JSON. With
    ``rng`` (a seeded ``random.Random``): upstream's ``pre_processing_chat`` (unless tool use, a system
    prompt with p 0.2) and ``post_processing_chat`` (empty think blocks removed with p 0.8), in its order.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat_template; SFT data is rendered with it")
    if (rng is not None and not any(m.get("tools") for m in messages) and messages
            and messages[0]["role"] != "system" and rng.random() < ADD_SYSTEM_RATIO):
        messages = [{**dict.fromkeys(FIELDS), "role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]
    tools, parsed = None, []
    for message in messages:
        message = dict(message)
        try:
            if message["role"] == "system" and message.get("tools"):
                tools = json.loads(message["tools"])
            if message.get("tool_calls"):
                message["tool_calls"] = json.loads(message["tool_calls"])
        except ValueError as exc:
            raise BadToolJSON(str(exc)) from None
        parsed.append(message)
    text = tokenizer.apply_chat_template(parsed, tokenize=False, add_generation_prompt=False, tools=tools)
    if rng is not None and _EMPTY_THINK in text and rng.random() > EMPTY_THINK_KEEP_RATIO:
        text = text.replace(_EMPTY_THINK, "")
    return text


def tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each whole text (no special tokens added): one batched call into the Rust tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The backend directly is ~1.5x faster and never mutates tokenizer state (thread safe); it is only
    # equivalent when the tokenizer file does not configure truncation or padding.
    if backend is not None and backend.truncation is None and backend.padding is None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    out = tokenizer(texts, add_special_tokens=False, truncation=False, padding=False,
                    return_attention_mask=False, return_token_type_ids=False)
    return list(out["input_ids"])


def label_markers(tokenizer: Any) -> tuple[np.ndarray, int]:
    """(ids of ``<|im_start|>assistant``, id of ``<|im_end|>``): what delimits supervised spans."""
    ids = []
    for token in (_IM_START, _IM_END):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tokenizer.convert_ids_to_tokens(tid) != token:
            raise DataError(f"the tokenizer has no {token} token; SFT data needs a ChatML "
                            "(MiniMind2-format) tokenizer")
        ids.append(int(tid))
    header = np.asarray(tokenize(tokenizer, [f"{_IM_START}assistant"])[0], dtype=np.int64)
    if header.size < 2 or header[0] != ids[0]:
        raise DataError(f"the tokenizer splits {_IM_START!r} when followed by 'assistant': {header.tolist()}")
    return header, ids[1]


def supervision_mask(ids: np.ndarray, markers: tuple[np.ndarray, int]) -> np.ndarray:
    """Boolean mask of supervised positions, MiniMind2's rule on untruncated ``ids``.

    After each ``<|im_start|>assistant`` the next token (the header's newline, possibly merged with
    leading whitespace of the content) is skipped; supervision then runs through the first
    ``<|im_end|>`` and one token more (its newline), or to the end when there is none. Headers inside a
    supervised span are not headers. Truncating the mask afterwards equals computing it on truncated ids.
    """
    header, end_id = markers
    n, k = ids.size, header.size
    mask = np.zeros(n, dtype=bool)
    if n < k:
        return mask
    ends = np.flatnonzero(ids == end_id)
    resume = 0
    for s in np.flatnonzero(ids[: n - k + 1] == header[0]).tolist():
        if s < resume or not np.array_equal(ids[s:s + k], header):
            continue
        j = int(np.searchsorted(ends, s + k))
        if j == ends.size:
            mask[s + k + 1:] = True
            break
        mask[s + k + 1:int(ends[j]) + 2] = True
        resume = int(ends[j]) + 1
    return mask


def encode_conversation(tokenizer: Any, conversations: Sequence[Mapping[str, Any]], max_length: int,
                        *, rng: Random | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation, truncated to ``max_length`` tokens, as the token
    cache encodes it (``rng``: see :func:`render`).

    Raises :class:`DataError` for an unknown role (``tool`` only where the template renders it) or
    field, content neither a string nor null, bad tool JSON, a malformed message, or one the chat
    template raises on (as upstream's would: a null first system content, say).
    """
    if max_length <= 0:
        raise ValueError(f"max_length={max_length} must be > 0")
    unknown: Counter[str] = Counter()
    messages, reason = check_messages(conversations, unknown)
    if messages and any(m["role"] not in template_roles(tokenizer) for m in messages):
        messages, reason = None, "unknown_role"
    if not messages:
        detail = f": {sorted(unknown)}" if unknown else ""
        raise DataError(f"invalid conversation ({reason or 'empty'}{detail}): {conversations!r:.200}")
    try:
        text = render(tokenizer, messages, rng)
    except DataError:
        raise
    except BadToolJSON as exc:
        raise DataError(f"invalid conversation (tools/tool_calls is not a JSON string: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - a template's raise_exception, or a null it cannot join
        raise DataError(f"invalid conversation (template_error: the chat template raised {exc!r})") from None
    ids = np.asarray(tokenize(tokenizer, [text])[0], dtype=np.int64)
    mask = supervision_mask(ids, label_markers(tokenizer))[:max_length]
    ids = ids[:max_length]
    return ids.tolist(), np.where(mask, ids, IGNORE_INDEX).tolist()
