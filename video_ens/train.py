"""Composition root: the only place that holds the whole recipe and builds every component from its section.

    python -m video_ens.train RECIPE [--run-dir DIR] [--set key=value ...] [--dry-run]
    python -m video_ens.train RECIPE [--run-dir DIR] [--set key=value ...] --check [--world-size N] [--node-rank K]

normally started by launch.sh through torchrun (one process per GPU, or one on CPU); launch.sh runs the --check
form first, so that what needs no process group (data paths, the model against the data, the run folder) stops
the launch before torchrun starts, with one line instead of torchrun's traceback.

The run folder is owned by rank 0 of the run that trains in it: a POSIX lock on RUN_DIR/.lock (fcntl.lockf), which
the kernel releases when that process ends, however it ends, so a crashed run leaves no stale lock and a
`--max-restarts` restart (a new rank 0, after torchrun has stopped the old one) takes it again. Forked data workers
do not inherit it (POSIX locks belong to a process). The lock file itself stays; never delete it by hand while a
run may hold it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import dist, engine, trackers
from .config import RecipeError, default_run_dir, dump_recipe, load_recipe, recipe_to_dict, resume_differences
from .data import loader
from .models import channels_last, create_model
from .models.size import model_size_report
from .objective import loss_for
from .optim import create_optimizer, peak_lr
from .trainer import StopRequested, Trainer, all_reduce_bn_stats
from .weights import InitReport, check_init, init_model, save_weights

LOG = dist.get_logger("video_ens.train")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Exit status after a stop signal (SIGTERM, SIGUSR1): 128 + SIGTERM, as if the signal had ended the process, so
# schedulers and wrappers see an interrupted run rather than a finished one; the checkpoint makes it resumable.
EXIT_STOPPED = 143


def _die_with_launcher() -> None:
    """Under torchrun: end with SIGKILL when the agent ends. torchrun starts each rank in a session of its own, so
    when the agent is killed without passing anything on (SIGKILL to it or to the launch's process group, the OOM
    killer) its ranks would train on as orphans and keep writing checkpoints into the run folder. Killed, they
    write nothing; the last complete checkpoint stays the one to resume from."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):
        return
    if os.getppid() != parent:  # the agent ended before the request above: it cannot fire any more
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    _die_with_launcher()
    ap = argparse.ArgumentParser(prog="python -m video_ens.train", description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument(
        "--run-dir",
        default=None,
        help="run folder (default: runs/<recipe name>, with a hash of the overrides that make another "
        "run: video_ens.config.default_run_dir)",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--dry-run", action="store_true", help="validate, build model and data, run one step, write nothing"
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="check what needs no process group (model, data paths and fit, run folder free and "
        "resumable), start nothing, write nothing: launch.sh's last step before torchrun",
    )
    ap.add_argument("--world-size", type=int, default=1, help="with --check: the number of processes of the run")
    ap.add_argument(
        "--node-rank",
        type=int,
        default=0,
        help="with --check: this node's rank; the run folder is checked by node 0 (rank 0 owns it)",
    )
    args = ap.parse_args(argv)

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        # Build once on the meta device (nothing allocated, 1-100 ms) so that what only the builder can refuse (a
        # ResNet fork beyond its blocks, conflicting branch widths) stops here, before any process group.
        source = args.recipe + (f" (with --set {' '.join(args.overrides)})" if args.overrides else "")
        meta = build_model(recipe, device="meta", source=source)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.recipe, args.overrides)
        if args.check:
            own = None if args.dry_run or args.node_rank != 0 else run_dir  # a dry run writes nothing
            check_before_launch(recipe, meta.input_spec, world_size=args.world_size, run_dir=own)
            check_init_source(recipe, meta, run_dir=None if args.dry_run else run_dir)
            return 0
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    device = dist.pick_device(recipe.train.device)
    engine.ensure_process_group(device, recipe.train.collective_timeout_s)
    rc = 1  # what an exception leaves
    try:
        rc = _run(recipe, run_dir, device, dry_run=args.dry_run)
    except RecipeError as e:
        LOG.error(f"error: {e}")
        rc = 2
    except StopRequested as e:  # every rank stopped after the same step, which is checkpointed
        LOG.warning(f"{e}; relaunch the same command to resume")
        rc = EXIT_STOPPED
    finally:
        # A failure on one rank must not wait in the shutdown barrier for ranks that are stuck in a collective.
        dist.shutdown(failed=rc not in (0, EXIT_STOPPED), exit_code=rc or 1)
    return rc


