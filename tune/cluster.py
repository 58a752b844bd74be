"""A study on a multi-node Ray cluster: what every node can read, and shipping what it cannot.

The driver (``tune/run.py``) runs on one node of the cluster; trials run on any node with room.
Before the first trial starts the driver asks every node that could host a trial, with one tiny
zero-CPU task pinned to that node (``NodeAffinitySchedulingStrategy``), whether it can read

* the study's storage: a marker file the driver just wrote into ``--storage-path`` (a folder or a
  pyarrow URI) must be visible there, else the study is refused (:class:`ClusterError`): Ray Tune
  persists every checkpoint there and restores trials from it, so it must be shared;
* the token cache folders the driver built (``prepare_data``) and ``model.init_from``: what some node
  cannot read is *shipped*: the driver ``ray.put``\\ s the files once per study and a trial on such a
  node writes them, once per node (under a file lock, published by an atomic rename), into its local
  cache folder (``data.cache_dir``, else ``$MINIMIND_CACHE``, else ``~/.cache/minimind-tune/tokens``)
  and memory-maps them as usual. Trials never need the source jsonl or the tokenizer
  (:func:`minimind_train.data.open_prepared`).

``MINIMIND_SHIP_DATA`` tunes the shipping: ``auto`` (default; ship only what a probed node lacks),
``always`` (also covers nodes that join after the probe, e.g. autoscaled replacements), ``never``
(refuse the study, naming the node and the path, instead of shipping).

On a one-node cluster (a laptop, or a cluster whose only trial node is the driver's) nothing is
probed or shipped. With ``--storage-path`` a URI (``s3://...``, ``gs://...``; Ray Tune gets the URI
itself, and each node configures the filesystem from its environment, e.g. ``AWS_ENDPOINT_URL``),
the driver's own outputs (``best.yaml``, ``summary.csv``, plots, the default sqlite MLflow database,
a copy of the best ``model.pth``) are written to a driver-local staging folder (:func:`staging_dir`)
and uploaded next to the trials at the end; ``--resume`` downloads the MLflow database first.
:func:`storage_problem` refuses what cannot work anywhere: a relative path under ``ray job submit``
(its working dir is a temporary copy) and URIs with a query string.

Only the driver talks to MLflow (the Tune callback runs in the driver process), so the default
sqlite tracking store needs no server on a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SHIP_ENV",
    "ClusterError",
    "Node",
    "StudyData",
    "check_storage",
    "current_node",
    "delete_uri_dir",
    "download_outputs",
    "driver_node_id",
    "fetch_file",
    "file_sha256",
    "is_uri",
    "job_working_dir",
    "open_study_data",
    "probe",
    "staging_dir",
    "storage_problem",
    "study_data",
    "trial_nodes",
    "upload_outputs",
]

log = logging.getLogger(__name__)

SHIP_ENV = "MINIMIND_SHIP_DATA"
_SHIP_MODES = ("auto", "always", "never")
STAGING_ENV = "MINIMIND_TUNE_STAGING"
# Set by Ray in the environment of a `ray job submit` entrypoint.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_PROBE_TIMEOUT_S = 120.0
_MARKER_PREFIX = ".minimind-probe-"
# Files of a driver-side study folder that a resume of a URI study needs back (MLflow's sqlite db
# and its artifacts); the rest is rewritten at the end of every run.
_RESUME_OUTPUTS = ("study.json", "space.yaml", "optuna.db", "mlflow.db", "mlartifacts")


class ClusterError(RuntimeError):
    """The cluster cannot run this study as configured; the message names the node and the path."""


# ---------------------------------------------------------------------------------------------------
# Nodes.


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    hostname: str
    resources: Mapping[str, float]

    def label(self) -> str:
        return f"{self.node_id[:12]} ({self.hostname}, {self.ip})"


def driver_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def current_node() -> dict[str, str]:
    """Where this process runs: Ray node id, hostname, IP and GPU ids (for checkpoint metadata and errors)."""
    import ray

    node_id = ""
    with contextlib.suppress(Exception):
        node_id = ray.get_runtime_context().get_node_id()
    ip = ""
    with contextlib.suppress(Exception):
        ip = ray.util.get_node_ip_address()
    gpus = ""
    with contextlib.suppress(Exception):
        gpus = ",".join(str(g) for g in ray.get_gpu_ids())  # the GPU(s) Ray gave this trial
    return {"node_id": node_id, "hostname": socket.gethostname(), "ip": ip, "gpu_ids": gpus}


def _here() -> str:
    node = current_node()
    return f"{node['node_id'][:12]} ({node['hostname']}, {node['ip']})"


def trial_nodes(cpu: float, gpu: float) -> list[Node]:
    """Alive nodes whose total resources fit one trial (``cpu`` CPUs and ``gpu`` GPUs)."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources") or {}
        if res.get("CPU", 0.0) + 1e-9 < cpu or res.get("GPU", 0.0) + 1e-9 < gpu:
            continue
        out.append(Node(node_id=n["NodeID"], ip=n.get("NodeManagerAddress", "?"),
                        hostname=n.get("NodeManagerHostname", "?"), resources=dict(res)))
    return out


