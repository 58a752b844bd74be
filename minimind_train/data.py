"""SFT data: MiniMind conversations -> token ids + labels, cached once, batched with minimal padding.

Pipeline: :func:`read_conversations` validates a jsonl file line by line; each conversation is rendered
with the tokenizer's chat template and tokenised as a whole string; :func:`encode_conversation`'s
labelling rule (shared with the cache builder) marks what the loss sees; the result is stored once per
(file content, tokenizer, ``max_seq_len``, chat template, format version) as memory-mapped ``.npy``
arrays, so every later run or trial only maps it. :func:`prepare_data` ties it together and splits
train/val; :func:`batch_indices` and :func:`iterate_batches` produce length-grouped padded batches.

Labels follow the Hugging Face convention: same length as ``input_ids``, the token id where the token
is supervised, ``-100`` elsewhere; the causal shift happens in the loss. As in MiniMind2 and MiniMind-3,
everything after each ``<|im_start|>assistant\\n`` through the next ``<|im_end|>`` and the token after
it (the ``\\n``) is supervised -- for MiniMind-3 that includes ``<think>`` blocks and tool calls; tool
responses, user and system turns never are.

Messages carry upstream's fields ``role, content, reasoning_content, tools, tool_calls`` (the last two
JSON strings, parsed as upstream's ``SFTDataset`` parses them); the chat template decides what they
render to. A message with any other field is refused (upstream's loader refuses the whole file), and
the field names are counted and reported. Upstream's random augmentation (a system prompt prepended
with p 0.2, empty think blocks removed with p 0.8) is off unless ``data.augment``; then each sample's
draws are seeded by ``data.augment_seed`` and its line number.

The token cache is built by worker processes (all cores) over a streamed file: RSS stays bounded by
the chunks in flight, whatever the file size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch
from tqdm import tqdm

from .config import DataConfig

__all__ = [
    "ADD_SYSTEM_RATIO",
    "CACHE_VERSION",
    "EMPTY_THINK_KEEP_RATIO",
    "IGNORE_INDEX",
    "SYSTEM_PROMPTS",
    "AugmentRNG",
    "DataError",
    "SFTData",
    "SFTStats",
    "SkipCounts",
    "TokenCache",
    "TokenizedDataset",
    "batch_indices",
    "collate",
    "default_workers",
    "encode_conversation",
    "iterate_batches",
    "load_or_build_cache",
    "open_cache",
    "open_prepared",
    "padding_fraction",
    "prepare_data",
    "read_conversations",
    "resolve_cache_dir",
]

log = logging.getLogger(__name__)

# Bump whenever validation, rendering, labelling or the on-disk layout changes: it is part of the key.
CACHE_VERSION = 2
IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant", "tool")
# Upstream's message schema (SFTDataset's ``features``): all strings, missing ones null.
_FIELDS = ("role", "content", "reasoning_content", "tools", "tool_calls")
_STRING_FIELDS = ("reasoning_content", "tools", "tool_calls")
_IM_START = "<|im_start|>"
_IM_END = "<|im_end|>"
# Samples per batched tokenizer call, and a byte cap so a few huge samples cannot blow up memory.
_CHUNK_SAMPLES = 1024
_CHUNK_BYTES = 16 << 20
_HASH_BLOCK = 1 << 20
_ARRAYS = ("tokens", "mask", "offsets", "lines", "supervised")


class DataError(ValueError):
    """The SFT data cannot be used as given; the message names the file (and line) and the reason."""


@dataclass(frozen=True)
class SkipCounts:
    """How many samples of a file were skipped, per reason."""

    # Not a JSON object, no ``conversations`` list, a message that is not an object or has no role.
    invalid_format: int = 0
    # A message field other than role, content, reasoning_content, tools, tool_calls (upstream's
    # loader refuses such a file); the names are in the cache's ``unknown_fields``.
    unknown_field: int = 0
    # A role the chat template does not render (``tool`` with MiniMind2's template).
    unknown_role: int = 0
    non_string_content: int = 0
    # reasoning_content / tools / tool_calls that is not a string (upstream wants JSON strings).
    non_string_field: int = 0
    # tools / tool_calls that is a string but not JSON.
    invalid_tool_json: int = 0
    no_assistant: int = 0
    # The chat template raised on the conversation (strict templates check role order).
    template_error: int = 0
    # The template rendered no ``<|im_start|>assistant`` span (e.g. only an assistant-first turn).
    no_supervised_tokens: int = 0
    # Every supervised token lies beyond ``max_seq_len``.
    truncated: int = 0

    @classmethod
    def from_counter(cls, counts: Mapping[str, int]) -> SkipCounts:
        return cls(**{f.name: int(counts.get(f.name, 0)) for f in dataclasses.fields(cls)})

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.as_dict().items() if v]
        return ", ".join(parts) if parts else "none"


# ---------------------------------------------------------------------------------------------------
# Validation, rendering, labelling: shared by encode_conversation and the cache builder.


def _check_messages(obj: Any, unknown: Counter[str] | None = None
                    ) -> tuple[list[dict[str, Any]] | None, str | None]:
    """``(messages, None)`` for a well-formed message list, else ``(None, reason)``.

    Each message comes back with exactly upstream's five fields (missing ones None, as upstream's
    loader makes them), so nothing but those fields can reach the template. Names of unknown fields
    are counted in ``unknown``.
    """
    if not isinstance(obj, (list, tuple)):
        return None, "invalid_format"
    messages: list[dict[str, Any]] = []
    for message in obj:
        if not isinstance(message, Mapping) or "role" not in message:
            return None, "invalid_format"
        extra = [k for k in message if k not in _FIELDS]
        if extra:
            if unknown is not None:
                unknown.update(str(k) for k in extra)
            return None, "unknown_field"
        role, content = message["role"], message.get("content")
        if role not in _ROLES:
            return None, "unknown_role"
        if not isinstance(content, str):
            return None, "non_string_content"
        if any(message.get(k) is not None and not isinstance(message[k], str) for k in _STRING_FIELDS):
            return None, "non_string_field"
        messages.append({k: message.get(k) for k in _FIELDS})
    return messages, None


class _BadToolJSON(ValueError):
    """A ``tools``/``tool_calls`` string is not JSON."""


def _template_roles(tokenizer: Any) -> frozenset[str]:
    """Roles the tokenizer's template renders: ``tool`` only where the template names it (MiniMind2's
    template would silently drop a tool message, MiniMind-3's renders it as a tool response)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    has_tool = "'tool'" in template or '"tool"' in template
    return frozenset(_ROLES if has_tool else _ROLES[:3])


