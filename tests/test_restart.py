"""tune.restart: a --restart cut short by a kill is finished by the next start."""

from __future__ import annotations

from typing import Any

from tune.restart import finish_pending_restart


def _study_with(folder: Any, epochs: int) -> None:
    import optuna

    from tune.study import Study

    record = Study.create(folder, folder.name, {"tune": {"mode": "min"}}, "", {})
    number, _ = record.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    for epoch in range(1, epochs + 1):
        record.record_epoch(number, epoch, {"val_loss": 1.0}, "val_loss")


def test_a_restart_cut_short_before_any_result_gives_the_old_study_back(tmp_path: Any, capsys: Any) -> None:
    old, new = tmp_path / ".s.replaced-20261201-000000", tmp_path / "s"
    _study_with(old, 2)
    (old / "keep.txt").write_text("the old study")
    _study_with(new, 0)  # the killed --restart had created the new study, without any result
    finish_pending_restart(new)
    assert (new / "keep.txt").read_text() == "the old study" and not old.exists()
    # What to do now: the driver's own last line offers --resume, which continues the old study.
    assert "the old study is back at" in (err := capsys.readouterr().err) and "run the same --restart again" in err


def test_a_restart_cut_short_after_a_result_completes_the_replacement(tmp_path: Any) -> None:
    old, new = tmp_path / ".s.replaced-20261201-000000", tmp_path / "s"
    _study_with(old, 2)
    _study_with(new, 1)
    finish_pending_restart(new)
    assert not old.exists() and (new / "study.json").exists() and not (new / "keep.txt").exists()


def test_a_new_study_that_cannot_be_read_deletes_neither(tmp_path: Any, capsys: Any) -> None:
    old, new = tmp_path / ".s.replaced-20261201-000000", tmp_path / "s"
    _study_with(old, 2)
    _study_with(new, 1)
    (new / "optuna.db").write_bytes(b"damaged")  # its trials cannot be checked: it may hold results
    finish_pending_restart(new)
    assert (old / "study.json").exists() and (new / "optuna.db").read_bytes() == b"damaged"
    assert "neither study deleted" in capsys.readouterr().err


def test_a_pending_restart_is_found_whatever_the_name(tmp_path: Any) -> None:
    old, new = tmp_path / ".r[1].replaced-20261201-000000", tmp_path / "r[1]"
    _study_with(old, 1)
    finish_pending_restart(new)  # the killed --restart had not created the new study yet
    assert (new / "study.json").exists() and not old.exists()


def test_a_restart_finished_by_the_next_start_deletes_the_old_runs_in_the_store_it_named(tmp_path: Any) -> None:
    """The killed --restart's driver would have deleted the old study's runs in an MLflow store outside
    its folder; the next start, finishing that job, left them there (it did not know the store)."""
    import optuna
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from tune.study import Study

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    old, new = tmp_path / ".s.replaced-20261201-000000", tmp_path / "s"
    spec = {"tune": {"mode": "min"}, "mlflow": {"tracking_uri": uri, "experiment": "e"}}
    record = Study.create(old, "s", spec, "", {})
    number, _ = record.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    record.record_epoch(number, 1, {"val_loss": 1.0}, "val_loss")
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("e"), tags={"minimind.study_id": record.manifest.study_id})
    _study_with(new, 1)  # the new study has a result: the replacement completes
    finish_pending_restart(new)
    assert not old.exists()
    assert client.get_run(run.info.run_id).info.lifecycle_stage == "deleted"
    assert client.search_runs([run.info.experiment_id], run_view_type=ViewType.ACTIVE_ONLY) == []
