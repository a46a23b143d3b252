"""Fused kernels against their references: SWAP pooling, context gating (and its training epilogue), S3D-G feature
gating, at the paper's shapes; then one training step of DBoF and S3D-G with and without the fused ops.

    python benchmarks/bench_kernels.py                        # on a GPU: every op, bf16, eager / compile / triton
    python benchmarks/bench_kernels.py --ops swap_pool --passes fwd,bwd --dtype fp32
    python benchmarks/bench_kernels.py --smoke                # CPU, Triton interpreter, tiny shapes: checks the
                                                              # script runs (its timings mean nothing)

Each (op, shape, dtype, pass, impl) row has the median time over --rep runs, each after an L2 flush (a 256 MB
write, more than the H100's 50 MB L2, so small activations are read from HBM as in training), and the achieved
bandwidth: the bytes the fused algorithm must move (below), divided by the time, against --peak-gbps (H100 SXM:
3,350 GB/s). Passes: fwd (under no_grad), bwd (autograd.grad of a retained graph), fwdbwd (both).
    swap_pool      fwd: x + out;  bwd: x + g + grad_x                      (x is B*T*D)
    context_gate   fwd: x + W + y;  bwd: g + x + z + W + grad_x + grad_W   (GEMM-bound: see tflops too)
    gate_epilogue  fwd: x + z + y;  bwd: g + x + z + grad_x + grad_z
    feature_gate   fwd: 2 x + y (the mean must be complete before any y);  bwd: 2 g + x + grad_x
Impls: eager (the reference, as the models run it today), compile (torch.compile of the reference) and triton
(the public op with impl="triton"). Targets (issue "fused kernels"): SWAP >= 80% of peak bandwidth, >= 3x eager and
ahead of compile; the gates ahead of eager and compile.

The model part builds `dbof` and `s3dg` with the builder keyword named by --model-kernels (default "kernels") set
to "reference" and to "triton", and times forward + loss + backward + Adam step under bf16 autocast; it is skipped
with a message when the builders do not take that keyword yet.

Writes benchmarks/results/kernels_<gpu>_<date>.csv (--out to change; --smoke writes to the temp dir) with the
torch, triton and python versions and the git SHA on every row. A timing is never a test assertion.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    # The interpreter is chosen when Triton builds its kernels: set it before anything imports triton.
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import csv
import datetime as dt
import importlib.metadata
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import git_sha  # benchmarks/ is on sys.path when a script runs

from video_ens.kernels import (
    context_gate,
    context_gate_reference,
    feature_gate,
    feature_gate_reference,
    gate_epilogue,
    gate_epilogue_reference,
    swap_pool,
    swap_pool_reference,
    triton_available,
)
from video_ens.models import create_model

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Paper shapes. DBoF (YouTube-8M): batch 16-128 videos, 25 sampled frames in training, up to 300 in evaluation,
# 4096-wide cluster layer (SWAP and the first context gate), 4096-wide hidden layer (second gate; 3000 in the
# two-branch model). S3D-G at 64 x 224 x 224, batch 8: the gates after Conv2d_2c, in Mixed_4f and in Mixed_5c.
GPU_SHAPES: dict[str, list[tuple]] = {
    "swap_pool": [(16, 25, 4096), (128, 25, 4096), (16, 300, 4096), (128, 300, 4096)],
    "context_gate": [(16 * 25, 4096), (128 * 25, 4096), (128 * 300, 4096), (128, 4096), (128, 3000)],
    "gate_epilogue": [(16 * 25, 4096), (128 * 25, 4096), (128 * 300, 4096), (128, 4096), (128, 3000)],
    "feature_gate": [(8, 192, 32, 56, 56), (8, 832, 16, 14, 14), (8, 1024, 8, 7, 7)],
}
SMOKE_SHAPES: dict[str, list[tuple]] = {
    "swap_pool": [(3, 7, 37)],
    "context_gate": [(19, 37)],
    "gate_epilogue": [(19, 37)],
    "feature_gate": [(2, 12, 3, 5, 7)],
}
OPS = tuple(GPU_SHAPES)
# CSV columns, in order (the run's versions and git SHA follow); every row has a subset.
FIELDS = [
    "op", "shape", "layout", "dtype", "pas", "impl", "ms", "gbps", "frac_peak", "tflops", "speedup_vs_eager",
    "max_abs_err_vs_eager", "error",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------- the cases


class Case:
    """One op at one shape: inputs, the three implementations, and the bytes an ideal fused kernel moves."""

    def __init__(self, op: str, shape: tuple, dtype: torch.dtype, device: torch.device, layout: str, gen):
        self.op, self.shape, self.dtype, self.layout = op, shape, dtype, layout
        self._compiled = None
        torch._dynamo.reset()
        e = torch.finfo(dtype).bits // 8
        rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device, dtype)
        self.flops = {"fwd": 0.0, "bwd": 0.0}
        if op == "swap_pool":
            b, t, d = shape
            x = torch.relu(rnd(b, t, d))  # DBoF pools non-negative frames (ReLU6, then the gate)
            lengths = torch.full((b,), t, device=device)
            self.inputs = [x]
            self.ref = lambda x: swap_pool_reference(x, lengths)
            self.fused = lambda x: swap_pool(x, lengths, impl="triton")
            n, out = b * t * d, b * d
            self.bytes = {"fwd": (n + out) * e, "bwd": (2 * n + out) * e}
        elif op == "context_gate":
            m, d = shape
            self.inputs = [rnd(m, d), rnd(d, d, scale=d**-0.5), rnd(d)]
            self.ref = context_gate_reference
            self.fused = lambda x, w, b: context_gate(x, w, b, impl="triton")
            self.bytes = {"fwd": (2 * m * d + d * d) * e, "bwd": (5 * m * d + 2 * d * d) * e}
            self.flops = {"fwd": 2.0 * m * d * d, "bwd": 4.0 * m * d * d}
        elif op == "gate_epilogue":
            m, d = shape
            self.inputs = [rnd(m, d), rnd(m, d)]
            self.ref = gate_epilogue_reference
            self.fused = lambda x, z: gate_epilogue(x, z, impl="triton")
            self.bytes = {"fwd": 3 * m * d * e, "bwd": 5 * m * d * e}
        elif op == "feature_gate":
            b, c = shape[:2]
            x = torch.relu(rnd(*shape))  # gates follow a ReLU
            if layout == "channels_last_3d":
                x = x.contiguous(memory_format=torch.channels_last_3d)
            self.inputs = [x, rnd(c, c, 1, 1, 1, scale=c**-0.5)]
            self.ref = feature_gate_reference
            self.fused = lambda x, w: feature_gate(x, w, impl="triton")
            n = x.numel()
            self.bytes = {"fwd": 3 * n * e, "bwd": 4 * n * e}
        else:
            raise ValueError(f"unknown op {op!r}: use one of {OPS}")
        self.bytes["fwdbwd"] = self.bytes["fwd"] + self.bytes["bwd"]
        self.flops["fwdbwd"] = self.flops["fwd"] + self.flops["bwd"]

    def impl(self, name: str) -> Callable:
        if name == "eager":
            return self.ref
        if name == "triton":
            return self.fused
        if name == "compile":
            # One compiled function per case, reset when the case is built: the inference graph (fwd) and the
            # training graph (bwd, fwdbwd) are each compiled once, and no cache or recompile limit is shared
            # across shapes.
            if self._compiled is None:
                self._compiled = torch.compile(self.ref)
            return self._compiled
        raise ValueError(f"unknown impl {name!r}: use eager, compile or triton")

    def runner(self, fn: Callable, pas: str) -> Callable[[], object]:
        """A closure that runs one `pas` of fn on this case's inputs."""
        if pas == "fwd":

            def run():
                with torch.no_grad():
                    return fn(*self.inputs)

            return run
        leaves = [t.detach().requires_grad_() for t in self.inputs]
        out = fn(*leaves)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)  # one g for every impl
        if pas == "bwd":
            return lambda: torch.autograd.grad(out, leaves, g, retain_graph=True)

        def run_both():
            y = fn(*leaves)
            return torch.autograd.grad(y, leaves, g)

        return run_both


