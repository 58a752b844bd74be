"""tune.run's own checks: study names and command-line overrides."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tune import run
from tune.study import StudyError


def test_overrides_are_validated_and_zero_budget_means_none() -> None:
    from tune.space import SpaceError, load_space

    spec = load_space("smoke")
    args = run._parse_args(["--num-samples", "5", "--max-concurrent", "3", "--time-budget-s", "0"])
    t = run._apply_overrides(spec, args).tune
    assert (t.num_samples, t.max_concurrent_trials, t.time_budget_s) == (5, 3, None)
    for flags, words in ((["--num-samples", "0"], (r"tune.num_samples=0 is not allowed: expected an integer >= 1 "
                                                   r"\(given as --num-samples=0\)")),
                         (["--max-concurrent", "0"], r"tune.max_concurrent_trials=0 .*--max-concurrent=0"),
                         (["--time-budget-s", "-1"], r"tune.time_budget_s=-1.0 is not allowed.*--time-budget-s=-1.0"),
                         (["--time-budget-s", "nan"], r"tune.time_budget_s=nan is not allowed")):
        with pytest.raises(SpaceError, match=words):
            run._apply_overrides(spec, run._parse_args(flags))


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

    from tune.storage import StudyPaths
    from tune.study import Study

    spec = {"model": {"hidden_size": 64}, "train": {"epochs": 3}, "tune": {"mode": "min", "metric": "val_loss"}}
    record = Study.create(tmp_path / "s", "s", spec, "", {})
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


def _stopped_by(exc: BaseException, after_trials: bool, record: Path = Path("/st/s/optuna.db")) -> BaseException:
    """``exc`` as main() meets it: raised in the trials (wrapped by experiment._closing) or before."""
    from tune.interrupts import StudyStopped

    if not after_trials:
        return exc
    try:
        raise StudyStopped("python -m tune.run --resume --name s --storage-path /st", record) from exc
    except StudyStopped as stopped:
        return stopped


@pytest.mark.parametrize(("exc", "after_trials", "code", "line"), [
    (KeyboardInterrupt(), False, 130, "interrupted before any trial started; the study is as it was"),
    (KeyboardInterrupt(), True, 130, "interrupted: continue with python -m tune.run --resume --name s"),
    (StudyError("a refusal"), False, 2, "error: a refusal"),
    (OSError(30, "Read-only file system", "/st/s/.best.yaml.1.tmp"), False, 2,
     "error: cannot write /st/s/.best.yaml.1.tmp (Read-only file system): make it writable"),
    (OSError(28, "No space left on device", "/st/s/x"), True, 1, "error: the disk holding /st/s/x is full"),
])
def test_what_stopped_the_driver_is_one_message_and_exit_status(exc: BaseException, after_trials: bool, code: int,
                                                                 line: str) -> None:
    message, status = run._stopped(_stopped_by(exc, after_trials), None)
    assert status == code and line in message and len(message.strip().splitlines()) == 1, message


def test_an_os_error_after_trials_ran_exits_like_an_interrupt_when_the_record_is_kept(tmp_path: Path) -> None:
    """A full disk (or a locked database) once trials ran leaves a study that --resume continues: the
    interrupted exit, 130; with its record gone (1 above) nothing can be continued."""
    (record := tmp_path / "optuna.db").write_bytes(b"")
    message, status = run._stopped(_stopped_by(OSError(28, "No space left on device", "/st/s/x"), True, record), None)
    assert status == 130 and "then continue with python -m tune.run --resume --name s" in message, message


def test_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(ValueError):
        run._stopped(_stopped_by(ValueError("a bug"), True), None)


def test_resume_with_a_storage_path_that_is_a_file_names_the_option(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The shared case storage-path-is-file: `--resume --name N` (the study's own space) said "lock file
    … File exists"."""
    afile = tmp_path / "afile"
    afile.write_text("I am a plain file\n")
    assert run.main(["--resume", "--name", "s", "--storage-path", str(afile)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --storage-path={afile}: {afile} is a file, not a folder", err
    assert sorted(tmp_path.iterdir()) == [afile] and afile.read_text() == "I am a plain file\n"


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_dry_run_says_a_run_would_be_refused_when_the_storage_path_is_a_file(
        tmp_path: Path, below: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The shared case storage-path-is-file: `--dry-run` printed a plan with its output under the file and
    said nothing of the refusal the run gives."""
    afile = tmp_path / "afile"
    afile.write_text("I am a plain file\n")
    storage = afile / below if below else afile
    assert run.main(["--space", "smoke.yaml", "--dry-run", "--no-forecast", "--storage-path", str(storage)]) == 0
    out = capsys.readouterr().out
    assert f"a run would be refused: --storage-path={storage}: {afile} is a file, not a folder" in out, out
    assert sorted(tmp_path.iterdir()) == [afile] and afile.read_text() == "I am a plain file\n"
    assert run.main(["--space", "smoke.yaml", "--dry-run", "--no-forecast", "--storage-path",
                     str(tmp_path / "studies")]) == 0
    assert "would be refused" not in capsys.readouterr().out


def test_names_and_paths_too_long_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A 240-byte study name on --restart, a storage path near PATH_MAX: tracebacks from the middle of a study."""
    with pytest.raises(StudyError, match="--name is too long"):
        run._check_name("n" * 240)
    run._check_name("n" * 200)
    from tune.storage import StudyPaths

    with pytest.raises(StudyError, match="too long .* choose a shorter --storage-path or --name"):
        run._check_length(StudyPaths(str(tmp_path / ("d" * 250) / ("e" * 250)) * 8, "s"))
    # SQLite opens no path of 512 bytes or more: a 530-byte storage path failed with a traceback after Ray
    # started ("unable to open database file"); every length it allows is one SQLite opens, journal included.
    with pytest.raises(StudyError, match=r"too long \(\d+ bytes; at most \d+, so that SQLite can open"):
        run._check_length(StudyPaths(str(tmp_path / ("d" * 250) / ("e" * 250)), "s"))
    import sqlite3

    longest = Path("/" + "/".join(["f" * 200] * 3))
    longest = Path(str(tmp_path / longest.relative_to("/"))[: run._DIR_MAX])
    run._check_length(StudyPaths(str(longest.parent), longest.name))
    for folder in (longest, longest.with_name(f".{longest.name}.replaced-20261207-120000")):
        folder.mkdir(parents=True)
        with contextlib.closing(sqlite3.connect(folder / "optuna.db")) as db, db:  # (a journal is written)
            db.execute("CREATE TABLE t (a)")


def _read_only(folder: Path) -> bool:
    """Make ``folder`` read-only for root too (a read-only bind mount); False where that is not allowed."""
    done = subprocess.run(["mount", "--bind", str(folder), str(folder)], check=False, capture_output=True)
    if done.returncode != 0:
        return False
    if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=False, capture_output=True).returncode:
        subprocess.run(["umount", str(folder)], check=False, capture_output=True)
        return False
    return True


def test_resume_of_a_read_only_study_is_one_line_and_changes_nothing(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The shared case readonly-study-folder: 48- and 106-line tracebacks (root ignores file modes: a
    read-only bind mount, as the case did)."""
    from study_driver import folder_digest

    from tune.space import load_space, spec_to_dict, spec_to_yaml
    from tune.study import Study

    spec = load_space("smoke")
    record = Study.create(tmp_path / "s", "s", spec_to_dict(spec), spec_to_yaml(spec, "Study s"), {})
    before = folder_digest(record.dir)
    if not _read_only(record.dir):
        pytest.skip("a read-only bind mount needs root")
    try:
        rc = run.main(["--resume", "--name", "s", "--storage-path", str(tmp_path)])
    finally:
        subprocess.run(["umount", str(record.dir)], check=False, capture_output=True)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert f"the study folder {record.dir}: cannot write in {record.dir} (Read-only file system)" in err, err
    assert folder_digest(record.dir) == before


def _damage_record(record: Path, how: str) -> None:
    if how == "deleted":
        record.unlink()
    else:  # cut to nothing, or to half its size (optuna#2722's siblings)
        os.truncate(record, 0 if how == "empty" else record.stat().st_size // 2)


@pytest.mark.parametrize("mode", ["--resume", "--restart"])
@pytest.mark.parametrize("how", ["empty", "half", "deleted"])
def test_a_damaged_or_deleted_record_is_one_line_and_changes_nothing(tmp_path: Path, how: str, mode: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The shared case optuna-db-truncated-deleted (a-d): optuna.db cut to 0 bytes, to half, or deleted
    before a run; --resume and --restart refuse it in one line naming it, exit 2, the folder untouched
    (--restart replaces only a study it can read: the checkpoints in runs/ stay)."""
    from study_driver import folder_digest

    from tune.lock import StudyLock
    from tune.space import load_space, spec_to_dict, spec_to_yaml
    from tune.study import Study

    spec = load_space("smoke")
    record = Study.create(tmp_path / "s", "s", spec_to_dict(spec), spec_to_yaml(spec, "Study s"), {})
    (record.dir / "runs" / "run-1" / "t000" / "epoch_0001").mkdir(parents=True)
    (record.dir / "runs" / "run-1" / "t000" / "epoch_0001" / "meta.json").write_text("{}")
    record.storage.engine.dispose()
    _damage_record(record.dir / "optuna.db", how)
    before = folder_digest(record.dir)
    space = ["--space", "smoke"] if mode == "--restart" else []
    rc = run.main([mode, *space, "--name", "s", "--storage-path", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and not out, out + err
    assert str(record.dir / "optuna.db") in err and "Traceback" not in out + err, err
    assert ("is missing" if how == "deleted" else "is not an Optuna database") in err, err
    assert folder_digest(record.dir) == before and not StudyLock.held(record.dir)
