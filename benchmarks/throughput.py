"""Supervised tokens/s of this project's trainer vs a seed-style SFT loop, side by side, one run.

    python benchmarks/throughput.py [--data FILE] [--tokenizer DIR] [--seconds 30] [--batches 2,16,32,64] [--rounds 1]

Both loops train the same model (MiniMind2 hidden 512 x 2 layers, 8.9M parameters) on the same data
with the same tokenizer and ``max_seq_len`` on this machine, in this process, their steps interleaved:

* seed-style: the tutorial notebook's data path -- every sample padded to ``max_seq_len``, the loss
  mask found by its per-sample Python scan, tokenised on the fly by a DataLoader, logits for every
  position, foreach AdamW (its double shift and double division are NOT reproduced: they change
  numbers, not cost); always at the seed's batch size (2);
* project: ``minimind_train.train.train_epochs`` on the token cache with length-grouped batches, at
  each batch size of ``--batches`` (batch 2 is the like-for-like row).

The seed loop's steps are interleaved with the project's (after each optimizer step of the trainer the
seed loop runs until its own time has caught up), so both see the same load on a shared machine and
their ratio holds even when the absolute rates move. After each step the matmul peak is probed (one
2048^3 GEMM, its time excluded), and each loop's FLOP/s is reported as a share of the median probe of
its window. ``--rounds N`` repeats every batch size N times and reports the median round.

* useful FLOPs: what the objective needs, counted from the samples the loop processed -- the body's
  matmuls (6 x body matmul parameters) on every real token, the tied LM head (6 x vocab x hidden) at
  every position whose next token is supervised, causal attention 6 x hidden x layers x T(T+1) per
  sample of T tokens. Padding and head rows whose logits get no gradient are not useful.
* executed FLOPs: what the loop actually computes (padding, the head at every position for the seed).

Defaults use ``../shared/data/alpaca_zh_demo.jsonl`` and the MiniMind2 tokenizer when present, else the
bundled demo data and tokenizer (the printed header says which). ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from any folder
    sys.path.insert(0, str(REPO))

from minimind_train.batches import batch_indices
from minimind_train.chat import IGNORE_INDEX
from minimind_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from minimind_train.data import SFTData, prepare_data
from minimind_train.model import MiniMindForCausalLM, count_parameters, model_config_from
from minimind_train.tokenizer import load_tokenizer
from minimind_train.train import init_state, train_epochs

SHARED = REPO.parent / "shared"
MODEL = ModelConfig(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"{dt.datetime.now().isoformat(timespec='minutes')}")


class PeakProbe:
    """One fp32 GEMM after each training step: the cores' matmul rate while the loop ran."""

    def __init__(self, n: int = 2048, dtype: torch.dtype = torch.float32) -> None:
        self.a, self.b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        self.flops = 2 * n**3
        self.rates: list[float] = []
        self.seconds = 0.0
        self.a @ self.b  # warm-up

    def __call__(self, *_: object) -> None:
        t = time.perf_counter()
        self.a @ self.b
        dt = time.perf_counter() - t
        self.seconds += dt
        self.rates.append(self.flops / dt / 1e9)

    def reset(self) -> None:
        self.rates.clear()
        self.seconds = 0.0

    @property
    def gflops(self) -> float:
        return float(np.median(self.rates)) if self.rates else math.nan


def matmul_peak_gflops(n: int = 2048, repeats: int = 6) -> float:
    """Best fp32 GEMM rate of this process's threads: the ceiling any trainer here can reach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Training FLOPs (forward + backward = 3 x forward) of the model's parts."""

    body_matmul_params: int  # q/k/v/o and the MLPs of every layer
    head_params: int  # vocab x hidden (tied with the embedding, whose lookup costs no FLOPs)
    hidden: int
    layers: int

    @classmethod
    def of(cls, model: MiniMindForCausalLM) -> FlopModel:
        body = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.dim() == 2)
        cfg = model.config
        return cls(body, model.lm_head.weight.numel(), cfg.hidden_size, cfg.num_hidden_layers)

    def body(self, tokens: float) -> float:
        return 6.0 * self.body_matmul_params * tokens

    def head(self, rows: float) -> float:
        return 6.0 * self.head_params * rows

    def attention(self, lengths: np.ndarray) -> float:
        """Causal QK^T and AV of samples of these lengths, each attending to itself and earlier."""
        lengths = np.asarray(lengths, dtype=np.float64)
        return 6.0 * self.hidden * self.layers * float((lengths * (lengths + 1)).sum())

    def useful(self, lengths: np.ndarray, supervised: float) -> float:
        return self.body(float(np.sum(lengths))) + self.attention(lengths) + self.head(supervised)