# --------------------------------------------------------------------------------------------------------- timing


class Timer:
    """Median of `rep` timed calls, each after an L2 flush on CUDA; wall clock on CPU (smoke mode only)."""

    def __init__(self, device: torch.device, warmup: int, rep: int):
        self.device, self.warmup, self.rep = device, warmup, rep
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.rep):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        times = []
        torch.cuda.synchronize()
        for _ in range(self.rep):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def _max_err(a, b) -> float:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return max(
        (x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True) if x is not None and x.numel()
    )


def bench_ops(args, device, timer, emit: Callable[[dict], None], deadline: float) -> None:
    dtype = DTYPES[args.dtype]
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    gen = torch.Generator().manual_seed(0)
    for op in args.ops:
        layouts = ["contiguous", "channels_last_3d"] if op == "feature_gate" else ["contiguous"]
        for shape in shapes[op]:
            for layout in layouts:
                if time.monotonic() > deadline:
                    print(f"--budget-s reached: {op} {shape} {layout} and later cases not run", flush=True)
                    return
                case = Case(op, shape, dtype, device, layout, gen)
                for pas in args.passes:
                    eager_ms = None
                    ref_result = case.runner(case.ref, pas)()
                    for impl in args.impls:
                        shape_str = "x".join(map(str, shape))
                        row = dict(op=op, shape=shape_str, layout=layout, dtype=args.dtype, pas=pas, impl=impl)
                        try:
                            run = case.runner(case.impl(impl), pas)
                            err = _max_err(run(), ref_result)
                            ms = timer(run)
                        except Exception as exc:  # one failing impl (e.g. compile) should not end the run
                            row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                            emit(row)
                            continue
                        gbps = case.bytes[pas] / ms / 1e6
                        row.update(ms=round(ms, 4), gbps=round(gbps, 1), frac_peak=round(gbps / args.peak_gbps, 3))
                        row["max_abs_err_vs_eager"] = f"{err:.3g}"
                        if case.flops[pas]:
                            row["tflops"] = round(case.flops[pas] / ms / 1e9, 1)
                        if impl == "eager":
                            eager_ms = ms
                        if eager_ms:
                            row["speedup_vs_eager"] = round(eager_ms / ms, 2)
                        emit(row)
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ training steps


