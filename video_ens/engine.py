"""The DeepSpeed engine: config derivation, initialisation, checkpoints, export. The only DeepSpeed importer.

Batch fields are derived once from the recipe (micro-batch x accumulation x world size = global batch). Mixed
precision uses DeepSpeed's `torch_autocast` block rather than its `bf16` block: the latter casts every parameter,
BatchNorm's included, to bf16 (Lightning-AI/pytorch-lightning#14197), and on CPU fails unless the model is cast
first; `torch_autocast` keeps fp32 parameters and runs convs and matmuls in bf16 (design/ecosystem.md).

Checkpoints are DeepSpeed checkpoints (per-rank ZeRO shards) written under `<tag>.partial` and renamed to `<tag>`
only after every rank has finished writing and flushed its files, so a directory without the suffix is complete
by construction and a crash mid-save leaves only a `.partial` directory that is never loaded. One written by
another number of ranks is loaded by rebuilding its ZeRO partitions for this one (DeepSpeed refuses it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as tdist

from . import dist, durable
from .config import Recipe

_TAG = re.compile(r"^step_(\d{9})$")
PARTIAL = ".partial"
LOG = dist.get_logger("video_ens.engine")


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
    # Always stated: DeepSpeed's own default clips the global norm to 1.0 (GRADIENT_CLIPPING_DEFAULT in 0.19), so
    # leaving the key out for grad_clip null clipped every run; 0.0 is DeepSpeed's "off".
    cfg["gradient_clipping"] = recipe.optim.grad_clip if recipe.optim.grad_clip is not None else 0.0
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


def ensure_process_group(device: torch.device, timeout_s: float | None = None) -> None:
    """DeepSpeed needs a process group even for one process: make a single-rank one when no launcher did.
    timeout_s: train.collective_timeout_s (see dist.init)."""
    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
    dist.init(device, timeout_s)


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

    return [
        loss_scaler.LossScaler,
        loss_scaler.DynamicLossScaler,
        loss_scaler.LossScaleConfig,
        loss_scaler.LossScaleProfile,
        ZeroStageEnum,
        fragment_address,
    ]


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
    shards = _optimizer_shard_files(path)
    if engine.zero_optimization() and shards and len(shards) != dist.world_size():
        return _load_resharded(engine, path, shards)
    if getattr(engine, "checkpoint_engine", None) is not None:
        engine.checkpoint_engine.load = safe_torch_load
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    return client_state or {}


# ------------------------------------------------------------------------------ resuming at another world size
#
# DeepSpeed refuses to load ZeRO optimizer partitions written by another number of ranks ("Automatic adjustment of
# ZeRO's optimizer state partitioning with a new world size is not currently supported"), and its Universal
# Checkpoint converter (ds_to_universal) knows only Adam's two moments, not SGD's momentum. So a resume at another
# world size rebuilds every parameter's full fp32 weight and optimizer state from the saved partitions and cuts
# this rank's partition of the new layout out of them: the same values, bit for bit, only placed differently.
# Every rank reads every shard and builds the full tensors: about twice the checkpoint's fp32 weights and states in
# host memory per rank (3.7 GB for the 229M-parameter DBoF with momentum), once per resume.


def _optimizer_shard_files(path: Path) -> list[Path]:
    """The per-rank ZeRO optimizer files of a checkpoint (stages 1-3 write one per rank), in rank order."""
    found = [
        (int(m.group(1)), f) for f in path.glob("*_optim_states.pt") if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))
    ]
    return [f for _, f in sorted(found)]


def _model_states_file(path: Path) -> Path:
    """Module weights (stages 0-2; empty parameters under ZeRO-3), buffers, parameter shapes and client state."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no DeepSpeed model states file")


def _is_partitioned(value, flat: torch.Tensor) -> bool:
    """An optimizer state with one value per element of the flat partition (momentum, Adam's moments), not a
    per-group scalar (Adam's step)."""
    return torch.is_tensor(value) and value.dim() == 1 and value.numel() >= flat.numel()


class SavedState(NamedTuple):
    full: dict[str, dict[str, torch.Tensor]]  # "fp32" and each optimizer state -> parameter name -> full tensor
    model: dict  # the model states file: "module" (buffers; weights below ZeRO-3), client state
    scalars: list[dict]  # per optimizer group (ZeRO-3: sub-group) of rank 0, the states that are not partitioned
    stage: int
    world_size: int


