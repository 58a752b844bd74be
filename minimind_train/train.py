"""The per-epoch SFT function.

``train_epochs(cfg, data, state)`` is a plain generator: it yields one :class:`EpochResult` (metrics
and the live :class:`TrainState`) per epoch, so a caller (the CLI, a Ray trainable, a test) decides
what to do between epochs -- checkpoint, report, stop. Nothing here knows about Ray.

Loss semantics (see shared/design.md): for a window of ``accumulation_steps`` micro-batches the
optimizer step minimises ``sum(CE over supervised tokens) / (supervised tokens in the window)`` plus
the MoE aux loss averaged over the window's micro-batches, so batch 8 x accum 1 and batch 2 x accum 4
give the same gradient.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import RunConfig, TrainConfig
from .data import SFTData, TokenizedDataset, batch_indices, iterate_batches
from .model import MiniMindForCausalLM, build_model, supervised_positions

if TYPE_CHECKING:
    from .model3 import MiniMind3ForCausalLM

__all__ = [
    "EpochResult",
    "NonFiniteLossError",
    "StepInfo",
    "TrainState",
    "TrainingDiverged",
    "autocast_context",
    "backward_window",
    "check_divergence",
    "clip_grad_norm",
    "evaluate",
    "init_state",
    "lr_at",
    "resolve_device",
    "resolve_dtype",
    "steps_per_epoch",
    "train_epochs",
]

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """Training diverged (see ``TrainConfig.divergence_*``); these hyperparameters are unusable."""

    def __init__(self, reason: str, epoch: int, step: int, value: float) -> None:
        super().__init__(f"{reason} at epoch {epoch}, optimizer step {step}")
        self.reason = reason
        self.epoch = epoch
        self.step = step
        self.value = value

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        # Ray pickles trial errors; the default reduce would call __init__ with the message only.
        return (type(self), (self.reason, self.epoch, self.step, self.value))


class NonFiniteLossError(TrainingDiverged):
    """The training loss or gradient became NaN/inf."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"non-finite training loss or gradient {value}", epoch, step, value)

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return (type(self), (self.epoch, self.step, self.value))


def check_divergence(cfg: TrainConfig, first_loss: float | None, loss: float, grad_norm: float,
                     epoch: int, step: int) -> None:
    """Raise :class:`TrainingDiverged` when an optimizer step's ``loss`` or ``grad_norm`` (before
    clipping) crosses the thresholds of ``cfg`` (relative to the run's ``first_loss``)."""
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        raise NonFiniteLossError(epoch, step, loss if not math.isfinite(loss) else grad_norm)
    factor = cfg.divergence_loss_factor
    if factor > 0 and first_loss is not None and loss > factor * first_loss:
        raise TrainingDiverged(f"loss {loss:.4g} exploded above {factor:g} x the first step's {first_loss:.4g}",
                               epoch, step, loss)
    if cfg.divergence_grad_norm > 0 and grad_norm > cfg.divergence_grad_norm:
        raise TrainingDiverged(f"gradient norm {grad_norm:.4g} exploded above {cfg.divergence_grad_norm:g}",
                               epoch, step, grad_norm)


@dataclass
class TrainState:
    """Everything that changes during training; ``epoch``/``step`` count completed epochs/steps."""

    model: MiniMindForCausalLM | MiniMind3ForCausalLM
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    amp_dtype: torch.dtype
    epoch: int = 0
    step: int = 0
    # The loss of the run's first optimizer step: the reference of the divergence check.
    first_loss: float | None = None


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
class EpochResult:
    epoch: int  # 1-based number of the epoch just finished
    metrics: dict[str, float]
    state: TrainState = field(repr=False)


def lr_at(step: int, total_steps: int, lr: float, min_lr_ratio: float, warmup_steps: int = 0) -> float:
    """Learning rate of 0-based optimizer step ``step`` out of ``total_steps``.

    Linear warmup reaches ``lr`` at step ``warmup_steps``; cosine decay then runs from exactly ``lr``
    (first post-warmup step) to exactly ``lr * min_lr_ratio`` (last step).
    """
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "float16" and device.type != "cuda":
        raise ValueError("train.dtype='float16' needs CUDA (use float32 or bfloat16 on CPU)")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_context(device: torch.device, amp_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if amp_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def init_state(cfg: RunConfig, vocab_size: int, device: torch.device | None = None) -> TrainState:
    """Fresh model of ``model.family`` (optionally ``init_from`` a .pth of that generation, strictly),
    AdamW and scaler."""
    from .checkpoint import load_minimind_weights

    device = device or resolve_device(cfg.train.device)
    amp_dtype = resolve_dtype(cfg.train.dtype, device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, vocab_size)
    if cfg.model.init_from:
        load_minimind_weights(model, cfg.model.init_from)
    model.to(device)
    t = cfg.train
    # Norm weights and biases are not decayed (standard AdamW practice; MiniMind decays nothing).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # Fused on CPU too: one pass over each parameter instead of ~8 foreach passes (8.9M parameters
    # on two cores: ~25 ms instead of ~400 ms a step); the same AdamW update.
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
        fused=device.type in ("cuda", "cpu"),
    )
    # GradScaler only for fp16: bf16 has fp32's exponent range and needs no loss scaling.
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return TrainState(model=model, optimizer=optimizer, scaler=scaler, device=device, amp_dtype=amp_dtype)