def _template_inputs(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """(messages, tools) as upstream's SFTDataset hands them to ``apply_chat_template``: ``tools`` from a
    system message's JSON string (the last such message wins), each ``tool_calls`` string parsed."""
    tools = None
    out = []
    for message in messages:
        message = dict(message)
        try:
            if message["role"] == "system" and message.get("tools"):
                tools = json.loads(message["tools"])
            if message.get("tool_calls"):
                message["tool_calls"] = json.loads(message["tool_calls"])
        except ValueError as exc:
            raise _BadToolJSON(str(exc)) from None
        out.append(message)
    return out, tools


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
_EMPTY_THINK = "<think>\n\n</think>\n\n"
ADD_SYSTEM_RATIO = 0.2
EMPTY_THINK_KEEP_RATIO = 0.2


class AugmentRNG(Protocol):
    """The two calls upstream's augmentation makes on Python's ``random`` module."""

    def random(self) -> float: ...

    def choice(self, seq: Sequence[str]) -> str: ...


def _augment_messages(messages: list[dict[str, Any]], rng: AugmentRNG) -> list[dict[str, Any]]:
    """Upstream's ``pre_processing_chat``: tool-use data untouched, else a system prompt with p 0.2."""
    if any(m.get("tools") for m in messages):
        return messages
    if messages and messages[0]["role"] != "system" and rng.random() < ADD_SYSTEM_RATIO:
        system = {k: None for k in _FIELDS}
        system.update(role="system", content=rng.choice(SYSTEM_PROMPTS))
        return [system, *messages]
    return messages


def _augment_text(text: str, rng: AugmentRNG) -> str:
    """Upstream's ``post_processing_chat``: every empty think block removed with p 0.8."""
    if _EMPTY_THINK in text and rng.random() > EMPTY_THINK_KEEP_RATIO:
        return text.replace(_EMPTY_THINK, "")
    return text


@dataclass(frozen=True)
class _Markers:
    """Token ids that delimit supervised spans, derived from the tokenizer itself."""

    header: np.ndarray  # ids of "<|im_start|>assistant"
    end_id: int  # id of "<|im_end|>"

    @classmethod
    def of(cls, tokenizer: Any) -> _Markers:
        ids = []
        for token in (_IM_START, _IM_END):
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tokenizer.convert_ids_to_tokens(tid) != token:
                raise DataError(f"the tokenizer has no {token} token; SFT data needs a ChatML "
                                "(MiniMind2-format) tokenizer")
            ids.append(int(tid))
        header = np.asarray(_tokenize(tokenizer, [f"{_IM_START}assistant"])[0], dtype=np.int64)
        if header.size < 2 or header[0] != ids[0]:
            raise DataError(f"the tokenizer splits {_IM_START!r} when followed by 'assistant': "
                            f"{header.tolist()}")
        return cls(header=header, end_id=ids[1])


def _render(tokenizer: Any, messages: list[dict[str, Any]], rng: AugmentRNG | None = None) -> str:
    """The text upstream tokenises: (augmented) messages through the chat template with the tools."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat_template; SFT data is rendered with it")
    if rng is not None:
        messages = _augment_messages(messages, rng)
    template_messages, tools = _template_inputs(messages)
    text = tokenizer.apply_chat_template(template_messages, tokenize=False, add_generation_prompt=False,
                                         tools=tools)
    return _augment_text(text, rng) if rng is not None else text


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
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


def _supervision_mask(ids: np.ndarray, markers: _Markers) -> np.ndarray:
    """Boolean mask of supervised positions, MiniMind2's rule on untruncated ``ids``.

    After each ``<|im_start|>assistant`` the next token (the header's newline, possibly merged with
    leading whitespace of the content) is skipped; supervision then runs through the first
    ``<|im_end|>`` and one token more (its newline), or to the end when there is none. Headers inside a
    supervised span are not headers. Truncating the mask afterwards equals computing it on truncated ids.
    """
    n, k = ids.size, markers.header.size
    mask = np.zeros(n, dtype=bool)
    if n < k:
        return mask
    candidates = np.flatnonzero(ids[: n - k + 1] == markers.header[0])
    if candidates.size == 0:
        return mask
    ends = np.flatnonzero(ids == markers.end_id)
    resume = 0
    for s in candidates.tolist():
        if s < resume or not np.array_equal(ids[s:s + k], markers.header):
            continue
        newline = s + k
        j = int(np.searchsorted(ends, newline))
        if j == ends.size:
            mask[newline + 1:] = True
            break
        end = int(ends[j])
        mask[newline + 1:end + 2] = True
        resume = end + 1
    return mask


def encode_conversation(tokenizer: Any, conversations: Sequence[Mapping[str, Any]], max_length: int,
                        *, rng: AugmentRNG | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation, truncated to ``max_length`` tokens.

    Roles are taken from each message (``system``/``user``/``assistant``, and ``tool`` where the
    template renders it), not from its position; every message field and the tools reach the chat
    template as in upstream's ``SFTDataset``. ``rng`` (e.g. a seeded ``random.Random``) turns on
    upstream's random augmentation with its draws in upstream's order. Raises :class:`DataError` for an
    unknown role or field, non-string content, bad tool JSON or a malformed message.
    """
    if max_length <= 0:
        raise ValueError(f"max_length={max_length} must be > 0")
    unknown: Counter[str] = Counter()
    messages, reason = _check_messages(conversations, unknown)
    if messages and any(m["role"] not in _template_roles(tokenizer) for m in messages):
        messages, reason = None, "unknown_role"
    if not messages:
        detail = f": {sorted(unknown)}" if unknown else ""
        raise DataError(f"invalid conversation ({reason or 'empty'}{detail}): {conversations!r:.200}")
    try:
        text = _render(tokenizer, messages, rng)
    except _BadToolJSON as exc:
        raise DataError(f"invalid conversation (tools/tool_calls is not a JSON string: {exc})") from None
    ids = np.asarray(_tokenize(tokenizer, [text])[0], dtype=np.int64)
    mask = _supervision_mask(ids, _Markers.of(tokenizer))[:max_length]
    ids = ids[:max_length]
    return ids.tolist(), np.where(mask, ids, IGNORE_INDEX).tolist()


# ---------------------------------------------------------------------------------------------------
# Reading.


def _parse_line(raw: bytes, skipped: Counter[str] | None, unknown: Counter[str] | None
                ) -> list[dict[str, Any]] | None:
    """The messages of one non-blank jsonl line, or None when skipped (counted by reason).

    Raises ``ValueError`` (JSON or UTF-8) for a line that is not JSON at all.
    """
    obj = json.loads(raw)
    messages, reason = _check_messages(obj.get("conversations") if isinstance(obj, dict) else None,
                                       unknown)
    if messages is not None and not any(m["role"] == "assistant" for m in messages):
        reason = "no_assistant"
    if reason is not None:
        if skipped is not None:
            skipped[reason] += 1
        return None
    return messages


def _read(path: Path, skipped: Counter[str] | None,
          on_line: Callable[[bytes], None] | None = None) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if on_line is not None:
                on_line(raw)
            if not raw.strip():
                continue
            try:
                messages = _parse_line(raw, skipped, None)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise DataError(f"{path}:{line_no}: malformed JSON line: {exc}") from None
            if messages is None:
                log.debug("%s:%d: skipped", path, line_no)
                continue
            yield line_no, messages


def read_conversations(path: str | Path, skipped: Counter[str] | None = None
                       ) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """Yield ``(line_number, messages)`` for each usable sample of a MiniMind SFT jsonl file.

    Blank lines are ignored. A line that is not valid JSON raises :class:`DataError` naming
    ``file:line``. Samples that are not usable (see :class:`SkipCounts`) are skipped and, when
    ``skipped`` is given, counted in it by reason.
    """
    return _read(Path(path), skipped)


# ---------------------------------------------------------------------------------------------------
# Token cache.


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$MINIMIND_CACHE``, else ``~/.cache/minimind-tune/tokens``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MINIMIND_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "minimind-tune" / "tokens"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _token_dtype(tokenizer: Any) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) < 2**16 else np.dtype(np.int32)


