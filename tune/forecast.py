"""A study's cost before anything is spent: a short probe of its own model, data and batch, and the
arithmetic that turns it into the ``forecast:`` line, the time budget check and the live view's first ETA.

**What is measured** (:func:`run_probe`). ``c`` = min(``tune.max_concurrent_trials``, ``num_samples``)
processes at once, each like a trial's worker (``python -m tune.forecast``: the trial's thread count, also as
``OMP_NUM_THREADS``; no CUDA device when ``resources_per_trial.gpu`` is 0, as Ray does; the study's run config,
searched values at the fixed config's), open the token cache, build the model and run
:func:`minimind_train.train.train_epochs` for :data:`WARMUP_STEPS` + :data:`PROBE_STEPS` optimizer steps of one
micro-batch each, one evaluation and one checkpoint. The warm-up steps are not timed: a fresh process's first
~20 steps ran 1.3-1.5x slower than the rest of its epoch (benchmarks/README.md section 7), which a trial pays
once per Ray actor. Running ``c`` at once measures what concurrent trials do to each other (cores, memory
bandwidth, a shared GPU). Starting Ray and a trial's actor are the constants below, not measured. With
``--address`` the probe runs on the driver's machine: the forecast is for its hardware.

**The model** (:func:`forecast`), wall seconds; ``N`` trials, ``c`` slots, ``E`` the trial-epochs ASHA is
expected to leave (:func:`tune.preflight.expected_shape`: its plan and stop fractions)::

    epoch_s    = s_per_batch x batches + s_per_token x (padded tokens of those batches: the data's own
                 length-grouped batches, the first max_steps_per_epoch x accumulation_steps of them when
                 capped; accumulation averaged over its searched choices)
                 + evals_per_epoch x (eval_s + checkpoint_s)
    trial_s    = TRIAL_OVERHEAD_S + init_s + eval_s   (per trial: scheduling and record, model build,
                                                      the untrained model's evaluation)
    search_s   = RAY_START_S + start_s + (N x trial_s + E x epoch_s) / c
                 + (1 - 1/c) x (trial_s + E/N x epoch_s) / 2     (the last trials end unevenly)
    finals_s   = start_s + ceil(F / c) x (trial_s + max_t x epoch_s)   (F = top_k x seeds finalists of
                                                                         expected completed configs)
    total      = search_s + finals_s + END_S
    GPU-hours  = gpu x (N x trial_s + (E + F x max_t) x epoch_s) / 3600

``start_s`` is a probe's own start (imports, data open: what a trial's worker does first). The constants
come from ``benchmarks/study_overhead.py``'s timeline and ``benchmarks/forecast_accuracy.py`` (which
checks the whole formula against real studies; benchmarks/README.md section 7).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (tune.space loads pydantic and the trainer's config; the probe process needs neither)
    from minimind_train.config import RunConfig

    from .space import StudySpec

__all__ = ["END_S", "PROBE_STEPS", "RAY_START_S", "TRIAL_OVERHEAD_S", "WARMUP_STEPS", "EtaPrior", "Forecast",
           "Probe", "ProbeError", "budget_warning", "fitting_samples", "forecast", "print_forecast", "run_probe",
           "steady_cost", "step_cost"]

PROBE_STEPS = 10  # optimizer steps of one micro-batch each that are measured, ...
WARMUP_STEPS = 20  # ... after these (section 7: steps 10-19 of a fresh process still ran ~1.3x slower)
# ray.init and the Tuner's start until the first trial's worker is asked for (benchmarks/README.md,
# section 2's timeline: ray.init returns at ~5 s, the Tuner starts ~1.5 s later; 14 s at a load of 6-7
# on two cores, section 7).
RAY_START_S = 10.0
# Per trial beyond its training: Ray's scheduling, the searcher's ask/tell on the record, the mirror's
# MLflow run, results and reports (section 2: "2-8 slot-seconds between trials").
TRIAL_OVERHEAD_S = 2.0
# After the last trial: the end report, plots, MLflow's parent run, Ray's shutdown (section 2: ~4 s; 10 s
# at a load of 6-7, section 7).
END_S = 6.0
_PROBE_TIMEOUT_S = 900.0  # a dry run on new data tokenises it first


class ProbeError(RuntimeError):
    """The probe did not run; the study runs without a forecast."""


@dataclass(frozen=True)
class Probe:
    """What :func:`run_probe` measured (means over its ``concurrent`` processes)."""

    concurrent: int
    device: str
    threads: int
    start_s: float  # launch to ready: imports and the data opened (a trial worker's start)
    init_s: float  # model and optimizer built
    s_per_token: float  # training seconds per padded token of a micro-batch (an optimizer step each), ...
    eval_s: float  # one evaluation of the validation split
    checkpoint_s: float  # one trial checkpoint written and published
    padded: tuple[int, ...]  # padded tokens of each batch of an epoch, in the trainer's order
    wall_s: float  # the probe's own wall time
    s_per_batch: float = 0.0  # ... plus seconds per micro-batch whatever its size (the optimizer step, launches)


@dataclass(frozen=True)
class EtaPrior:
    """What the live view starts its ETA from in one phase: ``expected_epochs`` per trial (ASHA's
    expectation), ``s_per_trial_epoch`` wall seconds per trial-epoch with ``slots`` trials at once, per-trial
    costs included, ``start_s`` a trial worker's start, ``after_s`` the forecast of what follows the phase
    (finalists, end report)."""

    expected_epochs: float
    s_per_trial_epoch: float
    after_s: float
    start_s: float = 0.0
    slots: int = 1


@dataclass(frozen=True)
class Forecast:
    """A study's expected wall time and its parts (:func:`forecast`)."""

    total_s: float
    search_s: float
    finalists_s: float
    end_s: float
    trials: int
    slots: int
    trial_epochs: float  # search and finalists
    search_trial_epochs: float
    finalists: int
    epochs: float  # a whole trial's (tune.scheduler.max_t evaluations)
    epoch_s: float
    steps_per_epoch: float
    evals_per_epoch: int
    trial_s: float
    gpu_hours: float | None
    probe: Probe
    # (cheapest, dearest) total when a trial's cost follows a searched value (accumulation under a cap on
    # optimizer steps: accumulation 4 trains 4x the micro-batches of 1); None when every trial costs the same
    total_range_s: tuple[float, float] | None = None
    epoch_range_s: tuple[float, float] | None = None
    accumulations: tuple[int, ...] = (1,)  # the searched accumulation steps an epoch's steps are averaged over

    def prior(self, phase: str) -> EtaPrior:
        """The live view's :class:`EtaPrior` for ``phase`` (``search`` or ``finalists``)."""
        start = self.probe.start_s
        if phase == "finalists":
            slots = max(1, min(self.slots, self.finalists))
            return EtaPrior(self.epochs, (self.trial_s / self.epochs + self.epoch_s) / slots, self.end_s, start, slots)
        per_trial = self.search_trial_epochs / max(self.trials, 1)
        work = (self.trials * self.trial_s + self.search_trial_epochs * self.epoch_s) / self.slots
        return EtaPrior(per_trial, work / max(self.search_trial_epochs, 1e-9), self.finalists_s + self.end_s, start,
                        self.slots)

    def line(self) -> str:
        """The ``forecast:`` line."""
        gpu = f"; {self.gpu_hours:.2f} GPU-hours" if self.gpu_hours is not None else ""
        p = self.probe
        drawn = spread = ""
        if self.total_range_s is not None and self.epoch_range_s is not None:
            drawn = (f", {duration(self.total_range_s[0])} to {duration(self.total_range_s[1])} by the "
                     f"accumulation the trials draw")
            spread = (f" on average, {self.epoch_range_s[0]:.1f} to {self.epoch_range_s[1]:.1f} s by its "
                      f"accumulation")
        # (an average over a searched accumulation is said, so it is not read against --dry-run's fixed-config steps)
        steps = f"{self.steps_per_epoch:.0f} steps" + (
            f" on average over accumulation_steps {', '.join(map(str, self.accumulations))}"
            if len(self.accumulations) > 1 else "")
        return (f"forecast: {duration(self.total_s)} for the study (search {duration(self.search_s)}, finalists "
                f"{duration(self.finalists_s)}{drawn}); {self.trial_epochs:.1f} trial-epochs expected ({self.trials} "
                f"trials under the plan, {self.finalists} finalists), {self.slots} at once{gpu}; an epoch "
                f"{self.epoch_s:.1f} s{spread} ({steps}, {self.evals_per_epoch} evaluation(s) of "
                f"{p.eval_s:.1f} s); probe: {p.concurrent} at once on {p.device}, {p.threads} thread(s) each, "
                f"{p.wall_s:.1f} s")


