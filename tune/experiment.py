"""One driver run of a study: its inputs checked, then a fresh Ray Tune experiment under ``runs/run-K``.

Ray only executes: the searcher and scheduler read and write the study record, the
trainable writes its own checkpoints (all three in tune.searcher), and nothing of Ray's saved state is read
back. A ``--restart``'s old study is moved aside here, only after every input was checked.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune

from minimind_train.config import RunConfig, run_config_to_dict

from . import cluster, restart, searcher, tracking
from .forecast import Forecast, print_forecast
from .interrupts import InterruptWatch, StudyStopped, first_line, stop_on_signals
from .mirror import Mirror, MirrorCallback, warn_on_failure
from .preflight import Inputs, check_inputs, reconcile
from .progress import RAY_ERRORS_FILE, ProgressView, best_recorded, ray_errors_to
from .report import finish_study
from .space import StudySpec, optuna_distributions, spec_to_dict, spec_to_yaml
from .status import FINISHED, TrialStatus
from .storage import StudyPaths, trial_dirname, upload_outputs
from .study import OPTUNA_FILE, Study, StudyError, evaluation_name
from .warmstart import warm_start

__all__ = ["RunClock", "init_ray", "make_mirror", "run_experiment"]


def init_ray(address: str | None, temp_dir: str | None) -> None:
    """``ray.init``, retried once when a busy machine makes Ray's start time out (a fixed 30 s in Ray).

    Raises:
        StudyError: Ray did not start, or nothing answers at ``address``.
    """
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_address(address)
        kwargs["address"] = address
    else:  # (_temp_dir: ray.init's documented argument for a local instance)
        kwargs.update(include_dashboard=False, _temp_dir=temp_dir)
        # Trials run in a thread of a reused worker, and glibc gives each new thread its own malloc
        # arena, which keeps its freed pages: one arena caps a trial worker's peak memory.
        os.environ.setdefault("MALLOC_ARENA_MAX", "1")
    for attempt in (1, 2):
        try:
            try:
                ray.init(**kwargs)
            except SystemExit as exc:  # ray.init's own SIGTERM handler, installed first thing: sys.exit(15)
                if exc.code != signal.SIGTERM:
                    raise
                raise KeyboardInterrupt from None
            finally:
                stop_on_signals()  # (back from ray.init's handler: SIGTERM stops like Ctrl-C again)
            return
        except KeyboardInterrupt:  # a signal while Ray started: what started of it goes
            ray.shutdown()
            raise
        except Exception as exc:
            ray.shutdown()
            text = first_line(exc)
            if attempt == 1 and not address and "timed out" in text:
                print(f"Ray did not start ({text}); trying once more ...", file=sys.stderr, flush=True)
                time.sleep(2)
                continue
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            hint = ("check the address and that the cluster is up (`ray status`)" if address else
                    "the machine may be overloaded: retry when it is quieter, or start Ray once yourself "
                    "(`ray start --head`) and pass --address auto")
            raise StudyError(f"could not start {where}: {text}; {hint}") from exc


def probe_address(address: str) -> None:
    """Fail in seconds when a ``host:port`` Ray address has nothing listening (ray.init would retry
    the GCS for minutes); ``auto`` and ``ray://`` addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as exc:
        raise StudyError(f"--address={address}: no Ray cluster answers there ({exc.strerror or exc}); start "
                         "it (`ray start --head`) or fix the address") from exc


class RunClock(tune.Callback):
    """Keeps the driver run's length in the study record as the run goes (at most every ``every_s``
    seconds, from Ray Tune's driver loop): a driver killed at any moment has its time counted towards
    ``time_budget_s``, at most ``every_s`` short. Pickled copies (Ray keeps callbacks in ``tuner.pkl``)
    are inert."""

    def __init__(self, record: Study, run: int, started: float, every_s: float = 5.0) -> None:
        self.record: Study | None = record
        self.run, self.started, self.every_s, self.last = run, started, every_s, started

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "record": None}

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = time.monotonic()
        if self.record is None or now - self.last < self.every_s:
            return
        self.last = now
        with contextlib.suppress(OSError):  # a full disk: the next beat, or the run's end, tries again
            self.record.record_run_seconds(self.run, now - self.started)


