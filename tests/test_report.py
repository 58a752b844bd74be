"""tune.report: summaries from the study record, and which checkpoint stands for a trial."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from conftest import REPO, make_checkpoint
from mlflow.tracking import MlflowClient

from minimind_train.config import load_run_config
from tune.mirror import Mirror
from tune.objective import Objective
from tune.report import (
    TrialSummary,
    finish_study,
    format_table,
    summarize_trials,
    write_best_yaml,
    write_summary_csv,
)
from tune.space import load_space, optuna_distributions, spec_to_dict
from tune.storage import StudyPaths
from tune.study import Study, TrialRecord
from tune.tracking import resolve_tracking_uri

LR = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}


def _checkpoint(folder: Path, epoch: int, val: float) -> None:
    folder.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, folder / "model.pth")
    (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_loss": val}}))


def test_ranking_and_the_best_epochs_checkpoint(tmp_path: Path) -> None:
    record = Study.create(tmp_path / "s", "s", {"tune": {"mode": "min"}}, "", {})
    values = {0: [3.0, 2.0, 2.5], 1: [2.5, 1.0, 1.5], 2: [4.0], 3: [1.8]}
    for number, curve in values.items():
        record.ask(LR)
        for epoch, value in enumerate(curve, 1):
            folder = tmp_path / "s" / "runs" / "run-1" / f"t{number:03d}" / f"epoch_{epoch:04d}"
            _checkpoint(folder, epoch, value)
            record.record_epoch(number, epoch, {"val_loss": value}, "val_loss", checkpoint=str(folder))  # (the index)
    record.finish(0, "completed", Objective("val_loss"))
    record.finish(1, "completed", Objective("val_loss"))
    record.finish(2, "stopped_early", Objective("val_loss"))
    record.finish(3, "interrupted", Objective("val_loss"))
    # Trial 1's best epoch (2) lost its checkpoint: epoch 3's stands in, and the summary says so.
    for f in (tmp_path / "s" / "runs" / "run-1" / "t001" / "epoch_0002").iterdir():
        f.unlink()
    summaries = summarize_trials(record, Objective("val_loss"))
    assert [(s.trial.name, s.trial.status) for s in summaries] == [
        ("t001", "completed"), ("t000", "completed"), ("t002", "stopped_early"), ("t003", "interrupted")]
    best = summaries[0]
    assert (best.best_value, best.best_epoch, best.checkpoint_epoch) == (1.0, 2, 3)
    assert best.checkpoint.endswith("t001/epoch_0003")
    assert summaries[1].checkpoint_epoch == summaries[1].best_epoch == 2


def _trial(number: int, curve: list[float], status: str = "completed") -> TrialRecord:
    return TrialRecord(number, status, {}, {epoch: {"val_loss": v} for epoch, v in enumerate(curve, 1)})


def test_rung_fidelity_is_spearman_over_completed_trials() -> None:
    from tune.report import rung_fidelity

    agree = [_trial(0, [3.0, 2.0, 1.0]), _trial(1, [4.0, 3.0, 2.0]), _trial(2, [5.0, 4.0, 3.0]),
             _trial(3, [9.0], status="stopped_early")]
    (rung1, rung2) = rung_fidelity(agree, "val_loss", [1, 2])
    assert (rung1.epoch, rung1.trials, rung1.spearman) == (1, 3, pytest.approx(1.0))
    assert rung2.spearman == pytest.approx(1.0)
    # The best at epoch 1 ends worst: a reversed ranking.
    reverse = [_trial(0, [1.0, 3.0]), _trial(1, [2.0, 2.0]), _trial(2, [3.0, 1.0])]
    assert rung_fidelity(reverse, "val_loss", [1])[0].spearman == pytest.approx(-1.0)
    assert rung_fidelity(agree[:2], "val_loss", [1])[0].spearman is None  # fewer than 3 completed trials
    # Issue 22: with fewer steps than evaluations an epoch skips indices (here 2, 4, ...): a trial's
    # value at rung 1 is its first at or past it, the one ASHA judged.
    gapped = [dataclasses.replace(t, epochs={2 * k: m for k, m in t.epochs.items()}) for t in reverse]
    assert rung_fidelity(gapped, "val_loss", [1])[0] == rung_fidelity(reverse, "val_loss", [1])[0]


def test_finalists_pick_the_true_best_config_more_often_than_the_single_best_trial() -> None:
    """A noisy toy objective: 8 configs whose true values are 1.00, 1.02, ..., 1.14 and whose every
    run adds N(0, 0.05) noise (seed-to-seed noise of that size is common in small-model SFT). The
    single-best rule takes the config with the best single run; the finalists rule re-runs the top 3
    with 2 more seeds and takes the best mean (tune.study.rank_finalists)."""
    import random

    from tune.study import Finalist, rank_finalists

    rng = random.Random(0)
    true = [1.00 + 0.02 * i for i in range(8)]
    studies, single, finalists = 400, 0, 0
    for _ in range(studies):
        first = [m + rng.gauss(0, 0.05) for m in true]
        ranked = sorted(range(8), key=first.__getitem__)
        single += ranked[0] == 0
        candidates = [Finalist(f"t{i:03d}", i, {}, (42, 43, 44),
                               (first[i], *(true[i] + rng.gauss(0, 0.05) for _ in range(2)))) for i in ranked[:3]]
        finalists += rank_finalists(candidates, Objective())[0].number == 0
    assert finalists > 1.2 * single, (finalists, single)
    # (with this seed: the single-best rule picks the true best in 181 of 400 studies, finalists in 231)


def test_finalists_rank_by_mean_and_an_unstable_config_last(tmp_path: Path) -> None:
    from tune.report import write_finalists_csv
    from tune.study import Finalist, rank_finalists

    steady = Finalist("t001", 1, {"train.learning_rate": 1e-3}, (42, 43), (2.0, 2.2))
    lucky = Finalist("t002", 2, {"train.learning_rate": 3e-3}, (42, 43), (1.5, 3.0))
    unstable = Finalist("t003", 3, {"train.learning_rate": 9e-3}, (42, 43), (1.0, float("inf")))
    ranked = rank_finalists([unstable, lucky, steady], Objective())
    assert [f.trial_id for f in ranked] == ["t001", "t002", "t003"]
    assert steady.mean == pytest.approx(2.1) and steady.std == pytest.approx(0.1414, abs=1e-4)
    assert unstable.std == 0.0
    rows = write_finalists_csv(tmp_path / "finalists.csv", ranked, "val_loss").read_text().splitlines()
    assert rows[0] == "trial,train.learning_rate,seeds,mean_val_loss,std_val_loss,val_loss_per_seed"
    assert rows[1].startswith("t001,0.001,42 43,2.1") and rows[1].endswith(",2 2.2")


class _Study:
    """A smoke.yaml study (``tune`` settings overridden) whose trials are written straight into its record."""

    def __init__(self, tmp_path: Path, **tune: object) -> None:
        raw = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
        raw["tune"].update(tune)
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(raw))
        self.spec = load_space(tmp_path / "space.yaml")
        self.paths = StudyPaths(str(tmp_path / "studies"), "s")
        self.record = Study.create(self.paths.local_dir, "s", spec_to_dict(self.spec), "", {})
        self.distributions = optuna_distributions(self.spec)
        self.runs = self.paths.local_dir / "runs" / "run-1"

    def run(self, number: int, curve: list[float], status: str, error: str = "",
            before: float | None = None) -> None:
        """``before``: the val_loss of the trial's model before training (the trainer reports it with
        epoch 1, beside ln(6400), the bundled tokenizer's uniform predictor)."""
        bars = {} if before is None else {"baseline_val_loss": before, "uniform_loss": math.log(6400)}
        for epoch, value in enumerate(curve, 1):
            folder = make_checkpoint(self.runs / f"t{number:03d}" / f"epoch_{epoch:04d}", epoch, value)
            self.record.record_epoch(number, epoch, {"val_loss": value, **(bars if epoch == 1 else {})}, "val_loss",
                                     checkpoint=str(folder))
        self.record.finish(number, status, Objective("val_loss"), error)

    def add(self, trials: list[tuple[list[float], str, str]], before: float | None = None) -> None:
        """New search trials: (curve, status, error) each, learning rates 1e-3, 2e-3, ..."""
        for i, (curve, status, error) in enumerate(trials):
            self.record.study.enqueue_trial({"train.learning_rate": 1e-3 * (i + 1), "train.accumulation_steps": 1})
            self.run(self.record.ask(self.distributions)[0], curve, status, error, before)

    def finish(self) -> int:
        mirror = Mirror(resolve_tracking_uri(None, self.record.dir), "report-test", self.record, fixed_params={},
                        settings={}, tags={})
        return finish_study(self.spec, self.paths, self.record, mirror, "FINISHED")


