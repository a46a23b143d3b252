#!/usr/bin/env bash
# The test command (README, CI): runs the suite in the active environment when it has video_ens, otherwise
# creates/refreshes .venv with tools/setup_env.sh first. Extra arguments go to pytest, e.g.
#   bash tools/test.sh -k objective        bash tools/test.sh -m "not integration"
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ -n "${VIRTUAL_ENV:-}" ] && python -c "import video_ens, pytest" >/dev/null 2>&1; then
  py=python
else
  bash tools/setup_env.sh
  py="$root/.venv/bin/python"
fi
# The Triton interpreter must be chosen before triton is first imported; the kernel tests run on CPU through it.
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
# Two cores: keep each test process from oversubscribing them with BLAS/OpenMP threads.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
set +e
"$py" -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure of the suite, not a pass.
exit $rc
