"""Public pretrained weights under video_ens names: torchvision's (and timm's) ResNet-152 and torchvision's S3D.

Each importer takes the source's state dict (no torchvision import here) and returns an `Imported`: a baseline
state dict (`base.*`, `branches.0.*`) that `model.init_from` loads (video_ens/weights.py writes it as safetensors;
tools/import_weights.py is the command line), the preset and build keywords it fits, and the init_exclude patterns
for what the source has no counterpart of. A source name the importer does not know is an error naming it: a
silently dropped tensor would leave a layer at its random initialisation.

Differences of architecture, and what the import does about each, are listed in RESNET_DIFFERENCES and
S3D_DIFFERENCES (tools/import_weights.py prints them).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from . import builder_arguments, s3dg

# Where torchvision publishes the weights (torchvision.models: ResNet152_Weights, S3D_Weights). The hex part of a file
# name is the start of its SHA-256, which torch.hub checks on download.
TORCHVISION_WEIGHTS: dict[str, dict[str, str]] = {
    "resnet152": {
        "IMAGENET1K_V1": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
        "IMAGENET1K_V2": "https://download.pytorch.org/models/resnet152-f82ba261.pth",
    },
    "s3d": {"KINETICS400_V1": "https://download.pytorch.org/models/s3d-d76dad2f.pth"},
}


class Imported(NamedTuple):
    state: dict[str, torch.Tensor]
    """The weights under video_ens names, as a one-branch (baseline) model holds them: fp32, contiguous."""
    model: str
    """The preset to build (model.name)."""
    build: dict
    """Builder keywords that differ from the preset's (num_classes, units, ...), for the recipe's model section."""
    exclude: tuple[str, ...]
    """model.init_exclude patterns for the model's tensors the source has no counterpart of."""
    dropped: tuple[str, ...]
    """Source names not carried over (why: the DIFFERENCES list)."""
    differences: tuple[str, ...]
    """Every architecture difference between the source and video_ens's network, and what the import does."""


def _unknown(names, what: str) -> ValueError:
    names = sorted(names)
    return ValueError(
        f"{len(names)} tensor(s) of the source are not part of {what}, e.g. {', '.join(names[:5])}: this is another "
        "architecture (or a wrapped state dict); nothing was imported"
    )


def _tensor(state: dict, name: str, what: str) -> torch.Tensor:
    if name not in state:
        raise ValueError(f"the source has no {name!r}: not a state dict of {what}")
    return state[name].detach().to("cpu").contiguous()


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous() if t.is_floating_point() else t.clone()


_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# ---------------------------------------------------------------------------------------------------------- ResNet

RESNET_DIFFERENCES = (
    "stride placement: torchvision (ResNet v1.5, also timm's resnet152) subsamples in the first unit of layer2-4, "
    "on its 3x3 conv and its projection shortcut; video_ens follows the paper's TF-slim v1, which subsamples in the "
    "last unit of block1-3 (3x3 conv, identity shortcut taken every second pixel) and never in block4. Every "
    "tensor has the same shape unit by unit, so each lands where torchvision has it, but 6 of ResNet-152's 50 units "
    "run at another resolution (torchvision's layer2-4 first units, video_ens's block1-3 last units): the imported "
    "network is not torchvision's function, a starting point for fine-tuning rather than a drop-in copy. Given the "
    "same input, the stem and the other 44 units compute what torchvision's do (tests/unit/test_importers.py)",
    "activation: video_ens's bottleneck applies ReLU6 after its first two convs (slim), torchvision ReLU: equal "
    "below 6, larger activations are clipped; the weights are copied unchanged",
    "BatchNorm: eps 1e-5 and momentum 0.1 in both; weights and running statistics copied as they are",
    "classifier: global average pool and fc 2048 -> classes with bias in both: copied (for other classes, "
    "init_exclude 'branches.*.fc.*')",
    "stem: the same 7x7/2 conv, BN, ReLU and 3x3/2 max-pool (padding 1): copied",
    "input: both expect ImageNet mean/std normalisation, which video_ens's image pipeline applies",
)

_RESNET_UNIT = re.compile(r"^layer(\d+)\.(\d+)\.(conv[123]\.weight|bn[123]\.\w+|downsample\.[01]\.\w+)$")
# What the target presets build, which the imported tensors must land in: e.g. resnet152 forks after block2, so
# block1-2 go to the base and block3-4 to the branch.
_RESNET = builder_arguments("resnet152")
_RESNET_BASE_BLOCKS = int(_RESNET["fork"].removeprefix("block"))


