"""Which trials have ended, recorded by the driver in the study's storage the moment they end.

Ray saves its experiment state (what ``--resume`` starts from) in the background, at most every
~10 s or when a trial checkpoints. A trial that ended, finished or stopped early by ASHA, shortly
before the driver was killed can therefore still be RUNNING in that saved state, and ``--resume``
would train it again from its last saved checkpoint. :class:`EndedLedger` closes that gap: on each
trial's end it writes ``<trial folder>/ended.json`` with the trial's reported results, synchronously,
before the other callbacks (MLflow) record the end. A restarted trial that finds the file does not
train: :func:`replay_plan` says which recorded epochs Ray's saved state is missing, and the trainable
reports those again (with their checkpoints where kept) and returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

__all__ = [
    "ENDED_FILE",
    "EndedLedger",
    "EndedRecord",
    "SnapshottingASHAScheduler",
    "SnapshottingFIFOScheduler",
    "fetch_checkpoint",
    "keep_tuner_backup",
    "prune_checkpoints",
    "read_ended",
    "repair_saved_state",
    "replay_plan",
    "trial_uri",
]

log = logging.getLogger(__name__)

ENDED_FILE = "ended.json"
# Ray's bookkeeping in a result row, not what the trainable reported.
_RAY_KEYS = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint"}


@dataclass(frozen=True)
class EndedRecord:
    trial_id: str
    epochs: int  # Ray's training_iteration when the trial ended
    results: tuple[dict[str, Any], ...]  # what the trainable reported, epoch 1..epochs in order


def trial_uri(study_uri: str, trial_id: str) -> str:
    """The trial's folder in the study storage (tune.run names trial folders ``trial_<id>``)."""
    return f"{study_uri.rstrip('/')}/trial_{trial_id}"


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs

    if "://" not in uri:  # a local folder
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def read_ended(trial_dir: str) -> EndedRecord | None:
    """The record of an ended trial in ``trial_dir`` (a folder or URI), None when it has not ended."""
    import pyarrow.fs

    fs, path = _fs(trial_dir)
    target = f"{path}/{ENDED_FILE}"
    if fs.get_file_info(target).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(target) as fh:
        raw = json.loads(fh.read().decode("utf-8"))
    return EndedRecord(trial_id=str(raw["trial_id"]), epochs=int(raw["epochs"]),
                       results=tuple(dict(r) for r in raw["results"]))


def _write(fs: Any, folder: str, record: EndedRecord) -> None:
    import pyarrow.fs

    body = json.dumps({"trial_id": record.trial_id, "epochs": record.epochs,
                       "results": list(record.results)}, allow_nan=True).encode("utf-8")
    fs.create_dir(folder, recursive=True)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        # Atomic: a driver killed mid-write must not leave a half file that a resume then trusts.
        tmp = Path(folder) / f".{ENDED_FILE}.{os.getpid()}"
        tmp.write_bytes(body)
        os.replace(tmp, Path(folder) / ENDED_FILE)
    else:  # object stores put whole objects
        with fs.open_output_stream(f"{folder}/{ENDED_FILE}") as out:
            out.write(body)


def _reported(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in _RAY_KEYS}


