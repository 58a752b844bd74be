"""The token cache: a MiniMind SFT jsonl file tokenised once into memory-mapped ``.npy`` arrays.

One folder per (file content, tokenizer, ``max_seq_len``, chat template, :data:`CACHE_VERSION`,
augmentation seed) under :func:`resolve_cache_dir`, so every later run or trial only maps it. Worker
processes (all cores) tokenise the streamed file: memory stays bounded by the chunks in flight, whatever
the file's size. A build is published by one rename, so a reader sees a whole folder or none, and
concurrent builders of one key keep the first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from . import chat
from .chat import DataError
from .signals import STOP_SIGNALS, signals_deferred

__all__ = ["CACHE_VERSION", "SkipCounts", "TokenCache", "default_workers", "load_or_build_cache", "open_cache",
           "resolve_cache_dir"]

log = logging.getLogger(__name__)

# Bump whenever validation, rendering, labelling or the on-disk layout changes: it is part of the key,
# and a folder of another version is rebuilt, never read.
CACHE_VERSION = 2
# Samples per batched tokenizer call, and a byte cap so a few huge samples cannot blow up memory.
_CHUNK_SAMPLES = 1024
_CHUNK_BYTES = 16 << 20
_HASH_BLOCK = 1 << 20
# Below this size a file is tokenised in this process: starting workers costs more than it saves.
_PARALLEL_MIN_BYTES = 4 << 20
_ARRAYS = ("tokens", "mask", "offsets", "lines", "supervised")


@dataclass(frozen=True)
class SkipCounts:
    """How many samples of a file were skipped, per reason.

    ``invalid_format``: not a JSON object, no ``conversations`` list, or a message that is not an
    object or has no role; ``unknown_field``: a message field other than upstream's five (upstream's
    loader refuses such a file; the names are in the cache's ``unknown_fields``); ``unknown_role``: a
    role the chat template does not render (``tool`` with MiniMind2's); ``non_string_content``: content
neither a string nor null (null is a missing content, as upstream's loader makes it); ``non_string_field``:
    reasoning_content/tools/tool_calls that is not a (JSON) string; ``invalid_tool_json``: tools or
    tool_calls that is not JSON; ``template_error``: the chat template raised (strict templates check
    role order; a null content the template cannot join, as MiniMind2's assistant turn); ``no_supervised_tokens``: no ``<|im_start|>assistant`` span was rendered (e.g. only an
    assistant-first turn); ``truncated``: every supervised token lies beyond ``max_seq_len``.
    """

    invalid_format: int = 0
    unknown_field: int = 0
    unknown_role: int = 0
    non_string_content: int = 0
    non_string_field: int = 0
    invalid_tool_json: int = 0
    no_assistant: int = 0
    template_error: int = 0
    no_supervised_tokens: int = 0
    truncated: int = 0

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.as_dict().items() if v) or "none"


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$MINIMIND_CACHE``, else ``~/.cache/minimind-tune/tokens``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MINIMIND_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minimind-tune" / "tokens"


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
    def skipped(self) -> SkipCounts:
        return SkipCounts(**self.meta["skipped"])

    def __reduce__(self) -> tuple[Callable[[Path], TokenCache], tuple[Path]]:
        # Pickle by path: a copy in another process maps the same files instead of carrying the data.
        return open_cache, (self.path,)


def open_cache(path: str | Path) -> TokenCache:
    """Map a published cache folder; raises ``OSError``/``ValueError`` when it is incomplete or stale."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{path}: cache format {meta.get('version')} != {CACHE_VERSION}")
    # A zero-length file cannot be mapped; an empty dataset has nothing to map anyway.
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r" if meta["num_tokens"] else None)
              for name in _ARRAYS}
    if arrays["offsets"].shape != (meta["num_samples"] + 1,) or arrays["tokens"].shape != (meta["num_tokens"],):
        raise ValueError(f"{path}: array shapes disagree with meta.json")
    return TokenCache(path=path, meta=meta, **arrays)


class _NpyWriter:
    """A 1-d ``.npy`` file written by appending: np.save would need the whole array in memory."""

    def __init__(self, path: Path, dtype: Any) -> None:
        self.dtype, self.count = np.dtype(dtype), 0
        self.fh: BinaryIO = path.open("wb")
        self._header()  # rewritten in place by finish(): numpy pads it so the length can grow

    def _header(self) -> None:
        np.lib.format.write_array_header_1_0(self.fh, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.count,)})

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self.fh.write(values.tobytes())
        self.count += values.size

    def finish(self) -> None:
        self.fh.seek(0)
        self._header()
        self.fh.close()


@dataclass(frozen=True)
class _EncodeSpec:
    """Everything a worker needs to turn raw lines into cache rows (pickled once per worker)."""

    path: Path
    tokenizer: Any
    markers: tuple[np.ndarray, int]
    max_seq_len: int
    augment_seed: int | None  # None: no augmentation


# One chunk's cache rows (line, ids, mask), its skip reasons and the unknown message fields it met.
_Chunk = tuple[list[tuple[int, np.ndarray, np.ndarray]], Counter[str], Counter[str]]


