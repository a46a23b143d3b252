#!/usr/bin/env bash
# Collect, into .whl/, the wheels that a GPU machine without network access needs for the training path, for its
# Python (3.12 by default, x86-64 Linux): DeepSpeed and what it needs beyond torch/numpy/tqdm/psutil/... (hjson and
# the pydantic stack), and WebDataset (with braceexpand). Versions are those of this checkout's .venv, the ones the
# tests ran against. torch, triton, numpy, safetensors, protobuf and pillow are expected on the machine.
#
#   bash tools/device_wheels.sh                      # -> .whl/ (ignored by git, about 5 MB)
#   PYVER=3.11 DEST=/tmp/whl bash tools/device_wheels.sh
#
# On the machine, before anything imports them:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/video_ens_site .whl/*.whl
#   export PYTHONPATH=/tmp/video_ens_site:$PYTHONPATH
# (benchmarks/gpu_check.sh does this itself when .whl/ is there.) DeepSpeed is published as a source archive only;
# its wheel is built here from that archive, with no compiled ops (it JIT-builds what it needs, and the training
# path uses a torch optimizer, so it needs none on a GPU).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
dest=${DEST:-$root/.whl}
pyver=${PYVER:-3.12}
pip=("$py" -m pip --disable-pip-version-check -q)
quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; }; }

version() {
  local v
  v=$("$py" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "device_wheels: $1 is not installed in $py; run tools/setup_env.sh first" >&2; exit 1; }
  echo "$v"
}

binary=()
for pkg in pydantic pydantic_core annotated-types typing-inspection hjson webdataset braceexpand; do
  binary+=("$pkg==$(version "$pkg")")
done
rm -rf "$dest"
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
quiet "${pip[@]}" download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dest" "${binary[@]}"
quiet "${pip[@]}" wheel --no-deps --no-build-isolation -w "$dest" "deepspeed==$(version deepspeed)"
echo "device_wheels: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1), in $dest:"
ls "$dest"
