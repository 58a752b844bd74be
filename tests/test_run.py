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
