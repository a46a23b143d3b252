"""video_ens.report and video_ens.plots: the Kaggle submission text, eval.json's per-class rows and confused pairs,
eval.md's tables, and the confusion-matrix figure, all against hand-made inputs; matplotlib missing degrades with a
message that says what to install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from video_ens.report import (
    KAGGLE_HEADER,
    class_rows,
    class_table,
    confused_pairs,
    kaggle_submission,
    most_confused,
    read_video_ids,
    report_markdown,
)

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------------------------
# Kaggle submission


def test_kaggle_submission_exact_text():
    # Video "Ab3d": 0.25 ties between classes 5 and 7 (the lower index first); 0.923456789 prints with %g's six
    # significant digits. Video "x-_9": its third pair is cut by top_k=2.
    classes = np.array([[5, 2, 7], [1, 0, 3]])
    scores = np.array([[0.25, 0.923456789, 0.25], [1e-05, 0.5, 0.999999]], dtype=np.float32)
    text = kaggle_submission(["Ab3d", "x-_9"], classes, scores, top_k=2)
    assert text == "VideoId,LabelConfidencePairs\nAb3d,2 0.923457 5 0.25\nx-_9,3 0.999999 0 0.5\n"
    assert kaggle_submission(["Ab3d", "x-_9"], classes, scores).splitlines()[1:] == [
        "Ab3d,2 0.923457 5 0.25 7 0.25",
        "x-_9,3 0.999999 0 0.5 1 1e-05",
    ]


def test_kaggle_submission_keeps_twenty_pairs_best_first():
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.linspace(0.01, 0.3, 30)).reshape(1, 30)  # all distinct
    line = kaggle_submission(["abcd"], np.arange(30)[None], scores).splitlines()[1]
    video, pairs = line.split(",")
    words = pairs.split(" ")
    labels, confidences = [int(w) for w in words[::2]], [float(w) for w in words[1::2]]
    assert video == "abcd" and len(labels) == 20
    assert labels == list(np.argsort(-scores[0])[:20])
    assert confidences == sorted(confidences, reverse=True)
    assert KAGGLE_HEADER == "VideoId,LabelConfidencePairs"


def test_kaggle_submission_refuses_ids_that_break_the_csv_and_mismatched_shapes():
    with pytest.raises(ValueError, match="'a,b' cannot be a CSV field"):
        kaggle_submission(["a,b"], [[1]], [[0.5]])
    with pytest.raises(ValueError, match="must both be"):
        kaggle_submission(["a", "b"], [[1]], [[0.5]])


def test_read_video_ids_from_the_samples(tmp_path):
    from video_ens.data.schema import encode_yt8m_sample, make_key
    from video_ens.data.writer import DatasetWriter

    # make_key strips "_" at the ends of the id and turns "." into "_": the keys do not give these ids back
    video_ids = ["Ab3d", "_ab", "q.r"]
    frames = np.zeros((2, 1024), np.uint8), np.zeros((2, 128), np.uint8)
    with DatasetWriter(tmp_path / "ds", kind="yt8m", converter={"name": "test"}, shard_size=2) as w:
        keys = []
        for i, vid in enumerate(video_ids):
            keys.append(make_key(i, vid))
            w.write(encode_yt8m_sample(key=keys[-1], video_id=vid, rgb=frames[0], audio=frames[1], labels=[i]))
        w.commit(num_classes=4, label_names=None)
    assert keys[1:] == ["00000001_ab", "00000002_q_r"]
    assert read_video_ids(tmp_path / "ds") == dict(zip(keys, video_ids, strict=True))


# --------------------------------------------------------------------------------------------------------------------
# eval.json's per-class fields and eval.md

# Per-class arrays of a 3-class, 2-branch single-label evaluation (what EnsembleMetrics.compute(per_class=True)
# returns); class 2 has no sample.
SINGLE = {
    "ensemble": {
        "support": np.array([4, 2, 0]),
        "top1": np.array([0.75, 0.5, np.nan]),
        "top5": np.array([1.0, 1.0, np.nan]),
        "confusion": np.array([[3, 1, 0], [0, 1, 1], [0, 0, 0]]),
        "predicted": np.array([3, 2, 1]),
    },
    "branches": [{"top1": np.array([0.5, 0.5, np.nan])}, {"top1": np.array([0.25, 1.0, np.nan])}],
}


def test_class_rows_single_label_by_hand():
    rows = class_rows(SINGLE, "single_label", ["walk", "run|jog", "swim"])
    assert rows[0] == {
        "class": 0,
        "name": "walk",
        "support": 4,
        "top1": 0.75,
        "top5": 1.0,
        "predicted": 3,
        "precision": 1.0,
        "branch_top1": [0.5, 0.25],
    }
    assert rows[1]["precision"] == 0.5 and rows[1]["branch_top1"] == [0.5, 1.0]  # 1 of the 2 predicted as it
    assert rows[2] == {
        "class": 2,
        "name": "swim",
        "support": 0,
        "top1": None,
        "top5": None,
        "predicted": 1,
        "precision": 0.0,
        "branch_top1": [None, None],
    }
    json.dumps(rows, allow_nan=False)  # strict JSON: no NaN
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        class_rows(SINGLE, "single_label", ["a", "b"])


def test_class_rows_multi_label_and_its_table():
    per_class = {
        "ensemble": {"support": np.array([3, 0, 1]), "ap": np.array([0.5, np.nan, 0.25])},
        "branches": [{"ap": np.array([0.4, np.nan, 0.2])}],
    }
    rows = class_rows(per_class, "multi_label", None)
    assert rows == [
        {"class": 0, "name": None, "support": 3, "ap": 0.5, "branch_ap": [0.4]},
        {"class": 1, "name": None, "support": 0, "ap": None, "branch_ap": [None]},
        {"class": 2, "name": None, "support": 1, "ap": 0.25, "branch_ap": [0.2]},
    ]
    table = class_table(rows, "multi_label").splitlines()
    assert table[0] == "| class | name | positives | AP | branches' AP |"
    assert table[2:] == ["| 2 |  | 1 | 25.00 | 20.00 |", "| 0 |  | 3 | 50.00 | 40.00 |"]  # worst first, no class 1


def test_confused_pairs_by_hand():
    pairs = confused_pairs(SINGLE["ensemble"]["confusion"], ["walk", "run", "swim"])
    # 0 -> 1 is 1 of class 0's 4 samples, 1 -> 2 is 1 of class 1's 2: the larger share first
    assert pairs == [
        {"true": 1, "true_name": "run", "predicted": 2, "predicted_name": "swim", "count": 1, "share": 0.5},
        {"true": 0, "true_name": "walk", "predicted": 1, "predicted_name": "run", "count": 1, "share": 0.25},
    ]
    assert confused_pairs(SINGLE["ensemble"]["confusion"], None, top=1) == [
        {"true": 1, "true_name": None, "predicted": 2, "predicted_name": None, "count": 1, "share": 0.5}
    ]


def _eval_out(**extra) -> dict:
    """An eval.json as tools/eval.py writes it, before the per-class fields."""
    return {
        "ensemble": {"top1": 0.5, "top5": 1.0},
        "branches": [{"top1": 0.5, "top5": 1.0}] * 2,
        "num_samples": 6,
        "mode": "full",
        "views_per_video": None,
        "throughput": {"samples_per_s": 3.0, "inputs_per_s": 3.0, "seconds": 2.0, "inputs": 6, "metrics_seconds": 0},
        "model": "s3dg_tiny_ens2",
        "num_branches": 2,
        "dataset": "data/val",
        "dataset_size": 6,
        "bad_samples": 0,
        "bad_sample_keys": {"bad": 0},
        "weights": "model.safetensors",
        "world_size": 1,
        "device": "cpu",
        "precision": "fp32",
        "max_chunk_frames": None,
        **extra,
    }


def test_report_markdown_sections():
    names = ["walk", "run|jog", "swim"]
    out = _eval_out(
        class_names=names,
        per_class=class_rows(SINGLE, "single_label", names),
        confused_pairs=confused_pairs(SINGLE["ensemble"]["confusion"], names),
        confusion_png="confusion.png",
    )
    md = report_markdown(out)
    assert "- classes: 3 (names from the dataset's _info.json)" in md
    assert "| ensemble | 50.00 | 100.00 |" in md  # the metric table as before
    lines = md.splitlines()
    header = lines.index("| class | name | samples | top1 | top5 | precision | branches' top1 |")
    # worst top-1 first; the '|' in a name escaped; class 2 (no sample) left out and said so
    assert lines[header + 2 : header + 4] == [
        "| 1 | run\\|jog | 2 | 50.00 | 100.00 | 50.00 | 50.00 / 100.00 |",
        "| 0 | walk | 4 | 75.00 | 100.00 | 100.00 | 50.00 / 25.00 |",
    ]
    assert "1 class(es) without samples in the evaluation set are left out." in md
    assert "| run\\|jog (1) | swim (2) | 1 | 50.0 |" in md
    assert "![confusion matrix of the ensemble](confusion.png)" in md
    short = report_markdown(out, with_class_table=False)
    assert "| class | name |" not in short and "| run\\|jog (1) | swim (2) | 1 | 50.0 |" in short
    # without the new fields (an older eval.json) the report is what it was
    assert "## " not in report_markdown(_eval_out())


# --------------------------------------------------------------------------------------------------------------------
# Figures


def test_confusion_figure_classes_and_png_size(tmp_path):
    from PIL import Image

    from video_ens.plots import DPI, confusion_figure, plot_confusion

    names = ["walk", "run", "swim"]
    confusion = SINGLE["ensemble"]["confusion"]
    fig = confusion_figure(confusion, names, title="tiny")
    ax = fig.axes[0]
    (image,) = ax.get_images()
    assert image.get_array().shape == (3, 3)
    # each row as % of its true class; the empty row stays 0
    np.testing.assert_allclose(image.get_array(), [[75, 25, 0], [0, 50, 50], [0, 0, 0]])
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert ax.get_title() == "tiny" and ax.get_xlabel() == "predicted class"
    assert sorted(t.get_text() for t in ax.texts) == ["1", "1", "1", "3"]  # the counts, in non-empty cells
    width, height = fig.get_size_inches() * DPI
    path = plot_confusion(confusion, tmp_path / "confusion.png", names)
    with Image.open(path) as im:
        assert im.size == (round(width), round(height))
    many = confusion_figure(np.eye(80, dtype=int))  # too many classes for names: indices, no cell counts
    assert many.axes[0].get_images()[0].get_array().shape == (80, 80) and not many.axes[0].texts
    assert "walk" not in [t.get_text() for t in many.axes[0].get_yticklabels()]


def test_without_matplotlib_figures_raise_and_eval_reports_why(monkeypatch, tmp_path):
    from video_ens import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(plots.PlotUnavailable, match=r"pip install -e \.\[plot\]"):
        plots.pyplot()
    from video_ens.report import class_report

    out = _eval_out(**class_report(SINGLE, "single_label", ["walk", "run", "swim"], tmp_path))
    assert out["confusion_png"] is None and "matplotlib is not installed" in out["confusion_png_error"]
    assert not (tmp_path / "confusion.png").exists()
    assert len(out["per_class"]) == 3 and out["confused_pairs"][0]["true"] == 1  # the rest is written
    assert "Not drawn: matplotlib is not installed" in report_markdown(out)


def test_plots_and_report_import_without_matplotlib():
    code = (
        "import sys, video_ens.plots, video_ens.report; "
        "assert 'matplotlib' not in sys.modules, 'imported at module level'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_most_confused_orders_by_count_then_share_then_index():
    confusion = np.array([[5, 3, 0], [2, 6, 2], [0, 3, 9]])
    # count 3: (0 -> 1) is 3 of 8 samples of class 0, (2 -> 1) 3 of 12; count 2: (1 -> 0) and (1 -> 2) both 2 of 10
    assert most_confused(confusion, top=3) == [(0, 1, 3), (2, 1, 3), (1, 0, 2)]
    assert most_confused(confusion, top=10) == [(0, 1, 3), (2, 1, 3), (1, 0, 2), (1, 2, 2)]  # no empty cell
    assert most_confused(np.diag([4, 5]), top=5) == []  # the diagonal is never a confusion
    # every mistake once (test_metrics' hand-made predictions): the larger share of its class first
    assert most_confused([[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], top=10) == [
        (2, 0, 1),
        (1, 2, 1),
        (0, 1, 1),
    ]
    with pytest.raises(ValueError, match="square"):
        most_confused(np.zeros((2, 3)))
