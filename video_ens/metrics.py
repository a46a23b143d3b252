"""Evaluation metrics: top-k accuracy, hit@1, GAP@20 and mAP@20, per branch and for the ensemble.

Two layers:

* Functions on one score matrix: `topk_accuracy`, `hit_at_one`, `gap`, `mean_ap`. They take numpy arrays or
  torch tensors (any device, any float dtype) and return a Python float. Per class, for the reports:
  `per_class_accuracy`, `class_average_precision` (whose mean is `mean_ap`), `confusion_matrix`, `most_confused`.
* `EnsembleMetrics`, a streaming accumulator keyed by sample id. It takes per-batch outputs of every branch and
  of the ensemble, merges across ranks, counts each sample id once (the padding a distributed sampler adds, or the
  several clips of one video, never count twice) and reports every metric per head.

GAP and mAP follow the YouTube-8M starter code (google/youtube-8m `eval_util.py`, `average_precision_calculator.py`,
`mean_average_precision_calculator.py`, run by `eval.py --top_k=20`); design/architecture.md section 5 states the
semantics in prose:

1. Each video keeps its `top_k` highest-scoring classes, picked with `np.argpartition` (which classes survive a tie
   at the cut is numpy's choice, as it is in the starter code).
2. AP of a ranked list = (1/P) * sum over the positives in it of (positives at or above it) / (its rank), where P is
   the number of positive labels in the whole evaluation set, including those cut off by step 1 (no min(P, n) cap).
3. GAP: one list pooling the kept (score, label) pairs of all videos; P = all positive labels.
   mAP: one list per class (the videos where that class was kept); P_c = positives of the class; classes with
   P_c = 0 are left out of the mean (`filter_empty_classes=True`).

Ties. The starter code pushes the pairs onto a heap, shuffles the heap's array with `random.seed(0)` and
`random.sample`, then stably sorts by score, descending: tied pairs land in a seeded pseudo-random order. When no tie
mixes a positive with a negative, every order gives the same AP and we use one `np.argsort`. Otherwise we replay
the heap, the shuffle and the sort exactly (with a private `random.Random(0)`, so the global `random` state is left
alone). That costs ~2 s for a 2M-entry list (100k videos x 20), plus ~6 s the first time a list length is seen, to
draw the shuffle, which all heads then share (measured on a shared 2-core CPU). It is the common case: float32 sigmoid
outputs of 30k synthetic videos (600k kept pairs) already tie across labels. The pairs are pushed in the starter's order: class by class, videos in row order
within a class (`top_k_by_class` then `flatten`). For mAP this order does not depend on batching; for GAP the starter's
streaming `EvaluationMetrics` pushes batch by batch, so with ties its value depends on the batch size, whereas ours is
that of a single batch holding all videos (sorted by sample id in `EnsembleMetrics`).
"""

from __future__ import annotations

import collections
import functools
import heapq
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Rows per np.argpartition call: argpartition returns int64 indices for the whole block, so 100k x 3862 in one call
# would allocate 3 GB; 4096 rows cap it at ~130 MB.
_ROWS_PER_BLOCK = 4096


# --------------------------------------------------------------------------------------------------------------------
# Input conversion


def _as_numpy(x: Any, *, name: str) -> np.ndarray:
    """A numpy view or copy of `x`; half-precision floats become float32 (exact), since numpy has no bfloat16."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}") from exc
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return arr


def _scores_2d(scores: Any, *, name: str = "scores") -> np.ndarray:
    """(B, C) real scores; NaN is refused because it has no place in a ranking."""
    arr = _as_numpy(scores, name=name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (B, C), got {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; check the model output (or the loss scale) before evaluating")
    return arr


def _multi_hot(labels: Any, shape: tuple[int, int], *, name: str = "labels") -> np.ndarray:
    """(B, C) bool; any value > 0 is a positive, as in the starter code."""
    arr = _as_numpy(labels, name=name)
    if arr.shape != shape:
        raise ValueError(f"{name} must be multi-hot with the scores' shape {shape}, got {arr.shape}")
    return arr > 0


def _class_targets(target: Any, num_rows: int, num_classes: int, *, name: str = "target") -> np.ndarray:
    """(B,) int64 class indices from indices (B,) or one-hot/soft targets (B, C) (argmax, lowest index on ties)."""
    arr = _as_numpy(target, name=name)
    if arr.ndim == 2:
        if arr.shape != (num_rows, num_classes):
            raise ValueError(f"{name} given as (B, C) must have shape {(num_rows, num_classes)}, got {arr.shape}")
        arr = np.argmax(arr, axis=1)
    elif arr.ndim != 1 or arr.shape[0] != num_rows:
        raise ValueError(f"{name} must be class indices (B,) = ({num_rows},) or one-hot (B, C), got {arr.shape}")
    elif arr.dtype.kind not in "iu":
        raise TypeError(f"{name} as class indices must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} holds class indices outside [0, {num_classes})")
    return arr


# --------------------------------------------------------------------------------------------------------------------
# Per-row building blocks (shared by the functions and the accumulator)


def _topk_correct(scores: np.ndarray, target: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """(B, len(ks)) bool: is the target among the k best classes?

    A class ranks above the target if it scores higher, or scores the same and has a lower index (the order of a
    stable descending sort, and `np.argmax` for k = 1). Breaking ties towards the target instead would give a model
    that outputs a constant 100% accuracy.
    """
    rows = np.arange(scores.shape[0])
    target_score = scores[rows, target][:, None]  # (B, 1)
    lower_index = np.arange(scores.shape[1])[None, :] < target[:, None]  # (B, C)
    rank = (scores > target_score).sum(1) + ((scores == target_score) & lower_index).sum(1)  # (B,)
    return rank[:, None] < np.asarray(ks)[None, :]


def _hits_at_one(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(B,) bool: is the arg-max class (first one on ties, like `calculate_hit_at_one`) a positive?"""
    return labels[np.arange(scores.shape[0]), np.argmax(scores, axis=1)]


