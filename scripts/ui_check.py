"""``make ui-check``: a tiny study seen in the MLflow UI as a user sees it, in headless Chromium.

Runs ``search_spaces/smoke.yaml`` with 6 trials (so that ASHA stops some early) into a temporary
storage path, starts ``python -m tune.ui`` on a free port, opens the URL it prints in headless
Chromium and checks that the page lists every trial run with its objective value, best first.
Then it saves screenshots of the runs table, the chart view, the compare view and each plot in the
study run's artifacts into a folder that it prints. Needs Debian's ``chromium`` (``apt-get install
chromium``); it is not part of ``make test``. Exit status 0 when every check passed.

    python scripts/ui_check.py [--out DIR] [--num-samples N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "smoke.yaml"
WINDOW = "1600,1000"
BUDGET_MS = 20_000  # virtual time for the single-page app to fetch and render its data


def _chromium(*args: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("ui-check needs Chromium: apt-get install chromium")
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses root with its sandbox
    proc = subprocess.run([browser, "--headless", "--disable-gpu", "--hide-scrollbars", *sandbox,
                           f"--window-size={WINDOW}", f"--virtual-time-budget={BUDGET_MS}", *args],
                          capture_output=True, text=True, timeout=180, check=True)
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_ui(storage: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "tune.ui", "--storage-path", str(storage), "--port", str(port)]
    ui = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert ui.stdout is not None
    deadline = time.monotonic() + 300
    for line in ui.stdout:  # tune.ui prints the URL once the server answers
        print(line, end="")
        if line.startswith("MLflow UI: "):
            return ui, line.split()[2]
        if time.monotonic() > deadline:
            break
    ui.terminate()
    sys.exit(f"tune.ui printed no URL (exit {ui.wait()})")


def _text(dom: str) -> list[str]:
    return [t.strip() for t in re.sub(r"<[^>]+>", "\n", dom).splitlines() if t.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="screenshot folder (default: a new temp folder)")
    parser.add_argument("--num-samples", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ui-check-"))
    out = args.out or work / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    storage = work / "studies"
    print(f"running a tiny study into {storage} ...", flush=True)
    subprocess.run([sys.executable, "-m", "tune.run", "--space", str(SPACE), "--storage-path", str(storage),
                    "--num-samples", str(args.num_samples), "--ray-temp-dir", str(work / "ray")],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage / SPACE.stem / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([experiment.experiment_id])
    trials = sorted((r for r in runs if "minimind.trial" in r.data.tags),
                    key=lambda r: r.data.metrics["val_loss"])
    (parent,) = [r for r in runs if "minimind.trial" not in r.data.tags]

    ui, url = _start_ui(storage, _free_port())
    failures: list[str] = []
    try:
        text = _text(_chromium("--dump-dom", url))
        names = [r.info.run_name for r in trials]
        shown = [t for t in text if t in names]
        if shown != names:
            failures.append(f"runs table lists {shown}, expected every trial best first: {names}")
        for run in trials:
            if (value := repr(run.data.metrics["val_loss"])) not in text:
                failures.append(f"{run.info.run_name}: its val_loss {value} is not shown")
        if "val_loss" not in text:
            failures.append("no val_loss column")
        server = url.split("/#/")[0]
        ids = urllib.parse.quote(json.dumps([r.info.run_id for r in trials]))
        view = "workflowType=machine_learning"  # (other pages open in MLflow 3's GenAI view)
        pages = {
            "runs_table": url,
            "charts": f"{url}&compareRunsMode=CHART",
            "compare": f"{server}/#/compare-runs?runs={ids}&experiments=%5B%22{experiment.experiment_id}%22%5D"
                       f"&{view}",
        }
        for artifact in client.list_artifacts(parent.info.run_id, "plots"):
            pages[f"artifacts_{Path(artifact.path).stem}"] = (
                f"{server}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts/"
                f"{artifact.path}?{view}")
        if not any(page.startswith("artifacts_") for page in pages):
            failures.append("the study run has no plots/ artifacts")
        for page, page_url in pages.items():
            _chromium(f"--screenshot={out / page}.png", page_url)
            print(f"{page}: {page_url}")
    finally:
        ui.terminate()
        ui.wait(timeout=60)
        # Only the screenshots stay: the study and Ray's session files are tens of MB.
        for left in (storage, work / "ray") if args.out is None else (work,):
            shutil.rmtree(left, ignore_errors=True)
    print(f"screenshots: {out}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print("ui-check: " + ("failed" if failures else f"passed: {len(trials)} trials shown with their val_loss"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
