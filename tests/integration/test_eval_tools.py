"""tools/eval.py, tools/plot.py, tools/compare.py and video_ens.evaluate on tiny models and a tiny demo dataset.

The run folder is built by hand (random tiny S3D-G, BatchNorm calibrated so that its output depends on the input,
saved as model.safetensors next to recipe.json), so nothing here trains. Expectations are computed independently:
the one-pass model output for the chunked forward, per-video averages and ranks computed here for multi-view
testing, `count_params` / `count_flops` for the size table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from launching import load_tool, run_tool
from tiny_runs import data_section, eval_stream, write_run

from video_ens.config import load_recipe, recipe_from_dict
from video_ens.data import loader
from video_ens.data.schema import read_info
from video_ens.data.transforms import to_model_input
from video_ens.evaluate import evaluate, full_clip_forward, load_weights
from video_ens.models import create_model
from video_ens.models.s3dg import SepConv3d
from video_ens.models.size import count_flops, count_params

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

MODEL = "s3dg_tiny_ens2"
NUM_VAL = 6
CLIP_FRAMES = 40  # longer than the model's 16-frame training clips, so whole-clip evaluation has something to chunk
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _random_tiny_s3dg(seed: int = 0) -> torch.nn.Module:
    """Tiny S3D-G whose temporal convs mix frames (they start as identities) and whose BN statistics are those of
    random clips: with PyTorch's default init and unit running variances the logits barely depend on the input."""
    torch.manual_seed(seed)
    model = create_model(MODEL)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SepConv3d):
                torch.nn.init.normal_(m.temporal.weight, std=(2.0 / (3 * m.temporal.in_channels)) ** 0.5)
                torch.nn.init.normal_(m.temporal.bias, std=0.05)
            if isinstance(m, torch.nn.BatchNorm3d):
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(torch.randn(2, 3, 24, 64, 64))
    return model.eval()


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


@pytest.fixture(scope="module")
def kinetics(demo_data) -> Path:
    return demo_data("kinetics", num_train=2, num_val=NUM_VAL, frames=CLIP_FRAMES, shard_size=2)


@pytest.fixture(scope="module")
def kinetics_bad(kinetics, tmp_path_factory) -> tuple[Path, list[str]]:
    """The demo evaluation set with sample 1 undecodable and sample 4's label outside the label map: one bad sample
    on each of two ranks (rank 0 reads samples 0-2, rank 1 samples 3-5). Returns the folder and every key."""
    import tarfile

    from video_ens.data.schema import shard_paths
    from video_ens.data.writer import DatasetWriter

    info = read_info(kinetics / "val")
    samples: list[dict] = []
    for shard in shard_paths(kinetics / "val"):
        with tarfile.open(shard) as tar:
            by_key: dict[str, dict] = {}
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                by_key.setdefault(key, {"__key__": key})[field] = tar.extractfile(member).read()
        samples += by_key.values()
    assert len(samples) == NUM_VAL and "mp4" in samples[1]
    samples[1]["mp4"] = b"this is not a video " * 50
    samples[4]["cls"] = str(info.num_classes + 3).encode()
    folder = tmp_path_factory.mktemp("data") / "kinetics_bad"
    with DatasetWriter(folder, kind="video", converter={"name": "test_eval_tools"}, shard_size=2) as w:
        for sample in samples:
            w.write(sample)
        w.commit(num_classes=info.num_classes, label_names=info.label_names)
    return folder, [sample["__key__"] for sample in samples]


def _recipe_dict(kinetics: Path, **eval_cfg) -> dict:
    return {
        "description": "test: tiny S3D-G evaluation",
        "model": {"name": MODEL},
        "data": data_section("clip", kinetics, frame_stride=1),
        "objective": {"structure": "codistillation", "weight": 2.0},
        "train": {"precision": "fp32", "device": "cpu"},
        "eval": {"mode": "full", "batch_size": 2, **eval_cfg},
    }


@pytest.fixture(scope="module")
def run_dir(kinetics, tmp_path_factory) -> Path:
    """A finished-looking run folder: recipe.json and model.safetensors (with the model name, as train.py saves)."""
    return write_run(tmp_path_factory.mktemp("runs") / "tiny_mu2", _recipe_dict(kinetics), _random_tiny_s3dg())


