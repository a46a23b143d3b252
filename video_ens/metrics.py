"""Evaluation metrics: top-k accuracy, hit@1, GAP@20 and mAP@20, per branch and for the ensemble.

* Functions on one score matrix (numpy or torch, any float dtype): `topk_accuracy`, `hit_at_one`, `gap`, `mean_ap`,
  and per class `class_average_precision` (whose mean is `mean_ap`).
* `EnsembleMetrics`, a streaming accumulator keyed by sample id: per-batch outputs of every branch and the
  ensemble in, every metric per head out, after an all-gather over ranks.

GAP and mAP are the YouTube-8M starter code's, bit for bit, ties included (video_ens.starter_ap).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .starter_ap import class_aps_from_top_k, gap_from_top_k, mean_of_present, top_k_per_video
from .view_sums import ViewSums, repeated_id_error

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
    top_idx, top_val = top_k_per_video(arr, top_k)
    return gap_from_top_k(top_idx, top_val, _multi_hot(labels, arr.shape))


def mean_ap(scores: Any, labels: Any, top_k: int = 20) -> float:
    """Mean over classes of the AP of the top-k-truncated per-class lists, as `eval.py` reports mAP.

    Class c's list holds the videos that kept c in their `top_k`; its denominator is the number of positives of c
    in `labels`. Classes with no positive are left out of the mean; NaN if no class has one.
    """
    arr = _scores_2d(scores)
    top_idx, top_val = top_k_per_video(arr, top_k)
    return mean_of_present(class_aps_from_top_k(top_idx, top_val, _multi_hot(labels, arr.shape)))


# --------------------------------------------------------------------------------------------------------------------
# Per-class results (the reports' tables)


def _confusion(target: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64: row = true class, column = predicted class."""
    cells = target.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _rate(hits: np.ndarray, support: np.ndarray) -> np.ndarray:
    """hits / support per class as float64, NaN where the support is 0."""
    out = np.full(support.shape, np.nan)
    np.divide(hits, support, out=out, where=support > 0)
    return out


def class_average_precision(scores: Any, labels: Any, top_k: int = 20) -> np.ndarray:
    """(C,) float64 AP of each class over the videos that kept it in their `top_k`, denominator all its positives:
    the values whose mean over the classes with a positive is `mean_ap`. NaN for a class with no positive."""
    arr = _scores_2d(scores)
    top_idx, top_val = top_k_per_video(arr, top_k)
    return class_aps_from_top_k(top_idx, top_val, _multi_hot(labels, arr.shape))


# --------------------------------------------------------------------------------------------------------------------
# Streaming accumulator

