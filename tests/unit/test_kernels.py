"""The Triton kernels against their references (video_ens/kernels/reference.py): forward and every gradient, at
fp32, bf16 and fp16, on odd shapes, masked lengths and both 3-D layouts; gradcheck in float64; and the `impl`
dispatch rules.

On CPU the kernels run in Triton's interpreter: the test command (tools/test.sh) exports TRITON_INTERPRET=1 before
Python starts. Without it and without a GPU, or without triton, the kernel tests skip with the reason.

Tolerance. For each output and gradient, with ref32 the reference run in fp32 on the same (rounded) inputs:
    max |kernel - ref32| <= 2 * max |reference at the dtype - ref32| + ULPS[dtype] * eps(dtype) * max |ref32|
i.e. twice PyTorch's own error at that dtype, measured in the test on the same inputs, plus a floor for outputs
that PyTorch happens to get exactly (the reference computes in fp32 and rounds once, e.g. SWAP's gradients, or any
fp32 run, where PyTorch's error is 0 by construction). Measured worst cases over 3 seeds, in eps * max |ref32|:
fp32 2.5 (floor 8); bf16 0.92 (floor 1); fp16 0.51 (floor 1). The bf16 floor is a full ulp because the interpreter
converts fp32 -> bf16 by truncation (triton/runtime/interpreter.py `cast_impl`), where a GPU rounds to nearest:
interpreted bf16 stores are off by up to 1 ulp instead of 0.5.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import video_ens.kernels as K
from video_ens.kernels import (
    context_gate,
    context_gate_reference,
    feature_gate,
    feature_gate_reference,
    gate_epilogue,
    gate_epilogue_reference,
    runtime,
    swap_pool,
    swap_pool_reference,
)

# The modules, not the public functions of the same name that video_ens.kernels exports.
swap_mod, cg_mod, fg_mod = (
    importlib.import_module(f"video_ens.kernels.{n}") for n in ("swap", "context_gate", "feature_gate")
)


def _kernel_skip_reason() -> str | None:
    # Checked before triton is imported: the interpreter must be chosen first.
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if not interp and not torch.cuda.is_available():
        return (
            "Triton kernels need a GPU, or TRITON_INTERPRET=1 in the environment before Python starts (tools/test.sh)"
        )
    if not K.triton_available():
        return "triton does not import: install it with `pip install -e .[triton]`"
    return None


SKIP = _kernel_skip_reason()
needs_kernels = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULPS = {torch.float32: 8, torch.bfloat16: 1, torch.float16: 1}


def _check(name: str, got: torch.Tensor, ref32: torch.Tensor, ref_low: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref32.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref32.shape)}"
    assert got.dtype == ref_low.dtype, f"{name}: dtype {got.dtype} != reference's {ref_low.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = ref32.abs().max().item() if ref32.numel() else 0.0
    err = (got.double() - ref32.double()).abs().max().item() if got.numel() else 0.0
    torch_err = (ref_low.double() - ref32.double()).abs().max().item() if got.numel() else 0.0
    tol = 2 * torch_err + ULPS[dtype] * torch.finfo(dtype).eps * scale
    assert err <= tol, (
        f"{name} at {dtype}: max error {err:.3g} > tolerance {tol:.3g} "
        f"(PyTorch's own error {torch_err:.3g}, max |ref| {scale:.3g})"
    )


def _compare(op, ref, inputs: list, dtype: torch.dtype, seed: int = 0) -> None:
    """Run op and ref at `dtype` and ref in fp32 on the same rounded inputs; compare the output and every gradient.

    `inputs`: fp32 tensors (cast to dtype, each gets a gradient) or anything else (passed as is).
    """
    floats = [isinstance(t, torch.Tensor) and t.is_floating_point() for t in inputs]
    rounded = [t.to(DEVICE, dtype) if f else t for t, f in zip(inputs, floats, strict=True)]

    def leaves(to32: bool):
        return [
            (t.float() if to32 else t.clone()).requires_grad_() if f else t
            for t, f in zip(rounded, floats, strict=True)
        ]  # clone / float() keep the memory format

    got_in, low_in, r32_in = leaves(False), leaves(False), leaves(True)
    got = op(*got_in)
    low = ref(*low_in)
    r32 = ref(*r32_in)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, got.dtype)
    got.backward(g)
    low.backward(g.to(low.dtype))
    r32.backward(g.float())
    _check("output", got, r32, low, dtype)
    for i, f in enumerate(floats):
        if f:
            _check(f"grad of input {i}", got_in[i].grad, r32_in[i].grad, low_in[i].grad, dtype)


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------------------------------------- SWAP


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape, lengths",
    [
        ((5, 123, 123), [123, 60, 1, 0, 200]),  # full, partial, one frame, none (-> zeros), more than T (-> T)
        ((4, 7, 37), [7, 3, 1, 0]),
        ((3, 9, 300), None),  # no lengths: all frames; D over one 256-wide block on a GPU
    ],
)
def test_swap_matches_reference(shape, lengths, dtype):
    lens = torch.tensor(lengths) if lengths is not None else None
    _compare(
        lambda x: swap_pool(x, lens, impl="triton"),
        lambda x: swap_pool_reference(x, lens),
        [_randn(*shape)],
        dtype,
    )


@needs_kernels
def test_swap_nonnegative_inputs_as_in_dbof():
    # After ReLU6 and the context gate DBoF's frames are >= 0 (f = sum x^2 / sum x), many exactly 0.
    x = torch.relu(_randn(4, 25, 64, seed=1))
    _compare(
        lambda x: swap_pool(x, torch.tensor([25, 10, 3, 1]), impl="triton"),
        lambda x: swap_pool_reference(x, torch.tensor([25, 10, 3, 1])),
        [x],
        torch.bfloat16,
    )


@needs_kernels
def test_swap_padding_and_zeros():
    """Padded frames are never read (NaN there changes nothing), get zero gradient; length 0 gives 0 and 0 grads;
    exact zeros get gradient 0 (sign(0) = 0, as torch.abs's backward) and an all-zero column gives f = 0."""
    x = _randn(3, 6, 40, seed=2).to(DEVICE)
    lengths = torch.tensor([6, 2, 0])
    x[1, 2:] = float("nan")
    x[2] = float("inf")
    x[0, :, 5] = 0.0  # a column of zeros: sum |x| = 0, f = 0 / eps = 0
    x[0, 3, :7] = 0.0
    xk = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    yk = swap_pool(xk, lengths, impl="triton")
    yr = swap_pool_reference(xr, lengths)
    g = _randn(*yk.shape, seed=3).to(DEVICE)
    yk.backward(g)
    yr.backward(g)
    assert torch.isfinite(yk).all() and torch.isfinite(xk.grad).all()
    torch.testing.assert_close(yk, yr)
    torch.testing.assert_close(xk.grad, xr.grad)
    assert (yk[2] == 0).all() and (yk[0, 5] == 0).all()
    assert (xk.grad[1, 2:] == 0).all() and (xk.grad[2] == 0).all()
    assert (xk.grad[0, :, 5] == 0).all() and (xk.grad[0, 3, :7] == 0).all()


@needs_kernels
def test_swap_strided_input_and_lengths_dtypes():
    base = _randn(2, 37, 9, seed=4)  # (B, D, T) in memory
    x = base.transpose(1, 2)  # (B, T, D) view with stride_d = T: the kernel takes any strides
    for lengths in (torch.tensor([9, 4], dtype=torch.int32), torch.tensor([9, 4], dtype=torch.int64)):
        torch.testing.assert_close(swap_pool(x, lengths, impl="triton"), swap_pool_reference(x, lengths))
    with pytest.raises(TypeError, match="integer"):
        swap_pool(x, torch.tensor([9.0, 4.0]), impl="triton")
    with pytest.raises(ValueError, match="lengths must have shape"):
        swap_pool(x, torch.tensor([9, 4, 1]), impl="triton")


@needs_kernels
def test_swap_saves_no_frame_sized_intermediate():
    """Backward keeps x (the input itself), lengths, f and S: nothing else of size B*T*D."""
    x = _randn(3, 8, 20, seed=5).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swap_pool(x, torch.tensor([8, 5, 2]), impl="triton")
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]
    assert sum(t.numel() for t in saved) <= x.numel() + 3 + 2 * 3 * 20


