"""The Ray trainable: a thin adapter over :func:`minimind_train.train.train_epochs`.

At each evaluation (``train.evals_per_epoch`` per epoch) it writes the study's own checkpoint (``epoch_000k``
in the trial's folder, not Ray's; ``k`` the evaluation index, :func:`tune.record.evaluation_index`), then
``tune.report``s the metrics with that ``evaluation`` and the trial's real ``epoch`` it falls in (across
driver runs); a retried or resumed trial continues from the checkpoint :func:`~tune.storage.resume_point`
names, mid-epoch included (the driver's message uses it too), a diverged one ends with one ``diverged``
report (no retry: the same config diverges again). Data come memory-mapped from the driver's per-study token cache
(``tune.cluster.open_study_data``), so concurrent trials on a node share pages.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ray import tune

from minimind_train.checkpoint import load_train_state, save_checkpoint
from minimind_train.config import RunConfig, run_config_from_dict, run_config_to_dict
from minimind_train.data import prepare_data
from minimind_train.train import TrainingDiverged, train_epochs

from .cluster import StudyData, current_node, open_study_data
from .objective import Objective
from .progress import step_writer
from .record import PATH_KEYS, RUN_SETTINGS, evaluation_index
from .searcher import CHECKPOINT_KEY, DIVERGED_KEY, DIVERGED_REASON_KEY, NUMBER_KEY, PARAMS_KEY
from .storage import (
    ResumePoint,
    filesystem_of,
    resume_point,
    retain_checkpoints,
    trial_dirname,
    write_checkpoint,
)

__all__ = ["TrialOutOfMemory", "train_trial"]

log = logging.getLogger(__name__)


class TrialOutOfMemory(RuntimeError):
    """The trial needed more GPU memory than its share (its neighbours are unaffected)."""


def _oom_message(gpu_share: float, cfg: RunConfig, exc: BaseException) -> str:
    partial = 0 < gpu_share < 1
    try:
        gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        size = f" ({gpu_share * gib:.1f} of {gib:.1f} GiB)" if partial else f" ({gib:.1f} GiB)"
    except (RuntimeError, AssertionError):  # no usable device to describe
        size = ""
    share = (f"its share of {gpu_share:g} of the GPU" if partial else "the whole GPU") + size
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (f"out of GPU memory within {share} at train.batch_size={cfg.train.batch_size}: use a smaller "
            "train.batch_size (with train.accumulation_steps to keep the effective batch), a smaller "
            f"data.max_seq_len or model, or a larger tune.resources_per_trial.gpu ({detail})")


def _release_gpu_memory() -> None:  # (cached CUDA blocks would stay reserved in a reused actor)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def _restore(runs: str, number: int, cfg: RunConfig, vocab_size: int) -> tuple[Any, ResumePoint]:
    """The train state to continue from and where it is: the checkpoint :func:`~tune.storage.resume_point`
    names (the one the driver announced); ``(None, point)`` when none.

    Raises:
        RuntimeError: that checkpoint passes the validity rule but does not load; no older one is taken
            silently, as the driver said which one the trial continues from.
    """
    point = resume_point(runs, number)
    for path, problem in point.damaged:
        log.warning("trial %s: checkpoint %s cannot be continued from: %s", number, path, problem)
    if point.path is None:
        return None, point
    # The last guard against one trial's epochs mixing two configurations (the study's files are compared
    # before Ray starts: StudyRecord.open, preflight.reconcile): its checkpoint says what it trained with.
    saved = point.meta.get("config")
    if isinstance(saved, Mapping):
        now = json.loads(json.dumps(run_config_to_dict(cfg)))  # (as meta.json holds it: lists, not tuples)
        changed = [f"{section}.{name}: {old!r} -> {now[section][name]!r}"
                   for section, values in saved.items() if isinstance(values, Mapping) and section in now
                   for name, old in values.items() if name in now[section]
                   and f"{section}.{name}" not in RUN_SETTINGS + PATH_KEYS and now[section][name] != old]
        if changed:
            raise RuntimeError(f"checkpoint {point.path} was trained with another configuration than the study's "
                               f"now ({'; '.join(changed)}); its epochs are not continued with another")
    fs, _ = filesystem_of(runs)
    try:  # (as_directory downloads from a URI; a local folder is used in place)
        with tune.Checkpoint(point.path, filesystem=fs).as_directory() as directory:
            return load_train_state(directory, cfg, vocab_size), point
    except Exception as exc:
        raise RuntimeError(f"checkpoint {point.path} (evaluation {point.evaluation}) cannot be loaded: "
                           f"{type(exc).__name__}: {exc}") from exc


def train_trial(config: dict[str, Any], *, base: Mapping[str, Any], objective: Objective, runs_dir: str,
                run_name: str, keep_checkpoints: int = 1, gpu_share: float = 0.0,
                data: StudyData | None = None) -> None:
    """Function trainable. ``config``: ``params`` (searched values by dotted path) and ``study_trial``
    (the record's trial number); ``base``: the fixed run config; ``objective``: what is optimised (NaN
    when the trial diverges; it ranks the kept checkpoints); ``data``: the driver's token cache on any node
    (:func:`tune.cluster.study_data`; None prepares the data here). Each evaluation's checkpoint goes to
    ``<runs_dir>/<run_name>/tNNN/epoch_000k`` (a folder or a URI; ``k`` its evaluation index) *before* its
    result is reported, so a recorded result always has its checkpoint; the ``keep_checkpoints`` best and
    the newest are kept.

    Raises:
        TrialOutOfMemory: CUDA ran out of memory within the trial's ``gpu_share`` (0: no cap, 1: whole GPU).
    """
    cfg = run_config_from_dict(base).with_overrides(config.get(PARAMS_KEY, {}))
    number = int(config[NUMBER_KEY])
    _release_gpu_memory()  # what a previous trial in this (reused) actor left cached
    if 0 < gpu_share < 1 and torch.cuda.is_available():  # an oversized trial fails alone, not its neighbours
        torch.cuda.set_per_process_memory_fraction(gpu_share)
    if data is None:
        sft, train_cfg = prepare_data(cfg.data, show_progress=False), cfg
    else:  # train_cfg differs from cfg only in model.init_from, when that was copied to this node
        sft, train_cfg = open_study_data(data, cfg)
    node = current_node()  # where each epoch ran, kept in the checkpoint's meta.json (not a metric)
    state, point = _restore(runs_dir, number, cfg, sft.vocab_size)
    trial_dir = f"{runs_dir}/{run_name}/{trial_dirname(number)}"
    if state is not None:
        done = point.evaluation
        log.info("trial %s continues after evaluation %d (epoch %d, optimizer step %d)", number, done,
                 state.epoch, state.step)
        # Reported again (marked, not trained again): a worker that died between writing the checkpoint
        # and reporting it left that result out of the record (which keeps an evaluation's first report).
        tune.report({**point.meta.get("metrics", {}), "epoch": -(-done // cfg.train.evals_per_epoch),
                     "evaluation": done, "restored": 1, CHECKPOINT_KEY: point.path})
    oom = diverged = None
    on_step = step_writer(trial_dir) if "://" not in runs_dir else None  # the driver's live view, local only
    try:
        for result in train_epochs(train_cfg, sft, state, on_step=on_step):
            index = evaluation_index(result.epoch, result.step_in_epoch, result.steps_in_epoch,
                                     cfg.train.evals_per_epoch)
            with tempfile.TemporaryDirectory(prefix="minimind-ckpt-") as tmp:
                folder = save_checkpoint(Path(tmp) / "checkpoint", result.state, cfg, result.metrics,
                                         {"data": sft.stats_dict(), "ray": node, "study_trial": number})
                path = write_checkpoint(folder, trial_dir, index)
            retain_checkpoints(runs_dir, number, keep_checkpoints, objective)
            tune.report({**result.metrics, "epoch": result.epoch, "evaluation": index, CHECKPOINT_KEY: path})
    except torch.cuda.OutOfMemoryError as exc:  # raised below, outside: its traceback holds the tensors
        oom = _oom_message(gpu_share, cfg, exc)
    except TrainingDiverged as exc:
        diverged = {objective.metric: float("nan"), "epoch": exc.epoch, DIVERGED_KEY: 1,
                    DIVERGED_REASON_KEY: str(exc)}
    # Freed now (one stopped by the scheduler leaves via SystemExit in tune.report: freed at the next start).
    state = result = None
    _release_gpu_memory()
    if diverged is not None:
        tune.report(diverged)
    if oom is not None:
        raise TrialOutOfMemory(oom)
