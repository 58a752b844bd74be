"""The SFT loop, its evaluations and its loss.

``train_epochs(cfg, data, state)`` is a plain generator yielding one :class:`EvalResult` per evaluation
of the objective -- ``train.evals_per_epoch`` of them per epoch (default 1: once, at the epoch's end) --
so its caller (the CLI, a Ray trainable, a test) decides what happens between evaluations (report,
checkpoint, stop); nothing here knows Ray. The unit of progress is *optimizer steps done*
(:attr:`EvalResult.optimizer_steps`); :func:`evaluation_steps` says where in an epoch evaluations fall.
A state saved at any evaluation resumes exactly there, mid-epoch included.

Loss (see shared/design.md): an optimizer step over ``accumulation_steps`` micro-batches minimises
``sum(CE over supervised tokens) / (supervised tokens in the window)`` plus the MoE aux loss averaged
over the micro-batches, so batch 8 x accum 1 and batch 2 x accum 4 give the same gradient.
"""

from __future__ import annotations

import bisect
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .batches import TokenizedDataset, batch_indices
from .causal_lm import supervised_positions
from .checkpoint import TrainState, init_state
from .config import RunConfig, TrainConfig
from .data import SFTData

__all__ = ["EpochResult", "EvalResult", "NonFiniteLossError", "StepInfo", "TrainingDiverged",
           "backward_window", "check_divergence", "clip_grad_norm", "evaluate", "evaluation_steps", "lr_at",
           "steps_per_epoch", "train_epochs"]

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """Training diverged (see ``TrainConfig.divergence_*``); these hyperparameters are unusable."""

    def __init__(self, reason: str, epoch: int, step: int, value: float) -> None:
        super().__init__(f"{reason} at epoch {epoch}, optimizer step {step}")
        self.reason, self.epoch, self.step, self.value = reason, epoch, step, value

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        # Ray pickles trial errors; the default reduce would call __init__ with the message only.
        return (type(self), (self.reason, self.epoch, self.step, self.value))


class NonFiniteLossError(TrainingDiverged):
    """The training loss or gradient became NaN/inf."""


