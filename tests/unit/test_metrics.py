"""Metrics: hand-worked cases, a loop-by-loop replay of the YouTube-8M starter code, and the accumulator's
de-duplication, merging and two-rank gloo sync."""

from __future__ import annotations

import heapq
import json
import random
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from video_ens.metrics import EnsembleMetrics, gap, hit_at_one, mean_ap, topk_accuracy

# --------------------------------------------------------------------------------------------------------------------
# An independent, literal replay of the starter code (google/youtube-8m eval_util.py, average_precision_calculator.py,
# mean_average_precision_calculator.py): per-video argpartition, per-class lists, a heap, the seeded
# random.sample shuffle, Python's sorted(reverse=True) and the precision loop.


def _starter_lists(predictions, labels, k):
    k = min(k, predictions.shape[1])
    per_class_scores = [[] for _ in range(predictions.shape[1])]
    per_class_labels = [[] for _ in range(predictions.shape[1])]
    for video in range(predictions.shape[0]):
        for c in np.argpartition(predictions[video], -k)[-k:]:
            per_class_scores[c].append(predictions[video][c])
            per_class_labels[c].append(labels[video][c])
    positives = [np.sum(labels[:, c]) for c in range(predictions.shape[1])]
    return per_class_scores, per_class_labels, positives


def _starter_ap(scores, labels, num_positives):
    heap = []
    for pair in zip(scores, labels, strict=True):
        heapq.heappush(heap, pair)
    if not heap:
        return 0.0
    columns = np.array(list(zip(*heap, strict=True)))
    preds, acts = columns[0], columns[1]
    random.seed(0)
    shuffle = random.sample(range(len(preds)), len(preds))
    preds, acts = preds[shuffle], acts[shuffle]
    ranking = sorted(range(len(preds)), key=lambda i: preds[i], reverse=True)
    if num_positives == 0:
        return 0.0
    ap, found = 0.0, 0.0
    for position, i in enumerate(ranking):
        if acts[i] > 0:
            found += 1
            ap += found / (position + 1) * (1.0 / num_positives)
    return ap


def _starter_gap(predictions, labels, k):
    scores, labs, positives = _starter_lists(predictions, labels, k)
    flat_scores = [s for per_class in scores for s in per_class]
    flat_labels = [x for per_class in labs for x in per_class]
    return _starter_ap(flat_scores, flat_labels, sum(positives))


def _starter_map(predictions, labels, k):
    scores, labs, positives = _starter_lists(predictions, labels, k)
    aps = [_starter_ap(scores[c], labs[c], positives[c]) for c in range(len(scores)) if positives[c] > 0]
    return float(np.mean(aps))


