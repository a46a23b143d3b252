"""Every model video_ens ships, by name, and `create_model` to build one.

Each family module (s3dg, dbof, resnet) exposes `build(**kwargs) -> EnsembleNet` and a `PRESETS` dict literal of
named configurations: the paper's eight (`s3dg`, `s3dg_ens2`, `dbof`, `dbof_ens2`, `resnet152`, `resnet152_ens2`,
`seresnet152`, `seresnet152_ens2`) and tiny ones for tests and CPU demos. `MODELS` below is the one table of all of
them; there is no string registry beyond it.

Every builder takes the same common keywords, so turning a network into a multi-headed one is a recipe change:
    num_branches   N (1 = the single baseline network)
    width_ratio    branch width / baseline width for the layers above the fork
    fork           name of the layer after which the branches start
    num_classes    classifier width
    dropout        dropout probability before each classifier (where the architecture has one)
    conv_init      "default" (PyTorch's) or "normal" (N(0, conv_init_std^2), the paper's choice)
    conv_init_std  standard deviation for conv_init="normal" (paper: 0.03)
"""

from __future__ import annotations

from collections.abc import Callable

from . import dbof, resnet, s3dg
from .ensemble import EnsembleNet, ModelOutput

MODELS: dict[str, tuple[Callable[..., EnsembleNet], dict]] = {
    name: (family.build, dict(kwargs))
    for family in (s3dg, dbof, resnet)
    for name, kwargs in family.PRESETS.items()
}


def create_model(name: str, **overrides) -> EnsembleNet:
    """Build the named model; `overrides` replace preset keywords (e.g. num_branches=3, num_classes=10).

    Works under `with torch.device("meta"):` for counting without allocating.
    """
    if name not in MODELS:
        import difflib

        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(sorted(MODELS))}")
    build, kwargs = MODELS[name]
    return build(**{**kwargs, **overrides})


__all__ = ["MODELS", "EnsembleNet", "ModelOutput", "create_model"]
