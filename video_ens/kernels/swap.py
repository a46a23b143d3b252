"""Fused SWAP pooling (Self-Weighted Average Pooling, paper eq. 4) in Triton, forward and backward.

    f_d = sum_t |x_td| x_td / (sum_t |x_td| + eps)       over the valid frames t < lengths[b]

Spec: `reference.swap_pool_reference`. Gradient, with N = sum_t |x| x, S = sum_t |x| + eps, f = N / S:
    d(|x| x)/dx = sign(x) x + |x| = 2|x|,   d|x|/dx = sign(x)
    dL/dx_td = g_d (2|x_td| S - N sign(x_td)) / S^2 = g_d (2|x_td| - f_d sign(x_td)) / S_d
for valid frames, 0 for padded ones. sign(0) = 0, as torch.abs's backward has it, so an exact zero gets gradient
0 (the true derivative of |x| x at 0 is also 0; only the denominator's subgradient is a choice). A sequence with
length 0 has N = 0, S = eps: f = 0 and every gradient is 0.

Memory traffic (the op is memory-bound: about 3 flops per loaded element). With x of B*T*D elements of `e` bytes:
    eager reference, forward: cast to fp32, abs, abs*x, two sums, plus masking: about 7 passes over (B, T, D), 4
        of them in fp32.
    this kernel, forward: one read of the valid frames of x (B*T*D*e bytes at most), and (B, D) writes.
    this kernel, backward: one read of the valid frames of x and one write of grad_x: 2*B*T*D*e bytes.
At the DBoF eval shape (128, 300, 4096) in bf16 that is 315 MB forward: 94 us at the H100's 3.35 TB/s.
Only x, lengths, f and S ((B, D) each, fp32) are saved for backward: no (B, T, D) intermediate.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from . import runtime
from .reference import SWAP_EPS, swap_pool_reference

triton = tl = None  # imported by _kernels() on first use, so importing this module needs no triton


@functools.cache
def _kernels() -> SimpleNamespace:
    # Module globals, not closure variables: the interpreter re-executes each kernel's source against the module's
    # globals and would not see a closure.
    global triton, tl
    triton, tl = runtime.triton_modules()

    # Programs tile (B, D / BLOCK_D); each walks its sequence's frames BLOCK_T at a time. D is the contiguous
    # dimension, so a tile row is BLOCK_D consecutive elements (256 B in bf16 at BLOCK_D = 128: two full 128-byte
    # transactions per row). At (16, 300, 4096) the grid is 16 x 32 = 512 programs, about 4 per H100 SM; each has a
    # BLOCK_T x BLOCK_D tile (8 KB in bf16 at 32 x 128) in flight, ~32 KB per SM, enough by Little's law
    # (3.35 TB/s x ~1 us latency / 132 SMs = 25 KB) to cover HBM latency. Splitting T across programs would need
    # a second pass or atomics for the ratio; at B >= 16 the grid is already wide enough. The candidates below are
    # tried once per (D, dtype) by autotune on a GPU; the interpreter gets one (16 x 64: test shapes are tiny and
    # each program instance costs ~5 ms there, so fewer, larger programs).
    gpu_configs = [
        {"BLOCK_T": 16, "BLOCK_D": 128, "num_warps": 4},
        {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 4},
        {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 8, "num_stages": 3},
        {"BLOCK_T": 8, "BLOCK_D": 256, "num_warps": 4},
        {"BLOCK_T": 16, "BLOCK_D": 256, "num_warps": 8},
        {"BLOCK_T": 32, "BLOCK_D": 64, "num_warps": 4},
    ]
    interp_config = {"BLOCK_T": 16, "BLOCK_D": 64}

    @triton.autotune(configs=runtime.configs(gpu_configs, interp_config), key=["D"])
    @triton.jit
    def swap_fwd(
        x_ptr, len_ptr, out_ptr, f_ptr, den_ptr,
        T, D, stride_b, stride_t, stride_d, eps,
        HAS_LENGTHS: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        n = T
        if HAS_LENGTHS:
            n = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), T), 0)
        base = x_ptr + b.to(tl.int64) * stride_b + d[None, :] * stride_d
        # Both sums in the same pass; 2-D accumulators keep the per-frame adds independent (no reduction in the
        # loop), one reduction at the end.
        num = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
        den = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
        for t0 in range(0, n, BLOCK_T):  # padded frames are never read
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t < n)[:, None] & d_ok[None, :]
            x = tl.load(base + t[:, None] * stride_t, mask=mask, other=0.0).to(ACC)
            a = tl.abs(x)
            num += a * x
            den += a
        s = tl.sum(den, axis=0) + eps
        f = tl.sum(num, axis=0) / s
        row = b.to(tl.int64) * D + d
        tl.store(out_ptr + row, f.to(out_ptr.dtype.element_ty), mask=d_ok)
        tl.store(f_ptr + row, f, mask=d_ok)
        tl.store(den_ptr + row, s, mask=d_ok)

    @triton.autotune(configs=runtime.configs(gpu_configs, interp_config), key=["D"])
    @triton.jit
    def swap_bwd(
        x_ptr, len_ptr, g_ptr, f_ptr, den_ptr, gx_ptr,
        T, D, stride_b, stride_t, stride_d, stride_gb, stride_gd,
        HAS_LENGTHS: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        n = T
        if HAS_LENGTHS:
            n = tl.maximum(tl.minimum(tl.load(len_ptr + b).to(tl.int32), T), 0)
        row = b.to(tl.int64) * D + d
        g = tl.load(g_ptr + b.to(tl.int64) * stride_gb + d * stride_gd, mask=d_ok, other=0.0).to(ACC)
        f = tl.load(f_ptr + row, mask=d_ok, other=0.0)
        scale = g / tl.load(den_ptr + row, mask=d_ok, other=1.0)  # g / S: one divide per column, not per frame
        base = x_ptr + b.to(tl.int64) * stride_b + d[None, :] * stride_d
        gx_base = gx_ptr + b.to(tl.int64) * T * D + d[None, :]  # grad_x is allocated contiguous
        # Every frame is written (padded ones with 0: grad_x comes from torch.empty), but only valid ones are read.
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            x = tl.load(base + t[:, None] * stride_t, mask=(t < n)[:, None] & d_ok[None, :], other=0.0).to(ACC)
            sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
            gx = scale[None, :] * (2.0 * tl.abs(x) - f[None, :] * sign)
            tl.store(gx_base + t[:, None] * D, gx.to(gx_ptr.dtype.element_ty), mask=(t < T)[:, None] & d_ok[None, :])

    return SimpleNamespace(triton=triton, fwd=swap_fwd, bwd=swap_bwd)


def _swap_forward(x: torch.Tensor, lengths: torch.Tensor | None, eps: float):
    """(out (B, D) in x's dtype, f (B, D) and S (B, D) in the accumulation dtype)."""
    k = _kernels()
    b, t, d = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty((b, d), dtype=x.dtype, device=x.device)
    # f is kept apart from `out` even in fp32 (2 MB at B = 128, D = 4096): saving the returned tensor itself would
    # make backward fail after any in-place edit of the pooled features.
    f = torch.empty((b, d), dtype=acc, device=x.device)
    den = torch.empty((b, d), dtype=acc, device=x.device)
    grid = lambda meta: (b, k.triton.cdiv(d, meta["BLOCK_D"]))
    k.fwd[grid](
        x, lengths if lengths is not None else x, out, f, den,
        t, d, x.stride(0), x.stride(1), x.stride(2), eps,
        HAS_LENGTHS=lengths is not None, ACC=runtime.acc_dtype(x.dtype),
    )  # fmt: skip
    return out, f, den


def _swap_backward(x, lengths, g, f, den) -> torch.Tensor:
    k = _kernels()
    b, t, d = x.shape
    gx = torch.empty((b, t, d), dtype=x.dtype, device=x.device)
    grid = lambda meta: (b, k.triton.cdiv(d, meta["BLOCK_D"]))
    k.bwd[grid](
        x, lengths if lengths is not None else x, g, f, den, gx,
        t, d, x.stride(0), x.stride(1), x.stride(2), g.stride(0), g.stride(1),
        HAS_LENGTHS=lengths is not None, ACC=runtime.acc_dtype(x.dtype),
    )  # fmt: skip
    return gx


class SwapPoolFunction(torch.autograd.Function):
    """Triton SWAP pooling; saves x, lengths, f and S = sum|x| + eps for the single-pass backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lengths: torch.Tensor | None, eps: float) -> torch.Tensor:
        out, f, den = _swap_forward(x, lengths, eps)
        ctx.save_for_backward(x, lengths, f, den)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, lengths, f, den = ctx.saved_tensors
        gx = _swap_backward(x, lengths, g, f, den) if ctx.needs_input_grad[0] else None
        return gx, None, None


def swap_pool(
    x: torch.Tensor, lengths: torch.Tensor | None = None, *, eps: float = SWAP_EPS, impl: str = "auto"
) -> torch.Tensor:
    """SWAP pooling over the valid frames: x (B, T, D), lengths (B,) integer or None -> (B, D) in x's dtype.

    fp32 accumulation (fp64 for fp64 inputs). Frames t >= lengths[b] are ignored whatever they hold; a length of 0
    gives a row of zeros (and zero gradients); lengths above T count as T. `impl`: see video_ens.kernels.runtime.
    """
    if not runtime.use_triton(impl, "swap_pool", x):
        return swap_pool_reference(x, lengths, eps=eps)
    if x.dim() != 3:
        raise ValueError(f"swap_pool expects x of shape (B, T, D), got {tuple(x.shape)}")
    if lengths is not None:
        if lengths.shape != (x.shape[0],):
            raise ValueError(f"lengths must have shape ({x.shape[0]},), got {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor (frame counts), got {lengths.dtype}")
        lengths = lengths.to(x.device)
    if x.numel() == 0:  # no frames (T = 0) or nothing to pool: the reference's zeros, without a 0-sized launch
        return swap_pool_reference(x, lengths, eps=eps)
    return SwapPoolFunction.apply(x, lengths, float(eps))
