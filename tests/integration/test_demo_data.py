"""video_ens.data.demo (tools/make_demo_data.py) at small sizes: counts, _info.json, determinism, and the generators'
class signal."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from launching import load_tool

from video_ens.data import demo, schema

pytestmark = pytest.mark.integration


def _samples(folder):
    out = []
    for path in schema.shard_paths(folder):
        with tarfile.open(path) as tf:
            by_key = {}
            for m in tf.getmembers():
                key, _, field = m.name.partition(".")
                by_key.setdefault(key, {"__key__": key})[field] = tf.extractfile(m).read()
        out += list(by_key.values())
    return out


def _shard_bytes(folder):
    return [Path(p).read_bytes() for p in schema.shard_paths(folder)]


def _decoded(sample: schema.VideoSample) -> np.ndarray:
    import av

    with av.open(io.BytesIO(sample.video)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


KIN = dict(num_train=8, num_val=8, frames=8, size=32, shard_size=3)


def test_kinetics_demo(tmp_path):
    a = demo.make_kinetics(str(tmp_path / "a"), seed=3, **KIN)
    assert a["train"].num_samples == 8 and a["val"].num_samples == 8
    assert [s.count for s in a["train"].shards] == [3, 3, 2]
    info = schema.read_info(tmp_path / "a" / "train")
    assert info.kind == "video" and info.label_names == sorted(demo.MOTION_CLASSES) and not info.skipped
    assert info.extra["demo"]["seed"] == 3 and info.converter["name"] == "convert_kinetics"
    clips = sorted((schema.decode_video_sample(s) for s in _samples(tmp_path / "a" / "val")), key=lambda s: s.video_id)
    assert {info.label_names[c.label] for c in clips} == set(demo.MOTION_CLASSES)  # 8 val clips, one per class
    assert all((c.num_frames, c.width, c.height, c.fps) == (8, 32, 32, 16.0) for c in clips)

    # Same seed -> the same decoded frames (and, with one FFmpeg build, the same bytes).
    demo.make_kinetics(str(tmp_path / "b"), seed=3, **KIN)
    again = sorted((schema.decode_video_sample(s) for s in _samples(tmp_path / "b" / "val")), key=lambda s: s.video_id)
    for x, y in zip(clips, again, strict=True):
        np.testing.assert_array_equal(_decoded(x), _decoded(y))

    # A re-run with the same settings keeps the data; other settings need overwrite.
    stamp = (tmp_path / "a" / "train" / "_info.json").stat().st_mtime_ns
    demo.make_kinetics(str(tmp_path / "a"), seed=3, **KIN)
    assert (tmp_path / "a" / "train" / "_info.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="--overwrite"):
        demo.make_kinetics(str(tmp_path / "a"), seed=4, **KIN)


def test_motion_clip_is_a_pure_function_and_moves():
    clip = demo.render_motion_clip(0, "train", 5, demo.MOTION_CLASSES.index("move_right"), frames=12, size=48)
    assert clip.shape == (12, 48, 48, 3) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip, demo.render_motion_clip(0, "train", 5, 1, frames=12, size=48))
    assert np.abs(clip[-1].astype(int) - clip[0].astype(int)).mean() > 5  # something moved
    grow = demo.render_motion_clip(0, "train", 1, demo.MOTION_CLASSES.index("grow"), frames=12, size=48)
    assert not np.array_equal(grow, clip)


def test_yt8m_demo_is_byte_deterministic_and_labelled(tmp_path):
    kw = dict(num_train=12, num_validate=12, num_classes=6, shard_size=5)
    a = demo.make_yt8m(str(tmp_path / "a"), seed=1, **kw)
    assert a["train"].num_samples + a["val"].num_samples == 24
    assert 0 < a["val"].num_samples < 12
    info = schema.read_info(tmp_path / "a" / "val")
    assert info.kind == "yt8m" and info.num_classes == 6 and info.label_names[0] == "topic_00"
    for raw in _samples(tmp_path / "a" / "train"):
        s = schema.decode_yt8m_sample(raw, num_classes=6)
        assert 10 <= s.num_frames <= 60 and 1 <= len(s.labels) <= 3
    demo.make_yt8m(str(tmp_path / "b"), seed=1, **kw)
    for split in ("train", "val"):
        assert _shard_bytes(tmp_path / "a" / split) == _shard_bytes(tmp_path / "b" / split)


def test_yt8m_labels_are_decodable_from_features():
    """Projecting a video's mean features on each class pattern ranks a true label first in most videos."""
    patterns = demo._class_patterns(0, 16)
    hits = 0
    for i in range(40):
        _, labels, rgb, audio = demo.render_yt8m_video(0, "train", i, patterns)
        mean = schema.dequantize(rgb).mean(0)
        hits += int(np.argmax(patterns[0] @ mean) in labels)
    assert hits >= 24  # chance is about 1.7/16 of 40, i.e. ~4


def test_images_demo_is_byte_deterministic(tmp_path):
    kw = dict(num_train=20, num_val=10, shard_size=8)
    a = demo.make_images(str(tmp_path / "a"), seed=2, **kw)
    assert (a["train"].num_samples, a["val"].num_samples) == (20, 10)
    formats = {schema.decode_image_sample(s).format for s in _samples(tmp_path / "a" / "train")}
    assert formats == {"png", "jpg"}
    assert schema.read_info(tmp_path / "a" / "val").label_names == list(demo.PATTERN_CLASSES)
    demo.make_images(str(tmp_path / "b"), seed=2, **kw)
    for split in ("train", "val"):
        assert _shard_bytes(tmp_path / "a" / split) == _shard_bytes(tmp_path / "b" / split)


def test_cli_writes_the_folder_layout(tmp_path, capsys):
    cli = load_tool("make_demo_data")
    assert cli.main(["--out", str(tmp_path), "--kind", "images", "--workers", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["train", "val"]
    assert (tmp_path / "images" / "train" / "_info.json").is_file()
    assert "500 samples" in capsys.readouterr().out