def _encode_lines(spec: _EncodeSpec, lines: list[tuple[int, bytes]]) -> _Chunk:
    """Parse, validate, render, tokenise (one batched call) and label a chunk of non-blank lines."""
    skipped: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    roles = chat.template_roles(spec.tokenizer)
    rendered: list[tuple[int, str]] = []
    for line_no, raw in lines:
        try:
            obj = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise DataError(f"{spec.path}:{line_no}: malformed JSON line: {exc}") from None
        messages, reason = chat.check_messages(obj.get("conversations") if isinstance(obj, dict) else None,
                                               unknown)
        if messages is not None and not any(m["role"] == "assistant" for m in messages):
            reason = "no_assistant"
        elif messages is not None and any(m["role"] not in roles for m in messages):
            reason = "unknown_role"
        if reason is not None:
            skipped[reason] += 1
            continue
        # Per-sample draws seeded by (seed, line): the same cache whatever the chunking or workers.
        rng = None if spec.augment_seed is None else random.Random(f"{spec.augment_seed}:{line_no}")
        try:
            rendered.append((line_no, chat.render(spec.tokenizer, messages, rng)))
        except DataError:
            raise
        except chat.BadToolJSON:
            skipped["invalid_tool_json"] += 1
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception is a plain Exception
            skipped["template_error"] += 1
            log.debug("line %d: chat template failed: %s", line_no, exc)
    rows = []
    for (line_no, _), ids in zip(rendered, chat.tokenize(spec.tokenizer, [text for _, text in rendered])):
        ids_arr = np.asarray(ids, dtype=np.int64)
        mask = chat.supervision_mask(ids_arr, spec.markers)
        if mask[:spec.max_seq_len].any():
            rows.append((line_no, ids_arr[:spec.max_seq_len], mask[:spec.max_seq_len]))
        else:
            skipped["truncated" if mask.any() else "no_supervised_tokens"] += 1
    return rows, skipped, unknown


_WORKER_SPEC: _EncodeSpec | None = None
# How long _encoded waits for one tokeniser worker to start (imports included) before going on without.
_WORKER_START_S = 120.0


def _worker_init(spec: _EncodeSpec, ready: Any) -> None:
    global _WORKER_SPEC
    # A terminal's Ctrl-C reaches the whole process group: a worker leaves it to its parent, which stops
    # the pool (SIGTERM). Started with both signals blocked (_encoded), so none came before this line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # Each worker is one core: the Rust tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_SPEC = spec
    ready.release()  # (_encoded waits for every worker to get here before it can be stopped)


def _worker_encode(lines: list[tuple[int, bytes]]) -> _Chunk:
    assert _WORKER_SPEC is not None
    return _encode_lines(_WORKER_SPEC, lines)


def _chunks(path: Path, on_line: Callable[[bytes], None]) -> Iterator[list[tuple[int, bytes]]]:
    """The file's non-blank lines, streamed in chunks of at most _CHUNK_SAMPLES lines / _CHUNK_BYTES."""
    chunk: list[tuple[int, bytes]] = []
    size = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            on_line(raw)
            if raw.strip():
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


def _encoded(spec: _EncodeSpec, chunks: Iterator[list[tuple[int, bytes]]], workers: int) -> Iterator[_Chunk]:
    """Chunk results in file order, from ``workers`` processes (1: in this process); at most
    ``2 * workers`` chunks in flight (``Pool.imap`` would read the whole file ahead)."""
    if workers <= 1:
        yield from (_encode_lines(spec, chunk) for chunk in chunks)
        return
    import multiprocessing

    # spawn: forking a process that has run torch or Rust thread pools is not safe. The workers start
    # with SIGINT and SIGTERM blocked (inherited; _worker_init unblocks them), and this process defers
    # both until every worker has started: a worker stopped (or its parent gone) in the middle of its
    # start-up prints a traceback (its start-up data or the pool's semaphores half there). Blocking alone
    # is not enough here: a signal taken by another thread still runs the Python handler in this one.
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Semaphore(0)
    with signals_deferred():
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pool = ctx.Pool(workers, _worker_init, (spec, ready))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        try:
            for _ in range(workers):  # (bounded: a worker that dies starting is replaced, or never comes)
                ready.acquire(timeout=_WORKER_START_S)
        except BaseException:
            pool.terminate()
            raise
    with pool:  # (a signal now terminates the pool: every worker can be stopped)
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _tokenizer_key(tokenizer: Any) -> str:
    from .tokenizer import tokenizer_fingerprint

    try:
        return tokenizer_fingerprint(tokenizer)
    except (ValueError, OSError):
        # Not loaded from a local folder (built in memory, or a hub name): hash what it is instead.
        state = json.dumps([tokenizer.backend_tokenizer.to_str(), str(tokenizer.special_tokens_map)])
        return "mem-" + hashlib.sha256(state.encode("utf-8")).hexdigest()