# ---------------------------------------------------------------------------------------------------
# Probing: one pinned zero-CPU task per node checks a list of paths.


@dataclass(frozen=True)
class _Check:
    label: str  # how the result is reported
    kind: str  # "cache" (a token cache folder with this key), "file" (readable, this size), "marker"
    target: str  # a path, or for "marker" a path or URI
    expected: str | int | None = None


def _check_here(check: _Check) -> str | None:
    """None when ``check`` passes on this node, else the reason."""
    try:
        if check.kind == "cache":
            from minimind_train.token_cache import open_cache

            key = open_cache(check.target).key
            return None if key == check.expected else f"holds another cache (key {key})"
        if check.kind == "file":
            with open(check.target, "rb") as fh:
                fh.read(1)
            size = os.path.getsize(check.target)
            return None if check.expected is None or size == check.expected else \
                f"has {size} bytes, the driver's has {check.expected}"
        if check.kind == "marker":
            if is_uri(check.target):
                import pyarrow.fs

                fs, path = pyarrow.fs.FileSystem.from_uri(check.target)
                with fs.open_input_stream(path) as fh:
                    text = fh.read().decode()
            else:
                text = Path(check.target.removeprefix("file://")).read_text()
            return None if text == check.expected else "holds another marker (a different folder)"
        return f"unknown check {check.kind}"
    except FileNotFoundError:
        return "does not exist"
    except PermissionError:
        return "is not readable (permission denied)"
    except Exception as exc:  # noqa: BLE001 - any failure to read is the answer
        return f"{type(exc).__name__}: {exc}"


def _probe_task(checks: list[_Check]) -> dict[str, str | None]:
    return {c.label: _check_here(c) for c in checks}


def probe(nodes: Sequence[Node], checks: Sequence[_Check],
          timeout_s: float = _PROBE_TIMEOUT_S) -> dict[str, dict[str, str | None]]:
    """``{node_id: {check label: None if it passed, else the reason}}`` for every node in ``nodes``.

    A node that does not answer within ``timeout_s`` fails every check with that reason.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(_probe_task)
    refs = {n.node_id: remote.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False),
        name="minimind-probe").remote(list(checks)) for n in nodes}
    deadline = time.monotonic() + timeout_s
    out: dict[str, dict[str, str | None]] = {}
    for node_id, ref in refs.items():
        try:
            out[node_id] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - timeout, node died, runtime env failed
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
            reason = (f"the node did not answer the probe within {timeout_s:.0f}s"
                      if isinstance(exc, ray.exceptions.GetTimeoutError)
                      else f"the probe failed: {type(exc).__name__}: {str(exc).strip()[:300]}")
            out[node_id] = {c.label: reason for c in checks}
    return out


def _failures(nodes: Sequence[Node], results: Mapping[str, Mapping[str, str | None]],
              label: str) -> list[tuple[Node, str]]:
    return [(n, results[n.node_id][label]) for n in nodes if results[n.node_id].get(label)]


def _others(nodes: Sequence[Node], driver: str) -> list[Node]:
    return [n for n in nodes if n.node_id != driver]


# ---------------------------------------------------------------------------------------------------
# Storage.


def is_uri(storage: str) -> bool:
    """A pyarrow filesystem URI other than ``file://`` (those are local folders)."""
    return "://" in storage and not storage.startswith("file://")


def job_working_dir() -> str | None:
    """The working dir of the ``ray job submit`` this process runs under, or None outside a job.

    Relative paths there resolve into a temporary copy of it that Ray deletes eventually.
    """
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except ValueError:
        return None
    return runtime_env.get("working_dir") or None


