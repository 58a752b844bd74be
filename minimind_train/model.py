"""MiniMind2 in plain PyTorch (GQA + RoPE + RMSNorm + SwiGLU, optional MoE, tied embeddings), and the
one entry point that builds either MiniMind generation (:func:`build_model`, :func:`from_upstream`).

Module and parameter names match upstream MiniMind2 (github.com/jingyaogong/minimind), so ``.pth``
state dicts load both ways. fp32 numerics match upstream; the deliberate differences change no fp32
result: one routing path for train and eval, experts keeping the autocast dtype, routing softmax in
fp32, RoPE computed for the positions in use.

Training imports nothing from transformers (``transformers.generation`` costs each trial's worker ~3 s
and ~140 MB); ``generate()`` and ``save_pretrained`` are in :mod:`minimind_train.hf`. MiniMind-3 lives
in :mod:`minimind_train.model3`, imported only when one is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimind_train.causal_lm import LMOutput, supervised_cross_entropy, token_cross_entropy, vocab_size_for
from minimind_train.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

    from minimind_train.model3 import MiniMind3ForCausalLM

__all__ = ["UPSTREAM_VOCAB_SIZE", "GenerationMismatchError", "MiniMindForCausalLM", "MiniMindModel",
           "build_model", "check_generation", "count_parameters", "default_intermediate_size", "detect_family",
           "from_upstream", "init_weights", "model_config_from"]


# Upstream's vocabulary (MiniMind's tokenizer): the embedding size of a model built without a tokenizer.
UPSTREAM_VOCAB_SIZE = 6400


def default_intermediate_size(hidden_size: int) -> int:
    """MiniMind's SwiGLU width: 8/3 of the hidden size, rounded up to a multiple of 64."""
    return 64 * ((int(hidden_size * 8 / 3) + 63) // 64)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (*positions.shape, head_dim), the two halves repeated (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, heads, head_dim) by cos/sin (B or 1, T, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        # False: upstream's explicit softmax attention (tests compare the two paths).
        self.flash = True

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: Cache | None) -> Tensor:
        """``mask``: boolean (B|1, 1, T, S), True = may attend; None = plain causal from position 0."""
        bsz, seq_len, _ = x.shape
        q = self.q_proj(x).view(bsz, seq_len, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(bsz, seq_len, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(bsz, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # GQA: query head h reads kv head h // n_rep, as upstream's repeat_kv.
        n_rep = self.n_heads // self.n_kv_heads
        dropout_p = self.dropout if self.training else 0.0
        # Unmasked causal attention goes to a flash kernel (CPU: any dtype; CUDA: fp16/bf16), which
        # reads the shared kv heads directly instead of materialising n_rep copies of k and v. The
        # kernels used with a mask or fp32 on CUDA need equal head counts.
        native_gqa = mask is None and (q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16))
        if not (self.flash and native_gqa):
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if self.flash:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
                                                 enable_gqa=native_gqa and n_rep > 1)
        else:
            if mask is None:
                mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).tril()
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~mask, float("-inf"))
            out = self.attn_dropout(F.softmax(scores.float(), dim=-1).type_as(q)) @ v
        out = out.transpose(1, 2).reshape(bsz, seq_len, -1)
        return self.resid_dropout(self.o_proj(out))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width = config.intermediate_size or default_intermediate_size(config.hidden_size)
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.act_fn = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class MoEGate(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.alpha = config.aux_loss_alpha
        self.seq_aux = config.seq_aux
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route each token of x (B, T, H): (topk_idx (B*T, k), topk_weight (B*T, k) fp32, aux_loss)."""
        bsz, seq_len, hidden = x.shape
        # Routing and the balance loss in fp32 whatever the autocast dtype: ties and tiny
        # probabilities decide which experts train.
        scores = F.linear(x.reshape(-1, hidden), self.weight).float().softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        aux_loss = scores.new_zeros(())
        if self.training and self.alpha > 0.0:
            n_exp = self.n_routed_experts
            if self.seq_aux:
                # Per sequence: expert load (normalised so uniform = 1) times mean routing probability.
                load = torch.zeros(bsz, n_exp, device=x.device).scatter_add_(
                    1, topk_idx.view(bsz, -1), torch.ones(bsz, seq_len * self.top_k, device=x.device))
                load = load / (seq_len * self.top_k / n_exp)
                seq_probs = scores.view(bsz, seq_len, n_exp).mean(dim=1)
                aux_loss = (load * seq_probs).sum(dim=1).mean() * self.alpha
            else:
                load = F.one_hot(topk_idx.view(-1), num_classes=n_exp).float().mean(0) * n_exp
                aux_loss = (scores.mean(0) * load).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class MOEFeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        self.shared_experts = nn.ModuleList([FeedForward(config) for _ in range(config.n_shared_experts)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bsz, seq_len, hidden = x.shape
        topk_idx, topk_weight, aux_loss = self.gate(x)
        tokens = x.reshape(-1, hidden)
        k = topk_idx.shape[-1]
        # Sort the (token, slot) pairs by expert so each expert runs once on a contiguous chunk.
        # Experts with no tokens still run on an empty chunk: their parameters get zero gradients
        # instead of None, which keeps DDP and optimizer state uniform.
        expert_of = topk_idx.reshape(-1)
        order = expert_of.argsort(stable=True)
        counts = torch.bincount(expert_of, minlength=len(self.experts)).tolist()
        chunks = tokens[order // k].split(counts)
        routed = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])
        # Unsort and sum the k slots per token (deterministic, unlike a scatter-add); the fp32
        # routing weights make the sum fp32, cast back to the experts' (autocast) dtype.
        routed = routed[order.argsort()].view(-1, k, hidden)
        y = (routed * topk_weight.unsqueeze(-1)).sum(dim=1).to(routed.dtype)
        y = y.view(bsz, seq_len, hidden)
        for expert in self.shared_experts:
            y = y + expert(x)
        return y, aux_loss


class MiniMindBlock(nn.Module):
    def __init__(self, layer_idx: int, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MOEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: Cache | None) -> tuple[Tensor, Tensor | None]:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        if isinstance(self.mlp, MOEFeedForward):
            out, aux_loss = self.mlp(self.post_attention_layernorm(h))
            return h + out, aux_loss
        return h + self.mlp(self.post_attention_layernorm(h)), None


class MiniMindModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MiniMindBlock(i, config) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                cache: Cache | None) -> tuple[Tensor, Tensor]:
        seq_len = input_ids.shape[1]
        device = input_ids.device
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=device)[None]
        cos, sin = rope_cos_sin(position_ids, self.config.hidden_size // self.config.num_attention_heads,
                                self.config.rope_theta)
        mask = None
        padded = attention_mask is not None and not bool(attention_mask.all())
        if past_len > 0 or padded:
            # Causal with the cache offset, minus padded keys. A query may always see itself so
            # that rows of left-padding stay finite (their outputs are never used).
            q_pos = torch.arange(past_len, past_len + seq_len, device=device)[:, None]
            k_pos = torch.arange(past_len + seq_len, device=device)[None, :]
            mask = (k_pos <= q_pos)[None, None]
            if padded:
                keep = attention_mask[:, None, None, -(past_len + seq_len):].bool()
                mask = (mask & keep) | (k_pos == q_pos)
        h = self.dropout(self.embed_tokens(input_ids))
        aux_loss = torch.zeros((), device=device)
        for layer in self.layers:
            h, layer_aux = layer(h, cos, sin, mask, cache)
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux
        return self.norm(h), aux_loss


def init_weights(module: nn.Module) -> None:
    """MiniMind2's initialisation of one module (applied children first, as transformers' post_init)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, MoEGate):
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))