def check_before_launch(recipe, input_spec: dict, *, world_size: int, run_dir: Path | None) -> None:
    """What a launch can check before any process starts (RecipeError, naming the field): the batch for
    `world_size`, the data paths and kinds, the model against the data (input, classes), and, for `run_dir`, that
    no run holds the folder and that its recipe.json allows a resume (check_resume). Builds rank 0's data streams
    without starting a worker, and writes nothing."""
    micro, _ = recipe.batch_layout(world_size)
    trackers.check_available(recipe.train.loggers)
    loader.check_compatible(recipe.data, recipe.model.name, input_spec)
    root = loader.resolve_paths(recipe.data)
    train_data = loader.train_stream(
        recipe.data,
        input_spec=input_spec,
        micro_batch_size=micro,
        rank=0,
        world_size=world_size,
        seed=recipe.train.seed,
        root=root,
    )
    eval_data = loader.eval_stream(
        recipe.data, recipe.eval, input_spec=input_spec, rank=0, world_size=world_size, root=root
    )
    try:
        check_num_classes(recipe, train_data.num_classes, root.train)
    finally:
        train_data.close()
        if eval_data is not None:
            eval_data.close()
    if run_dir is not None:
        owner = run_folder_owner(run_dir)
        if owner is not None:
            raise RecipeError(_in_use(run_dir, owner))
        _check_recorded_recipe(recipe, run_dir)


LOCK_NAME = ".lock"
_HELD: dict[str, int] = {}  # lock file -> descriptor, open for the life of the process: closing it would unlock


def lock_run_folder(run_dir: Path) -> None:
    """Make this process the owner of `run_dir` (created if missing), or raise RecipeError naming the owner's pid
    and host. The lock lasts as long as this process; its record (host, pid, launcher pid, start, command) is what
    a refused launch prints. On a file system without locks, a warning, and the folder is not protected."""
    path = Path(run_dir) / LOCK_NAME
    if os.path.realpath(path) in _HELD:
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        owner = _owner_record(fd) if e.errno in (errno.EACCES, errno.EAGAIN) else None
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise RecipeError(_in_use(run_dir, owner)) from None
        LOG.warning(
            f"{path}: cannot lock ({e.strerror}): this file system has no POSIX locks, so nothing stops a "
            "second launch on this run folder"
        )
        return
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "launcher_pid": os.getppid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _HELD[os.path.realpath(path)] = fd


def run_folder_owner(run_dir: Path) -> dict | None:
    """The record of the process that holds `run_dir`'s lock ({} when it has not written one yet), or None when
    no process does. Never call it in the owner itself: a POSIX lock ends when its process closes any descriptor
    of the file, so this returns None there without looking."""
    path = Path(run_dir) / LOCK_NAME
    if os.path.realpath(path) in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDWR)  # lockf's exclusive lock needs a descriptor open for writing
    except OSError:  # no lock file: no run has trained here; not writable: the rank's own lock attempt will say so
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # momentary: released with the descriptor below
    except OSError as e:
        return _owner_record(fd) if e.errno in (errno.EACCES, errno.EAGAIN) else None
    finally:
        os.close(fd)
    return None


def _owner_record(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0).decode())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _in_use(run_dir: Path, owner: dict | None) -> str:
    if owner and "pid" in owner:
        who = (
            f"pid {owner['pid']} on host {owner.get('host', '?')} (rank 0 of a run started "
            f"{owner.get('started', '?')}; its launcher is pid {owner.get('launcher_pid', '?')})"
        )
    else:
        who = "a process that has not recorded itself yet"
    return (
        f"run folder {run_dir} is in use by {who}: wait for that run to end or stop it, or give another "
        "--run-dir. The lock ends with the process that holds it: a crashed run leaves none"
    )


def _own_run_folder(run_dir: Path) -> None:
    """Rank 0 takes the run folder's lock; every rank raises the same RecipeError when another run holds it."""
    error = None
    if dist.is_main():
        try:
            lock_run_folder(run_dir)
        except RecipeError as e:
            error = str(e)
    if dist.is_initialized() and dist.world_size() > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RecipeError(error)