# --------------------------------------------------------------------------------------------------- context gate


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, bias", [((129, 123), True), ((300, 37), True), ((20, 300), False)])
def test_context_gate_matches_reference(shape, bias, dtype):
    m, d = shape
    # weight ~ 1/sqrt(d) keeps the gates' pre-activations O(1), where the sigmoid is not saturated
    inputs = [_randn(m, d), _randn(d, d, seed=1, scale=d**-0.5), _randn(d, seed=2) if bias else None]
    _compare(
        lambda x, w, b: context_gate(x, w, b, impl="triton"),
        context_gate_reference,
        inputs,
        dtype,
    )


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(129, 123), (2, 7, 300)])
def test_gate_epilogue_matches_reference(shape, dtype):
    _compare(
        lambda x, z: gate_epilogue(x, z, impl="triton"),
        gate_epilogue_reference,
        [_randn(*shape), _randn(*shape, seed=1, scale=3.0)],
        dtype,
    )


@needs_kernels
def test_gate_epilogue_extremes_and_mixed_dtypes():
    # |z| = 100 saturates the sigmoid without overflow (exp(-|z|) only); bf16 x with fp32 z promotes like torch.
    x = _randn(4, 33, seed=3).to(DEVICE, torch.bfloat16)
    z = (_randn(4, 33, seed=4) * 100).to(DEVICE)
    xk, zk = x.clone().requires_grad_(), z.clone().requires_grad_()
    xr, zr = x.clone().requires_grad_(), z.clone().requires_grad_()
    yk, yr = gate_epilogue(xk, zk, impl="triton"), gate_epilogue_reference(xr, zr)
    assert yk.dtype == yr.dtype == torch.float32
    yk.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(yk, yr)
    assert xk.grad.dtype == torch.bfloat16 and zk.grad.dtype == torch.float32
    torch.testing.assert_close(xk.grad, xr.grad)
    torch.testing.assert_close(zk.grad, zr.grad)


