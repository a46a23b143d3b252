"""Registers, spills, shared memory and 16-byte vector accesses of every Triton kernel config, compiled for an H100.

    python benchmarks/ptxas_report.py              # -> benchmarks/results/ptxas_sm90_<date>.csv
    python benchmarks/ptxas_report.py --out FILE

Autotune picks a config on the GPU at run time, so a config that spills registers to local memory, or one whose
loads did not vectorize, only shows up as a slow run on the card that happens to pick it. This compiles each one
ahead of time for sm_90 (Triton's own pipeline and bundled ptxas; no GPU and no driver needed) and reports what
ptxas made of it. The kernels, variants and configs:
    autotuned kernels    every triton.Config in the Autotuner's list: what runtime.configs gives outside the
                         interpreter, i.e. exactly what autotune tries on an H100.
    the others           the block sizes their launchers pass (context_gate.BLOCK_M/BLOCK_D/ROWS,
                         feature_gate.BLOCKS for each layout) with Triton's default num_warps / num_stages.
    variants             each combination of boolean constexprs that a launcher passes (with / without lengths,
                         bias, db, product, shift): they compile to different kernels.
Activations and gradients are bf16, accumulation (ACC) and the small saved buffers (f, S, db, per-channel scale and
shift, and the context-gate bias) fp32, as in tests/unit/test_kernels.py. The argument types and specializations
are those of the paper's shapes: 16-byte aligned pointers, sizes and strides divisible by 16 (D = 4096,
S = 100352, C = 192) except the row / frame counts and float scalars, and unit strides as constants.

Columns: regs = registers per thread; spill_st / spill_ld = bytes of spill stores / loads per thread; stack =
stack frame bytes; smem = shared memory bytes Triton requests at launch (metadata.shared; the kernels use no static
shared memory, which would be added); ld_v16 / st_v16 = 16-byte vector global loads / stores in the PTX (static
instruction count, out of ld_all / st_all global loads / stores of any width). CompiledKernel.n_regs and n_spills
come from loading the cubin through the driver, so instead the numbers are parsed from the `ptxas -v` log of
Triton's own ptxas run (TRITON_DUMP_PTXAS_LOG), with the flags Triton uses.

TRITON_INTERPRET is removed before triton is imported (the interpreter compiles nothing), and Triton's cache goes
to a temporary folder, so every config is compiled here rather than read from an earlier run. All 37 compiles take
about 5 s on 2 CPU cores, so tests/unit/test_kernel_registers.py runs the whole report.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from _common import git_sha  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODULES = ("swap", "context_gate", "feature_gate")
COLUMNS = ["kernel", "variant", "config", "num_warps", "num_stages", "regs", "spill_st", "spill_ld", "stack", "smem"]
COLUMNS += ["ld_v16", "ld_all", "st_v16", "st_all"]

# Runtime values the launcher does not pass as multiples of 16 (frame / row counts, float scalars).
NODIV = ("T", "M", "B", "eps", "scale")
# 16-byte global accesses: four 32-bit or two 64-bit lanes, with any cache / eviction qualifiers before them.
LD_V16 = re.compile(r"\bld\.global(?:\.[\w:]+)*\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b")
ST_V16 = re.compile(r"\bst\.global(?:\.[\w:]+)*\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b")
LD_ALL, ST_ALL = re.compile(r"\bld\.global\b"), re.compile(r"\bst\.global\b")


def _ptxas_number(log: str, pattern: str, required: bool = False) -> int:
    m = re.search(pattern, log)
    if m is None and required:
        raise RuntimeError(f"no {pattern!r} in the ptxas log:\n{log}")
    return int(m.group(1)) if m else 0


def cases() -> list[tuple]:
    """(kernel name, JITFunction, variant, config, signature, constexprs, compile options) for each compile."""
    import importlib

    import triton
    import triton.language as tl

    mods = {n: importlib.import_module(f"video_ens.kernels.{n}") for n in MODULES}
    k = {n: m._kernels() for n, m in mods.items()}
    bf, f32, i32, acc = "*bf16", "*fp32", "i32", tl.float32

    swap_sig = dict(x_ptr=bf, len_ptr="*i64", T=i32, D=i32, stride_b=i32, stride_t=i32, stride_d=i32)
    gate_sig = dict(x_ptr=bf, z_ptr=bf, b_ptr=f32, M=i32, D=i32, stride_xm=i32, stride_zm=i32)
    fg_sig = dict(x_ptr=bf, C=i32, S=i32, stride_c=i32, stride_s=i32)
    cg = mods["context_gate"]
    gate_blocks = dict(BLOCK_M=cg.BLOCK_M, BLOCK_D=cg.BLOCK_D, ROWS=cg.ROWS)
    # name, kernel, signature, constexprs, variants (the flag combinations the launchers pass), configs
    # (None: the kernel is autotuned, take its Autotuner's list)
    kernels = [
        ("swap.fwd", k["swap"].fwd, dict(swap_sig, out_ptr=bf, f_ptr=f32, den_ptr=f32, eps="fp32"),
         dict(stride_d=1, ACC=acc), [dict(HAS_LENGTHS=v) for v in (True, False)], None),
        ("swap.bwd", k["swap"].bwd,
         dict(swap_sig, g_ptr=bf, f_ptr=f32, den_ptr=f32, gx_ptr=bf, stride_gb=i32, stride_gd=i32),
         dict(stride_d=1, stride_gd=1, ACC=acc), [dict(HAS_LENGTHS=v) for v in (True, False)], None),
        # context_gate passes a bias (db wanted when the bias trains); gate_epilogue neither.
        ("context_gate.fwd", k["context_gate"].fwd, dict(gate_sig, y_ptr=bf), dict(ACC=acc),
         [dict(HAS_BIAS=v) for v in (True, False)], [dict(gate_blocks)]),
        ("context_gate.bwd", k["context_gate"].bwd,
         dict(gate_sig, g_ptr=bf, gx_ptr=bf, gz_ptr=bf, db_ptr=f32, stride_gm=i32), dict(ACC=acc),
         [dict(HAS_BIAS=True, WANT_DB=True), dict(HAS_BIAS=True, WANT_DB=False), dict(HAS_BIAS=False, WANT_DB=False)],
         [dict(gate_blocks)]),
    ]  # fmt: skip
    # feature_gate: the layout picks the blocks (BLOCKS) and which stride is the unit one.
    fg_configs = [
        dict(dict(stride_c=1) if cl else dict(stride_s=1), BLOCK_C=bc, BLOCK_S=bs)
        for cl, (bc, bs) in mods["feature_gate"].BLOCKS.items()
    ]
    kernels += [
        ("feature_gate.reduce", k["feature_gate"].reduce,
         dict(fg_sig, g_ptr=bf, out_ptr=f32, B=i32, chunk=i32, scale="fp32"), dict(ACC=acc),
         [dict(PRODUCT=v) for v in (False, True)], fg_configs),
        ("feature_gate.broadcast", k["feature_gate"].broadcast, dict(fg_sig, scale_ptr=f32, shift_ptr=f32, y_ptr=bf),
         dict(ACC=acc), [dict(HAS_SHIFT=v) for v in (False, True)], fg_configs),
    ]  # fmt: skip

    # Every kernel the modules build is listed above, so a new one cannot go unreported.
    built = {f"{n}.{a}" for n, ns in k.items() for a in vars(ns) if a != "triton"}
    missing = built - {row[0] for row in kernels}
    if missing:
        raise RuntimeError(f"kernels not covered by the report: {sorted(missing)}; add them to cases()")

    out = []
    for name, kernel, sig, consts, variants, configs in kernels:
        if isinstance(kernel, triton.runtime.Autotuner):
            assert configs is None, name
            # all_kwargs(): the block constexprs plus num_warps / num_stages / num_ctas, as autotune launches them
            configs = [c.all_kwargs() for c in kernel.configs]
            kernel = kernel.fn
        for variant in variants:
            for config in configs:
                options = {o: config[o] for o in ("num_warps", "num_stages", "num_ctas", "maxnreg") if o in config}
                blocks = {c: v for c, v in config.items() if c not in options and c != "ir_override"}
                out.append((name, kernel, variant, blocks, sig, {**consts, **variant, **blocks}, options))
    return out


def compile_one(kernel, sig: dict, consts: dict, options: dict) -> dict:
    """Compiles one specialization for sm_90 and returns its row's numbers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    if set(names) != set(sig) | set(consts):  # the kernel's arguments changed: update cases()
        raise RuntimeError(f"{kernel.fn.__name__} takes {names}; the report gives {sorted(set(sig) | set(consts))}")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if n not in consts and n not in NODIV}
    signature = {n: "constexpr" if n in consts else sig[n] for n in names}
    constexprs = {(names.index(n),): v for n, v in consts.items()}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints the ptxas -v log (TRITON_DUMP_PTXAS_LOG)
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", 90, 32),
            options=options,
        )
    log = log.getvalue()
    ptx = compiled.asm["ptx"]
    return dict(
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
        regs=_ptxas_number(log, r"Used (\d+) registers", required=True),
        spill_st=_ptxas_number(log, r"(\d+) bytes spill stores", required=True),
        spill_ld=_ptxas_number(log, r"(\d+) bytes spill loads", required=True),
        stack=_ptxas_number(log, r"(\d+) bytes stack frame"),
        smem=compiled.metadata.shared + _ptxas_number(log, r"(\d+) bytes smem"),
        ld_v16=len(LD_V16.findall(ptx)),
        ld_all=len(LD_ALL.findall(ptx)),
        st_v16=len(ST_V16.findall(ptx)),
        st_all=len(ST_ALL.findall(ptx)),
    )


