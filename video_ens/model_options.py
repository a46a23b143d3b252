"""Each model family's own options as a typed dataclass, and every preset, in one module that imports no torch.

A recipe's `model` section has the fields common to every family (MODEL_FIELDS, video_ens.sections.ModelConfig)
and `options`, the fields of its family's dataclass below: S3DGOptions, DBoFOptions or ResNetOptions. The recipe
check (video_ens.sections, which runs before torch is imported) types `model.options` by that dataclass with the
converter every section goes through, and `split_kwargs` builds the same dataclass for each builder
(video_ens/models/<family>.py `build(..., options=...)`), so a field such as `kernels` is declared and checked here
once and read by the builder, which hands it to every gate's constructor.

PRESETS is the one table of named configurations: the paper's eight and tiny ones for tests and CPU demos.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from .typed_json import check

KERNEL_IMPLS = ("auto", "triton", "reference")
"""The `kernels` option, video_ens.kernels `impl`: "reference" (plain PyTorch), "triton" (the fused kernels, or an
error saying why they cannot run) or "auto" (Triton on CUDA tensors when it imports, the reference otherwise)."""

MODEL_FIELDS = ("num_branches", "width_ratio", "fork", "num_classes", "dropout", "conv_init", "conv_init_std")
"""Builder keywords common to every family: fields of the recipe's model section, not of model.options."""


def _check_kernels(kernels: str) -> None:
    check(kernels in KERNEL_IMPLS, "kernels", f"kernels must be one of {KERNEL_IMPLS}, got {kernels!r}")


S3DG_LAYERS: tuple[str, ...] = (
    "Conv2d_1a", "MaxPool_2a", "Conv2d_2b", "Conv2d_2c", "MaxPool_3a", "Mixed_3b", "Mixed_3c", "MaxPool_4a",
    "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "MaxPool_5a", "Mixed_5b", "Mixed_5c",
)  # fmt: skip
"""S3D-G's layers in order (video_ens.models.s3dg.LAYER_NAMES); its branches start after `fork`, one of these."""


@dataclass(frozen=True)
class S3DGOptions:
    """S3D-G's own options (video_ens/models/s3dg.py)."""

    frames: int = 64
    """Clip length T the model is meant for, recorded in input_spec; any T >= 1 runs."""
    size: int = 224
    """Clip side H = W the model is meant for, recorded in input_spec; any H, W >= 1 run."""
    widths_scale: float = 1.0
    """Multiplies every conv width, base and branches, before width_ratio applies to the branches (1/8: tiny)."""
    kernels: str = "reference"
    """The feature gates' implementation, one of KERNEL_IMPLS."""

    def __post_init__(self) -> None:
        check(self.widths_scale > 0, "widths_scale", f"widths_scale must be > 0, got {self.widths_scale}")
        _check_kernels(self.kernels)

    def forks(self) -> tuple[str, ...]:
        return S3DG_LAYERS


@dataclass(frozen=True)
class DBoFOptions:
    """DBoF's own options (video_ens/models/dbof.py)."""

    rgb_dim: int = 1024
    """Per-frame rgb feature width; the input is rgb then audio, concatenated."""
    audio_dim: int = 128
    """Per-frame audio feature width."""
    cluster_size: int = 4096
    """K: the cluster layer and first context gate, in the base."""
    hidden_size: int = 4096
    """The baseline's hidden width; branches use round(hidden_size * width_ratio) unless branch_hidden_size is set."""
    num_mixtures: int = 5
    """The baseline's MoE experts per class; branches use branch_mixtures when set."""
    branch_hidden_size: int | None = None
    """A branch's hidden width, fixed instead of derived (dbof_ens2: 3000); give it or model.width_ratio, not both."""
    branch_mixtures: int | None = None
    """A branch's MoE experts per class, fixed instead of num_mixtures (dbof_ens2: 3)."""
    train_frames: int = 25
    """Frames sampled per training video, recorded in input_spec (paper: 25)."""
    max_frames: int = 300
    """The most frames a YouTube-8M video has (one per second), recorded in input_spec."""
    kernels: str = "reference"
    """The context gates' and SWAP's implementation, one of KERNEL_IMPLS."""

    def __post_init__(self) -> None:
        check(self.rgb_dim >= 1, "rgb_dim", f"rgb_dim must be >= 1, got {self.rgb_dim}")
        check(self.audio_dim >= 0, "audio_dim", f"audio_dim must be >= 0, got {self.audio_dim}")
        check(self.cluster_size >= 1, "cluster_size", f"cluster_size must be >= 1, got {self.cluster_size}")
        _check_kernels(self.kernels)

    def forks(self) -> tuple[str, ...]:
        return ("pool",)  # after SWAP pooling: below it every layer is frame-level


