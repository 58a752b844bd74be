"""Run configuration: one frozen dataclass per concern, mapped 1:1 from YAML.

A run file has three sections, ``model``, ``data`` and ``train``, whose keys are exactly the fields
below. Unknown keys and bad values raise :class:`ConfigError` naming the key, the value and what is
allowed, before anything expensive happens.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "FAMILY_DEFAULTS",
    "MODEL_FAMILIES",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "field_names",
    "load_run_config",
    "replace_path",
    "resolve_paths",
    "run_config_from_dict",
    "run_config_to_dict",
]


class ConfigError(ValueError):
    """A configuration key has a value that is not allowed; the message names key, value and rule."""


MODEL_FAMILIES: tuple[str, ...] = ("minimind2", "minimind3")

# What a field left unset (None) means for each generation: upstream's defaults (MiniMind2 at
# 274483c, MiniMind-3 at d65ef2c). The first column is what these fields always were, so a run
# file without ``family`` builds exactly the model it built before.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "minimind2": {"hidden_size": 512, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                  "num_experts_per_tok": 2, "n_shared_experts": 1, "aux_loss_alpha": 0.1,
                  "seq_aux": True},
    "minimind3": {"hidden_size": 768, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
                  "num_experts_per_tok": 1, "n_shared_experts": 0, "aux_loss_alpha": 5e-4,
                  "seq_aux": False},
}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture (upstream field names) of one MiniMind generation, plus where to start from.

    ``family`` picks the generation: ``minimind2`` (upstream 274483c, the default) or ``minimind3``
    (upstream d65ef2c: Qwen3-style q/k norms, ``head_dim``, Switch-style MoE balance loss). Fields
    left None take that generation's upstream default (:data:`FAMILY_DEFAULTS`) when the config is
    built, so a config always holds concrete values. Set ``family`` in the same place as the other
    fields: ``dataclasses.replace(cfg, family=...)`` keeps the already resolved values.
    """

    family: Literal["minimind2", "minimind3"] = "minimind2"
    hidden_size: int | None = None
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    # None: hidden_size // num_attention_heads (MiniMind2 always uses that; MiniMind-3 may differ).
    head_dim: int | None = None
    # None: the tokenizer's length, so a bundled or user tokenizer always fits the embedding.
    vocab_size: int | None = None
    # None: the family's formula (MiniMind2: 64 * ceil(hidden * 8/3 / 64); MiniMind-3:
    # 64 * ceil(hidden * pi / 64)).
    intermediate_size: int | None = None
    rms_norm_eps: float | None = None
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    dropout: float = 0.0
    use_moe: bool = False
    n_routed_experts: int = 4
    num_experts_per_tok: int | None = None
    n_shared_experts: int | None = None
    # MiniMind2: the balance loss weight (aux_loss_alpha); MiniMind-3: router_aux_loss_coef.
    aux_loss_alpha: float | None = None
    seq_aux: bool | None = None
    norm_topk_prob: bool = True
    # A MiniMind .pth (e.g. a pretrain checkpoint) loaded strictly before training.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.family not in MODEL_FAMILIES:
            raise ConfigError(f"model.family={self.family!r} is not allowed: expected one of "
                              f"{list(MODEL_FAMILIES)}")
        for name, value in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        _positive(self, "model", ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "max_position_embeddings",
                                  "n_routed_experts", "num_experts_per_tok"])
        if self.vocab_size is not None:
            _positive(self, "model", ["vocab_size"])
        if self.intermediate_size is not None:
            _positive(self, "model", ["intermediate_size"])
        if self.head_dim is not None:
            _positive(self, "model", ["head_dim"])
            if self.head_dim % 2:
                raise ConfigError(f"model.head_dim={self.head_dim} must be even (rotary embeddings "
                                  "rotate pairs)")
        if self.family == "minimind2" or self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} must be divisible by "
                    f"model.num_attention_heads={self.num_attention_heads}")
            if (self.hidden_size // self.num_attention_heads) % 2:
                raise ConfigError(
                    f"model.hidden_size / num_attention_heads = {self.hidden_size // self.num_attention_heads}"
                    " must be even (rotary embeddings rotate pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                f"model.num_key_value_heads={self.num_key_value_heads}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"model.num_experts_per_tok={self.num_experts_per_tok} must be <= "
                f"model.n_routed_experts={self.n_routed_experts}")
        if self.n_shared_experts < 0:
            raise ConfigError(f"model.n_shared_experts={self.n_shared_experts} must be >= 0")
        _in_range(self, "model", "dropout", 0.0, 1.0, high_open=True)
        _in_range(self, "model", "rms_norm_eps", 0.0, 1.0, low_open=True)
        _in_range(self, "model", "aux_loss_alpha", 0.0, math.inf)
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta={self.rope_theta!r} must be > 0")
        if self.family == "minimind2":
            if self.head_dim is not None and self.head_dim != self.hidden_size // self.num_attention_heads:
                raise ConfigError(
                    f"model.head_dim={self.head_dim} is not allowed with model.family='minimind2': "
                    f"MiniMind2's head size is hidden_size / num_attention_heads = "
                    f"{self.hidden_size // self.num_attention_heads}; leave it null")
        else:
            # What MiniMind-3 upstream cannot express is refused rather than silently ignored.
            for name, allowed in (("n_shared_experts", 0), ("seq_aux", False), ("dropout", 0.0)):
                if getattr(self, name) != allowed:
                    raise ConfigError(
                        f"model.{name}={getattr(self, name)!r} is not allowed with model.family="
                        f"'minimind3': MiniMind-3 supports only {allowed!r} (upstream d65ef2c has "
                        + {"n_shared_experts": "no shared expert",
                           "seq_aux": "only the batch-level Switch balance loss",
                           "dropout": "dropout 0.0 in its released configs; the Qwen3 modules used "
                                      "here have no residual dropout"}[name] + ")")


@dataclass(frozen=True)
class DataConfig:
    """Where the SFT conversations and the tokenizer come from and how they are cut."""

    # None: the bundled demo dataset (minimind_train/assets/demo).
    train_path: str | None = None
    # None: hold out ``val_fraction`` of ``train_path`` (deterministic by ``split_seed``).
    val_path: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    # None: the bundled tokenizer; else a MiniMind2-format tokenizer directory.
    tokenizer: str | None = None
    max_seq_len: int = 512
    # Length-grouped batches: pad to the longest sample of a batch of similar lengths.
    group_by_length: bool = True
    # None: $MINIMIND_CACHE or ~/.cache/minimind-tune/tokens.
    cache_dir: str | None = None
    # Cap on the validation split, taken at random (by split_seed) from it: a 10% split of a 1.2M
    # file would be evaluated every epoch. 0 = no cap.
    val_max_samples: int = 0
    # Upstream's random augmentation (system prompt with p 0.2, empty think blocks removed with
    # p 0.8), drawn once per sample from (augment_seed, line) when the cache is built.
    augment: bool = False
    augment_seed: int = 0
    # Processes that build the token cache; 0: every core for files over 4 MiB.
    tokenize_workers: int = 0

    def __post_init__(self) -> None:
        _positive(self, "data", ["max_seq_len"])
        for name in ("val_max_samples", "tokenize_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}={getattr(self, name)!r} must be >= 0")
        _in_range(self, "data", "val_fraction", 0.0, 1.0, low_open=True, high_open=True)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one SFT run."""

    epochs: int = 3
    batch_size: int = 16
    accumulation_steps: int = 1
    learning_rate: float = 5e-4
    # The schedule ends exactly at learning_rate * min_lr_ratio.
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # <= 0 disables clipping (the norm is still measured and reported).
    grad_clip: float = 1.0
    # auto: bfloat16 on CUDA when supported, else float16 on CUDA, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 42
    eval_batch_size: int = 32
    # 0: torch's default; a trial sets it to its CPU share.
    num_threads: int = 0
    # Optional cap on optimizer steps per epoch (quick studies on big data); 0 = no cap.
    max_steps_per_epoch: int = 0
    log_interval: int = 10
    # Divergence (the run stops with TrainingDiverged): an optimizer step's loss above this multiple
    # of the run's first step's loss (a fresh model starts near ln(vocab), so 10x is far worse than
    # guessing), or a gradient norm (before clipping) above divergence_grad_norm. 0 disables either.
    # A non-finite loss or gradient always counts.
    divergence_loss_factor: float = 10.0
    divergence_grad_norm: float = 1e6

    def __post_init__(self) -> None:
        _positive(self, "train", ["epochs", "batch_size", "accumulation_steps", "eval_batch_size",
                                  "log_interval"])
        _in_range(self, "train", "divergence_loss_factor", 0.0, math.inf)
        _in_range(self, "train", "divergence_grad_norm", 0.0, math.inf)
        if 0 < self.divergence_loss_factor <= 1:
            raise ConfigError(f"train.divergence_loss_factor={self.divergence_loss_factor!r} must be 0 "
                              "(off) or > 1 (a multiple of the first step's loss)")
        for name in ("warmup_steps", "num_threads", "max_steps_per_epoch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} must be >= 0")
        _in_range(self, "train", "learning_rate", 0.0, math.inf, low_open=True)
        _in_range(self, "train", "min_lr_ratio", 0.0, 1.0)
        _in_range(self, "train", "weight_decay", 0.0, math.inf)
        _in_range(self, "train", "adam_beta1", 0.0, 1.0, high_open=True)
        _in_range(self, "train", "adam_beta2", 0.0, 1.0, high_open=True)
        _in_range(self, "train", "adam_eps", 0.0, math.inf, low_open=True)
        if not math.isfinite(self.grad_clip):
            raise ConfigError(f"train.grad_clip={self.grad_clip!r} must be finite")


@dataclass(frozen=True)
class RunConfig:
    """A whole SFT run: the three sections of a run file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def field_names(section: str) -> list[str]:
    """The keys allowed in ``section`` (model, data or train)."""
    return [f.name for f in fields(_SECTIONS[section])]


def _positive(obj: Any, section: str, names: list[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name}={value!r} must be > 0")


def _in_range(obj: Any, section: str, name: str, low: float, high: float,
              low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(obj, name)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or math.isnan(value):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{section}.{name}={value!r} must be in {lo}{low}, {high}{hi}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}={value!r} is not allowed: expected " +
                          " or ".join(_describe(o) for o in options))
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed: expected one of {list(allowed)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not allowed: expected a boolean (true/false)")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is not allowed: expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it explicitly.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}={value!r} is not allowed: expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} is not allowed: expected a string")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _describe(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is Literal:
        return f"one of {list(typing.get_args(annotation))}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, str(annotation))


def _section_from_dict(name: str, raw: Any) -> Any:
    cls = _SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}={raw!r} is not allowed: expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in allowed:
            raise ConfigError(f"{name}.{key} is not a known key (value {value!r}); allowed keys: "
                              + ", ".join(allowed))
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def run_config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Build a validated :class:`RunConfig` from the parsed YAML mapping."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a run config must be a mapping with sections {list(_SECTIONS)}, got {raw!r}")
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"{key} is not a known section; allowed sections: {', '.join(_SECTIONS)}")
    return RunConfig(**{name: _section_from_dict(name, raw.get(name)) for name in _SECTIONS})