def check_divergence(cfg: TrainConfig, first_loss: float | None, loss: float, grad_norm: float,
                     epoch: int, step: int) -> None:
    """Raise :class:`TrainingDiverged` when an optimizer step's ``loss`` or ``grad_norm`` (before
    clipping) crosses the thresholds of ``cfg`` (relative to the run's ``first_loss``)."""
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        value = loss if not math.isfinite(loss) else grad_norm
        raise NonFiniteLossError(f"non-finite training loss or gradient {value}", epoch, step, value)
    factor = cfg.divergence_loss_factor
    if factor > 0 and first_loss is not None and loss > factor * first_loss:
        raise TrainingDiverged(f"loss {loss:.4g} exploded above {factor:g} x the first step's {first_loss:.4g}",
                               epoch, step, loss)
    if cfg.divergence_grad_norm > 0 and grad_norm > cfg.divergence_grad_norm:
        raise TrainingDiverged(f"gradient norm {grad_norm:.4g} exploded above {cfg.divergence_grad_norm:g}",
                               epoch, step, grad_norm)


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step, for progress displays."""

    epoch: int
    step: int
    step_in_epoch: int
    steps_in_epoch: int
    loss: float
    lr: float
    grad_norm: float


@dataclass(frozen=True)
class EvalResult:
    """What :func:`train_epochs` yields at each evaluation of the objective (one report).

    ``metrics`` has the same keys at every evaluation. ``val_loss`` is measured on the whole validation
    split (as capped by ``data.val_max_samples``) every time, so all evaluations of all trials measure
    one quantity. The training-side metrics (``train_loss``, ``aux_loss``, ``grad_norm``, throughput,
    ``epoch_seconds``, ``val_seconds``, ``time_epoch_start_unix``) cover the *interval* since the
    previous evaluation (or the epoch's start): with one evaluation per epoch that interval is the epoch.
    ``lr`` is the last step's, ``optimizer_steps`` the run's steps done.
    """

    epoch: int  # 1-based number of the epoch this evaluation falls in (just finished when epoch_end)
    metrics: dict[str, float]
    state: TrainState = field(repr=False)
    evaluation: int  # 1-based index of this evaluation over the whole run
    optimizer_steps: int  # optimizer steps done in the run: the unit of progress
    step_in_epoch: int  # optimizer steps done in this epoch (== steps_in_epoch at its end)
    steps_in_epoch: int  # optimizer steps of a whole epoch

    @property
    def epoch_end(self) -> bool:
        """Whether this evaluation ends its epoch (the state then holds ``epoch`` completed epochs)."""
        return self.step_in_epoch == self.steps_in_epoch


# Its name before evaluations inside an epoch; with ``evals_per_epoch: 1`` it is exactly the old yield.
EpochResult = EvalResult


def lr_at(step: int, total_steps: int, lr: float, min_lr_ratio: float, warmup_steps: int = 0) -> float:
    """Learning rate of 0-based optimizer step ``step`` out of ``total_steps``: linear warmup reaches
    ``lr`` at step ``warmup_steps``, then cosine decay runs from exactly ``lr`` to exactly
    ``lr * min_lr_ratio`` (last step)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0")
    if not 0 <= step < total_steps:
        raise ValueError(f"step={step} outside [0, {total_steps})")
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    lr_min = lr * min_lr_ratio
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = (step - warmup_steps) / decay_steps
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(num_batches: int, train: TrainConfig) -> int:
    """Optimizer steps per epoch: a last partial accumulation window still makes a step."""
    steps = math.ceil(num_batches / train.accumulation_steps)
    return min(steps, train.max_steps_per_epoch) if train.max_steps_per_epoch else steps


def evaluation_steps(per_epoch: int, evals_per_epoch: int) -> list[int]:
    """The optimizer steps into an epoch (1-based counts) after which :func:`train_epochs` evaluates:
    evaluation k of N after ``ceil(k * per_epoch / N)`` steps, k = 1..N, so the last is at the epoch's
    end and the spacing is even to within one step. With ``per_epoch < N`` equal counts merge: the
    epoch has ``min(N, per_epoch)`` evaluations (one after every step)."""
    if per_epoch < 1 or evals_per_epoch < 1:
        raise ValueError(f"per_epoch={per_epoch} and evals_per_epoch={evals_per_epoch} must be >= 1")
    return sorted({-(-k * per_epoch // evals_per_epoch) for k in range(1, evals_per_epoch + 1)})


def _supervised_ce(state: TrainState, input_ids: torch.Tensor, labels: torch.Tensor,
                   positions: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(CE sum over the supervised next tokens, their count, aux loss) of one micro-batch under autocast;
    ``positions`` are found on the CPU batch, so CUDA never syncs on them."""
    device, amp_dtype = state.device, state.amp_dtype
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
        return state.model.supervised_cross_entropy(
            input_ids.to(device, non_blocking=True), labels,
            tuple(x.to(device, non_blocking=True) for x in positions))


@torch.no_grad()
def evaluate(state: TrainState, dataset: TokenizedDataset, batch_size: int, pad_id: int) -> float:
    """Token-weighted CE over every supervised token of ``dataset`` (the tuning objective)."""
    was_training = state.model.training
    state.model.eval()
    total = torch.zeros((), dtype=torch.float64, device=state.device)
    count = 0
    order = batch_indices(dataset.lengths, batch_size, seed=0, epoch=0, shuffle=False)
    for items in order:
        input_ids, labels = dataset.batch(items, pad_id)
        ce_sum, n, _ = _supervised_ce(state, input_ids, labels, supervised_positions(labels))
        total += ce_sum.double()
        count += n
    state.model.train(was_training)
    if count == 0:
        raise ValueError("validation split has no supervised tokens")
    return float(total / count)


def backward_window(state: TrainState, window: list[tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Accumulate the gradient of one optimizer step's micro-batches into ``.grad``; returns the window's
    CE sum, aux-loss sum (both detached) and supervised-token count."""
    positions = [supervised_positions(labels) for _, labels in window]
    # The denominator is the whole window's supervised-token count, known before any forward.
    n_sup = sum(int(targets.numel()) for _, targets in positions)
    ce_window = torch.zeros((), dtype=torch.float32, device=state.device)
    aux_window = torch.zeros((), dtype=torch.float64, device=state.device)
    for (input_ids, labels), pos in zip(window, positions):
        ce_sum, _, aux = _supervised_ce(state, input_ids, labels, pos)
        aux = aux.float()
        loss = ce_sum / max(n_sup, 1) + aux / len(window)
        (state.scaler.scale(loss) if state.scaler is not None else loss).backward()
        ce_window += ce_sum.detach()
        aux_window += aux.detach().double()
    return ce_window, aux_window, n_sup


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` without its rescale pass over every gradient when the factor
    ``min(1, max_norm / (norm + 1e-6))`` is exactly 1 (that pass would change nothing)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if math.isfinite(max_norm) and float(max_norm / (norm + 1e-6)) < 1.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_epochs(cfg: RunConfig, data: SFTData, state: TrainState | None = None, *,
                 on_step: Callable[[StepInfo], None] | None = None) -> Iterator[EvalResult]:
    """Train from ``state`` (fresh when None) to ``cfg.train.epochs``, yielding at each of the
    ``train.evals_per_epoch`` evaluations per epoch (:func:`evaluation_steps`). A resumed state -- saved
    at any evaluation, mid-epoch included -- replays an uninterrupted run exactly: batch order depends
    only on (seed, epoch), the position in the epoch is ``state.step - state.epoch * steps per epoch``,
    and the RNG, optimizer, scaler and schedule travel in the state. Nothing accumulates across an
    evaluation (its training metrics cover the interval since the previous one), so nothing more needs
    to travel."""
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if state is None:
        state = init_state(cfg, vocab_size=cfg.model.vocab_size or data.vocab_size)
    model, optimizer, device = state.model, state.optimizer, state.device
    num_batches = math.ceil(len(data.train) / t.batch_size)
    per_epoch = steps_per_epoch(num_batches, t)
    total_steps = per_epoch * t.epochs
    eval_at = evaluation_steps(per_epoch, t.evals_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = t.grad_clip if t.grad_clip > 0 else math.inf
    # What a run must beat to have learned anything, reported with a fresh run's first evaluation (tune.study's
    # no_better_reason reads these names): the validation loss before the first optimizer step, and
    # ln(vocabulary size), the loss of the uniform predictor (a collapsed model's). One evaluation, no
    # randomness used: the run trains exactly as without it.
    baseline: dict[str, float] = {}
    if state.epoch == 0 and state.step == 0:
        baseline = {"baseline_val_loss": evaluate(state, data.val, t.eval_batch_size, data.pad_id),
                    "uniform_loss": math.log(cfg.model.vocab_size or data.vocab_size)}
        log.info("before training: val_loss %.4f (uniform predictor %.4f)", baseline["baseline_val_loss"],
                 baseline["uniform_loss"])

    while state.epoch < t.epochs:
        epoch = state.epoch
        done = state.step - epoch * per_epoch  # steps of this epoch already taken (> 0: resumed mid-epoch)
        if not 0 <= done < per_epoch:
            raise ValueError(f"the training state (epoch {epoch}, optimizer step {state.step}) does not fit "
                             f"{per_epoch} optimizer steps per epoch: it was saved with other data or "
                             "train.batch_size / accumulation_steps / max_steps_per_epoch")
        model.train()
        order = batch_indices(data.train.lengths, t.batch_size, seed=t.seed, epoch=epoch,
                              shuffle=True, group_by_length=cfg.data.group_by_length)
        evaluation = epoch * len(eval_at) + bisect.bisect_right(eval_at, done)  # evaluations done so far
        for step_in_epoch in range(done, per_epoch):
            if step_in_epoch == done or step_in_epoch in eval_at:
                # An interval starts (the epoch's, or the one after an evaluation): its metrics start here.
                ce_epoch = torch.zeros((), dtype=torch.float64, device=device)
                aux_epoch = torch.zeros((), dtype=torch.float64, device=device)
                sup_epoch = tokens_epoch = micro_epoch = 0
                grad_norms: list[float] = []
                lr = t.learning_rate
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                wall_start = time.time()
                start = time.perf_counter()
            window_order = order[step_in_epoch * t.accumulation_steps:
                                 (step_in_epoch + 1) * t.accumulation_steps]
            window = [data.train.batch(items, data.pad_id) for items in window_order]
            tokens_epoch += sum(int(data.train.lengths[items].sum()) for items in window_order)
            lr = lr_at(state.step, total_steps, t.learning_rate, t.min_lr_ratio, t.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ce_window, aux_window, n_sup = backward_window(state, window)
            aux_epoch += aux_window
            micro_epoch += len(window)
            if state.scaler is not None:
                state.scaler.unscale_(optimizer)
            grad_norm = clip_grad_norm(params, clip)
            window_loss = float(ce_window) / max(n_sup, 1)
            if state.first_loss is None and math.isfinite(window_loss):
                state.first_loss = window_loss
            # fp16: the scaler skips steps with inf/NaN gradients and lowers its scale; only the loss
            # says whether the run itself diverged.
            checked_norm = 0.0 if state.scaler is not None else float(grad_norm)
            check_divergence(t, state.first_loss, window_loss, checked_norm, epoch + 1, state.step)
            if state.scaler is not None:
                state.scaler.step(optimizer)
                state.scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            ce_epoch += ce_window.double()
            sup_epoch += n_sup
            grad_norms.append(float(grad_norm))
            info = StepInfo(epoch + 1, state.step, step_in_epoch + 1, per_epoch, window_loss, lr,
                            float(grad_norm))
            if on_step is not None:
                on_step(info)
            if (step_in_epoch + 1) % t.log_interval == 0:
                log.debug("epoch %d step %d/%d loss %.4f lr %.3g grad_norm %.3f", info.epoch,
                          info.step_in_epoch, per_epoch, info.loss, lr, info.grad_norm)
            if step_in_epoch + 1 not in eval_at:
                continue
            epoch_end = step_in_epoch + 1 == per_epoch
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - start
            val_start = time.perf_counter()
            val_loss = evaluate(state, data.val, t.eval_batch_size, data.pad_id)
            val_seconds = time.perf_counter() - val_start
            evaluation += 1
            if epoch_end:
                state.epoch += 1
            metrics = {
                "train_loss": float(ce_epoch) / max(sup_epoch, 1),
                "val_loss": val_loss,
                "aux_loss": float(aux_epoch) / max(micro_epoch, 1),
                "lr": lr,
                "grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
                "supervised_tokens_per_s": sup_epoch / train_seconds if train_seconds > 0 else 0.0,
                "tokens_per_s": tokens_epoch / train_seconds if train_seconds > 0 else 0.0,
                "epoch_seconds": train_seconds,
                "val_seconds": val_seconds,
                "peak_memory_mb": _peak_memory_mb(device),
                "optimizer_steps": float(state.step),
                # Wall clock (Unix seconds) when the interval's (the epoch's) first step began: with a
                # study's launch time it gives the time to the first training step. The "time_" prefix
                # marks it as timing bookkeeping, which the MLflow tracker leaves out like Ray's own
                # time_* keys.
                "time_epoch_start_unix": wall_start,
            }
            if baseline:  # (the first step's loss was the untrained model's on its first window)
                metrics |= baseline | ({"baseline_train_loss": state.first_loss}
                                       if state.first_loss is not None else {})
                baseline = {}
            where = "" if epoch_end else f" step {step_in_epoch + 1}/{per_epoch}"
            log.info("epoch %d/%d%s train_loss %.4f val_loss %.4f lr %.3g %.0f sup tok/s", epoch + 1,
                     t.epochs, where, metrics["train_loss"], val_loss, lr, metrics["supervised_tokens_per_s"])
            yield EvalResult(epoch=epoch + 1, metrics=metrics, state=state, evaluation=evaluation,
                             optimizer_steps=state.step, step_in_epoch=step_in_epoch + 1,
                             steps_in_epoch=per_epoch)
