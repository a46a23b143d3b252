"""S3D-G (Xie et al. 2018) for Kinetics-400, as a single network or a multi-headed EnsembleNet.

The layers follow the tf-slim `nets/s3dg.py` defaults (architecture.md section 2):

    Conv2d_1a   full 3-D conv 3x7x7, stride 2            -> 64 x 32 x 112 x 112   (at 3 x 64 x 224 x 224)
    MaxPool_2a  1x3x3, stride (1,2,2)                     -> 64 x 32 x 56 x 56
    Conv2d_2b   1x1x1                                     -> 64
    Conv2d_2c   separable 3x3x3 + gate                    -> 192 x 32 x 56 x 56
    MaxPool_3a  1x3x3, stride (1,2,2)                     -> 192 x 32 x 28 x 28
    Mixed_3b, Mixed_3c                                    -> 480 x 32 x 28 x 28
    MaxPool_4a  3x3x3, stride 2                           -> 480 x 16 x 14 x 14   <- default fork
    Mixed_4b .. Mixed_4f                                  -> 832 x 16 x 14 x 14
    MaxPool_5a  2x2x2, stride 2                           -> 832 x 8 x 7 x 7
    Mixed_5b, Mixed_5c                                    -> 1024 x 8 x 7 x 7
    Logits      avg-pool 2x7x7 VALID, dropout, 1x1x1 conv with bias, mean over time -> 400

The multi-headed version keeps Conv2d_1a .. `fork` as the shared base and gives every branch its own copy of the
layers after it, with each conv width c replaced by round(c * width_ratio), plus its own Logits. With
width_ratio = 1/1.5 (the default for num_branches > 1) this reproduces the paper's (64, 192, 480) base and
554-wide Mixed_4f/MaxPool_5a, so `create_model("s3dg", num_branches=2)` is s3dg_ens2.

Sizes, counted with BN folded (one value per BN channel) and FLOPs as 2 x MAC at 1 x 3 x 64 x 224 x 224:
    s3dg        9,518,848 parameters, 128.37B FLOPs
    s3dg_ens2   8,844,150 parameters, 125.98B FLOPs (base 1,065,968 + 2 x 3,889,091)

Padding. TF 'SAME' gives every layer an output length of ceil(n / stride). The paddings below give the same
lengths for every input length n >= 1, so the shapes match slim exactly. On even lengths (all of them at
64 x 224 x 224) the windows of the stride-2 convs and 3-wide pools sit one position earlier than TF's, which puts
the odd pad element at the end; that only matters when importing slim weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import feature_gate
from ..model_options import S3DG_LAYERS, S3DGOptions
from .ensemble import EnsembleNet, ModelOutput, resolve_width_ratio
from .layers import init_conv_weights

# slim's batch_norm_epsilon. Its decay of 0.999 (momentum 0.001 here) is not copied: with a 1,000-step time constant
# the running statistics of a short or tiny run would stay near their initial values; PyTorch's 0.1 is used.
BN_EPS = 1e-3

# Every layer in order; the branches start right after `fork`, which must be one of these names. The list lives with
# S3DGOptions, which the recipe check reads without torch.
LAYER_NAMES: tuple[str, ...] = S3DG_LAYERS

# Inception widths (a, b1, b2, c1, c2, d): Branch_0 1x1x1 -> a; Branch_1 1x1x1 -> b1, sep 3x3x3 -> b2;
# Branch_2 1x1x1 -> c1, sep 3x3x3 -> c2; Branch_3 max-pool, 1x1x1 -> d. Output a + b2 + c2 + d channels.
MIXED_WIDTHS: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class FeatureGate(nn.Module):
    """S3D-G self-gating, y = x * sigmoid(W mean_THW(x)); C^2 parameters, no bias.

    The weight is stored as a (C, C, 1, 1, 1) conv weight so a fused kernel can replace the reference op with the
    same state dict.
    """

    def __init__(self, channels: int, *, kernels: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels, 1, 1, 1))
        self.kernels = kernels  # video_ens.kernels impl (S3DGOptions.kernels); not part of the state dict
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The gate is a 1x1x1 conv, so it starts like one: nn.Conv3d's default kaiming-uniform.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> same
        return feature_gate(x, self.weight, impl=self.kernels)


class Unit3d(nn.Module):
    """Conv3d without bias, BN, ReLU; padding k // 2 keeps the 'SAME' output length ceil(n / stride)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: int | tuple[int, int, int] = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=False)
        self.bn = nn.BatchNorm3d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class SepConv3d(nn.Module):
    """The separable 3x3x3 unit: 1x3x3 conv + BN + ReLU, then 3x1x1 conv with bias and no BN, then ReLU.

    The temporal conv starts as the identity (slim's "center" initialiser: centre tap = I, other taps and the
    bias 0), so at initialisation the unit acts as a 2-D conv per frame and temporal mixing is learnt from there.
    The builder re-applies this after any conv_init, as slim's explicit initialiser overrides its arg scope.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.spatial = nn.Conv3d(cin, cout, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn = nn.BatchNorm3d(cout, eps=BN_EPS)
        self.temporal = nn.Conv3d(cout, cout, (3, 1, 1), padding=(1, 0, 0), bias=True)
        self.reset_temporal()

    @torch.no_grad()
    def reset_temporal(self) -> None:
        w = self.temporal.weight  # (C, C, 3, 1, 1)
        w.zero_()
        torch.diagonal(w[:, :, w.shape[2] // 2, 0, 0]).fill_(1.0)
        self.temporal.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.spatial(x)), inplace=True)
        return F.relu(self.temporal(x), inplace=True)


class InceptionBlock(nn.Module):
    """Four gated paths concatenated on channels; submodule names follow slim's checkpoint scopes."""

    def __init__(self, cin: int, widths: tuple[int, int, int, int, int, int], *, kernels: str) -> None:
        super().__init__()
        a, b1, b2, c1, c2, d = widths
        gate = dict(kernels=kernels)
        self.Branch_0 = nn.Sequential(OrderedDict(Conv3d_0a_1x1=Unit3d(cin, a), gate=FeatureGate(a, **gate)))
        self.Branch_1 = nn.Sequential(
            OrderedDict(Conv3d_0a_1x1=Unit3d(cin, b1), Conv3d_0b_3x3=SepConv3d(b1, b2), gate=FeatureGate(b2, **gate))
        )
        self.Branch_2 = nn.Sequential(
            OrderedDict(Conv3d_0a_1x1=Unit3d(cin, c1), Conv3d_0b_3x3=SepConv3d(c1, c2), gate=FeatureGate(c2, **gate))
        )
        self.Branch_3 = nn.Sequential(
            OrderedDict(
                MaxPool3d_0a_3x3=nn.MaxPool3d(3, stride=1, padding=1),
                Conv3d_0b_1x1=Unit3d(cin, d),
                gate=FeatureGate(d, **gate),
            )
        )
        self.out_channels = a + b2 + c2 + d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = (self.Branch_0, self.Branch_1, self.Branch_2, self.Branch_3)
        return torch.cat([p(x) for p in paths], dim=1)  # (B, a + b2 + c2 + d, T, H, W)