@dataclass(frozen=True)
class ResNetOptions:
    """(SE-)ResNet's own options (video_ens/models/resnet.py)."""

    se: bool = False
    """Squeeze-excitation in every unit."""
    se_reduction: int = 16
    """SE reduction r (paper: 16)."""
    widths: tuple[int, ...] = (64, 128, 256, 512)
    """The 3x3 width b of every block (outputs are 4b): the paper's "width config"."""
    units: tuple[int, ...] = (3, 8, 36, 3)
    """Bottleneck units per block (ResNet-152: 3, 8, 36, 3), one per entry of widths."""
    branch_widths: tuple[int, ...] | None = None
    """The 3x3 widths of the blocks above the fork, instead of width_ratio; give one or the other."""
    image_size: int = 224
    """Image side H = W, recorded in input_spec; the network accepts any size."""
    stem_width: int = 64
    """Channels of the 7x7 stem conv."""

    def __post_init__(self) -> None:
        check(len(self.widths) >= 1, "widths", "widths must name at least one block, e.g. (64, 128, 256, 512)")
        check(
            self.se_reduction >= 1 or not self.se, "se_reduction", f"se_reduction must be >= 1, got {self.se_reduction}"
        )
        check(self.stem_width >= 1, "stem_width", f"stem_width must be >= 1, got {self.stem_width}")

    def forks(self) -> tuple[str, ...]:
        return ("stem", *(f"block{i + 1}" for i in range(len(self.widths))))


FamilyOptions = S3DGOptions | DBoFOptions | ResNetOptions

# The tiny S3D-G presets keep every block at 1/8 of the width (Conv2d_1a 8, Mixed_5c 128 channels) for CPU tests
# and demos: 16 frames at 64 x 64 leave 2 x 2 x 2 after MaxPool_5a.
_S3DG_TINY = dict(widths_scale=1 / 8, num_classes=8, frames=16, size=64)
# ResNet's tiny ones have two units per block, so every shortcut kind appears (projection, identity, strided
# identity); 64^2 input gives 16^2 after the stem and 2^2 in block4. Forward + backward of 4 images takes about
# 70 ms on two shared CPU cores.
_RESNET_TINY = dict(widths=(8, 16, 32, 64), units=(2, 2, 2, 2), stem_width=8, num_classes=10, image_size=64)

PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    # S3D-G (architecture.md section 2): 9,518,848 parameters / 128.37B FLOPs; two-branch 8,844,150 / 125.98B.
    "s3dg": (S3DGOptions, dict(num_branches=1)),
    "s3dg_ens2": (S3DGOptions, dict(num_branches=2, width_ratio=1 / 1.5, fork="MaxPool_4a")),
    "s3dg_tiny": (S3DGOptions, dict(num_branches=1, **_S3DG_TINY)),
    "s3dg_tiny_ens2": (S3DGOptions, dict(num_branches=2, width_ratio=1 / 1.5, fork="MaxPool_4a", **_S3DG_TINY)),
    # Paper Table 2 baseline: 229,093,358 parameters (BN folded), 415,121,408 video-level FLOPs.
    "dbof": (DBoFOptions, dict(cluster_size=4096, hidden_size=4096, num_mixtures=5)),
    # Paper Table 2 multi-headed: base cluster-4096, branches (hidden-3000, MoE-3): 226,320,324 / 409,560,000.
    "dbof_ens2": (
        DBoFOptions,
        dict(num_branches=2, cluster_size=4096, hidden_size=4096, branch_hidden_size=3000, branch_mixtures=3),
    ),
    # Tests and CPU demos: the real 1152-d input, so they run on the real data pipeline; forward + backward of
    # 4 videos x 25 frames takes a few ms on one CPU core.
    "dbof_tiny": (DBoFOptions, dict(num_classes=16, cluster_size=64, hidden_size=64, num_mixtures=2)),
    "dbof_tiny_ens2": (
        DBoFOptions,
        dict(num_branches=2, num_classes=16, cluster_size=64, hidden_size=64, branch_hidden_size=48, branch_mixtures=2),
    ),
    # Paper Table 1a baseline: 60,117,096 parameters (BN folded), 21.813B FLOPs (2 MAC) at 224^2.
    "resnet152": (ResNetOptions, dict()),
    # Paper Table 1a multi-headed: base (64, 128), branches (176, 352) = 0.6875 x (256, 512): 58,160,976 / 20.991B.
    "resnet152_ens2": (ResNetOptions, dict(num_branches=2, width_ratio=0.6875)),
    # Paper Table 1b: SE (r = 16) in every unit: 66,746,136 / 21.827B; two-branch 64,463,088 / 21.003B.
    "seresnet152": (ResNetOptions, dict(se=True)),
    "seresnet152_ens2": (ResNetOptions, dict(se=True, num_branches=2, width_ratio=0.6875)),
    "resnet_tiny": (ResNetOptions, dict(_RESNET_TINY)),
    "resnet_tiny_ens2": (ResNetOptions, dict(_RESNET_TINY, num_branches=2, width_ratio=0.6875)),
    "seresnet_tiny": (ResNetOptions, dict(_RESNET_TINY, se=True)),
    "seresnet_tiny_ens2": (ResNetOptions, dict(_RESNET_TINY, se=True, num_branches=2, width_ratio=0.6875)),
}
"""Every model by name: (its family's options class, the keywords it sets: common fields and options)."""


