"""tune.report: summaries from the study record, and which checkpoint stands for a trial."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import REPO, make_checkpoint
from mlflow.tracking import MlflowClient

from minimind_train.config import load_run_config
from tune.mirror import Mirror
from tune.record import StudyRecord
from tune.report import finish_study, summarize_trials
from tune.space import load_space, optuna_distributions, spec_to_dict
from tune.storage import StudyPaths
from tune.tracking import resolve_tracking_uri

LR = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}


def _checkpoint(folder: Path, epoch: int, val: float) -> None:
    folder.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, folder / "model.pth")
    (folder / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_loss": val}}))


def test_ranking_and_the_best_epochs_checkpoint(tmp_path: Path) -> None:
    record = StudyRecord.create(tmp_path / "s", "s", {"tune": {"mode": "min"}}, "", {})
    values = {0: [3.0, 2.0, 2.5], 1: [2.5, 1.0, 1.5], 2: [4.0], 3: [1.8]}
    for number, curve in values.items():
        record.ask(LR)
        for epoch, value in enumerate(curve, 1):
            record.record_epoch(number, epoch, {"val_loss": value}, "val_loss")
            _checkpoint(tmp_path / "s" / "runs" / "run-1" / f"t{number:03d}" / f"epoch_{epoch:04d}", epoch, value)
    record.finish(0, "completed", "val_loss", "min")
    record.finish(1, "completed", "val_loss", "min")
    record.finish(2, "stopped_early", "val_loss", "min")
    record.finish(3, "interrupted", "val_loss", "min")
    # Trial 1's best epoch (2) lost its checkpoint: epoch 3's stands in, and the summary says so.
    for f in (tmp_path / "s" / "runs" / "run-1" / "t001" / "epoch_0002").iterdir():
        f.unlink()
    summaries = summarize_trials(record, "val_loss", "min")
    assert [(s.trial_id, s.status) for s in summaries] == [
        ("t001", "completed"), ("t000", "completed"), ("t002", "stopped_early"), ("t003", "interrupted")]
    best = summaries[0]
    assert (best.best_value, best.best_epoch, best.checkpoint_epoch) == (1.0, 2, 3)
    assert best.checkpoint.endswith("t001/epoch_0003")
    assert summaries[1].checkpoint_epoch == summaries[1].best_epoch == 2


def _summary(name: str, curve: list[float], status: str = "completed") -> object:
    from tune.report import TrialSummary

    points = list(enumerate(curve, 1))
    return TrialSummary(trial_id=name, name=name, status=status, epochs=len(curve), best_value=min(curve),
                        best_epoch=min(points, key=lambda p: p[1])[0], params={}, curve=points)


def test_rung_fidelity_is_spearman_over_completed_trials() -> None:
    from tune.report import rung_fidelity

    agree = [_summary("a", [3.0, 2.0, 1.0]), _summary("b", [4.0, 3.0, 2.0]), _summary("c", [5.0, 4.0, 3.0]),
             _summary("x", [9.0], status="stopped_early")]
    (rung1, rung2) = rung_fidelity(agree, [1, 2])
    assert (rung1.epoch, rung1.trials, rung1.spearman) == (1, 3, pytest.approx(1.0))
    assert rung2.spearman == pytest.approx(1.0)
    # The best at epoch 1 ends worst: a reversed ranking.
    reverse = [_summary("a", [1.0, 3.0]), _summary("b", [2.0, 2.0]), _summary("c", [3.0, 1.0])]
    assert rung_fidelity(reverse, [1])[0].spearman == pytest.approx(-1.0)
    assert rung_fidelity(agree[:2], [1])[0].spearman is None  # fewer than 3 completed trials


def test_finalists_pick_the_true_best_config_more_often_than_the_single_best_trial() -> None:
    """A noisy toy objective: 8 configs whose true values are 1.00, 1.02, ..., 1.14 and whose every
    run adds N(0, 0.05) noise (seed-to-seed noise of that size is common in small-model SFT). The
    single-best rule takes the config with the best single run; the finalists rule re-runs the top 3
    with 2 more seeds and takes the best mean (tune.report.rank_finalists)."""
    import random

    from tune.report import Finalist, rank_finalists

    rng = random.Random(0)
    true = [1.00 + 0.02 * i for i in range(8)]
    studies, single, finalists = 400, 0, 0
    for _ in range(studies):
        first = [m + rng.gauss(0, 0.05) for m in true]
        ranked = sorted(range(8), key=first.__getitem__)
        single += ranked[0] == 0
        candidates = [Finalist(f"t{i:03d}", i, {}, (42, 43, 44),
                               (first[i], *(true[i] + rng.gauss(0, 0.05) for _ in range(2)))) for i in ranked[:3]]
        finalists += rank_finalists(candidates, "min")[0].number == 0
    assert finalists > 1.2 * single, (finalists, single)
    # (with this seed: the single-best rule picks the true best in 181 of 400 studies, finalists in 231)


def test_finalists_rank_by_mean_and_an_unstable_config_last(tmp_path: Path) -> None:
    from tune.report import Finalist, rank_finalists, write_finalists_csv

    steady = Finalist("t001", 1, {"train.learning_rate": 1e-3}, (42, 43), (2.0, 2.2))
    lucky = Finalist("t002", 2, {"train.learning_rate": 3e-3}, (42, 43), (1.5, 3.0))
    unstable = Finalist("t003", 3, {"train.learning_rate": 9e-3}, (42, 43), (1.0, float("inf")))
    ranked = rank_finalists([unstable, lucky, steady], "min")
    assert [f.trial_id for f in ranked] == ["t001", "t002", "t003"]
    assert steady.mean == pytest.approx(2.1) and steady.std == pytest.approx(0.1414, abs=1e-4)
    assert unstable.std == 0.0
    rows = write_finalists_csv(tmp_path / "finalists.csv", ranked, "val_loss").read_text().splitlines()
    assert rows[0] == "trial,train.learning_rate,seeds,mean_val_loss,std_val_loss,val_loss_per_seed"
    assert rows[1].startswith("t001,0.001,42 43,2.1") and rows[1].endswith(",2 2.2")


def test_finish_study_prints_the_answer_and_writes_its_files(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The end of a study with finalists: the table of search trials, the best block with the mean over
    seeds, a note on an unfinished trial that already beats it, summary.csv, finalists.csv, best.yaml,
    the closed MLflow parent, and the resume state of all but the top trial pruned."""
    raw = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
    raw["tune"].update(scheduler={"type": "none"}, keep_top_trials=1, finalists={"top_k": 1, "seeds": 1})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(raw))
    spec = load_space(tmp_path / "space.yaml")
    paths = StudyPaths(str(tmp_path / "studies"), "s")
    record = StudyRecord.create(paths.local_dir, "s", spec_to_dict(spec), "", {})
    distributions = optuna_distributions(spec)
    runs = paths.local_dir / "runs" / "run-1"

    def run(number: int, curve: list[float], status: str, error: str = "") -> None:
        for epoch, value in enumerate(curve, 1):
            record.record_epoch(number, epoch, {"val_loss": value}, "val_loss")
            make_checkpoint(runs / f"t{number:03d}" / f"epoch_{epoch:04d}", epoch, value)
        record.finish(number, status, "val_loss", "min", error)

    trials = [([3.0, 2.0], "completed", ""), ([2.5, 1.0], "completed", ""),
              ([0.9], "interrupted", "time budget")]
    for i, (curve, status, error) in enumerate(trials):
        record.study.enqueue_trial({"train.learning_rate": 1e-3 * (i + 1), "train.accumulation_steps": 1})
        run(record.ask(distributions)[0], curve, status, error)
    run(record.add_finalist(record.trial(1), 1, distributions), [1.4, 1.2], "completed")
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
    assert load_run_config(paths.local_dir / "best.yaml") == spec.run.with_overrides(record.trial(1).params)
    # Beyond the top trial, a finished trial keeps only the fp16 weights of its best epoch.
    t000 = runs / "t000"
    assert sorted(str(p.relative_to(t000)) for p in t000.glob("*/*.p*")) == ["epoch_0002/model.pth"]
    assert (best_model.parent / "train_state.pt").exists()

    client = MlflowClient(mirror.tracking_uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("report-test").experiment_id],
                                   "tags.`minimind.role` = 'parent'")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_mean_val_loss"] == pytest.approx(1.1)
