"""Fused S3D-G feature gating in Triton: y = x * sigmoid(W mean_THW(x)), forward and backward.

Spec: `reference.feature_gate_reference`. x is (B, C, T, H, W), contiguous or channels_last_3d; S = T*H*W.

    forward   m = mean_S x                  reduction kernel -> (B, C) in fp32 (x read once)
              s = sigmoid(m W^T)            torch, (B, C) x (C, C): at most 8 x 1024 x 1024, negligible
              y = x * s[b, c]               broadcast kernel (x read once, y written once)
    backward, with r = sum_S g * x, da = r * s * (1 - s):
              dW = da^T m                    torch, (C, C)
              dm = da W                      torch, (B, C)
              dx = g * s[b, c] + dm[b, c] / S   (the direct term plus the mean's broadcast gradient)
              r: the reduction kernel on g * x (g and x read once); dx: the broadcast kernel with a shift
              (g read once, dx written once).
Passes over (B, C, S): 3 forward (eager: the fp32 cast for the mean, the mean, the multiply read/write: 4-5) and
4 backward (eager: g * x, its sum, g * gate, the mean's expand and the add of both paths: 8 or more). At Conv2d_2c's
gate, (8, 192, 32, 56, 56) in bf16, one pass is 308 MB: 92 us at 3.35 TB/s. Saved for backward: x, W, m and s;
(B, C) each besides x, no (B, C, T, H, W) intermediate.

Layouts. Both kernels take tiles of (channels x positions) with element (b, c, s) at b*C*S + c*stride_c + s*stride_s:
stride_s = 1 for contiguous, stride_c = 1 for channels-last, so the tile's innermost axis is the contiguous one and
loads are coalesced either way (Triton specializes a stride of 1 and vectorizes along it). The reduction splits S
across programs when B*C alone would not fill the GPU (channels-last at Conv2d_2c: 8 x 3 channel blocks = 24
programs for 132 SMs). Any other layout is made contiguous first.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from . import runtime
from .reference import feature_gate_reference

triton = tl = None  # imported by _kernels() on first use, so importing this module needs no triton

# Tiles of BLOCK_C channels x BLOCK_S positions, 2048 elements (16 per thread at 4 warps: two 16-byte vector loads
# in bf16), for both kernels. Contiguous: positions are innermost, 256 of them per row (512 B in bf16, four 128-byte
# transactions) for 8 channels. Channels-last: channels are innermost, 64 of them (128 B in bf16) per row, for 32
# positions; C = 192, 832 and 1024 are whole numbers of 64-channel blocks. A flat 1-D walk over memory would need
# an integer divide per element to find its channel (off // S, or off % C), ~20 instructions each: enough to make
# the broadcast compute-bound at 3.35 TB/s, hence the tiles. At (8, 192, 32, 56, 56) the broadcast grid is
# 392 x 24 x 8 = 75,264 programs (contiguous).
BLOCKS = {False: (8, 256), True: (64, 32)}
# The reduction aims at this many programs per SM so that enough loads are in flight to cover HBM latency; in the
# interpreter the target is 4 programs in all, which is enough to exercise the split along S in the tests while
# keeping the instance count (~5 ms each) small.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4


@functools.cache
def _kernels() -> SimpleNamespace:
    # Module globals, not closure variables: the interpreter re-executes each kernel's source against the module's
    # globals and would not see a closure.
    global triton, tl
    triton, tl = runtime.triton_modules()

    @triton.jit
    def reduce_kernel(
        x_ptr, g_ptr, out_ptr,
        B, C, S, stride_c, stride_s, chunk, scale,
        PRODUCT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        # out[split, b, c] = scale * sum over this split's positions of x (or of g * x when PRODUCT).
        b = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        split = tl.program_id(2)
        c_ok = c < C
        base = b.to(tl.int64) * C * S + c[:, None] * stride_c
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
        start = split * chunk
        for s0 in range(start, tl.minimum(start + chunk, S), BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = c_ok[:, None] & (s < S)[None, :]
            off = base + s[None, :] * stride_s
            v = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            if PRODUCT:
                v *= tl.load(g_ptr + off, mask=mask, other=0.0).to(ACC)
            acc += v
        total = tl.sum(acc, axis=1) * scale
        tl.store(out_ptr + (split.to(tl.int64) * B + b) * C + c, total, mask=c_ok)

    @triton.jit
    def broadcast_kernel(
        x_ptr, scale_ptr, shift_ptr, y_ptr,
        C, S, stride_c, stride_s,
        HAS_SHIFT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        # y[b, c, s] = x[b, c, s] * scale[b, c] (+ shift[b, c]); y has x's layout (same strides).
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        b = tl.program_id(2).to(tl.int64)
        c_ok = c < C
        mask = c_ok[:, None] & (s < S)[None, :]
        off = b * C * S + (c[:, None] * stride_c + s[None, :] * stride_s)  # within a sample: C*S < 2^31 elements
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        # One (BLOCK_C,) load of the per-channel factors per tile, not one gather per element.
        y = x * tl.load(scale_ptr + b * C + c, mask=c_ok, other=0.0)[:, None]
        if HAS_SHIFT:
            y += tl.load(shift_ptr + b * C + c, mask=c_ok, other=0.0)[:, None]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(triton=triton, reduce=reduce_kernel, broadcast=broadcast_kernel)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(x in a layout the kernels take, whether it is channels-last)."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return x, True
    return x.contiguous(), False


def _reduce(x: torch.Tensor, g: torch.Tensor | None, channels_last: bool, scale: float, acc: torch.dtype):
    """(B, C) = scale * sum_S x (or g * x): the reduction kernel, split along S when B*C alone is too few programs."""
    k = _kernels()
    b, c = x.shape[:2]
    s = x.shape[2] * x.shape[3] * x.shape[4]
    block_c, block_s = BLOCKS[channels_last]
    c_blocks = k.triton.cdiv(c, block_c)
    target = INTERPRETER_PROGRAMS if runtime.interpreting() else PROGRAMS_PER_SM * _sm_count(x.device.index or 0)
    s_blocks = k.triton.cdiv(s, block_s)
    per_split = k.triton.cdiv(s_blocks, max(1, min(s_blocks, k.triton.cdiv(target, b * c_blocks))))
    chunk = per_split * block_s  # a whole number of BLOCK_S, so splits never share a tile
    n_split = k.triton.cdiv(s, chunk)
    out = torch.empty((n_split, b, c), dtype=acc, device=x.device)
    stride_c, stride_s = (1, c) if channels_last else (s, 1)
    k.reduce[(b, c_blocks, n_split)](
        x, g if g is not None else x, out, b, c, s, stride_c, stride_s, chunk, scale,
        PRODUCT=g is not None, ACC=runtime.acc_dtype(acc), BLOCK_C=block_c, BLOCK_S=block_s,
    )  # fmt: skip
    return out[0] if n_split == 1 else out.sum(0)  # (B, C)


def _broadcast(x, scale, shift, channels_last: bool) -> torch.Tensor:
    """x * scale[b, c] (+ shift[b, c]) in x's dtype and layout; scale, shift (B, C) contiguous."""
    k = _kernels()
    b, c = x.shape[:2]
    s = x.shape[2] * x.shape[3] * x.shape[4]
    block_c, block_s = BLOCKS[channels_last]
    stride_c, stride_s = (1, c) if channels_last else (s, 1)
    y = torch.empty_like(x)  # preserve_format: same strides as the dense x
    grid = (k.triton.cdiv(s, block_s), k.triton.cdiv(c, block_c), b)
    k.broadcast[grid](
        x, scale, shift if shift is not None else scale, y, c, s, stride_c, stride_s,
        HAS_SHIFT=shift is not None, ACC=runtime.acc_dtype(scale.dtype), BLOCK_C=block_c, BLOCK_S=block_s,
    )  # fmt: skip
    return y


