"""GAP and per-class AP exactly as the YouTube-8M starter code computes them (google/youtube-8m `eval_util.py`,
`average_precision_calculator.py`, `mean_average_precision_calculator.py`, run by `eval.py --top_k=20`), from each
video's kept top-k; video_ens.metrics builds `gap`, `mean_ap` and the accumulator on these. design/architecture.md
section 5 states the semantics in prose:

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

import functools
import heapq
import random

import numpy as np

__all__ = ["class_aps_from_top_k", "gap_from_top_k", "mean_of_present", "top_k_per_video"]

# Rows per np.argpartition call: argpartition returns int64 indices for the whole block, so 100k x 3862 in one call
# would allocate 3 GB; 4096 rows cap it at ~130 MB.
_ROWS_PER_BLOCK = 4096


def top_k_per_video(scores: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
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


def gap_from_top_k(top_idx: np.ndarray, top_val: np.ndarray, labels: np.ndarray) -> float:
    top_lab = labels[np.arange(labels.shape[0])[:, None], top_idx]  # (B, k)
    order = _push_order(top_idx)
    return _average_precision(top_val.ravel()[order], top_lab.ravel()[order], int(labels.sum()))


def class_aps_from_top_k(top_idx: np.ndarray, top_val: np.ndarray, labels: np.ndarray) -> np.ndarray:
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
        aps[c] = _average_precision(
            values[bounds[c] : bounds[c + 1]], hits[bounds[c] : bounds[c + 1]], int(positives[c])
        )
    return aps


def mean_of_present(aps: np.ndarray) -> float:
    """mAP from per-class APs: the mean over the classes that have a positive (the starter's
    filter_empty_classes), in class order; NaN if none has one."""
    present = aps[~np.isnan(aps)]
    return float(np.mean(present)) if present.size else float("nan")
