"""The MLflow mirror of a study record, through the real MLflow API on sqlite stores."""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient
from ray import cloudpickle

from tune.mirror import (
    CONFIG_TAG,
    ERROR_TAG,
    NOTE_TAG,
    PARENT_RUN_TAG,
    ROLE_TAG,
    STATUS_TAG,
    STUDY_DIR_TAG,
    STUDY_ID_TAG,
    SYNCED_TAG,
    TRIAL_TAG,
    Mirror,
    MirrorCallback,
    main,
    run_name,
    study_urls,
)
from tune.objective import Objective
from tune.study import Study, TrialRecord
from tune.tracking import (
    VIEW_TAG_PREFIX,
    TrackingError,
    check_tracking_server,
    resolve_tracking_uri,
)

EXPERIMENT = "mirror-test"
OBJECTIVE = "val_loss"
SEARCH = {
    "train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
    "train.grad_clip": optuna.distributions.FloatDistribution(0.1, 2.0),
}
SPEC: dict[str, Any] = {
    "model": {"hidden_size": 64},
    "train": {"epochs": 3, "batch_size": 16, "learning_rate": 1e-3},
    "search": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
               "train.grad_clip": {"type": "float", "low": 0.1, "high": 2.0}},
    "tune": {"mode": "min", "metric": OBJECTIVE, "num_samples": 4},
    "mlflow": {"tracking_uri": None, "experiment": EXPERIMENT},
}
FIXED = {"model": {"hidden_size": 64}, "train.epochs": 3, "train.batch_size": 16}
SETTINGS = {"searcher": "optuna", "num_samples": 4, "resources": {"gpu": 0.5}}

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Creating MLflow's schema takes seconds; most tests copy a migrated empty db instead.
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def make_record(where: Path, template_db: Path | None) -> Study:
    record = Study.create(where, where.name, SPEC, "train: {}\n", {})
    if template_db is not None:
        shutil.copy(template_db, where / "mlflow.db")
    return record


@pytest.fixture
def record(tmp_path: Path, template_db: Path) -> Study:
    return make_record(tmp_path / "studies" / "s", template_db)


def new_trial(record: Study, epochs: int = 0, start: float = 2.0) -> int:
    number, _ = record.ask(SEARCH)
    add_epochs(record, number, range(1, epochs + 1), start)
    return number


def add_epochs(record: Study, number: int, epochs: range, start: float = 2.0) -> None:
    for epoch in epochs:
        loss = start / epoch
        record.record_epoch(number, epoch, {OBJECTIVE: loss, "train_loss": loss + 0.25, "aux_loss": 0.0,
                                            "lr": 1e-3, "time_this_epoch_s": 1.5}, OBJECTIVE)


def mirror_of(record: Study, uri: str | None = None) -> Mirror:
    return Mirror(uri or resolve_tracking_uri(None, record.dir), EXPERIMENT, record, fixed_params=FIXED,
                  settings=SETTINGS, tags={"git_commit": "abc123"})


def client_of(record: Study) -> MlflowClient:
    return MlflowClient(tracking_uri=resolve_tracking_uri(None, record.dir))


def all_runs(client: MlflowClient) -> list[Run]:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000))


def parents(client: MlflowClient) -> list[Run]:
    return [r for r in all_runs(client) if r.data.tags.get(ROLE_TAG) == "parent"]


def children(client: MlflowClient) -> dict[int, Run]:
    found: dict[int, Run] = {}
    for run in all_runs(client):
        if run.data.tags.get(ROLE_TAG) == "trial":
            number = int(run.data.tags[TRIAL_TAG])
            assert number not in found, f"two runs for trial {number}"
            found[number] = run
    return found


def history(client: MlflowClient, run: Run, key: str = OBJECTIVE) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------------



