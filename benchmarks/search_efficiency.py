"""Search efficiency: TPE + ASHA against full-budget random search, in trial-epochs to the same quality.

    nice -n 10 python benchmarks/search_efficiency.py [--datasets demo,real] [--seeds 5] [--num-samples 10]

For each dataset (the bundled demo data; a real one, ``../shared/data/alpaca_zh_demo.jsonl`` with the
MiniMind2 tokenizer of ``../shared/fixtures/minimind2`` when present) and each searcher seed, three
searches over the same model, search space and budget (``--space``, default ``search_spaces/sft.yaml``:
its model, its ``search`` section, ``train.epochs`` and its ASHA ``grace_period``/``reduction_factor``;
``--num-samples`` trials per search):

* ``random``: Optuna's random sampler, every trial trained for all epochs (no pruner);
* ``tpe+asha``: Optuna's TPE sampler and Optuna's SuccessiveHalvingPruner (ASHA), the study's defaults;
* ``random+asha``: the random sampler with ASHA, which separates ASHA's share of the saving from TPE's
  (it draws random search's configs, so its curves come from the cache at no training cost).

All come from the study's own factories (:func:`tune.searcher.make_sampler`, :func:`make_pruner`) and
are driven through Optuna's ask-and-tell interface with the project's trainer
(:func:`minimind_train.train.train_epochs`), in this one process, one trial after another, without
Ray. The rules are the study's (``tune.searcher.RecordScheduler`` and ``StudyRecord.finish``): after
each epoch the trial reports the objective as that epoch's intermediate value and the pruner is
consulted, never after the last epoch; a pruned trial is told PRUNED, a diverged one FAIL, a completed
one its best epoch's value. One difference: trials run one at a time here, while a study runs
``max_concurrent_trials`` at once (TPE then sees each result one trial later, and ASHA rungs fill in a
different order).

Printed per dataset and method: trial-epochs used, best objective (median and range over seeds; the
best completed trial's value, what the study would export), and the trial-epochs each search needed
to come within ``--tolerance`` (1 %) of random search's median best; the goal is that TPE + ASHA needs
at most 1/3 of random's trial-epochs. Then, to say what bounds the result: each ASHA rung's fidelity
(Spearman rank correlation of the objective at the rung and at the last epoch, over random search's
fully trained trials: the study's own end-of-study check) and how often TPE's best trial was one of
its random start-up trials. ``--out`` writes every trial's curve as JSON.

Cache: a trial's per-epoch curve depends only on its run config (searched values, model, training
seed: the same for every trial and method, like a study's ``train.seed``), the tokens it trains
and validates on, and torch; so each curve is stored under ``--cache-dir`` keyed by exactly those, and a
config drawn again (TPE's start-up trials are the random sampler's first draws for the same seed,
another searcher seed, a rerun) reuses it instead of training again. A curve cut short by the pruner is
stored as far as it got and trained again from scratch when a later trial needs more epochs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import optuna
import torch

# The project's public functions this benchmark drives, all here should they move or be renamed.
from minimind_train.config import RunConfig, run_config_to_dict
from minimind_train.data import DEMO_DATA_PATH, SFTData, prepare_data
from minimind_train.train import TrainingDiverged, train_epochs
from tune.searcher import make_pruner, make_sampler
from tune.space import StudySpec, load_space, optuna_distributions

__all__ = [
    "METHODS",
    "Budget",
    "Comparison",
    "CurveCache",
    "DatasetSpec",
    "Method",
    "Objective",
    "SearchRun",
    "TrainedObjective",
    "TrialOutcome",
    "compare",
    "main",
    "run_search",
    "rung_fidelity",
    "startup_trials",
]

GOAL_RATIO = 1 / 3
SHARED = REPO.parent / "shared"

# A trial's curve: the objective after epoch 1, 2, ... of a trial with the given params, produced
# lazily (trained on demand); a non-finite value means the trial diverged and ends it.
Objective = Callable[[Mapping[str, Any]], Iterator[float]]


@dataclass(frozen=True)
class Method:
    """A search method: a sampler and a pruner kind of :func:`make_sampler` / :func:`make_pruner`."""

    name: str
    sampler: str
    pruner: str


# random+asha separates ASHA's share from TPE's: the random sampler draws the same configs whatever
# the pruner does, so it trains nothing that random search did not (its curves are prefixes of those).
METHODS = (Method("random", "random", "none"), Method("random+asha", "random", "asha"),
           Method("tpe+asha", "optuna", "asha"))
BASELINE, CANDIDATE = "random", "tpe+asha"


@dataclass(frozen=True)
class Budget:
    """The rules every method shares: trials per search, epochs per trial, ASHA's rungs, the direction."""

    num_samples: int
    epochs: int
    grace_period: int = 1
    reduction_factor: int = 2
    mode: str = "min"