# ---------------------------------------------------------------------------------------------------
# Seed-style loop.


class SeedStyleDataset(torch.utils.data.Dataset):
    """The seed notebook's SFTDataset data path: render, tokenise, pad to max_length, scan for the mask."""

    def __init__(self, path: Path, tokenizer, max_length: int) -> None:
        self.samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos_id = tokenizer("<|im_start|>assistant", add_special_tokens=False).input_ids
        self.eos_id = tokenizer("<|im_end|>", add_special_tokens=False).input_ids

    def __len__(self) -> int:
        return len(self.samples)

    def _generate_loss_mask(self, input_ids: list[int]) -> list[int]:
        loss_mask = [0] * len(input_ids)
        i = 0
        while i < len(input_ids):
            if input_ids[i:i + len(self.bos_id)] == self.bos_id:
                start = i + len(self.bos_id)
                end = start
                while end < len(input_ids):
                    if input_ids[end:end + len(self.eos_id)] == self.eos_id:
                        break
                    end += 1
                for j in range(start + 1, min(end + len(self.eos_id) + 1, self.max_length)):
                    loss_mask[j] = 1
                i = end + len(self.eos_id) if end < len(input_ids) else len(input_ids)
            else:
                i += 1
        return loss_mask

    def __getitem__(self, index: int):
        messages = [{"role": m["role"], "content": m["content"]} for m in self.samples[index]["conversations"]]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        input_ids = self.tokenizer(prompt).input_ids[:self.max_length]
        real = len(input_ids)
        input_ids += [self.tokenizer.pad_token_id] * (self.max_length - len(input_ids))
        loss_mask = self._generate_loss_mask(input_ids)
        x = torch.tensor(input_ids[:-1], dtype=torch.long)
        y = torch.tensor(input_ids[1:], dtype=torch.long)
        mask = torch.tensor(loss_mask[1:], dtype=torch.long)
        return x, y, mask, min(real, self.max_length - 1)


