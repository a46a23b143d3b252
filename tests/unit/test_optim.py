"""Learning-rate schedules against hand-computed values; weight-decay groups by parameter role."""

import math

import pytest
import torch
from torch import nn

from video_ens.config import OptimConfig
from video_ens.optim import create_optimizer, lr_at, param_groups

EPOCH = 1000


def _lr(seen, total=10 * EPOCH, gb=100, **kw):
    return lr_at(
        OptimConfig(**kw), samples_seen=seen, total_samples=total, samples_per_epoch=EPOCH, global_batch_size=gb
    )


def test_step_decay_paper_resnet():
    # x0.2 every 60 epochs from 0.01 (paper section 4.1)
    kw = dict(schedule="step", lr=0.01, step_epochs=60, step_gamma=0.2)
    assert _lr(0, **kw) == pytest.approx(0.01)
    assert _lr(60 * EPOCH - 1, **kw) == pytest.approx(0.01)
    assert _lr(60 * EPOCH, **kw) == pytest.approx(0.002)
    assert _lr(125 * EPOCH, **kw) == pytest.approx(0.0004)


def test_exponential_decay_paper_dbof():
    # x0.95 every 1.5M examples from 0.005 (paper section 4.2)
    kw = dict(schedule="exponential", name="adam", lr=0.005, exp_examples=1_500_000, exp_gamma=0.95)
    assert _lr(1_499_999, **kw) == pytest.approx(0.005)
    assert _lr(3_000_000, **kw) == pytest.approx(0.005 * 0.95**2)


def test_half_cosine_to_zero():
    kw = dict(schedule="cosine", lr=0.8)
    assert _lr(0, **kw) == pytest.approx(0.8)
    assert _lr(5 * EPOCH, **kw) == pytest.approx(0.4)
    assert _lr(10 * EPOCH, **kw) == pytest.approx(0.0, abs=1e-12)
    assert _lr(2.5 * EPOCH, **kw) == pytest.approx(0.8 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_linear_warmup_then_schedule():
    kw = dict(schedule="cosine", lr=1.0, warmup_epochs=1)
    assert _lr(0, **kw) == pytest.approx(0.1)  # (0 + 100) / 1000
    assert _lr(900, **kw) == pytest.approx(1.0)  # last warm-up step reaches the peak
    assert _lr(1000, **kw) == pytest.approx(1.0)  # cosine starts after warm-up, at progress 0
    assert _lr(5500, **kw) == pytest.approx(0.5)  # half-way through the remaining 9 epochs


def test_linear_lr_scaling():
    kw = dict(schedule="constant", lr=0.1, lr_scaling="linear", reference_batch_size=256)
    assert _lr(0, gb=1024, **kw) == pytest.approx(0.4)


def test_param_groups_decay_weights_and_bn_gamma_not_biases():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Linear(4, 2))
    conv, bn, fc = m
    groups = param_groups(m, weight_decay=1e-4, decay_bn=True)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(conv.weight), id(bn.weight), id(fc.weight)}
    assert {id(p) for p in groups[1]["params"]} == {id(conv.bias), id(bn.bias), id(fc.bias)}
    assert groups[1]["weight_decay"] == 0.0
    groups = param_groups(m, weight_decay=1e-4, decay_bn=False)
    assert {id(p) for p in groups[0]["params"]} == {id(conv.weight), id(fc.weight)}


@pytest.mark.parametrize(
    "name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_create_optimizer(name, cls):
    m = nn.Linear(3, 2)
    opt = create_optimizer(m, OptimConfig(name=name, weight_decay=0.1), lr=0.5)
    assert isinstance(opt, cls)
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
