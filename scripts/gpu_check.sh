#!/usr/bin/env bash
# Throughput table on a lent CUDA machine (docs: /work/shared/docs/gpu.md), in under 8 minutes.
# It uses the machine's own torch; the pure-Python wheels it lacks (diffusers, importlib_metadata) travel in
# .gpu/whl (an ignored folder named in the device tool's `carry`), prepared on this side with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .gpu/whl diffusers importlib_metadata
# Run from the repository root: bash scripts/gpu_check.sh   (writes $OUT/gpu_check.md and $OUT/gpu_check.log)
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .gpu/whl ] && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# idgbr gpu-check stops starting stages after --budget-min; timeout is the hard stop
timeout 470 python3 -m idgbr gpu-check --out "$OUT/gpu_check.md" --budget-min 6.5 "$@" 2>&1 | tee "$OUT/gpu_check.log"
