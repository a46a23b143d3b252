"""Converter round trips: small raw inputs -> video_ens.data.convert_* (and tools/convert_*.py, their command lines)
-> tar members read back with tarfile + schema."""

import builtins
import csv
import errno
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from launching import TOOLS, load_tool

from video_ens.data import convert_images, convert_kinetics, convert_yt8m, schema
from video_ens.data import tfrecord as tfr
from video_ens.data.decode import decode_frames
from video_ens.data.writer import map_surviving_crashes

pytestmark = pytest.mark.integration


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
        ["jump", "aaa", "1", "11", "val", "0"],
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
    assert load_tool("convert_kinetics").main(args + ["--split", "train", "--workers", "1"]) == 0
    assert "2 samples" in capsys.readouterr().out
    before = (out / "_info.json").read_bytes()
    assert load_tool("convert_kinetics").main(args + ["--workers", "1"]) == 2
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
    assert info.num_samples == 1 and info.label_names == ["jump", "run"]
    assert schema.decode_video_sample(read_samples(tmp_path / "val")[0]).label == 0  # train's index of "jump"
    assert len(info.skipped) == 1 and "swim" in info.skipped[0]["reason"]
    assert "not in the label map" in info.skipped[0]["reason"]


def _sequential_count(video: bytes) -> int:
    """Frames a plain PyAV decode from the start yields before it ends or breaks off: the count to store."""
    import av

    count = 0
    try:
        with av.open(io.BytesIO(video)) as c:
            for _ in c.decode(video=0):
                count += 1
    except av.error.FFmpegError:
        pass
    return count


def _stream_copy_trim(source, out, start, seconds, tool):
    """`ffmpeg -ss START -i SOURCE -t SECONDS -c copy OUT`, by the ffmpeg CLI or by the same remux in PyAV."""
    if tool == "ffmpeg":
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg is None:
            pytest.skip("no ffmpeg command on this machine")
        cmd = [ffmpeg, "-v", "error", "-y", "-ss", str(start), "-i", str(source), "-t", str(seconds), "-c", "copy"]
        subprocess.run([*cmd, str(out)], check=True, timeout=60)
        return
    import av

    # The packets from the keyframe before START on, shifted so START is time 0: the earlier ones get negative
    # times, and the mp4 muxer writes an edit list that makes demuxers flag them discard.
    with av.open(str(source)) as src, av.open(str(out), "w") as dst:
        stream = src.streams.video[0]
        copy = dst.add_stream_from_template(stream)
        shift, end = int(start / stream.time_base), int((start + seconds) / stream.time_base)
        src.seek(shift, stream=stream, backward=True)
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            if packet.is_keyframe and packet.pts >= end:
                break
            packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, copy
            dst.mux(packet)