def _model_batch(model, batch: int, device: torch.device, gen):
    spec = model.input_spec
    if spec["kind"] == "clip":
        return torch.randn(batch, 3, spec["frames"], spec["size"], spec["size"], generator=gen).to(device), {}
    t = spec.get("train_frames", 25)
    x = torch.randn(batch, t, spec["dim"], generator=gen).to(device)
    return x, {"lengths": torch.full((batch,), t, dtype=torch.long, device=device)}


def _train_step(model, opt, x, extra: dict, autocast: torch.dtype | None) -> Callable[[], None]:
    """One step: forward (under bf16 autocast on a GPU), a loss on every branch, backward, Adam."""

    def step():
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(x, **extra)
        br = out.branches.float()  # (N, B, C)
        if model.output_type == "probs":
            loss = F.binary_cross_entropy(br.clamp(1e-6, 1 - 1e-6), torch.zeros_like(br))
        else:
            target = torch.zeros(br.shape[0] * br.shape[1], dtype=torch.long, device=x.device)
            loss = F.cross_entropy(br.flatten(0, 1), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_models(args, device, timer, emit: Callable[[dict], None]) -> None:
    names = {
        "dbof": ("dbof_tiny", 4) if args.smoke else ("dbof", args.dbof_batch),
        "s3dg": ("s3dg_tiny", 2) if args.smoke else ("s3dg", args.s3dg_batch),
    }
    kw = args.model_kernels
    autocast = torch.bfloat16 if device.type == "cuda" else None
    for family in args.models:
        name, batch = names[family]
        channels_last = args.channels_last and family == "s3dg"
        row0 = dict(
            op=f"train_step:{name}",
            shape=f"batch{batch}",
            layout="channels_last_3d" if channels_last else "contiguous",
            dtype="bf16-autocast" if autocast else "fp32",
            pas="fwdbwd",
        )
        eager_ms = None
        for impl in ("reference", "triton"):
            try:
                torch.manual_seed(0)
                model = create_model(name, **{kw: impl})
            except (TypeError, ValueError) as exc:
                msg = f"create_model({name!r}, {kw}=...) fails ({exc}): the models do not take {kw!r} yet"
                print(f"skipping the {name} training step: {msg}", flush=True)
                break
            model = model.to(device).train()
            if channels_last:
                model = model.to(memory_format=torch.channels_last_3d)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            gen = torch.Generator().manual_seed(0)
            x, extra = _model_batch(model, batch, device, gen)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)

            step = _train_step(model, opt, x, extra, autocast)
            ms = timer(step)
            row = dict(row0, impl=f"model:{kw}={impl}", ms=round(ms, 3))
            if impl == "reference":
                eager_ms = ms
            elif eager_ms:
                row["speedup_vs_eager"] = round(eager_ms / ms, 3)
            emit(row)
            del model, opt


