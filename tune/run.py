"""``python -m tune.run --space FILE``: a Ray Tune + Optuna study over the SFT trainer.

The driver validates the space, takes the study's lock, checks every input (data, tokenizer,
``init_from``, storage, tracking) *before* Ray starts or anything is deleted, then runs one Ray
experiment under the study folder (``runs/run-K``) whose searcher and scheduler read and write the
study record (:mod:`tune.record`). At the end it writes ``best.yaml``, ``summary.csv`` and plots,
brings the MLflow mirror up to date and bounds the study's disk use. ``--resume`` continues a study
from its record; ``--restart`` replaces it, keeping the old one until the new one has a result.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import errno
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
        """Folder of the study on this machine (the record and the driver's outputs live here).

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

    @property
    def runs_uri(self) -> str:
        """Where Ray writes the trial folders (``<study>/runs``)."""
        from .record import RUNS_DIR

        return str(self.local_dir / RUNS_DIR) if self.is_local else f"{self.uri}/{RUNS_DIR}"


class StudyError(RuntimeError):
    """The study cannot start or continue as asked: one line for the user and an exit code (2: an
    input or the command is wrong, 1: the study failed on the way, e.g. a full disk)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tune.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", help="space YAML: a path, or a bundled name such as sft.yaml (optional with "
                                   "--resume: the study's own resolved space.yaml)")
    p.add_argument("--name", help="study name (default: the space file's stem)")
    p.add_argument("--storage-path", default=os.environ.get("MINIMIND_TUNE_STORAGE"),
                   help=f"folder or URI for study output (default: ./{DEFAULT_STORAGE})")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue a study: unfinished trials go on from their checkpoints, new ones "
                           "fill up to num_samples; a finished study is summarised and synced again")
    mode.add_argument("--restart", action="store_true",
                      help="replace an existing study of this name (it is kept until the new one has a result)")
    p.add_argument("--num-samples", type=int, help="override tune.num_samples (on --resume: more trials)")
    p.add_argument("--max-concurrent", type=int, help="override tune.max_concurrent_trials")
    p.add_argument("--time-budget-s", type=float,
                   help="override tune.time_budget_s (seconds for the whole study, all runs; 0: none)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved space, resources and trial plan, then exit")
    p.add_argument("--ray-temp-dir", default=None, help="temp dir of a local Ray instance")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stdout)
    _sigterm_as_sigint()
    try:
        return _main(args)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # before Ray's own handler took over: no trial had started
        print("\ninterrupted before any trial started; the study is as it was", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _disk_full(exc):
            raise
        print(f"error: the disk is full ({_first_line(exc)}); finished trials are kept: free space, then "
              "continue with --resume", file=sys.stderr)
        return 1


def _sigterm_as_sigint() -> None:
    """SIGTERM (a plain `kill`, `ray job stop`) stops the study like Ctrl-C: Ray's own SIGINT handling
    ends the trials, the record is closed, and --resume continues."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))


def _main(args: argparse.Namespace) -> int:
    # Heavy imports after argument parsing so `--help` is instant.
    from .cluster import storage_problem
    from .space import SpaceError, describe, load_space

    storage = args.storage_path or str(DEFAULT_STORAGE)
    if problem := storage_problem(storage):  # e.g. relative under `ray job submit`
        raise StudyError(problem)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    if args.name is not None:
        _check_name(args.name)
    if args.space is None:
        if not (args.resume and args.name):
            raise StudyError("--space is required (only --resume --name NAME can take the study's own space)")
        space: str | Path = _own_space(StudyPaths(storage, args.name))
    else:
        space = args.space
    try:
        spec = _apply_overrides(load_space(space), args)
    except (SpaceError, FileNotFoundError) as exc:
        raise StudyError(str(exc)) from exc
    name = args.name or spec.source.stem
    _check_name(name)
    paths = StudyPaths(storage=storage, name=name)
    if args.dry_run:
        print(describe(spec))
        print(f"study: {name}  output: {paths.uri}")
        if args.resume:
            _print_resume_check(spec, paths)
        return 0
    return _run_study(spec, paths, args)


def _print_resume_check(spec: Any, paths: StudyPaths) -> None:
    """For ``--resume --dry-run``: whether the study's definition matches (paths and data contents
    are compared only by a real run, which tokenises the data)."""
    from .record import Manifest, RecordError, diff_specs
    from .space import spec_to_dict

    manifest = paths.local_dir / "study.json"
    try:
        old = Manifest.from_json(manifest.read_text(encoding="utf-8"), manifest)
    except (OSError, RecordError) as exc:
        print(f"--resume: no study to compare with at {paths.local_dir} ({exc})")
        return
    changed = diff_specs(old.spec, spec_to_dict(spec))
    if changed:
        print("--resume would be refused: the space defines another study:\n  " + "\n  ".join(changed))
    else:
        print(f"--resume: the space matches study {paths.name!r} (created {old.created})")


def _check_name(name: str) -> None:
    """A study name is one folder name: never a path that leaves (or is) the storage folder."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".")
            or any(ord(c) < 32 for c in name)):
        raise StudyError(f"--name={name!r} is not allowed: a study name is one folder name (no '/', no "
                         "control characters, not empty, not starting with '.')")


def _own_space(paths: StudyPaths) -> Path:
    """The study's resolved space.yaml, rewritten from study.json when it is missing (it is derived)."""
    import yaml

    from .record import MANIFEST_FILE, Manifest, RecordError, StudyLock, lock_path

    folder = paths.local_dir
    if paths.is_local:  # a --restart cut short by a kill: its old study comes back first
        lock = _take_lock(folder)
        try:
            _finish_pending_restart(folder)
        finally:
            lock.release()
    space = folder / "space.yaml"
    if space.is_file():
        return space
    manifest = folder / MANIFEST_FILE
    if manifest.is_file():
        try:
            spec = Manifest.from_json(manifest.read_text(encoding="utf-8"), manifest).spec
            space.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
            return space
        except (OSError, RecordError) as exc:
            raise StudyError(f"--resume: cannot rebuild {space} from {manifest}: {exc}") from exc
    holder = lock_path(folder)
    if StudyLock.held(folder):
        raise StudyError(f"--resume: study {paths.name!r} is being created by "
                         f"{holder.read_text(encoding='utf-8', errors='replace').strip()}; wait for it")
    raise StudyError(f"--resume: no study {paths.name!r} at {paths.uri}")


def _take_lock(study_dir: Path) -> Any:
    """The study's exclusive lock (tune.record.StudyLock), or a StudyError naming its holder."""
    from .record import RecordError, StudyLock

    lock = StudyLock(study_dir)
    try:
        lock.acquire()
    except RecordError as exc:
        raise StudyError(str(exc)) from exc
    return lock


def _apply_overrides(spec: Any, args: argparse.Namespace) -> Any:
    from .space import SpaceError

    t = spec.tune
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise SpaceError(f"--num-samples={args.num_samples} is not allowed: expected an integer >= 1")
        t = dataclasses.replace(t, num_samples=args.num_samples)
    if args.max_concurrent is not None:
        if args.max_concurrent < 1:
            raise SpaceError(f"--max-concurrent={args.max_concurrent} is not allowed: expected an integer >= 1")
        t = dataclasses.replace(t, max_concurrent_trials=args.max_concurrent)
    if args.time_budget_s is not None:
        if not math.isfinite(args.time_budget_s) or args.time_budget_s < 0:
            raise SpaceError(f"--time-budget-s={args.time_budget_s} is not allowed: expected seconds >= 0 "
                             "(0: no budget)")
        t = dataclasses.replace(t, time_budget_s=args.time_budget_s or None)
    return dataclasses.replace(spec, tune=t)


# ---------------------------------------------------------------------------------------------------
# Before Ray: every input checked, nothing deleted.


@dataclasses.dataclass(frozen=True)
class _Inputs:
    data: Any  # minimind_train.data.SFTData
    tokenizer: Any
    n_params: int
    fingerprints: dict[str, str]
    tracking_uri: str
    seconds: float


def _check_inputs(spec: Any, run_cfg: Any, paths: StudyPaths, address: str | None = None) -> _Inputs:
    """Tokenise the data (the token cache, once per study), load the tokenizer and ``init_from``
    (shape-checked against the model), and check storage and tracking; every problem is a StudyError."""
    t0 = time.perf_counter()
    _quiet_libraries()
    import torch

    from minimind_train.checkpoint import WeightMismatchError, load_minimind_weights
    from minimind_train.data import DataError, prepare_data
    from minimind_train.model import build_model, count_parameters
    from minimind_train.tokenizer import load_tokenizer, tokenizer_fingerprint

    from .cluster import file_sha256
    from .mirror import TrackingError, check_tracking_server, resolve_tracking_uri

    gpu = spec.tune.resources_per_trial.gpu
    if gpu > 0 and not (address or os.environ.get("RAY_ADDRESS")) and torch.cuda.device_count() == 0:
        raise StudyError(f"tune.resources_per_trial.gpu={gpu:g} is not allowed: this machine has no GPU that "
                         "torch can use, and no Ray cluster was given (--address); set gpu: 0 to train "
                         "on CPUs")
    data_cfg = spec.run.data
    try:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    except Exception as exc:
        raise StudyError(f"data.tokenizer={data_cfg.tokenizer!r}: cannot be loaded as a tokenizer "
                         f"({type(exc).__name__}: {exc})") from exc
    try:
        data = prepare_data(data_cfg, tokenizer)
    except (DataError, FileNotFoundError, ValueError, UnicodeDecodeError) as exc:
        key = ("data.val_path" if data_cfg.val_path and str(data_cfg.val_path) in str(exc) else "data.train_path")
        raise StudyError(f"{key}={getattr(data_cfg, key.split('.')[1])!r}: {exc}") from exc
    with torch.device("meta"):  # shapes only: no memory, no init
        n_params = count_parameters(build_model(run_cfg.model, len(tokenizer)))
    fingerprints = {"dataset": data.stats.cache_key, "tokenizer": tokenizer_fingerprint(tokenizer)}
    if data.stats.val_cache_key:
        fingerprints["val_dataset"] = data.stats.val_cache_key
    init_from = run_cfg.model.init_from
    if init_from is not None:
        try:
            load_minimind_weights(build_model(run_cfg.model, len(tokenizer)), init_from)
        except WeightMismatchError as exc:
            raise StudyError(f"model.init_from={init_from!r} does not fit the model: {exc}") from exc
        except Exception as exc:
            raise StudyError(f"model.init_from={init_from!r} is not a loadable torch state dict "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        fingerprints["model.init_from"] = file_sha256(Path(init_from))
    tracking_uri = resolve_tracking_uri(spec.mlflow.tracking_uri, paths.local_dir)
    try:
        if tracking_uri.startswith("sqlite:///") and str(paths.local_dir) in tracking_uri:
            pass  # the study's own store: created with the study folder
        else:
            check_tracking_server(tracking_uri)
    except TrackingError as exc:
        raise StudyError(f"mlflow.tracking_uri: {exc}") from exc
    return _Inputs(data, tokenizer, n_params, fingerprints, tracking_uri, time.perf_counter() - t0)


def _check_storage(paths: StudyPaths) -> None:
    """The storage folder must be a folder we can write (a URI is probed by Ray's nodes later)."""
    if not paths.is_local:
        return
    root = Path(paths.storage.removeprefix("file://"))
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StudyError(f"--storage-path={paths.storage}: {existing} is a file, not a folder")
    # A real write, not os.access: root passes every permission check, and a read-only mount or a
    # full disk only shows when something is written.
    probe = existing / f".minimind-tune-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
    except OSError as exc:
        raise StudyError(f"--storage-path={paths.storage}: cannot write in {existing} "
                         f"({exc.strerror or exc})") from exc
    finally:
        probe.unlink(missing_ok=True)


def _quiet_libraries() -> None:
    """Keep the driver's output to our progress line and tables."""
    # MLflow's client retries a dead server 7 times with backoff (minutes); the mirror is only a
    # copy of the record, so the driver gives up sooner and warns (tune.mirror.MirrorCallback).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Ray's rich output ignores verbose=0; the legacy reporter honours it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A failed trial is one line from tune.progress (its reason and where the traceback is), not
    # Ray's full traceback on the driver's stderr; the trial folder keeps it (error.txt).
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Ray warns when a step of its loop takes over 0.5 s and advises reporting less often: trials report
    # once an epoch, so the advice is moot (an MLflow write on a busy machine sets it off).
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "60")
    # Each epoch checkpoints, so Ray's "snapshotting too often" advice fires constantly and is moot.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import mlflow  # noqa: F401  (it configures its loggers on import; quieten them afterwards)
    import optuna

    for name in ("mlflow", "alembic", "optuna", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray's notice that a new local cluster uses token authentication (its default) asks nothing of the user.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # After a Ctrl-C Ray advises `Tuner.restore(...)`: a study continues with --resume (printed by
    # the driver), never from Ray's own saved state. Ray's "Trials did not complete: [train_trial_...]"
    # repeats by Ray's trial names what the view and the summary say by the study's.
    logging.getLogger("ray.tune.tune").addFilter(
        lambda record: not any(s in record.getMessage() for s in ("Tuner.restore", "Trials did not complete")))
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _reconcile(record: Any, spec: Any, inputs: _Inputs, explicit_space: bool) -> list[str]:
    """Refuse a resume whose study definition changed; returns the run settings that changed."""
    from .record import PATH_KEYS, RUN_SETTINGS, diff_specs
    from .space import spec_to_dict

    new = spec_to_dict(spec)
    changed = diff_specs(record.manifest.spec, new)
    old_prints, new_prints = record.manifest.fingerprints, inputs.fingerprints
    for key in sorted(set(old_prints) | set(new_prints)):
        if old_prints.get(key) != new_prints.get(key):
            changed.append(f"{key} contents: {old_prints.get(key, '(none)')[:12]} -> "
                           f"{new_prints.get(key, '(none)')[:12]}")
    if changed:
        where = "the space file" if explicit_space else "the study"
        raise StudyError(
            f"--resume refused: {where} defines another study than {record.dir} holds:\n  "
            + "\n  ".join(changed)
            + "\nresume with the study's own space (--resume --name NAME without --space), or start a "
              "new study (--name NEW) for the changed one")
    settings = diff_specs(record.manifest.spec, new, ignore=[k for k in _flat_keys(new)
                                                              if k not in RUN_SETTINGS])
    paths = diff_specs(record.manifest.spec, new, ignore=[k for k in _flat_keys(new) if k not in PATH_KEYS])
    return settings + [f"{p} (same contents)" for p in paths]


def _flat_keys(spec: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in spec.items():
        if isinstance(value, dict) and key != "search":
            out += _flat_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


# ---------------------------------------------------------------------------------------------------
# The study.


def _run_study(spec: Any, paths: StudyPaths, args: argparse.Namespace) -> int:
    from .record import RecordError, StudyRecord

    study_dir = paths.local_dir
    _check_storage(paths)  # (before the lock file is written there)
    lock = _take_lock(study_dir)
    try:
        if not paths.is_local and (args.resume or args.restart):
            from . import cluster

            cluster.download_outputs(paths.uri, study_dir)
        if paths.is_local:
            _finish_pending_restart(study_dir)
        exists = study_dir.exists()
        if exists and not StudyRecord.exists(study_dir):
            # Never taken over, not even by --restart: it may be anything (data, another tool's output,
            # a study whose study.json was lost: its trials are still in optuna.db and runs/).
            what = ("a study without its study.json (its trials are still in optuna.db and runs/)"
                    if (study_dir / "optuna.db").exists() else "not a study of minimind-tune (no study.json)")
            raise StudyError(f"{study_dir} exists and is {what}; it is left alone: choose another --name, "
                             "or move the folder away yourself")
        if exists and args.restart:
            try:
                StudyRecord.open(study_dir)
            except RecordError as exc:
                raise StudyError(f"{exc}; the study is left alone: --restart replaces only a study it can "
                                 "read (move the folder away yourself to start over)") from exc
        if exists and not (args.resume or args.restart):
            raise StudyError(f"a study named {paths.name!r} already exists at {paths.uri}; pass --resume to "
                             "continue it or --restart to replace it (or choose another --name)")
        if args.resume and not exists:
            raise StudyError(f"--resume: no study to resume at {paths.uri}")
        record = None
        if args.resume:
            try:
                record = StudyRecord.open(study_dir)
            except RecordError as exc:
                raise StudyError(str(exc)) from exc
            record.runs = paths.runs_uri
        cpu_share = spec.tune.resources_per_trial.cpu
        run_cfg = dataclasses.replace(
            spec.run, train=dataclasses.replace(spec.run.train, num_threads=max(1, int(cpu_share))))
        print("checking inputs: tokenizer, data (tokenised once into the token cache), model, storage, "
              "tracking ...", flush=True)
        inputs = _check_inputs(spec, run_cfg, paths, args.address)
        applied: list[str] = []
        plans: list[Any] = []
        if record is not None:
            applied = _reconcile(record, spec, inputs, explicit_space=args.space is not None)
            plans = _resume_plans(record, spec)
            finished = record.finished_count()
            if not plans and finished >= spec.tune.num_samples:
                print(f"nothing to run: {finished} trials finished (num_samples {spec.tune.num_samples}); "
                      "summarising the study and bringing MLflow up to date")
                return _finish(spec, paths, record, _make_mirror(spec, paths, run_cfg, inputs, record), "FINISHED")
            budget_left, used = _time_budget(record, spec.tune.time_budget_s)
            if budget_left is not None and budget_left <= 0:
                raise StudyError(f"the study's time budget (tune.time_budget_s={spec.tune.time_budget_s:g}) is "
                                 f"used up ({used:.0f} s); raise it with --time-budget-s to run the remaining "
                                 "trials")
        return _start_ray_and_run(spec, paths, args, run_cfg, inputs, record, applied, plans)
    finally:
        lock.release()


def _finish_pending_restart(study_dir: Path) -> None:
    """Complete a ``--restart`` whose driver was killed: the old study moved aside comes back when the
    new one has no result yet, and is deleted when the new one has one (what the driver would have done)."""
    import glob
    import re

    from .record import StudyRecord

    pattern = re.compile(rf"\.{re.escape(study_dir.name)}\.replaced-\d{{8}}-\d{{6}}")
    candidates = study_dir.parent.glob(f".{glob.escape(study_dir.name)}.replaced-*")
    for aside in sorted(p for p in candidates if pattern.fullmatch(p.name)):
        new_has_results = False
        if StudyRecord.exists(study_dir):
            try:
                new_has_results = any(t.epochs for t in StudyRecord.open(study_dir).trials())
            except Exception:  # noqa: BLE001 - a half-created study: it has no result
                new_has_results = False
        if new_has_results:
            shutil.rmtree(aside, ignore_errors=True)
            print(f"--restart of an earlier driver: the new study has results; deleted the old one ({aside})")
        else:
            if study_dir.exists():
                shutil.rmtree(study_dir)  # created by the killed --restart, without any result
            os.replace(aside, study_dir)
            print(f"--restart of an earlier driver was cut short before any result: the old study is back "
                  f"at {study_dir}", file=sys.stderr)


def _start_ray_and_run(spec: Any, paths: StudyPaths, args: argparse.Namespace, run_cfg: Any, inputs: _Inputs,
                       record: Any, applied: list[str], plans: list[Any]) -> int:
    import ray

    from .record import RecordError, StudyRecord
    from .space import SpaceError, check_resources, spec_to_dict, spec_to_yaml

    print(f"inputs checked in {inputs.seconds:.1f}s (token cache {inputs.data.stats.cache_key[:12]}); "
          f"model: {inputs.n_params:,} parameters", flush=True)
    print("starting Ray ...", flush=True)
    _init_ray(args)
    try:
        try:
            check_resources(spec, ray.cluster_resources())
        except SpaceError as exc:
            raise StudyError(str(exc)) from exc
        study_data = _check_cluster(spec, paths, run_cfg, inputs)
        study_dir = paths.local_dir
        aside: Path | None = None
        # One try from the move on: however the run ends (a Ctrl-C included), a --restart's old study
        # comes back unless the new one has a result (a kill is undone by the next start instead).
        try:
            if args.restart and study_dir.exists():
                # Every input is checked: only now is the old study moved aside; it is deleted once
                # the new study's first trial has reported (see _restart_cleanup).
                aside = study_dir.with_name(f".{study_dir.name}.replaced-{_dt.datetime.now():%Y%m%d-%H%M%S}")
                os.replace(study_dir, aside)
                print(f"--restart: the old study is kept at {aside} until the new one has a result")
            if record is None:
                try:
                    record = StudyRecord.create(study_dir, paths.name, spec_to_dict(spec),
                                                spec_to_yaml(spec, _space_header(spec, paths.name)),
                                                inputs.fingerprints)
                    record.runs = paths.runs_uri
                except (OSError, RecordError) as exc:
                    raise StudyError(f"cannot create the study at {study_dir}: {exc}") from exc
            else:
                (study_dir / "space.yaml").write_text(spec_to_yaml(spec, _space_header(spec, paths.name)),
                                                      encoding="utf-8")
            return _run_on_ray(spec, paths, run_cfg, inputs, record, applied, plans, aside, study_data)
        finally:
            if aside is not None and aside.exists():
                if record is not None and any(t.epochs for t in record.trials()):
                    _delete_replaced(aside, study_dir, inputs.tracking_uri)
                else:  # the new study never got a result: the old one comes back untouched
                    shutil.rmtree(study_dir, ignore_errors=True)
                    os.replace(aside, study_dir)
                    print(f"--restart: no trial of the new study reported; the old study is back at "
                          f"{study_dir}", file=sys.stderr)
    finally:
        if not paths.is_local:
            _upload_outputs(paths.local_dir, paths.uri)
        ray.shutdown()


def _space_header(spec: Any, name: str) -> str:
    return (f"Study {name}: the resolved space (absolute paths) from {spec.source}.\n"
            f"Continue it with: python -m tune.run --resume --name {name} [--storage-path ...]")


def _init_ray(args: argparse.Namespace) -> None:
    """``ray.init``, retried once when a busy machine makes Ray's start time out (a fixed 30 s in Ray)."""
    import ray

    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        _probe_address(address)
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
        if args.ray_temp_dir:
            kwargs["_temp_dir"] = args.ray_temp_dir
        # Trials run in a thread of a reused worker, and glibc gives each new thread its own malloc
        # arena, which keeps its freed pages: one arena caps a trial worker's peak memory.
        os.environ.setdefault("MALLOC_ARENA_MAX", "1")
    for attempt in (1, 2):
        try:
            ray.init(**kwargs)
            _sigterm_as_sigint()  # ray.init installs its own (sys.exit at any point of the driver)
            return
        except Exception as exc:
            ray.shutdown()
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if attempt == 1 and not address and "timed out" in text:
                print(f"Ray did not start ({text}); trying once more ...", file=sys.stderr, flush=True)
                time.sleep(2)
                continue
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            hint = ("check the address and that the cluster is up (`ray status`)" if address else
                    "the machine may be overloaded: retry when it is quieter, or start Ray once yourself "
                    "(`ray start --head`) and pass --address auto")
            raise StudyError(f"could not start {where}: {text}; {hint}") from exc


def _probe_address(address: str) -> None:
    """Fail in seconds when a ``host:port`` Ray address has nothing listening (ray.init would retry
    the GCS for minutes); ``auto`` and ``ray://`` addresses are left to Ray."""
    import socket

    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except OSError as exc:
        raise StudyError(f"--address={address}: no Ray cluster answers there ({exc.strerror or exc}); start "
                         "it (`ray start --head`) or fix the address") from exc


def _run_on_ray(spec: Any, paths: StudyPaths, run_cfg: Any, inputs: _Inputs, record: Any, applied: list[str],
                plans: list[Any], aside: Path | None, study_data: Any) -> int:
    from .progress import ProgressView

    t = spec.tune
    finished = record.finished_count()
    new = max(0, t.num_samples - finished - len(plans))
    budget_left, used = _time_budget(record, t.time_budget_s)
    run_index = record.next_run_index()
    record.add_history({"run": run_index, "started": _dt.datetime.now().isoformat(timespec="seconds"),
                        "argv": sys.argv[1:], "num_samples": t.num_samples,
                        "max_concurrent_trials": t.max_concurrent_trials, "time_budget_s": t.time_budget_s,
                        "applied": applied})
    for line in applied:
        print(f"applied on resume: {line}")
    if plans:
        print(f"continuing {len(plans)} unfinished trial(s) from their checkpoints: "
              + ", ".join(f"t{p.number:03d} (after epoch {_epoch_of(p)})" for p in plans))
    if t.time_budget_s is not None:
        print(f"time budget: {budget_left:.0f} s left of {t.time_budget_s:.0f} s "
              f"({used:.0f} s used by earlier runs)")
    to_run = len(plans) + new
    mirror = _make_mirror(spec, paths, run_cfg, inputs, record)
    if to_run == 0:
        print(f"nothing to run: {finished} of {t.num_samples} trials finished")
        return _finish(spec, paths, record, mirror, "FINISHED")
    if budget_left is not None and budget_left <= 0:
        raise StudyError(f"the study's time budget (tune.time_budget_s={t.time_budget_s:g}) is used up "
                         f"({used:.0f} s); raise it with --time-budget-s to run the {to_run} remaining trial(s)")
    started = time.monotonic()
    from .mirror import MirrorCallback

    searcher, scheduler = _make_searcher(spec, run_cfg, record, plans)
    def statuses() -> dict[str, str]:
        by_number = record.statuses()
        return {tid: by_number[n] for tid, n in searcher.numbers.items() if n in by_number}

    view = ProgressView(t.metric, t.mode, run_cfg.train.epochs, to_run, statuses=statuses, local=paths.is_local)
    callbacks = [view, MirrorCallback(mirror, searcher.numbers)]
    if aside is not None:
        callbacks.append(_restart_cleanup(aside, paths.local_dir, inputs.tracking_uri))
    tuner = _make_tuner(spec, paths, run_cfg, searcher, scheduler, study_data, callbacks, to_run, budget_left,
                        run_index)
    print(f"study {paths.name}: {to_run} trial(s) in run {run_index} ({len(plans)} continued, {new} new; "
          f"{finished} finished before), {t.max_concurrent_trials} at a time, "
          f"{t.resources_per_trial.cpu:g} CPU + {t.resources_per_trial.gpu:g} GPU each; output {paths.uri}; "
          f"MLflow {inputs.tracking_uri}", flush=True)
    status = "FAILED"
    try:
        interrupt = _InterruptWatch()
        with interrupt:
            tuner.fit()
        status = "KILLED" if interrupt.seen else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
    except Exception as exc:
        if _disk_full(exc):  # (unfinished trials stay "running" in the record: --resume continues them)
            raise StudyError(f"the disk holding {paths.local_dir} is full ({_first_line(exc)}); finished "
                             "trials are kept: free space, then continue with --resume", code=1) from exc
        raise
    finally:
        view.close()
        try:
            record.add_history({"run": run_index, "seconds": round(time.monotonic() - started, 1)})
        except OSError as exc:  # a full disk: the run's length is lost, nothing else
            log.debug("could not record the run's length: %s", exc)
    _close_unfinished(record, "interrupted")  # (the time budget ends trials without telling searchers)
    if status == "KILLED":
        _safe_mirror(lambda: mirror.finish("KILLED", best=None, best_value=None, best_epoch=None, artifacts={}))
        print(f"\ninterrupted: continue with python -m tune.run --resume --name {paths.name} "
              f"--storage-path {paths.storage}", file=sys.stderr)
        return 130
    return _finish(spec, paths, record, mirror, "FINISHED")


def _epoch_of(plan: Any) -> int:
    return plan.epoch


def _resume_plans(record: Any, spec: Any) -> list[Any]:
    """Unfinished trials of the record, each with its checkpoints newest first.

    An epoch whose checkpoint is on disk but whose result never reached the record (Ray was
    shutting down, the driver was killed) is recorded from the checkpoint's own metrics, so it is
    not trained again.
    """
    from .searcher import ResumePlan

    plans = []
    searched = {p.path for p in spec.search}
    for t in record.unfinished():
        if set(t.params) != searched:  # the driver died inside Optuna's ask: never run with defaults
            record.abandon(t.number, f"its values were never all recorded ({sorted(t.params)} of "
                                     f"{sorted(searched)}); a new trial takes its place")
            print(f"trial t{t.number:03d} abandoned: its values were never all recorded", file=sys.stderr)
            continue
        metas = record.checkpoint_metas(t.number)
        checkpoints = {epoch: path for epoch, (path, _) in metas.items()}
        for epoch, (_, meta) in sorted(metas.items()):
            metrics = dict(meta.get("metrics") or {})
            if metrics:
                record.record_epoch(t.number, epoch, metrics, spec.tune.metric)
        done = max(record.trial(t.number).epochs, default=0)
        if done >= spec.run.train.epochs:  # it had finished: only its end was not recorded
            record.finish(t.number, "completed", spec.tune.metric, spec.tune.mode)
            continue
        if done > max(checkpoints, default=0):
            print(f"warning: trial t{t.number:03d} has {done} epoch(s) recorded but its newest checkpoint is "
                  f"epoch {max(checkpoints, default=0)}'s; it trains again from there (the record keeps the "
                  "first values)", file=sys.stderr)
        ordered = [str(checkpoints[e]) for e in sorted(checkpoints, reverse=True)]
        plans.append(ResumePlan(number=t.number, params=t.params, checkpoints=tuple(ordered),
                                epoch=max(checkpoints, default=0)))
    return plans


def _time_budget(record: Any, budget: float | None) -> tuple[float | None, float]:
    used = sum(float(h.get("seconds", 0.0)) for h in record.manifest.history)
    if budget is None:
        return None, used
    return budget - used, used


def _close_unfinished(record: Any, status: str) -> None:
    for t in record.unfinished():
        if t.status == "running":
            record.set_status(t.number, status)


def _disk_full(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen) or "database or disk is full" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]


def _delete_replaced(aside: Path, study_dir: Path, tracking_uri: str) -> None:
    """Delete the study ``--restart`` replaced: its folder, and its runs in a store outside it."""
    from .mirror import delete_study_runs, sqlite_db_path
    from .record import Manifest

    if not aside.exists():
        return
    try:
        old_id: str | None = Manifest.from_json((aside / "study.json").read_text(encoding="utf-8"), aside).study_id
    except (OSError, RuntimeError):
        old_id = None  # not a study of this version: none of its runs carries a study id
    db = sqlite_db_path(tracking_uri)
    own_store = db is not None and db.parent == study_dir  # the old runs went aside with the folder
    if old_id is not None and not own_store:
        _safe_mirror(lambda: delete_study_runs(tracking_uri, old_id))
    shutil.rmtree(aside, ignore_errors=True)
    print(f"--restart: the new study has a result; deleted the old one ({aside})")


def _restart_cleanup(aside: Path, study_dir: Path, tracking_uri: str) -> Any:
    """A Tune callback deleting the study ``--restart`` replaced, once the new one's first trial reported."""
    from ray.tune import Callback

    class RestartCleanup(Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            _delete_replaced(aside, study_dir, tracking_uri)

    return RestartCleanup()


def _make_mirror(spec: Any, paths: StudyPaths, run_cfg: Any, inputs: _Inputs, record: Any) -> Any:
    from minimind_train.config import run_config_to_dict

    from .mirror import Mirror

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


def _check_cluster(spec: Any, paths: StudyPaths, run_cfg: Any, inputs: _Inputs) -> Any:
    """On a multi-node cluster every trial node must see the storage (else refused, before anything
    of the study is written); data a node cannot read is shipped. Returns the trials' StudyData."""
    from . import cluster

    t = spec.tune
    driver_node = cluster.driver_node_id()
    nodes = cluster.trial_nodes(t.resources_per_trial.cpu, t.resources_per_trial.gpu)
    try:
        cluster.check_storage(paths.storage, nodes, driver_node)
        return cluster.study_data(inputs.data, run_cfg, nodes, driver_node)
    except cluster.ClusterError as exc:
        raise StudyError(str(exc)) from exc


def _make_searcher(spec: Any, run_cfg: Any, record: Any, plans: list[Any]) -> tuple[Any, Any]:
    from .searcher import RecordScheduler, RecordSearcher, make_pruner, make_sampler
    from .space import optuna_distributions

    t = spec.tune
    record.use(sampler=make_sampler(t.searcher, t.seed, t.num_samples, offset=len(record.trials())))
    searcher = RecordSearcher(record, optuna_distributions(spec), t.metric, t.mode, run_cfg.train.epochs, plans)
    scheduler = RecordScheduler(searcher, make_pruner(t.scheduler.type, t.scheduler.grace_period,
                                                      t.scheduler.reduction_factor))
    return searcher, scheduler


def _make_tuner(spec: Any, paths: StudyPaths, run_cfg: Any, searcher: Any, scheduler: Any, study_data: Any,
                callbacks: list[Any], to_run: int, budget_left: float | None, run_index: int) -> Any:
    from ray import tune

    from minimind_train.config import run_config_to_dict

    from .trainable import train_trial

    t = spec.tune
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=run_config_to_dict(run_cfg), metric=t.metric, mode=t.mode,
                             runs_dir=paths.runs_uri, run_name=f"run-{run_index}",
                             keep_checkpoints=t.keep_checkpoints, gpu_share=t.resources_per_trial.gpu,
                             data=study_data),
        t.resources_per_trial.as_dict(),
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, search_alg=searcher, scheduler=scheduler, num_samples=to_run,
            max_concurrent_trials=t.max_concurrent_trials, time_budget_s=budget_left, reuse_actors=True,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=f"run-{run_index}",
            storage_path=paths.runs_uri,
            callbacks=callbacks,
            # A retried trial continues from its newest checkpoint in the study folder (the
            # trainable writes those itself; Ray's checkpoint index restarts with a lost worker).
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
            verbose=0,
        ),
    )