@dataclass(frozen=True)
class TrialOutcome:
    """One trial: its params, the objective after each epoch it ran (finite values only), how it ended
    (``completed``, ``pruned`` or ``diverged``) and the trial-epochs it used (a diverged epoch counts)."""

    params: dict[str, Any]
    values: tuple[float, ...]
    state: str
    epochs: int

    def value(self, mode: str) -> float | None:
        """The value the study tells Optuna for a completed trial (its best epoch); None otherwise."""
        if self.state != "completed" or not self.values:
            return None
        return min(self.values) if mode == "min" else max(self.values)


@dataclass(frozen=True)
class SearchRun:
    """One search (a method and a searcher seed): its trials in the order they ran."""

    method: str
    seed: int
    mode: str
    trials: tuple[TrialOutcome, ...]

    @property
    def trial_epochs(self) -> int:
        return sum(t.epochs for t in self.trials)

    def progress(self) -> list[tuple[int, float | None]]:
        """After each trial: (trial-epochs used so far, best completed value so far or None)."""
        out: list[tuple[int, float | None]] = []
        used, best = 0, None
        for trial in self.trials:
            used += trial.epochs
            value = trial.value(self.mode)
            if value is not None and (best is None or _better(value, best, self.mode)):
                best = value
            out.append((used, best))
        return out

    @property
    def best(self) -> float | None:
        return self.progress()[-1][1] if self.trials else None

    @property
    def best_trial(self) -> int | None:
        """Index of the first completed trial with the best value; None when none completed."""
        best = self.best
        return None if best is None else next(i for i, t in enumerate(self.trials) if t.value(self.mode) == best)

    def epochs_to_reach(self, target: float) -> int | None:
        """Trial-epochs used when the best completed value first reached ``target``; None if never."""
        for used, best in self.progress():
            if best is not None and (best == target or _better(best, target, self.mode)):
                return used
        return None


def _better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def run_search(method: Method, seed: int, budget: Budget,
               distributions: Mapping[str, optuna.distributions.BaseDistribution],
               objective: Objective) -> SearchRun:
    """Run ``budget.num_samples`` trials of ``method`` one after another with Optuna's ask-and-tell.

    The pruner is consulted after every epoch but the last, with that epoch's value as the trial's
    intermediate value (the study's rule); a non-finite value fails the trial (the study's divergence).
    """
    study = optuna.create_study(
        direction="minimize" if budget.mode == "min" else "maximize",
        sampler=make_sampler(method.sampler, seed, budget.num_samples),
        pruner=make_pruner(method.pruner, budget.grace_period, budget.reduction_factor))
    trials = []
    for _ in range(budget.num_samples):
        trial = study.ask(dict(distributions))
        values: list[float] = []
        state, used = "completed", 0
        for epoch, value in enumerate(objective(trial.params), start=1):
            used = epoch
            if not math.isfinite(value):
                state = "diverged"
                break
            values.append(value)
            trial.report(value, epoch)
            if epoch >= budget.epochs:
                break
            if trial.should_prune():
                state = "pruned"
                break
        if state == "completed" and len(values) < budget.epochs:
            raise RuntimeError(f"the objective gave {len(values)} epochs of {budget.epochs} for {trial.params}")
        outcome = TrialOutcome(dict(trial.params), tuple(values), state, used)
        if state == "completed":
            study.tell(trial, outcome.value(budget.mode))
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED if state == "pruned"
                       else optuna.trial.TrialState.FAIL)
        trials.append(outcome)
    return SearchRun(method.name, seed, budget.mode, tuple(trials))