def _tied_data(seed, videos, classes, levels=6, positive_rate=0.25):
    """float32 scores on a coarse grid (many ties, also at the top-k cut) and int multi-hot labels."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, levels, (videos, classes)) / levels).astype(np.float32)
    labels = (rng.random((videos, classes)) < positive_rate).astype(np.int64)
    return scores, labels


def _smooth_data(seed, videos, classes, positive_rate=0.1):
    rng = np.random.default_rng(seed)
    labels = (rng.random((videos, classes)) < positive_rate).astype(np.int64)
    scores = (rng.random((videos, classes)) + 0.5 * labels).astype(np.float32)  # better than chance
    return scores, labels


# --------------------------------------------------------------------------------------------------------------------
# GAP / mAP / hit@1 by hand

# 3 videos x 4 classes, top_k = 2. Kept entries (class: score, label):
#   v0: c0 0.9 +, c1 0.8 -   (its positive c2 at 0.1 is cut off)
#   v1: c1 0.7 +, c2 0.6 -
#   v2: c2 0.95 -, c0 0.5 +
# Class 3 has no positive anywhere.
HAND_SCORES = np.array([[0.9, 0.8, 0.1, 0.3], [0.2, 0.7, 0.6, 0.1], [0.5, 0.4, 0.95, 0.05]])
HAND_LABELS = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]])


def test_gap_by_hand_counts_cut_off_positives():
    # Pooled ranking: 0.95 -, 0.9 +, 0.8 -, 0.7 +, 0.6 -, 0.5 +  -> precisions 1/2, 2/4, 3/6 at the positives.
    # Denominator: all 4 positives, not the 3 that made a top-2 (which would give 0.5).
    assert gap(HAND_SCORES, HAND_LABELS, top_k=2) == pytest.approx((1 / 2 + 2 / 4 + 3 / 6) / 4)
    assert gap(HAND_SCORES, HAND_LABELS, top_k=2) == pytest.approx(0.375)


def test_mean_ap_by_hand_drops_classes_without_positives():
    # c0: [0.9 +, 0.5 +], P=2 -> (1/1 + 2/2) / 2 = 1
    # c1: [0.8 -, 0.7 +], P=1 -> (1/2) / 1 = 0.5
    # c2: [0.95 -, 0.6 -], P=1 (v0's positive was cut off) -> 0
    # c3: P=0 -> left out (averaging it in as 0 would give 0.375)
    assert mean_ap(HAND_SCORES, HAND_LABELS, top_k=2) == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_top_k_larger_than_classes_keeps_all():
    # All 12 entries ranked: with k >= C nothing is cut, so the denominators are reachable.
    assert gap(HAND_SCORES, HAND_LABELS, top_k=50) == pytest.approx(_starter_gap(HAND_SCORES, HAND_LABELS, 50))
    assert mean_ap(HAND_SCORES, HAND_LABELS, top_k=4) == pytest.approx(_starter_map(HAND_SCORES, HAND_LABELS, 4))


def test_no_positives():
    labels = np.zeros_like(HAND_LABELS)
    assert gap(HAND_SCORES, labels, top_k=2) == 0.0
    assert np.isnan(mean_ap(HAND_SCORES, labels, top_k=2))


def test_hit_at_one_by_hand():
    # arg-max classes 0, 1, 2: positives for v0 and v1 only.
    assert hit_at_one(HAND_SCORES, HAND_LABELS) == pytest.approx(2 / 3)
    # A tie at the top goes to the lower index, as np.argmax does.
    assert hit_at_one(np.array([[0.5, 0.5]]), np.array([[0, 1]])) == 0.0
    assert hit_at_one(np.array([[0.5, 0.5]]), np.array([[1, 0]])) == 1.0


# --------------------------------------------------------------------------------------------------------------------
# Against the replayed starter code


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape,top_k", [((40, 9), 3), ((25, 30), 20), ((7, 5), 20)])
def test_matches_starter_code_with_ties(seed, shape, top_k):
    scores, labels = _tied_data(seed, *shape)
    assert gap(scores, labels, top_k) == pytest.approx(_starter_gap(scores, labels, top_k), abs=1e-12)
    assert mean_ap(scores, labels, top_k) == pytest.approx(_starter_map(scores, labels, top_k), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_matches_starter_code_without_ties(seed):
    scores, labels = _smooth_data(seed, 120, 40)
    assert gap(scores, labels, 20) == pytest.approx(_starter_gap(scores, labels, 20), abs=1e-12)
    assert mean_ap(scores, labels, 20) == pytest.approx(_starter_map(scores, labels, 20), abs=1e-12)


def test_tie_order_matters_in_the_replay():
    """Guard the test above: on this data, ranking ties in plain push order gives another GAP, so an
    implementation without the seeded shuffle would fail it."""
    scores, labels = _tied_data(0, 40, 9)
    kept, kept_labels, positives = _starter_lists(scores, labels, 3)
    flat = np.array([s for c in kept for s in c], dtype=np.float64)
    flat_labels = np.array([x for c in kept_labels for x in c])
    ranked = flat_labels[np.argsort(-flat, kind="stable")]
    hits = np.flatnonzero(ranked) + 1.0
    unshuffled = float(np.sum(np.arange(1, hits.size + 1) / hits) / sum(positives))
    assert abs(unshuffled - gap(scores, labels, 3)) > 1e-6


def test_numpy_and_torch_inputs_agree():
    scores, labels = _tied_data(3, 30, 12)
    t_scores, t_labels = torch.from_numpy(scores), torch.from_numpy(labels).bool()
    assert gap(t_scores, t_labels, 5) == gap(scores, labels, 5)
    assert mean_ap(t_scores, t_labels, 5) == mean_ap(scores, labels, 5)
    assert hit_at_one(t_scores, t_labels) == hit_at_one(scores, labels)
    target = labels.argmax(1)
    assert topk_accuracy(t_scores, torch.from_numpy(target), 3) == topk_accuracy(scores, target, 3)
    # bfloat16 is read exactly (through float32).
    b_scores = t_scores.bfloat16()
    assert gap(b_scores, t_labels, 5) == gap(b_scores.float().numpy(), labels, 5)


# --------------------------------------------------------------------------------------------------------------------
# Top-k accuracy


def test_topk_accuracy_by_hand():
    scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.2], [0.2, 0.1, 0.7]])
    target = np.array([2, 1, 2])
    # Row 0: class 1 is above the target. Row 1: class 0 ties with the target and has the lower index, so it ranks
    # first. Row 2: the target is the best.
    assert topk_accuracy(scores, target, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, target, 2) == 1.0
    assert topk_accuracy(scores, np.eye(3)[target], 1) == pytest.approx(1 / 3)  # one-hot targets
    assert topk_accuracy(torch.tensor(scores), torch.tensor(target), 2) == 1.0
    # A constant output is no better than the lowest index.
    assert topk_accuracy(np.zeros((3, 4)), np.array([0, 1, 3]), 1) == pytest.approx(1 / 3)


def test_topk_accuracy_rejects_bad_targets():
    with pytest.raises(ValueError, match="outside"):
        topk_accuracy(np.zeros((2, 3)), np.array([0, 3]), 1)
    with pytest.raises(ValueError, match="k must be"):
        topk_accuracy(np.zeros((2, 3)), np.array([0, 1]), 0)


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        gap(np.array([[np.nan, 1.0]]), np.array([[1, 0]]))


# --------------------------------------------------------------------------------------------------------------------
# EnsembleMetrics

N_BRANCHES, CLASSES = 2, 9


def _heads(scores_by_branch):
    """(N, B, C) branches and their mean as the ensemble."""
    branches = np.stack(scores_by_branch)
    return branches, branches.mean(0)


def _multi_label_set(seed, videos=50):
    branches, ensemble_labels = [], None
    for b in range(N_BRANCHES):
        scores, labels = _tied_data(seed * 10 + b, videos, CLASSES)
        branches.append(scores)
        ensemble_labels = labels if ensemble_labels is None else ensemble_labels
    branch_scores, ensemble = _heads(branches)
    return branch_scores, ensemble.astype(np.float32), ensemble_labels


def _expected_multi_label(branch_scores, ensemble, labels, top_k):
    def one(s):
        return {"gap": gap(s, labels, top_k), "map": mean_ap(s, labels, top_k), "hit_at_one": hit_at_one(s, labels)}

    return {"ensemble": one(ensemble), "branches": [one(s) for s in branch_scores], "num_samples": len(labels)}


def _feed(acc, ids, branch_scores, ensemble, targets, batch, views=None):
    for start in range(0, len(ids), batch):
        sl = slice(start, start + batch)
        acc.update(
            ids[sl], branch_scores[:, sl], ensemble[sl], targets[sl], view_ids=None if views is None else views[sl]
        )


def test_accumulator_in_chunks_equals_one_shot_multi_label():
    branch_scores, ensemble, labels = _multi_label_set(0)
    expected = _expected_multi_label(branch_scores, ensemble, labels, 4)
    acc = EnsembleMetrics(task="multi_label", num_classes=CLASSES, num_branches=N_BRANCHES, top_k=4)
    # Arrival in a scrambled order and odd batch sizes: results are ordered by id, so nothing changes.
    order = np.random.default_rng(1).permutation(len(labels))
    _feed(acc, order, branch_scores[:, order], ensemble[order], labels[order], batch=7)
    assert acc.compute() == expected


def test_accumulator_single_label_and_torch_inputs():
    rng = np.random.default_rng(2)
    branch_scores = torch.from_numpy(rng.random((N_BRANCHES, 33, CLASSES)).astype(np.float32))
    ensemble = branch_scores.mean(0)
    target = torch.from_numpy(rng.integers(0, CLASSES, 33))
    acc = EnsembleMetrics(task="single_label", num_classes=CLASSES, num_branches=N_BRANCHES)
    for start in range(0, 33, 8):
        sl = slice(start, start + 8)
        acc.update(torch.arange(33)[sl], list(branch_scores[:, sl]), ensemble[sl], target[sl])
    result = acc.compute()
    assert result["num_samples"] == 33
    assert result["ensemble"] == {
        "top1": topk_accuracy(ensemble, target, 1),
        "top5": topk_accuracy(ensemble, target, 5),
    }
    for b in range(N_BRANCHES):
        assert result["branches"][b]["top5"] == topk_accuracy(branch_scores[b], target, 5)


def test_a_repeated_id_raises_instead_of_counting_twice():
    # What a DistributedSampler does to 23 videos over 2 ranks: rank 1 ends with a padded repeat of video 0.
    branch_scores, ensemble, labels = _multi_label_set(1)
    ids = np.arange(23)
    ranks = [EnsembleMetrics(task="multi_label", num_classes=CLASSES, num_branches=N_BRANCHES, top_k=4) for _ in "ab"]
    for rank, acc in enumerate(ranks):
        share = list(DistributedSampler(range(23), num_replicas=2, rank=rank, shuffle=False))
        _feed(acc, ids[share], branch_scores[:, share], ensemble[share], labels[share], batch=5)
    assert len(ranks[0]) == 12 and len(ranks[1]) == 11 + 1  # each rank alone holds no repeat
    ranks[0]._chunks += ranks[1]._chunks  # what sync() leaves on every rank
    for call in (ranks[0].compute, ranks[0].__len__, ranks[0].top_predictions):
        with pytest.raises(ValueError, match="sample id 0: arrived twice.*DistributedSampler"):
            call()
    one = EnsembleMetrics(task="single_label", num_classes=3, num_branches=1)  # within one rank, a string id
    one.update(["a", "b", "a"], np.eye(3)[None], np.eye(3), [0, 1, 0])
    with pytest.raises(ValueError, match="sample id 'a': arrived twice"):
        one.compute()


def test_conflicting_targets_for_one_id_raise():
    acc = EnsembleMetrics(task="single_label", num_classes=3, num_branches=1, aggregate="mean")
    scores = np.ones((1, 2, 3)) / 3
    acc.update([5, 6], scores, scores[0], [0, 1])
    with pytest.raises(ValueError, match="sample id 5 arrived with two different targets"):
        acc.update([5], scores[:, :1], scores[0, :1], [2])


def test_mean_aggregation_averages_clips_and_refuses_a_repeated_clip():
    rng = np.random.default_rng(3)
    videos, clips = 12, 3
    clip_scores = rng.random((clips, N_BRANCHES, videos, CLASSES)).astype(np.float32)  # (clip, N, B, C)
    clip_ens = clip_scores.mean(1)  # (clip, B, C)
    labels = (rng.random((videos, CLASSES)) < 0.2).astype(np.int64)
    # Expected: the mean over the 3 clips, summed in arrival order in float64.
    mean_branches = (clip_scores[0].astype(np.float64) + clip_scores[1] + clip_scores[2]) / 3
    mean_ens = (clip_ens[0].astype(np.float64) + clip_ens[1] + clip_ens[2]) / 3
    expected = _expected_multi_label(mean_branches, mean_ens, labels, 4)

    acc = EnsembleMetrics(task="multi_label", num_classes=CLASSES, num_branches=N_BRANCHES, top_k=4, aggregate="mean")
    ids = np.arange(videos)
    for clip in range(clips):
        _feed(acc, ids, clip_scores[clip], clip_ens[clip], labels, batch=5, views=np.full(videos, clip))
    # A repeat of (video 4, clip 1) would weigh twice: refused, in a batch of its own or beside a new id, and the
    # state stays as it was (the check runs before any sum changes).
    for ids_, views_ in (([4], [1]), ([11, 4], [3, 1])):
        rows = np.asarray(ids_)
        with pytest.raises(ValueError, match=r"sample id 4: view\(s\) \[1\] arrived twice"):
            acc.update(ids_, clip_scores[0][:, rows] + 1, clip_ens[0][rows] + 1, labels[rows], view_ids=views_)
    with pytest.raises(ValueError, match=r"view\(s\) \[3\] arrived twice"):  # a new view, twice in one batch
        acc.update([0, 0], clip_scores[0][:, [0, 0]], clip_ens[0][[0, 0]], labels[[0, 0]], view_ids=[3, 3])
    assert acc.compute() == expected
    assert acc.compute()["num_samples"] == videos


def _views_set(seed, videos, views, classes=CLASSES):
    """Per-view float32 probabilities (view, N, B, C), their ensembles (view, B, C) and single-label targets."""
    rng = np.random.default_rng(seed)
    scores = rng.random((views, N_BRANCHES, videos, classes)).astype(np.float32)
    return scores, scores.mean(1), rng.integers(0, classes, videos)


def _hand_mean(scores, ensembles, order):
    """Per-video mean over the views in `order`, summed in float64 in that order: (N, B, C) and (B, C)."""
    branches = sum((scores[v].astype(np.float64) for v in order[1:]), scores[order[0]].astype(np.float64))
    ensemble = sum((ensembles[v].astype(np.float64) for v in order[1:]), ensembles[order[0]].astype(np.float64))
    return branches / len(order), ensemble / len(order)


def _expected_single_label(branches, ensemble, target, ks=(1, 5)):
    def one(s):
        return {f"top{k}": topk_accuracy(s, target, k) for k in ks}

    return {"ensemble": one(ensemble), "branches": [one(s) for s in branches], "num_samples": len(target)}


def test_mean_aggregation_holds_one_row_per_video_not_per_view():
    # 10 x 3 views per video: the state is a sum per video, not a row per view.
    videos, views, classes = 40, 30, 50
    scores, ensembles, target = _views_set(4, videos, views, classes)
    acc = EnsembleMetrics(task="single_label", num_classes=classes, num_branches=N_BRANCHES, aggregate="mean")
    ids = np.arange(videos)
    for view in range(views):
        _feed(acc, ids, scores[view], ensembles[view], target, batch=16, views=np.full(videos, view))
        assert len(acc) == videos
    assert acc.compute() == _expected_single_label(*_hand_mean(scores, ensembles, range(views)), target)


def test_mean_aggregation_memory_does_not_grow_with_views():
    import tracemalloc

    videos, classes = 1000, 400
    scores, ensembles, target = _views_set(5, videos, 1, classes)
    one_view_bytes = scores[0].nbytes + ensembles[0].nbytes  # 4.8 MB: every view held would be 144 MB
    acc = EnsembleMetrics(task="single_label", num_classes=classes, num_branches=N_BRANCHES, aggregate="mean")
    tracemalloc.start()
    try:
        for view in range(30):  # the same scores for every view: only the memory is measured here
            acc.update(np.arange(videos), scores[0], ensembles[0], target, view_ids=np.full(videos, view))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # float64 sums of 3 heads: 2 x one view's scores (up to 2x that while the arrays grow by doubling), plus ids
    # and view masks.
    assert held < 4 * one_view_bytes, held
    assert len(acc) == videos


def _sync_as(parts):
    """What `sync` does with the states every rank sent, without a process group: a fresh state absorbs them in rank
    order (the all-gather itself is covered by test_sync_across_two_gloo_ranks_equals_single_process)."""
    merged = parts[0]._new_sums()
    for part in parts:
        merged.absorb(part._sums.export())
    parts[0]._sums = merged
    return parts[0]


def test_mean_sync_adds_views_split_over_ranks_and_refuses_a_view_on_two():
    videos, views = 6, 4
    scores, ensembles, target = _views_set(6, videos, views)
    ids = np.arange(videos)

    def ranks(extra=None):
        a, b = (
            EnsembleMetrics(task="single_label", num_classes=CLASSES, num_branches=N_BRANCHES, aggregate="mean")
            for _ in "ab"
        )
        for acc, rank_views in ((a, (0, 2)), (b, (1, 3))):
            for view in rank_views:
                _feed(acc, ids, scores[view], ensembles[view], target, batch=4, views=np.full(videos, view))
        if extra is not None:  # what a padding sampler would add on rank b: (video 2, view 0) again
            b.update([2], scores[0][:, 2:3] + 1, ensembles[0][2:3] + 1, target[2:3], view_ids=[0])
        return a, b

    # Each rank's sum, then the ranks in order: (v0 + v2) + (v1 + v3), by hand in float64.
    sums = [_hand_mean(scores, ensembles, pair) for pair in ([0, 2], [1, 3])]
    expected = _expected_single_label(
        (sums[0][0] * 2 + sums[1][0] * 2) / 4, (sums[0][1] * 2 + sums[1][1] * 2) / 4, target
    )
    assert _sync_as(ranks()).compute() == expected
    with pytest.raises(ValueError, match=r"sample id 2: view\(s\) \[0\] arrived twice"):
        _sync_as(ranks(extra=True))


def test_mean_scores_average_the_views_per_id():
    videos, views = 7, 3
    scores, ensembles, target = _views_set(8, videos, views)
    acc = EnsembleMetrics(task="single_label", num_classes=CLASSES, num_branches=N_BRANCHES, aggregate="mean")
    order = np.random.default_rng(0).permutation(videos)
    names = np.array([f"vid{i}" for i in range(videos)])
    for view in range(views):
        acc.update(
            names[order], scores[view][:, order], ensembles[view][order], target[order], view_ids=np.full(videos, view)
        )
    out = acc.mean_scores()
    branches, ensemble = _hand_mean(scores, ensembles, range(views))
    assert list(out["ids"]) == sorted(names) and list(out["views"]) == [views] * videos
    assert list(out["targets"]) == list(target)  # names sort like the indices here
    assert out["scores"].dtype == np.float32
    np.testing.assert_array_equal(out["scores"][:, :-1], branches.transpose(1, 0, 2).astype(np.float32))
    np.testing.assert_array_equal(out["scores"][:, -1], ensemble.astype(np.float32))
    with pytest.raises(ValueError, match="aggregate='mean'"):
        EnsembleMetrics(task="single_label", num_classes=3, num_branches=1).mean_scores()


def test_sync_without_process_group_is_a_no_op():
    acc = EnsembleMetrics(task="single_label", num_classes=3, num_branches=1)
    acc.update([0], np.eye(3)[None, :1], np.eye(3)[:1], [0])
    assert acc.sync() is acc and len(acc) == 1


def test_compute_without_samples_raises():
    with pytest.raises(ValueError, match="no samples"):
        EnsembleMetrics(task="multi_label", num_classes=5, num_branches=2).compute()


# --------------------------------------------------------------------------------------------------------------------
# Two gloo ranks: videos and clips in the loader's contiguous shares

DIST_VIDEOS, DIST_CLIPS, DIST_CLASSES, DIST_TOP_K = 23, 3, 10, 3


def _dist_data():
    """Per-video multi-label data (tied scores) and per-clip single-label data, identical in every process."""
    branch_scores, labels = [], None
    for b in range(N_BRANCHES):
        scores, lab = _tied_data(100 + b, DIST_VIDEOS, DIST_CLASSES)
        branch_scores.append(scores)
        labels = lab if labels is None else labels
    branch_scores = np.stack(branch_scores)  # (N, V, C)
    rng = np.random.default_rng(7)
    clip_scores = rng.random((N_BRANCHES, DIST_VIDEOS * DIST_CLIPS, DIST_CLASSES)).astype(np.float32)  # (N, V*clips, C)
    clip_target = rng.integers(0, DIST_CLASSES, DIST_VIDEOS)
    return branch_scores, branch_scores.mean(0), labels, clip_scores, clip_target


def _evaluate(rank, world):
    """What one rank of an evaluation loop does: its sampler's share, batches of 4, sync, compute."""
    branch_scores, ensemble, labels, clip_scores, clip_target = _dist_data()
    videos = EnsembleMetrics(task="multi_label", num_classes=DIST_CLASSES, num_branches=N_BRANCHES, top_k=DIST_TOP_K)
    clips = EnsembleMetrics(
        task="single_label", num_classes=DIST_CLASSES, num_branches=N_BRANCHES, aggregate="mean", accuracy_ks=(1, 3)
    )
    # The loader's split (video_ens.data.loader, "Evaluation: every sample once"): rank r reads [N r / R, N (r + 1) / R),
    # nothing repeated; 69 clips over 2 ranks put video 11's clips on both.
    video_share = list(range(DIST_VIDEOS * rank // world, DIST_VIDEOS * (rank + 1) // world))
    n = DIST_VIDEOS * DIST_CLIPS
    clip_share = list(range(n * rank // world, n * (rank + 1) // world))
    for start in range(0, len(video_share), 4):
        rows = video_share[start : start + 4]
        videos.update(torch.tensor(rows), torch.from_numpy(branch_scores[:, rows]), ensemble[rows], labels[rows])
    for start in range(0, len(clip_share), 4):
        rows = np.array(clip_share[start : start + 4])
        video, clip = rows // DIST_CLIPS, rows % DIST_CLIPS
        clip_ens = clip_scores[:, rows].mean(0)
        clips.update(video, clip_scores[:, rows], clip_ens, clip_target[video], view_ids=clip)
    return {
        "videos": _jsonable(videos.sync().compute(per_class=True)),
        "clips": _jsonable(clips.sync().compute(per_class=True)),
    }


def _jsonable(result: dict) -> dict:
    """compute(per_class=True) as JSON values: arrays as lists, NaN (a class without samples) as None."""

    def convert(value):
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, np.ndarray):
            return [None if isinstance(v, float) and np.isnan(v) else v for v in value.ravel().tolist()]
        return value

    return convert(result)


def _gloo_worker(rank, world, init_file, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        result = _evaluate(rank, world)
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


@pytest.mark.integration
def test_sync_across_two_gloo_ranks_equals_single_process(tmp_path):
    # 23 videos over 2 ranks: uneven shares; 69 clips split a video's clips over the ranks.
    assert DIST_VIDEOS % 2 and (DIST_VIDEOS * DIST_CLIPS) % 2
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    single = json.loads(json.dumps(_evaluate(0, 1)))  # one rank: no padding, no process group
    assert single["videos"]["num_samples"] == DIST_VIDEOS and single["clips"]["num_samples"] == DIST_VIDEOS
    _, ensemble, labels, _, _ = _dist_data()
    assert single["videos"]["ensemble"]["gap"] == gap(ensemble, labels, DIST_TOP_K)
    assert sum(single["clips"]["per_class"]["ensemble"]["confusion"]) == DIST_VIDEOS  # every video once
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == single


# --------------------------------------------------------------------------------------------------------------------
# Per-class numbers, confusion and the kept predictions (the reports of tools/eval.py)

# Six samples of classes 0, 0, 0, 1, 1, 2 over four classes (class 3 has none), with ties at the top of s2, s3, s5:
# the lower class index wins a tie, as in topk_accuracy.
#                        c0    c1    c2    c3     target  arg-max  target's rank
PC_SCORES = np.array(
    [
        [0.60, 0.30, 0.10, 0.00],  # 0     0        0
        [0.20, 0.50, 0.30, 0.00],  # 0     1        2
        [0.40, 0.40, 0.20, 0.00],  # 0     0 (tie)  0
        [0.10, 0.45, 0.45, 0.00],  # 1     1 (tie)  0
        [0.10, 0.30, 0.60, 0.00],  # 1     2        1
        [0.45, 0.10, 0.45, 0.00],
    ]
)  # 2    0 (tie)  1
PC_TARGET = np.array([0, 0, 0, 1, 1, 2])
PC_TOP1 = [2 / 3, 1 / 2, 0 / 1, np.nan]  # class 0: s0, s2 of three; class 1: s3 of two; class 2: s5 missed
PC_TOP2 = [2 / 3, 2 / 2, 1 / 1, np.nan]  # s1's target ranks third
PC_CONFUSION = [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def _per_class_expectation(per_class: dict) -> None:
    np.testing.assert_array_equal(per_class["support"], [3, 2, 1, 0])
    np.testing.assert_array_equal(per_class["top1"], PC_TOP1)
    np.testing.assert_array_equal(per_class["top2"], PC_TOP2)
    np.testing.assert_array_equal(per_class["confusion"], PC_CONFUSION)
    np.testing.assert_array_equal(per_class["predicted"], [3, 2, 1, 0])


@pytest.mark.parametrize("aggregate", ["none", "mean"])
def test_accumulator_per_class_single_label_by_hand(aggregate):
    other = PC_SCORES[:, ::-1].copy()  # branch 1: classes reversed; its arg-max is class 3 for s0, s1 ...
    acc = EnsembleMetrics(task="single_label", num_classes=4, num_branches=2, accuracy_ks=(1, 2), aggregate=aggregate)
    ids = np.arange(6)
    if aggregate == "none":
        acc.update(ids[:4], np.stack([PC_SCORES[:4], other[:4]]), PC_SCORES[:4], PC_TARGET[:4])
        acc.update(ids[4:], np.stack([PC_SCORES[4:], other[4:]]), PC_SCORES[4:], PC_TARGET[4:])
    else:  # two views per sample, +-0.25 on a whole row: their mean is the hand-made row, ties kept bit for bit
        for shift, view in ((0.25, 0), (-0.25, 1)):
            acc.update(
                ids,
                np.stack([PC_SCORES + shift, other + shift]),
                PC_SCORES + shift,
                PC_TARGET,
                view_ids=np.full(6, view),
            )
    result = acc.compute(per_class=True)
    assert result["ensemble"] == {"top1": 0.5, "top2": pytest.approx(5 / 6)}
    assert set(result["per_class"]) == {"ensemble", "branches"}
    _per_class_expectation(result["per_class"]["ensemble"])
    _per_class_expectation(result["per_class"]["branches"][0])
    np.testing.assert_array_equal(result["per_class"]["branches"][1]["confusion"], _confusion_by_hand(other, PC_TARGET))
    assert "per_class" not in acc.compute()
    # identities with the overall numbers: the trace is the top-1 hits, the support-weighted mean the accuracy
    ensemble = result["per_class"]["ensemble"]
    assert np.trace(ensemble["confusion"]) / len(PC_TARGET) == topk_accuracy(PC_SCORES, PC_TARGET, 1) == 0.5
    weighted = np.nansum(ensemble["top2"] * ensemble["support"]) / ensemble["support"].sum()
    assert weighted == pytest.approx(topk_accuracy(PC_SCORES, PC_TARGET, 2))


def _confusion_by_hand(scores, target):
    num_classes = scores.shape[1]
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    for row, t in zip(scores, target, strict=True):
        best = max(range(num_classes), key=lambda c: (row[c], -c))  # highest score, lowest index on ties
        out[t, best] += 1
    return out


def test_class_average_precision_by_hand_and_its_mean_is_map():
    from video_ens.metrics import class_average_precision

    # the cases of test_mean_ap_by_hand_drops_classes_without_positives: c0 1, c1 1/2, c2 0 (cut off), c3 no positive
    aps = class_average_precision(HAND_SCORES, HAND_LABELS, top_k=2)
    np.testing.assert_array_equal(aps, [1.0, 0.5, 0.0, np.nan])
    assert np.nanmean(aps) == mean_ap(HAND_SCORES, HAND_LABELS, top_k=2)
    acc = EnsembleMetrics(task="multi_label", num_classes=4, num_branches=1, top_k=2)
    acc.update(["v0", "v1", "v2"], HAND_SCORES[None], HAND_SCORES, HAND_LABELS)
    result = acc.compute(per_class=True)
    per_class = result["per_class"]["ensemble"]
    np.testing.assert_array_equal(per_class["ap"], aps)
    np.testing.assert_array_equal(per_class["support"], [2, 1, 1, 0])
    assert result["ensemble"]["map"] == acc.compute()["ensemble"]["map"] == mean_ap(HAND_SCORES, HAND_LABELS, 2)


def test_top_predictions_sorted_per_video_with_ids_in_order():
    scores = np.vstack([HAND_SCORES, [[0.2, 0.5, 0.1, 0.5]]]).astype(np.float32)  # v3: classes 1 and 3 tie
    labels = np.vstack([HAND_LABELS, [[0, 1, 0, 0]]])
    branch = scores[:, ::-1].copy()
    acc = EnsembleMetrics(task="multi_label", num_classes=4, num_branches=1, top_k=2)
    acc.update(["v2", "v0"], branch[[2, 0]][None], scores[[2, 0]], labels[[2, 0]])
    acc.update(["v1", "v3"], branch[[1, 3]][None], scores[[1, 3]], labels[[1, 3]])
    top = acc.top_predictions()
    assert list(top["ids"]) == ["v0", "v1", "v2", "v3"]
    np.testing.assert_array_equal(top["classes"], [[0, 1], [1, 2], [2, 0], [1, 3]])
    np.testing.assert_array_equal(top["scores"], np.float32([[0.9, 0.8], [0.7, 0.6], [0.95, 0.5], [0.5, 0.5]]))
    assert top["scores"].dtype == np.float32 and top["classes"].dtype == np.int32
    # head 0, the branch: v0 reversed is [0.3, 0.1, 0.8, 0.9] -> classes 3, 2
    np.testing.assert_array_equal(acc.top_predictions(0)["classes"][0], [3, 2])
    # aggregate="mean" computes them from the averaged views
    mean = EnsembleMetrics(task="multi_label", num_classes=4, num_branches=1, top_k=2, aggregate="mean")
    for shift in (0.25, -0.25):
        mean.update(["v0", "v1", "v2", "v3"], (branch + shift)[None], scores + shift, labels)
    np.testing.assert_array_equal(mean.top_predictions()["classes"], top["classes"])
    single = EnsembleMetrics(task="single_label", num_classes=4, num_branches=1)
    single.update([0], PC_SCORES[None, :1], PC_SCORES[:1], PC_TARGET[:1])
    with pytest.raises(ValueError, match="keeps only whether"):
        single.top_predictions()
    with pytest.raises(ValueError, match="head must be"):
        acc.top_predictions(2)
