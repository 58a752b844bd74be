"""Batching: the samples of a split as length-grouped, right-padded ``(input_ids, labels)`` batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .chat import IGNORE_INDEX
from .token_cache import TokenCache

__all__ = ["CHUNK_BATCHES", "TokenizedDataset", "batch_indices"]

# Batches per length-sorted chunk: enough to group similar lengths, few enough that batches still mix.
CHUNK_BATCHES = 64


class TokenizedDataset:
    """The samples ``indices`` of a :class:`TokenCache` (all when None), with their ``lengths`` and
    ``supervised`` token counts; :meth:`batch` gathers any of them into one padded batch."""

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

    def batch(self, items: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``items`` (positions in this split) as ``(input_ids, labels)`` LongTensors (B, T),
        right-padded to the longest of them: inputs with ``pad_id``, labels with IGNORE_INDEX."""
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


def batch_indices(lengths: np.ndarray | Sequence[int], batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True, group_by_length: bool = True) -> list[list[int]]:
    """Batches of dataset indices, a deterministic function of ``(seed, epoch)``; the last may be short.

    With ``group_by_length`` the shuffled order is cut into chunks of :data:`CHUNK_BATCHES` batches, each
    sorted by length and cut into batches (little padding; which samples meet still varies by epoch),
    then the batch order is shuffled. Without ``shuffle`` (evaluation) the order is sequential.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be > 0")
    lengths = np.asarray(lengths)
    n = lengths.size
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    order = rng.permutation(n) if rng is not None else np.arange(n)
    if group_by_length and n:
        chunk = CHUNK_BATCHES * batch_size
        # Stable sort keeps equal-length ties in the (shuffled) order, so ties stay random too.
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                for c in np.split(order, range(chunk, n, chunk))])
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if rng is not None and group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return [b.tolist() for b in batches]