_TASKS = ("single_label", "multi_label")
_AGGREGATES = ("none", "mean")
_SUMMARY_FIELDS = ("correct", "pred", "top_idx", "top_val", "hit1")


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
    reports "gap" and "map" (both at `top_k`, see `gap` and `mean_ap`) and "hit_at_one". `compute(per_class=True)`
    adds each head's per-class numbers and `top_predictions()` each video's kept classes (tools/eval.py's reports).
    Pass probabilities for every head: the ensemble is a mean of probabilities, so its branches compare on that footing.

    Ids. `aggregate="none"`: every id arrives once, over all ranks; a repeat raises, since it would count twice (a
    DistributedSampler pads by repeating samples; the loader's evaluation streams never do). `aggregate="mean"`:
    the rows of an id are views of one video (clips x crops), and their scores are averaged; with `view_ids` (the
    view index, a small int >= 0) a view that arrives twice raises. Rows sharing an id must carry the same target:
    a mismatch means the ids are not global (e.g. a per-rank batch index).

    Memory per id and head (H = N + 1 heads): "none" keeps only what the metrics read: multi-label, the top-k
    classes and scores (20 x (4 + 4) bytes for float32) and a hit@1 flag, plus the packed labels once (3862 / 8 =
    483 bytes); single-label, one flag per k and the arg-max class. "mean" keeps the float64 sum of the views' scores,
    C x 8 bytes whatever the number of views (Kinetics-400 at 10 x 3 views: 19.8k videos x 3 heads x 400 x 8 B =
    190 MB, where every view would take 2.9 GB). `sync` all-gathers every rank's state and adds the parts in rank
    order.
    """

    def __init__(
        self,
        *,
        task: str,
        num_classes: int,
        num_branches: int,
        aggregate: str = "none",
        top_k: int = 20,
        accuracy_ks: Sequence[int] = (1, 5),
    ) -> None:
        """
        Args:
            task: "single_label" (Kinetics, ImageNet) or "multi_label" (YouTube-8M).
            num_classes: C, the width of every score row.
            num_branches: N, the number of branch heads (the ensemble is reported besides them).
            aggregate: "none" (every id once) or "mean" (average the scores of an id's views).
            top_k: predictions kept per video for GAP and mAP (multi-label).
            accuracy_ks: the k of each reported top-k accuracy (single-label).
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
        self.task = task
        self.num_classes = num_classes
        self.num_branches = num_branches
        self.aggregate = aggregate
        self.top_k = top_k
        self.accuracy_ks = accuracy_ks
        self.reset()

    def _config(self) -> tuple:
        return (self.task, self.num_classes, self.num_branches, self.aggregate, self.top_k, self.accuracy_ks)

    def reset(self) -> None:
        # aggregate="none": chunks mapping field -> array whose first axis is the row: "ids", "target" ((R,) int64
        # class indices, or (R, ceil(C/8)) packed multi-hot bits) and the per-head summary (see _summarise).
        self._chunks: list[dict[str, np.ndarray]] = []
        self._sums = self._new_sums() if self.aggregate == "mean" else None

    def _new_sums(self) -> ViewSums:
        if self.task == "single_label":
            return ViewSums(self.num_branches + 1, self.num_classes, (), np.int64)
        return ViewSums(self.num_branches + 1, self.num_classes, ((self.num_classes + 7) // 8,), np.uint8)  # packed

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
            view_ids: (B,) int clip / crop index >= 0, for aggregate="mean": a repeated (id, view) raises.
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
        if self.aggregate == "none":
            if num_rows:
                self._chunks.append({"ids": ids.copy(), "target": stored_target, **self._summarise(heads, target)})
            return
        views = None
        if view_ids is not None:
            views = _as_numpy(view_ids, name="view_ids")
            if views.shape != (num_rows,) or views.dtype.kind not in "iu":
                raise ValueError(f"view_ids must be (B,) = ({num_rows},) integers, got {views.shape} {views.dtype}")
            if num_rows and views.min() < 0:
                raise ValueError(f"view_ids must be >= 0 (a clip / crop index), got {int(views.min())}")
        if num_rows:
            scores = np.ascontiguousarray(heads.transpose(1, 0, 2), dtype=np.result_type(heads, np.float32))
            self._sums.add(ids.tolist(), None if views is None else views.tolist(), scores, stored_target)

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
        tops = [top_k_per_video(s, self.top_k) for s in heads]
        return {
            "top_idx": np.stack([i for i, _ in tops], axis=1),  # (B, H, k)
            "top_val": np.stack([v for _, v in tops], axis=1),  # (B, H, k), the input dtype: no new ties
            "hit1": np.stack([_hits_at_one(s, target) for s in heads], axis=1),  # (B, H)
        }

    def sync(self, group: Any = None) -> EnsembleMetrics:
        """All-gather every rank's state so that each rank holds the union; a no-op unless torch.distributed is
        initialised. A collective: call it on every rank of `group`, once, after the last update. With NCCL,
        `all_gather_object` needs `torch.cuda.set_device` to have been called. Returns self."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        state = self._rows(sort=False) if self.aggregate == "none" else self._sums.export()
        payload = {"config": self._config(), "state": state}
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, payload, group=group)
        del payload, state
        for rank, part in enumerate(gathered):
            if part["config"] != self._config():
                raise ValueError(f"rank {rank} accumulates with settings {part['config']}, this rank {self._config()}")
        if self.aggregate == "none":
            self._chunks = [part["state"] for part in gathered if part["state"] is not None]
            return self
        self._sums = self._new_sums()  # this rank's own part is in `gathered`
        for rank in range(len(gathered)):
            part, gathered[rank] = gathered[rank], None  # free each part once it is added
            self._sums.absorb(part["state"])
        return self

    def __len__(self) -> int:
        """Number of distinct sample ids held."""
        if self.aggregate == "mean":
            return len(self._sums)
        state = self._rows()
        return 0 if state is None else len(state["ids"])

    def _rows(self, sort: bool = True) -> dict[str, np.ndarray] | None:
        """aggregate="none": the chunks as one, sorted by id unless `sort` is False; a repeated id raises."""
        if not self._chunks:
            return None
        if len(self._chunks) > 1:
            self._chunks = [{key: np.concatenate([c[key] for c in self._chunks]) for key in self._chunks[0]}]
        state = self._chunks[0]
        if not sort:
            return state
        order = np.argsort(state["ids"], kind="stable")
        ids = state["ids"][order]
        repeated = np.flatnonzero(ids[1:] == ids[:-1])
        if repeated.size:
            raise repeated_id_error(ids[repeated[0]].item())
        return {key: value[order] for key, value in state.items()}

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
        state = self._held_rows()
        results = []
        if self.aggregate == "mean":
            _, _, stored, order = self._sums.by_id()
            target = self._unpacked(stored)
            for head in range(self.num_branches + 1):
                # One head at a time: a copy of every head at once would double the sums held.
                summary = {k: v[:, 0] for k, v in self._summarise(self._sums.mean(head, order)[None], target).items()}
                results.append(self._metrics(summary, target, per_class))
        else:
            target = self._unpacked(state["target"])
            for head in range(self.num_branches + 1):
                summary = {key: value[:, head] for key, value in state.items() if key in _SUMMARY_FIELDS}
                results.append(self._metrics(summary, target, per_class))
        out = {"ensemble": results[-1][0], "branches": [m for m, _ in results[:-1]], "num_samples": len(target)}
        if per_class:
            out["per_class"] = {"ensemble": results[-1][1], "branches": [c for _, c in results[:-1]]}
        return out

    def _held_rows(self) -> dict[str, np.ndarray] | None:
        """aggregate="none": the rows sorted by id (see `_rows`); raises if nothing has been added."""
        state = self._rows() if self.aggregate == "none" else None
        if state is None and not (self.aggregate == "mean" and len(self._sums)):
            raise ValueError("no samples to evaluate: call update() (and sync() on every rank) before compute()")
        return state

    def top_predictions(self, head: int = -1) -> dict[str, np.ndarray]:
        """Each sample's `top_k` best classes and their scores for one head (-1, the default: the ensemble; 0..N-1 a
        branch), ids sorted as in `compute`: {"ids" (V,), "classes" (V, k) int32, "scores" (V, k)}, k = min(top_k,
        C), every row sorted by score, highest first (the lower class index first on ties).

        Multi-label accumulators keep exactly this (it is what GAP and mAP read); aggregate="mean" ones compute it
        from the averaged scores. A single-label, aggregate="none" accumulator keeps only hit flags and refuses.
        Call `sync()` first in a distributed run.
        """
        if not -(self.num_branches + 1) <= head <= self.num_branches:
            raise ValueError(f"head must be in [-1, {self.num_branches}] (-1: the ensemble), got {head}")
        head %= self.num_branches + 1
        if self.aggregate == "none" and self.task == "single_label":
            raise ValueError(
                "top_predictions needs a multi-label accumulator or aggregate='mean': a single-label "
                "aggregate='none' one keeps only whether each sample was a hit"
            )
        state = self._held_rows()
        if self.aggregate == "mean":
            ids, _, _, order = self._sums.by_id()
            classes, scores = top_k_per_video(self._sums.mean(head, order), self.top_k)
        else:
            ids, classes, scores = state["ids"], state["top_idx"][:, head], state["top_val"][:, head]
        order = np.lexsort((classes, -scores))  # per row: score descending, then class index ascending
        return {
            "ids": ids,
            "classes": np.take_along_axis(classes, order, axis=1).astype(np.int32),
            "scores": np.take_along_axis(scores, order, axis=1),
        }

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
            raise ValueError("mean_scores needs an aggregate='mean' accumulator (the 'none' one keeps no scores)")
        ids, counts, stored, order = self._sums.by_id()
        scores = np.empty((order.size, self.num_branches + 1, self.num_classes), dtype=dtype)
        for head in range(self.num_branches + 1):
            scores[:, head] = self._sums.mean(head, order)
        return {"ids": ids, "views": counts, "targets": self._unpacked(stored), "scores": scores}

    def _metrics(
        self, summary: dict[str, np.ndarray], target: np.ndarray, per_class: bool = False
    ) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
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
        aps = class_aps_from_top_k(summary["top_idx"], summary["top_val"], target)
        metrics = {
            "gap": gap_from_top_k(summary["top_idx"], summary["top_val"], target),
            "map": mean_of_present(aps),
            "hit_at_one": float(summary["hit1"].mean()),
        }
        if not per_class:
            return metrics, None
        return metrics, {"support": target.sum(axis=0).astype(np.int64), "ap": aps}
