"""Process-group helpers: who am I, start and stop the group, log once.

Launchers (`torchrun`, SLURM's `srun` through launch.sh) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; everything here reads those. A single process without them is rank 0 of 1 and needs no group.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import torch
import torch.distributed as dist

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def pick_device(choice: str = "auto") -> torch.device:
    """"auto": this rank's CUDA device when CUDA is available, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is \"cuda\" but no CUDA device is visible: set train.device to \"auto\" or \"cpu\"")
    torch.cuda.set_device(local_rank())
    return torch.device("cuda", local_rank())


def init(device: torch.device) -> None:
    """Join the process group the launcher described (nccl on GPU, gloo on CPU); a no-op for one process."""
    if is_initialized() or (int(os.environ.get("WORLD_SIZE", 1)) == 1 and "MASTER_ADDR" not in os.environ):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None:
        # Under torchrun the key-value store can outlive a worker group: after `--max-restarts` restarts the group,
        # groups created later (DeepSpeed clones the world group) would read the dead workers' addresses from it.
        # A prefix per restart attempt keeps every attempt's keys apart.
        r, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=not agent and r == 0, multi_tenant=True)
        store = dist.PrefixStore(f"video_ens/attempt_{restart}", store)
        dist.init_process_group(backend=backend, store=store, rank=r, world_size=world, **kwargs)
        return
    dist.init_process_group(backend=backend, **kwargs)


def shutdown(failed: bool | None = None, exit_code: int = 1) -> None:
    """Leave the process group; call it from a `finally` around the rank's work.

    On success: barrier, then destroy the group (without both, 2 of 6 two-rank runs aborted at exit,
    environment.md). On failure (`failed=True`, or by default an exception passing through the caller's `finally`)
    with more than one rank: this rank prints its error now and exits at once with `exit_code`, without the
    barrier.
    The other ranks may be waiting in a collective that this rank will never join, and a barrier would hold the
    error back until the collective timeout (30 min on gloo, 10 on NCCL); torchrun instead sees the exit at once
    and stops the other workers (or restarts the group under --max-restarts).
    """
    if not is_initialized():
        return
    if failed is None:
        exc = sys.exc_info()[1]
        failed = exc is not None and not (isinstance(exc, SystemExit) and exc.code in (0, None))
    if failed and dist.get_world_size() > 1:
        if sys.exc_info()[1] is not None:
            traceback.print_exc()
        print(
            f"rank {dist.get_rank()}: failed; exiting without the shutdown barrier so that the launcher stops the "
            "other ranks now",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(exit_code)
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def get_logger(name: str = "video_ens") -> logging.Logger:
    """A logger that prints on rank 0 only (other ranks log warnings and errors)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main() else logging.WARNING)
    return logger
