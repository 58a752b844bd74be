"""The training state: built fresh (:func:`init_state`), checkpointed atomically, restored exactly.

Layout of one checkpoint folder::

    model.pth        fp16 state dict with MiniMind keys (what upstream MiniMind scripts load)
    train_state.pt   fp32 weights, optimizer, scaler, epoch/step, RNG -- enough to resume exactly
    meta.json        config, metrics of that epoch, tokenizer fingerprint, versions

:func:`checkpoint_problem` is the one rule for whether a checkpoint folder can be used (its weights) or
continued from (its resume state too): the study's listing, the driver's resume message and the trainable
that resumes all ask it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from .config import MODEL_FILE, RunConfig, run_config_to_dict, weights_file
from .model import GenerationMismatchError, MiniMindForCausalLM, build_model, check_generation

if TYPE_CHECKING:
    from .model3 import MiniMind3ForCausalLM

__all__ = ["META_FILE", "MODEL_FILE", "STATE_FILE", "TrainState", "WeightMismatchError", "checkpoint_problem",
           "drop_resume_state", "init_state", "load_minimind_weights", "load_train_state", "model_from_checkpoint", "read_meta",
           "save_checkpoint"]

STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
# What a killed writer of a checkpoint leaves ends so (hidden, never read), as tune.atomic.leftovers finds.
_PARTIAL = ".tmp"


class WeightMismatchError(RuntimeError):
    """A weights file does not fit the model; the message lists every offending key."""


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)


def _amp_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name == "float16" and device.type != "cuda":
        raise ValueError("train.dtype='float16' needs CUDA (use float32 or bfloat16 on CPU)")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def init_state(cfg: RunConfig, vocab_size: int, device: torch.device | None = None) -> TrainState:
    """Fresh model of ``model.family`` (with ``model.init_from``'s weights, loaded strictly), AdamW
    and scaler, on ``device`` (None: ``train.device``)."""
    t = cfg.train
    device = device or _device(t.device)
    amp_dtype = _amp_dtype(t.dtype, device)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, vocab_size)
    if cfg.model.init_from:
        load_minimind_weights(model, cfg.model.init_from)
    model.to(device)
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


def load_minimind_weights(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a MiniMind ``.pth`` (or a checkpoint folder's) strictly; any missing, unexpected or
    wrong-shape key is an error, and a file of the other MiniMind generation is refused saying which
    generation it is."""
    path = weights_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path} (expected a MiniMind .pth file, or a "
                                f"checkpoint folder holding {MODEL_FILE})")
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


def save_checkpoint(directory: str | os.PathLike[str], state: TrainState, cfg: RunConfig,
                    metrics: Mapping[str, float] | None = None, meta: Mapping[str, Any] | None = None, *,
                    resume_state: bool = True) -> Path:
    """Write a checkpoint folder atomically: readers see the old folder or the new one, never half."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=_PARTIAL, dir=directory.parent))
    try:
        # The fp16 weights as upstream MiniMind saves them: {k: v.half()} on CPU.
        _save({k: v.detach().half().cpu() for k, v in state.model.state_dict().items()}, tmp / MODEL_FILE)
        if resume_state:
            rng: dict[str, Any] = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            _save({
                "model": {k: v.detach().float().cpu() for k, v in state.model.state_dict().items()},
                "optimizer": state.optimizer.state_dict(),
                "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                "epoch": state.epoch, "step": state.step, "first_loss": state.first_loss, "rng": rng,
            }, tmp / STATE_FILE)
        info = {"config": run_config_to_dict(cfg), "epoch": state.epoch, "step": state.step,
                "metrics": dict(metrics or {}), "versions": {"torch": torch.__version__}, **dict(meta or {})}
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
        # A folder published by renames of its own (the trainer never imports tune, whose tune.atomic does
        # this for files): the old folder moves aside first, as a rename cannot replace a non-empty one.
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}{_PARTIAL}")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _save(obj: object, path: Path) -> None:
    """torch.save into a file of ours: a full disk then fails as our write's OSError (ENOSPC), the kind callers
    classify (tune.interrupts.disk_full), not as the RuntimeError ('unexpected pos') PyTorch raises over it."""
    try:
        with path.open("wb") as fh:
            torch.save(obj, fh)
    except RuntimeError as exc:
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint folder (config, epoch, step, metrics, versions)."""
    return json.loads((Path(directory) / META_FILE).read_text(encoding="utf-8"))


