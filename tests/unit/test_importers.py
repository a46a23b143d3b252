"""The importers of public weights, on randomly initialised torchvision models (nothing is downloaded): every tensor
lands in the model, shapes agree, and the imported network computes torchvision's function wherever the two
architectures agree (video_ens/models/importers.py lists where they do not, and why)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from video_ens.models import create_model
from video_ens.models.importers import import_resnet, import_s3d
from video_ens.weights import init_model, load_public_state_dict

ROOT = Path(__file__).resolve().parents[2]
_KEEP = []  # the operator declarations below live as long as their Library object


def _torchvision():
    """torchvision. Its PyPI wheel is built against CUDA torch: beside the CPU torch of the test machines its C++ ops
    do not load, and `import torchvision` then fails registering a fake kernel for `torchvision::nms`, an operator
    that was never defined ("operator torchvision::nms does not exist"). The models used here never call those ops,
    so the two operators it registers unconditionally are declared (schemas, no kernels) and the import retried."""
    try:
        import torchvision
    except ImportError:
        pytest.skip("torchvision is not installed (tools/setup_env.sh installs the release paired with CPU torch 2.13)")
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
        import torchvision
    return torchvision


def _randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Distinct BN weights, biases and running statistics everywhere: with PyTorch's defaults (1, 0, 0, 1) in every
    BN, a BN mapped to the wrong place would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for i, m in enumerate(bns):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.num_batches_tracked.fill_(1000 + i)  # distinct, so that each counter is found in one place


def _lands_once(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, str]:
    """source name -> the one model tensor that holds its values (times `scale`), found by value, not by name."""

    def signature(t: torch.Tensor) -> tuple:  # shape and leading values: a dict lookup instead of comparing all pairs
        return tuple(t.shape), tuple(t.flatten()[:4].tolist())

    candidates: dict[tuple, list[str]] = {}
    for name, t in ours.items():
        candidates.setdefault(signature(t), []).append(name)
    found = {}
    for name, t in theirs.items():
        t = t * scale if scale != 1 else t
        hits = [o for o in candidates.get(signature(t), []) if torch.equal(ours[o], t)]
        if hits:
            assert len(hits) == 1, f"{name} matches several model tensors: {hits}"
            found[name] = hits[0]
    return found


# ----------------------------------------------------------------------------------------------------------- ResNet


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    theirs = _torchvision().models.resnet152(weights=None).eval()
    _randomise_batchnorm(theirs, 1)
    imported = import_resnet(theirs.state_dict())
    with torch.device("meta"):  # nothing to initialise: every tensor comes from the import
        ours = create_model("resnet152").eval()
    ours.load_state_dict(imported.state, strict=True, assign=True)  # strict: exactly the model's names and shapes
    return theirs, ours, imported


def test_resnet152_every_tensor_lands_once_with_its_shape(resnet):
    theirs, ours, imported = resnet
    assert imported.model == "resnet152" and imported.build == {} and imported.exclude == ()
    own = ours.state_dict()
    for name, t in imported.state.items():
        assert t.shape == own[name].shape, name
    src = theirs.state_dict()
    landed = _lands_once(src, own)
    assert sorted(landed) == sorted(src), f"not found by value: {sorted(set(src) - set(landed))[:5]}"
    assert len(set(landed.values())) == len(own)  # and every model tensor came from one of them


def test_resnet152_stem_and_every_unit_that_strides_alike_compute_torchvision_function(resnet):
    theirs, ours, _ = resnet
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(x))))
        torch.testing.assert_close(ours.base.stem(x), stem, rtol=1e-5, atol=1e-5)
    blocks = {**dict(ours.base.named_children()), **dict(ours.branches[0].named_children())}
    compared, differ = 0, []
    for layer in range(1, 5):
        tv_units = getattr(theirs, f"layer{layer}")
        for u, tv_unit in enumerate(tv_units):
            unit = getattr(blocks[f"block{layer}"], f"unit{u + 1}")
            if tv_unit.stride != unit.conv2.stride[0]:
                differ.append((f"layer{layer}.{u}", f"block{layer}.unit{u + 1}"))
                continue
            # ReLU6 inside our units is the one other difference (RESNET_DIFFERENCES); with ReLU the unit must be
            # torchvision's, whatever the size of its activations
            relu6, unit.act = unit.act, nn.ReLU()
            h = torch.randn(1, tv_unit.conv1.in_channels, 4, 4)
            try:
                with torch.no_grad():
                    torch.testing.assert_close(unit(h), tv_unit(h), rtol=1e-5, atol=1e-5)
            finally:
                unit.act = relu6
            compared += 1
    # the documented stride difference, and only it: torchvision's first units of layer2-4, our last of block1-3
    assert differ == [
        ("layer1.2", "block1.unit3"),
        ("layer2.0", "block2.unit1"),
        ("layer2.7", "block2.unit8"),
        ("layer3.0", "block3.unit1"),
        ("layer3.35", "block3.unit36"),
        ("layer4.0", "block4.unit1"),
    ]
    assert compared == 44


def test_resnet_importer_refuses_other_architectures(resnet):
    theirs, _, _ = resnet
    state = dict(theirs.state_dict())
    with pytest.raises(ValueError, match=r"layer1\.0\.se\.fc1\.weight"):
        import_resnet({**state, "layer1.0.se.fc1.weight": torch.zeros(4, 256, 1, 1)})
    basic = _torchvision().models.resnet18(weights=None).state_dict()
    with pytest.raises(ValueError, match="BasicBlock"):
        import_resnet(basic)
    # resnet50 has the same layout with (3, 4, 6, 3) units: it imports, and says how to build it
    r50 = import_resnet(_torchvision().models.resnet50(weights=None).state_dict())
    assert r50.build == {"units": (3, 4, 6, 3)}
    model = create_model("resnet152", units=(3, 4, 6, 3))
    assert set(r50.state) == set(model.state_dict())


# -------------------------------------------------------------------------------------------------------------- S3D


@pytest.fixture(scope="module")
def s3d(tmp_path_factory):
    torch.manual_seed(0)
    theirs = _torchvision().models.video.s3d(weights=None).eval()
    _randomise_batchnorm(theirs, 2)
    state = theirs.state_dict()
    path = tmp_path_factory.mktemp("s3d") / "s3d_random.pth"
    torch.save(state, path)
    return theirs, path


def test_s3d_every_tensor_lands_and_shapes_agree(s3d):
    theirs, _ = s3d
    imported = import_s3d(theirs.state_dict())
    ours = create_model("s3dg").state_dict()
    first = {k for k in ours if k.startswith("base.Conv2d_1a.")}
    assert imported.exclude == ("base.Conv2d_1a.*",) and len(first) == 6
    assert set(imported.state) == set(ours) - first
    for name, t in imported.state.items():
        assert t.shape == ours[name].shape, name
    src = theirs.state_dict()
    as_is, doubled = _lands_once(src, imported.state), _lands_once(src, imported.state, scale=2.0)
    assert not set(as_is) & set(doubled)
    # doubled: the four input convs of the 9 inception blocks, and the classifier (the gates halve their inputs)
    assert len(doubled) == 9 * 4 + 1 and "classifier.1.weight" in doubled
    folded = {k for k in src if ".1.1." in k or k.endswith(".1.0.weight")} - set(as_is) - set(doubled)
    dropped = {k for k in src if k.startswith("features.0.")}
    assert set(imported.dropped) == dropped and len(dropped) == 12
    # the rest are the temporal conv + BN of the 19 separable units (Conv2d_2c, two per block), folded into a conv
    # with bias: 6 source tensors -> 2 each, checked by the function test below
    rest = set(src) - set(as_is) - set(doubled) - dropped
    assert rest == folded - dropped and len(rest) == 19 * 6
    gates = [k for k in imported.state if k.endswith("gate.weight")]
    assert len(gates) == 1 + 9 * 4 and all(not imported.state[k].any() for k in gates)


def test_s3d_import_computes_torchvision_s3d_from_the_second_layer_on(s3d, tmp_path, capsys):
    theirs, pth = s3d
    tool = _load_tool()
    out = tmp_path / "s3d.safetensors"
    assert tool.main(["s3d", "--state-dict", str(pth), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    section = json.loads(printed.split("model section that loads it:\n", 1)[1])
    assert section == {"name": "s3dg", "init_from": str(out), "init_exclude": ["base.Conv2d_1a.*"]}
    ours = create_model(section["name"]).eval()
    report = init_model(ours, out, exclude=section["init_exclude"])
    assert report.parts["base"]["new"] == 6 and report.parts["branch 0"]["new"] == 0
    # Conv2d_1a has no counterpart (separable in torchvision): both networks take torchvision's first-layer output
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        h = theirs.features[0](x)
        for name, layer in ours.base.named_children():
            h = h if name == "Conv2d_1a" else layer(h)
        for name, layer in ours.branches[0].named_children():
            h = h if name == "Logits" else layer(h)
        want = theirs.features(x)
        scale = want.abs().max()
        # Mixed_5c ends in gates at 1/2, which the (doubled) classifier undoes: its output is half torchvision's
        torch.testing.assert_close(2 * h / scale, want / scale, rtol=0, atol=2e-5)
        # the head (torchvision's avg-pool needs 7x7 after the last pool, i.e. 224x224 inputs): on features
        f = torch.randn(2, 1024, 2, 7, 7)
        want = theirs.classifier(theirs.avgpool(f)).mean(dim=(2, 3, 4))
        torch.testing.assert_close(ours.branches[0].Logits(f / 2), want, rtol=1e-5, atol=1e-5)  # f / 2: gated


def test_s3d_importer_names_what_it_does_not_know(s3d):
    theirs, _ = s3d
    state = dict(theirs.state_dict())
    with pytest.raises(ValueError, match=r"features\.5\.gate\.weight"):
        import_s3d({**state, "features.5.gate.weight": torch.zeros(3)})
    del state["features.8.branch1.1.1.1.running_var"]
    with pytest.raises(ValueError, match=r"no 'features\.8\.branch1\.1\.1\.1\.running_var'"):
        import_s3d(state)


def test_wrapped_state_dicts_are_unwrapped_and_pickles_only_give_tensors(s3d, tmp_path):
    theirs, _ = s3d
    state = theirs.state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # a DDP checkpoint
    loaded, origin = load_public_state_dict("s3d", path=path)
    assert origin == str(path) and set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    class Payload:  # what weights_only refuses to unpickle: any object other than tensors and containers
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"state_dict": state, "extra": Payload()}, path)
    with pytest.raises(ValueError, match=r"checkpoint\.pth: refused to load: it holds objects other than tensors"):
        load_public_state_dict("s3d", path=path)


def _load_tool():
    spec = importlib.util.spec_from_file_location("import_weights_tool", ROOT / "tools" / "import_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