def _trial_dirname(trial: Any) -> str:
    from .record import trial_dirname
    from .searcher import NUMBER_KEY

    return trial_dirname(int(trial.config[NUMBER_KEY]))


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


def _safe_mirror(call: Any) -> bool:
    """Run a mirror call; a tracking failure is a warning, never the study's failure."""
    try:
        call()
        return True
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; none may fail the study
        from .mirror import TrackingError

        advice = "" if isinstance(exc, TrackingError) else (
            "; the study's record is complete: `python -m tune.mirror <study dir>` catches MLflow up later")
        print(f"warning: MLflow was not updated: {_first_line(exc)}{advice}", file=sys.stderr)
        return False


def _finish(spec: Any, paths: StudyPaths, record: Any, mirror: Any, status: str) -> int:
    """best.yaml, summary.csv, plots, the MLflow mirror and disk bounds, from the record."""
    from .plots import plot_study
    from .report import (
        dir_bytes,
        format_table,
        prune_resume_state,
        summarize_trials,
        write_best_yaml,
        write_summary_csv,
    )

    t = spec.tune
    study_dir = paths.local_dir
    summaries = summarize_trials(record, t.metric, t.mode)
    unfinished = [s for s in summaries if s.status in ("interrupted", "running", "failed")]
    print()
    print(format_table(summaries, t.metric))
    eligible = [s for s in summaries if s.status == "completed" and math.isfinite(s.best_value)]
    eligible = eligible or [s for s in summaries if s.status == "stopped_early" and math.isfinite(s.best_value)]
    artifacts: dict[str, Path] = {}
    best = eligible[0] if eligible else None
    best_model: Path | None = None
    if best is not None:
        artifacts["best.yaml"] = write_best_yaml(study_dir / "best.yaml", spec, best)
        if best.checkpoint is not None and paths.is_local:
            best_model = Path(best.checkpoint) / "model.pth"
        elif best.checkpoint is not None:  # in the bucket: MLflow logs (and the user gets) a local copy
            from .cluster import fetch_file

            best_model = fetch_file(paths.uri, f"{best.checkpoint}/model.pth", study_dir / "best" / "model.pth")
        if best_model is not None:
            artifacts["best/model.pth"] = best_model
    artifacts["summary.csv"] = write_summary_csv(study_dir / "summary.csv", summaries, t.metric)
    plots = plot_study(record.study, {s.trial_id: s.curve for s in summaries}, study_dir / "plots",
                       best_trial=best.trial_id if best else None, metric_name=t.metric)
    artifacts.update({f"plots/{p.name}": p for p in plots.values()})
    best_record = record.trial(best.number) if best is not None else None
    fidelity = _print_rung_fidelity(spec, summaries)
    _safe_mirror(lambda: mirror.finish(status if best is not None else "FAILED", best=best_record,
                                       best_value=best.best_value if best else None,
                                       best_epoch=best.best_epoch if best else None, artifacts=artifacts,
                                       study_metrics=fidelity))
    freed = prune_resume_state(record, summaries, t.keep_top_trials)  # (local trial folders only)
    print()
    if best is not None and best.checkpoint is None:
        print(f"warning: no checkpoint of trial {best.trial_id} is left; best.yaml still retrains its config",
              file=sys.stderr)
    if best is not None and best.checkpoint_epoch not in (None, best.best_epoch):
        print(f"warning: the checkpoint of trial {best.trial_id}'s best epoch {best.best_epoch} is gone; "
              f"best/model.pth is its epoch {best.checkpoint_epoch} checkpoint", file=sys.stderr)
    sign = 1 if t.mode == "min" else -1
    better = [s for s in unfinished if best is not None and math.isfinite(s.best_value)
              and sign * s.best_value < sign * best.best_value]
    for s in better:
        print(f"note: unfinished trial {s.trial_id} already reached {t.metric} {s.best_value:.4f} after "
              f"{s.epochs} epoch(s): --resume finishes it")
    if best is not None:
        print(f"best: trial {best.trial_id}  {t.metric} {best.best_value:.4f} (epoch {best.best_epoch})")
        for k, v in best.params.items():
            print(f"  {k}: {v}")
        print(f"best config: {study_dir / 'best.yaml'}")
        if best_model is not None:
            print(f"best fp16 checkpoint: {best_model}"
                  + ("" if paths.is_local else f" (copied from {best.checkpoint}/model.pth)"))
    print(f"disk: {_human_bytes(dir_bytes(study_dir))} in {study_dir} "
          f"({_human_bytes(freed)} of resume state pruned; top {t.keep_top_trials} trials keep theirs)")
    print(f"compare trials: python -m tune.ui --tracking-uri {mirror.tracking_uri}")
    if unfinished:
        print(f"{len(unfinished)} trial(s) unfinished ({', '.join(s.trial_id for s in unfinished)}): "
              f"--resume continues them", file=sys.stderr)
        for s in unfinished:
            if s.error:
                print(f"  {s.trial_id}: {s.status}: {s.error}", file=sys.stderr)
    full = [s for s in unfinished if "No space left on device" in s.error or "disk is full" in s.error]
    if full:
        print(f"error: the disk holding {study_dir} is full: {len(full)} trial(s) could not save "
              "(finished trials are kept); free space, then continue with --resume", file=sys.stderr)
        return 1
    if best is None:
        print("error: no trial completed:", file=sys.stderr)
        for s in summaries:
            print(f"  {s.trial_id}: {s.status} {s.error}", file=sys.stderr)
        return 1
    return 0