def _top_k_per_video(scores: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (B, k) int32 and scores (B, k) of each row's k best classes, k = min(top_k, C).

    Same selection as the starter's `top_k_triplets`: `np.argpartition(row, -k)[-k:]`. The order inside a row is
    irrelevant, only the set is used.
    """
    if top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    k = min(top_k, scores.shape[1])
    idx = np.empty((scores.shape[0], k), dtype=np.int32)
    for start in range(0, scores.shape[0], _ROWS_PER_BLOCK):
        block = scores[start : start + _ROWS_PER_BLOCK]
        idx[start : start + len(block)] = np.argpartition(block, -k, axis=1)[:, -k:]
    return idx, np.take_along_axis(scores, idx, axis=1)


def _ties_mix_labels(ranked_values: np.ndarray, ranked_labels: np.ndarray) -> bool:
    """Does any run of equal scores (in a list sorted by score) hold both a positive and a negative?"""
    if ranked_values.size < 2:
        return False
    starts_run = np.empty(ranked_values.size, dtype=bool)
    starts_run[0] = True
    np.not_equal(ranked_values[1:], ranked_values[:-1], out=starts_run[1:])
    if starts_run.all():
        return False
    run = np.cumsum(starts_run) - 1
    positives = np.bincount(run, weights=ranked_labels)
    sizes = np.bincount(run)
    return bool(((positives > 0) & (positives < sizes)).any())


@functools.lru_cache(maxsize=4)
def _starter_shuffle(n: int) -> np.ndarray:
    """The permutation `random.seed(0); random.sample(range(n), n)` draws (`AveragePrecisionCalculator._shuffle`).

    It depends on n alone, and the GAP lists of all heads have the same length (videos x top_k), so it is drawn once:
    `random.sample` is a Python loop, ~3 s per million entries here.
    """
    perm = np.fromiter(random.Random(0).sample(range(n), n), dtype=np.int64, count=n)
    perm.flags.writeable = False
    return perm


def _starter_ranking(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Labels in the order the starter code ranks them: heap, seeded shuffle, stable sort by score descending.

    `values`/`labels` are in push order. The heap's array order is what `peek_ap_at_n` hands on, so we build the
    same heap. Its (score, label) tuples are replaced by the int 2 * rank(score) + label, which orders the same way
    (pairs with equal keys are interchangeable); pushing ints is 2x faster and reads back 7x faster than tuples.
    """
    _, score_rank = np.unique(values, return_inverse=True)
    keys = score_rank.reshape(-1).astype(np.int64) * 2 + labels
    heap: list[int] = []
    push = heapq.heappush
    for key in keys.tolist():
        push(heap, key)
    shuffled = np.fromiter(heap, dtype=np.int64, count=len(heap))[_starter_shuffle(len(heap))]
    order = np.argsort(-(shuffled >> 1), kind="stable")
    return (shuffled[order] & 1).astype(bool)


def _average_precision(values: np.ndarray, labels: np.ndarray, num_positives: int) -> float:
    """`AveragePrecisionCalculator.ap_at_n(n=None, total_num_positives=num_positives)` of one list in push order."""
    if num_positives <= 0 or values.size == 0:
        return 0.0  # the starter returns 0 for an empty heap and for numpos == 0
    values = values.astype(np.float64, copy=False)
    order = np.argsort(-values, kind="stable")
    ranked = labels[order]
    if _ties_mix_labels(values[order], ranked):
        ranked = _starter_ranking(values, labels)
    hit_ranks = np.flatnonzero(ranked) + 1.0  # 1-based ranks of the positives
    if hit_ranks.size == 0:
        return 0.0
    precision = np.arange(1, hit_ranks.size + 1, dtype=np.float64) / hit_ranks
    # cumsum adds left to right like the starter's loop (np.sum would add pairwise), so the bits match.
    return float(np.cumsum(precision * (1.0 / num_positives))[-1])


def _push_order(top_idx: np.ndarray) -> np.ndarray:
    """Permutation of the flattened (B, k) top-k entries into class-major, video-minor order (`top_k_by_class`)."""
    return np.argsort(top_idx.ravel(), kind="stable")


def _gap_from_top_k(top_idx: np.ndarray, top_val: np.ndarray, labels: np.ndarray) -> float:
    top_lab = labels[np.arange(labels.shape[0])[:, None], top_idx]  # (B, k)
    order = _push_order(top_idx)
    return _average_precision(top_val.ravel()[order], top_lab.ravel()[order], int(labels.sum()))


def _class_aps_from_top_k(top_idx: np.ndarray, top_val: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C,) float64 AP of each class's top-k-truncated list (see `mean_ap`); NaN for a class with no positive."""
    num_classes = labels.shape[1]
    top_lab = labels[np.arange(labels.shape[0])[:, None], top_idx]  # (B, k)
    order = _push_order(top_idx)
    values, hits = top_val.ravel()[order], top_lab.ravel()[order]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(top_idx.ravel(), minlength=num_classes))])
    positives = labels.sum(axis=0)  # (C,)
    aps = np.full(num_classes, np.nan)
    # A Python loop over classes: 3862 short lists take ~0.25 s for 30k videos; the list building is vectorised.
    for c in np.flatnonzero(positives):
        aps[c] = _average_precision(values[bounds[c] : bounds[c + 1]], hits[bounds[c] : bounds[c + 1]],
                                    int(positives[c]))
    return aps


def _mean_of_present(aps: np.ndarray) -> float:
    """mAP from per-class APs: the mean over the classes that have a positive (the starter's
    filter_empty_classes), in class order; NaN if none has one."""
    present = aps[~np.isnan(aps)]
    return float(np.mean(present)) if present.size else float("nan")


