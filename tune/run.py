"""``python -m tune.run --space FILE``: a Ray Tune + Optuna study over the SFT trainer.

The entry point: it reads the space and takes the study's lock; the driver run (tune.experiment) checks
every input before Ray starts or anything is deleted, runs the trials, whose searcher and scheduler read and
write the study record (tune.study), and writes ``best.yaml``, ``summary.csv`` and plots (tune.report).
``--resume`` continues a study from its record; ``--restart`` replaces it, keeping the old one until the new
one has a result (tune.restart).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import write_atomic
from .lock import StudyLock, lock_path
from .storage import StudyPaths, download_outputs, writable_problem
from .study import MANIFEST_FILE, OPTUNA_FILE, Manifest, Study, StudyError

if TYPE_CHECKING:  # (tune.space loads pydantic and the trainer's config: imported when a study is read)
    from .space import StudySpec

__all__ = ["DEFAULT_STORAGE", "main"]

DEFAULT_STORAGE = Path("studies")
# The options that override a tune setting (each option's argparse dest is the setting's name).
_OVERRIDES = {"num_samples": "--num-samples", "max_concurrent_trials": "--max-concurrent",
              "time_budget_s": "--time-budget-s"}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tune.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", help="space YAML: a path, or a bundled name such as sft.yaml (optional with "
                                   "--resume: the study's own resolved space.yaml)")
    p.add_argument("--name", help="study name (default: the space file's stem)")
    p.add_argument("--storage-path", default=os.environ.get("MINIMIND_TUNE_STORAGE"),
                   help=f"folder or URI for study output (default: ./{DEFAULT_STORAGE})")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue a study: unfinished trials go on from their checkpoints, new ones "
                           "fill up to num_samples; a finished study is summarised and synced again")
    mode.add_argument("--restart", action="store_true",
                      help="replace an existing study of this name (it is kept until the new one has a result)")
    p.add_argument("--num-samples", type=int, help="override tune.num_samples (on --resume: more trials)")
    p.add_argument("--max-concurrent", type=int, dest="max_concurrent_trials",
                   help="override tune.max_concurrent_trials")
    p.add_argument("--time-budget-s", type=float,
                   help="override tune.time_budget_s (seconds for the whole study, all runs; 0: none)")
    p.add_argument("--warm-start", metavar="STUDY_DIR",
                   help="a new study starts from an earlier study's trials (same objective and searched "
                        "parameters; other ranges, epochs or model allowed): its best configs run first")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved space, resources, trial plan and cost forecast, then exit")
    p.add_argument("--no-forecast", action="store_true",
                   default=os.environ.get("MINIMIND_TUNE_FORECAST", "1") == "0",
                   help="skip the cost forecast (a short probe of the study's trial, tune.forecast) that --dry-run "
                        "and the start of a run print (default: $MINIMIND_TUNE_FORECAST=0 skips it too)")
    p.add_argument("--ray-temp-dir", help="temp dir of a local Ray instance")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


@dataclasses.dataclass
class _Study:
    """What the driver knows of its study so far (for the message when it stops)."""

    paths: StudyPaths | None = None


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stdout)
    # Heavy imports after argument parsing so `--help` is instant.
    from .interrupts import stop_on_signals

    stop_on_signals()
    study = _Study()
    try:
        return _main(args, study)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - _stopped re-raises what it does not know
        message, code = _stopped(exc, study.paths)
        print(message, file=sys.stderr)
        return code


def _stopped(exc: BaseException, paths: StudyPaths | None) -> tuple[str, int]:
    """The one place that turns what stopped the driver into its message and exit status: a refusal (2, or
    the StudyError's own), Ctrl-C or SIGTERM (130), an OS error in one line naming the path and what to do (2
    before any trial ran, when nothing was changed; after, 130 when the study is left for --resume, 1 when its
    record is gone). Anything else is a bug: re-raised, with its traceback."""
    from .interrupts import StudyStopped, chain, os_problem

    causes = list(chain(exc))
    stopped = next((e for e in causes if isinstance(e, StudyStopped)), None)
    if (refusal := next((e for e in causes if isinstance(e, StudyError)), None)) is not None:
        return f"error: {refusal}", refusal.code
    if any(isinstance(e, KeyboardInterrupt) for e in causes):
        if stopped is None:
            return "\ninterrupted before any trial started; the study is as it was", 130
        return f"\ninterrupted: continue with {stopped.resume}", 130
    record = stopped.record if stopped else None if paths is None else paths.local_dir / OPTUNA_FILE
    if (problem := os_problem(exc, record)) is None:
        raise exc if stopped is None or stopped.__cause__ is None else stopped.__cause__
    if stopped is None:
        return f"error: {problem}; nothing was changed: run the command again then", 2
    if not stopped.record.exists():
        return f"error: {problem}", 1
    return f"error: {problem}, then continue with {stopped.resume}; finished trials are kept", 130


def _main(args: argparse.Namespace, study: _Study) -> int:
    from .cluster import storage_problem
    from .interrupts import record_wait_s
    from .preflight import describe, describe_resume, quiet_libraries

    if not args.dry_run:
        quiet_libraries()  # before Ray is imported: it reads some of these settings once, at import
    from .space import SpaceError, load_space, optuna_distributions, spec_to_dict

    try:
        record_wait_s()  # (read wherever the record is opened: an unusable value is refused before any work)
    except ValueError as exc:
        raise StudyError(str(exc)) from exc
    storage = args.storage_path or str(DEFAULT_STORAGE)
    if problem := storage_problem(storage):  # e.g. relative under `ray job submit`
        raise StudyError(problem)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    if args.name is not None:
        _check_name(args.name)
    if args.space is None and not (args.resume and args.name):
        raise StudyError("--space is required (only --resume --name NAME can take the study's own space)")
    if args.space is None and (problem := writable_problem(storage)):  # (before its lock file is written)
        raise StudyError(problem)
    space = args.space or _own_space(StudyPaths(storage, args.name))
    try:
        spec = _apply_overrides(load_space(space), args)
    except (SpaceError, FileNotFoundError) as exc:
        raise StudyError(str(exc)) from exc
    name = args.name or spec.source.stem
    _check_name(name)
    paths = study.paths = StudyPaths(storage=storage, name=name)
    _check_length(paths)
    if args.dry_run:
        print(describe(spec))
        print(f"study: {name}  output: {paths.uri}")
        if problem := writable_problem(paths.storage):  # (what a run would refuse before any work)
            print(f"a run would be refused: {problem}")
        if args.resume:
            print(describe_resume(spec_to_dict(spec), paths))
        elif (earlier := _warm_start_from(spec, args)) is not None:
            from .warmstart import history_trials

            used, outside = history_trials(earlier, optuna_distributions(spec))
            print(f"warm start: {len(used)} finished trial(s) of study {earlier.manifest.name!r} at {earlier.dir} "
                  f"as history ({outside} outside this space's ranges left out; same objective and searched "
                  "parameters)")
        if not (args.resume or args.no_forecast):  # (a --resume's forecast needs its record: a real run's)
            from .forecast import print_forecast

            print_forecast(spec)
        return 0
    return _run_study(spec, paths, args)


# What the study adds to its name: `.NAME.replaced-YYYYmmdd-HHMMSS` (a --restart's old study).
_NAME_SUFFIX = len(".replaced-20261207-120000") + 1
_NAME_MAX = 255  # (Linux's limit, in bytes)
# SQLite opens optuna.db, mlflow.db and their `-journal` files (also under the folder's longer names while
# it is created or set aside) and no path of 512 bytes or more (its unix VFS's MAX_PATHNAME): far below
# PATH_MAX, so it bounds the study folder's path (the deepest checkpoint file is ~160 bytes further).
_DIR_MAX = 511 - _NAME_SUFFIX - len("/optuna.db-journal")


def _check_name(name: str) -> None:
    """A study name is one folder name: never a path that leaves (or is) the storage folder."""
    if not name or name.startswith(".") or "/" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise StudyError(f"--name={name!r} is not allowed: a study name is one folder name (no '/', no "
                         "control characters, not empty, not starting with '.')")
    if len(os.fsencode(name)) > _NAME_MAX - _NAME_SUFFIX:
        raise StudyError(f"--name is too long ({len(os.fsencode(name))} bytes): at most "
                         f"{_NAME_MAX - _NAME_SUFFIX} (a file name is at most {_NAME_MAX}, and the study adds to it)")


def _check_length(paths: StudyPaths) -> None:
    """SQLite can open the study's databases: else a traceback once Ray has started, or mid-study."""
    if paths.is_local and len(os.fsencode(str(paths.local_dir))) > _DIR_MAX:
        raise StudyError(f"--storage-path={paths.storage} with --name={paths.name}: the study folder's path is "
                         f"too long ({len(os.fsencode(str(paths.local_dir)))} bytes; at most {_DIR_MAX}, so that "
                         "SQLite can open its databases): choose a shorter --storage-path or --name")


