"""One interface for every model: parametrised over the whole table in video_ens.models.MODELS."""

import pytest
import torch
from torch import nn

from video_ens.config import ModelConfig
from video_ens.models import MODELS, channels_last, create_model, model_kwargs
from video_ens.models.size import count_params
from video_ens.objective import EnsembleLoss

TINY = sorted(n for n in MODELS if "tiny" in n)
PAPER = ["s3dg", "s3dg_ens2", "dbof", "dbof_ens2", "resnet152", "resnet152_ens2", "seresnet152", "seresnet152_ens2"]


def _batch(model, b=2, gen=None):
    """An input of the kind the model declares, and matching targets."""
    gen = gen or torch.Generator().manual_seed(0)
    spec = model.input_spec
    kind = spec["kind"]
    if kind == "clip":
        x = torch.randn(b, 3, spec["frames"], spec["size"], spec["size"], generator=gen)
        return x, {}, None
    if kind == "image":
        return torch.randn(b, 3, spec["size"], spec["size"], generator=gen), {}, None
    assert kind == "features", spec
    t = 12
    x = torch.randn(b, t, spec["dim"], generator=gen)
    lengths = torch.tensor([t - 3 * i for i in range(b)])
    return x, {"lengths": lengths}, None


def _seeded(name: str, seed: int = 0) -> nn.Module:
    """create_model(name) with its initial weights drawn after torch.manual_seed(seed): the same model every run."""
    torch.manual_seed(seed)
    return create_model(name)


def _targets(model, out, gen):
    n, b, c = out.branches.shape
    if model.activation == "sigmoid":
        return (torch.rand(b, c, generator=gen) < 0.2).float()
    return torch.randint(0, c, (b,), generator=gen)


def _loss(model, structure="codistillation", weight=2.0):
    kind = "sigmoid_bce" if model.activation == "sigmoid" else "softmax_ce"
    return EnsembleLoss(structure, weight, kind, inputs=model.output_type)


def test_the_paper_configurations_are_all_there():
    assert set(PAPER) <= set(MODELS)
    assert TINY, "tiny presets of every family"
    families = {"s3dg", "dbof", "resnet", "seresnet"}
    assert all(any(n.startswith(f) for n in TINY) for f in families)


def test_unknown_model_names_the_closest():
    with pytest.raises(ValueError, match="did you mean 's3dg_ens2'"):
        create_model("s3dg_ens")


