"""DBoF with context gating, SWAP pooling and a mixture-of-experts classifier (YouTube-8M; paper section 4.2).

    frames (B, T, 1152) --input_bn--cluster--cluster_bn--ReLU6--context_gate--> (B, T, K) --pool (SWAP)--> (B, K)
        = base; the fork is here (fork="pool")
    (B, K) --hidden--hidden_bn--ReLU6--context_gate--dropout--moe--> p (B, C), per branch

Every layer below the fork works on single frames, so the base runs on the *packed* valid frames, gathered into
(sum(lengths), D). Padding frames then never reach a BatchNorm, which keeps training statistics (and so the output)
independent of how much a batch was padded, and no compute is spent on them. SWAP itself ignores padding through
`lengths`. Architecture and sizes: design/architecture.md section 3; the paper's counts (229M / 415M baseline,
226M / 410M two-branch) are reproduced exactly with BN folded and video-level FLOPs only.

Initialisation: every Linear keeps PyTorch's default (Kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(fan_in)),
std 1/sqrt(3 fan_in)). The starter code draws the cluster weights from N(0, 1/fan_in) and uses Xavier for the
MoE: the same order of scale, and the paper states no other choice. There are no convs, so `conv_init` changes
nothing here; it is accepted (and checked) so that every family takes the same keywords.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import context_gate, gate_epilogue, swap_pool
from ..model_options import DBoFOptions
from .ensemble import EnsembleNet, resolve_width_ratio
from .layers import init_conv_weights

FORKS = DBoFOptions().forks()


class ContextGate(nn.Module):
    """y = x * sigmoid(BN(W x)), W (D, D) without bias: BN's shift takes the bias's place (Miech et al. 2017).

    Training runs linear -> BN (batch statistics) -> `gate_epilogue` (sigmoid and multiply, fused). Evaluation folds
    BN's running statistics into the linear (`folded()`) and calls `context_gate`, the fused op; the folded
    form equals the unfolded one to fp32 rounding. Folding costs D^2 multiplies per call (16.8M at D = 4096, the
    price of one extra row of the matmul), so it is recomputed rather than cached: a cache would go stale whenever
    the weights or statistics change.
    """

    def __init__(self, dim: int, *, kernels: str) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)
        self.kernels = kernels  # video_ens.kernels impl (DBoFOptions.kernels); not part of the state dict

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (D, D), bias (D,)) with BN's running statistics folded in, so gates = x W'^T + b'."""
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (D,): BN's per-gate gain
        weight = self.linear.weight * scale[:, None]  # (D, D): row d feeds gate d, so it takes gate d's gain
        bias = bn.bias - bn.running_mean * scale  # (D,)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (M, D) -> (M, D)
        if self.training or self.bn.running_mean is None:
            return gate_epilogue(x, self.bn(self.linear(x)), impl=self.kernels)
        weight, bias = self.folded()
        return context_gate(x, weight, bias, impl=self.kernels)


class SwapPool(nn.Module):
    """Self-Weighted Average Pooling over the valid frames (paper eq. 4); no parameters."""

    def __init__(self, *, kernels: str) -> None:
        super().__init__()
        self.kernels = kernels  # video_ens.kernels impl (DBoFOptions.kernels)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, D) -> (B, D)
        return swap_pool(x, lengths, impl=self.kernels)


