#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install video_ens into it.
#
#   bash tools/setup_env.sh            # .venv beside this repo, dev + data + train extras
#   VENV=/path/to/venv bash tools/setup_env.sh
#
# Without a visible NVIDIA GPU the CPU build of torch is pinned (torch==2.13.0, the +cpu wheel): an unpinned
# `torch` would pull a multi-GB CUDA build. With a GPU, the CUDA build that pip resolves is kept (or the one the
# cluster already has), with the Triton release that build pins. On CPU, Triton is pinned to 3.7.1, the release
# CUDA torch 2.13 ships with, so the interpreter the tests run is the Triton of the matching GPU build (3.6.0's
# interpreter cannot run a loop bounded by a loaded value under numpy 2.4, which our kernels do).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
py=${PYTHON:-python3}
stamp="$venv/.video_ens-installed"

if [ -f "$stamp" ] && [ "$stamp" -nt "$root/pyproject.toml" ] && [ -z "${FORCE:-}" ]; then
  echo "setup_env: $venv is up to date (FORCE=1 to reinstall)"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup_env: creating $venv"
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# pip warns once per missing folder of a configured local index; those lines say nothing about this install.
quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; }; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup_env: GPU visible, keeping the CUDA build of torch"
  quiet "${pip[@]}" install 'torch>=2.4,<2.15'
else
  echo "setup_env: no GPU visible, installing the CPU build torch==2.13.0"
  # torchvision (the importer tests only) in the same command: its release pins the torch it pairs with.
  quiet "${pip[@]}" install torch==2.13.0 triton==3.7.1 torchvision==0.28.0
fi
echo "setup_env: installing video_ens with extras [${EXTRAS:-dev,triton}]"
quiet "${pip[@]}" install -e "$root[${EXTRAS:-dev,triton}]"
touch "$stamp"
echo "setup_env: done ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