@pytest.mark.parametrize("name", PAPER)
def test_paper_models_build_on_meta(name):
    with torch.device("meta"):
        m = create_model(name)
    assert all(p.is_meta for p in m.parameters())
    expect_n = 2 if name.endswith("_ens2") else 1
    assert m.num_branches == expect_n
    keys = list(m.state_dict())
    assert all(k.startswith(("base.", "branches.")) for k in keys), keys[:5]
    assert any(k.startswith(f"branches.{expect_n - 1}.") for k in keys)


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_probabilities(name):
    m = _seeded(name).eval()
    x, kw, _ = _batch(m)
    with torch.no_grad():
        out = m(x, **kw)
    n, b, c = out.branches.shape
    assert (n, b) == (m.num_branches, 2)
    assert out.ensemble.shape == (b, c)
    assert out.ensemble.dtype == torch.float32
    assert torch.all((out.ensemble >= 0) & (out.ensemble <= 1))
    if m.activation == "softmax":
        torch.testing.assert_close(out.ensemble.sum(-1), torch.ones(b))


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_gradient(name):
    gen = torch.Generator().manual_seed(1)
    m = _seeded(name).train()
    x, kw, _ = _batch(m, b=3, gen=gen)
    out = m(x, **kw)
    loss = _loss(m)(out.branches, _targets(m, out, gen))["loss"]
    loss.backward()
    missing = [k for k, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    dead = [k for k, p in m.named_parameters() if p.grad.abs().sum() == 0]
    assert not dead, f"parameters with an all-zero gradient: {dead}"


@pytest.mark.parametrize("name", TINY)
def test_eval_is_deterministic(name):
    m = _seeded(name).eval()
    x, kw, _ = _batch(m)
    with torch.no_grad():
        a, b = m(x, **kw), m(x, **kw)
    assert torch.equal(a.branches, b.branches) and torch.equal(a.ensemble, b.ensemble)


@pytest.mark.parametrize("name", TINY)
def test_a_tiny_model_learns_a_fixed_batch(name):
    """A few Adam steps on one batch with the co-distillation loss: the ground-truth term N l(g, p_ens) falls
    (overfitting is learning). The distillation terms are not compared: they include the entropy of p_ens."""
    gen = torch.Generator().manual_seed(2)
    m = _seeded(name).train()
    x, kw, _ = _batch(m, b=4, gen=gen)
    with torch.no_grad():
        tgt = _targets(m, m(x, **kw), gen)
    crit = _loss(m)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        terms = crit(m(x, **kw).branches, tgt)
        terms["loss"].backward()
        opt.step()
        losses.append(terms["ensemble"].item())
    assert losses[-1] < 0.8 * losses[0], losses


def _first_branch_width(model) -> int:
    """Output channels of the first conv / linear of branch 0 (S3D-G: Mixed_4b's 1x1, DBoF: the hidden layer,
    ResNet: block3's first 1x1)."""
    layer = next(m for m in model.branches[0].modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)))
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@pytest.mark.parametrize("name", TINY)
def test_width_and_branch_count_are_recipe_fields(name):
    """model.num_branches and model.width_ratio of a recipe reshape any preset, pinned branch widths included."""
    m = create_model(name, **ModelConfig(name=name, num_branches=3, width_ratio=0.5).builder_kwargs())
    assert m.num_branches == 3
    assert len({type(b) for b in m.branches}) == 1
    baseline = create_model(name, **ModelConfig(name=name, num_branches=1, width_ratio=1.0).builder_kwargs())
    full = _first_branch_width(baseline)
    assert _first_branch_width(m) == round(full * 0.5), (full, _first_branch_width(m))


# ---- width_ratio defaults and how overrides meet a preset's branch shape (video_ens.models.model_kwargs) ----------


def _meta(name, **overrides):
    with torch.device("meta"):
        return create_model(name, **overrides)


def test_the_default_width_ratio_follows_the_branch_count():
    """None means 1.0 for one branch and 1/1.5 for more: two branches of plain s3dg are the paper's s3dg_ens2."""
    assert count_params(_meta("s3dg", num_branches=2)) == count_params(_meta("s3dg_ens2")) == 8_844_150
    assert count_params(_meta("s3dg", num_branches=1)) == 9_518_848
    assert _meta("dbof", num_branches=2).branches[1].hidden.out_features == round(4096 / 1.5) == 2731
    b = _meta("resnet152", num_branches=2).branches[1]
    assert (b.block3.unit1.conv2.out_channels, b.block4.unit1.conv2.out_channels) == (171, 341)  # round(./1.5)
    # a preset that states its own ratio keeps it, also with more branches
    b = _meta("resnet152_ens2", num_branches=3).branches[2]
    assert (b.block3.unit1.conv2.out_channels, b.block4.unit1.conv2.out_channels) == (176, 352)
    d = _meta("dbof_ens2", num_branches=3).branches[2]
    assert (d.hidden.out_features, d.moe.num_mixtures) == (3000, 3)


@pytest.mark.parametrize(
    "name, baseline",
    [
        ("s3dg_ens2", 9_518_848),
        ("dbof_ens2", 229_093_358),
        ("resnet152_ens2", 60_117_096),
        ("seresnet152_ens2", 66_746_136),
    ],
)
def test_one_branch_of_a_multi_headed_preset_is_the_baseline(name, baseline):
    """num_branches=1 drops the preset's branch shape: DBoF's hidden 3000 / MoE-3 become 4096 / 5 experts."""
    assert count_params(_meta(name, num_branches=1)) == baseline
    assert count_params(_meta(name, num_branches=1, width_ratio=1.0)) == baseline


