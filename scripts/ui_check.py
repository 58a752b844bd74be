"""``make ui-check``: a tiny study seen in the MLflow UI as a user sees it, in headless Chromium.

Runs ``search_spaces/smoke.yaml`` with 6 trials (so that ASHA stops some early) into a temporary
storage path, starts ``python -m tune.ui`` on a free port and opens the URLs it prints in headless
Chromium, driven over the DevTools protocol so that each page is waited on until it has rendered (the
single-page app fetches and draws after the page loads) and a page still loading after a minute and a
half is a failure. It checks that the runs table lists every trial run with its objective value, grouped
by config, best mean first, and states the answer with no click (the study's run named after it, the
answer's config as the first group with its mean over seeds); that the chart view draws its charts (no loading spinner left in view); that the compare view
tune.ui prints holds the trials only, drawn over the searched parameters and the objective; and that
each plot in the study run's artifacts shows; then that ``tune.ui --dashboard`` (Optuna's dashboard)
lands on the study's note stating the answer and draws the study's history. The screenshots, taken
of what was checked, go to a folder that it prints. Needs Debian's ``chromium`` (``apt-get install
chromium``); it is not part of ``make test``. Exit status 0 when every check passed.

    python scripts/ui_check.py [--out DIR] [--num-samples N] [--study-dir DIR] [--page-timeout S]
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "smoke.yaml"
WINDOW = (1600, 1000)
PAGE_TIMEOUT_S = 90.0  # for a page to render, on a busy 2-core machine
# What a page shows now: loading indicators in view (MLflow's design system names their classes
# ``*-spin-spinning`` and ``*-skeleton``), Plotly charts drawn, their axis titles, fetched images shown
# (the artifact viewer shows a file by an object URL: ``blob:``), and the whole DOM.
_STATE_JS = """(() => {
  const inView = e => { const r = e.getBoundingClientRect();
                        return r.width > 0 && r.bottom > 0 && r.top < innerHeight && r.right > 0 && r.left < innerWidth; };
  return {loading: [...document.querySelectorAll('[class*="-spin-spinning"], [class*="-skeleton"]')].filter(inView).length,
          charts: [...document.querySelectorAll('.js-plotly-plot')].filter(inView).length,
          axes: [...document.querySelectorAll('.js-plotly-plot .axis-title')].map(e => e.textContent),
          images: [...document.images].filter(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0
                                                   && inView(i)).length,
          dom: document.documentElement.outerHTML};
})()"""


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no
    port, no websocket client needed): messages are JSON, each ended by a NUL byte."""

    def __init__(self, page_timeout_s: float = PAGE_TIMEOUT_S) -> None:
        self.page_timeout_s = page_timeout_s
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            sys.exit("ui-check needs Chromium: apt-get install chromium")
        sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses root with its sandbox
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()

        def as_fds_3_and_4() -> None:  # (Chromium reads fd 3, writes fd 4; dup first: a pipe end may be 3 or 4)
            read, write = os.dup(to_browser), os.dup(from_browser)
            os.dup2(read, 3)
            os.dup2(write, 4)

        # Only fds 0-4 are inherited: Python opens every other one non-inheritable.
        self.proc = subprocess.Popen([browser, "--headless", "--disable-gpu", "--hide-scrollbars", *sandbox,
                                      f"--window-size={WINDOW[0]},{WINDOW[1]}", "--remote-debugging-pipe"],
                                     # (the child only dups fds: it takes no lock a thread may hold)
                                     preexec_fn=as_fds_3_and_4, close_fds=False,  # noqa: PLW1509
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id = b"", 0

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are skipped)."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                if not (chunk := os.read(self._in, 1 << 20)):
                    raise RuntimeError(f"Chromium exited (status {self.proc.poll()}) during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"Chromium: {method}: {reply['error']}")
                return dict(reply["result"])

    def look(self, url: str, screenshot: Path, ready: Callable[[dict[str, Any]], bool]) -> tuple[bool, dict[str, Any]]:
        """Open ``url`` in a new tab, wait until ``ready(state)`` holds twice in a row (half a second
        apart) or ``page_timeout_s`` passed, save a screenshot of what it shows then; whether it
        got ready, and the page's state (see ``_STATE_JS``)."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        try:
            self.call("Emulation.setDeviceMetricsOverride", session, width=WINDOW[0], height=WINDOW[1],
                      deviceScaleFactor=1, mobile=False)
            self.call("Page.navigate", session, url=url)
            deadline, streak, state = time.monotonic() + self.page_timeout_s, 0, {}
            while streak < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
                result = self.call("Runtime.evaluate", session, expression=_STATE_JS, returnByValue=True)["result"]
                # (no value while a page is being replaced, e.g. on an error page)
                state = {"loading": 0, "charts": 0, "axes": [], "images": 0, "dom": "", **(result.get("value") or {})}
                streak = streak + 1 if ready(state) else 0
            screenshot.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", session, format="png")["data"]))
            return streak >= 2, state
        finally:
            self.call("Target.closeTarget", targetId=target)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        os.close(self._in)
        os.close(self._out)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_ui(storage: Path, study: str, port: int, *extra: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """``tune.ui`` serving ``study``, and the URLs it prints by what they are (``MLflow UI``, ``compare the
    trials``, ``Optuna dashboard``) once its server answers."""
    command = [sys.executable, "-m", "tune.ui", "--storage-path", str(storage), "--study", study, "--port", str(port),
               *extra]
    ui = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert ui.stdout is not None
    urls: dict[str, str] = {}
    deadline = time.monotonic() + 300
    for line in ui.stdout:
        print(line, end="")
        if match := re.match(r"(MLflow UI|compare the trials|Optuna dashboard): (\S+)", line):
            urls[match[1]] = match[2]
        elif line.startswith("(") and urls:  # its last line
            return ui, urls
        if time.monotonic() > deadline:
            break
    ui.terminate()
    sys.exit(f"tune.ui printed no URL (exit {ui.wait()})")


def _text(dom: str) -> list[str]:
    return [t.strip() for t in re.sub(r"<[^>]+>", "\n", dom).splitlines() if t.strip()]


def _run_study(work: Path, num_samples: int) -> Path:
    storage = work / "studies"
    print(f"running a tiny study into {storage} ...", flush=True)
    subprocess.run([sys.executable, "-m", "tune.run", "--space", str(SPACE), "--storage-path", str(storage),
                    "--num-samples", str(num_samples), "--ray-temp-dir", str(work / "ray")],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return storage / SPACE.stem


def check(study_dir: Path, out: Path, page_timeout_s: float = PAGE_TIMEOUT_S) -> Iterator[str]:
    """Serve ``study_dir`` with tune.ui, look at its pages, save their screenshots in ``out``; the failures."""
    browser = Chromium(page_timeout_s)
    try:
        yield from _check_mlflow(study_dir, out, browser, page_timeout_s)
        yield from _check_dashboard(study_dir, out, browser, page_timeout_s)
        print(f"pages: {', '.join(sorted(p.stem for p in out.glob('*.png')))}")
    finally:
        browser.close()


def _check_mlflow(study_dir: Path, out: Path, browser: Chromium, page_timeout_s: float) -> Iterator[str]:
    """The MLflow UI: its runs table, charts, the trials' comparison and the study run's plots."""
    from mlflow.tracking import MlflowClient

    spec = json.loads((study_dir / "study.json").read_text(encoding="utf-8"))["spec"]
    metric, searched = spec["tune"]["metric"], list(spec["search"])
    client = MlflowClient(tracking_uri=f"sqlite:///{study_dir / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([experiment.experiment_id])
    trials = sorted((r for r in runs if "minimind.trial" in r.data.tags and metric in r.data.metrics),
                    key=lambda r: r.data.metrics[metric])
    (parent,) = [r for r in runs if "minimind.trial" not in r.data.tags]
    # The runs table groups the trials by config (a config's seeds together), best mean first.
    groups: dict[str, list[Any]] = {}
    for run in sorted(trials, key=lambda r: r.data.metrics[f"best_{metric}"]):
        groups.setdefault(run.data.tags["minimind.config"], []).append(run)
    ranked = sorted(groups.values(), key=lambda g: sum(r.data.metrics[f"best_{metric}"] for r in g) / len(g))
    names = [r.info.run_name for group in ranked for r in group]

    ui, urls = _start_ui(study_dir.parent, study_dir.name, _free_port())
    try:
        url = urls["MLflow UI"]
        ready, state = browser.look(url, out / "runs_table.png", lambda s: all(n in s["dom"] for n in names)
                                    and not s["loading"])
        text = _text(state["dom"])
        shown = [t for t in text if t in names]
        if not ready:
            yield f"runs table: not shown after {page_timeout_s:.0f} s"
        elif shown != names:
            yield f"runs table lists {shown}, expected every trial best first: {names}"
        for run in trials:
            if (value := repr(run.data.metrics[metric])) not in text:
                yield f"{run.info.run_name}: its {metric} {value} is not shown"
        if metric not in text:
            yield f"no {metric} column"
        yield from _check_answer(text, parent, {r.info.run_id: r for r in trials}, metric)

        ready, state = browser.look(f"{url}&compareRunsMode=CHART", out / "charts.png",
                                    lambda s: s["charts"] > 0 and not s["loading"])
        if not ready:
            yield (f"charts: not drawn after {page_timeout_s:.0f} s ({state.get('loading')} loading indicators and "
                   f"{state.get('charts')} charts in view)")

        # The compare view tune.ui prints: the trials alone, over the searched values and the objective.
        if (compare := urls.get("compare the trials")) is None:
            yield "tune.ui printed no compare URL"
        else:
            ready, state = browser.look(compare, out / "compare.png", lambda s: bool(s["axes"]))
            if not ready:
                yield f"compare view: not drawn after {page_timeout_s:.0f} s"
            elif sorted(state["axes"]) != sorted([*searched, metric]):
                yield f"compare view draws axes {state['axes']}, expected the searched ones and {metric}: {searched}"
            if ready and f"Comparing {len(trials)} Runs" not in state["dom"]:
                yield f"compare view does not compare the {len(trials)} trials alone"

        server, view = url.split("/#/")[0], "workflowType=machine_learning"  # (MLflow 3's GenAI view otherwise)
        plots = client.list_artifacts(parent.info.run_id, "plots")
        if not plots:
            yield "the study run has no plots/ artifacts"
        for artifact in plots:
            page = f"{server}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts/" \
                   f"{artifact.path}?{view}"
            ready, state = browser.look(page, out / f"artifacts_{Path(artifact.path).stem}.png",
                                        lambda s: s["images"] > 0 and not s["loading"])
            if not ready:
                yield f"{artifact.path}: not shown after {page_timeout_s:.0f} s"
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def _check_answer(text: list[str], parent: Any, trials: dict[str, Any], metric: str) -> Iterator[str]:
    """The landing page states the answer: the study's run named after it, and the answer's config as a
    group whose row holds its mean over seeds (else its value), with no click."""
    if parent.info.run_name not in text:
        yield f"the study's run {parent.info.run_name!r} (naming the answer) is not shown"
    best = trials.get(parent.data.tags.get("minimind.best_run_id", ""))
    if best is None:
        yield "the study's run names no best trial run (minimind.best_run_id)"
        return
    label = f"Group: {best.data.tags['minimind.config']}"
    mean = parent.data.metrics.get(f"best_mean_{metric}", best.data.metrics[f"best_{metric}"])
    if label not in text:
        yield f"the answer's config {label!r} is not shown"
        return
    # First, best mean first; its row holds the mean (MLflow shows the full float; the grid draws the
    # name column apart from the metric columns, so the value is looked for among all cells).
    if [t for t in text if t.startswith("Group: ")][:1] != [label]:
        yield f"the answer's config {label!r} is not the first group"
    if not any(re.fullmatch(r"[-+]?\d+\.\d+(e[-+]?\d+)?", cell) and math.isclose(float(cell), mean, rel_tol=1e-9)
               for cell in text):
        yield f"the answer's mean best_{metric} {mean!r} is not shown"


def _check_dashboard(study_dir: Path, out: Path, browser: Chromium, page_timeout_s: float) -> Iterator[str]:
    """``tune.ui --dashboard``: it lands on the study's note, which states the answer of best.yaml and
    the command that trains it again, and the study's page draws its history."""
    best = (study_dir / "best.yaml").read_text(encoding="utf-8").splitlines()[0].removeprefix("# ")
    command = f"python -m minimind_train.sft --config {study_dir / 'best.yaml'}"
    ui, urls = _start_ui(study_dir.parent, study_dir.name, _free_port(), "--dashboard")
    try:
        note = urls["Optuna dashboard"]
        ready, state = browser.look(note, out / "dashboard_note.png", lambda s: "the answer" in s["dom"]
                                    and not s["loading"])
        if not ready or best not in state["dom"] or command not in state["dom"]:
            yield f"dashboard: {note} does not show the answer ({best!r} and {command!r}) as the study's note"
        ready, state = browser.look(note.removesuffix("/note"), out / "dashboard_study.png",
                                    lambda s: s["charts"] > 0 and not s["loading"])
        if not ready:
            yield f"dashboard: the study's page drew no chart after {page_timeout_s:.0f} s"
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="screenshot folder (default: a new temp folder)")
    parser.add_argument("--num-samples", type=int, default=6)
    parser.add_argument("--study-dir", type=Path, help="look at this finished study (with its own mlflow.db) "
                        "instead of running one")
    parser.add_argument("--page-timeout", type=float, default=PAGE_TIMEOUT_S,
                        help=f"seconds a page may take to render (default: {PAGE_TIMEOUT_S:.0f})")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ui-check-"))
    out = args.out or work / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    try:
        failures = list(check(args.study_dir.resolve() if args.study_dir else _run_study(work, args.num_samples),
                              out, args.page_timeout))
    finally:
        # Only the screenshots stay: the study and Ray's session files are tens of MB.
        for left in (work / "studies", work / "ray") if args.out is None else (work,):
            shutil.rmtree(left, ignore_errors=True)
    print(f"screenshots: {out}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print("ui-check: " + ("failed" if failures else "passed: the runs table, charts, the trials' comparison, "
                                                      "the plots and the dashboard's note are shown"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
