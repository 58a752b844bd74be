"""Preflight: each bad input of a study is one StudyError naming the key and the value; --resume is
compared with the study it continues."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import qa, write_rows

from tune.preflight import (
    STOPPING,
    check_inputs,
    describe,
    describe_resume,
    expected_shape,
    quiet_libraries,
    reconcile,
)
from tune.space import StudySpec, load_space, spec_to_dict
from tune.storage import StudyPaths
from tune.study import Study, StudyError


def tiny_space(folder: Path, edit: Callable[[dict[str, Any], Path], None] | None = None) -> StudySpec:
    """A one-parameter study on 12 rows of the bundled tokenizer, tokenised into ``folder``."""
    write_rows(folder / "train.jsonl", [qa(f"question {i}?", f"answer {i}.") for i in range(12)])
    raw: dict[str, Any] = {
        "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                  "max_position_embeddings": 64},
        "data": {"train_path": "train.jsonl", "max_seq_len": 32, "cache_dir": "cache", "tokenize_workers": 1},
        "train": {"epochs": 1, "device": "cpu"},
        "search": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "tune": {"num_samples": 1},
    }
    if edit is not None:
        edit(raw, folder)
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_space(path)


def check(spec: StudySpec, folder: Path) -> Any:
    return check_inputs(spec, spec.run, StudyPaths(str(folder / "studies"), "s"))


def test_good_inputs_are_measured_and_fingerprinted(tmp_path: Path) -> None:
    inputs = check(tiny_space(tmp_path), tmp_path)
    assert len(inputs.data.train) > 0 and inputs.n_params > 0
    assert set(inputs.fingerprints) == {"dataset", "tokenizer"}
    # The study's own sqlite store: nothing to ask before it exists.
    assert inputs.tracking_uri.startswith("sqlite:///") and str(tmp_path / "studies" / "s") in inputs.tracking_uri


def _init_not_torch(raw: dict[str, Any], folder: Path) -> None:
    (folder / "notes.pth").write_text("not a checkpoint", encoding="utf-8")
    raw["model"]["init_from"] = "notes.pth"


def _init_other_shape(raw: dict[str, Any], folder: Path) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(3, 3)}, folder / "wide.pth")
    raw["model"]["init_from"] = "wide.pth"


def _tokenizer_broken(raw: dict[str, Any], folder: Path) -> None:
    from minimind_train.tokenizer import BUNDLED_TOKENIZER_DIR

    shutil.copytree(BUNDLED_TOKENIZER_DIR, folder / "tok_broken")
    (folder / "tok_broken" / "tokenizer.json").write_text(json.dumps({"model": {}}), encoding="utf-8")
    raw["data"]["tokenizer"] = "tok_broken"


def _malformed_line(raw: dict[str, Any], folder: Path) -> None:
    write_rows(folder / "bad.jsonl", [qa("q?", "a."), "{not json"])
    raw["data"]["train_path"] = "bad.jsonl"


@pytest.mark.parametrize(("edit", "words"), [
    (_init_not_torch, ("model.init_from=", "notes.pth", "is not a loadable torch state dict")),
    (_init_other_shape, ("model.init_from=", "wide.pth", "does not fit the model")),
    (_tokenizer_broken, ("data.tokenizer=", "tok_broken", "cannot be loaded as a tokenizer")),
    (_malformed_line, ("data.train_path=", "bad.jsonl")),
], ids=["init-not-torch", "init-other-shape", "tokenizer-broken", "malformed-line"])
def test_a_bad_input_names_its_key_and_value(tmp_path: Path, edit: Callable[[dict[str, Any], Path], None],
                                             words: tuple[str, ...]) -> None:
    spec = tiny_space(tmp_path, edit)
    with pytest.raises(StudyError) as info:
        check(spec, tmp_path)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_resume_is_refused_for_another_study_and_applies_run_settings(tmp_path: Path) -> None:
    spec = tiny_space(tmp_path)
    inputs = check(spec, tmp_path)
    paths = StudyPaths(str(tmp_path / "studies"), "s")
    assert "no study to compare with" in describe_resume(spec_to_dict(spec), paths)
    record = Study.create(paths.local_dir, "s", spec_to_dict(spec), spec.text, inputs.fingerprints)
    assert "the space matches study 's'" in describe_resume(spec_to_dict(spec), paths)
    more = dataclasses.replace(spec, tune=dataclasses.replace(spec.tune, num_samples=3))
    assert reconcile(record, spec_to_dict(more), inputs, explicit_space=True) == ["tune.num_samples: 1 -> 3"]

    other = dataclasses.replace(inputs, fingerprints={**inputs.fingerprints, "dataset": "f" * 64})
    wider = dataclasses.replace(spec, run=spec.run.with_overrides({"model.hidden_size": 64}))
    with pytest.raises(StudyError) as info:
        reconcile(record, spec_to_dict(wider), other, explicit_space=True)
    message = str(info.value)
    assert "model.hidden_size: 32 -> 64" in message and "dataset contents: " in message
    assert "-> ffffffffffff" in message
    assert "would be refused" in describe_resume(spec_to_dict(wider), paths)
    assert "without --space" in message  # (the space file given differs: the study's own would not)
    # Without --space the study's own space.yaml was read: the advice is never "without --space" again.
    for inputs_now, spec_now, advice in ((inputs, wider, "space.yaml was edited"), (other, spec, "input files back")):
        with pytest.raises(StudyError) as info:
            reconcile(record, spec_to_dict(spec_now), inputs_now, explicit_space=False)
        assert advice in str(info.value) and "without --space" not in str(info.value)


def test_rays_lines_about_its_own_restore_are_dropped_or_reworded(caplog: pytest.LogCaptureFixture) -> None:
    quiet_libraries()
    ray_tune = logging.getLogger("ray.tune.tune")
    with caplog.at_level(logging.WARNING):
        ray_tune.warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run. This will try to "
                         "checkpoint the experiment state one last time. Press CTRL+C (or send SIGINT/SIGKILL/"
                         "SIGTERM) to skip. ")
        ray_tune.warning("Experiment has been interrupted, but the most recent state was saved.\nResume "
                         "experiment with: Tuner.restore(path=%r, trainable=...)", "/x/run-1")
        ray_tune.warning("Trials did not complete: [train_trial_1, train_trial_2]")
        ray_tune.warning("any other warning")
        logging.getLogger("ray.tune.analysis.experiment_analysis").warning(
            "Failed to fetch metrics for 1 trial(s):\n- train_trial_1: FileNotFoundError('Could not fetch metrics')")
    assert [r.getMessage() for r in caplog.records] == [STOPPING, "any other warning"]


def test_describe_shows_the_plan() -> None:
    spec = load_space("sft")
    text = describe(spec)
    for param in spec.search:
        assert param.path in text
    assert "log-uniform [0.0001, 0.03]" in text
    assert "categorical {1, 2, 4}" in text
    assert "(max_t 2): after evaluation 1 a trial" in text  # (2 evaluations of one epoch)
    assert f"{spec.tune.num_samples} trials, at most {spec.tune.max_concurrent_trials} at once" in text
    assert "1 CPU, 0 GPU" in text
    assert "bundled demo dataset" in text and "bundled tokenizer" in text
    assert "*learning_rate" in text
    finalists = dataclasses.replace(spec.tune.finalists, top_k=2, seeds=1)
    spec = dataclasses.replace(spec, tune=dataclasses.replace(spec.tune, finalists=finalists))
    assert "finalists: the top 2 configs again with 1 more seed(s) each (2 trials of 1 epoch(s))" in describe(spec)


def test_describe_shows_the_rungs_inside_the_epoch_in_steps_and_fractions() -> None:
    # Issue 22: 1 epoch, 16 evaluations: rungs at evaluations 1, 2, 4, 8 (16 ends every trial).
    spec = load_space("sft")
    train = dataclasses.replace(spec.run.train, epochs=1, evals_per_epoch=16)
    sched = dataclasses.replace(spec.tune.scheduler, max_t=16)
    spec = dataclasses.replace(spec, run=dataclasses.replace(spec.run, train=train),
                               tune=dataclasses.replace(spec.tune, scheduler=sched))
    text = describe(spec, steps_per_epoch=160)
    assert "scheduler ASHA over evaluations (max_t 16): after evaluation 1, 2, 4, 8 a trial" in text
    assert "evaluations: 16 per epoch, after optimizer steps 10, 20, 30," in text
    for rung, fraction, step in ((1, "0.0625", 10), (2, "0.125", 20), (4, "0.25", 40), (8, "0.5", 80)):
        assert f"rung after evaluation {rung}: {fraction} epoch(s), optimizer step {step}\n" in text
    assert "about" not in describe(spec, steps_per_epoch=160).split("evaluations: 16")[1].split("\n")[0]
    assert "of about" in describe(spec)  # a dry run estimates the steps from the file's length
    few = describe(spec, steps_per_epoch=5)  # fewer steps than evaluations: the first one past the rung
    assert "rung after evaluation 1: 0.0625 epoch(s), optimizer step 1\n" in few
    assert "rung after evaluation 8: 0.5 epoch(s), optimizer step 3\n" in few
    assert expected_shape(4, sched, evals_per_epoch=16).trial_epochs <= 4  # trial-epochs, not evaluations


def test_expected_shape_follows_optunas_successive_halving() -> None:
    """One rung: the n-th trial continues with probability max(1, n // rf) / n, whatever the rankings;
    no scheduler: every trial completes; finalists train every epoch, one config per completed trial."""
    from tune.space import SchedulerSpec

    one_rung = SchedulerSpec(type="asha", grace_period=1, reduction_factor=3, max_t=3)
    exact = sum(max(1, n // 3) / n for n in range(1, 11))
    shape = expected_shape(10, one_rung, draws=20000)
    assert shape.completed == pytest.approx(exact, abs=0.05)
    assert shape.trial_epochs == pytest.approx(3 * exact + (10 - exact), abs=0.15)
    none = expected_shape(5, SchedulerSpec(type="none", max_t=4), top_k=3, seeds=2)
    assert (none.completed, none.trial_epochs) == (5, 5 * 4 + 3 * 2 * 4)
    assert expected_shape(1, one_rung, top_k=3, seeds=1).trial_epochs == 3 + 3  # (one config to re-run)


def test_the_default_study_compares_several_configs_in_a_few_minutes() -> None:
    """Issue 19: sft.yaml's ASHA (8 trials, 4 epochs, decisions after 1 and 2) expected ~2.4 completed
    trials and often left one: the finalists re-ran one config and rung fidelity was n/a. Its shape now
    leaves enough completed configs for rung fidelity (3) and finalists among 2, within the trial-epochs
    of about 3.5 minutes on 2 idle cores: 12 trials x 2 epochs deciding after epoch 1 (22 trial-epochs)
    took 5.4 minutes; one epoch deciding at its half keeps the shape in half the trial-epochs."""
    spec = load_space("sft.yaml")
    t, sched = spec.tune, spec.tune.scheduler
    shape = expected_shape(t.num_samples, sched, t.finalists.top_k, t.finalists.seeds,
                           evals_per_epoch=spec.run.train.evals_per_epoch)
    assert shape.completed >= 3 + 1, shape  # (with a margin: a run is one draw)
    assert t.finalists.top_k >= 2 and t.finalists.seeds >= 1
    assert sched.type == "asha" and any(r < sched.max_t for r in sched.rungs)  # a rung to measure fidelity at
    assert shape.trial_epochs <= 12, shape
    assert min(t.max_concurrent_trials, t.num_samples) * t.resources_per_trial.cpu <= 2
    assert f"expect about {shape.completed:.1f} of the {t.num_samples} trials to complete" in describe(spec)


def test_ray_tunes_traceback_of_an_os_error_while_stopping_a_trial_is_dropped() -> None:
    """A read-only study folder mid-study: Ray Tune logged "Error stopping trial." with ~110 lines of
    traceback beside the driver's one line; an error that is not the OS's keeps its traceback."""
    import errno
    import logging
    import sys

    from tune.preflight import quiet_libraries

    quiet_libraries()
    logger = logging.getLogger("ray.tune.execution.tune_controller")

    def logged(exc: BaseException) -> bool:
        try:
            raise RuntimeError("An exception is raised during the commit.") from exc
        except RuntimeError:
            record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "Trial %s: Error stopping trial.",
                                       ("t",), sys.exc_info())
        return bool(logger.filter(record))

    assert not logged(OSError(errno.EROFS, "Read-only file system", "/s/optuna.db-journal"))
    assert logged(ValueError("a bug in the searcher"))


def test_rays_unhandled_error_of_an_os_error_is_dropped_and_any_other_kept() -> None:
    """A study folder turned read-only while a trial saved its checkpoint: Ray's driver logged "Unhandled
    error ... ray::ImplicitFunc.train()" with the worker's traceback as text (~30 lines) beside the driver's
    one line. (The text as Ray 2.60 formats a RayTaskError.)"""
    import logging

    from tune.preflight import quiet_libraries

    quiet_libraries()
    logger = logging.getLogger("ray._private.worker")

    def logged(last_line: str) -> bool:
        text = ("Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1'): ray::ImplicitFunc.train() "
                "(pid=1, ip=127.0.0.1, repr=train_trial)\n  File \"tune/atomic.py\", line 59, in _remove\n"
                f"    path.unlink(missing_ok=True)\n{last_line}")
        return bool(logger.filter(logger.makeRecord(logger.name, logging.ERROR, __file__, 1, text, (), None)))

    assert not logged("OSError: [Errno 30] Read-only file system: '/s/runs/run-4/t003/.epoch_0003.1.tmp'")
    assert not logged("PermissionError: [Errno 13] Permission denied: '/s/runs'")
    assert logged("ValueError: a bug in the trainable")
    assert bool(logger.filter(logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "another error: [Errno 5]",
                                                (), None)))
