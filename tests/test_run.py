"""tune.run's own checks: study names and command-line overrides."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tune import run
from tune.record import StudyError


def test_overrides_are_validated_and_zero_budget_means_none() -> None:
    from tune.space import SpaceError, load_space

    spec = load_space("smoke")
    args = argparse.Namespace(num_samples=5, max_concurrent=3, time_budget_s=0.0)
    t = run._apply_overrides(spec, args).tune
    assert (t.num_samples, t.max_concurrent_trials, t.time_budget_s) == (5, 3, None)
    with pytest.raises(SpaceError, match="--num-samples=0"):
        run._apply_overrides(spec, argparse.Namespace(num_samples=0, max_concurrent=None, time_budget_s=None))
    with pytest.raises(SpaceError, match="--time-budget-s=-1"):
        run._apply_overrides(spec, argparse.Namespace(num_samples=None, max_concurrent=None, time_budget_s=-1.0))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../escape", ".hidden", "x\\y", "nl\nx"])
def test_a_study_name_is_one_folder_name(name: str) -> None:
    with pytest.raises(StudyError, match="is not allowed: a study name is one folder name"):
        run._check_name(name)


def test_ordinary_names_pass() -> None:
    for name in ("sft", "my study", "lr-sweep_2"):
        run._check_name(name)


def test_the_driver_quietens_ray_before_importing_it(tmp_path: Path) -> None:
    """Ray reads TUNE_WARN_THRESHOLD_S once, at import: set later, its slow-step advice still floods the view."""
    script = (
        "import sys, tune.preflight as p\n"
        "def stop(*args, **kwargs):\n"
        "    from ray.tune.utils.util import warn_if_slow\n"
        "    print('threshold', warn_if_slow.DEFAULT_THRESHOLD)\n"
        "    raise SystemExit(0)\n"
        "p.check_inputs = stop  # (the first step of a run that needs Ray)\n"
        "import tune.run\n"
        "sys.exit(tune.run.main(['--space', 'smoke.yaml', '--storage-path', sys.argv[1]]))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNE_")}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False, capture_output=True, text=True,
                         env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert "threshold 60.0" in out.stdout, out.stdout + out.stderr


def test_a_driver_killed_mid_rebuild_of_space_yaml_leaves_none_and_the_next_rebuilds_it(tmp_path: Path) -> None:
    """``--resume --name`` rebuilds a missing space.yaml from study.json; cut short, it left half a file,
    which the next ``--resume --name`` read as the study's space and refused."""
    import yaml
    from conftest import killed_mid_write

    from tune.record import StudyRecord
    from tune.storage import StudyPaths

    spec = {"model": {"hidden_size": 64}, "train": {"epochs": 3}, "tune": {"mode": "min", "metric": "val_loss"}}
    record = StudyRecord.create(tmp_path / "s", "s", spec, "", {})
    (record.dir / "space.yaml").unlink()
    killed_mid_write(f"""
        from tune import restart, run
        from tune.storage import StudyPaths
        settle = restart.finish_pending_restart
        def cut_after(folder):  # (the lock is taken: the next write is space.yaml's)
            settle(folder)
            cut()
        restart.finish_pending_restart = cut_after
        run._own_space(StudyPaths({str(tmp_path)!r}, "s"))
    """)
    rebuilt = run._own_space(StudyPaths(str(tmp_path), "s"))
    assert yaml.safe_load(rebuilt.read_text()) == spec
