"""The study record: the one source of truth of a study, kept in its folder.

A study folder holds::

    optuna.db       the record (Optuna's sqlite storage): every trial, its params, its objective at each
                    evaluation (intermediate values), each evaluation's metrics, checkpoint and status
                    (trial user attrs), its state; and the study's manifest (study user attrs): the
                    resolved spec (fixed config, search space, objective, scheduler), the input
                    fingerprints, the study id, written at creation, and the ``history`` each driver
                    run adds to (start, overrides, changed run settings, the MLflow store it used, its length)
    study.json      the manifest exported from optuna.db after each change, for people and tools (read
                    only: :meth:`Study.open` refuses one whose spec was edited, naming it); a study
                    made before the manifest moved into optuna.db has it only here, and is migrated by
                    its next driver run (:meth:`Study.recover`)
    space.yaml      the resolved spec as a space file (what ``--resume`` without ``--space`` runs)
    runs/run-K/tNNN driver run K's Ray trial folders, with the trial's checkpoints (tune.storage): a
                    trial interrupted in one run continues in the next from its newest whole one
    mlflow.db       the default MLflow store, a mirror of the record (tune.mirror)

The live driver holds a lock file beside the folder (tune.lock).

A trial's reports are keyed by their **evaluation index** (:func:`evaluation_index`): ``train.evals_per_epoch``
(N) evenly spaced evaluations per epoch, index ``k`` meaning ``k / N`` epochs trained, so index ``e * N``
ends epoch ``e``. It is the step of the Optuna intermediate value, the key of the metrics (user attr
``epoch_<k>``: the name from when there was one report per epoch), the step of the MLflow points, the x
of the plots, the checkpoint folder's number and what ASHA's rungs count. With N = 1 it is the epoch:
exactly the records of studies made before evaluations inside an epoch, which open and resume as they are.

Each trial's status (user attr ``status``) is a :class:`tune.status.TrialStatus`; that module's table
says what each means and the Optuna state it ends in. Everything that picks an answer goes through
:func:`ranked`, which only takes ``completed`` (and, failing those, ``stopped_early``) trials; the study's
answer, finalists' means included, is :func:`answer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import shutil
import sqlite3
import statistics
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from minimind_train.config import RunConfig, run_config_to_dict
from minimind_train.validation import validate

from .atomic import write_atomic
from .interrupts import first_line, os_problem, record_wait_s
from .objective import Objective
from .status import ANSWERS, FINISHED, RESUMABLE, TrialStatus
from .storage import (
    RUNS_DIR,
    ResumePoint,
    checkpoint_metas,
    filesystem_of,
    local_path,
    resume_point,
    trial_dirs,
)

__all__ = ["BASELINE_PREFIX", "MANIFEST_FILE", "NO_BETTER_MARGIN", "OPTUNA_FILE", "PATH_KEYS", "RUN_SETTINGS",
           "UNIFORM_KEY", "Finalist", "Manifest", "Study", "StudyError", "TrialRecord", "answer", "diff_specs",
           "evals_per_epoch", "evaluation_index", "evaluation_name", "finalist_configs", "no_better_reason",
           "rank_finalists", "rank_key", "ranked"]

MANIFEST_FILE = "study.json"
SPACE_FILE = "space.yaml"
OPTUNA_FILE = "optuna.db"
_T = TypeVar("_T")
_STUDY_NAME = "study"  # the one Optuna study inside optuna.db
_SPEC_ATTR = "spec"  # the manifest's spec in optuna.db (study user attrs; studies made before lack some)
_MANIFEST_ATTR = "manifest"  # name, created, fingerprints, format: present once the manifest lives in optuna.db
_HISTORY_ATTR = "history"
_CHECKPOINT_ATTR = "checkpoint_"  # trial user attr checkpoint_<k>: the checkpoint written at evaluation k
FORMAT = 1

# Every status in the order a study's table lists them (then by value): answers first, unfinished next.
_STATUS_ORDER = {TrialStatus.COMPLETED: 0, TrialStatus.STOPPED_EARLY: 1, TrialStatus.INTERRUPTED: 2,
                 TrialStatus.RUNNING: 2, TrialStatus.FAILED: 3, TrialStatus.DIVERGED: 3, TrialStatus.NO_BETTER: 3,
                 TrialStatus.ABANDONED: 4}

# Metrics of a trial's first epoch that say what "learned something" means (minimind_train.train reports
# them): ``baseline_<metric>``, the objective of the model before its first optimizer step, and
# ``uniform_loss``, ln(vocabulary size): the loss of predicting every token equally likely.
BASELINE_PREFIX = "baseline_"
UNIFORM_KEY = "uniform_loss"
# A value must beat those bars by more than this fraction of them: a collapsed model lands on ln(V) up to
# rounding, and 0.1% of the untrained loss is no learning worth an answer.
NO_BETTER_MARGIN = 1e-3


def evaluation_index(epoch: int, step_in_epoch: int, steps_in_epoch: int, evals_per_epoch: int) -> int:
    """The index (1-based over the run) of the evaluation after ``step_in_epoch`` of the ``steps_in_epoch``
    optimizer steps of 1-based ``epoch``, on the grid of ``evals_per_epoch`` (N) per epoch: ``(epoch - 1) * N
    + floor(step_in_epoch * N / steps_in_epoch)``. The trainer evaluates after ``ceil(k * S / N)`` steps
    (:func:`minimind_train.train.evaluation_steps`), and this is that ``k``: the run's count of evaluations
    when the epoch has at least N steps. With fewer (one evaluation per step, a small batch count) an
    evaluation takes the grid's largest index at its step, so an index always means the same fraction of
    training, whatever a trial's batch size: values at one index compare across trials (ASHA's rungs), and
    the last evaluation of epoch e is ``e * N``. Optimizer steps differ between trials that search
    ``train.batch_size`` or ``accumulation_steps``, so they are kept as a metric (``optimizer_steps``) only."""
    if not (1 <= step_in_epoch <= steps_in_epoch and epoch >= 1 and evals_per_epoch >= 1):
        raise ValueError(f"no evaluation after step {step_in_epoch} of {steps_in_epoch} in epoch {epoch} "
                         f"with evals_per_epoch={evals_per_epoch}")
    return (epoch - 1) * evals_per_epoch + step_in_epoch * evals_per_epoch // steps_in_epoch


def evals_per_epoch(study: optuna.Study) -> int:
    """The study's ``train.evals_per_epoch`` from its own copy of the spec in optuna.db (1 for a study
    made before it: one evaluation per epoch)."""
    spec = study.user_attrs.get(_SPEC_ATTR)
    train = spec.get("train") if isinstance(spec, Mapping) else None
    value = train.get("evals_per_epoch") if isinstance(train, Mapping) else None
    return value if isinstance(value, int) and value >= 1 else 1


def evaluation_name(index: int, evals_per_epoch: int) -> str:
    """Evaluation ``index`` in messages: ``epoch 2`` with one evaluation per epoch (as studies always said),
    else ``evaluation 3 (0.375 epochs)``, ``evaluation 8 (1 epoch)``."""
    epochs = index / evals_per_epoch
    return f"epoch {index}" if evals_per_epoch == 1 else f"evaluation {index} ({epochs:g} epoch{'' if epochs == 1 else 's'})"


def no_better_reason(value: float, objective: Objective, first_epoch: Mapping[str, float]) -> str:
    """Why a trial whose best objective is ``value`` learned nothing ("" when it did): it is not better
    (by :data:`NO_BETTER_MARGIN`) than its model before training (``baseline_<metric>`` in
    ``first_epoch``, its first evaluation's metrics: :attr:`TrialRecord.first_metrics`) or, for a loss minimised, than the uniform predictor
    (``uniform_loss``). A bar the trial did not report is not checked (a study recorded before them)."""
    metric, sign, than = objective.metric, objective.sign, objective.not_better
    bars = [(first_epoch.get(f"{BASELINE_PREFIX}{metric}"), "the untrained model",
             "{value:.4f} {than} {bar:.4f} before training")]
    if objective.minimize:
        bars.append((first_epoch.get(UNIFORM_KEY), "the uniform predictor",
                     "{value:.4f} {than} {bar:.4f} = ln(vocabulary size)"))
    for bar, what, shown in bars:
        if bar is not None and math.isfinite(bar) and not sign * value < sign * bar - NO_BETTER_MARGIN * abs(bar):
            return f"no better than {what}: {metric} " + shown.format(value=value, than=than, bar=bar)
    return ""


def rank_key(status: str, value: float, objective: Objective) -> tuple[int, float]:
    """Where a trial of ``status`` whose best objective is ``value`` stands in a study's ranking (smaller
    first): by status (answers, then unfinished, then those that are no answer), then by value."""
    return _STATUS_ORDER.get(status, 3), objective.sort_key(value)


def ranked(items: Iterable[_T], objective: Objective, status: Callable[[_T], str], value: Callable[[_T], float],
           statuses: Sequence[str] = ANSWERS) -> list[_T]:
    """The one ranking of answers, best first: the ``items`` whose status is one of ``statuses`` (by
    default :data:`ANSWERS`) with a finite value, ordered by :func:`rank_key`. A ``no_better``,
    ``diverged`` or unfinished trial is never among them: whatever names a study's best (report,
    finalists, MLflow, plots, warm starts) picks from here; the live view skips values that
    :func:`no_better_reason` rejects."""
    found = [item for item in items if status(item) in statuses and math.isfinite(value(item))]
    return sorted(found, key=lambda item: rank_key(status(item), value(item), objective))


class StudyError(RuntimeError):
    """The study cannot be created, opened or continued as asked: one line for the user (what is
    wrong and what to do) and the driver's exit code (2: an input or the command is wrong, 1: the
    study failed on the way, e.g. a full disk)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Manifest:
    """``study.json``. ``spec`` is :func:`tune.space.spec_to_dict` of the spec the study was created with.

    ``fingerprints`` maps an input (``dataset``, ``tokenizer``, ``model.init_from``) to a content hash:
    paths may change (a moved study), contents may not.
    """

    study_id: str
    name: str
    created: str
    spec: dict[str, Any]
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    format: int = FORMAT

    @property
    def spec_hash(self) -> str:
        return _spec_hash(self.spec)

    def to_json(self) -> str:
        body = {"format": self.format, "spec_hash": self.spec_hash, **dataclasses.asdict(self)}
        return json.dumps(body, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        """The manifest in ``text`` (read from ``where``); StudyError: another format, or damaged.
        (:meth:`Study.open` also compares its definition with its other copies.)"""
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise StudyError(f"{where}: study format {raw.get('format')!r} is not {FORMAT}; this "
                                  "version of minimind-tune cannot continue it")
            return validate(cls, raw)  # (spec_hash, derived from spec, is compared by check_copies)
        except (ValueError, AttributeError) as exc:  # (a ConfigError from validate is a ValueError)
            reason = str(exc).replace("\n", "; ")
            raise StudyError(f"{where} is damaged ({reason}); the trials are still in {OPTUNA_FILE} and "
                              f"{RUNS_DIR}/") from exc

    def check_copies(self, written: Any, where: Path, recorded: Mapping[str, Any] | None,
                     recorded_in: Path) -> None:
        """Refuse (StudyError) a definition whose copies disagree, naming the file that does: ``written``,
        the ``spec_hash`` study.json (``where``) was written with, and ``recorded``, the spec kept in
        ``recorded_in`` (optuna.db; None for studies older than that). The study's trials ran with one
        definition and never continue with another, whichever file was edited by hand. (``space.yaml``,
        the third copy, is compared by the driver: :func:`tune.preflight.reconcile`.)"""
        hash_ok = written is None or written == self.spec_hash
        if recorded is None or _spec_hash(recorded) == self.spec_hash:
            if hash_ok:
                return
            what = (f"its spec is not the one it was written with (spec_hash {written}, its spec's is now "
                    f"{self.spec_hash})")
            raise StudyError(f"{where} was edited by hand: {what}; put it back as it was, or start a new "
                             "study (--name NEW) for the changed definition")
        changes = "\n  ".join(diff_specs(recorded, self.spec, ignore=()))
        if written == _spec_hash(recorded):  # (study.json's own hash names the recorded copy: its spec was edited)
            culprit, other = where, f"the definition its trials ran with, kept in {recorded_in}"
        elif hash_ok:  # (study.json agrees with itself: the copy in optuna.db was edited, or study.json rewritten whole)
            culprit, other = recorded_in, f"the one {where} was written with"
        else:
            culprit, other = f"{where} and {recorded_in}", "each other"
        raise StudyError(f"{culprit} was edited by hand: its study definition disagrees "
                         f"with {other} (recorded -> {where.name}):\n  {changes}\nput it back as it was; "
                         "or start a new study (--name NEW) for the changed definition")


def _spec_hash(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# Keys of the spec that may change between runs of one study: they say how to run, not what is studied.
RUN_SETTINGS = ("tune.num_samples", "tune.max_concurrent_trials", "tune.time_budget_s", "tune.max_failures",
                "tune.resources_per_trial.cpu", "tune.resources_per_trial.gpu", "tune.keep_checkpoints",
                "tune.keep_top_trials", "tune.finalists.top_k", "tune.finalists.seeds", "tune.warm_start",
                "mlflow.tracking_uri", "mlflow.experiment", "train.num_threads", "train.device",
                "train.log_interval", "train.eval_batch_size", "data.cache_dir")
# Inputs compared by content (Manifest.fingerprints), not by path.
PATH_KEYS = ("data.train_path", "data.val_path", "data.tokenizer", "model.init_from")


def diff_specs(old: Mapping[str, Any], new: Mapping[str, Any],
               ignore: Sequence[str] = RUN_SETTINGS + PATH_KEYS) -> list[str]:
    """``key: old -> new`` for each key of two :func:`tune.space.spec_to_dict` results that differs.

    Searched parameters compare as a whole (``search.train.learning_rate: {...} -> {...}``), after the others.
    A run-config field missing from one side is its default: a spec written before the field existed
    (e.g. ``train.evals_per_epoch`` in a study made before it) defines the same study as one that has it.
    """
    flat_old, flat_new = _flat(old), _flat(new)
    defaults = _flat(run_config_to_dict(RunConfig()))
    lines = []
    for key in sorted(set(flat_old) | set(flat_new), key=lambda k: (k.startswith("search."), k)):
        absent = defaults.get(key, "(not searched)" if key.startswith("search.") else "(absent)")
        a, b = flat_old.get(key, absent), flat_new.get(key, absent)
        if a != b and key not in ignore:
            lines.append(f"{key}: {_show(a)} -> {_show(b)}")
    return lines


def _flat(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's values by dotted key; each searched parameter whole, as ``search.<path>``."""
    # (Ray's flatten_dict: the record is read by the driver, which has Ray anyway.)
    from ray.tune.utils import flatten_dict

    fixed = flatten_dict({k: v for k, v in spec.items() if k != "search"}, delimiter=".")
    return fixed | {f"search.{path}": d for path, d in (spec.get("search") or {}).items()}


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One trial as the record has it. ``epochs`` maps each evaluation index (:func:`evaluation_index`;
    with one evaluation per epoch, the 1-based epoch) to the metrics it reported there."""

    number: int
    status: str
    params: dict[str, Any]
    epochs: dict[int, dict[str, float]]
    error: str = ""
    # A finalist (tune.report): the config of search trial ``finalist_of`` trained again with ``seed``.
    finalist_of: int | None = None
    seed: int | None = None
    # When Optuna asked for the trial and when it finished (naive local time; None: not yet).
    started: _dt.datetime | None = None
    completed: _dt.datetime | None = None
    # The checkpoint index: evaluation index -> the checkpoint written there (path on the runs' filesystem).
    checkpoints: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"t{self.number:03d}"

    @property
    def run_params(self) -> dict[str, Any]:
        """The values the trainable applies to the base config: the searched ones (and a finalist's seed)."""
        return self.params if self.seed is None else {**self.params, "train.seed": self.seed}

    @property
    def first_metrics(self) -> dict[str, float]:
        """The metrics of its first evaluation, which carry the baselines (:func:`no_better_reason`); its
        index is 1 only when the first epoch has at least ``evals_per_epoch`` steps."""
        return self.epochs[min(self.epochs)] if self.epochs else {}

    def curve(self, metric: str) -> list[tuple[int, float]]:
        return [(e, float(m[metric])) for e, m in sorted(self.epochs.items()) if metric in m]

    def best(self, objective: Objective) -> tuple[int, float]:
        """``(evaluation index, value)`` of its best recorded objective, the earliest on a tie; ``(0,
        objective.worst)`` when none is finite."""
        return objective.best_of(self.curve(objective.metric), lambda ev: ev[1]) or (0, objective.worst)


@dataclasses.dataclass(frozen=True)
class Finalist:
    """A config re-checked across seeds (``tune.finalists``): search trial ``number`` and its finalist
    trials. ``values`` are the best objective per seed, in ``seeds`` order (the search trial's first);
    a diverged or failed seed counts as the worst value, so an unstable config ranks last."""

    trial_id: str
    number: int
    params: dict[str, Any]
    seeds: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation over the seeds (0 for one seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 and math.isfinite(self.mean) else 0.0


def rank_finalists(finalists: Sequence[Finalist], objective: Objective) -> list[Finalist]:
    """Best mean objective first: the study's answer when finalists ran."""
    return sorted(finalists, key=lambda f: objective.sort_key(f.mean))


def finalist_configs(trials: Sequence[TrialRecord], objective: Objective, base_seed: int) -> list[Finalist]:
    """The configs with finished finalist trials among ``trials``, ranked (:func:`rank_finalists`); the
    search trial itself ran with ``base_seed``."""
    runs: dict[int, list[tuple[int, float]]] = {}
    for t in trials:
        if t.finalist_of is not None and t.seed is not None and t.status in FINISHED:
            value = t.best(objective)[1] if t.status == TrialStatus.COMPLETED else objective.worst
            runs.setdefault(t.finalist_of, []).append((t.seed, value if math.isfinite(value) else objective.worst))
    by_number = {t.number: t for t in trials}
    out = []
    for number, seeded in runs.items():
        base = by_number[number]
        seeds, values = zip((base_seed, base.best(objective)[1]), *sorted(seeded))
        out.append(Finalist(base.name, number, base.params, seeds, values))
    return rank_finalists(out, objective)


def answer(trials: Sequence[TrialRecord], objective: Objective, finalists: Sequence[Finalist]) -> TrialRecord | None:
    """The study's answer, the one rule that best.yaml, the end report and MLflow's parent run follow: the
    config with the best finite mean over seeds (``finalists``: :func:`finalist_configs`), else the best
    completed search trial (the best stopped early when none completed; never one that is no better than
    untrained: :func:`ranked`), else None."""
    search = [t for t in trials if t.finalist_of is None]
    if finalists and math.isfinite(finalists[0].mean):
        return next((t for t in search if t.number == finalists[0].number), None)
    found = ranked(search, objective, lambda t: t.status, lambda t: t.best(objective)[1])
    return found[0] if found else None


def _trial_record(t: FrozenTrial) -> TrialRecord:
    epochs = {int(key[6:]): {k: float(v) for k, v in value.items() if _is_number(v)}
              for key, value in t.user_attrs.items()
              if key.startswith("epoch_") and key[6:].isdigit() and isinstance(value, Mapping)}
    checkpoints = {int(key[len(_CHECKPOINT_ATTR):]): str(value) for key, value in t.user_attrs.items()
                   if key.startswith(_CHECKPOINT_ATTR) and key[len(_CHECKPOINT_ATTR):].isdigit()}
    status = TrialStatus.of(t.user_attrs.get("status"), t.state)
    return TrialRecord(number=t.number, status=status, params=dict(t.params), epochs=epochs,
                       error=str(t.user_attrs.get("error", "")), finalist_of=t.user_attrs.get("finalist_of"),
                       seed=t.user_attrs.get("seed"), started=t.datetime_start, completed=t.datetime_complete,
                       checkpoints=checkpoints)


class Study:
    """The record of one study folder: its manifest and its Optuna storage.

    Create with :meth:`create`, open with :meth:`open`. Writes go straight to sqlite (each a
    transaction), so a killed driver loses nothing that was recorded, and a full disk rolls the one
    failed write back.
    """

    def __init__(self, study_dir: Path, manifest: Manifest, storage: optuna.storages.BaseStorage) -> None:
        self.dir = study_dir
        # Where Ray writes the trial folders: <study>/runs, or a URI when the study's storage is one
        # (then this folder is the driver's staging copy of the record).
        self.runs: str = str(study_dir / RUNS_DIR)
        self.manifest = manifest
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(_STUDY_NAME)
        self.migrated = False  # (whether optuna.db holds the whole manifest: set by open and _save)
        self.use()

    def use(self, sampler: optuna.samplers.BaseSampler | None = None,
            pruner: optuna.pruners.BasePruner | None = None) -> None:
        """Ask new trials with ``sampler`` and judge rungs with ``pruner`` (neither is stored in the db)."""
        self.study = optuna.load_study(study_name=_STUDY_NAME, storage=self.storage, sampler=sampler,
                                       pruner=pruner)

    # -- opening -----------------------------------------------------------------------------------

    @staticmethod
    def exists(study_dir: Path) -> bool:
        return (study_dir / MANIFEST_FILE).is_file()

    @staticmethod
    def _storage(study_dir: Path) -> optuna.storages.RDBStorage:
        # The busy timeout: `python -m tune.ui` or a sync may read while the driver writes (tune.interrupts).
        return optuna.storages.RDBStorage(f"sqlite:///{study_dir / OPTUNA_FILE}",
                                          engine_kwargs={"connect_args": {"timeout": record_wait_s()}})

    @classmethod
    def create(cls, study_dir: Path, name: str, spec: Mapping[str, Any], space_yaml: str,
               fingerprints: Mapping[str, str],
               prepare: Callable[[Study], None] | None = None) -> Study:
        """A new study folder; ``spec`` is :func:`tune.space.spec_to_dict`; ``prepare`` fills the new
        record before it is a study (a warm start's history). The caller holds the study's lock.

        The folder is made whole beside ``study_dir`` and renamed into place: a creation cut short (a
        kill) leaves no folder there, only the hidden one, which the next creation clears.

        Raises:
            FileExistsError: ``study_dir`` exists.
        """
        if study_dir.exists():
            raise FileExistsError(errno.EEXIST, "a study folder is there already", str(study_dir))
        staging = study_dir.with_name(f".{study_dir.name}.creating")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        manifest = Manifest(study_id=uuid.uuid4().hex, name=name,
                            created=_dt.datetime.now().isoformat(timespec="seconds"), spec=dict(spec),
                            fingerprints=dict(fingerprints))
        storage = cls._storage(staging)
        optuna.create_study(storage=storage, study_name=_STUDY_NAME, direction=Objective.of(spec["tune"]).optuna_direction)
        record = cls(staging, manifest, storage)
        record._save(manifest, export=False)
        write_atomic(staging / SPACE_FILE, space_yaml)
        if prepare is not None:
            prepare(record)
        write_atomic(staging / MANIFEST_FILE, manifest.to_json())
        storage.engine.dispose()  # (its connections know the staging path)
        # Published by a rename of its own, not tune.atomic.staged: a folder that appeared at study_dir
        # meanwhile is never replaced (os.rename fails on a non-empty folder).
        os.rename(staging, study_dir)
        return cls(study_dir, manifest, cls._storage(study_dir))

    @classmethod
    def open(cls, study_dir: Path) -> Study:
        path = study_dir / MANIFEST_FILE
        if not path.is_file():
            raise StudyError(f"{study_dir} is not a study folder (no {MANIFEST_FILE})")
        text = path.read_text(encoding="utf-8")
        db = study_dir / OPTUNA_FILE
        if not db.is_file():
            Manifest.from_json(text, path)  # (a damaged study.json is said first)
            raise StudyError(f"{db} is missing: the study's trials are not recorded")
        if not _is_optuna_db(db):  # (Optuna would create its tables in it)
            Manifest.from_json(text, path)
            raise StudyError(f"{db} is not an Optuna database (empty or damaged); the "
                              f"trials' checkpoints are still in {RUNS_DIR}/")
        try:
            storage = cls._storage(study_dir)
            attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(_STUDY_NAME))
        except Exception as exc:  # sqlalchemy and optuna raise many kinds for a damaged database
            raise StudyError(_unreadable(exc, db)) from exc
        recorded = attrs.get(_SPEC_ATTR)
        if recorded is not None and not isinstance(recorded, Mapping):
            raise StudyError(f"{db} was edited by hand: its copy of the study's definition is not a mapping "
                             f"({recorded!r:.80}); put it back, or start a new study (--name NEW)")
        exported = Manifest.from_json(text, path)
        exported.check_copies(json.loads(text).get("spec_hash"), path, recorded, db)
        # The manifest from optuna.db; from study.json for a study made before it lived there (migrated
        # by the next driver run's recover()). study.json may lag the db by one write: a kill in between.
        manifest = exported if recorded is None or not isinstance(attrs.get(_MANIFEST_ATTR), Mapping) else \
            _recorded_manifest(attrs, db)
        try:
            record = cls(study_dir, manifest, storage)
            record.migrated = manifest is not exported
            return record
        except Exception as exc:  # (as above)
            raise StudyError(_unreadable(exc, db)) from exc

    def _save(self, manifest: Manifest, export: bool = True) -> None:
        """Write ``manifest`` into optuna.db (the history, then the rest, which never changes: written at
        creation or migration; its presence marks a migrated study), then export it to study.json."""
        self.storage.set_study_user_attr(self.study_id, _HISTORY_ATTR, manifest.history)
        if not self.migrated:
            for key, value in (("study_id", manifest.study_id), (_SPEC_ATTR, manifest.spec),
                               (_MANIFEST_ATTR, {"format": manifest.format, "name": manifest.name,
                                                 "created": manifest.created, "fingerprints": manifest.fingerprints})):
                self.storage.set_study_user_attr(self.study_id, key, value)
            self.migrated = True
        if export:
            write_atomic(self.dir / MANIFEST_FILE, manifest.to_json())
        self.manifest = manifest

    def add_history(self, entry: Mapping[str, Any]) -> None:
        """Record a driver run (its start, command-line overrides, applied settings) in the manifest."""
        self._save(dataclasses.replace(self.manifest, history=[*self.manifest.history, dict(entry)]))

    def record_run_seconds(self, run: int, seconds: float) -> None:
        """Set driver run ``run``'s length so far (seconds), replacing what this run set before: called
        as the run goes, so that a driver killed at any moment has its time counted up to the last call."""
        history = list(self.manifest.history)
        entry = {"run": run, "seconds": round(seconds, 1)}
        if history and history[-1].get("run") == run and "seconds" in history[-1]:
            history[-1] = entry
        else:
            history.append(entry)
        self._save(dataclasses.replace(self.manifest, history=history))

    def write_space(self, space_yaml: str) -> None:
        """Write ``space.yaml`` (what ``--resume --name`` runs) whole or not at all."""
        write_atomic(self.dir / SPACE_FILE, space_yaml)

    def seconds_used(self) -> float:
        """Seconds the study's driver runs have run so far (``time_budget_s`` counts over all of them)."""
        return sum(float(h.get("seconds", 0.0)) for h in self.manifest.history)

    def next_run_index(self) -> int:
        taken = [int(p.name[4:]) for p in (self.dir / RUNS_DIR).glob("run-*") if p.name[4:].isdigit()]
        return max(taken, default=0) + 1

    # -- reading -----------------------------------------------------------------------------------

    def _own_trials(self) -> list[FrozenTrial]:
        """The study's own trials: not those copied from an earlier study, nor configs queued to be asked."""
        return [t for t in self.study.get_trials(deepcopy=False)
                if t.state != TrialState.WAITING and t.user_attrs.get("status") != TrialStatus.WARM_START]

    def trials(self) -> list[TrialRecord]:
        return [_trial_record(t) for t in self._own_trials()]

    def statuses(self) -> dict[int, str]:
        """Trial number -> status, in one read of the storage."""
        return {t.number: t.status for t in self.trials()}

    def trial(self, number: int) -> TrialRecord:
        """Raises KeyError: ``number`` is not one of the study's own trials."""
        for t in self._own_trials():
            if t.number == number:
                return _trial_record(t)
        raise KeyError(number)

    def trial_dirs(self, number: int) -> list[Path]:
        """The trial's local Ray folders, oldest run first ([] for a URI storage)."""
        return trial_dirs(Path(self.runs), number) if local_path(self.runs) is not None else []

    def resume_point(self, number: int) -> ResumePoint:
        """The checkpoint the trial continues from (and the newer ones that cannot be continued from):
        the trainable's own answer (:func:`tune.storage.resume_point`), so the driver says what happens."""
        return resume_point(self.runs, number)

    def best_checkpoint(self, trial: TrialRecord, objective: Objective) -> tuple[int, str] | None:
        """``(evaluation index, path)`` of the trial's indexed checkpoint with the best recorded objective
        that is still whole (:func:`minimind_train.checkpoint.checkpoint_problem`; retention deletes the
        others); the earliest on a tie; None when none is."""
        from minimind_train.checkpoint import checkpoint_problem  # (torch: not imported by a dry run)

        open_file = filesystem_of(self.runs)[0].open_input_file
        # (a trial that finished before the record kept the index: its checkpoints as found on disk)
        index_of = trial.checkpoints or {k: path for k, (path, _) in checkpoint_metas(self.runs, trial.number).items()}
        scored = [(index, value) for index, value in trial.curve(objective.metric) if index in index_of]
        for index, _ in sorted(scored, key=lambda iv: (objective.sort_key(iv[1]), iv[0])):
            if checkpoint_problem(index_of[index], resume=False, open_file=open_file) is None:
                return index, index_of[index]
        return None

    # -- writing (the driver) ----------------------------------------------------------------------

    def ask(self, distributions: Mapping[str, optuna.distributions.BaseDistribution]) -> tuple[int, dict[str, Any]]:
        """A new trial: its number and the sampler's params (Optuna's ask-and-tell interface)."""
        trial = self.study.ask(dict(distributions))
        trial.set_user_attr("status", TrialStatus.RUNNING)
        return trial.number, dict(trial.params)

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _frozen(self, number: int) -> FrozenTrial:
        return self.storage.get_trial(self._trial_id(number))

    def set_status(self, number: int, status: str, error: str = "") -> None:
        trial_id = self._trial_id(number)
        self.storage.set_trial_user_attr(trial_id, "status", status)
        if error:
            self.storage.set_trial_user_attr(trial_id, "error", error if len(error) <= 2000 else error[:1999] + "…")

    def record_epoch(self, number: int, epoch: int, metrics: Mapping[str, Any], objective: str,
                     checkpoint: str | None = None) -> bool:
        """Store one evaluation's metrics and objective (Optuna's intermediate value at step ``epoch``, the
        evaluation index: :func:`evaluation_index`) and the ``checkpoint`` written there (the newest one
        of that index: an evaluation trained again writes it again); False when that evaluation was
        already recorded (its first values are kept)."""
        trial_id = self._trial_id(number)
        frozen = self.storage.get_trial(trial_id)
        if frozen.state.is_finished():  # (Optuna refuses any change to it)
            return False
        if checkpoint and frozen.user_attrs.get(f"{_CHECKPOINT_ATTR}{epoch}") != checkpoint:
            self.storage.set_trial_user_attr(trial_id, f"{_CHECKPOINT_ATTR}{epoch}", checkpoint)
        if f"epoch_{epoch}" in frozen.user_attrs or not metrics:
            return False
        clean = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        clean.setdefault("timestamp_ms", float(time.time_ns() // 1_000_000))
        value = clean.get(objective)
        if value is not None and math.isfinite(value) and epoch not in frozen.intermediate_values:
            self.storage.set_trial_intermediate_value(trial_id, epoch, value)
        self.storage.set_trial_user_attr(trial_id, f"epoch_{epoch}", clean)
        return True

    def should_prune(self, number: int, pruner: optuna.pruners.BasePruner) -> bool:
        frozen = self._frozen(number)
        return bool(frozen.intermediate_values) and pruner.prune(self.study, frozen)

    def finish(self, number: int, status: str, objective: Objective, error: str = "") -> None:
        """End a trial in Optuna: completed -> COMPLETE(best epoch), stopped_early -> PRUNED, diverged -> FAIL,
        no_better -> COMPLETE(best epoch).

        Other statuses leave the trial RUNNING (resumable) and only record the status. A finished trial
        stays as it is; a completed one without a finite ``objective`` is diverged; a completed or
        stopped one whose best value is no better than before training (:func:`no_better_reason`) is
        ``no_better``, the reason as its error.
        """
        frozen = self._frozen(number)
        if frozen.state.is_finished():
            return
        trial = _trial_record(frozen)
        _, best = trial.best(objective)
        if status in (TrialStatus.COMPLETED, TrialStatus.NO_BETTER) and not math.isfinite(best):
            status, error = TrialStatus.DIVERGED, error or f"no finite {objective.metric} was reported"
        elif status in ANSWERS and math.isfinite(best) and (
                reason := no_better_reason(best, objective, trial.first_metrics)):
            status, error = TrialStatus.NO_BETTER, reason
        self.set_status(number, status, error)
        if status in FINISHED:
            state = TrialStatus(status).state
            self.study.tell(number, best if state == TrialState.COMPLETE else None, state=state)

    def abandon(self, number: int, reason: str) -> None:
        """End a trial that can never run as asked (its params were never all recorded: the driver
        died inside ``ask``): Optuna FAIL, status ``abandoned``; it does not count towards num_samples."""
        self.set_status(number, TrialStatus.ABANDONED, reason)
        if not self._frozen(number).state.is_finished():
            self.study.tell(number, state=TrialStatus.ABANDONED.state)

    def tell_decided(self, objective: Objective) -> list[int]:
        """Tell Optuna the end of each trial whose status is final but whose Optuna state is still
        RUNNING: its driver died between the two writes of :meth:`finish` (or :meth:`abandon`), or after
        the scheduler's decision and before Ray ended the trial. Returns their numbers.

        Otherwise such a trial is never resumed (its status is final) and never told: TPE, the plots and
        a warm start from this study would not see it."""
        told = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            status = t.user_attrs.get("status")
            if status == TrialStatus.ABANDONED:
                self.abandon(t.number, str(t.user_attrs.get("error", "")))
            elif status in FINISHED:
                self.finish(t.number, str(status), objective, error=str(t.user_attrs.get("error", "")))
            else:
                continue
            told.append(t.number)
        return told

    def recover(self, objective: Objective, evaluations: int, evals_per_epoch: int = 1) -> list[str]:
        """Bring the record up to date with whatever stopped the study's last driver run (a kill at any
        moment): the one place that reconciles a study, run under its lock at the start of every driver run
        that continues it (the README's "How a study flows" lists what it does). ``evaluations``: a whole
        trial's (``tune.scheduler.max_t``), of ``evals_per_epoch`` per epoch. Returns warnings, one line each."""
        self._save(self.manifest)
        self.tell_decided(objective)
        searched, warnings = set(self.manifest.spec.get("search") or {}), []
        for t in self.unfinished():  # (a finished trial can no longer change in Optuna)
            if set(t.params) != searched:
                self.abandon(t.number, f"its values were never all recorded ({sorted(t.params)} of "
                                       f"{sorted(searched)}); a new trial takes its place")
                warnings.append(f"trial {t.name} abandoned: its values were never all recorded")
                continue
            for index, (path, meta) in sorted(checkpoint_metas(self.runs, t.number).items()):
                self.record_epoch(t.number, index, dict(meta.get("metrics") or {}), objective.metric, checkpoint=path)
            if t.status == TrialStatus.RUNNING:
                self.set_status(t.number, TrialStatus.INTERRUPTED)
            done = max(self.trial(t.number).epochs, default=0)
            if done >= evaluations:  # it had finished: only its end was not recorded
                self.finish(t.number, TrialStatus.COMPLETED, objective)
                continue
            point = self.resume_point(t.number)
            warnings += [f"trial {t.name}'s checkpoint {path} cannot be continued from: {problem}"
                         for path, problem in point.damaged]
            if done > point.evaluation:
                where = (f"{evaluation_name(point.evaluation, evals_per_epoch)}'s; it trains again from there"
                         if point.evaluation else "none; it trains again from the start")
                warnings.append(f"trial {t.name} has results up to {evaluation_name(done, evals_per_epoch)} "
                                f"recorded but its newest usable checkpoint is {where} (the record keeps the first values)")
        return warnings

    def interrupt_running(self) -> None:
        """Mark trials still ``running`` as ``interrupted`` (the time budget ends trials without telling
        the searcher); ``--resume`` continues them."""
        for number, status in self.statuses().items():
            if status == TrialStatus.RUNNING:
                self.set_status(number, TrialStatus.INTERRUPTED)

    def unfinished(self) -> list[TrialRecord]:
        return [t for t in self.trials() if t.status in RESUMABLE]

    def finished_count(self) -> int:
        """Finished search trials (what ``num_samples`` counts; finalists are not search trials)."""
        return sum(t.status in FINISHED and t.finalist_of is None for t in self.trials())

    def add_finalist(self, of: TrialRecord, seed: int,
                     distributions: Mapping[str, optuna.distributions.BaseDistribution]) -> int:
        """A new trial training search trial ``of``'s config with ``seed``; returns its number."""
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING, params=of.params, distributions=dict(distributions),
            user_attrs={"status": TrialStatus.RUNNING, "finalist_of": of.number, "seed": seed})
        return self.storage.get_trial_number_from_id(self.storage.create_new_trial(self.study_id, template))


def _recorded_manifest(attrs: Mapping[str, Any], db: Path) -> Manifest:
    """The manifest kept in optuna.db's study user attrs ``attrs``; StudyError: they were damaged."""
    try:
        return validate(Manifest, {**attrs[_MANIFEST_ATTR], "study_id": attrs.get("study_id"),
                                   "spec": attrs[_SPEC_ATTR], "history": attrs.get(_HISTORY_ATTR, [])})
    except (ValueError, TypeError) as exc:
        reason = str(exc).replace("\n", "; ")
        raise StudyError(f"{db} was edited by hand: its study manifest is damaged ({reason}); put it back, "
                         "or start a new study (--name NEW)") from exc


def _is_optuna_db(path: Path) -> bool:
    """Whether ``path`` is a sqlite file holding Optuna's tables; creates nothing in it.

    Opened read-write (``mode=rw`` never creates the file or a table) rather than ``mode=ro``: a driver
    killed mid-write leaves a hot journal, which only a writable connection rolls back (a read-only one
    fails with SQLITE_READONLY_ROLLBACK, and the study would look damaged).
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=record_wait_s())) as db:
            return db.execute("select 1 from sqlite_master where type='table' and name='studies'").fetchone() is not None
    except sqlite3.Error as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:  # (locked by another process: not damaged)
            raise StudyError(_unreadable(exc, path)) from exc
        return False


def _unreadable(exc: BaseException, db: Path) -> str:
    """Why the study record ``db`` cannot be read: an OS error's one line (:func:`tune.interrupts.os_problem`:
    locked by another process, unwritable, ...), else damage."""
    return os_problem(exc, db) or (f"{db} cannot be read ({first_line(exc)}); the trials' checkpoints are "
                                   f"still in {RUNS_DIR}/")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
