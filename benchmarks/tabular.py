"""A tabular benchmark of real SFT curves: the builder (issue 23, item 1).

A *table* is a folder: ``table.json`` (what every curve shares: the model, the data split, the pretrained
base, the fixed training settings, the grid and the seeds) and ``curves/<key>.json``, one small file per
(grid config, training seed) with the validation loss at every evaluation (``train.evals_per_epoch``
of them per epoch) and its measured cost. ``benchmarks/simulate.py`` replays studies over it.

How a table is made, all with minimind_train's own trainer (:func:`minimind_train.train.train_epochs`):

* **Data, disjoint by construction.** The jsonl (``--data``) is cut by line index: lines ``>=
  --pretrain-from`` are pretraining text; the ``--val`` lines just before it are the fixed held-out
  validation split; the first ``--sft-train`` lines are the SFT training set. No line is in two parts.
* **A pretrained base, on plain text.** A short pretraining run of the benchmark model from scratch
  on the pretraining lines as *plain text*, outside the chat template: each line's messages joined by
  newlines, the documents joined by a blank line, tokenised without special tokens and packed into
  rows of ``max_seq_len`` tokens, the loss on every token (:func:`pretrain`: a plain causal-LM loop
  over minimind_train's own model, optimizer, schedule, loss and clipping). SFT from it has to learn
  the chat format (its headers, answering the user, ``<|im_end|>``), as real MiniMind SFT does. (A
  first build pretrained *in* the chat template on nearly the SFT data's own distribution, which left
  SFT almost nothing to do: benchmarks/README.md section 8.) Deterministic (one thread, fixed seed);
  its weights and its figures (:func:`reference_losses`: the uniform, unigram and base loss on the
  validation split) are cached outside git under ``--cache`` by the hash of everything they depend
  on, and rebuilt when absent.
* **SFT curves.** From that base, for every grid config and training seed; a curve is written (temp
  file + rename) only when complete, so an interrupted build resumes where it stopped. A diverged run
  (:class:`~minimind_train.train.TrainingDiverged`) is a complete curve marked ``diverged``. The
  probe configs come first (:func:`probe_configs`: the lowest, middle and highest learning rate), so
  the first curves of a build say whether the table can rank strategies before the rest is paid for.

``python benchmarks/tabular.py --help`` lists the flags; benchmarks/README.md section 8 gives the command
that built the committed table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any folder
    sys.path.insert(0, str(REPO))

import numpy as np
import torch

from minimind_train.chat import IGNORE_INDEX, tokenize
from minimind_train.checkpoint import TrainState, init_state
from minimind_train.config import ModelConfig, RunConfig, run_config_to_dict
from minimind_train.data import SFTData, prepare_data
from minimind_train.tokenizer import load_tokenizer
from minimind_train.train import (
    StepInfo,
    TrainingDiverged,
    backward_window,
    check_divergence,
    clip_grad_norm,
    evaluate,
    lr_at,
    train_epochs,
)
from tune.atomic import write_atomic

__all__ = ["GRIDS", "TableSpec", "build", "curve_key", "grid_configs", "load_table", "main", "pack_plain_text",
           "plain_text", "pretrain", "probe_configs", "reference_losses", "split_data"]

log = logging.getLogger("tabular")

SHARED = REPO.parent / "shared"
# The searched values of the shipped spaces (sft.yaml, minimind2_sft.yaml) on a grid: 6 x 2 x 2 x 2 = 48
# configs. The learning rate spans 3 decades in steps of 10^0.6 (4x), so both ends are clearly bad for
# fine-tuning this model (1e-5 barely moves it in one epoch; 1e-2 undoes its pretraining).
GRIDS: dict[str, dict[str, list[Any]]] = {
    "default": {"train.learning_rate": [1e-5, 3.98e-5, 1.58e-4, 6.31e-4, 2.51e-3, 1e-2],
                "train.accumulation_steps": [1, 4],
                "train.grad_clip": [0.5, 2.0],
                "train.min_lr_ratio": [0.0, 0.5]},
    # For the test: a few configs.
    "tiny": {"train.learning_rate": [1e-4, 3e-3, 3e-2], "train.accumulation_steps": [1],
             "train.grad_clip": [1.0], "train.min_lr_ratio": [0.1]},
}


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """Everything a table's curves share (``table.json``); its hash is part of every curve's key."""

    data: str
    tokenizer: str
    pretrain_from: int
    sft_train: int
    val: int
    max_seq_len: int
    hidden_size: int
    num_hidden_layers: int
    pretrain_epochs: int
    pretrain_lr: float
    epochs: int
    evals_per_epoch: int
    batch_size: int
    warmup_steps: int
    seeds: list[int]
    grid: dict[str, list[Any]]

    def digest(self) -> str:
        """The hash of the spec without file paths, plus the data file's and tokenizer's content."""
        raw = dataclasses.asdict(self) | {"data": _sha256(Path(self.data)),
                                          "tokenizer": _sha256(Path(self.tokenizer) / "tokenizer.json")}
        return _hash(raw)


def _hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def grid_configs(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the grid's order."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def curve_key(spec_digest: str, config: Mapping[str, Any], seed: int) -> str:
    """A curve's file name: the hash of its table, its config's values and its training seed."""
    return _hash({"table": spec_digest, "config": dict(config), "seed": seed})


def plain_text(line: str) -> str:
    """One jsonl conversation as plain text: its messages' contents joined by newlines (no roles)."""
    return "\n".join(str(t["content"]) for t in json.loads(line)["conversations"] if t.get("content"))