@pytest.mark.parametrize("verify", [False, True], ids=["default", "verify"])
@pytest.mark.parametrize("tool", ["ffmpeg", "pyav"])
def test_kinetics_stores_the_frames_a_sequential_decode_yields(tmp_path, tool, verify):
    """Headers over-report: a stream-copy trim counts its discarded pre-roll, a truncated file its lost tail."""
    import av

    videos = tmp_path / "videos"
    videos.mkdir()
    source = tmp_path / "source.mp4"
    with av.open(str(source), "w") as c:  # B-frames, a keyframe every 24 frames
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.options = {"bf": "2", "g": "24", "keyint_min": "24", "sc_threshold": "0"}
        for f in _frames(120, seed=3):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    _stream_copy_trim(source, videos / "trim_000001_000003.mp4", 1.3, 2, tool)
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as c:  # the index first: a cut keeps it
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.options = {"bf": "2", "g": "12"}
        for f in _frames(60, seed=4):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    (videos / "half_000000_000002.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with open(tmp_path / "k.csv", "w", newline="") as f:
        csv.writer(f).writerows(
            [["label", "youtube_id", "time_start", "time_end"], ["a", "trim", 1, 3], ["b", "half", 0, 2]]
        )

    # The bug this guards against: both headers claim more frames than decode.
    for name in ("trim_000001_000003.mp4", "half_000000_000002.mp4"):
        with av.open(str(videos / name)) as c:
            claimed = c.streams.video[0].frames
        assert claimed > _sequential_count((videos / name).read_bytes()) > 0, name

    info = convert_kinetics.convert(
        annotations=str(tmp_path / "k.csv"),
        videos=str(videos),
        out=str(tmp_path / "out"),
        verify=verify,
        progress=False,
    )
    assert info.num_samples == 2 and info.skipped == []
    samples = {s.video_id: s for s in map(schema.decode_video_sample, read_samples(tmp_path / "out"))}
    for s in samples.values():
        expected = _sequential_count(s.video)
        assert s.num_frames == expected, (s.video_id, s.num_frames, expected)
        # The loader's decoder delivers the last stored frame, and nothing past it.
        assert decode_frames(s.video, [0, s.num_frames - 1]).shape[0] == 2
    # The truncated clip is kept with the frames that decode, and listed as shortened.
    shortened = info.extra["shortened"]
    assert [x["source"] for x in shortened] == ["k.csv:3 (half)"]
    assert shortened[0]["num_frames"] == samples["half_000000_000002"].num_frames
    assert "sequential decode yields" in shortened[0]["why"]


def test_kinetics_without_any_clip_fails_and_publishes_nothing(kinetics_inputs, tmp_path, capsys):
    root = kinetics_inputs
    with open(tmp_path / "gone.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label", "youtube_id", "time_start", "time_end"], ["run", "ddd", "4", "14"]])
    with pytest.raises(ValueError, match="no clip was converted") as err:
        _convert(root, tmp_path / "out", annotations=str(tmp_path / "gone.csv"))
    assert "gone.csv" in str(err.value) and "all 1 rows" in str(err.value) and "1 x missing" in str(err.value)
    args = [
        "--annotations",
        str(tmp_path / "gone.csv"),
        "--videos",
        str(root / "videos"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert load_tool("convert_kinetics").main(args + ["--workers", "1"]) == 2
    assert "no clip was converted" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["gone.csv"]  # no dataset and no partial folder


def test_kinetics_worker_crash_skips_that_clip_only():
    # signal.raise_signal as the work: SIGCHLD is ignored (the item succeeds, returning None), SIGKILL kills the worker
    # as a decoder crashing in native code would. A stdlib function, so spawned workers start without our imports.
    ok, dies = signal.SIGCHLD, signal.SIGKILL
    items = [ok, ok, dies, ok, ok, ok, ok, ok, ok, ok, ok, dies, ok, ok]  # the second crash lies past the first redo

    def crashed(item, why):
        return ("crashed", "BrokenProcessPool" in why)

    run = map_surviving_crashes
    got = list(run(signal.raise_signal, items, workers=2, chunksize=1, crashed=crashed))
    assert got == [("crashed", True) if item == dies else None for item in items]
    # Workers that die on every item are not one bad file: that still ends the conversion.
    with pytest.raises(RuntimeError, match="died on 3 items in a row"):
        list(run(signal.raise_signal, [dies, dies, dies, ok], workers=2, chunksize=1, crashed=crashed))


def test_kinetics_hung_decoder_skips_that_clip_after_the_timeout():
    """A decoder that hangs (not crashes) on one file held the conversion forever: `.result()` had no timeout.
    time.sleep as the work (stdlib, so spawned workers start fast): 3600 hangs, 0 returns at once."""
    items = [0, 0, 3600, 0, 0, 0]

    def crashed(item, why):
        return ("skipped", why)

    start = time.monotonic()
    got = list(map_surviving_crashes(time.sleep, items, workers=2, chunksize=1, crashed=crashed,
                                                       timeout=2))  # fmt: skip
    assert [g is None for g in got] == [item == 0 for item in items]
    assert got[2][0] == "skipped" and "--timeout 2 s" in got[2][1]
    assert time.monotonic() - start < 90


def test_a_hung_worker_ends_map_ordered_after_the_timeout_naming_it():
    from video_ens.data.writer import map_ordered

    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no result for 2 s.*--timeout"):
        list(map_ordered(time.sleep, [0, 3600, 0, 0], workers=2, timeout=2))
    assert time.monotonic() - start < 60  # the hung process was killed, not waited for by the pool's shutdown


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
    assert reasons[f"train0001.tfrecord record 1 @ byte {offsets_b[1]}"].startswith("corrupt record: payload CRC")
    assert "1000" in reasons["train0000.tfrecord record 3"]
    assert "outside [0, 3862)" in reasons["train0000.tfrecord record 4"]
    assert "not a SequenceExample" in reasons["train0000.tfrecord record 5"]
    assert len(reasons) == 4 and offsets[0] == 0


def test_yt8m_numbers_records_by_position_and_says_what_a_damaged_header_loses(tmp_path):
    a, b, c, d = (_video_record(v, [1], 2, i)[0] for i, v in enumerate("abcd"))
    wide = _video_record("wide", [1], 2, 9, rgb_dim=1000)[0]
    offsets = _write_records(tmp_path / "f.tfrecord", [a, b, wide, c])
    raw = bytearray((tmp_path / "f.tfrecord").read_bytes())
    raw[offsets[1] + 12 + 40] ^= 0xFF  # b's payload: CRC fails, the record is skipped, reading goes on
    (tmp_path / "f.tfrecord").write_bytes(bytes(raw))
    offsets_g = _write_records(tmp_path / "g.tfrecord", [d, b, c])
    raw = bytearray((tmp_path / "g.tfrecord").read_bytes())
    raw[offsets_g[1] + 2] ^= 0x40  # b's length: the framing is lost, and c with it
    (tmp_path / "g.tfrecord").write_bytes(bytes(raw))

    info = convert_yt8m.convert(inputs=[str(tmp_path / "*.tfrecord")], out=str(tmp_path / "out"), progress=False)[
        "main"
    ]
    assert sorted(schema.decode_yt8m_sample(x).video_id for x in read_samples(tmp_path / "out")) == ["a", "c", "d"]
    # Records are numbered by their position in the file, the damaged ones included: "wide" is record 2.
    assert [s["source"] for s in info.skipped] == [
        f"f.tfrecord record 1 @ byte {offsets[1]}",
        "f.tfrecord record 2",
        f"g.tfrecord record 1 @ byte {offsets_g[1]}",
    ]
    reasons = _reasons(info)
    assert "payload CRC" in reasons[f"f.tfrecord record 1 @ byte {offsets[1]}"]
    assert "1000" in reasons["f.tfrecord record 2"]
    lost = reasons[f"g.tfrecord record 1 @ byte {offsets_g[1]}"]
    remaining = (tmp_path / "g.tfrecord").stat().st_size - offsets_g[1]
    assert "length CRC" in lost and f"rest of the file ({remaining} bytes" in lost and "lost" in lost


def test_yt8m_without_any_video_fails_and_publishes_nothing(tmp_path, capsys):
    (tmp_path / "junk.tfrecord").write_bytes(bytes(range(256)) * 2)
    with pytest.raises(ValueError, match="no video was written") as err:
        convert_yt8m.convert(inputs=[str(tmp_path / "junk.tfrecord")], out=str(tmp_path / "out"), progress=False)
    assert "junk.tfrecord" in str(err.value) and "1 record(s) or file(s) skipped" in str(err.value)
    assert "length CRC mismatch" in str(err.value) and "512 bytes" in str(err.value)
    assert (
        load_tool("convert_yt8m").main(["--inputs", str(tmp_path / "junk.tfrecord"), "--out", str(tmp_path / "out")])
        == 2
    )
    assert "no video was written" in capsys.readouterr().err
    # A holdout that ends up empty fails too, and neither dataset is published.
    _write_records(tmp_path / "v.tfrecord", [_video_record("v0", [1], 2, 0)[0]])
    with pytest.raises(ValueError, match="holdout-fraction 0.0001"):
        convert_yt8m.convert(
            inputs=[],
            holdout_inputs=[str(tmp_path / "v.tfrecord")],
            holdout_fraction=0.0001,  # v0's score is 0.0095: it stays in the main dataset
            out=str(tmp_path / "main"),
            holdout_out=str(tmp_path / "held"),
            progress=False,
        )
    assert sorted(os.listdir(tmp_path)) == ["junk.tfrecord", "v.tfrecord"]


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


def test_images_without_any_image_fail_and_publish_nothing(tmp_path):
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "cat" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="no image was converted") as err:
        convert_images.convert(root=str(tmp_path / "tree"), out=str(tmp_path / "out"), progress=False)
    assert "all 1 files" in str(err.value) and "cat/a.jpg" in str(err.value)
    assert load_tool("convert_images").main(["--root", str(tmp_path / "tree"), "--out", str(tmp_path / "out")]) == 2
    assert sorted(os.listdir(tmp_path)) == ["tree"]


def test_image_check_without_pillow(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    assert convert_images.check_image(b"\x89PNG\r\n\x1a\n....") == "png"
    assert convert_images.check_image(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    with pytest.raises(ValueError, match="not an image"):
        convert_images.check_image(b"hello")


# ---------------------------------------------------------------------------------------------------------------
# Disk full: a failed write ends the conversion, naming the file; it is never a skipped input
# ---------------------------------------------------------------------------------------------------------------


def _run_tool_with_file_size_limit(tool: str, args: list[str], limit: int) -> subprocess.CompletedProcess:
    """Run tools/<tool>.py where writes past `limit` bytes fail with EFBIG (RLIMIT_FSIZE; Python ignores SIGXFSZ,
    so the write raises instead of the process dying), as on a disk that fills up mid-shard. Inputs are only read."""

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    cmd = [sys.executable, str(TOOLS / f"{tool}.py"), *args]
    return subprocess.run(cmd, preexec_fn=set_limit, capture_output=True, text=True, timeout=120)


def _assert_failed_naming_the_shard(proc, tool, shard_pattern):
    err = proc.stderr
    assert proc.returncode == 1, (proc.returncode, err)
    assert f"{tool}: error:" in err and "File too large" in err and "Traceback" not in err, err
    assert re.search(shard_pattern, err), err
    assert "unreadable" not in err and "nothing was published" in err, err


@pytest.mark.parametrize("workers", [1, 2])
def test_yt8m_disk_full_fails_naming_the_shard_and_publishes_nothing(tmp_path, workers):
    for f in range(2):
        # 40 frames: ~47 KB a video, so a shard of two outgrows the 64 KB limit while it is written
        _write_records(tmp_path / f"in{f}.tfrecord", [_video_record(f"v{f}{i}", [1], 40, i)[0] for i in range(3)])
    args = ["--inputs", str(tmp_path / "in*.tfrecord"), "--out", str(tmp_path / "out"), "--workers", str(workers)]
    proc = _run_tool_with_file_size_limit("convert_yt8m", [*args, "--shard-size", "2"], limit=64 * 1024)
    _assert_failed_naming_the_shard(proc, "convert_yt8m", r"/\.out\.partial-[^/]+/_parts/part000000-000000\.tar")
    assert sorted(os.listdir(tmp_path)) == ["in0.tfrecord", "in1.tfrecord"]  # no dataset, no partial folder


def test_yt8m_no_space_for_a_new_shard_is_not_an_unreadable_input(tmp_path, monkeypatch, capsys):
    """Issue 13's finding: ENOSPC creating a shard file was listed as "skipped: ... unreadable", with exit 0."""
    for f in range(2):
        _write_records(tmp_path / f"in{f}.tfrecord", [_video_record(f"v{f}{i}", [1], 2, i)[0] for i in range(3)])
    real_open = builtins.open

    def open_without_space(file, mode="r", *args, **kwargs):
        if str(file).endswith("-000001.tar") and "w" in mode:  # the second shard of a file's series
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_without_space)
    args = ["--inputs", str(tmp_path / "in*.tfrecord"), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert load_tool("convert_yt8m").main([*args, "--shard-size", "2"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "part000000-000001.tar" in err, err
    assert "unreadable" not in err and "nothing was published" in err, err
    assert sorted(os.listdir(tmp_path)) == ["in0.tfrecord", "in1.tfrecord"]


def test_yt8m_an_unreadable_input_is_still_a_skip(tmp_path, monkeypatch):
    """Reading errors stay skips: only writing a shard ends the conversion."""
    _write_records(tmp_path / "in0.tfrecord", [_video_record("v0", [1], 2, 0)[0]])
    _write_records(tmp_path / "in1.tfrecord", [_video_record("v1", [1], 2, 1)[0]])
    real_open = builtins.open

    def open_failing_in1(file, mode="r", *args, **kwargs):
        if str(file).endswith("in1.tfrecord"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_failing_in1)
    info = convert_yt8m.convert(inputs=[str(tmp_path / "in*.tfrecord")], out=str(tmp_path / "out"), progress=False)
    assert info["main"].num_samples == 1
    assert _reasons(info["main"])["in1.tfrecord"].startswith("unreadable: [Errno 5] Input/output error")


@pytest.mark.parametrize("tool", ["convert_images", "convert_kinetics"])
def test_disk_full_fails_naming_the_shard_and_publishes_nothing(tool, kinetics_inputs, tmp_path):
    if tool == "convert_images":
        for i in range(3):
            (tmp_path / "tree" / "cat").mkdir(parents=True, exist_ok=True)
            (tmp_path / "tree" / "cat" / f"{i}.png").write_bytes(_image_bytes("PNG", i))
        args = ["--root", str(tmp_path / "tree")]
    else:
        args = ["--annotations", str(kinetics_inputs / "train.csv"), "--videos", str(kinetics_inputs / "videos")]
    args += ["--out", str(tmp_path / "out"), "--workers", "1"]
    before = sorted(os.listdir(tmp_path))
    # A shard is written in 10 KB tar records, the first when it is closed: 4 KB fails there.
    proc = _run_tool_with_file_size_limit(tool, args, limit=4096)
    _assert_failed_naming_the_shard(proc, tool, r"/\.out\.partial-[^/]+/_seq0000-000000\.tar")
    assert sorted(os.listdir(tmp_path)) == before
