"""Search-space files: parse, validate everything up front, and hand the space to Optuna and Ray.

A space file is a run file (``model``/``data``/``train``, exactly the schema of
:mod:`minimind_train.config`) plus three study sections::

    search:                       # dotted config path -> distribution, in Optuna's vocabulary
      train.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      train.accumulation_steps: {type: categorical, choices: [1, 2, 4]}
    tune:                         # how many trials, how they run and which one wins
      num_samples: 8
      scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
    mlflow:
      experiment: minimind-sft

:func:`load_space` rejects every mistake it can see before a trial starts -- unknown keys,
distributions that could produce an invalid config, combinations of searched values that break a
cross-field rule, missing data/tokenizer/checkpoint files -- with a :class:`SpaceError` naming the
key, the value and what is allowed.

Parameter keys are the dotted config paths themselves (``train.learning_rate``). Ray Tune splits
keys on ``/`` only (OptunaSearch un-flattens its suggestions on ``/``; result frames and reporters
look keys up on ``/``), so a dotted key stays one flat key end to end: in Optuna's study, in the
trial config, in ``config/train.learning_rate`` result columns and in MLflow params.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import logging
import math
import numbers
import random
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from minimind_train.config import (
    ConfigError,
    RunConfig,
    field_names,
    resolve_paths,
    run_config_from_dict,
    run_config_to_dict,
)

if TYPE_CHECKING:
    import optuna

__all__ = [
    "BUNDLED_PACKAGE",
    "MlflowSettings",
    "Resources",
    "SchedulerSpec",
    "SearchParam",
    "SpaceError",
    "StudySpec",
    "TuneSettings",
    "apply_params",
    "bundled_spaces",
    "check_resources",
    "describe",
    "load_space",
    "optuna_distributions",
    "resolve_space_path",
    "spec_to_dict",
    "spec_to_yaml",
]

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "search_spaces"

ParamType = Literal["float", "int", "categorical"]
SchedulerType = Literal["asha", "none"]
SearcherType = Literal["optuna", "random"]
Metric = Literal["val_loss", "train_loss"]
Mode = Literal["min", "max"]

_CONFIG_SECTIONS = ("model", "data", "train")
_STUDY_SECTIONS = ("search", "tune", "mlflow")

# Fields a study must not vary, with the reason shown to the user. Everything else is searchable.
_UNSEARCHABLE: Mapping[str, str] = types.MappingProxyType({
    "model.init_from": "it is a file path; set it as a fixed value",
    "data.train_path": "it is a file path; set it as a fixed value",
    "data.val_path": "it is a file path; set it as a fixed value",
    "data.tokenizer": "it is a folder path; set it as a fixed value",
    "data.cache_dir": "it is a folder path; set it as a fixed value",
    "data.val_fraction": "it changes the validation split, so trials' val_loss would not be comparable",
    "data.split_seed": "it changes the validation split, so trials' val_loss would not be comparable",
    "data.max_seq_len": "the dataset is tokenised once for all trials, and truncation changes val_loss",
    "train.epochs": "it is the trial budget the scheduler counts in; set train.epochs and "
                    "tune.scheduler.max_t instead",
    "train.num_threads": "each trial sets it to its CPU share (tune.resources_per_trial.cpu)",
    "train.device": "tune.resources_per_trial decides whether a trial gets a GPU",
})

# Bounds on how many searched values are checked against the config at load time: every value of a
# small grid, every combination of a small space, a fixed-seed sample of larger ones (checks stay
# well under a second; each costs one config build).
_MAX_VALUES_PER_PARAM = 64
_MAX_COMBINATIONS = 512


class SpaceError(ConfigError):
    """A search-space file is invalid; the message names the key, the value and what is allowed."""


# ---------------------------------------------------------------------------------------------------
# The typed result.


@dataclass(frozen=True)
class SearchParam:
    """One searched config field and its distribution (Optuna's semantics: bounds inclusive).

    ``float``/``int`` use ``low``, ``high``, ``log`` and ``step``; ``categorical`` uses ``choices``.
    A ``step`` grid must start and end on multiples of ``step`` so that Optuna's grid
    (``low + k * step``) and Ray's quantisation (multiples of ``step``) are the same set of values.
    """

    path: str
    type: ParamType
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        key = f"search.{self.path}"
        if self.type not in ("float", "int", "categorical"):
            raise SpaceError(f"{key}.type={self.type!r} is not allowed: expected float, int or categorical")
        if self.type == "categorical":
            _check_choices(key, self.choices)
            for name in ("low", "high", "step"):
                if getattr(self, name) is not None:
                    raise SpaceError(f"{key}.{name}={getattr(self, name)!r} is not allowed: "
                                     "a categorical parameter takes only choices")
            if self.log:
                raise SpaceError(f"{key}.log=True is not allowed: a categorical parameter takes only choices")
            return
        if self.choices:
            raise SpaceError(f"{key}.choices={list(self.choices)!r} is not allowed: "
                             f"a {self.type} parameter takes low, high, log and step")
        number = int if self.type == "int" else (int, float)
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
                expected = "an integer" if self.type == "int" else "a finite number"
                raise SpaceError(f"{key}.{name}={value!r} is not allowed: expected {expected}")
        assert self.low is not None and self.high is not None
        if self.low >= self.high:
            raise SpaceError(f"{key}.low={self.low!r} is not allowed: must be < {key}.high={self.high!r}")
        if self.log and self.low <= 0:
            raise SpaceError(f"{key}.low={self.low!r} is not allowed: must be > 0 when log is true")
        if self.step is not None:
            self._check_step(key)

    def _check_step(self, key: str) -> None:
        assert self.step is not None and self.low is not None and self.high is not None
        if self.log:
            raise SpaceError(f"{key}.step={self.step!r} is not allowed with log: true "
                             "(a log scale has no even grid); drop one of them")
        if self.type == "int":
            if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
                raise SpaceError(f"{key}.step={self.step!r} is not allowed: expected an integer >= 1")
        elif (isinstance(self.step, bool) or not isinstance(self.step, (int, float))
              or not math.isfinite(self.step) or self.step <= 0):
            raise SpaceError(f"{key}.step={self.step!r} is not allowed: expected a number > 0")
        for name in ("low", "high"):
            value = getattr(self, name)
            if not _on_grid(value, self.step):
                raise SpaceError(
                    f"{key}.{name}={value!r} is not allowed: with step={self.step!r} both low and high must "
                    "be multiples of step (Optuna and Ray then sample the same grid); for an offset "
                    "grid list the values as {type: categorical, choices: [...]}")

    def grid(self) -> tuple[Any, ...] | None:
        """Every value the parameter can take, or None for a continuous distribution."""
        if self.type == "categorical":
            return self.choices
        assert self.low is not None and self.high is not None
        if self.type == "int":
            step = int(self.step or 1)
            return tuple(range(int(self.low), int(self.high) + 1, step))
        if self.step is None:
            return None
        count = round((self.high - self.low) / self.step)
        # Re-derive each point from its index so the grid has no accumulated rounding drift.
        return tuple(self.low + k * self.step for k in range(count)) + (float(self.high),)

    def summary(self) -> str:
        """E.g. ``float log-uniform [1e-05, 0.001]`` or ``categorical {1, 2, 4}``."""
        if self.type == "categorical":
            return "categorical {" + ", ".join(_fmt(c) for c in self.choices) + "}"
        scale = "log-uniform" if self.log else "uniform"
        text = f"{self.type} {scale} [{_fmt(self.low)}, {_fmt(self.high)}]"
        if self.step is not None:
            text += f" step {_fmt(self.step)}"
        return text


@dataclass(frozen=True)
class SchedulerSpec:
    """Trial scheduler: ASHA over epochs (``training_iteration``), or none (every trial runs to the end).

    For ``none`` the ASHA fields are unused; ``max_t`` is still the planned number of epochs.
    """

    type: SchedulerType = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: int = 1

    def __post_init__(self) -> None:
        key = "tune.scheduler"
        if self.type not in ("asha", "none"):
            raise SpaceError(f"{key}.type={self.type!r} is not allowed: expected asha or none")
        if isinstance(self.max_t, bool) or not isinstance(self.max_t, int) or self.max_t < 1:
            raise SpaceError(f"{key}.max_t={self.max_t!r} is not allowed: expected an integer >= 1")
        if self.type == "none":
            return
        if (isinstance(self.grace_period, bool) or not isinstance(self.grace_period, int)
                or not 1 <= self.grace_period <= self.max_t):
            raise SpaceError(f"{key}.grace_period={self.grace_period!r} is not allowed: expected an integer "
                             f">= 1 and <= {key}.max_t={self.max_t}")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, int) or rf < 2:
            # Optuna's SuccessiveHalvingPruner (the ASHA used here) keeps the top 1/rf at a rung.
            raise SpaceError(f"{key}.reduction_factor={rf!r} is not allowed: expected an integer >= 2")

    @property
    def rungs(self) -> tuple[float, ...]:
        """The epochs at which ASHA compares trials, ascending (Ray's ``_Bracket`` formula); () for none."""
        if self.type == "none":
            return ()
        count = int(math.log(self.max_t / self.grace_period) / math.log(self.reduction_factor) + 1)
        return tuple(self.grace_period * self.reduction_factor ** k for k in range(count))


@dataclass(frozen=True)
class Resources:
    """What one trial reserves; ``gpu`` may be a fraction (several trials share a GPU)."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        key = "tune.resources_per_trial"
        for name in ("cpu", "gpu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SpaceError(f"{key}.{name}={value!r} is not allowed: expected a number")
        if self.cpu <= 0:
            raise SpaceError(f"{key}.cpu={self.cpu!r} is not allowed: expected a number > 0")
        if self.gpu < 0:
            raise SpaceError(f"{key}.gpu={self.gpu!r} is not allowed: expected a number >= 0")
        if self.gpu > 1 and self.gpu != int(self.gpu):
            # Ray only shares a GPU between trials below one whole device.
            raise SpaceError(f"{key}.gpu={self.gpu!r} is not allowed: above 1 a trial takes whole GPUs "
                             "(an integer); fractions must be <= 1")

    def as_dict(self) -> dict[str, float]:
        """The ``{"cpu": ..., "gpu": ...}`` mapping ``tune.with_resources`` takes."""
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass(frozen=True)
class TuneSettings:
    """How many trials run, how, and how the winner is chosen."""

    num_samples: int
    max_concurrent_trials: int = 1
    metric: Metric = "val_loss"
    mode: Mode = "min"
    seed: int = 0
    time_budget_s: float | None = None
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources_per_trial: Resources = field(default_factory=Resources)
    searcher: SearcherType = "optuna"
    # Ray retries of a crashed trial (from its last checkpoint).
    max_failures: int = 2
    # Checkpoints kept per trial, best by ``metric``.
    keep_checkpoints: int = 1
    # Trials whose full resume state survives the end of the study; the rest keep only model.pth.
    keep_top_trials: int = 3

    def __post_init__(self) -> None:
        _int_at_least("tune.num_samples", self.num_samples, 1)
        _int_at_least("tune.max_concurrent_trials", self.max_concurrent_trials, 1)
        _int_at_least("tune.max_failures", self.max_failures, 0)
        _int_at_least("tune.keep_checkpoints", self.keep_checkpoints, 1)
        _int_at_least("tune.keep_top_trials", self.keep_top_trials, 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SpaceError(f"tune.seed={self.seed!r} is not allowed: expected an integer")
        _one_of("tune.metric", self.metric, typing.get_args(Metric))
        _one_of("tune.mode", self.mode, typing.get_args(Mode))
        _one_of("tune.searcher", self.searcher, typing.get_args(SearcherType))
        budget = self.time_budget_s
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not math.isfinite(budget) or budget <= 0):
            raise SpaceError(f"tune.time_budget_s={budget!r} is not allowed: expected a number > 0 or null")


@dataclass(frozen=True)
class MlflowSettings:
    """Where the study is tracked; ``tracking_uri`` None leaves the choice to the driver."""

    tracking_uri: str | None = None
    experiment: str = "minimind-sft"

    def __post_init__(self) -> None:
        if self.tracking_uri is not None and (not isinstance(self.tracking_uri, str)
                                              or not self.tracking_uri.strip()):
            raise SpaceError(f"mlflow.tracking_uri={self.tracking_uri!r} is not allowed: "
                             "expected a non-empty string or null")
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise SpaceError(f"mlflow.experiment={self.experiment!r} is not allowed: expected a non-empty string")


@dataclass(frozen=True)
class StudySpec:
    """A validated space file: the fixed run, what is searched, and how the study runs."""

    run: RunConfig
    search: tuple[SearchParam, ...]
    tune: TuneSettings
    mlflow: MlflowSettings
    # The resolved space file, and its text verbatim (logged as an artifact of the study).
    source: Path
    text: str


# ---------------------------------------------------------------------------------------------------
# Finding and loading a space file.


def _bundled_dir() -> Path:
    return Path(str(importlib.resources.files(BUNDLED_PACKAGE)))


def bundled_spaces() -> list[str]:
    """File names of the spaces shipped in the ``search_spaces`` package."""
    return sorted(p.name for p in _bundled_dir().glob("*.yaml"))


def resolve_space_path(path_or_name: str | Path) -> Path:
    """An existing file, else a bundled space by name: ``sft.yaml``, ``sft`` or ``search_spaces/sft.yaml``.

    The bundled fallback makes ``python -m tune.run --space search_spaces/sft.yaml`` work from any
    directory, not just the checkout.
    """
    given = Path(path_or_name).expanduser()
    if given.is_file():
        return given.resolve()
    if given.exists():
        raise SpaceError(f"space {str(path_or_name)!r}: {given.resolve()} is not a file")
    parts = given.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == BUNDLED_PACKAGE):
        name = parts[-1] if parts[-1].endswith((".yaml", ".yml")) else f"{parts[-1]}.yaml"
        bundled = _bundled_dir() / name
        if bundled.is_file():
            return bundled.resolve()
    raise SpaceError(f"space {str(path_or_name)!r}: no such file ({given.resolve()}), and not a bundled "
                     f"space; bundled spaces: {', '.join(bundled_spaces()) or '(none)'}")


def load_space(path_or_name: str | Path) -> StudySpec:
    """Read and validate a space file (see the module docstring); every error is a :class:`SpaceError`.

    Relative paths in ``model``/``data`` resolve against the space file's folder.
    """
    source = resolve_space_path(path_or_name)
    text = source.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpaceError(f"{source}: not valid YAML: {exc}") from exc
    try:
        return _build_spec(raw, source, text)
    except ConfigError as exc:
        raise SpaceError(f"{source}: {exc}") from exc


def _build_spec(raw: Any, source: Path, text: str) -> StudySpec:
    allowed = _CONFIG_SECTIONS + _STUDY_SECTIONS
    if not isinstance(raw, Mapping):
        raise SpaceError(f"the file must be a mapping with sections {', '.join(allowed)}; got {raw!r}")
    for key in raw:
        if key not in allowed:
            raise SpaceError(f"{key} is not a known section (value {raw[key]!r}); "
                             f"allowed sections: {', '.join(allowed)}")
    run = run_config_from_dict({k: raw[k] for k in _CONFIG_SECTIONS if k in raw})
    run = resolve_paths(run, source.parent)
    search = _parse_search(raw.get("search"), run)
    settings = _parse_tune(raw.get("tune"), run)
    mlflow = _parse_mlflow(raw.get("mlflow"))
    if settings.resources_per_trial.gpu == 0 and run.train.device == "cuda":
        raise SpaceError("tune.resources_per_trial.gpu=0 is not allowed with train.device='cuda': "
                         "a trial without a GPU share sees no GPU; reserve a share (e.g. 0.25) or use "
                         "train.device: auto")
    # Files last: a space whose structure is wrong says so even on a machine without the data.
    _check_files(run, raw, source.parent)
    return StudySpec(run=run, search=search, tune=settings, mlflow=mlflow, source=source, text=text)


# ---------------------------------------------------------------------------------------------------
# The search section.


_PARAM_KEYS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
})


def _parse_search(raw: Any, run: RunConfig) -> tuple[SearchParam, ...]:
    example = "{train.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}}"
    if raw is None or (isinstance(raw, Mapping) and not raw):
        raise SpaceError(f"search={raw!r} is not allowed: a study needs at least one searched field, "
                         f"e.g. search: {example}")
    if not isinstance(raw, Mapping):
        raise SpaceError(f"search={raw!r} is not allowed: expected a mapping of dotted config paths to "
                         f"distributions, e.g. {example}")
    params = []
    for path, dist in raw.items():
        _check_searchable(path)
        params.append(_parse_param(path, dist))
    for param in params:
        _check_field_type(param, run)
    sections: dict[str, list[SearchParam]] = {}
    for param in params:
        sections.setdefault(param.path.partition(".")[0], []).append(param)
    for group in sections.values():
        _check_values(run, group)
    return tuple(params)


def _check_searchable(path: Any) -> None:
    if not isinstance(path, str):
        raise SpaceError(f"search key {path!r} is not allowed: expected a dotted config path such as "
                         "train.learning_rate")
    section, _, name = path.partition(".")
    searchable = [f"{s}.{n}" for s in _CONFIG_SECTIONS for n in field_names(s)
                  if f"{s}.{n}" not in _UNSEARCHABLE]
    if section not in _CONFIG_SECTIONS:
        raise SpaceError(f"search.{path} is not a config field (section {section!r} is not one of "
                         f"{', '.join(_CONFIG_SECTIONS)}); searchable fields: {', '.join(searchable)}")
    if name not in field_names(section):
        in_section = [p for p in searchable if p.startswith(f"{section}.")]
        raise SpaceError(f"search.{path} is not a config field; searchable {section} fields: "
                         f"{', '.join(in_section)}")
    if path in _UNSEARCHABLE:
        raise SpaceError(f"search.{path} is not allowed: {path} cannot be searched because "
                         f"{_UNSEARCHABLE[path]}")


def _parse_param(path: str, raw: Any) -> SearchParam:
    key = f"search.{path}"
    if not isinstance(raw, Mapping):
        raise SpaceError(f"{key}={raw!r} is not allowed: expected a distribution such as "
                         "{type: float, low: 0.1, high: 2.0} or {type: categorical, choices: [1, 2, 4]}")
    kind = raw.get("type")
    if kind not in _PARAM_KEYS:
        raise SpaceError(f"{key}.type={kind!r} is not allowed: expected one of {', '.join(_PARAM_KEYS)}")
    for name, value in raw.items():
        if name not in _PARAM_KEYS[kind]:
            raise SpaceError(f"{key}.{name} is not a known key for type {kind} (value {value!r}); "
                             f"allowed keys: {', '.join(_PARAM_KEYS[kind])}")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{key}.choices={choices!r} is not allowed: expected a non-empty list")
        return SearchParam(path=path, type="categorical", choices=tuple(choices))
    for name in ("low", "high"):
        if name not in raw:
            raise SpaceError(f"{key}.{name} is missing: a {kind} distribution needs low and high")
    log_scale = raw.get("log", False)
    if not isinstance(log_scale, bool):
        raise SpaceError(f"{key}.log={log_scale!r} is not allowed: expected true or false")
    if kind == "float":
        low, high = _number(f"{key}.low", raw["low"]), _number(f"{key}.high", raw["high"])
        step = raw.get("step")
        step = None if step is None else _number(f"{key}.step", step)
    else:
        low, high, step = raw["low"], raw["high"], raw.get("step")
    return SearchParam(path=path, type=kind, low=low, high=high, log=log_scale, step=step)


def _number(key: str, value: Any) -> Any:
    """A YAML number as float; YAML 1.1 reads ``1e-4`` (no dot) as a string, so accept that spelling."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(f"{key}={value!r} is not allowed: expected a number")
    return float(value)


def _check_choices(key: str, choices: tuple[Any, ...]) -> None:
    if not isinstance(choices, tuple) or not choices:
        raise SpaceError(f"{key}.choices={choices!r} is not allowed: expected a non-empty list")
    kinds = set()
    for choice in choices:
        if choice is None:
            continue
        if isinstance(choice, bool):
            kinds.add("boolean")
        elif isinstance(choice, (int, float)):
            kinds.add("number")
        elif isinstance(choice, str):
            kinds.add("string")
        else:
            # Optuna stores choices as categories: they must be hashable scalars.
            raise SpaceError(f"{key}.choices={list(choices)!r} is not allowed: {choice!r} is a "
                             f"{type(choice).__name__}; choices must be numbers, strings, booleans or null")
    if len(kinds) > 1:
        raise SpaceError(f"{key}.choices={list(choices)!r} is not allowed: mixes {' and '.join(sorted(kinds))} "
                         "values; all choices must be of one type (null may be added to any)")
    # bool/int equality (True == 1) is excluded above, so plain equality finds real duplicates.
    seen: list[Any] = []
    for choice in choices:
        if choice in seen:
            raise SpaceError(f"{key}.choices={list(choices)!r} is not allowed: {choice!r} is listed twice")
        seen.append(choice)


def _check_field_type(param: SearchParam, run: RunConfig) -> None:
    """A numeric distribution must fit the field's type; categorical choices are checked by value."""
    if param.type == "categorical":
        return
    section, _, name = param.path.partition(".")
    annotation = typing.get_type_hints(type(getattr(run, section)))[name]
    options = set(typing.get_args(annotation)) if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else {annotation}
    options.discard(type(None))
    key = f"search.{param.path}"
    if float in options:
        return
    if int in options:
        if param.type == "float":
            raise SpaceError(f"{key}.type='float' is not allowed: {param.path} is an integer field; use "
                             "type: int (or categorical)")
        return
    raise SpaceError(f"{key}.type={param.type!r} is not allowed: {param.path} is not a numeric field "
                     f"(it takes {_describe_annotation(annotation)}); use type: categorical with choices")


def _describe_annotation(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if annotation is bool:
        return "true or false"
    return getattr(annotation, "__name__", str(annotation))


def _check_values(run: RunConfig, group: Sequence[SearchParam]) -> None:
    """Apply the searched values of one config section to ``run`` and require valid configs.

    First each value on its own, so a bad value is reported against its own key: it is blamed only
    if it fails with the fixed config and with every combination of the group's other searched
    values (a field valid only together with another searched field is not a mistake). Then every
    combination -- RunConfig has cross-field rules (hidden_size divisible by num_attention_heads, ...)
    that single values cannot break but a pair can.
    """
    grids = [_values_to_check(p) for p in group]
    for i, param in enumerate(group):
        others = [g for j, g in enumerate(grids) if j != i]
        other_paths = [p.path for j, p in enumerate(group) if j != i]
        for value in grids[i]:
            try:
                apply_params(run, {param.path: value})
                continue
            except ConfigError as exc:
                alone = exc
            for combo in _combinations(others):
                try:
                    apply_params(run, {param.path: value, **dict(zip(other_paths, combo))})
                    break
                except ConfigError:
                    pass
            else:
                raise SpaceError(f"search.{param.path}{_which(param, value)}={value!r} is not allowed: "
                                 f"{alone}")
    total = math.prod(len(g) for g in grids)
    if total > _MAX_COMBINATIONS:
        log.debug("checking %d of the %d combinations of searched %s values", _MAX_COMBINATIONS, total,
                  group[0].path.partition(".")[0])
    for combo in _combinations(grids):
        assignment = dict(zip((p.path for p in group), combo))
        try:
            apply_params(run, assignment)
        except ConfigError as exc:
            shown = ", ".join(f"search.{k}={v!r}" for k, v in assignment.items())
            raise SpaceError(f"the combination {shown} is not allowed: {exc}; every combination of "
                             "searched values must give a valid config (narrow the ranges or fix one of "
                             "the fields)") from exc


def _which(param: SearchParam, value: Any) -> str:
    if param.type == "categorical":
        return ".choices"
    if value == param.low:
        return ".low"
    if value == param.high:
        return ".high"
    return ""


def _values_to_check(param: SearchParam) -> tuple[Any, ...]:
    grid = param.grid()
    if grid is None:
        # Continuous: the config's rules on a float field are intervals, so the bounds decide.
        return (param.low, param.high)
    if len(grid) <= _MAX_VALUES_PER_PARAM:
        return grid
    last = len(grid) - 1
    picks = sorted({round(k * last / (_MAX_VALUES_PER_PARAM - 1)) for k in range(_MAX_VALUES_PER_PARAM)})
    return tuple(grid[k] for k in picks)


def _combinations(grids: Sequence[Sequence[Any]]) -> Iterator[tuple[Any, ...]]:
    """Every combination when there are few, else a fixed-seed sample (the study then stays reproducible)."""
    if math.prod(len(g) for g in grids) <= _MAX_COMBINATIONS:
        yield from itertools.product(*grids)
        return
    rng = random.Random(0)
    for _ in range(_MAX_COMBINATIONS):
        yield tuple(rng.choice(g) for g in grids)


# ---------------------------------------------------------------------------------------------------
# The tune and mlflow sections.


_TUNE_KEYS = tuple(f.name for f in dataclasses.fields(TuneSettings))


def _parse_tune(raw: Any, run: RunConfig) -> TuneSettings:
    if raw is None:
        raise SpaceError("tune is missing: it needs at least num_samples (how many trials to run)")
    if not isinstance(raw, Mapping):
        raise SpaceError(f"tune={raw!r} is not allowed: expected a mapping with keys {', '.join(_TUNE_KEYS)}")
    for key, value in raw.items():
        if key not in _TUNE_KEYS:
            raise SpaceError(f"tune.{key} is not a known key (value {value!r}); allowed keys: "
                             f"{', '.join(_TUNE_KEYS)}")
    if "num_samples" not in raw:
        raise SpaceError("tune.num_samples is missing: how many trials to run (an integer >= 1)")
    kwargs = dict(raw)
    kwargs["scheduler"] = _parse_scheduler(raw.get("scheduler"), run)
    kwargs["resources_per_trial"] = _parse_resources(raw.get("resources_per_trial"))
    return TuneSettings(**kwargs)


def _parse_scheduler(raw: Any, run: RunConfig) -> SchedulerSpec:
    epochs = run.train.epochs
    if raw is None:
        return SchedulerSpec(max_t=epochs)
    if not isinstance(raw, Mapping):
        raise SpaceError(f"tune.scheduler={raw!r} is not allowed: expected {{type: asha, grace_period: 1, "
                         "reduction_factor: 2}} or {{type: none}}")
    kind = raw.get("type", "asha")
    allowed = {"asha": ("type", "grace_period", "reduction_factor", "max_t"), "none": ("type",)}
    if kind not in allowed:
        raise SpaceError(f"tune.scheduler.type={kind!r} is not allowed: expected asha or none")
    for key, value in raw.items():
        if key not in allowed[kind]:
            raise SpaceError(f"tune.scheduler.{key} is not a known key for type {kind} (value {value!r}); "
                             f"allowed keys: {', '.join(allowed[kind])}")
    max_t = raw.get("max_t", epochs)
    if isinstance(max_t, int) and not isinstance(max_t, bool) and max_t != epochs:
        # ASHA's budget is the trial's epochs: with max_t below them every trial would end "stopped
        # early" and the searcher would never see a finished one.
        raise SpaceError(f"tune.scheduler.max_t={max_t!r} is not allowed: must equal train.epochs={epochs} "
                         "(a trial reports once per epoch and ASHA's budget is the trial's length); to "
                         f"train {max_t} epochs set train.epochs: {max_t}, or leave max_t out")
    rf = raw.get("reduction_factor", 2)
    if isinstance(rf, float) and rf.is_integer():
        rf = int(rf)
    return SchedulerSpec(type=kind, grace_period=raw.get("grace_period", 1), reduction_factor=rf, max_t=max_t)


def _parse_resources(raw: Any) -> Resources:
    if raw is None:
        return Resources()
    if not isinstance(raw, Mapping):
        raise SpaceError(f"tune.resources_per_trial={raw!r} is not allowed: expected {{cpu: 1, gpu: 0}}")
    for key, value in raw.items():
        if key not in ("cpu", "gpu"):
            raise SpaceError(f"tune.resources_per_trial.{key} is not a known key (value {value!r}); "
                             "allowed keys: cpu, gpu")
    return Resources(**raw)


def _parse_mlflow(raw: Any) -> MlflowSettings:
    if raw is None:
        return MlflowSettings()
    allowed = tuple(f.name for f in dataclasses.fields(MlflowSettings))
    if not isinstance(raw, Mapping):
        raise SpaceError(f"mlflow={raw!r} is not allowed: expected a mapping with keys {', '.join(allowed)}")
    for key, value in raw.items():
        if key not in allowed:
            raise SpaceError(f"mlflow.{key} is not a known key (value {value!r}); allowed keys: "
                             f"{', '.join(allowed)}")
    return MlflowSettings(**raw)


def _int_at_least(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpaceError(f"{key}={value!r} is not allowed: expected an integer >= {low}")


def _one_of(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise SpaceError(f"{key}={value!r} is not allowed: expected one of {', '.join(allowed)}")


def _check_files(run: RunConfig, raw: Mapping[str, Any], base: Path) -> None:
    checks = [("model", "init_from", run.model.init_from, "file"),
              ("data", "train_path", run.data.train_path, "file"),
              ("data", "val_path", run.data.val_path, "file"),
              ("data", "tokenizer", run.data.tokenizer, "folder")]
    for section, name, resolved, kind in checks:
        if resolved is None:
            continue
        path = Path(resolved)
        ok = path.is_file() if kind == "file" else path.is_dir()
        if not ok:
            given = (raw.get(section) or {}).get(name)
            what = "does not exist" if not path.exists() else f"is not a {kind}"
            raise SpaceError(f"{section}.{name}={given!r}: {path} {what} (relative paths resolve against "
                             f"the space file's folder, {base})")


# ---------------------------------------------------------------------------------------------------
# Handing the space over, and applying a trial's values.


def check_resources(spec: StudySpec, available: Mapping[str, float]) -> None:
    """Refuse a study whose trials could never be placed on a cluster with ``available`` resources.

    ``available`` is ``ray.cluster_resources()`` (keys ``CPU``, ``GPU``). Ray would otherwise keep such
    trials PENDING forever.
    """
    need = spec.tune.resources_per_trial
    gpus, cpus = float(available.get("GPU", 0.0)), float(available.get("CPU", 0.0))
    if need.gpu > 0 and gpus == 0:
        raise SpaceError(f"tune.resources_per_trial.gpu={need.gpu!r} is not allowed: the Ray cluster has no GPU "
                         f"(cluster: {_fmt(cpus)} CPU, 0 GPU); set gpu: 0 to train on CPUs")
    if need.gpu > gpus:
        raise SpaceError(f"tune.resources_per_trial.gpu={need.gpu!r} is not allowed: the Ray cluster has only "
                         f"{_fmt(gpus)} GPU, so no trial could start")
    if need.cpu > cpus:
        raise SpaceError(f"tune.resources_per_trial.cpu={need.cpu!r} is not allowed: the Ray cluster has only "
                         f"{_fmt(cpus)} CPU, so no trial could start")
    fits = _concurrency(need, cpus, gpus)
    if fits < spec.tune.max_concurrent_trials:
        log.info("the cluster (%s CPU, %s GPU) fits %d trials at once, fewer than "
                 "tune.max_concurrent_trials=%d", _fmt(cpus), _fmt(gpus), fits, spec.tune.max_concurrent_trials)


def _concurrency(need: Resources, cpus: float, gpus: float) -> int:
    by_cpu = math.floor(cpus / need.cpu + 1e-9)
    by_gpu = math.floor(gpus / need.gpu + 1e-9) if need.gpu > 0 else by_cpu
    return int(min(by_cpu, by_gpu))


def optuna_distributions(spec: StudySpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """The space as Optuna distributions keyed by dotted path: the ``space`` argument of OptunaSearch."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for p in spec.search:
        if p.type == "categorical":
            out[p.path] = CategoricalDistribution(list(p.choices))
        elif p.type == "int":
            out[p.path] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[p.path] = FloatDistribution(float(p.low), float(p.high), log=p.log,
                                            step=None if p.step is None else float(p.step))
    return out


def apply_params(run: RunConfig, params: Mapping[str, Any]) -> RunConfig:
    """``run`` with each ``{dotted path: value}`` set, validated together like YAML input.

    All values are applied at once, so fields bound by a cross-field rule (hidden_size and
    num_attention_heads) can change together. NumPy scalars (from Ray's samplers) become Python ones.
    """
    raw = run_config_to_dict(run)
    for path, value in params.items():
        section, _, name = str(path).partition(".")
        if section not in raw or name not in raw[section]:
            raise SpaceError(f"{path} is not a config field; allowed: " + ", ".join(
                f"{s}.{n}" for s in _CONFIG_SECTIONS for n in field_names(s)))
        raw[section][name] = _plain(value)
    try:
        return run_config_from_dict(raw)
    except SpaceError:
        raise
    except ConfigError as exc:
        raise SpaceError(str(exc)) from exc


def spec_to_dict(spec: StudySpec) -> dict[str, Any]:
    """The resolved spec as a space file's mapping (paths absolute); ``load_space`` of its YAML is ``spec``."""
    search: dict[str, Any] = {}
    for p in spec.search:
        entry: dict[str, Any] = {"type": p.type}
        if p.type == "categorical":
            entry["choices"] = list(p.choices)
        else:
            entry.update(low=p.low, high=p.high)
            if p.log:
                entry["log"] = True
            if p.step is not None:
                entry["step"] = p.step
        search[p.path] = entry
    t = spec.tune
    sched: dict[str, Any] = {"type": t.scheduler.type}
    if t.scheduler.type == "asha":
        sched.update(grace_period=t.scheduler.grace_period, reduction_factor=t.scheduler.reduction_factor)
    tune_section = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
    tune_section.update(scheduler=sched, resources_per_trial=t.resources_per_trial.as_dict())
    return {**run_config_to_dict(spec.run), "search": search, "tune": tune_section,
            "mlflow": {"tracking_uri": spec.mlflow.tracking_uri, "experiment": spec.mlflow.experiment}}


def spec_to_yaml(spec: StudySpec, header: str = "") -> str:
    """:func:`spec_to_dict` as YAML text, a valid space file."""
    body = yaml.safe_dump(spec_to_dict(spec), sort_keys=False, allow_unicode=True)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def _plain(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------------
# The dry-run summary.


def describe(spec: StudySpec) -> str:
    """The resolved study for ``--dry-run``: fixed config, searched distributions, plan, resources."""
    t, sched, res = spec.tune, spec.tune.scheduler, spec.tune.resources_per_trial
    searched = {p.path for p in spec.search}
    lines = [f"space: {spec.source}", "", "fixed config (* = searched, the search wins):"]
    bundled = {"data.train_path": "bundled demo dataset", "data.tokenizer": "bundled tokenizer",
               "data.val_path": f"hold out {_fmt(spec.run.data.val_fraction)} of the training data"}
    for section, values in run_config_to_dict(spec.run).items():
        lines.append(f"  {section}:")
        for name, value in values.items():
            path = f"{section}.{name}"
            note = f"  ({bundled[path]})" if value is None and path in bundled else ""
            mark = "*" if path in searched else " "
            lines.append(f"   {mark}{name}: {_fmt(value)}{note}")
    width = max(len(p.path) for p in spec.search)
    lines += ["", f"search space ({len(spec.search)} parameters):"]
    lines += [f"  {p.path.ljust(width)}  {p.summary()}" for p in spec.search]
    searcher = "Optuna TPE" if t.searcher == "optuna" else "random"
    budget = "none" if t.time_budget_s is None else f"{_fmt(t.time_budget_s)} s"
    concurrent = min(t.max_concurrent_trials, t.num_samples)
    lines += ["", "trial plan:"]
    lines.append(f"  {t.num_samples} trials, at most {concurrent} at once; searcher {searcher} "
                 f"(seed {t.seed}); time budget {budget}")
    lines.append(f"  objective: {t.mode} {t.metric}; up to {t.max_failures} retries per failed trial; keep "
                 f"{t.keep_checkpoints} checkpoint(s) per trial, resume state of the top {t.keep_top_trials}")
    if sched.type == "asha":
        # Ray's last rung can sit at max_t, where every trial stops anyway: not a decision.
        decisions = ", ".join(_fmt(r) for r in sched.rungs if r < sched.max_t) or "none"
        lines.append(f"  scheduler ASHA over epochs (max_t {sched.max_t}): after epoch {decisions} a trial "
                     f"continues only if in the top 1/{_fmt(sched.reduction_factor)} of the trials that got there")
    else:
        lines.append(f"  scheduler none: every trial runs all {sched.max_t} epochs")
    lines.append(f"  at most {t.num_samples * sched.max_t} trial-epochs in total")
    lines.append("")
    lines.append(f"resources per trial: {_fmt(res.cpu)} CPU, {_fmt(res.gpu)} GPU ({concurrent} concurrent "
                 f"trials need {_fmt(res.cpu * concurrent)} CPU, {_fmt(res.gpu * concurrent)} GPU)")
    lines.append(f"mlflow: experiment {spec.mlflow.experiment!r}, tracking "
                 f"{spec.mlflow.tracking_uri or '(driver default)'}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "null"
    return str(value)


def _on_grid(value: float, step: float) -> bool:
    ratio = value / step
    return abs(ratio - round(ratio)) <= 1e-9 * max(1.0, abs(ratio))