def split_data(spec: TableSpec, folder: Path) -> dict[str, Path]:
    """Cut ``spec.data`` into pretrain / SFT-train / val jsonl files under ``folder`` (disjoint by line
    index: see the module docstring; the pretraining lines as ``{"text": ...}``); returns their paths."""
    lines = Path(spec.data).read_text(encoding="utf-8").splitlines()
    first_val = spec.pretrain_from - spec.val
    if not 0 < spec.sft_train <= first_val < spec.pretrain_from < len(lines):
        raise ValueError(f"cannot cut {len(lines)} lines into sft_train {spec.sft_train}, val {spec.val} "
                         f"before line {spec.pretrain_from}, pretraining after it")
    parts = {"pretrain": [json.dumps({"text": plain_text(ln)}, ensure_ascii=False) for ln in lines[spec.pretrain_from:]],
             "sft_train": lines[:spec.sft_train], "val": lines[first_val:spec.pretrain_from]}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in parts.items():
        paths[name] = folder / f"{name}.jsonl"
        if not paths[name].exists():
            write_atomic(paths[name], "\n".join(rows) + "\n")
    return paths


def _run_config(spec: TableSpec, train_path: Path, val_path: Path, cache: Path, threads: int, device: str,
                **train: Any) -> RunConfig:
    """The benchmark model (MiniMind2's shape, ``hidden_size`` x ``num_hidden_layers``) on ``device``
    (fp32 on a CPU, the trainer's ``auto`` precision on a GPU)."""
    model = ModelConfig(hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=spec.max_seq_len)
    return RunConfig().with_overrides({
        **{f"model.{k}": v for k, v in run_config_to_dict(RunConfig(model=model))["model"].items()},
        "data.train_path": str(train_path), "data.val_path": str(val_path), "data.tokenizer": spec.tokenizer,
        "data.max_seq_len": spec.max_seq_len, "data.cache_dir": str(cache / "tokens"),
        "train.batch_size": spec.batch_size, "train.warmup_steps": spec.warmup_steps, "train.device": device,
        "train.dtype": "float32" if device == "cpu" else "auto", "train.num_threads": threads, "train.eval_batch_size": 64,
        **{f"train.{k}": v for k, v in train.items()}})


