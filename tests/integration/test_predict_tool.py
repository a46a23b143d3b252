"""tools/predict.py and video_ens.predict on real video files: the demo's own encoded clips (taken out of their
shards), the same stream remuxed into Matroska and transcoded into AVI, a phone-style rotated file, a file with
non-square pixels, an unreadable file; and the Kinetics converter on rotated and anamorphic clips.

Nothing trains: the run folder holds a random tiny S3D-G whose BatchNorm statistics come from random clips, so its
outputs depend on the input. Expectations are independent: tools/eval.py's loop (video_ens.evaluate) on the shards
the files came from, the CPU reference transforms (ClipEvalTransform.__call__) on frames numpy turned by hand, the
mean of the branch scores recomputed from the JSON, and marker pixels whose place after a turn is known.
"""

from __future__ import annotations

import csv
import json
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from clips import encode_clip
from launching import load_tool, run_tool
from tiny_runs import data_section, eval_stream, write_run

from video_ens.data import loader, schema
from video_ens.data.decode import Display, decode_frames, read_display
from video_ens.data.samples import collate
from video_ens.data.transforms import ClipEvalTransform, to_model_input
from video_ens.evaluate import evaluate
from video_ens.models import create_model
from video_ens.models.s3dg import SepConv3d
from video_ens.predict import Predictor, load_clip_views, read_embeddings

av = pytest.importorskip("av")

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

MODEL = "s3dg_tiny_ens2"
NUM_VAL = 4
CLASSES = 8


@pytest.fixture(scope="module")
def demo(demo_data) -> Path:
    return demo_data("kinetics", num_train=2, num_val=NUM_VAL, frames=24, shard_size=2)


@pytest.fixture(scope="module")
def run_dir(demo, tmp_path_factory) -> Path:
    """recipe.json and model.safetensors as training leaves them, the model random but input-dependent."""
    torch.manual_seed(0)
    model = create_model(MODEL)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SepConv3d):  # the temporal convs start as identities: make them mix frames
                torch.nn.init.normal_(m.temporal.weight, std=(2.0 / (3 * m.temporal.in_channels)) ** 0.5)
            if isinstance(m, torch.nn.BatchNorm3d):
                m.momentum = None
        model.train()
        model(torch.randn(2, 3, 24, 64, 64))
    recipe = {
        "model": {"name": MODEL},
        "data": data_section("clip", demo, frame_stride=1),
        "train": {"precision": "fp32", "device": "cpu"},
        "eval": {"mode": "full", "batch_size": 2},
    }
    return write_run(tmp_path_factory.mktemp("runs") / "tiny", recipe, model.eval())


@pytest.fixture(scope="module")
def clips(demo, tmp_path_factory) -> Path:
    """The validation clips as files in one folder, named by their sample keys."""
    folder = tmp_path_factory.mktemp("clips")
    for shard in schema.shard_paths(demo / "val"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".mp4"):
                    (folder / member.name).write_bytes(tar.extractfile(member).read())
    return folder


@pytest.fixture(scope="module")
def other_containers(clips, tmp_path_factory) -> tuple[Path, Path]:
    """The first clip remuxed into Matroska (the same packets) and transcoded to MPEG-4 Part 2 in AVI."""
    first = sorted(clips.glob("*.mp4"))[0]
    folder = tmp_path_factory.mktemp("other")
    with av.open(str(first)) as src, av.open(str(folder / "remux.mkv"), "w") as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:  # not the flush packet demux yields at the end
                packet.stream = stream
                dst.mux(packet)
    frames = decode_frames(first, list(range(24))).numpy()
    _encode(folder / "transcode.avi", frames, codec="mpeg4", fmt="avi")
    return folder / "remux.mkv", folder / "transcode.avi"


def _encode(path: Path, frames: np.ndarray, *, codec: str = "libx264", **metadata) -> Path:
    # one x264 thread: the same frames give the same bytes
    return encode_clip(path, frames, codec=codec, options={"threads": "1"} if codec == "libx264" else None, **metadata)


