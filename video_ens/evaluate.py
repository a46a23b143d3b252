"""Evaluation of a built model over an evaluation stream: every sample once, per branch and for the ensemble.

    model.load_state_dict(...)                                  # or load_weights(model, "run/model.safetensors")
    result = evaluate(model, stream, task="single_label", top_k=20, device=device, precision="bf16",
                      max_chunk_frames=64)
    # {"ensemble": {...}, "branches": [{...}, ...], "num_samples": n, "inputs": views, "seconds": s, ...}

`evaluate` is the loop tools/eval.py runs (and the trainer's periodic evaluation can run): forward under autocast,
branch probabilities and the ensemble into `EnsembleMetrics`, which de-duplicates by sample id and, for multi-view
testing (K clips x crops per video, the stream's aggregate="mean"), averages the views of a video across ranks.

Whole-clip evaluation in temporal chunks (`full_clip_forward`)
---------------------------------------------------------------
S3D-G is convolutional in time except for two kinds of layer: every self-gate multiplies by
sigmoid(W mean_THW(x)), a mean over the *whole* clip, and Logits averages over time. A clip cut into windows that
each run the whole network therefore does not give the one-pass result: each window's gates see only their own
frames (tiny S3D-G, random weights, BN calibrated on random clips: averaging 16-frame windows of a 40-frame clip
moves the logits by 0.42 where they are 0.38 in size; tests/integration/test_eval_tools.py). The exact chunked
pass walks the network instead:

* a maximal run of temporally local layers (convs, pools, BN in eval mode, ReLU: Unit3d, SepConv3d, max-pools)
  runs over the clip in windows of at most `max_chunk_frames` input frames. Each window carries a halo of
  H = ceil(R / S) x S frames on both sides (R = the run's temporal receptive field, S = its cumulative temporal
  stride); window starts are multiples of S, so every window's output grid is a slice of the one-pass grid. The
  outputs whose receptive field leaves the window are dropped and the rest written into the whole-clip output;
* a gate, and the Logits head, run on the whole-clip activation they receive, exactly as in one pass;
* an inception block runs each of its four paths that way and concatenates them.

So every layer computes what it computes in one pass (bit for bit on CPU; a conv over another length may round
differently on GPU, ~1e-7 in fp32). The saving is modest, because every gate needs its whole-clip input in memory:
peak memory is the whole-clip activations at layer boundaries plus one window's intermediates. s3dg_ens2 on one
128-frame 112^2 clip (CPU, 2 threads, fresh process, glibc mmap threshold 64 kB so RSS follows live memory): one
pass +133 MB, 32-frame windows +103 MB; time 0.62 s vs 0.68 s (the halos recompute ~10%). Cutting memory further
would mean recomputing the network once per gate. A whole 300-frame Kinetics video at 224^2 needs ~1-2 GB in one
pass (by the same scaling), so windows are for very long videos or large batches.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
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
from .models.s3dg import FeatureGate, InceptionBlock, Logits, SepConv3d, Unit3d

LOG = dist.get_logger("video_ens.evaluate")

__all__ = ["autocast", "evaluate", "full_clip_forward", "load_weights", "temporal_geometry"]


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
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                if k in state and state[k].shape != v.shape]
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
# Whole-clip forward in temporal chunks

# Leaves that act on each time step separately (BatchNorm only in eval mode, checked where it is met).
_POINTWISE_IN_TIME = (nn.BatchNorm3d, nn.ReLU, nn.Dropout, nn.Identity)
# Modules whose forward is the chain of their children in registration order (s3dg.Unit3d: conv, bn, relu;
# SepConv3d: spatial, bn, relu, temporal, relu).
_CHAINS = (Unit3d, SepConv3d, nn.Sequential)
# Modules that read the whole clip: the gates' mean over (T, H, W), the head's mean over time.
_WHOLE_CLIP = (FeatureGate, Logits)


def _first(value: Any) -> int:
    """The temporal entry of a conv/pool size argument given as an int or a (T, H, W) tuple."""
    return int(value) if isinstance(value, int) else int(value[0])


def _leaf_window(m: nn.Module) -> tuple[int, int, int, bool] | None:
    """(kernel extent, stride, padding, ceil_mode) of a temporally local leaf along time; None when pointwise."""
    if isinstance(m, _POINTWISE_IN_TIME):
        if isinstance(m, nn.BatchNorm3d) and m.training:
            raise ValueError("chunked evaluation needs the model in eval mode: BatchNorm with batch statistics couples "
                             "the chunks; call model.eval()")
        return None
    if isinstance(m, nn.Conv3d):
        if isinstance(m.padding, str):
            raise ValueError(f"chunked evaluation needs numeric conv padding, got padding={m.padding!r}")
        k = _first(m.dilation) * (_first(m.kernel_size) - 1) + 1
        return k, _first(m.stride), _first(m.padding), False
    if isinstance(m, nn.MaxPool3d | nn.AvgPool3d):
        dilation = _first(m.dilation) if isinstance(m, nn.MaxPool3d) else 1
        k = dilation * (_first(m.kernel_size) - 1) + 1
        stride = _first(m.stride if m.stride is not None else m.kernel_size)
        return k, stride, _first(m.padding), bool(m.ceil_mode)
    raise TypeError(type(m).__name__)


def _local_leaves(module: nn.Module) -> list[nn.Module] | None:
    """The leaves of a temporally local module in execution order, or None if it (or a part of it) is not local."""
    if isinstance(module, _WHOLE_CLIP) or isinstance(module, InceptionBlock):
        return None
    if isinstance(module, _CHAINS):
        leaves: list[nn.Module] = []
        for child in module.children():
            sub = _local_leaves(child)
            if sub is None:
                return None
            leaves += sub
        return leaves
    try:
        _leaf_window(module)
    except TypeError:
        return None
    return [module]


def temporal_geometry(leaves: Iterable[nn.Module]) -> tuple[int, int]:
    """(receptive field R, cumulative stride S) along time of a chain of local leaves, in input frames.

    R = 1 + sum_i (k_i - 1) prod_{j<i} s_j; S = prod_i s_i. Output t of the chain reads input frames
    [t S - P, t S - P + R) for a P < R set by the paddings.
    """
    field, stride = 1, 1
    for leaf in leaves:
        window = _leaf_window(leaf)
        if window is None:
            continue
        k, s, _, _ = window
        field += (k - 1) * stride
        stride *= s
    return field, stride


def _out_length(leaves: Iterable[nn.Module], n: int) -> int:
    """Temporal output length of the chain on n input frames (PyTorch's conv and pool length formulas)."""
    for leaf in leaves:
        window = _leaf_window(leaf)
        if window is None:
            continue
        k, s, p, ceil_mode = window
        span = n + 2 * p - k
        if ceil_mode:
            out = -(-span // s) + 1
            if (out - 1) * s >= n + p:  # the last window must start inside the input or the left padding
                out -= 1
        else:
            out = span // s + 1
        n = out
    return n


def _run_chain(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in modules:
        x = m(x)
    return x


def _chunked(modules: list[nn.Module], x: torch.Tensor, max_chunk_frames: int) -> torch.Tensor:
    """A run of local modules over x (B, C, T, H, W) in windows of at most max_chunk_frames frames, halo included."""
    t = x.shape[2]
    if t <= max_chunk_frames:
        return _run_chain(modules, x)
    leaves = [leaf for m in modules for leaf in _local_leaves(m)]
    field, stride = temporal_geometry(leaves)
    halo = math.ceil(field / stride) * stride  # >= R and a multiple of S: windows start on the output grid
    core = (max_chunk_frames - 2 * halo) // stride * stride
    if core < stride:
        raise ValueError(
            f"max_chunk_frames {max_chunk_frames} leaves no room between two halos of {halo} frames (receptive "
            f"field {field}, stride {stride}): use at least {2 * halo + stride}"
        )
    total = _out_length(leaves, t)
    out: torch.Tensor | None = None
    for start in range(0, t, core):
        end = min(start + core, t)
        lo, hi = max(0, start - halo), min(t, end + halo)
        y = _run_chain(modules, x[:, :, lo:hi])  # (B, C', T_window', H', W')
        first = (start - lo) // stride
        last = (end - lo) // stride if end < t else y.shape[2]
        piece = y[:, :, first:last]
        if out is None:
            fmt = torch.channels_last_3d if _is_channels_last(y) else torch.contiguous_format
            out = torch.empty((*y.shape[:2], total, *y.shape[3:]), dtype=y.dtype, device=y.device, memory_format=fmt)
        at = start // stride
        out[:, :, at : at + piece.shape[2]] = piece
        del y, piece
    assert out is not None and at + (last - first) == total, "temporal windows do not tile the output"
    return out


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def _walk(module: nn.Module, x: torch.Tensor, max_chunk_frames: int) -> torch.Tensor:
    """`module(x)` on a whole clip, with every run of local layers windowed in time (see the module docstring)."""
    if _local_leaves(module) is not None:
        return _chunked([module], x, max_chunk_frames)
    if isinstance(module, _WHOLE_CLIP):
        return module(x)
    if isinstance(module, InceptionBlock):
        paths = (module.Branch_0, module.Branch_1, module.Branch_2, module.Branch_3)
        return torch.cat([_walk(p, x, max_chunk_frames) for p in paths], dim=1)  # same order as its forward
    if isinstance(module, nn.Sequential):
        run: list[nn.Module] = []  # consecutive local children share one windowed pass
        for child in module.children():
            if _local_leaves(child) is not None:
                run.append(child)
                continue
            if run:
                x, run = _chunked(run, x, max_chunk_frames), []
            x = _walk(child, x, max_chunk_frames)
        return _chunked(run, x, max_chunk_frames) if run else x
    raise ValueError(
        f"chunked whole-clip evaluation does not know how {type(module).__name__} uses time; it handles S3D-G "
        "(video_ens.models.s3dg). Evaluate in one pass (--max-chunk-frames 0) or in clips (eval.mode=clips)"
    )


def full_clip_forward(model: EnsembleNet, x: torch.Tensor, *, max_chunk_frames: int | None) -> ModelOutput:
    """`model(x)` for a whole clip x (B, 3, T, H, W), computed in temporal windows of at most `max_chunk_frames`
    frames where the network is local in time; equal to one pass up to fp32 rounding (module docstring).

    max_chunk_frames None or 0, or a clip no longer than it: one ordinary pass. The model must be in eval mode.
    """
    if not max_chunk_frames or x.shape[2] <= max_chunk_frames:
        return model(x)
    if model.training:
        raise ValueError("full_clip_forward needs model.eval(): BatchNorm with batch statistics couples the chunks")
    if x.dim() != 5:
        raise ValueError(f"full_clip_forward expects a clip batch (B, 3, T, H, W), got shape {tuple(x.shape)}")
    h = _walk(model.base, x, max_chunk_frames)
    outs = torch.stack([_walk(b, h, max_chunk_frames) for b in model.branches], dim=0)  # (N, B, C)
    probs = branch_probs(outs, model.output_type, model.activation)  # (N, B, C), fp32
    return ModelOutput(branches=outs, ensemble=model.ensembler(probs))


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
    (aggregate "first"). Multi-view streams take their per-video averages from the metrics' per-id sums instead
    (`EnsembleMetrics.mean_scores`), so that no one holds every view."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.views: list[int] = []
        self.targets: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []  # (B, N + 1, C): branches then the ensemble

    def add(self, ids, views, targets: torch.Tensor, probs: torch.Tensor, ensemble: torch.Tensor) -> None:
        self.ids += [str(i) for i in ids]
        self.views += [int(v) for v in views] if views is not None else [0] * len(ids)
        self.targets.append(targets.cpu().numpy())
        heads = torch.cat([probs, ensemble[None]]).transpose(0, 1)  # (B, N + 1, C)
        self.scores.append(heads.float().cpu().numpy())

    def gather(self) -> dict[str, np.ndarray]:
        mine = (self.ids, self.views, self.targets, self.scores)
        parts = [mine]
        if dist.is_initialized():
            parts = [None] * dist.world_size()
            tdist.all_gather_object(parts, mine)
        ids = [i for p in parts for i in p[0]]
        views = np.asarray([v for p in parts for v in p[1]], dtype=np.int64)
        targets = np.concatenate([t for p in parts for t in p[2]])
        scores = np.concatenate([s for p in parts for s in p[3]])
        uniq, inverse = np.unique(np.asarray(ids), return_inverse=True)
        # one row per (id, view): the same view seen twice counts once, as EnsembleMetrics counts it
        _, keep = np.unique(np.stack([inverse.reshape(-1), views], axis=1), axis=0, return_index=True)
        inverse, targets, scores = inverse.reshape(-1)[keep], targets[keep], scores[keep]
        sums = np.zeros((uniq.size, *scores.shape[1:]), dtype=np.float64)
        np.add.at(sums, inverse, scores)
        counts = np.bincount(inverse, minlength=uniq.size)
        first = np.full(uniq.size, -1)
        first[inverse[::-1]] = np.arange(inverse.size)[::-1]
        return _scores_dict(uniq.astype(str), counts, targets[first], sums / counts[:, None, None])


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
# Progress and bad samples


def rank_share(num_samples: int, rank: int, world_size: int) -> int:
    """How many of `num_samples` evaluation samples rank `rank` reads: the loader gives rank r the global indices
    [N r / R, N (r + 1) / R) (video_ens.data.loader, "Evaluation: every sample once")."""
    return num_samples * (rank + 1) // world_size - num_samples * rank // world_size


def format_duration(seconds: float) -> str:
    """H:MM:SS, or "?" when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def progress_line(done: int, total: int | None, seconds: float, *, bad: int = 0) -> str:
    """"evaluated inputs 350/1200 (29.2%) on rank 0, 99.3 inputs/s, eta 0:00:09"; without a total, the count and
    rate only. The ETA assumes the rate so far holds for the rest of this rank's share."""
    rate = done / max(seconds, 1e-9)
    if total:
        eta = (total - done) / rate if rate > 0 else float("inf")
        text = (f"evaluated inputs {done}/{total} ({100 * done / total:.1f}%) on rank 0, {rate:.1f} inputs/s, "
                f"eta {format_duration(max(eta, 0.0))}")
    else:
        text = f"evaluated {done} inputs on rank 0, {rate:.1f} inputs/s"
    return text + (f"; {bad} bad sample(s) skipped so far" if bad else "")


def merge_bad_samples(per_rank: list[dict]) -> dict[str, Any]:
    """The bad-sample stats of every rank's stream (`stream.stats`) as one: {"bad": total, "bad_by_reason":
    {reason: total}, "last_bad": [{"key", "reason", "detail", "rank"}, ...]} (the trainer's "bad_sample_keys" form;
    each rank keeps its last few records, video_ens.data.samples.LAST_BAD_KEPT, so the list is bounded)."""
    by_reason: dict[str, int] = {}
    records: list[dict] = []
    for rank, stats in enumerate(per_rank):
        for reason, n in (stats.get("bad_by_reason") or {}).items():
            by_reason[reason] = by_reason.get(reason, 0) + int(n)
        records += [{**record, "rank": rank} for record in stats.get("last_bad") or []]
    total = sum(int(stats.get("bad", 0)) for stats in per_rank)
    return {"bad": total, "bad_by_reason": dict(sorted(by_reason.items())), "last_bad": records}


def gather_bad_samples(stats: dict) -> dict[str, Any]:
    """`merge_bad_samples` over all ranks (a collective when torch.distributed is initialised)."""
    mine = {"bad": int(stats.get("bad") or 0), "bad_by_reason": dict(stats.get("bad_by_reason") or {}),
            "last_bad": list(stats.get("last_bad") or [])}
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * dist.world_size()
        tdist.all_gather_object(parts, mine)
    return merge_bad_samples(parts)


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
            progress total; a one-view stream (aggregate "first") has 1. Unknown: the progress shows no total.
        per_class: also return every head's per-class numbers ("per_class", see EnsembleMetrics.compute): support,
            accuracy and the confusion matrix (single-label) or AP (multi-label). No more memory than the metrics.
        keep_top: also return the ensemble's `top_k` classes and scores per video ("top": {"ids", "classes",
            "scores"}, EnsembleMetrics.top_predictions), from what the metrics keep anyway: multi-label data, or a
            multi-view stream.

    Returns {"ensemble", "branches", "num_samples", "inputs" (model inputs over all ranks: views in mode "clips"),
    "seconds" (reading and forward passes, slowest rank), "samples_per_s", "inputs_per_s", "metrics_seconds"
    (merging and computing the metrics), "bad_samples" (how many, all ranks), "bad_sample_keys" (all ranks:
    {"bad", "bad_by_reason", "last_bad": [{"key", "reason", "detail", "rank"}]}, see `merge_bad_samples`)} and
    "scores" ({"ids", "views" (per video), "targets", "branches" (N, V, C), "ensemble" (V, C): probabilities
    averaged over views, ids sorted}), "per_class" and "top" when asked.
    """
    if keep_top and task == "single_label" and stream.aggregate != "mean":
        raise ValueError("keep_top needs multi-label data or a multi-view stream: a single-label, one-view "
                         "evaluation keeps no scores (keep_scores=True keeps them all)")
    was_training = model.training
    model.eval()
    # Built before the loop: a rank whose share of the evaluation set is empty still joins the sync.
    acc = EnsembleMetrics(task=task, num_classes=stream.num_classes, num_branches=model.num_branches, top_k=top_k,
                          aggregate=stream.aggregate)
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
                keeper.add(batch["ids"], views, batch["target"], probs, ensemble)
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
