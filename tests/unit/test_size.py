"""count_params / count_flops against hand-computed numbers, model_size_report and tools/model_size.py."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from video_ens.models.size import count_flops, count_params, model_size_report


def _flops(module, *shape):
    x = torch.randn(*shape)
    return count_flops(module, x), count_flops(module, x, include_elementwise=True)


def test_count_params_folds_bn_to_one_value_per_channel():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    assert count_params(m) == 3 * 4 * 9 + 4
    assert count_params(m, fold_bn=False) == 3 * 4 * 9 + 2 * 4
    plain = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, affine=False))  # folds to a shift all the same
    assert count_params(plain) == 5 * 6 + 6 + 6
    assert count_params(plain, fold_bn=False) == 5 * 6 + 6


def test_count_params_counts_shared_weights_once():
    fc = nn.Linear(4, 4)
    assert count_params(nn.Sequential(fc, nn.ReLU(), fc)) == 16 + 4


def test_linear_and_conv():
    assert _flops(nn.Linear(10, 20), 1, 10) == (2 * 10 * 20, 2 * 10 * 20 + 20)  # + one bias add per output
    assert _flops(nn.Linear(10, 20, bias=False), 1, 10) == (400, 400)
    # 3x3 conv 3->4 on 8x8 with padding 1: 27 MACs per output, 4*64 outputs.
    assert _flops(nn.Conv2d(3, 4, 3, padding=1), 1, 3, 8, 8) == (2 * 27 * 256, 2 * 27 * 256 + 256)
    assert _flops(nn.Conv2d(3, 4, 3, stride=2, bias=False), 1, 3, 9, 9) == (2 * 27 * 64, 2 * 27 * 64)


def test_elementwise_rules():
    assert _flops(nn.BatchNorm2d(4), 1, 4, 5, 5) == (0, 100)  # folded BN: one add per element
    assert _flops(nn.MaxPool2d(3, stride=2, padding=1), 1, 2, 8, 8) == (0, 9 * 2 * 4 * 4)  # kernel area x outputs
    assert _flops(nn.AdaptiveAvgPool2d(1), 1, 2, 8, 8) == (0, 128)  # a mean: input elements
    assert _flops(nn.Sequential(nn.ReLU(), nn.ReLU6(), nn.Sigmoid()), 1, 7) == (0, 0)  # free, as in tf.profiler

    class Ops(nn.Module):
        def forward(self, x):  # x (1, 3, 4, 4): 48 elements
            y = x + 1  # 48
            y = y * x  # 48
            y = y.mean(dim=(2, 3))  # 48 in -> (1, 3)
            return torch.softmax(y, dim=-1) - y  # 5 * 3 + 3

    assert _flops(Ops(), 1, 3, 4, 4) == (0, 48 + 48 + 48 + 15 + 3)


def test_weight_only_work_is_not_counted():
    class Folded(nn.Module):  # rescales its weight inside forward, as an eval-mode folded BN does
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))
            self.scale = nn.Parameter(torch.ones(8))

        def forward(self, x):
            w = self.weight * self.scale[:, None]  # 64 multiplies, once per deployment: not counted
            return x @ w.t() * 2  # 2 * 64 for the matmul, 8 for the multiply

    assert _flops(Folded(), 1, 8) == (128, 136)


def test_count_flops_leaves_the_model_alone():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert count_flops(m, torch.randn(1, 4)) == 32  # batch 1 is fine: counting runs in eval mode
    assert m.training
    for k, v in m.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k


def test_meta_models_and_forward_kwargs():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x, scale=None):
            return self.fc(x) * scale

    with torch.device("meta"):
        m = Scaled()
    assert count_flops(m, torch.randn(1, 6), include_elementwise=True, scale=torch.ones(1, 3)) == 36 + 3 + 3


def test_falls_back_to_cpu_when_meta_cannot_run():
    class ReadsValues(nn.Module):  # .item() has no meaning on meta tensors
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(10, 20)

        def forward(self, x):
            keep = max(int((x > 0).sum().item()), 1)
            return self.fc(x)[:, :keep]

    # matmul 400 + bias 20 + comparison 10 + sum over 10 inputs
    assert count_flops(ReadsValues(), torch.zeros(1, 10), include_elementwise=True) == 440
    with torch.device("meta"):
        on_meta = ReadsValues()
    assert count_flops(on_meta, torch.zeros(1, 10)) == 400


def test_report_resnet152():
    r = model_size_report("resnet152")
    assert (r["kind"], r["input"], r["counted"]) == ("image", [1, 3, 224, 224], "whole model")
    assert (r["params"], r["params_unfolded"]) == (60_117_096, 60_192_808)
    # architecture.md section 0: 21.813B (2 MAC) and 21.848B (+ew).
    assert r["flops"] == pytest.approx(21.813e9, rel=1e-4)
    assert r["flops_ew"] == pytest.approx(21.848e9, rel=1e-4)


def test_report_seresnet152_ens2_needs_the_elementwise_ops():
    r = model_size_report("seresnet152_ens2")
    assert r["params"] == 64_463_088
    assert r["flops"] == pytest.approx(21.003e9, rel=1e-4)
    assert r["flops_ew"] == pytest.approx(21.075e9, rel=1e-4)  # the paper's 21.1B; 2 MAC alone rounds to 21.0B


def test_report_counts_only_the_video_level_of_frame_models():
    r = model_size_report("dbof_tiny")  # K = 64 cluster, H = 64 hidden, C = 16 classes, M = 2 experts
    assert r["kind"] == "features" and r["input"] == [1, 64]
    # hidden 64x64, context gate 64x64, MoE gates 64x(16*3), experts 64x(16*2); 2 FLOPs per MAC.
    assert r["flops"] == 2 * (64 * 64 + 64 * 64 + 64 * 48 + 64 * 32)
    # per frame: cluster 1152x64 and the first context gate 64x64.
    assert r["frame_flops"] == 2 * (1152 * 64 + 64 * 64)


def test_report_clip_models_take_the_declared_clip():
    r = model_size_report("s3dg_tiny")
    spec_frames, spec_size = r["input"][2], r["input"][3]
    assert r["kind"] == "clip" and r["input"] == [1, 3, spec_frames, spec_size, spec_size]
    assert r["flops"] > 0 and r["flops_ew"] > r["flops"]


def _tool():
    path = Path(__file__).resolve().parents[2] / "tools" / "model_size.py"
    spec = importlib.util.spec_from_file_location("model_size_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool(capsys):
    tool = _tool()
    assert set(tool.PAPER) == {
        "s3dg", "s3dg_ens2", "dbof", "dbof_ens2", "resnet152", "resnet152_ens2", "seresnet152", "seresnet152_ens2",
    }  # fmt: skip
    assert tool.main(["--models", "resnet_tiny,resnet152", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["resnet_tiny", "resnet152"]
    assert rows[0]["paper_params"] is None
    assert rows[1]["paper_params"] == 60.1e6 and rows[1]["params_delta_pct"] == pytest.approx(0.028, abs=1e-3)
    assert tool.main(["--models", "resnet_tiny"]) == 0
    assert "resnet_tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tool.main(["--models", "resnet_huge"])