def test_run_name_is_short_and_telling() -> None:
    trial = TrialRecord(number=3, status="running", epochs={},
                        params={"train.learning_rate": 0.00231, "train.accumulation_steps": 1,
                                "train.grad_clip": 0.9, "train.min_lr_ratio": 0.05, "train.warmup_steps": 40})
    order = ["train.learning_rate", "train.accumulation_steps", "train.grad_clip"]
    assert run_name(trial, order) == "t003 lr=2.3e-3 acc=1 clip=0.90 min_lr=0.050 warmup=40"
    clash = TrialRecord(number=12, status="running", epochs={},
                        params={"model.dropout": 0.1, "train.dropout": 12345.0, "train.optimizer": "adamw"})
    assert run_name(clash) == "t012 model.dropout=0.10 train.dropout=1.2e4 optimizer=adamw"
    # A finalist reads as a seed of its config, not as another config (its group names the values).
    finalist = TrialRecord(number=8, status="running", epochs={}, params=trial.params, finalist_of=3, seed=1)
    assert run_name(finalist, order) == "t008 = t003 seed=1"


def test_finalists_share_their_configs_tag(record: Study) -> None:
    """The runs table groups by the config tag: a config's seeds are one group, labelled by its values."""
    number = new_trial(record, epochs=1)
    record.finish(number, "completed", Objective(OBJECTIVE))
    other = new_trial(record, epochs=1)
    seed = record.add_finalist(record.trial(number), 1, SEARCH)
    add_epochs(record, seed, range(1, 2), start=1.0)
    record.finish(seed, "completed", Objective(OBJECTIVE))
    mirror = mirror_of(record)
    mirror.finish("FINISHED", artifacts={})  # the answer: the config of `number`, mean 1.5 over its 2 seeds
    client = client_of(record)
    runs = children(client)
    config = run_name(record.trial(number), list(SPEC["search"]))
    assert runs[number].data.tags[CONFIG_TAG] == config == runs[seed].data.tags[CONFIG_TAG]
    assert runs[seed].info.run_name == f"t{seed:03d} = t{number:03d} seed=1"
    assert runs[other].data.tags[CONFIG_TAG] == runs[other].info.run_name != config
    # The study's run names the answer with its mean over the seeds that finished.
    (parent,) = parents(client)
    assert parent.info.run_name == f"s: best {config}, mean {OBJECTIVE} 1.5 over 2 seeds"
    assert parent.data.metrics[f"best_mean_{OBJECTIVE}"] == 1.5 and parent.data.metrics[f"best_std_{OBJECTIVE}"] > 0.7
    assert "; over seeds, mean 1.5 ± 0.71." in parent.data.tags[NOTE_TAG]
    assert CONFIG_TAG not in parent.data.tags  # (the saved view shows it in the group of runs without one)
    mirror.sync()  # a later sync keeps the name
    assert parents(client)[0].info.run_name == parent.info.run_name


def test_sync_is_idempotent_and_never_duplicates(record: Study) -> None:
    a = new_trial(record, epochs=2)
    b = new_trial(record, epochs=1, start=3.0)
    mirror = mirror_of(record)
    mirror.sync()
    mirror.sync()
    mirror_of(record).sync()  # a fresh object on the same store finds the runs by their tags
    client = client_of(record)
    assert len(parents(client)) == 1
    runs = children(client)
    assert sorted(runs) == [a, b]
    assert history(client, runs[a]) == [(1, 2.0), (2, 1.0)]
    assert runs[a].data.tags[SYNCED_TAG] == "2"
    # aux_loss is 0 at every epoch (a dense model): not logged; nor is the timestamp or an epoch metric.
    # best_val_loss is the best so far (what the runs table sorts by).
    assert set(runs[a].data.metrics) == {OBJECTIVE, f"best_{OBJECTIVE}", "train_loss", "lr", "time_this_epoch_s"}
    stamps = [m.timestamp for m in client.get_metric_history(runs[a].info.run_id, OBJECTIVE)]
    assert stamps == [int(record.trial(a).epochs[e]["timestamp_ms"]) for e in (1, 2)]

    add_epochs(record, a, range(3, 4))
    record.record_epoch(b, 2, {OBJECTIVE: float("nan"), "train_loss": float("inf")}, OBJECTIVE)  # diverging
    mirror.sync([a])
    mirror.sync([b])
    mirror_of(record).sync()
    runs = children(client)
    assert history(client, runs[a]) == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    assert [(m.step, str(m.value)) for m in client.get_metric_history(runs[b].info.run_id, OBJECTIVE)] == [
        (1, "3.0"), (2, "nan")]
    assert history(client, runs[a], f"best_{OBJECTIVE}") == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    assert history(client, runs[b], f"best_{OBJECTIVE}") == [(1, 3.0), (2, 3.0)]  # NaN is never the best

    # A crash between log_batch and the synced-epochs tag: everything is logged again, nothing shows twice.
    client.set_tag(runs[a].info.run_id, SYNCED_TAG, "0")
    mirror_of(record).sync()
    runs = children(client)
    assert history(client, runs[a]) == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]
    assert history(client, runs[a], "train_loss") == [(1, 2.25), (2, 1.25), (3, 2.0 / 3 + 0.25)]
    client.set_tag(runs[b].info.run_id, SYNCED_TAG, "0")
    mirror_of(record).sync([b])
    assert len(client.get_metric_history(runs[b].info.run_id, OBJECTIVE)) == 2  # NaN points too
    assert len(client.get_metric_history(runs[b].info.run_id, "train_loss")) == 2
    assert len(parents(client)) == 1 and len(runs) == 2


