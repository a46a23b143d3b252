#!/usr/bin/env bash
# Start a training run: recipe + overrides -> torchrun (one node or many) -> python -m video_ens.train
#
#   bash launch.sh RECIPE [--run-dir DIR] [--set key=value ...]
#
# The run folder: DIR, or runs/<recipe file name>, with "-<hash>" added when --set changes what the run computes
# (train.seed, optim.lr, ...; not its length, workers or evaluation). A folder another run holds, or one holding a
# run of another recipe, is refused (--set train.resume=force resumes the latter anyway).
# Processes: one per visible GPU, or NPROC, or one on CPU.
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (or, under SLURM, SLURM_NNODES, SLURM_NODEID and the
# first host of SLURM_JOB_NODELIST); run the same command on every node. No SSH is needed.
# DRY_RUN=1 validates the recipe, builds the model and the data, runs one step and writes nothing.
# Stopping: SIGTERM, SIGUSR1 (SLURM's --signal=USR1@T), SIGINT or SIGHUP to this process (it becomes torchrun) or to
# every process of the job: each rank finishes its step, checkpoints it and exits; the launch exits 143 and the same
# command resumes. STOP_GRACE_S (default 120) is how long torchrun then waits for the ranks before SIGKILL: it must
# cover a step and a checkpoint save. If torchrun itself is killed, its ranks and their data workers die with it.
# Demo recipes (data.demo set) generate their dataset under data/demo first (DEMO_DIR to change).
# The environment: PYTHON when set; else the active virtualenv or conda env, or else the python3 on PATH (a container
# image), when it has torch, deepspeed and webdataset; else .venv (created by tools/setup_env.sh). The package runs
# from this checkout whichever interpreter it is.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

# whether interpreter $1 has what training needs (found, not imported: importing deepspeed takes seconds)
has_deps() {
  "$1" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("torch", "deepspeed", "webdataset")))' \
    >/dev/null 2>&1
}
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && has_deps python; then
  py=python
elif [ ! -x "$root/.venv/bin/python" ] && command -v python3 >/dev/null && has_deps python3; then
  py=python3
else
  bash "$root/tools/setup_env.sh"
  py="$root/.venv/bin/python"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

recipe=$1
shift
sets=()
rest=() # the arguments for video_ens.train but --run-dir, which is passed on resolved
run_dir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --run-dir) run_dir=${args[$((i + 1))]:-}; i=$((i + 1)); continue ;;
    --run-dir=*) run_dir=${args[$i]#--run-dir=}; continue ;;
  esac
  if [ "${args[$i]}" = "--set" ] && [ $((i + 1)) -lt ${#args[@]} ]; then sets+=(--set "${args[$((i + 1))]}"); fi
  rest+=("${args[$i]}")
done

if [ -n "${SLURM_NNODES:-}" ] && [ -z "${NNODES:-}" ]; then
  NNODES=$SLURM_NNODES
  NODE_RANK=${SLURM_NODEID:-0}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
fi
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$py" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

# Fail before any process starts: an unknown key, a wrong type, an impossible value or batch fields that do not
# fit this world size stop here, naming the JSON path (0.1 s, without torch). The default run folder is named
# from the recipe and these overrides, before DEMO_DIR moves the data: the same command finds the same folder.
world=$((NPROC * nnodes))
check=("$py" -m video_ens.config "$recipe" "${sets[@]}" --world-size "$world")
if [ -z "$run_dir" ]; then
  run_dir=$("${check[@]}" --default-run-dir)
else
  "${check[@]}" --quiet
fi

# Demo recipes name a demo dataset: generate it once, here, before any rank starts (idempotent: "up to date").
# DEMO_DIR moves the demo data: the recipe's data/demo/... shard paths are pointed there too.
demo=$("$py" -m video_ens.config "$recipe" "${sets[@]}" --get data.demo)
extra=()
if [ -n "$demo" ]; then
  if [ -n "${DEMO_DIR:-}" ]; then
    for field in data.train_shards data.val_shards; do
      path=$("$py" -m video_ens.config "$recipe" "${sets[@]}" --get "$field")
      case "$path" in data/demo/*) extra+=(--set "$field=${DEMO_DIR%/}/${path#data/demo/}") ;; esac
    done
  fi
  if [ "$node_rank" = "0" ]; then
    "$py" "$root/tools/make_demo_data.py" --kind "$demo" --out "${DEMO_DIR:-data/demo}" --refresh
  fi
fi

[ -n "${DRY_RUN:-}" ] && [ "${DRY_RUN}" != "0" ] && extra+=(--dry-run)
# One OpenMP thread per process unless told otherwise: data workers and ranks already fill the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$nnodes" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  echo "launch: NNODES=$nnodes needs MASTER_ADDR, the address of the node with NODE_RANK=0 (under SLURM it is the" \
    "first host of SLURM_JOB_NODELIST); without it every node would wait for a rendezvous on its own 127.0.0.1" >&2
  exit 2
fi

# What else needs no process group stops here too, as one line rather than under torchrun's ChildFailedError
# traceback: data paths and kinds, the model against the data, and (node 0) a run folder another run holds or
# that holds a run of another recipe. 1.5-3.5 s on the 2-core CI machine, mostly importing torch.
"$py" -m video_ens.train "$recipe" "${rest[@]}" --run-dir "$run_dir" "${extra[@]}" --check --world-size "$world" \
  --node-rank "$node_rank"

if [ "$nnodes" -eq 1 ] && [ -z "${MASTER_PORT:-}" ]; then
  rdzv=(--standalone)
else
  rdzv=(--nnodes "$nnodes" --node-rank "$node_rank" --master-addr "$master_addr" --master-port "$master_port")
fi
# torchrun passes on only SIGTERM, SIGINT, SIGHUP and SIGQUIT by default (SIGUSR1 ended it at once and orphaned the
# ranks), and kills the ranks 30 s after passing one on, which a large checkpoint save can outlast. An older torch
# has neither option: there SIGUSR1 ends torchrun, and its ranks die with it (no orphans, no checkpoint).
stop=()
if "$py" -m torch.distributed.run --help 2>/dev/null | grep -q -- "--shutdown-timeout"; then
  stop=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --shutdown-timeout "${STOP_GRACE_S:-120}")
fi
cmd=("$py" -m video_ens.torchrun "${rdzv[@]}" --nproc-per-node "$NPROC" ${MAX_RESTARTS:+--max-restarts "$MAX_RESTARTS"}
  "${stop[@]}" -m video_ens.train "$recipe" "${rest[@]}" --run-dir "$run_dir" "${extra[@]}")
echo "launch: ${cmd[*]}"
exec "${cmd[@]}"
