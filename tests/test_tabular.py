"""The tabular benchmark's builder (benchmarks/tabular.py) and simulator (benchmarks/simulate.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_benchmarks import _load

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "minimind_train" / "assets"


def _tiny_args(tmp_path: Path) -> list[str]:
    return ["--data", str(ASSETS / "demo" / "sft_demo.jsonl"), "--tokenizer", str(ASSETS / "tokenizer"),
            "--out", str(tmp_path / "table"), "--cache", str(tmp_path / "cache"), "--pretrain-from", "2900",
            "--sft-train", "48", "--val", "16", "--max-seq-len", "64", "--hidden-size", "32", "--layers", "1",
            "--grid", "tiny", "--seeds", "2", "--evals-per-epoch", "4", "--warmup-steps", "1", "--batch-size", "8"]


def test_a_tiny_table_builds_resumably_and_the_simulator_replays_it(tmp_path: Path, capsys) -> None:
    tabular, simulate = _load("tabular"), _load("simulate")
    assert tabular.main(_tiny_args(tmp_path)) == 0
    table = tmp_path / "table"
    meta, curves = tabular.load_table(table)
    assert len(curves) == 3 * 2 and {c["seed"] for c in curves} == {1, 2}
    for c in curves:
        # The file is named by the hash of its table, config and seed; every evaluation is there, with its cost.
        assert (table / "curves" / f"{tabular.curve_key(meta['digest'], c['config'], c['seed'])}.json").exists()
        assert c["status"] == "diverged" or [e["evaluation"] for e in c["evaluations"]] == [1, 2, 3, 4]
        assert c["cost"]["tokens"] > 0 and c["cost"]["cpu_seconds"] > 0 and c["baseline_val_loss"] > 0
        assert all(a["tokens"] < b["tokens"] for a, b in zip(c["evaluations"], c["evaluations"][1:]))
    # The three parts of the data are disjoint by line: pretraining after line 2900, val just before it.
    split = next((tmp_path / "cache").glob("split-*"))
    sizes = {p.stem: len(p.read_text().splitlines()) for p in split.glob("*.jsonl")}
    assert sizes == {"pretrain": 100, "sft_train": 48, "val": 16}
    # The base was pretrained on plain text: the pretraining part holds texts, no chat roles or template.
    pretrain_lines = (split / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()
    assert all(set(json.loads(ln)) == {"text"} and "<|im_start|>" not in ln for ln in pretrain_lines)
    # Its figures travel with the table: what it cost and the losses it must beat, in nats on the val split.
    base = meta["base_figures"]
    assert base["steps"] >= 1 and base["tokens"] == base["steps"] * 8 * 64 and base["cpu_seconds"] > 0
    losses = base["val_loss"]
    assert losses["uniform"] == pytest.approx(math.log(6400))
    assert losses["unigram_val_itself"] <= losses["unigram_pretraining_text"] < losses["uniform"]
    assert curves[0]["baseline_val_loss"] == pytest.approx(losses["base"])
    assert (tmp_path / "cache" / f"base-{meta['base']}.pth").exists()
    # The probes the build trains first: the lowest, middle and highest learning rate.
    assert [p["train.learning_rate"] for p in tabular.probe_configs(meta["spec"]["grid"])] == [1e-4, 3e-3, 3e-2]
    # Rerun: every curve is found, none trained again (the base is cached too).
    spec = tabular.TableSpec(**{**meta["spec"], "data": str(ASSETS / "demo" / "sft_demo.jsonl"),
                                "tokenizer": str(ASSETS / "tokenizer")})
    assert spec.digest() == meta["digest"]
    assert tabular.build(spec, table, tmp_path / "cache") == 0
    assert not list(table.rglob(".*.tmp"))

    capsys.readouterr()
    results = simulate.main(["--table", str(table), "--strategy", "all", "--seeds", "3"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"within_1pct={results['default']['within_1pct']:.2f} cost_runs={results['default']['cost_runs']:.2f}"
    for r in results.values():
        assert 0 <= r["within_1pct"] <= 1 and r["cost_runs"] > 0 and r["regret_median"] >= 0
    # Full-budget random search without finalists can cost no less than num_samples runs.
    assert results["random"]["cost_runs"] >= 24 - 1e-9
    # The settings can be overridden from the command line: 4 runs at most, no finalists.
    small = simulate.main(["--table", str(table), "--strategy", "random", "--seeds", "2", "--num-samples", "4",
                           "--top-k", "0", "--finalist-seeds", "0"])
    assert 0 < small["random"]["cost_runs"] <= 4
    # --configs lists the table itself (a header, 3 configs best first, the seed spread of those with
    # finite values: lr 1e-4 at least) and runs no study.
    capsys.readouterr()
    assert simulate.main(["--table", str(table), "--configs"]) == {}
    listing = capsys.readouterr().out.strip().splitlines()
    assert len(listing) == 1 + 3 + 1 and listing[-1].startswith("seed spread")


def test_the_base_is_pretrained_on_packed_plain_text_and_learns_it() -> None:
    tabular = _load("tabular")
    from minimind_train.config import ModelConfig, RunConfig
    from minimind_train.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ASSETS / "tokenizer")
    lines = (ASSETS / "demo" / "sft_demo.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    texts = [tabular.plain_text(ln) for ln in lines]
    assert texts[0].startswith("65和62中较大的数是哪个？\n较大的数是65。\n") and "assistant" not in texts[0]
    rows = tabular.pack_plain_text(tokenizer, texts, 32)
    # Packed rows of exactly 32 tokens, no special token (ids 0-2: <|endoftext|>, <|im_start|>, <|im_end|>).
    assert rows.shape[1] == 32 and len(rows) > 8 and int(rows.min()) >= 3
    assert tokenizer.decode(rows.reshape(-1).tolist()).startswith(texts[0] + "\n\n" + texts[1] + "\n\n")
    cfg = RunConfig(model=ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=32)).with_overrides(
        {"train.batch_size": 4, "train.epochs": 3, "train.learning_rate": 1e-2, "train.warmup_steps": 0,
         "train.device": "cpu", "train.dtype": "float32", "train.num_threads": 1})
    steps = []
    state = tabular.pretrain(cfg, rows, len(tokenizer), on_step=steps.append)
    per_epoch = len(rows) // 4
    assert len(steps) == state.step == 3 * per_epoch and state.epoch == 3
    # It learns the text: the last epoch's loss is well below the first step's (~ln 6400 = 8.76).
    assert sum(s.loss for s in steps[-per_epoch:]) / per_epoch < steps[0].loss - 1.0


def _write_table(folder: Path, values: dict[tuple[float, int], list[float]], diverged: set[float] = frozenset()) -> None:
    """A hand-made table: learning rate x seed -> val_loss per evaluation (100 tokens, 1 s each)."""
    (folder / "curves").mkdir(parents=True)
    (folder / "table.json").write_text(json.dumps({"spec": {"grid": {"train.learning_rate": sorted({lr for lr, _ in values})}}}))
    for i, ((lr, seed), losses) in enumerate(values.items()):
        evals = [{"evaluation": k, "tokens": 100 * k, "seconds": float(k), "val_loss": v}
                 for k, v in enumerate(losses, start=1)]
        status = "diverged" if lr in diverged else "completed"
        (folder / "curves" / f"{i}.json").write_text(json.dumps({
            "config": {"train.learning_rate": lr}, "seed": seed, "status": status, "baseline_val_loss": 10.0,
            "evaluations": evals, "cost": {"tokens": 100 * len(losses) + 50 * (status == "diverged"),
                                           "seconds": len(losses) + 0.5 * (status == "diverged")}}))


def test_simulator_maps_proposals_to_the_nearest_grid_point_and_answers_by_the_finalists_mean(tmp_path: Path) -> None:
    simulate = _load("simulate")
    # lr 1e-3 is best for seed 1 only (lucky); 1e-2 is best on average; 1e-1 diverges with seed 1.
    _write_table(tmp_path, {(1e-4, 1): [5, 4, 3, 3], (1e-4, 2): [5, 4, 3, 3],
                            (1e-3, 1): [4, 3, 2, 1.0], (1e-3, 2): [4, 3, 3, 3.0],
                            (1e-2, 1): [4, 3, 2, 1.5], (1e-2, 2): [4, 3, 2, 1.5],
                            (1e-1, 1): [4], (1e-1, 2): [4, 3, 2, 1.2]}, diverged={1e-1})
    table = simulate.Table(tmp_path)
    assert table.nearest({"train.learning_rate": 2.9e-3}) == (1e-3,)  # log scale: 3.2e-3 is the midpoint
    assert table.nearest({"train.learning_rate": 3.3e-3}) == (1e-2,)
    assert table.best == 1.5 and math.isinf(table.true[(1e-1,)]) and table.base == 10.0
    assert table.evaluations == 4 and table.full_tokens == 400
    s = simulate.Strategy("t", sampler="random", pruner="none", num_samples=12, concurrency=2, top_k=2, finalist_seeds=1)
    outcomes = [simulate.simulate(table, s, seed) for seed in range(5)]
    # With 12 draws over 4 points both 1e-3 and 1e-2 are found; the finalists' mean picks 1e-2, not lucky 1e-3.
    assert all(o.answer == (1e-2,) and o.regret == 0 for o in outcomes)
    # 12 search runs (a diverged one costs its 350 tokens) plus 2 finalist runs, in full-run equivalents.
    assert all(12 < o.cost_runs <= 14 and o.trials == 12 for o in outcomes)
    nofinal = simulate.Strategy("n", sampler="random", pruner="none", num_samples=12, concurrency=2, top_k=0,
                                finalist_seeds=0)
    assert all(simulate.simulate(table, nofinal, seed).answer == (1e-3,) for seed in range(5))
    # Without finalists the lucky 1e-3 is the answer: true value 2.0 against the best 1.5 and the base 10.0,
    # a ratio of +33% and 0.5 / 8.5 of the gap that fine-tuning closes.
    lucky = simulate.simulate(table, nofinal, 0)
    assert lucky.regret == pytest.approx(2.0 / 1.5 - 1) and lucky.gap_regret == pytest.approx(0.5 / 8.5)
    assert outcomes[0].gap_regret == 0
    lines = simulate.describe(table)
    assert lines[0].startswith("{'train.learning_rate': 0.01}: seeds 1.5000 1.5000, true 1.5000")
    # The diverged config has no spread; 1e-3's seeds differ by 2.0, so the gap is 4.2x the spread.
    assert lines[-1] == ("seed spread (max - min of a config's values): median 0.0000, max 2.0000, the best config's 0.0000; "
                         "the gap 8.5000 is infx the best config's spread, 4.2x the max")


@pytest.mark.parametrize("pruner, fewer", [("none", False), ("asha", True)])
def test_simulator_asha_stops_trials_at_rungs(tmp_path: Path, pruner: str, fewer: bool) -> None:
    simulate = _load("simulate")
    _write_table(tmp_path, {(lr, s): [10 - i - 0.1 * k for k in range(8)] for i, lr in enumerate([1e-4, 1e-3, 1e-2, 1e-1])
                            for s in (1, 2)})
    table = simulate.Table(tmp_path)
    s = simulate.Strategy("t", sampler="random", pruner=pruner, num_samples=8, concurrency=1, grace_period=2,
                          reduction_factor=2, top_k=0, finalist_seeds=0)
    cost = simulate.simulate(table, s, 0).cost_runs
    assert (cost < 8) == fewer and cost <= 8
