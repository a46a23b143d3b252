"""Fused ops. `reference.py` is the spec of each op in plain PyTorch; the Triton kernels (issue: fused kernels)
implement the same functions and are tested against it. Triton is imported only inside this package."""

from .reference import context_gate_reference, feature_gate_reference, swap_pool_reference

__all__ = ["context_gate_reference", "feature_gate_reference", "swap_pool_reference"]
