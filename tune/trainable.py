"""The Ray trainable: a thin adapter over :func:`minimind_train.train.train_epochs`.

Per epoch it writes a checkpoint folder (fp16 MiniMind ``model.pth`` + resume state) and calls
``tune.report(metrics, checkpoint=...)``; a restarted trial continues from ``tune.get_checkpoint()``.
The dataset reaches trials through the on-disk token cache that the driver built once per study:
``prepare_data`` here is a cache hit that memory-maps it, so concurrent trials on a node share pages.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import tune

from minimind_train.checkpoint import load_train_state, save_checkpoint
from minimind_train.config import RunConfig, run_config_from_dict
from minimind_train.data import prepare_data
from minimind_train.train import NonFiniteLossError, train_epochs

from .space import apply_params

__all__ = ["TrialDiverged", "flatten_params", "train_trial", "DIVERGED_MARKER"]

log = logging.getLogger(__name__)

# Written into the trial folder when the loss went non-finite: a retry of that trial fails at once
# instead of deterministically diverging again.
DIVERGED_MARKER = "diverged.json"


class TrialDiverged(RuntimeError):
    """The trial's training loss became NaN/inf (its hyperparameters are unusable)."""


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Searched values by dotted config path, whether Ray handed them nested or flat."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}".replace("/", ".")
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def trial_run_config(base: Mapping[str, Any], config: Mapping[str, Any]) -> RunConfig:
    return apply_params(run_config_from_dict(base), flatten_params(config))


def _cap_gpu_memory(gpu_share: float) -> None:
    """Hold a fractional-GPU trial to its share, so an oversized trial fails alone, not its neighbours."""
    import torch

    if 0 < gpu_share < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(gpu_share)


def train_trial(config: dict[str, Any], *, base: Mapping[str, Any], gpu_share: float = 0.0) -> None:
    """Function trainable: ``config`` holds the searched values, ``base`` the fixed run config."""
    cfg = trial_run_config(base, config)
    trial_dir = Path(tune.get_context().get_trial_dir())
    marker = trial_dir / DIVERGED_MARKER
    if marker.exists():
        raise TrialDiverged(json.loads(marker.read_text())["reason"])
    _cap_gpu_memory(gpu_share)
    data = prepare_data(cfg.data, show_progress=False)
    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_train_state(directory, cfg, data.vocab_size)
        log.info("trial restored after epoch %d", state.epoch)
    try:
        for result in train_epochs(cfg, data, state):
            with tempfile.TemporaryDirectory(prefix="minimind-ckpt-") as tmp:
                folder = save_checkpoint(Path(tmp) / "checkpoint", result.state, cfg, result.metrics,
                                         {"data": data.stats_dict()})
                tune.report({**result.metrics, "epoch": result.epoch},
                            checkpoint=tune.Checkpoint.from_directory(str(folder)))
    except NonFiniteLossError as exc:
        trial_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"reason": str(exc), "pid": os.getpid()}))
        raise TrialDiverged(str(exc)) from exc