def _predictor(run: Path, *overrides: str) -> Predictor:
    return Predictor.load(recipe=run / "recipe.json", weights=run / "model.safetensors", overrides=overrides)


@pytest.mark.parametrize(
    "overrides", [(), ("eval.mode=clips", "eval.num_clips=2", "eval.num_crops=3")], ids=["full", "clips2x3"]
)
def test_predictions_on_the_demo_clips_equal_evaluation_of_their_shards(run_dir, demo, clips, overrides):
    pred = _predictor(run_dir, *overrides)
    stream = eval_stream(pred.recipe, pred.model, loader.DataPaths(train=demo / "train", val=demo / "val"))
    scores = evaluate(
        pred.model, stream, task="single_label", top_k=5, device=torch.device("cpu"), keep_scores=True, log_every=0
    )["scores"]
    assert len(scores["ids"]) == NUM_VAL
    for j, key in enumerate(scores["ids"]):
        result = pred.predict(str(clips / f"{key}.mp4"))
        assert result.views == (6 if overrides else 1)
        # the same boxes of the same frames; only the batch a view shares a forward pass with differs
        np.testing.assert_allclose(result.branches, scores["branches"][:, j], rtol=0, atol=1e-5)
        np.testing.assert_allclose(result.ensemble, scores["ensemble"][j], rtol=0, atol=1e-5)


