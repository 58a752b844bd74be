"""Searchers: Optuna TPE that knows early-stopped trials from finished ones, and seeded random search."""

from __future__ import annotations

import logging
from typing import Any

import optuna
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from .space import StudySpec, optuna_distributions

__all__ = ["PruningAwareOptunaSearch", "make_searcher"]

log = logging.getLogger(__name__)


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna ``PRUNED`` for trials that ended before their last epoch.

    Ray hands ASHA-stopped trials to the searcher as ordinary completions, so stock OptunaSearch
    records them as COMPLETE with a 1-epoch loss as the final value, and TPE then models a short
    trial as a finished one. Intermediate values are already reported per epoch, so PRUNED keeps
    the curve and lets TPE treat the trial as the partial evidence it is.
    """

    def __init__(self, *args: Any, planned_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._planned_epochs = planned_epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        done_epochs = int(result.get("training_iteration", 0)) if result else 0
        if error or not result or done_epochs >= self._planned_epochs or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        if trial_id in self._completed_trials:
            return
        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        except Exception as exc:  # noqa: BLE001 - Optuna refuses e.g. a trial with no intermediate value
            log.warning("could not record trial %s as pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


def make_searcher(spec: StudySpec) -> Searcher | BasicVariantGenerator:
    t = spec.tune
    if t.searcher == "random":
        return BasicVariantGenerator(random_state=t.seed)
    sampler = optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=min(4, max(1, t.num_samples // 3)))
    return PruningAwareOptunaSearch(
        space=optuna_distributions(spec),
        # Given here as well as in TuneConfig: OptunaSearch ignores TuneConfig's once it has a space.
        metric=t.metric,
        mode=t.mode,
        sampler=sampler,
        planned_epochs=spec.run.train.epochs,
    )
