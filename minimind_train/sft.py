"""``python -m minimind_train.sft --config FILE.yaml``: one SFT run, no Ray.

The config has sections ``model``, ``data`` and ``train`` (the schema the tuner uses, so a study's
``best.yaml`` runs here unchanged). A bare name such as ``sft_demo.yaml`` resolves to the bundled
example. Each evaluation (``train.evals_per_epoch`` per epoch) prints a line and writes ``<output>/last``
(resumable, mid-epoch too) and, when validation improves, ``<output>/best``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .checkpoint import META_FILE, init_state, load_train_state, read_meta, save_checkpoint
from .config import ConfigError, load_run_config
from .data import DataError, prepare_data
from .model import count_parameters
from .tokenizer import load_tokenizer, tokenizer_fingerprint
from .train import StepInfo, TrainingDiverged, train_epochs

__all__ = ["main", "resolve_config_path"]

ASSETS = Path(__file__).resolve().parent / "assets"


def resolve_config_path(name: str) -> Path:
    """A path as given, else a bundled example of that name (``sft_demo.yaml`` or ``sft_demo``)."""
    path = Path(name)
    if path.exists():
        return path
    for candidate in (ASSETS / name, ASSETS / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    bundled = sorted(p.name for p in ASSETS.glob("*.yaml"))
    raise FileNotFoundError(f"--config {name}: no such file, and no bundled example of that name "
                            f"(bundled: {', '.join(bundled)})")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minimind_train.sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (sections model, data, train)")
    p.add_argument("--output", default=None, help="checkpoint folder (default: runs/sft-<time>)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/last instead of starting fresh")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The per-epoch line below replaces the library's own epoch log.
    logging.getLogger("minimind_train.train").setLevel(logging.WARNING)
    try:
        cfg = load_run_config(resolve_config_path(args.config))
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        data = prepare_data(cfg.data, tokenizer)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = Path(args.output or f"runs/sft-{time.strftime('%Y%m%d-%H%M%S')}")
    vocab = len(tokenizer)
    if args.resume:
        state = load_train_state(output / "last", cfg, vocab)
        print(f"resumed from {output / 'last'} after epoch {state.epoch}, optimizer step {state.step}")
    else:
        if (output / "last").exists():
            print(f"error: {output} already holds a run; pass --resume or another --output", file=sys.stderr)
            return 2
        state = init_state(cfg, vocab)
    print(f"model: {count_parameters(state.model):,} parameters on {state.device} ({state.amp_dtype}); "
          f"data: {len(data.train):,} train / {len(data.val):,} val samples")

    # The step bar only on a terminal (in a log file its redraws would be thousands of lines); the
    # per-evaluation lines below say the same in a pipe.
    bar = None if args.quiet or not sys.stderr.isatty() else tqdm(unit="step", dynamic_ncols=True, file=sys.stderr)

    def on_step(info: StepInfo) -> None:
        if bar is None:
            return
        bar.total = info.steps_in_epoch
        bar.set_description(f"epoch {info.epoch}")
        bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
        bar.update(info.step_in_epoch - bar.n)

    # A resumed run keeps the best evaluation it already has unless a new one beats it.
    resumed_best = args.resume and (output / "best" / META_FILE).is_file()
    best = read_meta(output / "best")["metrics"]["val_loss"] if resumed_best else math.inf
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "data": data.stats_dict()}
    try:
        for result in train_epochs(cfg, data, state, on_step=on_step):
            if bar is not None and result.epoch_end:
                bar.reset()
            m = result.metrics
            if "baseline_val_loss" in m:  # (a fresh run's first epoch: what it must beat to have learned)
                print(f"before training: val_loss {m['baseline_val_loss']:.4f} (the uniform predictor: "
                      f"{m['uniform_loss']:.4f})", flush=True)
            save_checkpoint(output / "last", result.state, cfg, m, meta)
            marker = ""
            if m["val_loss"] < best:
                best = m["val_loss"]
                save_checkpoint(output / "best", result.state, cfg, m, meta, resume_state=False)
                marker = " *"
            # Inside an epoch: where (its training metrics cover the steps since the previous line).
            where = "" if result.epoch_end else f" step {result.step_in_epoch}/{result.steps_in_epoch}"
            print(f"epoch {result.epoch}/{cfg.train.epochs}{where}  train_loss {m['train_loss']:.4f}  "
                  f"val_loss {m['val_loss']:.4f}{marker}  lr {m['lr']:.2e}  "
                  f"grad_norm {m['grad_norm']:.3f}  {m['supervised_tokens_per_s']:,.0f} sup tok/s  "
                  f"{m['epoch_seconds']:.1f}s", flush=True)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        if bar is not None:
            bar.close()
    print(f"best val_loss {best:.4f}; fp16 weights: {output / 'best' / 'model.pth'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
