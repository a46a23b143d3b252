#!/usr/bin/env bash
# The GPU checks of the fused kernels, as one script sized for a short lease on one H100 (about 9 minutes):
#
#   bash benchmarks/gpu_check.sh                 # results in benchmarks/results/gpu_<date>/ (or in $OUT when set)
#   BUDGET_S=300 bash benchmarks/gpu_check.sh    # a shorter overall budget; later sections get what is left
#   SMOKE=1 bash benchmarks/gpu_check.sh         # on CPU: tiny shapes in Triton's interpreter, to check the script
#                                                # itself (tests/integration/test_gpu_check.py runs this)
#
# In order of importance, each under its own time cap and all under BUDGET_S (default 520 s), so a section that
# runs long takes time from the later ones and never the whole run:
#   1. env.txt           GPU, driver, torch / triton / python versions
#   2. pytest_cuda       tests/unit/test_kernels.py and test_kernel_registers.py on the GPU: the compiled kernels
#                        (not the interpreter) against the references at every dtype, odd shapes, masked lengths
#   3. kernels_swap.csv  bench_kernels.py, SWAP at the DBoF shapes: eager, torch.compile, Triton; fwd, bwd, both
#   4. kernels_models.csv  one training step of DBoF (batch 128) and S3D-G (batch 8, 64x224x224), bf16 autocast,
#                        with kernels="reference" and "triton"
#   5. kernels_gates.csv feature gate (both layouts), context gate and its training epilogue, until the budget ends
# Every CSV row is written when it is measured, so a section stopped at its cap keeps what it measured. All output
# goes to log.txt, and each section's exit status and duration to summary.txt (six files in all).
#
# Needs only torch and triton (and pytest for section 2): the package is used from this checkout through
# PYTHONPATH, not installed, and nothing here imports DeepSpeed or a decoder. VIDEO_ENS_GIT_SHA, when set, is
# recorded in the CSVs (a copied tree has no .git to read it from).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
budget=${BUDGET_S:-520}
out=${OUT:-benchmarks/results/gpu_$(date -u +%Y-%m-%d)}
mkdir -p "$out"
: >"$out/log.txt"
: >"$out/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
smoke=()
if [ -n "${SMOKE:-}" ]; then
  smoke=(--smoke)
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET
fi
end=$((SECONDS + budget))

# section NAME CAP_S COMMAND...: runs COMMAND for at most min(CAP_S, what is left of the budget)
section() {
  local name=$1 cap=$2
  shift 2
  local left=$((end - SECONDS))
  ((left < cap)) && cap=$left
  if ((cap < 20)); then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$out/summary.txt"
    return
  fi
  echo "== $name (cap ${cap}s): $*"
  local t0=$SECONDS
  echo "== $name: $*" >>"$out/log.txt"
  timeout --signal=INT --kill-after=15 "$cap" "$@" 2>&1 | tee -a "$out/log.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$out/summary.txt"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 ||
    echo "nvidia-smi: not available"
  "$py" - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"not importable ({e})"
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", tv)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30, 1))
EOF
} 2>&1 | tee "$out/env.txt"

section pytest_cuda 150 "$py" -m pytest -q -p no:cacheprovider tests/unit/test_kernels.py tests/unit/test_kernel_registers.py
section kernels_swap 150 "$py" benchmarks/bench_kernels.py "${smoke[@]}" --ops swap_pool --models '' --out "$out/kernels_swap.csv"
section kernels_models 120 "$py" benchmarks/bench_kernels.py "${smoke[@]}" --ops '' --models dbof,s3dg --out "$out/kernels_models.csv"
# no new case starts in the last 45 s of the budget: a case compiles its graphs before it measures anything
left=$((end - SECONDS))
section kernels_gates "$left" "$py" benchmarks/bench_kernels.py "${smoke[@]}" --ops feature_gate,context_gate,gate_epilogue --models '' \
  --budget-s "$((left > 90 ? left - 45 : 45))" --out "$out/kernels_gates.csv"
echo "results in $out:"
ls -l "$out"
