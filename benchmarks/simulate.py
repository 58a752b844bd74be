"""Replay studies over a tabular benchmark (benchmarks/tabular.py): seconds per simulated study.

    python benchmarks/simulate.py [--table DIR] [--strategy default|all|NAME] [--seeds 50]

A strategy is a sampler and a pruner from the study's own factories (:func:`tune.searcher.make_sampler`,
:func:`tune.searcher.make_pruner`) with the study's settings (``num_samples``, concurrency, ASHA's
``grace_period`` / ``reduction_factor``, finalists ``top_k`` x ``seeds``); ``default`` reads them from
the shipped real-scale space's ``tune`` section (``--space``, default search_spaces/minimind2_sft.yaml).
Each simulated study follows the study's rules:

* **Concurrency with the measured costs.** ``concurrency`` trials run at once; a trial's evaluation k
  happens at its start time plus the (CPU) seconds its curve took to reach k, so results arrive (and the
  sampler sees them, running trials included) in the order a real study would see them.
* **Record, then decide** (``tune.searcher.RecordScheduler``): each evaluation's value is reported as
  the trial's intermediate value at its evaluation index, then the pruner is asked, never after the
  last evaluation. A curve marked diverged ends its trial FAIL after its last value; one whose best value
  is no better than its model before training (:func:`tune.study.no_better_reason`) is no answer.
  A finished trial is told its best evaluation's value (``Study.finish``).
* **Finalists with seeds** (``tune.searcher.finalist_plans``, ``tune.report``): the ``top_k`` best
  completed search trials' distinct grid configs are replayed with the table's other training seeds; the answer is the
  best mean over the search seed and the finalist seeds (a diverged seed counts as the worst value).
  Without finalists the answer is the best search trial (:func:`tune.study.ranked`). Search trials use
  the table's first training seed, finalists the next ones (a study's ``train.seed``, then ``+1 ...``).

**Off the grid.** The sampler searches the grid's hull with the shipped spaces' types (learning rate
log-uniform, accumulation categorical, the rest uniform floats); each proposal is answered by the
nearest grid config (per dimension, distance in grid steps: the learning rate on a log scale), and the
curve of that config is what the trial reports. On a partial table only configs finished for every seed
form the grid.

**Figures** per strategy over ``--seeds`` searcher seeds: the cost of a study in full-training-run
equivalents (tokens trained, search and finalists, over one full curve's tokens; median), its wall time
with concurrency (in full-run durations), the regret of its answer (the answer config's true value --
its best val_loss averaged over every training seed of the table -- over the grid's best, minus 1), the
fraction of seeds within 1%, and the regret as a fraction of the gap SFT closes, ``(value - best) /
(base - best)`` with ``base`` the pretrained model's val_loss before training (each curve's
``baseline_val_loss``): 0 is the best config, 1 no better than not fine-tuning at all. The ratio alone
says little when SFT moves the loss little (a config that barely trains can be within 1%). The last
line is ``within_1pct=<fraction> cost_runs=<median>`` of the strategy given (the first one with ``all``).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import optuna
import yaml

from tune.objective import Objective
from tune.searcher import make_pruner, make_sampler
from tune.study import no_better_reason

__all__ = ["STRATEGIES", "Outcome", "Strategy", "Table", "default_strategy", "describe", "main", "simulate", "summarize"]

DEFAULT_TABLE = REPO / "benchmarks" / "tables" / "alpaca_zh_tiny"
DEFAULT_SPACE = REPO / "search_spaces" / "minimind2_sft.yaml"
OBJECTIVE = Objective("val_loss", "min")
Config = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A study's search settings (the ``tune`` section's, with the sampler and pruner kinds of
    :func:`make_sampler` / :func:`make_pruner`)."""

    name: str
    sampler: str = "optuna"
    pruner: str = "asha"
    num_samples: int = 24
    concurrency: int = 4
    grace_period: int = 2
    reduction_factor: int = 2
    top_k: int = 3
    finalist_seeds: int = 1


def default_strategy(space: Path = DEFAULT_SPACE) -> Strategy:
    """The strategy a shipped space's ``tune`` section sets (read raw: its data files need not exist)."""
    t = (yaml.safe_load(space.read_text()) or {}).get("tune", {})
    sched, fin = t.get("scheduler") or {}, t.get("finalists") or {}
    return Strategy("default", sampler=t.get("searcher", "optuna"), pruner=sched.get("type", "asha"),
                    num_samples=int(t.get("num_samples", 24)), concurrency=int(t.get("max_concurrent_trials", 1)),
                    grace_period=int(sched.get("grace_period", 1)), reduction_factor=int(sched.get("reduction_factor", 2)),
                    top_k=int(fin.get("top_k", 0)), finalist_seeds=int(fin.get("seeds", 0)))