def _archive_problem(fh: IO[bytes]) -> str | None:
    """Why an open file is not a whole torch archive (``torch.save``'s zip), or None. Reads only the
    zip's directory: a file cut short has lost it (it is written last), and every entry must lie within
    the file; damage inside an entry's bytes is found by loading it."""
    size = fh.seek(0, os.SEEK_END)
    if size == 0:
        return "is empty (0 bytes)"
    fh.seek(0)
    try:
        with zipfile.ZipFile(fh) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError):
        return f"is truncated or not a torch file ({size} bytes, no whole zip directory)"
    if not any(e.filename.endswith("/data.pkl") for e in entries):
        return "is not a torch file (a zip without data.pkl)"
    if any(e.header_offset + e.compress_size > size for e in entries):
        return f"is truncated ({size} bytes)"
    return None


def checkpoint_problem(folder: str | os.PathLike[str], *, resume: bool,
                       open_file: Callable[[str], IO[bytes]] | None = None) -> str | None:
    """Why the checkpoint ``folder`` cannot be used, or None: the one validity rule for checkpoints.

    Usable: ``meta.json`` is a JSON object naming its integer epoch, ``model.pth`` is a whole torch
    file, and so is ``train_state.pt`` where present (pruned from finished trials); continued from
    (``resume``) needs it present. Missing, empty, truncated and non-torch files are each named. ``open_file`` opens a path for seekable binary reading (a
    pyarrow filesystem's ``open_input_file`` for a bucket); default: the local filesystem.
    """
    def opened(name: str) -> IO[bytes]:
        return (open_file or (lambda p: open(p, "rb")))(f"{folder}/{name}")

    try:
        with opened(META_FILE) as fh:
            meta = json.loads(fh.read())
        int(meta["epoch"])
    except FileNotFoundError:
        return f"{META_FILE} is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{META_FILE} is unreadable or names no epoch ({type(exc).__name__}: {exc})"
    for name in (MODEL_FILE, STATE_FILE):
        try:
            with opened(name) as fh:
                problem = _archive_problem(fh)
        except FileNotFoundError:
            if name == STATE_FILE and not resume:
                continue  # (pruned at a study's end: the weights are still usable)
            problem = "is missing" + (" (no resume state)" if name == STATE_FILE else "")
        except OSError as exc:
            problem = f"cannot be read ({exc})"
        if problem is not None:
            return f"{name} {problem}"
    return None


def load_train_state(directory: str | os.PathLike[str], cfg: RunConfig, vocab_size: int,
                     device: torch.device | None = None) -> TrainState:
    """Rebuild the exact :class:`TrainState` saved in ``directory`` (fp32 weights, optimizer, RNG)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this checkpoint holds no resume state (only fp16 weights)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    # init_from is not loaded: the saved weights supersede it.
    state = init_state(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None)), vocab_size,
                       device)
    state.model.load_state_dict(saved["model"], strict=True)
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.scaler is not None and saved["scaler"] is not None:
        state.scaler.load_state_dict(saved["scaler"])
    state.epoch = int(saved["epoch"])
    state.step = int(saved["step"])
    state.first_loss = saved.get("first_loss")  # absent in checkpoints older than the divergence check
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return state


def drop_resume_state(directory: str | os.PathLike[str]) -> int:
    """Delete the resume state of a checkpoint, keeping its fp16 weights; returns bytes freed."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        return 0
    size = path.stat().st_size
    path.unlink()
    return size


def model_from_checkpoint(path: str | os.PathLike[str], cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    """An fp32 model of ``cfg.model.family`` with a checkpoint's fp16 weights, loaded strictly; ``path``
    is the checkpoint folder or its ``model.pth`` (the path a study prints)."""
    model = build_model(cfg.model, vocab_size)
    load_minimind_weights(model, path)
    return model
