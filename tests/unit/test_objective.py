"""EnsembleLoss against hand-computed values, PyTorch's own losses and the paper's Appendix A.1 identity."""

import math

import pytest
import torch
import torch.nn.functional as F

from video_ens.objective import EnsembleLoss


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_ensembling_softmax_ce_hand_computed():
    # N=2 branches, B=1, C=2, label 0, lambda=0.5. Every term written out with math.
    z = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])
    p1, p2 = _softmax([1.0, 0.0]), _softmax([0.0, 2.0])
    pens0 = (p1[0] + p2[0]) / 2
    lam = 0.5
    branch = [(1 - lam) * -math.log(p1[0]), (1 - lam) * -math.log(p2[0])]
    ens = 2 * lam * -math.log(pens0)
    out = EnsembleLoss("ensembling", lam, "softmax_ce")(z, torch.tensor([0]))
    assert out["branch"].tolist() == pytest.approx(branch, rel=1e-6)
    assert out["ensemble"].item() == pytest.approx(ens, rel=1e-6)
    assert out["loss"].item() == pytest.approx(sum(branch) + ens, rel=1e-6)
    assert out["probs"][0].tolist() == pytest.approx([pens0, 1 - pens0], rel=1e-6)


def test_codistillation_softmax_ce_hand_computed():
    z = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])
    p1, p2 = _softmax([1.0, 0.0]), _softmax([0.0, 2.0])
    pens = [(a + b) / 2 for a, b in zip(p1, p2, strict=True)]
    mu = 2.0
    distill = [mu * -sum(q * math.log(p) for q, p in zip(pens, pi, strict=True)) for pi in (p1, p2)]
    ens = 2 * -math.log(pens[1])
    out = EnsembleLoss("codistillation", mu, "softmax_ce")(z, torch.tensor([1]))
    assert out["branch"].tolist() == pytest.approx(distill, rel=1e-6)
    assert out["ensemble"].item() == pytest.approx(ens, rel=1e-6)


def test_sigmoid_bce_hand_computed_multi_hot():
    # N=2, B=1, C=2, multi-hot target [1, 0], ensembling lambda=0.25.
    z = torch.tensor([[[0.5, -1.0]], [[2.0, 1.0]]])
    sig = lambda v: 1 / (1 + math.exp(-v))
    p = [[sig(0.5), sig(-1.0)], [sig(2.0), sig(1.0)]]
    bce = lambda g, q: -sum(gc * math.log(qc) + (1 - gc) * math.log(1 - qc) for gc, qc in zip(g, q, strict=True))
    pens = [(p[0][c] + p[1][c]) / 2 for c in range(2)]
    g = [1.0, 0.0]
    lam = 0.25
    out = EnsembleLoss("ensembling", lam, "sigmoid_bce")(z, torch.tensor([g]))
    assert out["branch"].tolist() == pytest.approx([(1 - lam) * bce(g, p[0]), (1 - lam) * bce(g, p[1])], rel=1e-6)
    assert out["ensemble"].item() == pytest.approx(2 * lam * bce(g, pens), rel=1e-6)


@pytest.mark.parametrize("inputs", ["logits", "probs"])
@pytest.mark.parametrize("lam", [1.0, 0.5, 0.0, -0.5, -1.5])
def test_appendix_a1_l2_ensembling_equals_codistillation(lam, inputs):
    """Paper Appendix A.1: with L2 loss and the mean ensembler, lambda-ensembling == (1-lambda)-co-distillation,
    in value and in gradient (the stop-gradient does not change the gradient because sum_i (p_i - <p>) = 0)."""
    gen = torch.Generator().manual_seed(0)
    n, b, c = 3, 5, 7
    raw = torch.randn(n, b, c, generator=gen, dtype=torch.float64)
    if inputs == "probs":
        raw = torch.softmax(raw, -1)
    target = torch.randint(0, c, (b,), generator=gen)

    def value_and_grad(structure, weight):
        x = raw.clone().float().requires_grad_(True)
        out = EnsembleLoss(structure, weight, "l2", inputs=inputs)(x, target)
        out["loss"].backward()
        return out["loss"].item(), x.grad

    v_ens, g_ens = value_and_grad("ensembling", lam)
    v_cod, g_cod = value_and_grad("codistillation", 1.0 - lam)
    assert v_ens == pytest.approx(v_cod, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_ens, g_cod, rtol=1e-5, atol=1e-6)