def run_config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The YAML-ready mapping of ``cfg`` (round-trips through :func:`run_config_from_dict`)."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTIONS}


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run file (``model``/``data``/``train``); relative paths resolve against its folder."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    cfg = run_config_from_dict(raw)
    return resolve_paths(cfg, path.resolve().parent)


def resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Make the file paths of ``cfg`` absolute, relative ones taken from ``base``."""
    def absolute(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, init_from=absolute(cfg.model.init_from)),
        data=dataclasses.replace(
            cfg.data,
            train_path=absolute(cfg.data.train_path),
            val_path=absolute(cfg.data.val_path),
            tokenizer=absolute(cfg.data.tokenizer),
            cache_dir=absolute(cfg.data.cache_dir),
        ),
    )


def replace_path(cfg: RunConfig, dotted: str, value: Any) -> RunConfig:
    """Return ``cfg`` with ``section.key`` set to ``value`` (validated like YAML input)."""
    section, _, key = dotted.partition(".")
    if section not in _SECTIONS or key not in field_names(section):
        raise ConfigError(f"{dotted} is not a config field; allowed: " + ", ".join(
            f"{s}.{k}" for s in _SECTIONS for k in field_names(s)))
    hints = typing.get_type_hints(_SECTIONS[section])
    new_section = dataclasses.replace(getattr(cfg, section), **{key: _coerce(dotted, value, hints[key])})
    return dataclasses.replace(cfg, **{section: new_section})
