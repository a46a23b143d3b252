"""Small pieces every family uses."""

from __future__ import annotations

from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def init_conv_weights(module: nn.Module, *, conv_init: str = "default", conv_init_std: float = 0.03) -> None:
    """Initialise every conv weight of `module` in place.

    conv_init="default" keeps PyTorch's initialisation; "normal" draws every conv weight from N(0, std^2), the
    paper's choice for ResNet (section 4.1: "All convolutional weights are initialized using the same normal
    distribution with standard deviation of 0.03"). Biases are left as they are.
    """
    if conv_init == "default":
        return
    if conv_init != "normal":
        raise ValueError(f"conv_init must be 'default' or 'normal', got {conv_init!r}")
    if not conv_init_std > 0:
        raise ValueError(f"conv_init_std must be > 0, got {conv_init_std}")
    for m in module.modules():
        if isinstance(m, _CONVS):
            nn.init.normal_(m.weight, mean=0.0, std=conv_init_std)