def _variants(base: Strategy) -> dict[str, Strategy]:
    r = dataclasses.replace
    return {"default": base,
            "random": r(base, name="random", sampler="random", pruner="none"),
            "random+asha": r(base, name="random+asha", sampler="random"),
            "tpe": r(base, name="tpe", pruner="none"),
            "tpe+asha": r(base, name="tpe+asha", sampler="optuna", pruner="asha"),
            "tpe+asha-12": r(base, name="tpe+asha-12", sampler="optuna", num_samples=12, top_k=2),
            "tpe+asha-nofinal": r(base, name="tpe+asha-nofinal", sampler="optuna", top_k=0, finalist_seeds=0),
            "tpe+asha-rf4": r(base, name="tpe+asha-rf4", sampler="optuna", reduction_factor=4, grace_period=1),
            # Sized for the goal of <= 3 full-run equivalents in all.
            "tpe+asha-small": r(base, name="tpe+asha-small", sampler="optuna", num_samples=8, concurrency=2,
                                grace_period=1, reduction_factor=4, top_k=1, finalist_seeds=1),
            "random+asha-small": r(base, name="random+asha-small", sampler="random", num_samples=8, concurrency=2,
                                   grace_period=1, reduction_factor=4, top_k=1, finalist_seeds=1)}


STRATEGIES = tuple(_variants(Strategy("default")))


def _seconds(point: Mapping[str, Any]) -> float:
    """A curve point's or run's duration: its CPU seconds (one thread: what it costs whatever else ran on
    the machine meanwhile) where measured, else its wall seconds."""
    return float(point.get("cpu_seconds", point["seconds"]))