def test_params_tags_and_nesting(record: Study) -> None:
    number = new_trial(record, epochs=1)
    mirror_of(record).sync()
    client = client_of(record)
    (parent,) = parents(client)
    child = children(client)[number]
    assert parent.info.run_name == "s"
    assert parent.data.params == {"model.hidden_size": "64", "train.epochs": "3", "train.batch_size": "16",
                                  "tune.searcher": "optuna", "tune.num_samples": "4",
                                  "tune.resources.gpu": "0.5"}
    assert parent.data.tags[STUDY_ID_TAG] == record.manifest.study_id
    assert parent.data.tags[STUDY_DIR_TAG] == str(record.dir.resolve())
    assert parent.data.tags["minimind.git_commit"] == "abc123"  # every tag of ours has one prefix
    assert parent.data.tags["minimind.study"] == "s"
    params = record.trial(number).params
    assert child.data.params == {k: str(v) for k, v in params.items()}  # only the searched values
    assert child.data.tags[PARENT_RUN_TAG] == parent.info.run_id
    assert child.data.tags[STUDY_ID_TAG] == record.manifest.study_id
    assert child.info.run_name == run_name(record.trial(number), list(SPEC["search"]))
    assert child.info.run_name.startswith("t000 lr=")

    # Params are immutable: a later driver run with another setting keeps the first and says so.
    Mirror(resolve_tracking_uri(None, record.dir), EXPERIMENT, record, fixed_params=FIXED,
           settings={**SETTINGS, "num_samples": 8, "seed": 1}, tags={}).sync()
    (parent,) = parents(client)
    assert parent.data.params["tune.num_samples"] == "4"
    assert parent.data.params["tune.seed"] == "1"
    assert parent.data.tags["minimind.latest.tune.num_samples"] == "8"