def _check_recorded_recipe(recipe, run_dir: Path) -> None:
    """check_resume against RUN_DIR/recipe.json, the recipe of the last launch that passed it (if any)."""
    path = Path(run_dir) / "recipe.json"
    if recipe.train.resume == "force" or not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path}: unreadable ({e}): repair it, or --set train.resume=force to go on") from None
    check_resume(recipe, saved if isinstance(saved, dict) else {}, run_dir=run_dir, source="its recipe.json")


def check_resume(recipe, saved: dict | None, *, run_dir: Path, source: str) -> None:
    """RecipeError when `run_dir` holds a run of a recipe (`saved`, read from `source`) that differs from `recipe`
    in a field a resume may not change (config.RESUME_MAY_CHANGE), unless train.resume is "force"."""
    if saved is None or recipe.train.resume == "force":
        return
    changed = resume_differences(saved, recipe)
    if changed:
        raise RecipeError(
            f"run folder {run_dir} holds a run of another recipe ({source}): {'; '.join(changed)}. Relaunch with "
            f"its values ({Path(run_dir) / 'recipe.json'}) to resume it; for a new run give another --run-dir "
            "(without --run-dir, a folder named after these overrides is used); to resume it with these values, "
            "add --set train.resume=force"
        )


def _run(recipe, run_dir: Path, device: torch.device, *, dry_run: bool) -> int:
    if not dry_run:
        # Before anything is read from or written to the folder: a second launch stops here, and so does a
        # relaunch of another recipe (against recipe.json now, against the checkpoint once it is loaded).
        _own_run_folder(run_dir)
        _check_recorded_recipe(recipe, run_dir)
    world = dist.world_size()
    trackers.check_available(recipe.train.loggers if dist.is_main() else [])  # only rank 0 logs to them
    ds_config = engine.deepspeed_config(recipe, world_size=world, device=device)  # fails fast on bad batch fields
    micro = ds_config["train_micro_batch_size_per_gpu"]

    _seed_everything(recipe.train.seed)  # identical initial weights on every rank (DeepSpeed also broadcasts)
    model = build_model(recipe)
    init_report = _initialise(recipe, model, None if dry_run else run_dir)  # every rank reads the weights
    if recipe.train.bn_sync == "sync_bn":
        if device.type != "cuda" and dry_run:
            # A dry run on a machine without a GPU (a login node) still checks everything else of a GPU recipe.
            LOG.warning('dry run without CUDA: train.bn_sync "sync_bn" is checked on a GPU only; BN runs per rank here')
        elif device.type != "cuda":
            raise RecipeError(
                'train.bn_sync: "sync_bn" needs CUDA (SyncBatchNorm does not run on CPU); use "all_reduce"'
            )
        else:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if recipe.model.channels_last:
        model = channels_last(model)
    loader.check_compatible(recipe.data, recipe.model.name, model.input_spec)

    data_root = loader.resolve_paths(recipe.data)  # DataPaths(train, val); demo data was made by launch.sh
    # Samples a data worker died on, kept over restarts (video_ens/data/crashes.py); a dry run writes nothing.
    quarantine = None if dry_run else run_dir / "quarantine.jsonl"
    train_data = loader.train_stream(
        recipe.data,
        input_spec=model.input_spec,
        micro_batch_size=micro,
        rank=dist.rank(),
        world_size=world,
        seed=recipe.train.seed,
        root=data_root,
        quarantine=quarantine,
    )
    eval_data = loader.eval_stream(
        recipe.data,
        recipe.eval,
        input_spec=model.input_spec,
        rank=dist.rank(),
        world_size=world,
        root=data_root,
        quarantine=quarantine,
    )
    try:
        check_num_classes(recipe, train_data.num_classes, data_root.train)
        criterion = loss_for(recipe.objective, model)
        optimizer = create_optimizer(model, recipe.optim, lr=peak_lr(recipe.optim, recipe.train.global_batch_size))
        eng = engine.initialize(model, optimizer, ds_config)
        if recipe.model.compile:
            eng.compile()

        if dry_run:  # the trainer's logs go to a scratch folder that is removed again: a dry run writes nothing
            with tempfile.TemporaryDirectory(prefix="video_ens_dry_run_") as scratch:
                # no tracker run either: W&B or MLflow would keep a run of the dry run
                quiet = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, loggers=[]))
                trainer = Trainer(
                    recipe=quiet,
                    run_dir=Path(scratch),
                    engine=eng,
                    criterion=criterion,
                    train_data=train_data,
                    eval_data=None,
                    device=device,
                    metrics_task=loader.metrics_task(recipe.data),
                )
                trainer.total_steps = 1
                trainer.fit(save_fn=lambda t: None)
                trainer.log.close()
            LOG.info("dry run: recipe valid, model and data built, one step ran")
            return 0

        ckpt_root = run_dir / "checkpoints"
        engine.remove_partial_checkpoints(ckpt_root)  # safe: this run owns the folder
        latest = engine.latest_checkpoint(ckpt_root)
        state = engine.load_checkpoint(eng, latest[1]) if latest is not None else None
        if state is not None and state.get("recipe") is not None:  # the checkpoint's word is final
            check_resume(recipe, state["recipe"], run_dir=run_dir, source=f"its checkpoint {latest[1].name}")
        if dist.is_main():  # only now: recipe.json names the recipe of the run that trains here (tools/compare.py)
            ckpt_root.mkdir(exist_ok=True)
            dump_recipe(recipe, run_dir / "recipe.json")
        if dist.is_initialized():
            torch.distributed.barrier()  # the run folder is complete before any rank writes to it
        size = _model_size(recipe)
        # FLOPs per training sample for the TFLOP/s log: DBoF's count covers only the video-level part, so add the
        # frame-level base at the number of frames trained on.
        flops = size["flops"] + size.get("frame_flops", 0) * recipe.data.frames
        trainer = Trainer(
            recipe=recipe,
            run_dir=run_dir,
            engine=eng,
            criterion=criterion,
            train_data=train_data,
            eval_data=eval_data,
            device=device,
            metrics_task=loader.metrics_task(recipe.data),
            flops_per_sample=flops,
        )
        if state is not None:
            trainer.restore(state)
            LOG.info(f"resumed from {latest[1]} at step {trainer.step}")
        else:
            _log_model_table(recipe, size, run_dir, model)
            if init_report is not None:
                trainer.log.write("init", 0, init_report.record())

        def save(t: Trainer) -> None:
            all_reduce_bn_stats(eng.module)
            engine.save_checkpoint(eng, ckpt_root, t.step, t.client_state(), keep=recipe.train.keep_checkpoints)

        trainer.fit(save_fn=save)
        result = trainer.evaluate()
        last = engine.latest_checkpoint(ckpt_root)
        weights = engine.consolidated_state_dict(eng, last[1] if last else None)
        if dist.is_main():
            _write_outputs(run_dir, result, weights, recipe)
        trainer.log.close()
        return 0
    finally:
        # The data workers live across epochs and evaluations; stop them before this process ends (it leaves
        # through os._exit, which skips the handlers that would otherwise reap them).
        train_data.close()
        if eval_data is not None:
            eval_data.close()


