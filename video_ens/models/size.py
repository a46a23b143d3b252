"""Model size the way the paper reports it: parameters with BN folded, FLOPs at batch 1 (design/architecture.md 0.1).

* `count_params`: every parameter outside BatchNorm, plus one value per BN channel. Folding BN into the preceding
  conv or linear turns its four per-channel tensors into a single bias, which is what the paper counts ("we fold
  batch norm operations during inference"); torchvision-style gamma + beta counting is 0.1-0.2M higher on
  ResNet-152 and rounds to the wrong paper digit in all four ResNet rows.
* `count_flops`: 2 FLOPs per multiply-accumulate of every conv and matmul, from
  `torch.utils.flop_counter.FlopCounterMode` (multiplication and addition counted separately, as tf.profiler
  does). With `include_elementwise=True` it adds the "+ew" count, a copy of tf.profiler's registry for the cheap ops
  (see `_ElementwiseCounter`). SE-ResNet needs it to reach the paper's 21.9B / 21.1B: the squeeze means and
  excitation multiplies add ~0.06B.
* `model_size_report`: both numbers for a named model, on the input each family is measured with.

FLOPs are counted by running the model on the meta device: shapes only, no arithmetic, so S3D-G at 64 x 224^2
(129 GFLOPs) costs no more than a dispatch of each op. A model with real weights is run through
`torch.func.functional_call` with meta stand-ins, so nothing is copied or changed. Where an op has no meta kernel
(or the forward reads a value, e.g. `.item()`), the count falls back to CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten


def count_params(model: nn.Module, *, fold_bn: bool = True) -> int:
    """Parameter count; with `fold_bn`, each BatchNorm contributes one value per channel instead of its gamma, beta.

    Folding keeps only the per-channel shift (beta - mean * gamma / std); the scale is absorbed into the weights
    before it. A BN without affine parameters still folds to a shift, so it counts the same. Works on meta models.
    """
    if not fold_bn:
        return sum(p.numel() for p in model.parameters())
    in_bn: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # BatchNorm1d/2d/3d, SyncBatchNorm
            total += m.num_features
            in_bn.update(id(p) for p in m.parameters(recurse=False))
    return total + sum(p.numel() for p in model.parameters() if id(p) not in in_bn)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _ops(*names: str) -> frozenset:
    """The aten overload packets of that name which this torch build has."""
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


# tf.profiler's flops_registry, restated for aten ops. Each count is per element of the output unless said.
_BINARY = _ops(  # Add, Sub, Mul, RealDiv, Maximum, Minimum, Pow, comparisons and the unary Neg/Reciprocal/Rsqrt/Log
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow", "pow_",
    "neg", "neg_", "reciprocal", "reciprocal_", "rsqrt", "rsqrt_", "log", "log_",
    "eq", "ne", "lt", "le", "gt", "ge",
)  # fmt: skip
_BATCH_NORM = _ops(  # folded BN is one add per element (the scale lives in the previous layer's weights)
    "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "_batch_norm_with_update", "_batch_norm_no_update",
    "cudnn_batch_norm", "miopen_batch_norm",
)  # fmt: skip
_WITH_BIAS = _ops("convolution", "addmm", "baddbmm", "linear")  # BiasAdd: one add per output element
_CONV_LINEAR = _ops("convolution", "linear")
_POOL = {  # kernel area x output elements; the value is the number of spatial dims
    **{op: 1 for op in _ops("max_pool1d", "max_pool1d_with_indices", "avg_pool1d")},
    **{op: 2 for op in _ops("max_pool2d", "max_pool2d_with_indices", "avg_pool2d")},
    **{op: 3 for op in _ops("max_pool3d", "max_pool3d_with_indices", "avg_pool3d")},
}
_REDUCE = _ops(  # Mean / Sum: one per input element (global pooling is a mean)
    "mean", "sum", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool2d", "adaptive_max_pool3d",
)  # fmt: skip
_SOFTMAX = _ops("_softmax", "_log_softmax", "_safe_softmax", "softmax", "log_softmax")  # 5 per element


def _elementwise_flops(func, args: tuple, kwargs: dict, out: Any) -> int:
    """tf.profiler-style FLOPs of one aten op beyond the 2-MAC count; 0 for ops it treats as free (ReLU, sigmoid,
    copies, views, concatenation)."""
    op = func.overloadpacket
    first_out = next(_tensors(out), None)
    if first_out is None:
        return 0
    if op in _BINARY:
        return first_out.numel()
    if op in _BATCH_NORM:
        return first_out.numel()
    if op in _WITH_BIAS:  # convolution/linear(input, weight, bias, ...); addmm/baddbmm(bias, a, b) always add
        bias = (args[2] if len(args) > 2 else kwargs.get("bias")) if op in _CONV_LINEAR else args[0]
        return first_out.numel() if bias is not None else 0
    if op in _POOL:
        kernel = args[1] if len(args) > 1 else kwargs["kernel_size"]
        kernel = [kernel] if isinstance(kernel, int) else list(kernel)
        if len(kernel) == 1:
            kernel = kernel * _POOL[op]
        return math.prod(kernel) * first_out.numel()
    if op in _REDUCE:
        return args[0].numel()
    if op in _SOFTMAX:
        return 5 * first_out.numel()
    return 0


class _ElementwiseCounter(TorchDispatchMode):
    """The "+ew" FLOPs of architecture.md 0.1: tf.profiler's rules for the ops a 2-MAC count leaves out.

    Per op: 1 FLOP per output element for add / sub / mul / div (and tf's other binary and simple unary ops), for
    a conv's or matmul's bias and for BatchNorm (after folding, BN is a bias add); kernel area x output elements for
    max and average pooling; one per input element for mean and sum (so also global average pooling); 5 per element
    for softmax. ReLU, ReLU6, sigmoid, copies, views and concatenation are free, as in tf.profiler.

    Only ops that touch the example input, directly or through earlier results, are counted. Weight-only work,
    e.g. folding BN's running statistics into a weight matrix inside forward (DBoF's context gates in eval mode:
    4096^2 multiplies), is done once at deployment and is not a per-example cost.
    """

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.flops = 0
        self._from_input = WeakIdKeyDictionary()
        for t in inputs:
            self._from_input[t] = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(t in self._from_input for t in _tensors((args, kwargs))):
            self.flops += _elementwise_flops(func, args, kwargs, out)
            for t in _tensors(out):
                self._from_input[t] = True
        return out


def _run_counted(model: nn.Module, args: tuple, kwargs: dict, device: torch.device | None) -> tuple[int, int]:
    """(2-MAC FLOPs, +ew FLOPs) of one forward. device=None runs the model where it is; otherwise parameters,
    buffers and inputs are replaced by zero (or meta) tensors on `device`."""

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or device is None:
            return t
        return torch.zeros_like(t, device=device)

    args = tuple(move(a) for a in args)
    kwargs = {k: move(v) for k, v in kwargs.items()}
    state = None
    if device is not None:
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        state = {name: move(t) for name, t in named}
    inputs = list(_tensors((args, kwargs)))
    with torch.no_grad(), FlopCounterMode(display=False) as macs, _ElementwiseCounter(inputs) as ew:
        if state is None:
            model(*args, **kwargs)
        else:
            torch.func.functional_call(model, state, args, kwargs)
    return macs.get_total_flops(), ew.flops


def _measure(model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
    was_training = model.training
    model.eval()  # inference graph: BN uses running statistics, so batch 1 is legal, and dropout is off
    try:
        try:
            return _run_counted(model, args, kwargs, torch.device("meta"))
        except (NotImplementedError, RuntimeError):
            # No meta kernel, or a data-dependent shape / .item(). Real arithmetic, on zeros: slow for the video
            # models but correct. A model with meta weights gets zero weights on the CPU for the duration.
            tensors = [*model.parameters(), *model.buffers()]
            if tensors and not any(t.is_meta for t in tensors):
                device = tensors[0].device
                args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
                kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                return _run_counted(model, args, kwargs, None)
            return _run_counted(model, args, kwargs, torch.device("cpu"))
    finally:
        model.train(was_training)


def count_flops(
    model: nn.Module, example_input: torch.Tensor, *, include_elementwise: bool = False, **forward_kwargs
) -> int:
    """FLOPs of `model(example_input, **forward_kwargs)` in eval mode; pass a batch-1 input for per-example cost.

    2 per multiply-accumulate of every conv and matmul (FlopCounterMode). include_elementwise=True adds the
    tf.profiler-style cheap ops ("+ew", see `_ElementwiseCounter`). `model` may be any module, so a sub-part is
    counted by passing it with the input it sees, e.g. `count_flops(model.branches[0], pooled)`. Runs on meta
    tensors (no arithmetic); neither the model's weights nor its train/eval mode change.
    """
    macs, ew = _measure(model, (example_input,), forward_kwargs)
    return macs + ew if include_elementwise else macs


class _PassThrough(nn.Module):
    """Stands in for a base whose output is given: `model(h)` then costs only the branches and the ensembler."""

    def forward(self, x: torch.Tensor, **inputs) -> torch.Tensor:
        return x


def model_size_report(name: str, **overrides) -> dict:
    """Parameters and FLOPs of the named model (video_ens.models.create_model), measured as the paper does.

    The input follows the model's `input_spec["kind"]`:
    * "image" (ResNet): the whole model on 1 x 3 x size x size.
    * "clip" (S3D-G): the whole model on 1 x 3 x frames x size x size (paper: 64 x 224^2).
    * "features" (DBoF): only the video-level part, i.e. the branches and the ensembler, on the base's pooled
      output (1, K). The frame-level base runs once per frame and the paper leaves it out (architecture.md 3.5);
      its cost is reported separately as the marginal FLOPs of one more frame (base at 2 frames minus 1 frame).

    Returns a dict with name, kind, counted (what the FLOPs cover), input (shape), params (BN folded),
    params_unfolded (gamma + beta), flops (2 MAC), flops_ew (+ew) and, for "features", frame_flops and
    frame_flops_ew.
    """
    from . import create_model  # here, not at module level: video_ens.models imports every family

    with torch.device("meta"):
        model = create_model(name, **overrides)
    spec = model.input_spec
    kind = spec.get("kind")
    report: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "params": count_params(model),
        "params_unfolded": count_params(model, fold_bn=False),
    }
    meta = torch.device("meta")
    if kind == "image":
        x = torch.empty(1, 3, spec["size"], spec["size"], device=meta)
        report["counted"] = "whole model"
    elif kind == "clip":
        x = torch.empty(1, 3, spec["frames"], spec["size"], spec["size"], device=meta)
        report["counted"] = "whole model"
    elif kind == "features":
        frames = [torch.empty(1, t, spec["dim"], device=meta) for t in (1, 2)]
        one, two = (_measure(model.base, (f,), {}) for f in frames)
        report["frame_flops"] = two[0] - one[0]
        report["frame_flops_ew"] = sum(two) - sum(one)
        model.eval()
        with torch.no_grad():
            pooled = model.base(frames[0])  # (1, K) on meta: only its shape matters
        x = torch.empty_like(pooled)
        model.base = _PassThrough()  # this private copy only
        report["counted"] = "video level: branches + ensembler on the pooled base output (frame-level part excluded)"
    else:
        raise ValueError(f"model {name!r} has input_spec kind {kind!r}; model_size_report knows image, clip, features")
    macs, ew = _measure(model, (x,), {})
    report["input"] = list(x.shape)
    report["flops"] = macs
    report["flops_ew"] = macs + ew
    return report
