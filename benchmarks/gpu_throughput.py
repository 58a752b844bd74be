"""Aggregate supervised tokens/s of N concurrent trial processes sharing one GPU vs one trial alone.

    python benchmarks/gpu_throughput.py [--layouts 1x1,4x0.25] [--compile] [--seconds 30] [--out DIR]
    python benchmarks/gpu_throughput.py --cpu-smoke      # a few CPU steps: checks the code paths only

Each layout ``NxF`` starts N processes (as a study's N concurrent trials would be), each capped with
``torch.cuda.set_per_process_memory_fraction(F)`` like a trial given ``resources_per_trial.gpu: F``,
each training its own model with this project's training step (``backward_window`` + clipping + fused
AdamW, bf16 autocast) on its own length-grouped batches. Every process warms up (and compiles, with
``--compile``), then all start timing together at a barrier and train for ``--seconds``; the aggregate
is the sum of their supervised tokens over the window. Model: MiniMind2 26M (hidden 512 x 8 layers).

Data: ``../shared/data/alpaca_zh_demo.jsonl`` with the MiniMind2 tokenizer when present, else the
bundled demo data made longer (several demo conversations chained into one multi-turn conversation,
so samples reach a few hundred tokens like real SFT data) with the bundled tokenizer.
Writes ``gpu_throughput.json`` into ``--out`` (default ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"


@dataclasses.dataclass(frozen=True)
class Setup:
    data_path: str
    tokenizer: str | None
    cache_dir: str
    max_seq_len: int
    hidden: int
    layers: int
    batch: int
    device: str
    dtype: str
    warmup_steps: int
    seconds: float
    max_steps: int  # 0: run for ``seconds``; else stop after this many timed steps (smoke)
    compile: bool


def longer_demo(path: Path, per_sample: int = 6) -> Path:
    """The bundled demo conversations chained ``per_sample`` at a time into longer multi-turn ones."""
    from minimind_train.data import DEMO_DATA_PATH

    rows = [json.loads(line) for line in DEMO_DATA_PATH.read_text(encoding="utf-8").splitlines() if line]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(0, len(rows) - per_sample + 1, per_sample):
            messages = []
            for row in rows[i:i + per_sample]:
                messages += [m for m in row["conversations"] if m["role"] != "system" or not messages]
            fh.write(json.dumps({"conversations": messages}, ensure_ascii=False) + "\n")
    return path


def run_config(s: Setup):
    from minimind_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=8,
                          num_key_value_heads=2, max_position_embeddings=max(s.max_seq_len, 512)),
        data=DataConfig(train_path=s.data_path, tokenizer=s.tokenizer, max_seq_len=s.max_seq_len,
                        val_fraction=0.02, cache_dir=s.cache_dir),
        train=TrainConfig(batch_size=s.batch, device=s.device, dtype=s.dtype, seed=0, learning_rate=1e-4),
    )


def worker(rank: int, fraction: float, s: Setup, barrier, results) -> None:
    """One trial-like process: cap memory, build the model, warm up, wait, train for the window."""
    try:
        import torch

        from minimind_train.batches import batch_indices
        from minimind_train.data import prepare_data
        from minimind_train.train import backward_window, clip_grad_norm, init_state

        cfg = run_config(s)
        device = torch.device(s.device)
        if device.type == "cuda" and 0 < fraction < 1:
            torch.cuda.set_per_process_memory_fraction(fraction)
        data = prepare_data(cfg.data, show_progress=False)
        state = init_state(cfg, data.vocab_size, device)
        if s.compile:
            state.model.model = torch.compile(state.model.model)
        params = [p for p in state.model.parameters() if p.requires_grad]

        def batches():
            epoch = 0
            while True:
                order = batch_indices(data.train.lengths, s.batch, seed=rank, epoch=epoch)
                for items in order:
                    if len(items) == s.batch:  # full batches only: no odd shapes to recompile
                        yield data.train.batch(items, data.pad_id)
                epoch += 1

        def step(batch) -> int:
            _, _, n_sup = backward_window(state, [batch])
            clip_grad_norm(params, 1.0)
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            return n_sup

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        it = batches()
        t = time.perf_counter()
        for _ in range(s.warmup_steps):
            step(next(it))
        sync()
        warmup = time.perf_counter() - t
        barrier.wait()
        tokens = steps = 0
        start = time.perf_counter()
        while True:
            tokens += step(next(it))
            steps += 1
            if (s.max_steps and steps >= s.max_steps) or (not s.max_steps and steps % 4 == 0
                                                            and time.perf_counter() - start >= s.seconds):
                break
        sync()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        results.put({"rank": rank, "ok": True, "tokens": tokens, "steps": steps, "seconds": elapsed,
                     "warmup_seconds": warmup, "peak_memory_mb": peak})
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        barrier.abort()
        results.put({"rank": rank, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()})


def run_layout(n: int, fraction: float, s: Setup, timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, fraction, s, barrier, results)) for r in range(n)]
    for p in procs:
        p.start()
    rows = []
    deadline = time.monotonic() + timeout
    try:
        while len(rows) < n and time.monotonic() < deadline:
            try:
                rows.append(results.get(timeout=5))
            except Exception:  # noqa: BLE001 - queue.Empty: check the processes are alive
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
    failed = [r for r in rows if not r["ok"]] + [{"error": "no result"}] * (n - len(rows))
    if failed:
        return {"layout": f"{n}x{fraction:g}", "ok": False, "errors": failed}
    window = max(r["seconds"] for r in rows)
    return {"layout": f"{n}x{fraction:g}", "ok": True, "processes": n, "fraction": fraction,
            "compile": s.compile, "supervised_tokens_per_s": sum(r["tokens"] for r in rows) / window,
            "per_process": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="1x1,4x0.25", help="comma-separated NxF: N processes of F GPU each")
    p.add_argument("--compile", action="store_true", help="also run every layout with torch.compile")
    p.add_argument("--seconds", type=float, default=30.0, help="timed window per layout")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--timeout", type=float, default=300.0, help="give up on a layout after this long")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_throughput.json")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model, CPU, 2 timed steps per process: checks the code paths, measures nothing")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    alpaca, minimind2 = SHARED / "data" / "alpaca_zh_demo.jsonl", SHARED / "fixtures" / "minimind2"
    if alpaca.exists() and minimind2.exists() and not args.cpu_smoke:
        data_path, tokenizer = str(alpaca), str(minimind2)
    else:
        data_path, tokenizer = str(longer_demo(tmp / "demo_long.jsonl")), None
    s = Setup(data_path=data_path, tokenizer=tokenizer, cache_dir=str(tmp / "cache"),
              max_seq_len=args.max_seq_len, hidden=args.hidden, layers=args.layers, batch=args.batch,
              device="cuda", dtype=args.dtype, warmup_steps=args.warmup_steps, seconds=args.seconds,
              max_steps=0, compile=False)
    if args.cpu_smoke:
        s = dataclasses.replace(s, max_seq_len=128, hidden=64, layers=2, batch=4, device="cpu",
                                dtype="float32", warmup_steps=1, max_steps=2)
        layouts = [(1, 1.0), (2, 0.5)]
    else:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device (use --cpu-smoke to check the code paths on a CPU)", file=sys.stderr)
            return 2
        layouts = []
        for item in args.layouts.split(","):
            n, _, f = item.strip().partition("x")
            layouts.append((int(n), float(f or 1)))

    # Tokenise once here; every worker then maps the cache.
    from minimind_train.data import prepare_data

    data = prepare_data(run_config(s).data, show_progress=False)
    lens = data.train.lengths
    header = {"data": data_path, "tokenizer": tokenizer or "bundled", "train_samples": len(data.train),
              "mean_tokens": float(lens.mean()), "model": f"hidden {s.hidden} x {s.layers} layers",
              "batch": s.batch, "max_seq_len": s.max_seq_len, "dtype": s.dtype, "device": s.device}
    if s.device == "cuda":
        import torch

        header["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(header), flush=True)

    results = []
    for compiled in ([False, True] if args.compile and not args.cpu_smoke else [False]):
        for n, fraction in layouts:
            r = run_layout(n, fraction, dataclasses.replace(s, compile=compiled), args.timeout)
            results.append(r)
            if r["ok"]:
                peak = max(w["peak_memory_mb"] or 0.0 for w in r["per_process"])
                print(f"{r['layout']:>7} compile={compiled!s:<5} aggregate {r['supervised_tokens_per_s']:>10,.0f} "
                      f"supervised tok/s  (peak {peak:,.0f} MB/process, warm-up "
                      f"{max(w['warmup_seconds'] for w in r['per_process']):.0f} s)", flush=True)
            else:
                print(f"{r['layout']:>7} compile={compiled!s:<5} FAILED: {r['errors'][0].get('error')}", flush=True)
            write_summary(header, results, args.out, final=False)
    write_summary(header, results, args.out, final=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r["ok"] for r in results) else 1


def write_summary(header: dict, results: list[dict], out: str | None, final: bool) -> dict:
    """The figures so far (written after every layout, so a run cut short still leaves them)."""
    summary: dict = {**header, "layouts": results}
    for compiled in (False, True):
        rows = {r["layout"]: r for r in results if r["ok"] and r["compile"] == compiled}
        single = next((r for r in rows.values() if r["processes"] == 1), None)
        for r in rows.values():
            if single is not None and r is not single:
                speedup = r["supervised_tokens_per_s"] / single["supervised_tokens_per_s"]
                key = f"speedup_{r['layout']}_vs_{single['layout']}" + ("_compiled" if compiled else "")
                summary[key] = speedup
                if final:
                    print(f"{key}: {speedup:.2f}x (goal >= 2.5x for 4x0.25 vs 1x1)")
    eager = {r["layout"]: r for r in results if r["ok"] and not r["compile"]}
    for r in results:
        if r["ok"] and r["compile"] and r["layout"] in eager:
            gain = r["supervised_tokens_per_s"] / eager[r["layout"]]["supervised_tokens_per_s"]
            summary[f"compile_gain_{r['layout']}"] = gain
            if final:
                print(f"torch.compile gain at {r['layout']}: {gain:.2f}x")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_throughput.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(main())
