"""Search-space files: parse and validate a whole study up front, and hand its space to Optuna.

A space file is a run file (``model``/``data``/``train``, exactly :mod:`minimind_train.config`) plus
``search`` (dotted config path -> distribution, in Optuna's vocabulary), ``tune`` (how many trials, how
they run, which one wins) and ``mlflow``; ``search_spaces/sft.yaml`` shows each. :func:`load_space`
rejects every mistake it can see before a trial starts with a :class:`SpaceError` naming the key, the
value and what is allowed. A parameter's key is its dotted config path: Ray Tune splits keys on ``/``
only, so it stays one flat key in Optuna's study, the trial config, result columns and MLflow params.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import math
import random
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt
from pydantic.dataclasses import dataclass

from minimind_train import config
from minimind_train.config import ConfigError, RunConfig
from minimind_train.validation import STRICT, Bool, Int, Number, Text, base_type, expected, raising, validate

from .objective import Mode, Objective

if TYPE_CHECKING:
    import optuna

__all__ = [
    "BUNDLED_PACKAGE", "MlflowSettings", "Resources", "SchedulerSpec", "SearchParam", "SpaceError", "StudySpec",
    "TuneSettings", "bundled_spaces", "load_space", "optuna_distributions",
    "resolve_space_path", "spec_to_dict", "spec_to_yaml",
]

BUNDLED_PACKAGE = "search_spaces"
_CONFIG_SECTIONS = ("model", "data", "train")
_SECTIONS = (*_CONFIG_SECTIONS, "search", "tune", "mlflow")

# Fields a study must not vary, with the reason shown to the user. Everything else is searchable.
_SPLIT = "it changes the validation split, so trials' val_loss would not be comparable"
_UNSEARCHABLE: Mapping[str, str] = {
    **dict.fromkeys(("model.init_from", "data.train_path", "data.val_path"),
                    "it is a file path; set it as a fixed value"),
    **dict.fromkeys(("data.tokenizer", "data.cache_dir"), "it is a folder path; set it as a fixed value"),
    "data.val_fraction": _SPLIT, "data.split_seed": _SPLIT,
    "data.max_seq_len": "the dataset is tokenised once for all trials, and truncation changes val_loss",
    "train.epochs": "it is the trial budget the scheduler counts in; set train.epochs and "
                    "tune.scheduler.max_t instead",
    "train.evals_per_epoch": "it sets the unit the scheduler's rungs count (evaluations); set it as a fixed value",
    "train.num_threads": "each trial sets it to its CPU share (tune.resources_per_trial.cpu)",
    "train.device": "tune.resources_per_trial decides whether a trial gets a GPU",
}

# How many searched values are checked against the config at load time (each costs a config build; well
# under a second): every value and combination of a small space, a fixed-seed sample of larger ones.
_MAX_VALUES_PER_PARAM = 64
_MAX_COMBINATIONS = 512


# A number kept as written (an integer stays one): these values are logged and shown as given.
Quantity = Int | Number


class SpaceError(ConfigError):
    """A search-space file is invalid; the message names the key, the value and what is allowed."""


@raising("search", SpaceError)
@dataclass(frozen=True, config=STRICT)
class SearchParam:
    """One searched config field and its distribution, with Optuna's semantics (bounds inclusive; a ``step``
    grid is ``low + k * step``): ``float``/``int`` use ``low``/``high``/``log``/``step``, ``categorical`` ``choices``."""

    path: Text
    type: Literal["float", "int", "categorical"]
    low: Number | None = None
    high: Number | None = None
    log: Bool = False
    step: Number | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        key, kind = f"search.{self.path}", self.type
        if kind != "categorical" and (missing := [n for n in ("low", "high") if getattr(self, n) is None]):
            raise SpaceError(f"{key}.{missing[0]} is missing: a {kind} distribution needs low and high")
        for name in ("low", "high", "step") if kind == "int" else ():
            if (value := getattr(self, name)) is not None:
                if not value.is_integer():
                    raise SpaceError(f"{key}.{name}={value!r} is not allowed: expected an integer")
                object.__setattr__(self, name, int(value))
        low, high, step = self.low or 0, self.high or 0, self.step
        # What a choice may be is the field's business (checked with the config); Optuna needs distinct ones.
        twice = [c for i, c in enumerate(self.choices) if c in self.choices[:i]]
        only = "a categorical parameter takes only choices"
        rules = [*((n, getattr(self, n) is None, only) for n in ("low", "high", "step")), ("log", not self.log, only),
                 ("choices", bool(self.choices) and not twice,
                  f"{twice[0]!r} is listed twice" if twice else "expected a non-empty list"),
                 ] if kind == "categorical" else [
                 ("choices", not self.choices, f"a {kind} parameter takes low, high, log and step"),
                 ("low", low < high, f"must be < {key}.high={high!r}"),
                 ("low", low > 0 or not self.log, "must be > 0 when log is true"),
                 ("step", step is None or not self.log, "a log scale has no even grid: drop step or log"),
                 ("step", step is None or step > 0,
                  "expected an integer >= 1" if kind == "int" else "expected a number > 0"),
                 ("high", step is None or step <= 0 or math.isclose(k := (high - low) / step, round(k), abs_tol=1e-9),
                  (f"with low={low!r} and step={step!r}, high - low must be a multiple of step (Optuna samples "
                   "low + k * step); for another grid list the values as {type: categorical, choices: [...]}"))]
        for name, ok, why in rules:
            if not ok:
                value = getattr(self, name)
                raise SpaceError(f"{key}.{name}={list(value) if name == 'choices' else value!r} is not allowed: {why}")

    def grid(self) -> tuple[Any, ...] | None:
        """Every value the parameter can take, or None for a continuous distribution."""
        if self.type == "categorical":
            return self.choices
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return tuple(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        count = round((self.high - self.low) / self.step)
        # Re-derive each point from its index so the grid has no accumulated rounding drift.
        return tuple(self.low + k * self.step for k in range(count)) + (float(self.high),)


@raising("tune.scheduler", SpaceError)
@dataclass(frozen=True, config=STRICT)
class SchedulerSpec:
    """Trial scheduler: ASHA, or none (every trial runs to the end). ``grace_period``, ``max_t`` and the
    rungs count evaluations (:func:`tune.study.evaluation_index`); ``max_t`` is a whole trial's length,
    ``train.epochs * train.evals_per_epoch``."""

    type: Literal["asha", "none"] = "asha"
    grace_period: Annotated[Int, Ge(1)] = 1
    # Optuna's SuccessiveHalvingPruner (the ASHA used here) keeps the top 1/reduction_factor at a rung.
    reduction_factor: Annotated[Int, Ge(2)] = 2
    max_t: Annotated[Int, Ge(1)] = 1

    def __post_init__(self) -> None:
        if self.type == "asha" and self.grace_period > self.max_t:
            raise SpaceError(f"tune.scheduler.grace_period={self.grace_period!r} is not allowed: expected an "
                             f"integer >= 1 and <= tune.scheduler.max_t={self.max_t}")

    @property
    def rungs(self) -> tuple[float, ...]:
        """The evaluation indices at which ASHA (Optuna's pruner) compares trials, ascending; () for none."""
        if self.type == "none":
            return ()
        count = int(math.log(self.max_t / self.grace_period) / math.log(self.reduction_factor) + 1)
        return tuple(self.grace_period * self.reduction_factor ** k for k in range(count))


@raising("tune.resources_per_trial", SpaceError)
@dataclass(frozen=True, config=STRICT)
class Resources:
    """What one trial reserves; ``gpu`` may be a fraction (several trials share a GPU)."""

    cpu: Annotated[Quantity, Gt(0)] = 1.0
    gpu: Annotated[Quantity, Ge(0)] = 0.0

    def __post_init__(self) -> None:
        if self.gpu > 1 and self.gpu != int(self.gpu):  # Ray shares a GPU only below one whole device
            raise SpaceError(f"tune.resources_per_trial.gpu={self.gpu!r} is not allowed: above 1 a trial takes "
                             "whole GPUs (an integer); fractions must be <= 1")

    def as_dict(self) -> dict[str, float]:
        """The ``{"cpu": ..., "gpu": ...}`` mapping ``tune.with_resources`` takes."""
        return {"cpu": self.cpu, "gpu": self.gpu}


@raising("tune.finalists", SpaceError)
@dataclass(frozen=True, config=STRICT)
class FinalistSettings:
    """After the search, the ``top_k`` best configs train again with ``seeds`` more seeds each
    (``train.seed + 1, ...``: model init and data order), never stopped early; the study's answer is
    the best mean objective. ``seeds: 0`` turns it off."""

    top_k: Annotated[Int, Ge(1)] = 3
    seeds: Annotated[Int, Ge(0)] = 0


@raising("tune", SpaceError)
@dataclass(frozen=True, config=STRICT)
class TuneSettings:
    """How many trials run, how, and how the winner is chosen."""

    num_samples: Annotated[Int, Ge(1)]
    max_concurrent_trials: Annotated[Int, Ge(1)] = 1
    metric: Literal["val_loss", "train_loss"] = "val_loss"
    mode: Mode = "min"
    seed: Int = 0
    time_budget_s: Annotated[Quantity, Gt(0)] | None = None
    scheduler: SchedulerSpec = dataclasses.field(default_factory=SchedulerSpec)
    resources_per_trial: Resources = dataclasses.field(default_factory=Resources)
    # Optuna's sampler: TPE, or random (seeded by ``seed`` either way).
    searcher: Literal["optuna", "random"] = "optuna"
    # Ray retries of a crashed trial (from its last checkpoint).
    max_failures: Annotated[Int, Ge(0)] = 2
    # Checkpoints kept per trial, best by ``metric``.
    keep_checkpoints: Annotated[Int, Ge(1)] = 1
    # Trials whose full resume state survives the end of the study; the rest keep only model.pth.
    keep_top_trials: Annotated[Int, Ge(0)] = 3
    finalists: FinalistSettings = dataclasses.field(default_factory=FinalistSettings)
    # An earlier study's folder: its finished trials start a new study's sampler (tune.warmstart).
    warm_start: Text | None = None

    @property
    def objective(self) -> Objective:
        return Objective(self.metric, self.mode)


@raising("mlflow", SpaceError)
@dataclass(frozen=True, config=STRICT)
class MlflowSettings:
    """Where the study is tracked; ``tracking_uri`` None leaves the choice to the driver."""

    tracking_uri: Text | None = None
    experiment: Text = "minimind-sft"

    def __post_init__(self) -> None:
        for name, value in (("tracking_uri", self.tracking_uri), ("experiment", self.experiment)):
            if value is not None and not value.strip():
                raise SpaceError(f"mlflow.{name}={value!r} is not allowed: expected a non-empty string"
                                 + (" or null" if name == "tracking_uri" else ""))


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """A validated space file: the fixed run, what is searched, and how the study runs."""

    run: RunConfig
    search: tuple[SearchParam, ...]
    tune: TuneSettings
    mlflow: MlflowSettings
    # The resolved space file, and its text verbatim (logged as an artifact of the study).
    source: Path
    text: str

    @property
    def trial_run(self) -> RunConfig:
        """The run config every trial starts from: ``run`` with ``train.num_threads`` set to the trial's
        CPU share (``tune.resources_per_trial.cpu``, at least 1), so concurrent trials do not oversubscribe."""
        threads = max(1, int(self.tune.resources_per_trial.cpu))
        return dataclasses.replace(self.run, train=dataclasses.replace(self.run.train, num_threads=threads))


def _bundled_dir() -> Path:
    return Path(str(importlib.resources.files(BUNDLED_PACKAGE)))


def bundled_spaces() -> list[str]:
    """File names of the spaces shipped in the ``search_spaces`` package."""
    return sorted(p.name for p in _bundled_dir().glob("*.yaml"))


def resolve_space_path(path_or_name: str | Path) -> Path:
    """An existing file, else a bundled space by name (``sft.yaml``, ``sft`` or ``search_spaces/sft.yaml``),
    so that ``--space search_spaces/sft.yaml`` works from any directory."""
    given = Path(path_or_name).expanduser()
    if given.is_file():
        return given.resolve()
    if given.exists():
        raise SpaceError(f"space {str(path_or_name)!r}: {given.resolve()} is not a file")
    *folder, name = given.parts
    bundled = _bundled_dir() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if folder in ([], [BUNDLED_PACKAGE]) and bundled.is_file():
        return bundled.resolve()
    raise SpaceError(f"space {str(path_or_name)!r}: no such file ({given.resolve()}), and not a bundled "
                     f"space; bundled spaces: {', '.join(bundled_spaces()) or '(none)'}")


def load_space(path_or_name: str | Path) -> StudySpec:
    """Read and validate a space file; every error is a :class:`SpaceError` (a message may hold several
    problems, one per line). Relative paths in ``model``/``data`` resolve against the space file's folder."""
    source = resolve_space_path(path_or_name)
    text = source.read_text(encoding="utf-8")
    try:
        return _build_spec(yaml.safe_load(text), source, text)
    except yaml.YAMLError as exc:
        raise SpaceError(f"{source}: not valid YAML: {exc}") from exc
    except ConfigError as exc:
        raise SpaceError(f"{source}: {exc}") from exc


def _build_spec(raw: Any, source: Path, text: str) -> StudySpec:
    if not isinstance(raw, Mapping):
        raise SpaceError(f"the file must be a mapping with sections {', '.join(_SECTIONS)}; got {raw!r}")
    if unknown := [key for key in raw if key not in _SECTIONS]:
        raise SpaceError(f"{unknown[0]} is not a known section (value {raw[unknown[0]]!r}); allowed sections: "
                         f"{', '.join(_SECTIONS)}")
    run = config.run_config_from_dict({k: raw[k] for k in _CONFIG_SECTIONS if k in raw})
    run = config.resolve_paths(run, source.parent)
    search = _parse_search(raw.get("search"), run)
    settings = _parse_tune(raw.get("tune"), run.train.epochs, run.train.evals_per_epoch)
    mlflow = validate(MlflowSettings, raw.get("mlflow") or {}, "mlflow", SpaceError)
    if settings.finalists.seeds and any(p.path == "train.seed" for p in search):
        raise SpaceError(f"tune.finalists.seeds={settings.finalists.seeds} is not allowed with search.train.seed: "
                         "finalists train the top configs with other values of train.seed themselves; search "
                         "other fields, or set tune.finalists.seeds: 0")
    if settings.warm_start is not None:  # (relative to the space file, like the data paths)
        settings = dataclasses.replace(settings, warm_start=str((source.parent / settings.warm_start).resolve()))
    if settings.resources_per_trial.gpu == 0 and run.train.device == "cuda":
        raise SpaceError("tune.resources_per_trial.gpu=0 is not allowed with train.device='cuda': a trial "
                         "without a GPU share sees no GPU; reserve a share (e.g. 0.25) or use train.device: auto")
    # Files last: a space whose structure is wrong says so even on a machine without the data.
    for section, name, kind in (("model", "init_from", "file"), ("data", "train_path", "file"),
                                ("data", "val_path", "file"), ("data", "tokenizer", "folder")):
        path = Path(getattr(getattr(run, section), name) or ".")
        if path != Path(".") and not (path.is_file() if kind == "file" else path.is_dir()):
            raise SpaceError(f"{section}.{name}={raw[section][name]!r}: {path} "
                             + ("does not exist" if not path.exists() else f"is not a {kind}")
                             + f" (relative paths resolve against the space file's folder, {source.parent})")
    return StudySpec(run=run, search=search, tune=settings, mlflow=mlflow, source=source, text=text)


def _parse_search(raw: Any, run: RunConfig) -> tuple[SearchParam, ...]:
    example = "{train.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}}"
    if not raw or not isinstance(raw, Mapping):
        raise SpaceError(f"search={raw!r} is not allowed: " + (
            "a study needs at least one searched field" if not raw else
            "expected a mapping of dotted config paths to distributions") + f", e.g. search: {example}")
    hints = {f"{s}.{name}": hint for s in _CONFIG_SECTIONS
             for name, hint in typing.get_type_hints(type(getattr(run, s)), include_extras=True).items()}
    params = []
    for path, dist in raw.items():
        near = [f for f in hints if f.startswith(f"{str(path).partition('.')[0]}.")] or hints
        if path not in hints:
            raise SpaceError(f"search.{path} is not a config field; searchable fields: "
                             + ", ".join(f for f in near if f not in _UNSEARCHABLE))
        if path in _UNSEARCHABLE:
            raise SpaceError(f"search.{path} is not allowed: {path} cannot be searched because "
                             f"{_UNSEARCHABLE[path]}")
        if not isinstance(dist, Mapping):
            raise SpaceError(f"search.{path}={dist!r} is not allowed: expected a distribution such as "
                             "{type: float, low: 0.1, high: 2.0} or {type: categorical, choices: [1, 2, 4]}")
        param = validate(SearchParam, {**dist, "path": path}, f"search.{path}", SpaceError)
        # A numeric distribution must fit the field's type; categorical choices are checked by value.
        if base_type(hints[path]) is int and param.type == "float":
            raise SpaceError(f"search.{path}.type='float' is not allowed: {path} is an integer field; use "
                             "type: int (or categorical)")
        if base_type(hints[path]) not in (int, float) and param.type != "categorical":
            raise SpaceError(f"search.{path}.type={param.type!r} is not allowed: {path} is not a numeric field "
                             f"(it takes {expected(hints[path])}); use type: categorical with choices")
        params.append(param)
    for section in _CONFIG_SECTIONS:
        if group := [p for p in params if p.path.startswith(f"{section}.")]:
            _check_values(run, group)
    return tuple(params)


def _check_values(run: RunConfig, group: Sequence[SearchParam]) -> None:
    """Require a valid config for every combination of one section's searched values: RunConfig's
    cross-field rules (hidden_size divisible by num_attention_heads, ...) can fail on a pair. A failure is
    blamed on one value if it fails with the fixed config and in every combination (a field valid only
    together with another searched field is not a mistake), else on the combination."""
    paths = [p.path for p in group]

    def fails(values: Sequence[Any], keys: Sequence[str] = paths) -> ConfigError | None:
        try:
            run.with_overrides(dict(zip(keys, values)))
        except ConfigError as exc:
            return exc
        return None

    combos = list(_combinations([_values_to_check(p) for p in group]))
    for combo in combos:
        if (error := fails(combo)) is None:
            continue
        for i, (param, value) in enumerate(zip(group, combo)):
            if (alone := fails([value], [param.path])) and all(fails(c) for c in combos if c[i] == value):
                where = ".choices" if param.choices else {param.low: ".low", param.high: ".high"}.get(value, "")
                raise SpaceError(f"search.{param.path}{where}={value!r} is not allowed: {alone}")
        shown = ", ".join(f"search.{k}={v!r}" for k, v in zip(paths, combo))
        raise SpaceError(f"the combination {shown} is not allowed: {error}; every combination of searched "
                         "values must give a valid config (narrow the ranges or fix one of the fields)")


def _values_to_check(param: SearchParam) -> Sequence[Any]:
    """Every value of a small grid, evenly spaced ones (both ends included) of a large one; a
    continuous range's bounds (the config's rules on a float field are intervals)."""
    grid = param.grid() or (param.low, param.high)
    last, n = len(grid) - 1, min(len(grid), _MAX_VALUES_PER_PARAM)
    return [grid[round(k * last / (n - 1))] for k in range(n)] if n > 1 else grid


def _combinations(grids: Sequence[Sequence[Any]]) -> Iterator[tuple[Any, ...]]:
    """Every combination when there are few, else a fixed-seed sample (the study then stays reproducible)."""
    if math.prod(len(g) for g in grids) <= _MAX_COMBINATIONS:
        return itertools.product(*grids)
    rng = random.Random(0)
    return (tuple(rng.choice(g) for g in grids) for _ in range(_MAX_COMBINATIONS))


def _parse_tune(raw: Any, epochs: int, evals_per_epoch: int = 1) -> TuneSettings:
    """The tune section; the scheduler's budget ``max_t`` is the trial's length in evaluations."""
    if raw is None or isinstance(raw, Mapping):  # a null scheduler or resources section: the defaults
        raw = {k: v for k, v in (raw or {}).items() if v is not None or k not in ("scheduler", "resources_per_trial")}
        if isinstance(sched := raw.get("scheduler", {}), Mapping):
            if sched.get("type") == "none" and (extra := [k for k in sched if k != "type"]):
                raise SpaceError(f"tune.scheduler.{extra[0]} is not a known key for type none (value "
                                 f"{sched[extra[0]]!r}); allowed keys: type")
            # ASHA's budget is the trial's length: with max_t below it every trial would end "stopped early"
            # and the searcher would never see a finished one.
            length, one = epochs * evals_per_epoch, evals_per_epoch == 1
            if (max_t := sched.get("max_t", length)) != length:
                raise SpaceError(f"tune.scheduler.max_t={max_t!r} is not allowed: must equal train.epochs" + (
                    f"={epochs}" if one else f" x train.evals_per_epoch = {epochs} x {evals_per_epoch} = {length}")
                    + " (ASHA counts evaluations and its budget is the trial's length); " + (
                    f"to train {max_t} epochs set train.epochs: {max_t}" if one else
                    "change train.epochs or train.evals_per_epoch") + ", or leave max_t out")
            raw["scheduler"] = {**sched, "max_t": length}
    return validate(TuneSettings, raw, "tune", SpaceError)


def optuna_distributions(spec: StudySpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """The space as Optuna distributions keyed by dotted path: what the study's sampler draws from."""
    from optuna import distributions as d

    return {p.path: d.CategoricalDistribution(list(p.choices)) if p.type == "categorical"
            else d.IntDistribution(int(p.low or 0), int(p.high or 0), log=p.log, step=int(p.step or 1))
            if p.type == "int" else d.FloatDistribution(float(p.low or 0), float(p.high or 0), log=p.log, step=p.step)
            for p in spec.search}


def spec_to_dict(spec: StudySpec) -> dict[str, Any]:
    """The resolved spec as a space file's mapping (paths absolute); ``load_space`` of its YAML is ``spec``."""
    # A space file's spelling: what a distribution does not use, and the default log and step, left out.
    search = {p.path: {k: list(v) if k == "choices" else v for k, v in dataclasses.asdict(p).items()
                       if k != "path" and v not in (None, ()) and v is not False} for p in spec.search}
    tune = dataclasses.asdict(spec.tune)
    # max_t is always train.epochs * train.evals_per_epoch; type none has no ASHA settings.
    kept = ("type", "grace_period", "reduction_factor") if spec.tune.scheduler.type == "asha" else ("type",)
    tune["scheduler"] = {k: v for k, v in tune["scheduler"].items() if k in kept}
    return {**config.run_config_to_dict(spec.run), "search": search, "tune": tune,
            "mlflow": dataclasses.asdict(spec.mlflow)}


def spec_to_yaml(spec: StudySpec, header: str = "") -> str:
    """:func:`spec_to_dict` as YAML text, a valid space file."""
    body = yaml.safe_dump(spec_to_dict(spec), sort_keys=False, allow_unicode=True)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body
