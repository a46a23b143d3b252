"""ResNet-152 and SE-ResNet-152 (ImageNet; paper section 4.1), single or multi-headed.

    image (B, 3, H, W) --stem--block1--block2--> (B, 512, H/16, W/16)          = base (fork="block2")
        --block3--block4--GAP--fc--> logits (B, C)                              per branch

ResNet v1 with post-activation, following TF-slim's `resnet_v1` (architecture.md section 4.1):
* stem: 7x7/2 conv, BN, ReLU, then a 3x3/2 max-pool;
* bottleneck unit (width b, output 4b): 1x1 -> b, BN, ReLU6; 3x3 -> b (the unit's stride), BN, ReLU6;
  1x1 -> 4b, BN; optional squeeze-excitation; add the shortcut; ReLU;
* a block subsamples in its *last* unit, on the 3x3 conv; block strides are (2, 2, 2, 1). This placement is what
  gives the paper's 21.8B FLOPs: torchvision's "v1.5" (stride on the first unit's 3x3) runs block1..3's first units
  at twice the resolution and costs 23.0B (+5.6%).
* shortcut: a 1x1 conv (with the unit's stride) + BN where the channel count changes, i.e. in a block's first unit;
  otherwise the identity, subsampled by a 1x1 max-pool when the unit strides.

All convs are bias-free (BN supplies the shift); the classifier is a global average pool and an FC with bias.
Sizes with BN folded (one value per BN channel): ResNet-152 60,117,096 parameters / 21.813B FLOPs (2 MAC),
two-branch (176, 352) 58,160,976 / 20.991B; SE-ResNet-152 66,746,136 / 64,463,088.

Padding: TF 'SAME' with stride 2 pads (0, 1) or (1, 1); symmetric k//2 padding gives the same output shapes for
every size used here (224 -> 112 -> 56 -> 28 -> 14 -> 7), so the counts agree, although the windows of the stem's
max-pool are shifted by one pixel against TF's.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..model_options import ResNetOptions
from .ensemble import EnsembleNet, resolve_width_ratio
from .layers import init_conv_weights

EXPANSION = 4  # a bottleneck's output is 4x its 3x3 width, also inside the narrower branches


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(cout)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation with BN (Hu et al. 2018; the paper's "BN in the SE layers").

        y = x * sigmoid(BN(W2 ReLU(BN(W1 mean_HW(x)))))

    W1 is a 1x1 conv C -> C/r and W2 one C/r -> C, both bias-free. Folded, the unit holds C^2/8 + C/16 + C values
    at r = 16, the same as Hu et al.'s version with biases.
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce, self.reduce_bn = _conv_bn(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand, self.expand_bn = _conv_bn(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        s = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        s = self.relu(self.reduce_bn(self.reduce(s)))  # (B, C/r, 1, 1)
        s = self.expand_bn(self.expand(s))  # (B, C, 1, 1)
        return x * torch.sigmoid(s)


class Projection(nn.Module):
    """Shortcut where the channel count changes: a strided 1x1 conv and BN."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv, self.bn = _conv_bn(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Subsample(nn.Module):
    """Identity shortcut of a strided unit: every s-th pixel, as slim's 1x1 max-pool with stride s.

    A strided view instead of a pooling kernel: same values, no FLOPs. Counting it as a free view (not as a
    pool of 1 FLOP per output, 0.35M on ResNet-152) is also what reproduces architecture.md's "+ew" column.
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))
        return x[:, :, :: self.stride, :: self.stride]


class Bottleneck(nn.Module):
    """One residual unit: 1x1 (b) -> 3x3 (b, stride here) -> 1x1 (4b) [-> SE], plus the shortcut, then ReLU.

    Args:
        cin: input channels. width: b, the 3x3 width; the output has 4b channels.
        stride: 1, or 2 in a block's last unit (applied by conv2 and by the shortcut).
        se: add squeeze-excitation on the residual branch, after conv3's BN. se_reduction: its r.
    """

    def __init__(self, cin: int, width: int, *, stride: int, se: bool, se_reduction: int) -> None:
        super().__init__()
        cout = EXPANSION * width
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        self.act = nn.ReLU6(inplace=True)  # slim's resnet_v1 bottleneck uses ReLU6 inside the unit
        self.se = SqueezeExcite(cout, se_reduction) if se else None
        if cin != cout:
            self.shortcut: nn.Module = Projection(cin, cout, stride)
        elif stride > 1:
            self.shortcut = Subsample(stride)
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W) -> (B, 4b, H/s, W/s)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + self.shortcut(x))


def _block(cin: int, width: int, units: int, stride: int, *, se: bool, se_reduction: int) -> nn.Sequential:
    """`units` bottlenecks named unit1..unitK; only the last one strides."""
    layers = OrderedDict()
    for i in range(units):
        unit_stride = stride if i == units - 1 else 1
        unit_cin = cin if i == 0 else EXPANSION * width
        layers[f"unit{i + 1}"] = Bottleneck(unit_cin, width, stride=unit_stride, se=se, se_reduction=se_reduction)
    return nn.Sequential(layers)


def _stem(width: int) -> nn.Sequential:
    conv = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    return nn.Sequential(
        OrderedDict(
            conv=conv,
            bn=nn.BatchNorm2d(width),
            relu=nn.ReLU(inplace=True),
            pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
    )


class ResNetBranch(nn.Sequential):
    """The blocks after the fork, then pool, flatten, dropout, fc; a plain Sequential to forward and to the
    checkpoint format."""

    def embed(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features (B, C_last): the output of flatten, before dropout; logits (B, classes)); the logits are
        forward's, bit for bit."""
        features = None
        for name, layer in self.named_children():
            h = layer(h)
            if name == "flatten":
                features = h
        assert features is not None, "a ResNet branch ends in pool, flatten, dropout, fc"
        return features, h


