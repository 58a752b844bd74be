"""The cost forecast against the real thing: the ``forecast:`` line and the first ETA of real studies, side by
side with their actual wall time (issue 22, items 3 and 4; benchmarks/README.md section 7).

    python benchmarks/forecast_accuracy.py [--cases default,evals8,alpaca] [--searcher-seeds 0,1,2] [--out figures.json]

Each case runs ``python -m tune.run --space CASE.yaml --time-budget-s 0`` (no budget: the whole study is
compared) in a subprocess, with its own storage folder, token cache, MLflow store and local Ray in a
temporary folder, and timestamps every line it prints. Compared:

* forecast: the seconds on the ``forecast:`` line against the time from that line to the driver's exit (the
  forecast is made once the inputs are checked, before Ray starts: it forecasts the rest); goal +-25 %.
* ETA: the ETA on the first line that reports a trial's evaluation (``tNNN epoch 1/2 ...; ETA H:MM:SS``, or
  ``tNNN evaluation 1/8 ...``) against the time from that line to the exit; goal +-35 %.

Cases: ``default`` (search_spaces/sft.yaml as shipped); ``evals8`` (the same with 1 epoch and
``train.evals_per_epoch: 8``: ASHA's rungs at 1, 2, 4 evaluations); ``alpaca`` (the default study's model on
the first ``ALPACA_LINES`` pairs of ``../shared/data/alpaca_zh_20k.jsonl``, whole epochs of it as a user trains
them, 200 validation samples, 6 trials; skipped when ../shared is absent). (Until 2026-12-08 the alpaca case
capped each epoch at 40 optimizer steps instead: an epoch then held 1, 2 or 4 times the data as the searched
accumulation drew 1, 2 or 4, so its cost was the searcher's draw, not a property of the study; a real epoch's
cost does not follow the accumulation.) Only processes this script
starts are ever ended (by process group); it never runs ``ray stop``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "alpaca_zh_20k.jsonl"
GOAL_FORECAST, GOAL_ETA = 0.25, 0.35
_HMS = r"(\d+):(\d\d):(\d\d)"


def seconds(hms: str) -> float:
    """``H:MM:SS`` (as tune.forecast and the live view print it) in seconds."""
    h, m, s = (int(x) for x in re.fullmatch(_HMS, hms).groups())  # type: ignore[union-attr]
    return h * 3600 + m * 60 + s


ALPACA_LINES = 1600


def case_space(name: str, work: Path) -> dict[str, Any] | None:
    """The space of case ``name`` (a dict; data files it needs are written under ``work``), None when its data
    is absent."""
    raw = yaml.safe_load((REPO / "search_spaces" / "sft.yaml").read_text(encoding="utf-8"))
    if name == "evals8":
        raw["train"].update(epochs=1, evals_per_epoch=8)
    elif name == "alpaca":
        if not SHARED_DATA.is_file():
            return None
        subset = work / f"alpaca_zh_{ALPACA_LINES}.jsonl"
        with SHARED_DATA.open(encoding="utf-8") as f:
            subset.write_text("".join(line for _, line in zip(range(ALPACA_LINES), f)), encoding="utf-8")
        raw["data"].update(train_path=str(subset), max_seq_len=256, val_max_samples=200)
        raw["tune"].update(num_samples=6)
    elif name != "default":
        raise SystemExit(f"--cases: unknown case {name!r} (default, evals8, alpaca)")
    return raw


def parse(lines: list[tuple[float, str]]) -> dict[str, Any]:
    """From a run's timestamped lines: the forecast's seconds and when it was printed, the first evaluation
    line's ETA and when, and the exit time (the last line's)."""
    out: dict[str, Any] = {"exit_s": lines[-1][0] if lines else None}
    for t, line in lines:
        if line.startswith("forecast: ") and (m := re.match(rf"forecast: {_HMS} ", line)):
            out.update(forecast_s=seconds(":".join(m.groups())), forecast_at=t, forecast_line=line)
        elif "eta_at" not in out and re.search(r"\] t\d+ (epoch|evaluation) \d+/\d+ .*ETA " + _HMS, line):
            m = re.search(r"ETA " + _HMS, line)
            out.update(eta_s=seconds(":".join(m.groups())), eta_at=t, eta_line=line)  # type: ignore[union-attr]
    return out


def run_case(name: str, raw: dict[str, Any], work: Path) -> dict[str, Any]:
    space = work / f"{name}.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "MINIMIND_CACHE": str(work / "cache"),
           "MINIMIND_TUNE_FORECAST": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "tune.run", "--space", str(space), "--storage-path", str(work / "studies"),
           "--ray-temp-dir", str(work / f"ray-{name}"), "--time-budget-s", "0"]
    load = os.getloadavg()
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        with (work / f"{name}.log").open("w", encoding="utf-8") as log:  # (as it goes: a long case can be watched)
            for line in proc.stdout:
                lines.append((time.monotonic() - t0, line.rstrip("\n")))
                log.write(f"{lines[-1][0]:8.1f} {lines[-1][1]}\n")
                log.flush()
        code = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGINT)  # (our own process group only)
        proc.wait(timeout=60)
        raise
    lines.append((time.monotonic() - t0, f"(exit {code})"))
    row = {"case": name, "code": code, "load_before": [round(x, 2) for x in load],
           "load_after": [round(x, 2) for x in os.getloadavg()], **parse(lines)}
    if code != 0:
        row["tail"] = [s for _, s in lines[-8:]]
    if "forecast_at" in row:
        row["actual_s"] = row["exit_s"] - row["forecast_at"]
        row["forecast_err"] = row["forecast_s"] / row["actual_s"] - 1
    if "eta_at" in row:
        row["remaining_s"] = row["exit_s"] - row["eta_at"]
        row["eta_err"] = row["eta_s"] / row["remaining_s"] - 1
    return row


def show(row: dict[str, Any]) -> str:
    if "forecast_s" not in row:
        return f"{row['case']:8}  no forecast line (exit {row['code']}): {row.get('tail')}"
    text = f"{row['case']:8}  forecast {row['forecast_s']:6.0f} s"
    if "actual_s" in row:
        ok = "ok" if abs(row["forecast_err"]) <= GOAL_FORECAST else "MISSED"
        text += f"  actual {row['actual_s']:6.0f} s  {row['forecast_err']:+6.1%} ({ok})"
    else:
        text += "  (forecast only)"
    if "eta_err" in row:
        ok = "ok" if abs(row["eta_err"]) <= GOAL_ETA else "MISSED"
        text += (f" | first ETA {row['eta_s']:5.0f} s at {row['eta_at']:5.0f} s, remaining {row['remaining_s']:5.0f} s "
                 f"{row['eta_err']:+6.1%} ({ok})")
    return text + f" | load {row['load_before'][0]:.1f} -> {row['load_after'][0]:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="default,evals8,alpaca")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, studies)")
    p.add_argument("--searcher-seeds", default="",
                   help="comma-separated tune.seed values: each case once per seed (named CASE-sN); a study's "
                        "trials are a draw, so one run of a case is one sample of the forecast's error")
    args = p.parse_args()
    seeds = [int(x) for x in args.searcher_seeds.split(",") if x] or [None]
    work = Path(tempfile.mkdtemp(prefix="mfa"))
    rows = []
    try:
        for case in args.cases.split(","):
            for seed in seeds:
                raw = case_space(case, work)
                if raw is None:
                    print(f"{case:8}  skipped: {SHARED_DATA} is absent", flush=True)
                    break
                name = case if seed is None else f"{case}-s{seed}"
                if seed is not None:
                    raw["tune"]["seed"] = seed
                row = run_case(name, raw, work)
                rows.append(row)
                print(show(row), flush=True)
                print(f"          {row.get('forecast_line', '')}", flush=True)
    finally:
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1), encoding="utf-8")
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
