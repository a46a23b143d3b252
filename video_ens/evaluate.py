"""Evaluation of a built model over an evaluation stream: every sample once, per branch and for the ensemble.

    model.load_state_dict(...)                                  # or load_weights(model, "run/model.safetensors")
    result = evaluate(model, stream, task="single_label", top_k=20, device=device, precision="bf16",
                      max_chunk_frames=64)
    # {"ensemble": {...}, "branches": [{...}, ...], "num_samples": n, "inputs": views, "seconds": s, ...}

`evaluate` is the loop tools/eval.py runs (and the trainer's periodic evaluation can run): forward under autocast,
branch probabilities and the ensemble into `EnsembleMetrics`, which counts every sample id once and, for multi-view
testing (K clips x crops per video, the stream's aggregate="mean"), averages the views of a video across ranks.

Clips longer than `max_chunk_frames` go through `full_clip_forward`, which asks the model for its exact windowed
forward (S3D-G: `S3DGNet.full_clip_forward`, video_ens.models.s3dg_chunked); this module knows no model's layers.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from . import dist
from .data.transforms import to_model_input
from .metrics import EnsembleMetrics
from .models.ensemble import EnsembleNet, ModelOutput, branch_probs
from .progress import gather_bad_samples, progress_line

LOG = dist.get_logger("video_ens.evaluate")

__all__ = ["autocast", "evaluate", "full_clip_forward", "load_weights", "rank_share"]


# --------------------------------------------------------------------------------------------------------------------
# Weights


def load_weights(model: nn.Module, path: str | Path, *, expect_model: str | None = None) -> dict[str, str]:
    """Load a safetensors state dict into `model` strictly (every key, every shape); returns the file's metadata.

    `expect_model`: the recipe's model.name; a file whose metadata names another model (train.py records it)
    is refused with both names, before the shape errors that would otherwise follow.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (a finished run writes RUN_DIR/model.safetensors)")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    saved = metadata.get("model")
    if expect_model is not None and saved is not None and saved != expect_model:
        raise ValueError(
            f"{path} holds weights of model {saved!r} but the recipe builds {expect_model!r}: pass the recipe of "
            f"the run that wrote the weights, or --set model.name={saved}"
        )
    state = load_file(str(path), device="cpu")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path} does not fit the model built from the recipe: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}, {len(reshaped)} of another shape "
            f"{reshaped[:2]} (file vs model); check model.* in the recipe (num_branches, width_ratio, fork, "
            "num_classes, options)"
        )
    model.load_state_dict(state, strict=True)
    return metadata


# --------------------------------------------------------------------------------------------------------------------
# Whole-clip forward in temporal windows


def full_clip_forward(model: EnsembleNet, x: torch.Tensor, *, max_chunk_frames: int | None) -> ModelOutput:
    """`model(x)` for a whole clip x (B, 3, T, H, W), in temporal windows of at most `max_chunk_frames` frames where the
    model offers an exact windowed forward (`model.full_clip_forward`; S3D-G's equals one pass up to fp32 rounding).

    max_chunk_frames None or 0, or a clip no longer than it: one ordinary pass. The model must be in eval mode.
    """
    if not max_chunk_frames or x.shape[2] <= max_chunk_frames:
        return model(x)
    windowed = getattr(model, "full_clip_forward", None)
    if windowed is None:
        raise ValueError(
            f"{type(model).__name__} has no windowed whole-clip forward (S3D-G has, video_ens.models.s3dg_chunked): "
            "evaluate in one pass (--max-chunk-frames 0) or in clips (eval.mode=clips)"
        )
    return windowed(x, max_chunk_frames=max_chunk_frames)


# --------------------------------------------------------------------------------------------------------------------
# The evaluation loop


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision name ("fp32", "bf16", "fp16"), as the trainer uses it."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")