def test_status_mapping_follows_the_record(record: Study) -> None:
    done = new_trial(record, epochs=3)
    record.finish(done, "completed", Objective(OBJECTIVE))
    early = new_trial(record, epochs=1)
    record.finish(early, "stopped_early", Objective(OBJECTIVE))
    crashed = new_trial(record, epochs=1)
    record.finish(crashed, "failed", Objective(OBJECTIVE), error="RuntimeError: CUDA out of memory")
    nan = new_trial(record, epochs=1)
    record.finish(nan, "diverged", Objective(OBJECTIVE), error="loss is nan at step 12")
    paused = new_trial(record, epochs=1)
    record.finish(paused, "interrupted", Objective(OBJECTIVE))
    live = new_trial(record, epochs=1)

    mirror = mirror_of(record)
    mirror.sync()
    client = client_of(record)

    def statuses() -> dict[int, tuple[str, str]]:
        return {n: (r.info.status, r.data.tags[STATUS_TAG]) for n, r in children(client).items()}

    assert statuses() == {done: ("FINISHED", "completed"), early: ("FINISHED", "stopped_early"),
                          crashed: ("FAILED", "failed"), nan: ("FAILED", "diverged"),
                          paused: ("KILLED", "interrupted"), live: ("RUNNING", "running")}
    runs = children(client)
    assert runs[crashed].data.tags[ERROR_TAG] == "RuntimeError: CUDA out of memory"
    assert runs[nan].data.tags[ERROR_TAG] == "loss is nan at step 12"
    assert ERROR_TAG not in runs[done].data.tags
    (parent,) = parents(client)
    assert parent.info.status == "RUNNING"

    mirror.sync(closing=True)  # the driver ends: a trial still running was cut short
    assert statuses()[live] == ("KILLED", "running")

    # --resume continues the interrupted, failed and running trials, and they complete.
    for number in (paused, crashed, live):
        record.set_status(number, "running")
        add_epochs(record, number, range(2, 4))
    fresh = mirror_of(record)
    fresh.sync([paused])
    assert statuses()[paused] == ("RUNNING", "running")
    assert parents(client)[0].info.status == "RUNNING"
    for number in (paused, crashed, live):
        record.finish(number, "completed", Objective(OBJECTIVE))
    fresh.sync()
    assert statuses() == {done: ("FINISHED", "completed"), early: ("FINISHED", "stopped_early"),
                          crashed: ("FINISHED", "completed"), nan: ("FAILED", "diverged"),
                          paused: ("FINISHED", "completed"), live: ("FINISHED", "completed")}
    assert ERROR_TAG not in children(client)[crashed].data.tags
    assert history(client, children(client)[paused]) == [(1, 2.0), (2, 1.0), (3, 2.0 / 3)]