def test_finish_study_prints_the_answer_and_writes_its_files(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The end of a study with finalists: the table of search trials, the best block with the mean over
    seeds, a note on an unfinished trial that already beats it, summary.csv, finalists.csv, best.yaml,
    the closed MLflow parent, and the resume state of all but the top trial pruned."""
    study = _Study(tmp_path, scheduler={"type": "none"}, keep_top_trials=1, finalists={"top_k": 1, "seeds": 1})
    spec, paths, record, runs = study.spec, study.paths, study.record, study.runs
    study.add([([3.0, 2.0], "completed", ""), ([2.5, 1.0], "completed", ""), ([0.9], "interrupted", "time budget")])
    study.run(record.add_finalist(record.trial(1), 1, study.distributions), [1.4, 1.2], "completed")
    # Checkpoint copies a killed worker left half done: a finished trial's go, an unfinished one's stay.
    leftovers = [make_checkpoint(runs / f"t{n:03d}" / f".epoch_0003.{n}.tmp", 3, 0.5) for n in (0, 1, 2)]
    mirror = Mirror(resolve_tracking_uri(None, record.dir), "report-test", record, fixed_params={},
                    settings={}, tags={})

    assert finish_study(spec, paths, record, mirror, "FINISHED") == 0
    out, err = capsys.readouterr()
    table = out.strip().splitlines()[:4]
    assert table[0].split() == ["rank", "trial", "status", "epochs", "best", "val_loss",
                                "train.accumulation_steps", "train.learning_rate"]
    assert [row.split()[:5] for row in table[1:]] == [  # search trials only: the finalist is in summary.csv
        ["1", "t001", "completed", "2", "1.0000"], ["2", "t000", "completed", "2", "2.0000"],
        ["3", "t002", "interrupted", "1", "0.9000"]]
    assert "  t001  mean 1.1000 ± 0.1414  seeds 0 1: 1.0000 1.2000" in out
    assert "note: unfinished trial t002 already reached val_loss 0.9000 after 1 epoch(s)" in out
    assert "best: trial t001  val_loss 1.0000 (epoch 2); mean over 2 seeds 1.1000 ± 0.1414\n" \
           "  train.accumulation_steps: 1\n  train.learning_rate: 0.002\n" in out
    best_model = runs / "t001" / "epoch_0002" / "model.pth"
    assert f"best fp16 checkpoint: {best_model}" in out
    assert "1 trial(s) unfinished (t002): --resume continues them\n  t002: interrupted: time budget" in err

    with (paths.local_dir / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["trial_id"], r["finalist_of"], r["seed"]) for r in rows] == [
        ("t001", "", ""), ("t003", "t001", "1"), ("t000", "", ""), ("t002", "", "")]
    assert rows[0]["checkpoint"] == str(best_model.parent) and rows[0]["best_val_loss"] == "1.0"
    assert (paths.local_dir / "finalists.csv").read_text().splitlines()[1].startswith("t001,1,0.002,0 1,1.1,")
    assert load_run_config(paths.local_dir / "best.yaml") == spec.trial_run.with_overrides(record.trial(1).params)
    # Beyond the top trial, a finished trial keeps only the fp16 weights of its best epoch.
    t000 = runs / "t000"
    assert sorted(str(p.relative_to(t000)) for p in t000.glob("*/*.p*")) == ["epoch_0002/model.pth"]
    assert (best_model.parent / "train_state.pt").exists()
    assert [p.exists() for p in leftovers] == [False, False, True]

    client = MlflowClient(mirror.tracking_uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("report-test").experiment_id],
                                   "tags.`minimind.role` = 'parent'")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_mean_val_loss"] == pytest.approx(1.1)


def test_when_no_trial_beat_the_untrained_model_nothing_is_exported_and_the_study_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19's instance: one trial diverged, the other collapsed to the uniform predictor (val_loss
    ln(6400)) and ran to its end: no best.yaml, no checkpoint, exit 1, and one line that says why."""
    study = _Study(tmp_path)
    study.add([([math.log(6400)] * 2, "completed", ""), ([float("nan")], "diverged", "loss exploded")], before=8.779)
    assert study.finish() == 1
    out, err = capsys.readouterr()
    assert "error: no trial beat the untrained model: 1 trial(s) ended no better than before training; no " \
           "best.yaml or checkpoint is exported" in err
    assert "  t000: no_better: no better than the uniform predictor: val_loss 8.7641 >= 8.7641" in err
    assert "best:" not in out and "best fp16 checkpoint" not in out
    assert not (study.paths.local_dir / "best.yaml").exists()
    with (study.paths.local_dir / "summary.csv").open() as fh:
        assert [(r["trial_id"], r["status"]) for r in csv.DictReader(fh)] == [("t000", "no_better"), ("t001", "diverged")]


def test_a_trial_no_better_than_untrained_is_never_the_best_whatever_its_value(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A fine-tuning trial that stayed at its pretrained loss (2.0) beside one from another start that
    learned (9 -> 3): the one that learned is the answer and the only finalist; the other ranks below."""
    study = _Study(tmp_path, scheduler={"type": "none"}, finalists={"top_k": 2, "seeds": 1})
    study.add([([2.0, 2.0], "completed", "")], before=2.0)
    study.add([([5.0, 3.0], "completed", "")], before=9.0)
    from tune.searcher import finalist_plans

    plans = finalist_plans(study.record, study.distributions, Objective("val_loss"), top_k=2, seeds=1, base_seed=0)
    assert [study.record.trial(p.number).finalist_of for p in plans] == [1]
    study.run(plans[0].number, [3.5, 3.1], "completed", before=9.0)
    assert study.finish() == 0
    out, _ = capsys.readouterr()
    assert [row.split()[1:3] for row in out.strip().splitlines()[1:3]] == [["t001", "completed"], ["t000", "no_better"]]
    assert "best: trial t001  val_loss 3.0000 (epoch 2); mean over 2 seeds 3.0500" in out
    assert load_run_config(study.paths.local_dir / "best.yaml") == study.spec.trial_run.with_overrides(
        study.record.trial(1).params)


@pytest.mark.parametrize("cpu", [1, 2])
def test_best_yaml_runs_with_the_trials_thread_count(tmp_path: Path, cpu: int) -> None:
    """A trial runs with train.num_threads = its CPU share (StudySpec.trial_run); best.yaml says the same,
    so `python -m minimind_train.sft --config best.yaml` on CPU gives the trial's losses (not 0: all cores)."""
    from tune.report import write_best_yaml

    study = _Study(tmp_path, resources_per_trial={"cpu": cpu, "gpu": 0})
    study.add([([2.0, 1.5], "completed", "")])
    (best,) = summarize_trials(study.record, Objective("val_loss"))
    path = write_best_yaml(tmp_path / "best.yaml", study.spec, best)
    cfg = load_run_config(path)
    assert cfg.train.num_threads == cpu
    assert cfg == study.spec.run.with_overrides({**best.trial.params, "train.num_threads": cpu})
    assert f"# train.num_threads: {cpu}, as the trial ran (its CPU share)" in path.read_text()
    # The header's command works pasted from any folder (it named `best.yaml` alone: only inside the study's).
    assert f"# Run it alone: python -m minimind_train.sft --config {path.resolve()}\n" in path.read_text()


def test_a_used_up_time_budget_is_named_with_how_to_continue(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Time budget 25 s, 30 s used: with no trial completed the error says so (not an empty reason per
    trial); with one completed, the unfinished trials' line says so, and a note when none is left unfinished
    but fewer than num_samples ran."""
    study = _Study(tmp_path, time_budget_s=25, num_samples=3)
    study.add([([2.0], "interrupted", ""), ([2.5], "interrupted", "")])
    study.record.add_history({"run": 1, "seconds": 30.0})
    how = (f"the study's time budget (tune.time_budget_s=25) is used up (30 s); to continue, raise it and resume: "
           f"python -m tune.run --resume --name s --storage-path {tmp_path / 'studies'} --time-budget-s 55")
    assert study.finish() == 1
    err = capsys.readouterr().err
    assert f"error: no trial completed: {how}\n  t000: interrupted (time budget)\n" \
           "  t001: interrupted (time budget)\n" in err
    assert "trial(s) unfinished" not in err  # (the error lists them)

    study.record.record_epoch(0, 2, {"val_loss": 1.8}, "val_loss")  # (as if a run within budget had finished it)
    make_checkpoint(study.runs / "t000" / "epoch_0002", 2, 1.8)
    study.record.finish(0, "completed", Objective("val_loss"))
    assert study.finish() == 0
    assert f"1 trial(s) unfinished (t001): {how}\n  t001: interrupted (time budget)\n" in capsys.readouterr().err
    study.record.finish(1, "stopped_early", Objective("val_loss"))
    assert study.finish() == 0
    assert f"note: 2 of 3 trials ran: {how}\n" in capsys.readouterr().err


def test_without_a_budget_an_interrupted_trial_has_no_empty_reason(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    study = _Study(tmp_path)
    study.add([([2.0], "interrupted", "")])
    assert study.finish() == 1
    assert capsys.readouterr().err.endswith(
        "error: no trial completed: --resume continues the unfinished ones\n  t000: interrupted\n")


def test_a_cut_failure_reason_ends_with_an_ellipsis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ray's lost-worker message is one long line: its reason (tune.searcher.failure_reason, 500 characters)
    and the record's copy of any error (2000) end with "…" where they are cut, in the summary too."""
    from tune.searcher import failure_reason

    died = ("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task. "
            + "If the process was killed by the kernel OOM killer (verifiable by checking for OOM in dmesg "
            "of the OOMing node), consider more memory. " * 8)
    reason = failure_reason(f"Traceback (most recent call last):\n  File 'x'\n{died}\n")
    assert len(reason) == 500 and reason.endswith("…") and died.startswith(reason[:-1])
    assert failure_reason("ValueError: short") == "ValueError: short"
    study = _Study(tmp_path)
    study.add([([2.0], "failed", reason), ([2.5], "diverged", "d" * 2500)])
    assert study.record.trial(0).error == reason
    assert study.record.trial(1).error == "d" * 1999 + "…"
    assert study.finish() == 1
    err = capsys.readouterr().err
    assert f"  t000: failed: {reason}\n" in err and f"  t001: diverged: {'d' * 1999}…\n" in err


def test_a_driver_killed_mid_write_of_best_yaml_or_summary_leaves_the_old_files_whole(tmp_path: Path) -> None:
    """Half a best.yaml can still parse (``learning_rate: 0.00``): a file cut short must never be there."""
    from conftest import killed_mid_write

    from tune.space import load_space

    spec = load_space("smoke")
    old = TrialSummary(TrialRecord(0, "completed", {"train.learning_rate": 0.001}, {2: {"val_loss": 1.5}}), 2, 1.5)
    best, summary = write_best_yaml(tmp_path / "best.yaml", spec, old), tmp_path / "summary.csv"
    write_summary_csv(summary, [old], "val_loss")
    before = {p: p.read_bytes() for p in (best, summary)}
    for call in (f"write_best_yaml(Path({str(best)!r}), load_space('smoke'), new)",
                 f"write_summary_csv(Path({str(summary)!r}), [new], 'val_loss')"):
        killed_mid_write(f"""
            from pathlib import Path
            from tune.report import TrialSummary, write_best_yaml, write_summary_csv
            from tune.study import TrialRecord
            from tune.space import load_space
            new = TrialSummary(TrialRecord(1, "completed", {{"train.learning_rate": 0.0234}}, {{2: {{"val_loss": 1.2}}}}),
                               2, 1.2)
            cut()
            {call}
        """, limit=40)
    assert {p: p.read_bytes() for p in (best, summary)} == before


def test_ctrl_c_during_the_end_report_leaves_the_answer_and_closes_the_parent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The shared case ctrl-c-end-report-finalists (b): Ctrl-C (or SIGTERM) while the report is written
    said "interrupted before any trial started", left no best.yaml and the MLflow parent RUNNING."""
    import signal

    from study_driver import mlflow_runs

    from tune import experiment, interrupts, report, run

    study = _Study(tmp_path, scheduler={"type": "none"})
    study.add([([3.0, 2.0], "completed", ""), ([2.5, 1.0], "completed", "")])
    mirror = Mirror(resolve_tracking_uri(None, study.record.dir), "report-test", study.record, fixed_params={},
                    settings={}, tags={})
    write_best_yaml = report.write_best_yaml

    def signalled_while_writing(*args: Any, **kwargs: Any) -> Path:
        signal.raise_signal(signal.SIGTERM)  # (the driver's handler: as a plain `kill` now)
        return write_best_yaml(*args, **kwargs)

    monkeypatch.setattr(report, "write_best_yaml", signalled_while_writing)
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    interrupts.stop_on_signals()
    try:
        with pytest.raises(interrupts.StudyStopped) as stopped, experiment._closing(study.paths, study.record, mirror):
            finish_study(study.spec, study.paths, study.record, mirror, "FINISHED")
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    message, code = run._stopped(stopped.value, study.paths)
    assert code == 130 and message.strip() == (f"interrupted: continue with python -m tune.run --resume --name s "
                                               f"--storage-path {study.paths.storage}"), message
    best = yaml.safe_load((study.paths.local_dir / "best.yaml").read_text())
    assert best["train"]["learning_rate"] == pytest.approx(2e-3)  # t001, the best of what finished
    _, parents, _ = mlflow_runs(study.paths.local_dir)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert "Traceback" not in capsys.readouterr().err


def test_with_evaluations_inside_an_epoch_the_table_and_summary_name_evaluations(tmp_path: Path) -> None:
    s = TrialSummary(TrialRecord(0, "completed", {"train.learning_rate": 0.001}, {5: {"val_loss": 1.5}}), 4, 1.5)
    table = format_table([s], "val_loss", evals_per_epoch=8).splitlines()
    assert table[0].split()[3:5] == ["evaluations", "(epochs)"] and table[1].split()[3:5] == ["5", "(0.625)"]
    once = format_table([s], "val_loss").splitlines()  # one evaluation per epoch: unchanged
    assert once[0].split()[3] == "epochs" and once[1].split()[3] == "5"
    for n, header in ((8, "evaluations,best_val_loss,best_evaluation"), (1, "epochs,best_val_loss,best_epoch")):
        path = write_summary_csv(tmp_path / f"summary-{n}.csv", [s], "val_loss", evals_per_epoch=n)
        assert header in path.read_text().splitlines()[0]
