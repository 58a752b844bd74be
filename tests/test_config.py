"""Run configuration: YAML <-> frozen config types, error messages, overrides (minimind_train.config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from minimind_train.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_run_config,
    run_config_from_dict,
    run_config_to_dict,
)


@pytest.mark.parametrize(("raw", "expected"), [
    ({"train": {"epochs": 0}}, "train.epochs=0 is not allowed: expected an integer > 0"),
    ({"train": {"evals_per_epoch": 0}}, "train.evals_per_epoch=0 is not allowed: expected an integer >= 1"),
    ({"train": {"evals_per_epoch": 2.5}}, "train.evals_per_epoch=2.5 is not allowed: expected an integer"),
    ({"train": {"batch_size": "16"}}, "train.batch_size='16' is not allowed: expected an integer > 0"),
    ({"train": {"batch_size": 2.0}}, "train.batch_size=2.0 is not allowed: expected an integer"),
    ({"train": {"min_lr_ratio": 1.5}}, "train.min_lr_ratio=1.5 is not allowed: expected a finite number >= 0 and <= 1"),
    ({"train": {"grad_clip": float("nan")}}, "train.grad_clip=nan is not allowed: expected a finite number"),
    ({"train": {"dtype": "fp8"}}, "train.dtype='fp8' is not allowed: expected one of ['auto', 'float32', "),
    ({"data": {"group_by_length": 1}}, "data.group_by_length=1 is not allowed: expected a boolean (true/false)"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction=1.0 is not allowed: expected a finite number > 0 and < 1"),
    ({"model": {"hidden_size": 0}}, "model.hidden_size=0 is not allowed: expected an integer > 0 or null"),
    ({"model": {"init_from": 3}}, "model.init_from=3 is not allowed: expected a string or null"),
    ({"model": {"hidden": 64}}, ("model.hidden is not a known key (value 64) (did you mean hidden_size?); "
                                "allowed keys: family, hidden_size,")),
    ({"optimizer": {"lr": 1}}, "optimizer is not a known key (value {'lr': 1}); allowed keys: model, data, train"),
    ({"data": [1]}, "data=[1] is not allowed: expected a mapping with keys train_path, val_path,"),
    ({"model": {"num_attention_heads": 3}}, "model.hidden_size=512 must be divisible by model.num_attention_heads=3"),
    ({"train": {"divergence_loss_factor": 0.5}}, "train.divergence_loss_factor=0.5 must be 0 (off) or > 1"),
])
def test_a_bad_key_or_value_is_named_with_what_is_allowed(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        run_config_from_dict(raw)
    assert expected in str(info.value)


def test_building_a_section_directly_raises_config_error_too() -> None:
    with pytest.raises(ConfigError, match=r"^train\.learning_rate=0\.0 is not allowed: expected a finite number > 0$"):
        TrainConfig(learning_rate=0.0)
    with pytest.raises(ConfigError, match=r"data\.val_fraction=0\.0"):
        dataclasses.replace(DataConfig(), val_fraction=0.0)  # replace validates as construction does
    with pytest.raises(ConfigError, match=r"model\.torch_dtype is not a known key"):
        ModelConfig(torch_dtype="float16")  # type: ignore[call-arg]


def test_yaml_spellings_of_numbers_and_empty_sections() -> None:
    # PyYAML reads 1e-4 (no dot) as a string; an int is a valid float; an empty section takes defaults.
    cfg = run_config_from_dict(yaml.safe_load("model:\ntrain: {learning_rate: 1e-4, weight_decay: 1}\n"))
    assert cfg.train.learning_rate == 1e-4 and cfg.train.weight_decay == 1.0
    assert isinstance(cfg.train.weight_decay, float)
    assert cfg.model == ModelConfig() and cfg.data == DataConfig()


def test_configs_are_frozen_and_round_trip_through_dicts() -> None:
    cfg = RunConfig(model=ModelConfig(family="minimind3", hidden_size=64, num_attention_heads=4),
                    train=TrainConfig(epochs=2, dtype="float32"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 5  # type: ignore[misc]
    raw = run_config_to_dict(cfg)
    assert raw["model"]["num_key_value_heads"] == 4  # MiniMind-3's default, resolved when built
    assert run_config_from_dict(yaml.safe_load(yaml.safe_dump(raw))) == cfg


def test_load_run_config_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("data: {train_path: d/train.jsonl, tokenizer: ~/tok}\n", encoding="utf-8")
    cfg = load_run_config(tmp_path / "run.yaml")
    assert cfg.data.train_path == str(tmp_path / "d" / "train.jsonl")
    assert cfg.data.tokenizer == str(Path("~/tok").expanduser())
    assert cfg.data.val_path is None and cfg.model.init_from is None


def test_init_from_a_checkpoint_folder_is_its_model_pth(tmp_path: Path) -> None:
    # What a study prints (.../model.pth) and its folder name the same weights.
    (tmp_path / "epoch_0004").mkdir()
    for given in ("epoch_0004", "epoch_0004/model.pth", "other.pth"):
        (tmp_path / "run.yaml").write_text(f"model: {{init_from: {given}}}\n", encoding="utf-8")
        expected = tmp_path / (given if given.endswith(".pth") else f"{given}/model.pth")
        assert load_run_config(tmp_path / "run.yaml").model.init_from == str(expected)


def test_with_overrides_sets_dotted_paths_and_converts_numpy() -> None:
    cfg = RunConfig().with_overrides({"train.accumulation_steps": np.int64(4), "train.grad_clip": np.float64(0.5),
                                      "model.use_moe": True})
    assert (cfg.train.accumulation_steps, cfg.train.grad_clip, cfg.model.use_moe) == (4, 0.5, True)
    assert type(cfg.train.accumulation_steps) is int and type(cfg.train.grad_clip) is float
    assert cfg.data == DataConfig() and cfg.train.batch_size == TrainConfig().batch_size


def test_with_overrides_changes_related_fields_together() -> None:
    # One at a time, hidden 96 with the default 8 heads (head size 12) is valid but 6 heads first
    # with hidden 512 is not; together they must be accepted.
    cfg = RunConfig().with_overrides({"model.num_attention_heads": 6, "model.hidden_size": 96,
                                      "model.num_key_value_heads": 3})
    assert (cfg.model.hidden_size, cfg.model.num_attention_heads) == (96, 6)


def test_with_overrides_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr is not a config field.*train\.learning_rate"):
        RunConfig().with_overrides({"train.lr": 0.1})
    with pytest.raises(ConfigError, match=r"train\.learning_rat is not a config field \(did you mean learning_rate"):
        RunConfig().with_overrides({"train.learning_rat": 0.1})
    with pytest.raises(ConfigError, match=r"train\.learning_rate=-1\.0"):
        RunConfig().with_overrides({"train.learning_rate": -1.0})
    with pytest.raises(ConfigError, match=r"train\.batch_size=2\.5"):
        RunConfig().with_overrides({"train.batch_size": 2.5})
