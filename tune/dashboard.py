"""Optuna's dashboard on a study's record: ``python -m tune.ui --dashboard`` (or ``make dashboard``).

The record's ``optuna.db`` is an Optuna storage, which ``optuna-dashboard`` shows as it is (history,
intermediate values, parallel coordinates, importances). It serves a snapshot (sqlite's backup API over
a read-only connection: the record is never written, a live driver included), into which go the study's
answer (``best.yaml``) as its note and which trials are finalists or warm-start history. The server
binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
import warnings
import wsgiref.simple_server
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial
from ray.tune.utils import flatten_dict

from .status import TrialStatus
from .study import MANIFEST_FILE, OPTUNA_FILE, Manifest, StudyError

__all__ = ["BEST_FILE", "answer_note", "serve", "snapshot", "trial_role"]

BEST_FILE = "best.yaml"  # tune.report's answer: the best config, its value (and mean over seeds), as it ran


def snapshot(study_dir: Path, into: Path) -> Path:
    """A consistent copy of the study's ``optuna.db`` in folder ``into`` (a driver writing meanwhile is
    neither blocked for long nor seen half-way)."""
    source_db, copy = Path(study_dir) / OPTUNA_FILE, Path(into) / OPTUNA_FILE
    if not source_db.is_file():
        raise FileNotFoundError(f"no study record {source_db}; is the study folder right?")
    try:
        with contextlib.closing(sqlite3.connect(f"{source_db.resolve().as_uri()}?mode=ro", uri=True)) as source, \
                contextlib.closing(sqlite3.connect(copy)) as target:
            source.backup(target)
    except sqlite3.Error as exc:
        raise StudyError(f"{source_db} cannot be read ({exc}); the dashboard shows nothing of it") from exc
    return copy


def trial_role(user_attrs: Mapping[str, Any]) -> str:
    """What a trial of the record is, for a reader of the dashboard."""
    if user_attrs.get("status") == TrialStatus.WARM_START:
        return f"warm start: {user_attrs.get('source', 'an earlier study')} (history for the sampler)"
    if user_attrs.get("finalist_of") is not None:
        return f"finalist: t{int(user_attrs['finalist_of']):03d}'s config with seed {user_attrs.get('seed')}"
    return "search"


def answer_note(study_dir: Path, manifest: Manifest, trials: Sequence[FrozenTrial] = ()) -> str:
    """The study's answer as Markdown: ``best.yaml``'s header, its searched values and the command that
    trains it again (or that there is no answer yet), then which of ``trials`` are not search trials."""
    best = Path(study_dir) / BEST_FILE
    lines = [f"# {manifest.name}: the answer", ""]
    if best.is_file():
        text = best.read_text(encoding="utf-8")
        config = flatten_dict(yaml.safe_load(text) or {}, delimiter=".")
        # (its lines 2-3 are about thread counts; "Run it alone" names the file relative to the study)
        header = [line[2:] for line in text.splitlines() if line.startswith("# ") and "Run it alone" not in line]
        lines += [*header[:1], *header[3:], "", "Searched values:", "",
                  *(f"- `{key}`: **{config.get(key)}**" for key in manifest.spec.get("search") or {}), "",
                  "Train it again:", "", f"    python -m minimind_train.sft --config {best.resolve()}"]
    else:
        lines.append(f"No answer yet: {BEST_FILE} is written when a driver run ends with a completed trial.")
    others = [f"- t{t.number:03d}: {role}" for t in trials if (role := trial_role(t.user_attrs)) != "search"]
    lines += ["", _ROLES, "", *others]
    return "\n".join(lines).rstrip() + "\n"


_ROLES = ("Every trial not listed here is a search trial. Finalists (a top config trained again with another seed) "
          "carry the user attributes `finalist_of` and `seed`; warm-start history (trials of an earlier study, "
          "for the sampler) has `status` `warm_start` and its `source`.")


class _Quiet(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per request (the URL printed at the start stays in view)."""


@contextlib.contextmanager
def _served(study_dir: Path, port: int) -> Iterator[tuple[wsgiref.simple_server.WSGIServer, str]]:
    """The server of a snapshot into which go the answer (as the note) and the objective's name."""
    import optuna_dashboard  # (for this command only: importing it is not free)

    manifest = Manifest.from_json((study_dir / MANIFEST_FILE).read_text(encoding="utf-8"), study_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="optuna-dashboard-") as folder:
        storage = optuna.storages.RDBStorage(f"sqlite:///{snapshot(study_dir, Path(folder))}")
        study = optuna.load_study(study_name=None, storage=storage)
        with warnings.catch_warnings():  # (set_metric_names is "experimental" since Optuna 3.2)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([str((manifest.spec.get("tune") or {}).get("metric") or "objective")])
        optuna_dashboard.save_note(study, answer_note(study_dir, manifest, study.get_trials(deepcopy=False)))
        try:
            server = wsgiref.simple_server.make_server("127.0.0.1", port, optuna_dashboard.wsgi(storage),
                                                       handler_class=_Quiet)
        except OSError as exc:  # the port taken, among others
            raise StudyError(f"the dashboard cannot listen on 127.0.0.1:{port} ({exc}); pass another --port") from exc
        try:
            # The study's note (the answer; its history, trials and plots are in the sidebar).
            study_id = storage.get_study_id_from_name(study.study_name)
            yield server, f"http://127.0.0.1:{server.server_port}/dashboard/studies/{study_id}/note"
        finally:
            server.server_close()


def serve(study_dir: Path, port: int, opened: Any = None) -> int:
    """Serve the study's snapshot until Ctrl-C (or SIGTERM); ``opened(url)`` is called once it listens."""
    with _served(Path(study_dir), port) as (server, url):
        print(f"Optuna dashboard: {url}\n(a snapshot of {Path(study_dir) / OPTUNA_FILE} as of now, read-only: "
              f"run again to see later trials; Ctrl-C stops it)", flush=True)
        if opened is not None:
            opened(url)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
    return 0