def full_parameter_states(path: str | Path) -> SavedState:
    """Every trainable parameter's full fp32 weight and optimizer states, by name, rebuilt from the per-rank
    partitions of a ZeRO (stage 1-3) checkpoint written at any world size; files read with `safe_torch_load`."""
    path = Path(path)
    model = safe_torch_load(str(_model_states_file(path)), "cpu")
    shards = [safe_torch_load(str(f), "cpu")["optimizer_state_dict"] for f in _optimizer_shard_files(path)]
    world, stage = len(shards), int(shards[0]["zero_stage"])
    full: dict[str, dict[str, torch.Tensor]] = {"fp32": {}}
    if stage <= 2:
        # A rank's flat partition of a group holds contiguous fragments of its parameters, located by name in
        # param_slice_mappings; a parameter is the concatenation of its fragments in rank order.
        states = [sd["base_optimizer_state"]["state"] for sd in shards]
        for g, shapes in enumerate(model["param_shapes"]):
            flats = [{"fp32": sd["single_partition_of_fp32_groups"][g]} for sd in shards]
            for flat, state in zip(flats, states, strict=True):
                flat.update({k: v for k, v in state.get(g, {}).items() if _is_partitioned(v, flat["fp32"])})
            for name, shape in shapes.items():
                pieces = [
                    (flat, sd["param_slice_mappings"][g][name])
                    for sd, flat in zip(shards, flats, strict=True)
                    if name in sd["param_slice_mappings"][g]
                ]
                for key in flats[0]:
                    value = torch.cat([flat[key].narrow(0, at.start, at.numel) for flat, at in pieces])
                    full.setdefault(key, {})[name] = value.view(shape)
        fp32_of_group = shards[0]["single_partition_of_fp32_groups"]
    else:
        # ZeRO-3 cuts every parameter into `world` equal slices (the last one padded); a rank's flat partition is
        # its slices of the parameters in param_shapes order, sub-group after sub-group (as zero_to_fp32 reads it).
        states = [sd["optimizer_state_dict"]["state"] for sd in shards]
        fp32_of_group = shards[0]["fp32_flat_groups"]
        keys = [k for k, v in states[0].get(0, {}).items() if _is_partitioned(v, fp32_of_group[0])]
        flats = [
            {
                "fp32": torch.cat(list(sd["fp32_flat_groups"])),
                **{k: torch.cat([state[i][k] for i in range(len(state))]) for k in keys},
            }
            for sd, state in zip(shards, states, strict=True)
        ]
        offset = 0
        for name, shape in ((n, s) for shapes in model["param_shapes"] for n, s in shapes.items()):
            numel = shape.numel()
            part = -(-numel // world)
            for key in flats[0]:
                value = torch.cat([flat[key].narrow(0, offset, part) for flat in flats])[:numel]
                full.setdefault(key, {})[name] = value.view(shape)
            offset += part
    scalars = [
        {k: v for k, v in states[0].get(i, {}).items() if not _is_partitioned(v, fp32_of_group[i])}
        for i in range(len(fp32_of_group))
    ]
    return SavedState(full, model, scalars, stage, world)


def _local_partitions(engine, full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """This rank's flat partition of each optimizer group (sub-group under ZeRO-3) in the live engine's layout,
    filled from full per-parameter tensors `full` (by name)."""
    opt, names = engine.optimizer, {p: n for n, p in engine.module.named_parameters()}
    out = []
    if engine.zero_optimization_stage() <= 2:
        for group, hp in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups, strict=True):
            flat = torch.zeros_like(hp)  # padding stays zero, as DeepSpeed keeps it
            for p in group:
                m = p._hp_mapping  # None when no slice of p lives on this rank
                if m is not None:
                    lp, hp_at = m.lp_fragment_address, m.hp_fragment_address
                    src = full[names[p]].reshape(-1).narrow(0, lp.start, lp.numel)
                    flat.narrow(0, hp_at.start, hp_at.numel).copy_(src)
            out.append(flat)
    else:
        rank, world = dist.rank(), dist.world_size()
        for group, hp in zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat, strict=True):
            pieces = []
            for p in group:
                part = p.ds_tensor.ds_numel
                value = torch.nn.functional.pad(full[names[p]].reshape(-1), (0, part * world - p.ds_numel))
                pieces.append(value.narrow(0, part * rank, part))
            out.append(torch.cat(pieces).to(hp.device, hp.dtype))
    return out


