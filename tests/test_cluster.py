"""A study on a real multi-node Ray cluster, and the pieces of ``tune/cluster.py`` on their own.

The end-to-end test builds a two-node cluster on this machine (a head and a worker, each its own
``ray start --block`` process group with its own temp dir), submits a study with
``ray job submit --working-dir <repo>``, checks that trials ran on both nodes, that checkpoints
landed in the storage path and that MLflow holds one child run per trial, then SIGKILLs the worker
node mid-study and checks that its trials resumed from their checkpoints on the head and the job
still succeeded. Where this process may create mount namespaces (root), the worker node runs in one
whose token-cache folder is an empty tmpfs, so its trials must copy the cache from the storage.

Every process the test starts is ended in a ``finally``: by process group, then any survivor whose
command line names one of the test's own folders (Ray workers, the job's driver), by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tune.cluster import ClusterError, check_resources
from tune.space import Resources
from tune.study import Study

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

SPACE = """\
model: {hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
        max_position_embeddings: 128}
data: {train_path: null, tokenizer: null, max_seq_len: 64}
train: {epochs: EPOCHS, batch_size: 8, max_steps_per_epoch: 40, eval_batch_size: 32, dtype: float32,
        device: cpu, seed: 0, log_interval: 20}
search:
  train.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
tune:
  num_samples: 3
  max_concurrent_trials: 3
  seed: 0
  scheduler: {type: none}
  resources_per_trial: {cpu: 1, gpu: 0}
  searcher: optuna
  max_failures: 2
  keep_checkpoints: 20
  keep_top_trials: 3
mlflow:
  experiment: minimind-cluster-test