def _tokenizer_key(tokenizer: Any) -> str:
    from .tokenizer import tokenizer_fingerprint

    try:
        return tokenizer_fingerprint(tokenizer)
    except (ValueError, OSError):
        # Not loaded from a local folder (built in memory, or a hub name): hash what it is instead.
        state = json.dumps([tokenizer.backend_tokenizer.to_str(), str(tokenizer.special_tokens_map)])
        return "mem-" + hashlib.sha256(state.encode("utf-8")).hexdigest()


def _key_parts(path: Path, tokenizer: Any, max_seq_len: int, augment: bool = False,
               augment_seed: int = 0) -> dict[str, Any]:
    template = getattr(tokenizer, "chat_template", None) or ""
    parts: dict[str, Any] = {
        "version": CACHE_VERSION,
        "data_sha256": _file_sha256(path),
        "tokenizer": _tokenizer_key(tokenizer),
        "max_seq_len": int(max_seq_len),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
    }
    if augment:  # absent when off, so an unaugmented cache keeps one key
        parts.update(augment=True, augment_seed=int(augment_seed))
    return parts


def _cache_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True, eq=False)
class TokenCache:
    """One tokenised file, memory-mapped: sample ``i`` is ``tokens[offsets[i]:offsets[i+1]]``."""

    path: Path
    meta: dict[str, Any]
    tokens: np.ndarray  # uint16 or int32
    mask: np.ndarray  # bool, True where the token is supervised
    offsets: np.ndarray  # int64, num_samples + 1
    lines: np.ndarray  # int64, the 1-based source line of each sample
    supervised: np.ndarray  # int32, supervised tokens per sample

    @property
    def key(self) -> str:
        return str(self.meta["key"])

    @property
    def num_samples(self) -> int:
        return int(self.meta["num_samples"])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def skipped(self) -> SkipCounts:
        return SkipCounts.from_counter(self.meta["skipped"])

    def __reduce__(self) -> tuple[Callable[[Path], TokenCache], tuple[Path]]:
        # Pickle by path: a copy in another process maps the same files instead of carrying the data.
        return open_cache, (self.path,)


