"""S3D-G's whole-clip forward in temporal windows: `model(x)` for a long clip with the peak memory of a shorter one.

S3D-G is convolutional in time except for two kinds of layer: every self-gate multiplies by
sigmoid(W mean_THW(x)), a mean over the *whole* clip, and Logits averages over time. A clip cut into windows that
each run the whole network therefore does not give the one-pass result: each window's gates see only their own
frames (tiny S3D-G, random weights, BN calibrated on random clips: averaging 16-frame windows of a 40-frame clip
moves the logits by 0.42 where they are 0.38 in size; tests/integration/test_eval_tools.py). The exact chunked
pass walks the network instead:

* a maximal run of temporally local layers (convs, pools, BN in eval mode, ReLU: Unit3d, SepConv3d, max-pools)
  runs over the clip in windows of at most `max_chunk_frames` input frames. Each window carries a halo of
  H = ceil(R / S) x S frames on both sides (R = the run's temporal receptive field, S = its cumulative temporal
  stride); window starts are multiples of S, so every window's output grid is a slice of the one-pass grid. The
  outputs whose receptive field leaves the window are dropped and the rest written into the whole-clip output;
* a gate, and the Logits head, run on the whole-clip activation they receive, exactly as in one pass;
* an inception block runs each of its four paths that way and concatenates them.

So every layer computes what it computes in one pass (bit for bit on CPU; a conv over another length may round
differently on GPU, ~1e-7 in fp32). The saving is modest, because every gate needs its whole-clip input in memory:
peak memory is the whole-clip activations at layer boundaries plus one window's intermediates. s3dg_ens2 on one
128-frame 112^2 clip (CPU, 2 threads, fresh process, glibc mmap threshold 64 kB so RSS follows live memory): one
pass +133 MB, 32-frame windows +103 MB; time 0.62 s vs 0.68 s (the halos recompute ~10%). Cutting memory further
would mean recomputing the network once per gate. A whole 300-frame Kinetics video at 224^2 needs ~1-2 GB in one
pass (by the same scaling), so windows are for very long videos or large batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .ensemble import EnsembleNet, ModelOutput
from .s3dg import FeatureGate, InceptionBlock, Logits, SepConv3d, Unit3d

__all__ = ["full_clip_forward", "temporal_geometry"]

# Leaves that act on each time step separately (BatchNorm only in eval mode, checked where it is met).
_POINTWISE_IN_TIME = (nn.BatchNorm3d, nn.ReLU, nn.Dropout, nn.Identity)
# Modules whose forward is the chain of their children in registration order (s3dg.Unit3d: conv, bn, relu;
# SepConv3d: spatial, bn, relu, temporal, relu).
_CHAINS = (Unit3d, SepConv3d, nn.Sequential)
# Modules that read the whole clip: the gates' mean over (T, H, W), the head's mean over time.
_WHOLE_CLIP = (FeatureGate, Logits)


def _first(value: Any) -> int:
    """The temporal entry of a conv/pool size argument given as an int or a (T, H, W) tuple."""
    return int(value) if isinstance(value, int) else int(value[0])


def _leaf_window(m: nn.Module) -> tuple[int, int, int, bool] | None:
    """(kernel extent, stride, padding, ceil_mode) of a temporally local leaf along time; None when pointwise."""
    if isinstance(m, _POINTWISE_IN_TIME):
        if isinstance(m, nn.BatchNorm3d) and m.training:
            raise ValueError(
                "chunked evaluation needs the model in eval mode: BatchNorm with batch statistics couples "
                "the chunks; call model.eval()"
            )
        return None
    if isinstance(m, nn.Conv3d):
        if isinstance(m.padding, str):
            raise ValueError(f"chunked evaluation needs numeric conv padding, got padding={m.padding!r}")
        k = _first(m.dilation) * (_first(m.kernel_size) - 1) + 1
        return k, _first(m.stride), _first(m.padding), False
    if isinstance(m, nn.MaxPool3d | nn.AvgPool3d):
        dilation = _first(m.dilation) if isinstance(m, nn.MaxPool3d) else 1
        k = dilation * (_first(m.kernel_size) - 1) + 1
        stride = _first(m.stride if m.stride is not None else m.kernel_size)
        return k, stride, _first(m.padding), bool(m.ceil_mode)
    raise TypeError(type(m).__name__)


def _local_leaves(module: nn.Module) -> list[nn.Module] | None:
    """The leaves of a temporally local module in execution order, or None if it (or a part of it) is not local."""
    if isinstance(module, _WHOLE_CLIP) or isinstance(module, InceptionBlock):
        return None
    if isinstance(module, _CHAINS):
        leaves: list[nn.Module] = []
        for child in module.children():
            sub = _local_leaves(child)
            if sub is None:
                return None
            leaves += sub
        return leaves
    try:
        _leaf_window(module)
    except TypeError:
        return None
    return [module]


def temporal_geometry(leaves: Iterable[nn.Module]) -> tuple[int, int]:
    """(receptive field R, cumulative stride S) along time of a chain of local leaves, in input frames.

    R = 1 + sum_i (k_i - 1) prod_{j<i} s_j; S = prod_i s_i. Output t of the chain reads input frames
    [t S - P, t S - P + R) for a P < R set by the paddings.
    """
    field, stride = 1, 1
    for leaf in leaves:
        window = _leaf_window(leaf)
        if window is None:
            continue
        k, s, _, _ = window
        field += (k - 1) * stride
        stride *= s
    return field, stride


def _out_length(leaves: Iterable[nn.Module], n: int) -> int:
    """Temporal output length of the chain on n input frames (PyTorch's conv and pool length formulas)."""
    for leaf in leaves:
        window = _leaf_window(leaf)
        if window is None:
            continue
        k, s, p, ceil_mode = window
        span = n + 2 * p - k
        if ceil_mode:
            out = -(-span // s) + 1
            if (out - 1) * s >= n + p:  # the last window must start inside the input or the left padding
                out -= 1
        else:
            out = span // s + 1
        n = out
    return n


def _run_chain(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in modules:
        x = m(x)
    return x


def _chunked(modules: list[nn.Module], x: torch.Tensor, max_chunk_frames: int) -> torch.Tensor:
    """A run of local modules over x (B, C, T, H, W) in windows of at most max_chunk_frames frames, halo included."""
    t = x.shape[2]
    if t <= max_chunk_frames:
        return _run_chain(modules, x)
    leaves = [leaf for m in modules for leaf in _local_leaves(m)]
    field, stride = temporal_geometry(leaves)
    halo = math.ceil(field / stride) * stride  # >= R and a multiple of S: windows start on the output grid
    core = (max_chunk_frames - 2 * halo) // stride * stride
    if core < stride:
        raise ValueError(
            f"max_chunk_frames {max_chunk_frames} leaves no room between two halos of {halo} frames (receptive "
            f"field {field}, stride {stride}): use at least {2 * halo + stride}"
        )
    total = _out_length(leaves, t)
    out: torch.Tensor | None = None
    for start in range(0, t, core):
        end = min(start + core, t)
        lo, hi = max(0, start - halo), min(t, end + halo)
        y = _run_chain(modules, x[:, :, lo:hi])  # (B, C', T_window', H', W')
        first = (start - lo) // stride
        last = (end - lo) // stride if end < t else y.shape[2]
        piece = y[:, :, first:last]
        if out is None:
            fmt = torch.channels_last_3d if _is_channels_last(y) else torch.contiguous_format
            out = torch.empty((*y.shape[:2], total, *y.shape[3:]), dtype=y.dtype, device=y.device, memory_format=fmt)
        at = start // stride
        out[:, :, at : at + piece.shape[2]] = piece
        del y, piece
    assert out is not None and at + (last - first) == total, "temporal windows do not tile the output"
    return out


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def _walk(module: nn.Module, x: torch.Tensor, max_chunk_frames: int) -> torch.Tensor:
    """`module(x)` on a whole clip, with every run of local layers windowed in time (see the module docstring)."""
    if _local_leaves(module) is not None:
        return _chunked([module], x, max_chunk_frames)
    if isinstance(module, _WHOLE_CLIP):
        return module(x)
    if isinstance(module, InceptionBlock):
        paths = (module.Branch_0, module.Branch_1, module.Branch_2, module.Branch_3)
        return torch.cat([_walk(p, x, max_chunk_frames) for p in paths], dim=1)  # same order as its forward
    if isinstance(module, nn.Sequential):
        run: list[nn.Module] = []  # consecutive local children share one windowed pass
        for child in module.children():
            if _local_leaves(child) is not None:
                run.append(child)
                continue
            if run:
                x, run = _chunked(run, x, max_chunk_frames), []
            x = _walk(child, x, max_chunk_frames)
        return _chunked(run, x, max_chunk_frames) if run else x
    raise ValueError(
        f"chunked whole-clip evaluation does not know how {type(module).__name__} uses time; it handles S3D-G "
        "(video_ens.models.s3dg). Evaluate in one pass (--max-chunk-frames 0) or in clips (eval.mode=clips)"
    )


def full_clip_forward(model: EnsembleNet, x: torch.Tensor, *, max_chunk_frames: int | None) -> ModelOutput:
    """`model(x)` for a whole clip x (B, 3, T, H, W), computed in temporal windows of at most `max_chunk_frames`
    frames where the network is local in time; equal to one pass up to fp32 rounding (module docstring).

    max_chunk_frames None or 0, or a clip no longer than it: one ordinary pass. The model must be in eval mode.
    """
    if not max_chunk_frames or x.shape[2] <= max_chunk_frames:
        return model(x)
    if model.training:
        raise ValueError("full_clip_forward needs model.eval(): BatchNorm with batch statistics couples the chunks")
    if x.dim() != 5:
        raise ValueError(f"full_clip_forward expects a clip batch (B, 3, T, H, W), got shape {tuple(x.shape)}")
    h = _walk(model.base, x, max_chunk_frames)
    return model.combine(torch.stack([_walk(b, h, max_chunk_frames) for b in model.branches], dim=0))  # (N, B, C)
