"""The DeepSpeed engine: config derivation, initialisation, checkpoints, export. The only DeepSpeed importer.

Batch fields are derived once from the recipe (micro-batch x accumulation x world size = global batch). Mixed
precision uses DeepSpeed's `torch_autocast` block rather than its `bf16` block: the latter casts every parameter,
BatchNorm's included, to bf16 (Lightning-AI/pytorch-lightning#14197), and on CPU fails unless the model is cast
first; `torch_autocast` keeps fp32 parameters and runs convs and matmuls in bf16 (design/ecosystem.md).

Checkpoints are DeepSpeed checkpoints (per-rank ZeRO shards) written under `<tag>.partial` and renamed to `<tag>`
only after every rank has finished writing and flushed its files, so a directory without the suffix is complete
by construction and a crash mid-save leaves only a `.partial` directory that is never loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as tdist

from . import dist, durable
from .config import Recipe

_TAG = re.compile(r"^step_(\d{9})$")
PARTIAL = ".partial"


def deepspeed_config(recipe: Recipe, *, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config dict for this recipe on `world_size` ranks (RecipeError when it cannot run here)."""
    train, ds = recipe.train, recipe.deepspeed
    micro, accum = recipe.batch_layout(world_size)
    cfg: dict = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {
            "stage": ds.zero_stage,
            "overlap_comm": ds.overlap_comm,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "contiguous_gradients": True,
        },
        # our torch optimizers are not on DeepSpeed's list of tested ZeRO optimizers; they are standard torch ones
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own step prints would interleave
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if recipe.optim.grad_clip is not None:
        cfg["gradient_clipping"] = recipe.optim.grad_clip
    if train.precision == "bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif train.precision == "fp16":
        # Autocast to fp16 with a dynamic loss scale (a torch GradScaler inside DeepSpeed's optimizer), not
        # DeepSpeed's "fp16" block: that one casts every parameter to fp16, BatchNorm's included, and expects fp16
        # inputs, where autocast keeps fp32 weights and BN and casts per op, as the bf16 path does.
        cfg["torch_autocast"] = {"enabled": True, "dtype": "float16"}
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process: make a single-rank one when no launcher did."""
    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
    dist.init(device)


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """Wrap model and optimizer in a DeepSpeed engine (call `ensure_process_group` first)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


# --------------------------------------------------------------------------------------------- checkpoints


def step_tag(step: int) -> str:
    return f"step_{step:09d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first, as (step, path)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _TAG.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> tuple[int, Path] | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(engine, root: str | Path, step: int, client_state: dict, *, keep: int) -> Path:
    """Write a complete checkpoint for `step` (all ranks call this), then keep only the newest `keep`."""
    root = Path(root)
    tag = step_tag(step)
    partial = root / (tag + PARTIAL)
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag + PARTIAL, client_state=client_state, save_latest=False)
    _fsync_tree(partial)  # each rank flushes what it wrote (shared file systems: flushing twice is harmless)
    _barrier()
    final = root / tag
    if dist.is_main():
        # fsynced with its folder before the rename: a committed checkpoint never lacks its marker after a crash
        durable.write_atomic(partial / "complete.json", json.dumps({"step": step, "world_size": dist.world_size()}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)  # the commit point: a directory rename is atomic on POSIX file systems
        _fsync_dir(root)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def remove_partial_checkpoints(root: str | Path) -> list[Path]:
    """Delete `.partial` directories left by a crash mid-save (rank 0 only); returns what was removed."""
    root = Path(root)
    removed = []
    if dist.is_main() and root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(PARTIAL):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    _barrier()
    return removed


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its ZeRO checkpoints pickle besides tensors and builtins (found by loading ZeRO-1
    and -2 checkpoints with weights_only=True): everything else in a checkpoint file is refused."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [loss_scaler.LossScaler, loss_scaler.DynamicLossScaler, loss_scaler.LossScaleConfig,
            loss_scaler.LossScaleProfile, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str, map_location=None, *, mmap: bool | None = None, _load=None):
    """torch.load with weights_only=True and only DeepSpeed's own checkpoint classes allowed: a checkpoint file
    cannot run code when it is read (DeepSpeed's engine itself loads with weights_only=False)."""
    load = _load or torch.load
    extra = {} if mmap is None else {"mmap": mmap}
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return load(path, map_location=map_location, weights_only=True, **extra)
        except Exception as e:  # torch raises UnpicklingError (or a RuntimeError wrapping it)
            raise RuntimeError(
                f"{path}: refused to load: it holds objects other than tensors and DeepSpeed's checkpoint classes "
                f"({str(e).splitlines()[0][:200]}). Only load checkpoints you wrote."
            ) from None


@contextlib.contextmanager
def torch_load_is_safe():
    """Within the block, every torch.load is `safe_torch_load`: for DeepSpeed code that calls torch.load itself
    with weights_only=False (zero_to_fp32, which exports ZeRO-3 weights)."""
    original = torch.load

    def load(f, map_location=None, *args, mmap=None, **kwargs):
        return safe_torch_load(f, map_location, mmap=mmap, _load=original)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def load_checkpoint(engine, path: str | Path) -> dict:
    """Load model, optimizer and engine state from a complete checkpoint directory; returns its client_state.

    Every file is read with `safe_torch_load` (weights_only=True) instead of DeepSpeed's unrestricted torch.load.
    """
    path = Path(path)
    if not _TAG.match(path.name) or not (path / "complete.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (expected step_NNNNNNNNN/ with complete.json)")
    if getattr(engine, "checkpoint_engine", None) is not None:
        engine.checkpoint_engine.load = safe_torch_load
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    return client_state or {}


def consolidated_state_dict(engine, checkpoint: str | Path | None = None) -> dict[str, torch.Tensor] | None:
    """Full fp32 model weights and buffers on rank 0 (None on other ranks), loadable without DeepSpeed.

    ZeRO stages 0-2 with fp32 or autocast keep full fp32 parameters on every rank, so the module's own state dict
    is the answer. ZeRO-3 (partitioned parameters) and fp16 (half-precision module, fp32 masters in the optimizer)
    are rebuilt from the saved `checkpoint` with DeepSpeed's zero_to_fp32.
    """
    stage = engine.zero_optimization_stage()
    half = engine.fp16_enabled()
    if stage < 3 and not half:
        if not dist.is_main():
            return None
        return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                for k, v in engine.module.state_dict().items()}
    if checkpoint is None:
        raise ValueError("ZeRO-3 and fp16 runs export their fp32 weights from a saved checkpoint: pass checkpoint=")
    _barrier()
    if not dist.is_main():
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = Path(checkpoint)
    with torch_load_is_safe():  # zero_to_fp32 reads the shards with weights_only=False
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    buffers = {k: v.detach().cpu().clone() for k, v in engine.module.named_buffers()}
    return {**buffers, **{k: v.float() for k, v in weights.items()}}


def _barrier() -> None:
    if dist.is_initialized():
        tdist.barrier()