def test_tool_json_lines_embeddings_and_skipped_files(run_dir, demo, clips, other_containers, tmp_path):
    mkv, avi = other_containers
    listing = tmp_path / "more.txt"
    listing.write_text(f"# other containers\n{mkv}\n{avi}\n")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 40)
    out = tmp_path / "emb"
    args = [
        "--run-dir",
        str(run_dir),
        "--json",
        "--top-k",
        "20",
        "--embeddings",
        str(out),
        "--shard-size",
        "4",
        str(clips),
        str(listing),
        str(bad),
        str(tmp_path / "missing.mp4"),
    ]
    proc = run_tool("predict", *args, check=True)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    mp4s = sorted(str(p) for p in clips.glob("*.mp4"))
    assert [r["video"] for r in records] == [*mp4s, str(mkv), str(avi)]
    names = schema.read_info(demo / "train").label_names
    for r in records:
        assert set(r) == {"video", "ensemble", "branches"} and len(r["branches"]) == 2
        for head in [r["ensemble"], *r["branches"]]:
            assert [set(e) for e in head] == [{"label", "score"}] * CLASSES  # --top-k above C gives all C
            assert sorted(e["label"] for e in head) == sorted(names)
            assert [e["score"] for e in head] == sorted((e["score"] for e in head), reverse=True)
            assert sum(e["score"] for e in head) == pytest.approx(1.0, abs=1e-6)  # softmax
        by_branch = [{e["label"]: e["score"] for e in b} for b in r["branches"]]
        for e in r["ensemble"]:  # the ensemble is the mean of the branches, label by label
            assert e["score"] == pytest.approx((by_branch[0][e["label"]] + by_branch[1][e["label"]]) / 2, rel=1e-12)
    # the remux holds the first clip's packets: the same frames, the same scores
    assert records[-2]["ensemble"] == records[0]["ensemble"] and records[-2]["branches"] == records[0]["branches"]
    assert f"skipped {bad}: " in proc.stderr and f"skipped {tmp_path / 'missing.mp4'}: no such file" in proc.stderr
    assert "processed 7/7 inputs (100.0%)" in proc.stderr and "1 skipped" in proc.stderr  # the progress line

    emb = read_embeddings(out)
    assert emb["ids"] == [r["video"] for r in records] and emb["index"]["complete"]
    assert [s["count"] for s in emb["index"]["shards"]] == [4, 2]
    assert emb["base"].shape == (6, 60) and emb["branches"].shape == (2, 6, 86)  # MaxPool_4a 480/8; Mixed_5c 128*2/3
    # a row is what the model's embed gives for that file's evaluation view
    pred = _predictor(run_dir)
    items, _ = load_clip_views(mp4s[1], pred.spec, pred.view)
    with torch.no_grad():
        e = pred.model.embed(to_model_input(collate(items, pred.spec)))
    np.testing.assert_allclose(emb["base"][1], e.base[0].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(emb["branches"][:, 1], e.branches[:, 0].numpy(), rtol=0, atol=1e-6)


def test_exit_status_text_output_and_recipe_overrides(run_dir, demo, clips, tmp_path, capsys):
    tool = load_tool("predict")
    bad = tmp_path / "a.mp4"
    bad.write_bytes(b"garbage")
    assert tool.main(["--run-dir", str(run_dir), str(bad), str(tmp_path / "none.mkv")]) == 1
    err = capsys.readouterr().err
    assert "none of the 2 input(s) could be predicted" in err and f"skipped {bad}" in err

    first = sorted(clips.glob("*.mp4"))[0]
    args = [
        "--recipe",
        str(run_dir / "recipe.json"),
        "--weights",
        str(run_dir / "model.safetensors"),
        "--branches",
        "--top-k",
        "2",
        "--set",
        "eval.mode=clips",
        "--set",
        "eval.num_clips=2",
        "--set",
        "eval.num_crops=1",
    ]
    assert tool.main([*args, str(first)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(first) and [line[:11] for line in lines[1:]] == ["  ensemble ", "  branch 0 ", "  branch 1 "]
    for line in lines[1:]:
        assert len(line[12:].split(", ")) == 2 and all(part.endswith("%") for part in line[12:].split(", "))
    # the overrides took: two clips of one crop, averaged, are what the text shows
    expected = _predictor(run_dir, "eval.mode=clips", "eval.num_clips=2", "eval.num_crops=1").predict(str(first))
    assert expected.views == 2
    top = int(np.argmax(expected.ensemble))
    names = schema.read_info(demo / "train").label_names  # the run's training data holds the label map
    assert lines[1].startswith(f"  ensemble  {names[top]} {100 * expected.ensemble[top]:.1f}%")

    assert tool.main([*args[:4], "--set", "eval.nmode=clips", str(first)]) == 2
    assert "eval.nmode" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tool.main(["--recipe", str(run_dir / "recipe.json"), str(first)])  # no --weights
    assert e.value.code == 2


def test_a_phone_video_is_turned_upright_and_anamorphic_pixels_made_square(run_dir, clips, tmp_path):
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix (VideoStream.set_display_rotation: PyAV >= 18)")
    frames = decode_frames(sorted(clips.glob("*.mp4"))[0], list(range(24))).numpy()  # (24, 64, 64, 3)
    frames = np.ascontiguousarray(frames[:, :, 8:56])  # 48 wide, so that a turn changes the shape too
    plain = _encode(tmp_path / "plain.mp4", frames)
    phone = _encode(tmp_path / "phone.mp4", frames, rotation=-90)  # held upright: shown turned clockwise
    stored = decode_frames(plain, list(range(24))).numpy()
    assert np.array_equal(decode_frames(phone, list(range(24))).numpy(), stored)  # the same pictures, stored
    assert read_display(phone) == Display(rotation=270)

    pred = _predictor(run_dir)
    got = pred.predict(str(phone))
    # by hand: the stored frames turned clockwise with numpy, the CPU reference of evaluation's view, the model
    shown = torch.from_numpy(np.ascontiguousarray(np.rot90(stored, -1, axes=(1, 2))))  # (24, 48, 64, 3)
    view = ClipEvalTransform(short_side=64, crop_size=64, num_crops=1)(shown)  # (1, 3, 24, 64, 64)
    with torch.no_grad():
        out = pred.model(view)
    np.testing.assert_allclose(got.branches, torch.softmax(out.branches[:, 0], -1).double().numpy(), rtol=0, atol=1e-5)
    unturned = pred.predict(str(plain))
    assert np.abs(unturned.ensemble - got.ensemble).max() > 1e-3  # the turn changed what the model saw

    # 2:1 pixels: 24 stored columns are shown as 48, so evaluation's centre crop is 48 x 48 of the picture
    squeezed = np.ascontiguousarray(frames[:, :, ::2])  # (24, 64, 24, 3)
    sar = _encode(tmp_path / "sar.mp4", squeezed, sar=Fraction(2))
    items, display = load_clip_views(str(sar), pred.spec, pred.view)
    assert display == Display(sar=Fraction(2)) and [it.extent for it in items] == [(48, 48)]  # not (24, 24)
    assert pred.predict(str(sar)).display == display


def test_converter_turns_rotated_and_anamorphic_clips_upright(tmp_path):
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix (VideoStream.set_display_rotation: PyAV >= 18)")
    from video_ens.data import convert_kinetics

    frames = np.zeros((6, 48, 64, 3), np.uint8)
    frames[:, :24, :16] = 255  # white: top half, left quarter
    videos = tmp_path / "videos"
    videos.mkdir()
    _encode(videos / "plain.mp4", frames)
    _encode(videos / "phone.mp4", frames, rotation=-90)
    _encode(videos / "wide.mp4", frames, sar=Fraction(2))
    with open(tmp_path / "clips.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], ["plain.mp4", "a"], ["phone.mp4", "a"], ["wide.mp4", "b"]])

    def stored(out: Path) -> dict[str, schema.VideoSample]:
        samples = {}
        for shard in schema.shard_paths(out):
            with tarfile.open(shard) as tar:
                raw: dict[str, dict] = {}
                for m in tar.getmembers():
                    key, _, field = m.name.partition(".")
                    raw.setdefault(key, {"__key__": key})[field] = tar.extractfile(m).read()
            for sample in map(schema.decode_video_sample, raw.values()):
                samples[sample.video_id] = sample
        return samples

    for short_side, sizes in (
        (None, {"plain": (64, 48), "phone": (48, 64), "wide": (128, 48)}),
        (32, {"plain": (42, 32), "phone": (32, 42), "wide": (86, 32)}),
    ):
        out = tmp_path / f"out{short_side}"
        info = convert_kinetics.convert(
            annotations=str(tmp_path / "clips.csv"),
            videos=str(videos),
            out=str(out),
            short_side=short_side,
            seed=None,
            progress=False,
        )
        assert info.num_samples == 3
        assert {
            Path(d["source"].split("(")[1].rstrip(")")).stem: (d["rotation"], d["mirror"], d["sar"])
            for d in info.extra["display"]
        } == {"phone": (270, False, "1"), "wide": (0, False, "2")}
        for name, sample in stored(out).items():
            assert (sample.width, sample.height) == sizes[name], (short_side, name)
            assert read_display(sample.video).identity  # nothing left to apply
            grey = decode_frames(sample.video, [0])[0].float().mean(-1)  # (H, W)
            assert tuple(grey.shape) == sizes[name][::-1]
            h, w = grey.shape
            if name == "phone":  # turned clockwise: the block is now the top quarter, right half
                block, rest = grey[: h // 4 - 2, w // 2 + 2 :], grey[h // 4 + 2 :, :]
            else:  # top half, left quarter, stretched with the picture
                block, rest = grey[: h // 2 - 2, : w // 4 - 2], grey[h // 2 + 2 :, :]
            assert block.mean() > 230 and rest.mean() < 25, (short_side, name)
        if short_side is None:  # a clip shown as stored is stored as it came
            assert stored(out)["plain"].video == (videos / "plain.mp4").read_bytes()