def test_finish_closes_the_parent_with_results(record: Study, tmp_path: Path) -> None:
    best_number = new_trial(record, epochs=3)
    record.finish(best_number, "completed", Objective(OBJECTIVE))
    cut = new_trial(record, epochs=1)
    best_yaml = tmp_path / "best.yaml"
    best_yaml.write_text("train: {learning_rate: 0.001}\n")
    plot = tmp_path / "curves.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    mirror = mirror_of(record)
    mirror.sync()
    best = record.trial(best_number)
    for _ in range(2):  # finishing twice (a rerun of the final sync) changes nothing
        mirror.finish("FINISHED", artifacts={"best.yaml": best_yaml, "plots/curves": plot,
                                             "missing.txt": tmp_path / "nope"},
                      study_metrics={"rung_fidelity_epoch_1": 0.8})
    client = client_of(record)
    (parent,) = parents(client)
    runs = children(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[STATUS_TAG] == "completed"
    # Its name, which the runs table shows, states the answer: the config's values and its value.
    assert parent.info.run_name == f"s: best {run_name(best, list(SPEC['search']))}, {OBJECTIVE} 0.6667"
    # The description names the best trial (a link to its run), its value and epoch, how to retrain it.
    note = parent.data.tags[NOTE_TAG]
    experiment_id = parent.info.experiment_id
    name = run_name(best, list(SPEC["search"]))
    assert f"**Best trial [{name}](#/experiments/{experiment_id}/runs/{runs[best_number].info.run_id})**" in note
    assert f"{OBJECTIVE} 0.6667 at epoch 3" in note
    assert f"`python -m minimind_train.sft --config {best_yaml.resolve()}`" in note
    assert "2 trials: 1 completed, 1 unfinished." in note
    assert parent.data.tags["minimind.best_trial"] == "t000"
    assert parent.data.tags["minimind.best_run_id"] == runs[best_number].info.run_id
    assert not [k for k in parent.data.tags if not k.startswith(("minimind.", "mlflow."))]
    # At step = the number of finished trials: a later finish after more trials adds a point.
    assert history(client, parent, f"study_best_{OBJECTIVE}") == [(1, 2.0 / 3)]
    assert f"best_{OBJECTIVE}" not in parent.data.metrics  # the trials' sort key: the parent sorts last
    assert parent.data.metrics["rung_fidelity_epoch_1"] == 0.8
    assert runs[cut].info.status == "KILLED"  # still running when the driver finished
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert files == {"best.yaml", "plots"}
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/curves.png"]
    artifact_root = Path(parent.info.artifact_uri.removeprefix("file://"))
    assert artifact_root.is_relative_to(record.dir.resolve() / "mlartifacts")
    with pytest.raises(ValueError, match="status must be one of"):
        mirror.finish("completed", artifacts={})


def test_a_study_without_an_answer_finishes_failed(record: Study) -> None:
    crashed = new_trial(record, epochs=1)
    record.finish(crashed, "failed", Objective(OBJECTIVE), error="RuntimeError: CUDA out of memory")
    mirror_of(record).finish("FINISHED", artifacts={})
    (parent,) = parents(client_of(record))
    assert (parent.info.status, parent.data.tags[STATUS_TAG]) == ("FAILED", "failed")
    assert parent.info.run_name == "s" and "minimind.best_trial" not in parent.data.tags
    assert parent.data.tags[NOTE_TAG] == "No trial completed. 1 trials: 1 failed."


def test_saved_view_opens_the_studys_runs_best_first(record: Study, tmp_path: Path,
                                                      template_db: Path) -> None:
    server = "http://127.0.0.1:5000/"
    assert study_urls(server, record.dir) == (None, None)  # no experiment of the study yet
    number = new_trial(record, epochs=1)
    mirror_of(record).sync()
    other = make_record(tmp_path / "other", None)  # a second study in the same experiment
    mirror_of(other, resolve_tracking_uri(None, record.dir)).sync()
    client = client_of(record)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    study_id = record.manifest.study_id
    envelope = json.loads(experiment.tags[VIEW_TAG_PREFIX + study_id])
    assert envelope["name"] == f"s: best {OBJECTIVE} first" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["orderByKey"] == f"metrics.`best_{OBJECTIVE}`" and state["orderByAsc"] is True
    assert state["selectedColumns"] == [f"metrics.`best_{OBJECTIVE}`", f"metrics.`{OBJECTIVE}`",
                                        "params.`train.learning_rate`", "params.`train.grad_clip`",
                                        f"tags.`{STATUS_TAG}`"]
    # Grouped by config, best mean first (a group's metric is the mean over its seeds); the group of runs
    # without a config (the study's run, which names the answer) open; the name and the value whole.
    assert state["groupBy"] == {"aggregateFunction": "average",
                                "groupByKeys": [{"mode": "tag", "groupByData": CONFIG_TAG}]}
    assert state["groupsExpanded"] == {f"tag.{CONFIG_TAG}": True}
    assert state["columnOrder"] == ["attributes.`Run Name`", *state["selectedColumns"], "runDateAndNestInfo",
                                    "duration"]
    assert state["columnWidths"]["attributes.`Run Name`"] >= 6 * len(f"s: best t000 lr=2.3e-3 clip=0.90, mean "
                                                                     f"{OBJECTIVE} 0.6667 over 2 seeds")
    assert state["columnWidths"][f"metrics.`best_{OBJECTIVE}`"] >= 7 * len("0.6666666666666666") + 30
    # Its filter is MLflow's own search syntax and selects this study's runs only; its order puts the
    # trials best first and the finished parent (which has the study's best under another name) last.
    better = new_trial(record, epochs=2)
    record.finish(better, "completed", Objective(OBJECTIVE))
    mirror = mirror_of(record)
    mirror.finish("FINISHED", artifacts={})
    shown = client.search_runs([experiment.experiment_id], state["searchFilter"],
                               order_by=[f"{state['orderByKey']} {'ASC' if state['orderByAsc'] else 'DESC'}"])
    assert [(r.data.tags[ROLE_TAG], r.data.tags.get(TRIAL_TAG)) for r in shown] == [
        ("trial", str(better)), ("trial", str(number)), ("parent", None)]
    mirror.sync()  # unchanged: the tag is written again only when the view changes
    assert client.get_experiment(experiment.experiment_id).tags[VIEW_TAG_PREFIX + study_id] == json.dumps(envelope)
    table, compare = study_urls(server, record.dir)
    assert table == (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}"
                     f"/runs?workflowType=machine_learning&viewStateShareKey={study_id}")
    assert compare is not None and compare.startswith("http://127.0.0.1:5000/#/compare-runs?")