def _read_rows(result_json: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        text = result_json.read_text(encoding="utf-8")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed driver
            continue
    return rows


class EndedLedger(Callback):
    """Driver callback: writes ``ended.json`` into a trial's storage folder when the trial ends,
    then bounds the trial's checkpoints to the ``keep`` best by ``metric`` plus its last one.

    Checkpoint retention happens here, at the trial's end, instead of in Ray: Ray deletes a running
    trial's surplus checkpoint as soon as a newer one registers, before its saved state (uploaded in
    the background) names the newer one, so a driver killed in between left a saved state whose
    checkpoint was gone, and that trial failed on ``--resume``. While a trial runs it keeps every
    epoch's checkpoint.

    Errored trials get no record: Ray retries them, or ``--resume`` does (``resume_errored``).
    Put it before callbacks that report the end elsewhere (MLflow), so nothing claims an end that
    a resume could undo.
    """

    def __init__(self, keep: int, metric: str, mode: str) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.keep = keep
        self.metric = metric
        self.mode = mode

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = dict(trial.last_result or {})
        epochs = int(last.get("training_iteration") or 0)
        # The driver's copy of the trial's results (Ray's JSON logger, restored from storage on
        # --resume), epoch by epoch; the later report of an epoch wins, as in the summary.
        by_epoch: dict[int, dict[str, Any]] = {}
        for row in _read_rows(Path(trial.local_path) / "result.json"):
            if isinstance(row.get("training_iteration"), int):
                by_epoch[row["training_iteration"]] = _reported(row)
        if epochs:
            by_epoch[epochs] = _reported(last)
        results = tuple(by_epoch[e] for e in range(1, epochs + 1) if e in by_epoch)
        if len(results) != epochs:
            log.warning("trial %s ended after %d epochs but only %d results are on record; a resume "
                        "would retrain it", trial.trial_id, epochs, len(results))
            return
        try:
            _write(trial.storage.storage_filesystem, trial.path,
                   EndedRecord(trial_id=trial.trial_id, epochs=epochs, results=results))
        except OSError:
            log.warning("could not record the end of trial %s in %s", trial.trial_id, trial.path,
                        exc_info=True)
            return
        try:
            prune_checkpoints(trial.storage.storage_filesystem, trial.path, self.keep, self.metric, self.mode)
        except OSError:
            log.warning("could not prune the checkpoints of trial %s", trial.trial_id, exc_info=True)


def _checkpoint_metas(fs: Any, trial_path: str) -> list[tuple[str, dict[str, Any]]]:
    """(folder path, meta.json) of the trial's checkpoints (ours: with a meta.json), any order."""
    import pyarrow.fs

    from minimind_train.checkpoint import META_FILE

    out = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{META_FILE}") as fh:
                out.append((info.path, json.loads(fh.read().decode("utf-8"))))
        except (OSError, ValueError):  # not one of ours, or half written
            continue
    return out


def prune_checkpoints(fs: Any, trial_path: str, keep: int, metric: str, mode: str) -> list[str]:
    """Delete an ended trial's checkpoints except the ``keep`` best by ``metric`` and its last one."""
    metas = _checkpoint_metas(fs, trial_path)
    if not metas:
        return []
    last = max(metas, key=lambda pm: int(pm[1].get("epoch", 0)))[0]
    sign = 1.0 if mode == "min" else -1.0

    def score(meta: dict[str, Any]) -> float:
        value = meta.get("metrics", {}).get(metric)
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        return sign * float(value) if ok else math.inf

    best = {path for path, _ in sorted(metas, key=lambda pm: (score(pm[1]), pm[0]))[:keep]}
    deleted = []
    for path, _ in metas:
        if path != last and path not in best:
            fs.delete_dir(path)
            deleted.append(path)
    return deleted


def replay_plan(record: EndedRecord, restored_epoch: int) -> list[dict[str, Any]]:
    """Results to report again for an ended trial that Ray restored at ``restored_epoch``.

    Ray's saved state lags, so it restored the trial at or before its end; the epochs after
    ``restored_epoch`` are replayed (empty when the saved state already has them all).
    """
    if not 0 <= restored_epoch <= record.epochs:
        raise ValueError(f"trial {record.trial_id} restored at epoch {restored_epoch}, but its record "
                         f"ends at epoch {record.epochs}")
    return [dict(r) for r in record.results[restored_epoch:]]


def fetch_checkpoint(trial_dir: str, epoch: int, into: Path) -> Path | None:
    """Copy the trial's kept checkpoint of ``epoch`` (by its meta.json) to ``into``; None if not kept.

    Retention (:func:`prune_checkpoints`) may have deleted it; a replayed epoch then goes without one.
    """
    import pyarrow.fs

    fs, path = _fs(trial_dir)
    for folder, meta in _checkpoint_metas(fs, path):
        if meta.get("epoch") == epoch and "stub" not in meta:
            into.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(folder, str(into), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
            return into
    return None


# --- Ray's own saved state, torn by a kill -------------------------------------------------------
# Ray uploads its driver files (tuner.pkl and, per driver session, experiment_state-<S>.json,
# searcher-state-<S>.pkl, search_gen_state-<S>.json, callback-states-<S>.pkl) by rewriting them in
# place, once per snapshot, so a driver killed mid-upload can leave one cut short; Tuner.restore
# then fails with EOFError or a JSON error and the study could never be resumed.

TUNER_FILE = "tuner.pkl"
_TUNER_BACKUP = ".minimind/tuner.pkl"
_SESSION_FILES = ("experiment_state-{}.json", "searcher-state-{}.pkl", "search_gen_state-{}.json",
                  "callback-states-{}.pkl")


def _whole(path: Path) -> bool:
    """Whether a saved-state file reads back completely (a cut JSON or pickle does not).

    A pickle is only walked opcode by opcode (:func:`pickletools.genops`), never loaded: checking
    that a file is whole must not run what it contains.
    """
    import pickletools

    data = path.read_bytes()
    try:
        # By content: Ray's search_gen_state-*.json, for one, is a pickle.
        if data[:1] == b"\x80":  # a pickle's PROTO opcode
            ops = [op.name for op, _, _ in pickletools.genops(data)]
            return ops[-1] == "STOP"
        json.loads(data)
    except ValueError:  # pickletools: "pickle exhausted before seeing STOP"; JSON cut short
        return False
    return True


def keep_tuner_backup(study_dir: Path) -> None:
    """Copy a whole ``tuner.pkl`` aside; it only changes when a study is created or restored."""
    source = study_dir / TUNER_FILE
    if not source.is_file() or not _whole(source):
        return
    target = study_dir / _TUNER_BACKUP
    target.parent.mkdir(exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


def repair_saved_state(study_dir: Path) -> list[str]:
    """Make a local study's saved state loadable again after a kill; returns what was done.

    A cut ``tuner.pkl`` is restored from the copy :func:`keep_tuner_backup` kept. A driver session
    with a cut file is set aside (into ``.minimind/torn/``) as a whole, so Ray resumes from the
    newest complete session: trials that ended since are replayed (see :class:`EndedLedger`), the
    others restart from that session's checkpoints.
    """
    done: list[str] = []
    tuner = study_dir / TUNER_FILE
    backup = study_dir / _TUNER_BACKUP
    if tuner.is_file() and not _whole(tuner) and backup.is_file():
        tmp = tuner.with_name(f".{tuner.name}.{os.getpid()}")
        tmp.write_bytes(backup.read_bytes())
        os.replace(tmp, tuner)
        done.append(f"{TUNER_FILE} was cut short by the kill: restored the copy from the study's start")
    sessions = sorted(p.name.removeprefix("experiment_state-").removesuffix(".json")
                      for p in study_dir.glob("experiment_state-*.json"))
    for session in reversed(sessions):
        files = [study_dir / t.format(session) for t in _SESSION_FILES]
        files = [f for f in files if f.is_file()]
        torn = [f.name for f in files if not _whole(f)]
        if not torn:
            break  # the newest complete session is what Ray resumes from
        if session == sessions[0]:
            done.append(f"the only saved session {session} is cut short ({', '.join(torn)}); nothing "
                        "older to resume from")
            break
        aside = study_dir / ".minimind" / "torn"
        aside.mkdir(parents=True, exist_ok=True)
        for f in files:
            os.replace(f, aside / f.name)
        done.append(f"saved session {session} was cut short by the kill ({', '.join(torn)}): set aside "
                    f"in {aside}, resuming from the session before it")
    done += _stub_deleted_checkpoints(study_dir)
    return done


def _stub_deleted_checkpoints(study_dir: Path) -> list[str]:
    """Stand-ins for checkpoints an ended trial's saved state still names but retention deleted.

    Ray deletes a trial's checkpoints beyond ``keep_checkpoints`` as soon as a newer one registers,
    before the snapshot naming the newer one is uploaded; restoring from such a saved state fails
    ("does not exist on storage anymore") before the trainable runs. An ended trial needs only the
    epoch of what Ray restores (it replays the rest), so a folder holding that in ``meta.json`` lets
    the resume go on. (A trial that had not ended needs the real weights; it fails as before.)
    """
    import pickle

    from minimind_train.checkpoint import META_FILE

    files = sorted(study_dir.glob("experiment_state-*.json"))
    if not files:
        return []
    try:
        state = json.loads(files[-1].read_text())
        trials = [(json.loads(t), json.loads(m)) for t, m in state["trial_data"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    done = []
    for trial, meta in trials:
        if trial.get("status") in ("TERMINATED", "ERROR"):
            continue
        trial_id = str(trial.get("trial_id"))
        if not (study_dir / f"trial_{trial_id}" / ENDED_FILE).is_file():
            continue
        try:
            # Ray's own pickled checkpoint manager, which Tuner.restore unpickles right after this.
            manager = pickle.loads(bytes.fromhex(meta["checkpoint_manager"]["value"]))
            latest = manager.latest_checkpoint_result
        except Exception:
            log.debug("cannot read the checkpoint manager of trial %s", trial_id, exc_info=True)
            continue
        if latest is None or Path(latest.checkpoint.path).exists():
            continue
        folder = Path(latest.checkpoint.path)
        epoch = int(latest.metrics.get("training_iteration", 0))
        folder.mkdir(parents=True)
        (folder / META_FILE).write_text(json.dumps(
            {"epoch": epoch, "stub": "stands in for a checkpoint deleted by retention; see tune.ledger"}))
        done.append(f"trial {trial_id} had ended; its saved checkpoint {folder.name} (epoch {epoch}) was "
                    "deleted by retention: it replays its recorded epochs from there")
    return done


class _LedgerAwareScheduler:
    """Scheduler mixin for the two things the ledger needs from Ray's controller loop.

    1. Ray's experiment state is saved, synchronously, when a trial first reports. Ray saves it in
       the background about once a second, so a trial could start, report and end between two
       uploads; a driver killed then left a saved state without that trial, and ``--resume`` never
       knew it (its searcher could suggest the same values again). From its first result on, a
       trial is in the saved state, and if it ends before the next upload, the ledger replays it.
       Schedulers are the one hook Ray hands its controller; ``checkpoint`` is the controller's
       own save (Ray 2.60).
    2. A replayed trial is never stopped before its recorded end: the scheduler sees the replayed
       results in another order than the first time (ASHA's cut-offs depend on it), and stopping
       the replay would drop epochs the trial did train.
    """

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        first = not trial.has_reported_at_least_once
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        if first:
            controller = getattr(tune_controller, "_tune_controller", tune_controller)
            try:
                controller.checkpoint(force=True, wait=True)
            except Exception:
                log.warning("could not save the experiment state at trial %s's first result", trial,
                            exc_info=True)
        if decision == TrialScheduler.STOP and _recorded_beyond(trial, result.get("training_iteration")):
            decision = TrialScheduler.CONTINUE
        return decision


def _recorded_beyond(trial: Any, iteration: Any) -> bool:
    """Whether the trial's ended record goes past ``iteration`` (i.e. this result is a replay)."""
    if not isinstance(iteration, int):
        return False
    try:
        fs = trial.storage.storage_filesystem
        with fs.open_input_stream(f"{trial.path}/{ENDED_FILE}") as fh:
            return int(json.loads(fh.read().decode("utf-8"))["epochs"]) > iteration
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no record: not a replay
        return False


class SnapshottingASHAScheduler(_LedgerAwareScheduler, ASHAScheduler):
    """:class:`ray.tune.schedulers.ASHAScheduler` with :class:`_LedgerAwareScheduler`'s two additions."""


class SnapshottingFIFOScheduler(_LedgerAwareScheduler, FIFOScheduler):
    """:class:`ray.tune.schedulers.FIFOScheduler` with :class:`_LedgerAwareScheduler`'s two additions."""