class MiniMindForCausalLM(nn.Module):
    """The MiniMind2 causal LM (``model`` + tied ``lm_head``): upstream's parameter names and init.
    For ``generate()`` and ``save_pretrained``, :func:`minimind_train.hf.to_hf` wraps the same weights."""

    family = "minimind2"

    def __init__(self, config: ModelConfig | None = None) -> None:
        """``config``: a ``minimind2`` :class:`ModelConfig`; vocab_size None builds upstream's 6,400."""
        super().__init__()
        config = config or ModelConfig()
        self.config = model_config_from(config, config.vocab_size or UPSTREAM_VOCAB_SIZE)
        self.model = MiniMindModel(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        # The same RNG draws in the same order as transformers' post_init (init children first,
        # then tie), so a seed gives the weights the Hugging Face class gives.
        self.apply(init_weights)
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool = False, logits_to_keep: int | Tensor = 0,
                position_ids: Tensor | None = None) -> LMOutput:
        """Logits, the MoE aux loss (not added to ``loss``) and, given labels, the mean CE over
        supervised tokens (labels unshifted, -100 = ignore).

        ``attention_mask`` (B, past + T) marks padding; right-padded training batches need none (real
        tokens never attend to later pads). ``position_ids`` default to consecutive positions after the
        cache. :mod:`minimind_train.hf` runs this same function on its own ``model`` and ``lm_head``.
        """
        cache = past_key_values
        if cache is None and use_cache:
            from transformers.cache_utils import DynamicCache  # generation only; training never gets here

            cache = DynamicCache()
        hidden, aux_loss = self.model(input_ids, attention_mask, position_ids, cache)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape[:2])}"
                                 " (logits_to_keep must be 0 when computing the loss)")
            ce_sum, n_tokens = token_cross_entropy(logits, labels)
            # A batch with nothing supervised (all truncated away) contributes 0, not NaN.
            loss = ce_sum / n_tokens.clamp(min=1)
        return LMOutput(logits=logits, aux_loss=aux_loss, loss=loss, past_key_values=cache if use_cache else None)

    def supervised_cross_entropy(self, input_ids: Tensor, labels: Tensor,
                                 positions: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, int, Tensor]:
        """(fp32 CE sum over supervised tokens, their count, MoE aux loss) of a right-padded batch, by
        :func:`supervised_cross_entropy` (on alpaca_zh the head runs at three quarters of a
        length-grouped batch's positions, a quarter of one padded to 512)."""
        hidden, aux_loss = self.model(input_ids, None, None, None)
        return *supervised_cross_entropy(hidden, self.lm_head, labels, positions), aux_loss


