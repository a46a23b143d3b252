"""Fused ops. `reference.py` is the spec of each op in plain PyTorch; swap.py, context_gate.py and feature_gate.py hold
the Triton kernels, their autograd.Functions and the public functions below, which are tested against the spec.

Every public op takes `impl="auto" | "triton" | "reference"` (runtime.py): "auto" runs Triton on CUDA tensors when
triton imports and the reference otherwise; "triton" runs the kernels or raises. Triton is imported only inside
this package, and only on the first call that runs a kernel, so importing the package and the models needs no
triton.
"""

from .context_gate import context_gate, gate_epilogue
from .feature_gate import feature_gate
from .reference import (
    SWAP_EPS,
    context_gate_reference,
    feature_gate_reference,
    gate_epilogue_reference,
    swap_pool_reference,
)
from .runtime import IMPLS, triton_available
from .swap import swap_pool

__all__ = [
    "IMPLS",
    "SWAP_EPS",
    "context_gate",
    "context_gate_reference",
    "feature_gate",
    "feature_gate_reference",
    "gate_epilogue",
    "gate_epilogue_reference",
    "swap_pool",
    "swap_pool_reference",
    "triton_available",
]