@torch.no_grad()
def evaluate(state: TrainState, dataset: TokenizedDataset, batch_size: int, pad_id: int) -> float:
    """Token-weighted CE over every supervised token of ``dataset`` (the tuning objective)."""
    model = state.model
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=state.device)
    count = 0
    order = batch_indices(dataset.lengths, batch_size, seed=0, epoch=0, shuffle=False)
    for input_ids, labels in iterate_batches(dataset, order, pad_id):
        positions = _to_device(supervised_positions(labels), state.device)
        input_ids = input_ids.to(state.device, non_blocking=True)
        with autocast_context(state.device, state.amp_dtype):
            ce_sum, n, _ = model.supervised_cross_entropy(input_ids, labels, positions)
        total += ce_sum.double()
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("validation split has no supervised tokens")
    return float(total / count)


def backward_window(
    state: TrainState, window: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Accumulate the gradient of one optimizer step's micro-batches into ``.grad``.

    Returns the window's CE sum, aux-loss sum (both detached) and supervised-token count.
    """
    # The denominator is the whole window's supervised-token count, known before any forward.
    n_sup = sum(int((y[:, 1:] != -100).sum()) for _, y in window)
    ce_window = torch.zeros((), dtype=torch.float32, device=state.device)
    aux_window = torch.zeros((), dtype=torch.float64, device=state.device)
    for input_ids, labels in window:
        # The LM head runs only where the next token is supervised (same loss, see
        # MiniMindForCausalLM.supervised_cross_entropy); positions are found on the CPU batch.
        positions = _to_device(supervised_positions(labels), state.device)
        input_ids = input_ids.to(state.device, non_blocking=True)
        with autocast_context(state.device, state.amp_dtype):
            ce_sum, _, aux = state.model.supervised_cross_entropy(input_ids, labels, positions)
        aux = aux.float()
        loss = ce_sum / max(n_sup, 1) + aux / len(window)
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
        else:
            loss.backward()
        ce_window += ce_sum.detach()
        aux_window += aux.detach().double()
    return ce_window, aux_window, n_sup


def _to_device(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(device, non_blocking=True) for x in tensors)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that skips the rescale pass when it would multiply by 1.

    clip_grad_norm_ always multiplies every gradient by ``min(1, max_norm / (norm + 1e-6))``; when
    that factor is exactly 1 the pass over all gradients changes nothing, so it is skipped.
    """
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


def train_epochs(
    cfg: RunConfig,
    data: SFTData,
    state: TrainState | None = None,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
) -> Iterator[EpochResult]:
    """Train from ``state`` (fresh when None) to ``cfg.train.epochs``, yielding after each epoch.

    Resuming from a state saved after epoch ``e`` replays exactly what an uninterrupted run does:
    batch order depends only on (seed, epoch) and the RNG/optimizer/schedule travel in the state.
    """
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if state is None:
        state = init_state(cfg, vocab_size=_vocab_size(cfg, data))
    model, optimizer, device = state.model, state.optimizer, state.device
    num_batches = math.ceil(len(data.train) / t.batch_size)
    per_epoch = steps_per_epoch(num_batches, t)
    total_steps = per_epoch * t.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    clip = t.grad_clip if t.grad_clip > 0 else math.inf

    while state.epoch < t.epochs:
        epoch = state.epoch
        model.train()
        order = batch_indices(data.train.lengths, t.batch_size, seed=t.seed, epoch=epoch,
                              shuffle=True, group_by_length=cfg.data.group_by_length)
        lengths = data.train.lengths
        ce_epoch = torch.zeros((), dtype=torch.float64, device=device)
        aux_epoch = torch.zeros((), dtype=torch.float64, device=device)
        sup_epoch = tokens_epoch = micro_epoch = 0
        grad_norms: list[float] = []
        lr = t.learning_rate
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        wall_start = time.time()
        start = time.perf_counter()
        for step_in_epoch in range(per_epoch):
            window_order = order[step_in_epoch * t.accumulation_steps:
                                 (step_in_epoch + 1) * t.accumulation_steps]
            window = list(iterate_batches(data.train, window_order, data.pad_id))
            tokens_epoch += int(sum(int(lengths[i]) for batch in window_order for i in batch))
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
            if state.scaler is not None:
                # fp16: the scaler skips steps with inf/NaN gradients and lowers its scale; only the
                # loss says whether the run itself diverged.
                check_divergence(t, state.first_loss, window_loss, 0.0, epoch + 1, state.step)
                state.scaler.step(optimizer)
                state.scaler.update()
            else:
                check_divergence(t, state.first_loss, window_loss, float(grad_norm), epoch + 1, state.step)
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
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - start
        val_start = time.perf_counter()
        val_loss = evaluate(state, data.val, t.eval_batch_size, data.pad_id)
        val_seconds = time.perf_counter() - val_start
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
            # Wall clock (Unix seconds) when the epoch's first step began: with a study's launch time
            # it gives the time to the first training step. The "time_" prefix marks it as timing
            # bookkeeping, which the MLflow tracker leaves out like Ray's own time_* keys.
            "time_epoch_start_unix": wall_start,
        }
        log.info("epoch %d/%d train_loss %.4f val_loss %.4f lr %.3g %.0f sup tok/s", state.epoch,
                 t.epochs, metrics["train_loss"], val_loss, lr, metrics["supervised_tokens_per_s"])
        yield EpochResult(epoch=state.epoch, metrics=metrics, state=state)


def _vocab_size(cfg: RunConfig, data: SFTData) -> int:
    return cfg.model.vocab_size if cfg.model.vocab_size is not None else data.vocab_size
