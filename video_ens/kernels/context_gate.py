"""Fused context gating in Triton: y = x * sigmoid(x W^T + b), forward and backward.

Spec: `reference.context_gate_reference` (inference form, BN folded into b) and `reference.gate_epilogue_reference`
(y = x * sigmoid(z) for a z computed elsewhere: the training form, z = BN(x W^T) with batch statistics).

The D x D GEMM stays in cuBLAS (torch.matmul): at the DBoF shapes it is ~1.3 TFLOP per call at M = 38,400 frames
and cuBLAS runs it near peak. What Triton fuses is everything around it, all memory-bound:

    forward   z = x W^T                                  cuBLAS, no bias
              y = x * sigmoid(z + b)                     ONE kernel: reads x, z; writes y (3 passes over (M, D))
              eager: addmm (bias), sigmoid, mul: reads x, s, z ... 5 passes
    backward  s = sigmoid(z + b)                          recomputed in the kernel from the saved z (no saved s)
              gx = g * s, dz = g * x * s * (1 - s),       ONE kernel: reads g, x, z; writes gx, dz (5 passes), and
              db partial column sums of dz                  writes per-program partial sums of dz for db
              gx += dz W                                 cuBLAS addmm with beta = 1: no separate add pass
              dW = dz^T x                                cuBLAS
              eager: sigmoid backward, two mul backwards, an add for the two paths into x and a column sum for
              db: about 12 passes.
With bf16 (M, D) = (38,400, 4096) one pass is 315 MB (94 us at 3.35 TB/s), so the fused epilogue saves about
2 passes forward and 7 backward, against a GEMM of ~2 ms forward: a few percent of the op, all of the elementwise.

Autocast: under torch.autocast the GEMMs run in the autocast dtype, as F.linear would; the epilogue reads x in its
own dtype and z in the GEMM's, computes in fp32 and writes y in their promoted dtype (the reference's x * sigmoid(z)
promotes the same way).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from . import runtime
from .reference import context_gate_reference, gate_epilogue_reference

triton = tl = None  # imported by _kernels() on first use, so importing this module needs no triton

# Tile (BLOCK_M rows x BLOCK_D columns) and rows per program. BLOCK_D = 256 contiguous elements: 512 B per row in
# bf16, whole 128-byte transactions; 16 x 256 = 4096 elements, 32 per thread at 4 warps, 8 KB per bf16 operand in
# flight. Each program walks ROWS = 256 rows so that the db partial sums are (M / 256, D) fp32, 2.5 MB at
# M = 38,400 and D = 4096 (under 1% of one bf16 pass over (M, D)) while the grid stays wide: 150 x 16 programs.
# In the interpreter one program instance costs ~5 ms, and the same blocks make the test shapes one or two programs.
BLOCK_M, BLOCK_D, ROWS = 16, 256, 256


@functools.cache
def _kernels() -> SimpleNamespace:
    # Module globals, not closure variables: the interpreter re-executes each kernel's source against the module's
    # globals and would not see a closure.
    global triton, tl
    triton, tl = runtime.triton_modules()

    # Both kernels compute sigmoid from exp(-|z|) only: it never overflows (z = -200 in fp32 would give
    # exp(200) = inf otherwise) and keeps the relative accuracy of small gates. Written out in each kernel rather
    # than as a helper: the interpreter does not resolve a @triton.jit helper defined in this function.
    @triton.jit
    def gate_fwd(
        x_ptr, z_ptr, b_ptr, y_ptr,
        M, D, stride_xm, stride_zm,
        HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        row0 = tl.program_id(0).to(tl.int64) * ROWS
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        if HAS_BIAS:
            bias = tl.load(b_ptr + d, mask=d_ok, other=0.0).to(ACC)
        for m0 in range(0, ROWS, BLOCK_M):
            m = row0 + m0 + tl.arange(0, BLOCK_M)
            mask = (m < M)[:, None] & d_ok[None, :]
            x = tl.load(x_ptr + m[:, None] * stride_xm + d[None, :], mask=mask, other=0.0).to(ACC)
            z = tl.load(z_ptr + m[:, None] * stride_zm + d[None, :], mask=mask, other=0.0).to(ACC)
            if HAS_BIAS:
                z += bias[None, :]
            e = tl.exp(-tl.abs(z))
            y = x * tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            tl.store(y_ptr + m[:, None] * D + d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def gate_bwd(
        g_ptr, x_ptr, z_ptr, b_ptr, gx_ptr, gz_ptr, db_ptr,
        M, D, stride_gm, stride_xm, stride_zm,
        HAS_BIAS: tl.constexpr, WANT_DB: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        row0 = tl.program_id(0).to(tl.int64) * ROWS
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        if HAS_BIAS:
            bias = tl.load(b_ptr + d, mask=d_ok, other=0.0).to(ACC)
        if WANT_DB:
            db = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        for m0 in range(0, ROWS, BLOCK_M):
            m = row0 + m0 + tl.arange(0, BLOCK_M)
            mask = (m < M)[:, None] & d_ok[None, :]
            g = tl.load(g_ptr + m[:, None] * stride_gm + d[None, :], mask=mask, other=0.0).to(ACC)
            x = tl.load(x_ptr + m[:, None] * stride_xm + d[None, :], mask=mask, other=0.0).to(ACC)
            z = tl.load(z_ptr + m[:, None] * stride_zm + d[None, :], mask=mask, other=0.0).to(ACC)
            if HAS_BIAS:
                z += bias[None, :]
            e = tl.exp(-tl.abs(z))
            s = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            gs = g * s
            gz = gs * x * (1.0 - s)  # masked rows load g = 0, so they add nothing to db
            out = m[:, None] * D + d[None, :]
            tl.store(gx_ptr + out, gs.to(gx_ptr.dtype.element_ty), mask=mask)
            tl.store(gz_ptr + out, gz.to(gz_ptr.dtype.element_ty), mask=mask)
            if WANT_DB:
                db += gz
        if WANT_DB:  # this program's partial column sum: row program_id(0) of the (cdiv(M, ROWS), D) buffer
            tl.store(db_ptr + tl.program_id(0).to(tl.int64) * D + d, tl.sum(db, axis=0), mask=d_ok)

    return SimpleNamespace(triton=triton, fwd=gate_fwd, bwd=gate_bwd)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as a 2-D tensor whose last dimension is contiguous (the kernels take a row stride only)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _epilogue_forward(x: torch.Tensor, z: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x * sigmoid(z + bias) for 2-D x, z with contiguous rows; y contiguous in their promoted dtype."""
    k = _kernels()
    m, d = x.shape
    y = torch.empty((m, d), dtype=torch.promote_types(x.dtype, z.dtype), device=x.device)
    grid = (k.triton.cdiv(m, ROWS), k.triton.cdiv(d, BLOCK_D))
    k.fwd[grid](
        x, z, bias if bias is not None else x, y, m, d, x.stride(0), z.stride(0),
        HAS_BIAS=bias is not None, ACC=runtime.acc_dtype(y.dtype), BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, ROWS=ROWS,
    )  # fmt: skip
    return y


