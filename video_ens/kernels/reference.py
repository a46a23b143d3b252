"""Plain-PyTorch definitions of the fused ops: the specification every kernel is tested against.

All three are memory-bound chains of small ops; they live here once, and the models call them.
"""

from __future__ import annotations

import torch

SWAP_EPS = 1e-6


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32, or in fp64 for fp64 inputs (so `gradcheck` in float64 checks the formulas, not rounding)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def swap_pool_reference(x: torch.Tensor, lengths: torch.Tensor | None = None, *, eps: float = SWAP_EPS) -> torch.Tensor:
    """Self-Weighted Average Pooling (paper eq. 4) over the valid frames of each sequence.

        f_d = sum_t |x_td| x_td / (sum_t |x_td| + eps)

    Args:
        x: (B, T, D) frame features.
        lengths: (B,) number of valid frames per sequence; frames t >= lengths[b] are ignored whatever their
            values. None means all T frames are valid.
    Returns:
        (B, D) in x's dtype, accumulated in fp32 (fp64 for fp64 inputs).
    """
    if x.dim() != 3:
        raise ValueError(f"swap_pool expects x of shape (B, T, D), got {tuple(x.shape)}")
    xf = x.to(_acc_dtype(x.dtype))
    if lengths is not None:
        if lengths.shape != (x.shape[0],):
            raise ValueError(f"lengths must have shape ({x.shape[0]},), got {tuple(lengths.shape)}")
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]  # (B, T)
        xf = torch.where(valid[:, :, None], xf, torch.zeros((), dtype=xf.dtype, device=xf.device))
    a = xf.abs()
    num = (a * xf).sum(dim=1)  # (B, D)
    den = a.sum(dim=1) + eps  # (B, D)
    return (num / den).to(x.dtype)


def context_gate_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Context gating (Miech et al. 2017) with BN folded into `bias`: y = x * sigmoid(x W^T + b).

    Args:
        x: (M, D). weight: (D, D) as in nn.Linear. bias: (D,) or None.
    """
    gates = torch.nn.functional.linear(x, weight, bias)  # (M, D)
    return x * torch.sigmoid(gates)


def gate_epilogue_reference(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The elementwise end of a context gate whose pre-activation z was computed elsewhere: y = x * sigmoid(z).

    In training, ContextGate computes z = BN(x W^T) with batch statistics, which cannot be folded into a bias;
    this is the part after BN that a kernel can still fuse. x, z: (M, D).
    """
    return x * torch.sigmoid(z)


def feature_gate_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """S3D-G self-gating: y = x * sigmoid(W mean_THW(x)), channel-wise.

    Args:
        x: (B, C, T, H, W), contiguous or channels_last_3d. weight: (C, C) (a 1x1x1 conv without bias).
    """
    if x.dim() != 5:
        raise ValueError(f"feature_gate expects x of shape (B, C, T, H, W), got {tuple(x.shape)}")
    w = weight.reshape(weight.shape[0], -1)  # (C, C) also from a (C, C, 1, 1, 1) conv weight
    acc = _acc_dtype(x.dtype)
    pooled = x.to(acc).mean(dim=(2, 3, 4))  # (B, C)
    gate = torch.sigmoid(pooled @ w.to(acc).t()).to(x.dtype)  # (B, C)
    return x * gate[:, :, None, None, None]