@needs_kernels
def test_context_gate_under_autocast():
    """Under autocast the GEMMs run in bf16 like F.linear's, the epilogue in fp32; fp32 x keeps fp32 out and grads."""
    x = _randn(40, 48).to(DEVICE).requires_grad_()
    w = _randn(48, 48, seed=1, scale=48**-0.5).to(DEVICE).requires_grad_()
    b = _randn(48, seed=2).to(DEVICE).requires_grad_()
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = context_gate(x, w, b, impl="triton")
        yr = context_gate_reference(xr, wr, br)
    assert y.dtype == yr.dtype == torch.float32
    y.sum().backward()
    yr.sum().backward()
    # both multiply bf16-rounded operands: within a few bf16 ulps of each other
    torch.testing.assert_close(y, yr, atol=2e-2, rtol=2e-2)
    for a, r in ((x, xr), (w, wr), (b, br)):
        assert a.grad.dtype == r.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, r.grad, atol=5e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------------- feature gate


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("shape", [(3, 37, 3, 5, 7), (1, 8, 4, 16, 16)])  # odd sizes; S = 1024 splits the reduction
def test_feature_gate_matches_reference(shape, channels_last, dtype):
    x = _randn(*shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    c = shape[1]
    inputs = [x, _randn(c, c, 1, 1, 1, seed=1, scale=c**-0.5)]
    _compare(lambda x, w: feature_gate(x, w, impl="triton"), feature_gate_reference, inputs, dtype)


@needs_kernels
def test_feature_gate_layouts():
    """y and dx keep x's layout; a 2-D weight works; a grad in the other layout and a non-dense x are handled."""
    w = _randn(24, 24, seed=1, scale=0.2).to(DEVICE)
    x = _randn(2, 24, 3, 5, 6).to(DEVICE).to(memory_format=torch.channels_last_3d).requires_grad_()
    y = feature_gate(x, w, impl="triton")
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    g = _randn(*y.shape, seed=2).to(DEVICE)  # contiguous grad for a channels-last output
    y.backward(g)
    assert x.grad.is_contiguous(memory_format=torch.channels_last_3d)
    xr = x.detach().clone().requires_grad_()
    feature_gate_reference(xr, w).backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    xs = _randn(2, 24, 6, 5, 6).to(DEVICE)[:, :, ::2]  # neither layout: copied to contiguous
    torch.testing.assert_close(feature_gate(xs, w, impl="triton"), feature_gate_reference(xs, w))


@needs_kernels
def test_feature_gate_saves_no_activation_sized_intermediate():
    x = _randn(2, 8, 3, 4, 5).requires_grad_()
    w = _randn(8, 8, 1, 1, 1, seed=1).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        feature_gate(x, w, impl="triton")
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]


