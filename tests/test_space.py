"""Search-space files: validation, bundled spaces, name resolution, and the hand-over to Optuna."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml

from minimind_train.config import ConfigError, RunConfig
from tune.space import (
    SchedulerSpec,
    SearchParam,
    SpaceError,
    StudySpec,
    bundled_spaces,
    load_space,
    optuna_distributions,
    resolve_space_path,
)

BUNDLED = Path(__file__).resolve().parents[1] / "search_spaces"

# A valid space that needs no files: every case of the validation table breaks exactly one thing.
BASE: dict[str, Any] = {
    "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "data": {"max_seq_len": 64},
    "train": {"epochs": 4, "batch_size": 8},
    "search": {
        "train.learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
        "train.accumulation_steps": {"type": "categorical", "choices": [1, 2, 4]},
        "train.grad_clip": {"type": "float", "low": 0.1, "high": 2.0},
        "train.warmup_steps": {"type": "int", "low": 0, "high": 40, "step": 10},
    },
    "tune": {
        "num_samples": 4, "max_concurrent_trials": 2, "seed": 0, "time_budget_s": 60,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources_per_trial": {"cpu": 1, "gpu": 0},
    },
    "mlflow": {"experiment": "test"},
}

DELETE = object()


def write_space(folder: Path, raw: Any, name: str = "space.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def with_change(keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return raw


LR = ("search", "train.learning_rate")
WARMUP = ("search", "train.warmup_steps")
ACCUM = ("search", "train.accumulation_steps")
SCHED = ("tune", "scheduler")
RES = ("tune", "resources_per_trial")

# (case id, keys to change, new value, substrings the error must contain: the key and the value).
BAD_CASES: list[tuple[str, tuple[str, ...], Any, tuple[str, ...]]] = [
    ("unknown section", ("optimizer",), {"lr": 1}, ("optimizer", "allowed sections")),
    ("unknown model key", ("model", "hidden"), 64, ("model.hidden", "64")),
    ("config value type", ("train", "batch_size"), "big", ("train.batch_size", "'big'")),
    ("config value rule", ("train", "epochs"), 0, ("train.epochs", "0")),
    ("search missing", ("search",), DELETE, ("search", "at least one")),
    ("search empty", ("search",), {}, ("search", "at least one")),
    ("search not a mapping", ("search",), ["train.learning_rate"], ("search", "train.learning_rate")),
    ("search unknown section", ("search", "optim.lr"), {"type": "float", "low": 0.1, "high": 1.0},
     ("search.optim.lr", "train.learning_rate")),
    ("search unknown field", ("search", "train.lr"), {"type": "float", "low": 0.1, "high": 1.0},
     ("search.train.lr", "train.learning_rate", "train.grad_clip")),
    ("search a file path", ("search", "data.train_path"), {"type": "categorical", "choices": ["a.jsonl"]},
     ("search.data.train_path", "file path")),
    ("search the epoch budget", ("search", "train.epochs"), {"type": "int", "low": 1, "high": 4},
     ("search.train.epochs", "tune.scheduler.max_t")),
    ("search the evaluation unit", ("search", "train.evals_per_epoch"), {"type": "int", "low": 1, "high": 8},
     ("search.train.evals_per_epoch", "rungs count")),
    ("search the val split", ("search", "data.val_fraction"), {"type": "float", "low": 0.1, "high": 0.2},
     ("search.data.val_fraction", "validation split")),
    ("distribution not a mapping", LR, 0.001, ("search.train.learning_rate", "0.001")),
    ("unknown distribution type", LR + ("type",), "normal", ("search.train.learning_rate.type", "'normal'")),
    ("unknown distribution key", LR + ("scale",), "log", ("search.train.learning_rate.scale", "'log'")),
    ("choices on a float", LR + ("choices",), [0.1], ("search.train.learning_rate.choices", "[0.1]")),
    ("missing high", LR + ("high",), DELETE, ("search.train.learning_rate.high", "missing")),
    ("low not a number", LR + ("low",), "small", ("search.train.learning_rate.low", "'small'")),
    ("low above high", LR + ("low",), 0.05, ("search.train.learning_rate.low=0.05", "0.01")),
    ("float low equals high", LR + ("low",), 0.01, ("search.train.learning_rate.low=0.01", "< ")),
    ("int low equals high", WARMUP, {"type": "int", "low": 5, "high": 5},
     ("search.train.warmup_steps.low=5", "high=5")),
    ("int bound not an integer", WARMUP + ("high",), 40.5, ("search.train.warmup_steps.high", "40.5")),
    ("log with low 0", ("search", "train.grad_clip"), {"type": "float", "low": 0.0, "high": 1.0, "log": True},
     ("search.train.grad_clip.low=0.0", "log")),
    ("log not a boolean", LR + ("log",), "yes please", ("search.train.learning_rate.log", "'yes please'")),
    ("step with log", LR + ("step",), 1.0e-4, ("search.train.learning_rate.step", "0.0001", "log")),
    ("step not positive", WARMUP + ("step",), 0, ("search.train.warmup_steps.step=0", ">= 1")),
    ("step off grid", WARMUP, {"type": "int", "low": 0, "high": 25, "step": 10},
     ("search.train.warmup_steps.high=25", "multiple of step")),
    ("float step off grid", ("search", "train.grad_clip"),
     {"type": "float", "low": 0.1, "high": 1.0, "step": 0.25}, ("search.train.grad_clip.high=1.0", "0.25")),
    ("empty choices", ACCUM + ("choices",), [], ("search.train.accumulation_steps.choices", "[]")),
    ("choices not a list", ACCUM + ("choices",), "1,2", ("search.train.accumulation_steps.choices", "'1,2'")),
    ("mixed choices", ACCUM + ("choices",), [1, "two"], ("search.train.accumulation_steps.choices", "'two'")),
    ("unhashable choices", ACCUM + ("choices",), [[1, 2], [4]],
     ("search.train.accumulation_steps.choices", "[1, 2]")),
    ("duplicate choices", ACCUM + ("choices",), [1, 2, 2], ("search.train.accumulation_steps.choices", "twice")),
    ("choice invalid for the field", ACCUM + ("choices",), [1, 0],
     ("search.train.accumulation_steps.choices=0", "train.accumulation_steps=0")),
    ("choice of the wrong type", ("search", "train.batch_size"), {"type": "categorical", "choices": ["8", "16"]},
     ("search.train.batch_size.choices='8'", "expected an integer")),
    ("range invalid for the field", LR, {"type": "float", "low": 0.0, "high": 0.1},
     ("search.train.learning_rate.low=0.0", "train.learning_rate=0.0")),
    ("high invalid for the field", ("search", "train.min_lr_ratio"), {"type": "float", "low": 0.0, "high": 1.5},
     ("search.train.min_lr_ratio.high=1.5", "train.min_lr_ratio")),
    ("float distribution on an int field", ("search", "train.batch_size"), {"type": "float", "low": 8, "high": 32},
     ("search.train.batch_size.type='float'", "integer")),
    ("numeric distribution on a bool field", ("search", "model.use_moe"), {"type": "int", "low": 0, "high": 1},
     ("search.model.use_moe.type='int'", "categorical")),
    ("int grid value breaks a cross-field rule", ("search", "model.hidden_size"),
     {"type": "int", "low": 64, "high": 72}, ("search.model.hidden_size=65", "num_attention_heads")),
    ("tune missing", ("tune",), DELETE, ("tune", "num_samples")),
    ("tune unknown key", ("tune", "samples"), 3, ("tune.samples", "3", "num_samples")),
    ("num_samples missing", ("tune", "num_samples"), DELETE, ("tune.num_samples", "missing")),
    ("num_samples zero", ("tune", "num_samples"), 0, ("tune.num_samples=0", ">= 1")),
    ("num_samples not an integer", ("tune", "num_samples"), "many", ("tune.num_samples='many'",)),
    ("max_concurrent zero", ("tune", "max_concurrent_trials"), 0, ("tune.max_concurrent_trials=0", ">= 1")),
    ("unknown metric", ("tune", "metric"), "accuracy", ("tune.metric='accuracy'", "val_loss")),
    ("unknown mode", ("tune", "mode"), "minimize", ("tune.mode='minimize'", "min")),
    ("unknown searcher", ("tune", "searcher"), "grid", ("tune.searcher='grid'", "optuna", "random")),
    ("seed not an integer", ("tune", "seed"), "x", ("tune.seed='x'",)),
    ("negative time budget", ("tune", "time_budget_s"), -5, ("tune.time_budget_s=-5",)),
    ("negative max_failures", ("tune", "max_failures"), -1, ("tune.max_failures=-1", ">= 0")),
    ("keep no checkpoint", ("tune", "keep_checkpoints"), 0, ("tune.keep_checkpoints=0", ">= 1")),
    ("negative keep_top_trials", ("tune", "keep_top_trials"), -1, ("tune.keep_top_trials=-1",)),
    ("unknown scheduler", SCHED + ("type",), "hyperband", ("tune.scheduler.type='hyperband'", "asha", "none")),
    ("scheduler not a mapping", SCHED, "asha", ("tune.scheduler='asha'",)),
    ("max_t above epochs", SCHED + ("max_t",), 10, ("tune.scheduler.max_t=10", "must equal train.epochs=4")),
    # The shared case asha-maxt-below-epochs: every trial would end "stopped early".
    ("max_t below epochs", SCHED + ("max_t",), 2, ("tune.scheduler.max_t=2", "must equal train.epochs=4",
                                                   "train.epochs: 2")),
    ("grace above max_t", SCHED + ("grace_period",), 5, ("tune.scheduler.grace_period=5", "max_t=4")),
    ("grace zero", SCHED + ("grace_period",), 0, ("tune.scheduler.grace_period=0",)),
    ("reduction factor 1", SCHED + ("reduction_factor",), 1, ("tune.scheduler.reduction_factor=1", ">= 2")),
    ("reduction factor 1.5", SCHED + ("reduction_factor",), 1.5, ("tune.scheduler.reduction_factor=1.5",
                                                                  "integer >= 2")),
    ("asha key on none", SCHED, {"type": "none", "grace_period": 1}, ("tune.scheduler.grace_period", "none")),
    ("unknown resource", RES + ("memory",), 4, ("tune.resources_per_trial.memory", "cpu, gpu")),
    ("zero cpu", RES + ("cpu",), 0, ("tune.resources_per_trial.cpu=0", "> 0")),
    ("negative gpu", RES + ("gpu",), -1, ("tune.resources_per_trial.gpu=-1",)),
    ("fractional gpu above one", RES + ("gpu",), 1.5, ("tune.resources_per_trial.gpu=1.5", "integer")),
    ("cuda without a gpu share", ("train", "device"), "cuda", ("tune.resources_per_trial.gpu=0", "'cuda'")),
    ("unknown mlflow key", ("mlflow", "uri"), "file:x", ("mlflow.uri", "tracking_uri")),
    ("empty experiment", ("mlflow", "experiment"), "", ("mlflow.experiment=''",)),
]


@pytest.mark.parametrize(("keys", "value", "expected"), [c[1:] for c in BAD_CASES],
                         ids=[c[0] for c in BAD_CASES])
def test_invalid_space_names_key_and_value(tmp_path: Path, keys: tuple[str, ...], value: Any,
                                           expected: tuple[str, ...]) -> None:
    path = write_space(tmp_path, with_change(keys, value))
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_base_space_is_valid(tmp_path: Path) -> None:
    """The table above proves something only if its unbroken base loads."""
    spec = load_space(write_space(tmp_path, BASE))
    assert [p.path for p in spec.search] == list(BASE["search"])
    assert spec.tune.scheduler.max_t == 4  # defaults to train.epochs
    assert spec.tune.metric == "val_loss" and spec.tune.mode == "min"
    assert spec.tune.max_failures == 2 and spec.tune.keep_checkpoints == 1 and spec.tune.keep_top_trials == 3
    assert spec.mlflow.tracking_uri is None
    assert isinstance(spec.run, RunConfig)
    assert spec.text == (tmp_path / "space.yaml").read_text(encoding="utf-8")


def test_asha_counts_evaluations_inside_an_epoch(tmp_path: Path) -> None:
    # Issue 22: a 1-epoch study with 16 evaluations per epoch has rungs at 1, 2, 4, 8, 16 (factor 2).
    raw = with_change(("train",), {**BASE["train"], "epochs": 1, "evals_per_epoch": 16})
    spec = load_space(write_space(tmp_path, raw))
    assert spec.tune.scheduler.max_t == 16 and spec.tune.scheduler.rungs == (1, 2, 4, 8, 16)
    two = load_space(write_space(tmp_path, with_change(("train",), {**BASE["train"], "epochs": 2,
                                                                     "evals_per_epoch": 8})))
    assert two.tune.scheduler.max_t == 16
    raw["tune"]["scheduler"] = {**raw["tune"]["scheduler"], "max_t": 1}  # (epochs, as before: now wrong)
    with pytest.raises(SpaceError, match=r"tune.scheduler.max_t=1 is not allowed: must equal train.epochs x "
                                         r"train.evals_per_epoch = 1 x 16 = 16"):
        load_space(write_space(tmp_path, raw))


def test_space_error_is_a_config_error() -> None:
    assert issubclass(SpaceError, ConfigError)


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {train.learning_rate: [\n", encoding="utf-8")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(bad)
    listed = write_space(tmp_path, ["model", "search"], "list.yaml")
    with pytest.raises(SpaceError, match="must be a mapping"):
        load_space(listed)


@pytest.mark.parametrize(("section", "name", "value", "make"), [
    ("data", "train_path", "conversations.jsonl", None),
    ("data", "val_path", "val.jsonl", None),
    ("model", "init_from", "weights/pretrain.pth", None),
    ("data", "tokenizer", "tok", None),
    ("data", "tokenizer", "tok_file", "file"),  # a file where a folder is needed
])
def test_missing_files_name_the_resolved_path(tmp_path: Path, section: str, name: str, value: str,
                                              make: str | None) -> None:
    if make == "file":
        (tmp_path / value).write_text("not a folder", encoding="utf-8")
    path = write_space(tmp_path, with_change((section, name), value))
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert f"{section}.{name}={value!r}" in message
    assert str(tmp_path / value) in message


def test_relative_paths_resolve_against_the_space_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n", encoding="utf-8")
    (tmp_path / "tok").mkdir()
    raw = with_change(("data", "train_path"), "data/train.jsonl")
    raw["data"]["tokenizer"] = "tok"
    path = write_space(tmp_path, raw)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_space(path)
    assert spec.run.data.train_path == str(tmp_path / "data" / "train.jsonl")
    assert spec.run.data.tokenizer == str(tmp_path / "tok")


def test_yaml_11_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    text = yaml.safe_dump(BASE, sort_keys=False)
    # PyYAML reads 1e-4 (no dot) as a string; users write it that way.
    text = text.replace("low: 0.0001", "low: 1e-4")
    assert "low: 1e-4" in text
    path.write_text(text, encoding="utf-8")
    (param,) = [p for p in load_space(path).search if p.path == "train.learning_rate"]
    assert param.low == pytest.approx(1e-4)


def test_searching_a_fixed_field_is_allowed(tmp_path: Path) -> None:
    raw = with_change(("train", "learning_rate"), 0.5)
    spec = load_space(write_space(tmp_path, raw))
    assert spec.run.train.learning_rate == 0.5
    assert "train.learning_rate" in {p.path for p in spec.search}


def test_fields_searched_together_are_checked_together(tmp_path: Path) -> None:
    # num_attention_heads 3 is invalid with the fixed num_key_value_heads 2, but kv heads are searched
    # too and always 3: every combination a trial can get is valid, so nothing may be blamed.
    raw = copy.deepcopy(BASE)
    raw["model"]["hidden_size"] = 96
    raw["search"]["model.num_attention_heads"] = {"type": "categorical", "choices": [3, 6]}
    raw["search"]["model.num_key_value_heads"] = {"type": "categorical", "choices": [3]}
    spec = load_space(write_space(tmp_path, raw))
    cfg = spec.run.with_overrides({"model.num_attention_heads": 6, "model.num_key_value_heads": 3})
    assert (cfg.model.num_attention_heads, cfg.model.num_key_value_heads) == (6, 3)

    # hidden 64 is fine with 4 heads and 6 heads is fine with hidden 96, but 64/6 is not a head size.
    raw = copy.deepcopy(BASE)
    raw["search"]["model.hidden_size"] = {"type": "categorical", "choices": [64, 96]}
    raw["search"]["model.num_attention_heads"] = {"type": "categorical", "choices": [4, 6]}
    with pytest.raises(SpaceError) as info:
        load_space(write_space(tmp_path, raw, "combo.yaml"))
    message = str(info.value)
    assert "combination" in message
    assert "search.model.hidden_size=64" in message and "search.model.num_attention_heads=6" in message


# ---------------------------------------------------------------------------------------------------
# Bundled spaces and name resolution.


def test_bundled_spaces_are_shipped() -> None:
    assert {"sft.yaml", "smoke.yaml", "minimind2_sft.yaml"} <= set(bundled_spaces())


@pytest.mark.parametrize("name", ["sft.yaml", "smoke.yaml"])
def test_bundled_space_loads(name: str) -> None:
    spec = load_space(name)
    assert spec.source == BUNDLED / name
    assert spec.run.data.train_path is None and spec.run.data.tokenizer is None
    assert spec.run.model.hidden_size <= 128 and spec.run.model.num_hidden_layers <= 4  # sized for a laptop CPU
    assert spec.tune.resources_per_trial.gpu == 0
    assert spec.search and spec.tune.scheduler.type == "asha"
    assert spec.tune.scheduler.max_t == spec.run.train.epochs * spec.run.train.evals_per_epoch  # (in evaluations)


def test_smoke_space_is_tiny() -> None:
    spec = load_space("smoke")
    assert spec.tune.num_samples == 2 and spec.tune.max_concurrent_trials == 2
    assert spec.run.train.epochs == 2 and spec.run.train.max_steps_per_epoch > 0
    assert spec.run.data.max_seq_len <= 64


def test_minimind2_space_names_the_missing_file() -> None:
    with pytest.raises(SpaceError) as info:
        load_space("minimind2_sft.yaml")
    message = str(info.value)
    assert "model.init_from='pretrain_512.pth'" in message
    assert str(BUNDLED / "pretrain_512.pth") in message
    assert "does not exist" in message


def test_minimind2_space_is_valid_once_its_files_exist(tmp_path: Path) -> None:
    space = tmp_path / "minimind2_sft.yaml"
    shutil.copy(BUNDLED / "minimind2_sft.yaml", space)
    with pytest.raises(SpaceError, match=r"model\.init_from"):
        load_space(space)
    (tmp_path / "pretrain_512.pth").write_bytes(b"")
    with pytest.raises(SpaceError, match=r"data\.train_path='sft_mini_512\.jsonl'"):
        load_space(space)
    (tmp_path / "sft_mini_512.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(SpaceError, match=r"data\.tokenizer"):
        load_space(space)
    (tmp_path / "minimind2_tokenizer").mkdir()
    spec = load_space(space)
    assert spec.run.model.hidden_size == 512 and spec.run.model.num_hidden_layers == 8
    assert spec.run.model.init_from == str(tmp_path / "pretrain_512.pth")
    assert spec.tune.resources_per_trial.gpu == 0.25
    # Issue 22: upstream's budget (a full pass, lr 1e-5 inside the searched range), rungs inside the epoch.
    (lr,) = [p for p in spec.search if p.path == "train.learning_rate"]
    assert spec.run.train.epochs == 1 and not spec.run.train.max_steps_per_epoch
    assert lr.low <= spec.run.train.learning_rate == 1e-5 <= lr.high
    assert [r / spec.run.train.evals_per_epoch for r in spec.tune.scheduler.rungs if r < spec.tune.scheduler.max_t] \
        == [0.125, 0.25, 0.5]
    # A checkpoint folder stands for its model.pth (a study prints the file; either pastes here).
    (tmp_path / "pretrain_512.pth").unlink()
    (tmp_path / "pretrain_512.pth").mkdir()
    with pytest.raises(SpaceError, match=r"pretrain_512\.pth/model\.pth does not exist"):
        load_space(space)
    (tmp_path / "pretrain_512.pth" / "model.pth").write_bytes(b"")
    assert load_space(space).run.model.init_from == str(tmp_path / "pretrain_512.pth" / "model.pth")


@pytest.mark.parametrize("given", ["sft.yaml", "sft", "search_spaces/sft.yaml"])
def test_bundled_name_resolves_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               given: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_space_path(given) == BUNDLED / "sft.yaml"
    assert load_space(given).source == BUNDLED / "sft.yaml"


def test_existing_file_wins_over_bundled_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_space(tmp_path, BASE, "sft.yaml")
    monkeypatch.chdir(tmp_path)
    assert resolve_space_path("sft.yaml") == tmp_path / "sft.yaml"


def test_unknown_space_lists_bundled_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for given in ("nope", "some/dir/nope.yaml"):
        with pytest.raises(SpaceError) as info:
            resolve_space_path(given)
        assert repr(given) in str(info.value)
        assert "sft.yaml" in str(info.value) and "smoke.yaml" in str(info.value)
    with pytest.raises(SpaceError, match="not a file"):
        resolve_space_path(str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# The hand-over to Optuna.


def stepped_spec(tmp_path: Path) -> StudySpec:
    raw = copy.deepcopy(BASE)
    raw["search"]["train.batch_size"] = {"type": "int", "low": 4, "high": 64, "log": True}
    raw["search"]["train.eval_batch_size"] = {"type": "int", "low": 8, "high": 12}
    raw["search"]["train.min_lr_ratio"] = {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1}
    raw["search"]["train.weight_decay"] = {"type": "int", "low": 0, "high": 1}  # int values on a float field
    return load_space(write_space(tmp_path, raw))


def test_optuna_distributions(tmp_path: Path) -> None:
    dists = optuna_distributions(stepped_spec(tmp_path))
    D = optuna.distributions
    assert dists["train.learning_rate"] == D.FloatDistribution(1e-4, 1e-2, log=True)
    assert dists["train.accumulation_steps"] == D.CategoricalDistribution([1, 2, 4])
    assert dists["train.grad_clip"] == D.FloatDistribution(0.1, 2.0)
    assert dists["train.warmup_steps"] == D.IntDistribution(0, 40, step=10)
    assert dists["train.batch_size"] == D.IntDistribution(4, 64, log=True)
    assert dists["train.min_lr_ratio"] == D.FloatDistribution(0.0, 0.5, step=0.1)
    assert dists["train.weight_decay"] == D.IntDistribution(0, 1)


def test_optuna_samples_stay_in_the_space_and_on_its_grid(tmp_path: Path) -> None:
    """The one search backend (Optuna: TPE, or random) draws only values the space allows."""
    spec = stepped_spec(tmp_path)
    dists = optuna_distributions(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for param in spec.search:
        drawn = {study.ask({param.path: dists[param.path]}).params[param.path] for _ in range(400)}
        grid = param.grid()
        if grid is None:
            assert all(param.low <= v <= param.high for v in drawn), (param.path, drawn)
        else:
            on_grid = {round(v, 9) for v in grid}
            values = {round(v, 9) for v in drawn}
            assert values <= on_grid, (param.path, sorted(values), grid)
            if len(grid) <= 12:  # 400 draws reach every point of a small grid, endpoints included
                assert values == on_grid, (param.path, sorted(values), grid)
        for value in drawn:
            spec.run.with_overrides({param.path: value})


# ---------------------------------------------------------------------------------------------------
# Applying a trial's values (RunConfig.with_overrides; its own rules are tested in test_config.py).


def test_a_trials_params_round_trip(tmp_path: Path) -> None:
    spec = load_space(write_space(tmp_path, BASE))
    params = {"train.learning_rate": 0.003, "train.accumulation_steps": np.int64(4),
              "train.grad_clip": np.float64(0.5), "train.warmup_steps": 20}
    cfg = spec.run.with_overrides(params)
    assert (cfg.train.learning_rate, cfg.train.accumulation_steps, cfg.train.grad_clip,
            cfg.train.warmup_steps) == (0.003, 4, 0.5, 20)
    assert type(cfg.train.accumulation_steps) is int
    assert cfg.model == spec.run.model and cfg.data == spec.run.data
    assert cfg.train.batch_size == spec.run.train.batch_size
    back = cfg.with_overrides({p.path: getattr(spec.run.train, p.path.split(".")[1]) for p in spec.search})
    assert back == spec.run


# ---------------------------------------------------------------------------------------------------
# Scheduler rungs and the dry-run description.


@pytest.mark.parametrize(("grace", "rf", "max_t"), [(1, 2, 4), (1, 2, 8), (1, 3, 10), (2, 2, 9), (1, 4, 4),
                                                    (3, 2, 3)])
def test_rungs_are_where_optunas_asha_decides(grace: int, rf: int, max_t: int) -> None:
    """SchedulerSpec.rungs (shown by --dry-run) are the epochs at which the pruner compares trials."""
    from tune.searcher import make_pruner

    pruner = make_pruner("asha", grace, rf)
    study = optuna.create_study(pruner=pruner)
    trial = study.ask()
    decided = []
    for step in range(1, max_t):  # the last epoch ends a trial anyway: never a decision
        trial.report(1.0, step)
        before = len(study.trials[0].system_attrs)
        pruner.prune(study, study.trials[0])
        if len(study.trials[0].system_attrs) > before:
            decided.append(step)
    ours = SchedulerSpec(type="asha", grace_period=grace, reduction_factor=rf, max_t=max_t).rungs
    assert [r for r in ours if r < max_t] == decided
    assert SchedulerSpec(type="none", max_t=max_t).rungs == ()


def test_search_param_validates_when_built_directly() -> None:
    with pytest.raises(SpaceError, match=r"search\.train\.grad_clip\.low=2\.0"):
        SearchParam(path="train.grad_clip", type="float", low=2.0, high=1.0)
    with pytest.raises(SpaceError, match=r"search\.train\.batch_size\.step=0"):
        SearchParam(path="train.batch_size", type="int", low=8, high=32, step=0)
    assert SearchParam(path="train.batch_size", type="int", low=8, high=32, step=8).grid() == (8, 16, 24, 32)
    grid = SearchParam(path="train.min_lr_ratio", type="float", low=0.0, high=0.3, step=0.1).grid()
    assert grid is not None and grid == pytest.approx((0.0, 0.1, 0.2, 0.3))
    assert SearchParam(path="train.learning_rate", type="float", low=1e-4, high=1e-2, log=True).grid() is None


def test_finalists_and_warm_start_settings(tmp_path: Path) -> None:
    raw = with_change(("tune", "finalists"), {"top_k": 2, "seeds": 1})
    raw["tune"]["warm_start"] = "../scout"
    (tmp_path / "spaces").mkdir()
    spec = load_space(write_space(tmp_path / "spaces", raw))
    assert (spec.tune.finalists.top_k, spec.tune.finalists.seeds) == (2, 1)
    assert spec.tune.warm_start == str((tmp_path / "scout").resolve())  # relative to the space file
    # Finalists vary train.seed themselves: a searched train.seed would make them repeat a trial.
    raw["search"]["train.seed"] = {"type": "categorical", "choices": [1, 3]}
    with pytest.raises(SpaceError, match="tune.finalists.seeds=1 is not allowed with search.train.seed"):
        load_space(write_space(tmp_path, raw))
    with pytest.raises(SpaceError, match="tune.finalists.seeds"):
        load_space(write_space(tmp_path, with_change(("tune", "finalists"), {"top_k": 2, "seeds": -1})))
