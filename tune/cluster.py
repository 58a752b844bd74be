"""How a study fits a Ray cluster: room for a trial (:func:`check_resources`), a ``--storage-path`` every
trial node reads (:func:`check_storage`), and the driver's token caches and ``model.init_from`` reaching
every node (:func:`study_data` copies them to ``<storage>/.cache/`` when other nodes run trials;
:func:`open_study_data` maps the driver's folders where a node reads them, else its own copy of those).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from .storage import copy_path, filesystem_of, local_path

if TYPE_CHECKING:
    from minimind_train.config import RunConfig
    from minimind_train.data import SFTData

    from .space import Resources

__all__ = ["CACHE_DIR", "ClusterError", "Node", "StudyData", "check_resources", "check_storage", "current_node",
           "file_sha256", "job_working_dir", "open_study_data", "storage_problem", "study_data", "trial_nodes"]

log = logging.getLogger(__name__)

CACHE_DIR = ".cache"  # under the storage path; a study name never starts with "."
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a `ray job submit` entrypoint


class ClusterError(RuntimeError):
    """The cluster cannot run this study as configured; the message names the key or node and the path."""


def check_resources(need: Resources, concurrent: int, available: dict[str, float]) -> None:
    """Refuse trials that could never be placed on a cluster with ``available`` resources
    (``ray.cluster_resources()``; Ray would keep them PENDING forever), naming
    ``tune.resources_per_trial.<cpu|gpu>``; log when fewer than ``concurrent`` fit at once."""
    have = {"cpu": float(available.get("CPU", 0.0)), "gpu": float(available.get("GPU", 0.0))}
    for name in ("gpu", "cpu"):
        if (want := getattr(need, name)) > have[name]:
            why = (f"the Ray cluster has no GPU (cluster: {have['cpu']:g} CPU, 0 GPU); set gpu: 0 to train on "
                   "CPUs" if name == "gpu" and have["gpu"] == 0 else
                   f"the Ray cluster has only {have[name]:g} {name.upper()}, so no trial could start")
            raise ClusterError(f"tune.resources_per_trial.{name}={want:g} is not allowed: {why}")
    fits = min(math.floor(have[name] / getattr(need, name) + 1e-9) for name in ("cpu", "gpu") if getattr(need, name))
    if fits < concurrent:
        log.info("the cluster (%g CPU, %g GPU) fits %d trials at once, fewer than tune.max_concurrent_trials=%d",
                 have["cpu"], have["gpu"], fits, concurrent)


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    hostname: str

    def label(self) -> str:
        return f"{self.node_id[:12]} ({self.hostname}, {self.ip})"


def current_node() -> dict[str, str]:
    """Where this process runs: Ray node id, hostname, IP and GPU ids (for checkpoint metadata and errors)."""
    import ray

    node = {"node_id": "", "hostname": socket.gethostname(), "ip": "", "gpu_ids": ""}
    if ray.is_initialized():  # (else get_runtime_context would start a whole local Ray to answer)
        with contextlib.suppress(Exception):
            node.update(node_id=ray.get_runtime_context().get_node_id(), ip=ray.util.get_node_ip_address(),
                        gpu_ids=",".join(str(g) for g in ray.get_gpu_ids()))  # the GPU(s) Ray gave this trial
    return node


def _here() -> str:
    return Node(*(current_node()[k] for k in ("node_id", "ip", "hostname"))).label()


def trial_nodes(cpu: float, gpu: float) -> list[Node]:
    """Alive nodes whose total resources fit one trial (``cpu`` CPUs and ``gpu`` GPUs)."""
    import ray

    return [Node(n["NodeID"], n.get("NodeManagerAddress", "?"), n.get("NodeManagerHostname", "?"))
            for n in ray.nodes() if n.get("Alive") and (res := n.get("Resources") or {})
            and res.get("CPU", 0.0) + 1e-9 >= cpu and res.get("GPU", 0.0) + 1e-9 >= gpu]


def job_working_dir() -> str | None:
    """The working dir of the ``ray job submit`` this process runs under (relative paths resolve into a
    temporary copy of it that Ray deletes eventually), or None outside a job."""
    try:
        job = json.loads(os.environ.get(_JOB_CONFIG_ENV) or "{}")
        return (job.get("runtime_env") or {}).get("working_dir") or None
    except (ValueError, AttributeError):
        return None


def storage_problem(storage: str) -> str | None:
    """Why ``--storage-path storage`` cannot work wherever the driver runs, or None."""
    folder = local_path(storage)
    if folder is not None and not folder.expanduser().is_absolute() and job_working_dir():
        return (f"--storage-path {storage!r} is relative, and under `ray job submit --working-dir` the "
                "current folder is a temporary copy of the working dir that Ray deletes; pass an absolute "
                "folder that every node shares, or a URI (s3://bucket/path)")
    if folder is None and "?" in storage:
        return (f"--storage-path {storage!r}: a URI with a query string cannot be extended with the study's "
                "folders; give the bucket path alone and configure the filesystem through its environment "
                "on every node (e.g. AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID for s3://)")
    return None


def _read_marker(marker: str, token: str) -> str | None:
    """On a trial node: None when the file ``marker`` holds ``token``, else why not."""
    try:
        fs, path = filesystem_of(marker)
        with fs.open_input_stream(path) as fh:
            return None if fh.read().decode() == token else "holds another marker (a different folder)"
    except Exception as exc:  # noqa: BLE001 - any failure to read is the answer
        return "does not exist" if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {exc}"


def check_storage(storage: str, nodes: Sequence[Node], driver: str, timeout_s: float = 120.0) -> None:
    """Refuse ``storage`` (:class:`ClusterError`) unless each other trial node in ``nodes`` reads back,
    within ``timeout_s`` seconds, a marker file the driver writes there. A one-node cluster checks nothing."""
    if not (others := [n for n in nodes if n.node_id != driver]):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(16)
    marker = f"{storage.rstrip('/')}/.minimind-probe-{token}"
    try:
        fs, path = filesystem_of(marker)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as fh:
            fh.write(token.encode())
    except Exception as exc:
        raise ClusterError(f"--storage-path {storage}: the driver cannot write there: {exc}") from exc
    task, deadline, bad = ray.remote(num_cpus=0, max_retries=0)(_read_marker), time.monotonic() + timeout_s, []
    try:
        refs = [(n, task.options(name="minimind-probe", scheduling_strategy=NodeAffinitySchedulingStrategy(
            n.node_id, soft=False)).remote(marker, token)) for n in others]
        for node, ref in refs:
            try:
                why = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - timeout, node died, runtime env failed
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
                why = "could not be checked: " + (f"the node did not answer within {timeout_s:.0f}s" if isinstance(
                    exc, ray.exceptions.GetTimeoutError) else f"{type(exc).__name__}: {exc}"[:300])
            bad += [f"  node {node.label()}: the driver's marker {marker} {why}"] if why else []
    finally:
        with contextlib.suppress(Exception):
            fs.delete_file(path)
    if bad:
        advice = ("pass a shared filesystem mounted at the same path on every node (NFS, a cluster filesystem) "
                  "or a URI (s3://bucket/path)") if local_path(storage) is not None else (
                  "every node must reach that URI, with credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS)")
        raise ClusterError(f"--storage-path {storage} is not visible from {len(bad)} of the {len(nodes)} trial "
                           "nodes:\n" + "\n".join(bad) + "\nRay Tune saves every checkpoint there and restores "
                           f"trials from it, so {advice}.")


@dataclass(frozen=True)
class StudyData:
    """What a trial needs to open the study's data on any node. ``inputs`` holds, per input (train cache,
    val cache, ``init_from``'s folder), ``(the driver's folder, the name of its copies, {file: bytes})``;
    ``shared`` is ``<storage>/.cache`` when the driver put a copy of each there, None on a one-node cluster."""

    train_cache: str
    val_cache: str | None
    pad_id: int
    vocab_size: int
    init_from: str | None = None
    init_sha256: str | None = None
    shared: str | None = None
    inputs: tuple[tuple[str, str, dict[str, int]], ...] = ()


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path`` as 64 hex digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _holds(folder: Path, files: dict[str, int]) -> bool:
    """Whether ``folder`` has each of ``files`` at its size in bytes (a copy cut short has not)."""
    return all((folder / f).is_file() and (folder / f).stat().st_size == size for f, size in files.items())


def study_data(data: SFTData, run_cfg: RunConfig, nodes: Sequence[Node], driver: str, storage: str) -> StudyData:
    """The :class:`StudyData` of ``data`` (what ``prepare_data`` returned) and ``run_cfg.model.init_from``;
    unless ``driver`` (a node id) is the only one of the trial ``nodes``, each input is copied to
    ``<storage>/.cache`` where no copy with the same file names and sizes is."""
    s = data.stats
    caches = [Path(p).resolve() for p in (s.cache_path, s.val_cache_path) if p]
    init = Path(run_cfg.model.init_from).resolve() if run_cfg.model.init_from else None
    one_node = [n.node_id for n in nodes] == [driver]
    sha = file_sha256(init) if init and not one_node else None
    inputs = [(str(c), c.name, {f.name: f.stat().st_size for f in sorted(c.iterdir())}) for c in caches]
    if init:
        inputs.append((str(init.parent), f"init_from-{(sha or '')[:16]}", {init.name: init.stat().st_size}))
    handle = StudyData(train_cache=str(caches[0]), val_cache=str(caches[1]) if s.val_cache_path else None,
                       pad_id=int(data.pad_id), vocab_size=int(data.vocab_size), init_from=str(init) if init else None,
                       init_sha256=sha, shared=None if one_node else f"{storage.rstrip('/')}/{CACHE_DIR}",
                       inputs=tuple(inputs))
    for folder, name, files in handle.inputs if handle.shared else ():
        fs, base = filesystem_of(f"{handle.shared}/{name}")
        there = {i.base_name: i.size for i in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))}
        todo = [f for f, size in files.items() if there.get(f) != size]  # what the storage lacks
        try:
            for f in todo:
                copy_path(f"{folder}/{f}", f"{base}/{f}", pafs.LocalFileSystem(), fs)
        except OSError as exc:
            raise ClusterError(f"cannot copy {folder} to {base} for the trial nodes: {exc}") from exc
        if todo:
            log.info("copied %s to %s for the trial nodes (%.1f MiB)", folder, base, sum(files[f] for f in todo) / 2**20)
    return handle


def _reach(folder: Path, name: str, files: dict[str, int], shared: str | None, cache_dir: str | None) -> Path:
    """A folder on this node that holds ``files``: the driver's, else the node's copy of ``<shared>/<name>``."""
    from minimind_train.token_cache import resolve_cache_dir

    if _holds(folder, files):
        return folder
    if shared is None:
        raise ClusterError(
            f"node {_here()}: {folder} is not readable here, and the study put no copy on its storage "
            "(the driver's node was its only trial node when it started); make the folder readable here, or "
            "continue the study with --resume, which copies it")
    copy = resolve_cache_dir(cache_dir) / name
    copy.parent.mkdir(parents=True, exist_ok=True)
    with open(copy.parent / f".{name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node, however many of its trials start at once
        if not _holds(copy, files):
            shutil.rmtree(copy, ignore_errors=True)  # an unusable leftover
            fs, path = filesystem_of(f"{shared}/{name}")
            copy_path(path, str(copy), fs, pafs.LocalFileSystem())
            log.info("node %s: copied %s/%s to %s", _here(), shared, name, copy.parent)
    if not _holds(copy, files):
        raise ClusterError(f"node {_here()}: the study's copy {shared}/{name} does not open (incomplete?); "
                           "delete it and continue the study with --resume")
    return copy


def open_study_data(handle: StudyData, cfg: RunConfig) -> tuple[SFTData, RunConfig]:
    """In a trial: ``(SFTData, cfg for training)`` from the study's :class:`StudyData` on this node; the
    config differs from ``cfg`` only in ``model.init_from``, when this node uses a copy of it."""
    from minimind_train.data import open_prepared

    train, *rest = [_reach(Path(folder), name, files, handle.shared, cfg.data.cache_dir)
                    for folder, name, files in handle.inputs]
    val = rest.pop(0) if handle.val_cache else None
    data = open_prepared(cfg.data, train, val, pad_id=handle.pad_id, vocab_size=handle.vocab_size)
    if handle.init_from and rest[0] != Path(handle.init_from).parent:
        init_from = str(rest[0] / Path(handle.init_from).name)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=init_from))
    return data, cfg
