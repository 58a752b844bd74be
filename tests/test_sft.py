"""The ``python -m minimind_train.sft`` CLI: a run, its checkpoints, resume, and the errors it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from minimind_train import sft
from minimind_train.checkpoint import MODEL_FILE, STATE_FILE, TrainState, read_meta
from minimind_train.data import DEMO_DATA_PATH
from minimind_train.sft import main, resolve_config_path


def _config(tmp_path: Path, epochs: int) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(DEMO_DATA_PATH.read_text(encoding="utf-8").splitlines(keepends=True)[:48]),
                    encoding="utf-8")
    path = tmp_path / f"run{epochs}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
        "data": {"train_path": str(data), "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.25,
                 "max_seq_len": 64},
        "train": {"epochs": epochs, "batch_size": 8, "max_steps_per_epoch": 2, "device": "cpu",
                  "dtype": "float32"},
    }), encoding="utf-8")
    return path


def test_runs_resumes_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["--config", str(_config(tmp_path, 2)), "--output", str(out), "--quiet"]) == 0
    assert {p.name for p in (out / "last").iterdir()} == {MODEL_FILE, STATE_FILE, "meta.json"}
    # best/ holds the fp16 weights of the best epoch, without resume state.
    assert {p.name for p in (out / "best").iterdir()} == {MODEL_FILE, "meta.json"}
    assert read_meta(out / "last")["epoch"] == 2 and "tokenizer_fingerprint" in read_meta(out / "last")
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and printed.splitlines()[1].startswith("before training: val_loss ")

    assert main(["--config", str(_config(tmp_path, 2)), "--output", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # A best epoch no later one can beat: resuming must keep it.
    meta = read_meta(out / "best")
    meta["metrics"]["val_loss"] = 0.0
    (out / "best" / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    assert main(["--config", str(_config(tmp_path, 3)), "--output", str(out), "--resume", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "after epoch 2" in printed and "epoch 3/3" in printed and "epoch 2/3" not in printed
    assert read_meta(out / "last")["epoch"] == 3
    assert read_meta(out / "best")["metrics"]["val_loss"] == 0.0


def test_no_step_bar_in_a_log_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --quiet and without a terminal (captured, as in a pipe): epoch lines, no tqdm redraws."""
    assert main(["--config", str(_config(tmp_path, 1)), "--output", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.out and "\r" not in captured.err + captured.out and "step/s" not in captured.err


def test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hidden_sizes: 64}\n", encoding="utf-8")
    assert main(["--config", str(bad), "--quiet"]) == 2
    assert "hidden_sizes" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml"), "--quiet"]) == 2
    assert "no bundled example of that name (bundled: sft_demo.yaml)" in capsys.readouterr().err


def test_bundled_example_resolves_by_name() -> None:
    assert resolve_config_path("sft_demo") == resolve_config_path("sft_demo.yaml")
    assert resolve_config_path("sft_demo").is_file()


def test_a_diverged_run_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, 2)
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg["train"].update(learning_rate=300.0, grad_clip=0.0, max_steps_per_epoch=0)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["--config", str(path), "--output", str(tmp_path / "out"), "--quiet"]) == 3
    assert "exploded" in capsys.readouterr().err


def test_evaluations_inside_an_epoch_print_and_resume_mid_epoch(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = _config(tmp_path, 2)
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg["train"].update(evals_per_epoch=2)  # 2 steps per epoch: an evaluation after each
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    out = tmp_path / "out"
    real_save = sft.save_checkpoint
    saved: list[int] = []

    def save_then_stop(directory: Path, state: TrainState, *args: object, **kwargs: object) -> Path:
        folder = real_save(directory, state, *args, **kwargs)
        saved.extend([state.step] if directory.name == "last" else [])
        if saved == [1, 2, 3]:
            raise KeyboardInterrupt  # the process dies after the checkpoint of step 3, mid-epoch 2
        return folder

    monkeypatch.setattr(sft, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--config", str(path), "--output", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert "epoch 1/2 step 1/2  train_loss" in printed and "epoch 1/2  train_loss" in printed
    assert (read_meta(out / "last")["epoch"], read_meta(out / "last")["step"]) == (1, 3)
    monkeypatch.setattr(sft, "save_checkpoint", real_save)
    assert main(["--config", str(path), "--output", str(out), "--resume", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "after epoch 1, optimizer step 3" in printed
    assert "epoch 2/2  train_loss" in printed and "step 1/2" not in printed
    assert (read_meta(out / "last")["epoch"], read_meta(out / "last")["step"]) == (2, 4)
