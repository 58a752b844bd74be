"""The study's objective and its direction, in one place.

A study minimises or maximises one metric (``tune.metric``, ``tune.mode`` of the spec). Everything that
compares two values of it, picks the best of several, sorts by it or tells Optuna, MLflow or Ray which
way is better asks an :class:`Objective` rather than testing the mode itself
(tests/test_conventions.py keeps it so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

if TYPE_CHECKING:  # (imported lazily: the spec is typed before the tuning stack loads)
    import optuna

__all__ = ["DEFAULT_METRIC", "MODES", "Mode", "Objective"]

Mode = Literal["min", "max"]
MODES: tuple[str, ...] = get_args(Mode)
DEFAULT_METRIC = "val_loss"
_T = TypeVar("_T")


@dataclass(frozen=True)
class Objective:
    """``metric``, minimised (``mode="min"``) or maximised (``"max"``)."""

    metric: str = DEFAULT_METRIC
    mode: Mode = "min"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"tune.mode: {self.mode!r} is not one of {', '.join(MODES)}")

    @classmethod
    def of(cls, tune: Mapping[str, Any]) -> Objective:
        """The objective of a spec's ``tune`` section as stored (:func:`tune.space.spec_to_dict`);
        an absent key takes the spec's default."""
        return cls(str(tune.get("metric") or DEFAULT_METRIC), tune.get("mode") or "min")

    @classmethod
    def of_study(cls, study: optuna.Study, metric: str = DEFAULT_METRIC) -> Objective:
        """The objective of an Optuna study, by its direction (its metric is not stored there)."""
        import optuna

        return cls(metric, "min" if study.direction == optuna.study.StudyDirection.MINIMIZE else "max")

    @property
    def minimize(self) -> bool:
        return self.mode == "min"

    @property
    def sign(self) -> float:
        """+1 when smaller is better, -1 when larger is: ``sign * value`` is smaller the better it is."""
        return 1.0 if self.minimize else -1.0

    @property
    def optuna_direction(self) -> str:
        """``direction`` of ``optuna.create_study``."""
        return "minimize" if self.minimize else "maximize"

    @property
    def worst(self) -> float:
        """A value every finite one is better than (+inf when minimising)."""
        return self.sign * math.inf

    @property
    def not_better(self) -> str:
        """The comparison that says a value is no better than another (``>=`` when minimising)."""
        return ">=" if self.minimize else "<="

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b`` (a non-finite ``a`` never is)."""
        return math.isfinite(a) and self.sign * a < self.sign * b

    def sort_key(self, value: float) -> float:
        """Ascending key, best first; a non-finite value (diverged, missing) last."""
        return self.sign * value if math.isfinite(value) else math.inf

    def best_of(self, items: Iterable[_T], value: Callable[[_T], float] | None = None) -> _T | None:
        """The best of ``items`` by ``value`` (default: the items are the values), the first one on a
        tie; None when none has a finite value."""
        key: Callable[[Any], float] = value or float
        found = [item for item in items if math.isfinite(key(item))]
        return min(found, key=lambda item: self.sign * key(item)) if found else None