def open_cache(path: str | Path) -> TokenCache:
    """Map a published cache folder; raises ``OSError``/``ValueError`` when it is incomplete or stale."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{path}: cache format {meta.get('version')} != {CACHE_VERSION}")
    arrays = {}
    for name in _ARRAYS:
        # A zero-length file cannot be mapped; an empty dataset has nothing to map anyway.
        arrays[name] = np.load(path / f"{name}.npy", mmap_mode="r" if meta["num_tokens"] else None)
    if arrays["offsets"].shape != (meta["num_samples"] + 1,) or \
            arrays["tokens"].shape != (meta["num_tokens"],):
        raise ValueError(f"{path}: array shapes disagree with meta.json")
    return TokenCache(path=path, meta=meta, **arrays)


class _RawArray:
    """An append-only raw binary file that becomes an ``.npy`` file once its length is known."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype) -> None:
        self.path = folder / f"{name}.raw"
        self.final = folder / f"{name}.npy"
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.fh: BinaryIO = self.path.open("wb")

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self.fh.write(values.tobytes())
        self.count += values.size

    def finish(self) -> None:
        self.fh.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.count,)}
        # Header then a streamed copy: np.save would need the whole array in memory.
        with self.final.open("wb") as out, self.path.open("rb") as src:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(src, out, _HASH_BLOCK)
        self.path.unlink()

    def close(self) -> None:
        self.fh.close()


@dataclass(frozen=True)
class _EncodeSpec:
    """Everything a worker needs to turn raw lines into cache rows (pickled once per worker)."""

    tokenizer: Any
    markers: _Markers
    max_seq_len: int
    augment: bool
    augment_seed: int


@dataclass
class _ChunkResult:
    """Cache rows of one chunk of lines, and what was skipped on the way."""

    lines: list[int]
    ids: list[np.ndarray]
    masks: list[np.ndarray]
    skipped: Counter[str]
    unknown: Counter[str]
    # (line, message) of the first line that is not JSON: the build stops there.
    error: tuple[int, str] | None = None