"""
EPOCHS = 5


# ---------------------------------------------------------------------------------------------------
# Fast checks of tune/cluster.py (no Ray cluster).


def test_check_resources_accepts_what_fits() -> None:
    check_resources(Resources(cpu=1, gpu=0), 1, {"CPU": 2.0})
    check_resources(Resources(cpu=2, gpu=0.25), 4, {"CPU": 16.0, "GPU": 1.0})
    check_resources(Resources(cpu=4, gpu=2), 1, {"CPU": 4.0, "GPU": 2.0})


@pytest.mark.parametrize(("cpu", "gpu", "available", "expected"), [
    (1, 0.25, {"CPU": 8.0}, ("tune.resources_per_trial.gpu=0.25", "no GPU")),
    (1, 1, {"CPU": 8.0, "GPU": 0.0}, ("tune.resources_per_trial.gpu=1", "no GPU")),
    (1, 2, {"CPU": 8.0, "GPU": 1.0}, ("tune.resources_per_trial.gpu=2", "only 1 GPU")),
    (4, 0, {"CPU": 2.0}, ("tune.resources_per_trial.cpu=4", "only 2 CPU")),
])
def test_check_resources_refuses_trials_that_could_never_start(
        cpu: float, gpu: float, available: dict[str, float], expected: tuple[str, ...]) -> None:
    with pytest.raises(ClusterError) as info:
        check_resources(Resources(cpu=cpu, gpu=gpu), 1, available)
    for part in expected:
        assert part in str(info.value)


def test_job_working_dir(monkeypatch):
    from tune.cluster import job_working_dir

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_working_dir() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    assert job_working_dir() == "gcs://_ray_pkg_x.zip"


def test_relative_storage_is_refused_under_job_submit(monkeypatch, capsys):
    from tune.run import main

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    assert main(["--space", "smoke.yaml", "--storage-path", "studies"]) == 2
    assert "temporary copy of the working dir" in capsys.readouterr().err


def test_rayignore_keeps_the_job_upload_small(tmp_path):
    """What `ray job submit --working-dir .` uploads: code, bundled assets, no envs/data/output."""
    import zipfile

    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "shared"))
    for junk in ("studies/s/trial_1/checkpoint_000000/model.pth", "runs/x/log.txt", "data/sft.jsonl",
                 "mlflow.db", "mlruns/0/meta.yaml", "ray_results/e/r.json", "tokens/a.npy"):
        (repo / junk).parent.mkdir(parents=True, exist_ok=True)
        (repo / junk).write_bytes(b"x" * 1000)
    for include_gitignore in (True, False):  # .rayignore alone suffices (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)
        target = tmp_path / f"pkg-{include_gitignore}.zip"
        create_package(str(repo), target, include_gitignore=include_gitignore,
                       excludes=get_runtime_env_default_excludes())
        names = [n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/")]
        assert "minimind_train/assets/demo/sft_demo.jsonl" in names
        assert "minimind_train/assets/tokenizer/tokenizer.json" in names
        assert "tune/run.py" in names and "search_spaces/smoke.yaml" in names
        bad = [n for n in names if n.split("/")[0] in {"studies", "runs", "data", "mlruns", "ray_results"}
               or n.endswith((".pth", ".db", ".npy")) or "__pycache__" in n]
        assert not bad, bad
        assert target.stat().st_size < 5 * 2**20


def test_storage_check_is_free_on_one_node(tmp_path):
    from tune.cluster import Node, check_storage

    node = Node("a" * 56, "10.0.0.1", "h")
    check_storage(str(tmp_path / "nowhere"), [node], driver=node.node_id)  # no Ray needed
    assert not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------------------------------
# The token cache and init_from on the study storage, and a node that cannot read the driver's folders.


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_a_node_without_the_driver_folders_copies_them_from_the_storage(tmp_path, monkeypatch, scheme):
    import dataclasses

    import numpy as np
    import torch

    from minimind_train.config import DataConfig, ModelConfig, RunConfig
    from minimind_train.data import DEMO_DATA_PATH, prepare_data
    from tune.cluster import ClusterError, Node, open_study_data, study_data

    driver_cache, jsonl = tmp_path / "driver-cache", tmp_path / "sft.jsonl"
    jsonl.write_text("".join(Path(DEMO_DATA_PATH).read_text().splitlines(keepends=True)[:40]))
    cfg = RunConfig(model=ModelConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, init_from=str(tmp_path / "init.pth")),
                    data=DataConfig(train_path=str(jsonl), max_seq_len=64, cache_dir=str(driver_cache)))
    torch.save({"w": torch.arange(10)}, tmp_path / "init.pth")
    data = prepare_data(cfg.data, show_progress=False)
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "node-default"))  # not ~/.cache's copy
    head, worker = (Node(c * 56, "10.0.0.1", "h") for c in "ab")
    storage = f"{scheme}{tmp_path / 'storage'}"

    alone = study_data(data, cfg, [head], head.node_id, storage)  # one node: nothing is copied
    assert alone.shared is None and not (tmp_path / "storage").exists()
    handle = study_data(data, cfg, [head, worker], head.node_id, storage)
    name = Path(handle.train_cache).name
    on_storage = tmp_path / "storage" / ".cache"
    assert sorted(p.name for p in on_storage.iterdir()) == sorted([name, f"init_from-{handle.init_sha256[:16]}"])
    assert (on_storage / name / "tokens.npy").read_bytes() == (driver_cache / name / "tokens.npy").read_bytes()
    # On the driver's node (and any node that reads its folders) trials map those, and nothing is copied.
    for opened in (alone, handle):
        got, train_cfg = open_study_data(opened, cfg)
        assert got.stats.cache_path == handle.train_cache and train_cfg == cfg
    assert not (tmp_path / "node-default").exists()
    # A second study with the same inputs finds them on the storage and copies nothing.
    written = (on_storage / name / "tokens.npy").stat().st_mtime_ns
    assert study_data(data, cfg, [head, worker], head.node_id, storage) == handle
    assert (on_storage / name / "tokens.npy").stat().st_mtime_ns == written

    # A node without the driver's folders: move them away, point the trial at its own cache dir.
    shutil.move(str(driver_cache), str(tmp_path / "gone"))
    (tmp_path / "init.pth").rename(tmp_path / "init-gone.pth")
    node_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "node")))
    got, train_cfg = open_study_data(handle, node_cfg)
    local = tmp_path / "node" / name
    assert got.stats.cache_path == str(local) and got.stats.cache_key == data.stats.cache_key
    assert np.array_equal(got.train.indices, data.train.indices)
    assert np.array_equal(np.asarray(got.train.cache.tokens), np.asarray(data.train.cache.tokens))
    assert Path(train_cfg.model.init_from).read_bytes() == (tmp_path / "init-gone.pth").read_bytes()
    assert train_cfg.model.init_from.startswith(str(tmp_path / "node"))
    assert train_cfg == dataclasses.replace(node_cfg, model=dataclasses.replace(
        node_cfg.model, init_from=train_cfg.model.init_from))
    # Once per node: a second trial maps the same copy without writing it again.
    before = (local / "tokens.npy").stat().st_mtime_ns
    again, _ = open_study_data(handle, node_cfg)
    assert again.stats.cache_path == str(local) and (local / "tokens.npy").stat().st_mtime_ns == before

    other_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "other")))
    # A damaged copy on the storage is named, not trained on.
    (on_storage / name / "meta.json").write_text("{")
    with pytest.raises(ClusterError, match=re.escape(f"copy {storage}/.cache/{name} does not open")):
        open_study_data(handle, other_cfg)
    # Started on one node, nothing on the storage: a later node names the folder it cannot read.
    with pytest.raises(ClusterError, match=re.escape(f"{tmp_path / 'driver-cache' / name} is not readable here")):
        open_study_data(alone, other_cfg)


# ---------------------------------------------------------------------------------------------------
# The two-node cluster.


class _Ports:
    """Distinct free TCP ports (and worker-port blocks) for the nodes of one test cluster."""

    def __init__(self) -> None:
        self.taken: set[int] = set()

    def _free(self, port: int) -> bool:
        if port in self.taken:
            return False
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return False
        return True

    def one(self) -> int:
        for _ in range(500):
            port = random.randint(20000, 45000)
            if self._free(port):
                self.taken.add(port)
                return port
        raise RuntimeError("no free port")

    def block(self, size: int = 100) -> int:
        for _ in range(100):
            start = random.randint(200, 449) * 100
            ports = range(start, start + size)
            if all(self._free(p) for p in ports[:: max(1, size // 10)]) and not self.taken & set(ports):
                self.taken.update(ports)
                return start
        raise RuntimeError("no free port block")


def _can_hide_folders() -> bool:
    """Whether a child may get a private mount namespace with a tmpfs over a folder (needs root)."""
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = tempfile.mkdtemp(prefix="rcns", dir="/tmp")
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs tmpfs {probe}"], check=False, capture_output=True,
                           timeout=20)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


class LocalCluster:
    """A head and worker nodes on this machine, each a ``ray start --block`` in its own process group."""

    def __init__(self, root: Path) -> None:
        from ray._private.services import get_node_ip_address

        self.root = root
        self.ip = get_node_ip_address()  # what Ray makes of --node-ip-address=127.0.0.1
        self.token = secrets.token_hex(32)
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # A private token: independent of ~/.ray/auth_token, and it exercises token auth.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # Declare a SIGKILLed node dead within seconds rather than Ray's default ~30s.
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "4",
            "RAY_health_check_initial_delay_ms": "1000",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray starts workers at nice 15; on a busy CI box the worker node's trial actors then
            # take so long to import torch that the head's reused actor runs every trial.
            "RAY_worker_niceness": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []
        self.ports = _Ports()
        self.gcs_port = self.ports.one()
        self.dashboard_port = self.ports.one()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], wrap: list[str] | None = None) -> subprocess.Popen:
        temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: unix socket paths are < 108 bytes
        self.temp_dirs.append(temp)
        port = self.ports.one
        worker_port = self.ports.block(100)
        cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               f"--temp-dir={temp}", f"--node-manager-port={port()}",
               f"--object-manager-port={port()}", f"--metrics-export-port={port()}",
               f"--dashboard-agent-listen-port={port()}",
               f"--dashboard-agent-grpc-port={port()}", f"--runtime-env-agent-port={port()}",
               f"--min-worker-port={worker_port}", f"--max-worker-port={worker_port + 99}",
               "--object-store-memory=200000000", *args]
        log = open(Path(temp) / "ray-start.log", "wb")  # noqa: SIM115 - lives as long as the node
        proc = subprocess.Popen((wrap or []) + cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None) -> subprocess.Popen:
        return self._start(["--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
                            f"--resources={json.dumps(resources or {})}",
                            f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                            f"--ray-client-server-port={self.ports.one()}", "--include-dashboard=true"])

    def start_worker(self, num_cpus: int, hide: list[Path] = ()) -> subprocess.Popen:
        """A worker node; each folder in ``hide`` is an empty tmpfs for it (a machine without it)."""
        args = [f"--address={self.ip}:{self.gcs_port}", f"--num-cpus={num_cpus}"]
        wrap = None
        if hide:
            mounts = " && ".join(f'mount -t tmpfs tmpfs "{h}"' for h in hide)
            wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$0" "$@"']
        return self._start(args, wrap)

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], check=False, env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)

    def nodes(self) -> list[dict]:
        try:
            r = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json", timeout=30)
        except subprocess.TimeoutExpired:
            return []
        if r.returncode != 0:
            return []
        try:
            return json.loads(r.stdout[r.stdout.index("["):])
        except ValueError:
            return []

    def wait_alive(self, n: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start exited with {proc.returncode}:\n{self.logs()}")
            alive = [x for x in self.nodes() if x.get("state") == "ALIVE"]
            if len(alive) >= n:
                return alive
            time.sleep(1)
        raise TimeoutError(f"{n} nodes not alive after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for temp in self.temp_dirs:
            with contextlib.suppress(OSError):
                out.append(f"--- {temp}\n" + (Path(temp) / "ray-start.log").read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def kill(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def ours(self, extra: list[str]) -> list[int]:
        """Live processes in our process groups or naming one of our folders (workers, the job driver)."""
        groups = {p.pid for p in self.procs}
        marks = [*self.temp_dirs, *extra]
        out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True,
                             check=True).stdout
        found = []
        for line in out.splitlines():
            parts = line.split(None, 3)
            if len(parts) < 3:
                continue
            pid, pgid, stat = int(parts[0]), int(parts[1]), parts[2]
            args = parts[3] if len(parts) > 3 else ""
            if stat.startswith("Z") or pid == os.getpid():
                continue
            if pgid in groups or any(m in args for m in marks):
                found.append(pid)
        return found

    def teardown(self, extra: list[str]) -> list[int]:
        """SIGKILL every process group we started, then any straggler of ours; returns survivors."""
        for proc in self.procs:
            self.kill(proc)
        for _ in range(3):
            left = self.ours(extra)
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(1)
        survivors = self.ours(extra)
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)
        return survivors


def _checkpoints(study: Path) -> dict[str, dict[int, str]]:
    """``{trial folder: {epoch: node id}}`` from the checkpoints that landed in the storage path."""
    out: dict[str, dict[int, str]] = {}
    for meta in study.glob("runs/run-*/t[0-9][0-9][0-9]/epoch_*/meta.json"):
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue  # being written
        out.setdefault(meta.parent.parent.name, {})[int(info["epoch"])] = info["ray"]["node_id"]
    return out


@contextlib.contextmanager
def _cluster(root: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(root)
    survivors: list[int] = []
    try:
        yield cluster
    finally:
        survivors = cluster.teardown(extra=[str(root)])
    assert not survivors, f"processes left behind: {survivors}"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_study_on_two_nodes_survives_losing_one():
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="mmcl-", dir="/tmp"))
    storage, cache, local_only = root / "storage", root / "cache", root / "local-only"
    for folder in (storage, cache, local_only):
        folder.mkdir()
    space = root / "cluster.yaml"
    space.write_text(SPACE.replace("EPOCHS", str(EPOCHS)))
    hide = _can_hide_folders()
    try:
        with _cluster(root) as cluster:
            # The head's two CPUs carry a marker resource, so a blocker job can hold exactly them.
            cluster.start_head(num_cpus=2, resources={"minimind_test_head": 1})
            cluster.wait_alive(1)
            worker = cluster.start_worker(num_cpus=2, hide=[cache, local_only] if hide else [])
            nodes = cluster.wait_alive(2)
            head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
            worker_id = next(n["node_id"] for n in nodes if not n["is_head_node"])
            # The test's own polling through Ray's job SDK (HTTP): a `ray job status` process every second
            # took a CPU second each from the trials on this 2-core machine. Users' commands stay the CLI.
            from ray.job_submission import JobSubmissionClient

            jobs = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})

            def submit(job: str, *args: str) -> None:
                r = cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", job,
                                "--no-wait", *args, timeout=120)
                assert r.returncode == 0, r.stdout + r.stderr

            def status(job: str) -> str:
                return str(jobs.get_job_status(job).value)

            def job_logs(job: str) -> str:
                return jobs.get_job_logs(job)

            if hide:  # a storage folder the worker node cannot see is refused before any trial
                bad = f"local-storage-{secrets.token_hex(4)}"
                submit(bad, "--working-dir", str(REPO), "--", sys.executable, "-m", "tune.run",
                       "--space", str(space), "--storage-path", str(local_only), "--name", "bad")

            # Hold the head's CPUs first: the first trials must start on the worker (otherwise the
            # head's warm, reused actor may run every trial before the worker's actors have imported
            # torch). That the study still starts also shows its driver reserves no CPU.
            blocker = jobs.submit_job(entrypoint=f"{sys.executable} -c 'import time; time.sleep(900)' {root}",
                                      entrypoint_num_cpus=2, entrypoint_resources={"minimind_test_head": 1})
            deadline = time.monotonic() + 60
            while status(blocker) != "RUNNING":
                assert time.monotonic() < deadline, job_logs(blocker)
                time.sleep(0.2)

            job = f"minimind-cluster-{secrets.token_hex(4)}"
            submit(job, "--working-dir", str(REPO),
                   "--runtime-env-json", json.dumps({"env_vars": {"MINIMIND_CACHE": str(cache)}}),
                   "--", sys.executable, "-m", "tune.run", "--space", str(space),
                   "--storage-path", str(storage), "--name", "cl")

            # A trial on the worker persists a checkpoint with epochs to go: free the head, kill the worker.
            study = storage / "cl"
            deadline = time.monotonic() + 240
            victim = None
            checked = time.monotonic()
            while victim is None:
                assert time.monotonic() < deadline, f"no worker checkpoint in time:\n{job_logs(job)}"
                if time.monotonic() - checked > 5:
                    assert status(job) in ("RUNNING", "PENDING"), job_logs(job)
                    checked = time.monotonic()
                for trial, epochs in _checkpoints(study).items():
                    if epochs and set(epochs.values()) == {worker_id} and max(epochs) <= EPOCHS - 2:
                        victim = trial
                        break
                else:
                    time.sleep(0.2)
            # Kill first: stopping the blocker job can take seconds, time in which the victim could
            # finish its remaining epochs (seen under load); its retry waits for the head's CPU.
            cluster.kill(worker)
            killed_at = _checkpoints(study)[victim]
            assert jobs.stop_job(blocker), job_logs(blocker)  # (it was running)

            deadline = time.monotonic() + 240
            while (state := status(job)) in ("RUNNING", "PENDING"):
                assert time.monotonic() < deadline, f"job still running:\n{job_logs(job)}"
                time.sleep(0.5)
            logs = job_logs(job)
            assert state == "SUCCEEDED", logs
            assert "best: trial" in logs, logs
            assert f"to {storage}/.cache/" in logs, logs  # the token cache, for the worker's trials
            if hide:
                assert status(bad) == "FAILED", job_logs(bad)
                bad_logs = job_logs(bad)
                assert f"--storage-path {local_only} is not visible from 1 of the 2 trial nodes" in bad_logs
                assert worker_id[:12] in bad_logs and "shared filesystem" in bad_logs, bad_logs
                assert not (local_only / "bad").exists()  # refused before Ray Tune wrote anything

            # Trials ran on both nodes; all checkpoints are in the storage path.
            ckpts = _checkpoints(study)
            assert len(ckpts) == 3, ckpts
            nodes_used = {n for epochs in ckpts.values() for n in epochs.values()}
            assert nodes_used == {head_id, worker_id}, (nodes_used, head_id, worker_id)
            for trial, epochs in ckpts.items():
                assert sorted(epochs) == list(range(1, EPOCHS + 1)), (trial, epochs)

            # The killed trial resumed from its checkpoint on the head instead of starting over.
            rows = [json.loads(line) for line in (study / "runs" / "run-1" / victim / "result.json").read_text().splitlines()
                    if line.strip()]
            trained = [r["epoch"] for r in rows if not r.get("restored")]
            restarted = [r for r in rows if r.get("restored")]  # Ray retried it: it continued from disk
            # No epoch trained twice, none lost. An epoch whose checkpoint the dying node wrote but whose report
            # died with it is reported by the retry from that checkpoint (marked restored), not trained again.
            assert len(trained) == len(set(trained)), rows
            assert sorted(set(trained) | {r["epoch"] for r in restarted}) == list(range(1, EPOCHS + 1)), rows
            assert sorted(Study.open(study).trial(int(victim[1:])).epochs) == list(range(1, EPOCHS + 1))
            assert restarted and restarted[0]["epoch"] >= max(killed_at), (rows, killed_at)
            assert all(ckpts[victim][e] == worker_id for e in killed_at), (killed_at, ckpts[victim])
            assert ckpts[victim][EPOCHS] == head_id, ckpts[victim]

            # MLflow (the driver's sqlite db in the study folder): one parent, one child per trial.
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
            exp = client.get_experiment_by_name("minimind-cluster-test")
            runs = client.search_runs([exp.experiment_id])
            parents = [r for r in runs if r.data.tags.get("minimind.role") == "parent"]
            assert len(parents) == 1 and parents[0].info.status == "FINISHED"
            children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
            assert sorted(f"t{int(r.data.tags['minimind.trial']):03d}" for r in children) == sorted(ckpts), children
            assert all(r.info.status == "FINISHED" for r in children), [r.info for r in children]
            victim_run = next(r for r in children if f"t{int(r.data.tags['minimind.trial']):03d}" == victim)
            history = client.get_metric_history(victim_run.info.run_id, "val_loss")
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), history
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"two-node study test: {time.monotonic() - started:.0f}s (cache hidden on worker: {hide})")


def test_space_fixture_is_valid(tmp_path):
    """The study the cluster test submits loads (so a failure there is about the cluster)."""
    from tune.space import load_space

    path = tmp_path / "cluster.yaml"
    path.write_text(textwrap.dedent(SPACE.replace("EPOCHS", str(EPOCHS))))
    spec = load_space(str(path))
    assert spec.tune.num_samples == 3 and spec.tune.max_failures >= 1


def test_current_node_outside_ray_starts_no_ray() -> None:
    import ray

    from tune.cluster import current_node

    assert not ray.is_initialized()
    assert current_node()["node_id"] == ""
    assert not ray.is_initialized()  # (get_runtime_context would have started a whole local Ray)