def _map_from_top_k(top_idx: np.ndarray, top_val: np.ndarray, labels: np.ndarray) -> float:
    return _mean_of_present(_class_aps_from_top_k(top_idx, top_val, labels))


# --------------------------------------------------------------------------------------------------------------------
# Public functions


def topk_accuracy(scores: Any, target: Any, k: int = 1) -> float:
    """Fraction of samples whose target class is among the k best-scoring classes.

    Args:
        scores: (B, C) scores, logits or probabilities.
        target: (B,) class indices, or (B, C) one-hot / soft targets, reduced to their arg-max class.
        k: how many classes count as a hit.

    Ties: a class scoring the same as the target counts as above it when its index is lower (stable order).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    arr = _scores_2d(scores)
    target_idx = _class_targets(target, arr.shape[0], arr.shape[1])
    if arr.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one sample")
    return float(_topk_correct(arr, target_idx, (k,)).mean())


def hit_at_one(scores: Any, labels: Any) -> float:
    """Fraction of videos whose top-scoring class (first on ties) is a positive; `calculate_hit_at_one`.

    Args:
        scores: (B, C) scores.
        labels: (B, C) multi-hot; any value > 0 is a positive.
    """
    arr = _scores_2d(scores)
    if arr.shape[0] == 0:
        raise ValueError("hit_at_one needs at least one video")
    return float(_hits_at_one(arr, _multi_hot(labels, arr.shape)).mean())


def gap(scores: Any, labels: Any, top_k: int = 20) -> float:
    """Global average precision over each video's `top_k` predictions; `eval_util.calculate_gap`.

    Args:
        scores: (B, C) scores, one row per video.
        labels: (B, C) multi-hot; any value > 0 is a positive.
        top_k: predictions kept per video (20 for YouTube-8M).

    The denominator is the number of positive labels in `labels`, including those outside every top-k. See the
    module docstring for tie handling. Returns 0.0 when there is no positive label.
    """
    arr = _scores_2d(scores)
    top_idx, top_val = _top_k_per_video(arr, top_k)
    return _gap_from_top_k(top_idx, top_val, _multi_hot(labels, arr.shape))


def mean_ap(scores: Any, labels: Any, top_k: int = 20) -> float:
    """Mean over classes of the AP of the top-k-truncated per-class lists, as `eval.py` reports mAP.

    Class c's list holds the videos that kept c in their `top_k`; its denominator is the number of positives of c
    in `labels`. Classes with no positive are left out of the mean; NaN if no class has one.
    """
    arr = _scores_2d(scores)
    top_idx, top_val = _top_k_per_video(arr, top_k)
    return _map_from_top_k(top_idx, top_val, _multi_hot(labels, arr.shape))


# --------------------------------------------------------------------------------------------------------------------
# Per-class results (the reports' tables; the functions below take one score matrix, the accumulator has the same)


def _confusion(target: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64: row = true class, column = predicted class."""
    cells = target.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _rate(hits: np.ndarray, support: np.ndarray) -> np.ndarray:
    """hits / support per class as float64, NaN where the support is 0."""
    out = np.full(support.shape, np.nan)
    np.divide(hits, support, out=out, where=support > 0)
    return out


def confusion_matrix(scores: Any, target: Any) -> np.ndarray:
    """(C, C) int64 sample counts: row = true class, column = predicted class.

    The prediction is the arg-max class, the lowest index on ties: the class top-1 accuracy counts, so the trace
    over the number of samples is `topk_accuracy(scores, target, 1)`.
    """
    arr = _scores_2d(scores)
    target_idx = _class_targets(target, arr.shape[0], arr.shape[1])
    return _confusion(target_idx, np.argmax(arr, axis=1), arr.shape[1])