def pack_plain_text(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """``texts`` as one token stream (each followed by a blank line; no special tokens added) cut into
    rows of ``seq_len`` tokens (the tail that fills no row is dropped): a LongTensor (rows, seq_len)."""
    ids = tokenize(tokenizer, [t + "\n\n" for t in texts])
    stream = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
    rows = len(stream) // seq_len
    return torch.from_numpy(stream[:rows * seq_len].reshape(rows, seq_len))


def pretrain(cfg: RunConfig, rows: torch.Tensor, vocab_size: int, *,
             on_step: Callable[[StepInfo], None] | None = None) -> TrainState:
    """Causal-LM pretraining of a fresh ``cfg.model`` on ``rows`` (N, T), every token a target:
    ``train.epochs`` passes, each in an order seeded by ``(train.seed, epoch)``, batches of
    ``train.batch_size`` rows (the short last one dropped), with the SFT loop's schedule, loss,
    clipping and divergence check (:mod:`minimind_train.train`). The SFT trainer cannot do this itself:
    it trains on chat-template assistant tokens only."""
    t = cfg.train
    state = init_state(cfg, vocab_size)
    per_epoch = len(rows) // t.batch_size
    if per_epoch < 1:
        raise ValueError(f"{len(rows)} rows of pretraining text make no batch of {t.batch_size}")
    total = per_epoch * t.epochs
    params = [p for p in state.model.parameters() if p.requires_grad]
    clip = t.grad_clip if t.grad_clip > 0 else math.inf
    state.model.train()
    for epoch in range(t.epochs):
        order = torch.from_numpy(np.random.default_rng([t.seed, epoch]).permutation(len(rows)))
        for i in range(per_epoch):
            batch = rows[order[i * t.batch_size:(i + 1) * t.batch_size]]
            lr = lr_at(state.step, total, t.learning_rate, t.min_lr_ratio, t.warmup_steps)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            ce, _, n = backward_window(state, [(batch, batch)])  # labels = inputs: every next token counts
            norm = float(clip_grad_norm(params, clip))
            loss = float(ce) / n
            check_divergence(t, state.first_loss, loss, norm, epoch + 1, state.step)
            if state.first_loss is None:
                state.first_loss = loss
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if on_step is not None:
                on_step(StepInfo(epoch + 1, state.step, i + 1, per_epoch, loss, lr, norm))
        state.epoch += 1
    return state


def reference_losses(state: TrainState, rows: torch.Tensor, data: SFTData, eval_batch_size: int) -> dict[str, float]:
    """What SFT starts from and what the base must beat, on the validation split as the SFT trainer
    scores it (mean CE over its supervised tokens, nats): the uniform predictor (ln vocabulary), a
    unigram model fit on the pretraining ``rows`` (add-one smoothed), a unigram model fit on the
    validation targets themselves (no unigram model scores lower) and the base (``state``'s model)."""
    targets = torch.cat([data.val.batch([i], data.pad_id)[1][0, 1:] for i in range(len(data.val))])
    targets = targets[targets != IGNORE_INDEX]

    def unigram(counts: torch.Tensor, smooth: float) -> float:
        counts = counts.double() + smooth
        return float(-(counts / counts.sum()).log()[targets].mean())

    return {"uniform": math.log(data.vocab_size),
            "unigram_pretraining_text": unigram(torch.bincount(rows.reshape(-1), minlength=data.vocab_size), 1.0),
            "unigram_val_itself": unigram(torch.bincount(targets, minlength=data.vocab_size), 0.0),
            "base": evaluate(state, data.val, eval_batch_size, data.pad_id)}


def pretrained_base(spec: TableSpec, paths: Mapping[str, Path], cache: Path, threads: int, device: str,
                    data: SFTData) -> tuple[Path, str, dict[str, Any]]:
    """The base checkpoint (built once, cached by its hash), that hash, and its figures (what the
    pretraining cost, :func:`reference_losses`), cached beside it as ``base-<hash>.json``."""
    cfg = _run_config(spec, paths["pretrain"], paths["val"], cache, threads, device, epochs=spec.pretrain_epochs,
                      learning_rate=spec.pretrain_lr, min_lr_ratio=0.1, seed=0, grad_clip=1.0)
    digest = _hash({"format": "plain text rows, loss on every token",
                    "config": {k: v for k, v in run_config_to_dict(cfg).items() if k != "data"},
                    "data": _sha256(paths["pretrain"]), "tokenizer": _sha256(Path(spec.tokenizer) / "tokenizer.json"),
                    "max_seq_len": spec.max_seq_len, "torch": torch.__version__})
    path, figures_file = cache / f"base-{digest}.pth", cache / f"base-{digest}.json"
    if path.exists() and figures_file.exists():
        return path, digest, json.loads(figures_file.read_text())
    texts = [json.loads(line)["text"] for line in paths["pretrain"].read_text(encoding="utf-8").splitlines()]
    rows = pack_plain_text(load_tokenizer(spec.tokenizer), texts, spec.max_seq_len)
    log.info("pretraining the base %s: %d rows of %d tokens from %s", path.name, len(rows), spec.max_seq_len,
             paths["pretrain"])
    start, cpu_start = time.perf_counter(), time.process_time()
    last: list[float] = []

    def progress(info: StepInfo) -> None:
        last.append(info.loss)
        if info.step_in_epoch % 25 == 0 or info.step_in_epoch == info.steps_in_epoch:
            log.info("pretrain epoch %d step %d/%d loss %.4f lr %.3g (%.0f CPU s)", info.epoch, info.step_in_epoch,
                     info.steps_in_epoch, info.loss, info.lr, time.process_time() - cpu_start)

    state = pretrain(cfg, rows, data.vocab_size, on_step=progress)
    cost = {"cpu_seconds": round(time.process_time() - cpu_start, 1), "seconds": round(time.perf_counter() - start, 1)}
    figures = {"texts": len(texts), "rows": len(rows), "seq_len": spec.max_seq_len, "steps": state.step,
               "tokens": state.step * cfg.train.batch_size * spec.max_seq_len, **cost,
               "train_loss_first": last[0], "train_loss_last_25": float(np.mean(last[-25:])),
               "val_loss": reference_losses(state, rows, data, cfg.train.eval_batch_size)}
    log.info("base: %s", figures)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state.model.state_dict(), tmp)
    os.replace(tmp, path)
    write_atomic(figures_file, json.dumps(figures, indent=1) + "\n")
    return path, digest, figures