class MoE(nn.Module):
    """Per-class mixture of logistic experts, as the YouTube-8M starter code's `MoeModel`.

        p_c = sum_{m < M} softmax(G_c h)_m * sigmoid(E_{c,m} h + b_{c,m})

    The softmax runs over M + 1 gate logits per class; the last one belongs to a "dummy" expert that always says 0,
    so its weight is dropped and p_c can stay near 0 however confident the real experts are. Logits are laid out
    class-major, (C, M + 1) and (C, M), matching the starter code's reshape to (-1, M + 1).

    Args:
        in_dim: H, the hidden width. num_classes: C. num_mixtures: M (>= 1).
    """

    def __init__(self, in_dim: int, num_classes: int, num_mixtures: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_mixtures = num_mixtures
        self.gates = nn.Linear(in_dim, num_classes * (num_mixtures + 1), bias=False)
        self.experts = nn.Linear(in_dim, num_classes * num_mixtures)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, C) probabilities
        c, m = self.num_classes, self.num_mixtures
        gates = self.gates(h).unflatten(-1, (c, m + 1))  # (B, C, M+1)
        # fp32 softmax: under bf16 autocast the gate weights would otherwise carry only ~3 significant digits.
        gates = torch.softmax(gates.float(), dim=-1)[..., :m]  # (B, C, M): the dummy expert's weight dropped
        experts = torch.sigmoid(self.experts(h).unflatten(-1, (c, m)).float())  # (B, C, M)
        return (gates * experts).sum(dim=-1)  # (B, C)


