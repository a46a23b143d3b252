"""Sample layouts, typed decoding with clear errors, dequantize, and the atomic dataset writer."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

import video_ens
from video_ens.data import schema
from video_ens.data.writer import DatasetWriter, ShardSeries


def _as_read(sample: dict) -> dict:
    """A sample as a reader sees it: every field bytes, plus __key__."""
    return {k: (v.encode() if isinstance(v, str) and k != "__key__" else v) for k, v in sample.items()}


def _video(**over):
    kw = dict(
        key="00000003_abc", video=b"\x00\x00\x00\x20ftypisom", container="mp4", label=3, video_id="abc_000001_000011"
    )
    kw.update(fps=29.97, num_frames=300, width=340, height=256, source="x/abc.mp4")
    kw.update(over)
    return schema.encode_video_sample(**kw)


def _meta(**over) -> bytes:
    meta = json.loads(_video()["json"])
    meta.update(over)
    return json.dumps(meta).encode()


def _yt8m(t=5):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (t, 1024), dtype=np.uint8)
    audio = rng.integers(0, 256, (t, 128), dtype=np.uint8)
    return schema.encode_yt8m_sample(key="k1", video_id="Xy3a", rgb=rgb, audio=audio, labels=[4, 17, 3861]), rgb, audio


# ---------------------------------------------------------------------------------------------------------------
# Layouts and decoding
# ---------------------------------------------------------------------------------------------------------------


def test_video_round_trip():
    s = schema.decode_video_sample(_as_read(_video()))
    assert s == schema.VideoSample(
        key="00000003_abc",
        video=b"\x00\x00\x00\x20ftypisom",
        container="mp4",
        label=3,
        video_id="abc_000001_000011",
        fps=29.97,
        num_frames=300,
        width=340,
        height=256,
    )
    assert set(_video()) == {"__key__", "mp4", "cls", "json"}
    assert _video()["cls"] == b"3"


def test_yt8m_round_trip_uses_plain_npy():
    sample, rgb, audio = _yt8m()
    assert set(sample) == {"__key__", "rgb.npy", "audio.npy", "json"}
    # Loadable with pickling disabled: nothing in a shard is a pickle.
    assert np.load(io.BytesIO(sample["rgb.npy"]), allow_pickle=False).dtype == np.uint8
    s = schema.decode_yt8m_sample(_as_read(sample))
    np.testing.assert_array_equal(s.rgb, rgb)
    np.testing.assert_array_equal(s.audio, audio)
    assert s.labels.tolist() == [4, 17, 3861] and s.labels.dtype == np.int64
    assert s.video_id == "Xy3a" and s.num_frames == 5


def test_image_round_trip():
    sample = schema.encode_image_sample(
        key="k", image=b"\x89PNG\r\n\x1a\nrest", format="png", label=7, source="a/b.png"
    )
    s = schema.decode_image_sample(_as_read(sample))
    assert (s.image, s.format, s.label, s.key) == (b"\x89PNG\r\n\x1a\nrest", "png", 7, "k")
    assert schema.decode_sample("image", _as_read(sample)) == s


def test_same_sample_same_bytes():
    assert _video() == _video()
    assert _yt8m()[0] == _yt8m()[0]


@pytest.mark.parametrize(
    "edit, field, text",
    [
        (lambda s: s.pop("cls"), "cls", "missing"),
        (lambda s: s.update(cls=b"three"), "cls", "ASCII integer"),
        (lambda s: s.update(cls=b"-1"), "cls", "non-negative"),
        (lambda s: s.pop("mp4"), "mp4|webm|mkv|avi|mov", "missing"),
        (lambda s: s.update(webm=b"x"), "mp4|webm|mkv|avi|mov", "several"),
        (lambda s: s.update(json=b"{not json"), "json", "not valid"),
        (lambda s: s.update(json=b"[1]"), "json", "JSON object"),
        (lambda s: s.update(json=json.dumps({"video_id": "a", "fps": 3.0}).encode()), "json.num_frames", "missing"),
        (lambda s: s.update(json=_video(num_frames=0)["json"]), "json.num_frames", "positive"),
        (lambda s: s.update(json=_meta(fps="fast")), "json.fps", "expected"),
        (lambda s: s.update(mp4="decoded already"), "mp4", "raw bytes"),
    ],
)
def test_video_errors_name_key_and_field(edit, field, text):
    sample = _as_read(_video())
    sample["__url__"] = "shards/train-000004.tar"
    edit(sample)
    with pytest.raises(schema.SampleError) as info:
        schema.decode_video_sample(sample)
    err = info.value
    assert err.field == field and text in str(err)
    assert "00000003_abc" in str(err) and "train-000004.tar" in str(err)


def test_yt8m_errors_name_the_field():
    sample = _as_read(_yt8m()[0])
    bad = dict(sample, **{"rgb.npy": schema.npy_bytes(np.zeros((5, 1024), np.float32))})
    with pytest.raises(schema.SampleError, match=r"field 'rgb.npy'.*uint8 \(T, 1024\)"):
        schema.decode_yt8m_sample(bad)
    short = dict(sample, **{"audio.npy": schema.npy_bytes(np.zeros((4, 128), np.uint8))})
    with pytest.raises(schema.SampleError, match="'audio.npy'.*4 frames"):
        schema.decode_yt8m_sample(short)
    with pytest.raises(schema.SampleError) as info:
        schema.decode_yt8m_sample(sample, num_classes=100)
    assert info.value.field == "json.labels"
    # A pickled object array is refused on reading, and cannot be written at all.
    stream = io.BytesIO()
    np.save(stream, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(schema.SampleError, match="not a plain .npy"):
        schema.decode_yt8m_sample(dict(sample, **{"rgb.npy": stream.getvalue()}))
    with pytest.raises(TypeError, match="pickle"):
        schema.npy_bytes(np.array([None], dtype=object))


def test_encoders_check_their_inputs():
    with pytest.raises(ValueError, match="container"):
        _video(container="flv")
    with pytest.raises(ValueError, match="label"):
        _video(label=-2)
    with pytest.raises(ValueError, match="rgb must be uint8"):
        schema.encode_yt8m_sample(
            key="k", video_id="v", rgb=np.zeros((2, 1024)), audio=np.zeros((2, 128), np.uint8), labels=[]
        )


def test_make_key_is_a_safe_webdataset_key():
    key = schema.make_key(12, "../a.b/c d")
    assert key.startswith("00000012_") and "." not in key and "/" not in key and " " not in key
    assert schema.make_key(3) == "00000003"
    assert schema.make_key("0000100000002", "Xy3a") == "0000100000002_Xy3a"


# ---------------------------------------------------------------------------------------------------------------
# dequantize (google/youtube-8m utils.py: feat * (max-min)/255 + (max-min)/512 + min)
# ---------------------------------------------------------------------------------------------------------------


def test_dequantize_hand_computed():
    q = np.array([0, 1, 128, 255], dtype=np.uint8)
    # default range [-2, 2]: scalar 4/255, bias 4/512 - 2 = -1.9921875
    expected = np.array([-1.9921875, 4 / 255 - 1.9921875, 512 / 255 - 1.9921875, 2.0078125], dtype=np.float32)
    got = schema.dequantize(q)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # range [-1, 1]: scalar 2/255, bias 2/512 - 1 = -0.99609375
    np.testing.assert_allclose(schema.dequantize(q, 1.0, -1.0)[[0, 3]], [-0.99609375, 1.00390625], atol=1e-6)
    t = schema.dequantize(torch.tensor(q))
    assert t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError):
        schema.dequantize(q, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Dataset folders
# ---------------------------------------------------------------------------------------------------------------

CONVERTER = {"name": "test", "version": "0", "args": {}}


def _write_dataset(out, n=7, shard_size=3, **kw):
    with DatasetWriter(out, kind="video", converter=CONVERTER, shard_size=shard_size, **kw) as w:
        for i in range(n):
            w.write(_video(key=schema.make_key(i, f"v{i}"), label=i % 2))
        w.skip("bad.mp4", "unreadable: test")
        return w.commit(num_classes=2, label_names=["a", "b"], extra={"note": 1})


def _members(path):
    with tarfile.open(path) as tf:
        return [m.name for m in tf.getmembers()]


def test_writer_shards_counts_and_info(tmp_path):
    out = tmp_path / "train"
    info = _write_dataset(out)
    assert sorted(os.listdir(out)) == ["_info.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [(s.name, s.count) for s in info.shards] == [
        ("train-000000.tar", 3),
        ("train-000001.tar", 3),
        ("train-000002.tar", 1),
    ]
    assert _members(out / "train-000002.tar") == ["00000006_v6.cls", "00000006_v6.json", "00000006_v6.mp4"]
    on_disk = schema.read_info(out)
    assert on_disk == info
    raw = json.loads((out / "_info.json").read_text())
    assert raw["num_samples"] == 7 and raw["label_names"] == ["a", "b"] and raw["kind"] == "video"
    assert raw["skipped"] == [{"source": "bad.mp4", "reason": "unreadable: test"}]
    assert raw["converter"] == {**CONVERTER, "video_ens_version": video_ens.__version__}
    assert raw["extra"] == {"note": 1} and raw["format_version"] == 1
    assert schema.shard_paths(out) == [str(out / s.name) for s in info.shards]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no partial folder left


def test_writer_output_is_reproducible(tmp_path):
    _write_dataset(tmp_path / "a" / "train")
    _write_dataset(tmp_path / "b" / "train")
    for name in ("train-000000.tar", "train-000002.tar", "_info.json"):
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "b" / "train" / name).read_bytes()


def test_rerun_needs_overwrite_and_failure_keeps_the_old_dataset(tmp_path):
    out = tmp_path / "train"
    _write_dataset(out, n=4)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _write_dataset(out)
    # A run that fails half-way leaves the previous dataset untouched and no partial folder.
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(out, kind="video", converter=CONVERTER, shard_size=2, overwrite=True) as w:
            w.write(_video())
            raise RuntimeError("boom")
    assert schema.read_info(out).num_samples == 4
    assert sorted(os.listdir(tmp_path)) == ["train"]
    info = _write_dataset(out, n=5, overwrite=True)
    assert schema.read_info(out) == info and info.num_samples == 5
    assert len(os.listdir(out)) == 1 + len(info.shards)  # the old shards are gone
    assert sorted(os.listdir(tmp_path)) == ["train"]


def test_writer_without_commit_publishes_nothing(tmp_path):
    with DatasetWriter(tmp_path / "x", kind="image", converter=CONVERTER, shard_size=2) as w:
        w.write(schema.encode_image_sample(key="k", image=b"\xff\xd8\xff", format="jpg", label=0))
    assert os.listdir(tmp_path) == []


def test_writer_never_replaces_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a dataset"):
        _write_dataset(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert _write_dataset(tmp_path / "empty").num_samples == 7


def test_empty_dataset_has_no_shards(tmp_path):
    with DatasetWriter(tmp_path / "e", kind="yt8m", converter=CONVERTER, shard_size=2) as w:
        info = w.commit(num_classes=3862, label_names=None)
    assert info.num_samples == 0 and info.shards == [] and os.listdir(tmp_path / "e") == ["_info.json"]


def test_adopted_worker_shards_keep_their_order(tmp_path):
    with DatasetWriter(tmp_path / "d", kind="video", converter=CONVERTER, shard_size=2) as w:
        parts = []
        for part in range(2):
            series = ShardSeries(w.parts_dir, f"part{part}", shard_size=2)
            for i in range(3):
                series.write(_video(key=f"p{part}i{i}"))
            parts.append(series.close())
        w.write(_video(key="seq0"))
        w.add_shards(parts[1])
        w.add_shards(parts[0])
        info = w.commit(num_classes=4, label_names=None)
    assert [s.count for s in info.shards] == [1, 2, 1, 2, 1]
    firsts = [_members(tmp_path / "d" / s.name)[0].split(".")[0] for s in info.shards]
    assert firsts == ["seq0", "p1i0", "p1i2", "p0i0", "p0i2"]
    assert "_parts" not in os.listdir(tmp_path / "d")


def test_read_info_reports_problems(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a converted dataset"):
        schema.read_info(tmp_path)
    out = tmp_path / "d"
    _write_dataset(out)
    raw = json.loads((out / "_info.json").read_text())
    (out / "_info.json").write_text(json.dumps(dict(raw, num_samples=8)))
    with pytest.raises(ValueError, match="add up to 7"):
        schema.read_info(out)
    (out / "_info.json").write_text(json.dumps(dict(raw, format_version=99)))
    with pytest.raises(ValueError, match="reconvert"):
        schema.read_info(out)
    (out / "_info.json").write_text(json.dumps(raw))
    os.remove(out / "d-000001.tar")
    with pytest.raises(FileNotFoundError, match="d-000001.tar"):
        schema.read_info(out)


def test_label_names_from_file_or_dataset(tmp_path):
    (tmp_path / "names.txt").write_text("b\n\na\n")
    assert schema.load_label_names(tmp_path / "names.txt") == ["b", "a"]
    _write_dataset(tmp_path / "d")
    assert schema.load_label_names(tmp_path / "d") == ["a", "b"]
    assert schema.load_label_names(tmp_path / "d" / "_info.json") == ["a", "b"]
    (tmp_path / "dup.txt").write_text("a\na\n")
    with pytest.raises(ValueError, match="duplicate"):
        schema.load_label_names(tmp_path / "dup.txt")
    assert schema.sort_label_names(["10", "2", "1"]) == ["1", "2", "10"]
    assert schema.sort_label_names(["b", "a", "10"]) == ["10", "a", "b"]


def test_partial_folders_of_dead_writers_on_this_host_are_removed(tmp_path):
    """A conversion killed with SIGKILL leaves its hidden partial folder; the next one to the same name removes it
    when its process is gone, and leaves alone one of a live process, of another host, and of another dataset."""
    from video_ens.data import writer as writer_mod

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no process has now
    host = writer_mod._HOST
    keep = [
        f".train.partial-{host}-{os.getpid()}-x",
        f".train.partial-otherhost-{dead.pid}",
        f".val.partial-{host}-{dead.pid}",
    ]
    abandoned = tmp_path / f".train.partial-{host}-{dead.pid}"
    live = tmp_path / f".train.partial-{host}-{os.getppid()}"
    for name in [*keep, abandoned.name, live.name]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "train-000000.tar").write_bytes(b"half")
    _write_dataset(tmp_path / "train")
    assert sorted(os.listdir(tmp_path)) == sorted(["train", *keep, live.name])