# ------------------------------------------------------------------------------------------------------- plumbing


def _fmt(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in row.items())


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-interpreter ({os.cpu_count()} cores)"


def _csv_list(choices):
    def parse(text: str) -> list[str]:
        items = [s for s in text.split(",") if s]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items

    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in the Triton interpreter")
    ap.add_argument("--ops", type=_csv_list(OPS), default=list(OPS))
    ap.add_argument(
        "--impls",
        type=_csv_list(("eager", "compile", "triton")),
        default=None,
        help="default eager,compile,triton (eager,triton with --smoke: compiling takes ~17 s per graph on CPU)",
    )
    ap.add_argument("--passes", type=_csv_list(("fwd", "bwd", "fwdbwd")), default=["fwd", "bwd", "fwdbwd"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--warmup", type=int, default=None, help="default 5 (1 with --smoke)")
    ap.add_argument(
        "--rep", type=int, default=None, help="timed runs per row, median reported; default 20 (1 with --smoke)"
    )
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="device memory bandwidth, GB/s (H100 SXM: 3350)")
    ap.add_argument(
        "--models",
        type=_csv_list(("dbof", "s3dg")),
        default=["dbof", "s3dg"],
        help="training-step comparison; pass an empty string to skip",
    )
    ap.add_argument(
        "--model-kernels",
        default="kernels",
        help="the builder keyword that selects the models' kernels (values: reference, triton)",
    )
    ap.add_argument("--dbof-batch", type=int, default=128)
    ap.add_argument("--s3dg-batch", type=int, default=8)
    ap.add_argument("--channels-last", action="store_true", help="S3D-G training step in channels_last_3d")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/kernels_<gpu>_<date>.csv)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="stop starting new op cases after this many seconds (0: no limit); the training steps still run",
    )
    args = ap.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        args.impls = args.impls or ["eager", "triton"]
        args.warmup = 1 if args.warmup is None else args.warmup
        args.rep = 1 if args.rep is None else args.rep
    else:
        if not torch.cuda.is_available():
            msg = "bench_kernels.py measures GPU kernels and needs CUDA, which this machine does not have."
            print(
                f"{msg} Run it on a GPU, or pass --smoke to check the script on CPU in the Triton interpreter.",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cuda")
        args.impls = args.impls or ["eager", "compile", "triton"]
        args.warmup = 5 if args.warmup is None else args.warmup
        args.rep = 20 if args.rep is None else args.rep
    if "triton" in args.impls and not triton_available():
        msg = "triton does not import here: install it (pip install -e .[triton]) or pass --impls eager,compile"
        print(msg, file=sys.stderr)
        return 2

    common = dict(
        device=_device_name(device),
        peak_gbps=args.peak_gbps,
        torch=torch.__version__,
        triton=_version("triton"),
        python=platform.python_version(),
        git=git_sha(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    slug = re.sub(r"[^a-z0-9]+", "-", _device_name(device).lower()).strip("-") if device.type == "cuda" else "cpu-smoke"
    name = f"kernels_{slug}_{dt.date.today().isoformat()}.csv"
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) if args.smoke else RESULTS) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    timer = Timer(device, args.warmup, args.rep)
    deadline = time.monotonic() + args.budget_s if args.budget_s else float("inf")
    with open(out, "w", newline="") as f:
        # Rows are written (and flushed) as they are measured, so a run stopped by a time limit keeps its rows.
        writer = csv.DictWriter(f, fieldnames=[*FIELDS, *common])
        writer.writeheader()
        rows: list[dict] = []

        def emit(row: dict) -> None:
            print(_fmt(row), flush=True)
            unknown = set(row) - set(FIELDS)
            assert not unknown, f"add {sorted(unknown)} to FIELDS"
            writer.writerow({**row, **common})
            f.flush()
            rows.append(row)

        bench_ops(args, device, timer, emit, deadline)
        if args.models:
            bench_models(args, device, timer, emit)
    print(f"wrote {len(rows)} rows to {out}")
    failed = [r for r in rows if "error" in r]
    return 1 if (args.smoke and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
