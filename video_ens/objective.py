"""The EnsembleNet losses: the ensembling loss (paper eq. 2) and the co-distillation loss (paper eq. 3).

Both have the form of eq. 1, L = sum_i L_aux,i + L_ens, over N branch predictions p_i and the ensemble
prediction p_ens = (1/N) sum_i p_i (the simple-average ensembler the paper uses throughout):

    ensembling,     weight = lambda:  L_aux,i = (1 - lambda) l(g, p_i)         L_ens = N lambda l(g, p_ens)
    codistillation, weight = mu:      L_aux,i = mu l(sg(p_ens), p_i)           L_ens = N l(g, p_ens)

sg() stops the gradient: the distillation target is `p_ens.detach()` inside the one graph, so a single
backward pass serves (ZeRO supports one backward per step). Appendix A.1 proves the two equal for the L2 loss
when mu = 1 - lambda; the tests check that identity in value and in gradient.

l(g, p) is summed over classes and averaged over the batch. Everything is computed in fp32 from log-probabilities,
with log p_ens = logsumexp_i(log p_i) - log N, so a confident branch in bf16 cannot produce inf or NaN.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Structure = Literal["ensembling", "codistillation"]
LossKind = Literal["softmax_ce", "sigmoid_bce", "l2"]
Inputs = Literal["logits", "probs"]

STRUCTURES = ("ensembling", "codistillation")
LOSSES = ("softmax_ce", "sigmoid_bce", "l2")
INPUTS = ("logits", "probs")

# Probabilities given directly (inputs="probs", e.g. DBoF's MoE head) are clamped into [PROB_EPS, 1 - PROB_EPS]
# before taking logs. 1e-7 is the smallest margin that survives fp32 rounding near 1 (1 - 1e-7 = 0.99999988).
# The clamp is straight-through: it bounds the value, but its gradient is 1 everywhere, so a saturated prediction
# (a positive class at p < 1e-7, a negative at p > 1 - 1e-7) is still pushed back, as with the YouTube-8M starter
# code's log(p + eps). A plain clamp would give it exactly zero gradient, and the class would stay stuck.
PROB_EPS = 1e-7


def _clamp_straight_through(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return x + (x.clamp(lo, hi) - x).detach()


class EnsembleLoss(torch.nn.Module):
    """EnsembleNet loss over stacked branch outputs.

    Args:
        structure: "ensembling" (eq. 2, weight = lambda) or "codistillation" (eq. 3, weight = mu).
        weight: lambda or mu. Any real number: the paper's best ensembling lambda is negative (-1.5 on ImageNet).
        loss: l(g, p): "softmax_ce" (single-label: p = softmax), "sigmoid_bce" (multi-label: p = sigmoid, binary
            cross entropy per class) or "l2" (squared error on probabilities; softmax for logits).
        label_smoothing: eps applied to the ground truth g only. softmax_ce and l2: g = (1 - eps) g + eps / C;
            sigmoid_bce: g = (1 - eps) g + eps / 2 per class.
        inputs: "logits" or "probs" (branch outputs that are already probabilities).

    Call: `crit(branch_outputs, target)` with branch_outputs (N, B, C) and target either class indices (B,) or
    multi-hot/soft targets (B, C). Returns a dict:
        loss      scalar to back-propagate, = branch.sum() + ensemble
        branch    (N,) the weighted per-branch terms L_aux,i
        ensemble  scalar, the weighted ensemble term L_ens
        probs     (B, C) p_ens, detached (for metrics)
        branch_truth    (N,) l(g, p_i), detached: each branch's own loss against the labels (for the logs; with
                        co-distillation the branch terms are distillation terms, not this)
        ensemble_truth  scalar l(g, p_ens), detached

    With N = 1 both structures reduce to the ordinary single-model loss l(g, p): ensembling because
    (1 - lambda) + lambda = 1, co-distillation because a lone branch has no ensemble to learn from, so its
    distillation term is defined as zero (its gradient would be zero anyway, since p_1 = p_ens).
    """

    def __init__(
        self,
        structure: Structure,
        weight: float,
        loss: LossKind,
        label_smoothing: float = 0.0,
        inputs: Inputs = "logits",
    ) -> None:
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
        if not math.isfinite(weight):
            raise ValueError(f"weight (lambda or mu) must be a finite number, got {weight}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.structure = structure
        self.weight = float(weight)
        self.loss = loss
        self.label_smoothing = float(label_smoothing)
        self.inputs = inputs

    def extra_repr(self) -> str:
        name = "lambda" if self.structure == "ensembling" else "mu"
        return f"{self.structure}, {name}={self.weight}, loss={self.loss}, label_smoothing={self.label_smoothing}"

    def forward(self, branch_outputs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if branch_outputs.dim() != 3:
            raise ValueError(f"branch_outputs must be (N, B, C), got shape {tuple(branch_outputs.shape)}")
        n, b, c = branch_outputs.shape
        g = self._ground_truth(target, b, c)  # (B, C) fp32
        logp = _LogProbs.build(branch_outputs.float(), self.loss, self.inputs)

        truth_branch = logp.branch_loss_against(g)  # (N,) l(g, p_i)
        truth_ens = logp.ensemble_loss_against(g)  # () l(g, p_ens)
        if self.structure == "ensembling":
            branch = (1.0 - self.weight) * truth_branch
            ensemble = n * self.weight * truth_ens
        else:
            if n == 1:
                branch = torch.zeros_like(truth_branch)
            else:
                branch = self.weight * logp.branch_loss_against(logp.ens_probs().detach())
            ensemble = n * truth_ens
        return {
            "loss": branch.sum() + ensemble,
            "branch": branch,
            "ensemble": ensemble,
            "probs": logp.ens_probs().detach(),
            # for the logs: each branch's and the ensemble's own loss against the labels, whatever the structure
            "branch_truth": truth_branch.detach(),
            "ensemble_truth": truth_ens.detach(),
        }

    def _ground_truth(self, target: torch.Tensor, b: int, c: int) -> torch.Tensor:
        if target.dim() == 1:
            if target.shape[0] != b:
                raise ValueError(f"target has {target.shape[0]} labels for a batch of {b}")
            if target.dtype.is_floating_point:
                raise TypeError("1-D targets must be integer class indices; pass soft targets as (B, C)")
            if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
                raise ValueError(f"class index out of range [0, {c}): min {int(target.min())}, max {int(target.max())}")
            g = F.one_hot(target.long(), c).float()
        elif target.dim() == 2:
            if tuple(target.shape) != (b, c):
                raise ValueError(f"target of shape {tuple(target.shape)} does not match branch outputs (B={b}, C={c})")
            g = target.float()
        else:
            raise ValueError(f"target must be (B,) class indices or (B, C) multi-hot/soft, got {tuple(target.shape)}")
        eps = self.label_smoothing
        if eps:
            g = (1.0 - eps) * g + (eps / 2.0 if self.loss == "sigmoid_bce" else eps / c)
        return g


class _LogProbs:
    """Branch predictions held in the form each loss needs, all (N, B, C) fp32.

    softmax_ce: logp (log p_i).  sigmoid_bce: logp and log1mp (log(1 - p_i)).  l2: p (p_i).
    """

    def __init__(self, loss: str, n: int, logp=None, log1mp=None, p=None) -> None:
        self.loss, self.n = loss, n
        self.logp, self.log1mp, self.p = logp, log1mp, p

    @classmethod
    def build(cls, out: torch.Tensor, loss: str, inputs: str) -> _LogProbs:
        n = out.shape[0]
        if loss == "softmax_ce":
            if inputs == "logits":
                return cls(loss, n, logp=F.log_softmax(out, dim=-1))
            return cls(loss, n, logp=_clamp_straight_through(out, PROB_EPS, 1.0).log())
        if loss == "sigmoid_bce":
            if inputs == "logits":
                return cls(loss, n, logp=F.logsigmoid(out), log1mp=F.logsigmoid(-out))
            pc = _clamp_straight_through(out, PROB_EPS, 1.0 - PROB_EPS)
            return cls(loss, n, logp=pc.log(), log1mp=torch.log1p(-pc))
        p = torch.softmax(out, dim=-1) if inputs == "logits" else out
        return cls(loss, n, p=p)

    def ens_probs(self) -> torch.Tensor:  # (B, C)
        if self.loss == "l2":
            return self.p.mean(dim=0)
        return self._ens_log(self.logp).exp()

    def _ens_log(self, logs: torch.Tensor) -> torch.Tensor:
        # log((1/N) sum_i exp(logs_i)), stable for any branch confidence
        return torch.logsumexp(logs, dim=0) - math.log(self.n)  # (B, C)

    def branch_loss_against(self, q: torch.Tensor) -> torch.Tensor:
        """(N,) l(q, p_i): summed over classes, averaged over the batch; q (B, C) broadcast over branches."""
        if self.loss == "softmax_ce":
            per = -(q * self.logp).sum(-1)
        elif self.loss == "sigmoid_bce":
            per = -(q * self.logp + (1.0 - q) * self.log1mp).sum(-1)
        else:
            per = (self.p - q).pow(2).sum(-1)
        return per.mean(-1)

    def ensemble_loss_against(self, g: torch.Tensor) -> torch.Tensor:
        """() l(g, p_ens)."""
        if self.loss == "softmax_ce":
            per = -(g * self._ens_log(self.logp)).sum(-1)
        elif self.loss == "sigmoid_bce":
            per = -(g * self._ens_log(self.logp) + (1.0 - g) * self._ens_log(self.log1mp)).sum(-1)
        else:
            per = (self.p.mean(0) - g).pow(2).sum(-1)
        return per.mean()


def loss_for(objective, model) -> EnsembleLoss:
    """Build the loss from a recipe's objective section and the model's declared output type."""
    return EnsembleLoss(
        objective.structure,
        objective.weight,
        objective.loss,
        label_smoothing=objective.label_smoothing,
        inputs=model.output_type,
    )