def test_runs_last_as_long_as_the_recorded_trials(record: Study) -> None:
    """A run's start and end are its trial's in the record, not the mirror's syncs (which made ASHA-stopped
    trials last milliseconds); the parent's are the study's."""
    began = time.time() - 3600.0  # the trials ran an hour ago; the mirror catches up now

    def train(number: int, epochs: range, at: float) -> None:  # epochs of 30 s from `at`
        for epoch in epochs:
            times = {"time_epoch_start_unix": at + 30.0 * (epoch - 1),
                     "timestamp_ms": (at + 30.0 * epoch) * 1000}
            record.record_epoch(number, epoch, {OBJECTIVE: 1.0 / epoch, **times}, OBJECTIVE)

    done, early, cut, crashed = (new_trial(record) for _ in range(4))
    train(done, range(1, 4), began)
    train(early, range(1, 2), began + 100)
    train(cut, range(1, 3), began + 200)  # interrupted, resumed below
    mirror = mirror_of(record)
    mirror.sync()  # live, as the callback does at each report
    record.finish(done, "completed", Objective(OBJECTIVE))
    record.finish(early, "stopped_early", Objective(OBJECTIVE))
    record.finish(crashed, "failed", Objective(OBJECTIVE), error="RuntimeError: at set-up")  # before any epoch
    record.finish(cut, "interrupted", Objective(OBJECTIVE))
    mirror.sync(closing=True)
    client = client_of(record)

    def spans() -> dict[int, tuple[int, int]]:
        return {n: (r.info.start_time, r.info.end_time) for n, r in children(client).items()}

    def ms(moment: Any) -> int:
        return int(moment.timestamp() * 1000)

    frozen = {t.number: t for t in record.study.get_trials()}
    first_step = {n: int(record.trial(n).epochs[1]["time_epoch_start_unix"] * 1000)
                  for n in (done, early, cut)}
    assert spans() == {done: (first_step[done], ms(frozen[done].datetime_complete)),
                       early: (first_step[early], ms(frozen[early].datetime_complete)),
                       cut: (first_step[cut], int(record.trial(cut).epochs[2]["timestamp_ms"])),
                       crashed: (ms(frozen[crashed].datetime_start),) * 2}
    # A store closed by an older mirror at its sync time is corrected.
    client.set_terminated(children(client)[early].info.run_id, status="FINISHED", end_time=1)
    mirror.sync([early])
    assert spans()[early] == (first_step[early], ms(frozen[early].datetime_complete))

    # Resumed in a later driver run, the trial spans both runs and the pause between them.
    record.set_status(cut, "running")
    train(cut, range(3, 4), time.time() - 30.0)
    record.finish(cut, "completed", Objective(OBJECTIVE))
    mirror.sync()
    assert spans()[cut] == (first_step[cut], ms(record.study.get_trials()[cut].datetime_complete))

    # Without a driver (python -m tune.mirror), the parent ends with the last recorded trial time.
    assert main([str(record.dir)]) == 0
    (parent,) = parents(client)
    created = int(datetime.fromisoformat(record.manifest.created).timestamp() * 1000)
    last = max(end for _, end in spans().values())
    assert (parent.info.start_time, parent.info.end_time) == (created, last)
    mirror.finish("FINISHED", artifacts={}, end_time=created + 5000)
    assert client.get_run(parent.info.run_id).info.end_time == created + 5000


def test_moved_study_folder_rebuilds_its_own_store(record: Study, tmp_path: Path) -> None:
    number = new_trial(record, epochs=2)
    record.finish(number, "completed", Objective(OBJECTIVE))
    yaml_file = record.dir / "space.yaml"
    mirror_of(record).finish("FINISHED", artifacts={"space.yaml": yaml_file})
    original = client_of(record)
    (old_parent,) = parents(original)
    old_artifacts = Path(old_parent.info.artifact_uri.removeprefix("file://"))
    assert (old_artifacts / "space.yaml").is_file()

    moved_dir = tmp_path / "elsewhere" / "s"
    shutil.copytree(record.dir, moved_dir)
    moved = Study.open(moved_dir)
    mirror_of(moved).sync()

    client = client_of(moved)
    (parent,) = parents(client)
    assert parent.info.run_id != old_parent.info.run_id  # rebuilt, not the copied run
    assert parent.data.tags[STUDY_DIR_TAG] == str(moved_dir.resolve())
    assert sorted(children(client)) == [number]
    assert history(client, children(client)[number]) == [(1, 2.0), (2, 1.0)]
    location = client.get_experiment_by_name(EXPERIMENT).artifact_location
    assert location.removeprefix("file://").startswith(str(moved_dir.resolve()))
    assert not (moved_dir / "mlartifacts" / old_parent.info.run_id).exists()
    # The original study and its store are untouched.
    (again,) = parents(original)
    assert again.info.run_id == old_parent.info.run_id
    assert again.data.tags[STUDY_DIR_TAG] == str(record.dir.resolve())
    assert (old_artifacts / "space.yaml").is_file()
    # A second sync of the moved study keeps the rebuilt store.
    mirror_of(moved).sync()
    assert [p.info.run_id for p in parents(client)] == [parent.info.run_id]


