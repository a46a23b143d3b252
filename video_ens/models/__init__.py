"""Every model video_ens ships, by name, and `create_model` to build one.

Each family module (s3dg, dbof, resnet) exposes `build(**kwargs) -> EnsembleNet` and a `PRESETS` dict literal of
named configurations: the paper's eight (`s3dg`, `s3dg_ens2`, `dbof`, `dbof_ens2`, `resnet152`, `resnet152_ens2`,
`seresnet152`, `seresnet152_ens2`) and tiny ones for tests and CPU demos. `MODELS` below is the one table of all of
them; there is no string registry beyond it.

Every builder takes the same common keywords, so turning a network into a multi-headed one is a recipe change:
    num_branches   N (1 = the single baseline network)
    width_ratio    branch width / baseline width for the layers above the fork; None (every builder's default)
                   means 1.0 when num_branches == 1 and 1/1.5 when num_branches > 1 (the paper's shrink, S3D-G's
                   554), so create_model("s3dg", num_branches=2) is s3dg_ens2. A preset may state its own
                   (resnet152_ens2: 0.6875, the paper's (176, 352) bottlenecks).
    fork           name of the layer after which the branches start
    num_classes    classifier width
    dropout        dropout probability before each classifier (where the architecture has one)
    conv_init      "default" (PyTorch's) or "normal" (N(0, conv_init_std^2), the paper's choice)
    conv_init_std  standard deviation for conv_init="normal" (paper: 0.03)

A family may also fix branch widths directly with keywords named `branch_*` (DBoF's branch_hidden_size and
branch_mixtures, ResNet's branch_widths); these and width_ratio are a preset's *branch shape*. A builder refuses
width_ratio together with the branch_* width it would compute (branch_hidden_size, branch_widths). How overrides
meet a preset's branch shape (an explicit width_ratio, or num_branches=1, replaces it): see `model_kwargs`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from . import dbof, resnet, s3dg
from .ensemble import EnsembleNet, ModelOutput

MODELS: dict[str, tuple[Callable[..., EnsembleNet], dict]] = {
    name: (family.build, dict(kwargs))
    for family in (s3dg, dbof, resnet)
    for name, kwargs in family.PRESETS.items()
}


def _is_branch_shape(key: str) -> bool:
    return key == "width_ratio" or key.startswith("branch_")


def model_kwargs(name: str, **overrides) -> dict:
    """The keywords `create_model(name, **overrides)` passes to the family's builder: the preset's, with `overrides`
    replacing them key by key, except that the preset's branch shape (width_ratio and branch_* keys) gives way as
    a whole to a caller who reshapes the branches, so a preset's pinned widths never silently win:
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
    if name not in MODELS:
        import difflib

        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(sorted(MODELS))}")
    kwargs = dict(MODELS[name][1])
    if "width_ratio" in overrides or overrides.get("num_branches") == 1:
        kwargs = {k: v for k, v in kwargs.items() if not _is_branch_shape(k)}
    elif any(_is_branch_shape(k) for k in overrides):
        kwargs.pop("width_ratio", None)
    return {**kwargs, **overrides}


def builder_arguments(name: str, **overrides) -> dict:
    """Every keyword of the family's builder as `create_model(name, **overrides)` calls it: `model_kwargs`, then the
    builder's own defaults for the rest (for reports and checks that need a resolved value, e.g. num_classes)."""
    kwargs = model_kwargs(name, **overrides)
    params = inspect.signature(MODELS[name][0]).parameters.items()
    return {k: kwargs[k] if k in kwargs else p.default for k, p in params if k in kwargs or p.default is not p.empty}


def create_model(name: str, **overrides) -> EnsembleNet:
    """Build the named model; `overrides` replace preset keywords (e.g. num_branches=3, num_classes=10), with the
    branch-shape rule of `model_kwargs` (an explicit width_ratio or num_branches=1 replaces a preset's pinned
    branch widths).

    Works under `with torch.device("meta"):` for counting without allocating.
    """
    kwargs = model_kwargs(name, **overrides)
    return MODELS[name][0](**kwargs)


__all__ = ["MODELS", "EnsembleNet", "ModelOutput", "builder_arguments", "create_model", "model_kwargs"]
