#!/usr/bin/env bash
# GPU-only checks on one CUDA GPU, in well under 8 minutes: the NCCL SM budget of the expert-parallel group
# (bench/gpu_nccl.py) and the FP8 kernels (framework/fp8, bench/gpu_fp8.py) with their timings.
# Usage: bash bench/gpu.sh        PYTHON=/path/to/python picks the interpreter (default: python3).
# Prints markdown tables and keeps them in bench/out/gpu_fp8.md; exits non-zero if a check fails or no GPU is seen.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 2
fi
mkdir -p bench/out
PYTHONUNBUFFERED=1 timeout 60 "$PY" bench/gpu_nccl.py | tee bench/out/gpu_nccl.md
nccl_status=${PIPESTATUS[0]}
PYTHONUNBUFFERED=1 timeout 410 "$PY" bench/gpu_fp8.py | tee bench/out/gpu_fp8.md
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "bench/gpu.sh: stopped after 410 s" >&2
[ "$status" = 0 ] && status=$nccl_status
exit "$status"
