"""ResNet / SE-ResNet: exact paper sizes, stride placement, SE placement, checkpoint names, tiny presets.

The big models are built on the meta device (no memory, ~0.1 s each); FLOPs are counted here with FlopCounterMode
directly, independently of video_ens.models.size.
"""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from video_ens.model_options import ResNetOptions
from video_ens.models import create_model, resnet
from video_ens.models.resnet import Bottleneck, Projection, SqueezeExcite, Subsample

PAPER = ["resnet152", "resnet152_ens2", "seresnet152", "seresnet152_ens2"]
TINY = ["resnet_tiny", "resnet_tiny_ens2", "seresnet_tiny", "seresnet_tiny_ens2"]


def _meta(name, **overrides):
    with torch.device("meta"):
        return create_model(name, **overrides)


def _folded_count(model):
    """Conv and linear weights (+ biases) and one value per BN channel; fails on any other parameter holder."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            total += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        elif isinstance(m, nn.BatchNorm2d):
            total += m.num_features
        else:
            assert not list(m.parameters(recurse=False)), type(m)
    return total


def _macs2(model, shape):
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.empty(*shape, device="meta"))
    return fc.get_total_flops()


@pytest.mark.parametrize(
    "name, folded, gamma_beta",
    [
        # design/architecture.md section 0 / 4.2; the paper rounds these to 60.1M, 58.2M, 66.7M, 64.5M.
        ("resnet152", 60_117_096, 60_192_808),
        ("resnet152_ens2", 58_160_976, 58_262_032),
        ("seresnet152", 66_746_136, 66_872_712),
        ("seresnet152_ens2", 64_463_088, 64_632_144),
    ],
)
def test_paper_parameter_counts(name, folded, gamma_beta):
    m = _meta(name)
    assert _folded_count(m) == folded
    assert sum(p.numel() for p in m.parameters()) == gamma_beta


@pytest.mark.parametrize("name, flops", [("resnet152", 21.813e9), ("resnet152_ens2", 20.991e9)])
def test_flops_match_the_slim_stride_placement(name, flops):
    # Stride on the first unit (torchvision v1.5) would give 23.03B / 22.24B, on the last unit's 1x1 21.58B / 20.76B.
    assert _macs2(_meta(name), (1, 3, 224, 224)) == pytest.approx(flops, rel=1e-3)


def test_stride_sits_on_conv2_of_each_blocks_last_unit():
    m = _meta("resnet152")
    blocks = [m.base.block1, m.base.block2, m.branches[0].block3, m.branches[0].block4]
    for block, units, stride in zip(blocks, (3, 8, 36, 3), (2, 2, 2, 1), strict=True):
        assert len(block) == units
        for i, unit in enumerate(block):
            last = i == units - 1
            assert unit.conv2.stride == ((stride, stride) if last else (1, 1))
            assert unit.conv1.stride == unit.conv3.stride == (1, 1)
            if i == 0:
                assert isinstance(unit.shortcut, Projection)
            elif last and stride == 2:
                assert isinstance(unit.shortcut, Subsample)
            else:
                assert isinstance(unit.shortcut, nn.Identity)
    with torch.no_grad():
        assert m.base.eval()(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 512, 14, 14)


def test_bottleneck_by_hand():
    torch.manual_seed(0)
    unit = Bottleneck(16, 4, stride=2, se=False, se_reduction=16).eval()  # identity shortcut, subsampled
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        y = unit(x)
        residual = unit.bn3(unit.conv3(unit.act(unit.bn2(unit.conv2(unit.act(unit.bn1(unit.conv1(x))))))))
    assert y.shape == (2, 16, 4, 4)
    torch.testing.assert_close(y, torch.relu(residual + x[:, :, ::2, ::2]))
    # conv1 16->4 at 8x8, conv2 3x3 4->4 at 4x4 (the stride is here), conv3 4->16 at 4x4; 2 FLOPs per MAC:
    # 2 * (16*4*64 + 9*4*4*16 + 4*16*16) = 8192 + 4608 + 2048; with the stride on conv1 it would be 2048 + 4608
    # + 2048, and on the unit's output (conv1 to conv3 at 8x8) 8192 + 18432 + 8192.
    with FlopCounterMode(display=False) as fc:
        unit(x[:1])
    assert fc.get_total_flops() == 8192 + 4608 + 2048

    single = Bottleneck(8, 4, stride=2, se=False, se_reduction=16)  # a one-unit block: projection with the stride
    assert isinstance(single.shortcut, Projection) and single.shortcut.conv.stride == (2, 2)
    assert single(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)


def test_se_only_when_asked():
    plain, se = _meta("resnet152"), _meta("seresnet152")
    assert not any(isinstance(m, SqueezeExcite) for m in plain.modules())
    ses = [m for m in se.modules() if isinstance(m, SqueezeExcite)]
    assert len(ses) == 3 + 8 + 36 + 3
    # r = 16: C -> C/16 -> C; folded C^2/8 + C/16 + C (architecture.md 4.1).
    last = se.branches[0].block4.unit3.se
    assert (last.reduce.in_channels, last.reduce.out_channels, last.expand.out_channels) == (2048, 128, 2048)
    assert _folded_count(last) == 2048**2 // 8 + 128 + 2048
    assert all(unit.se is None for unit in plain.base.block1)


def test_se_multiplies_the_residual_before_the_add():
    torch.manual_seed(0)
    unit = Bottleneck(16, 4, stride=1, se=True, se_reduction=4).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        r = unit.bn3(unit.conv3(unit.act(unit.bn2(unit.conv2(unit.act(unit.bn1(unit.conv1(x))))))))
        s = unit.se.expand_bn(unit.se.expand(torch.relu(unit.se.reduce_bn(unit.se.reduce(r.mean((2, 3), True))))))
        torch.testing.assert_close(unit(x), torch.relu(r * torch.sigmoid(s) + x))


def test_branch_widths_and_forks():
    ens2 = _meta("resnet152_ens2")
    b = ens2.branches[1]
    assert (b.block3.unit1.conv2.out_channels, b.block4.unit1.conv2.out_channels) == (176, 352)
    assert (b.block3.unit1.conv1.in_channels, b.fc.in_features) == (512, 1408)
    explicit = _meta("resnet152", num_branches=2, branch_widths=(176, 352))
    assert _folded_count(explicit) == 58_160_976
    with pytest.raises(ValueError, match="not both"):
        resnet.build(width_ratio=0.6875, options=ResNetOptions(branch_widths=(176, 352)))
    with pytest.raises(ValueError, match="give branch_widths or width_ratio, not both"):
        resnet.build(num_branches=2, width_ratio=1.0, options=ResNetOptions(branch_widths=(176, 352)))  # any ratio
    # a caller's branch_widths replaces the preset's width_ratio
    override = _meta("resnet152_ens2", branch_widths=(100, 200)).branches[1]
    assert (override.block3.unit1.conv2.out_channels, override.block4.unit1.conv2.out_channels) == (100, 200)
    # width_ratio left out: 1.0 for one branch, 1/1.5 for more
    assert _folded_count(_meta("resnet152", num_branches=1)) == 60_117_096
    two = _meta("resnet152", num_branches=2).branches[0]
    assert (two.block3.unit1.conv2.out_channels, two.block4.unit1.conv2.out_channels) == (171, 341)
    with pytest.raises(ValueError, match="branch_widths"):
        resnet.build(options=ResNetOptions(branch_widths=(176,)))
    with pytest.raises(ValueError, match="fork must be one of"):
        resnet.build(fork="block5")
    heads_only = create_model("resnet_tiny", fork="block4", num_branches=3)
    assert [n for n, _ in heads_only.branches[0].named_children()] == ["pool", "flatten", "dropout", "fc"]
    everything = create_model("resnet_tiny", fork="stem")
    assert [n for n, _ in everything.base.named_children()] == ["stem"]
    assert everything(torch.randn(2, 3, 32, 32)).branches.shape == (1, 2, 10)


def test_state_dict_names():
    keys = set(create_model("seresnet_tiny_ens2").state_dict())
    for key in [
        "base.stem.conv.weight",
        "base.stem.bn.running_var",
        "base.block1.unit1.conv1.weight",
        "base.block1.unit1.shortcut.conv.weight",
        "base.block1.unit1.shortcut.bn.bias",
        "base.block2.unit2.se.reduce.weight",
        "base.block2.unit2.se.expand_bn.weight",
        "branches.0.block3.unit1.conv2.weight",
        "branches.1.block4.unit2.bn3.bias",
        "branches.1.fc.weight",
        "branches.1.fc.bias",
    ]:
        assert key in keys, key
    # Only the branch index is a number: every other level has a descriptive name.
    for key in keys:
        parts = key.split(".")
        assert all(not p.isdigit() for i, p in enumerate(parts) if not (i == 1 and parts[0] == "branches")), key
    assert not any(".shortcut." in k for k in keys if ".unit2." in k)  # identity / subsampled: no parameters


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    torch.manual_seed(0)
    m = create_model(name)
    assert m.input_spec == {"kind": "image", "size": 64}
    out = m(torch.randn(4, 3, 64, 64))
    assert out.branches.shape == (m.num_branches, 4, 10)
    assert out.ensemble.shape == (4, 10)
    out.branches.square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_channels_last_and_compile():
    torch.manual_seed(0)
    m = create_model("seresnet_tiny", units=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x).branches
        cl = m.to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)).branches, ref)
        # fullgraph: the forward traces without a graph break. The eager backend skips code generation, which
        # takes minutes on CPU; the inductor path was checked by hand (max difference 1e-5).
        compiled = torch.compile(m, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x).branches, ref)


def test_conv_init_normal():
    torch.manual_seed(0)
    m = create_model("resnet_tiny", conv_init="normal", conv_init_std=0.03)
    w = torch.cat([mod.weight.flatten() for mod in m.modules() if isinstance(mod, nn.Conv2d)])
    assert w.numel() > 100_000
    assert w.std().item() == pytest.approx(0.03, rel=0.02)
    assert abs(w.mean().item()) < 1e-3