def test_an_explicit_width_ratio_replaces_pinned_branch_widths():
    m = _meta("dbof_ens2", width_ratio=0.5)
    assert m.num_branches == 2
    assert {(b.hidden.out_features, b.moe.num_mixtures) for b in m.branches} == {(2048, 5)}  # 4096 * 0.5, dbof's 5
    m = _meta("dbof_ens2", width_ratio=0.5, branch_mixtures=3)
    assert (m.branches[0].hidden.out_features, m.branches[0].moe.num_mixtures) == (2048, 3)
    b = _meta("resnet152_ens2", width_ratio=0.5).branches[0]
    assert (b.block3.unit1.conv2.out_channels, b.block4.unit1.conv2.out_channels) == (128, 256)


def test_explicit_branch_widths_replace_the_preset_ratio():
    m = _meta("resnet152_ens2", branch_widths=(100, 200))
    assert m.num_branches == 2
    for b in m.branches:
        assert (b.block3.unit1.conv2.out_channels, b.block4.unit1.conv2.out_channels) == (100, 200)
        assert b.fc.in_features == 4 * 200
    # one pinned key replaces only itself (and a preset ratio): the other stays
    d = _meta("dbof_ens2", branch_mixtures=5).branches[0]
    assert (d.hidden.out_features, d.moe.num_mixtures) == (3000, 5)
    d = _meta("dbof_ens2", branch_hidden_size=2000).branches[0]
    assert (d.hidden.out_features, d.moe.num_mixtures) == (2000, 3)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("resnet152_ens2", dict(branch_widths=(100, 200), width_ratio=0.5)),
        ("resnet152", dict(num_branches=2, branch_widths=(100, 200), width_ratio=1.0)),
        ("dbof_ens2", dict(branch_hidden_size=2000, width_ratio=0.5)),
        ("dbof", dict(num_branches=2, branch_hidden_size=2000, width_ratio=1.0)),
    ],
)
def test_conflicting_explicit_widths_name_both(name, overrides):
    width_key = next(k for k in overrides if k.startswith("branch_"))
    with pytest.raises(ValueError, match=rf"give {width_key} or width_ratio, not both"):
        _meta(name, **overrides)


def test_model_kwargs_shows_what_the_builder_gets():
    assert model_kwargs("dbof_ens2", num_branches=1) == {"num_branches": 1, "cluster_size": 4096, "hidden_size": 4096}
    assert model_kwargs("resnet152_ens2", branch_widths=(100, 200)) == {"num_branches": 2, "branch_widths": (100, 200)}
    assert model_kwargs("s3dg_ens2", num_branches=3)["width_ratio"] == 1 / 1.5
    with pytest.raises(ValueError, match="did you mean"):
        model_kwargs("dbof_ens3")


@pytest.mark.parametrize("name", TINY)
def test_state_dict_round_trip(name):
    a = _seeded(name).eval()
    b = _seeded(name, seed=1).eval()
    b.load_state_dict(a.state_dict())
    x, kw, _ = _batch(a)
    with torch.no_grad():
        torch.testing.assert_close(a(x, **kw).ensemble, b(x, **kw).ensemble, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["s3dg_tiny_ens2", "dbof_tiny_ens2", "seresnet_tiny_ens2"])
def test_torch_compile_traces_and_matches_eager(name):
    """torch.compile captures each family; aot_eager runs the captured graphs (inductor's C++ build takes minutes
    on 2 cores, measured 69-200 s, so CI checks the capture and the functionalised graph, not codegen)."""
    m = _seeded(name).eval()
    x, kw, _ = _batch(m)
    compiled = torch.compile(m, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, **kw).ensemble, m(x, **kw).ensemble)


@pytest.mark.parametrize("name", ["s3dg_tiny_ens2", "resnet_tiny_ens2", "dbof_tiny_ens2"])
def test_channels_last_matches_contiguous(name):
    m = _seeded(name).eval()
    x, kw, _ = _batch(m)
    fmt = {5: torch.channels_last_3d, 4: torch.channels_last}.get(x.dim())  # features (3-D): nothing to reorder
    with torch.no_grad():
        ref = m(x, **kw).ensemble
        m = channels_last(m)
        out = m(x if fmt is None else x.contiguous(memory_format=fmt), **kw).ensemble
    conv = [p for p in m.parameters() if p.dim() >= 4]
    assert all(p.is_contiguous(memory_format=fmt) for p in conv) and (fmt is None) == (not conv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