def _encode_lines(spec: _EncodeSpec, chunk: list[tuple[int, bytes]]) -> _ChunkResult:
    """Parse, validate, render, tokenise (one batched call) and label a chunk of non-blank lines."""
    import random

    res = _ChunkResult([], [], [], Counter(), Counter())
    roles = _template_roles(spec.tokenizer)
    rendered: list[tuple[int, str]] = []
    for line_no, raw in chunk:
        try:
            messages = _parse_line(raw, res.skipped, res.unknown)
        except ValueError as exc:
            res.error = (line_no, str(exc))
            break
        if messages is None:
            continue
        if any(m["role"] not in roles for m in messages):
            res.skipped["unknown_role"] += 1
            continue
        # Per-sample draws seeded by (seed, line): the same cache whatever the chunking or workers.
        rng = random.Random(f"{spec.augment_seed}:{line_no}") if spec.augment else None
        try:
            rendered.append((line_no, _render(spec.tokenizer, messages, rng)))
        except DataError:
            raise
        except _BadToolJSON:
            res.skipped["invalid_tool_json"] += 1
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception is a plain Exception
            res.skipped["template_error"] += 1
            log.debug("line %d: chat template failed: %s", line_no, exc)
    ids_list = _tokenize(spec.tokenizer, [text for _, text in rendered])
    for (line_no, _), ids in zip(rendered, ids_list):
        ids_arr = np.asarray(ids, dtype=np.int64)
        mask = _supervision_mask(ids_arr, spec.markers)
        if not mask.any():
            res.skipped["no_supervised_tokens"] += 1
            continue
        mask = mask[:spec.max_seq_len]
        if not mask.any():
            res.skipped["truncated"] += 1
            continue
        res.lines.append(line_no)
        res.ids.append(ids_arr[:spec.max_seq_len])
        res.masks.append(mask)
    return res


_WORKER_SPEC: _EncodeSpec | None = None


def _worker_init(spec: _EncodeSpec) -> None:
    global _WORKER_SPEC
    # Each worker is one core: the Rust tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_SPEC = spec


def _worker_encode(chunk: list[tuple[int, bytes]]) -> _ChunkResult:
    assert _WORKER_SPEC is not None
    return _encode_lines(_WORKER_SPEC, chunk)


