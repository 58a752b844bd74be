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
    assert table.best == 1.5 and math.isinf(table.true[(1e-1,)])
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
