"""Where a training step's time goes: torch.profiler over a few steps of this project's trainer.

    python benchmarks/profile_trainer.py [--batch 32] [--steps 6] [--rows 25]

Same model, data and defaults as ``throughput.py`` (MiniMind2 hidden 512 x 2 layers, alpaca_zh with the
MiniMind2 tokenizer when ``../shared`` has them, max_seq_len 512). Runs two warm-up steps, then profiles
``--steps`` optimizer steps (``backward_window`` + clipping + AdamW, exactly what ``train_epochs`` runs per
step) and prints the operators by self CPU time, plus the share of time in matrix multiplies, attention,
the optimizer and everything else (elementwise and memory-bound kernels).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from minimind_train.batches import batch_indices
from minimind_train.config import DataConfig, RunConfig, TrainConfig
from minimind_train.data import prepare_data
from minimind_train.train import backward_window, clip_grad_norm, init_state

sys.path.insert(0, str(REPO / "benchmarks"))
from throughput import MODEL, SHARED, machine_line

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("flash_attention",),
    "optimizer + clipping": ("adam", "foreach"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_data = SHARED / "data" / "alpaca_zh_demo.jsonl"
    shared_tok = SHARED / "fixtures" / "minimind2"
    p.add_argument("--data", default=str(shared_data) if shared_data.exists() else None)
    p.add_argument("--tokenizer", default=str(shared_tok) if shared_tok.exists() else None)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    print(machine_line())
    with tempfile.TemporaryDirectory() as cache:
        data_cfg = DataConfig(train_path=args.data, tokenizer=args.tokenizer, max_seq_len=args.max_seq_len,
                              val_fraction=0.02, cache_dir=cache)
        data = prepare_data(data_cfg, show_progress=False)
        cfg = RunConfig(model=MODEL, data=data_cfg, train=TrainConfig(batch_size=args.batch, device="cpu",
                                                                      dtype="float32"))
        state = init_state(cfg, data.vocab_size)
        order = batch_indices(data.train.lengths, args.batch, seed=0, epoch=0)[:args.steps + 2]
        batches = [data.train.batch(items, data.pad_id) for items in order]
    params = list(state.model.parameters())

    def step(batch) -> None:
        backward_window(state, [batch])
        clip_grad_norm(params, 1.0)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)

    for batch in batches[:2]:
        step(batch)
    print(f"profiled batches (batch x width): {[tuple(x.shape) for x, _ in batches[2:]]}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[2:]:
            step(batch)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = sum(e.self_cpu_time_total for e in events)
    shares = dict.fromkeys([*GROUPS, "other (elementwise, copies, reductions, CE)"], 0.0)
    for e in events:
        group = next((g for g, keys in GROUPS.items() if any(k in e.key.lower() for k in keys)),
                     "other (elementwise, copies, reductions, CE)")
        shares[group] += e.self_cpu_time_total
    print("self CPU time by kind: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in shares.items()))
    print(f"per step: {total / 1e6 / args.steps:.2f} s CPU (both threads' profiled ops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