def per_class_accuracy(scores: Any, target: Any, k: int = 1) -> np.ndarray:
    """(C,) float64: for each class, the fraction of its samples whose target is among the k best classes (the
    recall at k, ties as in `topk_accuracy`); NaN for a class without samples."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    arr = _scores_2d(scores)
    target_idx = _class_targets(target, arr.shape[0], arr.shape[1])
    hits = _topk_correct(arr, target_idx, (k,))[:, 0]
    num_classes = arr.shape[1]
    return _rate(np.bincount(target_idx, weights=hits, minlength=num_classes),
                 np.bincount(target_idx, minlength=num_classes))


def class_average_precision(scores: Any, labels: Any, top_k: int = 20) -> np.ndarray:
    """(C,) float64 AP of each class over the videos that kept it in their `top_k`, denominator all its positives:
    the values whose mean over the classes with a positive is `mean_ap`. NaN for a class with no positive."""
    arr = _scores_2d(scores)
    top_idx, top_val = _top_k_per_video(arr, top_k)
    return _class_aps_from_top_k(top_idx, top_val, _multi_hot(labels, arr.shape))


def most_confused(confusion: Any, top: int = 10) -> list[tuple[int, int, int]]:
    """The `top` largest off-diagonal cells of a confusion matrix (rows true, columns predicted) as
    (true class, predicted class, count), largest first.

    Ties on the count go to the larger share of the true class's samples (3 of 4 before 3 of 30), then to the lower
    (true, predicted) index pair. Empty cells are never listed, so fewer than `top` may come back.
    """
    matrix = _as_numpy(confusion, name="confusion")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix, got shape {matrix.shape}")
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    off = matrix.astype(np.int64)
    np.fill_diagonal(off, 0)
    true, pred = np.nonzero(off)
    counts = off[true, pred]
    support = matrix.sum(axis=1)[true]
    # lexsort sorts by the last key first: count descending, share descending, then (true, pred) ascending
    order = np.lexsort((pred, true, -(counts / support), -counts))[:top]
    return [(int(true[i]), int(pred[i]), int(counts[i])) for i in order]


# --------------------------------------------------------------------------------------------------------------------
# Streaming accumulator

_TASKS = ("single_label", "multi_label")
_AGGREGATES = ("first", "mean")

# aggregate="mean": the latest views held apart, unsummed, until sync/merge (see EnsembleMetrics, "Duplicates").
HELD_VIEWS = 256


class EnsembleMetrics:
    """Accumulates the outputs of N branches and the ensemble over an evaluation set, keyed by sample id.

    Usage, on every rank:

        metrics = EnsembleMetrics(task="multi_label", num_classes=3862, num_branches=2)
        for batch in loader:
            out = model(...)
            metrics.update(batch["id"], branch_probs(out.branches, ...), out.ensemble, batch["labels"])
        metrics.sync()  # collective: every rank then holds the union
        result = metrics.compute()  # {"ensemble": {...}, "branches": [{...}, ...], "num_samples": n}

    Metrics: `task="single_label"` reports "top1", "top5" (one per entry of `accuracy_ks`); `task="multi_label"`
    reports "gap" and "map" (both at `top_k`, see `gap` and `mean_ap`) and "hit_at_one".
    `compute(per_class=True)` adds each head's per-class numbers and `top_predictions()` gives each video's kept
    classes (the reports of tools/eval.py).

    Pass probabilities for every head (the ensemble is a mean of probabilities, so its branches should be compared
    on the same footing; `aggregate="mean"` averages whatever it is given).

    Duplicates. A sample id seen more than once (in one accumulator, across `merge`, or across ranks) counts once:
      * `aggregate="first"` keeps the first occurrence (update order; ranks in rank order after `sync`). For the
        padding a distributed sampler appends, whose rows repeat real samples.
      * `aggregate="mean"` averages the scores of all occurrences: multi-clip (or multi-crop) evaluation, where
        each clip of a video arrives under the video's id. Pass `view_ids` (the clip index, a small int >= 0) as
        well when a distributed sampler may pad: rows with the same (id, view) then count once (the first one, in
        update order, ranks in rank order), so a padded clip does not weigh twice in the average. Without
        `view_ids` every row enters the average.
    Rows sharing an id must carry the same target; a mismatch raises, since it means the ids are not global
    (e.g. a per-rank batch index).

    How "mean" keeps that exact without holding every view: each id keeps the float64 sum of its views' scores,
    their count and the set of its views (a bit mask); a repeated (id, view) is dropped when it arrives. Sums and
    counts of disjoint views add exactly across ranks (a video's views may straddle ranks). A repeat from another
    rank or accumulator, though, is only known at `sync`/`merge`, when it may already be summed. So the latest
    `held_views` rows are held apart, unsummed, until then: a distributed sampler's padding comes last on its rank
    (DistributedSampler appends it), so its repeats are still held and are dropped exactly. A repeat that was
    summed together with views the other side lacks cannot be taken out again and raises (raise `held_views`); one
    whose every view the other side already counted is dropped whole. The project's evaluation streams neither pad
    nor split a video across ranks. Row by row float64 sums in arrival order give the bits summing all the stored
    rows at the end gave; parts from several ranks are added part by part (equal to float rounding).

    Memory per unique row and head (N + 1 heads): with `aggregate="first"` only what the metrics need is kept:
    multi-label, the top-k class indices and scores (20 x (4 + 4) bytes for float32) and a hit@1 flag, plus the
    packed labels once per row (3862 / 8 = 483 bytes); single-label, one flag per k. With `aggregate="mean"` the
    sum of the scores: C x 8 bytes per id whatever the number of views (Kinetics-400 at 10 x 3 views: 19.8k videos
    x 3 heads x 400 x 8 B = 190 MB, where holding every view took 2.9 GB), plus `held_views` rows of C x 4 bytes
    per head; `sync` copies every rank's share to every rank.
    """

    def __init__(
        self,
        *,
        task: str,
        num_classes: int,
        num_branches: int,
        aggregate: str = "first",
        top_k: int = 20,
        accuracy_ks: Sequence[int] = (1, 5),
        held_views: int = HELD_VIEWS,
    ) -> None:
        """
        Args:
            task: "single_label" (Kinetics, ImageNet) or "multi_label" (YouTube-8M).
            num_classes: C, the width of every score row.
            num_branches: N, the number of branch heads (the ensemble is reported besides them).
            aggregate: "first" (drop repeated ids) or "mean" (average the scores of repeated ids).
            top_k: predictions kept per video for GAP and mAP (multi-label).
            accuracy_ks: the k of each reported top-k accuracy (single-label).
            held_views: aggregate="mean" with view_ids: how many of the latest rows are held apart until
                sync/merge, so that another rank's repeat of them can be dropped exactly (class docstring).
        """
        if task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
        if aggregate not in _AGGREGATES:
            raise ValueError(f"aggregate must be one of {_AGGREGATES}, got {aggregate!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {num_branches}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        accuracy_ks = tuple(int(k) for k in accuracy_ks)
        if not accuracy_ks or min(accuracy_ks) < 1:
            raise ValueError(f"accuracy_ks must be a non-empty list of k >= 1, got {accuracy_ks}")
        if held_views < 0:
            raise ValueError(f"held_views must be >= 0, got {held_views}")
        self.task = task
        self.num_classes = num_classes
        self.num_branches = num_branches
        self.aggregate = aggregate
        self.top_k = top_k
        self.accuracy_ks = accuracy_ks
        self.held_views = held_views
        # aggregate="first": chunks mapping field -> array whose first axis is the row. Fields: "ids", the target
        # ("target" (R,) int64 or "labels" (R, ceil(C/8)) packed bits) and the per-head summary (see _summarise).
        self._chunks: list[dict[str, np.ndarray]] = []
        # aggregate="mean": per-id sums of the views' scores.
        self._views = self._new_view_sums() if aggregate == "mean" else None
        self._has_views: bool | None = None  # fixed by the first update that brings rows

    # ---- configuration ----------------------------------------------------------------------------------------------

    @property
    def metric_names(self) -> tuple[str, ...]:
        if self.task == "single_label":
            return tuple(f"top{k}" for k in self.accuracy_ks)
        return ("gap", "map", "hit_at_one")

    def _config(self) -> tuple:
        return (self.task, self.num_classes, self.num_branches, self.aggregate, self.top_k, self.accuracy_ks)

    def _check_views(self, has_views: bool | None) -> None:
        if has_views is None or self.aggregate == "first":
            return
        if self._has_views is None:
            self._has_views = has_views
        elif self._has_views != has_views:
            raise ValueError("pass view_ids to every update() of an aggregate='mean' accumulator, or to none")

    def _new_view_sums(self, held: int | None = None) -> _ViewSums:
        if self.task == "single_label":
            target_shape, target_dtype = (), np.int64
        else:
            target_shape, target_dtype = ((self.num_classes + 7) // 8,), np.uint8  # packed bits
        return _ViewSums(self.num_branches + 1, self.num_classes, target_shape, target_dtype,
                         self.held_views if held is None else held)

    # ---- accumulation -----------------------------------------------------------------------------------------------

    def update(
        self,
        sample_ids: Any,
        branch_scores: Any,
        ensemble_scores: Any,
        targets: Any,
        *,
        view_ids: Any = None,
    ) -> None:
        """Add one batch.

        Args:
            sample_ids: (B,) ids unique over the whole evaluation set (ints or strings), not batch positions.
            branch_scores: (N, B, C), or a sequence of N tensors (B, C).
            ensemble_scores: (B, C).
            targets: single-label: (B,) class indices or (B, C) one-hot; multi-label: (B, C) multi-hot.
            view_ids: (B,) int clip / crop index >= 0, used by aggregate="mean" (see the class docstring).
        """
        ids = _as_numpy(sample_ids, name="sample_ids")
        if ids.ndim != 1:
            raise ValueError(f"sample_ids must be 1-D (B,), got shape {ids.shape}")
        num_rows = ids.shape[0]
        heads = self._heads(branch_scores, ensemble_scores, num_rows)  # (H, B, C)
        if self.task == "single_label":
            target = _class_targets(targets, num_rows, self.num_classes, name="targets")
            stored_target = target
        else:
            target = _multi_hot(targets, (num_rows, self.num_classes), name="targets")
            stored_target = np.packbits(target, axis=1)
        if self.aggregate == "first":
            chunk = {"ids": ids.copy(), "target" if self.task == "single_label" else "labels": stored_target}
            chunk.update(self._summarise(heads, target))
            if num_rows:
                self._chunks.append(chunk)
            return
        views = None
        if view_ids is not None:
            views = _as_numpy(view_ids, name="view_ids")
            if views.shape != (num_rows,) or views.dtype.kind not in "iu":
                raise ValueError(f"view_ids must be (B,) = ({num_rows},) integers, got {views.shape} {views.dtype}")
            if num_rows and views.min() < 0:
                raise ValueError(f"view_ids must be >= 0 (a clip / crop index), got {int(views.min())}")
        if num_rows:
            self._check_views(view_ids is not None)
            scores = np.ascontiguousarray(heads.transpose(1, 0, 2), dtype=np.result_type(heads, np.float32))
            self._views.add(ids.tolist(), None if views is None else views.tolist(), scores, stored_target)

    def _heads(self, branch_scores: Any, ensemble_scores: Any, num_rows: int) -> np.ndarray:
        """(H, B, C) scores of the N branches then the ensemble."""
        if isinstance(branch_scores, (list, tuple)):
            branches = np.stack([_scores_2d(s, name=f"branch_scores[{i}]") for i, s in enumerate(branch_scores)])
        else:
            branches = _as_numpy(branch_scores, name="branch_scores")
        expected = (self.num_branches, num_rows, self.num_classes)
        if branches.shape != expected:
            raise ValueError(f"branch_scores must have shape (N, B, C) = {expected}, got {branches.shape}")
        ensemble = _scores_2d(ensemble_scores, name="ensemble_scores")
        if ensemble.shape != expected[1:]:
            raise ValueError(f"ensemble_scores must have shape (B, C) = {expected[1:]}, got {ensemble.shape}")
        heads = np.concatenate([branches, ensemble[None]])  # (H, B, C), promoted to the wider dtype
        if heads.dtype.kind != "f":
            heads = heads.astype(np.float64)
        if np.isnan(heads).any():
            raise ValueError("branch_scores contains NaN; check the model output before evaluating")
        return heads

    def _summarise(self, heads: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
        """What the metrics need from each row, per head: heads (H, B, C) -> fields with rows first."""
        if self.task == "single_label":
            correct = np.stack([_topk_correct(s, target, self.accuracy_ks) for s in heads], axis=1)
            # the arg-max class per head, for the per-class report's confusion matrix: 4 bytes per row and head
            pred = np.stack([np.argmax(s, axis=1) for s in heads], axis=1).astype(np.int32)
            return {"correct": correct, "pred": pred}  # (B, H, len(ks)), (B, H)
        tops = [_top_k_per_video(s, self.top_k) for s in heads]
        return {
            "top_idx": np.stack([i for i, _ in tops], axis=1),  # (B, H, k)
            "top_val": np.stack([v for _, v in tops], axis=1),  # (B, H, k), the input dtype: no new ties
            "hit1": np.stack([_hits_at_one(s, target) for s in heads], axis=1),  # (B, H)
        }

    def merge(self, other: EnsembleMetrics) -> EnsembleMetrics:
        """Add `other`'s rows to this accumulator (repeated ids are resolved as in `update`, this accumulator's
        first); returns self. With aggregate="mean" this accumulator's held rows are summed."""
        if not isinstance(other, EnsembleMetrics):
            raise TypeError(f"can only merge another EnsembleMetrics, got {type(other).__name__}")
        if other._config() != self._config():
            raise ValueError(
                f"cannot merge accumulators with different settings: {self._config()} vs {other._config()}"
            )
        self._check_views(other._has_views)
        if self.aggregate == "first":
            self._chunks.extend(other._chunks)
        else:
            self._views.flush()
            self._views.absorb(other._views.export(), has_views=bool(self._has_views))
        return self

    def sync(self, group: Any = None) -> EnsembleMetrics:
        """All-gather every rank's rows (aggregate="mean": per-id sums, counts and held rows) so that each rank
        holds the union; a no-op unless torch.distributed is initialised. A collective: call it on every rank of
        `group`, once, after the last update. With NCCL, `all_gather_object` needs `torch.cuda.set_device` to have
        been called. Returns self."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self.aggregate == "first":
            state = self._consolidate()
        else:
            state = self._views.export() if len(self._views) else None
        payload = {"config": self._config(), "has_views": self._has_views, "state": state}
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, payload, group=group)
        del payload, state
        for rank, part in enumerate(gathered):
            if part["config"] != self._config():
                raise ValueError(f"rank {rank} accumulates with settings {part['config']}, this rank {self._config()}")
            self._check_views(part["has_views"])
        if self.aggregate == "first":
            self._chunks = [part["state"] for part in gathered if part["state"] is not None]
            self._consolidate()
            return self
        self._views = self._new_view_sums(held=0)  # this rank's own part is in `gathered`
        for rank in range(len(gathered)):
            part, gathered[rank] = gathered[rank], None  # free each part once it is added
            if part["state"] is not None:
                self._views.absorb(part["state"], has_views=bool(self._has_views))
        self._views.held = self.held_views
        return self

    def reset(self) -> None:
        self._chunks = []
        self._views = self._new_view_sums() if self.aggregate == "mean" else None
        self._has_views = None

    def __len__(self) -> int:
        """Number of distinct sample ids held."""
        if self.aggregate == "mean":
            return len(self._views)
        state = self._consolidate()
        return 0 if state is None else int(np.unique(state["ids"]).size)

    @property
    def rows_held(self) -> int:
        """Rows of per-sample state in memory: aggregate="mean", one per distinct id plus the held views (at most
        `held_views`), whatever the number of views; aggregate="first", every row added since the last
        de-duplication (`sync`, `compute`, `len`)."""
        if self.aggregate == "mean":
            return self._views.rows_held
        return sum(len(chunk["ids"]) for chunk in self._chunks)

    # ---- de-duplication ---------------------------------------------------------------------------------------------

    def _consolidate(self) -> dict[str, np.ndarray] | None:
        """aggregate="first": concatenate the chunks into one and drop rows that repeat an id."""
        if not self._chunks:
            return None
        if len(self._chunks) == 1:
            state = self._chunks[0]
        else:
            state = {key: np.concatenate([c[key] for c in self._chunks]) for key in self._chunks[0]}
        state = self._drop_repeated_rows(state)
        self._chunks = [state]
        return state

    def _drop_repeated_rows(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _, first, inverse = np.unique(state["ids"], return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        target_key = "target" if self.task == "single_label" else "labels"
        targets = state[target_key]
        conflict = targets != targets[first[inverse]]
        if conflict.ndim > 1:
            conflict = conflict.any(axis=tuple(range(1, conflict.ndim)))
        if conflict.any():
            raise _conflict_error(state["ids"][np.flatnonzero(conflict)[0]].item())
        if first.size == inverse.size:
            return state
        keep = np.sort(first)  # keep the surviving rows in arrival order
        return {key: value[keep] for key, value in state.items()}

    # ---- results ----------------------------------------------------------------------------------------------------

    def compute(self, *, per_class: bool = False) -> dict[str, Any]:
        """{"ensemble": {metric: value}, "branches": [{metric: value}] * N, "num_samples": distinct ids}.

        Uses the rows this process holds: call `sync()` first in a distributed run. Samples are ordered by id, so
        the result does not depend on the number of ranks or on the batch size.

        per_class: also "per_class": {"ensemble": {...}, "branches": [{...}] * N}, numpy arrays per class c:
            single-label: "support" (C,) samples of class c; "top1", "top5" (one per `accuracy_ks`) (C,) the share
            of them with the target among the k best classes (NaN without samples); "confusion" (C, C) counts,
            row = true class, column = arg-max class; "predicted" (C,) its column sums.
            multi-label: "support" (C,) positive labels of c; "ap" (C,) the AP whose mean over the classes with a
            positive is "map" (NaN without one).
        """
        if self.aggregate == "mean":
            return self._compute_mean(per_class)
        state = self._consolidate()
        if state is None:
            raise _no_samples_error()
        _, first = np.unique(state["ids"], return_index=True)
        if self.task == "single_label":
            target = state["target"][first]
        else:
            target = np.unpackbits(state["labels"][first], axis=1, count=self.num_classes).astype(bool)
        results = []
        for head in range(self.num_branches + 1):
            summary = {key: value[first, head] for key, value in state.items() if key in _SUMMARY_FIELDS}
            results.append(self._metrics(summary, target, per_class))
        return self._result(results, int(first.size), per_class)

    def _compute_mean(self, per_class: bool = False) -> dict[str, Any]:
        views = self._views
        if not len(views):
            raise _no_samples_error()
        order, counts, stored = views.by_id()
        target = self._unpacked(stored)
        results = []
        for head in range(self.num_branches + 1):
            # One head at a time: a copy of every head at once would double the sums held.
            mean = views.head_sums(head, order) / counts[:, None]
            summary = {k: v[:, 0] for k, v in self._summarise(mean[None], target).items()}
            results.append(self._metrics(summary, target, per_class))
        return self._result(results, int(order.size), per_class)

    @staticmethod
    def _result(results: list[tuple[dict, dict | None]], num_samples: int, per_class: bool) -> dict[str, Any]:
        out = {"ensemble": results[-1][0], "branches": [m for m, _ in results[:-1]], "num_samples": num_samples}
        if per_class:
            out["per_class"] = {"ensemble": results[-1][1], "branches": [c for _, c in results[:-1]]}
        return out

    def top_predictions(self, head: int = -1) -> dict[str, np.ndarray]:
        """Each sample's `top_k` best classes and their scores for one head (-1, the default: the ensemble; 0..N-1 a
        branch), ids sorted as in `compute`: {"ids" (V,), "classes" (V, k) int32, "scores" (V, k)}, k = min(top_k,
        C), every row sorted by score, highest first (the lower class index first on ties).

        Multi-label accumulators keep exactly this (it is what GAP and mAP read); aggregate="mean" ones compute it
        from the averaged scores. A single-label, aggregate="first" accumulator keeps only hit flags and refuses.
        Call `sync()` first in a distributed run.
        """
        if not -(self.num_branches + 1) <= head <= self.num_branches:
            raise ValueError(f"head must be in [-1, {self.num_branches}] (-1: the ensemble), got {head}")
        head %= self.num_branches + 1
        if self.aggregate == "mean":
            views = self._views
            if not len(views):
                raise _no_samples_error()
            order, counts, _ = views.by_id()
            classes, scores = _top_k_per_video(views.head_sums(head, order) / counts[:, None], self.top_k)
            ids = views.ids()[order]
        elif self.task == "multi_label":
            state = self._consolidate()
            if state is None:
                raise _no_samples_error()
            _, first = np.unique(state["ids"], return_index=True)
            ids = state["ids"][first]
            classes, scores = state["top_idx"][first, head], state["top_val"][first, head]
        else:
            raise ValueError("top_predictions needs a multi-label accumulator or aggregate='mean': a single-label "
                             "aggregate='first' one keeps only whether each sample was a hit")
        order = np.lexsort((classes, -scores))  # per row: score descending, then class index ascending
        return {"ids": ids, "classes": np.take_along_axis(classes, order, axis=1).astype(np.int32),
                "scores": np.take_along_axis(scores, order, axis=1)}

    def _unpacked(self, stored: np.ndarray) -> np.ndarray:
        if self.task == "single_label":
            return stored
        return np.unpackbits(stored, axis=1, count=self.num_classes).astype(bool)

    def mean_scores(self, dtype: Any = np.float32) -> dict[str, np.ndarray]:
        """aggregate="mean": each id's scores averaged over its views, ids sorted as in `compute`.

        Returns {"ids" (V,), "views" (V,) views averaged per id, "targets" (V,) class indices or (V, C) bool
        multi-hot, "scores" (V, N + 1, C) in `dtype`: the branches, then the ensemble}. Call `sync()` first in a
        distributed run.
        """
        if self.aggregate != "mean":
            raise ValueError("mean_scores needs an aggregate='mean' accumulator (the 'first' one keeps no scores)")
        views = self._views
        order, counts, stored = views.by_id()
        scores = np.empty((order.size, self.num_branches + 1, self.num_classes), dtype=dtype)
        for head in range(self.num_branches + 1):
            scores[:, head] = views.head_sums(head, order) / counts[:, None]
        return {"ids": views.ids()[order], "views": counts, "targets": self._unpacked(stored), "scores": scores}

    def _metrics(self, summary: dict[str, np.ndarray], target: np.ndarray,
                 per_class: bool = False) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
        """One head's metrics, and with `per_class` its per-class arrays (see `compute`)."""
        num_classes = self.num_classes
        if self.task == "single_label":
            accuracy = summary["correct"].mean(axis=0)
            metrics = {f"top{k}": float(a) for k, a in zip(self.accuracy_ks, accuracy, strict=True)}
            if not per_class:
                return metrics, None
            support = np.bincount(target, minlength=num_classes)
            classes: dict[str, np.ndarray] = {"support": support}
            for j, k in enumerate(self.accuracy_ks):
                hits = np.bincount(target, weights=summary["correct"][:, j], minlength=num_classes)
                classes[f"top{k}"] = _rate(hits, support)
            classes["confusion"] = _confusion(target, summary["pred"], num_classes)
            classes["predicted"] = classes["confusion"].sum(axis=0)
            return metrics, classes
        aps = _class_aps_from_top_k(summary["top_idx"], summary["top_val"], target)
        metrics = {
            "gap": _gap_from_top_k(summary["top_idx"], summary["top_val"], target),
            "map": _mean_of_present(aps),
            "hit_at_one": float(summary["hit1"].mean()),
        }
        if not per_class:
            return metrics, None
        return metrics, {"support": target.sum(axis=0).astype(np.int64), "ap": aps}


