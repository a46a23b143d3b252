"""The parts of prediction on raw files that need no trained run: `EnsembleNet.embed`, rotation metadata and sample
aspect ratio (video_ens.data.decode.read_display / apply_display), finding inputs, feature and image files, and the
streamed embeddings folder.

Expectations are independent of the code under test: forward's own output (embed must return it bit for bit), each
family's classifier applied by hand to the embedding, FFmpeg's command line (which rotates on its own, when
/usr/bin/ffmpeg exists) and numpy's rot90 on marker frames, schema.dequantize for quantized features, and a
physically rotated image for the EXIF orientation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clips import encode_clip

from video_ens import predict
from video_ens.config import dump_recipe, recipe_from_dict
from video_ens.data import schema
from video_ens.models import create_model
from video_ens.predict import EmbeddingWriter, InputError, Predictor, find_inputs, load_features, read_embeddings

av = pytest.importorskip("av")

from video_ens.data.decode import Display, apply_display, decode_frames, read_display  # noqa: E402

FFMPEG = shutil.which("ffmpeg")


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------------------
# EnsembleNet.embed


def _input(model: torch.nn.Module, batch: int = 3) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(1)
    spec = model.input_spec
    if spec["kind"] == "clip":
        return torch.randn(batch, 3, 16, 64, 64, generator=g), {}
    if spec["kind"] == "features":
        return torch.randn(batch, 9, spec["dim"], generator=g), {"lengths": torch.tensor([9, 4, 1][:batch])}
    return torch.randn(batch, 3, 64, 64, generator=g), {}


@pytest.mark.parametrize("name", ["s3dg_tiny_ens2", "resnet_tiny_ens2", "dbof_tiny_ens2"])
def test_embed_returns_forward_output_bit_for_bit_and_the_classifier_input(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x, kwargs = _input(model)
    with torch.no_grad():
        out = model(x, **kwargs)
        emb = model.embed(x, **kwargs)
        h = model.base(x, **kwargs)
    assert torch.equal(emb.output.branches, out.branches) and torch.equal(emb.output.ensemble, out.ensemble)
    n, b = model.num_branches, x.shape[0]
    assert emb.base.shape[0] == b and emb.base.dim() == 2 and emb.branches.shape[:2] == (n, b)
    # the base's pooled output: the mean over every axis after the channels, computed here from base(x)
    expected_base = h if h.dim() == 2 else h.mean(dim=tuple(range(2, h.dim())))
    torch.testing.assert_close(emb.base, expected_base, rtol=0, atol=0)
    # each branch's output is its classifier applied to the embedding: the embedding is the classifier's input
    for i, branch in enumerate(model.branches):
        f = emb.branches[i]
        with torch.no_grad():
            if name.startswith("s3dg"):  # Logits: a 1x1x1 conv, linear over channels, then a mean
                conv = branch.Logits.conv
                logits = F.linear(f, conv.weight.flatten(1), conv.bias)
                torch.testing.assert_close(logits, out.branches[i], rtol=1e-4, atol=1e-5)
            elif name.startswith("resnet"):
                assert torch.equal(branch.fc(f), out.branches[i])
            else:
                assert torch.equal(branch.moe(f), out.branches[i])


# --------------------------------------------------------------------------------------------------------------------
# Rotation metadata and sample aspect ratio

W, H = 64, 48


def _marker_frame(i: int = 0) -> np.ndarray:
    """Black, with a white block in the top-left corner and a grey one in the bottom-right: any turn or mirror moves
    them somewhere else."""
    a = np.zeros((H, W, 3), np.uint8)
    a[: H // 2, : W // 4] = 255
    a[-8:, -4:] = 128
    a[0, 0] = i  # frames differ
    return a


def _write(path: Path, *, frames=None, lossless=True, **metadata) -> Path:
    frames = frames if frames is not None else [_marker_frame(i) for i in range(2)]
    if lossless:  # x264 at qp 0 in 4:4:4: the decoded frames are the marker frames exactly
        return encode_clip(path, frames, rate=10, pix_fmt="yuv444p", options={"qp": "0"}, **metadata)
    return encode_clip(path, frames, rate=10, **metadata)


def _needs_display_rotation():
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip("this PyAV cannot write a display matrix (VideoStream.set_display_rotation: PyAV >= 18)")


# PyAV's set_display_rotation(degrees, hflip, vflip) -> (rotation, mirror) as FFmpeg's command line shows the
# picture (checked against it in the test when ffmpeg is installed): degrees count counter-clockwise; a vertical
# flip is a mirror plus a half turn.
ORIENTATIONS = {
    (0, False, False): (0, False),
    (90, False, False): (90, False),
    (180, False, False): (180, False),
    (270, False, False): (270, False),
    (-90, False, False): (270, False),
    (0, True, False): (0, True),
    (90, True, False): (90, True),
    (180, True, False): (180, True),
    (270, True, False): (270, True),
    (0, False, True): (180, True),
    (90, False, True): (270, True),
    (180, False, True): (0, True),
    (270, False, True): (90, True),
}


def test_display_matrices_turn_and_mirror_frames_as_ffmpeg_shows_them(tmp_path):
    _needs_display_rotation()
    for (degrees, hflip, vflip), (rotation, mirror) in ORIENTATIONS.items():
        path = _write(tmp_path / f"r{degrees}_{hflip:d}{vflip:d}.mp4", rotation=degrees, hflip=hflip, vflip=vflip)
        display = read_display(path)
        assert (display.rotation, display.mirror, display.sar) == (rotation, mirror, 1), (degrees, hflip, vflip)
        stored = decode_frames(path, [0, 1]).numpy()
        shown = apply_display(decode_frames(path, [0, 1]), display).numpy()
        expected = np.rot90(stored, rotation // 90, axes=(1, 2))  # counter-clockwise
        expected = expected[:, :, ::-1] if mirror else expected
        assert np.array_equal(shown, expected)
        assert display.size(W, H) == shown.shape[2:0:-1]
        if FFMPEG:
            raw = subprocess.run(
                [FFMPEG, "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                capture_output=True,
                check=True,
            ).stdout
            assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(shown[0].shape), shown[0])
    # the phone case by hand: stored landscape, the white top-left block ends up top-right after a clockwise turn
    shown = apply_display(decode_frames(tmp_path / "r-90_00.mp4", [0]), read_display(tmp_path / "r-90_00.mp4"))[0]
    assert shown.shape == (W, H, 3)
    assert shown[: W // 4, -H // 2 :].float().mean() > 250 and shown[: W // 4, : H // 2].float().mean() < 5


def test_the_rotate_tag_is_read_when_there_is_no_display_matrix(tmp_path):
    path = _write(tmp_path / "tagged.mkv", tag="90", fmt="matroska")  # Matroska keeps it as a tag "ROTATE"
    assert read_display(path) == Display(rotation=270)  # the tag counts clockwise
    assert read_display(_write(tmp_path / "plain.mp4")).identity


@pytest.mark.parametrize("sar,shown_size", [(Fraction(2), (48, 128)), (Fraction(1, 2), (96, 64))])
def test_non_square_pixels_are_resampled_without_dropping_stored_pixels(tmp_path, sar, shown_size):
    path = _write(tmp_path / "sar.mp4", sar=sar)
    display = read_display(path)
    assert display == Display(sar=sar) and display.size(W, H) == shown_size[::-1]
    shown = apply_display(decode_frames(path, [0]), display)[0].float().mean(-1)  # (H', W')
    assert tuple(shown.shape) == shown_size
    h, w = shown_size
    # the white block covered the top half and the left quarter: it still does, in the stretched picture
    assert shown[: h // 2 - 2, : w // 4 - 2].mean() > 250 and shown[h // 2 + 2 :, : w // 4 - 2].mean() < 5
    assert shown[: h // 2 - 2, w // 4 + 2 :].mean() < 5
    # frames the decoder already scaled keep their SAR: half the size, the same shape
    small = apply_display(decode_frames(path, [0], short_side=24), display)
    assert tuple(small.shape[1:3]) == (h // 2, w // 2)


def test_apply_display_takes_numpy_and_refuses_other_layouts():
    frames = np.stack([_marker_frame()])  # (1, H, W, 3)
    turned = apply_display(frames, Display(rotation=90))
    assert isinstance(turned, np.ndarray) and np.array_equal(turned, np.rot90(frames, 1, axes=(1, 2)))
    assert apply_display(frames, Display()) is not None
    with pytest.raises(ValueError, match=r"uint8 frames \(\.\.\., H, W, 3\)"):
        apply_display(frames.astype(np.float32), Display())


# --------------------------------------------------------------------------------------------------------------------
# Finding inputs


def test_find_inputs_walks_folders_reads_lists_and_names_what_is_missing(tmp_path):
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    (clips / ".hidden").mkdir()
    for name in ("b.mp4", "a.MKV", "notes.txt", "sub/c.webm", ".hidden/d.mp4", ".e.mp4"):
        (clips / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "odd.name").write_bytes(b"x")
    lst = tmp_path / "lists" / "more.txt"
    lst.parent.mkdir()
    lst.write_text("# my clips\n\n../clips/b.mp4\n../odd.name\nmissing.avi\n")
    found, missing = find_inputs([clips, tmp_path / "odd.name", lst, tmp_path / "empty", tmp_path / "nope.mp4"], "clip")
    assert found == [
        str(clips / "a.MKV"),
        str(clips / "b.mp4"),
        str(clips / "sub" / "c.webm"),
        str(tmp_path / "odd.name"),
    ]  # b.mp4 and odd.name again from the list: kept once
    assert [(Path(s.id).name, s.reason.split(" (")[0]) for s in missing] == [
        ("missing.avi", "no such file or folder"),
        ("empty", "no clip files"),
        ("nope.mp4", "no such file or folder"),
    ]
    images, _ = find_inputs([clips], "image")
    assert images == []
    with pytest.raises(ValueError, match="kind must be one of"):
        find_inputs([clips], "audio")


# --------------------------------------------------------------------------------------------------------------------
# Feature files, images and a small predictor per family


def test_feature_files_in_every_accepted_layout(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, size=(7, 1152), dtype=np.uint8)
    expected = schema.dequantize(q)  # (7, 1152) float32, as the loader dequantizes
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "f.npy", expected)
    np.savez(tmp_path / "z.npz", rgb=q[:, :1024], audio=q[:, 1024:])
    np.savez(tmp_path / "zf.npz", rgb=expected[:, :1024], audio=expected[:, 1024:])
    for name in ("q.npy", "f.npy", "z.npz", "zf.npz"):
        x = load_features(str(tmp_path / name), rgb_dim=1024, audio_dim=128, max_frames=5)
        assert x.shape == (1, 5, 1152) and x.dtype == torch.float32
        np.testing.assert_array_equal(x[0].numpy(), expected[:5])
    np.save(tmp_path / "bad.npy", q[:, :1000])
    bad = np.array(expected)
    bad[2, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    (tmp_path / "text.npy").write_text("not numpy")
    for name, message in (
        ("bad.npy", r"shape \(7, 1000\); expected .npy of shape \(T, 1152\)"),
        ("nan.npy", "NaN or inf"),
        ("text.npy", "not a readable feature file"),
    ):
        with pytest.raises(InputError, match=message) as e:
            load_features(str(tmp_path / name), rgb_dim=1024, audio_dim=128, max_frames=300)
        assert str(tmp_path / name) in str(e.value)


def _predictor(tmp_path: Path, model_name: str, data: dict, *, labels: list[str] | None = None) -> Predictor:
    """The model with random weights, as a run would have saved it; its recipe names datasets that do not exist."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model(model_name).eval()
    absent = {"train_shards": str(tmp_path / "absent"), "val_shards": str(tmp_path / "absent_val")}
    loss = "sigmoid_bce" if data["kind"] == "features" else "softmax_ce"
    recipe = {
        "model": {"name": model_name},
        "data": {**absent, **data},
        "objective": {"loss": loss},
        "train": {"precision": "fp32", "device": "cpu"},
    }
    dump_recipe(recipe_from_dict(recipe), tmp_path / "recipe.json")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "w.safetensors"),
        metadata={"model": model_name},
    )
    names = None
    if labels is not None:
        names = tmp_path / "names.txt"
        names.write_text("\n".join(labels) + "\n")
    return Predictor.load(recipe=tmp_path / "recipe.json", weights=tmp_path / "w.safetensors", labels=names)