def build_model(recipe, *, device: str | torch.device | None = None, source: str | None = None):
    """`create_model` from the recipe's model section, on `device` (default: the current default device).

    A builder's ValueError or TypeError (an impossible value that the recipe check cannot see without building)
    becomes a RecipeError naming the model fields it concerns, e.g. "model.fork: model resnet_tiny cannot be
    built: fork must be one of ...".
    """
    kwargs = recipe.model.builder_kwargs()
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return create_model(recipe.model.name, **kwargs)
    except (ValueError, TypeError) as e:
        text = str(e)
        paths = [recipe.model.field_path(k) for k in kwargs if re.search(rf"\b{re.escape(k)}\b", text)]
        paths = paths or [recipe.model.field_path(k) for k in kwargs] or ["model.name"]
        where = f"{source}: " if source else ""
        raise RecipeError(
            f"{where}{', '.join(paths)}: model {recipe.model.name} cannot be built: {text} "
            "(fix these fields of the recipe's model section)"
        ) from None


def check_init_source(recipe, model, *, run_dir: Path | None) -> None:
    """model.init_from against `model` (the meta build) from shapes alone, before any process starts: RecipeError
    listing what does not fit. Skipped when `run_dir` holds a checkpoint: the resume wins over init_from."""
    if recipe.model.init_from is None:
        return
    if run_dir is not None and engine.latest_checkpoint(Path(run_dir) / "checkpoints") is not None:
        return
    check_init(model, recipe.model.init_from, exclude=recipe.model.init_exclude)


