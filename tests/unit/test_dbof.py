"""DBoF: the paper's sizes, the MoE and context-gate maths, and independence from padding and batch composition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from video_ens.model_options import DBoFOptions
from video_ens.models import MODELS, create_model, dbof
from video_ens.models.ensemble import EnsembleNet
from video_ens.models.size import count_params

FEATURES = 1024 + 128


def tiny(name: str = "dbof_tiny", **overrides) -> EnsembleNet:
    torch.manual_seed(0)
    return create_model(name, **overrides)


def pad(x: torch.Tensor, frames: int, value: float = 0.0) -> torch.Tensor:
    """(B, T, D) -> (B, frames, D), extra frames filled with `value`."""
    return F.pad(x, (0, 0, 0, frames - x.shape[1]), value=value)


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode tests exercise the folding."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


# ---- sizes (architecture.md section 3) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, total, base, branch",
    [
        ("dbof", 229_093_358, 21_505_152, 207_588_206),
        ("dbof_ens2", 226_320_324, 21_505_152, 102_407_586),
    ],
)
def test_folded_parameter_counts_match_the_paper_rows(name, total, base, branch):
    with torch.device("meta"):
        model = create_model(name)
    assert count_params(model) == total
    assert count_params(model.base) == base
    assert [count_params(b) for b in model.branches] == [branch] * model.num_branches


@pytest.mark.parametrize("name, flops", [("dbof", 415_121_408), ("dbof_ens2", 409_560_000)])
def test_video_level_flops_match_the_paper_rows(name, flops):
    with torch.device("meta"):
        model = create_model(name).eval()
        pooled = torch.empty(1, 4096)  # one video's SWAP output
        frame = torch.empty(1, 1, FEATURES)  # one video of one frame
    with FlopCounterMode(display=False) as counter:
        for branch in model.branches:
            branch(pooled)
    assert counter.get_total_flops() == flops
    # The frame-level part the paper's count leaves out: cluster 9.44M + CG1 33.55M per frame.
    with FlopCounterMode(display=False) as counter:
        model.base(frame)
    assert counter.get_total_flops() == 2 * (1152 * 4096 + 4096 * 4096) == 42_991_616


def test_every_preset_builds_on_meta_with_named_submodules():
    for name in (n for n in MODELS if n.startswith("dbof")):
        with torch.device("meta"):
            model = create_model(name)
        assert model.output_type == "probs" and model.activation == "sigmoid", name
        assert model.input_spec["kind"] == "features" and model.input_spec["dim"] == FEATURES, name
        names = {n for n, _ in model.named_modules()}
        for expected in ("base.input_bn", "base.cluster", "base.cluster_bn", "base.context_gate.linear", "base.pool"):
            assert expected in names, (name, expected)
        for i in range(model.num_branches):
            for part in ("hidden", "hidden_bn", "context_gate.bn", "dropout", "moe.gates", "moe.experts"):
                assert f"branches.{i}.{part}" in names, (name, part)


def test_branch_width_rules():
    common = dict(num_classes=8, options=DBoFOptions(cluster_size=16, hidden_size=40, num_mixtures=4))
    pinned = DBoFOptions(cluster_size=16, hidden_size=40, num_mixtures=4, branch_hidden_size=12, branch_mixtures=1)
    with torch.device("meta"):
        by_ratio = dbof.build(num_branches=2, width_ratio=0.5, **common)
        by_default = dbof.build(num_branches=2, **common)
        single = dbof.build(num_branches=1, **common)
        explicit = dbof.build(num_branches=2, num_classes=8, options=pinned)
        mixtures = DBoFOptions(cluster_size=16, hidden_size=40, num_mixtures=4, branch_mixtures=1)
        ratio_and_mixtures = dbof.build(num_branches=2, width_ratio=0.5, num_classes=8, options=mixtures)
    assert by_ratio.branches[1].hidden.out_features == 20  # round(40 * 0.5)
    assert by_ratio.branches[1].moe.num_mixtures == 4
    assert by_default.branches[1].hidden.out_features == 27  # width_ratio None, N > 1: round(40 / 1.5)
    assert single.branches[0].hidden.out_features == 40  # width_ratio None, N = 1: the baseline
    assert explicit.branches[0].hidden.out_features == 12
    assert explicit.branches[0].moe.gates.out_features == 8 * (1 + 1)  # C * (M + 1)
    mixed = ratio_and_mixtures.branches[0]  # branch_mixtures is not a width: it goes with width_ratio
    assert (mixed.hidden.out_features, mixed.moe.num_mixtures) == (20, 1)
    with pytest.raises(ValueError, match="give branch_hidden_size or width_ratio, not both"):
        dbof.build(num_branches=2, width_ratio=0.5, num_classes=8, options=pinned)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(fork="hidden"), "fork"),
        (dict(conv_init="xavier"), "conv_init"),
        (dict(width_ratio=0.0), "width_ratio"),
        (dict(num_mixtures=0), "num_mixtures"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with torch.device("meta"), pytest.raises(ValueError, match=field):
        create_model("dbof_tiny", **kwargs)


def test_wrong_feature_width_is_refused():
    with pytest.raises(ValueError, match="rgb_dim/audio_dim"):
        tiny()(torch.randn(2, 5, 1024))


# ---- MoE ---------------------------------------------------------------------------------------------------------


def test_moe_matches_a_hand_computed_example():
    moe = dbof.MoE(2, num_classes=1, num_mixtures=2)
    gate_w = [[1.0, -1.0], [0.5, 2.0], [-0.3, 0.2]]  # rows: expert 0, expert 1, dummy
    expert_w, expert_b = [[2.0, 1.0], [-1.0, 0.5]], [0.1, -0.2]
    with torch.no_grad():
        moe.gates.weight.copy_(torch.tensor(gate_w))
        moe.experts.weight.copy_(torch.tensor(expert_w))
        moe.experts.bias.copy_(torch.tensor(expert_b))
    h = [0.8, -0.4]

    def dot(w, v):
        return sum(a * b for a, b in zip(w, v, strict=True))

    gate_logits = [dot(w, h) for w in gate_w]  # 1.2, -0.4, -0.32
    z = sum(math.exp(g) for g in gate_logits)
    expected = sum(
        math.exp(gate_logits[m]) / z / (1.0 + math.exp(-(dot(expert_w[m], h) + expert_b[m]))) for m in range(2)
    )
    got = moe(torch.tensor([h]))
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # by hand: gates softmax(1.2, -0.4, -0.32) = (0.7039, 0.1421, dummy 0.1540); experts sigmoid(1.3) = 0.7858 and
    # sigmoid(-1.2) = 0.2315; p = 0.7039 * 0.7858 + 0.1421 * 0.2315 = 0.5861
    assert expected == pytest.approx(0.5861, abs=1e-4)


def test_moe_dummy_expert_takes_a_share_of_the_gate_softmax():
    """Softmax over M + 1 logits with the last dropped: a confident dummy gate drives p to 0 even when every
    real expert says 1, and with the dummy muted the real gates sum to 1. Layout is class-major, (C, M + 1)."""
    c, m = 2, 2
    moe = dbof.MoE(1, num_classes=c, num_mixtures=m)
    with torch.no_grad():
        moe.experts.weight.zero_()
        moe.experts.bias.fill_(30.0)  # sigmoid(30) = 1 - 9e-14: every expert says "yes"
        gate_logits = torch.tensor([[0.0, 0.0, 40.0], [0.0, 0.0, -40.0]])  # class 0: dummy dominates; class 1: muted
        moe.gates.weight.copy_(gate_logits.reshape(c * (m + 1), 1))
    p = moe(torch.ones(1, 1))
    assert p[0, 0].item() == pytest.approx(2 * math.exp(-40.0), abs=1e-12)
    assert p[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    # equal logits for all three: each real expert gets 1/3, so p = 2/3 rather than 1
    with torch.no_grad():
        moe.gates.weight.zero_()
    torch.testing.assert_close(moe(torch.ones(1, 1)), torch.full((1, c), 2 / 3))


# ---- context gate ------------------------------------------------------------------------------------------------


def test_context_gate_folded_eval_equals_the_unfolded_computation():
    torch.manual_seed(0)
    gate = dbof.ContextGate(37, kernels="reference")
    randomise_bn(gate)
    gate.eval()
    x = torch.randn(11, 37)
    unfolded = x * torch.sigmoid(
        F.batch_norm(
            x @ gate.linear.weight.t(),
            gate.bn.running_mean,
            gate.bn.running_var,
            gate.bn.weight,
            gate.bn.bias,
            training=False,
            eps=gate.bn.eps,
        )
    )
    torch.testing.assert_close(gate(x), unfolded, rtol=1e-5, atol=1e-6)
    # training: batch statistics, no folding
    gate.train()
    batch_bn = F.batch_norm(x @ gate.linear.weight.t(), None, None, gate.bn.weight, gate.bn.bias, training=True)
    torch.testing.assert_close(gate(x), x * torch.sigmoid(batch_bn))


def test_folded_gate_gradients_reach_the_unfolded_parameters():
    gate = dbof.ContextGate(5, kernels="reference").eval()
    gate(torch.randn(3, 5)).sum().backward()
    assert gate.linear.weight.grad is not None and gate.bn.weight.grad is not None and gate.bn.bias.grad is not None


# ---- forward: shapes, probabilities, padding ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dbof_tiny", "dbof_tiny_ens2"])
def test_forward_backward_shapes_and_probabilities(name):
    model = tiny(name)
    x, lengths = torch.randn(4, 25, FEATURES), torch.tensor([25, 20, 13, 1])
    out = model(x, lengths=lengths)
    n, c = model.num_branches, MODELS[name][1]["num_classes"]
    assert out.branches.shape == (n, 4, c) and out.ensemble.shape == (4, c)
    assert ((out.branches >= 0) & (out.branches <= 1)).all()
    torch.testing.assert_close(out.ensemble, out.branches.mean(0))
    out.ensemble.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_eval_output_ignores_padding_and_batch_composition():
    model = tiny("dbof_tiny_ens2")
    randomise_bn(model)
    model.eval()
    torch.manual_seed(2)
    video = torch.randn(1, 9, FEATURES)
    alone = model(video, lengths=torch.tensor([9])).ensemble
    # Same video with 7 more frames of zeros, and with 7 more frames of garbage that `lengths` marks invalid.
    torch.testing.assert_close(model(pad(video, 16), lengths=torch.tensor([9])).ensemble, alone)
    torch.testing.assert_close(model(pad(video, 16, 3.0), lengths=torch.tensor([9])).ensemble, alone)
    # lengths=None means "all frames valid", so it agrees with lengths = T.
    torch.testing.assert_close(model(video).ensemble, alone)
    # In a batch, second of three, beside videos of 20 and 4 frames, padded to 20.
    others = torch.randn(2, 20, FEATURES)
    batch = torch.cat([others[:1], pad(video, 20), others[1:]])
    out = model(batch, lengths=torch.tensor([20, 9, 4])).ensemble
    torch.testing.assert_close(out[1:2], alone)


def test_training_statistics_and_output_ignore_padding():
    torch.manual_seed(3)
    x, lengths = torch.randn(3, 10, FEATURES), torch.tensor([10, 6, 3])
    outs, stats = [], []
    for frames, fill in ((10, 0.0), (17, 0.0), (17, 5.0)):
        model = tiny("dbof_tiny_ens2")  # same seed, same weights
        outs.append(model(pad(x, frames, fill), lengths=lengths).ensemble)
        stats.append({k: v.clone() for k, v in model.state_dict().items() if "running" in k})
    for out, stat in zip(outs[1:], stats[1:], strict=True):
        torch.testing.assert_close(out, outs[0])
        assert stat.keys() == stats[0].keys()
        for key in stat:
            torch.testing.assert_close(stat[key], stats[0][key], msg=key)
    # and the statistics really are those of the 19 valid frames only
    valid = torch.cat([x[i, :n] for i, n in enumerate(lengths.tolist())])  # (19, D)
    expected_mean = 0.1 * valid.mean(0)  # momentum 0.1 from a zero start
    torch.testing.assert_close(stats[0]["base.input_bn.running_mean"], expected_mean)


def test_dropout_sits_before_the_moe_and_is_off_by_default():
    assert tiny().branches[0].dropout.p == 0.0
    model = tiny(dropout=0.5)
    model.train()
    x, lengths = torch.randn(4, 5, FEATURES), torch.tensor([5, 5, 3, 2])
    torch.manual_seed(0)
    a = model(x, lengths=lengths).ensemble
    torch.manual_seed(1)
    b = model(x, lengths=lengths).ensemble
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x, lengths=lengths).ensemble, model(x, lengths=lengths).ensemble)


def test_torch_compile_traces_the_tiny_model():
    """aot_eager runs Dynamo and AOTAutograd, about 3 s here. Inductor also matches (max difference 1e-7) but its
    C++ codegen took 25 s cold on 2 shared CPU cores, too slow for a unit test. The one graph break is the nonzero
    that packs the valid frames."""
    model = tiny("dbof_tiny_ens2")
    x, lengths = torch.randn(4, 25, FEATURES), torch.tensor([25, 20, 13, 25])
    expected = model(x, lengths=lengths).ensemble
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(x, lengths=lengths).ensemble
    got.sum().backward()
    torch.testing.assert_close(got, expected)