def import_resnet(state: dict[str, torch.Tensor]) -> Imported:
    """A torchvision (or timm, default variant) bottleneck ResNet state dict (resnet50/101/152: the same names) as
    video_ens's ResNet. Refuses BasicBlock ResNets (18, 34) and timm's deep-stem / avg-down variants by name."""
    what = "a torchvision bottleneck ResNet (conv1, bn1, layerK.U.conv1-3/bn1-3/downsample, fc)"
    out: dict[str, torch.Tensor] = {}
    unknown = []
    units: dict[int, int] = {}
    for name, value in state.items():
        value = _fp32(value.detach().to("cpu"))
        if name == "conv1.weight" or name.startswith("bn1."):
            key = "conv.weight" if name == "conv1.weight" else "bn." + name.split(".", 1)[1]
            out[f"base.stem.{key}"] = value
        elif name in ("fc.weight", "fc.bias"):
            out[f"branches.0.{name}"] = value
        elif m := _RESNET_UNIT.match(name):
            block, unit, rest = int(m[1]), int(m[2]), m[3]
            units[block] = max(units.get(block, 0), unit + 1)
            rest = rest.replace("downsample.0.", "shortcut.conv.").replace("downsample.1.", "shortcut.bn.")
            part = "base" if block <= _RESNET_BASE_BLOCKS else "branches.0"
            out[f"{part}.block{block}.unit{unit + 1}.{rest}"] = value
        else:
            unknown.append(name)
    if unknown:
        raise _unknown(unknown, what)
    if sorted(units) != [1, 2, 3, 4]:
        raise ValueError(f"expected layer1..layer4 in the source, found {sorted(units)}: not {what}")
    for block, count in units.items():
        for unit in range(count):
            if f"layer{block}.{unit}.conv3.weight" not in state:
                raise ValueError(
                    f"layer{block}.{unit} has no conv3: a BasicBlock ResNet (18/34); video_ens builds bottleneck "
                    "ResNets only"
                )
    for name in ("conv1.weight", "fc.weight", "fc.bias"):
        _tensor(state, name, what)
    widths = tuple(int(state[f"layer{b}.0.conv1.weight"].shape[0]) for b in range(1, 5))
    build = {
        "units": tuple(units[b] for b in range(1, 5)),
        "widths": widths,
        "stem_width": int(state["conv1.weight"].shape[0]),
        "num_classes": int(state["fc.weight"].shape[0]),
    }
    build = {k: v for k, v in build.items() if v != _RESNET[k]}
    return Imported(out, "resnet152", build, (), (), RESNET_DIFFERENCES)


# ------------------------------------------------------------------------------------------------------------ S3D

S3D_BN_EPS = 1e-3  # torchvision's S3D BatchNorm eps (norm_layer=partial(BatchNorm3d, eps=0.001, momentum=0.001))

S3D_DIFFERENCES = (
    "first layer: torchvision's Conv2d_1a is separable (1x7x7 conv stride (1,2,2) + BN + ReLU, then 7x1x1 conv "
    "stride (2,1,1) + BN + ReLU); video_ens's, as slim's S3D-G, one full 3x7x7 conv with stride 2. There is no "
    "exact mapping: it is left out of the file (init_exclude 'base.Conv2d_1a.*' keeps its fresh initialisation), "
    "so fine-tune before relying on the features",
    "temporal convs of the separable units: torchvision's have no bias and a BN + ReLU after them; slim's (ours) a "
    "bias and no BN. The BN's running statistics are folded into the conv (W * gamma / sqrt(var + eps), bias = "
    "beta - mean * gamma / sqrt(var + eps)): the same function in eval mode",
    "feature gates: torchvision's S3D has none; S3D-G gates Conv2d_2c and every inception path. The gates are "
    "written as zeros, so each multiplies by sigmoid(0) = 1/2, and the convs that read a gated output (the four "
    "input convs of every inception block and the classifier) are doubled: from Conv2d_2b to the logits the "
    "imported network computes torchvision's function exactly (tests/unit/test_importers.py), and the gates learn "
    "from there",
    "BatchNorm: eps 1e-3 in both, copied; torchvision's momentum 0.001 (slim's decay 0.999) is a training setting, "
    "video_ens uses 0.1 (video_ens/models/s3dg.py says why)",
    "classifier: avg-pool 2x7x7 stride 1, dropout 0.2, 1x1x1 conv 1024 -> 400 with bias, mean over positions in "
    "both: copied (doubled, see the gates); for other classes init_exclude 'branches.*.Logits.conv.*'",
    "input: torchvision's video weights expect the Kinetics mean/std (0.432, 0.395, 0.376) / (0.228, 0.221, 0.217), "
    "video_ens normalises clips with 0.45 / 0.225; only the first layer, which is not imported, sees it directly",
)

