#!/usr/bin/env bash
# GPU-only checks and timings of the FP8 kernels (framework/fp8) on one CUDA GPU, in well under 8 minutes.
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
PYTHONUNBUFFERED=1 timeout 470 "$PY" bench/gpu_fp8.py | tee bench/out/gpu_fp8.md
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "bench/gpu.sh: stopped after 470 s" >&2
exit "$status"