class DBoFBase(nn.Module):
    """Frame-level part plus pooling: layers 1-4 of architecture.md section 3.2.

    Args:
        feature_dim: D, per-frame input width (rgb 1024 + audio 128 = 1152, rgb first).
        cluster_size: K, width of the cluster layer and of the first context gate.
        kernels: the context gate's and SWAP's implementation (DBoFOptions.kernels).
    """

    def __init__(self, *, feature_dim: int, cluster_size: int, kernels: str) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.input_bn = nn.BatchNorm1d(feature_dim)
        self.cluster = nn.Linear(feature_dim, cluster_size, bias=False)
        self.cluster_bn = nn.BatchNorm1d(cluster_size)
        self.context_gate = ContextGate(cluster_size, kernels=kernels)
        self.pool = SwapPool(kernels=kernels)

    def frames(self, x: torch.Tensor) -> torch.Tensor:  # (M, D) -> (M, K), M frames of any videos
        x = self.input_bn(x)
        x = F.relu6(self.cluster_bn(self.cluster(x)))
        return self.context_gate(x)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) frame features; lengths (B,) valid frame counts, None = all T valid. Returns (B, K)."""
        if x.dim() != 3 or x.shape[-1] != self.feature_dim:
            raise ValueError(
                f"DBoF expects frame features of shape (B, T, {self.feature_dim}), got {tuple(x.shape)}; "
                "set rgb_dim/audio_dim to match the data"
            )
        b, t, _ = x.shape
        if lengths is None:
            y = self.frames(x.flatten(0, 1)).unflatten(0, (b, t))  # (B*T, D) -> (B, T, K)
            return self.pool(y)
        if lengths.shape != (b,):
            raise ValueError(f"lengths must have shape ({b},), one frame count per video; got {tuple(lengths.shape)}")
        lengths = lengths.to(x.device)
        valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]  # (B, T)
        # The number of valid frames is data-dependent: nonzero costs one host sync per step on GPU and a graph
        # break under torch.compile. Everything after it is plain index_select / index_copy, whose backward needs
        # no further nonzero (a boolean-mask index_put would redo it in backward and break the compiled graph again).
        rows = valid.flatten().nonzero().squeeze(1)  # (S,), S = sum(lengths): valid frames in (B*T) order
        packed = self.frames(x.flatten(0, 1).index_select(0, rows))  # (B*T, D) -> (S, D) -> (S, K)
        y = packed.new_zeros(b * t, packed.shape[-1]).index_copy(0, rows, packed)  # (B*T, K), padding frames 0
        y = y.unflatten(0, (b, t))  # (B, T, K)
        return self.pool(y, lengths)


class DBoFBranch(nn.Module):
    """Video-level part of one head: layers 5-7 of architecture.md section 3.2 (hidden, CG2, MoE).

    Args:
        in_dim: K, the pooled width. hidden_size: H. num_classes: C. num_mixtures: M.
        dropout: probability of the dropout right before the MoE (0 = none). kernels: the context gate's
        implementation (DBoFOptions.kernels).
    """

    def __init__(
        self, *, in_dim: int, hidden_size: int, num_classes: int, num_mixtures: int, dropout: float, kernels: str
    ) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden_size, bias=False)
        self.hidden_bn = nn.BatchNorm1d(hidden_size)
        self.context_gate = ContextGate(hidden_size, kernels=kernels)
        self.dropout = nn.Dropout(dropout)
        self.moe = MoE(hidden_size, num_classes, num_mixtures)

    def features(self, h: torch.Tensor) -> torch.Tensor:  # (B, K) -> (B, H): the MoE's input, before dropout
        h = F.relu6(self.hidden_bn(self.hidden(h)))
        return self.context_gate(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, K) -> (B, C) probabilities
        return self.moe(self.dropout(self.features(h)))

    def embed(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, H), probabilities (B, C)); the probabilities are forward's, bit for bit."""
        f = self.features(h)
        return f, self.moe(self.dropout(f))


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def build(
    *,
    num_branches: int = 1,
    width_ratio: float | None = None,
    fork: str = "pool",
    num_classes: int = 3862,
    dropout: float = 0.0,
    conv_init: str = "default",
    conv_init_std: float = 0.03,
    options: DBoFOptions | None = None,
) -> EnsembleNet:
    """DBoF as an EnsembleNet: the base (layers 1-4) and `num_branches` heads (layers 5-7), outputs probabilities.

    Args (beyond the common ones documented in video_ens.models):
        width_ratio: None (the default) is 1.0 when num_branches == 1 (the baseline) and 1/1.5 when
            num_branches > 1 (hidden 4096 -> 2731). Only the hidden width scales; the experts do not.
        fork: only "pool" (after SWAP, as in the paper): below it every layer is frame-level.
        options: DBoF's own fields (video_ens.model_options.DBoFOptions, documented and checked there): feature
            widths, cluster and hidden sizes, experts, the branches' pinned hidden width and experts (giving
            branch_hidden_size together with width_ratio is an error), input_spec's frame counts, and kernels,
            the context gates' and SWAP's implementation.
    """
    o = options if options is not None else DBoFOptions()
    if fork not in FORKS:
        raise ValueError(f"fork must be one of {FORKS} for DBoF (branches start after SWAP pooling), got {fork!r}")
    if o.branch_hidden_size is not None and width_ratio is not None:
        raise ValueError(
            f"give branch_hidden_size or width_ratio, not both (got {o.branch_hidden_size} and {width_ratio}): "
            "branch_hidden_size already fixes the branch hidden width"
        )
    _positive("num_branches", num_branches)
    width_ratio = resolve_width_ratio(width_ratio, num_branches)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    feature_dim = o.rgb_dim + o.audio_dim
    branch_hidden = o.branch_hidden_size if o.branch_hidden_size is not None else round(o.hidden_size * width_ratio)
    mixtures = o.branch_mixtures if o.branch_mixtures is not None else o.num_mixtures
    for name, value in (
        ("num_classes", num_classes),
        ("branch hidden width (branch_hidden_size, or hidden_size * width_ratio)", branch_hidden),
        ("num_mixtures / branch_mixtures", mixtures),
    ):
        _positive(name, value)

    base = DBoFBase(feature_dim=feature_dim, cluster_size=o.cluster_size, kernels=o.kernels)
    branches = [
        DBoFBranch(
            in_dim=o.cluster_size,
            hidden_size=branch_hidden,
            num_classes=num_classes,
            num_mixtures=mixtures,
            dropout=dropout,
            kernels=o.kernels,
        )
        for _ in range(num_branches)
    ]
    model = EnsembleNet(
        base,
        branches,
        output_type="probs",
        activation="sigmoid",
        input_spec={
            "kind": "features",
            "dim": feature_dim,
            "rgb_dim": o.rgb_dim,
            "audio_dim": o.audio_dim,
            "train_frames": o.train_frames,
            "max_frames": o.max_frames,
        },
    )
    init_conv_weights(model, conv_init=conv_init, conv_init_std=conv_init_std)  # no convs: only checks the values
    return model
