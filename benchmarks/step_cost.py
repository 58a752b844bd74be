"""CPU seconds per optimizer step of ``train_epochs`` (one thread), for an A/B of two checkouts.

    PYTHONPATH=<checkout> python benchmarks/step_cost.py [--steps 24] [--data FILE] [--tokenizer DIR]

Process CPU time, not wall time, so a busy shared machine moves it little; run the two checkouts in
turn, a few times each (e.g. ``for i in 1 2 3; do for d in A B; do PYTHONPATH=$d ...; done; done``).
The printed losses tell whether the two trained the same numbers. Model: MiniMind2 hidden 512 x 2
layers, batch 16, ``max_seq_len`` 512; data: ``../shared/data/alpaca_zh_demo.jsonl`` and the MiniMind2
tokenizer when present, else the bundled demo data and tokenizer. The first two steps are warm-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from minimind_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from minimind_train.data import prepare_data
from minimind_train.train import train_epochs

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    data, tok = SHARED / "data" / "alpaca_zh_demo.jsonl", SHARED / "fixtures" / "minimind2"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--data", default=str(data) if data.exists() else None)
    p.add_argument("--tokenizer", default=str(tok) if tok.exists() else None)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        dcfg = DataConfig(train_path=args.data, tokenizer=args.tokenizer, max_seq_len=512, val_fraction=0.02,
                          cache_dir=cache)
        model = ModelConfig(hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
        train = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=args.steps, device="cpu",
                            dtype="float32", seed=0)
        marks: list[float] = []
        epoch = next(train_epochs(RunConfig(model=model, data=dcfg, train=train),
                                  prepare_data(dcfg, show_progress=False),
                                  on_step=lambda _: marks.append(time.process_time())))
    print(json.dumps({"cpu_s_per_step": (marks[-1] - marks[1]) / (len(marks) - 2), "steps": len(marks),
                      "train_loss": epoch.metrics["train_loss"], "val_loss": epoch.metrics["val_loss"]}))


if __name__ == "__main__":
    main()