def run_experiment(spec: StudySpec, paths: StudyPaths, record: Study | None, *, explicit_space: bool,
                   replace: bool, address: str | None, ray_temp_dir: str | None,
                   warm_start_from: Study | None = None, forecast: bool = True) -> int:
    """Check the inputs and, on ``--resume``, what is left to run; then start Ray, create the study (or
    move the replaced one aside first; ``warm_start_from`` gives it an earlier study's trials as
    history), run its trials, finish. ``explicit_space``: the space came from ``--space``; ``forecast``:
    probe the trial and print the study's cost forecast before Ray starts (tune.forecast; the live view's
    ETA starts from it).

    Returns the driver's exit status (0, 1, or 130 after an interrupt).
    """
    t = spec.tune
    run_cfg = spec.trial_run
    print("checking inputs: tokenizer, data (tokenised once into the token cache), model, storage, "
          "tracking ...", flush=True)
    inputs = check_inputs(spec, run_cfg, paths, address)
    applied: list[str] = []
    plans: list[searcher.ResumePlan] = []
    if record is not None:
        record.runs = paths.runs_uri
        applied = reconcile(record, spec_to_dict(spec), inputs, explicit_space=explicit_space)
        for line in record.recover(t.objective, t.scheduler.max_t, run_cfg.train.evals_per_epoch):
            print(f"warning: {line}", file=sys.stderr)
        plans = searcher.resume_plans(record)
        finished = record.finished_count()
        if not plans and finished >= t.num_samples and not _finalists(spec, run_cfg, record, create=False):
            print(f"nothing to run: {finished} trials finished (num_samples {t.num_samples}); "
                  "summarising the study and bringing MLflow up to date")
            mirror = make_mirror(spec, run_cfg, inputs, record)
            with _closing(paths, record, mirror):
                return finish_study(spec, paths, record, mirror, "FINISHED")
        if t.time_budget_s is not None and record.seconds_used() >= t.time_budget_s:
            raise StudyError(f"the study's time budget (tune.time_budget_s={t.time_budget_s:g}) is used up "
                             f"({record.seconds_used():.0f} s); raise it with --time-budget-s to run the "
                             "remaining trials")
    print(f"inputs checked in {inputs.seconds:.1f}s (token cache {inputs.data.stats.cache_key[:12]}); "
          f"model: {inputs.n_params:,} parameters", flush=True)
    expected = None
    if forecast:  # (before Ray starts: the probe measures the machine as the trials will find it)
        s, left = inputs.data.stats, t.num_samples - (record.finished_count() if record is not None else 0)
        caches = {"train": s.cache_path, "val": s.val_cache_path, "pad_id": inputs.data.pad_id,
                  "vocab_size": inputs.data.vocab_size}
        # (on --resume the finalists follow from every completed search trial, less those already trained)
        done = record.trials() if record is not None else []
        expected = print_forecast(spec, caches, max(0, left - len(plans)),
                                  sum(run_cfg.train.epochs - p.evaluation / run_cfg.train.evals_per_epoch
                                      for p in plans),
                                  record.seconds_used() if record is not None else 0.0,
                                  sum(t.status == TrialStatus.COMPLETED and t.finalist_of is None for t in done),
                                  sum(t.status in FINISHED and t.finalist_of is not None for t in done))
    print("starting Ray ...", flush=True)
    # Closed in reverse: a --restart's old study settled, outputs uploaded, Ray shut down, Ray's errors back.
    with contextlib.ExitStack() as stack:
        stack.enter_context(ray_errors_to(paths.local_dir / RAY_ERRORS_FILE))
        init_ray(address, ray_temp_dir)
        stack.callback(ray.shutdown)
        if not paths.is_local:
            stack.callback(_upload_outputs, paths)
        try:
            cluster.check_resources(t.resources_per_trial, t.max_concurrent_trials, ray.cluster_resources())
            nodes = cluster.trial_nodes(t.resources_per_trial.cpu, t.resources_per_trial.gpu)
            driver_node = ray.get_runtime_context().get_node_id()
            cluster.check_storage(paths.storage, nodes, driver_node)
            study_data = cluster.study_data(inputs.data, run_cfg, nodes, driver_node, paths.storage)
        except cluster.ClusterError as exc:
            raise StudyError(str(exc)) from exc
        study_dir = paths.local_dir
        aside = restart.move_aside(study_dir) if replace and study_dir.exists() else None
        if aside is not None:
            # However the run ends from here (a Ctrl-C included), a --restart's old study comes back unless
            # the new one has a result (a kill is undone by the next start instead).
            stack.callback(restart.settle, aside, study_dir, inputs.tracking_uri)
        space_yaml = spec_to_yaml(spec, f"Study {paths.name}: the resolved space (absolute paths) from "
                                        f"{spec.source}.\nContinue it with: python -m tune.run --resume "
                                        f"--name {paths.name} [--storage-path ...]")
        if record is None:
            said: list[str] = []

            def prepare(new: Study) -> None:  # (inside the creation: a kill leaves no half warm start)
                if warm_start_from is not None:
                    # About a third of the trials (1 to 3) start from the earlier best configs; TPE picks the rest.
                    queue = max(1, min(3, t.num_samples // 3))
                    said.append(warm_start(new, warm_start_from, optuna_distributions(spec), top_k=queue))

            try:
                record = Study.create(study_dir, paths.name, spec_to_dict(spec), space_yaml,
                                            inputs.fingerprints, prepare=prepare)
            except OSError as exc:
                raise StudyError(f"cannot create the study at {study_dir}: {exc}") from exc
            for line in said:
                print(line)
        else:
            record.write_space(space_yaml)
        record.runs = paths.runs_uri
        return _run_trials(spec, paths, run_cfg, inputs, record, applied, plans, aside, study_data, expected)


def _upload_outputs(paths: StudyPaths) -> None:
    try:
        n = upload_outputs(paths.local_dir, paths.uri)
        print(f"uploaded {n / 2**20:.1f} MiB of driver outputs from {paths.local_dir} to {paths.uri}")
    except Exception as exc:  # noqa: BLE001 - the study itself is done; say where the files are
        print(f"warning: could not upload {paths.local_dir} to {paths.uri}: {exc}", file=sys.stderr)


def _resume_command(paths: StudyPaths) -> str:
    return f"python -m tune.run --resume --name {paths.name} --storage-path {paths.storage}"


@contextlib.contextmanager
def _closing(paths: StudyPaths, record: Study, mirror: Mirror) -> Iterator[None]:
    """Once trials may have run, however the driver run stops early (a signal at any moment, the end
    report included; an error, e.g. of the OS), the study is left for ``--resume``: trials still running
    are marked interrupted (after a signal: the record is intact) and the MLflow parent is closed
    (KILLED); :class:`StudyStopped`, caused by what stopped it, tells tune.run so."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - whatever stops it, the study is closed
        try:
            if isinstance(exc, KeyboardInterrupt):
                record.interrupt_running()
            warn_on_failure(lambda: mirror.finish("KILLED", artifacts={}))
        finally:
            raise StudyStopped(_resume_command(paths), paths.local_dir / OPTUNA_FILE) from exc


def _finalists(spec: StudySpec, run_cfg: RunConfig, record: Study, create: bool) -> list[searcher.ResumePlan]:
    """The finalists still to run (``tune.finalists``); ``create`` adds the missing ones to the record."""
    t, finals = spec.tune, spec.tune.finalists
    if not finals.seeds:
        return []
    return searcher.finalist_plans(record, optuna_distributions(spec), t.objective, finals.top_k, finals.seeds,
                                   run_cfg.train.seed, create=create)


def _continuing(plans: list[searcher.ResumePlan], evals_per_epoch: int) -> str:
    return (f"continuing {len(plans)} unfinished trial(s) from their checkpoints: "
            + ", ".join(f"t{p.number:03d} (after {evaluation_name(p.evaluation, evals_per_epoch)})" if p.evaluation
                        else f"t{p.number:03d} (from its start: it saved no checkpoint)" for p in plans))


def _run_trials(spec: StudySpec, paths: StudyPaths, run_cfg: RunConfig, inputs: Inputs, record: Study,
                applied: list[str], plans: list[searcher.ResumePlan], aside: Path | None,
                study_data: cluster.StudyData | None, expected: Forecast | None = None) -> int:
    """The search (new and unfinished trials, ASHA on), then the finalists (never stopped early), each
    a Ray Tune experiment ``runs/run-K``; then the study's outputs. ``expected``: the forecast the live
    view's ETA starts from."""
    t = spec.tune
    finished = record.finished_count()
    new = max(0, t.num_samples - finished - len(plans))
    for line in applied:
        print(f"applied on resume: {line}")
    if plans:
        print(_continuing(plans, run_cfg.train.evals_per_epoch))
    mirror = make_mirror(spec, run_cfg, inputs, record)

    def fit(plans: list[searcher.ResumePlan], new: int, pruner: optuna.pruners.BasePruner,
            callbacks: list[Any], phase: str = "search") -> bool:
        """Run ``plans`` and ``new`` trials as one Ray Tune experiment (``phase``: search or finalists);
        whether it was interrupted."""
        to_run, used = len(plans) + new, record.seconds_used()
        # (a budget used up never gets here: a --resume is refused above, the finalists are skipped)
        budget_left = None if t.time_budget_s is None else t.time_budget_s - used
        if budget_left is not None:
            print(f"time budget: {budget_left:.0f} s left of {t.time_budget_s:.0f} s ({used:.0f} s used before)")
        run_index = record.next_run_index()
        record.add_history({"run": run_index, "started": _dt.datetime.now().isoformat(timespec="seconds"),
                            "argv": sys.argv[1:], "num_samples": t.num_samples,
                            "max_concurrent_trials": t.max_concurrent_trials, "time_budget_s": t.time_budget_s,
                            "applied": applied,
                            # (so that tune.ui and tune.mirror open the store the trials went to)
                            tracking.HISTORY_KEY: tracking.uri_to_record(inputs.tracking_uri, record.dir)})
        started = time.monotonic()
        record.use(sampler=searcher.make_sampler(t.searcher, t.seed, t.num_samples, offset=len(record.trials())))
        search = searcher.RecordSearcher(record, optuna_distributions(spec), t.objective, t.scheduler.max_t, plans)

        def statuses() -> dict[str, str]:
            by_number = record.statuses()
            return {tid: by_number[n] for tid, n in search.numbers.items() if n in by_number}

        view = ProgressView(t.objective, run_cfg.train.epochs, to_run, statuses=statuses, local=paths.is_local,
                            ray_errors=paths.local_dir / RAY_ERRORS_FILE,
                            best=best_recorded(record.trials(), t.objective),  # (earlier runs and phases)
                            prior=expected.prior(phase) if expected is not None else None,
                            evals_per_epoch=run_cfg.train.evals_per_epoch)
        trainable = tune.with_resources(
            tune.with_parameters(searcher.train_trial, base=run_config_to_dict(run_cfg), objective=t.objective,
                                 runs_dir=paths.runs_uri, run_name=f"run-{run_index}",
                                 keep_checkpoints=t.keep_checkpoints, gpu_share=t.resources_per_trial.gpu,
                                 data=study_data),
            t.resources_per_trial.as_dict())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=t.metric, mode=t.mode, search_alg=search, scheduler=searcher.RecordScheduler(search, pruner),
                num_samples=to_run, max_concurrent_trials=t.max_concurrent_trials, time_budget_s=budget_left,
                reuse_actors=True,
                trial_dirname_creator=lambda trial: trial_dirname(int(trial.config[searcher.NUMBER_KEY]))),
            # A retried trial continues from its newest checkpoint in the study folder (the trainable
            # writes those itself; Ray's checkpoint index restarts with a lost worker).
            run_config=tune.RunConfig(name=f"run-{run_index}", storage_path=paths.runs_uri, verbose=0,
                                      callbacks=[view, MirrorCallback(mirror, search.numbers),
                                                 RunClock(record, run_index, started), *callbacks],
                                      failure_config=tune.FailureConfig(max_failures=t.max_failures)))
        interrupt = InterruptWatch()
        try:
            with interrupt:
                tuner.fit()
            return interrupt.seen
        except KeyboardInterrupt:
            return True
        finally:
            view.close()
            try:
                record.record_run_seconds(run_index, time.monotonic() - started)
            except OSError as exc:  # a full disk: the run's length is lost, nothing else
                print(f"warning: could not record the run's length: {exc}", file=sys.stderr)

    with _closing(paths, record, mirror):
        return _phases(spec, paths, run_cfg, inputs, record, plans, new, finished, aside, mirror, fit)