def storage_problem(storage: str) -> str | None:
    """Why ``--storage-path storage`` cannot work wherever the driver runs, or None."""
    if "://" not in storage and not Path(storage).expanduser().is_absolute() and job_working_dir():
        return (f"--storage-path {storage!r} is relative, and under `ray job submit --working-dir` the "
                "current folder is a temporary copy of the working dir that Ray deletes; pass an absolute "
                "folder that every node shares, or a URI (s3://bucket/path)")
    if is_uri(storage) and "?" in storage:
        return (f"--storage-path {storage!r}: a URI with a query string cannot be extended with the study's "
                "folders; give the bucket path alone and configure the filesystem through its environment "
                "on every node (e.g. AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID for s3://)")
    return None


def check_storage(storage: str, nodes: Sequence[Node], driver: str,
                  timeout_s: float = _PROBE_TIMEOUT_S) -> None:
    """Refuse ``storage`` unless every trial node sees the driver's writes there (:class:`ClusterError`).

    The driver writes a marker file into ``storage`` (creating the folder) and each other node must
    read it back. A one-node cluster checks nothing.
    """
    others = _others(nodes, driver)
    if not others:
        return
    token = secrets.token_hex(16)
    name = f"{_MARKER_PREFIX}{token}"
    if is_uri(storage):
        import pyarrow.fs

        try:
            fs, base = pyarrow.fs.FileSystem.from_uri(storage)
            fs.create_dir(base, recursive=True)
            with fs.open_output_stream(f"{base.rstrip('/')}/{name}") as fh:
                fh.write(token.encode())
        except Exception as exc:
            raise ClusterError(f"--storage-path {storage}: the driver cannot write there: {exc}") from exc
        marker = f"{storage.rstrip('/')}/{name}"
        remove = lambda: fs.delete_file(f"{base.rstrip('/')}/{name}")
    else:
        folder = Path(storage.removeprefix("file://"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(token)
        marker = str(path)
        remove = path.unlink
    try:
        results = probe(others, [_Check("storage", "marker", marker, token)], timeout_s)
    finally:
        with contextlib.suppress(Exception):
            remove()
    bad = _failures(others, results, "storage")
    if not bad:
        log.info("storage %s is shared by all %d trial nodes", storage, len(nodes))
        return
    lines = [f"  node {n.label()}: the driver's marker {marker} {why}" for n, why in bad]
    if is_uri(storage):
        advice = ("every node must reach that URI with working credentials (check the node's "
                  "network access and e.g. AWS_* / GOOGLE_APPLICATION_CREDENTIALS there)")
    else:
        advice = ("it is a folder local to the driver's machine; on a multi-node cluster pass a "
                  "shared filesystem mounted at the same path on every node (NFS, a cluster "
                  "filesystem) or a URI (s3://bucket/path, gs://bucket/path)")
    raise ClusterError(f"--storage-path {storage} is not visible from {len(bad)} of the "
                       f"{len(nodes)} trial nodes:\n" + "\n".join(lines) +
                       f"\nRay Tune saves every checkpoint there and restores trials from it, so {advice}.")


def staging_dir(study_uri: str) -> Path:
    """The driver-local folder for the driver-side outputs of a study stored at a URI."""
    root = os.environ.get(STAGING_ENV) or os.path.join(tempfile.gettempdir(), "minimind-tune-staging")
    digest = hashlib.sha256(study_uri.encode()).hexdigest()[:12]
    return Path(root).expanduser() / f"{study_uri.rstrip('/').rsplit('/', 1)[-1]}-{digest}"


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def download_outputs(study_uri: str, local: Path) -> list[str]:
    """Fetch the driver-side state a resume needs (MLflow's sqlite db, artifacts) into ``local``."""
    import pyarrow.fs

    fs, base = _fs(study_uri)
    local.mkdir(parents=True, exist_ok=True)
    got = []
    for name in _RESUME_OUTPUTS:
        info = fs.get_file_info(f"{base}/{name}")
        if info.type == pyarrow.fs.FileType.NotFound:
            continue
        target = local / name
        if info.type == pyarrow.fs.FileType.Directory:
            target.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(f"{base}/{name}", str(target), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        got.append(name)
    return got


def upload_outputs(local: Path, study_uri: str) -> int:
    """Copy every file under ``local`` to the same relative path under ``study_uri``; returns bytes."""
    import pyarrow.fs

    if not local.is_dir():
        return 0
    fs, base = _fs(study_uri)
    total = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        parent = f"{base}/{rel}".rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        pyarrow.fs.copy_files(str(path), f"{base}/{rel}",
                              source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
        total += path.stat().st_size
    return total


def fetch_file(study_uri: str, fs_path: str | os.PathLike[str], local: Path) -> Path:
    """Copy ``fs_path`` (a path on the filesystem of ``study_uri``, as Ray reports it) to ``local``."""
    import pyarrow.fs

    fs, _ = _fs(study_uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(str(fs_path), str(local), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def delete_uri_dir(study_uri: str) -> None:
    import pyarrow.fs

    fs, base = _fs(study_uri)
    if fs.get_file_info(base).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(base)


# ---------------------------------------------------------------------------------------------------
# Data: what a trial needs, and where each node finds it.


@dataclass(frozen=True)
class StudyData:
    """Everything a trial needs to open the study's data on any node (pickled into each trial).

    ``shipped`` maps a cache folder (the driver's path) to an object ref of its files; ``init_ref``
    likewise holds ``model.init_from``. Both are empty/None when every node reads the driver's paths.
    """

    train_cache: str
    train_key: str
    val_cache: str | None
    val_key: str | None
    pad_id: int
    vocab_size: int
    init_from: str | None = None
    init_size: int | None = None
    init_sha256: str | None = None
    shipped: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    init_ref: Any = None

    def caches(self) -> list[tuple[str, str]]:
        out = [(self.train_cache, self.train_key)]
        if self.val_cache is not None and self.val_key is not None:
            out.append((self.val_cache, self.val_key))
        return out


def _ship_mode() -> str:
    mode = os.environ.get(SHIP_ENV, "auto").strip().lower() or "auto"
    if mode not in _SHIP_MODES:
        raise ClusterError(f"{SHIP_ENV}={mode!r} is not allowed: expected one of {', '.join(_SHIP_MODES)}")
    return mode


def _file_array(path: Path) -> np.ndarray:
    # Memory-mapped, so ray.put copies from the page cache into the object store without a heap copy.
    if path.stat().st_size == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _put_folder(folder: Path) -> tuple[Any, int]:
    import ray

    files = {p.name: _file_array(p) for p in sorted(folder.iterdir()) if p.is_file()}
    return ray.put(files), sum(a.nbytes for a in files.values())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def study_data(data: Any, run_cfg: Any, nodes: Sequence[Node], driver: str,
               timeout_s: float = _PROBE_TIMEOUT_S) -> StudyData:
    """The :class:`StudyData` of ``data`` (what ``prepare_data`` returned), shipping what nodes lack.

    ``nodes`` are the trial nodes (:func:`trial_nodes`), ``driver`` this process's node id.
    """
    mode = _ship_mode()
    s = data.stats
    init_from = run_cfg.model.init_from
    init_path = Path(init_from).resolve() if init_from else None
    handle = StudyData(
        train_cache=str(Path(s.cache_path).resolve()), train_key=s.cache_key,
        val_cache=str(Path(s.val_cache_path).resolve()) if s.val_cache_path else None,
        val_key=s.val_cache_key, pad_id=int(data.pad_id), vocab_size=int(data.vocab_size),
        init_from=str(init_path) if init_path else None,
        init_size=init_path.stat().st_size if init_path else None,
    )
    others = _others(nodes, driver)
    if not others and mode != "always":
        return handle
    checks = [_Check(f"cache:{path}", "cache", path, key) for path, key in handle.caches()]
    if handle.init_from:
        checks.append(_Check("init_from", "file", handle.init_from, handle.init_size))
    results = probe(others, checks, timeout_s) if others else {}
    shipped: dict[str, Any] = {}
    init_ref = None
    init_sha = None
    for check in checks:
        bad = _failures(others, results, check.label)
        if not bad and mode != "always":
            continue
        what = "model.init_from" if check.label == "init_from" else "the token cache"
        if mode == "never":
            lines = [f"  node {n.label()}: {check.target} {why}" for n, why in bad]
            raise ClusterError(f"{what} {check.target} is not readable on {len(bad)} trial node(s):\n" +
                               "\n".join(lines) + f"\n{SHIP_ENV}=never forbids shipping it through Ray's "
                               "object store; put it on a filesystem every node mounts at the same path, "
                               f"or unset {SHIP_ENV}")
        where = ", ".join(n.label() for n, _ in bad) or "nodes that join later"
        if check.label == "init_from":
            init_ref, size = _put_folder_file(Path(check.target))
            init_sha = file_sha256(Path(check.target))
        else:
            shipped[check.target], size = _put_folder(Path(check.target))
        log.info("shipping %s %s (%s) through the object store for %s", what, check.target, _mib(size), where)
    return dataclasses.replace(handle, shipped=shipped, init_ref=init_ref, init_sha256=init_sha)


def _put_folder_file(path: Path) -> tuple[Any, int]:
    import ray

    array = _file_array(path)
    return ray.put(array), int(array.nbytes)


def _cache_roots(cache_dir: str | None) -> list[Path]:
    from minimind_train.token_cache import resolve_cache_dir

    roots = [resolve_cache_dir(cache_dir)]
    default = resolve_cache_dir(None)
    if default not in roots:
        roots.append(default)
    return roots


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock per node and item, so concurrent trials write a shipped item once."""
    with open(root / f".{name}.lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _writable_root(roots: Sequence[Path], what: str) -> Path:
    errors = []
    for root in roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return root
            errors.append(f"{root}: not writable")
        except OSError as exc:
            errors.append(f"{root}: {exc}")
    raise ClusterError(f"node {_here()}: no writable folder to put the shipped {what} in ({'; '.join(errors)})")


def _cache_ok(path: Path, key: str) -> bool:
    from minimind_train.token_cache import open_cache

    try:
        return open_cache(path).key == key
    except (OSError, ValueError, KeyError):
        return False


def _local_cache(path: str, key: str, ref: Any, cache_dir: str | None) -> Path:
    """A folder on this node holding the token cache ``key``: the driver's path, a local copy, or a new one."""
    import ray

    driver_path = Path(path)
    if _cache_ok(driver_path, key):
        return driver_path
    roots = _cache_roots(cache_dir)
    for root in roots:
        if _cache_ok(root / driver_path.name, key):
            return root / driver_path.name
    if ref is None:
        raise ClusterError(
            f"node {_here()}: the token cache {path} is not readable here, and the driver did not ship "
            f"it (every trial node could read it when the study started). Make it readable on this node "
            f"or run the study with {SHIP_ENV}=always")
    root = _writable_root(roots, "token cache")
    final = root / driver_path.name
    with _locked(root, driver_path.name):
        if _cache_ok(final, key):
            return final
        started = time.perf_counter()
        files = ray.get(ref)
        tmp = Path(tempfile.mkdtemp(prefix=f".ship-{key}-", dir=root))
        try:
            for name, array in files.items():
                with open(tmp / name, "wb") as fh:
                    fh.write(memoryview(array))
            if final.exists():  # an unreadable leftover: move it aside, then publish ours
                shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("node %s: wrote the shipped token cache to %s (%s, %.1fs)", _here(), final,
                 _mib(sum(a.nbytes for a in files.values())), time.perf_counter() - started)
    if not _cache_ok(final, key):
        raise ClusterError(f"node {_here()}: the shipped token cache written to {final} does not open")
    return final


def _local_init(handle: StudyData, cache_dir: str | None) -> str:
    """A path on this node to ``model.init_from``: the driver's, or a copy written from the shipped bytes."""
    import ray

    path = Path(handle.init_from or "")
    with contextlib.suppress(OSError):
        if os.access(path, os.R_OK) and path.stat().st_size == handle.init_size:
            return str(path)
    if handle.init_ref is None:
        raise ClusterError(
            f"node {_here()}: model.init_from {path} is not readable here, and the driver did not ship it "
            f"(every trial node could read it when the study started). Make it readable on this node or "
            f"run the study with {SHIP_ENV}=always")
    root = _writable_root(_cache_roots(cache_dir), "model.init_from")
    folder = root / ".init_from" / (handle.init_sha256 or "unknown")[:16]
    final = folder / path.name
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder, path.name):
        if final.is_file() and final.stat().st_size == handle.init_size:
            return str(final)
        array = ray.get(handle.init_ref)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(memoryview(array))
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        log.info("node %s: wrote the shipped model.init_from to %s", _here(), final)
    return str(final)


def open_study_data(handle: StudyData, cfg: Any) -> tuple[Any, Any]:
    """In a trial: ``(SFTData, cfg for training)`` from the study's :class:`StudyData` on this node.

    The returned config differs from ``cfg`` only in ``model.init_from`` when that was shipped here.
    """
    from minimind_train.data import open_prepared

    cache_dir = cfg.data.cache_dir
    train = _local_cache(handle.train_cache, handle.train_key,
                         handle.shipped.get(handle.train_cache), cache_dir)
    val = None
    if handle.val_cache is not None and handle.val_key is not None:
        val = _local_cache(handle.val_cache, handle.val_key, handle.shipped.get(handle.val_cache), cache_dir)
    data = open_prepared(cfg.data, train, val, pad_id=handle.pad_id, vocab_size=handle.vocab_size)
    if handle.init_from:
        local = _local_init(handle, cache_dir)
        if local != cfg.model.init_from:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=local))
    return data, cfg