def options_class(name: str) -> type:
    """The options dataclass of preset `name`; ValueError naming the closest preset for an unknown one."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(sorted(PRESETS))}")
    return PRESETS[name][0]


def option_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _is_branch_shape(key: str) -> bool:
    return key == "width_ratio" or key.startswith("branch_")


def model_kwargs(name: str, **overrides) -> dict:
    """The keywords preset `name` builds with, `overrides` replacing them key by key, except that the preset's
    branch shape (width_ratio and branch_* keys) gives way as a whole to a caller who reshapes the branches, so a
    preset's pinned widths never silently win:
      * an explicit width_ratio, or num_branches=1, drops all of the preset's branch shape. num_branches=1 alone
        is then the family's baseline (dbof_ens2 -> dbof's 229,093,358 parameters, resnet152_ens2 -> resnet152);
        width_ratio=r alone scales the baseline widths (dbof_ens2, width_ratio=0.5: hidden 2048, 5 experts);
      * an explicit branch_* key replaces the preset's width_ratio (resnet152_ens2, branch_widths=(100, 200)) as
        well as the same key; the preset's other branch_* keys stay (dbof_ens2, branch_mixtures=5: hidden 3000,
        5 experts);
      * num_branches > 1 keeps the preset's branch shape (resnet152_ens2, num_branches=3: three (176, 352) heads).
    Conflicting explicit keywords (width_ratio with branch_widths or branch_hidden_size) are left for the builder
    to refuse. Raises ValueError for an unknown name.
    """
    options_class(name)
    kwargs = dict(PRESETS[name][1])
    if "width_ratio" in overrides or overrides.get("num_branches") == 1:
        kwargs = {k: v for k, v in kwargs.items() if not _is_branch_shape(k)}
    elif any(_is_branch_shape(k) for k in overrides):
        kwargs.pop("width_ratio", None)
    return {**kwargs, **overrides}


def split_kwargs(name: str, **overrides) -> tuple[dict[str, Any], FamilyOptions]:
    """(the common keywords, the family's options) that preset `name` with `overrides` builds with (model_kwargs).

    TypeError naming the keyword for one that is neither a common field nor an option of the family.
    """
    cls = options_class(name)
    kwargs = model_kwargs(name, **overrides)
    fields = option_names(cls)
    unknown = [k for k in kwargs if k not in MODEL_FIELDS and k not in fields]
    if unknown:
        raise TypeError(
            f"model {name} has no keyword {unknown[0]!r}: its options are {', '.join(fields)} "
            f"({cls.__name__}) and the common fields {', '.join(MODEL_FIELDS)}"
        )
    common = {k: v for k, v in kwargs.items() if k in MODEL_FIELDS}
    return common, cls(**{k: v for k, v in kwargs.items() if k in fields})