def _phases(spec: StudySpec, paths: StudyPaths, run_cfg: RunConfig, inputs: Inputs, record: Study,
            plans: list[searcher.ResumePlan], new: int, finished: int, aside: Path | None, mirror: Mirror,
            fit: Callable[..., bool]) -> int:
    """The search, the finalists, the end report; an interrupt at any point raises KeyboardInterrupt."""
    t = spec.tune
    interrupted = False
    if plans or new:
        extra = [restart.RestartCleanup(aside, paths.local_dir, inputs.tracking_uri)] if aside else []
        pruner = searcher.make_pruner(t.scheduler.type, t.scheduler.grace_period, t.scheduler.reduction_factor)
        print(f"study {paths.name}: {len(plans) + new} trial(s) ({len(plans)} continued, {new} new; {finished} "
              f"finished before), {t.max_concurrent_trials} at a time, {t.resources_per_trial.cpu:g} CPU + "
              f"{t.resources_per_trial.gpu:g} GPU each; output {paths.uri}; MLflow {inputs.tracking_uri}", flush=True)
        interrupted = fit(plans, new, pruner, extra)
    out_of_time = t.time_budget_s is not None and record.seconds_used() >= t.time_budget_s
    todo = [] if interrupted else _finalists(spec, run_cfg, record, create=not out_of_time)
    if todo and out_of_time:
        print(f"finalists: {len(todo)} trial(s) not run, the time budget is used up; the answer is the single "
              "best trial (raise --time-budget-s and --resume to run them)", file=sys.stderr)
    elif todo:
        configs = len({tuple(sorted((k, v) for k, v in p.params.items() if k != "train.seed")) for p in todo})
        print(f"finalists: {configs} of the top {t.finalists.top_k} completed configs again with other seeds: "
              f"{len(todo)} trial(s) of {run_cfg.train.epochs} epoch(s), never stopped early", flush=True)
        if continued := [p for p in todo if p.evaluation]:  # a --resume after the finalists had begun
            print(_continuing(continued, run_cfg.train.evals_per_epoch))
        interrupted = fit(todo, 0, optuna.pruners.NopPruner(), [], phase="finalists")
    if interrupted:  # (Ray's handler ended the trials; _closing marks them and closes the mirror)
        raise KeyboardInterrupt
    record.interrupt_running()  # (trials the time budget ended)
    return finish_study(spec, paths, record, mirror, "FINISHED")


