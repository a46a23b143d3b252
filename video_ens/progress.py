"""What long jobs report as they go, shared by training, evaluation and prediction: durations and ETAs, progress
lines, and the bad samples every rank skipped."""

from __future__ import annotations

import math
from typing import Any

import torch.distributed as tdist

from . import dist

__all__ = ["format_duration", "gather_bad_samples", "merge_bad_samples", "progress_line"]


def format_duration(seconds: float) -> str:
    """H:MM:SS, or "?" when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def progress_line(done: int, total: int | None, seconds: float, *, bad: int = 0) -> str:
    """Evaluation's "evaluated inputs 350/1200 (29.2%) on rank 0, 99.3 inputs/s, eta 0:00:09"; without a total, the
    count and rate only. The ETA assumes the rate so far holds for the rest of this rank's share."""
    rate = done / max(seconds, 1e-9)
    if total:
        eta = (total - done) / rate if rate > 0 else float("inf")
        text = (
            f"evaluated inputs {done}/{total} ({100 * done / total:.1f}%) on rank 0, {rate:.1f} inputs/s, "
            f"eta {format_duration(max(eta, 0.0))}"
        )
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
    mine = {
        "bad": int(stats.get("bad") or 0),
        "bad_by_reason": dict(stats.get("bad_by_reason") or {}),
        "last_bad": list(stats.get("last_bad") or []),
    }
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * dist.world_size()
        tdist.all_gather_object(parts, mine)
    return merge_bad_samples(parts)
