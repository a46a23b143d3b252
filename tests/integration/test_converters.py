"""Converter round trips: small raw inputs -> tools/convert_*.py -> tar members read back with tarfile + schema."""

import csv
import importlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from video_ens.data import schema
from video_ens.data import tfrecord as tfr

pytestmark = pytest.mark.integration

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name):
    if str(TOOLS) not in sys.path:  # also inherited by spawned workers, which import the tool by name
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


convert_kinetics = _tool("convert_kinetics")
convert_yt8m = _tool("convert_yt8m")
convert_images = _tool("convert_images")


def read_samples(folder) -> list[dict]:
    """Every sample of a dataset folder as {field: bytes}, in shard order, using only tarfile and _info.json."""
    out = []
    for path in schema.shard_paths(folder):
        with tarfile.open(path) as tf:
            by_key: dict[str, dict] = {}
            for member in tf.getmembers():
                key, _, field = member.name.partition(".")
                by_key.setdefault(key, {"__key__": key, "__url__": path})[field] = tf.extractfile(member).read()
        out += list(by_key.values())
    info = schema.read_info(folder)
    assert len(out) == info.num_samples
    return out


def _reasons(info) -> dict[str, str]:
    return {s["source"]: s["reason"] for s in info.skipped}


# ---------------------------------------------------------------------------------------------------------------
# Kinetics
# ---------------------------------------------------------------------------------------------------------------


def _frames(n, w=48, h=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 2 * i, axis=1) for i in range(n)]


def _mp4(path, frames, fps=12, size=(48, 32)):
    import av

    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.codec_context.thread_count = 1
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
        if not frames:
            c.start_encoding()  # a header, but no frames


@pytest.fixture(scope="module")
def kinetics_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics")
    videos = root / "videos"
    (videos / "jump").mkdir(parents=True)
    _mp4(videos / "aaa_000001_000011.mp4", _frames(10))
    _mp4(videos / "jump" / "bbb_000002_000012.mp4", _frames(7, seed=1), fps=25)  # per-class sub-folder
    _mp4(videos / "eee_000005_000015.mp4", _frames(9, seed=2))
    (videos / "ccc_000003_000013.mp4").write_bytes(os.urandom(3000))  # garbage
    _mp4(videos / "zzz_000000_000010.mp4", [])  # zero frames
    rows = [
        ["label", "youtube_id", "time_start", "time_end", "split", "is_cc"],
        ["run", "aaa", "1", "11", "train", "0"],
        ["jump", "bbb", "2", "12", "train", "0"],
        ["jump", "ccc", "3", "13", "train", "0"],
        ["run", "ddd", "4", "14", "train", "0"],  # missing file
        ["run", "zzz", "0", "10", "train", "0"],
        ["run", "../videos/aaa", "1", "11", "train", "0"],  # path escape through the id
        ["swim", "eee", "5", "15", "val", "0"],
    ]
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with open(root / "plain.csv", "w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["path", "label"],
                ["aaa_000001_000011.mp4", "2"],
                ["jump/bbb_000002_000012.mp4", "10"],
                ["../kinetics/videos/aaa_000001_000011.mp4", "2"],
                [str(videos / "aaa_000001_000011.mp4"), "2"],
                ["..\\videos\\aaa_000001_000011.mp4", "2"],
            ]
        )
    return root


def _convert(inputs, out, **kw):
    kw.setdefault("progress", False)
    return convert_kinetics.convert(videos=str(inputs / "videos"), out=str(out), **kw)


