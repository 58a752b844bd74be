"""Before Ray starts or anything is written: every input of a study checked, each problem one
:class:`~tune.study.StudyError` naming the key, the value and what is wrong. The data is tokenised here
(into the token cache), the tokenizer and ``init_from`` loaded and shape-checked, the tracking server
asked, and a ``--resume`` compared with its study (:func:`reconcile`); ``--dry-run`` prints the plan
instead (:func:`describe`), with what ASHA is expected to leave (:func:`expected_shape`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimind_train import config

from .space import SchedulerSpec, SearchParam, StudySpec
from .storage import StudyPaths
from .study import PATH_KEYS, RUN_SETTINGS, Manifest, Study, StudyError, diff_specs, evaluation_index

__all__ = ["Inputs", "StudyShape", "check_inputs", "describe", "describe_resume", "expected_shape",
           "quiet_libraries", "reconcile"]


@dataclass(frozen=True)
class Inputs:
    """What the checks found: the tokenised data (``minimind_train.data.SFTData``), the model's parameter
    count, content fingerprints (``dataset``, ``tokenizer``, ...), the MLflow tracking URI, the seconds taken."""

    data: Any
    n_params: int
    fingerprints: dict[str, str]
    tracking_uri: str
    seconds: float


def quiet_libraries() -> None:
    """Keep the driver's output to our progress view and tables."""
    # MLflow's client retries a dead server 7 times with backoff (minutes); the mirror is only a
    # copy of the record, so the driver gives up sooner and warns (tune.mirror.MirrorCallback).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Ray's rich output ignores verbose=0; the legacy one honours it
    # A failed trial is one line from tune.progress; its traceback stays in the trial folder (error.txt).
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Trials report and checkpoint once an evaluation: Ray's advice to report or snapshot less often is moot.
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "60")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import mlflow  # noqa: F401  (it configures its loggers on import; quieten them afterwards)
    import optuna

    for name in ("mlflow", "alembic", "optuna", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Loggers by name, as Ray has no public switch for these: its notice that a local cluster uses token
    # authentication asks nothing of the user; RAY_IGNORE_UNHANDLED_ERRORS would hide every error, not the OS's.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("ray.tune.tune").addFilter(_ray_tune_lines)
    logging.getLogger("ray.tune.execution.tune_controller").addFilter(_no_os_error)
    logging.getLogger("ray._private.worker").addFilter(_no_os_error)
    # The ResultGrid warns ("Failed to fetch metrics ...") of a trial that ended before its first result (a
    # spent time budget, Ctrl-C); the study reads its record, never the ResultGrid.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # MLflow's sqlite store logs a database error with its whole traceback (a full disk: ~60 lines) before
    # raising it; the mirror says in one line that MLflow was not updated and catches up later.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


STOPPING = ("Ctrl-C: stopping the running trials; every finished epoch is kept (continue with --resume). "
            "Ctrl-C again stops at once.")


def _ray_tune_lines(entry: logging.LogRecord) -> bool:
    """A study continues with --resume, never by Ray's `Tuner.restore(...)`: Ray's lines that say so are
    dropped or (its Ctrl-C notice) reworded, and its "Trials did not complete: [...]" (the summary's job)."""
    text = entry.getMessage()
    if text.startswith("Stop signal received"):
        entry.msg, entry.args = STOPPING, ()
        return True
    return not any(s in text for s in ("Tuner.restore", "Trials did not complete"))

_OS_ERROR_LINE = re.compile(r"^\w*Error: \[Errno \d+\] ", re.MULTILINE)  # (str() of an OSError: "[Errno 30] ...")


def _no_os_error(entry: logging.LogRecord) -> bool:
    """Ray's lines of an OS error are dropped, as the driver says it in one line (tune.interrupts.os_problem):
    Tune's "Error stopping trial." with its traceback (~110 lines for a read-only study folder) and "Unhandled
    error ..." of a trial Tune stopped waiting for, the worker's traceback as text (~30 lines). Others are kept."""
    from .interrupts import os_problem

    text, exc = entry.getMessage(), entry.exc_info[1] if entry.exc_info else None
    return not ((exc is not None and os_problem(exc) is not None)
                or (text.startswith("Unhandled error") and _OS_ERROR_LINE.search(text)))


def check_inputs(spec: StudySpec, run_cfg: config.RunConfig, paths: StudyPaths, address: str | None = None) -> Inputs:
    """Tokenise the data, load the tokenizer and ``init_from``, ask the tracking server.
    Raises StudyError naming the key, its value and what is wrong (exit status 2)."""
    t0 = time.perf_counter()
    quiet_libraries()
    import torch

    from minimind_train.checkpoint import WeightMismatchError, load_minimind_weights
    from minimind_train.data import DataError, prepare_data
    from minimind_train.model import build_model, count_parameters
    from minimind_train.tokenizer import load_tokenizer, tokenizer_fingerprint

    from .cluster import file_sha256
    from .tracking import TrackingError, check_tracking_server, resolve_tracking_uri

    gpu = spec.tune.resources_per_trial.gpu
    if gpu > 0 and not (address or os.environ.get("RAY_ADDRESS")) and torch.cuda.device_count() == 0:
        raise StudyError(f"tune.resources_per_trial.gpu={gpu:g} is not allowed: this machine has no GPU that torch "
                         "can use, and no Ray cluster was given (--address); set gpu: 0 to train on CPUs")
    data_cfg = spec.run.data
    try:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    except Exception as exc:
        raise StudyError(f"data.tokenizer={data_cfg.tokenizer!r}: cannot be loaded as a tokenizer "
                         f"({type(exc).__name__}: {exc})") from exc
    try:
        data = prepare_data(data_cfg, tokenizer)
    except (DataError, FileNotFoundError, ValueError, UnicodeDecodeError) as exc:
        name = "val_path" if data_cfg.val_path and str(data_cfg.val_path) in str(exc) else "train_path"
        raise StudyError(f"data.{name}={getattr(data_cfg, name)!r}: {exc}") from exc
    with torch.device("meta"):  # shapes only: no memory, no init
        n_params = count_parameters(build_model(run_cfg.model, len(tokenizer)))
    fingerprints = {"dataset": data.stats.cache_key, "tokenizer": tokenizer_fingerprint(tokenizer)}
    if data.stats.val_cache_key:
        fingerprints["val_dataset"] = data.stats.val_cache_key
    if (init_from := run_cfg.model.init_from) is not None:
        try:
            load_minimind_weights(build_model(run_cfg.model, len(tokenizer)), init_from)
        except Exception as exc:
            why = (f"does not fit the model: {exc}" if isinstance(exc, WeightMismatchError) else "is not a "
                   f"loadable torch state dict ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})")
            raise StudyError(f"model.init_from={init_from!r} {why}") from exc
        fingerprints["model.init_from"] = file_sha256(Path(init_from))
    tracking_uri = resolve_tracking_uri(spec.mlflow.tracking_uri, paths.local_dir)
    # (the study's own sqlite store is created with the study folder: nothing to ask)
    if not (tracking_uri.startswith("sqlite:///") and str(paths.local_dir) in tracking_uri):
        try:
            check_tracking_server(tracking_uri)
        except TrackingError as exc:
            raise StudyError(f"mlflow.tracking_uri: {exc}") from exc
    return Inputs(data, n_params, fingerprints, tracking_uri, time.perf_counter() - t0)


def reconcile(record: Study, spec_dict: dict[str, Any], inputs: Inputs, explicit_space: bool) -> list[str]:
    """Refuse a ``--resume`` whose study definition or input contents changed (each change a
    ``key: old -> new`` line); return the run settings that changed (applied on this run)."""
    edited = diff_specs(record.manifest.spec, spec_dict)
    old, new = record.manifest.fingerprints, inputs.fingerprints
    changed = edited + [f"{key} contents: {old.get(key, '(none)')[:12]} -> {new.get(key, '(none)')[:12]}"
                        for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if changed:
        where = "the space file" if explicit_space else "the study"
        advice = ("resume with the study's own space (--resume --name NAME without --space)" if explicit_space
                  else f"the study's space.yaml was edited: study.json keeps its definition, so undo the edits (or "
                  f"delete {record.dir / 'space.yaml'}: it is written again from study.json)" if edited
                  else "put the input files back as they were")
        raise StudyError(f"--resume refused: {where} defines another study than {record.dir} holds:\n  "
                         + "\n  ".join(changed) + f"\n{advice}, or start a new study (--name NEW) for the changed one")
    settings = diff_specs(record.manifest.spec, spec_dict, ignore=PATH_KEYS)
    paths = diff_specs(record.manifest.spec, spec_dict, ignore=RUN_SETTINGS)
    return settings + [f"{p} (same contents)" for p in paths]


def describe_resume(spec_dict: dict[str, Any], paths: StudyPaths) -> str:
    """For ``--resume --dry-run``: whether the study's definition matches (input contents are
    compared only by a real run, which tokenises the data)."""
    manifest = paths.local_dir / "study.json"
    try:
        old = Manifest.from_json(manifest.read_text(encoding="utf-8"), manifest)
    except (OSError, StudyError) as exc:
        return f"--resume: no study to compare with at {paths.local_dir} ({exc})"
    if changed := diff_specs(old.spec, spec_dict):
        return "--resume would be refused: the space defines another study:\n  " + "\n  ".join(changed)
    return f"--resume: the space matches study {paths.name!r} (created {old.created})"


@dataclass(frozen=True)
class StudyShape:
    """What a plan is expected to give: the search trials that run every epoch (``completed``: what rung
    fidelity, finalists and the answer are made of) and the trial-epochs trained, finalists included."""

    completed: float
    trial_epochs: float


def expected_shape(num_samples: int, sched: SchedulerSpec, top_k: int = 0, seeds: int = 0,
                   draws: int = 2000, evals_per_epoch: int = 1) -> StudyShape:
    """The expected :class:`StudyShape` of ``num_samples`` search trials under ``sched`` (its rungs count
    evaluations, ``evals_per_epoch`` an epoch), then the ``top_k`` best completed configs with ``seeds`` more
    seeds each. ASHA as Optuna's SuccessiveHalvingPruner runs it: at a rung below ``max_t`` the n-th trial
    to arrive continues when within the best ``max(1, n // reduction_factor)`` so far. Trials arrive in
    random order, each rung's ranking drawn afresh (the cautious case; a searcher that improves as it goes
    completes more); the mean over ``draws`` seeded orders."""
    length = sched.max_t  # (in evaluations)
    rungs = [int(r) for r in sched.rungs if r < length]
    rng = random.Random(0)
    completed = trained = 0
    for _ in range(draws):
        arrived: dict[int, list[float]] = {r: [] for r in rungs}
        done = 0
        for _ in range(num_samples):
            stopped_at = 0
            for rung in rungs:
                arrived[rung].append(value := rng.random())
                if value > sorted(arrived[rung])[max(1, len(arrived[rung]) // sched.reduction_factor) - 1]:
                    stopped_at = rung
                    break
            done += not stopped_at
            trained += stopped_at or length
        completed += done
        trained += min(top_k, done) * seeds * length
    return StudyShape(completed / draws, trained / draws / evals_per_epoch)


def _rung_lines(spec: StudySpec, steps_per_epoch: int | None) -> list[str]:
    """ASHA's rungs below ``max_t`` as fractions of an epoch and optimizer steps of the fixed config's epoch
    of ``steps_per_epoch`` steps (None: estimated from the training file's lines less the held-out split;
    samples skipped by tokenising are not known yet, so a little high)."""
    # (imports torch: only a plan with evaluations inside an epoch pays for it; the trainer's formulas)
    from minimind_train import train as trainer

    sched, data, train, n = spec.tune.scheduler, spec.run.data, spec.run.train, spec.run.train.evals_per_epoch
    about, steps = "", steps_per_epoch or 0
    if steps_per_epoch is None:
        with Path(data.train_path or config.DEMO_DATA_PATH).open("rb") as fh:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b""))
        samples = lines if data.val_path else lines - math.floor(lines * data.val_fraction + 0.5)
        about, steps = "about ", trainer.steps_per_epoch(math.ceil(max(samples, 1) / train.batch_size), train)
    at = trainer.evaluation_steps(steps, n)

    def step_of(rung: int) -> int:  # the optimizer step of the first evaluation at or past the rung
        epoch, k = divmod(rung - 1, n)
        return epoch * steps + next(s for s in at if evaluation_index(1, s, steps, n) >= k + 1)

    searched = [k for k in ("train.batch_size", "train.accumulation_steps") if k in {p.path for p in spec.search}]
    note = f"; {' and '.join(searched)} searched: a trial's steps differ, its fractions do not" if searched else ""
    return [f"  evaluations: {n} per epoch, after optimizer steps {', '.join(map(str, at))} of {about}{steps} per "
            f"epoch (fixed config{note})" + ("; fewer steps than evaluations: one after every step" * (steps < n)),
            *(f"    rung after evaluation {int(r)}: {r / n:g} epoch(s), {about}optimizer step {step_of(int(r))}"
              for r in sched.rungs if r < sched.max_t)]


def describe(spec: StudySpec, steps_per_epoch: int | None = None) -> str:
    """The resolved study for ``--dry-run``: fixed config, searched distributions, plan, resources.
    ``steps_per_epoch``: the fixed config's (None: estimated), for where the rungs fall inside an epoch."""
    t, sched, res = spec.tune, spec.tune.scheduler, spec.tune.resources_per_trial
    searched = {p.path for p in spec.search}
    lines = [f"space: {spec.source}", "", "fixed config (* = searched, the search wins):"]
    notes = {"data.train_path": "bundled demo dataset", "data.tokenizer": "bundled tokenizer",
             "data.val_path": f"hold out {_fmt(spec.run.data.val_fraction)} of the training data"}
    for section, values in config.run_config_to_dict(spec.run).items():
        lines.append(f"  {section}:")
        lines += [f"   {'*' if f'{section}.{k}' in searched else ' '}{k}: {_fmt(v)}"
                  + (f"  ({notes[f'{section}.{k}']})" if v is None and f"{section}.{k}" in notes else "")
                  for k, v in values.items()]
    width = max(len(p.path) for p in spec.search)
    budget = "none" if t.time_budget_s is None else f"{_fmt(t.time_budget_s)} s"
    concurrent = min(t.max_concurrent_trials, t.num_samples)
    per_epoch, epochs = spec.run.train.evals_per_epoch, spec.run.train.epochs
    unit = "epoch" if per_epoch == 1 else "evaluation"
    # The last rung can sit at max_t, where every trial stops anyway: not a decision.
    decisions = ", ".join(_fmt(r) for r in sched.rungs if r < sched.max_t) or "none"
    finals = t.finalists.top_k * t.finalists.seeds
    shape = expected_shape(t.num_samples, sched, t.finalists.top_k, t.finalists.seeds, evals_per_epoch=per_epoch)
    lines += ["", f"search space ({len(spec.search)} parameters):",
              *(f"  {p.path.ljust(width)}  {_summary(p)}" for p in spec.search), "", "trial plan:",
              (f"  {t.num_samples} trials, at most {concurrent} at once; searcher "
               f"{'Optuna TPE' if t.searcher == 'optuna' else 'random'} (seed {t.seed}); time budget {budget}"),
              (f"  objective: {t.mode} {t.metric}; up to {t.max_failures} retries per failed trial; keep "
               f"{t.keep_checkpoints} checkpoint(s) per trial, resume state of the top {t.keep_top_trials}"),
              (f"  scheduler ASHA over {unit}s (max_t {sched.max_t}): after {unit} {decisions} a trial continues "
               f"only if in the top 1/{_fmt(sched.reduction_factor)} of the trials that got there")
              if sched.type == "asha" else f"  scheduler none: every trial runs all {sched.max_t} {unit}s",
              *(_rung_lines(spec, steps_per_epoch) if per_epoch > 1 else []),
              *([(f"  expect about {shape.completed:.1f} of the {t.num_samples} trials to complete (trials in "
                 "random order; rung fidelity needs 3, finalists their top_k)")] if sched.type == "asha" else []),
              *([(f"  finalists: the top {t.finalists.top_k} configs again with {t.finalists.seeds} more seed(s) "
                 f"each ({finals} trials of {epochs} epoch(s)); the best mean wins")] if finals else []),
              *([f"  warm start from {t.warm_start} (a new study only)"] if t.warm_start else []),
              (f"  at most {(t.num_samples + finals) * epochs} trial-epochs in total, about "
               f"{shape.trial_epochs:.0f} expected"), "",
              (f"resources per trial: {_fmt(res.cpu)} CPU, {_fmt(res.gpu)} GPU ({concurrent} concurrent "
               f"trials need {_fmt(res.cpu * concurrent)} CPU, {_fmt(res.gpu * concurrent)} GPU)"),
              f"mlflow: experiment {spec.mlflow.experiment!r}, tracking {spec.mlflow.tracking_uri or '(driver default)'}"]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else "null" if value is None else str(value)


def _summary(param: SearchParam) -> str:
    """E.g. ``float log-uniform [1e-05, 0.001]`` or ``categorical {1, 2, 4}``."""
    if param.type == "categorical":
        return "categorical {" + ", ".join(_fmt(c) for c in param.choices) + "}"
    text = f"{param.type} {'log-uniform' if param.log else 'uniform'} [{_fmt(param.low)}, {_fmt(param.high)}]"
    return text + (f" step {_fmt(param.step)}" if param.step is not None else "")