class FeatureGateFunction(torch.autograd.Function):
    """Triton feature gate; saves x, W, m = mean_S x and s = sigmoid(m W^T) ((B, C) each, fp32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x, channels_last = _layout(x)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        s_len = x.shape[2] * x.shape[3] * x.shape[4]
        with torch.autocast(x.device.type, enabled=False):  # the (B, C) x (C, C) gate matmul stays in fp32
            m = _reduce(x, None, channels_last, 1.0 / s_len, acc)  # (B, C)
            w = weight.reshape(weight.shape[0], -1).to(acc)  # (C, C)
            s = torch.sigmoid(m @ w.t())  # (B, C)
        ctx.save_for_backward(x, weight, m, s)
        ctx.channels_last = channels_last
        return _broadcast(x, s, None, channels_last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, weight, m, s = ctx.saved_tensors
        cl = ctx.channels_last
        g = g.contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
        s_len = x.shape[2] * x.shape[3] * x.shape[4]
        with torch.autocast(x.device.type, enabled=False):
            r = _reduce(x, g, cl, 1.0, m.dtype)  # (B, C): dL/ds = sum_S g * x
            da = r * s * (1.0 - s)  # (B, C): through the sigmoid
            w = weight.reshape(weight.shape[0], -1).to(m.dtype)  # (C, C)
            gw = (da.t() @ m).reshape(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
            gx = None
            if ctx.needs_input_grad[0]:
                shift = (da @ w) / s_len  # (B, C): dL/dm spread evenly over the S positions of the mean
                gx = _broadcast(g, s, shift, cl)
        return gx, gw


def feature_gate(x: torch.Tensor, weight: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """S3D-G self-gating y = x * sigmoid(W mean_THW(x)): x (B, C, T, H, W), weight (C, C) or (C, C, 1, 1, 1).

    Contiguous and channels_last_3d inputs are read in place and y keeps x's layout (other layouts are copied to
    contiguous first). The mean and the gate are fp32 (fp64 for fp64 inputs). `impl`: see video_ens.kernels.runtime.
    """
    if not runtime.use_triton(impl, "feature_gate", x, weight):
        return feature_gate_reference(x, weight)
    if x.dim() != 5:
        raise ValueError(f"feature_gate expects x of shape (B, C, T, H, W), got {tuple(x.shape)}")
    c = x.shape[1]
    if weight.numel() != c * c or weight.shape[:2] != (c, c):
        raise ValueError(f"feature_gate: weight must be ({c}, {c}) or ({c}, {c}, 1, 1, 1), got {tuple(weight.shape)}")
    if x.numel() == 0:
        return feature_gate_reference(x, weight)
    if x[0].numel() >= 2**31:
        raise ValueError(f"feature_gate: one sample has {x[0].numel()} elements; the kernels index one in int32")
    return FeatureGateFunction.apply(x, weight)
