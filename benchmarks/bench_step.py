"""Training-step throughput of a recipe's model on synthetic batches (no data loading): DeepSpeed engine versus a
plain PyTorch loop on the same model, optimizer, loss and precision.

    python benchmarks/bench_step.py recipes/demo_kinetics_s3dg_mu2.json [--steps 20] [--warmup 3] [--set k=v ...]
    python benchmarks/bench_step.py recipes/kinetics_s3dg_mu2.json --set train.micro_batch_size=8   # on a GPU

Writes one CSV row per (loop) to benchmarks/results/step_<model>_<device>_<date>.csv with samples/s, ms/step and,
on a GPU, achieved TFLOP/s (3x the forward FLOPs per sample, the usual forward + backward estimate) and MFU
against the device's dense bf16 peak (--peak-tflops, default 989 for an H100 SXM). Run in one process; the engine
part starts a single-rank gloo/nccl group.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import torch
from _common import git_sha  # benchmarks/ is on sys.path when a script runs

from video_ens import engine
from video_ens.config import load_recipe
from video_ens.models import create_model
from video_ens.models.size import count_flops
from video_ens.objective import loss_for
from video_ens.optim import create_optimizer

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_batch(model, batch: int, device: torch.device, gen: torch.Generator):
    spec = model.input_spec
    kind = spec["kind"]
    if kind == "clip":
        x = torch.randn(batch, 3, spec["frames"], spec["size"], spec["size"], generator=gen)
        kw = {}
    elif kind == "image":
        x = torch.randn(batch, 3, spec["size"], spec["size"], generator=gen)
        kw = {}
    else:
        t = spec.get("train_frames", 25)
        x = torch.randn(batch, t, spec["dim"], generator=gen)
        kw = {"lengths": torch.full((batch,), t, dtype=torch.long)}
    return x.to(device), {k: v.to(device) for k, v in kw.items()}


def _targets(model, out, gen, device):
    n, b, c = out.branches.shape
    if model.activation == "sigmoid":
        return (torch.rand(b, c, generator=gen) < 0.01).float().to(device)
    return torch.randint(0, c, (b,), generator=gen).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_plain(recipe, batch, steps, warmup, device):
    torch.manual_seed(0)
    model = create_model(recipe.model.name, **recipe.model.builder_kwargs()).to(device).train()
    opt = create_optimizer(model, recipe.optim, lr=recipe.optim.lr)
    crit = loss_for(recipe.objective, model)
    gen = torch.Generator().manual_seed(0)
    x, kw = synthetic_batch(model, batch, device, gen)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.precision)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x, **kw)
        loss = crit(out.branches, _targets(model, out, gen, device))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return model, times


def run_engine(recipe, batch, steps, warmup, device):
    torch.manual_seed(0)
    engine.ensure_process_group(device)
    model = create_model(recipe.model.name, **recipe.model.builder_kwargs()).to(device).train()
    opt = create_optimizer(model, recipe.optim, lr=recipe.optim.lr)
    crit = loss_for(recipe.objective, model)
    cfg = engine.deepspeed_config(recipe, world_size=1, device=device)
    cfg.update(train_batch_size=batch, train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1)
    eng = engine.initialize(model, opt, cfg)
    gen = torch.Generator().manual_seed(0)
    x, kw = synthetic_batch(model, batch, device, gen)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        out = eng(x, **kw)
        loss = crit(out.branches, _targets(model, out, gen, device))["loss"]
        eng.backward(loss)
        eng.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return model, times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument(
        "--batch", type=int, default=None, help="micro-batch (default: the recipe's per-rank batch on 1 rank)"
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loops", default="plain,engine")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device dense bf16 peak for MFU (H100 SXM: 989)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    recipe = load_recipe(args.recipe, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and recipe.train.device != "cpu" else "cpu")
    batch = args.batch or recipe.train.micro_batch_size or recipe.train.global_batch_size
    with torch.device("meta"):
        meta_model = create_model(recipe.model.name, **recipe.model.builder_kwargs())
    x, kw = synthetic_batch(meta_model, 1, torch.device("meta"), torch.Generator())
    flops = count_flops(meta_model, x, **kw)  # forward FLOPs per sample (2 per multiply-add)

    rows = []
    for loop in args.loops.split(","):
        fn = {"plain": run_plain, "engine": run_engine}[loop]
        _, times = fn(recipe, batch, args.steps, args.warmup, device)
        times.sort()
        median = times[len(times) // 2]
        rate = batch / median
        row = {
            "loop": loop,
            "model": recipe.model.name,
            "batch": batch,
            "precision": recipe.train.precision,
            "zero_stage": recipe.deepspeed.zero_stage if loop == "engine" else "",
            "device": _device_name(device),
            "ms_per_step_median": round(median * 1e3, 2),
            "ms_per_step_min": round(times[0] * 1e3, 2),
            "samples_per_s": round(rate, 2),
            "fwd_gflops_per_sample": round(flops / 1e9, 3),
        }
        if device.type == "cuda":
            achieved = 3 * flops * rate / 1e12
            row["achieved_tflops"] = round(achieved, 2)
            row["mfu"] = round(achieved / args.peak_tflops, 4)
        row.update(
            torch=torch.__version__,
            python=platform.python_version(),
            git=git_sha(),
            date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
        rows.append(row)
        print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    out = (
        Path(args.out)
        if args.out
        else RESULTS / (f"step_{recipe.model.name}_{device.type}_{dt.date.today().isoformat()}.csv")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    from video_ens import dist

    dist.shutdown()
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
