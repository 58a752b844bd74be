"""A study survives its driver being killed or interrupted, and a trial survives its worker dying.

Each slow test runs ``python -m tune.run`` on tests/spaces/faults.yaml (3 short epochs) as a
subprocess in its own session, injects the fault while the study runs, then checks the study folder
and the study's MLflow sqlite (see study_driver.py for the process handling).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from study_driver import (
    SPACES,
    Driver,
    Workspace,
    live_results,
    mlflow_runs,
    persisted_checkpoints,
    persisted_trials,
    run_driver,
    stored_results,
)

SPACE = SPACES / "faults.yaml"
NAME = "faults"
EPOCHS = 3
PROGRESS = re.compile(r"done (\d+), running (\d+), stopped early (\d+), failed (\d+)")


@pytest.fixture
def ws(tmp_path: Path) -> Any:
    workspace = Workspace(tmp_path)
    yield workspace
    workspace.cleanup()


def _iterations(rows: list[dict[str, Any]]) -> list[int]:
    return [int(r["training_iteration"]) for r in rows]


def _summary(study: Path) -> dict[str, dict[str, str]]:
    with (study / "summary.csv").open() as fh:
        return {row["trial_id"]: row for row in csv.DictReader(fh)}


def _check_trials_reached_their_end(study: Path, expected: int, output: str) -> dict[str, dict[str, str]]:
    """Every trial of the summary completed or was stopped early, with a contiguous epoch record."""
    summary = _summary(study)
    assert len(summary) == expected, f"{sorted(summary)}{output}"
    results = stored_results(study)
    for tid, row in summary.items():
        assert row["status"] in ("completed", "stopped_early"), f"{tid}: {row}{output}"
        epochs = int(row["epochs"])
        assert (row["status"] == "completed") == (epochs == EPOCHS), row
        assert sorted(set(_iterations(results[tid]))) == list(range(1, epochs + 1)), (tid, results[tid])
        # (A trial ASHA stops is not told so in its last result; only a finished one reports done.)
        if row["status"] == "completed":
            assert results[tid][-1]["done"], f"trial {tid} did not end: {results[tid]}"
    return summary


def _check_configs_unique(study: Path, trial_ids: list[str]) -> None:
    configs = {tid: json.loads((study / f"trial_{tid}" / "params.json").read_text()) for tid in trial_ids}
    seen = {json.dumps(c, sort_keys=True) for c in configs.values()}
    assert len(seen) == len(configs), f"two trials got the same values: {configs}"


def _check_mlflow(study: Path, summary: dict[str, dict[str, str]], output: str) -> None:
    """One parent, FINISHED; one active child per trial with each epoch once; nothing RUNNING."""
    client, parents, children = mlflow_runs(study)
    assert [(p.info.status, p.info.lifecycle_stage) for p in parents] == [("FINISHED", "active")], output
    active = [r for r in children if r.info.lifecycle_stage == "active"]
    by_trial = {}
    for run in active:
        tid = run.data.tags["ray.trial_id"]
        assert tid not in by_trial, f"two MLflow runs for trial {tid}"
        by_trial[tid] = run
    assert sorted(by_trial) == sorted(summary), f"runs {sorted(by_trial)} vs trials {sorted(summary)}{output}"
    for tid, run in by_trial.items():
        expected = "FINISHED" if summary[tid]["status"] == "completed" else "KILLED"
        assert run.info.status == expected, (tid, run.info.status, run.data.tags)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert sorted(steps) == list(range(1, int(summary[tid]["epochs"]) + 1)), (tid, steps)
    # A trial Ray lost with the killed driver keeps no visible run (see MlflowTrialCallback).
    for run in children:
        assert run.info.status != "RUNNING", run.data.tags
        if run.info.lifecycle_stage != "active":
            assert run.data.tags["minimind.status"] == "lost"
            assert run.data.tags["ray.trial_id"] not in summary


def _progress(driver: Driver) -> dict[str, int]:
    """The driver's latest status line (tune.progress.ProgressLine), e.g. {"done": 2, "running": 1, ...}."""
    lines = PROGRESS.findall(driver.stdout)
    if not lines:
        return {}
    done, running, early, failed = (int(n) for n in lines[-1])
    return {"done": done, "running": running, "stopped_early": early, "failed": failed}