# ---------------------------------------------------------------------------------------------------
# The comparison.


def _median(values: Sequence[float | None], missing: float) -> float | None:
    """Median with None counted as ``missing`` (inf: never reached); None when the median is missing."""
    if not values:
        return None
    m = statistics.median([missing if v is None else v for v in values])
    return None if math.isinf(m) else m


@dataclass(frozen=True)
class MethodSummary:
    """Per searcher seed: trial-epochs used, best value, trial-epochs to the target (None: not reached)."""

    method: str
    seeds: tuple[int, ...]
    trial_epochs: tuple[int, ...]
    best: tuple[float | None, ...]
    to_target: tuple[int | None, ...]

    @property
    def median_trial_epochs(self) -> float:
        return float(statistics.median(self.trial_epochs))

    def median_best(self, mode: str) -> float | None:
        return _median(self.best, math.inf if mode == "min" else -math.inf)

    @property
    def median_to_target(self) -> float | None:
        return _median(self.to_target, math.inf)


@dataclass(frozen=True)
class Comparison:
    """``candidate`` against ``baseline``: the target is the baseline's median best within ``tolerance``."""

    mode: str
    tolerance: float
    reference: float
    target: float
    summaries: dict[str, MethodSummary]

    @property
    def ratio(self) -> float | None:
        """Median trial-epochs the candidate needed to reach the target / the baseline's median trial-epochs."""
        needed = self.summaries[CANDIDATE].median_to_target
        return None if needed is None else needed / self.summaries[BASELINE].median_trial_epochs

    @property
    def goal_met(self) -> bool:
        return self.ratio is not None and self.ratio <= GOAL_RATIO + 1e-12