def _machine(threads: int, device: str) -> dict[str, Any]:
    gpu = {"gpu": torch.cuda.get_device_name()} if device == "cuda" else {}
    return {"node": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": threads, **gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def train_curve(cfg: RunConfig, data: SFTData) -> dict[str, Any]:
    """One SFT run's curve: per evaluation its optimizer step, tokens trained, val and train loss, and
    cumulative seconds (and CPU seconds on a CPU: what a run costs whatever else ran meanwhile); the
    run's cost; ``status`` completed or diverged."""
    on_cpu = cfg.train.device == "cpu"
    points: list[dict[str, Any]] = []
    tokens = seconds = 0.0
    baseline = None
    start, cpu_start = time.perf_counter(), time.process_time()
    status, reason = "completed", None
    try:
        for result in train_epochs(cfg, data):
            m = result.metrics
            baseline = m.get("baseline_val_loss", baseline)
            tokens += m["tokens_per_s"] * m["epoch_seconds"]
            seconds += m["epoch_seconds"] + m["val_seconds"]
            cpu = {"cpu_seconds": round(time.process_time() - cpu_start, 3)} if on_cpu else {}
            points.append({"evaluation": result.evaluation, "epoch": result.epoch, "step": result.optimizer_steps,
                           "tokens": round(tokens), "seconds": round(seconds, 3), **cpu, "val_loss": m["val_loss"],
                           "train_loss": m["train_loss"], "lr": m["lr"]})
    except TrainingDiverged as exc:
        status, reason = "diverged", str(exc)
    return {"status": status, "diverged_reason": reason, "baseline_val_loss": baseline, "evaluations": points,
            "cost": {"seconds": round(time.perf_counter() - start, 3),
                     **({"cpu_seconds": round(time.process_time() - cpu_start, 3)} if on_cpu else {}),
                     "tokens": round(tokens),
                     "steps": points[-1]["step"] if points else 0}}


def load_table(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A table's ``table.json`` and its finished curves."""
    spec = json.loads((folder / "table.json").read_text())
    curves = [json.loads(p.read_text()) for p in sorted((folder / "curves").glob("*.json"))]
    return spec, curves


def probe_configs(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The grid's lowest, middle and highest learning rate, each with the other values that move the
    base most in one epoch (the smallest accumulation: the most steps; the largest clipping threshold and
    min-LR ratio): the build's first curves. The low one is the config most likely to pass for good by
    barely training; the high one should be clearly bad; the middle one estimates the gap SFT closes."""
    lrs = sorted(grid["train.learning_rate"])
    most = {n: min(v) if n == "train.accumulation_steps" else max(v) for n, v in grid.items()}
    probes = [most | {"train.learning_rate": lr} for lr in (lrs[0], lrs[len(lrs) // 2], lrs[-1])]
    return [dict(zip(grid, (p[n] for n in grid))) for i, p in enumerate(probes) if p not in probes[:i]]


def _order(configs: list[dict[str, Any]], seeds: Sequence[int],
           first: Sequence[dict[str, Any]] = ()) -> Iterator[tuple[dict[str, Any], int]]:
    """``first``, then the other configs in a fixed shuffled order (a partial table covers the grid
    evenly), each with every seed."""
    order = list(range(len(configs)))
    random.Random(0).shuffle(order)
    head = [configs.index(c) for c in first]
    for i in head + [i for i in order if i not in head]:
        for seed in seeds:
            yield configs[i], seed


def build(spec: TableSpec, out: Path, cache: Path, *, threads: int = 1, device: str = "cpu", limit: int = 0,
          command: str = "", shard: tuple[int, int] = (0, 1)) -> int:
    """Build (or continue) the table at ``out``; returns the number of curves trained now. ``limit``: stop
    after that many (0: all). ``shard`` ``(i, n)``: train only the curves whose place in the build order is i
    modulo n, so n processes (one per core) build one table without training a curve twice."""
    digest = spec.digest()
    (out / "curves").mkdir(parents=True, exist_ok=True)
    table_file = out / "table.json"
    if table_file.exists() and json.loads(table_file.read_text())["digest"] != digest:
        raise SystemExit(f"{table_file} was built with another spec; use another --out")
    torch.set_num_threads(threads)
    paths = split_data(spec, cache / f"split-{digest}")
    template = _run_config(spec, paths["sft_train"], paths["val"], cache, threads, device, epochs=spec.epochs,
                           evals_per_epoch=spec.evals_per_epoch)
    data = prepare_data(template.data)
    base, base_digest, base_figures = pretrained_base(spec, paths, cache, threads, device, data)
    template = template.with_overrides({"model.init_from": str(base)})
    rel = {k: str(Path(v).resolve().relative_to(REPO)) if Path(v).resolve().is_relative_to(REPO) else str(v)
           for k, v in (("data", spec.data), ("tokenizer", spec.tokenizer))}
    write_atomic(table_file, json.dumps({"digest": digest, "base": base_digest, "base_figures": base_figures,
                                         "spec": dataclasses.asdict(spec) | rel, "command": command,
                                         "machine": _machine(threads, device)}, indent=1) + "\n")
    configs = grid_configs(spec.grid)
    trained = 0
    for k, (config, seed) in enumerate(_order(configs, spec.seeds, probe_configs(spec.grid))):
        if k % shard[1] != shard[0]:
            continue
        path = out / "curves" / f"{curve_key(digest, config, seed)}.json"
        if path.exists():
            continue
        curve = train_curve(template.with_overrides({**config, "train.seed": seed}), data)
        entry = {"config": config, "seed": seed, **curve, "table": digest, "base": base_digest,
                 "machine": _machine(threads, device), "command": command}
        write_atomic(path, json.dumps(entry, indent=1) + "\n")
        trained += 1
        done = len(list((out / "curves").glob("*.json")))
        log.info("curve %s %s seed %d: %s, final val_loss %s, %.0f s, %.0f CPU s (%d curves of %d)", path.stem,
                 config, seed, curve["status"], curve["evaluations"][-1]["val_loss"] if curve["evaluations"] else None,
                 curve["cost"]["seconds"], curve["cost"].get("cpu_seconds", 0), done, len(configs) * len(spec.seeds))
        if limit and trained >= limit:
            break
    return trained


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED / "data" / "alpaca_zh_20k.jsonl"))
    p.add_argument("--tokenizer", default=str(SHARED / "fixtures" / "minimind2"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "tables" / "alpaca_zh_plain"))
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "minimind-tune" / "tabular"),
                   help="the split files, token caches and base checkpoint (outside git)")
    p.add_argument("--pretrain-from", type=int, default=4160)
    p.add_argument("--sft-train", type=int, default=4000)
    p.add_argument("--val", type=int, default=160)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pretrain-epochs", type=int, default=1)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--evals-per-epoch", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--seeds", type=int, default=2, help="training seeds 1..N")
    p.add_argument("--grid", choices=sorted(GRIDS), default="default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: a GPU table (e.g. --hidden-size 512 --layers 8 for MiniMind2 26M)")
    p.add_argument("--limit", type=int, default=0, help="stop after this many new curves (0: all)")
    p.add_argument("--shard", default="0/1", help="I/N: this process trains every Nth curve from the Ith "
                   "(run N processes, I = 0..N-1, to use N cores)")
    a = p.parse_args(argv)
    i, n = (int(x) for x in a.shard.split("/"))
    if not 0 <= i < n:
        p.error(f"--shard {a.shard!r}: I/N with 0 <= I < N")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = TableSpec(data=str(Path(a.data).resolve()), tokenizer=str(Path(a.tokenizer).resolve()),
                     pretrain_from=a.pretrain_from, sft_train=a.sft_train, val=a.val, max_seq_len=a.max_seq_len,
                     hidden_size=a.hidden_size, num_hidden_layers=a.layers, pretrain_epochs=a.pretrain_epochs,
                     pretrain_lr=a.pretrain_lr, epochs=a.epochs, evals_per_epoch=a.evals_per_epoch,
                     batch_size=a.batch_size, warmup_steps=a.warmup_steps, seeds=list(range(1, a.seeds + 1)),
                     grid=GRIDS[a.grid])
    command = "python benchmarks/tabular.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    build(spec, Path(a.out), Path(a.cache), threads=a.threads, device=a.device, limit=a.limit, command=command, shard=(i, n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
