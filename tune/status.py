"""A trial's status in the study record, in one place: its members, their Optuna states, what they mean.

The record keeps each trial's status as the ``status`` user attribute of its Optuna trial (a plain
string: :class:`TrialStatus` is a ``StrEnum``, so what is stored is the same text as before it existed,
and older studies open as they are). Every module names a status through :class:`TrialStatus`
(tests/test_conventions.py keeps it so).

=============  ========  ===============================================================
status         state     meaning
=============  ========  ===============================================================
running        RUNNING   training now, or its driver died (resumed by ``--resume``)
interrupted    RUNNING   stopped by Ctrl-C or the time budget (resumed by ``--resume``)
failed         RUNNING   crashed after Ray's retries (``--resume`` retries it)
completed      COMPLETE  trained every epoch; value = best epoch's objective
stopped_early  PRUNED    stopped by ASHA (Optuna's SuccessiveHalvingPruner) at a rung
diverged       FAIL      loss became non-finite or exploded: its config is unusable
no_better      COMPLETE  finished (all epochs, or stopped by ASHA) no better than the model
                         before training or the uniform predictor
                         (:func:`tune.study.no_better_reason`): it learned nothing, so it is
                         never the answer nor a finalist
abandoned      FAIL      its searched values were never all recorded (the driver died inside
                         Optuna's ``ask``): it never runs, and a new trial takes its place
warm_start     (copied)  a trial copied from an earlier study (tune.warmstart): history for the
                         sampler, not a trial of this study (its state is the original's)
=============  ========  ===============================================================

``no_better`` is told to Optuna as COMPLETE with its own (bad) value rather than FAIL: TPE ignores
FAIL trials, so the region of a trial that learned nothing would look unexplored and be sampled
again; as a complete trial with a value no better than the untrained model's it lands in TPE's
"bad" group, and ASHA's rungs keep its values.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (imported lazily: the trainable's worker needs no Optuna for a status)
    from optuna.trial import TrialState

__all__ = ["ANSWERS", "FINISHED", "RESUMABLE", "TrialStatus"]


class TrialStatus(enum.StrEnum):
    """A trial's status (the table above)."""

    RUNNING = "running"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    COMPLETED = "completed"
    STOPPED_EARLY = "stopped_early"
    DIVERGED = "diverged"
    NO_BETTER = "no_better"
    ABANDONED = "abandoned"
    WARM_START = "warm_start"

    @classmethod
    def of(cls, stored: object, state: TrialState | None = None) -> TrialStatus | str:
        """The status a trial's ``status`` user attr holds (``stored``; None: not set, then read from
        its Optuna ``state``: a finished state's status, else ``running``). A value this version does not
        know stays the string it is (it ranks with those that are no answer)."""
        if stored is None:
            from optuna.trial import TrialState

            return {TrialState.COMPLETE: cls.COMPLETED, TrialState.PRUNED: cls.STOPPED_EARLY,
                    TrialState.FAIL: cls.DIVERGED}.get(state, cls.RUNNING)  # type: ignore[arg-type]
        try:
            return cls(str(stored))
        except ValueError:
            return str(stored)

    @property
    def state(self) -> TrialState:
        """The Optuna state a trial of this status ends in (RUNNING: not ended, resumable)."""
        from optuna.trial import TrialState

        if self is TrialStatus.WARM_START:
            raise ValueError("a warm_start trial keeps the Optuna state of the trial it copies")
        return {TrialStatus.COMPLETED: TrialState.COMPLETE, TrialStatus.NO_BETTER: TrialState.COMPLETE,
                TrialStatus.STOPPED_EARLY: TrialState.PRUNED, TrialStatus.DIVERGED: TrialState.FAIL,
                TrialStatus.ABANDONED: TrialState.FAIL}.get(self, TrialState.RUNNING)

    @property
    def label(self) -> str:
        """How the status reads in text meant for people (``stopped early``)."""
        return self.value.replace("_", " ")


# A trial's end, told to Optuna; it counts towards num_samples. (Abandoned is ended too, but never ran.)
FINISHED = frozenset({TrialStatus.COMPLETED, TrialStatus.STOPPED_EARLY, TrialStatus.DIVERGED,
                      TrialStatus.NO_BETTER})
# Unfinished: ``--resume`` continues them.
RESUMABLE = frozenset({TrialStatus.RUNNING, TrialStatus.INTERRUPTED, TrialStatus.FAILED})
# Statuses whose value can be a study's answer, preferred first: a completed trial, else (none
# completed) one stopped early. Never no_better, diverged, or an unfinished one.
ANSWERS = (TrialStatus.COMPLETED, TrialStatus.STOPPED_EARLY)