class Table:
    """A table's curves by (grid config, training seed), its grid and each config's true value."""

    def __init__(self, folder: Path) -> None:
        meta = json.loads((folder / "table.json").read_text())
        self.grid: dict[str, list[Any]] = meta["spec"]["grid"]
        self.names = list(self.grid)
        self.curves: dict[tuple[Config, int], dict[str, Any]] = {}
        for path in sorted((folder / "curves").glob("*.json")):
            c = json.loads(path.read_text())
            self.curves[(tuple(c["config"][n] for n in self.names), int(c["seed"]))] = c
        self.seeds = sorted({s for _, s in self.curves})
        complete = {cfg for cfg, _ in self.curves if all((cfg, s) in self.curves for s in self.seeds)}
        self.configs = sorted(complete)
        if not self.configs:
            raise SystemExit(f"{folder}: no config has a curve for every seed yet")
        full = [c for c in self.curves.values() if c["status"] == "completed"]
        self.evaluations = max(len(c["evaluations"]) for c in full)
        self.full_tokens = statistics.median(c["cost"]["tokens"] for c in full)
        self.full_seconds = statistics.median(_seconds(c["cost"]) for c in full)
        self.true = {cfg: self.true_value(cfg) for cfg in self.configs}
        self.best = min(self.true.values())
        # The pretrained model's val_loss before any SFT step (one base per table: every curve measured it).
        self.base = statistics.median(c["baseline_val_loss"] for c in self.curves.values())
        self._axes = [sorted(self.grid[n]) for n in self.names]

    def value(self, curve: Mapping[str, Any]) -> float:
        """What a study takes from one run: its best evaluation (a diverged run: the worst value)."""
        values = [e["val_loss"] for e in curve["evaluations"] if math.isfinite(e["val_loss"])]
        return min(values) if values and curve["status"] == "completed" else OBJECTIVE.worst

    def true_value(self, config: Config) -> float:
        return statistics.fmean(self.value(self.curves[(config, s)]) for s in self.seeds)

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """The grid's hull with the shipped spaces' types."""
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        for name, values in self.grid.items():
            if name == "train.accumulation_steps" or not all(isinstance(v, (int, float)) for v in values):
                out[name] = optuna.distributions.CategoricalDistribution(sorted(values))
            else:
                out[name] = optuna.distributions.FloatDistribution(min(values), max(values),
                                                                   log=name == "train.learning_rate")
        return out

    def nearest(self, params: Mapping[str, Any]) -> Config:
        """The finished grid config nearest to ``params`` (distance in grid steps per dimension)."""
        def position(axis: list[Any], value: Any, log: bool) -> float:
            if value in axis:
                return float(axis.index(value))
            f = (lambda x: math.log(x)) if log else float
            i = min(max(bisect.bisect_left(axis, value), 1), len(axis) - 1)
            lo, hi = f(axis[i - 1]), f(axis[i])
            return i - 1 + min(max((f(value) - lo) / (hi - lo), 0.0), 1.0)

        want = [position(ax, params[n], n == "train.learning_rate") for n, ax in zip(self.names, self._axes)]
        return min(self.configs, key=lambda cfg: sum(
            (ax.index(v) - w) ** 2 for ax, v, w in zip(self._axes, cfg, want)))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One simulated study: its answer config, cost (full-run equivalents), wall time (full-run durations)."""

    answer: Config | None
    regret: float  # true value / grid best - 1
    gap_regret: float  # (true value - grid best) / (base - grid best)
    cost_runs: float
    wall_runs: float
    trials: int


def simulate(table: Table, s: Strategy, seed: int) -> Outcome:
    """One study of strategy ``s`` with searcher seed ``seed`` over ``table``."""
    study = optuna.create_study(direction=OBJECTIVE.optuna_direction,
                                sampler=make_sampler(s.sampler, seed, s.num_samples),
                                pruner=make_pruner(s.pruner, s.grace_period, s.reduction_factor))
    dists = table.distributions()
    search_seed, finalist_seeds = table.seeds[0], table.seeds[1:1 + s.finalist_seeds]
    events: list[tuple[float, int, int]] = []  # (time, trial number, evaluation index)
    running: dict[int, tuple[optuna.trial.Trial, Config, dict[str, Any], float]] = {}
    done: list[tuple[Config, str, float]] = []  # (config, status, value) of finished search trials
    tokens = 0.0
    asked = 0

    def start(now: float) -> None:
        nonlocal asked
        trial = study.ask(dists)
        asked += 1
        config = table.nearest(trial.params)
        curve = table.curves[(config, search_seed)]
        running[trial.number] = (trial, config, curve, now)
        first = _seconds(curve["evaluations"][0] if curve["evaluations"] else curve["cost"])
        heapq.heappush(events, (now + first, trial.number, 1))

    for _ in range(min(s.concurrency, s.num_samples)):
        start(0.0)
    now = 0.0
    while events:
        now, number, k = heapq.heappop(events)
        trial, config, curve, began = running[number]
        evals = curve["evaluations"]
        status = ""
        if k > len(evals):  # the run diverged after its last evaluation
            status, used = "diverged", curve["cost"]["tokens"]
        else:
            point = evals[k - 1]
            trial.report(point["val_loss"], k)  # recorded first, then decided
            used = point["tokens"]
            if k >= table.evaluations:
                status = "completed"
            elif trial.should_prune():
                status = "stopped_early"
            else:  # (after a diverged run's last evaluation comes its divergence)
                nxt = _seconds(evals[k] if k < len(evals) else curve["cost"])
                heapq.heappush(events, (began + nxt, number, k + 1))
        if not status:
            continue
        del running[number]
        tokens += used
        best = min((e["val_loss"] for e in evals[:k]), default=math.inf)
        if status != "diverged" and no_better_reason(best, OBJECTIVE, {"baseline_val_loss": curve["baseline_val_loss"]}):
            status = "no_better"
        state = {"completed": optuna.trial.TrialState.COMPLETE, "no_better": optuna.trial.TrialState.COMPLETE,
                 "stopped_early": optuna.trial.TrialState.PRUNED}.get(status, optuna.trial.TrialState.FAIL)
        study.tell(trial, best if state == optuna.trial.TrialState.COMPLETE else None, state=state)
        done.append((config, status, best))
        if asked < s.num_samples:
            start(now)
    # Finalists: the top completed configs with the other seeds, run `concurrency` at once after the search.
    # Distinct configs: two proposals answered by one grid point are one config (a real study's would differ).
    best_of = {cfg: min(v for c, st, v in done if c == cfg and st == "completed") for cfg, st, _ in done
               if st == "completed"}
    finalists = sorted((v, cfg) for cfg, v in best_of.items())[:s.top_k] if finalist_seeds else []
    jobs = [table.curves[(cfg, fs)] for _, cfg in finalists for fs in finalist_seeds]
    lanes = [now] * s.concurrency
    for curve in jobs:
        i = lanes.index(min(lanes))
        lanes[i] += _seconds(curve["cost"])
        tokens += curve["cost"]["tokens"]
    end = max(lanes) if jobs else now
    if finalists:
        means = [(statistics.fmean([v] + [table.value(table.curves[(cfg, fs)]) for fs in finalist_seeds]), cfg)
                 for v, cfg in finalists]
        answer: Config | None = min(means)[1]
    else:
        answers = sorted((0 if st == "completed" else 1, v, cfg) for cfg, st, v in done
                         if st in ("completed", "stopped_early") and math.isfinite(v))
        answer = answers[0][2] if answers else None
    value = table.true[answer] if answer is not None else math.inf
    gap = table.base - table.best
    return Outcome(answer, value / table.best - 1, (value - table.best) / gap if gap > 0 else math.inf,
                   tokens / table.full_tokens, end / table.full_seconds, asked)


def describe(table: Table) -> list[str]:
    """The table itself, before any study: each complete config's best value per training seed and its
    true value (as a ratio to the grid's best and as a fraction of the gap), best first; then the
    seed-to-seed spread against the gap: a table ranks strategies only when the gap is large against it."""
    gap = table.base - table.best
    lines: list[str] = []
    spreads: list[float] = []
    for c in sorted(table.configs, key=table.true.__getitem__):
        values = [table.value(table.curves[(c, s)]) for s in table.seeds]
        spreads += [max(values) - min(values)] if all(map(math.isfinite, values)) else []
        lines.append(f"{dict(zip(table.names, c))}: seeds {' '.join(f'{v:.4f}' for v in values)}, true "
                     f"{table.true[c]:.4f}, ratio {table.true[c] / table.best - 1:+.4f}, of the gap "
                     f"{(table.true[c] - table.best) / gap if gap > 0 else math.inf:.3f}")
    if spreads:
        best = [table.value(table.curves[(min(table.configs, key=table.true.__getitem__), s)]) for s in table.seeds]
        ratios = [gap / s if s > 0 else math.inf for s in (max(best) - min(best), max(spreads))]
        lines.append(f"seed spread (max - min of a config's values): median {statistics.median(spreads):.4f}, max "
                     f"{max(spreads):.4f}, the best config's {max(best) - min(best):.4f}; the gap {gap:.4f} is "
                     f"{ratios[0]:.1f}x the best config's spread, {ratios[1]:.1f}x the max")
    return lines


def summarize(outcomes: Sequence[Outcome]) -> dict[str, float]:
    regrets = [o.regret for o in outcomes]
    return {"within_1pct": sum(r <= 0.01 for r in regrets) / len(regrets),
            "regret_median": statistics.median(regrets), "regret_max": max(regrets),
            "gap_regret_median": statistics.median(o.gap_regret for o in outcomes),
            "gap_regret_max": max(o.gap_regret for o in outcomes),
            "cost_runs": statistics.median(o.cost_runs for o in outcomes),
            "wall_runs": statistics.median(o.wall_runs for o in outcomes)}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    p.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="the space whose tune section is 'default'")
    p.add_argument("--strategy", default="default", help=f"one of {', '.join(STRATEGIES)}, or all")
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--configs", action="store_true",
                   help="list every complete config's values and the seed spread, and stop (no studies)")
    # Overrides of the chosen strategies' settings (Strategy's fields), to explore without editing code.
    fields = [f.name for f in dataclasses.fields(Strategy) if f.type == "int"]
    for name in fields:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    a = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    variants = _variants(default_strategy(a.space))
    names = list(variants) if a.strategy == "all" else [a.strategy]
    if any(n not in variants for n in names):
        raise SystemExit(f"--strategy: one of {', '.join(variants)}, or all")
    overrides = {n: getattr(a, n) for n in fields if getattr(a, n) is not None}
    variants = {n: dataclasses.replace(v, **overrides) for n, v in variants.items()}
    table = Table(a.table)
    print(f"table {a.table}: {len(table.curves)} curves, {len(table.configs)} configs x {len(table.seeds)} seeds, "
          f"{table.evaluations} evaluations per run; grid best {table.best:.4f}, base {table.base:.4f} "
          f"(the gap SFT closes: {table.base - table.best:.4f})")
    if a.configs:
        print("\n".join(describe(table)))
        return {}
    results = {}
    for name in names:
        t0 = time.perf_counter()
        s = variants[name]
        r = results[name] = summarize([simulate(table, s, seed) for seed in range(a.seeds)])
        print(f"{name:18s} {s.sampler}/{s.pruner} n={s.num_samples} conc={s.concurrency} "
              f"rungs={s.grace_period}x{s.reduction_factor} finalists={s.top_k}x{s.finalist_seeds}: "
              f"within 1% {r['within_1pct']:.2f}, regret median {r['regret_median']:.4f} max {r['regret_max']:.4f} "
              f"(of the gap: median {r['gap_regret_median']:.3f} max {r['gap_regret_max']:.3f}), "
              f"cost {r['cost_runs']:.2f} runs, wall {r['wall_runs']:.2f} runs ({time.perf_counter() - t0:.1f} s)")
    first = results[names[0]]
    print(f"within_1pct={first['within_1pct']:.2f} cost_runs={first['cost_runs']:.2f}")
    return results


if __name__ == "__main__":
    main()