def duration(seconds: float) -> str:
    """``H:MM:SS``."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _epoch_tokens(probe: Probe, run: RunConfig, accumulations: tuple[int, ...]) -> tuple[float, float, float]:
    """(padded tokens, micro-batches, optimizer steps) of an epoch, averaged over the ``accumulations`` a
    trial may use."""
    cap, mean = run.train.max_steps_per_epoch, statistics.fmean
    batches = [min(len(probe.padded), cap * acc) if cap else len(probe.padded) for acc in accumulations]
    return (mean(sum(probe.padded[:n]) for n in batches), mean(batches),
            mean(math.ceil(n / acc) for n, acc in zip(batches, accumulations)))


def _accumulations(spec: StudySpec) -> tuple[int, ...]:
    """The accumulation steps trials use: a searched categorical's choices, else the fixed value (a searched
    int or float range is taken at the fixed value)."""
    for p in spec.search:
        if p.path == "train.accumulation_steps" and p.type == "categorical":
            return tuple(int(c) for c in p.choices)
    return (spec.run.train.accumulation_steps,)


def forecast(spec: StudySpec, probe: Probe, num_samples: int | None = None, continued_epochs: float = 0.0,
             accumulations: tuple[int, ...] | None = None, completed_before: int = 0,
             finalists_done: int = 0) -> Forecast:
    """The study's :class:`Forecast` (the module docstring's model) from ``probe``; ``num_samples`` new
    search trials (default ``tune.num_samples``) and, on ``--resume``, ``continued_epochs`` left to
    unfinished trials (each one more trial), ``completed_before`` search trials completed in earlier runs
    (finalist candidates) and ``finalists_done`` finalists finished. An epoch is averaged over the accumulation
    steps trials may draw (``accumulations``, default the space's); when that changes an epoch's cost (a cap on optimizer
    steps), ``total_range_s`` is the study with every trial at the cheapest and at the dearest one (a study
    of a few trials can land anywhere in it: benchmarks/README.md section 7)."""
    from .preflight import expected_shape

    t, run = spec.tune, spec.run
    evals = run.train.evals_per_epoch
    epochs = t.scheduler.max_t / evals  # (max_t and ASHA's rungs count evaluations)
    n_new = t.num_samples if num_samples is None else num_samples
    continued = math.ceil(continued_epochs / epochs) if continued_epochs else 0
    trials = n_new + continued
    shape = expected_shape(n_new, t.scheduler, evals_per_epoch=evals) if n_new else None
    search_te = (shape.trial_epochs if shape else 0.0) + continued_epochs
    completed = (shape.completed if shape else 0.0) + continued + completed_before
    finalists = (max(0, round(min(t.finalists.top_k, completed) * t.finalists.seeds) - finalists_done)
                 if t.finalists.seeds else 0)
    choices = accumulations or _accumulations(spec)
    tokens, batches, steps = _epoch_tokens(probe, run, choices)
    epoch_s = batches * probe.s_per_batch + tokens * probe.s_per_token + evals * (probe.eval_s + probe.checkpoint_s)
    trial_s = TRIAL_OVERHEAD_S + probe.init_s + probe.eval_s
    slots = max(1, min(t.max_concurrent_trials, max(trials, 1)))
    search_s = (RAY_START_S + probe.start_s + (trials * trial_s + search_te * epoch_s) / slots
                + (1 - 1 / slots) * (trial_s + search_te / trials * epoch_s) / 2) if trials else 0.0
    final_slots = max(1, min(slots, finalists))
    finals_s = (probe.start_s + math.ceil(finalists / final_slots) * (trial_s + epochs * epoch_s)
                + (0 if trials else RAY_START_S)) if finalists else 0.0
    gpu = t.resources_per_trial.gpu
    gpu_hours = (gpu * ((trials + finalists) * trial_s + (search_te + finalists * epochs) * epoch_s) / 3600
                 if gpu > 0 else None)
    result = Forecast(search_s + finals_s + END_S, search_s, finals_s, END_S, trials, slots,
                      search_te + finalists * epochs, search_te, finalists, epochs, epoch_s, steps, evals,
                      trial_s, gpu_hours, probe, accumulations=choices)
    if len(choices) < 2:
        return result
    ends = [forecast(spec, probe, num_samples, continued_epochs, (a,), completed_before, finalists_done)
            for a in (min(choices), max(choices))]
    if ends[1].epoch_s <= 1.1 * ends[0].epoch_s:  # (no cap: an epoch is the same data whatever the accumulation)
        return result
    return dataclasses.replace(result, total_range_s=(ends[0].total_s, ends[1].total_s),
                               epoch_range_s=(ends[0].epoch_s, ends[1].epoch_s))


def fitting_samples(spec: StudySpec, probe: Probe, budget_s: float) -> int:
    """The largest ``--num-samples`` whose forecast fits in ``budget_s`` (0 when not even one does)."""
    # (a bisection: the forecast grows with the number of trials)
    return bisect.bisect_right(range(1, spec.tune.num_samples + 1), budget_s,
                               key=lambda n: forecast(spec, probe, n).total_s)


def budget_warning(spec: StudySpec, probe: Probe, result: Forecast, used_s: float = 0.0) -> str | None:
    """A ``warning:`` line when ``tune.time_budget_s`` (less ``used_s`` by earlier runs) is shorter than the
    forecast, with the ``--num-samples`` that fits; None when it fits or there is no budget."""
    budget = spec.tune.time_budget_s
    if budget is None or result.total_s <= budget - used_s:
        return None
    fits = fitting_samples(spec, probe, budget - used_s)
    advice = (f"about {fits} trials fit (--num-samples {fits}), or raise --time-budget-s" if fits else
              "not even one trial fits: raise --time-budget-s")
    return (f"warning: the forecast {duration(result.total_s)} is longer than the time budget left "
            f"(tune.time_budget_s={budget:g}: {duration(budget - used_s)}), which stops the study early: {advice}")


def print_forecast(spec: StudySpec, caches: dict[str, Any] | None = None, num_samples: int | None = None,
                   continued_epochs: float = 0.0, used_s: float = 0.0, completed_before: int = 0,
                   finalists_done: int = 0) -> Forecast | None:
    """Probe (:func:`run_probe`), print the ``forecast:`` line and, when the time budget is shorter, the
    warning (:func:`budget_warning`); None, with a ``forecast: not available`` line, when the probe failed
    (the study itself does not depend on it)."""
    print("forecast: probing the study's trial ...", flush=True)
    try:
        probe = run_probe(spec, caches)
    except (ProbeError, OSError, ValueError) as exc:
        print(f"forecast: not available (the probe failed: {exc})", flush=True)
        return None
    result = forecast(spec, probe, num_samples, continued_epochs, None, completed_before, finalists_done)
    print(result.line(), flush=True)
    if (warning := budget_warning(spec, probe, result, used_s)) is not None:
        print(warning, file=sys.stderr, flush=True)
    return result


def run_probe(spec: StudySpec, caches: dict[str, Any] | None = None, timeout_s: float = _PROBE_TIMEOUT_S) -> Probe:
    """Measure the study's trial in ``c`` concurrent processes (the module docstring). ``caches``: the token
    cache the driver prepared (``train``, ``val``, ``pad_id``, ``vocab_size``); None: the first process
    prepares it (tokenising the data when the cache has none), the others wait for it.

    Raises:
        ProbeError: a probe process failed or ran past ``timeout_s``; its last error line is the message.
    """
    from minimind_train.config import run_config_to_dict

    t = spec.tune
    count = max(1, min(t.max_concurrent_trials, t.num_samples))
    threads = max(1, int(t.resources_per_trial.cpu))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_ARENA_MAX": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    if t.resources_per_trial.gpu == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""  # as Ray does for a trial without a GPU
    folder = Path(tempfile.mkdtemp(prefix="minimind-probe-"))
    procs: list[subprocess.Popen[bytes]] = []
    started = time.time()
    try:
        request = {"run": run_config_to_dict(spec.trial_run), "caches": caches, "count": count,
                   "steps": WARMUP_STEPS + PROBE_STEPS, "launched": started}
        (folder / "request.json").write_text(json.dumps(request), encoding="utf-8")
        for i in range(count):
            with (folder / f"log-{i}.txt").open("wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "tune.forecast", str(folder), str(i)],
                                              stdout=subprocess.DEVNULL, stderr=log, env=env))
        for i, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=max(1.0, started + timeout_s - time.time()))
            except subprocess.TimeoutExpired as exc:
                raise ProbeError(f"the probe ran past {timeout_s:.0f} s") from exc
            if code != 0:
                lines = (folder / f"log-{i}.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()
                raise ProbeError(lines[-1] if lines else f"probe process exited with status {code}")
        results = [json.loads((folder / f"result-{i}.json").read_text(encoding="utf-8")) for i in range(count)]
    finally:
        for proc in procs:  # (only ours; a probe still running after an error or Ctrl-C)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)

    means = {key: sum(float(r[key]) for r in results) / count
             for key in ("start_s", "init_s", "s_per_token", "eval_s", "checkpoint_s", "s_per_batch")}
    return Probe(count, results[0]["device"], threads, padded=tuple(results[0]["padded"]),
                 wall_s=time.time() - started, **means)


def step_cost(tokens: list[int], seconds: list[float]) -> tuple[float, float]:
    """``(s_per_batch, s_per_token)``: the least-squares line ``seconds = a + b x tokens`` through the probe's
    micro-batches (their lengths differ: the trainer's batch order is shuffled); where noise makes either
    negative, the one that is not (all the time per token when the sizes barely differ)."""
    try:
        b, a = statistics.linear_regression(tokens, seconds)
    except statistics.StatisticsError:  # (one size only)
        b = -1.0
    if b < 0:
        return sum(seconds) / len(seconds), 0.0
    if a < 0:
        return 0.0, sum(seconds) / sum(tokens)
    return a, b


def steady_cost(stamps: list[float], padded: list[int]) -> tuple[float, float]:
    """:func:`step_cost` of the probe's steps after the :data:`WARMUP_STEPS` (``stamps``: when each step
    ended, ``padded``: each batch's padded tokens); with fewer batches than warm-up and
    :data:`PROBE_STEPS` together, fewer are left out (at least the first: allocations, the first kernels)."""
    skip = max(1, min(WARMUP_STEPS, len(stamps) - PROBE_STEPS))
    return step_cost(padded[skip:len(stamps)], [b - a for a, b in itertools.pairwise(stamps[skip - 1:])])


def _wait_for(path: Path, what: str, timeout_s: float = _PROBE_TIMEOUT_S) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise ProbeError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.02)


def _probe_main(folder: Path, index: int) -> None:
    """One probe process (``python -m tune.forecast FOLDER INDEX``): writes ``result-INDEX.json``."""
    from minimind_train.batches import batch_indices
    from minimind_train.checkpoint import init_state, save_checkpoint
    from minimind_train.config import run_config_from_dict
    from minimind_train.data import open_prepared, prepare_data
    from minimind_train.train import train_epochs

    request = json.loads((folder / "request.json").read_text(encoding="utf-8"))
    cfg = run_config_from_dict(request["run"])
    imported = time.time()
    caches = request["caches"]
    if caches is None:  # a dry run: the first process finds (or builds) the token cache, the others wait
        if index == 0:
            data = prepare_data(cfg.data, show_progress=False)
            s = data.stats
            caches = {"train": s.cache_path, "val": s.val_cache_path, "pad_id": data.pad_id,
                      "vocab_size": data.vocab_size}
            from .atomic import write_atomic  # (in the probe's process, where only it is needed)

            write_atomic(folder / "data.json", json.dumps(caches), durable=False)
        else:
            _wait_for(folder / "data.json", "the token cache")
            caches = json.loads((folder / "data.json").read_text(encoding="utf-8"))
    t0 = time.time()
    data = open_prepared(cfg.data, caches["train"], caches["val"], pad_id=caches["pad_id"],
                         vocab_size=caches["vocab_size"])
    start_s = imported - request["launched"] + (time.time() - t0)  # (not the cache's preparation)
    # All processes measure at once (a barrier in the folder): that is what concurrent trials do.
    (folder / f"ready-{index}").touch()
    for i in range(request["count"]):
        _wait_for(folder / f"ready-{i}", "the other probe processes")
    train = dataclasses.replace(cfg.train, epochs=1, max_steps_per_epoch=request["steps"], accumulation_steps=1,
                                evals_per_epoch=1, divergence_loss_factor=0.0, divergence_grad_norm=0.0)
    cfg = dataclasses.replace(cfg, train=train)
    t0 = time.perf_counter()
    state = init_state(cfg, vocab_size=cfg.model.vocab_size or data.vocab_size)
    init_s = time.perf_counter() - t0
    stamps: list[float] = []
    result = next(iter(train_epochs(cfg, data, state, on_step=lambda _: stamps.append(time.perf_counter()))))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minimind-probe-ckpt-", dir=folder) as tmp:
        local = save_checkpoint(Path(tmp) / "checkpoint", result.state, cfg, result.metrics, {})
        # What tune.storage.write_checkpoint does with a local trial folder (not imported: pyarrow's import
        # would add half a second to every probe).
        shutil.copytree(local, Path(tmp) / "epoch_0001")
    checkpoint_s = time.perf_counter() - t0
    order = batch_indices(data.train.lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=0, shuffle=True,
                          group_by_length=cfg.data.group_by_length)
    padded = [len(items) * int(data.train.lengths[items].max()) for items in order]
    if len(stamps) > 1:
        s_per_batch, s_per_token = steady_cost(stamps, padded)
    else:  # (one step: its own time)
        s_per_batch, s_per_token = 0.0, result.metrics["epoch_seconds"] / padded[0]
    out = {"device": str(state.device), "start_s": start_s, "init_s": init_s, "s_per_token": s_per_token,
           "s_per_batch": s_per_batch, "eval_s": result.metrics["val_seconds"], "checkpoint_s": checkpoint_s,
           "padded": padded}
    (folder / f"result-{index}.json").write_text(json.dumps(out), encoding="utf-8")


if __name__ == "__main__":
    _probe_main(Path(sys.argv[1]), int(sys.argv[2]))
