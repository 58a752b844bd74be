"""Fractional-GPU trials, wiring checked on CPU: the memory cap, a clear OOM error, memory released."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from minimind_train.config import ModelConfig, RunConfig, TrainConfig, run_config_to_dict
from tune import searcher
from tune.objective import Objective
from tune.searcher import CHECKPOINT_KEY

BASE = run_config_to_dict(RunConfig(
    model=ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    train=TrainConfig(batch_size=24, epochs=1, device="cpu", dtype="float32")))


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """A pretend CUDA device and Ray session around ``train_trial``; records what the trial did."""
    calls: dict = {"fraction": [], "empty_cache": 0, "reports": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, device=None: calls["fraction"].append(f))
    monkeypatch.setattr(torch.cuda, "empty_cache",
                        lambda: calls.__setitem__("empty_cache", calls["empty_cache"] + 1))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=80 * 2**30))
    session = types.SimpleNamespace(
        get_context=lambda: types.SimpleNamespace(get_trial_dir=lambda: str(tmp_path / "trial")),
        get_checkpoint=lambda: None,
        report=lambda metrics, checkpoint=None: calls["reports"].append(metrics),
        Checkpoint=types.SimpleNamespace(from_directory=lambda path: path),
    )
    monkeypatch.setattr(searcher, "tune", session)
    monkeypatch.setattr(searcher, "prepare_data", lambda cfg, show_progress=False: types.SimpleNamespace(
        vocab_size=128, stats_dict=dict))
    monkeypatch.setattr(searcher, "current_node", dict)
    monkeypatch.setattr(searcher, "save_checkpoint", lambda folder, *a, **k: folder)
    monkeypatch.setattr(searcher, "write_checkpoint", lambda save, trial_dir, index: f"{trial_dir}/epoch_{index:04d}")
    calls["kwargs"] = {"base": BASE, "objective": Objective("val_loss"), "runs_dir": str(tmp_path / "runs"),
                       "run_name": "run-1"}
    return calls


def test_oom_within_share_fails_alone_with_a_clear_message(fake_cuda: dict, monkeypatch) -> None:
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB (GPU 0)")
        yield  # a generator, like train_epochs

    monkeypatch.setattr(searcher, "train_epochs", oom)
    with pytest.raises(searcher.TrialOutOfMemory) as info:
        searcher.train_trial({"study_trial": 0}, **fake_cuda["kwargs"], gpu_share=0.25)
    message = str(info.value)
    assert "share of 0.25 of the GPU (20.0 of 80.0 GiB)" in message
    assert "train.batch_size=24" in message and "smaller train.batch_size" in message
    assert "Tried to allocate 3.00 GiB" in message
    # Raised outside the except block: no chained CUDA error keeps the trial's tensors alive.
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert fake_cuda["fraction"] == [0.25]
    assert fake_cuda["empty_cache"] == 2  # at the start (a reused actor's leftovers) and after the OOM


def test_memory_released_after_a_finished_trial(fake_cuda: dict, monkeypatch) -> None:
    def one_epoch(*args, **kwargs):
        yield types.SimpleNamespace(epoch=1, metrics={"val_loss": 1.0}, state=None, step_in_epoch=3, steps_in_epoch=3)

    monkeypatch.setattr(searcher, "train_epochs", one_epoch)
    searcher.train_trial({"study_trial": 0}, **fake_cuda["kwargs"], gpu_share=0.5)
    # (each report names the checkpoint it was saved with: the record's checkpoint index)
    assert [{k: v for k, v in r.items() if k != CHECKPOINT_KEY} for r in fake_cuda["reports"]] == \
        [{"val_loss": 1.0, "epoch": 1, "evaluation": 1}]
    assert all(r[CHECKPOINT_KEY] for r in fake_cuda["reports"])
    assert fake_cuda["fraction"] == [0.5]
    assert fake_cuda["empty_cache"] == 2  # at the start and at the end


def test_whole_gpu_is_not_capped(fake_cuda: dict, monkeypatch) -> None:
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        yield

    monkeypatch.setattr(searcher, "train_epochs", oom)
    with pytest.raises(searcher.TrialOutOfMemory, match=r"the whole GPU \(80.0 GiB\)"):
        searcher.train_trial({"study_trial": 0}, **fake_cuda["kwargs"], gpu_share=1.0)
    assert fake_cuda["fraction"] == []
