"""Process-group helpers: who am I, start and stop the group, log once.

Launchers (`torchrun`, SLURM's `srun` through launch.sh) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; everything here reads those. A single process without them is rank 0 of 1 and needs no group.
"""

from __future__ import annotations

import datetime
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
    """ "auto": this rank's CUDA device when CUDA is available, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError('train.device is "cuda" but no CUDA device is visible: set train.device to "auto" or "cpu"')
    torch.cuda.set_device(local_rank())
    return torch.device("cuda", local_rank())


# The collective timeout this process was started with (train.collective_timeout_s), for the failure message.
_timeout_s: float | None = None


def init(device: torch.device, timeout_s: float | None = None) -> None:
    """Join the process group the launcher described (nccl on GPU, gloo on CPU); a no-op for one process.

    timeout_s bounds every collective of this group and of every group made after it (DeepSpeed makes its own):
    a rank waiting longer for a stalled one fails, and `shutdown` names the setting."""
    global _timeout_s
    if is_initialized() or (int(os.environ.get("WORLD_SIZE", 1)) == 1 and "MASTER_ADDR" not in os.environ):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    if timeout_s is not None:
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs["timeout"] = timeout
        # new_group() without a timeout takes torch's per-backend default (30 min for gloo), and DeepSpeed clones the
        # world group that way for its data-parallel all-reduce: move the defaults too.
        from torch.distributed import distributed_c10d

        distributed_c10d.default_pg_timeout = timeout
        if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
            distributed_c10d.default_pg_nccl_timeout = timeout
        _timeout_s = timeout_s
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None:
        # Under torchrun the key-value store can outlive a worker group: after `--max-restarts` restarts the group,
        # groups created later (DeepSpeed clones the world group) would read the dead workers' addresses from it.
        # A prefix per restart attempt keeps every attempt's keys apart.
        r, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=not agent and r == 0,
            multi_tenant=True,
        )
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
        exc = sys.exc_info()[1]
        if exc is not None:
            traceback.print_exc()
            if _timeout_s is not None and _is_timeout(exc):
                print(
                    f"rank {dist.get_rank()}: a collective waited longer than train.collective_timeout_s = "
                    f"{_timeout_s:g} s: another rank stalled or died (see its log above). If steps, evaluations or "
                    "checkpoint saves legitimately take longer, raise train.collective_timeout_s",
                    file=sys.stderr,
                    flush=True,
                )
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


def _is_timeout(exc: BaseException) -> bool:
    """gloo: "Timed out waiting ... for recv/send operation"; NCCL: "Watchdog caught collective operation timeout"."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return "timed out" in text or "timeout" in text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not to the one there when the logger was made
    (a test harness or a tool that redirects stderr later would otherwise lose the messages)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def get_logger(name: str = "video_ens") -> logging.Logger:
    """A logger that prints on rank 0 only (other ranks log warnings and errors)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main() else logging.WARNING)
    return logger
