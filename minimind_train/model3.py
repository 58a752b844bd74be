"""MiniMind-3 (upstream d65ef2c) as transformers' Qwen3 / Qwen3-MoE modules, with MiniMind's losses.

Upstream's model is numerically transformers' ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` with its
config mapped (measured bit-identical with sdpa attention, see
``../shared/fixtures/minimind3/README_models.md``), with the same state-dict keys. This file adds only
what MiniMind does differently: the MoE balance loss is the *sum* of per-layer Switch-style losses
(Qwen3-MoE pools all layers into one term) and zero in eval mode, and training runs the LM head only at
supervised positions. Importing it imports transformers' modeling code (seconds).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Qwen3Config, Qwen3MoeConfig
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

from .causal_lm import LMOutput, supervised_cross_entropy, token_cross_entropy, vocab_size_for
from .config import ModelConfig

__all__ = ["MiniMind3ForCausalLM", "default_intermediate_size3", "qwen3_config", "switch_aux_loss",
           "upstream3_config_from", "upstream_config"]

# Every attribute upstream's MiniMindConfig.__init__ sets at d65ef2c, with its default; a key outside
# this table in an upstream config dict is an error rather than something silently ignored.
_UPSTREAM_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 8, "use_moe": False, "dropout": 0.0, "vocab_size": 6400,
    "bos_token_id": 1, "eos_token_id": 2, "flash_attn": True, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": None, "hidden_act": "silu", "intermediate_size": None,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "tie_word_embeddings": True, "inference_rope_scaling": False, "rope_scaling": None,
    "num_experts": 4, "num_experts_per_tok": 1, "moe_intermediate_size": None, "norm_topk_prob": True,
    "router_aux_loss_coef": 5e-4,
}


def default_intermediate_size3(hidden_size: int) -> int:
    """MiniMind-3's SwiGLU width: hidden x pi rounded up to a multiple of 64 (2432 at 768)."""
    return math.ceil(hidden_size * math.pi / 64) * 64


def upstream_config(config: dict[str, Any]) -> dict[str, Any]:
    """Upstream's MiniMind-3 config dict completed with its defaults; unknown keys raise ValueError."""
    unknown = sorted(set(config) - set(_UPSTREAM_DEFAULTS))
    if unknown:
        raise ValueError(f"MiniMind-3 config keys {unknown} are not upstream MiniMindConfig fields; "
                         f"allowed: {sorted(_UPSTREAM_DEFAULTS)}")
    full = {**_UPSTREAM_DEFAULTS, **config}
    if full["head_dim"] is None:
        full["head_dim"] = full["hidden_size"] // full["num_attention_heads"]
    if full["intermediate_size"] is None:
        full["intermediate_size"] = default_intermediate_size3(full["hidden_size"])
    if full["moe_intermediate_size"] is None:
        full["moe_intermediate_size"] = full["intermediate_size"]
    if not full["tie_word_embeddings"]:
        raise ValueError("tie_word_embeddings=False: MiniMind-3 ties lm_head to embed_tokens")
    if full["dropout"] != 0.0:
        raise ValueError(f"dropout={full['dropout']!r}: only 0.0 is supported for MiniMind-3 (the Qwen3 "
                         "modules have attention dropout only, upstream also drops residuals)")
    if full["inference_rope_scaling"] or full["rope_scaling"] is not None:
        raise ValueError("inference_rope_scaling / rope_scaling (YaRN at inference) is not supported "
                         "for training; leave it off")
    return full


def qwen3_config(config: dict[str, Any]) -> Qwen3Config | Qwen3MoeConfig:
    """The transformers config that makes Qwen3(Moe)ForCausalLM compute upstream MiniMind-3."""
    full = upstream_config(config)
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "rope_theta", "bos_token_id", "eos_token_id")
    common: dict[str, Any] = {key: full[key] for key in same}
    common.update(rope_scaling=None, tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0,
                  use_sliding_window=False, use_cache=False)
    if not full["use_moe"]:
        return Qwen3Config(**common)
    moe = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef")
    return Qwen3MoeConfig(**common, **{key: full[key] for key in moe}, decoder_sparse_step=1, mlp_only_layers=[],
                          output_router_logits=False)