def compare(runs: Sequence[SearchRun], tolerance: float = 0.01) -> Comparison:
    """Summarise each method over its seeds and how soon each reaches the baseline's median best.

    Target: ``m * (1 + tolerance)`` for ``mode: min`` (``m * (1 - tolerance)`` for max), where ``m`` is
    the median over seeds of random search's best value. Raises ValueError without baseline runs or
    when no baseline run completed a trial.
    """
    if not runs:
        raise ValueError("no search runs to compare")
    mode = runs[0].mode
    by_method: dict[str, list[SearchRun]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    if BASELINE not in by_method or CANDIDATE not in by_method:
        raise ValueError(f"need runs of {BASELINE!r} and {CANDIDATE!r}; got {sorted(by_method)}")
    reference = _median([r.best for r in by_method[BASELINE]], math.inf if mode == "min" else -math.inf)
    if reference is None:
        raise ValueError("random search completed no trial in most seeds: there is no quality to match")
    target = reference * (1 + tolerance) if mode == "min" else reference * (1 - tolerance)
    summaries = {}
    for name, group in by_method.items():
        group = sorted(group, key=lambda r: r.seed)
        summaries[name] = MethodSummary(name, tuple(r.seed for r in group), tuple(r.trial_epochs for r in group),
                                        tuple(r.best for r in group), tuple(r.epochs_to_reach(target) for r in group))
    return Comparison(mode, tolerance, reference, target, summaries)


def rung_fidelity(runs: Sequence[SearchRun], budget: Budget) -> dict[int, tuple[int, float | None]]:
    """Per ASHA rung below the last epoch: (trials, Spearman rank correlation between the objective at
    that epoch and at the last epoch) over random search's trials, which all ran every epoch -- the
    definition of the study's end-of-study check (``tune.report.rung_fidelity``: pandas ranks, ties
    averaged); None with fewer than 3 trials."""
    import pandas as pd

    curves = {json.dumps(t.params, sort_keys=True, default=str): t.values
              for r in runs if r.method == BASELINE for t in r.trials if t.state == "completed"}
    out: dict[int, tuple[int, float | None]] = {}
    rung = budget.grace_period
    while rung < budget.epochs:
        pairs = [(v[rung - 1], v[-1]) for v in curves.values()]
        rho = None
        if len(pairs) >= 3:
            at_rung, final = (pd.Series(x) for x in zip(*pairs))
            value = at_rung.rank().corr(final.rank())
            rho = None if math.isnan(value) else float(value)
        out[rung] = (len(pairs), rho)
        rung *= budget.reduction_factor
    return out


def startup_trials(runs: Sequence[SearchRun], method: str = CANDIDATE) -> dict[int, int]:
    """Per seed: how many of ``method``'s first trials are the random sampler's first draws for that seed
    (TPE's start-up trials), found by comparing params with random search's trials."""
    random_runs = {r.seed: r for r in runs if r.method == BASELINE}
    out = {}
    for run in runs:
        if run.method != method or run.seed not in random_runs:
            continue
        n = 0
        for mine, theirs in zip(run.trials, random_runs[run.seed].trials):
            if mine.params != theirs.params:
                break
            n += 1
        out[run.seed] = n
    return out


def format_comparison(name: str, comparison: Comparison, metric: str) -> str:
    """The printed table of one dataset."""
    c = comparison
    head = f"{'method':<11} {'trial-epochs median [range]':<28} {f'best {metric} median [range]':<30}"
    target = (f"[{name}] target: random's median best {metric} {c.reference:.4f} within {c.tolerance:.0%} "
              f"-> {c.target:.4f}")
    lines = [target, f"{head} trial-epochs to target per seed (median)"]
    for s in c.summaries.values():
        finite = [b for b in s.best if b is not None]
        best = (f"{s.median_best(c.mode):.4f} [{min(finite):.4f}-{max(finite):.4f}]" if finite
                and s.median_best(c.mode) is not None else "none completed")
        reach = ", ".join("-" if v is None else str(v) for v in s.to_target)
        med = s.median_to_target
        lines.append(f"{s.method:<11} {f'{s.median_trial_epochs:g} [{min(s.trial_epochs)}-{max(s.trial_epochs)}]':<28} "
                     f"{best:<30} {reach} ({'not reached' if med is None else f'{med:g}'})")
    if c.ratio is None:
        verdict = (f"{CANDIDATE} did not reach the target in most seeds within "
                   f"{c.summaries[CANDIDATE].median_trial_epochs:g} trial-epochs")
    else:
        verdict = (f"{CANDIDATE} needs {c.summaries[CANDIDATE].median_to_target:g} trial-epochs = "
                   f"{c.ratio:.2f} x random's {c.summaries[BASELINE].median_trial_epochs:g}")
    lines.append(f"[{name}] {verdict}; goal <= 1/3: {'met' if c.goal_met else 'missed'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The trainer as an objective, with its curves cached.


class CurveCache:
    """Per-epoch metrics of trained trials, one JSON file per key under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def load(self, key: str) -> dict[str, Any] | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def save(self, key: str, entry: Mapping[str, Any]) -> None:
        path = self.folder / f"{key}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry, sort_keys=True), encoding="utf-8")
        tmp.replace(path)


_KEPT_METRICS = ("val_loss", "train_loss", "epoch_seconds", "val_seconds")
# Paths are replaced by the digest of the tokens they produce (the same tokens from another path are
# the same trial); everything else in the run config is part of the key.
_PATH_FIELDS = {"data": ("train_path", "val_path", "tokenizer", "cache_dir")}


def _digest_tokens(data: SFTData) -> str:
    """sha256 over every train and validation sample's input ids and labels, the vocab and pad id."""
    h = hashlib.sha256(f"{data.vocab_size}:{data.pad_id}".encode())
    for split in (data.train, data.val):
        h.update(f"|{len(split)}|".encode())
        for i in range(len(split)):
            ids, labels = split.batch([i], data.pad_id)  # (1, T): the sample itself, unpadded
            h.update(ids.numpy().tobytes())
            h.update(labels.numpy().tobytes())
    return h.hexdigest()


class TrainedObjective:
    """The project's trainer as an :data:`Objective` over ``base`` with searched values applied.

    Counts ``trained_epochs`` (epochs actually trained, retraining included), ``reused_epochs`` (read
    from the cache) and ``train_seconds`` (training + validation time of the trained epochs).
    """

    def __init__(self, base: RunConfig, data: SFTData, cache: CurveCache, metric: str = "val_loss") -> None:
        self.base, self.data, self.cache, self.metric = base, data, cache, metric
        self.tokens = _digest_tokens(data)
        self.trained_epochs = self.reused_epochs = 0
        self.train_seconds = 0.0

    def key(self, cfg: RunConfig) -> str:
        raw = run_config_to_dict(cfg)
        for section, names in _PATH_FIELDS.items():
            for name in names:
                raw[section].pop(name, None)
        text = json.dumps({"run": raw, "tokens": self.tokens, "torch": torch.__version__}, sort_keys=True,
                          default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def __call__(self, params: Mapping[str, Any]) -> Iterator[float]:
        cfg = self.base.with_overrides(params)
        key = self.key(cfg)
        entry = self.cache.load(key) or {"params": dict(params), "epochs": [], "diverged": None}
        for metrics in entry["epochs"]:
            self.reused_epochs += 1
            yield float(metrics[self.metric])
        if entry["diverged"] is not None:
            yield math.nan
            return
        done = len(entry["epochs"])
        if done >= cfg.train.epochs:
            return
        # A pruned trial's train state is not kept: train from scratch, skipping the cached epochs.
        try:
            for result in train_epochs(cfg, self.data):
                self.trained_epochs += 1
                self.train_seconds += result.metrics["epoch_seconds"] + result.metrics["val_seconds"]
                if result.epoch <= done:
                    continue
                entry["epochs"].append({k: float(result.metrics[k]) for k in _KEPT_METRICS})
                self.cache.save(key, entry)
                yield float(result.metrics[self.metric])
        except TrainingDiverged as exc:
            entry["diverged"] = str(exc)
            self.cache.save(key, entry)
            yield math.nan


# ---------------------------------------------------------------------------------------------------
# Datasets.


@dataclass(frozen=True)
class DatasetSpec:
    """A JSONL file cut into a training part (its first ``train_lines``) and a disjoint validation
    part (its last ``val_lines``); ``tokenizer`` None is the bundled one."""

    name: str
    source: Path
    tokenizer: Path | None
    train_lines: int
    val_lines: int

    def write_parts(self, folder: Path) -> tuple[Path, Path]:
        """The two parts as files under ``folder`` (rewritten only when their content changed).

        Raises ValueError when the file has fewer than ``train_lines + val_lines`` conversations.
        """
        lines = [ln for ln in self.source.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if self.train_lines < 1 or self.val_lines < 1 or self.train_lines + self.val_lines > len(lines):
            raise ValueError(f"{self.source} has {len(lines)} conversations; train_lines={self.train_lines} + "
                             f"val_lines={self.val_lines} must be >= 1 each and at most that many")
        folder.mkdir(parents=True, exist_ok=True)
        parts = []
        for suffix, chosen in ((f"first{self.train_lines}", lines[:self.train_lines]),
                               (f"last{self.val_lines}", lines[-self.val_lines:])):
            path = folder / f"{self.name}-{suffix}.jsonl"
            text = "\n".join(chosen) + "\n"
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                path.write_text(text, encoding="utf-8")
            parts.append(path)
        return parts[0], parts[1]

    def describe(self) -> str:
        tok = "the bundled tokenizer" if self.tokenizer is None else f"tokenizer {self.tokenizer}"
        return (f"{self.source}: first {self.train_lines} conversations train, last {self.val_lines} "
                f"validate; {tok}")


def dataset_specs(args: argparse.Namespace) -> list[DatasetSpec]:
    out = []
    for name in args.datasets.split(","):
        if name == "demo":
            out.append(DatasetSpec("demo", Path(DEMO_DATA_PATH), None, args.demo_train, args.demo_val))
        elif name == "real":
            source = Path(args.real_data)
            if not source.is_file():
                print(f"[real] skipped: {source} is not there", flush=True)
                continue
            tok = Path(args.real_tokenizer)
            if not (tok / "tokenizer.json").is_file():
                print(f"[real] {tok} has no tokenizer.json: using the bundled tokenizer", flush=True)
                tok = None
            out.append(DatasetSpec("real", source, tok, args.real_train, args.real_val))
        else:
            raise SystemExit(f"--datasets: {name!r} is not allowed; use demo and/or real")
    return out


def budget_of(spec: StudySpec, num_samples: int, epochs: int | None) -> Budget:
    scheduler = spec.tune.scheduler
    if scheduler.type != "asha":
        raise SystemExit(f"{spec.source}: tune.scheduler.type={scheduler.type!r}; this benchmark needs asha")
    epochs = epochs or spec.run.train.epochs
    if scheduler.grace_period > epochs:
        raise SystemExit(f"--epochs={epochs} is below the ASHA grace_period={scheduler.grace_period}")
    return Budget(num_samples, epochs, scheduler.grace_period, scheduler.reduction_factor, spec.tune.mode)


def bench_dataset(ds: DatasetSpec, spec: StudySpec, budget: Budget, seeds: Sequence[int], cache_dir: Path,
                  threads: int, tolerance: float) -> dict[str, Any]:
    """Both methods over ``seeds`` on one dataset; returns the JSON-ready record (and prints the table)."""
    train_path, val_path = ds.write_parts(cache_dir / "data")
    fixed: dict[str, Any] = {"data.train_path": str(train_path), "data.val_path": str(val_path),
                             "data.tokenizer": None if ds.tokenizer is None else str(ds.tokenizer),
                             "data.cache_dir": str(cache_dir / "tokens"), "train.epochs": budget.epochs,
                             "train.num_threads": threads}
    base = spec.run.with_overrides(fixed)
    data = prepare_data(base.data, show_progress=False)
    metric = spec.tune.metric
    objective = TrainedObjective(base, data, CurveCache(cache_dir / "curves"), metric)
    distributions = optuna_distributions(spec)
    print(f"[{ds.name}] {ds.describe()} ({len(data.train)} train / {len(data.val)} validation samples); "
          f"{budget.num_samples} trials x {budget.epochs} epochs, ASHA grace {budget.grace_period} "
          f"reduction {budget.reduction_factor}; searcher seeds {list(seeds)}", flush=True)
    start = time.perf_counter()
    runs = []
    for seed in seeds:
        for method in METHODS:  # random first: the others then reuse its curves
            run = run_search(method, seed, budget, distributions, objective)
            runs.append(run)
            best = "none" if run.best is None else f"{run.best:.4f}"
            print(f"[{ds.name}] seed {seed} {method.name:<11} trial-epochs {run.trial_epochs:3d} best {best} "
                  f"(states {_states(run)}; trained so far {objective.trained_epochs}, reused "
                  f"{objective.reused_epochs}, {time.perf_counter() - start:.0f} s)", flush=True)
    comparison = compare(runs, tolerance)
    print(format_comparison(ds.name, comparison, metric), flush=True)
    fidelity = rung_fidelity(runs, budget)
    print(f"[{ds.name}] rung fidelity over random search's trials (Spearman, epoch e vs epoch {budget.epochs}): "
          + ", ".join(f"epoch {e}: {'n/a' if rho is None else f'{rho:+.2f}'} (n={n})"
                      for e, (n, rho) in fidelity.items()), flush=True)
    startup = startup_trials(runs)
    from_startup = [r.seed for r in runs if r.method == CANDIDATE and r.best_trial is not None
                    and r.best_trial < startup.get(r.seed, 0)]
    print(f"[{ds.name}] {CANDIDATE}: start-up (random) trials per seed {list(startup.values())}; the best "
          f"trial was a start-up trial in {len(from_startup)} of {len(startup)} seeds", flush=True)
    return {
        "dataset": ds.name, "description": ds.describe(), "train_samples": len(data.train),
        "val_samples": len(data.val), "budget": asdict(budget),
        "metric": metric, "reference": comparison.reference, "target": comparison.target,
        "ratio": comparison.ratio, "goal_met": comparison.goal_met,
        "rung_fidelity": {str(e): {"trials": n, "spearman": rho} for e, (n, rho) in fidelity.items()},
        "startup_trials": {str(k): v for k, v in startup.items()}, "best_from_startup_seeds": from_startup,
        "summaries": {k: {"seeds": list(v.seeds), "trial_epochs": list(v.trial_epochs), "best": list(v.best),
                          "to_target": list(v.to_target), "median_trial_epochs": v.median_trial_epochs,
                          "median_best": v.median_best(comparison.mode), "median_to_target": v.median_to_target}
                      for k, v in comparison.summaries.items()},
        "compute": {"trained_epochs": objective.trained_epochs, "reused_epochs": objective.reused_epochs,
                    "train_seconds": round(objective.train_seconds, 1),
                    "wall_seconds": round(time.perf_counter() - start, 1)},
        "runs": [{"method": r.method, "seed": r.seed, "trial_epochs": r.trial_epochs, "best": r.best,
                  "best_trial": r.best_trial,
                  "trials": [{"params": t.params, "values": list(t.values), "state": t.state, "epochs": t.epochs}
                             for t in r.trials]} for r in runs],
    }


def _states(run: SearchRun) -> str:
    counts: dict[str, int] = {}
    for t in run.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    return " ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="search_spaces/sft.yaml", help="space file: model, search, epochs, ASHA")
    p.add_argument("--datasets", default="demo,real", help="comma-separated: demo, real")
    p.add_argument("--seeds", type=int, default=5, help="searcher seeds 0..N-1 per method")
    p.add_argument("--num-samples", type=int, default=10, help="trials per search")
    p.add_argument("--epochs", type=int, default=0, help="epochs per trial (0: the space's train.epochs)")
    p.add_argument("--tolerance", type=float, default=0.01, help="within this fraction of random's median best")
    p.add_argument("--demo-train", type=int, default=600, help="first N demo conversations train")
    p.add_argument("--demo-val", type=int, default=300, help="last N demo conversations validate")
    p.add_argument("--real-data", default=str(SHARED / "data" / "alpaca_zh_demo.jsonl"))
    p.add_argument("--real-tokenizer", default=str(SHARED / "fixtures" / "minimind2"))
    p.add_argument("--real-train", type=int, default=200, help="first N real conversations train")
    p.add_argument("--real-val", type=int, default=100, help="last N real conversations validate")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial (a study trial: its CPUs; 0: torch's default)")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "search_efficiency"))
    p.add_argument("--out", default="", help="write the results (every trial's curve) to this JSON file")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.num_samples < 1 or not 0 <= args.tolerance < 1:
        raise SystemExit("--seeds and --num-samples must be >= 1, --tolerance in [0, 1)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_space(args.space)
    budget = budget_of(spec, args.num_samples, args.epochs or None)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"{started}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}, optuna {optuna.__version__}; "
          f"space {spec.source}", flush=True)
    record: dict[str, Any] = {"command": [sys.executable, *sys.argv] if argv is None else list(argv),
                              "started": started, "space": str(spec.source), "datasets": []}
    for ds in dataset_specs(args):
        record["datasets"].append(bench_dataset(ds, spec, budget, range(args.seeds), Path(args.cache_dir),
                                                args.threads, args.tolerance))
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    record["load_average_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


if __name__ == "__main__":
    main()