def test_lambda_zero_is_independent_losses():
    gen = torch.Generator().manual_seed(1)
    n, b, c = 3, 4, 6
    z = torch.randn(n, b, c, generator=gen)
    t = torch.randint(0, c, (b,), generator=gen)
    out = EnsembleLoss("ensembling", 0.0, "softmax_ce", label_smoothing=0.1)(z, t)
    expect = torch.stack([F.cross_entropy(z[i], t, label_smoothing=0.1) for i in range(n)])
    torch.testing.assert_close(out["branch"], expect)
    assert out["ensemble"].item() == 0.0

    m = (torch.rand(b, c, generator=gen) > 0.5).float()
    out = EnsembleLoss("ensembling", 0.0, "sigmoid_bce")(z, m)
    expect = torch.stack([F.binary_cross_entropy_with_logits(z[i], m, reduction="sum") / b for i in range(n)])
    torch.testing.assert_close(out["branch"], expect)


def test_lambda_one_is_the_ensemble_loss_alone():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 5, generator=gen)
    t = torch.randint(0, 5, (3,), generator=gen)
    out = EnsembleLoss("ensembling", 1.0, "softmax_ce")(z, t)
    pens = torch.softmax(z, -1).mean(0)
    assert out["branch"].abs().max().item() == 0.0
    torch.testing.assert_close(out["ensemble"], 2 * F.nll_loss(pens.log(), t))


def test_codistillation_stop_gradient():
    """The distillation term sends no gradient through p_ens: d/dz_i [mu l(sg(p_ens), p_i)] = mu (p_i - p_ens) / B
    exactly (softmax-CE gradient with a constant target); and the ensemble term's gradient is unaffected."""
    gen = torch.Generator().manual_seed(3)
    n, b, c, mu = 2, 4, 5, 2.0
    z = torch.randn(n, b, c, generator=gen, requires_grad=True)
    t = torch.randint(0, c, (b,), generator=gen)
    out = EnsembleLoss("codistillation", mu, "softmax_ce")(z, t)
    (g_branch,) = torch.autograd.grad(out["branch"].sum(), z, retain_graph=True)
    p = torch.softmax(z.detach(), -1)
    expect = mu * (p - p.mean(0, keepdim=True)) / b
    torch.testing.assert_close(g_branch, expect, rtol=1e-5, atol=1e-7)
    # Without the stop-gradient the sum of distillation gradients over branches would not vanish like this:
    # with a constant target sum_i (p_i - p_ens) = 0, so the branch terms push the branches together, nothing else.
    torch.testing.assert_close(g_branch.sum(0), torch.zeros(b, c), atol=1e-6, rtol=0)
    (g_ens,) = torch.autograd.grad(out["ensemble"], z)
    zz = z.detach().clone().requires_grad_(True)
    ref = n * F.nll_loss(torch.softmax(zz, -1).mean(0).log(), t)
    (g_ref,) = torch.autograd.grad(ref, zz)
    torch.testing.assert_close(g_ens, g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("structure", ["ensembling", "codistillation"])
def test_single_branch_is_the_ordinary_loss(structure):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(1, 6, 9, generator=gen, requires_grad=True)
    t = torch.randint(0, 9, (6,), generator=gen)
    out = EnsembleLoss(structure, 0.7, "softmax_ce", label_smoothing=0.1)(z, t)
    ref = F.cross_entropy(z[0], t, label_smoothing=0.1)
    torch.testing.assert_close(out["loss"], ref)
    (g,) = torch.autograd.grad(out["loss"], z)
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g, g_ref)


def test_label_smoothing_sigmoid_targets():
    z = torch.zeros(1, 1, 2)
    out = EnsembleLoss("ensembling", 0.0, "sigmoid_bce", label_smoothing=0.2)(z, torch.tensor([[1.0, 0.0]]))
    # g = [0.9, 0.1]; p = 0.5 everywhere: l = -sum(g log .5 + (1-g) log .5) = 2 log 2
    assert out["loss"].item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_confident_branches_stay_finite_in_bf16():
    z = torch.tensor([[[3.0e4, -3.0e4, 0.0]], [[-3.0e4, 3.0e4, 0.0]]], dtype=torch.bfloat16, requires_grad=True)
    for loss in ("softmax_ce", "sigmoid_bce", "l2"):
        for structure, w in (("codistillation", 2.0), ("ensembling", -1.5)):
            tgt = torch.tensor([2]) if loss != "sigmoid_bce" else torch.tensor([[0.0, 0.0, 1.0]])
            out = EnsembleLoss(structure, w, loss, label_smoothing=0.1)(z, tgt)
            assert torch.isfinite(out["loss"]), (loss, structure)
            (g,) = torch.autograd.grad(out["loss"], z)
            assert torch.isfinite(g.float()).all(), (loss, structure)


