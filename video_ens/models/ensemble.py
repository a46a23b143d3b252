"""The multi-headed construction shared by every family: a base, N branches and the averaging ensembler.

    x --base--> h --+--branches.0--> out_0 (B, C) --+
                    +--branches.1--> out_1 (B, C) --+--stack--> (N, B, C) --ensembler--> p_ens (B, C)

A branch is a copy of the upper part of the single network with its widths scaled, ending in its own
classifier. Branches share an architecture and differ only by initialisation. With N = 1 and a width ratio of 1
the model is exactly the single (baseline) network, so every family builds its baseline through this class too.

Model code is single-device and loss-free: the loss (video_ens.objective) consumes `ModelOutput.branches` and
the declared `output_type`.

`EnsembleNet.embed(x)` returns the same output plus pooled representations (retrieval, linear probes): the base's
output averaged over every axis but (B, C), and each branch's classifier input (every branch module has
`embed(h) -> (features, output)`, its output bit for bit what its forward returns).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

OutputType = Literal["logits", "probs"]


DEFAULT_WIDTH_RATIO = 1 / 1.5
"""Branch width / baseline width when a multi-headed model (N > 1) states none: the paper's ~1.5x shrink, which
with Python's round gives S3D-G's 554-wide Mixed_4f (architecture.md section 2.3)."""


def resolve_width_ratio(width_ratio: float | None, num_branches: int) -> float:
    """The width ratio a builder uses: `width_ratio` when given, else 1.0 for N = 1 (the baseline network) and
    DEFAULT_WIDTH_RATIO for N > 1. Raises ValueError unless the result is > 0."""
    ratio = width_ratio if width_ratio is not None else (1.0 if num_branches == 1 else DEFAULT_WIDTH_RATIO)
    if not (isinstance(ratio, (int, float)) and ratio > 0):
        raise ValueError(f"width_ratio must be > 0 (or None for the default rule), got {width_ratio!r}")
    return float(ratio)


class ModelOutput(NamedTuple):
    branches: torch.Tensor  # (N, B, C): per-branch logits or probabilities, see EnsembleNet.output_type
    ensemble: torch.Tensor  # (B, C): p_ens, the mean of the branch probabilities


class Embeddings(NamedTuple):
    output: ModelOutput  # what forward returns for the same input
    base: torch.Tensor  # (B, D_base): the shared base's output, averaged over time and space
    branches: torch.Tensor  # (N, B, D): each branch's pooled representation, the input of its classifier


def pool_features(h: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> (B, C): the mean over every axis after the channels; (B, C) passes through."""
    return h if h.dim() == 2 else h.mean(dim=tuple(range(2, h.dim())))


def branch_probs(branches: torch.Tensor, output_type: OutputType, activation: str) -> torch.Tensor:
    """Per-branch probabilities (N, B, C) from raw branch outputs.

    `activation` is "softmax" (single-label: Kinetics, ImageNet) or "sigmoid" (multi-label: YouTube-8M).
    Probabilities pass through unchanged.
    """
    if output_type == "probs":
        return branches
    if activation == "softmax":
        return torch.softmax(branches.float(), dim=-1)
    if activation == "sigmoid":
        return torch.sigmoid(branches.float())
    raise ValueError(f"unknown activation {activation!r}: use 'softmax' or 'sigmoid'")


class MeanEnsembler(nn.Module):
    """p_ens = (1/N) sum_i p_i: the simple average the paper uses for every result (section 3)."""

    def forward(self, probs: torch.Tensor) -> torch.Tensor:  # (N, B, C) -> (B, C)
        return probs.mean(dim=0)


class EnsembleNet(nn.Module):
    """`base` then `branches.0 .. branches.{N-1}` then `ensembler`; these names are the checkpoint format.

    Args:
        base: the shared lower part. Called as `base(x, **inputs)`.
        branches: N modules, each mapping the base output to (B, C), with `embed(h)` returning (features (B, D),
            the same (B, C)) for `EnsembleNet.embed`.
        output_type: "logits" when branches emit logits, "probs" when they emit probabilities (DBoF's MoE).
        activation: how logits become probabilities: "softmax" or "sigmoid".
        input_spec: what the model consumes, e.g. {"kind": "clip", "frames": 64, "size": 224}; the data
            pipeline and the recipe checks read it.
    """

    def __init__(
        self,
        base: nn.Module,
        branches: list[nn.Module],
        *,
        output_type: OutputType,
        activation: str,
        input_spec: dict,
    ) -> None:
        super().__init__()
        if not branches:
            raise ValueError("an EnsembleNet needs at least one branch (num_branches >= 1)")
        if output_type not in ("logits", "probs"):
            raise ValueError(f"output_type must be 'logits' or 'probs', got {output_type!r}")
        self.base = base
        self.branches = nn.ModuleList(branches)
        self.ensembler = MeanEnsembler()
        self.output_type: OutputType = output_type
        self.activation = activation
        self.input_spec = dict(input_spec)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def combine(self, outs: torch.Tensor) -> ModelOutput:
        """The output from the branches' raw outputs (N, B, C): the ensemble is the mean of their probabilities."""
        probs = branch_probs(outs, self.output_type, self.activation)  # (N, B, C), fp32
        return ModelOutput(branches=outs, ensemble=self.ensembler(probs))

    def forward(self, x: torch.Tensor, **inputs) -> ModelOutput:
        h = self.base(x, **inputs)
        return self.combine(torch.stack([branch(h) for branch in self.branches], dim=0))  # (N, B, C)

    def embed(self, x: torch.Tensor, **inputs) -> Embeddings:
        """forward's output plus the pooled base and branch representations, from one pass; call in eval mode
        (in training mode a branch's dropout would still act on its output, never on its features)."""
        h = self.base(x, **inputs)
        pairs = [branch.embed(h) for branch in self.branches]
        output = self.combine(torch.stack([out for _, out in pairs], dim=0))  # (N, B, C), as forward stacks them
        features = torch.stack([f for f, _ in pairs], dim=0)  # (N, B, D)
        return Embeddings(output=output, base=pool_features(h), branches=features)