class SeedLoop:
    """The seed-style loop, one step at a time, so its steps can be interleaved with the project's."""

    def __init__(self, path: Path, tokenizer, max_len: int, batch: int, seed: int, flops: FlopModel,
                 probe: PeakProbe) -> None:
        torch.manual_seed(seed)
        self.model = MiniMindForCausalLM(model_config_from(MODEL, len(tokenizer)))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=5e-4)  # foreach, as the seed has it
        self.loader = torch.utils.data.DataLoader(SeedStyleDataset(path, tokenizer, max_len),
                                                  batch_size=batch, shuffle=True, num_workers=0)
        self.batches = iter(self.loader)
        self.max_len, self.batch, self.flops, self.probe = max_len, batch, flops, probe
        self.sup = self.steps = 0
        self.seconds = 0.0
        self.lengths: list[int] = []
        self.rates: list[float] = []
        for _ in range(2):  # warm-up, not timed
            self._train_step(self._next())

    def _next(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def _train_step(self, batch) -> None:
        x, y, mask, _ = batch
        logits = self.model(input_ids=x).logits
        raw = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        m = mask.reshape(-1).float()
        loss = (raw * m).sum() / (m.sum() + 1e-8)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One timed step (data loading included, as in the seed), then one peak probe."""
        t = time.perf_counter()
        batch = self._next()
        self._train_step(batch)
        self.seconds += time.perf_counter() - t
        _, _, mask, n_real = batch
        self.sup += int(mask.sum())
        self.lengths += n_real.tolist()
        self.steps += 1
        before = len(self.probe.rates)
        self.probe()
        self.rates += self.probe.rates[before:]

    def result(self) -> dict:
        elapsed = self.seconds
        computed = self.steps * self.batch * (self.max_len - 1)
        executed = (self.flops.body(computed) + self.flops.head(computed)
                    + self.flops.attention(np.full(self.steps * self.batch, self.max_len - 1)))
        peak = float(np.median(self.rates))
        return {"loop": "seed-style", "batch": self.batch, "steps": self.steps, "seconds": elapsed,
                "supervised_tokens_per_s": self.sup / elapsed, "real_tokens_per_s": sum(self.lengths) / elapsed,
                "useful_gflops": self.flops.useful(np.asarray(self.lengths), self.sup) / elapsed / 1e9,
                "executed_gflops": executed / elapsed / 1e9, "peak_gflops": peak}


# ---------------------------------------------------------------------------------------------------
# The project's trainer.


def project_config(data_cfg: DataConfig, batch: int, steps: int, seed: int, dtype: str = "float32") -> RunConfig:
    return RunConfig(model=MODEL, data=data_cfg, train=TrainConfig(
        epochs=1, batch_size=batch, device="cpu", dtype=dtype, seed=seed, max_steps_per_epoch=steps,
        eval_batch_size=32))


def run_pair(data: SFTData, data_cfg: DataConfig, batch: int, seconds: float, seed: int, flops: FlopModel,
             seed_loop: SeedLoop | None, dtype: str = "float32") -> tuple[dict, dict | None]:
    """``train_epochs`` at ``batch`` for about ``seconds``, the seed loop's steps interleaved with it.

    After each of the trainer's optimizer steps (its ``on_step`` callback) the matmul rate is probed and
    the seed loop runs steps until its own time catches up with the trainer's, so both loops see the
    same machine load; everything done inside the callback is taken out of the trainer's time.
    """
    # Warm up and calibrate a step budget that fits ``seconds``: a short epoch first.
    short = project_config(data_cfg, batch, 3, seed, dtype)
    m = next(train_epochs(short, data)).metrics
    steps = max(3, int(seconds / (m["epoch_seconds"] / 3)))
    cfg = project_config(data_cfg, batch, steps, seed, dtype)
    # Held against the GEMM peak of the dtype its matmuls run in (bf16 autocast: bf16 GEMMs).
    probe = PeakProbe(dtype=getattr(torch, dtype))
    seed_start = seed_loop.result() if seed_loop is not None and seed_loop.steps else None
    clock = {"outside": 0.0, "last": 0.0, "mine": 0.0}

    def interleave(_info) -> None:
        entered = time.perf_counter()
        clock["mine"] += entered - clock["last"]
        probe()
        while seed_loop is not None and seed_loop.seconds - (seed_start or {}).get("seconds", 0.0) < clock["mine"]:
            seed_loop.step()
        clock["last"] = time.perf_counter()
        clock["outside"] += clock["last"] - entered

    state = init_state(cfg, data.vocab_size)
    clock["last"] = time.perf_counter()
    m = next(train_epochs(cfg, data, state, on_step=interleave)).metrics
    elapsed = m["epoch_seconds"] - clock["outside"]
    # The batches that epoch ran: train_epochs draws epoch 0's order from (seed, 0).
    order = batch_indices(data.train.lengths, batch, seed=seed, epoch=0,
                          group_by_length=data_cfg.group_by_length)[:int(m["optimizer_steps"])]
    lengths, sup, executed = [], 0, 0.0
    for items in order:
        _, labels = data.train.batch(items, data.pad_id)
        n_sup = int((labels[:, 1:] != IGNORE_INDEX).sum())
        lens = data.train.lengths[np.asarray(items)]
        lengths.append(lens)
        sup += n_sup
        width = int(lens.max())
        executed += (flops.body(len(items) * width) + flops.attention(np.full(len(items), width))
                     + flops.head(n_sup))
    lengths_all = np.concatenate(lengths)
    peak = probe.gflops
    ours = {"loop": "project", "batch": batch, "dtype": dtype, "steps": len(order), "seconds": elapsed,
            "supervised_tokens_per_s": sup / elapsed, "real_tokens_per_s": float(lengths_all.sum()) / elapsed,
            "useful_gflops": flops.useful(lengths_all, sup) / elapsed / 1e9,
            "executed_gflops": executed / elapsed / 1e9, "peak_gflops": peak}
    theirs = None
    if seed_loop is not None:
        theirs = _since(seed_loop, seed_start)
    return _shares(ours), (_shares(theirs) if theirs else None)


def _since(loop: SeedLoop, before: dict | None) -> dict:
    """The seed loop's figures for its steps since ``before`` (a previous ``result()``)."""
    now = loop.result()
    if before is None:
        return now
    dt = now["seconds"] - before["seconds"]
    out = {**now, "steps": now["steps"] - before["steps"], "seconds": dt}
    for key in ("supervised_tokens_per_s", "real_tokens_per_s", "useful_gflops", "executed_gflops"):
        out[key] = (now[key] * now["seconds"] - before[key] * before["seconds"]) / dt
    return out


def _shares(r: dict) -> dict:
    return {**r, "useful_share": r["useful_gflops"] / r["peak_gflops"],
            "executed_share": r["executed_gflops"] / r["peak_gflops"]}


def median_round(rounds: list[dict]) -> dict:
    """The round with the median supervised tokens/s (its own figures, not a mix of rounds)."""
    ordered = sorted(rounds, key=lambda r: r["supervised_tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds": [r["supervised_tokens_per_s"] for r in rounds]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_data = SHARED / "data" / "alpaca_zh_demo.jsonl"
    shared_tok = SHARED / "fixtures" / "minimind2"
    p.add_argument("--data", default=str(shared_data) if shared_data.exists() else None)
    p.add_argument("--tokenizer", default=str(shared_tok) if shared_tok.exists() else None)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--seed-batch", type=int, default=2, help="the seed notebook's batch size")
    p.add_argument("--batches", default="2,16,32,64",
                   help="the project's batch sizes, comma-separated (2 = like-for-like with the seed)")
    p.add_argument("--seconds", type=float, default=30.0,
                   help="the project's timed seconds per batch size (the seed loop gets as many)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=1, help="measure every batch size this many times")
    p.add_argument("--skip-seed", action="store_true", help="only the project's figures (a batch sweep)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=cpu_has_bf16(),
                   help="also run the best batch with train.dtype=bfloat16 (autocast; default: when the CPU "
                        "has native bf16 instructions); fp32 stays the like-for-like comparison")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from minimind_train.data import DEMO_DATA_PATH

    data_path = Path(args.data) if args.data else DEMO_DATA_PATH
    tokenizer = load_tokenizer(args.tokenizer)
    print(machine_line())
    print(f"data: {data_path} | tokenizer: {args.tokenizer or 'bundled'} | max_seq_len {args.max_seq_len}")
    model = MiniMindForCausalLM(model_config_from(MODEL, len(tokenizer)))
    flops = FlopModel.of(model)
    print(f"model: {count_parameters(model):,} parameters (hidden {MODEL.hidden_size} x "
          f"{MODEL.num_hidden_layers} layers, vocab {len(tokenizer)})", flush=True)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    print(f"fp32 matmul peak (best 2048^3 GEMM) at the start: {matmul_peak_gflops():.0f} GFLOP/s", flush=True)

    with tempfile.TemporaryDirectory() as cache:
        data_cfg = DataConfig(train_path=str(data_path), tokenizer=args.tokenizer, max_seq_len=args.max_seq_len,
                              val_fraction=0.02, cache_dir=cache)
        data = prepare_data(data_cfg, show_progress=False)
        lens = data.train.lengths
        print(f"train split: {len(data.train)} samples, mean {lens.mean():.0f} tokens, "
              f"{100 * lens.sum() / (len(lens) * (args.max_seq_len - 1)):.0f}% of a {args.max_seq_len}-padded "
              f"batch real, {100 * data.train.supervised.sum() / lens.sum():.0f}% of real tokens supervised",
              flush=True)
        seed_loop = None if args.skip_seed else SeedLoop(data_path, tokenizer, args.max_seq_len,
                                                          args.seed_batch, 0, flops, PeakProbe())
        pairs: dict[int, list[dict]] = {}
        for round_ in range(1, args.rounds + 1):
            for b in batches:
                ours, theirs = run_pair(data, data_cfg, b, args.seconds, 0, flops, seed_loop)
                ratio = theirs and ours["supervised_tokens_per_s"] / theirs["supervised_tokens_per_s"]
                pairs.setdefault(b, []).append({"project": ours, "seed": theirs, "ratio": ratio})
            print(f"  round {round_}/{args.rounds} done ({machine_line().split(', load ')[1]})", flush=True)

    def median(items: list[dict]) -> dict:
        key = (lambda r: r["ratio"]) if seed_loop is not None else (
            lambda r: r["project"]["supervised_tokens_per_s"])
        ordered = sorted(items, key=key)
        return {**ordered[(len(ordered) - 1) // 2], "rounds": [key(r) for r in items]}

    rows = {b: median(items) for b, items in pairs.items()}
    best_b = max(rows, key=lambda b: rows[b]["project"]["supervised_tokens_per_s"])
    if args.bf16:
        # Opt-in numerics (train.dtype: bfloat16, autocast): not the like-for-like fp32 comparison.
        with tempfile.TemporaryDirectory() as cache:
            data_cfg = dataclasses.replace(data_cfg, cache_dir=cache)
            data = prepare_data(data_cfg, show_progress=False)
            items = []
            for _ in range(args.rounds):
                ours, theirs = run_pair(data, data_cfg, best_b, args.seconds, 0, flops, seed_loop, "bfloat16")
                ratio = theirs and ours["supervised_tokens_per_s"] / theirs["supervised_tokens_per_s"]
                items.append({"project": ours, "seed": theirs, "ratio": ratio})
            pairs[f"{best_b} bf16"] = items
            rows[f"{best_b} bf16"] = median(items)
            print(f"  bf16 autocast at batch {best_b} done", flush=True)
    print(f"\nproject = train_epochs at each batch; seed-style = batch {args.seed_batch}, its steps interleaved "
          "with the project's in the same window; % peak = useful FLOP/s / median probed matmul peak "
          "(fp32 GEMMs; the bf16 row against bf16 GEMMs)")
    print(f"{'batch':>9} {'steps':>5} {'project sup tok/s':>17} {'% peak':>7} {'exec %':>7} | "
          f"{'seed sup tok/s':>14} {'% peak':>7} {'exec %':>7} | {'ratio':>6} {'peak GFLOP/s':>12}")
    for b, r in rows.items():
        o, t = r["project"], r["seed"]
        seed_cols = (f"{t['supervised_tokens_per_s']:>14,.0f} {100 * t['useful_share']:>6.1f}% "
                     f"{100 * t['executed_share']:>6.1f}% | {r['ratio']:>5.2f}x" if t else f"{'-':>14} {'':>7} "
                     f"{'':>7} | {'-':>6}")
        print(f"{b!s:>9} {o['steps']:>5} {o['supervised_tokens_per_s']:>17,.0f} {100 * o['useful_share']:>6.1f}% "
              f"{100 * o['executed_share']:>6.1f}% | {seed_cols} {o['peak_gflops']:>12.0f}"
              + (f"   rounds: {', '.join(f'{x:,.2f}' for x in r['rounds'])}" if len(r["rounds"]) > 1 else ""))
    summary: dict = {"machine": machine_line(), "data": str(data_path), "max_seq_len": args.max_seq_len,
                     "seed_batch": args.seed_batch, "pairs": {str(b): items for b, items in pairs.items()},
                     "median": {str(b): r for b, r in rows.items()}}
    best = rows[best_b]
    summary["best_project_batch"] = best_b
    print(f"\nbest project batch: {best_b} ({best['project']['supervised_tokens_per_s']:,.0f} supervised tokens/s, "
          f"{100 * best['project']['useful_share']:.1f}% of matmul peak in useful FLOPs; goal >= 50%)")
    if seed_loop is not None:
        summary["ratio"] = best["ratio"]
        print(f"ratio project (batch {best_b}) / seed-style (batch {args.seed_batch}), supervised tokens/s: "
              f"{best['ratio']:.2f}x (goal >= 3x)")
        if args.seed_batch in rows:
            summary["ratio_same_batch"] = rows[args.seed_batch]["ratio"]
            print(f"like-for-like, both at batch {args.seed_batch}: {rows[args.seed_batch]['ratio']:.2f}x")
        bf16 = rows.get(f"{best_b} bf16")
        if bf16 is not None:
            summary["ratio_bf16"] = bf16["ratio"]
            print(f"opt-in train.dtype=bfloat16 at batch {best_b}: {bf16['project']['supervised_tokens_per_s']:,.0f} "
                  f"supervised tokens/s, {bf16['ratio']:.2f}x the fp32 seed-style loop (different numerics)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
