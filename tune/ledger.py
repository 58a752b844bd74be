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
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

__all__ = ["ENDED_FILE", "EndedLedger", "EndedRecord", "fetch_checkpoint", "read_ended", "replay_plan", "trial_uri"]

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
    """Driver callback: writes ``ended.json`` into a trial's storage folder when the trial ends.

    Errored trials get no record: Ray retries them, or ``--resume`` does (``resume_errored``).
    Put it before callbacks that report the end elsewhere (MLflow), so nothing claims an end that
    a resume could undo.
    """

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

    Ray's checkpoint retention may have deleted it; a replayed epoch then goes without one.
    """
    import pyarrow.fs

    from minimind_train.checkpoint import META_FILE

    fs, path = _fs(trial_dir)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True)
    for info in fs.get_file_info(selector):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{META_FILE}") as fh:
                meta = json.loads(fh.read().decode("utf-8"))
        except (OSError, ValueError):  # not one of ours, or half written
            continue
        if meta.get("epoch") == epoch:
            into.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(info.path, str(into), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
            return into
    return None