@needs_kernels
def test_degenerate_shapes():
    """Sizes of 1 (which Triton specializes as constants on a GPU) and empty inputs go through every op."""
    cases = [
        (lambda x: swap_pool(x, impl="triton"), swap_pool_reference, [_randn(1, 1, 1)]),
        (
            lambda x: swap_pool(x, torch.tensor([1, 0]), impl="triton"),
            lambda x: swap_pool_reference(x, torch.tensor([1, 0])),
            [_randn(2, 1, 5)],
        ),
        (lambda x: swap_pool(x, impl="triton"), swap_pool_reference, [_randn(2, 0, 5)]),
        (
            lambda x, w, b: context_gate(x, w, b, impl="triton"),
            context_gate_reference,
            [_randn(1, 1), _randn(1, 1), _randn(1)],
        ),
        (lambda x, z: gate_epilogue(x, z, impl="triton"), gate_epilogue_reference, [_randn(5), _randn(5, seed=1)]),
        (lambda x, w: feature_gate(x, w, impl="triton"), feature_gate_reference, [_randn(1, 1, 1, 1, 1), _randn(1, 1)]),
    ]
    for op, ref, inputs in cases:
        _compare(op, ref, inputs, torch.float32)


# ------------------------------------------------------------------------------------------------------ gradcheck


def _f64(*shape, seed=0, scale=1.0):
    return (_randn(*shape, seed=seed) * scale).double().to(DEVICE).requires_grad_()


GRADCHECK_TOL = dict(rtol=1e-5, atol=1e-7)


def test_gradcheck_references():
    """The specs in float64 (they accumulate in fp64 for fp64 inputs), full Jacobians."""
    lengths = torch.tensor([5, 2, 0])
    check = lambda fn, inputs: torch.autograd.gradcheck(fn, inputs, **GRADCHECK_TOL)
    assert check(lambda x: swap_pool_reference(x, lengths), (_f64(3, 5, 6),))
    assert check(context_gate_reference, (_f64(4, 6), _f64(6, 6, seed=1), _f64(6, seed=2)))
    assert check(gate_epilogue_reference, (_f64(4, 6), _f64(4, 6, seed=1)))
    assert check(feature_gate_reference, (_f64(2, 5, 2, 3, 3), _f64(5, 5, 1, 1, 1, seed=1)))