def _chunks(path: Path, on_line: Callable[[bytes], None]) -> Iterator[list[tuple[int, bytes]]]:
    """The file's non-blank lines, streamed in chunks of at most _CHUNK_SAMPLES lines / _CHUNK_BYTES."""
    chunk: list[tuple[int, bytes]] = []
    size = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            on_line(raw)
            if not raw.strip():
                continue
            chunk.append((line_no, raw))
            size += len(raw)
            if len(chunk) >= _CHUNK_SAMPLES or size >= _CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _encoded(spec: _EncodeSpec, chunks: Iterator[list[tuple[int, bytes]]], workers: int
             ) -> Iterator[_ChunkResult]:
    """Chunk results in file order, from ``workers`` processes (1: in this process).

    At most ``2 * workers`` chunks are in flight (``Pool.imap`` would read the whole file ahead), so
    memory stays bounded by chunk size, not file size.
    """
    if workers <= 1:
        for chunk in chunks:
            yield _encode_lines(spec, chunk)
        return
    import multiprocessing
    from collections import deque

    # spawn: forking a process that has run torch or Rust thread pools is not safe.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(spec,)) as pool:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _build(path: Path, tokenizer: Any, max_seq_len: int, parts: Mapping[str, Any], key: str,
           folder: Path, show_progress: bool, workers: int) -> None:
    """Tokenise ``path`` into ``folder`` (a private temp folder), streaming with bounded memory."""
    spec = _EncodeSpec(tokenizer, _Markers.of(tokenizer), max_seq_len, bool(parts.get("augment")),
                       int(parts.get("augment_seed", 0)))
    start = time.perf_counter()
    skipped: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    digest = hashlib.sha256()
    size = path.stat().st_size
    arrays = {
        "tokens": _RawArray(folder, "tokens", _token_dtype(tokenizer)),
        "mask": _RawArray(folder, "mask", np.dtype(bool)),
        "offsets": _RawArray(folder, "offsets", np.dtype(np.int64)),
        "lines": _RawArray(folder, "lines", np.dtype(np.int64)),
        "supervised": _RawArray(folder, "supervised", np.dtype(np.int32)),
    }
    arrays["offsets"].append(np.zeros(1, dtype=np.int64))
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"tokenising {path.name}",
               disable=not show_progress, file=sys.stderr, leave=False)
    total = 0
    max_len = 0

    def on_line(raw: bytes) -> None:
        digest.update(raw)
        bar.update(len(raw))

    try:
        for res in _encoded(spec, _chunks(path, on_line), workers):
            skipped.update(res.skipped)
            unknown.update(res.unknown)
            if res.error is not None:
                raise DataError(f"{path}:{res.error[0]}: malformed JSON line: {res.error[1]}")
            if not res.lines:
                continue
            lengths = np.fromiter((ids.size for ids in res.ids), dtype=np.int64, count=len(res.ids))
            arrays["tokens"].append(np.concatenate(res.ids))
            arrays["mask"].append(np.concatenate(res.masks))
            arrays["offsets"].append(total + np.cumsum(lengths))
            arrays["lines"].append(np.asarray(res.lines, dtype=np.int64))
            arrays["supervised"].append(np.fromiter((int(m.sum()) for m in res.masks), dtype=np.int32))
            total += int(lengths.sum())
            max_len = max(max_len, int(lengths.max()))
        for array in arrays.values():
            array.finish()
    finally:
        bar.close()
        for array in arrays.values():
            array.close()
    if digest.hexdigest() != parts["data_sha256"]:
        raise DataError(f"{path} changed while it was being tokenised; run again")
    counts = SkipCounts.from_counter(skipped)
    num_samples = arrays["lines"].count
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "key_parts": dict(parts),
        "source": str(path),
        "source_bytes": size,
        "num_samples": num_samples,
        "num_tokens": total,
        "num_supervised": int(np.load(folder / "supervised.npy").sum(dtype=np.int64)),
        "max_length": max_len,
        "token_dtype": arrays["tokens"].dtype.name,
        "skipped": counts.as_dict(),
        "unknown_fields": dict(sorted(unknown.items())),
        "workers": workers,
        "build_seconds": round(time.perf_counter() - start, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # meta.json last: its presence marks the folder complete.
    (folder / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    log.info("tokenised %s: %d samples, %d tokens (%d supervised) in %.2fs with %d worker(s); "
             "skipped: %s", path, num_samples, total, meta["num_supervised"], meta["build_seconds"],
             workers, counts)


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").exists():
            raise
        log.debug("%s was published concurrently; discarding this build", final)
        shutil.rmtree(tmp, ignore_errors=True)


# Below this size a file is tokenised in this process: starting workers costs more than it saves.
_PARALLEL_MIN_BYTES = 4 << 20


def load_or_build_cache(path: str | Path, tokenizer: Any, max_seq_len: int,
                        cache_dir: str | Path | None = None, *,
                        show_progress: bool | None = None, augment: bool = False,
                        augment_seed: int = 0, workers: int | None = None) -> TokenCache:
    """The token cache of ``path``, tokenising it first unless an identical build is cached.

    ``show_progress`` None shows a progress bar only when stderr is a terminal. ``workers``: processes
    that tokenise (None or 0: every core for files over 4 MiB, else this process alone); the cache is
    the same whatever the number.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"SFT data file not found: {path}")
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len={max_seq_len} must be > 0")
    root = resolve_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    parts = _key_parts(path, tokenizer, max_seq_len, augment, augment_seed)
    key = _cache_key(parts)
    final = root / f"{path.stem}-{key}"
    if (final / "meta.json").exists():
        try:
            cache = open_cache(final)
            log.info("token cache hit for %s: %s", path, final)
            return cache
        except (OSError, ValueError) as exc:
            log.warning("rebuilding unreadable token cache %s: %s", final, exc)
            trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=root))
            try:
                os.rename(final, trash / "old")
            except OSError:
                pass  # someone else moved it already
            shutil.rmtree(trash, ignore_errors=True)
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    if not workers:
        workers = default_workers() if path.stat().st_size >= _PARALLEL_MIN_BYTES else 1
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        _build(path, tokenizer, max_seq_len, parts, key, tmp, show_progress, workers)
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(final)


# ---------------------------------------------------------------------------------------------------
# Datasets.


class TokenizedDataset(torch.utils.data.Dataset):
    """The samples ``indices`` of a :class:`TokenCache`, as ``(input_ids, labels)`` LongTensors."""

    def __init__(self, cache: TokenCache, indices: np.ndarray | Sequence[int] | None = None) -> None:
        self.cache = cache
        idx = np.arange(cache.num_samples) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= cache.num_samples):
            raise IndexError(f"indices out of range for {cache.num_samples} samples")
        self.indices = idx
        self._starts = np.asarray(cache.offsets[idx], dtype=np.int64)
        self.lengths: np.ndarray = np.asarray(cache.offsets[idx + 1], dtype=np.int64) - self._starts
        self.supervised: np.ndarray = np.asarray(cache.supervised[idx], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        lo = int(self._starts[i])
        hi = lo + int(self.lengths[i])
        ids = np.asarray(self.cache.tokens[lo:hi], dtype=np.int64)
        labels = np.where(self.cache.mask[lo:hi], ids, IGNORE_INDEX)
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def batch(self, items: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``items`` right-padded to the longest of them, gathered in one numpy pass."""
        items = np.asarray(items, dtype=np.int64)
        if items.size == 0:
            raise ValueError("empty batch")
        starts, lengths = self._starts[items], self.lengths[items]
        cols = np.arange(int(lengths.max()), dtype=np.int64)
        valid = cols < lengths[:, None]
        # Padding positions read token 0 of the sample itself (always in bounds) and are overwritten.
        pos = starts[:, None] + np.where(valid, cols, 0)
        ids = np.where(valid, self.cache.tokens[pos], pad_id).astype(np.int64)
        labels = np.where(valid & self.cache.mask[pos], ids, IGNORE_INDEX)
        return torch.from_numpy(ids), torch.from_numpy(labels)

    def __reduce__(self) -> tuple[type[TokenizedDataset], tuple[TokenCache, np.ndarray]]:
        return TokenizedDataset, (self.cache, self.indices)


@dataclass(frozen=True)
class SFTStats:
    """What :func:`prepare_data` made of the data: logged and stored with runs."""

    train_samples: int
    val_samples: int
    train_tokens: int
    val_tokens: int
    train_supervised_tokens: int
    val_supervised_tokens: int
    skipped: SkipCounts
    cache_key: str
    cache_path: str
    # Set only with an explicit val_path (its own file, skips and cache).
    val_skipped: SkipCounts | None = None
    val_cache_key: str | None = None
    val_cache_path: str | None = None
    # Message fields that made samples of the training file be skipped ("name xcount, ..."), if any.
    unknown_fields: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Flat JSON-ready mapping (``skipped.<reason>`` keys)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, SkipCounts):
                out.update({f"{f.name}.{k}": v for k, v in value.as_dict().items()})
            elif value is not None:
                out[f.name] = value
        return out


@dataclass(frozen=True, eq=False)
class SFTData:
    """Train and validation splits ready for :func:`batch_indices`/:func:`iterate_batches`."""

    train: TokenizedDataset
    val: TokenizedDataset
    pad_id: int
    vocab_size: int
    stats: SFTStats

    def stats_dict(self) -> dict[str, Any]:
        return self.stats.as_dict()


def _empty_error(path: Path, cache: TokenCache) -> DataError:
    hint, max_seq_len = "", cache.meta.get("key_parts", {}).get("max_seq_len", "?")
    if cache.skipped.truncated and cache.skipped.truncated >= cache.skipped.total / 2:
        # The usual cause: every answer starts beyond the window.
        hint = (f"; with data.max_seq_len={max_seq_len} no answer token is left in the window: raise "
                "data.max_seq_len")
    return DataError(f"{path}: no usable SFT samples; all {cache.skipped.total} were skipped "
                     f"({cache.skipped}){hint}")


def prepare_data(cfg: DataConfig, tokenizer: Any = None, *,
                 show_progress: bool | None = None) -> SFTData:
    """Tokenise (or map the cached tokens of) the configured data and split it into train/val.

    Without ``val_path``, ``round(val_fraction * n)`` of the ``n`` usable samples, chosen by
    ``split_seed``, form the validation split. Raises :class:`DataError` when a split would be empty.
    """
    if tokenizer is None:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.train_path is None:
        from .demo import DEMO_DATA_PATH

        train_path = Path(DEMO_DATA_PATH)
    else:
        train_path = Path(cfg.train_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad nor an eos token to pad batches with")

    build = {"show_progress": show_progress, "augment": cfg.augment, "augment_seed": cfg.augment_seed,
             "workers": cfg.tokenize_workers}
    cache = _usable(train_path, load_or_build_cache(train_path, tokenizer, cfg.max_seq_len,
                                                    cfg.cache_dir, **build))
    val_cache: TokenCache | None = None
    if cfg.val_path is not None:
        val_path = Path(cfg.val_path)
        val_cache = _usable(val_path, load_or_build_cache(val_path, tokenizer, cfg.max_seq_len,
                                                          cfg.cache_dir, **build))
    return _assemble(cfg, train_path, cache, val_cache, pad_id=int(pad_id), vocab_size=len(tokenizer))


def open_prepared(cfg: DataConfig, train_cache: str | Path, val_cache: str | Path | None = None, *,
                  pad_id: int, vocab_size: int) -> SFTData:
    """What :func:`prepare_data` returned for ``cfg``, reopened from its published cache folders alone.

    ``train_cache``/``val_cache`` are ``stats.cache_path``/``stats.val_cache_path`` of that result, and
    ``pad_id``/``vocab_size`` its fields; neither the source jsonl nor the tokenizer is read, so a
    process that has only the cache folders (a trial on another machine) gets the same splits.
    Raises ``OSError``/``ValueError`` when a folder is missing or incomplete.
    """
    if (val_cache is None) != (cfg.val_path is None):
        raise ValueError(f"val_cache={val_cache!r} does not match data.val_path={cfg.val_path!r}")
    train = open_cache(train_cache)
    source = Path(train.meta.get("source", train_cache))
    _usable(source, train)
    val = None
    if val_cache is not None:
        val = open_cache(val_cache)
        _usable(Path(val.meta.get("source", val_cache)), val)
    return _assemble(cfg, source, train, val, pad_id=pad_id, vocab_size=vocab_size)


def _usable(path: Path, cache: TokenCache) -> TokenCache:
    """``cache`` after warning about skipped samples; :class:`DataError` when none is usable."""
    if cache.skipped.total:
        unknown = cache.meta.get("unknown_fields") or {}
        fields = (" unknown message fields (only role, content, reasoning_content, tools, tool_calls "
                  "are read): " + ", ".join(f"{k} x{v}" for k, v in unknown.items())) if unknown else ""
        log.warning("%s: skipped %d samples (%s)%s", path, cache.skipped.total, cache.skipped, fields)
    if cache.num_samples == 0:
        raise _empty_error(path, cache)
    return cache


def _assemble(cfg: DataConfig, train_path: Path, cache: TokenCache, val_cache: TokenCache | None, *,
              pad_id: int, vocab_size: int) -> SFTData:
    """Split (or pair) the usable caches into :class:`SFTData`."""
    rng = np.random.default_rng(cfg.split_seed)
    if val_cache is not None:
        train = TokenizedDataset(cache)
        val_idx = np.arange(val_cache.num_samples)
    else:
        n = cache.num_samples
        n_val = math.floor(n * cfg.val_fraction + 0.5)
        if n_val == 0:
            raise DataError(f"{train_path}: the validation split is empty ({n} usable samples x "
                            f"val_fraction {cfg.val_fraction}); raise val_fraction or set val_path")
        if n_val == n:
            raise DataError(f"{train_path}: the training split is empty ({n} usable samples x "
                            f"val_fraction {cfg.val_fraction}); lower val_fraction or add data")
        perm = rng.permutation(n)
        # Sorted so reads walk the memory map forwards; batch order is shuffled separately.
        train = TokenizedDataset(cache, np.sort(perm[n_val:]))
        val_idx = np.sort(perm[:n_val])
    if cfg.val_max_samples and val_idx.size > cfg.val_max_samples:
        # A random subset of the split (not its first rows: files are often sorted by source or length).
        # Held-out samples beyond the cap are used by neither split.
        val_idx = np.sort(rng.choice(val_idx, size=cfg.val_max_samples, replace=False))
    val = TokenizedDataset(val_cache if val_cache is not None else cache, val_idx)

    stats = SFTStats(
        train_samples=len(train),
        val_samples=len(val),
        train_tokens=int(train.lengths.sum()),
        val_tokens=int(val.lengths.sum()),
        train_supervised_tokens=int(train.supervised.sum()),
        val_supervised_tokens=int(val.supervised.sum()),
        skipped=cache.skipped,
        cache_key=cache.key,
        cache_path=str(cache.path),
        val_skipped=None if val_cache is None else val_cache.skipped,
        val_cache_key=None if val_cache is None else val_cache.key,
        val_cache_path=None if val_cache is None else str(val_cache.path),
        unknown_fields=", ".join(f"{k} x{v}" for k, v in (cache.meta.get("unknown_fields") or {}).items())
        or None,
    )
    log.info("data: %d train / %d val samples, %d / %d supervised tokens", stats.train_samples,
             stats.val_samples, stats.train_supervised_tokens, stats.val_supervised_tokens)
    return SFTData(train=train, val=val, pad_id=int(pad_id), vocab_size=int(vocab_size), stats=stats)


# ---------------------------------------------------------------------------------------------------
# Batching.


def collate(samples: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(input_ids, labels)`` pairs to the longest sample: inputs with ``pad_id``, labels -100."""
    if not samples:
        raise ValueError("empty batch")
    width = max(int(ids.numel()) for ids, _ in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(samples):
        input_ids[row, :ids.numel()] = ids
        labels[row, :lab.numel()] = lab
    return input_ids, labels


def batch_indices(lengths: np.ndarray | Sequence[int], batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True, group_by_length: bool = True,
                  chunk_batches: int = 64) -> list[list[int]]:
    """Batches of dataset indices, a deterministic function of ``(seed, epoch)``; the last may be short.

    With ``group_by_length`` the shuffled order is cut into chunks of ``chunk_batches`` batches, each
    chunk sorted by length and cut into batches, so a batch holds similar lengths (little padding)
    while which samples meet still varies by epoch; the batch order is then shuffled. Without
    ``shuffle`` (evaluation) the order is sequential, length-sorted within chunks when grouping.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be > 0")
    if chunk_batches <= 0:
        raise ValueError(f"chunk_batches={chunk_batches} must be > 0")
    lengths = np.asarray(lengths)
    n = lengths.size
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if group_by_length:
        chunk = chunk_batches * batch_size
        # Stable sort keeps equal-length ties in the (shuffled) order, so ties stay random too.
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                for c in np.split(order, range(chunk, n, chunk))]) if n else order
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None and group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return [b.tolist() for b in batches]


def iterate_batches(dataset: TokenizedDataset, batch_indices: Sequence[Sequence[int]], pad_id: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Padded ``(input_ids, labels)`` LongTensors for each index batch, in order."""
    for items in batch_indices:
        yield dataset.batch(items, pad_id)


def padding_fraction(lengths: np.ndarray | Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions when each batch is padded to its longest sample."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for items in batches:
        lens = lengths[np.asarray(items, dtype=np.int64)]
        real += int(lens.sum())
        padded += int(lens.max()) * lens.size if lens.size else 0
    return 1.0 - real / padded if padded else 0.0