def _loaded_model(run: Path) -> torch.nn.Module:
    model = create_model(MODEL)
    load_weights(model, run / "model.safetensors", expect_model=MODEL)
    return model.eval()


def _rank_of_target(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of the target class per row, classes ordered by score, then by lower index on ties."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.argmax(order == target[:, None], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Whole-clip evaluation in temporal windows


@pytest.mark.parametrize(("frames", "window"), [(40, 16), (41, 10)])
def test_chunked_whole_clip_equals_one_pass(frames, window):
    model = _random_tiny_s3dg()
    x = torch.randn(2, 3, frames, 64, 64, generator=torch.Generator().manual_seed(1))
    seen: dict[str, list[int]] = {"stem": [], "branch": []}
    hooks = [
        model.base.Conv2d_1a.conv.register_forward_hook(lambda m, i, o: seen["stem"].append(i[0].shape[2])),
        model.branches[1].Mixed_4b.Branch_1.Conv3d_0b_3x3.temporal.register_forward_hook(
            lambda m, i, o: seen["branch"].append(i[0].shape[2])
        ),
    ]
    with torch.no_grad():
        chunked = full_clip_forward(model, x, max_chunk_frames=window)
        for h in hooks:
            h.remove()
        reference = model(x)
        other = model(torch.randn_like(x))
        # Whole network per window, logits averaged: what a gate-free network would allow.
        starts = range(0, frames - window + 1, window)
        per_window = torch.stack([model(x[:, :, s : s + window]).branches for s in starts]).mean(0)
    assert len(seen["stem"]) > 1 and max(seen["stem"]) <= window, seen["stem"]
    if window == 10:  # 41 frames leave 11 after MaxPool_4a: the branches are windowed too
        assert len(seen["branch"]) > 1 and max(seen["branch"]) <= window, seen["branch"]
    assert chunked.branches.shape == reference.branches.shape == (2, 2, 8)
    torch.testing.assert_close(chunked.branches, reference.branches, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.ensemble, reference.ensemble, rtol=0, atol=1e-5)
    # The comparison has teeth: another clip, or windows whose gates see only their own frames, differ by far more.
    assert (other.branches - reference.branches).abs().max() > 1e-2
    assert (per_window - reference.branches).abs().max() > 1e-3


def test_chunk_window_must_fit_two_halos():
    model = _random_tiny_s3dg()
    with pytest.raises(ValueError, match="max_chunk_frames 6 leaves no room"):
        full_clip_forward(model, torch.randn(1, 3, 20, 64, 64), max_chunk_frames=6)


# ---------------------------------------------------------------------------------------------------------------
# tools/eval.py


def test_eval_tool_two_ranks_equal_one_and_hand_computed_metrics(run_dir, kinetics, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--run-dir", str(run_dir), "--save-scores"]
    out = run_tool("eval", *common, "--out", str(one), check=True)
    # two gloo ranks, and temporal windows on top: the 40-frame videos go through full_clip_forward
    run_tool("eval", *common, "--out", str(two), "--max-chunk-frames", "16", nproc=2, check=True)
    a, b = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert a["num_samples"] == b["num_samples"] == read_info(kinetics / "val").num_samples == NUM_VAL
    assert a["ensemble"] == b["ensemble"] and a["branches"] == b["branches"]
    assert (a["world_size"], b["world_size"], b["max_chunk_frames"], a["mode"]) == (1, 2, 16, "full")
    assert a["throughput"]["inputs"] == NUM_VAL and a["throughput"]["samples_per_s"] > 0
    assert a["recipe"] == json.loads((run_dir / "recipe.json").read_text())
    sa, sb = np.load(one / "scores.npz"), np.load(two / "scores.npz")
    assert list(sa["ids"]) == list(sb["ids"]) and len(sa["ids"]) == NUM_VAL
    np.testing.assert_allclose(sa["ensemble"], sb["ensemble"], rtol=0, atol=1e-5)

    # Independent expectation: the same weights, one pass per video here, ranks counted by hand.
    model = _loaded_model(run_dir)
    recipe = load_recipe(run_dir / "recipe.json")
    stream = eval_stream(recipe, model, loader.DataPaths(train=kinetics / "train", val=kinetics / "val"))
    probs, targets = {}, {}
    with torch.no_grad():
        for batch in stream.batches():
            assert batch["inputs"].shape[1] == CLIP_FRAMES  # the whole video
            out_ = model(to_model_input(batch))
            heads = torch.cat([torch.softmax(out_.branches, -1), out_.ensemble[None]])  # (N + 1, B, C)
            for j, key in enumerate(batch["ids"]):
                probs[key], targets[key] = heads[:, j].numpy(), int(batch["target"][j])
    keys = sorted(probs)
    np.testing.assert_allclose(sa["ensemble"], np.stack([probs[k][-1] for k in keys]), rtol=0, atol=1e-5)
    target = np.array([targets[k] for k in keys])
    for head, expect in enumerate([*a["branches"], a["ensemble"]]):
        rank = _rank_of_target(np.stack([probs[k][head] for k in keys]), target)
        assert expect == {"top1": pytest.approx(np.mean(rank < 1)), "top5": pytest.approx(np.mean(rank < 5))}

    table = (one / "eval.md").read_text()
    assert "| ensemble |" in table and "| branch 1 |" in table and "top5" in table
    assert f"{100 * a['ensemble']['top1']:.2f}" in out.stdout  # the table is printed too

    # The per-class report, from the same hand-computed ranks: the class names of _info.json, support, top-1 / top-5
    # per class, the arg-max confusion and the pairs it makes; identical over two ranks.
    names = read_info(kinetics / "val").label_names
    assert a["class_names"] == b["class_names"] == names and len(names) == 8
    assert a["per_class"] == b["per_class"] and a["confused_pairs"] == b["confused_pairs"]
    ensemble = np.stack([probs[k][-1] for k in keys])
    rank = _rank_of_target(ensemble, target)
    predicted = np.argmax(ensemble, axis=1)
    for c, row in enumerate(a["per_class"]):
        mine = target == c
        assert (row["class"], row["name"], row["support"]) == (c, names[c], int(mine.sum()))
        if mine.any():
            assert row["top1"] == pytest.approx(np.mean(rank[mine] < 1))
            assert row["top5"] == pytest.approx(np.mean(rank[mine] < 5))
        else:
            assert row["top1"] is None and row["top5"] is None
        assert row["predicted"] == int((predicted == c).sum())
        hits = int(((predicted == c) & mine).sum())
        assert row["precision"] == (pytest.approx(hits / row["predicted"]) if row["predicted"] else None)
    mistakes: dict[tuple[int, int], int] = {}
    for t, p in zip(target, predicted, strict=True):
        if t != p:
            mistakes[(int(t), int(p))] = mistakes.get((int(t), int(p)), 0) + 1
    assert {(q["true"], q["predicted"]): q["count"] for q in a["confused_pairs"]} == mistakes  # < 10 of them here
    assert a["confusion_png"] == "confusion.png" and _is_png(one / "confusion.png")
    assert "## Per class (ensemble)" in table and "## Per class" not in out.stdout  # printed: all but that table


def test_ten_by_three_views_count_each_video_once_and_average_by_hand(run_dir, kinetics):
    recipe = recipe_from_dict(_recipe_dict(kinetics, mode="clips", num_clips=10, num_crops=3, batch_size=7))
    model = _loaded_model(run_dir)
    root = loader.DataPaths(train=kinetics / "train", val=kinetics / "val")

    result = evaluate(
        model,
        eval_stream(recipe, model, root),
        task="single_label",
        top_k=20,
        device=torch.device("cpu"),
        keep_scores=True,
    )
    assert result["num_samples"] == NUM_VAL and result["inputs"] == NUM_VAL * 30

    views: dict[str, dict[int, np.ndarray]] = {}
    targets: dict[str, int] = {}
    with torch.no_grad():
        for batch in eval_stream(
            recipe, model, root
        ).batches():  # batches of 7 views: a video's 30 views straddle batches
            out = model(to_model_input(batch))
            heads = torch.cat([torch.softmax(out.branches, -1), out.ensemble[None]])  # (N + 1, B, C)
            for j, key in enumerate(batch["ids"]):
                views.setdefault(key, {})[int(batch["view_ids"][j])] = heads[:, j].numpy()
                targets[key] = int(batch["target"][j])
    assert len(views) == NUM_VAL and all(sorted(v) == list(range(30)) for v in views.values())
    keys = sorted(views)
    mean = np.stack([np.mean([views[k][v] for v in range(30)], axis=0) for k in keys])  # (V, N + 1, C)
    target = np.array([targets[k] for k in keys])
    np.testing.assert_allclose(result["scores"]["ensemble"], mean[:, -1], rtol=0, atol=1e-6)
    assert list(result["scores"]["views"]) == [30] * NUM_VAL
    for head, expect in enumerate([*result["branches"], result["ensemble"]]):
        rank = _rank_of_target(mean[:, head], target)
        assert expect == {"top1": pytest.approx(np.mean(rank < 1)), "top5": pytest.approx(np.mean(rank < 5))}


def test_bad_samples_are_named_over_ranks_and_progress_has_a_total(run_dir, kinetics_bad, tmp_path):
    folder, keys = kinetics_bad
    out_dir = tmp_path / "bad"
    args = ["--run-dir", str(run_dir), "--set", f"data.val_shards={folder}", "--out", str(out_dir), "--log-every", "1"]
    out = run_tool("eval", *args, nproc=2, check=True)
    result = json.loads((out_dir / "eval.json").read_text())
    assert result["num_samples"] == NUM_VAL - 2 and result["dataset_size"] == NUM_VAL
    assert result["bad_samples"] == 2  # the count, as before
    bad = result["bad_sample_keys"]
    assert bad["bad"] == 2 and bad["bad_by_reason"] == {"decode": 1, "label": 1}
    assert [(r["key"], r["reason"], r["rank"]) for r in bad["last_bad"]] == [
        (keys[1], "decode", 0),
        (keys[4], "label", 1),
    ]
    log = out.stderr
    assert f"{keys[1]} (decode" in log and f"{keys[4]} (label: label " in log
    assert "2 of 6 samples could not be evaluated (bad samples: 2 (decode 1, label 1))" in log
    # rank 0 reads 3 samples, one of them bad: its two good videos make one batch of 2
    assert re.search(r"evaluated inputs 2/3 \(66\.7%\) on rank 0, [\d.]+ inputs/s, eta \d+:\d\d:\d\d", log), log
    report = (out_dir / "eval.md").read_text()
    assert "- bad samples (skipped): 2 (decode 1, label 1)" in report
    assert f"`{keys[1]} (decode" in report and f"`{keys[4]} (label" in report


@pytest.fixture(scope="module")
def yt8m_run(demo_data, tmp_path_factory) -> Path:
    """A tiny DBoF run folder (random weights) on a small demo YouTube-8M set, made by the real converter."""
    root = demo_data("yt8m", num_train=8, num_validate=16, shard_size=4)
    recipe = {
        "description": "test: tiny DBoF evaluation",
        "model": {"name": "dbof_tiny_ens2"},
        "data": data_section("features", root),
        "objective": {"structure": "codistillation", "weight": 2.0, "loss": "sigmoid_bce"},
        "train": {"precision": "fp32", "device": "cpu"},
        "eval": {"batch_size": 3, "top_k": 20},
    }
    torch.manual_seed(0)
    return write_run(tmp_path_factory.mktemp("runs") / "tiny_dbof", recipe, create_model("dbof_tiny_ens2"))


def test_kaggle_submission_of_a_yt8m_evaluation(yt8m_run, tmp_path):
    """The CSV holds every evaluated video under the dataset's own id with its 16 (all) classes, best first, at the
    probabilities of a forward pass here; the per-class report carries the vocabulary's names and per-class AP."""
    out_dir = tmp_path / "eval"
    run_tool("eval", "--run-dir", str(yt8m_run), "--out", str(out_dir), "--kaggle", check=True)
    result = json.loads((out_dir / "eval.json").read_text())
    csv_path = out_dir / "kaggle_submission.csv"
    assert result["kaggle_submission"] == str(csv_path)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "VideoId,LabelConfidencePairs" and len(lines) == 1 + result["num_samples"]

    # Independent expectation: the dataset's video ids read from the shards here, scores from one forward pass.
    recipe = load_recipe(yt8m_run / "recipe.json")
    val = Path(recipe.data.val_shards)
    import tarfile

    from video_ens.data.schema import shard_paths

    video_id = {}
    for shard in shard_paths(val):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    video_id[member.name.split(".")[0]] = json.loads(tar.extractfile(member).read())["video_id"]
    model = create_model("dbof_tiny_ens2")
    load_weights(model, yt8m_run / "model.safetensors")
    model.eval()
    stream = eval_stream(recipe, model, loader.DataPaths(train=recipe.data.train_shards, val=str(val)))
    expected, labels, scores = {}, [], []
    with torch.no_grad():
        for batch in stream.batches():
            ens = model(to_model_input(batch), lengths=batch["lengths"]).ensemble.float().numpy()  # (B, 16)
            for key, row, target in zip(batch["ids"], ens, batch["target"].numpy(), strict=True):
                order = sorted(range(16), key=lambda c: (-row[c], c))
                expected[video_id[key]] = (order, row[order])
                labels.append(target)
                scores.append(row)
    assert len(expected) == result["num_samples"] == len(lines) - 1
    for line in lines[1:]:
        vid, pairs = line.split(",")
        words = pairs.split(" ")
        order, values = expected.pop(vid)
        assert [int(w) for w in words[::2]] == order
        np.testing.assert_allclose([float(w) for w in words[1::2]], values, rtol=1e-5)  # "%g": 6 digits
    assert not expected

    from video_ens.metrics import class_average_precision

    info = read_info(val)
    assert result["class_names"] == info.label_names and result["class_names"][3] == "topic_03"
    labels, scores = np.stack(labels), np.stack(scores)
    aps = class_average_precision(scores, labels, top_k=20)
    for c, row in enumerate(result["per_class"]):
        assert row["support"] == int(labels[:, c].sum())
        assert row["ap"] == (None if np.isnan(aps[c]) else pytest.approx(aps[c]))
    assert "confused_pairs" not in result and "confusion_png" not in result  # single-label only
    assert "| class | name | positives | AP | branches' AP |" in (out_dir / "eval.md").read_text()


def test_kaggle_option_needs_features_data(run_dir, capsys):
    assert load_tool("eval").main(["--run-dir", str(run_dir), "--kaggle", "x.csv"]) == 2
    assert "--kaggle writes YouTube-8M predictions (data.kind features); this recipe's data.kind is 'clip'" in (
        capsys.readouterr().err
    )


def test_load_weights_is_strict(run_dir):
    with pytest.raises(ValueError, match="holds weights of model 's3dg_tiny_ens2' but the recipe builds 's3dg_tiny'"):
        load_weights(create_model("s3dg_tiny"), run_dir / "model.safetensors", expect_model="s3dg_tiny")
    with pytest.raises(ValueError, match="does not fit the model"):
        load_weights(create_model("s3dg_tiny", num_branches=3), run_dir / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# tools/plot.py and tools/compare.py


def _fake_run(
    parent: Path, name: str, *, model: str, structure: str, weight: float, top1: float, branches: int, **eval_json
):
    run = parent / name
    run.mkdir()
    recipe = {
        "model": {"name": model},
        "objective": {"structure": structure, "weight": weight},
        "data": {"train_shards": "x", "val_shards": "y"},
    }
    (run / "recipe.json").write_text(json.dumps(recipe))
    result = {
        "ensemble": {"top1": top1, "top5": top1 + 0.2},
        "num_samples": 10,
        "branches": [{"top1": top1 - 0.02 * (i + 1), "top5": top1 + 0.1} for i in range(branches)],
        **eval_json,
    }
    (run / "eval.json").write_text(json.dumps(result))
    return run


def _curves_run(parent: Path, name: str, evals: dict[int, float]) -> Path:
    """A run folder with the trainer's own metrics.jsonl (8 steps, an evaluation at each step of `evals` with that
    ensemble top-1; top-5 at 100%) and a recipe.json of the co-distillation demo."""
    from video_ens.trainer import MetricsLog

    run = parent / name
    run.mkdir()
    (run / "recipe.json").write_text(
        json.dumps({"model": {"name": "s3dg_tiny_ens2"}, "objective": {"structure": "codistillation", "weight": 2.0}})
    )
    log = MetricsLog(run)  # the trainer's own writer, so the format is the one training produces
    for step in range(1, 9):
        log.write(
            "train",
            step,
            {
                "loss": 6.0 - 0.3 * step,
                "ensemble": 2.0 - 0.1 * step,
                "branch": [2.0 - 0.1 * step, 2.1 - 0.1 * step],
                "lr": 0.1 * (1 - step / 9),
            },
        )
        if step in evals:
            log.write(
                "eval",
                step,
                {
                    "ensemble": {"top1": evals[step], "top5": 1.0},
                    "num_samples": 6,
                    "branches": [{"top1": 0.5, "top5": 1.0}, {"top1": 0.25, "top5": 0.75}],
                },
            )
    log.close()
    return run


def _final_panel(fig) -> list[str]:
    (ax,) = [a for a in fig.axes if a.get_title().startswith("final evaluation")]
    return [t.get_text() for t in ax.texts], ax


def test_training_curves_png(tmp_path):
    from video_ens.plots import curves_figure

    run = _curves_run(tmp_path, "curves_run", {4: 0.4, 8: 0.8})
    png = tmp_path / "curves.png"
    out = run_tool("plot", "curves", str(run), "--out", str(png), check=True)
    assert _is_png(png) and str(png) in out.stdout
    from PIL import Image

    with Image.open(png) as im:
        assert im.width > 500 and im.height > 500  # six panels: loss, lr, top1, top5, final bars

    fig = curves_figure(run)
    assert fig.get_suptitle() == "s3dg_tiny_ens2 (2 branches), co-distillation μ=2\nrun: curves_run"
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == {
        "training loss",
        "learning rate",
        "validation top1",
        "validation top5",
        "final evaluation (step 8, 6 samples)",
    }
    # top-5 sits at 100%: the autoscale margin ran that axis to 104%; every percentage axis stays within 0-100
    for title in ("validation top1", "validation top5", "final evaluation (step 8, 6 samples)"):
        lo, hi = panels[title].get_ylim()
        assert 0 <= lo < hi <= 100, (title, lo, hi)
    assert panels["validation top5"].get_ylim()[1] == 100
    ensemble = panels["validation top1"].get_lines()[0]
    assert list(ensemble.get_xdata()) == [4, 8] and list(ensemble.get_ydata()) == [40.0, 80.0]
    labels, ax = _final_panel(fig)
    # ensemble, branch 0, branch 1 for top1 then top5: the last evaluation's values in %
    assert labels == ["80.0", "100.0", "50.0", "100.0", "25.0", "75.0"]
    assert sorted(round(b.get_height(), 6) for b in ax.patches) == [25.0, 50.0, 75.0, 80.0, 100.0, 100.0]


def test_training_curves_of_a_run_that_evaluated_once_show_bars_not_dots(tmp_path):
    from video_ens.plots import curves_figure

    fig = curves_figure(_curves_run(tmp_path, "once", {8: 0.9375}))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["training loss", "learning rate", "final evaluation (step 8, 6 samples)"]  # no lone dots
    assert _final_panel(fig)[0][0] == "93.8"
    no_recipe = _curves_run(tmp_path, "bare", {8: 0.5})
    (no_recipe / "recipe.json").unlink()
    assert curves_figure(no_recipe).get_suptitle() == "bare (no recipe.json)"


def test_sweep_png_and_points(tmp_path):
    runs = [
        _fake_run(tmp_path, "base", model="s3dg", structure="codistillation", weight=2.0, top1=0.70, branches=1),
        _fake_run(tmp_path, "lam0", model="s3dg_ens2", structure="ensembling", weight=0.0, top1=0.72, branches=2),
        _fake_run(tmp_path, "lam.5", model="s3dg_ens2", structure="ensembling", weight=0.5, top1=0.71, branches=2),
        _fake_run(tmp_path, "mu2", model="s3dg_ens2", structure="codistillation", weight=2.0, top1=0.74, branches=2),
    ]
    png = tmp_path / "sweep.png"
    run_tool("plot", "sweep", *map(str, runs), "--metric", "top1", "--out", str(png), check=True)
    assert _is_png(png)
    from video_ens.plots import read_run, sweep_figure, sweep_points

    metric, points, baselines = sweep_points([read_run(r) for r in runs], None)
    assert metric == "top1"
    assert baselines == {"s3dg": [(pytest.approx(70.0), "base")]}
    assert [(w, round(e, 6)) for w, e, _, _ in points["ensembling"]["s3dg_ens2"]] == [(0.0, 72.0), (0.5, 71.0)]
    assert [(w, round(b, 6)) for w, _, b, _ in points["codistillation"]["s3dg_ens2"]] == [(2.0, 71.0)]  # branch mean
    for ax in sweep_figure(runs, "top1").axes:  # a percentage axis, within 0-100
        lo, hi = ax.get_ylim()
        assert 0 <= lo < hi <= 100


def test_compare_sizes_and_metrics(run_dir, tmp_path):
    other = _fake_run(tmp_path, "base", model="s3dg_tiny", structure="codistillation", weight=2.0, top1=0.5, branches=1)
    out = run_tool("compare", str(run_dir), str(other), "--json", "--branches", check=True)
    rows = {r["run"]: r for r in json.loads(out.stdout)}
    for name, row in ((MODEL, rows["tiny_mu2"]), ("s3dg_tiny", rows["base"])):
        with torch.device("meta"):
            model = create_model(name)
        assert row["params"] == count_params(model)
        assert row["flops"] == count_flops(model, torch.empty(1, 3, 16, 64, 64, device="meta"))
    assert rows["tiny_mu2"]["num_branches"] == 2 and rows["tiny_mu2"]["loss"] == "codistillation μ=2"
    assert rows["base"]["loss"] == "baseline" and rows["base"]["metrics"] == {"top1": 0.5, "top5": 0.7}
    assert rows["tiny_mu2"]["metrics"] is None  # this run folder has no eval.json yet
    md = run_tool("compare", str(other), "--markdown", check=True).stdout
    assert "| base | s3dg_tiny | single network | baseline | 50.00 | 70.00 |" in md


def test_compare_table_shows_evaluation_mode_and_sample_count(tmp_path):
    clips = _fake_run(
        tmp_path,
        "clips",
        model="s3dg_tiny",
        structure="codistillation",
        weight=2.0,
        top1=0.5,
        branches=1,
        mode="clips",
        views_per_video=30,
        dataset_size=12,
        recipe={"model": {"name": "s3dg_tiny"}, "eval": {"mode": "clips", "num_clips": 10, "num_crops": 3}},
    )
    full = _fake_run(
        tmp_path,
        "full",
        model="s3dg_tiny",
        structure="codistillation",
        weight=2.0,
        top1=0.6,
        branches=1,
        mode="full",
        dataset_size=10,
    )
    compare = load_tool("compare")
    rows = [compare.row(compare.read_run(d), branches=False) for d in (clips, full)]
    assert [(r["eval_mode"], r["num_samples"], r["dataset_size"]) for r in rows] == [
        ("clips 10x3", 10, 12),
        ("full", 10, 10),
    ]
    head, body = compare.table(rows, branches=False)
    cells = [dict(zip(head, line, strict=True)) for line in body]
    assert [(c["eval"], c["samples"]) for c in cells] == [("clips 10x3", "10/12"), ("full", "10")]
    plain = compare.format_plain(head, body)
    assert re.search(r"^clips .* 50\.00 +70\.00 +clips 10x3 +10/12 ", plain, re.M), plain
    md = compare.format_markdown(head, body)
    assert "| 60.00 | 80.00 | full | 10 |" in md
