#!/usr/bin/env bash
# Every GPU-only check on one CUDA GPU, in at most 8 minutes, written to bench/out/gpu.md by this script:
#   1. NCCL SM budget read back from the communicator (bench/gpu_nccl.py)
#   2. FP8 kernels vs the torch emulation, and TFLOP/s vs torch._scaled_mm row-wise and bf16 (bench/gpu_fp8.py)
#   3. deepseek_v3_small training steps, fp8 on and off: tokens/s, MFU, peak memory (bench/gpu_train.py)
#   4. the EP and pipeline equality checks on CUDA tensors, 2 processes on the GPU over gloo (bench/gpu_equal.py)
# Usage: bash bench/gpu.sh        PYTHON=/path/to/python picks the interpreter (default: .venv/bin/python or python3)
# Exit status: 0 when every part passed, 1 when a check failed, 2 when no GPU is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
unset TRITON_INTERPRET  # compiled kernels, not the CPU interpreter
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 2
fi
mkdir -p bench/out
OUT=bench/out/gpu.md
START=$(date +%s)
"$PY" -m launch.prepare_data >/dev/null 2>&1 || echo "bench/gpu.sh: launch.prepare_data failed" >&2
{
  echo "# GPU checks ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo
  "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}')"
} > "$OUT"
status=0
part() {  # part TITLE LIMIT_S COMMAND...: run one part under its time limit, append its output and status
  local title=$1 limit=$2; shift 2
  local t0=$(date +%s)
  printf '\n## %s\n\n' "$title" >> "$OUT"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" >> "$OUT.part" 2> "$OUT.err"
  local rc=$?
  cat "$OUT.part" >> "$OUT"; rm -f "$OUT.part"
  [ "$rc" = 124 ] && echo "stopped after its limit of $limit s" >> "$OUT"
  [ "$rc" != 0 ] && { echo; echo "exit status $rc; last lines of its log:"; echo '```'; tail -5 "$OUT.err"; echo '```'; } >> "$OUT"
  echo "_${title}: exit $rc, $(( $(date +%s) - t0 )) s_" >> "$OUT"
  [ "$rc" != 0 ] && status=1
  rm -f "$OUT.err"
}
part "NCCL SM budget" 45 "$PY" bench/gpu_nccl.py
part "FP8 kernels" 200 "$PY" bench/gpu_fp8.py
part "Training steps, fp8 on and off" 150 "$PY" bench/gpu_train.py
part "Equality on CUDA tensors" 45 "$PY" bench/gpu_equal.py
echo -e "\nTotal $(( $(date +%s) - START )) s; overall status $status" >> "$OUT"
cat "$OUT"
exit "$status"