def _initialise(recipe, model, run_dir: Path | None) -> InitReport | None:
    """Apply model.init_from to the freshly built `model` and log what was loaded, per part; None when there is
    nothing to apply. A run folder holding a checkpoint resumes from it instead, which holds every weight: a
    resume never re-initialises (the log says so)."""
    if recipe.model.init_from is None:
        return None
    latest = engine.latest_checkpoint(run_dir / "checkpoints") if run_dir is not None else None
    if latest is not None:
        LOG.info(
            f"model.init_from ({recipe.model.init_from}) is not applied: this run resumes from its own "
            f"checkpoint {latest[1].name}, whose weights win"
        )
        return None
    report = init_model(model, recipe.model.init_from, exclude=recipe.model.init_exclude)
    LOG.info(report.summary())
    if dist.is_main():
        for warning in report.warnings():
            LOG.warning(warning)
    return report


def check_num_classes(recipe, dataset_classes: int, dataset: str | Path) -> None:
    """RecipeError when the classifier the recipe builds is not as wide as the dataset's label map."""
    model_classes = _num_classes(recipe)
    if model_classes is not None and model_classes != dataset_classes:
        raise RecipeError(
            f"model.num_classes: model {recipe.model.name} has {model_classes} classes but the dataset "
            f"{dataset} has {dataset_classes}: set model.num_classes to {dataset_classes}"
        )


def _num_classes(recipe) -> int | None:
    """The classifier width the recipe builds: model.num_classes, else the preset's, else the builder's default."""
    from .models import builder_arguments

    return builder_arguments(recipe.model.name, **recipe.model.builder_kwargs()).get("num_classes")


def _model_size(recipe) -> dict:
    """Parameters and FLOPs per sample as the paper counts them (meta device: nothing is allocated or run)."""
    return model_size_report(recipe.model.name, **recipe.model.builder_kwargs())


def _log_model_table(recipe, size: dict, run_dir: Path, model) -> None:
    """The parameter and FLOP table at the start of a run: the shared base, each branch (with its classifier) and
    the total, BatchNorm folded as the paper counts; also written to metrics.jsonl as a "model" line."""
    if not dist.is_main():
        return
    from .models.size import count_params

    parts = [("base (shared)", count_params(model.base))]
    parts += [(f"branch {i}", count_params(b)) for i, b in enumerate(model.branches)]
    total = size["params"]
    rows = [f"  {name:<16} {n:>14,} params  {100 * n / total:5.1f}%" for name, n in parts]
    frame = f"; {_si(size['frame_flops'])} FLOPs per frame in the base" if "frame_flops" in size else ""
    LOG.info(
        f"model {recipe.model.name}: {model.num_branches} branch(es), BatchNorm folded\n"
        + "\n".join(rows)
        + f"\n  {'total':<16} {total:>14,} params, {_si(size['flops'])} FLOPs per sample ({size['counted']}, "
        f"input {size['input']}){frame}"
    )
    record = {
        "kind": "model",
        "step": 0,
        "num_branches": model.num_branches,
        "size": size,
        "params_by_part": dict(parts),
    }
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:g}"


def _write_outputs(run_dir: Path, result: dict, weights: dict, recipe) -> None:
    from . import durable

    out = {
        "ensemble": result.get("ensemble", {}),
        "branches": result.get("branches", []),
        "num_samples": result.get("num_samples", 0),
        "recipe": recipe_to_dict(recipe),
    }
    # The weights first, so that an eval.json is never published before the weights it describes; each file is
    # fsynced before its rename and the folder after it, and a full disk leaves the previous file, naming the path.
    save_weights(run_dir / "model.safetensors", weights, metadata={"model": recipe.model.name})
    durable.write_atomic(run_dir / "eval.json", json.dumps(out, indent=2) + "\n")
    LOG.info(f"wrote {run_dir / 'model.safetensors'} and {run_dir / 'eval.json'}")


if __name__ == "__main__":
    code = main()
    # Leave without running interpreter teardown: with the process group already destroyed, the C++ threads that
    # gloo and DeepSpeed's shared-memory op leave behind sometimes abort in their static destructors ("terminate
    # called without an active exception", SIGABRT, seen in about 1 of 20 two-rank CPU runs here), which torchrun
    # then reports as a failed job although everything was written.
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
