#!/usr/bin/env bash
# One command for a lent GPU (no network): the GPU-marked tests, the compile check for this device,
# and the topk_rank / prefill_attention benchmarks, writing their rows to benchmarks/results/.
# Budget: the step timeouts sum to 470 s (< 8 min) plus start-up; the script
# goes on after a failed step, then exits non-zero if any failed. Uses the installed wheels only.
#   bash scripts/gpu_check.sh            (or: make gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
LOG_DIR=${GPU_CHECK_LOG_DIR:-benchmarks/results/gpu_check_logs}
mkdir -p "$LOG_DIR"
failed=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  echo "== $name (limit ${seconds}s): $*"
  local start=$SECONDS
  if timeout --signal=INT --kill-after=20 "$seconds" "$@" 2>&1 | tee "$LOG_DIR/$name.log"; then
    echo "== $name: ok in $((SECONDS - start)) s"
  else
    echo "== $name: FAILED (status ${PIPESTATUS[0]}) after $((SECONDS - start)) s"
    failed+=("$name")
  fi
}

"$PYTHON" - <<'PY' || { echo "no CUDA GPU visible to torch: nothing to check"; exit 2; }
import sys, torch, triton
if not torch.cuda.is_available():
    sys.exit(1)
print(f"{torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
      f"torch {torch.__version__}, triton {triton.__version__}")
PY

# 1. Kernel tests on the GPU (the interpreter-only ones skip themselves; gpu-marked ones run).
step gpu-tests 170 "$PYTHON" -m pytest -q -p no:cacheprovider -x tests/kernels
# 2. The compile check for this device's architecture: every tile autotune can pick, real device ptxas.
step compile-check 90 "$PYTHON" -m benchmarks.compile_check --device --level default --jobs "$(nproc)"
# 3. Benchmarks (rows appended to benchmarks/results/*.jsonl with the GPU's name).
step bench-topk 60 "$PYTHON" -m benchmarks.topk_rank
step bench-attention 150 "$PYTHON" -m benchmarks.prefill_attention

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu-check: FAILED steps: ${failed[*]}"
  exit 1
fi
echo "gpu-check: all steps passed; rows in benchmarks/results/"