def test_sigmoid_model_on_features_ensemble_is_the_mean_of_branch_scores(tmp_path):
    pred = _predictor(tmp_path, "dbof_tiny_ens2", {"kind": "features", "frames": 5})
    assert pred.class_names == [str(i) for i in range(16)] and pred.names_source == "class indices"
    q = np.random.default_rng(3).integers(0, 256, size=(11, 1152), dtype=np.uint8)
    np.save(tmp_path / "v.npy", q)
    result = pred.predict(str(tmp_path / "v.npy"), embed=True)
    # by hand: the model on the dequantized frames, all of them valid
    x = torch.from_numpy(schema.dequantize(q))[None]
    with torch.no_grad():
        out = pred.model(x, lengths=torch.tensor([11]))
    np.testing.assert_allclose(result.branches, out.branches[:, 0].double().numpy(), rtol=0, atol=1e-6)
    assert np.array_equal(result.ensemble, result.branches.mean(axis=0))
    assert abs(result.ensemble.sum() - 1) > 1e-3  # multi-label scores: no distribution over classes
    assert result.base.shape == (64,) and result.embeddings.shape == (2, 48)
    record = predict.prediction_record(result, pred.class_names, 16)
    for entry in record["ensemble"]:
        c = int(entry["label"])
        assert entry["score"] == pytest.approx((result.branches[0, c] + result.branches[1, c]) / 2, rel=1e-12)