@pytest.mark.slow
def test_interrupt_resume_kill_resume(ws: Workspace) -> None:
    """Ctrl-C, --resume, SIGKILL of the whole driver, --resume: the study still ends as one study.

    One chain rather than two tests, because a driver start (Ray included) costs far more than
    these trials' training, and each phase starts where the previous one left the study.
    """
    study = ws.study_dir(NAME)
    args = ["--space", str(SPACE)]

    # 1. Ctrl-C once a trial has reported: the driver stops, saying how to go on.
    first = Driver(ws, args)
    try:
        first.wait_for("a trial's first epoch", lambda: bool(live_results(ws, NAME)), 240)
        os.kill(first.pid, signal.SIGINT)  # the driver itself, as a terminal's Ctrl-C would
        rc = first.wait(120)
    finally:
        first.teardown()
    output = first.output()
    assert rc != 0, f"an interrupted study must not look finished{output}"
    assert "resume with --resume" in first.stderr, output
    # Nothing is reported as the study's result, and no resume state was pruned.
    assert not (study / "best.yaml").exists() and not (study / "summary.csv").exists(), output
    checkpoints = list(study.glob("trial_*/checkpoint_*"))
    assert checkpoints and all((c / "train_state.pt").is_file() for c in checkpoints), checkpoints
    _, parents, children = mlflow_runs(study)
    assert [(p.info.status, p.data.tags["minimind.status"]) for p in parents] == [("KILLED", "interrupted")]
    assert children and all(r.info.status != "RUNNING" for r in children), output
    interrupted = {t: rows for t, rows in stored_results(study).items() if rows}
    assert interrupted, output
    registered = persisted_checkpoints(study)

    # 2. --resume, then SIGKILL the driver's process group with 2 trials ended and one running.
    # Ray saves its experiment state (what --resume reads) in the background, so a trial's end can
    # be missing from the saved state at the kill; tune.ledger keeps such a trial from training again.
    second = Driver(ws, [*args, "--resume"])
    try:
        def two_ended_one_running() -> bool:
            # Printed on every trial end, after the ledger recorded it (see tune.run's callbacks).
            p = _progress(second)
            return bool(p and p["done"] + p["stopped_early"] >= 2 and p["running"] >= 1)

        second.wait_for("2 ended trials and a running one", two_ended_one_running, 240, poll_s=0.05)
        os.killpg(second.pid, signal.SIGKILL)  # the driver and Ray's daemons: no chance to clean up
        second.proc.wait(timeout=30)
        killed_at = time.time()
    finally:
        second.teardown()
    output += second.output()
    # What the dead driver had recorded in MLflow: which trials had ended, after how many epochs.
    _, _, runs = mlflow_runs(study)
    ended = {r.data.tags["ray.trial_id"]: int(r.data.tags["minimind.epochs"]) for r in runs
             if r.data.tags["minimind.status"] in ("completed", "stopped_early")}
    assert len(ended) >= 2 and any(r.info.status == "RUNNING" for r in runs), f"{ended}{output}"
    for tid, epochs in ended.items():
        record = json.loads((study / f"trial_{tid}" / "ended.json").read_text())
        assert (record["epochs"], len(record["results"])) == (epochs, epochs), record
    # Ended trials Ray's saved state still has running: the race, which --resume must not retrain.
    saved = persisted_trials(study)
    lagging = sorted(t for t in ended if saved.get(t) != "TERMINATED")
    print(f"ended trials missing from Ray's saved state at the kill: {lagging} of {sorted(ended)}")
    # Ray rewrites tuner.pkl in place with every snapshot upload; a kill in the middle leaves it cut
    # short (seen once here: the resume died with EOFError). Cut it the way such a kill does.
    tuner_pkl = study / "tuner.pkl"
    tuner_pkl.write_bytes(tuner_pkl.read_bytes()[:100])

    # 3. --resume to the end.
    third = run_driver(ws, [*args, "--resume"], timeout_s=300)
    output += third.output()
    assert third.proc.returncode == 0, output
    assert "tuner.pkl was cut short by the kill: restored" in third.stderr, output
    summary = _check_trials_reached_their_end(study, 6, output)
    results = stored_results(study)
    for tid, epochs in ended.items():
        # A trial that had ended before the kill did not train again: no epoch added or repeated
        # (a replayed epoch keeps its original training start time).
        assert tid in summary, f"trial {tid}, ended before the kill, vanished from the study{output}"
        assert _iterations(results[tid]) == list(range(1, epochs + 1)), (tid, results[tid])
        assert all(r["time_epoch_start_unix"] <= killed_at for r in results[tid]), (tid, results[tid])
        assert int(summary[tid]["epochs"]) == epochs
    for tid, rows in interrupted.items():
        # The resume continued from the last checkpoint Ray had registered at the Ctrl-C: the epochs
        # up to it are kept as they were; an epoch whose checkpoint was still being registered
        # (see persisted_checkpoints) is the one that may train again, from there.
        kept = registered.get(tid, 0)
        assert kept >= len(rows) - 1, f"trial {tid}: {len(rows)} epochs reported, checkpoint of {kept} saved"
        diff = [{k: (old.get(k), new.get(k)) for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
                for old, new in zip(rows[:kept], results[tid])]
        assert len(results[tid]) >= kept and not any(diff), (tid, diff)
        if int(summary[tid]["epochs"]) > kept:
            after = results[tid][kept]
            assert (after["training_iteration"], after["iterations_since_restore"]) == (kept + 1, 1), after
    # The searcher continued from its saved state instead of suggesting the same values again.
    _check_configs_unique(study, list(summary))
    _check_mlflow(study, summary, output)


@pytest.mark.slow
def test_killed_worker_restarts_its_trial_from_the_checkpoint(ws: Workspace) -> None:
    # One trial, with epochs long enough (~1-2 s) that the kill lands inside epoch 2.
    raw = yaml.safe_load(SPACE.read_text())
    raw["train"]["max_steps_per_epoch"] = 60
    raw["tune"].update(num_samples=1, max_concurrent_trials=1)  # max_failures: 1 stays
    space = ws.root / "worker.yaml"
    space.write_text(yaml.safe_dump(raw))
    study = ws.study_dir("worker")
    driver = Driver(ws, ["--space", str(space)])
    target: dict[str, Any] = {}
    try:
        def epoch_one() -> bool:
            for tid, rows in live_results(ws, "worker").items():
                target.update(trial=tid, pid=int(rows[0]["pid"]))  # the trial's worker process
                # Its checkpoint registered too (Ray does that a step after the result; a worker
                # dying in between legitimately trains epoch 1 again), as the saved state shows.
                return persisted_checkpoints(study).get(tid, 0) >= 1
            return False

        driver.wait_for("the trial's first checkpoint", epoch_one, 240, poll_s=0.05)
        # That worker, a process Ray started for this study, dies in the middle of training.
        os.kill(target["pid"], signal.SIGKILL)
        rc = driver.wait(240)
    finally:
        driver.teardown()
    output = driver.output()
    assert rc == 0, output
    summary = _check_trials_reached_their_end(study, 1, output)
    assert summary[target["trial"]]["status"] == "completed", output
    rows = stored_results(study)[target["trial"]]
    assert _iterations(rows) == [1, 2, 3], f"{rows}{output}"
    killed = [r for r in rows if r["pid"] == target["pid"]]
    assert 1 <= len(killed) < EPOCHS and rows[: len(killed)] == killed, f"the kill missed: {rows}"
    # A new worker continued after the last checkpoint (Ray's iterations_since_restore restarts at
    # 1) instead of training from epoch 1 again.
    after = rows[len(killed)]
    assert (after["training_iteration"], after["iterations_since_restore"]) == (len(killed) + 1, 1), rows
    _check_mlflow(study, summary, output)
    _, _, (run,) = mlflow_runs(study)
    assert run.data.tags.get("minimind.failures") == "1", run.data.tags


def test_runs_of_trials_lost_with_the_driver_are_deleted(tmp_path: Path) -> None:
    """After a SIGKILL, --resume continues from Ray's last experiment snapshot; a trial started after
    that snapshot is unknown to it, but its MLflow run exists. The experiment's end deletes that run."""
    from ray.tune.experiment import Trial

    from tune.tracking import StudyTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri)
    tracker.start(study_name=NAME, experiment=NAME, fixed_params={}, settings={}, space_text="", tags={})
    callback = tracker.trial_callback(param_keys=["train.learning_rate"], planned_epochs=EPOCHS)
    kept, lost = (Trial("t", stub=True, config={"train.learning_rate": 1e-3}, trial_id=t)
                  for t in ("kept_0001", "lost_0002"))
    for trial in (kept, lost):
        callback.on_trial_start(iteration=0, trials=[kept, lost], trial=trial)
        callback.on_trial_result(iteration=1, trials=[kept, lost], trial=trial,
                                 result={"val_loss": 1.0, "training_iteration": 1})
    # A new driver process: the callback comes back from tuner.pkl; Ray knows only `kept`.
    import pickle

    resumed = pickle.loads(pickle.dumps(callback))
    resumed.on_trial_result(iteration=2, trials=[kept], trial=kept,
                            result={"val_loss": 0.5, "training_iteration": 2})
    resumed.on_experiment_end(trials=[kept])

    _, _, children = mlflow_runs(tmp_path)
    state = {r.data.tags["ray.trial_id"]: (r.info.lifecycle_stage, r.info.status, r.data.tags["minimind.status"])
             for r in children}
    assert state == {"kept_0001": ("active", "KILLED", "interrupted"),
                     "lost_0002": ("deleted", "KILLED", "lost")}


