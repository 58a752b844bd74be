#!/usr/bin/env bash
# GPU check, prepared to run unattended in at most ~8 minutes on one lent GPU:
#
#     bash benchmarks/gpu_check.sh            # from the repository root
#
# MiniMind2 26M (hidden 512 x 8 layers), bf16 autocast, batch 16, max_seq_len 512: aggregate supervised
# tokens/s of 4 concurrent trial processes capped at 0.25 of the GPU each vs 1 process with the whole
# GPU (goal >= 2.5x), then the same two layouts with torch.compile. Figures are printed and, when $OUT
# is set, written to $OUT/gpu_throughput.json (after every layout) and $OUT/gpu_check.log.
# Needs the repository's Python dependencies (torch with CUDA); installs the project itself if needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import torch, transformers" 2>/dev/null; then
    "$PY" -m pip install -q -e .
fi

LOG=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu_check.log"
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    # Eager layouts first, so their figures exist even if compilation runs long; each layout is cut
    # off after 150 s and the whole run after 450 s (the JSON is rewritten after every layout).
    timeout 450 "$PY" benchmarks/gpu_throughput.py --layouts 1x1,4x0.25 --compile --seconds 20 \
        --warmup-steps 12 --timeout 150 ${OUT:+--out "$OUT"}
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
