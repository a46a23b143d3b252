"""Choosing between a fused op's Triton kernel and its reference, and importing Triton (lazily, only from here).

Every public op takes `impl`:
    "reference"  the plain-PyTorch spec in reference.py.
    "triton"     the Triton kernels, or a RuntimeError that says why they cannot run: never a silent fallback.
    "auto"       Triton for CUDA tensors when triton imports, the reference otherwise (CPU tensors, no triton,
                 and code being traced by torch.compile, whose inductor already fuses these elementwise chains
                 into its own Triton kernels).

Triton is imported on the first call that needs it, so `import video_ens.kernels` and every model work without
it. Whether kernels are interpreted on CPU (TRITON_INTERPRET=1) is fixed the first time the kernels are built,
as Triton itself fixes it when `@triton.jit` runs.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from ..model_options import KERNEL_IMPLS as IMPLS  # the one list; a model's `kernels` option takes these

# Dtypes the kernels load and store. fp64 accumulates in fp64 (it exists for gradcheck); the others in fp32.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache
def _import_triton() -> tuple[ModuleType, ModuleType] | str:
    """(triton, triton.language), or the reason they do not import."""
    try:
        import triton
        import triton.language as tl
    except Exception as err:  # ImportError, or a broken install raising anything else
        return f"{type(err).__name__}: {err}"
    return triton, tl


def triton_modules() -> tuple[ModuleType, ModuleType]:
    """(triton, triton.language); RuntimeError if triton does not import."""
    mods = _import_triton()
    if isinstance(mods, str):
        raise RuntimeError(
            f"impl='triton' needs the triton package, which does not import here ({mods}); "
            "install it with `pip install -e .[triton]`, or pass impl='auto' or impl='reference'"
        )
    return mods


def triton_available() -> bool:
    return not isinstance(_import_triton(), str)


@functools.cache
def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when they were first built)."""
    triton, _ = triton_modules()
    return bool(triton.knobs.runtime.interpret)


def use_triton(impl: str, op: str, *tensors: torch.Tensor) -> bool:
    """Whether `op` should run its Triton kernels for these tensors under `impl`; raises when impl="triton" can't.

    The first tensor is the activation: its device and dtype decide.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    x = tensors[0]
    if impl == "auto":
        return (
            x.is_cuda
            and x.dtype in KERNEL_DTYPES
            and not torch.compiler.is_compiling()
            and triton_available()
            and not interpreting()
        )
    triton_modules()  # raises with the install hint when triton is missing
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}(impl='triton') supports {[str(d) for d in KERNEL_DTYPES]}, got {x.dtype}")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            f"{op}(impl='triton') got a {x.device.type} tensor: Triton kernels run on CUDA tensors, or on CPU "
            "tensors in Triton's interpreter, which TRITON_INTERPRET=1 turns on when it is set before triton is "
            "first imported. Use impl='auto' or impl='reference' for CPU tensors."
        )
    return True


def acc_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype for inputs of `dtype`: fp64 for fp64 (gradcheck), fp32 for everything else."""
    _, tl = triton_modules()
    return tl.float64 if dtype == torch.float64 else tl.float32


def configs(gpu: list[dict], interpreter: dict) -> list:
    """Autotune candidates: the GPU list on a GPU, one config in the interpreter (several fail there).

    Each dict holds the kernel's block constexprs plus optional "num_warps" / "num_stages".
    """
    triton, _ = triton_modules()

    def make(d: dict):
        meta = {k: v for k, v in d.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(meta, num_warps=d.get("num_warps", 4), num_stages=d.get("num_stages", 2))

    return [make(interpreter)] if interpreting() else [make(d) for d in gpu]
