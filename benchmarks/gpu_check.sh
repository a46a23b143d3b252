#!/usr/bin/env bash
# The GPU checks, as one script sized for a short lease on one H100 (about 9 minutes):
#
#   bash tools/device_wheels.sh                  # here, once: .whl/ for a machine without network (carry it along)
#   bash benchmarks/gpu_check.sh                 # there: results in benchmarks/results/gpu_<date>/ (or $OUT)
#   BUDGET_S=300 bash benchmarks/gpu_check.sh    # a shorter overall budget; later sections get what is left
#   SMOKE=1 bash benchmarks/gpu_check.sh         # on CPU: tiny shapes in Triton's interpreter, to check the script
#                                                # itself (tests/integration/test_gpu_check.py runs this)
#
# In order of importance, each under its own time cap and all under BUDGET_S (default 540 s), so a section that
# runs long takes time from the later ones and never the whole run:
#   env.txt             GPU, driver, torch / triton / python versions
#   pytest_cuda         tests/unit/test_kernels.py and test_kernel_registers.py on the GPU: the compiled kernels
#                       (not the interpreter) against the references at every dtype, odd shapes, masked lengths
#   kernels_swap.csv    bench_kernels.py, SWAP at the DBoF shapes: eager, torch.compile, Triton; fwd, bwd, both
#   kernels_models.csv  one training step of DBoF (batch 128) and S3D-G (batch 8, 64x224x224), bf16 autocast,
#                       with kernels="reference" and "triton"
#   kernels_gates.csv   feature gate (both layouts), context gate and its training epilogue
#   train_metrics.jsonl launch.sh on the YouTube-8M demo: DeepSpeed (ZeRO-2) on NCCL, bf16, kernels="auto"
#                       (the fused SWAP and context gates), 200 steps and the final evaluation
#   step_s3dg.csv       bench_step.py: the full S3D-G 2-branch recipe at micro-batch 8, DeepSpeed engine vs a plain
#                       loop, TFLOP/s and MFU
#   train_fp16          the same demo run for a quarter of the steps in fp16 (autocast + loss scaling): log only
# Every CSV row is written when it is measured, so a section stopped at its cap keeps what it measured. All output
# goes to log.txt, and each section's exit status and duration to summary.txt: eight files, as many as a lent
# machine sends back.
#
# The kernel sections need only torch and triton (and pytest): the package is used from this checkout through
# PYTHONPATH, not installed. The last two need DeepSpeed and WebDataset: from .whl/ when it is there (installed
# into a temporary folder), else from the environment. VIDEO_ENS_GIT_SHA, when set, is recorded in the CSVs (a
# copied tree has no .git to read it from).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
budget=${BUDGET_S:-540}
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

if [ -d .whl ] && ! "$py" -c "import deepspeed, webdataset" >/dev/null 2>&1; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" .whl/*.whl &&
    export PYTHONPATH="$PYTHONPATH:$site" && echo "installed .whl/ into $site"
fi

section pytest_cuda 120 "$py" -m pytest -q -p no:cacheprovider tests/unit/test_kernels.py tests/unit/test_kernel_registers.py
section kernels_swap 130 "$py" benchmarks/bench_kernels.py "${smoke[@]}" --ops swap_pool --models '' --out "$out/kernels_swap.csv"
section kernels_models 90 "$py" benchmarks/bench_kernels.py "${smoke[@]}" --ops '' --models dbof,s3dg --out "$out/kernels_models.csv"
# no new case starts in the last 45 s of the section: a case compiles its graphs before it measures anything
section kernels_gates 110 "$py" benchmarks/bench_kernels.py "${smoke[@]}" --ops feature_gate,context_gate,gate_epilogue \
  --models '' --budget-s 65 --out "$out/kernels_gates.csv"

run=$(mktemp -d)
if [ -n "${SMOKE:-}" ]; then steps=20 step_recipe=recipes/demo_kinetics_s3dg_mu2.json; else
  steps=200 step_recipe=recipes/kinetics_s3dg_mu2.json
fi
section train_demo 100 env PYTHON="$py" NPROC=1 DEMO_DIR="$run/data" bash launch.sh recipes/demo_yt8m_dbof_mu2.json \
  --run-dir "$run/yt8m" --set train.precision=bf16 --set model.options.kernels=auto --set train.max_steps=$steps
cp "$run/yt8m/metrics.jsonl" "$out/train_metrics.jsonl" 2>/dev/null || echo "no metrics.jsonl from train_demo"
section step_s3dg 90 "$py" benchmarks/bench_step.py "$step_recipe" --set train.micro_batch_size=8 --steps 10 \
  --out "$out/step_s3dg.csv"
# fp16 (autocast + DeepSpeed's GradScaler) has only run on CPU: a short run on the GPU, its log in log.txt
section train_fp16 60 env PYTHON="$py" NPROC=1 DEMO_DIR="$run/data" bash launch.sh recipes/demo_yt8m_dbof_mu2.json \
  --run-dir "$run/fp16" --set train.precision=fp16 --set model.options.kernels=auto --set train.max_steps=$((steps / 4))
echo "results in $out:"
ls -l "$out"