def _flags(d: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in d.items())


def print_table(rows: list[dict]) -> None:
    head = [c.replace("num_", "") for c in COLUMNS]
    cells = [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(head)]
    left = ("kernel", "variant", "config")  # text columns; numbers align right
    fmt = lambda vals: "  ".join(
        v.ljust(w) if c in left else v.rjust(w) for c, v, w in zip(COLUMNS, vals, widths, strict=True)
    )
    print(fmt(head))
    for row in cells:
        print(fmt(row))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="CSV path (default: benchmarks/results/ptxas_sm90_<date>.csv)")
    args = parser.parse_args(argv)
    today = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"ptxas_sm90_{today}.csv"

    if "triton" in sys.modules:
        raise RuntimeError("triton is already imported: run this as a script, so the interpreter can be turned off")
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the interpreter compiles nothing
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    with tempfile.TemporaryDirectory(prefix="ptxas_report_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        import triton

        from video_ens.kernels import runtime

        if runtime.interpreting():
            raise RuntimeError("Triton's interpreter is on; it must be off to compile for sm_90")
        start = time.perf_counter()
        rows = []
        for name, kernel, variant, blocks, sig, consts, options in cases():
            row = dict(kernel=name, variant=_flags(variant), config=_flags(blocks))
            rows.append(row | compile_one(kernel, sig, consts, options))
        total = time.perf_counter() - start

    print_table(rows)
    print(f"\n{len(rows)} compiles for sm_90 in {total:.1f} s (triton {triton.__version__})")
    meta = dict(
        target="sm_90a",
        dtype="bf16",
        acc="fp32",
        triton=triton.__version__,
        git_sha=git_sha("video_ens/kernels", "benchmarks/ptxas_report.py"),
        date=today,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + list(meta))
        writer.writeheader()
        writer.writerows({**row, **meta} for row in rows)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