def test_probability_inputs_with_exact_zeros_and_ones():
    p = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]], requires_grad=True)
    for loss in ("softmax_ce", "sigmoid_bce", "l2"):
        tgt = torch.tensor([2]) if loss != "sigmoid_bce" else torch.tensor([[0.0, 0.0, 1.0]])
        out = EnsembleLoss("codistillation", 2.0, loss, inputs="probs")(p, tgt)
        assert torch.isfinite(out["loss"])
        (g,) = torch.autograd.grad(out["loss"], p)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("loss", ["softmax_ce", "sigmoid_bce"])
@pytest.mark.parametrize("structure, weight", [("ensembling", 0.0), ("codistillation", 2.0)])
def test_saturated_probabilities_still_get_the_gradient_of_the_clamp_point(loss, structure, weight):
    """A positive class predicted at p = 3e-8 (below the 1e-7 clamp) and a negative at 1 - 1e-9: the gradient is
    that of a prediction sitting exactly at the clamp bound, not zero (a plain clamp's), so the class recovers."""
    crit = EnsembleLoss(structure, weight, loss, inputs="probs")
    if loss == "softmax_ce":
        sat, at_bound = [3e-8, 0.6, 0.4 - 3e-8], [1e-7, 0.6, 0.4 - 1e-7]
        tgt = torch.tensor([0])
    else:
        sat, at_bound = [3e-8, 0.5, 1 - 1e-9], [1e-7, 0.5, 1 - 1e-7]
        tgt = torch.tensor([[1.0, 0.0, 0.0]])
    grads = []
    for row in (sat, at_bound):
        p = torch.tensor([[row], [[0.3, 0.3, 0.4]]], dtype=torch.float32).requires_grad_()
        (g,) = torch.autograd.grad(crit(p, tgt)["loss"], p)
        grads.append(g)
    assert grads[0][0, 0, 0] < -1e5  # d(-log p)/dp at the clamp: about -1/1e-7 times the term's weight
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-3)


def test_probability_inputs_match_logit_inputs():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 4, generator=gen)
    m = (torch.rand(3, 4, generator=gen) > 0.5).float()
    a = EnsembleLoss("codistillation", 2.0, "sigmoid_bce")(z, m)
    b = EnsembleLoss("codistillation", 2.0, "sigmoid_bce", inputs="probs")(torch.sigmoid(z), m)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["probs"], b["probs"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(structure="distill", weight=1.0, loss="softmax_ce"), "structure"),
        (dict(structure="ensembling", weight=1.0, loss="ce"), "loss"),
        (dict(structure="ensembling", weight=float("nan"), loss="l2"), "weight"),
        (dict(structure="ensembling", weight=1.0, loss="l2", label_smoothing=1.0), "label_smoothing"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnsembleLoss(**kwargs)


def test_bad_targets_are_named():
    crit = EnsembleLoss("codistillation", 2.0, "softmax_ce")
    z = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="out of range"):
        crit(z, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="does not match"):
        crit(z, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\(N, B, C\)"):
        crit(torch.zeros(3, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("structure, weight", [("ensembling", -1.5), ("codistillation", 2.0)])
def test_truth_terms_are_each_heads_own_loss_against_the_labels(structure, weight):
    z = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(11)).requires_grad_()
    y = torch.randint(0, 7, (5,), generator=torch.Generator().manual_seed(12))
    out = EnsembleLoss(structure, weight, "softmax_ce")(z, y)
    want = torch.stack([F.cross_entropy(z[i], y) for i in range(3)]).detach()
    torch.testing.assert_close(out["branch_truth"], want)
    p_ens = torch.softmax(z.detach(), dim=-1).mean(0)
    torch.testing.assert_close(out["ensemble_truth"], F.nll_loss(p_ens.log(), y))
    assert not out["branch_truth"].requires_grad and not out["ensemble_truth"].requires_grad