def make_mirror(spec: StudySpec, run_cfg: RunConfig, inputs: Inputs, record: Study) -> Mirror:
    """The study's MLflow mirror: fixed values and study settings on the parent run."""
    searched = {p.path for p in spec.search}
    fixed = {f"{sec}.{k}": v for sec, vals in run_config_to_dict(run_cfg).items() for k, v in vals.items()
             if f"{sec}.{k}" not in searched}
    t = spec.tune
    settings = {"searcher": t.searcher, "seed": t.seed, "num_samples": t.num_samples, "metric": t.metric,
                "mode": t.mode, "scheduler": t.scheduler.type, "scheduler.grace_period": t.scheduler.grace_period,
                "scheduler.reduction_factor": t.scheduler.reduction_factor,
                "resources.cpu": t.resources_per_trial.cpu, "resources.gpu": t.resources_per_trial.gpu}
    tags = {"git_commit": _git_commit(), "dataset_fingerprint": inputs.fingerprints["dataset"],
            "tokenizer": spec.run.data.tokenizer or "bundled",
            "tokenizer_fingerprint": inputs.fingerprints["tokenizer"], "model_parameters": str(inputs.n_params)}
    return Mirror(inputs.tracking_uri, spec.mlflow.experiment, record, fixed_params=fixed, settings=settings,
                  tags=tags)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