def _print_rung_fidelity(spec: Any, summaries: list[Any]) -> dict[str, float]:
    """Did ASHA's early rankings predict the final one? (Spearman per rung, completed trials.)
    Returns ``{"rung_fidelity_epoch_E": rho}`` for the MLflow parent run."""
    from .report import RUNG_FIDELITY_WARNING, rung_fidelity

    sched = spec.tune.scheduler
    rungs = [r for r in sched.rungs if r < spec.run.train.epochs] if sched.type == "asha" else []
    if not rungs:
        return {}
    found = rung_fidelity(summaries, rungs)
    shown = ", ".join(f"epoch {f.epoch}: {f.spearman:+.2f} (n={f.trials})" if f.spearman is not None
                      else f"epoch {f.epoch}: n/a ({f.trials} completed trials, needs 3)" for f in found)
    print(f"rung fidelity (Spearman of each rung's ranking with the final one): {shown}")
    for f in found:
        if f.spearman is not None and f.spearman < RUNG_FIDELITY_WARNING:
            print(f"warning: at epoch {f.epoch} the trials ranked unlike at their end ({f.spearman:+.2f} < "
                  f"{RUNG_FIDELITY_WARNING}): ASHA may have stopped configs that would have ended best; raise "
                  "tune.scheduler.grace_period or lower reduction_factor", file=sys.stderr)
    return {f"rung_fidelity_epoch_{f.epoch}": f.spearman for f in found if f.spearman is not None}


def _upload_outputs(study_dir: Path, uri: str) -> None:
    """Copy the driver's own outputs (the record, best.yaml, summary, plots, MLflow) next to the trials."""
    from .cluster import upload_outputs

    try:
        n = upload_outputs(study_dir, uri)
        print(f"uploaded {_human_bytes(n)} of driver outputs from {study_dir} to {uri}")
    except Exception as exc:  # noqa: BLE001 - the study itself is done; say where the files are
        print(f"warning: could not upload {study_dir} to {uri}: {exc}", file=sys.stderr)


class _InterruptWatch:
    """Whether Ray Tune's own SIGINT/SIGUSR1 handler fired during ``Tuner.fit()``.

    On the first Ctrl-C Ray stops the trials and returns from ``fit()`` normally; nothing in the
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


if __name__ == "__main__":
    sys.exit(main())
