"""video_ens.evaluate's loop on a stand-in model and stream: progress with total, percentage and ETA; bad samples
named (gathered over ranks); multi-view scores averaged from the metrics' per-video sums."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import video_ens.evaluate
from video_ens.evaluate import evaluate, full_clip_forward, rank_share
from video_ens.models.ensemble import ModelOutput
from video_ens.progress import format_duration, merge_bad_samples, progress_line

CLASSES, BRANCHES = 6, 2


class _LinearEnsemble(nn.Module):
    """Two linear branches on a flat input, softmax-averaged: the attributes `evaluate` reads from an EnsembleNet."""

    output_type = "logits"
    activation = "softmax"
    num_branches = BRANCHES

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleList(nn.Linear(dim, CLASSES) for _ in range(BRANCHES))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        logits = torch.stack([h(x) for h in self.heads])  # (N, B, C)
        return ModelOutput(branches=logits, ensemble=torch.softmax(logits, -1).mean(0))


class _Stream:
    """An evaluation stream as video_ens.data.loader.EvalStream presents it: batches of ids, inputs, targets (and
    view ids), `num_samples`, `aggregate` and the bad-sample `stats` of the pass."""

    def __init__(self, videos: int, views: int, batch: int, *, bad: list[dict] = ()) -> None:
        rng = np.random.default_rng(1)
        self.num_classes, self.num_samples = CLASSES, videos + len(bad)
        self.aggregate = "mean" if views > 1 else "none"
        self.rows = [
            (f"vid{v:02d}", view, rng.standard_normal(4).astype(np.float32), v % CLASSES)
            for v in range(videos)
            for view in range(views)
        ]
        self.views, self.batch, self.bad = views, batch, list(bad)
        self.stats: dict = {}

    def batches(self):
        self.stats = {"samples": 0, "bad": 0, "bad_by_reason": {}, "last_bad": []}
        for start in range(0, len(self.rows), self.batch):
            rows = self.rows[start : start + self.batch]
            if start == 0:  # the bad samples show up in the stats as the pass goes
                for record in self.bad:
                    self.stats["bad"] += 1
                    reasons = self.stats["bad_by_reason"]
                    reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
                    self.stats["last_bad"].append(record)
            out = {
                "ids": [r[0] for r in rows],
                "inputs": torch.from_numpy(np.stack([r[2] for r in rows])),
                "target": torch.tensor([r[3] for r in rows]),
            }
            if self.views > 1:
                out["view_ids"] = torch.tensor([r[1] for r in rows])
            yield out


@pytest.fixture
def log_lines():
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("video_ens.evaluate")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_progress_lines_show_total_percentage_rate_and_eta(log_lines):
    stream = _Stream(videos=5, views=6, batch=4)  # 30 inputs in 8 batches
    evaluate(
        _LinearEnsemble(),
        stream,
        task="single_label",
        top_k=5,
        device=torch.device("cpu"),
        log_every=2,
        views_per_sample=6,
    )
    progress = [line for line in log_lines if line.startswith("evaluated")]
    assert len(progress) == 4
    pattern = r"evaluated inputs (\d+)/30 \(([\d.]+)%\) on rank 0, [\d.]+ inputs/s, eta \d+:\d\d:\d\d"
    done = [re.fullmatch(pattern, line) for line in progress]
    assert all(done), progress
    assert [int(m[1]) for m in done] == [8, 16, 24, 30] and done[-1][2] == "100.0"


def test_progress_of_a_one_view_stream_needs_no_views_per_sample(log_lines):
    stream = _Stream(videos=9, views=1, batch=3)
    evaluate(_LinearEnsemble(), stream, task="single_label", top_k=5, device=torch.device("cpu"), log_every=1)
    assert [line.split(" (")[0] for line in log_lines if line.startswith("evaluated")] == [
        "evaluated inputs 3/9",
        "evaluated inputs 6/9",
        "evaluated inputs 9/9",
    ]


def test_progress_line_without_total_and_duration_format():
    assert progress_line(350, None, 3.5) == "evaluated 350 inputs on rank 0, 100.0 inputs/s"
    line = progress_line(100, 400, 10.0, bad=2)
    assert line == (
        "evaluated inputs 100/400 (25.0%) on rank 0, 10.0 inputs/s, eta 0:00:30; 2 bad sample(s) skipped so far"
    )
    assert format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?"
    # The loader's split of N samples over R ranks: [N r / R, N (r + 1) / R).
    assert [rank_share(10, r, 4) for r in range(4)] == [2, 3, 2, 3]


def test_bad_samples_are_named_in_the_result():
    bad = [
        {"key": "vid77", "reason": "decode", "detail": "InvalidDataError: no frames"},
        {"key": "vid78", "reason": "label", "detail": "label 9 outside [0, 6)"},
    ]
    stream = _Stream(videos=4, views=1, batch=3, bad=bad)
    result = evaluate(_LinearEnsemble(), stream, task="single_label", top_k=5, device=torch.device("cpu"), log_every=0)
    assert result["bad_samples"] == 2 and result["num_samples"] == 4
    assert result["bad_sample_keys"] == {
        "bad": 2,
        "bad_by_reason": {"decode": 1, "label": 1},
        "last_bad": [{**r, "rank": 0} for r in bad],
    }


def test_bad_samples_of_all_ranks_merge():
    ranks = [
        {
            "bad": 12,
            "bad_by_reason": {"decode": 11, "shard": 1},
            "last_bad": [{"key": "a", "reason": "decode", "detail": "x"}],
        },
        {"bad": 0, "bad_by_reason": {}, "last_bad": []},
        {"bad": 1, "bad_by_reason": {"decode": 1}, "last_bad": [{"key": "b", "reason": "decode", "detail": "y"}]},
    ]
    assert merge_bad_samples(ranks) == {
        "bad": 13,
        "bad_by_reason": {"decode": 12, "shard": 1},
        "last_bad": [
            {"key": "a", "reason": "decode", "detail": "x", "rank": 0},
            {"key": "b", "reason": "decode", "detail": "y", "rank": 2},
        ],
    }


def test_multi_view_scores_are_per_video_averages():
    videos, views = 7, 5
    stream = _Stream(videos=videos, views=views, batch=3)  # a video's views straddle batches
    model = _LinearEnsemble()
    result = evaluate(
        model,
        stream,
        task="single_label",
        top_k=5,
        device=torch.device("cpu"),
        keep_scores=True,
        log_every=0,
        views_per_sample=views,
    )
    scores = result["scores"]
    assert list(scores["ids"]) == [f"vid{v:02d}" for v in range(videos)]
    assert list(scores["views"]) == [views] * videos and list(scores["targets"]) == [v % CLASSES for v in range(videos)]
    with torch.no_grad():
        x = torch.from_numpy(np.stack([r[2] for r in stream.rows]))
        out = model(x)
    probs = torch.cat([torch.softmax(out.branches, -1), out.ensemble[None]]).numpy()  # (N + 1, rows, C)
    mean = probs.reshape(BRANCHES + 1, videos, views, CLASSES).astype(np.float64).mean(2)
    np.testing.assert_allclose(scores["ensemble"], mean[-1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores["branches"], mean[:-1], rtol=0, atol=1e-6)
    assert scores["branches"].dtype == scores["ensemble"].dtype == np.float32


def test_per_class_and_top_predictions_of_a_multi_view_stream():
    """evaluate(per_class=True, keep_top=True) on 5-view videos: per-class accuracy, confusion and each video's best
    classes from the per-video averages computed here."""
    videos, views = 12, 5
    stream = _Stream(videos=videos, views=views, batch=4)
    model = _LinearEnsemble()
    result = evaluate(
        model,
        stream,
        task="single_label",
        top_k=3,
        device=torch.device("cpu"),
        log_every=0,
        views_per_sample=views,
        per_class=True,
        keep_top=True,
    )
    with torch.no_grad():
        out = model(torch.from_numpy(np.stack([r[2] for r in stream.rows])))
    ensemble = out.ensemble.numpy().reshape(videos, views, CLASSES).astype(np.float64).mean(1)  # (V, C)
    target = np.arange(videos) % CLASSES
    predicted = ensemble.argmax(1)
    per_class = result["per_class"]["ensemble"]
    np.testing.assert_array_equal(per_class["support"], np.bincount(target, minlength=CLASSES))
    np.testing.assert_allclose(per_class["top1"], [np.mean(predicted[target == c] == c) for c in range(CLASSES)])
    expected = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    np.add.at(expected, (target, predicted), 1)
    np.testing.assert_array_equal(per_class["confusion"], expected)
    assert np.trace(expected) / videos == result["ensemble"]["top1"]
    assert len(result["per_class"]["branches"]) == BRANCHES
    top = result["top"]
    assert list(top["ids"]) == [f"vid{v:02d}" for v in range(videos)]
    np.testing.assert_array_equal(top["classes"], np.argsort(-ensemble, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(top["scores"], -np.sort(-ensemble, axis=1)[:, :3], rtol=1e-6)


def test_keep_top_of_a_one_view_single_label_stream_is_refused_before_the_pass():
    stream = _Stream(videos=3, views=1, batch=3)
    with pytest.raises(ValueError, match="keep_top needs multi-label data or a multi-view stream"):
        evaluate(_LinearEnsemble(), stream, task="single_label", top_k=5, device=torch.device("cpu"), keep_top=True)
    assert stream.stats == {}  # refused before reading a batch


def test_evaluation_reaches_a_model_only_through_its_interface():
    """evaluate.py imports the model interface (video_ens.models.ensemble), never a family's layers; a model without
    a windowed whole-clip forward is told so instead of being walked."""
    tree = ast.parse(Path(video_ens.evaluate.__file__).read_text())
    models = {
        f"{node.module}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "models"
    }
    assert models == {"models.ensemble"}, models
    clip = torch.zeros(1, 3, 20, 4, 4)
    with pytest.raises(ValueError, match="_LinearEnsemble has no windowed whole-clip forward.*--max-chunk-frames 0"):
        full_clip_forward(_LinearEnsemble(), clip, max_chunk_frames=8)
    calls = []
    model = _LinearEnsemble()
    model.full_clip_forward = lambda x, *, max_chunk_frames: calls.append((x.shape[2], max_chunk_frames)) or "out"
    assert full_clip_forward(model, clip, max_chunk_frames=8) == "out" and calls == [(20, 8)]