def _epilogue_backward(g, x, z, bias, gx_dtype, gz_dtype, want_db=False):
    """(g * s in gx_dtype, dz = g * x * s * (1 - s) in gz_dtype, column sum of dz in fp32/fp64 if want_db else None),
    s = sigmoid(z + bias)."""
    k = _kernels()
    m, d = x.shape
    g = _rows(g)
    gx = torch.empty((m, d), dtype=gx_dtype, device=x.device)
    gz = torch.empty((m, d), dtype=gz_dtype, device=x.device)
    acc = torch.float64 if torch.float64 in (x.dtype, z.dtype, g.dtype) else torch.float32
    grid = (k.triton.cdiv(m, ROWS), k.triton.cdiv(d, BLOCK_D))
    db = torch.empty((grid[0], d), dtype=acc, device=x.device) if want_db else None
    k.bwd[grid](
        g, x, z, bias if bias is not None else x, gx, gz, db if db is not None else gx,
        m, d, g.stride(0), x.stride(0), z.stride(0),
        HAS_BIAS=bias is not None, WANT_DB=want_db, ACC=runtime.acc_dtype(acc),
        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, ROWS=ROWS,
    )  # fmt: skip
    return gx, gz, (db.sum(0) if db is not None else None)


class GateEpilogueFunction(torch.autograd.Function):
    """y = x * sigmoid(z), fused forward and backward; saves x and z (not sigmoid(z), which backward recomputes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2, z2 = _rows(x), _rows(z)
        ctx.save_for_backward(x2, z2)
        ctx.shape = shape
        return _epilogue_forward(x2, z2, None).view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, z = ctx.saved_tensors
        gx, gz, _ = _epilogue_backward(g, x, z, None, x.dtype, z.dtype)
        return gx.view(ctx.shape), gz.view(ctx.shape)


class ContextGateFunction(torch.autograd.Function):
    """y = x * sigmoid(x W^T + b): cuBLAS GEMMs around the fused Triton epilogue (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mm_dtype):
        xm = x.to(mm_dtype)  # (M, D); no copy when x is already in the GEMM dtype
        wm = weight.to(mm_dtype)  # (D, D)
        z = torch.mm(xm, wm.t())  # (M, D): no bias here, the epilogue adds it in fp32
        ctx.save_for_backward(x, weight, bias, z)
        ctx.mm_dtype = mm_dtype
        return _epilogue_forward(x, z, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight, bias, z = ctx.saved_tensors
        mm = ctx.mm_dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # gx starts as the direct term g * s; in x's dtype when that is the GEMM dtype, so addmm can add dz W in
        # place (cuBLAS beta = 1); otherwise (autocast with an fp32 x) in fp32 and the GEMM's result is added.
        gx, dz, db = _epilogue_backward(g, x, z, bias, x.dtype, mm, want_db=need_b)
        wm = weight.to(mm)
        if need_x:
            gx = gx.addmm_(dz, wm) if x.dtype == mm else gx + torch.mm(dz, wm).to(x.dtype)  # (M, D)
        gw = torch.mm(dz.t(), x.to(mm)).to(weight.dtype) if need_w else None  # (D, D) = dz^T x
        gb = db.to(bias.dtype) if need_b else None
        return (gx if need_x else None), gw, gb, None


def _gemm_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(x, weight) would compute in: the autocast dtype when autocast is on, else x's dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    if weight.dtype != x.dtype:
        raise TypeError(f"context_gate: weight dtype {weight.dtype} differs from x dtype {x.dtype} (outside autocast)")
    return x.dtype


def context_gate(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """Context gating y = x * sigmoid(x W^T + b): x (M, D), weight (D, D) as nn.Linear's, bias (D,) or None.

    This is the evaluation form of DBoF's ContextGate (BN folded into weight and bias). `impl`: see
    video_ens.kernels.runtime.
    """
    if not runtime.use_triton(impl, "context_gate", x, weight, bias):
        return context_gate_reference(x, weight, bias)
    if x.dim() != 2:
        raise ValueError(f"context_gate expects x of shape (M, D), got {tuple(x.shape)}")
    d = x.shape[1]
    if weight.shape != (d, d):
        raise ValueError(f"context_gate: weight must be ({d}, {d}) for x of width {d}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"context_gate: bias must be ({d},), got {tuple(bias.shape)}")
    if x.numel() == 0:
        return context_gate_reference(x, weight, bias)
    return ContextGateFunction.apply(_rows(x), weight, bias, _gemm_dtype(x, weight))


def gate_epilogue(x: torch.Tensor, z: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """y = x * sigmoid(z), elementwise, fused forward and backward: x, z of one shape (..., D).

    The training form of DBoF's ContextGate: z = BN(x W^T) with batch statistics (not foldable into a bias), then
    this. The output has the promoted dtype of x and z, as x * torch.sigmoid(z) has.
    """
    if not runtime.use_triton(impl, "gate_epilogue", x, z):
        return gate_epilogue_reference(x, z)
    if x.shape != z.shape:
        raise ValueError(f"gate_epilogue: x and z must have one shape, got {tuple(x.shape)} and {tuple(z.shape)}")
    if x.dim() == 0 or x.numel() == 0:
        return gate_epilogue_reference(x, z)
    if z.dtype not in runtime.KERNEL_DTYPES:
        raise TypeError(f"gate_epilogue(impl='triton'): z dtype {z.dtype} is not one of {runtime.KERNEL_DTYPES}")
    return GateEpilogueFunction.apply(x, z)
