"""Nothing finished is lost or retrained, and nothing is deleted before every input is checked.

One small finished study (module fixture) is the victim of each ordinary mistake: ``--restart`` with
a bad input of every kind, a second start of the same study, a changed space on ``--resume``, more
trials on ``--resume``, a moved folder. Each must leave the study byte-identical (or, for ``--resume``,
with every finished trial intact and no epoch trained twice). The cases in ``../shared/cases`` are
instances of these kinds.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from study_driver import (
    REPO,
    Driver,
    Workspace,
    folder_digest,
    main_in_process,
    mlflow_runs,
    run_driver,
    stored_results,
    traceback_lines,
    trained_epochs,
)

NAME = "victim"
SPACE = {
    "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128},
    "data": {"train_path": None, "tokenizer": None, "max_seq_len": 64, "val_fraction": 0.03},
    "train": {"epochs": 2, "batch_size": 8, "max_steps_per_epoch": 5, "eval_batch_size": 64,
              "dtype": "float32", "device": "cpu", "seed": 0, "log_interval": 5},
    "search": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    "tune": {"num_samples": 2, "max_concurrent_trials": 2, "seed": 0,
             "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
             "resources_per_trial": {"cpu": 1, "gpu": 0}, "max_failures": 0},
    "mlflow": {"experiment": "integrity"},
}


def write_space(folder: Path, name: str, edit: Any = None) -> Path:
    raw = json.loads(json.dumps(SPACE))
    if edit is not None:
        edit(raw, folder)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Victim:
    """The finished study, the driver that made it, the second start of the same study it refused
    meanwhile, and what the study held when it was made (later tests add to it)."""

    def __init__(self, ws: Workspace, driver: Driver, second: Driver) -> None:
        self.ws = ws
        self.driver = driver
        self.second = second
        self.dir = ws.study_dir(NAME)
        self.made = stored_results(self.dir)
        self.made_epochs = trained_epochs(self.dir)
        self.made_runs = mlflow_runs(self.dir)[1:]


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # The same study started twice: while the first driver creates and runs it, a second start of it is
    # refused (test_same_study_started_twice_...). One driver run serves both (a Ray start and a study
    # cost more than the checks).
    ws = Workspace(tmp_path_factory.mktemp("integrity"))
    space = write_space(ws.root, "space")
    first = Driver(ws, ["--space", str(space), "--name", NAME])
    try:
        first.wait_for("the first driver's lock", lambda: (ws.storage / f".{NAME}.lock").exists(), 60)
        time.sleep(1.0)  # the first is checking inputs or creating the study
        second = run_driver(ws, ["--space", str(space), "--name", NAME], timeout_s=60, tag="second")
        first.wait(300)
    finally:
        first.teardown()
    assert first.proc.returncode == 0, first.output() + second.output()
    yield Victim(ws, first, second)
    ws.cleanup()


def _cli(ws: Workspace, args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tune.run", "--storage-path", str(ws.storage), "--ray-temp-dir",
           str(ws.ray_tmp), *args]
    return subprocess.run(cmd, cwd=REPO, env=ws.env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def _ray_sessions(ws: Workspace) -> int:
    return len(list(ws.ray_tmp.glob("session_2*")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- each kind of bad input, given with --restart ---------------------------------------------------


def _bad_data_line(raw: dict, folder: Path) -> None:
    good = json.dumps({"conversations": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "hello"}]})
    (folder / "bad.jsonl").write_text(f"{good}\n{good}\n{{not json\n")
    raw["data"]["train_path"] = "bad.jsonl"


def _no_usable_sample(raw: dict, folder: Path) -> None:
    (folder / "empty.jsonl").write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    raw["data"]["train_path"] = "empty.jsonl"


def _tokenizer_missing_file(raw: dict, folder: Path) -> None:
    from minimind_train.tokenizer import BUNDLED_TOKENIZER_DIR

    shutil.copytree(BUNDLED_TOKENIZER_DIR, folder / "tok_missing", dirs_exist_ok=True)
    (folder / "tok_missing" / "tokenizer.json").unlink()
    raw["data"]["tokenizer"] = "tok_missing"


def _tokenizer_broken(raw: dict, folder: Path) -> None:
    from minimind_train.tokenizer import BUNDLED_TOKENIZER_DIR

    shutil.copytree(BUNDLED_TOKENIZER_DIR, folder / "tok_broken", dirs_exist_ok=True)
    (folder / "tok_broken" / "tokenizer.json").write_text(json.dumps({"model": {}}))
    raw["data"]["tokenizer"] = "tok_broken"


def _init_not_torch(raw: dict, folder: Path) -> None:
    (folder / "notes.pth").write_text("not a checkpoint")
    raw["model"]["init_from"] = "notes.pth"


def _init_other_shape(raw: dict, folder: Path) -> None:
    from minimind_train.config import ModelConfig
    from minimind_train.model import MiniMindForCausalLM, model_config_from

    wide = ModelConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128)
    torch.save({k: v.half() for k, v in MiniMindForCausalLM(model_config_from(wide, 6400)).state_dict().items()},
               folder / "wide.pth")
    raw["model"]["init_from"] = "wide.pth"


BAD_INPUTS = {
    # kind: (edit, words the one-line error must contain)
    "malformed-data-line": (_bad_data_line, ["data.train_path=", "bad.jsonl:3", "malformed"]),
    "malformed-val-line": (lambda raw, folder: (_bad_data_line(raw, folder), raw["data"].update(
        train_path=None, val_path="bad.jsonl")), ["data.val_path=", "bad.jsonl:3", "malformed"]),
    "no-usable-sample": (_no_usable_sample, ["data.train_path=", "empty.jsonl"]),
    "tokenizer-missing-file": (_tokenizer_missing_file, ["data.tokenizer", "tok_missing"]),
    "tokenizer-broken": (_tokenizer_broken, ["data.tokenizer", "tok_broken"]),
    "max-seq-len-too-small": (lambda raw, _: raw["data"].update(max_seq_len=2), ["max_seq_len"]),
    "gpu-on-a-cpu-machine": (lambda raw, _: raw["tune"]["resources_per_trial"].update(gpu=1),
                             ["tune.resources_per_trial.gpu=1", "no GPU"]),
    "tracking-server-down": (lambda raw, _: raw["mlflow"].update(tracking_uri=f"http://127.0.0.1:{_free_port()}"),
                             ["mlflow.tracking_uri", "unreachable"]),
    "init-from-not-torch": (_init_not_torch, ["model.init_from", "notes.pth"]),
    "init-from-other-shape": (_init_other_shape, ["model.init_from", "wide.pth", "does not fit"]),
    "unknown-key": (lambda raw, _: raw["train"].update(learning_rat=0.1), ["train.learning_rat"]),
}
# The kind run as a user runs it (a new `python -m tune.run`: what the terminal shows, exit status); the
# others run in this process (study_driver.main_in_process), the same checks without an interpreter's start each.
AT_THE_TERMINAL = "malformed-data-line"


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_restart_with_a_bad_input_keeps_the_study(victim: Victim, kind: str, tmp_path: Path) -> None:
    if kind == "gpu-on-a-cpu-machine" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    edit, words = BAD_INPUTS[kind]
    before, sessions = folder_digest(victim.dir), _ray_sessions(victim.ws)
    space = write_space(tmp_path, "bad", edit)
    started = time.monotonic()
    run = _cli if kind == AT_THE_TERMINAL else main_in_process
    proc = run(victim.ws, ["--space", str(space), "--name", NAME, "--restart"])
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not traceback_lines(proc.stdout + proc.stderr) and err.startswith("error: "), err
    assert len([ln for ln in err.splitlines() if ln.startswith("error: ")]) == 1, err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"
    assert folder_digest(victim.dir) == before, "the study changed"
    assert not list(victim.ws.storage.glob(f".{NAME}.replaced-*"))
    assert _ray_sessions(victim.ws) == sessions, "refused only after Ray was started"
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_storage_that_is_a_file_is_refused_at_once(victim: Victim, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = main_in_process(victim.ws, ["--space", str(write_space(tmp_path, "s")), "--storage-path",
                                       str(blocker / "studies")], storage=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "is a file, not a folder" in proc.stderr or "cannot" in proc.stderr, proc.stderr


# --- resume ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_with_a_changed_space_is_refused_naming_each_key(victim: Victim, tmp_path: Path) -> None:
    before, sessions = folder_digest(victim.dir), _ray_sessions(victim.ws)

    def edit(raw: dict, _: Path) -> None:
        raw["model"]["hidden_size"] = 128
        raw["search"]["train.learning_rate"]["high"] = 0.1

    edited = write_space(tmp_path, "edited", edit)
    dry = main_in_process(victim.ws, ["--space", str(edited), "--name", NAME, "--resume", "--dry-run"])
    assert dry.returncode == 0 and "--resume would be refused" in dry.stdout, dry.stdout + dry.stderr
    assert "model.hidden_size: 64 -> 128" in dry.stdout
    proc = _cli(victim.ws, ["--space", str(edited), "--name", NAME, "--resume"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "model.hidden_size: 64 -> 128" in proc.stderr
    assert "search.train.learning_rate: {type: float, low: 0.0001, high: 0.01, log: True} -> " in proc.stderr
    assert not traceback_lines(proc.stdout + proc.stderr)
    assert folder_digest(victim.dir) == before
    assert _ray_sessions(victim.ws) == sessions, "refused only after Ray was started"


@pytest.mark.slow
def test_resume_of_a_finished_study_runs_nothing_and_summarises(victim: Victim) -> None:
    trials, sessions = stored_results(victim.dir), _ray_sessions(victim.ws)
    proc = main_in_process(victim.ws, ["--resume", "--name", NAME])  # the study's own space
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing to run: 2 trials finished (num_samples 2)" in proc.stdout
    assert "best: trial t00" in proc.stdout
    assert stored_results(victim.dir) == trials
    assert _ray_sessions(victim.ws) == sessions, "Ray was started for nothing"


@pytest.mark.slow
def test_same_study_started_twice_the_second_is_refused_and_the_first_completes(victim: Victim) -> None:
    first, second = victim.driver, victim.second  # (the victim fixture starts both)
    assert second.proc.returncode == 2, second.output()
    assert f"study '{NAME}' is in use by pid" in second.stderr, second.output()
    assert first.proc.returncode == 0, first.output()
    assert not first.tracebacks() and not second.tracebacks(), first.output() + second.output()
    assert len(victim.made) == 2
    assert not [k for k, n in Counter(victim.made_epochs).items() if n > 1]
    parents, children = victim.made_runs
    assert len(parents) == 1 and sorted(r.data.tags["minimind.trial"] for r in children) == ["0", "1"]


@pytest.mark.slow
def test_resume_with_more_samples_runs_them_and_keeps_the_finished(victim: Victim) -> None:
    before = stored_results(victim.dir)
    proc = _cli(victim.ws, ["--resume", "--name", NAME, "--num-samples", "4"], timeout=300)
    assert proc.returncode == 0 and not traceback_lines(proc.stdout + proc.stderr), proc.stdout + proc.stderr
    assert "applied on resume: tune.num_samples: 2 -> 4" in proc.stdout
    after = stored_results(victim.dir)
    assert len(after) == 4
    for name, rows in before.items():
        assert after[name] == rows, f"{name} changed"
    counts = Counter(trained_epochs(victim.dir))
    assert not [k for k, n in counts.items() if n > 1], counts
    _, parents, children = mlflow_runs(victim.dir)
    assert len(parents) == 1 and len(children) == 4
    assert Counter(r.data.tags["minimind.trial"] for r in children) == Counter({"0": 1, "1": 1, "2": 1, "3": 1})


@pytest.mark.slow
def test_a_moved_study_resumes_and_opens_where_it_lands(victim: Victim, tmp_path: Path) -> None:
    elsewhere = tmp_path / "moved"
    shutil.copytree(victim.dir, elsewhere / NAME)
    original = folder_digest(victim.dir)
    proc = subprocess.run([sys.executable, "-m", "tune.run", "--resume", "--name", NAME, "--storage-path",
                           str(elsewhere)], cwd=REPO, env=victim.ws.env(), capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0 and not traceback_lines(proc.stdout + proc.stderr), proc.stdout + proc.stderr
    assert f"best config: {elsewhere / NAME / 'best.yaml'}" in proc.stdout
    _, parents, children = mlflow_runs(elsewhere / NAME)
    assert sorted(r.data.tags["minimind.trial"] for r in children) == sorted(  # (no duplicate run)
        str(int(name[1:])) for name in stored_results(elsewhere / NAME))
    assert [p.data.tags["minimind.study_dir"] for p in parents] == [str(elsewhere / NAME)]
    assert folder_digest(victim.dir) == original  # the original is untouched
    from tune.ui import find_study, study_store

    # Each run recorded its store as the study's own (null), which is where the folder is now.
    manifest = json.loads((elsewhere / NAME / "study.json").read_text())
    assert [h["tracking_uri"] for h in manifest["history"] if "tracking_uri" in h][-1] is None
    assert study_store(find_study(elsewhere, NAME))[0] == f"sqlite:///{elsewhere / NAME / 'mlflow.db'}"


@pytest.mark.slow
def test_a_copied_study_opens_in_the_ui_with_its_artifacts(victim: Victim, tmp_path: Path) -> None:
    """tune.ui on a copied study folder rebuilds its MLflow mirror there (the copy's absolute artifact
    paths would point into the original folder)."""
    from tune.ui import _refresh_study_mirror

    copy = tmp_path / "copied" / NAME
    shutil.copytree(victim.dir, copy)
    _refresh_study_mirror(f"sqlite:///{copy / 'mlflow.db'}")
    client, parents, children = mlflow_runs(copy)
    (parent,) = [p for p in parents if p.info.lifecycle_stage == "active"]
    assert parent.data.tags["minimind.study_dir"] == str(copy)
    assert parent.info.artifact_uri.startswith(str(copy / "mlartifacts")), parent.info.artifact_uri
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"best.yaml", "summary.csv"}
    assert len(children) == len(stored_results(copy))
