#!/usr/bin/env bash
# GPU check, prepared to run unattended on one lent GPU, in two phases (each well under 5 minutes):
#
#     bash benchmarks/gpu_check.sh [throughput|study|all]      # from the repository root; default all
#
# throughput: MiniMind2 26M (hidden 512 x 8 layers), bf16 autocast, batch 16, max_seq_len 512: aggregate
#   supervised tokens/s of 4 concurrent trial processes capped at 0.25 of the GPU each vs 1 process with
#   the whole GPU (goal >= 2.5x), then the same two layouts with torch.compile. Needs torch only.
# study: a short real study (benchmarks/gpu_study.yaml): 8 trials, 4 at a time at 0.25 GPU each,
#   through Ray Tune, Optuna, ASHA and MLflow; prints the study's table and each trial's GPU and peak
#   memory. Needs the project's dependencies (ray, optuna, mlflow) importable.
# Figures are printed and, when $OUT is set, written under $OUT (gpu_throughput.json, gpu_check.log,
# study.log, study_trials.json).
set -euo pipefail
cd "$(dirname "$0")/.."

PHASE="${1:-all}"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu_check.log"
fi

throughput() {
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    # Eager layouts first, so their figures exist even if compilation runs long; each layout is cut
    # off after 100 s and the whole phase after 270 s (the JSON is rewritten after every layout).
    timeout 270 "$PY" benchmarks/gpu_throughput.py --layouts 1x1,4x0.25 --compile --seconds 12 \
        --warmup-steps 12 --timeout 100 ${OUT:+--out "$OUT"}
}

study() {
    local store
    store="$(mktemp -d)"
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    "$PY" -c "import ray, optuna, mlflow, torch; print('ray', ray.__version__, 'optuna', optuna.__version__, 'mlflow', mlflow.__version__, 'torch', torch.__version__)"
    local started=$SECONDS
    RAY_USAGE_STATS_ENABLED=0 timeout 270 "$PY" -m tune.run --space benchmarks/gpu_study.yaml \
        --storage-path "$store" --name gpu 2>&1 | tee ${OUT:+"$OUT/study.log"}
    echo "study wall time: $((SECONDS - started)) s"
    # What each trial ran on, from its checkpoints' meta.json (the record holds the metrics).
    "$PY" - "$store/gpu" "${OUT:-}" <<'PYEOF'
import json, sys
from pathlib import Path
from tune.study import Study
from tune.storage import checkpoint_metas
record = Study.open(Path(sys.argv[1]))
rows = []
for t in record.trials():
    metas = [meta for _, meta in checkpoint_metas(record.runs, t.number).values()]
    last = t.epochs[max(t.epochs)] if t.epochs else {}
    rows.append({"trial": t.name, "status": t.status, "epochs": sorted(t.epochs),
                 "val_loss": last.get("val_loss"), "peak_memory_mb": last.get("peak_memory_mb"),
                 "supervised_tokens_per_s": last.get("supervised_tokens_per_s"),
                 "gpus": sorted({m.get("ray", {}).get("gpu_ids", "?") for m in metas})})
for r in rows:
    print(r)
if sys.argv[2]:
    Path(sys.argv[2], "study_trials.json").write_text(json.dumps(rows, indent=1))
PYEOF
}

{
    case "$PHASE" in
        throughput) throughput ;;
        study) study ;;
        all) throughput; study ;;
        *) echo "usage: $0 [throughput|study|all]" >&2; exit 2 ;;
    esac
} 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
