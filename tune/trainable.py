"""The Ray trainable: a thin adapter over :func:`minimind_train.train.train_epochs`.

Per epoch it writes a checkpoint folder (fp16 MiniMind ``model.pth`` + resume state) and calls
``tune.report(metrics, checkpoint=...)``; a restarted trial continues from ``tune.get_checkpoint()``.
The dataset reaches trials through the on-disk token cache that the driver built once per study:
each trial memory-maps it (``tune.cluster.open_study_data``; on a node that cannot read the driver's
folder, a copy shipped through Ray's object store), so concurrent trials on a node share pages.
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

from minimind_train.checkpoint import load_train_state, read_meta, save_checkpoint
from minimind_train.config import RunConfig, run_config_from_dict
from minimind_train.data import prepare_data
from minimind_train.train import NonFiniteLossError, train_epochs

from .cluster import StudyData, current_node, open_study_data
from .ledger import fetch_checkpoint, read_ended, replay_plan, trial_uri
from .space import apply_params

__all__ = ["DIVERGED_MARKER", "TrialDiverged", "TrialOutOfMemory", "flatten_params", "train_trial"]

log = logging.getLogger(__name__)

# Written into the trial folder when the loss went non-finite: a retry of that trial fails at once
# instead of deterministically diverging again.
DIVERGED_MARKER = "diverged.json"


class TrialDiverged(RuntimeError):
    """The trial's training loss became NaN/inf (its hyperparameters are unusable)."""


class TrialOutOfMemory(RuntimeError):
    """The trial needed more GPU memory than its share (its neighbours are unaffected)."""


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


def _oom_message(gpu_share: float, cfg: RunConfig, exc: BaseException) -> str:
    import torch

    try:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    except (RuntimeError, AssertionError):  # no usable device to describe
        total = None
    known = total is not None
    if 0 < gpu_share < 1:
        share = f"its share of {gpu_share:g} of the GPU" + (
            f" ({gpu_share * total:.1f} of {total:.1f} GiB)" if known else "")
    else:
        share = "the whole GPU" + (f" ({total:.1f} GiB)" if known else "")
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"out of GPU memory within {share} at train.batch_size={cfg.train.batch_size}: use a smaller "
            "train.batch_size (with train.accumulation_steps to keep the effective batch), a smaller "
            f"data.max_seq_len or model, or a larger tune.resources_per_trial.gpu ({detail})")


def _release_gpu_memory() -> None:
    """Give the trial's cached CUDA blocks back, so they do not stay reserved in a reused actor."""
    import gc

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def _replay_ended(trial_dir: str, checkpoint: tune.Checkpoint | None) -> bool:
    """Report again what an ended trial reported after the epoch Ray restored it at; False if not ended.

    Ray's saved state can lag behind a trial's end (see :mod:`tune.ledger`); training it again would
    add epochs to a finished trial or continue one ASHA had stopped.
    """
    record = read_ended(trial_dir)
    if record is None:
        return False
    restored = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored = int(read_meta(directory)["epoch"])
    rows = replay_plan(record, restored)
    log.info("trial %s had ended after epoch %d; restored at epoch %d, replaying %d recorded results",
             record.trial_id, record.epochs, restored, len(rows))
    for epoch, row in enumerate(rows, restored + 1):
        with tempfile.TemporaryDirectory(prefix="minimind-replay-") as tmp:
            kept = fetch_checkpoint(trial_dir, epoch, Path(tmp) / "checkpoint")
            tune.report(row, checkpoint=None if kept is None else tune.Checkpoint.from_directory(str(kept)))
    return True


def train_trial(config: dict[str, Any], *, base: Mapping[str, Any], gpu_share: float = 0.0,
                data: StudyData | None = None, study_uri: str | None = None) -> None:
    """Function trainable: ``config`` holds the searched values, ``base`` the fixed run config.

    ``data`` (from :func:`tune.cluster.study_data`) opens the driver's token cache on any node,
    shipped through the object store where the node cannot read it; None prepares the data here.
    ``study_uri`` is the study's storage folder, where :class:`tune.ledger.EndedLedger` records
    which trials have ended; a restarted trial found there replays its results instead of training.
    """
    cfg = trial_run_config(base, config)
    trial_dir = Path(tune.get_context().get_trial_dir())
    marker = trial_dir / DIVERGED_MARKER
    if marker.exists():
        raise TrialDiverged(json.loads(marker.read_text())["reason"])
    checkpoint = tune.get_checkpoint()
    if study_uri is not None and _replay_ended(trial_uri(study_uri, tune.get_context().get_trial_id()),
                                               checkpoint):
        return
    _release_gpu_memory()  # what a previous trial in this (reused) actor left cached
    _cap_gpu_memory(gpu_share)
    train_cfg = cfg  # differs only in model.init_from when that was shipped to this node
    if data is None:
        sft = prepare_data(cfg.data, show_progress=False)
    else:
        sft, train_cfg = open_study_data(data, cfg)
    # Where each epoch ran, kept in the checkpoint's meta.json (not a metric).
    node = current_node()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_train_state(directory, cfg, sft.vocab_size)
        log.info("trial restored after epoch %d", state.epoch)
    import torch

    oom = None
    try:
        for result in train_epochs(train_cfg, sft, state):
            with tempfile.TemporaryDirectory(prefix="minimind-ckpt-") as tmp:
                folder = save_checkpoint(Path(tmp) / "checkpoint", result.state, cfg, result.metrics,
                                         {"data": sft.stats_dict(), "ray": node})
                tune.report({**result.metrics, "epoch": result.epoch},
                            checkpoint=tune.Checkpoint.from_directory(str(folder)))
    except torch.cuda.OutOfMemoryError as exc:
        # Raised below, outside this block: the CUDA error's traceback holds the trial's tensors.
        oom = _oom_message(gpu_share, cfg, exc)
    except NonFiniteLossError as exc:
        trial_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"reason": str(exc), "pid": os.getpid()}))
        # Not `from exc`: Ray copies and pickles the whole cause chain, and NonFiniteLossError
        # cannot be rebuilt from its args, so the trial's error became a TypeError about
        # NonFiniteLossError.__init__ instead of this message.
        raise TrialDiverged(str(exc)) from None
    # Finished or out of memory: give the cached blocks back now. (A trial stopped by the scheduler
    # leaves through Ray's SystemExit in tune.report; a reused actor frees its memory at the next
    # trial's start, below.)
    state = result = None
    _release_gpu_memory()
    if oom is not None:
        raise TrialOutOfMemory(oom)
