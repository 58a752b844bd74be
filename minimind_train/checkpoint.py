"""Checkpoints: an fp16 MiniMind ``.pth`` for use, plus full resume state, written atomically.

Layout of one checkpoint folder::

    model.pth        fp16 state dict with MiniMind2 keys (what upstream MiniMind scripts load)
    train_state.pt   fp32 weights, optimizer, scaler, epoch/step, RNG -- enough to resume exactly
    meta.json        config, metrics of that epoch, tokenizer fingerprint, versions
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, run_config_to_dict
from .model import GenerationMismatchError, build_model, check_generation
from .train import TrainState, init_state

__all__ = [
    "META_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "WeightMismatchError",
    "drop_resume_state",
    "fp16_state_dict",
    "load_minimind_weights",
    "load_train_state",
    "model_from_checkpoint",
    "read_meta",
    "save_checkpoint",
]

MODEL_FILE = "model.pth"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


class WeightMismatchError(RuntimeError):
    """A weights file does not fit the model; the message lists every offending key."""


def fp16_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as upstream MiniMind saves them: ``{k: v.half()}`` on CPU."""
    return {k: v.detach().half().cpu() for k, v in model.state_dict().items()}


def load_minimind_weights(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a MiniMind ``.pth`` strictly; any missing, unexpected or wrong-shape key is an error, and a
    file of the other MiniMind generation is refused saying which generation it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: no such file: {path}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise WeightMismatchError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    # Before the key comparison: its long key lists would hide that the generation is wrong.
    try:
        check_generation(loaded, getattr(model, "family", "minimind2"), str(path))
    except GenerationMismatchError as exc:
        raise WeightMismatchError(str(exc)) from None
    own = model.state_dict()
    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    wrong = sorted(
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(loaded) if tuple(loaded[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong:
        parts = [f"{path} does not match the model configuration:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
                parts.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
        raise WeightMismatchError("\n".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in loaded.items()}, strict=True)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | os.PathLike[str],
    state: TrainState,
    cfg: RunConfig,
    metrics: Mapping[str, float] | None = None,
    meta: Mapping[str, Any] | None = None,
    *,
    resume_state: bool = True,
) -> Path:
    """Write a checkpoint folder atomically: readers see the old folder or the new one, never half."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        torch.save(fp16_state_dict(state.model), tmp / MODEL_FILE)
        if resume_state:
            torch.save({
                "model": {k: v.detach().float().cpu() for k, v in state.model.state_dict().items()},
                "optimizer": state.optimizer.state_dict(),
                "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                "epoch": state.epoch,
                "step": state.step,
                "first_loss": state.first_loss,
                "rng": _rng_state(),
            }, tmp / STATE_FILE)
        info = {
            "config": run_config_to_dict(cfg),
            "epoch": state.epoch,
            "step": state.step,
            "metrics": dict(metrics or {}),
            "versions": {"torch": torch.__version__},
            **dict(meta or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text(encoding="utf-8"))


def load_train_state(
    directory: str | os.PathLike[str],
    cfg: RunConfig,
    vocab_size: int,
    device: torch.device | None = None,
) -> TrainState:
    """Rebuild the exact :class:`TrainState` saved in ``directory`` (fp32 weights, optimizer, RNG)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this checkpoint holds no resume state (only fp16 weights)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    # init_from is not re-applied: the saved weights supersede it.
    state = init_state(_without_init(cfg), vocab_size, device)
    state.model.load_state_dict(saved["model"], strict=True)
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.scaler is not None and saved["scaler"] is not None:
        state.scaler.load_state_dict(saved["scaler"])
    state.epoch = int(saved["epoch"])
    state.step = int(saved["step"])
    state.first_loss = saved.get("first_loss")  # absent in checkpoints older than the divergence check
    _set_rng_state(saved["rng"])
    return state


def _without_init(cfg: RunConfig) -> RunConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None))


def drop_resume_state(directory: str | os.PathLike[str]) -> int:
    """Delete the resume state of a checkpoint, keeping its fp16 weights; returns bytes freed."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        return 0
    size = path.stat().st_size
    path.unlink()
    return size


def model_from_checkpoint(directory: str | os.PathLike[str], cfg: RunConfig,
                          vocab_size: int) -> torch.nn.Module:
    """An fp32 model of ``cfg.model.family`` with the checkpoint's fp16 weights, loaded strictly."""
    model = build_model(cfg.model, vocab_size)
    load_minimind_weights(model, Path(directory) / MODEL_FILE)
    return model