def test_image_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    names = [f"pattern {i}" for i in range(10)]
    pred = _predictor(tmp_path, "resnet_tiny_ens2", {"kind": "image", "crop_size": 64}, labels=names)
    assert pred.names_source == str(tmp_path / "names.txt")
    rng = np.random.default_rng(5)
    upright = rng.integers(0, 256, size=(80, 100, 3), dtype=np.uint8)
    upright[:20, :30] = 255
    Image.fromarray(upright).save(tmp_path / "upright.png")
    # stored turned 90 degrees counter-clockwise, with EXIF orientation 6 ("turn 90 clockwise to show")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(tmp_path / "phone.png", exif=exif)
    a = pred.predict(str(tmp_path / "upright.png"))
    b = pred.predict(str(tmp_path / "phone.png"))
    np.testing.assert_array_equal(a.branches, b.branches)
    assert predict.format_text(a, names, 2).splitlines()[1].startswith("  ensemble  pattern ")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="broken.png: not a readable image"):
        pred.predict(str(tmp_path / "broken.png"))
    with pytest.raises(ValueError, match="3 class names, but the model predicts 10"):
        _predictor(tmp_path, "resnet_tiny_ens2", {"kind": "image", "crop_size": 64}, labels=["a", "b", "c"])


# --------------------------------------------------------------------------------------------------------------------
# Embeddings folder