def _load_resharded(engine, path: Path, shards: list[Path]) -> dict:
    """`load_checkpoint` for a ZeRO checkpoint written by `len(shards)` ranks, on this world size."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    saved = full_parameter_states(path)
    stage, opt = engine.zero_optimization_stage(), engine.optimizer
    if saved.stage != stage:
        raise RuntimeError(
            f"{path} was written with ZeRO stage {saved.stage} and this run uses {stage}: resume with "
            f"deepspeed.zero_stage {saved.stage}"
        )
    # frozen parameters are not in the optimizer's partitions; below ZeRO-3 the module state holds them whole
    weights = {**saved.model["module"], **saved.full["fp32"]}
    params = list(engine.module.named_parameters())
    missing = [n for n, p in params if n not in weights or weights[n].numel() != getattr(p, "ds_numel", p.numel())]
    if missing:
        raise RuntimeError(f"{path} has no weights for {', '.join(missing[:5])} (a checkpoint of another model?)")
    with torch.no_grad():
        # The module's weights: under ZeRO-3 through a gather that re-partitions rank 0's values on exit.
        with GatheredParameters([p for _, p in params], modifier_rank=0, enabled=stage == 3):
            if stage < 3 or dist.is_main():
                for name, p in params:
                    p.data.copy_(weights[name].view_as(p))
        for name, buf in engine.module.named_buffers():
            if name in saved.model["module"]:  # not the non-persistent buffers, which no checkpoint holds
                buf.copy_(saved.model["module"][name])
        # The fp32 masters and the optimizer states: this rank's partition of the new layout.
        masters = opt.single_partition_of_fp32_groups if stage <= 2 else opt.fp32_partitioned_groups_flat
        local = {key: _local_partitions(engine, values) for key, values in saved.full.items()}
        for i, master in enumerate(masters):
            master.data.copy_(local["fp32"][i])
            # the scalars (Adam's step) are the same in every group; ZeRO-3's sub-groups can differ in number
            state = dict(saved.scalars[min(i, len(saved.scalars) - 1)])
            state.update({key: local[key][i] for key in saved.full if key != "fp32"})
            opt.optimizer.state[master] = state
        if stage <= 2:
            opt._link_all_hp_params()  # the per-parameter views DeepSpeed's safe_get_* helpers read
    engine.global_steps = int(saved.model.get("global_steps", engine.global_steps))
    engine.global_samples = int(saved.model.get("global_samples", engine.global_samples))
    engine.skipped_steps = int(saved.model.get("skipped_steps", engine.skipped_steps))
    _barrier()
    LOG.info(
        f"{path.name} was written by {saved.world_size} rank(s): its ZeRO partitions were rebuilt for "
        f"{dist.world_size()}"
    )
    return {k: v for k, v in saved.model.items() if k not in ("module", "optimizer")}


def checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights and buffers, by name, from a complete checkpoint directory, read without a
    model or an engine (model.init_from takes them; video_ens/weights.py). Stages 0-2 save the whole module in the
    model states file; ZeRO-3 saves its parameters there empty, so they are rebuilt from the per-rank partitions
    (`full_parameter_states`, any world size). Every file is read with `safe_torch_load`."""
    path = Path(path)
    if not _TAG.match(path.name) or not (path / "complete.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (expected step_NNNNNNNNN/ with complete.json)")
    saved = safe_torch_load(str(_model_states_file(path)), "cpu")
    weights = dict(saved["module"])
    shapes = {name: tuple(shape) for group in saved.get("param_shapes", []) for name, shape in group.items()}
    # Partitioned (ZeRO-3: empty here) or not kept in fp32 in the module: the fp32 masters of the optimizer hold them.
    partial = [
        n
        for n, s in shapes.items()
        if n not in weights or tuple(weights[n].shape) != s or weights[n].dtype != torch.float32
    ]
    if partial and _optimizer_shard_files(path):
        masters = full_parameter_states(path).full["fp32"]
        weights.update({n: masters[n] for n in partial if n in masters})
    wrong = [n for n, s in shapes.items() if n not in weights or tuple(weights[n].shape) != s]
    if wrong:
        raise RuntimeError(f"{path}: no full weights for {len(wrong)} parameter(s), e.g. {', '.join(wrong[:3])}")
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


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
        return {
            k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in engine.module.state_dict().items()
        }
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