# torchvision's `features` index -> our layer; the max-pools (1, 4, 7, 13) hold no tensors.
_S3D_FEATURES = {
    0: "Conv2d_1a",
    2: "Conv2d_2b",
    3: "Conv2d_2c",
    5: "Mixed_3b",
    6: "Mixed_3c",
    8: "Mixed_4b",
    9: "Mixed_4c",
    10: "Mixed_4d",
    11: "Mixed_4e",
    12: "Mixed_4f",
    14: "Mixed_5b",
    15: "Mixed_5c",
}
_S3D = builder_arguments("s3dg")  # its fork (the base runs up to it) and its classes


def import_s3d(state: dict[str, torch.Tensor]) -> Imported:
    """torchvision's `s3d` state dict as video_ens's S3D-G (baseline)."""
    what = "torchvision's S3D (features.0-15, classifier.1)"
    src = {k: v.detach().to("cpu") for k, v in state.items()}
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return _fp32(_tensor(src, name, what))

    def unit(ours: str, theirs: str, scale: float = 1.0) -> None:  # Conv3dNormActivation -> Unit3d
        out[f"{ours}.conv.weight"] = take(f"{theirs}.0.weight") * scale
        for key in _BN:
            out[f"{ours}.bn.{key}"] = take(f"{theirs}.1.{key}")

    def separable(ours: str, theirs: str) -> None:  # TemporalSeparableConv -> SepConv3d, temporal BN folded
        out[f"{ours}.spatial.weight"] = take(f"{theirs}.0.0.weight")
        for key in _BN:
            out[f"{ours}.bn.{key}"] = take(f"{theirs}.0.1.{key}")
        weight = take(f"{theirs}.1.0.weight").double()  # (C, C, 3, 1, 1); folded in float64, stored as fp32
        gamma, beta, mean, var = (take(f"{theirs}.1.1.{k}").double() for k in _BN[:4])
        take(f"{theirs}.1.1.num_batches_tracked")  # a counter of the folded BN: nothing to carry
        scale = gamma / torch.sqrt(var + S3D_BN_EPS)  # (C,)
        out[f"{ours}.temporal.weight"] = (weight * scale[:, None, None, None, None]).float()
        out[f"{ours}.temporal.bias"] = (beta - mean * scale).float()

    def gate(ours: str, channels: int) -> None:
        out[f"{ours}.gate.weight"] = torch.zeros(channels, channels, 1, 1, 1)

    fork = s3dg.LAYER_NAMES.index(_S3D["fork"])
    for index, layer in _S3D_FEATURES.items():
        part = "base" if s3dg.LAYER_NAMES.index(layer) <= fork else "branches.0"
        ours, theirs = f"{part}.{layer}", f"features.{index}"
        if layer == "Conv2d_1a":
            continue  # no counterpart (S3D_DIFFERENCES); its source tensors are listed as dropped below
        if layer == "Conv2d_2b":
            unit(ours, theirs)
        elif layer == "Conv2d_2c":
            separable(f"{ours}.Conv2d_2c_3x3", theirs)
            gate(ours, out[f"{ours}.Conv2d_2c_3x3.temporal.bias"].numel())
        else:  # an inception block; its input is a gated output (Conv2d_2c's or the previous block's): doubled
            unit(f"{ours}.Branch_0.Conv3d_0a_1x1", f"{theirs}.branch0", 2.0)
            for b in (1, 2):
                unit(f"{ours}.Branch_{b}.Conv3d_0a_1x1", f"{theirs}.branch{b}.0", 2.0)
                separable(f"{ours}.Branch_{b}.Conv3d_0b_3x3", f"{theirs}.branch{b}.1")
            unit(f"{ours}.Branch_3.Conv3d_0b_1x1", f"{theirs}.branch3.1", 2.0)
            for b, last in (
                (0, "Conv3d_0a_1x1.bn"),
                (1, "Conv3d_0b_3x3.temporal"),
                (2, "Conv3d_0b_3x3.temporal"),
                (3, "Conv3d_0b_1x1.bn"),
            ):
                gate(f"{ours}.Branch_{b}", out[f"{ours}.Branch_{b}.{last}.bias"].numel())
    out["branches.0.Logits.conv.weight"] = take("classifier.1.weight") * 2.0  # reads Mixed_5c's gated output
    out["branches.0.Logits.conv.bias"] = take("classifier.1.bias")
    dropped = sorted(k for k in src if k.startswith("features.0."))
    unknown = set(src) - used - set(dropped)
    if unknown:
        raise _unknown(unknown, what)
    num_classes = int(out["branches.0.Logits.conv.bias"].numel())
    build = {} if num_classes == _S3D["num_classes"] else {"num_classes": num_classes}
    return Imported(out, "s3dg", build, ("base.Conv2d_1a.*",), tuple(dropped), S3D_DIFFERENCES)


IMPORTERS = {"resnet152": import_resnet, "s3d": import_s3d}
"""Source architecture -> importer. "resnet152" takes any torchvision / timm bottleneck ResNet of the same layout."""