def _check_widths(name: str, values, count: int) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) != count or any(v < 1 for v in values):
        raise ValueError(f"{name} must be {count} positive integers, got {values}")
    return values


def build(
    *,
    num_branches: int = 1,
    width_ratio: float | None = None,
    fork: str = "block2",
    num_classes: int = 1000,
    dropout: float = 0.0,
    conv_init: str = "default",
    conv_init_std: float = 0.03,
    options: ResNetOptions | None = None,
) -> EnsembleNet:
    """(SE-)ResNet v1 as an EnsembleNet: base = stem + blocks up to `fork`, each branch = the rest + GAP + FC.

    Args (beyond the common ones documented in video_ens.models):
        fork: "stem" or "blockK": the last layer of the shared base. The paper forks after block2, so the
            base output is 512 x 14 x 14 at 224^2 (block2's last unit already strides).
        width_ratio: branch block widths are round(b * width_ratio). None (the default): 1.0 when
            num_branches == 1 (the baseline), 1/1.5 when num_branches > 1; the paper's two-branch ResNets state
            their own, 0.6875 (bottlenecks 176, 352).
        options: ResNet's own fields (video_ens.model_options.ResNetOptions, documented there): se and
            se_reduction; widths (the 3x3 width b of every block) and units per block; branch_widths, the widths
            above the fork instead of width_ratio (give one or the other); image_size for input_spec; stem_width.
    """
    o = options if options is not None else ResNetOptions()
    se, se_reduction, branch_widths, stem_width = o.se, o.se_reduction, o.branch_widths, o.stem_width
    num_blocks = len(o.widths)
    widths = _check_widths("widths", o.widths, num_blocks)
    units = _check_widths("units", o.units, num_blocks)
    forks = o.forks()
    if fork not in forks:
        raise ValueError(f"fork must be one of {forks} (the last layer of the shared base), got {fork!r}")
    if num_branches < 1:
        raise ValueError(f"num_branches must be >= 1, got {num_branches}")
    if branch_widths is not None and width_ratio is not None:
        raise ValueError(
            f"give branch_widths or width_ratio, not both (got {branch_widths!r} and {width_ratio}): "
            "branch_widths already fixes every branch width"
        )
    width_ratio = resolve_width_ratio(width_ratio, num_branches)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")

    in_base = forks.index(fork)  # blocks 1..in_base are shared
    above = num_blocks - in_base
    if branch_widths is None:
        branch_widths = tuple(max(1, round(w * width_ratio)) for w in widths[in_base:])
    branch_widths = _check_widths(f"branch_widths (one per block above fork={fork!r})", branch_widths, above)
    # slim: every block subsamples by 2 in its last unit except the last block (output stride 32).
    strides = (2,) * (num_blocks - 1) + (1,)
    unit_kw = dict(se=se, se_reduction=se_reduction)

    base = OrderedDict(stem=_stem(stem_width))
    channels = stem_width
    for i in range(in_base):
        base[f"block{i + 1}"] = _block(channels, widths[i], units[i], strides[i], **unit_kw)
        channels = EXPANSION * widths[i]

    def make_branch() -> ResNetBranch:
        layers = OrderedDict()
        cin = channels
        for j, width in enumerate(branch_widths):
            i = in_base + j
            layers[f"block{i + 1}"] = _block(cin, width, units[i], strides[i], **unit_kw)
            cin = EXPANSION * width
        layers["pool"] = nn.AdaptiveAvgPool2d(1)  # (B, C, 1, 1)
        layers["flatten"] = nn.Flatten(1)  # (B, C)
        layers["dropout"] = nn.Dropout(dropout)
        layers["fc"] = nn.Linear(cin, num_classes)
        return ResNetBranch(layers)

    model = EnsembleNet(
        nn.Sequential(base),
        [make_branch() for _ in range(num_branches)],
        output_type="logits",
        activation="softmax",
        input_spec={"kind": "image", "size": o.image_size},
    )
    init_conv_weights(model, conv_init=conv_init, conv_init_std=conv_init_std)
    return model
