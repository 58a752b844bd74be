"""Where a study's wall time and memory go: overhead outside training, start-up latency, RAM per trial.

    python benchmarks/study_overhead.py [--space search_spaces/sft.yaml] [--ray-temp-dir /tmp/mso]

Runs the study exactly as a user does (``python -m tune.run --space ...`` in a subprocess, a fresh
temporary storage folder, token cache and MLflow store, its own local Ray in a short temp dir), samples
the memory of the Ray workers that run its trials every ``--sample-interval`` seconds, reads the trials'
``result.json`` files afterwards and prints, each against its goal:

(a) overhead share: 1 - (sum over every reported epoch of epoch_seconds + val_seconds)
    / (study wall time x concurrent trials), where wall time runs from launching the command to its
    exit; goal <= 15 %.
(b) time to the first training step: from launching the command to the earliest
    ``time_epoch_start_unix`` of a trial's first epoch (the wall clock at its first optimizer step's
    start); goal <= 15 s.
(c) extra memory per additional concurrent trial: the peak unique set size (USS: private pages, what
    the machine gets back when the worker exits; shared library pages and the memory-mapped token
    cache are shared by every worker) of each trial's worker process, against model + gradients +
    AdamW state + 200 MB; its peak RSS (which counts shared pages once per worker) is printed too.

Only processes this script starts are ever ended (by process group); it never runs ``ray stop``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOAL_OVERHEAD = 0.15
GOAL_FIRST_STEP_S = 15.0
GOAL_EXTRA_MB = 200.0
TRIAL_TITLE = "ray::ImplicitFunc"  # a function trainable's actor (".train" while it runs a trial)


# ---------------------------------------------------------------------------------------------------
# /proc helpers (no psutil dependency).


def _ppid_map() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        out[int(entry)] = int(fields[1])
    return out


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def memory_mb(pid: int) -> dict[str, float] | None:
    """RSS, PSS and USS (private clean + dirty) of a process in MiB, from smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kb: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith(":") and parts[-1] == "kB":
            kb[parts[0][:-1]] = int(parts[1])
    if "Rss" not in kb:
        return None
    return {"rss": kb["Rss"] / 1024, "pss": kb.get("Pss", 0) / 1024,
            "uss": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024}


class MemorySampler(threading.Thread):
    """Peak memory of the Ray workers under ``root`` and when things first appeared, sampled periodically.

    A worker is titled ``ray::IDLE`` until it is given an actor, so a trial's worker is first seen idle
    while it deserialises the trainable (importing torch and the project); its peaks cover both phases.
    """

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.workers: dict[int, dict[str, float]] = {}  # every ray::IDLE / trial worker: peak memory
        self.trial_pids: set[int] = set()
        self.first_seen: dict[int, float] = {}
        self.ray_started = math.nan  # first time a raylet was seen
        self.max_concurrent = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            running = 0
            for pid in descendants(self.root):
                title = cmdline(pid)
                if "raylet" in title and math.isnan(self.ray_started):
                    self.ray_started = time.time()
                trial = title.startswith(TRIAL_TITLE)
                if not trial and not title.startswith("ray::IDLE"):
                    continue
                mem = memory_mb(pid)
                if mem is None:
                    continue
                self.first_seen.setdefault(pid, time.time())
                if trial:
                    self.trial_pids.add(pid)
                    running += 1
                peak = self.workers.setdefault(pid, dict.fromkeys(mem, 0.0))
                for k, v in mem.items():
                    peak[k] = max(peak[k], v)
            self.max_concurrent = max(self.max_concurrent, running)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    @property
    def trial_peaks(self) -> dict[int, dict[str, float]]:
        return {pid: m for pid, m in self.workers.items() if pid in self.trial_pids}

    @property
    def idle_peaks(self) -> dict[int, dict[str, float]]:
        """Workers that never ran a trial: Ray's own per-worker baseline."""
        return {pid: m for pid, m in self.workers.items() if pid not in self.trial_pids}

    @property
    def first_trial_worker(self) -> float:
        return min((self.first_seen[pid] for pid in self.trial_pids), default=math.nan)


