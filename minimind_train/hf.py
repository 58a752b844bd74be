"""The Hugging Face face of MiniMind2: ``generate()``, ``save_pretrained``/``from_pretrained``.

Same modules, parameter names and initialisation as :class:`minimind_train.model.MiniMindForCausalLM`
(the training model, which never imports transformers); :func:`to_hf` and :func:`from_hf` move
weights between the two, strictly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .config import ModelConfig
from .model import UPSTREAM_VOCAB_SIZE, MiniMindForCausalLM, MiniMindModel, init_weights, model_config_from

__all__ = ["MiniMindHFConfig", "MiniMindHFForCausalLM", "from_hf", "to_hf"]

# The ModelConfig fields a config.json holds (init_from is where a run started, not the model).
_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "init_from")
_M = TypeVar("_M", bound=nn.Module)


class MiniMindHFConfig(PretrainedConfig):
    """A MiniMind2 :class:`ModelConfig` as a transformers config (``config.json``); the same checks apply."""

    model_type = "minimind"

    def __init__(self, **kwargs: Any) -> None:
        given = {k: kwargs.pop(k) for k in _FIELDS if k in kwargs}
        core = model_config_from(ModelConfig(**given), given.get("vocab_size") or UPSTREAM_VOCAB_SIZE)
        for name in _FIELDS:
            setattr(self, name, getattr(core, name))
        if not kwargs.pop("tie_word_embeddings", True):
            raise ValueError("tie_word_embeddings=False: MiniMind2 ties lm_head to embed_tokens")
        # Special token ids default to MiniMind's tokenizer's.
        super().__init__(**{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **kwargs}, tie_word_embeddings=True)

    def to_core(self) -> ModelConfig:
        """The :class:`ModelConfig` this transformers config holds."""
        return ModelConfig(**{name: getattr(self, name) for name in _FIELDS})


class MiniMindHFForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MiniMindHFConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["MiniMindBlock"]
    _tied_weights_keys: ClassVar[list[str]] = ["lm_head.weight"]

    def __init__(self, config: MiniMindHFConfig | None = None) -> None:
        config = config or MiniMindHFConfig()
        super().__init__(config)
        self.model = MiniMindModel(config.to_core())
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # Embedding getters/setters: PreTrainedModel's defaults find model.embed_tokens and lm_head.
    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool = False, logits_to_keep: int | Tensor = 0,
                position_ids: Tensor | None = None, **kwargs: object) -> MoeCausalLMOutputWithPast:
        """As :meth:`MiniMindForCausalLM.forward`; extra generate() inputs (``cache_position``) are ignored."""
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError(f"past_key_values must be a transformers Cache, got {type(past_key_values)}")
        # The training model's forward, on this model's identical `model` and `lm_head`.
        out = MiniMindForCausalLM.forward(self, input_ids, attention_mask, labels,  # type: ignore[arg-type]
                                          past_key_values, use_cache, logits_to_keep, position_ids)
        return MoeCausalLMOutputWithPast(loss=out.loss, aux_loss=out.aux_loss, logits=out.logits,
                                         past_key_values=out.past_key_values)


def _copy_into(target: _M, source: nn.Module) -> _M:
    """``target`` with ``source``'s weights (strictly), dtype, device and train/eval mode."""
    param = next(source.parameters())
    target.to(device=param.device, dtype=param.dtype)
    target.load_state_dict(source.state_dict(), strict=True)
    return target.train(source.training)


def to_hf(model: MiniMindForCausalLM) -> MiniMindHFForCausalLM:
    """A transformers model holding a copy of ``model``'s weights (same dtype and device)."""
    return _copy_into(MiniMindHFForCausalLM(MiniMindHFConfig(**{n: getattr(model.config, n) for n in _FIELDS})), model)


def from_hf(hf: MiniMindHFForCausalLM) -> MiniMindForCausalLM:
    """The training model holding a copy of ``hf``'s weights."""
    return _copy_into(MiniMindForCausalLM(hf.config.to_core()), hf)