def test_embeddings_stream_in_shards_through_atomic_writes_and_read_back(tmp_path, monkeypatch):
    writes: list[str] = []
    real = predict.write_atomic

    def recording(path, data):
        writes.append(Path(path).name)
        real(path, data)

    monkeypatch.setattr(predict, "write_atomic", recording)
    rng = np.random.default_rng(0)
    rows = [(f"v{i}.mp4", rng.standard_normal(6), rng.standard_normal((2, 4))) for i in range(5)]
    out = tmp_path / "emb"
    with EmbeddingWriter(out, shard_size=2, metadata={"model": "m"}) as w:
        for i, row in enumerate(rows):
            w.add(*row)
            # a full shard is on disk, and listed, as soon as it fills: nothing more than one shard is held
            index = json.loads((out / "index.json").read_text())
            assert index["num_inputs"] == 2 * ((i + 1) // 2) and index["complete"] is False
    got = read_embeddings(out)
    assert got["ids"] == [r[0] for r in rows]
    np.testing.assert_array_equal(got["base"], np.stack([r[1] for r in rows]).astype(np.float32))
    np.testing.assert_array_equal(got["branches"], np.stack([r[2] for r in rows], axis=1).astype(np.float32))
    index = got["index"]
    assert (
        index["complete"] and index["model"] == "m" and index["arrays"] == {"base": [6], "branch0": [4], "branch1": [4]}
    )
    assert [s["count"] for s in index["shards"]] == [2, 2, 1]
    # every file through write_atomic; each shard's arrays and ids before the index that lists it
    assert (
        writes[:5] == ["index.json", "000000.base.npy", "000000.branch0.npy", "000000.branch1.npy", "000000.ids.json"]
        and writes[5] == "index.json"
        and writes[-1] == "index.json"
    )
    assert set(p.name for p in out.iterdir()) == set(writes)
    shards = list(predict.iter_embedding_shards(out))
    assert isinstance(shards[0]["base"], np.memmap) and [len(s["ids"]) for s in shards] == [2, 2, 1]
    with pytest.raises(FileExistsError, match="not an empty folder"):
        EmbeddingWriter(out)

    # an error part way: the shards written stay readable, the index says the set is not complete
    with pytest.raises(RuntimeError, match="stop"), EmbeddingWriter(tmp_path / "cut", shard_size=2) as w:
        for row in rows[:3]:
            w.add(*row)
        raise RuntimeError("stop")
    cut = read_embeddings(tmp_path / "cut")
    assert cut["ids"] == ["v0.mp4", "v1.mp4", "v2.mp4"] and cut["index"]["complete"] is False
    other = EmbeddingWriter(tmp_path / "other")
    other.add("v8", np.zeros(6), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"v9: representations of shapes .* the earlier inputs' are"):
        other.add("v9", np.zeros(6), np.zeros((3, 4)))
