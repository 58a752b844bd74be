"""How fast the token cache builds at scale, against a naive single-process tokenizer loop.

Generates an N-conversation MiniMind-3 SFT file (plain answers, ``reasoning_content``, inline think
blocks and tool use, mixed Chinese/English), builds its token cache with
:func:`minimind_train.token_cache.load_or_build_cache` (all cores unless ``--workers``) and times, in this
same process, a naive loop (``json.loads`` + :func:`~minimind_train.chat.encode_conversation` per
line, one process) over the first ``--naive-n`` conversations. Prints conversations/s of both, their
ratio, peak RSS (this process and the largest worker) and the cache size; the last line holds
``ratio_to_naive=<x>``.

    PYTHONPATH=. python benchmarks/data_scale.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["generate", "main", "naive_rate"]

_WORDS_EN = ("the", "model", "answer", "river", "number", "light", "quickly", "because", "city", "time",
             "prime", "weather", "question", "small", "train", "history", "energy", "simple", "value")
_WORDS_ZH = ("我们", "模型", "回答", "问题", "时间", "城市", "天气", "能量", "历史", "简单", "因为", "数字")
_TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])


def _text(rng: random.Random, lo: int, hi: int) -> str:
    words = _WORDS_ZH if rng.random() < 0.5 else _WORDS_EN
    sep = "" if words is _WORDS_ZH else " "
    return sep.join(rng.choice(words) for _ in range(rng.randint(lo, hi))) + "."


def _conversation(rng: random.Random) -> list[dict[str, Any]]:
    kind = rng.random()
    if kind < 0.1:  # tool use
        return [{"role": "system", "content": "You can call tools.", "tools": _TOOLS},
                {"role": "user", "content": _text(rng, 5, 20)},
                {"role": "assistant", "content": "",
                 "tool_calls": json.dumps([{"name": "get_weather", "arguments": {"city": "Lisbon"}}])},
                {"role": "tool", "content": json.dumps({"temperature": rng.randint(0, 30)})},
                {"role": "assistant", "content": _text(rng, 10, 60)}]
    conv: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        conv.append({"role": "system", "content": _text(rng, 3, 12)})
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        conv.append({"role": "user", "content": _text(rng, 5, 40)})
        answer: dict[str, Any] = {"role": "assistant", "content": _text(rng, 20, 160)}
        if kind < 0.4:
            answer["reasoning_content"] = _text(rng, 10, 80)
        elif kind < 0.5:
            answer["content"] = f"<think>\n{_text(rng, 5, 40)}\n</think>\n\n" + answer["content"]
        conv.append(answer)
    return conv


def generate(path: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` conversations (one ``{"conversations": [...]}`` per line) to ``path``."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"conversations": _conversation(rng)}, ensure_ascii=False) + "\n")
    return path


def naive_rate(path: Path, tokenizer: Any, max_seq_len: int, limit: int) -> tuple[float, int]:
    """(conversations/s, count) of the naive loop: parse and encode one line at a time, one process."""
    from minimind_train.chat import encode_conversation

    start = time.perf_counter()
    count = 0
    with path.open("rb") as fh:
        for raw in fh:
            if count >= limit:
                break
            encode_conversation(tokenizer, json.loads(raw)["conversations"], max_seq_len)
            count += 1
    return count / (time.perf_counter() - start), count


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="conversations to generate (default 100k)")
    parser.add_argument("--naive-n", type=int, default=20_000,
                        help="conversations the naive loop times (a rate; default 20k or --n if less)")
    parser.add_argument("--workers", type=int, default=0, help="cache build processes (0: every core)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: bundled MiniMind-3)")
    parser.add_argument("--work-dir", default=None, help="where the file and cache go (default: a temp dir)")
    args = parser.parse_args(argv)

    from minimind_train.token_cache import default_workers, load_or_build_cache
    from minimind_train.tokenizer import BUNDLED_TOKENIZER3_DIR, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or BUNDLED_TOKENIZER3_DIR)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="data_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        data = generate(work / "sft.jsonl", args.n)
        print(f"generated {args.n} conversations ({data.stat().st_size / 2**20:.1f} MiB) in "
              f"{time.perf_counter() - t0:.1f}s")
        workers = args.workers or default_workers()
        cache_root = work / "cache"
        shutil.rmtree(cache_root, ignore_errors=True)
        t0 = time.perf_counter()
        cache = load_or_build_cache(data, tokenizer, args.max_seq_len, cache_root, show_progress=False,
                                    workers=workers)
        build_s = time.perf_counter() - t0
        rate = args.n / build_s
        naive, naive_count = naive_rate(data, tokenizer, args.max_seq_len, min(args.naive_n, args.n))
        self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        ratio = rate / naive
        print(f"cache build: {args.n} conversations in {build_s:.1f}s = {rate:.0f} conversations/s "
              f"({workers} workers, {cache.num_samples} samples, {cache.meta['num_tokens']} tokens, "
              f"skipped {cache.skipped.total})")
        print(f"naive loop: {naive:.0f} conversations/s over {naive_count} conversations (one process)")
        print(f"peak RSS: {self_mb:.0f} MB this process, {child_mb:.0f} MB largest worker")
        print(f"cache size: {_dir_bytes(cache.path) / 2**20:.1f} MiB")
        print(f"cpus={os.cpu_count()} workers={workers} conversations_per_s={rate:.0f} "
              f"naive_per_s={naive:.0f} ratio_to_naive={ratio:.2f}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
