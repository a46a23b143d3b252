"""S3D-G: sizes against architecture.md section 2 (on the meta device), and behaviour of the tiny presets on CPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from video_ens.models import create_model, s3dg
from video_ens.models.ensemble import EnsembleNet
from video_ens.models.size import count_params


def meta_model(preset: str, **overrides) -> EnsembleNet:
    with torch.device("meta"):
        return create_model(preset, **overrides)


def tiny(preset: str = "s3dg_tiny_ens2", **overrides) -> EnsembleNet:
    torch.manual_seed(0)
    return create_model(preset, **overrides).eval()


def clip(frames: int = 16, size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- sizes (meta device)


def test_parameter_counts_match_architecture_md():
    base = meta_model("s3dg")
    assert count_params(base) == 9_518_848
    assert sum(m.weight.numel() for m in base.modules() if isinstance(m, s3dg.FeatureGate)) == 1_219_328

    ens = meta_model("s3dg_ens2")
    assert count_params(ens.base) == 1_065_968
    assert [count_params(b) for b in ens.branches] == [3_889_091, 3_889_091]
    assert count_params(ens) == 8_844_150  # architecture.md: 8.844M
    # width_ratio left out: 1/1.5 for more than one branch, so two branches of plain s3dg are s3dg_ens2
    with torch.device("meta"):
        assert count_params(s3dg.build(num_branches=2)) == 8_844_150
        assert count_params(s3dg.build(num_branches=1)) == 9_518_848


# Folded parameters per layer, architecture.md table 2.2.
LAYER_PARAMS = {
    "Conv2d_1a": 28_288,
    "Conv2d_2b": 4_160,
    "Conv2d_2c": 258_432,
    "Mixed_3b": 230_416,
    "Mixed_3c": 544_672,
    "Mixed_4b": 587_376,
    "Mixed_4c": 671_656,
    "Mixed_4d": 784_856,
    "Mixed_4e": 937_760,
    "Mixed_4f": 1_360_320,
    "Mixed_5b": 1_535_424,
    "Mixed_5c": 2_165_488,
    "Logits": 410_000,
}


def test_per_layer_parameters_and_shapes_at_full_size():
    model = meta_model("s3dg")
    layers = dict(model.base.named_children()) | dict(model.branches[0].named_children())
    assert list(layers) == [*s3dg.LAYER_NAMES, "Logits"]
    assert {n: count_params(m) for n, m in layers.items() if n in LAYER_PARAMS} == LAYER_PARAMS

    expected = {  # C x T x H x W after each layer at 3 x 64 x 224 x 224, table 2.2
        "Conv2d_1a": (64, 32, 112, 112),
        "MaxPool_2a": (64, 32, 56, 56),
        "Conv2d_2c": (192, 32, 56, 56),
        "MaxPool_3a": (192, 32, 28, 28),
        "Mixed_3c": (480, 32, 28, 28),
        "MaxPool_4a": (480, 16, 14, 14),
        "Mixed_4b": (512, 16, 14, 14),
        "Mixed_4e": (528, 16, 14, 14),
        "Mixed_4f": (832, 16, 14, 14),
        "MaxPool_5a": (832, 8, 7, 7),
        "Mixed_5c": (1024, 8, 7, 7),
        "Logits": (400,),
    }
    x = torch.empty(1, 3, 64, 224, 224, device="meta")
    for name, layer in layers.items():
        x = layer(x)
        if name in expected:
            assert tuple(x.shape[1:]) == expected[name], name


def test_flops_match_architecture_md():
    for preset, expected in (("s3dg", 128.37e9), ("s3dg_ens2", 125.98e9)):
        model = meta_model(preset).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 64, 224, 224, device="meta"))
        assert abs(counter.get_total_flops() - expected) < 0.005e9, preset


# architecture.md table 2.3: round(c / 1.5) for every width above the fork.
BRANCH_WIDTHS = {
    "Mixed_4b": ((128, 64, 139, 11, 32, 43), 342),
    "Mixed_4c": ((107, 75, 149, 16, 43, 43), 342),
    "Mixed_4d": ((85, 85, 171, 16, 43, 43), 342),
    "Mixed_4e": ((75, 96, 192, 21, 43, 43), 353),
    "Mixed_4f": ((171, 107, 213, 21, 85, 85), 554),
    "Mixed_5b": ((171, 107, 213, 21, 85, 85), 554),
    "Mixed_5c": ((256, 128, 256, 32, 85, 85), 682),
}


def block_widths(block: s3dg.InceptionBlock) -> tuple[int, ...]:
    return (
        block.Branch_0.Conv3d_0a_1x1.conv.out_channels,
        block.Branch_1.Conv3d_0a_1x1.conv.out_channels,
        block.Branch_1.Conv3d_0b_3x3.temporal.out_channels,
        block.Branch_2.Conv3d_0a_1x1.conv.out_channels,
        block.Branch_2.Conv3d_0b_3x3.temporal.out_channels,
        block.Branch_3.Conv3d_0b_1x1.conv.out_channels,
    )


def test_branch_width_table():
    model = meta_model("s3dg_ens2")
    assert model.base.Mixed_3c.out_channels == 480
    for branch in model.branches:
        assert branch.Mixed_4b.Branch_0.Conv3d_0a_1x1.conv.in_channels == 480  # the fork width is kept
        got = {
            name: (block_widths(getattr(branch, name)), getattr(branch, name).out_channels) for name in BRANCH_WIDTHS
        }
        assert got == BRANCH_WIDTHS
        assert (branch.Logits.conv.in_channels, branch.Logits.conv.out_channels) == (682, 400)


def test_gate_weights_are_square_1x1x1_convs():
    model = meta_model("s3dg_ens2")
    gates = [m for m in model.modules() if isinstance(m, s3dg.FeatureGate)]
    assert len(gates) == 1 + 4 * 2 + 2 * 4 * 7  # Conv2d_2c, 2 base blocks, 7 blocks per branch
    for gate in gates:
        c = gate.weight.shape[0]
        assert gate.weight.shape == (c, c, 1, 1, 1)


@pytest.mark.parametrize("fork", ["MaxPool_3a", "MaxPool_4a", "MaxPool_5a"])
def test_fork_points(fork):
    model = meta_model("s3dg_ens2", fork=fork)
    split = s3dg.LAYER_NAMES.index(fork) + 1
    assert [n for n, _ in model.base.named_children()] == list(s3dg.LAYER_NAMES[:split])
    assert [n for n, _ in model.branches[1].named_children()] == [*s3dg.LAYER_NAMES[split:], "Logits"]
    out = model(torch.empty(1, 3, 64, 224, 224, device="meta"))
    assert out.branches.shape == (2, 1, 400)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="fork"):
        s3dg.build(fork="Mixed_9z")
    with pytest.raises(ValueError, match="width_ratio"):
        s3dg.build(width_ratio=0)


# ---------------------------------------------------------------------------------------------- tiny presets (CPU)


def test_state_dict_names():
    keys = list(tiny().state_dict())
    assert all(k.startswith(("base.", "branches.0.", "branches.1.")) for k in keys)
    assert "base.Conv2d_1a.conv.weight" in keys
    assert "branches.0.Mixed_4b.Branch_1.Conv3d_0b_3x3.temporal.bias" in keys
    assert "branches.1.Logits.conv.weight" in keys


@pytest.mark.parametrize("preset, n", [("s3dg_tiny", 1), ("s3dg_tiny_ens2", 2)])
def test_tiny_output_shapes_and_backward(preset, n):
    model = tiny(preset).train()
    out = model(clip())
    assert out.branches.shape == (n, 2, 8)
    assert out.ensemble.shape == (2, 8)
    torch.testing.assert_close(out.ensemble.sum(-1), torch.ones(2))
    out.branches.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("frames", [8, 16, 24])
def test_any_clip_length(frames):
    out = tiny()(clip(frames=frames, batch=1))
    assert out.branches.shape == (2, 1, 8)
    assert torch.isfinite(out.branches).all()


def test_eval_is_deterministic():
    x = clip(batch=1)
    a, b = tiny()(x), tiny()(x)  # two builds from the same seed
    torch.testing.assert_close(a.branches, b.branches, rtol=0, atol=0)
    torch.testing.assert_close(a.ensemble, b.ensemble, rtol=0, atol=0)


def test_logits_are_the_mean_of_per_timestep_logits():
    model = tiny()
    with torch.no_grad():
        h = model.branches[0][:-1](model.base(clip(frames=24, batch=1)))  # (1, 128, 3, 2, 2) before Logits
        head = model.branches[0].Logits
        per_t = head.per_timestep(h)  # (1, classes, 2)
        assert per_t.shape == (1, 8, 2)
        torch.testing.assert_close(head(h), per_t.mean(dim=2))
        # per-timestep logits are the classifier applied to each 2x(H)x(W) window on its own
        for t in range(per_t.shape[2]):
            torch.testing.assert_close(head.per_timestep(h[:, :, t : t + 2])[:, :, 0], per_t[:, :, t])


def test_temporal_convs_start_as_identity():
    model = tiny(conv_init="normal", conv_init_std=0.03)
    sep = model.branches[0].Mixed_4b.Branch_1.Conv3d_0b_3x3
    c = sep.temporal.out_channels
    expected = torch.zeros(c, c, 3, 1, 1)
    expected[:, :, 1, 0, 0] = torch.eye(c)
    torch.testing.assert_close(sep.temporal.weight, expected, rtol=0, atol=0)
    assert not sep.temporal.bias.any()
    assert abs(model.base.Conv2d_1a.conv.weight.std().item() - 0.03) < 0.005  # conv_init="normal" reached
    assert abs(model.base.Mixed_3b.Branch_0.gate.weight.std().item() - 0.03) < 0.01


def test_channels_last_3d_matches_contiguous():
    model, x = tiny(), clip(batch=1)
    ref = model(x).branches
    model = model.to(memory_format=torch.channels_last_3d)
    out = model(x.to(memory_format=torch.channels_last_3d)).branches
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
