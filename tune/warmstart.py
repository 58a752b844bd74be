"""Warm start: an earlier study's finished trials become the new study's Optuna history.

``--warm-start STUDY_DIR`` (or ``tune.warm_start``) is how a user goes from a 1-epoch scouting
study to a full one, or from a small model to a larger one: the sampler (TPE) starts from what the
earlier study learnt, and the earlier study's best configs are asked first (Optuna's
``enqueue_trial``). Only the objective and the searched parameters must agree; the fixed model,
data and training values may differ. Copied trials are history only (status ``warm_start``): they
are not trials of the new study, in its table, counts or MLflow. Their intermediate values move to the
new study's unit (:func:`tune.study.evaluation_index`: evaluation k of N per epoch is k / N epochs), so
a scouting study with one evaluation per epoch guides one with several, and the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .objective import Objective
from .status import TrialStatus
from .study import Study, StudyError, evals_per_epoch, ranked

__all__ = ["check_warm_start", "history_trials", "warm_start"]


def check_warm_start(source: str | Path, spec_dict: Mapping[str, Any], key: str = "--warm-start") -> Study:
    """Open the earlier study at ``source`` and check that its objective and searched parameters are
    the new study's (``spec_dict``: :func:`tune.space.spec_to_dict`); ranges may differ.

    Raises:
        StudyError: the folder is not a readable study, or each difference as ``key: old -> new``
        (``key`` names where ``source`` came from: the option or ``tune.warm_start``).
    """
    if not str(source).strip():
        raise StudyError(f"{key}={str(source)!r} is not allowed: expected the folder of an earlier study")
    try:
        other = Study.open(Path(source).expanduser().resolve())
    except StudyError as exc:
        raise StudyError(f"{key}={source}: {exc}") from exc
    old, new = other.manifest.spec, spec_dict
    differences = [f"tune.{key}: {old['tune'].get(key)} -> {new['tune'].get(key)}"
                   for key in ("metric", "mode") if old["tune"].get(key) != new["tune"].get(key)]
    old_paths, new_paths = sorted(old.get("search") or {}), sorted(new.get("search") or {})
    if old_paths != new_paths:
        differences.append(f"searched parameters: {', '.join(old_paths)} -> {', '.join(new_paths)}")
    if differences:
        raise StudyError(f"{key}={source}: that study searched another space, so its trials cannot "
                         "guide this one:\n  " + "\n  ".join(differences))
    return other


def _inside(distribution: optuna.distributions.BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high  # Float- and IntDistribution


def history_trials(other: Study, distributions: Mapping[str, optuna.distributions.BaseDistribution]
                   ) -> tuple[list[optuna.trial.FrozenTrial], int]:
    """``other``'s completed and early-stopped search trials whose values lie inside ``distributions``
    (not its own history, not its finalists), and how many were left out for lying outside."""
    found, outside = [], 0
    for t in other.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.user_attrs.get("status") == TrialStatus.WARM_START or "finalist_of" in t.user_attrs:
            continue
        if all(_inside(distributions[k], v) for k, v in t.params.items()):
            found.append(t)
        else:
            outside += 1
    return found, outside


def warm_start(record: Study, other: Study,
               distributions: Mapping[str, optuna.distributions.BaseDistribution], top_k: int = 3) -> str:
    """Copy ``other``'s completed and early-stopped search trials whose values lie inside
    ``distributions`` into ``record``'s Optuna study (values, intermediate values in its unit, state),
    and queue its ``top_k`` best distinct completed configs to be asked first. Its own history and
    its finalists (the same configs with other seeds) are left out. Returns one line saying what was done."""
    copied, outside = history_trials(other, distributions)
    theirs, ours = evals_per_epoch(other.study), evals_per_epoch(record.study)
    for t in copied:
        # The same fraction of training in this study's unit (TPE ranks a stopped trial by its last step;
        # with fewer evaluations here, the last of those that land on one index is kept).
        curve = {max(1, round(step * ours / theirs)): value for step, value in sorted(t.intermediate_values.items())}
        record.study.add_trial(optuna.trial.create_trial(
            params=t.params, distributions=dict(distributions), state=t.state,
            value=t.value if t.state == TrialState.COMPLETE else None, intermediate_values=curve,
            user_attrs={"status": TrialStatus.WARM_START, "source": f"{other.manifest.name} t{t.number:03d}"}))
    # Its answers only (tune.study.ranked): a trial no better than untrained is history (TPE learns the
    # region is bad), never a config to ask first.
    completed = ranked([t for t in copied if t.state == TrialState.COMPLETE], Objective.of_study(record.study),
                       lambda t: TrialStatus.of(t.user_attrs.get("status"), t.state), lambda t: float(t.value),
                       statuses=(TrialStatus.COMPLETED,))
    best_first = [t.params for t in completed]
    queued = [params for i, params in enumerate(best_first) if params not in best_first[:i]][:top_k]  # distinct
    for params in queued:
        record.study.enqueue_trial(params)
    return (f"warm start from {other.dir}: {len(copied)} trial(s) as history ({outside} outside this space's "
            f"ranges left out); its {len(queued)} best config(s) run first")
