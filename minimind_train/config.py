"""Run configuration: one frozen, validated dataclass per concern, mapped 1:1 from YAML.

A run file has three sections, ``model``, ``data`` and ``train``, whose keys are exactly the fields
below. Each field's type carries its bounds; rules that tie fields together are in ``__post_init__``.
Unknown keys and bad values raise :class:`ConfigError`, one line per problem, each naming the key, the
value and what is allowed (:mod:`minimind_train.validation`), before anything expensive happens.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic.dataclasses import dataclass

from .validation import STRICT, Bool, ConfigError, Int, Number, Text, did_you_mean, raising, validate

__all__ = [
    "DEMO_DATA_PATH", "FAMILY_DEFAULTS", "MODEL_FILE", "ConfigError", "DataConfig", "ModelConfig", "RunConfig",
    "TrainConfig",
    "load_run_config", "resolve_paths", "run_config_from_dict", "run_config_to_dict", "weights_file",
]

# A checkpoint folder's fp16 weights (what upstream MiniMind scripts load); here, not in checkpoint.py,
# so that a config path naming a checkpoint folder resolves without importing torch.
MODEL_FILE = "model.pth"

# The bundled demo dataset (data.train_path None), built by scripts/build_demo_assets.py, which also trains
# the bundled tokenizer on it; here, not in data.py, so that a study's dry run sizes it without torch.
DEMO_DATA_PATH = Path(__file__).resolve().parent / "assets" / "demo" / "sft_demo.jsonl"

# What a field left unset (None) means for each generation: upstream's defaults (MiniMind2 at
# 274483c, MiniMind-3 at d65ef2c). The first column is what these fields always were, so a run
# file without ``family`` builds exactly the model it built before.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "minimind2": {"hidden_size": 512, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                  "num_experts_per_tok": 2, "n_shared_experts": 1, "aux_loss_alpha": 0.1, "seq_aux": True},
    "minimind3": {"hidden_size": 768, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
                  "num_experts_per_tok": 1, "n_shared_experts": 0, "aux_loss_alpha": 5e-4, "seq_aux": False},
}
# The one value MiniMind-3 (upstream d65ef2c) supports for a field, and why.
_NO_DROPOUT = "dropout 0.0 in its released configs; the Qwen3 modules used here have no residual dropout"
_MINIMIND3_ONLY = {"n_shared_experts": (0, "no shared expert"),
                   "seq_aux": (False, "only the batch-level Switch balance loss"), "dropout": (0.0, _NO_DROPOUT)}


@raising("model")
@dataclass(frozen=True, config=STRICT)
class ModelConfig:
    """One MiniMind generation's architecture (upstream field names) and where training starts from:
    the run file's ``model`` section, and what :func:`minimind_train.model.build_model` takes.

    ``family``: ``minimind2`` (upstream 274483c) or ``minimind3`` (upstream d65ef2c: Qwen3-style q/k
    norms, ``head_dim``, Switch-style MoE balance loss). Fields left None take that generation's
    default (:data:`FAMILY_DEFAULTS`); ``dataclasses.replace(cfg, family=...)`` keeps resolved values.
    """

    family: Literal["minimind2", "minimind3"] = "minimind2"
    hidden_size: Annotated[Int, Gt(0)] | None = None
    num_hidden_layers: Annotated[Int, Gt(0)] = 8
    num_attention_heads: Annotated[Int, Gt(0)] = 8
    num_key_value_heads: Annotated[Int, Gt(0)] | None = None
    # None: hidden_size // num_attention_heads (MiniMind2 always uses that; MiniMind-3 may differ).
    head_dim: Annotated[Int, Gt(0)] | None = None
    # None: the tokenizer's length, so a bundled or user tokenizer always fits the embedding.
    vocab_size: Annotated[Int, Gt(0)] | None = None
    # None: the family's formula (MiniMind2: 64 * ceil(hidden * 8/3 / 64); MiniMind-3: hidden * pi).
    intermediate_size: Annotated[Int, Gt(0)] | None = None
    rms_norm_eps: Annotated[Number, Gt(0), Le(1)] | None = None
    rope_theta: Annotated[Number, Gt(0)] = 1e6
    max_position_embeddings: Annotated[Int, Gt(0)] = 32768
    dropout: Annotated[Number, Ge(0), Lt(1)] = 0.0
    use_moe: Bool = False
    n_routed_experts: Annotated[Int, Gt(0)] = 4
    num_experts_per_tok: Annotated[Int, Gt(0)] | None = None
    n_shared_experts: Annotated[Int, Ge(0)] | None = None
    # MiniMind2: the balance loss weight (aux_loss_alpha); MiniMind-3: router_aux_loss_coef.
    aux_loss_alpha: Annotated[Number, Ge(0)] | None = None
    seq_aux: Bool | None = None
    norm_topk_prob: Bool = True
    # A MiniMind .pth (e.g. a pretrain checkpoint), or a checkpoint folder holding model.pth, loaded
    # strictly before training.
    init_from: Text | None = None

    def __post_init__(self) -> None:
        for name, value in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        hidden, heads, head_dim = self.hidden_size, self.num_attention_heads, self.head_dim
        assert hidden is not None and self.num_key_value_heads is not None
        assert self.num_experts_per_tok is not None
        if head_dim is not None and head_dim % 2:
            raise ConfigError(f"model.head_dim={head_dim} must be even (rotary embeddings rotate pairs)")
        if self.family == "minimind2" or head_dim is None:
            if hidden % heads:
                raise ConfigError(f"model.hidden_size={hidden} must be divisible by "
                                  f"model.num_attention_heads={heads}")
            if (hidden // heads) % 2:
                raise ConfigError(f"model.hidden_size / num_attention_heads = {hidden // heads} must be "
                                  "even (rotary embeddings rotate pairs)")
        if heads % self.num_key_value_heads:
            raise ConfigError(f"model.num_attention_heads={heads} must be divisible by "
                              f"model.num_key_value_heads={self.num_key_value_heads}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"model.num_experts_per_tok={self.num_experts_per_tok} must be <= "
                              f"model.n_routed_experts={self.n_routed_experts}")
        if self.family == "minimind2" and head_dim is not None and head_dim != hidden // heads:
            raise ConfigError(f"model.head_dim={head_dim} is not allowed with model.family='minimind2': "
                              f"MiniMind2's head size is hidden_size / num_attention_heads = "
                              f"{hidden // heads}; leave it null")
        # What MiniMind-3 upstream cannot express is refused rather than silently ignored.
        for name, (allowed, why) in _MINIMIND3_ONLY.items():
            if self.family == "minimind3" and getattr(self, name) != allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is not allowed with model.family="
                                  f"'minimind3': MiniMind-3 supports only {allowed!r} (upstream d65ef2c has {why})")


@raising("data")
@dataclass(frozen=True, config=STRICT)
class DataConfig:
    """Where the SFT conversations and the tokenizer come from and how they are cut."""

    # None: the bundled demo dataset (minimind_train/assets/demo).
    train_path: Text | None = None
    # None: hold out ``val_fraction`` of ``train_path`` (deterministic by ``split_seed``).
    val_path: Text | None = None
    val_fraction: Annotated[Number, Gt(0), Lt(1)] = 0.1
    split_seed: Int = 0
    # None: the bundled tokenizer; else a MiniMind2-format tokenizer directory.
    tokenizer: Text | None = None
    max_seq_len: Annotated[Int, Gt(0)] = 512
    # Length-grouped batches: pad to the longest sample of a batch of similar lengths.
    group_by_length: Bool = True
    # None: $MINIMIND_CACHE or ~/.cache/minimind-tune/tokens.
    cache_dir: Text | None = None
    # Cap on the validation split, taken at random (by split_seed) from it: a 10% split of a 1.2M
    # file would be evaluated every epoch. 0 = no cap.
    val_max_samples: Annotated[Int, Ge(0)] = 0
    # Upstream's random augmentation (system prompt with p 0.2, empty think blocks removed with
    # p 0.8), drawn once per sample from (augment_seed, line) when the cache is built.
    augment: Bool = False
    augment_seed: Int = 0
    # Processes that build the token cache; 0: every core for files over 4 MiB.
    tokenize_workers: Annotated[Int, Ge(0)] = 0


@raising("train")
@dataclass(frozen=True, config=STRICT)
class TrainConfig:
    """Optimisation of one SFT run."""

    epochs: Annotated[Int, Gt(0)] = 3
    batch_size: Annotated[Int, Gt(0)] = 16
    accumulation_steps: Annotated[Int, Gt(0)] = 1
    learning_rate: Annotated[Number, Gt(0)] = 5e-4
    # The schedule ends exactly at learning_rate * min_lr_ratio.
    min_lr_ratio: Annotated[Number, Ge(0), Le(1)] = 0.1
    warmup_steps: Annotated[Int, Ge(0)] = 0
    weight_decay: Annotated[Number, Ge(0)] = 0.0
    adam_beta1: Annotated[Number, Ge(0), Lt(1)] = 0.9
    adam_beta2: Annotated[Number, Ge(0), Lt(1)] = 0.95
    adam_eps: Annotated[Number, Gt(0)] = 1e-8
    # <= 0 disables clipping (the norm is still measured and reported).
    grad_clip: Number = 1.0
    # auto: bfloat16 on CUDA when supported, else float16 on CUDA, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: Int = 42
    eval_batch_size: Annotated[Int, Gt(0)] = 32
    # 0: torch's default; a trial sets it to its CPU share.
    num_threads: Annotated[Int, Ge(0)] = 0
    # Optional cap on optimizer steps per epoch (quick studies on big data); 0 = no cap.
    max_steps_per_epoch: Annotated[Int, Ge(0)] = 0
    log_interval: Annotated[Int, Gt(0)] = 10
    # Evaluations of the objective per epoch, at evenly spaced optimizer steps (the last at the epoch's
    # end; see minimind_train.train.evaluation_steps): each is a report. 1: once per epoch.
    evals_per_epoch: Annotated[Int, Ge(1)] = 1
    # Divergence (the run stops with TrainingDiverged): an optimizer step's loss above this multiple
    # of the run's first step's loss (a fresh model starts near ln(vocab), so 10x is far worse than
    # guessing), or a gradient norm (before clipping) above divergence_grad_norm. 0 disables either.
    # A non-finite loss or gradient always counts.
    divergence_loss_factor: Annotated[Number, Ge(0)] = 10.0
    divergence_grad_norm: Annotated[Number, Ge(0)] = 1e6

    def __post_init__(self) -> None:
        if 0 < self.divergence_loss_factor <= 1:
            raise ConfigError(f"train.divergence_loss_factor={self.divergence_loss_factor!r} must be 0 "
                              "(off) or > 1 (a multiple of the first step's loss)")


@raising("")
@dataclass(frozen=True, config=STRICT)
class RunConfig:
    """A whole SFT run: the three sections of a run file."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """This config with each ``{"section.key": value}`` set, validated together like YAML input (so
        fields bound by a rule can change at once); NumPy scalars become Python numbers. Raises
        :class:`ConfigError` for a path that is not a field (naming the fields) or a bad value."""
        raw = run_config_to_dict(self)
        for path, value in overrides.items():
            section, _, name = str(path).partition(".")
            if name not in raw.get(section, {}):
                known = [f"{s}.{n}" for s, keys in raw.items() for n in keys]
                raise ConfigError(f"{path} is not a config field{did_you_mean(name, list(raw.get(section, {})))}"
                                  f"; allowed: {', '.join(known)}")
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                value = int(value)
            elif isinstance(value, numbers.Real) and not isinstance(value, bool):
                value = float(value)
            raw[section][name] = value
        return run_config_from_dict(raw)


def run_config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Build a validated :class:`RunConfig` from the parsed YAML mapping (an empty section: defaults)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a run config must be a mapping with sections model, data, train; got {raw!r}")
    return validate(RunConfig, {key: {} if value is None else value for key, value in raw.items()})


def run_config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The YAML-ready mapping of ``cfg`` (round-trips through :func:`run_config_from_dict`)."""
    return dataclasses.asdict(cfg)


def load_run_config(path: str | Path) -> RunConfig:
    """Read a run file (``model``/``data``/``train``); relative paths resolve against its folder."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    return resolve_paths(run_config_from_dict(raw), path.resolve().parent)


def weights_file(path: str | Path) -> Path:
    """The weights file ``path`` names: a ``.pth`` file as given, a checkpoint folder's :data:`MODEL_FILE`
    (a study prints the file; either pastes where a checkpoint is loaded)."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Make the file paths of ``cfg`` absolute, relative ones taken from ``base``; ``model.init_from``
    naming a checkpoint folder becomes its weights file (:func:`weights_file`)."""
    def absolute(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    d = cfg.data
    init_from = absolute(cfg.model.init_from)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, init_from=init_from and str(weights_file(init_from))),
        data=dataclasses.replace(d, train_path=absolute(d.train_path), val_path=absolute(d.val_path),
                                 tokenizer=absolute(d.tokenizer), cache_dir=absolute(d.cache_dir)))