def _own_space(paths: StudyPaths) -> Path:
    """The study's resolved space.yaml, rewritten from study.json when it is missing (it is derived)."""
    import yaml

    from .restart import finish_pending_restart

    folder = paths.local_dir
    if paths.is_local:  # a --restart cut short by a kill: its old study comes back first
        with StudyLock(folder):
            finish_pending_restart(folder)
    space = folder / "space.yaml"
    if space.is_file():
        return space
    manifest = folder / MANIFEST_FILE
    if manifest.is_file():
        try:
            spec = Manifest.from_json(manifest.read_text(encoding="utf-8"), manifest).spec
            write_atomic(space, yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
            return space
        except OSError as exc:
            raise StudyError(f"--resume: cannot rebuild {space} from {manifest}: {exc}") from exc
    if StudyLock.held(folder):
        raise StudyError(f"--resume: study {paths.name!r} is being created by "
                         f"{lock_path(folder).read_text(encoding='utf-8', errors='replace').strip()}; wait for it")
    raise StudyError(f"--resume: no study {paths.name!r} at {paths.uri}")


def _apply_overrides(spec: StudySpec, args: argparse.Namespace) -> StudySpec:
    """``spec`` with the ``tune`` settings given as options, checked as the space file's (time budget 0: none)."""
    from .space import SpaceError

    given = {key: getattr(args, key) for key in _OVERRIDES if getattr(args, key) is not None}
    try:
        tune = dataclasses.replace(spec.tune, **{k: v or None if k == "time_budget_s" else v for k, v in given.items()})
    except SpaceError as exc:
        raise SpaceError(f"{exc} (given as {', '.join(f'{_OVERRIDES[k]}={v}' for k, v in given.items())})") from None
    return dataclasses.replace(spec, tune=tune)


def _warm_start_from(spec: StudySpec, args: argparse.Namespace) -> Study | None:
    """The earlier study ``--warm-start`` (else ``tune.warm_start``) names, checked; None when neither does."""
    from .space import spec_to_dict
    from .warmstart import check_warm_start

    source, key = ((args.warm_start, "--warm-start") if args.warm_start is not None
                   else (spec.tune.warm_start, "tune.warm_start"))
    return None if source is None else check_warm_start(source, spec_to_dict(spec), key)


def _run_study(spec: StudySpec, paths: StudyPaths, args: argparse.Namespace) -> int:
    from .experiment import run_experiment
    from .restart import finish_pending_restart

    study_dir = paths.local_dir
    if problem := writable_problem(paths.storage):  # (before the lock file is written there)
        raise StudyError(problem)
    with StudyLock(study_dir):
        if not paths.is_local and (args.resume or args.restart):
            download_outputs(paths.uri, study_dir)
        if paths.is_local:
            finish_pending_restart(study_dir)
        exists = study_dir.exists()
        if exists and not Study.exists(study_dir):
            # Never taken over, not even by --restart: it may be anything (data, another tool's output,
            # a study whose study.json was lost: its trials are still in optuna.db and runs/).
            what = ("a study without its study.json (its trials are still in optuna.db and runs/)"
                    if (study_dir / "optuna.db").exists() else "not a study of minimind-tune (no study.json)")
            raise StudyError(f"{study_dir} exists and is {what}; it is left alone: choose another --name, "
                             "or move the folder away yourself")
        if exists and not (args.resume or args.restart):
            raise StudyError(f"a study named {paths.name!r} already exists at {paths.uri}; pass --resume to "
                             "continue it or --restart to replace it (or choose another --name)")
        if args.resume and not exists:
            raise StudyError(f"--resume: no study to resume at {paths.uri}")
        if exists and (problem := writable_problem(str(study_dir), f"the study folder {study_dir}")):
            raise StudyError(problem)  # (a read-only one: refused before anything is read or written)
        if exists and (db := study_dir / OPTUNA_FILE).exists():
            # An OSError here is one line (_stopped): SQLite opens a record it may not read as "not a database",
            # and one it may not write read-only, failing at its first write, after Ray started.
            db.open("r+b" if args.resume else "rb").close()
        if exists and args.restart:
            try:
                Study.open(study_dir)
            except StudyError as exc:
                raise StudyError(f"{exc}; the study is left alone: --restart replaces only a study it can "
                                 "read (move the folder away yourself to start over)") from exc
        record = Study.open(study_dir) if args.resume else None
        if args.warm_start is not None and record is not None:
            raise StudyError(f"--warm-start={args.warm_start}: a study is warm-started when it is created; "
                             f"{paths.name!r} exists (--resume continues it as it is)")
        earlier = None if record is not None else _warm_start_from(spec, args)
        return run_experiment(spec, paths, record, explicit_space=args.space is not None, replace=args.restart,
                              address=args.address, ray_temp_dir=args.ray_temp_dir, warm_start_from=earlier,
                              forecast=not args.no_forecast)


if __name__ == "__main__":
    sys.exit(main())