def test_a_store_outside_the_study_is_never_deleted(record: Study, tmp_path: Path,
                                                    template_db: Path) -> None:
    shared_db = tmp_path / "shared" / "mlflow.db"
    shared_db.parent.mkdir()
    shutil.copy(template_db, shared_db)
    uri = f"sqlite:///{shared_db}"
    number = new_trial(record, epochs=1)
    mirror_of(record, uri).sync()
    moved_dir = tmp_path / "elsewhere" / "s"
    shutil.copytree(record.dir, moved_dir)
    mirror_of(Study.open(moved_dir), uri).sync()
    client = MlflowClient(tracking_uri=uri)
    (parent,) = parents(client)  # the same study id: the same runs, nothing deleted or duplicated
    assert sorted(children(client)) == [number]
    assert parent.data.tags[STUDY_DIR_TAG] == str(moved_dir.resolve())


def test_deleted_experiment_is_a_tracking_error(record: Study) -> None:
    client = client_of(record)
    client.delete_experiment(client.create_experiment(EXPERIMENT))
    with pytest.raises(TrackingError, match="is deleted; restore it"):
        mirror_of(record).sync()


def test_dead_server_fails_fast(record: Study, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        check_tracking_server(uri, timeout_s=2)
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        mirror_of(record, uri).sync()
    assert time.monotonic() - started < 10


def test_callback_mirrors_live_then_warns_once_and_stops(record: Study,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    number = new_trial(record, epochs=1)
    numbers: dict[str, int] = {}
    callback = MirrorCallback(mirror_of(record), numbers)
    trial: Any = SimpleNamespace(trial_id="abc_00000")
    callback.on_trial_result(1, [], trial, {})  # not yet known to the searcher: nothing to do
    assert client_of(record).get_experiment_by_name(EXPERIMENT) is None
    numbers["abc_00000"] = number
    callback.on_trial_result(1, [], trial, {})
    assert sorted(children(client_of(record))) == [number]

    class Broken(Mirror):
        calls = 0

        def sync(self, numbers: Any = None, *, closing: bool = False) -> None:
            Broken.calls += 1
            raise TrackingError("MLflow mirror sync at http://x failed (ConnectionError: refused)")

    broken = MirrorCallback(Broken("http://x", EXPERIMENT, record, fixed_params={}, settings={}, tags={}),
                            numbers)
    broken.on_trial_result(1, [], trial, {})
    broken.on_trial_result(2, [], trial, {})
    broken.on_trial_complete(2, [], trial)
    broken.on_trial_error(2, [], trial)
    assert Broken.calls == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("warning: MLflow mirror unavailable (http://x: MLflow mirror sync at http://x")
    assert f"`python -m tune.mirror {record.dir.resolve()}` or --resume catches MLflow up later" in lines[0]

    # Ray keeps callbacks in tuner.pkl; a pickled copy is inert.
    copy = cloudpickle.loads(cloudpickle.dumps(callback))
    assert copy.mirror is None and not copy.live
    copy.on_trial_result(1, [], trial, {})
    assert pickle.loads(pickle.dumps(broken)).mirror is None


def test_main(record: Study, tmp_path: Path, capsys: pytest.CaptureFixture[str],
              monkeypatch: pytest.MonkeyPatch) -> None:
    assert main([str(tmp_path / "nothing")]) == 2
    assert "is not a study folder" in capsys.readouterr().err

    done = new_trial(record, epochs=3)
    record.finish(done, "completed", Objective(OBJECTIVE))
    paused = new_trial(record, epochs=1)
    record.finish(paused, "interrupted", Objective(OBJECTIVE))
    (record.dir / "best.yaml").write_text("train: {}\n")
    assert main([str(record.dir)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "up to date" in out[0]
    assert main([str(record.dir)]) == 0  # again: nothing new
    client = client_of(record)
    (parent,) = parents(client)
    # No driver holds the study: the parent is closed as the record stands (a trial is resumable).
    assert parent.info.status == "KILLED"
    assert parent.data.tags["minimind.best_trial"] == "t000"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["best.yaml"]
    assert {n: r.info.status for n, r in children(client).items()} == {done: "FINISHED", paused: "KILLED"}
    # Default params from the spec: the fixed config without the searched keys, the tune section.
    assert parent.data.params["train.epochs"] == "3"
    assert "train.learning_rate" not in parent.data.params
    assert parent.data.params["tune.mode"] == "min"

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main([str(record.dir), "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: MLflow tracking server http://127.0.0.1:")


def test_a_trial_no_better_than_untrained_is_a_failed_run_and_never_the_best(record: Study) -> None:
    """It is FAILED with its reason in MLflow, and the parent names the trial that learned as the best,
    although the other's value is lower (it started lower: a pretrained model that learned nothing)."""
    learned = new_trial(record, epochs=3, start=3.0)
    record.finish(learned, "completed", Objective(OBJECTIVE))
    stuck, _ = record.ask(SEARCH)
    record.record_epoch(stuck, 1, {OBJECTIVE: 0.5, f"baseline_{OBJECTIVE}": 0.5}, OBJECTIVE)
    record.finish(stuck, "completed", Objective(OBJECTIVE))
    assert main([str(record.dir)]) == 0
    client = client_of(record)
    run = children(client)[stuck]
    assert (run.info.status, run.data.tags[STATUS_TAG]) == ("FAILED", "no_better")
    assert run.data.tags[ERROR_TAG].startswith(f"no better than the untrained model: {OBJECTIVE} 0.5000")
    (parent,) = parents(client)
    assert (parent.info.status, parent.data.tags["minimind.best_trial"]) == ("FINISHED", f"t{learned:03d}")


def test_main_names_the_answer_the_end_report_names_when_finalists_ran(record: Study) -> None:
    """With finalists the answer is the config with the best mean over seeds (tune.study.answer), not the
    best single trial: a parent closed by ``python -m tune.mirror`` names the one best.yaml names."""
    lucky, steady = new_trial(record, epochs=1, start=1.0), new_trial(record, epochs=1, start=1.2)
    for number, again in ((lucky, 3.0), (steady, 1.2)):
        record.finish(number, "completed", Objective(OBJECTIVE))
        seed = record.add_finalist(record.trial(number), 1, SEARCH)
        add_epochs(record, seed, range(1, 2), start=again)
        record.finish(seed, "completed", Objective(OBJECTIVE))
    assert main([str(record.dir)]) == 0
    (parent,) = parents(client_of(record))
    assert parent.data.tags["minimind.best_trial"] == f"t{steady:03d}"  # (mean 1.2; t{lucky}: 1.0 then 3.0)
    assert parent.info.run_name.endswith(f"mean {OBJECTIVE} 1.2 over 2 seeds"), parent.info.run_name


def test_main_syncs_into_the_store_the_study_recorded(record: Study, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A study that tracked into a store elsewhere (its space's mlflow.tracking_uri, or
    $MLFLOW_TRACKING_URI then) is caught up there, not in a new store in its folder."""
    elsewhere = f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}"
    record.add_history({"run": 1, "started": "2026-12-01T08:00:00", "tracking_uri": elsewhere})
    record.finish(new_trial(record, epochs=2), "completed", Objective(OBJECTIVE))
    assert main([str(record.dir)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"at {elsewhere}")
    assert len(MlflowClient(tracking_uri=elsewhere).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=elsewhere).search_experiments()])) == 2