def _key_parts(path: Path, tokenizer: Any, max_seq_len: int, augment: bool, augment_seed: int
               ) -> dict[str, Any]:
    """What the cache key hashes: everything that decides the cache's content."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    template = getattr(tokenizer, "chat_template", None) or ""
    parts: dict[str, Any] = {
        "version": CACHE_VERSION, "data_sha256": digest.hexdigest(), "tokenizer": _tokenizer_key(tokenizer),
        "max_seq_len": int(max_seq_len), "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
    }
    if augment:  # absent when off, so an unaugmented cache keeps one key
        parts.update(augment=True, augment_seed=int(augment_seed))
    return parts


def _build(path: Path, tokenizer: Any, max_seq_len: int, parts: Mapping[str, Any], key: str,
           folder: Path, show_progress: bool, workers: int) -> None:
    """Tokenise ``path`` into ``folder`` (a private temp folder), streaming with bounded memory."""
    spec = _EncodeSpec(path, tokenizer, chat.label_markers(tokenizer), max_seq_len, parts.get("augment_seed"))
    start, size, digest = time.perf_counter(), path.stat().st_size, hashlib.sha256()
    skipped: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    token_dtype = np.uint16 if len(tokenizer) < 2**16 else np.int32
    dtypes = (token_dtype, bool, np.int64, np.int64, np.int32)
    arrays = {name: _NpyWriter(folder / f"{name}.npy", dtype) for name, dtype in zip(_ARRAYS, dtypes)}
    arrays["offsets"].append(np.zeros(1, dtype=np.int64))
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"tokenising {path.name}",
               disable=not show_progress, file=sys.stderr, leave=False)
    total = max_len = num_supervised = 0

    def on_line(raw: bytes) -> None:
        digest.update(raw)
        bar.update(len(raw))

    try:
        for rows, chunk_skipped, chunk_unknown in _encoded(spec, _chunks(path, on_line), workers):
            skipped.update(chunk_skipped)
            unknown.update(chunk_unknown)
            if not rows:
                continue
            lines, ids, masks = zip(*rows)
            lengths = np.fromiter((x.size for x in ids), dtype=np.int64, count=len(ids))
            supervised = np.fromiter((int(m.sum()) for m in masks), dtype=np.int32, count=len(masks))
            arrays["tokens"].append(np.concatenate(ids))
            arrays["mask"].append(np.concatenate(masks))
            arrays["offsets"].append(total + np.cumsum(lengths))
            arrays["lines"].append(np.asarray(lines, dtype=np.int64))
            arrays["supervised"].append(supervised)
            total += int(lengths.sum())
            max_len = max(max_len, int(lengths.max()))
            num_supervised += int(supervised.sum(dtype=np.int64))
    finally:
        bar.close()
        for array in arrays.values():
            array.finish()
    if digest.hexdigest() != parts["data_sha256"]:
        raise DataError(f"{path} changed while it was being tokenised; run again")
    counts = SkipCounts(**skipped)
    meta = {
        "version": CACHE_VERSION, "key": key, "key_parts": dict(parts), "source": str(path), "source_bytes": size,
        "num_samples": arrays["lines"].count, "num_tokens": total, "num_supervised": num_supervised,
        "max_length": max_len, "token_dtype": np.dtype(token_dtype).name, "skipped": counts.as_dict(),
        "unknown_fields": dict(sorted(unknown.items())), "workers": workers,
        "build_seconds": round(time.perf_counter() - start, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # meta.json last: its presence marks the folder complete.
    (folder / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    log.info("tokenised %s: %d samples, %d tokens (%d supervised) in %.2fs with %d worker(s); "
             "skipped: %s", path, meta["num_samples"], total, num_supervised, meta["build_seconds"],
             workers, counts)


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place; if another process got there first, keep theirs."""
    # (os.rename of a folder, never a replace: a concurrent build's folder is kept, not overwritten)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").exists():
            raise
        log.debug("%s was published concurrently; discarding this build", final)
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_build_cache(path: str | Path, tokenizer: Any, max_seq_len: int,
                        cache_dir: str | Path | None = None, *,
                        show_progress: bool | None = None, augment: bool = False,
                        augment_seed: int = 0, workers: int | None = None) -> TokenCache:
    """The token cache of ``path``, tokenising it first unless an identical build is cached.

    ``show_progress`` None: a progress bar only when stderr is a terminal. ``workers``: tokenising
    processes (None or 0: every core for files over 4 MiB), the cache is the same whatever the number.
    Raises :class:`~minimind_train.chat.DataError` for a missing file or a non-JSON line (``file:line``).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"SFT data file not found: {path}")
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len={max_seq_len} must be > 0")
    root = resolve_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    parts = _key_parts(path, tokenizer, max_seq_len, augment, augment_seed)
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:32]
    final = root / f"{path.stem}-{key}"
    if (final / "meta.json").exists():
        try:
            cache = open_cache(final)
            log.info("token cache hit for %s: %s", path, final)
            return cache
        except (OSError, ValueError) as exc:
            log.warning("rebuilding unreadable token cache %s: %s", final, exc)
            trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=root))
            with contextlib.suppress(OSError):  # someone else moved it already
                os.rename(final, trash / "old")
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