_SUMMARY_FIELDS = ("correct", "pred", "top_idx", "top_val", "hit1")


def _conflict_error(sample_id: Any) -> ValueError:
    return ValueError(
        f"sample id {sample_id!r} arrived with two different targets; sample_ids must identify a sample across "
        "the whole evaluation set (not a position in the batch or on the rank)"
    )


def _no_samples_error() -> ValueError:
    return ValueError("no samples to evaluate: call update() (and sync() on every rank) before compute()")


def _bits(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


class _ViewSums:
    """The state of an aggregate="mean" accumulator (see EnsembleMetrics, "Duplicates"). Per sample id, in the
    order ids first arrive: the float64 sum of its views' scores (H, C), how many views were summed, its target
    (stored form) and the bit mask of its views seen (summed or held). `pending` holds the latest rows with view
    ids, unsummed, in arrival order: (row, view, scores (H, C)), at most `held` of them."""

    def __init__(self, heads: int, num_classes: int, target_shape: tuple, target_dtype: Any, held: int) -> None:
        self.held = held
        self.keys: list[Any] = []
        self.index: dict[Any, int] = {}
        self.sums = np.zeros((0, heads, num_classes), dtype=np.float64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.targets = np.zeros((0, *target_shape), dtype=target_dtype)
        self.masks: list[int] = []
        self.pending: collections.deque[tuple[int, int, np.ndarray]] = collections.deque()

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def rows_held(self) -> int:
        return len(self.keys) + len(self.pending)

    # ---- adding rows ----

    def _check_target(self, key: Any, row: int, target: np.ndarray) -> None:
        if not np.array_equal(self.targets[row], target):
            raise _conflict_error(key)

    def _row(self, key: Any, target: np.ndarray) -> int:
        """The row of `key`, added (with `target`) if new."""
        row = self.index.get(key)
        if row is not None:
            return row
        row = len(self.keys)
        if row == self.sums.shape[0]:  # grow by doubling: amortised O(1) copies per id
            capacity = max(64, 2 * row)
            for name in ("sums", "counts", "targets"):
                old = getattr(self, name)
                new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
                new[:row] = old
                setattr(self, name, new)
        self.keys.append(key)
        self.index[key] = row
        self.targets[row] = target
        self.masks.append(0)
        return row

    def _sum(self, row: int, scores: np.ndarray, count: int = 1) -> None:
        self.sums[row] += scores  # float64: row by row in arrival order, as np.add.reduceat over stored rows
        self.counts[row] += count

    def add(self, keys: list, views: list[int] | None, scores: np.ndarray, targets: np.ndarray) -> None:
        """One batch in arrival order: keys (B), views (B) or None, scores (B, H, C), targets (B, ...) stored form."""
        batch_targets: dict[Any, int] = {}
        for b, key in enumerate(keys):  # check every target before changing anything
            row = self.index.get(key)
            if row is not None:
                self._check_target(key, row, targets[b])
            elif key in batch_targets and not np.array_equal(targets[batch_targets[key]], targets[b]):
                raise _conflict_error(key)
            batch_targets.setdefault(key, b)
        for b, key in enumerate(keys):
            row = self._row(key, targets[b])
            if views is None:
                self._sum(row, scores[b])
                continue
            bit = 1 << views[b]
            if self.masks[row] & bit:
                continue  # this (id, view) is already counted: a padded repeat
            self.masks[row] |= bit
            self.pending.append((row, views[b], scores[b].copy()))  # a copy: the batch need not outlive it
            if len(self.pending) > self.held:
                self._sum_oldest()

    def _sum_oldest(self) -> None:
        row, _, scores = self.pending.popleft()
        self._sum(row, scores)

    def flush(self) -> None:
        """Sum the held rows."""
        while self.pending:
            self._sum_oldest()

    # ---- combining parts (merge, sync) ----

    def export(self) -> dict[str, Any]:
        """This state as plain data: the sums with the views they cover, and the held rows apart."""
        n = len(self.keys)
        summed_masks = list(self.masks)
        for row, view, _ in self.pending:
            summed_masks[row] &= ~(1 << view)
        return {
            "keys": self.keys,
            "sums": self.sums[:n],
            "counts": self.counts[:n],
            "targets": self.targets[:n],
            "masks": summed_masks,
            "pending": [(row, view, scores) for row, view, scores in self.pending],  # rows index "keys"
        }

    def absorb(self, part: dict[str, Any], *, has_views: bool) -> None:
        """Add an exported state after everything this one holds (held rows included: `flush` first)."""
        keys, targets = part["keys"], part["targets"]
        for u, key in enumerate(keys):
            row = self.index.get(key)
            if row is not None:
                self._check_target(key, row, targets[u])
            count = int(part["counts"][u])
            if count == 0:
                continue  # only held rows, added below
            mask = part["masks"][u]
            if row is None:
                row = self._row(key, targets[u])
            elif has_views:
                seen = self.masks[row] & mask
                if seen == mask:
                    continue  # every one of these views is counted already: the first occurrences win
                if seen:
                    raise ValueError(
                        f"sample id {key!r}: view(s) {_bits(seen)} arrive twice (from two ranks or accumulators), "
                        f"and the later copies were summed with view(s) {_bits(mask & ~seen)} before the repeat "
                        f"could be told apart; hold more rows apart (held_views, now {self.held} per part) or keep "
                        "each (id, view) on one rank"
                    )
            self._sum(row, part["sums"][u], count)
            self.masks[row] |= mask
        for u, view, scores in part["pending"]:
            row = self._row(keys[u], targets[u])
            bit = 1 << view
            if self.masks[row] & bit:
                continue  # a repeat of a view counted already (a distributed sampler's padding)
            self.masks[row] |= bit
            self._sum(row, scores)

    # ---- results ----

    def ids(self) -> np.ndarray:
        return np.asarray(self.keys)

    def by_id(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order of the rows by id, counts in that order (held rows included), targets in that order)."""
        order = np.argsort(self.ids(), kind="stable")
        counts = self.counts[: len(self.keys)].copy()
        for row, _, _ in self.pending:
            counts[row] += 1
        return order, counts[order], self.targets[order]

    def head_sums(self, head: int, order: np.ndarray) -> np.ndarray:
        """(V, C) float64 sums of one head, rows in `order`, held rows added after the summed ones."""
        sums = self.sums[: len(self.keys), head].copy()
        for row, _, scores in self.pending:
            sums[row] += scores[head]
        return sums[order]
