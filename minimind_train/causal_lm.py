"""What both MiniMind generations' causal LMs share: their output, their losses, their vocabulary size.

:mod:`minimind_train.model` (MiniMind2) and :mod:`minimind_train.model3` (MiniMind-3) both import
from here and never from each other (tests/test_conventions.py checks that no module import cycle
exists); it imports neither transformers nor either model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from minimind_train.chat import IGNORE_INDEX
from minimind_train.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

__all__ = ["LMOutput", "supervised_cross_entropy", "supervised_positions", "token_cross_entropy", "vocab_size_for"]


@dataclass
class LMOutput:
    logits: Tensor
    aux_loss: Tensor  # summed MoE balance loss, 0-dim; zero when dense or in eval
    loss: Tensor | None = None  # mean CE over supervised tokens, given labels
    past_key_values: Cache | None = None


def token_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of fp32 CE over supervised tokens, their count); logits[:, t] predicts labels[:, t + 1]
    (the Hugging Face convention: labels aligned with the inputs, -100 = ignore)."""
    targets = labels[:, 1:]
    logits = logits[:, :-1]
    ce_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return ce_sum, (targets != IGNORE_INDEX).sum()


def supervised_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(flat positions ``b * T + t`` into ``hidden.reshape(B * T, H)`` whose next label is supervised,
    those labels) for labels (B, T); computed where ``labels`` lives (the CPU batch: no CUDA sync)."""
    nxt = labels[:, 1:] != IGNORE_INDEX
    positions = F.pad(nxt, (0, 1)).reshape(-1).nonzero().squeeze(1)
    return positions, labels.reshape(-1)[positions + 1]


def supervised_cross_entropy(hidden: Tensor, lm_head: nn.Module, labels: Tensor,
                             positions: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, int]:
    """:func:`token_cross_entropy` of ``lm_head(hidden)`` (hidden: B, T, H), with the head run only where
    the next token is supervised (a fraction of its FLOPs and memory). ``positions``:
    :func:`supervised_positions` of ``labels``, precomputed on the CPU and moved to the device."""
    idx, targets = positions if positions is not None else supervised_positions(labels)
    logits = lm_head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx))
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())


def vocab_size_for(cfg: ModelConfig, vocab_size: int) -> int:
    """The embedding rows a model of ``cfg`` gets: ``model.vocab_size``, or the tokenizer's ``vocab_size``
    when unset; never fewer than the tokenizer has tokens (ConfigError)."""
    vocab = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
    if vocab < vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer ({vocab_size} tokens); "
                          "token ids beyond it would have no embedding")
    return vocab
