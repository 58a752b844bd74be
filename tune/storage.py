"""Where a study's files live: its folder (local, or a pyarrow URI such as ``s3://bucket/studies``)
and the trials' checkpoints in it.

``StudyPaths`` names the places; the trainable publishes a checkpoint at each evaluation (:func:`write_checkpoint`,
named by the evaluation index of :func:`tune.study.evaluation_index`: with one evaluation per epoch, the epoch),
keeps the best and the newest (:func:`retain_checkpoints`), and a resumed trial finds its usable
checkpoints again (:func:`checkpoint_metas`, :func:`resume_point`), whichever driver run wrote them; its
``step.json`` tells the live view its step (:func:`step_writer`). With a URI storage the
driver's own outputs (the record, MLflow, plots) live in a local staging folder (:func:`staging_dir`),
uploaded at the end and downloaded again by ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from .atomic import staged, write_atomic
from .objective import Objective

__all__ = [
    "CHECKPOINT_PREFIX", "RUNS_DIR", "STEP_FILE", "ResumePoint", "StudyPaths", "checkpoint_metas", "copy_path",
    "download_outputs", "fetch_file", "filesystem_of", "local_path", "resume_point", "retain_checkpoints", "staging_dir", "step_writer",
    "trial_dirname", "trial_dirs", "upload_outputs", "writable_problem", "write_checkpoint",
]

STAGING_ENV = "MINIMIND_TUNE_STAGING"
# What a resume of a URI study needs back on the driver; the rest is rewritten by every run.
_RESUME_OUTPUTS = ("study.json", "space.yaml", "optuna.db", "mlflow.db", "mlflow.db.lock", "mlartifacts")
RUNS_DIR = "runs"  # <study>/runs/run-K/tNNN: trial NNN's folder in driver run K
# A trial's checkpoint at evaluation index k: <trial folder>/epoch_000k (the name from when k was the epoch:
# with train.evals_per_epoch 1 it still is, so studies made before evaluations inside an epoch resume as they are).
CHECKPOINT_PREFIX = "epoch_"
STEP_FILE = "step.json"  # in a trial's folder, for the live view: {"epoch", "step", "steps_per_epoch", "time"}


def local_path(location: str) -> Path | None:
    """The local folder that a storage ``location`` names (a path, or a ``file://`` URI); None for
    any other URI (``s3://``, ``gs://``, ...: reached through pyarrow)."""
    if "://" not in location or location.startswith("file://"):
        return Path(location.removeprefix("file://"))
    return None


@dataclass(frozen=True)
class StudyPaths:
    """The study ``name`` under ``storage`` (an absolute local folder or a URI)."""

    storage: str
    name: str

    @property
    def is_local(self) -> bool:
        """Whether the study folder is on this machine (a plain path or ``file://``)."""
        return local_path(self.storage) is not None

    @property
    def local_dir(self) -> Path:
        """Folder of the study on this machine (the record and the driver's outputs live here); for a
        URI storage a driver-local staging folder, uploaded to :attr:`uri` at the end."""
        folder = local_path(self.storage)
        return staging_dir(self.uri) if folder is None else folder / self.name

    @property
    def uri(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def runs_uri(self) -> str:
        """Where the trial folders go (``<study>/runs``)."""
        return str(self.local_dir / RUNS_DIR) if self.is_local else f"{self.uri}/{RUNS_DIR}"


def writable_problem(storage: str, label: str | None = None) -> str | None:
    """Why the local ``storage`` folder cannot hold a study (None when it can; a URI is probed by
    Ray's nodes later). A real write, not ``os.access``: root passes every permission check, and a
    read-only mount or a full disk only shows when something is written. ``label`` names the folder in
    the message (default: the ``--storage-path`` option)."""
    existing = local_path(storage)
    if existing is None:
        return None
    label = label or f"--storage-path={storage}"
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{label}: {existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(b"x")
    except OSError as exc:
        return f"{label}: cannot write in {existing} ({exc.strerror or exc}); make it writable"
    return None


def filesystem_of(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) of a local folder or a URI."""
    fs, path = pafs.FileSystem.from_uri(location if "://" in location else os.path.abspath(location))
    return fs, path.rstrip("/")


def trial_dirname(number: int) -> str:
    return f"t{number:03d}"


def _run_number(name: str) -> int:
    """K of a driver run's folder ``run-K`` (0 if K is not a number), to order runs oldest first."""
    return int(name[4:]) if name[4:].isdigit() else 0


def _checkpoint_folders(runs: str, number: int) -> list[tuple[int, str]]:
    """Trial ``number``'s checkpoint folders under ``runs``, whole or not: ``(evaluation index by its name,
    path on the runs' filesystem)``, newest first and, within an index, the latest driver run first."""
    fs, base = filesystem_of(str(runs))
    found: list[tuple[int, int, str]] = []
    try:
        listing = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return []
    for run in (i for i in listing if i.type == pafs.FileType.Directory and i.base_name.startswith("run-")):
        trial = pafs.FileSelector(f"{run.path}/{trial_dirname(number)}", allow_not_found=True)
        try:
            entries = fs.get_file_info(trial)
        except OSError:
            continue
        for info in entries:
            epoch = info.base_name.removeprefix(CHECKPOINT_PREFIX)
            if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX) \
                    and epoch.isdigit():
                found.append((int(epoch), _run_number(run.base_name), info.path))
    return [(epoch, path) for epoch, _, path in sorted(found, reverse=True)]


def checkpoint_metas(runs: str | Path, number: int) -> dict[int, tuple[str, dict[str, Any]]]:
    """Trial ``number``'s usable checkpoints under ``runs`` (a local folder or a pyarrow URI such as
    ``s3://bucket/studies/sft/runs``), by evaluation index: ``(path on that filesystem, its meta.json)``.

    Usable by :func:`minimind_train.checkpoint.checkpoint_problem` (meta.json and a whole model.pth;
    the resume state may have been pruned); a later run's folder wins an index. Which one a trial
    continues from is :func:`resume_point`'s answer.
    """
    from minimind_train.checkpoint import checkpoint_problem  # (torch: not imported by a dry run)

    fs, _ = filesystem_of(str(runs))
    found: dict[int, tuple[str, dict[str, Any]]] = {}
    for epoch, path in _checkpoint_folders(str(runs), number):
        if epoch in found or checkpoint_problem(path, resume=False, open_file=fs.open_input_file) is not None:
            continue
        try:
            with fs.open_input_stream(f"{path}/meta.json") as fh:
                found[epoch] = (path, json.loads(fh.read()))
        except (OSError, ValueError):
            continue  # (gone since the check)
    return found


@dataclass(frozen=True)
class ResumePoint:
    """Where a trial continues: after evaluation index ``evaluation`` (0: from the start; ``epoch``: the
    epochs it had completed) from the checkpoint at ``path`` with its ``meta``; ``damaged``: the newer
    checkpoints that cannot be continued from, ``(path, why)``."""

    epoch: int = 0
    evaluation: int = 0
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    damaged: tuple[tuple[str, str], ...] = ()


def resume_point(runs: str | Path, number: int) -> ResumePoint:
    """The checkpoint trial ``number`` continues from: the newest that
    :func:`minimind_train.checkpoint.checkpoint_problem` finds whole with its resume state. The driver
    says it, and the trainable loads it, through this one function."""
    from minimind_train.checkpoint import checkpoint_problem  # (torch: not imported by a dry run)

    fs, _ = filesystem_of(str(runs))
    damaged = []
    for index, path in _checkpoint_folders(str(runs), number):
        problem = checkpoint_problem(path, resume=True, open_file=fs.open_input_file)
        if problem is None:
            with fs.open_input_stream(f"{path}/meta.json") as fh:
                meta = json.loads(fh.read())
            return ResumePoint(int(meta["epoch"]), index, path, meta, tuple(damaged))
        damaged.append((path, problem))
    return ResumePoint(damaged=tuple(damaged))


def step_writer(trial_dir: str | Path, min_interval_s: float = 1.0) -> Callable[[Any], None]:
    """An ``on_step`` callback for ``minimind_train.train.train_epochs`` that writes its ``StepInfo``
    to ``trial_dir``/:data:`STEP_FILE` at most every ``min_interval_s`` seconds, atomically (by
    rename). A failed write is skipped: the view is not worth a trial."""
    folder, last = Path(trial_dir), [-math.inf]

    def write(info: Any) -> None:
        if (now := time.time()) - last[0] < min_interval_s:
            return
        last[0] = now
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / STEP_FILE, json.dumps({"epoch": info.epoch, "step": info.step_in_epoch,
                                                         "steps_per_epoch": info.steps_in_epoch, "time": now}),
                         durable=False)
        except OSError:
            pass
    return write


def write_checkpoint(save: Callable[[Path], Path], trial_dir: str, epoch: int) -> str:
    """Write a trial's checkpoint as ``<trial_dir>/epoch_000k`` (a local folder or a URI), ``k`` = ``epoch``,
    the evaluation index (:func:`tune.study.evaluation_index`), with ``save`` (a folder -> that folder
    written whole: :func:`minimind_train.checkpoint.save_checkpoint`); returns its path.

    Locally ``save`` writes it once, in place: its own rename publishes it, so readers see the whole
    folder or none (one there already, the same evaluation trained again, is replaced). To a bucket it is
    written in a local temporary folder, then uploaded with meta.json last, so a folder cut short has no
    meta.json and is never resumed from (:func:`checkpoint_metas`).
    """
    target = f"{trial_dir}/{CHECKPOINT_PREFIX}{epoch:04d}"
    if "://" not in trial_dir:
        return str(save(Path(target)))
    fs, path = filesystem_of(target)
    with tempfile.TemporaryDirectory(prefix="minimind-ckpt-") as tmp:
        local = save(Path(tmp) / "checkpoint")
        for f in sorted((p for p in local.iterdir() if p.is_file()), key=lambda p: p.name == "meta.json"):
            copy_path(str(f), f"{path}/{f.name}", pafs.LocalFileSystem(), fs)
    return path


def retain_checkpoints(runs: str, number: int, keep: int, objective: Objective) -> list[str]:
    """Delete trial ``number``'s checkpoints but the ``keep`` best by ``objective`` and the newest (where
    the trial continues from); returns the deleted paths. Incomplete folders are left alone."""
    metas = checkpoint_metas(runs, number)
    if len(metas) <= keep + 1:
        return []

    def score(index: int) -> float:
        try:
            return objective.sort_key(float(metas[index][1]["metrics"][objective.metric]))
        except (KeyError, TypeError, ValueError):
            return math.inf

    kept = set(sorted(metas, key=score)[:keep]) | {max(metas)}
    deleted = [path for index, (path, _) in metas.items() if index not in kept]
    fs, _ = filesystem_of(runs)
    for path in deleted:
        fs.delete_dir(path)
    return deleted


def trial_dirs(runs_dir: Path, number: int) -> list[Path]:
    """Trial ``number``'s folders in the driver runs under ``runs_dir`` (``run-K/tNNN``), oldest run first."""
    found = [p / trial_dirname(number) for p in runs_dir.glob("run-*") if (p / trial_dirname(number)).is_dir()]
    return sorted(found, key=lambda p: _run_number(p.parent.name))


def staging_dir(study_uri: str) -> Path:
    """The driver-local folder for the driver-side outputs of a study stored at a URI."""
    root = os.environ.get(STAGING_ENV) or os.path.join(tempfile.gettempdir(), "minimind-tune-staging")
    digest = hashlib.sha256(study_uri.encode()).hexdigest()[:12]
    return Path(root).expanduser() / f"{study_uri.rstrip('/').rsplit('/', 1)[-1]}-{digest}"


def copy_path(src: str, dst: str, from_fs: Any, to_fs: Any) -> None:
    """Copy the file or folder ``src`` on ``from_fs`` to ``dst`` on ``to_fs``, making the folders it needs."""
    is_dir = from_fs.get_file_info(src).type == pafs.FileType.Directory
    to_fs.create_dir(dst if is_dir else dst.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(src, dst, source_filesystem=from_fs, destination_filesystem=to_fs)


def _history(fs: Any, path: str) -> list[Any] | None:
    """The driver runs a ``study.json`` lists (its ``history``); None when it is missing or unreadable."""
    try:
        with fs.open_input_stream(path) as fh:
            history = json.loads(fh.read()).get("history")
    except (OSError, ValueError, AttributeError):
        return None
    return history if isinstance(history, list) else None


def download_outputs(study_uri: str, local: Path) -> list[str]:
    """Fetch the driver-side state a resume needs (the record, MLflow's db, ...) into ``local``; returns
    their names. Nothing is fetched when ``local`` holds the newer record: its driver runs extend the
    storage's (a driver killed before its upload at the end left the study's latest record here)."""
    fs, base = filesystem_of(study_uri)
    local.mkdir(parents=True, exist_ok=True)
    mine = _history(pafs.LocalFileSystem(), str(local / "study.json"))
    theirs = _history(fs, f"{base}/study.json") or []
    if mine is not None and mine[:len(theirs)] == theirs:
        return []
    got = [n for n in _RESUME_OUTPUTS if fs.get_file_info(f"{base}/{n}").type != pafs.FileType.NotFound]
    # study.json last: a download cut short (a kill) leaves no record as new as the storage's, so the
    # next resume downloads again rather than trusting the half-copied databases beside it.
    for name in sorted(got, key=lambda n: n == "study.json"):
        copy_path(f"{base}/{name}", str(local / name), fs, pafs.LocalFileSystem())
    return got


def upload_outputs(local: Path, study_uri: str) -> int:
    """Copy every file under ``local`` to the same relative path under ``study_uri``; returns bytes."""
    if not local.is_dir():
        return 0
    fs, base = filesystem_of(study_uri)
    copy_path(str(local), base, pafs.LocalFileSystem(), fs)
    return sum(p.stat().st_size for p in local.rglob("*") if p.is_file())


def fetch_file(study_uri: str, fs_path: str | os.PathLike[str], local: Path) -> Path:
    """Copy ``fs_path`` (a path on the filesystem of ``study_uri``, as Ray reports it) to ``local``,
    whole or not at all (copied beside it, then renamed)."""
    with staged(local) as tmp:
        copy_path(str(fs_path), str(tmp), filesystem_of(study_uri)[0], pafs.LocalFileSystem())
    return local