@needs_kernels
@pytest.mark.parametrize("op", ["swap_pool", "context_gate", "gate_epilogue", "feature_gate", "feature_gate_cl"])
def test_gradcheck_triton(op):
    """The kernels run in fp64 with fp64 accumulation (in the interpreter and on a GPU), so gradcheck applies.

    fast_mode checks the Jacobian along random directions: a few calls instead of two per input element (the full
    check took 31 s in the interpreter, where every launch costs milliseconds). The tolerances are tighter than
    gradcheck's defaults (rtol 1e-3), which let a feature-gate backward with its mean term off by 1% pass; at
    these, 0.1% fails. fp64 central differences are good to ~1e-10 here.
    """
    check = lambda fn, inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=True, **GRADCHECK_TOL)
    if op == "swap_pool":
        lengths = torch.tensor([5, 2, 0])
        assert check(lambda x: swap_pool(x, lengths, impl="triton"), (_f64(3, 5, 6),))
    elif op == "context_gate":
        assert check(
            lambda x, w, b: context_gate(x, w, b, impl="triton"), (_f64(4, 6), _f64(6, 6, seed=1), _f64(6, seed=2))
        )
    elif op == "gate_epilogue":
        assert check(lambda x, z: gate_epilogue(x, z, impl="triton"), (_f64(4, 6), _f64(4, 6, seed=1)))
    else:
        x = _f64(2, 5, 2, 3, 3)
        if op == "feature_gate_cl":
            x = x.detach().to(memory_format=torch.channels_last_3d).requires_grad_()
        assert check(lambda x, w: feature_gate(x, w, impl="triton"), (x, _f64(5, 5, 1, 1, 1, seed=1)))


# ------------------------------------------------------------------------------------------------ GPU compilation

# Compiles every kernel for an H100 (sm_90) without a GPU, with Triton's bundled ptxas, in a process without the
# interpreter: the interpreter runs kernels as NumPy and accepts code the GPU compiler rejects. It also checks the
# one property the kernels' speed rests on: every (rows x contiguous) tile is loaded and stored as 16-byte vectors
# (ld.global.v4.b32: 8 bf16 values per instruction), not element by element.
_SM90_SCRIPT = """
import importlib, re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

K = {n: importlib.import_module(f"video_ens.kernels.{n}")._kernels() for n in ("swap", "context_gate", "feature_gate")}
FG = importlib.import_module("video_ens.kernels.feature_gate")
NODIV = ("T", "M", "B", "eps", "scale")  # runtime values not assumed to be multiples of 16


def ptx(kernel, sig, consts):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    names = fn.arg_names
    # 16-byte aligned pointers and sizes/strides that are multiples of 16, as the launcher specializes them at the
    # paper's shapes (D = 4096, S = 100352, C = 192).
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if n not in consts and n not in NODIV}
    sig = {n: "constexpr" if n in consts else sig[n] for n in names}
    consts = {(names.index(k),): v for k, v in consts.items()}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


bf, f32, i32, acc = "*bf16", "*fp32", "i32", tl.float32
swap_sig = dict(x_ptr=bf, len_ptr="*i64", T=i32, D=i32, stride_b=i32, stride_t=i32, stride_d=i32)
gate_sig = dict(x_ptr=bf, z_ptr=bf, b_ptr=f32, M=i32, D=i32, stride_xm=i32, stride_zm=i32)
gate_c = dict(HAS_BIAS=True, ACC=acc, BLOCK_M=16, BLOCK_D=256, ROWS=256)
cases = [  # name, kernel, signature, constexprs, (vector tile loads, vector tile stores) at least
    ("swap_fwd", K["swap"].fwd, dict(swap_sig, out_ptr=bf, f_ptr=f32, den_ptr=f32, eps="fp32"),
     dict(stride_d=1, HAS_LENGTHS=True, ACC=acc, BLOCK_T=32, BLOCK_D=128), (1, 0)),
    ("swap_bwd", K["swap"].bwd, dict(swap_sig, g_ptr=bf, f_ptr=f32, den_ptr=f32, gx_ptr=bf, stride_gb=i32,
     stride_gd=i32), dict(stride_d=1, stride_gd=1, HAS_LENGTHS=True, ACC=acc, BLOCK_T=32, BLOCK_D=128), (1, 1)),
    ("gate_fwd", K["context_gate"].fwd, dict(gate_sig, y_ptr=bf), gate_c, (2, 1)),
    ("gate_bwd", K["context_gate"].bwd, dict(gate_sig, g_ptr=bf, gx_ptr=bf, gz_ptr=bf, db_ptr=f32, stride_gm=i32),
     dict(gate_c, WANT_DB=True), (3, 2)),
]
for cl, (bc, bs) in FG.BLOCKS.items():
    unit = dict(stride_c=1) if cl else dict(stride_s=1)
    fg_sig = dict(x_ptr=bf, C=i32, S=i32, stride_c=i32, stride_s=i32)
    cases += [
        (f"fg_reduce_cl{int(cl)}", K["feature_gate"].reduce, dict(fg_sig, g_ptr=bf, out_ptr=f32, B=i32, chunk=i32,
         scale="fp32"), dict(unit, PRODUCT=True, ACC=acc, BLOCK_C=bc, BLOCK_S=bs), (2, 0)),
        (f"fg_broadcast_cl{int(cl)}", K["feature_gate"].broadcast, dict(fg_sig, scale_ptr=f32, shift_ptr=f32,
         y_ptr=bf), dict(unit, HAS_SHIFT=True, ACC=acc, BLOCK_C=bc, BLOCK_S=bs), (1, 1)),
    ]
for name, kernel, sig, consts, (loads, stores) in cases:
    code = ptx(kernel, sig, consts)
    got = (len(re.findall(r"ld\\.global\\.v4\\.b32", code)), len(re.findall(r"st\\.global\\.v4\\.b32", code)))
    assert got[0] >= loads and got[1] >= stores, f"{name}: {got} 16-byte vector loads/stores, expected >= {(loads, stores)}"
    print(name, "ok")
"""