@pytest.mark.slow
def test_trials_that_ended_after_the_saved_state_are_replayed_not_retrained(ws: Workspace) -> None:
    """--resume from a saved state that lags behind the trials' ends (what a driver killed while
    Ray's background upload was behind leaves): no trial has ended there, but each had,
    so each reports its recorded epochs again (tune.ledger) and none trains."""
    raw = yaml.safe_load(SPACE.read_text())
    raw["tune"].update(num_samples=2, max_concurrent_trials=2, keep_checkpoints=EPOCHS)
    space = ws.root / "stale.yaml"
    space.write_text(yaml.safe_dump(raw))
    study = ws.study_dir("stale")
    snapshot = ws.root / "snapshot"
    driver = Driver(ws, ["--space", str(space)])
    try:
        def unended(saved: dict[str, str]) -> bool:
            return len(saved) == 2 and set(saved.values()) <= {"PENDING", "RUNNING"}

        def both_unended_in_saved_state() -> bool:
            if not unended(persisted_trials(study)):
                return False
            # Ray's saved state and the files uploaded with it; checkpoints stay where they are.
            shutil.rmtree(snapshot, ignore_errors=True)
            shutil.copytree(study, snapshot, ignore=shutil.ignore_patterns(
                "checkpoint_*", "mlflow.db", "mlartifacts", "ended.json", ".*"))
            return unended(persisted_trials(snapshot))

        driver.wait_for("both trials unended in the saved state", both_unended_in_saved_state, 240, poll_s=0.02)
        rc = driver.wait(240)
    finally:
        driver.teardown()
    output = driver.output()
    assert rc == 0, output
    finished_at = time.time()
    first = _check_trials_reached_their_end(study, 2, output)
    # Roll Ray's files back to the snapshot: the study as a resume after such a kill finds it.
    for path in snapshot.rglob("*"):
        if path.is_file():
            shutil.copy2(path, study / path.relative_to(snapshot))
    for name in ("best.yaml", "summary.csv"):
        (study / name).unlink()

    resumed = run_driver(ws, ["--space", str(space), "--resume"], timeout_s=240)
    output += resumed.output()
    assert resumed.proc.returncode == 0, output
    summary = _check_trials_reached_their_end(study, 2, output)
    assert {t: (r["status"], r["epochs"]) for t, r in summary.items()} == \
        {t: (r["status"], r["epochs"]) for t, r in first.items()}, output
    for tid, rows in stored_results(study).items():
        # Every epoch, replayed or not, was trained by the first driver.
        assert all(r["time_epoch_start_unix"] < finished_at for r in rows), (tid, rows)
        assert any(r["timestamp"] > finished_at for r in rows), f"trial {tid} was not restarted: {rows}"
    assert (study / "best.yaml").is_file()
    _check_mlflow(study, summary, output)
