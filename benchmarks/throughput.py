"""Supervised tokens/s of this project's trainer vs a seed-style SFT loop, side by side, one run.

    python benchmarks/throughput.py [--data FILE] [--tokenizer DIR] [--seconds 40]

Both loops train the same model (MiniMind2 hidden 512 x 2 layers, 8.9M parameters) on the same data
with the same tokenizer and ``max_seq_len`` on this machine, in this process, one after the other:

* seed-style: the tutorial notebook's data path -- every sample padded to ``max_seq_len``, the loss
  mask found by its per-sample Python scan, tokenised on the fly by a DataLoader, logits for every
  position (its double shift and double division are NOT reproduced: they change numbers, not cost);
* project: ``minimind_train.train.train_epochs`` on the token cache with length-grouped batches.

Reported: supervised tokens/s of each and their ratio, and useful FLOP/s (6 x matmul parameters x real
tokens + attention over real tokens) as a share of this machine's measured fp32 matmul peak.
Defaults use ``../shared/data/alpaca_zh_demo.jsonl`` and the MiniMind2 tokenizer when present, else the
bundled demo data and tokenizer (the printed header says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minimind_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from minimind_train.data import prepare_data
from minimind_train.model import MiniMindForCausalLM, count_parameters, model_config_from
from minimind_train.tokenizer import load_tokenizer
from minimind_train.train import init_state, train_epochs

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = ModelConfig(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
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


def flops_per_token(model: torch.nn.Module, hidden: int, layers: int, mean_len: float) -> float:
    """Training FLOPs per real token: 6 N for the matmuls (embedding lookup excluded, tied lm_head
    included) + 6 x 2 x layers x hidden x mean causal context for attention scores and values."""
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    n_matmul += model.lm_head.weight.numel()  # tied: counted as a matmul once more
    return 6 * n_matmul + 6 * 2 * layers * hidden * (mean_len / 2)


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
        return x, y, mask, real


def run_seed_style(path: Path, tokenizer, max_len: int, batch: int, seconds: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(model_config_from(MODEL, len(tokenizer)))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    ds = SeedStyleDataset(path, tokenizer, max_len)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)
    sup = real = steps = 0
    start = None
    for i, (x, y, mask, n_real) in enumerate(loader):
        if i == 2:  # two warm-up steps are not timed
            start = time.perf_counter()
            sup = real = steps = 0
        logits = model(input_ids=x).logits
        raw = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        m = mask.reshape(-1).float()
        loss = (raw * m).sum() / (m.sum() + 1e-8)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sup += int(mask.sum())
        real += int(n_real.sum())
        steps += 1
        if start is not None and time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {"supervised_tokens_per_s": sup / elapsed, "real_tokens_per_s": real / elapsed,
            "computed_tokens_per_s": steps * batch * (max_len - 1) / elapsed, "steps": steps}


def run_project(path: Path, tokenizer_dir: str | None, max_len: int, batch: int, seconds: float,
                seed: int, cache_dir: str) -> dict:
    data_cfg = DataConfig(train_path=str(path), tokenizer=tokenizer_dir, max_seq_len=max_len,
                          val_fraction=0.02, cache_dir=cache_dir)
    data = prepare_data(data_cfg, show_progress=False)
    # Calibrate a step budget that fits ``seconds``: time a short epoch first.
    probe = RunConfig(model=MODEL, data=data_cfg, train=TrainConfig(
        epochs=1, batch_size=batch, device="cpu", dtype="float32", seed=seed, max_steps_per_epoch=3))
    m = next(train_epochs(probe, data)).metrics
    steps = max(3, int(seconds / (m["epoch_seconds"] / 3)))
    cfg = dataclasses.replace(probe, train=dataclasses.replace(probe.train, max_steps_per_epoch=steps))
    m = next(train_epochs(cfg, data, init_state(cfg, data.vocab_size))).metrics
    return {"supervised_tokens_per_s": m["supervised_tokens_per_s"], "real_tokens_per_s": m["tokens_per_s"],
            "computed_tokens_per_s": m["tokens_per_s"], "steps": steps, "mean_len": float(data.train.lengths.mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_data = SHARED / "data" / "alpaca_zh_demo.jsonl"
    shared_tok = SHARED / "fixtures" / "minimind2"
    p.add_argument("--data", default=str(shared_data) if shared_data.exists() else None)
    p.add_argument("--tokenizer", default=str(shared_tok) if shared_tok.exists() else None)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--seed-batch", type=int, default=2, help="the seed notebook's batch size")
    p.add_argument("--batch", type=int, default=16, help="the project's batch size")
    p.add_argument("--seconds", type=float, default=40.0, help="timed seconds per loop")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from minimind_train.demo import DEMO_DATA_PATH

    data = Path(args.data) if args.data else DEMO_DATA_PATH
    tokenizer = load_tokenizer(args.tokenizer)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"data: {data} | tokenizer: {args.tokenizer or 'bundled'} | max_seq_len {args.max_seq_len}")
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (2048^3 GEMM): {peak:.1f} GFLOP/s")
    model = MiniMindForCausalLM(model_config_from(MODEL, len(tokenizer)))
    print(f"model: {count_parameters(model):,} parameters")

    with tempfile.TemporaryDirectory() as cache:
        ours = run_project(data, args.tokenizer, args.max_seq_len, args.batch, args.seconds, 0, cache)
    seed = run_seed_style(data, tokenizer, args.max_seq_len, args.seed_batch, args.seconds, 0)
    fpt = flops_per_token(model, MODEL.hidden_size, MODEL.num_hidden_layers, ours["mean_len"])
    # Useful work per real token is the same whichever loop does it; padding is not useful.
    rows = [("seed-style", seed, args.seed_batch, fpt), ("project", ours, args.batch, fpt)]
    print(f"\n{'loop':<11} {'batch':>5} {'sup tok/s':>10} {'real tok/s':>10} {'useful GFLOP/s':>15} {'% peak':>7}")
    for name, r, b, f in rows:
        useful = r["real_tokens_per_s"] * f / 1e9
        print(f"{name:<11} {b:>5} {r['supervised_tokens_per_s']:>10,.0f} {r['real_tokens_per_s']:>10,.0f} "
              f"{useful:>15.1f} {100 * useful / peak:>6.1f}%")
    ratio = ours["supervised_tokens_per_s"] / seed["supervised_tokens_per_s"]
    print(f"\nratio project / seed-style (supervised tokens/s): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