@pytest.mark.skipif(not K.triton_available(), reason="triton does not import")
def test_kernels_compile_for_sm90_with_vector_loads(tmp_path):
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    out = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" ok") == 8, out.stdout


# ------------------------------------------------------------------------------------------------------- dispatch


def _ops_on(x3, x2, x5):
    return [
        ("swap_pool", swap_mod, lambda impl: swap_pool(x3, impl=impl), lambda: swap_pool_reference(x3)),
        ("context_gate", cg_mod, lambda impl: context_gate(x2, torch.eye(6), impl=impl),
         lambda: context_gate_reference(x2, torch.eye(6))),
        ("gate_epilogue", cg_mod, lambda impl: gate_epilogue(x2, x2, impl=impl), lambda: gate_epilogue_reference(x2, x2)),
        ("feature_gate", fg_mod, lambda impl: feature_gate(x5, torch.eye(3), impl=impl),
         lambda: feature_gate_reference(x5, torch.eye(3))),
    ]  # fmt: skip


OPS = _ops_on(torch.randn(2, 4, 6), torch.randn(5, 6), torch.randn(2, 3, 2, 2, 2))


@pytest.mark.parametrize("name, mod, op, ref", OPS, ids=[o[0] for o in OPS])
def test_auto_on_cpu_runs_the_reference(name, mod, op, ref, monkeypatch):
    def no_kernels():
        raise AssertionError(f"{name}(impl='auto') built Triton kernels for a CPU tensor")

    monkeypatch.setattr(mod, "_kernels", no_kernels)
    torch.testing.assert_close(op("auto"), ref(), rtol=0, atol=0)
    torch.testing.assert_close(op("reference"), ref(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        op("fused")


@pytest.mark.parametrize("name, mod, op, ref", OPS, ids=[o[0] for o in OPS])
def test_triton_without_triton_raises(name, mod, op, ref, monkeypatch):
    monkeypatch.setattr(runtime, "_import_triton", lambda: "ImportError: triton is blocked for this test")
    with pytest.raises(RuntimeError, match="needs the triton package"):
        op("triton")
    torch.testing.assert_close(op("auto"), ref(), rtol=0, atol=0)  # auto quietly takes the reference


@pytest.mark.skipif(not K.triton_available(), reason="triton does not import")
def test_triton_on_cpu_without_interpreter_raises():
    code = textwrap.dedent(
        """
        import torch
        from video_ens.kernels import swap_pool
        try:
            swap_pool(torch.randn(2, 3, 4), impl="triton")
        except RuntimeError as err:
            assert "TRITON_INTERPRET=1" in str(err), err
            print("raised")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "raised"
