"""``python -m tune.run --space FILE``: a Ray Tune + Optuna study over the SFT trainer.

The driver validates the space, tokenises the dataset once (the on-disk token cache every trial
memory-maps), opens one MLflow parent run, runs the Tuner (Optuna TPE, ASHA, retries, checkpoints
kept by the metric) and finally writes ``<storage>/<name>/best.yaml``, a summary CSV and plots, and
bounds the study's disk use. The same command works on a laptop and under ``ray job submit``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_STORAGE", "StudyPaths", "main"]

log = logging.getLogger("tune.run")

DEFAULT_STORAGE = Path("studies")


@dataclasses.dataclass(frozen=True)
class StudyPaths:
    storage: str  # local folder (absolute) or a pyarrow-filesystem URI
    name: str

    @property
    def is_local(self) -> bool:
        return "://" not in self.storage or self.storage.startswith("file://")

    @property
    def local_dir(self) -> Path:
        """Folder of the study on this machine (the driver's own outputs live here).

        For a URI storage (``s3://...``) a driver-local staging folder, uploaded to :attr:`uri` at the end.
        """
        if not self.is_local:
            from .cluster import staging_dir

            return staging_dir(self.uri)
        base = self.storage.removeprefix("file://")
        return Path(base) / self.name

    @property
    def uri(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tune.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", required=True,
                   help="space YAML: a path, or a bundled name such as sft.yaml")
    p.add_argument("--name", help="study name (default: the space file's stem)")
    p.add_argument("--storage-path", default=os.environ.get("MINIMIND_TUNE_STORAGE"),
                   help=f"folder or URI for study output (default: ./{DEFAULT_STORAGE})")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted study")
    mode.add_argument("--restart", action="store_true",
                      help="delete an existing study of this name and start over")
    p.add_argument("--num-samples", type=int, help="override tune.num_samples")
    p.add_argument("--max-concurrent", type=int, help="override tune.max_concurrent_trials")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved space, resources and trial plan, then exit")
    p.add_argument("--ray-temp-dir", default=None, help="temp dir of a local Ray instance")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _flat_config(cfg: Any) -> dict[str, Any]:
    from minimind_train.config import run_config_to_dict

    return {f"{sec}.{k}": v for sec, vals in run_config_to_dict(cfg).items() for k, v in vals.items()}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stdout)
    # Heavy imports after argument parsing so `--help` is instant.
    from .space import SpaceError, describe, load_space

    try:
        spec = load_space(args.space)
    except (SpaceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = _apply_overrides(spec, args)
    name = args.name or spec.source.stem
    storage = args.storage_path or str(DEFAULT_STORAGE)
    from .cluster import storage_problem

    if problem := storage_problem(storage):  # e.g. relative under `ray job submit`
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    paths = StudyPaths(storage=storage, name=name)
    if args.dry_run:
        print(describe(spec))
        print(f"study: {name}  output: {paths.uri}")
        return 0
    return _run_study(spec, paths, args)


def _apply_overrides(spec: Any, args: argparse.Namespace) -> Any:
    t = spec.tune
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise SystemExit(f"error: --num-samples={args.num_samples} must be >= 1")
        t = dataclasses.replace(t, num_samples=args.num_samples)
    if args.max_concurrent is not None:
        if args.max_concurrent < 1:
            raise SystemExit(f"error: --max-concurrent={args.max_concurrent} must be >= 1")
        t = dataclasses.replace(t, max_concurrent_trials=args.max_concurrent)
    return dataclasses.replace(spec, tune=t)


def _quiet_libraries() -> None:
    """Keep the driver's output to our progress line and tables."""
    # Ray's rich output ignores verbose=0; the legacy reporter honours it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Each epoch checkpoints, so Ray's "snapshotting too often" advice fires constantly and is moot.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import mlflow  # noqa: F401  (it configures its loggers on import; quieten them afterwards)
    import optuna

    for name in ("mlflow", "alembic", "optuna", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def trial_dirname(trial: Any) -> str:
    """Short trial folder names (Ray's default embeds every parameter and a timestamp)."""
    return f"trial_{trial.trial_id}"


@dataclasses.dataclass(frozen=True)
class _Prepared:
    data: Any  # minimind_train.data.SFTData
    tokenizer: Any
    n_params: int
    seconds: float
    tracking_uri: str


class _PrepareError(RuntimeError):
    """A problem with the data, tokenizer or MLflow store found before any trial: exit 2."""


def _prepare(spec: Any, run_cfg: Any, study_dir: Path) -> _Prepared:
    """Tokenise the dataset into the token cache (once per study), size the model, and open the
    MLflow store (creating a sqlite one runs its schema migrations: over a second)."""
    t0 = time.perf_counter()
    _quiet_libraries()
    import torch

    from minimind_train.data import DataError, prepare_data
    from minimind_train.model import build_model, count_parameters
    from minimind_train.tokenizer import load_tokenizer

    from . import tracking

    try:
        tokenizer = load_tokenizer(spec.run.data.tokenizer)
        data = prepare_data(spec.run.data, tokenizer)
        with torch.device("meta"):  # shapes only: no memory, no init
            n_params = count_parameters(build_model(run_cfg.model, len(tokenizer)))
        seconds = time.perf_counter() - t0
        study_dir.mkdir(parents=True, exist_ok=True)
        tracking_uri = tracking.resolve_tracking_uri(spec.mlflow.tracking_uri, study_dir)
        tracking.check_tracking_server(tracking_uri)
    except (DataError, FileNotFoundError, ValueError, tracking.TrackingError) as exc:
        raise _PrepareError(str(exc)) from exc
    return _Prepared(data, tokenizer, n_params, seconds, tracking_uri)


def _ray_init_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    address = args.address or os.environ.get("RAY_ADDRESS")
    init_kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address:
        init_kwargs["address"] = address
        return init_kwargs
    init_kwargs.update(include_dashboard=False)
    if args.ray_temp_dir:
        init_kwargs["_temp_dir"] = args.ray_temp_dir
    # The local Ray's processes inherit this environment. Trials run in a thread of a reused
    # worker, and glibc gives each new thread its own malloc arena, which keeps its freed pages:
    # one arena caps a trial worker's peak private memory (~575 -> ~435 MB with sft.yaml, at the
    # same speed). On a cluster, set it where `ray start` runs.
    os.environ.setdefault("MALLOC_ARENA_MAX", "1")
    return init_kwargs


def _run_study(spec: Any, paths: StudyPaths, args: argparse.Namespace) -> int:
    from ray import tune

    from . import cluster

    study_dir = paths.local_dir
    exists = tune.Tuner.can_restore(paths.uri)
    if exists and not (args.resume or args.restart):
        print(f"error: a study named {paths.name!r} already exists at {paths.uri}; "
              "pass --resume to continue it or --restart to discard it and start over",
              file=sys.stderr)
        return 2
    if args.resume and not exists:
        print(f"error: --resume: no study to resume at {paths.uri}", file=sys.stderr)
        return 2
    if args.restart and paths.is_local and study_dir.exists():
        shutil.rmtree(study_dir)
    if not paths.is_local:
        if args.restart:
            cluster.delete_uri_dir(paths.uri)
            shutil.rmtree(study_dir, ignore_errors=True)
        elif args.resume:  # the MLflow db of the driver that ran it before
            cluster.download_outputs(paths.uri, study_dir)

    cpu_share = spec.tune.resources_per_trial.cpu
    run_cfg = dataclasses.replace(
        spec.run, train=dataclasses.replace(spec.run.train, num_threads=max(1, int(cpu_share))))
    created = not study_dir.exists()
    rc = _start_and_run(spec, paths, args, run_cfg)
    if rc == 2 and created and paths.is_local:  # refused before any trial: leave no study behind
        shutil.rmtree(study_dir, ignore_errors=True)
    return rc


def _start_and_run(spec: Any, paths: StudyPaths, args: argparse.Namespace, run_cfg: Any) -> int:
    import ray

    study_dir = paths.local_dir
    # The dataset is tokenised (or its cache found) and the MLflow store opened in a thread while
    # Ray's processes start: the tokenizer's and MLflow's imports, a new sqlite store and ray.init
    # each take a second or more of a study's start. The token cache is still built once, here,
    # before any trial.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        prepared = pool.submit(_prepare, spec, run_cfg, study_dir)
        ray.init(**_ray_init_kwargs(args))
        try:
            prep = prepared.result()
        except _PrepareError as exc:
            print(f"error: {exc}", file=sys.stderr)
            ray.shutdown()
            return 2
        except BaseException:
            ray.shutdown()
            raise
    try:
        return _run_on_ray(spec, paths, args, run_cfg, prep)
    finally:
        if not paths.is_local:
            _upload_outputs(study_dir, paths.uri)
        ray.shutdown()


def _run_on_ray(spec: Any, paths: StudyPaths, args: argparse.Namespace, run_cfg: Any, prep: _Prepared) -> int:
    import ray
    from ray import tune

    from minimind_train.tokenizer import tokenizer_fingerprint

    from . import cluster, tracking
    from .ledger import EndedLedger
    from .progress import ProgressLine
    from .report import (
        dir_bytes,
        format_table,
        prune_resume_state,
        remove_lost_trials,
        summarize_trials,
        write_best_yaml,
        write_summary_csv,
    )
    from .space import SpaceError, check_resources
    from .trainable import train_trial

    study_dir = paths.local_dir
    data, tokenizer, n_params = prep.data, prep.tokenizer, prep.n_params
    cpu_share = spec.tune.resources_per_trial.cpu
    gpu_share = spec.tune.resources_per_trial.gpu
    print(f"data: {len(data.train):,} train / {len(data.val):,} val samples "
          f"({prep.seconds:.1f}s, cache {data.stats.cache_key[:12]}); model: {n_params:,} parameters")
    try:
        check_resources(spec, ray.cluster_resources())
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # A multi-node cluster: every trial node must see the storage; data it cannot read is shipped.
    driver_node = cluster.driver_node_id()
    nodes = cluster.trial_nodes(cpu_share, gpu_share)
    try:
        cluster.check_storage(paths.storage, nodes, driver_node)
        study_data = cluster.study_data(data, run_cfg, nodes, driver_node)
    except cluster.ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    tracking_uri = prep.tracking_uri
    tracker = tracking.StudyTracker(tracking_uri)
    param_keys = [p.path for p in spec.search]
    try:
        parent_id = tracker.start(
            study_name=paths.name,
            experiment=spec.mlflow.experiment,
            fixed_params={k: v for k, v in _flat_config(run_cfg).items() if k not in param_keys},
            settings=_settings(spec),
            space_text=spec.text,
            tags={
                "minimind.study": paths.name,
                "git_commit": _git_commit(),
                "dataset_fingerprint": data.stats.cache_key,
                "tokenizer": spec.run.data.tokenizer or "bundled",
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "model_parameters": str(n_params),
            },
            resume=args.resume,
            restart=args.restart,
        )
    except tracking.TrackingError as exc:  # e.g. the study's runs exist in a shared store
        print(f"error: {exc}", file=sys.stderr)
        return 2
    callbacks = [
        # First: a trial's end is on record in the storage before anything else reports it.
        EndedLedger(spec.tune.keep_checkpoints, spec.tune.metric, spec.tune.mode),
        ProgressLine(spec.tune.metric, spec.tune.mode, run_cfg.train.epochs, spec.tune.num_samples),
        tracker.trial_callback(parent_id, param_keys=param_keys,
                               planned_epochs=run_cfg.train.epochs),
    ]
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=_dict(run_cfg), gpu_share=gpu_share, data=study_data,
                             study_uri=paths.uri),
        {"cpu": cpu_share, "gpu": gpu_share},
    )
    tuner = _make_tuner(spec, paths, trainable, callbacks, args.resume)
    print(f"study {paths.name}: {spec.tune.num_samples} trials, {spec.tune.max_concurrent_trials} at a "
          f"time, {cpu_share} CPU + {gpu_share} GPU each; output {paths.uri}; MLflow {tracking_uri}")
    status = "FAILED"
    try:
        interrupt = _InterruptWatch()
        with interrupt:
            grid = tuner.fit()
        if interrupt.seen:
            # Ray caught the Ctrl-C itself: it saved the experiment and returned a partial grid.
            # Ranking that as the study's result (and pruning resume state) would ruin --resume.
            raise KeyboardInterrupt
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        print("\ninterrupted: resume with --resume", file=sys.stderr)
        tracker.finish("KILLED", best=None, artifacts={})
        return 130
    finally:
        if status == "FAILED":
            tracker.finish("FAILED", best=None, artifacts={})

    results = [grid[i] for i in range(len(grid))]
    summaries = summarize_trials(results, spec, params_of=lambda c: _searched(c, param_keys))
    print()
    print(format_table(summaries, spec.tune.metric))
    completed = [s for s in summaries if s.status != "failed" and math.isfinite(s.best_value)]
    artifacts: dict[str, Path] = {}
    best_info = None
    if completed:
        best = completed[0]
        best_yaml = write_best_yaml(study_dir / "best.yaml", spec, best)
        artifacts["best.yaml"] = best_yaml
        if best.checkpoint is not None:
            artifacts["best/model.pth"] = best.checkpoint / "model.pth"
            if not paths.is_local:  # in the bucket: MLflow logs a local copy
                artifacts["best/model.pth"] = cluster.fetch_file(
                    paths.uri, best.checkpoint / "model.pth", study_dir / "best" / "model.pth")
        best_info = {"trial_id": best.trial_id, "metric": spec.tune.metric, "value": best.best_value,
                     "epoch": best.best_epoch, "params": best.params}
    summary_csv = write_summary_csv(study_dir / "summary.csv", summaries, spec.tune.metric)
    # Nothing below needs Ray: it shuts down (a second or more) while the plots render.
    from concurrent.futures import ThreadPoolExecutor

    from .plots import plot_study

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plots") as pool:
        plotting = pool.submit(plot_study, _optuna_study(spec, summaries),
                               {s.trial_id: s.curve for s in summaries}, study_dir / "plots")
        if paths.is_local:  # a URI storage uploads the driver's outputs first (no Ray needed either)
            ray.shutdown()
        plots = plotting.result()
    artifacts.update({f"plots/{p.name}": p for p in plots.values()})
    tracker.finish("FINISHED" if completed else "FAILED", best=best_info, artifacts=artifacts,
                   summary_csv=summary_csv)
    freed = prune_resume_state(summaries, spec.tune.keep_top_trials)
    if paths.is_local:
        lost = remove_lost_trials(study_dir, summaries)
        if lost:
            print(f"removed {_human_bytes(lost)} of trial folders lost with an earlier killed driver")
    print()
    if completed:
        print(f"best: trial {best.trial_id}  {spec.tune.metric} {best.best_value:.4f} "
              f"(epoch {best.best_epoch})")
        for k, v in best.params.items():
            print(f"  {k}: {v}")
        print(f"best config: {study_dir / 'best.yaml'}")
        if best.checkpoint is not None:
            where = best.checkpoint / "model.pth"
            print(f"best fp16 checkpoint: {where if paths.is_local else artifacts['best/model.pth']}")
    print(f"disk: {_human_bytes(dir_bytes(study_dir))} in {study_dir} "
          f"({_human_bytes(freed)} of resume state pruned; top {spec.tune.keep_top_trials} trials keep theirs)")
    print(f"compare trials: python -m tune.ui --tracking-uri {tracking_uri}")
    if not completed:
        print("error: no trial completed:", file=sys.stderr)
        for s in summaries:
            print(f"  {s.trial_id}: {s.status} {s.error}", file=sys.stderr)
        return 1
    return 0


def _upload_outputs(study_dir: Path, uri: str) -> None:
    """Copy the driver's own outputs (best.yaml, summary, plots, sqlite MLflow) next to the trials."""
    from .cluster import upload_outputs

    try:
        n = upload_outputs(study_dir, uri)
        print(f"uploaded {_human_bytes(n)} of driver outputs from {study_dir} to {uri}")
    except Exception as exc:  # noqa: BLE001 - the study itself is done; say where the files are
        print(f"warning: could not upload {study_dir} to {uri}: {exc}", file=sys.stderr)


class _InterruptWatch:
    """Whether Ray Tune's own SIGINT/SIGUSR1 handler fired during ``Tuner.fit()``.

    On the first Ctrl-C Ray checkpoints the experiment, stops the trials (marking them TERMINATED)
    and returns from ``fit()`` normally, logging "resume with Tuner.restore(...)"; nothing in the
    returned grid says so. Its handler then puts back the handler it found, so a sentinel installed
    here before ``fit()`` and found again afterwards means exactly that the interrupt happened.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None
        # Ray installs no handler off the main thread or with TUNE_DISABLE_SIGINT_HANDLER=1; a
        # Ctrl-C then raises KeyboardInterrupt out of fit() as usual.
        self._active = (threading.current_thread() is threading.main_thread()
                        and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") in ("", "0"))

    @staticmethod
    def _sentinel(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __enter__(self) -> None:
        if self._active:
            self._previous = signal.signal(signal.SIGINT, self._sentinel)

    def __exit__(self, *exc: object) -> None:
        if self._active:
            self.seen = exc[0] is None and signal.getsignal(signal.SIGINT) is self._sentinel
            signal.signal(signal.SIGINT, self._previous)


def _dict(cfg: Any) -> dict[str, Any]:
    from minimind_train.config import run_config_to_dict

    return run_config_to_dict(cfg)


def _searched(config: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    from .trainable import flatten_params

    flat = flatten_params(config)
    return {k: flat[k] for k in keys if k in flat}


def _settings(spec: Any) -> dict[str, Any]:
    t = spec.tune
    return {
        "searcher": t.searcher, "seed": t.seed, "num_samples": t.num_samples,
        "max_concurrent_trials": t.max_concurrent_trials, "metric": t.metric, "mode": t.mode,
        "scheduler": t.scheduler.type, "scheduler.grace_period": t.scheduler.grace_period,
        "scheduler.reduction_factor": t.scheduler.reduction_factor, "scheduler.max_t": t.scheduler.max_t,
        "resources.cpu": t.resources_per_trial.cpu, "resources.gpu": t.resources_per_trial.gpu,
        "time_budget_s": t.time_budget_s, "max_failures": t.max_failures,
    }


def _make_tuner(spec: Any, paths: StudyPaths, trainable: Any, callbacks: list[Any], resume: bool) -> Any:
    from ray import tune

    from .ledger import (
        SnapshottingASHAScheduler,
        SnapshottingFIFOScheduler,
        keep_tuner_backup,
        repair_saved_state,
    )

    if paths.is_local:
        # Ray saves its experiment state (what --resume reads) every ~10 s, or when a trial has
        # made num_to_keep checkpoints; with retention left to EndedLedger the second never fires.
        # Once a second bounds what a killed driver loses (a trial's start or end) at the price of a
        # small JSON and pickle write; a bucket keeps Ray's pace (each save re-uploads every file).
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    from .searcher import make_searcher
    from .space import ray_search_space

    if resume:
        if paths.is_local:  # (a bucket's objects are written whole)
            for done in repair_saved_state(paths.local_dir):
                print(f"warning: {done}", file=sys.stderr)
        tuner = tune.Tuner.restore(paths.uri, trainable=trainable, resume_errored=True)
        if paths.is_local:
            keep_tuner_backup(paths.local_dir)
        # Ray restores the pickled RunConfig; there is no public way to hand it fresh callbacks, and
        # the pickled ones hold the previous process's clock and clients.
        tuner._local_tuner.get_run_config().callbacks = callbacks
        return tuner
    t = spec.tune
    if t.scheduler.type == "asha":
        scheduler = SnapshottingASHAScheduler(time_attr="training_iteration", max_t=t.scheduler.max_t,
                                              grace_period=t.scheduler.grace_period,
                                              reduction_factor=t.scheduler.reduction_factor)
    else:
        scheduler = SnapshottingFIFOScheduler()
    searcher = make_searcher(spec)
    param_space = ray_search_space(spec) if t.searcher == "random" else {}
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, search_alg=searcher, scheduler=scheduler,
            num_samples=t.num_samples, max_concurrent_trials=t.max_concurrent_trials,
            time_budget_s=t.time_budget_s, reuse_actors=True, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=paths.name,
            storage_path=paths.storage,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            # No deletions by Ray: see tune.ledger.EndedLedger, which applies keep_checkpoints.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=None, checkpoint_score_attribute=t.metric, checkpoint_score_order=t.mode),
            verbose=0,
        ),
    )
    if paths.is_local:  # Tuner() wrote tuner.pkl; a kill can later cut Ray's in-place rewrites of it
        keep_tuner_backup(paths.local_dir)
    return tuner


def _optuna_study(spec: Any, summaries: list[Any]) -> Any:
    """An Optuna study rebuilt from the trial results (survives --resume, unlike searcher internals)."""
    import optuna

    from .space import optuna_distributions

    dists = optuna_distributions(spec)
    study = optuna.create_study(direction="minimize" if spec.tune.mode == "min" else "maximize")
    for s in summaries:
        params = {k: v for k, v in s.params.items() if k in dists}
        if len(params) != len(dists):
            continue
        finite = {e: v for e, v in s.curve if math.isfinite(v)}
        if s.status == "failed" or not finite:
            state, value = optuna.trial.TrialState.FAIL, None
        elif s.status == "stopped_early":
            state, value = optuna.trial.TrialState.PRUNED, None
        else:
            state, value = optuna.trial.TrialState.COMPLETE, s.best_value
        try:
            study.add_trial(optuna.trial.create_trial(
                state=state, value=value, params=params, distributions=dists,
                intermediate_values=finite, user_attrs={"trial_id": s.trial_id}))
        except ValueError as exc:
            log.warning("trial %s left out of the Optuna summary: %s", s.trial_id, exc)
    return study


if __name__ == "__main__":
    sys.exit(main())
