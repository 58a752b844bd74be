"""The Ray trainable: a thin adapter over :func:`minimind_train.train.train_epochs`.

Per epoch it writes a checkpoint folder (fp16 MiniMind ``model.pth`` + resume state), then calls
``tune.report(metrics)`` with ``epoch`` (the trial's real epoch, across driver runs).
Checkpoints are the study's own (``epoch_000e`` folders in the trial's folder, not Ray's): a trial
continues from the newest whole one it has, after a retry by Ray or a ``--resume``. A loss
that becomes non-finite ends the trial with one ``diverged`` report (no retry: the same config
diverges again).
The dataset reaches trials through the on-disk token cache that the driver built once per study:
each trial memory-maps it (``tune.cluster.open_study_data``; on a node that cannot read the driver's
folder, its node's own copy of the one the driver put on the shared storage), so concurrent trials on a node share pages.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import tune

from minimind_train.checkpoint import load_train_state, save_checkpoint
from minimind_train.config import RunConfig, run_config_from_dict
from minimind_train.data import prepare_data
from minimind_train.train import TrainingDiverged, train_epochs

from .cluster import StudyData, current_node, open_study_data
from .progress import step_writer
from .searcher import NUMBER_KEY, PARAMS_KEY
from .storage import checkpoint_metas, filesystem_of, retain_checkpoints, trial_dirname, write_checkpoint

__all__ = ["TrialOutOfMemory", "flatten_params", "train_trial"]

log = logging.getLogger(__name__)

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
    return run_config_from_dict(base).with_overrides(flatten_params(config))


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


def _restore(runs: str, number: int, cfg: RunConfig, vocab_size: int) -> tuple[Any, dict[str, Any]]:
    """The train state to continue from and its checkpoint's meta.json: the newest loadable of the
    trial's whole checkpoints in its folders of every driver run under ``runs`` (a local folder or a
    URI): after a retry by Ray in this run, or a ``--resume``. ``(None, {})`` when it has none."""
    candidates = sorted(checkpoint_metas(runs, number).items(), reverse=True)
    for epoch, (path, meta) in candidates:
        try:
            if "://" not in runs:
                return load_train_state(path, cfg, vocab_size), meta
            fs, _ = filesystem_of(runs)
            with tune.Checkpoint(path, filesystem=fs).as_directory() as directory:  # downloaded
                return load_train_state(directory, cfg, vocab_size), meta
        except Exception as exc:  # noqa: BLE001 - a damaged checkpoint: try the next older one
            log.warning("checkpoint %s (epoch %d) cannot be loaded (%s); trying an older one", path, epoch, exc)
    return None, {}


def train_trial(config: dict[str, Any], *, base: Mapping[str, Any], metric: str, mode: str, runs_dir: str,
                run_name: str, keep_checkpoints: int = 1, gpu_share: float = 0.0,
                data: StudyData | None = None) -> None:
    """Function trainable. ``config``: ``params`` (searched values by dotted path) and ``study_trial``
    (the record's trial number); ``base`` is the fixed run config; ``metric``/``mode`` the study
    objective (reported as NaN when the trial diverges; it ranks the kept checkpoints).

    Each epoch's checkpoint goes to ``<runs_dir>/<run_name>/tNNN/epoch_000e`` (a local folder or a
    URI), *before* its result is reported, so a result in the record always has its checkpoint; the
    ``keep_checkpoints`` best and the newest are kept. ``data`` (from :func:`tune.cluster.study_data`)
    opens the driver's token cache on any node; None prepares the data here.
    """
    cfg = trial_run_config(base, config.get(PARAMS_KEY, {}))
    number = int(config[NUMBER_KEY])
    _release_gpu_memory()  # what a previous trial in this (reused) actor left cached
    _cap_gpu_memory(gpu_share)
    train_cfg = cfg  # differs only in model.init_from when that was copied to this node
    if data is None:
        sft = prepare_data(cfg.data, show_progress=False)
    else:
        sft, train_cfg = open_study_data(data, cfg)
    node = current_node()  # where each epoch ran, kept in the checkpoint's meta.json (not a metric)
    state, meta = _restore(runs_dir, number, cfg, sft.vocab_size)
    trial_dir = f"{runs_dir}/{run_name}/{trial_dirname(number)}"
    if state is not None:
        log.info("trial %s continues after epoch %d", number, state.epoch)
        # The checkpoint's epoch is reported again (marked, never trained again): a worker that died
        # between writing it and reporting it left that result out of the record (which keeps the
        # first report of an epoch, so a repeat changes nothing).
        tune.report({**meta.get("metrics", {}), "epoch": state.epoch, "restored": 1})
    import torch

    oom = None
    epoch = 0 if state is None else state.epoch
    try:
        # The driver's live view shows each running trial's step from this file (local storage only).
        on_step = step_writer(trial_dir) if "://" not in runs_dir else None
        for result in train_epochs(train_cfg, sft, state, on_step=on_step):
            epoch = result.epoch
            with tempfile.TemporaryDirectory(prefix="minimind-ckpt-") as tmp:
                folder = save_checkpoint(Path(tmp) / "checkpoint", result.state, cfg, result.metrics,
                                         {"data": sft.stats_dict(), "ray": node, "study_trial": number})
                write_checkpoint(folder, trial_dir, result.epoch)
            retain_checkpoints(runs_dir, number, keep_checkpoints, metric, mode)
            tune.report({**result.metrics, "epoch": result.epoch})
    except torch.cuda.OutOfMemoryError as exc:
        # Raised below, outside this block: the CUDA error's traceback holds the trial's tensors.
        oom = _oom_message(gpu_share, cfg, exc)
    except TrainingDiverged as exc:
        state = result = None
        _release_gpu_memory()
        tune.report({metric: float("nan"), "epoch": epoch + 1, "diverged": 1, "diverged_reason": str(exc)})
        return
    # Finished or out of memory: give the cached blocks back now. (A trial stopped by the scheduler
    # leaves through Ray's SystemExit in tune.report; a reused actor frees its memory at the next
    # trial's start, above.)
    state = result = None
    _release_gpu_memory()
    if oom is not None:
        raise TrialOutOfMemory(oom)