def _all_reduce(values: list[float], device: torch.device, op: str) -> list[float]:
    """Sum ("sum") or maximum ("max") of per-rank numbers over all ranks; the values themselves on one process."""
    vec = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        tdist.all_reduce(vec, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
    return vec.tolist()


class _ScoreKeeper:
    """Per-row probabilities of every head, gathered over ranks, for saving scores from a one-view stream
    (aggregate "none"). Multi-view streams take their per-video averages from the metrics' per-id sums instead
    (`EnsembleMetrics.mean_scores`), so that no one holds every view."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.targets: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []  # (B, N + 1, C): branches then the ensemble

    def add(self, ids, targets: torch.Tensor, probs: torch.Tensor, ensemble: torch.Tensor) -> None:
        self.ids += [str(i) for i in ids]
        self.targets.append(targets.cpu().numpy())
        heads = torch.cat([probs, ensemble[None]]).transpose(0, 1)  # (B, N + 1, C)
        self.scores.append(heads.float().cpu().numpy())

    def gather(self) -> dict[str, np.ndarray]:
        mine = (self.ids, self.targets, self.scores)
        parts = [mine]
        if dist.is_initialized():
            parts = [None] * dist.world_size()
            tdist.all_gather_object(parts, mine)
        ids = np.asarray([i for p in parts for i in p[0]])
        targets = np.concatenate([t for p in parts for t in p[1]])
        scores = np.concatenate([s for p in parts for s in p[2]])
        uniq, first = np.unique(ids, return_index=True)  # sorted by id, as the metrics (which refuse a repeated id)
        return _scores_dict(uniq.astype(str), np.ones(uniq.size, dtype=np.int64), targets[first], scores[first])


def _scores_dict(ids: np.ndarray, views: np.ndarray, targets: np.ndarray, mean: np.ndarray) -> dict[str, np.ndarray]:
    """The "scores" entry of `evaluate`'s result from per-video means (V, N + 1, C)."""
    return {
        "ids": ids,
        "views": views,
        "targets": targets,
        "branches": mean[:, :-1].transpose(1, 0, 2).astype(np.float32),  # (N, V, C)
        "ensemble": mean[:, -1].astype(np.float32),  # (V, C)
    }


def _metric_scores(acc: EnsembleMetrics, task: str) -> dict[str, np.ndarray]:
    """The "scores" entry from a synced aggregate="mean" accumulator: its per-id sums over views."""
    mean = acc.mean_scores(dtype=np.float32)
    targets = mean["targets"].astype(np.float32) if task == "multi_label" else mean["targets"]  # as the loader's
    return _scores_dict(mean["ids"].astype(str), mean["views"], targets, mean["scores"])


# --------------------------------------------------------------------------------------------------------------------
# Progress


def rank_share(num_samples: int, rank: int, world_size: int) -> int:
    """How many of `num_samples` evaluation samples rank `rank` reads: the loader gives rank r the global indices
    [N r / R, N (r + 1) / R) (video_ens.data.loader, "Evaluation: every sample once")."""
    return num_samples * (rank + 1) // world_size - num_samples * rank // world_size


@torch.no_grad()
def evaluate(
    model: EnsembleNet,
    stream,
    *,
    task: str,
    top_k: int,
    device: torch.device,
    precision: str = "fp32",
    max_chunk_frames: int | None = None,
    keep_scores: bool = False,
    log_every: int = 50,
    views_per_sample: int | None = None,
    per_class: bool = False,
    keep_top: bool = False,
) -> dict[str, Any]:
    """Every metric per branch and for the ensemble over the whole evaluation set; a collective on every rank.

    Args:
        model: on `device`; switched to eval mode for the pass and back afterwards.
        stream: this rank's evaluation stream (video_ens.data.loader.eval_stream): `batches()`, `num_classes`,
            `aggregate` ("mean" for multi-view clips), `stats`, `num_samples`.
        task: "single_label" (top-1, top-5) or "multi_label" (GAP, mAP, hit@1), see video_ens.data.loader.metrics_task.
        top_k: predictions kept per video for GAP and mAP.
        precision: autocast dtype of the forward ("fp32", "bf16", "fp16"); metrics are computed in fp32.
        max_chunk_frames: clips longer than this many frames go through `full_clip_forward`.
        keep_scores: also return the per-video probabilities, averaged over views ("scores", every rank).
        log_every: log progress on rank 0 every this many batches (0: never): inputs done out of this rank's
            share, percentage, rate and ETA.
        views_per_sample: model inputs per sample (eval.num_clips x eval.num_crops in mode "clips"), for the
            progress total; a one-view stream (aggregate "none") has 1. Unknown: the progress shows no total.
        per_class: also return every head's per-class numbers ("per_class", see EnsembleMetrics.compute): support,
            accuracy and the confusion matrix (single-label) or AP (multi-label). No more memory than the metrics.
        keep_top: also return the ensemble's `top_k` classes and scores per video ("top": {"ids", "classes",
            "scores"}, EnsembleMetrics.top_predictions), from what the metrics keep anyway: multi-label data, or a
            multi-view stream.

    Returns {"ensemble", "branches", "num_samples", "inputs" (model inputs over all ranks: views in mode "clips"),
    "seconds" (reading and forward passes, slowest rank), "samples_per_s", "inputs_per_s", "metrics_seconds"
    (merging and computing the metrics), "bad_samples" (how many, all ranks), "bad_sample_keys" (all ranks:
    {"bad", "bad_by_reason", "last_bad": [{"key", "reason", "detail", "rank"}]}, see video_ens.progress.merge_bad_samples)} and
    "scores" ({"ids", "views" (per video), "targets", "branches" (N, V, C), "ensemble" (V, C): probabilities
    averaged over views, ids sorted}), "per_class" and "top" when asked.
    """
    if keep_top and task == "single_label" and stream.aggregate != "mean":
        raise ValueError(
            "keep_top needs multi-label data or a multi-view stream: a single-label, one-view "
            "evaluation keeps no scores (keep_scores=True keeps them all)"
        )
    was_training = model.training
    model.eval()
    # Built before the loop: a rank whose share of the evaluation set is empty still joins the sync.
    acc = EnsembleMetrics(
        task=task,
        num_classes=stream.num_classes,
        num_branches=model.num_branches,
        top_k=top_k,
        aggregate=stream.aggregate,
    )
    # A multi-view stream's scores come from the metrics' per-video sums; a one-view stream's rows are kept.
    keeper = _ScoreKeeper() if keep_scores and stream.aggregate != "mean" else None
    if views_per_sample is None and stream.aggregate != "mean":
        views_per_sample = 1
    num_samples = getattr(stream, "num_samples", None)
    total_inputs = None
    if views_per_sample and num_samples is not None:
        total_inputs = rank_share(num_samples, dist.rank(), dist.world_size()) * views_per_sample
    inputs_seen = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.monotonic()
    try:
        for i, batch in enumerate(stream.batches()):
            x = to_model_input(batch, device)  # clips: boxes resized to the crop and normalised here
            kwargs = {"lengths": batch["lengths"].to(device)} if "lengths" in batch else {}
            with autocast(device, precision):
                if x.dim() == 5 and max_chunk_frames and x.shape[2] > max_chunk_frames:
                    out = full_clip_forward(model, x, max_chunk_frames=max_chunk_frames)
                else:
                    out = model(x, **kwargs)
            if out.ensemble.shape[-1] != stream.num_classes:
                raise ValueError(
                    f"the model predicts {out.ensemble.shape[-1]} classes but the evaluation set has "
                    f"{stream.num_classes}: set model.num_classes to {stream.num_classes} (and use matching weights)"
                )
            probs = branch_probs(out.branches, model.output_type, model.activation)  # (N, B, C)
            ensemble = out.ensemble.float()
            views = batch.get("view_ids")
            acc.update(batch["ids"], probs, ensemble, batch["target"], view_ids=views)
            if keeper is not None:
                keeper.add(batch["ids"], batch["target"], probs, ensemble)
            inputs_seen += x.shape[0]
            if log_every and (i + 1) % log_every == 0:
                bad = int(getattr(stream, "stats", {}).get("bad", 0))
                LOG.info(progress_line(inputs_seen, total_inputs, time.monotonic() - t0, bad=bad))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # Throughput covers reading, decoding and the forward passes, up to the slowest rank; merging and computing
        # the metrics (seconds for GAP over 100k videos) is reported apart.
        (seconds,) = _all_reduce([time.monotonic() - t0], device, "max")
        t1 = time.monotonic()
        acc.sync()
        result = acc.compute(per_class=per_class)
        if keep_top:
            result["top"] = acc.top_predictions()
        if keep_scores:
            scores = keeper.gather() if keeper is not None else _metric_scores(acc, task)
        del acc
    finally:
        model.train(was_training)
    (inputs_total,) = _all_reduce([inputs_seen], device, "sum")
    bad = gather_bad_samples(getattr(stream, "stats", {}))
    result["inputs"] = int(inputs_total)
    result["seconds"] = round(seconds, 3)
    result["samples_per_s"] = result["num_samples"] / max(seconds, 1e-9)
    result["inputs_per_s"] = inputs_total / max(seconds, 1e-9)
    result["metrics_seconds"] = round(time.monotonic() - t1, 3)
    result["bad_samples"] = bad["bad"]
    result["bad_sample_keys"] = bad
    if keep_scores:
        result["scores"] = scores
    return result
