"""A run's SFT data: the token caches of its files, split into train and validation.

:func:`prepare_data` tokenises (or maps the cached tokens of) ``data.train_path`` -- None is the
bundled demo set -- and holds out a seeded validation split unless ``data.val_path`` names one;
:func:`open_prepared` reopens the same splits from the published cache folders alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .batches import TokenizedDataset
from .chat import DataError
from .config import DEMO_DATA_PATH, DataConfig
from .token_cache import SkipCounts, TokenCache, load_or_build_cache, open_cache

__all__ = ["DEMO_DATA_PATH", "DataError", "SFTData", "SFTStats", "open_prepared", "prepare_data"]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True, eq=False)
class SFTData:
    """Train and validation splits ready for :func:`~minimind_train.batches.batch_indices`."""

    train: TokenizedDataset
    val: TokenizedDataset
    pad_id: int
    vocab_size: int
    stats: SFTStats

    def stats_dict(self) -> dict[str, Any]:
        """:attr:`stats` as a flat JSON-ready mapping (``skipped.<reason>`` keys, unset fields left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self.stats):
            value = getattr(self.stats, f.name)
            if isinstance(value, SkipCounts):
                out.update({f"{f.name}.{k}": v for k, v in value.as_dict().items()})
            elif value is not None:
                out[f.name] = value
        return out


def prepare_data(cfg: DataConfig, tokenizer: Any = None, *, show_progress: bool | None = None) -> SFTData:
    """Tokenise (or map the cached tokens of) the configured data and split it into train/val.

    Without ``val_path``, ``round(val_fraction * n)`` of the ``n`` usable samples, chosen by
    ``split_seed``, form the validation split. Raises :class:`DataError` when a split would be empty.
    """
    if tokenizer is None:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad nor an eos token to pad batches with")

    def cache(path: Path) -> TokenCache:
        return _usable(path, load_or_build_cache(
            path, tokenizer, cfg.max_seq_len, cfg.cache_dir, show_progress=show_progress,
            augment=cfg.augment, augment_seed=cfg.augment_seed, workers=cfg.tokenize_workers))

    train_path = DEMO_DATA_PATH if cfg.train_path is None else Path(cfg.train_path)
    train = cache(train_path)
    val = None if cfg.val_path is None else cache(Path(cfg.val_path))
    return _assemble(cfg, train_path, train, val, pad_id=int(pad_id), vocab_size=len(tokenizer))


def open_prepared(cfg: DataConfig, train_cache: str | Path, val_cache: str | Path | None = None, *,
                  pad_id: int, vocab_size: int) -> SFTData:
    """What :func:`prepare_data` returned for ``cfg``, reopened from its cache folders alone
    (``stats.cache_path``/``stats.val_cache_path`` of that result): neither the jsonl nor the tokenizer
    is read, so a trial on another machine gets the same splits. Raises ``OSError``/``ValueError`` when a
    folder is missing or incomplete."""
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


def _unknown_fields(cache: TokenCache) -> str:
    return ", ".join(f"{k} x{v}" for k, v in (cache.meta.get("unknown_fields") or {}).items())


def _usable(path: Path, cache: TokenCache) -> TokenCache:
    """``cache`` after warning about skipped samples; :class:`DataError` when none is usable."""
    skipped, unknown = cache.skipped, _unknown_fields(cache)
    if skipped.total:
        fields = (" unknown message fields (only role, content, reasoning_content, tools, tool_calls "
                  "are read): " + unknown) if unknown else ""
        log.warning("%s: skipped %d samples (%s)%s", path, skipped.total, skipped, fields)
    if cache.num_samples == 0:
        if not skipped.total:
            raise DataError(f"{path}: no SFT samples: the file is empty (or only blank lines)")
        hints = {  # (what to do about each reason, so that the one line is enough to fix the file)
            "truncated": f"with data.max_seq_len={cache.meta.get('key_parts', {}).get('max_seq_len', '?')} no "
                         "answer token is left in the window: raise data.max_seq_len",
            "unknown_role": "roles are system, user, assistant, and tool only where the tokenizer's chat template "
                            "renders it (MiniMind-3's does, MiniMind2's does not: see data.tokenizer)",
            "unknown_field": f"unknown message fields ({unknown}): only role, content, reasoning_content, tools, "
                             "tool_calls are read",
        }
        hint = "".join(f"; {h}" for k, h in hints.items() if getattr(skipped, k) >= skipped.total / 2)
        raise DataError(f"{path}: no usable SFT samples; all {skipped.total} were skipped ({skipped}){hint}")
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
        if n_val in (0, n):
            which, fix = ("validation", "raise val_fraction or set val_path") if n_val == 0 else \
                ("training", "lower val_fraction or add data")
            raise DataError(f"{train_path}: the {which} split is empty ({n} usable samples x "
                            f"val_fraction {cfg.val_fraction}); {fix}")
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
        train_samples=len(train), val_samples=len(val),
        train_tokens=int(train.lengths.sum()), val_tokens=int(val.lengths.sum()),
        train_supervised_tokens=int(train.supervised.sum()), val_supervised_tokens=int(val.supervised.sum()),
        skipped=cache.skipped, cache_key=cache.key, cache_path=str(cache.path),
        val_skipped=None if val_cache is None else val_cache.skipped,
        val_cache_key=None if val_cache is None else val_cache.key,
        val_cache_path=None if val_cache is None else str(val_cache.path),
        unknown_fields=_unknown_fields(cache) or None,
    )
    log.info("data: %d train / %d val samples, %d / %d supervised tokens", stats.train_samples,
             stats.val_samples, stats.train_supervised_tokens, stats.val_supervised_tokens)
    return SFTData(train=train, val=val, pad_id=int(pad_id), vocab_size=int(vocab_size), stats=stats)
