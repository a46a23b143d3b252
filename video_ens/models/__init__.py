"""Every model video_ens ships, by name, and `create_model` to build one.

The presets are named in video_ens.model_options.PRESETS (torch-free, so the recipe check reads the same table):
the paper's eight (`s3dg`, `s3dg_ens2`, `dbof`, `dbof_ens2`, `resnet152`, `resnet152_ens2`, `seresnet152`,
`seresnet152_ens2`) and tiny ones for tests and CPU demos. `MODELS` below pairs each with its family's builder;
there is no string registry beyond it.

Every builder (s3dg, dbof, resnet `build`) takes the same common keywords, so turning a network into a
multi-headed one is a recipe change, plus `options`, its family's dataclass (S3DGOptions, DBoFOptions,
ResNetOptions in video_ens.model_options):
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

A family may also fix branch widths directly with options named `branch_*` (DBoF's branch_hidden_size and
branch_mixtures, ResNet's branch_widths); these and width_ratio are a preset's *branch shape*. A builder refuses
width_ratio together with the branch_* width it would compute (branch_hidden_size, branch_widths). How overrides
meet a preset's branch shape (an explicit width_ratio, or num_branches=1, replaces it): see `model_kwargs`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch

from ..model_options import PRESETS, DBoFOptions, ResNetOptions, S3DGOptions, model_kwargs, split_kwargs
from . import dbof, resnet, s3dg
from .ensemble import EnsembleNet, ModelOutput

BUILDERS: dict[type, Callable[..., EnsembleNet]] = {
    S3DGOptions: s3dg.build,
    DBoFOptions: dbof.build,
    ResNetOptions: resnet.build,
}
"""Each family's options dataclass and the builder that takes it."""

MODELS: dict[str, tuple[Callable[..., EnsembleNet], dict]] = {
    name: (BUILDERS[cls], dict(kwargs)) for name, (cls, kwargs) in PRESETS.items()
}
"""Every model by name: (its builder, the keywords its preset sets, common fields and options in one dict)."""


def builder_arguments(name: str, **overrides) -> dict:
    """Every keyword `create_model(name, **overrides)` builds with, common fields and options in one dict:
    `model_kwargs`, then the defaults for the rest (for reports and checks that need a resolved value, e.g.
    num_classes)."""
    common, options = split_kwargs(name, **overrides)
    params = inspect.signature(MODELS[name][0]).parameters
    defaults = {k: p.default for k, p in params.items() if k != "options" and p.default is not p.empty}
    return {**defaults, **common, **dataclasses.asdict(options)}


def create_model(name: str, **overrides) -> EnsembleNet:
    """Build the named model; `overrides` (common fields and options alike, e.g. num_branches=3, kernels="auto")
    replace preset keywords, with the branch-shape rule of `model_kwargs` (an explicit width_ratio or
    num_branches=1 replaces a preset's pinned branch widths). The options become the family's dataclass, which
    checks them; the builder gets it as `options`.

    Works under `with torch.device("meta"):` for counting without allocating.
    """
    common, options = split_kwargs(name, **overrides)
    return MODELS[name][0](**common, options=options)


def channels_last(model: EnsembleNet) -> EnsembleNet:
    """`model` with its 4-D / 5-D weights in channels-last order (channels_last_3d for clip models), as
    model.channels_last asks; other tensors (a feature model's are all 1-D and 2-D) are left as they are."""
    fmt = torch.channels_last_3d if model.input_spec["kind"] == "clip" else torch.channels_last
    return model.to(memory_format=fmt)


__all__ = [
    "BUILDERS",
    "MODELS",
    "EnsembleNet",
    "ModelOutput",
    "builder_arguments",
    "channels_last",
    "create_model",
    "model_kwargs",
]