def upstream3_config_from(cfg: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """The upstream MiniMind-3 config dict of a ``minimind3`` run (upstream's key names)."""
    same = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "dropout", "use_moe",
            "num_experts_per_tok", "norm_topk_prob")
    return {**{key: getattr(cfg, key) for key in same}, "vocab_size": vocab_size_for(cfg, vocab_size),
            "num_experts": cfg.n_routed_experts, "router_aux_loss_coef": cfg.aux_loss_alpha}


def switch_aux_loss(router_logits: Tensor, top_k: int, coef: float) -> Tensor:
    """MiniMind-3's balance loss of one layer: ``E * coef * sum(load * mean routing probability)``.

    ``router_logits`` (tokens, E). ``load`` is each expert's share of the tokens per routing slot
    (upstream: ``one_hot(topk_idx).float().mean(0)``). Computed in fp32 whatever the autocast dtype.
    """
    n_exp = router_logits.shape[-1]
    scores = router_logits.float().softmax(dim=-1)
    topk_idx = torch.topk(scores, k=top_k, dim=-1, sorted=False).indices
    load = F.one_hot(topk_idx, n_exp).float().mean(0)
    return (load * scores.mean(0)).sum() * n_exp * coef


class MiniMind3ForCausalLM(nn.Module):
    """MiniMind-3: ``model`` (Qwen3Model / Qwen3MoeModel) + tied ``lm_head``, upstream's keys.

    ``config`` is upstream's MiniMindConfig as a dict (missing keys take upstream's defaults).
    """

    family = "minimind3"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.upstream = upstream_config(config)
        self.config = qwen3_config(self.upstream)
        # sdpa: the implementation measured bit-identical to upstream's flash path.
        self.config._attn_implementation = "sdpa"
        cls = Qwen3MoeForCausalLM if self.upstream["use_moe"] else Qwen3ForCausalLM
        full = cls(self.config)  # transformers' init and weight tying
        self.model = full.model
        self.lm_head = full.lm_head
        self.use_moe = bool(self.upstream["use_moe"])

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(final hidden states, MiniMind's summed balance loss: 0 in eval mode or when dense)."""
        want_aux = self.use_moe and self.training and self.upstream["router_aux_loss_coef"] > 0
        kwargs: dict[str, Any] = {"output_router_logits": True} if want_aux else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        aux = out.last_hidden_state.new_zeros((), dtype=torch.float32)
        if want_aux:
            for logits in out.router_logits:
                aux = aux + switch_aux_loss(logits, self.upstream["num_experts_per_tok"],
                                            self.upstream["router_aux_loss_coef"])
        return out.last_hidden_state, aux

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> LMOutput:
        """Logits, the balance loss (not added to ``loss``) and, given labels, the mean CE over
        supervised tokens (labels unshifted, -100 = ignore), as upstream's forward."""
        hidden, aux_loss = self._hidden(input_ids, attention_mask)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            ce_sum, n_tokens = token_cross_entropy(logits, labels)
            loss = ce_sum / n_tokens.clamp(min=1)
        return LMOutput(logits=logits, aux_loss=aux_loss, loss=loss)

    def supervised_cross_entropy(
        self, input_ids: Tensor, labels: Tensor, positions: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, int, Tensor]:
        """As :meth:`minimind_train.model.MiniMindForCausalLM.supervised_cross_entropy`: (CE sum,
        supervised count, balance loss), the LM head only where the next token is supervised."""
        hidden, aux_loss = self._hidden(input_ids)
        return *supervised_cross_entropy(hidden, self.lm_head, labels, positions), aux_loss
