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

    from tune.record import StudyRecord

    text = (BENCH / "gpu_check.sh").read_text()
    summary = text.split("<<'PYEOF'\n", 1)[1].split("\nPYEOF", 1)[0]
    spec = {"train": {"epochs": 1}, "tune": {"metric": "val_loss", "mode": "min", "num_samples": 1}}
    record = StudyRecord.create(tmp_path / "gpu", "gpu", spec, "train: {}\n", {})
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


# ---------------------------------------------------------------------------------------------------
# search_efficiency.py: the search loop and the comparison on a toy objective, then a tiny real run.


def _toy_objective(params):
    """Deterministic: best at learning rate 3e-3, better every epoch."""
    import math

    gap = (math.log10(params["train.learning_rate"]) - math.log10(3e-3)) ** 2
    for epoch in range(1, 100):
        yield 1.0 + gap + 0.5 / epoch


def test_search_efficiency_loop_follows_the_study_rules() -> None:
    bench = _load("search_efficiency")
    from tune.space import load_space, optuna_distributions

    distributions = optuna_distributions(load_space(REPO / "search_spaces" / "sft.yaml"))
    budget = bench.Budget(num_samples=12, epochs=4, grace_period=1, reduction_factor=2)
    methods = {m.name: m for m in bench.METHODS}
    random_run, asha_run, tpe_run = (bench.run_search(methods[name], 3, budget, distributions, _toy_objective)
                                     for name in ("random", "random+asha", "tpe+asha"))
    assert [t.state for t in random_run.trials] == ["completed"] * 12
    assert random_run.trial_epochs == 48 and all(len(t.values) == 4 for t in random_run.trials)
    states = {t.state for t in tpe_run.trials}
    assert "pruned" in states and states <= {"completed", "pruned"}
    for t in tpe_run.trials:
        assert t.epochs == len(t.values)
        # never pruned at the last epoch; a completed trial's value is its best epoch (the study's rule)
        assert (t.state == "pruned" and 1 <= t.epochs < 4) or (t.state == "completed" and t.epochs == 4)
        assert t.value("min") == (min(t.values) if t.state == "completed" else None)
    assert tpe_run.trial_epochs == sum(t.epochs for t in tpe_run.trials) < random_run.trial_epochs
    # The random sampler draws the same configs with or without ASHA; pruned ones stop early.
    assert [t.params for t in asha_run.trials] == [t.params for t in random_run.trials]
    assert any(t.state == "pruned" for t in asha_run.trials) and asha_run.trial_epochs < 48
    # TPE's start-up trials are the random sampler's first draws for the same seed (what the cache reuses).
    startup = min(4, 12 // 3)
    assert [t.params for t in tpe_run.trials[:startup]] == [t.params for t in random_run.trials[:startup]]
    assert tpe_run.trials[startup].params != random_run.trials[startup].params
    assert bench.startup_trials([random_run, asha_run, tpe_run]) == {3: startup}
    # Rung fidelity over random's trials: the toy's ranking never changes with the epoch.
    assert bench.rung_fidelity([random_run, tpe_run], budget) == {1: (12, pytest.approx(1.0)),
                                                                  2: (12, pytest.approx(1.0))}


def test_search_efficiency_diverged_trial_fails_and_counts_its_epoch() -> None:
    bench = _load("search_efficiency")
    import optuna

    def objective(params):
        yield 2.0
        yield float("nan")

    budget = bench.Budget(num_samples=2, epochs=4)
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    run = bench.run_search(bench.METHODS[0], 0, budget, space, objective)
    assert [(t.state, t.values, t.epochs) for t in run.trials] == [("diverged", (2.0,), 2)] * 2
    assert run.best is None and run.trial_epochs == 4


def _run(bench, method, seed, trials):
    return bench.SearchRun(method, seed, "min", tuple(bench.TrialOutcome({}, v, s, e) for s, v, e in trials))


def test_search_efficiency_comparison_counts_trial_epochs_to_the_target() -> None:
    bench = _load("search_efficiency")
    done = "completed"
    runs = [
        # random: bests 3.0, 2.0, 1.0 -> median 2.0 -> target 2.02; 12 trial-epochs each
        _run(bench, "random", 0, [(done, (4.0, 3.5, 3.2, 3.0), 4)] * 3),
        _run(bench, "random", 1, [(done, (5.0, 4.0, 3.0, 2.5), 4), (done, (3.0, 2.0, 2.2, 2.1), 4),
                                  (done, (9.0,) * 4, 4)]),
        _run(bench, "random", 2, [(done, (1.0,) * 4, 4)] * 3),
        # a pruned or diverged trial's low values do not count; reached at 1 + 4 + 4 = 9
        _run(bench, "tpe+asha", 0, [("pruned", (0.5,), 1), (done, (2.5,) * 4, 4), (done, (3.0, 2.01, 2.5, 2.6), 4)]),
        _run(bench, "tpe+asha", 1, [("diverged", (0.1,), 2), ("pruned", (1.0, 1.0), 2)]),  # never
        _run(bench, "tpe+asha", 2, [(done, (1.5,) * 4, 4)]),  # reached at 4
    ]
    c = bench.compare(runs, tolerance=0.01)
    assert [r.best_trial for r in runs[3:]] == [2, None, 0]
    assert c.reference == 2.0 and c.target == pytest.approx(2.02)
    rnd, tpe = c.summaries["random"], c.summaries["tpe+asha"]
    assert rnd.trial_epochs == (12, 12, 12) and rnd.best == (3.0, 2.0, 1.0) and rnd.to_target == (None, 8, 4)
    assert rnd.median_to_target == 8
    assert tpe.trial_epochs == (9, 4, 4) and tpe.best == (2.01, None, 1.5) and tpe.to_target == (9, None, 4)
    assert tpe.median_to_target == 9 and c.ratio == pytest.approx(9 / 12) and not c.goal_met
    text = bench.format_comparison("toy", c, "val_loss")
    assert "0.75 x random's 12" in text and "missed" in text
    # Reached at 4 of 12 trial-epochs in two seeds: exactly 1/3, the goal.
    met = runs[:3] + [_run(bench, "tpe+asha", s, [(done, (2.0,) * 4, 4)]) for s in range(2)] + [runs[4]]
    assert bench.compare(met).ratio == pytest.approx(1 / 3) and bench.compare(met).goal_met
    # Most seeds never reach it: no ratio, goal missed.
    never = runs[:3] + [runs[4], _run(bench, "tpe+asha", 3, [(done, (2.5,) * 4, 4)]), runs[5]]
    assert bench.compare(never).summaries["tpe+asha"].median_to_target is None
    assert bench.compare(never).ratio is None and "did not reach" in bench.format_comparison("t", bench.compare(never), "v")
    with pytest.raises(ValueError, match="random"):
        bench.compare(runs[3:])


def test_search_efficiency_runs_and_reuses_cached_curves(tmp_path: Path, capsys) -> None:
    """The whole benchmark on a tiny slice of the demo data; a second run trains nothing and agrees."""
    import torch

    bench = _load("search_efficiency")
    threads = torch.get_num_threads()
    argv = ["--space", str(REPO / "search_spaces" / "smoke.yaml"), "--datasets", "demo", "--seeds", "2",
            "--num-samples", "3", "--demo-train", "24", "--demo-val", "8", "--threads", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out.json")]
    try:
        first = bench.main(argv)
        saved = json.loads((tmp_path / "out.json").read_text())
        again = bench.main(argv)["datasets"][0]
    finally:
        torch.set_num_threads(threads)  # a trial sets its own; later tests expect the default
    assert saved == json.loads(json.dumps(first))
    (ds,) = first["datasets"]
    assert ds["dataset"] == "demo" and ds["train_samples"] == 24 and ds["val_samples"] == 8
    assert ds["budget"]["epochs"] == 2 and ds["budget"]["num_samples"] == 3
    names = ("random", "random+asha", "tpe+asha")
    assert [(r["method"], r["seed"]) for r in ds["runs"]] == [(m, s) for s in (0, 1) for m in names]
    assert set(ds["summaries"]) == set(names) and ds["summaries"]["random"]["trial_epochs"] == [6, 6]
    assert set(ds["rung_fidelity"]) == {"1"} and ds["rung_fidelity"]["1"]["trials"] == 6
    assert ds["startup_trials"] == {"0": 1, "1": 1}  # smoke: 3 trials -> min(4, max(1, 3 // 3))
    assert all(len(t["values"]) == t["epochs"] for r in ds["runs"] for t in r["trials"])
    # random+asha and TPE's start-up trial reuse random's curves
    assert ds["compute"]["trained_epochs"] > 0 and ds["compute"]["reused_epochs"] >= 2 * 2 + 2
    out = capsys.readouterr().out
    assert "trial-epochs to target" in out and "goal <= 1/3" in out and "rung fidelity" in out
    assert again["compute"]["trained_epochs"] == 0
    assert again["runs"] == ds["runs"] and again["summaries"] == ds["summaries"]


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