class Logits(nn.Module):
    """Avg-pool 2x7x7 (stride 1, VALID), dropout, 1x1x1 conv with bias, then the mean over time.

    Short or small inputs: the pool window is clamped to the input, so an 8-frame clip (1 frame after
    MaxPool_5a) or a 64-pixel one (2x2 after MaxPool_5a) still gives logits. Inputs larger than 224 leave more
    than one spatial position after the pool (slim would fail on its squeeze); those are averaged like time.
    """

    def __init__(self, cin: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.conv = nn.Conv3d(cin, num_classes, 1, bias=True)

    @staticmethod
    def _windows(x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C, T', H', W'): 7x1x1 at 224
        t, h, w = x.shape[-3:]
        return F.avg_pool3d(x, (min(2, t), min(7, h), min(7, w)), stride=1)

    def per_timestep(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, classes, T'), T' = T - 1 for T >= 2: one logit vector per pooled window."""
        x = self.conv(self.dropout(self._windows(x)))  # (B, classes, T', H', W')
        return x.mean(dim=(3, 4))  # (B, classes, T')

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, classes)
        return self.per_timestep(x).mean(dim=2)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C): the classifier's input averaged over the windows its logits are averaged
        over. The 1x1x1 conv is linear, so in eval mode forward(x) = conv(pooled(x)) up to rounding."""
        return self._windows(x).mean(dim=(2, 3, 4))


class S3DGBranch(nn.Sequential):
    """The layers after the fork, then Logits; a plain Sequential to forward and to the checkpoint format."""

    def embed(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features (B, C_last), logits (B, classes)); the logits are forward's, bit for bit."""
        *trunk, head = self.children()
        for layer in trunk:
            h = layer(h)
        return head.pooled(h), head(h)


class S3DGNet(EnsembleNet):
    """S3D-G as an EnsembleNet, plus the one thing only it offers: an exact forward over a long clip in windows."""

    def full_clip_forward(self, x: torch.Tensor, *, max_chunk_frames: int | None) -> ModelOutput:
        """`self(x)` for a whole clip x (B, 3, T, H, W), run in temporal windows of at most `max_chunk_frames` frames
        wherever the network is local in time; see video_ens.models.s3dg_chunked."""
        from .s3dg_chunked import full_clip_forward  # here: s3dg_chunked imports this module's layer classes

        return full_clip_forward(self, x, max_chunk_frames=max_chunk_frames)


def _make_layer(name: str, cin: int, width: Callable[[int], int], kernels: str) -> tuple[nn.Module, int]:
    """One named layer and its output channels; `width` maps a baseline conv width to the one to build, `kernels`
    is its gates' implementation."""
    if name in MIXED_WIDTHS:
        block = InceptionBlock(cin, tuple(width(c) for c in MIXED_WIDTHS[name]), kernels=kernels)
        return block, block.out_channels
    if name == "Conv2d_1a":
        return Unit3d(cin, width(64), (3, 7, 7), stride=2), width(64)
    if name == "Conv2d_2b":
        return Unit3d(cin, width(64)), width(64)
    if name == "Conv2d_2c":
        cout = width(192)
        return nn.Sequential(
            OrderedDict(Conv2d_2c_3x3=SepConv3d(cin, cout), gate=FeatureGate(cout, kernels=kernels))
        ), cout
    if name in ("MaxPool_2a", "MaxPool_3a"):
        return nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), cin
    if name == "MaxPool_4a":
        return nn.MaxPool3d(3, stride=2, padding=1), cin
    if name == "MaxPool_5a":
        # 'SAME' needs no padding for even lengths (16 -> 8, 14 -> 7); ceil_mode gives ceil(n / 2) for odd ones.
        return nn.MaxPool3d(2, stride=2, padding=0, ceil_mode=True), cin
    raise AssertionError(f"no constructor for layer {name!r}")


def _stack(
    names: tuple[str, ...], cin: int, width: Callable[[int], int], kernels: str
) -> tuple[list[tuple[str, nn.Module]], int]:
    layers = []
    for name in names:
        layer, cin = _make_layer(name, cin, width, kernels)
        layers.append((name, layer))
    return layers, cin


def _scaled(c: int, ratio: float) -> int:
    """round(c * ratio), at least 1. Python's round: 208 / 1.5 = 138.67 -> 139, as in architecture.md 2.3."""
    return c if ratio == 1.0 else max(1, round(c * ratio))


def build(
    *,
    num_branches: int = 1,
    width_ratio: float | None = None,
    fork: str = "MaxPool_4a",
    num_classes: int = 400,
    dropout: float = 0.2,
    conv_init: str = "default",
    conv_init_std: float = 0.03,
    options: S3DGOptions | None = None,
) -> EnsembleNet:
    """S3D-G with `num_branches` heads forking after layer `fork`; input (B, 3, T, H, W), output (N, B, classes).

    Args (the common ones are described in video_ens.models):
        width_ratio: every branch conv width c becomes round(c * width_ratio). None (the default): 1.0 when
            num_branches == 1 (the baseline network), 1/1.5 when num_branches > 1 (the paper's 554 widths).
        fork: a name from LAYER_NAMES; the base runs Conv2d_1a .. fork, each branch the layers after it.
        dropout: before each classifier; 0.2 is slim's keep probability of 0.8.
        conv_init: "normal" draws every conv weight and gate weight from N(0, conv_init_std^2); the temporal
            convs are set back to the identity afterwards either way.
        options: S3D-G's own fields (video_ens.model_options.S3DGOptions, checked there; None: its defaults):
            frames and size, the clip recorded in input_spec; widths_scale, which multiplies every width before
            width_ratio applies to the branches (1/8: the tiny presets); kernels, the feature gates' implementation.
    """
    if not (isinstance(num_branches, int) and num_branches >= 1):
        raise ValueError(f"num_branches must be an int >= 1, got {num_branches!r}")
    if fork not in LAYER_NAMES:
        raise ValueError(f"fork {fork!r} is not an S3D-G layer: use one of {', '.join(LAYER_NAMES)}")
    width_ratio = resolve_width_ratio(width_ratio, num_branches)
    options = options if options is not None else S3DGOptions()
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")

    split = LAYER_NAMES.index(fork) + 1
    scale, kernels = options.widths_scale, options.kernels
    base_layers, fork_channels = _stack(LAYER_NAMES[:split], 3, lambda c: _scaled(c, scale), kernels)
    branches = []
    for _ in range(num_branches):
        layers, cout = _stack(
            LAYER_NAMES[split:], fork_channels, lambda c: _scaled(_scaled(c, scale), width_ratio), kernels
        )
        layers.append(("Logits", Logits(cout, num_classes, dropout)))
        branches.append(S3DGBranch(OrderedDict(layers)))
    model = S3DGNet(
        nn.Sequential(OrderedDict(base_layers)),
        branches,
        output_type="logits",
        activation="softmax",
        input_spec={"kind": "clip", "frames": options.frames, "size": options.size},
    )

    init_conv_weights(model, conv_init=conv_init, conv_init_std=conv_init_std)
    for m in model.modules():
        if conv_init == "normal" and isinstance(m, FeatureGate):
            nn.init.normal_(m.weight, mean=0.0, std=conv_init_std)
        if isinstance(m, SepConv3d):
            m.reset_temporal()
    return model