# ---------------------------------------------------------------------------------------------------


def read_results(study_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(study_dir.glob("runs/run-*/t[0-9][0-9][0-9]/result.json")):
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def state_bytes(spec) -> tuple[int, int]:
    """(parameters, bytes of fp32 weights + gradients + AdamW's two moments) of the study's model."""
    import torch

    from minimind_train.model import MiniMindForCausalLM, count_parameters, model_config_from
    from minimind_train.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(spec.run.data.tokenizer))
    with torch.device("meta"):
        n = count_parameters(MiniMindForCausalLM(model_config_from(spec.run.model, vocab)))
    return n, 4 * 4 * n


def import_floor_mb() -> dict[str, float]:
    """USS of a fresh Python after importing torch, then the trainable (torch, Ray Tune, the project)."""
    code = ("import json, os, sys; sys.path.insert(0, sys.argv[1]); from study_overhead import memory_mb; "
            "out = {}; import torch; out['torch'] = memory_mb(os.getpid())['uss']; "
            "import tune.searcher; out['trainable'] = memory_mb(os.getpid())['uss']; print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=300)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {}


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="search_spaces/sft.yaml")
    p.add_argument("--ray-temp-dir", default=f"/tmp/mso{os.getpid()}",
                   help="temp dir of the study's local Ray (short: unix socket paths < 107 bytes)")
    p.add_argument("--sample-interval", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=1800.0, help="give up on the study after this long")
    p.add_argument("--warm-cache", action="store_true",
                   help="use the normal token cache (default: a fresh one, the cold start)")
    p.add_argument("--keep", help="copy the study folder here afterwards")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("extra", nargs="*", help="extra arguments for tune.run (after --)")
    args = p.parse_args(argv)

    from tune.space import load_space

    space = Path(args.space)
    spec = load_space(space if space.exists() else args.space)
    concurrency = min(spec.tune.max_concurrent_trials, spec.tune.num_samples)
    n_params, state = state_bytes(spec)

    work = Path(tempfile.mkdtemp(prefix="study-overhead-"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if not args.warm_cache:
        env["MINIMIND_CACHE"] = str(work / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "tune.run", "--space", str(args.space), "--name", "overhead",
           "--storage-path", str(work / "studies"), "--ray-temp-dir", args.ray_temp_dir, *args.extra]
    print("command:", " ".join(cmd), flush=True)
    log_path = work / "study.log"
    own_temp = not Path(args.ray_temp_dir).exists()
    launched = time.time()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = MemorySampler(proc.pid, args.sample_interval)
        sampler.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            os.killpg(proc.pid, signal.SIGTERM)  # our own process group only
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = -1
        finally:
            ended = time.time()
            sampler.stop()
            if own_temp:
                shutil.rmtree(args.ray_temp_dir, ignore_errors=True)
    wall = ended - launched
    study_dir = work / "studies" / "overhead"
    results = read_results(study_dir)
    if args.keep:
        shutil.copytree(work, args.keep, dirs_exist_ok=True)
    print(log_path.read_text()[-3000:] if rc else "", end="")
    if rc != 0 or not results:
        print(f"error: the study exited with {rc} and {len(results)} results (log: {log_path})", file=sys.stderr)
        return 1

    busy = sum(r.get("epoch_seconds", 0.0) + r.get("val_seconds", 0.0) for r in results)
    overhead = 1.0 - busy / (wall * concurrency)
    firsts = [r["time_epoch_start_unix"] for r in results
              if r.get("epoch") == 1 and "time_epoch_start_unix" in r]
    first_step = min(firsts) - launched if firsts else math.nan
    trials = sorted({r["trial_id"] for r in results})
    peaks = list(sampler.trial_peaks.values())
    uss = max((m["uss"] for m in peaks), default=math.nan)
    rss = max((m["rss"] for m in peaks), default=math.nan)
    idle_uss = max((m["uss"] for m in sampler.idle_peaks.values()), default=math.nan)
    goal_mb = state / 2**20 + GOAL_EXTRA_MB

    # Where the rest went: before the first step, after the last epoch, and gaps between epochs/trials.
    spans = sorted((r["time_epoch_start_unix"], r["time_epoch_start_unix"] + r.get("epoch_seconds", 0.0)
                    + r.get("val_seconds", 0.0)) for r in results if "time_epoch_start_unix" in r)
    last_end = max((e for _, e in spans), default=math.nan)
    tail_s = ended - last_end
    idle = wall * concurrency - busy
    between = idle - (first_step + tail_s) * concurrency
    floor = import_floor_mb()
    print(f"\nstudy: {args.space}, {len(trials)} trials, {len(results)} epochs reported, "
          f"{concurrency} concurrent; wall {wall:.1f} s; model {n_params:,} parameters")
    print(f"(a) overhead outside training/validation steps: {100 * overhead:.1f}% "
          f"(train+val {busy:.1f} s of {wall:.1f} s x {concurrency}) -- goal <= {100 * GOAL_OVERHEAD:.0f}%: "
          f"{verdict(overhead <= GOAL_OVERHEAD)}")
    print(f"    idle slot-seconds {idle:.1f}: start-up {first_step:.1f} s x {concurrency}, after the last epoch "
          f"{tail_s:.1f} s x {concurrency} (results, plots, MLflow, Ray shutdown), {between:.1f} between "
          f"(checkpoints, reports, trial hand-over, slots left idle by the scheduler)")
    print(f"(b) launch -> first training step: {first_step:.1f} s -- goal <= {GOAL_FIRST_STEP_S:.0f} s: "
          f"{verdict(first_step <= GOAL_FIRST_STEP_S)}")
    print(f"    a raylet first seen at {sampler.ray_started - launched:.1f} s (the driver's imports, data, "
          f"ray.init), the first trial's worker at {sampler.first_trial_worker - launched:.1f} s (Ray, MLflow, "
          f"Tuner start-up), its first step {first_step - (sampler.first_trial_worker - launched):.1f} s later "
          "(the worker's imports, data, model)")
    print(f"(c) extra memory per concurrent trial: peak USS {uss:.0f} MB (peak RSS {rss:.0f} MB) of "
          f"{len(peaks)} trial worker(s), at most {sampler.max_concurrent} at once; an idle Ray worker "
          f"{idle_uss:.0f} MB USS -- goal <= model+optimizer {state / 2**20:.1f} MB + {GOAL_EXTRA_MB:.0f} MB "
          f"= {goal_mb:.0f} MB: {verdict(uss <= goal_mb)}")
    if floor:
        print(f"    a fresh Python holds {floor.get('torch', math.nan):.0f} MB USS after importing torch and "
              f"{floor.get('trainable', math.nan):.0f} MB after importing the trainable (torch, Ray Tune, "
              "the project) -- before any model, data or activations")
    summary = {"space": str(args.space), "wall_s": wall, "concurrency": concurrency, "trials": len(trials),
               "epochs_reported": len(results), "train_val_s": busy, "overhead_share": overhead,
               "first_step_s": first_step, "tail_s": tail_s, "idle_between_s": between, "trial_peak_uss_mb": uss, "trial_peak_rss_mb": rss,
               "idle_worker_uss_mb": idle_uss, "import_floor_uss_mb": floor, "state_mb": state / 2**20, "memory_goal_mb": goal_mb,
               "ray_started_s": sampler.ray_started - launched,
               "trial_worker_started_s": sampler.first_trial_worker - launched,
               "workers": [{"pid": pid, "trial": pid in sampler.trial_pids, **m}
                           for pid, m in sampler.workers.items()]}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
