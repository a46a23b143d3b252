"""What tools/eval.py writes for people: eval.md (metrics per head, per-class table, most confused class pairs), the
per-class fields of eval.json, and YouTube-8M predictions in the Kaggle submission format.

Everything here formats what `video_ens.evaluate.evaluate` computed (with per_class=True, keep_top=True); nothing
recomputes a metric. Class names come from the evaluation set's `_info.json` (`label_names`); a dataset without
names is reported by index. Files (confusion.png, the submission) are written atomically (video_ens.durable).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import dist, durable
from .data import schema
from .data.samples import LAST_BAD_KEPT
from .plots import PlotUnavailable, plot_confusion

LOG = dist.get_logger("video_ens.report")

__all__ = [
    "CONFUSED_PAIRS",
    "KAGGLE_HEADER",
    "KAGGLE_TOP_K",
    "bad_sample_lines",
    "bad_sample_summary",
    "class_report",
    "class_rows",
    "class_table",
    "confused_pairs",
    "confused_table",
    "kaggle_submission",
    "metric_table",
    "most_confused",
    "read_video_ids",
    "report_markdown",
    "write_kaggle_submission",
]

# The YouTube-8M Kaggle competitions' submission file, as the starter code writes it (google/youtube-8m
# inference.py: the header line, then per video `format_lines`, "%i %g" pairs best first, --top_k=20).
KAGGLE_HEADER = "VideoId,LabelConfidencePairs"
KAGGLE_TOP_K = 20
CONFUSED_PAIRS = 10  # most confused (true, predicted) pairs listed in eval.md and eval.json


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _none_if_nan(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def _md(text: str) -> str:
    """A table cell: a '|' inside a class name would end the cell."""
    return text.replace("|", "\\|")


def _class_label(index: int, name: str | None) -> str:
    """ "name (index)", or the index alone for a class without a name."""
    return f"{name} ({index})" if name is not None else str(index)


# --------------------------------------------------------------------------------------------------------------------
# eval.json fields


def class_rows(per_class: dict, task: str, names: Sequence[str] | None) -> list[dict[str, Any]]:
    """eval.json's "per_class": one row per class, in class order, of the ensemble's numbers plus each branch's
    main one (`evaluate(per_class=True)["per_class"]` in, see video_ens.metrics.EnsembleMetrics.compute).

    single-label: {"class", "name", "support" (samples), "top1", "top5" (share of its samples with the target in
    the k best classes), "predicted" (samples predicted as it), "precision" (share of those that are it),
    "branch_top1" [per branch]}. multi-label: {"class", "name", "support" (positive labels), "ap" (the AP whose
    mean is mAP), "branch_ap" [per branch]}. A share without samples is null; "name" is null without names.
    """
    ens, branches = per_class["ensemble"], per_class["branches"]
    num_classes = len(ens["support"])
    if names is not None and len(names) != num_classes:
        raise ValueError(
            f"{len(names)} class names for {num_classes} classes: the label map of the evaluation "
            "set's _info.json does not match the model's outputs"
        )
    rows = []
    for c in range(num_classes):
        row: dict[str, Any] = {
            "class": c,
            "name": names[c] if names is not None else None,
            "support": int(ens["support"][c]),
        }
        if task == "single_label":
            for key in (k for k in ens if k.startswith("top")):
                row[key] = _none_if_nan(ens[key][c])
            predicted = int(ens["predicted"][c])
            row["predicted"] = predicted
            row["precision"] = float(ens["confusion"][c, c] / predicted) if predicted else None
            row["branch_top1"] = [_none_if_nan(b["top1"][c]) for b in branches]
        else:
            row["ap"] = _none_if_nan(ens["ap"][c])
            row["branch_ap"] = [_none_if_nan(b["ap"][c]) for b in branches]
        rows.append(row)
    return rows


def most_confused(confusion: Any, top: int = 10) -> list[tuple[int, int, int]]:
    """The `top` largest off-diagonal cells of a confusion matrix (rows true, columns predicted) as
    (true class, predicted class, count), largest first.

    Ties on the count go to the larger share of the true class's samples (3 of 4 before 3 of 30), then to the lower
    (true, predicted) index pair. Empty cells are never listed, so fewer than `top` may come back.
    """
    matrix = np.asarray(confusion)
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


def confused_pairs(confusion: Any, names: Sequence[str] | None, top: int = CONFUSED_PAIRS) -> list[dict[str, Any]]:
    """eval.json's "confused_pairs": the `top` most frequent mistakes, true class -> predicted class
    (`most_confused`): [{"true", "true_name", "predicted", "predicted_name", "count", "share"
    (of the true class's samples)}]."""
    matrix = np.asarray(confusion)
    support = matrix.sum(axis=1)
    return [
        {
            "true": t,
            "true_name": names[t] if names else None,
            "predicted": p,
            "predicted_name": names[p] if names else None,
            "count": n,
            "share": n / int(support[t]),
        }
        for t, p, n in most_confused(matrix, top)
    ]


def class_report(
    per_class: dict, task: str, names: Sequence[str] | None, out_dir: str | os.PathLike, *, title: str = ""
) -> dict[str, Any]:
    """eval.json's per-class fields from `evaluate(per_class=True)["per_class"]`: "class_names", "per_class", and for
    single-label data "confused_pairs" and "confusion_png", the name of OUT_DIR/confusion.png, written here. Without
    matplotlib "confusion_png" is null, "confusion_png_error" says why, and a warning is logged."""
    out: dict[str, Any] = {
        "class_names": list(names) if names is not None else None,
        "per_class": class_rows(per_class, task, names),
    }
    if task != "single_label":
        return out
    confusion = per_class["ensemble"]["confusion"]
    out["confused_pairs"] = confused_pairs(confusion, names)
    try:
        plot_confusion(confusion, Path(out_dir) / "confusion.png", names, title=title)
        out["confusion_png"] = "confusion.png"
    except PlotUnavailable as e:
        out["confusion_png"] = None
        out["confusion_png_error"] = str(e)
        LOG.warning(f"no confusion.png: {e}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# eval.md


def metric_table(result: dict) -> str:
    """Markdown table: a row for the ensemble and each branch, a column per metric (in %)."""
    names = list(result["ensemble"])
    rows = [("ensemble", result["ensemble"])] + [(f"branch {i}", b) for i, b in enumerate(result["branches"])]
    lines = ["| head | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for head, values in rows:
        lines.append(f"| {head} | " + " | ".join(f"{100 * values[m]:.2f}" for m in names) + " |")
    return "\n".join(lines)


def class_table(rows: list[dict], task: str) -> str:
    """Markdown table of `class_rows`, worst class first (by top-1, or AP), classes without samples left out."""
    main = "top1" if task == "single_label" else "ap"
    shown = sorted((r for r in rows if r["support"]), key=lambda r: (r[main], r["class"]))
    if task == "single_label":
        ks = [k for k in rows[0] if k.startswith("top")] if rows else []
        head = ["class", "name", "samples", *ks, "precision", "branches' top1"]
    else:
        head = ["class", "name", "positives", "AP", "branches' AP"]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
    for r in shown:
        cells = [str(r["class"]), _md(r["name"]) if r["name"] is not None else "", str(r["support"])]
        if task == "single_label":
            cells += [_pct(r[k]) for k in ks] + [_pct(r["precision"]), " / ".join(_pct(v) for v in r["branch_top1"])]
        else:
            cells += [_pct(r["ap"]), " / ".join(_pct(v) for v in r["branch_ap"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def confused_table(pairs: list[dict]) -> str:
    """Markdown table of `confused_pairs`."""
    lines = ["| true class | predicted as | count | % of the true class |", "|---|---|---:|---:|"]
    for p in pairs:
        true = _md(_class_label(p["true"], p["true_name"]))
        pred = _md(_class_label(p["predicted"], p["predicted_name"]))
        lines.append(f"| {true} | {pred} | {p['count']} | {100 * p['share']:.1f} |")
    return "\n".join(lines)


def bad_sample_lines(bad: dict | None, limit: int | None = None) -> list[str]:
    """One line per named bad sample: "KEY (reason: detail) [rank r]", at most `limit` of them."""
    records = (bad or {}).get("last_bad") or []
    shown = records if limit is None else records[:limit]
    lines = []
    for r in shown:
        detail = f": {r['detail']}" if r.get("detail") else ""
        where = f" [rank {r['rank']}]" if "rank" in r else ""
        lines.append(f"{r.get('key')} ({r.get('reason')}{detail}){where}")
    return lines


def bad_sample_summary(bad: dict | None) -> str:
    """ "2 (decode 1, label 1)" from a "bad_sample_keys" dict."""
    bad = bad or {}
    reasons = ", ".join(f"{k} {v}" for k, v in (bad.get("bad_by_reason") or {}).items())
    return f"{bad.get('bad', 0)}" + (f" ({reasons})" if reasons else "")


def report_markdown(out: dict, *, with_class_table: bool = True) -> str:
    """eval.md from eval.json's contents: the setup, the metric table, then (when eval.json has them) the per-class
    table (unless `with_class_table` is False: long for 400 classes on a terminal), the most confused pairs and the
    confusion matrix PNG."""
    t = out["throughput"]
    bad = out.get("bad_sample_keys")
    named = bad_sample_lines(bad)
    bad_lines = []
    if out["bad_samples"]:
        if len(named) == out["bad_samples"]:
            by_key = ", by key:"
        elif named:
            by_key = f", the last {len(named)} by key (each rank keeps its last {LAST_BAD_KEPT}):"
        else:
            by_key = ""
        bad_lines = [f"- bad samples (skipped): {bad_sample_summary(bad)}{by_key}"]
        bad_lines += [f"  - `{line}`" for line in named]
    class_line = []
    if "class_names" in out:
        count = len(out["per_class"]) if out.get("per_class") is not None else None
        source = "names from the dataset's _info.json" if out["class_names"] else "no names in _info.json: indices"
        class_line = [f"- classes: {count} ({source})" if count is not None else f"- classes: {source}"]
    lines = [
        f"# Evaluation of {out['model']} ({out['num_branches']} branch{'es' if out['num_branches'] > 1 else ''})",
        "",
        f"- data: {out['dataset']} ({out['dataset_size']} samples); evaluated {out['num_samples']} "
        f"({out['bad_samples']} bad)",
        *class_line,
        f"- mode: {out['mode']}" + (f", {v} views per video" if (v := out.get("views_per_video")) else ""),
        f"- weights: {out['weights']}",
        f"- {out['world_size']} process(es) on {out['device']}, precision {out['precision']}"
        + (f", windows of {out['max_chunk_frames']} frames" if out.get("max_chunk_frames") else ""),
        f"- throughput: {t['samples_per_s']:.2f} samples/s, {t['inputs_per_s']:.2f} model inputs/s "
        f"({t['inputs']} inputs in {t['seconds']:.1f} s)",
        *bad_lines,
        *([f"- Kaggle submission: {out['kaggle_submission']}"] if out.get("kaggle_submission") else []),
        "",
        "Metrics in %:",
        "",
        metric_table(out),
        "",
    ]
    rows = out.get("per_class")
    if rows and with_class_table:
        single = "ap" not in rows[0]
        task = "single_label" if single else "multi_label"
        empty = sum(1 for r in rows if not r["support"])
        what = "top-1 accuracy" if single else "AP (the mean of these is mAP)"
        lines += [f"## Per class (ensemble), worst {what} first", ""]
        if single:
            lines += [
                "In %: topk, the share of the class's samples whose class is among the k best; precision, "
                "the share of the samples predicted as the class that are of it; then each branch's top-1.",
                "",
            ]
        if empty:
            lines += [
                f"{empty} class(es) without {'samples' if single else 'positives'} in the evaluation set are left out.",
                "",
            ]
        lines += [class_table(rows, task), ""]
    if "confused_pairs" in out:
        pairs = out["confused_pairs"]
        lines += ["## Most confused classes (ensemble)", ""]
        lines += [confused_table(pairs), ""] if pairs else ["No sample was predicted as another class.", ""]
    if out.get("confusion_png"):
        lines += [
            "## Confusion matrix (ensemble)",
            "",
            f"![confusion matrix of the ensemble]({out['confusion_png']})",
            "",
        ]
    elif out.get("confusion_png_error"):
        lines += ["## Confusion matrix (ensemble)", "", f"Not drawn: {out['confusion_png_error']}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# YouTube-8M Kaggle submission


def kaggle_submission(video_ids: Sequence[str], classes: Any, scores: Any, *, top_k: int = KAGGLE_TOP_K) -> str:
    """The text of a YouTube-8M Kaggle submission file: the header "VideoId,LabelConfidencePairs", then per video
    "ID,label score label score ...", its `top_k` best classes, highest score first (the lower class index first on
    ties), scores printed with "%g" (6 significant digits), as the starter code's inference.py writes them.

    Args:
        video_ids: (V,) the dataset's video ids (YouTube-8M's 4-character ids, not our shard keys).
        classes: (V, k) class indices per video, any order (e.g. EnsembleMetrics.top_predictions()["classes"]).
        scores: (V, k) their scores.
    """
    classes, scores = np.asarray(classes), np.asarray(scores)
    if classes.ndim != 2 or classes.shape != scores.shape or classes.shape[0] != len(video_ids):
        raise ValueError(
            f"classes {classes.shape} and scores {scores.shape} must both be (V, k) for {len(video_ids)} video ids"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    lines = [KAGGLE_HEADER]
    for video_id, row_classes, row_scores in zip(video_ids, classes, scores, strict=True):
        video_id = str(video_id)
        if not video_id or any(ch in video_id for ch in ",\r\n"):
            raise ValueError(
                f"video id {video_id!r} cannot be a CSV field of the submission (empty, or a comma or line break in it)"
            )
        order = np.lexsort((row_classes, -row_scores))[:top_k]
        pairs = " ".join(f"{int(row_classes[i])} {float(row_scores[i]):g}" for i in order)  # the starter's "%i %g"
        lines.append(f"{video_id},{pairs}")
    return "\n".join(lines) + "\n"


def read_video_ids(folder: str | os.PathLike) -> dict[str, str]:
    """Sample key -> the "video_id" of its `<key>.json`, over the shards of a converted dataset (listed in its
    _info.json). The converters make keys from a running index plus a sanitised id (schema.make_key), so the
    dataset's own ids, which a submission needs, are read from the samples. Reads tar headers and the small json
    members only (a local tar seeks past the features)."""
    ids: dict[str, str] = {}
    for shard in schema.shard_paths(folder):
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder_part, _, base = member.name.rpartition("/")
                stem, _, field = base.partition(".")
                if field != "json":
                    continue
                key = f"{folder_part}/{stem}" if folder_part else stem  # WebDataset's key: up to the first dot
                try:
                    meta = json.loads(tar.extractfile(member).read())
                    video_id = meta["video_id"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{shard}: sample {key!r}, field 'json': no readable \"video_id\" ({e}); reconvert the dataset"
                    ) from None
                ids[key] = str(video_id)
    return ids


def write_kaggle_submission(path: str | os.PathLike, top: dict, dataset: str | os.PathLike) -> int:
    """Write `kaggle_submission` of `evaluate(keep_top=True)["top"]` to `path` (atomically, video_ens.durable), under
    the video ids `read_video_ids` finds in the local `dataset` folder; returns the number of videos."""
    video_ids = read_video_ids(dataset)
    keys = [str(k) for k in top["ids"]]
    missing = [k for k in keys if k not in video_ids]
    if missing:
        raise ValueError(
            f"{len(missing)} evaluated sample(s) have no <key>.json with a video_id in {dataset} (e.g. "
            f"{missing[0]!r}): evaluate the dataset folder the submission is for"
        )
    text = kaggle_submission([video_ids[k] for k in keys], top["classes"], top["scores"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    durable.write_atomic(path, text)
    return len(keys)