def test_kinetics_round_trip_and_skips(kinetics_inputs, tmp_path):
    root = kinetics_inputs
    info = _convert(root, tmp_path / "train", annotations=str(root / "train.csv"), split="train")
    assert info.kind == "video" and info.label_names == ["jump", "run"] and info.num_classes == 2
    samples = {s.video_id: s for s in map(schema.decode_video_sample, read_samples(tmp_path / "train"))}
    assert sorted(samples) == ["aaa_000001_000011", "bbb_000002_000012"]
    a, b = samples["aaa_000001_000011"], samples["bbb_000002_000012"]
    assert a.video == (root / "videos" / "aaa_000001_000011.mp4").read_bytes()  # stored as-is
    assert (a.label, a.fps, a.num_frames, a.width, a.height, a.container) == (1, 12.0, 10, 48, 32, "mp4")
    assert (b.label, b.fps, b.num_frames) == (0, 25.0, 7)

    reasons = _reasons(info)
    assert len(reasons) == 4, reasons
    by_id = {src.split("(")[1].rstrip(")"): r for src, r in reasons.items()}
    assert by_id["ccc"].startswith("unreadable")
    assert by_id["ddd"].startswith("missing")
    assert by_id["zzz"].startswith("no ") or by_id["zzz"].startswith("unreadable")
    assert "not a plain id" in by_id["../videos/aaa"]
    assert all(src.startswith("train.csv:") for src in reasons)


def test_kinetics_plain_csv_rejects_escaping_paths(kinetics_inputs, tmp_path):
    root = kinetics_inputs
    info = _convert(root, tmp_path / "p", annotations=str(root / "plain.csv"), seed=None)
    assert info.label_names == ["2", "10"]  # integer names sort numerically
    assert info.num_samples == 2
    escaped = [r for r in _reasons(info).values() if "absolute or contains '..'" in r]
    assert len(escaped) == 3
    first = schema.decode_video_sample(read_samples(tmp_path / "p")[0])
    assert first.video_id == "aaa_000001_000011" and first.label == 0  # --no-shuffle keeps CSV order


def test_kinetics_reencode_short_side_and_keyframes(kinetics_inputs, tmp_path):
    import av

    root = kinetics_inputs
    info = _convert(
        root, tmp_path / "r", annotations=str(root / "train.csv"), split="train", short_side=16, keyint=4, verify=True
    )
    assert info.num_samples == 2
    for s in map(schema.decode_video_sample, read_samples(tmp_path / "r")):
        assert (s.width, s.height) == (24, 16)  # 48x32 -> short side 16, aspect kept
        with av.open(io.BytesIO(s.video)) as c:
            keys = [f.key_frame for f in c.decode(video=0)]
        assert len(keys) == s.num_frames
        assert [i for i, k in enumerate(keys) if k] == list(range(0, s.num_frames, 4))


def test_kinetics_workers_give_identical_shards(kinetics_inputs, tmp_path):
    root = kinetics_inputs
    one = _convert(root, tmp_path / "w1" / "train", annotations=str(root / "train.csv"), split="train")
    two = _convert(root, tmp_path / "w2" / "train", annotations=str(root / "train.csv"), split="train", workers=2)
    assert [s.name for s in one.shards] == [s.name for s in two.shards]
    for s in one.shards:
        assert (tmp_path / "w1" / "train" / s.name).read_bytes() == (tmp_path / "w2" / "train" / s.name).read_bytes()


