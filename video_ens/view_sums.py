"""Per-video sums of the scores of its views (clips x crops), the state of `EnsembleMetrics(aggregate="mean")`.

One float64 row of (heads, classes) per video whatever the number of views, so that 10 x 3 evaluation holds 1/30th
of what keeping every view would; ranks' states merge by adding them in rank order (`export` / `absorb`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _conflict_error(sample_id: Any) -> ValueError:
    return ValueError(
        f"sample id {sample_id!r} arrived with two different targets; sample_ids must identify a sample across "
        "the whole evaluation set (not a position in the batch or on the rank)"
    )


def repeated_id_error(sample_id: Any, mask: int = 0) -> ValueError:
    views = [i for i in range(mask.bit_length()) if mask >> i & 1]
    what = f"view(s) {views} arrived twice" if views else "arrived twice"
    return ValueError(
        f"sample id {sample_id!r}: {what}, and a repeat would count twice; evaluate every (sample, view) once, on "
        "one rank, as the loader's evaluation streams do (video_ens.data.loader.eval_stream), not through a "
        "DistributedSampler, which pads by repeating samples; ids must identify a sample across the whole set"
    )


class ViewSums:
    """The state of an aggregate="mean" accumulator. Per sample id, in the order ids first arrive: the float64 sum
    of its views' scores (H, C), how many views were summed, its target (stored form) and the bit mask of the view
    ids seen (0 without view ids)."""

    def __init__(self, heads: int, num_classes: int, target_shape: tuple, target_dtype: Any) -> None:
        self.keys: list[Any] = []
        self.index: dict[Any, int] = {}
        self.sums = np.zeros((0, heads, num_classes), dtype=np.float64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.targets = np.zeros((0, *target_shape), dtype=target_dtype)
        self.masks: list[int] = []

    def __len__(self) -> int:
        return len(self.keys)

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

    def _add(self, key: Any, target: np.ndarray, scores: np.ndarray, count: int, mask: int) -> None:
        row = self._row(key, target)
        self.sums[row] += scores  # float64, in arrival order
        self.counts[row] += count
        self.masks[row] |= mask

    def add(self, keys: list, views: list[int] | None, scores: np.ndarray, targets: np.ndarray) -> None:
        """One batch in arrival order: keys (B), views (B) or None, scores (B, H, C), targets (B, ...) stored form."""
        seen: dict[Any, tuple[np.ndarray, int]] = {}  # key -> (its target, its views so far): checked before any change
        for b, key in enumerate(keys):
            row = self.index.get(key)
            target, mask = seen.get(key) or ((targets[b], 0) if row is None else (self.targets[row], self.masks[row]))
            if not np.array_equal(target, targets[b]):
                raise _conflict_error(key)
            if views is not None:
                if mask >> views[b] & 1:
                    raise repeated_id_error(key, 1 << views[b])
                mask |= 1 << views[b]
            seen[key] = (target, mask)
        for b, key in enumerate(keys):
            self._add(key, targets[b], scores[b], 1, 0 if views is None else 1 << views[b])

    def export(self) -> dict[str, Any]:
        n = len(self.keys)
        return {
            "keys": self.keys,
            "sums": self.sums[:n],
            "counts": self.counts[:n],
            "targets": self.targets[:n],
            "masks": self.masks,
        }

    def absorb(self, part: dict[str, Any]) -> None:
        """Add another rank's exported state after everything this one holds."""
        for u, key in enumerate(part["keys"]):
            row = self.index.get(key)
            if row is not None:
                if not np.array_equal(self.targets[row], part["targets"][u]):
                    raise _conflict_error(key)
                if self.masks[row] & part["masks"][u]:
                    raise repeated_id_error(key, self.masks[row] & part["masks"][u])
            self._add(key, part["targets"][u], part["sums"][u], int(part["counts"][u]), part["masks"][u])

    def by_id(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids, view counts, targets, rows): every id once, sorted, with the rows of `sums` in that order."""
        order = np.argsort(np.asarray(self.keys), kind="stable")
        return np.asarray(self.keys)[order], self.counts[: len(self.keys)][order], self.targets[order], order

    def mean(self, head: int, order: np.ndarray) -> np.ndarray:
        """(V, C) float64: one head's scores averaged over each id's views, rows in `order`."""
        return self.sums[: len(self.keys), head][order] / self.counts[: len(self.keys)][order][:, None]
