"""The benchmark scripts run: the GPU check's syntax and its helper on CPU, the study probe's helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(f"benchmarks_{name}", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_gpu_check_reads_each_trials_checkpoints_from_the_study_record(tmp_path: Path) -> None:
    """The study summary embedded in gpu_check.sh, run on a CPU study record (it runs only on a GPU machine)."""
    import optuna
    from conftest import make_checkpoint

    from tune.study import Study

    text = (BENCH / "gpu_check.sh").read_text()
    summary = text.split("<<'PYEOF'\n", 1)[1].split("\nPYEOF", 1)[0]
    spec = {"train": {"epochs": 1}, "tune": {"metric": "val_loss", "mode": "min", "num_samples": 1}}
    record = Study.create(tmp_path / "gpu", "gpu", spec, "train: {}\n", {})
    n, _ = record.ask({"train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    record.record_epoch(n, 1, {"val_loss": 2.0, "peak_memory_mb": 12.0}, "val_loss")
    make_checkpoint(tmp_path / "gpu" / "runs" / "run-1" / f"t{n:03d}" / "epoch_0001", 1, 2.0)
    (tmp_path / "out").mkdir()
    subprocess.run([sys.executable, "-c", summary, str(tmp_path / "gpu"), str(tmp_path / "out")], check=True,
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    [row] = json.loads((tmp_path / "out" / "study_trials.json").read_text())
    assert (row["trial"], row["epochs"], row["val_loss"], row["gpus"]) == (f"t{n:03d}", [1], 2.0, ["?"])


def test_step_cost_reports_cpu_seconds_per_step_and_the_losses() -> None:
    out = subprocess.run([sys.executable, str(BENCH / "step_cost.py"), "--steps", "3", "--data",
                          str(REPO / "minimind_train" / "assets" / "demo" / "sft_demo.jsonl"), "--tokenizer",
                          str(REPO / "minimind_train" / "assets" / "tokenizer")], check=True, capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    figures = json.loads(out.splitlines()[-1])
    assert figures["steps"] == 3 and figures["cpu_s_per_step"] > 0
    assert 0 < figures["val_loss"] < 20 and 0 < figures["train_loss"] < 20  # (ln 6400 = 8.8 at the start)


def test_gpu_throughput_cpu_smoke(tmp_path: Path) -> None:
    """The GPU helper's whole path (spawned trial processes, barrier, aggregation, JSON) on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_throughput.py"), "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu_throughput.json").read_text())
    layouts = {r["layout"]: r for r in summary["layouts"]}
    assert set(layouts) == {"1x1", "2x0.5"} and all(r["ok"] for r in layouts.values())
    assert [len(r["per_process"]) for r in layouts.values()] == [1, 2]
    assert all(w["steps"] == 2 and w["tokens"] > 0 for r in layouts.values() for w in r["per_process"])
    assert summary["speedup_2x0.5_vs_1x1"] > 0


def test_longer_demo_chains_conversations(tmp_path: Path) -> None:
    gpu = _load("gpu_throughput")
    rows = [json.loads(line) for line in gpu.longer_demo(tmp_path / "d.jsonl", per_sample=3).read_text(
        encoding="utf-8").splitlines()]
    assert rows and all(sum(m["role"] == "system" for m in r["conversations"]) <= 1 for r in rows)
    assert all(r["conversations"][-1]["role"] == "assistant" for r in rows)


def test_study_probe_reads_process_memory_and_tree() -> None:
    probe = _load("study_overhead")
    mine = probe.memory_mb(os.getpid())
    assert mine is not None and 0 < mine["uss"] <= mine["rss"]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in probe.descendants(os.getpid())
        assert "time.sleep" in probe.cmdline(child.pid)
    finally:
        child.kill()
        child.wait()


def test_throughput_flop_model_counts() -> None:
    bench = _load("throughput")
    f = bench.FlopModel(body_matmul_params=10, head_params=100, hidden=4, layers=2)
    lengths = np.array([3, 5])
    # 6 x body x real tokens + 6 x head x supervised rows + 6 x hidden x layers x sum T(T+1).
    assert f.useful(lengths, supervised=4) == pytest.approx(6 * 10 * 8 + 6 * 100 * 4 + 6 * 4 * 2 * (12 + 30))


def test_data_scale_runs_and_reports_the_ratio(tmp_path: Path) -> None:
    """The scale benchmark end to end on a tiny file, two workers (the parallel path really runs)."""
    proc = subprocess.run([sys.executable, str(BENCH / "data_scale.py"), "--n", "60", "--workers", "2",
                           "--work-dir", str(tmp_path)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split())
    assert fields["workers"] == "2" and float(fields["ratio_to_naive"]) > 0
    assert "conversations/s" in proc.stdout and "peak RSS" in proc.stdout and "cache size" in proc.stdout
    cache = next((tmp_path / "cache").iterdir())
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_samples"] == 60 and meta["workers"] == 2


def test_forecast_accuracy_reads_the_forecast_and_the_first_eta_from_a_run() -> None:
    bench = _load("forecast_accuracy")
    lines = [(1.0, "inputs checked in 0.5s"),
             (9.0, "forecast: 0:03:20 for the study (search 0:02:40, finalists 0:00:35); ..."),
             (40.0, "[    20s] t000 lr=1e-3 started"),
             (70.0, "[    50s] t000 epoch 1/2 val_loss 2.2769; 2.0/24 trial-epochs, ETA 0:02:10 | done 0"),
             (90.0, "[    70s] t001 epoch 1/2 val_loss 2.5; 3.0/24 trial-epochs, ETA 0:01:00 | done 0"),
             (209.0, "(exit 0)")]
    row = bench.parse(lines)
    assert (row["forecast_s"], row["forecast_at"], row["eta_s"], row["eta_at"], row["exit_s"]) == (200, 9, 130, 70, 209)
    assert bench.seconds("1:02:03") == 3723