def test_kinetics_rerun_is_safe(kinetics_inputs, tmp_path, monkeypatch, capsys):
    root = kinetics_inputs
    out = tmp_path / "train"
    args = ["--annotations", str(root / "train.csv"), "--videos", str(root / "videos"), "--out", str(out)]
    assert convert_kinetics.main(args + ["--split", "train", "--workers", "1"]) == 0
    assert "2 samples" in capsys.readouterr().out
    before = (out / "_info.json").read_bytes()
    assert convert_kinetics.main(args + ["--workers", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err

    calls = []

    def flaky(task):
        calls.append(task)
        if len(calls) > 1:
            raise KeyboardInterrupt  # an interrupted run
        return real(task)

    real = convert_kinetics._load_clip
    monkeypatch.setattr(convert_kinetics, "_load_clip", flaky)
    with pytest.raises(KeyboardInterrupt):
        _convert(root, out, annotations=str(root / "train.csv"), overwrite=True)
    assert (out / "_info.json").read_bytes() == before  # the old dataset is intact
    assert sorted(os.listdir(tmp_path)) == ["train"]  # and no partial folder is left


def test_kinetics_val_reuses_train_labels(kinetics_inputs, tmp_path):
    root = kinetics_inputs
    _convert(root, tmp_path / "train", annotations=str(root / "train.csv"), split="train")
    info = _convert(
        root, tmp_path / "val", annotations=str(root / "train.csv"), split="val", labels=str(tmp_path / "train")
    )
    assert info.num_samples == 0 and info.label_names == ["jump", "run"]
    assert "not in the label map" in info.skipped[0]["reason"]


# ---------------------------------------------------------------------------------------------------------------
# YouTube-8M
# ---------------------------------------------------------------------------------------------------------------


def _video_record(vid, labels, t, seed, rgb_dim=1024):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (t, rgb_dim), dtype=np.uint8)
    audio = rng.integers(0, 256, (t, 128), dtype=np.uint8)
    payload = tfr.encode_sequence_example(
        {"id": tfr.bytes_feature([vid.encode()]), "labels": tfr.int64_feature(labels)},
        {
            "rgb": [tfr.bytes_feature([r.tobytes()]) for r in rgb],
            "audio": [tfr.bytes_feature([a.tobytes()]) for a in audio],
        },
    )
    return payload, (rgb, audio)


def _write_records(path, records):
    offsets = []
    with tfr.TFRecordWriter(path) as w:
        pos = 0
        for payload in records:
            offsets.append(pos)
            w.write(payload)
            pos += 16 + len(payload)
    return offsets


def test_yt8m_round_trip_with_corruption_and_bad_records(tmp_path):
    good = {f"vid{i}": _video_record(f"vid{i}", [i, 3861 - i], 3 + i, i) for i in range(6)}
    file_a = [good[f"vid{i}"][0] for i in range(3)]
    file_a.append(_video_record("wide", [1], 2, 9, rgb_dim=1000)[0])  # wrong frame size
    file_a.append(_video_record("range", [3862], 2, 9)[0])  # label out of range
    file_a.append(b"\x0b\x0c not protobuf")
    file_b = [good[f"vid{i}"][0] for i in range(3, 6)]
    offsets = _write_records(tmp_path / "train0000.tfrecord", file_a)
    offsets_b = _write_records(tmp_path / "train0001.tfrecord", file_b)
    # Flip one payload byte of vid4 (second record of file b).
    raw = bytearray((tmp_path / "train0001.tfrecord").read_bytes())
    raw[offsets_b[1] + 12 + 40] ^= 0xFF
    (tmp_path / "train0001.tfrecord").write_bytes(bytes(raw))

    infos = convert_yt8m.convert(
        inputs=[str(tmp_path / "train*.tfrecord")], out=str(tmp_path / "out"), shard_size=2, progress=False
    )
    info = infos["main"]
    assert info.kind == "yt8m" and info.num_classes == 3862 and info.label_names is None
    got = {s.video_id: s for s in (schema.decode_yt8m_sample(x) for x in read_samples(tmp_path / "out"))}
    assert sorted(got) == ["vid0", "vid1", "vid2", "vid3", "vid5"]
    for vid, s in got.items():
        _, (rgb, audio) = good[vid]
        np.testing.assert_array_equal(s.rgb, rgb)
        np.testing.assert_array_equal(s.audio, audio)
        i = int(vid[3:])
        assert s.labels.tolist() == sorted([i, 3861 - i])
    reasons = _reasons(info)
    assert reasons[f"train0001.tfrecord @ byte {offsets_b[1]}"].startswith("corrupt record: payload CRC")
    assert "1000" in reasons["train0000.tfrecord record 3"]
    assert "outside [0, 3862)" in reasons["train0000.tfrecord record 4"]
    assert "not a SequenceExample" in reasons["train0000.tfrecord record 5"]
    assert len(reasons) == 4 and offsets[0] == 0


def test_yt8m_holdout_is_deterministic_by_video_id(tmp_path):
    _write_records(tmp_path / "train0.tfrecord", [_video_record(f"t{i}", [1], 2, i)[0] for i in range(4)])
    ids = [f"v{i}" for i in range(30)]
    _write_records(tmp_path / "validate0.tfrecord", [_video_record(v, [2], 2, 0)[0] for v in ids])
    kw = dict(
        inputs=[str(tmp_path / "train0.tfrecord")],
        holdout_inputs=[str(tmp_path / "validate0.tfrecord")],
        holdout_fraction=0.3,
        num_classes=5,
        shard_size=8,
        progress=False,
    )
    infos = convert_yt8m.convert(out=str(tmp_path / "a" / "train"), holdout_out=str(tmp_path / "a" / "val"), **kw)
    held = {schema.decode_yt8m_sample(s, num_classes=5).video_id for s in read_samples(tmp_path / "a" / "val")}
    kept = {schema.decode_yt8m_sample(s, num_classes=5).video_id for s in read_samples(tmp_path / "a" / "train")}
    assert held == {v for v in ids if convert_yt8m.holdout_score(v) < 0.3}
    assert 0 < len(held) < len(ids)
    assert kept == {f"t{i}" for i in range(4)} | (set(ids) - held)
    assert infos["holdout"].num_samples == len(held) and infos["main"].num_samples == len(kept)
    # Same inputs, two workers: identical shard bytes.
    convert_yt8m.convert(out=str(tmp_path / "b" / "train"), holdout_out=str(tmp_path / "b" / "val"), workers=2, **kw)
    for split in ("train", "val"):
        a, b = schema.shard_paths(tmp_path / "a" / split), schema.shard_paths(tmp_path / "b" / split)
        assert [Path(p).read_bytes() for p in a] == [Path(p).read_bytes() for p in b]


def test_yt8m_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="holdout-out"):
        convert_yt8m.convert(inputs=[], holdout_inputs=["x"], holdout_fraction=0.1, out=str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        convert_yt8m.convert(inputs=[str(tmp_path / "*.tfrecord")], out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


def _image_bytes(fmt, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_images_round_trip(tmp_path):
    root = tmp_path / "tree"
    for cls in ("cat", "dog", ".hidden_class"):
        (root / cls / "nested").mkdir(parents=True)
    files = {
        "cat/a.png": _image_bytes("PNG", 0),
        "cat/nested/b.jpg": _image_bytes("JPEG", 1),
        "dog/c.JPEG": _image_bytes("PNG", 2),  # a PNG named .JPEG, as in ImageNet
        "dog/d.gif": _image_bytes("GIF", 3),
        "dog/truncated.png": _image_bytes("PNG", 4)[:60],
        "dog/notes.jpg": b"just some text, not an image",
        "dog/.DS_Store": b"\x00\x01",
        ".hidden_class/e.png": _image_bytes("PNG", 5),
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    info = convert_images.convert(root=str(root), out=str(tmp_path / "out"), shard_size=2, progress=False)
    assert info.kind == "image" and info.label_names == ["cat", "dog"]
    got = {}
    for raw in read_samples(tmp_path / "out"):
        s = schema.decode_image_sample(raw)
        got[json.loads(raw["json"])["source"]] = s
    assert sorted(got) == ["cat/a.png", "cat/nested/b.jpg", "dog/c.JPEG", "dog/d.gif"]
    for rel, s in got.items():
        assert s.image == files[rel]  # bytes kept as-is
        assert s.label == (0 if rel.startswith("cat") else 1)
    assert [got[r].format for r in sorted(got)] == ["png", "jpg", "png", "gif"]  # format from content, not name
    reasons = _reasons(info)
    assert sorted(reasons) == ["dog/notes.jpg", "dog/truncated.png"]
    assert all(r.startswith("unreadable") for r in reasons.values())
    assert [s.count for s in info.shards] == [2, 2]


def test_image_check_without_pillow(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    assert convert_images.check_image(b"\x89PNG\r\n\x1a\n....") == "png"
    assert convert_images.check_image(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    with pytest.raises(ValueError, match="not an image"):
        convert_images.check_image(b"hello")