def model_config_from(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """``cfg`` as a MiniMind2 model is built from it (``vocab_size`` None: the tokenizer's ``vocab_size``;
    ``intermediate_size`` None: MiniMind2's formula), so a model's config states what was built."""
    if cfg.family != "minimind2":
        raise ConfigError(f"model.family={cfg.family!r}: model_config_from builds MiniMind2 configs only; "
                          "use build_model")
    assert cfg.hidden_size is not None
    return dataclasses.replace(cfg, vocab_size=vocab_size_for(cfg, vocab_size), intermediate_size=(
        cfg.intermediate_size or default_intermediate_size(cfg.hidden_size)))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters; tied weights (lm_head = embed_tokens) count once."""
    return sum(p.numel() for p in model.parameters())



def build_model(cfg: ModelConfig, vocab_size: int) -> MiniMindForCausalLM | MiniMind3ForCausalLM:
    """A freshly initialised model of the run's generation (``cfg.family``)."""
    if cfg.family == "minimind2":
        return MiniMindForCausalLM(model_config_from(cfg, vocab_size))
    from minimind_train.model3 import MiniMind3ForCausalLM, upstream3_config_from

    return MiniMind3ForCausalLM(upstream3_config_from(cfg, vocab_size))


class GenerationMismatchError(ValueError):
    """A state dict or config of one MiniMind generation was given where the other one is expected."""


_NAMES = {"minimind2": "MiniMind2 (upstream 274483c)", "minimind3": "MiniMind-3 (upstream d65ef2c)"}
# Upstream MiniMind2 config keys that are not ModelConfig fields: the one value this model implements, or
# None where the value changes neither weights nor numerics (special token ids, the attention kernel).
_UPSTREAM2_ONLY: dict[str, Any] = {"hidden_act": "silu", "scoring_func": "softmax", "tie_word_embeddings": True,
                                   "flash_attn": None, "bos_token_id": None, "eos_token_id": None,
                                   "pad_token_id": None}
# Config keys that only one generation's upstream MiniMindConfig has.
_CONFIG_ONLY = {
    "minimind2": {"n_routed_experts", "n_shared_experts", "aux_loss_alpha", "seq_aux", "scoring_func"},
    "minimind3": {"head_dim", "num_experts", "moe_intermediate_size", "router_aux_loss_coef",
                  "inference_rope_scaling", "rope_scaling"},
}


def detect_family(state_dict: Mapping[str, Any]) -> str:
    """Which generation a state dict is from: MiniMind-3's attention has per-layer q/k RMSNorms."""
    return "minimind3" if any(k.endswith("self_attn.q_norm.weight") for k in state_dict) else "minimind2"


def check_generation(state_dict: Mapping[str, Any], family: str, source: str) -> None:
    """Raise :class:`GenerationMismatchError`, naming the file's generation, when ``state_dict`` is not
    of generation ``family`` (a MiniMind2 state dict would load into MiniMind-3 with strict=False)."""
    found = detect_family(state_dict)
    if found != family:
        raise GenerationMismatchError(
            f"{source} is a {_NAMES[found]} checkpoint, but the model is {_NAMES[family]}; set "
            f"model.family: {found} to use it (the two generations' weights are not interchangeable)")


def _config_family(config: Mapping[str, Any]) -> str | None:
    hits = {fam for fam, keys in _CONFIG_ONLY.items() if keys & set(config)}
    return hits.pop() if len(hits) == 1 else None


def from_upstream(config: dict[str, Any], pth: str | os.PathLike[str]
                  ) -> MiniMindForCausalLM | MiniMind3ForCausalLM:
    """Either generation, built from upstream's config dict and loaded strictly from upstream's ``.pth``
    (the generation is read from the weights and must agree with the config's generation-specific keys).
    fp32, in eval mode; ``forward(input_ids)`` returns ``.logits`` and ``.aux_loss``."""
    state = torch.load(pth, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(f"{pth}: expected a state dict, got {type(state).__name__}")
    family = detect_family(state)
    from_config = _config_family(config)
    if from_config is not None and from_config != family:
        raise GenerationMismatchError(
            f"{pth} is a {_NAMES[family]} checkpoint but the config is a {_NAMES[from_config]} config "
            f"(keys {sorted(_CONFIG_ONLY[from_config] & set(config))})")
    model: MiniMindForCausalLM | MiniMind3ForCausalLM
    if family == "minimind2":
        for key, only in _UPSTREAM2_ONLY.items():
            if only is not None and config.get(key, only) != only:
                raise ValueError(f"MiniMind2 config {key}={config[key]!r} is not supported: this model implements "
                                 f"only {only!r}")
        # ModelConfig refuses any other key that is not one of its fields, naming them.
        kept = {k: v for k, v in config.items() if k not in _UPSTREAM2_ONLY and v is not None}
        model = MiniMindForCausalLM(ModelConfig(**kept))
    else:
        from minimind_train.model3 import MiniMind3ForCausalLM

        model = MiniMind3ForCausalLM(config)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}, strict=True)
    return model.float().eval()
