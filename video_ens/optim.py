"""Optimizer construction and the paper's learning-rate schedules, as pure functions of the recipe.

The optimizer is a plain torch optimizer handed to the engine (DeepSpeed JIT-builds nothing for it). The schedule
is a function of the number of samples seen, so it is the same whatever the world size and accumulation, and a
resumed run recomputes it from the step it restarts at:

    step         lr x step_gamma every step_epochs epochs          (paper ResNet: x0.2 every 60 epochs)
    exponential  lr x exp_gamma every exp_examples samples         (paper DBoF: x0.95 every 1.5M examples)
    cosine       half-cosine from lr to 0 over the run              (paper S3D-G)
    constant     lr

each optionally after a linear warm-up, with the peak lr scaled by global_batch / reference_batch when
optim.lr_scaling is "linear".
"""

from __future__ import annotations

import math

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, *, weight_decay: float, decay_bn: bool) -> list[dict]:
    """Split parameters into a decayed and an undecayed group.

    Decayed: conv/linear weights, and norm-layer weights (BN gamma) when `decay_bn` (the paper applies "small l2
    regularization ... on all weights and batch norm gamma parameters", section 4.1). Never decayed: biases and BN
    beta. Group order and membership depend only on the model, so optimizer state dicts are stable.
    """
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, _NORMS)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias" or (is_norm and not decay_bn):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def create_optimizer(model: nn.Module, optim, *, lr: float) -> torch.optim.Optimizer:
    """The torch optimizer named by the recipe's optim section, at initial learning rate `lr`."""
    groups = param_groups(model, weight_decay=optim.weight_decay, decay_bn=optim.decay_bn)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov)
    if optim.name == "adam":
        # torch's Adam adds weight_decay * p to the gradient: the L2 regularisation the paper describes
        return torch.optim.Adam(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps)
    raise ValueError(f"optim.name: unknown optimizer {optim.name!r}; use sgd, adam or adamw")


def peak_lr(optim, global_batch_size: int) -> float:
    return optim.peak_lr(global_batch_size)  # the recipe check tests this same value (config.Recipe)


def lr_at(optim, *, samples_seen: int, total_samples: int, samples_per_epoch: int, global_batch_size: int) -> float:
    """Learning rate for the step that starts after `samples_seen` samples (of `total_samples` in the run)."""
    peak = peak_lr(optim, global_batch_size)
    warmup = optim.warmup_epochs * samples_per_epoch
    if warmup > 0 and samples_seen < warmup:
        return peak * min(1.0, (samples_seen + global_batch_size) / warmup)  # reaches peak on the last warm-up step
    if optim.schedule == "constant":
        return peak
    if optim.schedule == "step":
        return peak * optim.step_gamma ** math.floor(samples_seen / (optim.step_epochs * samples_per_epoch))
    if optim.schedule == "exponential":
        return peak * optim.exp_gamma ** math.floor(samples_seen / optim.exp_examples)
    if optim.schedule == "cosine":
        span = max(total_samples - warmup, 1)
        progress = min(max(samples_seen - warmup, 0) / span, 1.0)
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule: unknown schedule {optim.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
