"""video_ens.data.encode, the one H.264 encoder: its options, a round trip through a decoder, its input checks."""

import io
from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")

from video_ens.data.encode import H264Settings, H264Writer, encode_h264  # noqa: E402


def test_settings_give_the_options_each_caller_used_before_the_merge():
    # The literal option dicts of the converter's re-encode and the demo encoder as they stood in tools/ (issue 15):
    # with the same options the same frames give the same bytes, so converted and demo data did not change.
    converter = H264Settings(crf=23, preset="medium", keyint=16, scenecut=False)
    assert converter.options() == {
        "crf": "23", "preset": "medium", "threads": "1", "x264-params": "keyint=16:min-keyint=16:scenecut=0"
    }  # fmt: skip
    demo = H264Settings(crf=20, preset="fast", keyint=16, mbtree=False)
    assert demo.options() == {
        "crf": "20", "preset": "fast", "threads": "1", "x264-params": "keyint=16:min-keyint=16:mbtree=0"
    }  # fmt: skip
    assert H264Settings().options() == {"crf": "23", "preset": "medium", "threads": "1"}  # x264's own GOP


def _moving(frames: int = 20, h: int = 32, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = (rng.integers(0, 4, (h // 8, w // 8, 3)) * 60).astype(np.uint8).repeat(8, 0).repeat(8, 1)  # blocks
    return np.stack([np.roll(base, 2 * t, axis=1) for t in range(frames)])  # (T, H, W, 3)


def test_round_trip_keyframes_and_repeatability():
    clip = _moving()
    data = encode_h264(clip, Fraction(25), H264Settings(keyint=8, scenecut=False, mbtree=False))
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 48, 32)
        assert stream.average_rate == 25
        keys = [p.is_keyframe for p in c.demux(stream) if p.size]
    assert [i for i, k in enumerate(keys) if k] == [0, 8, 16]  # a fixed GOP of 8
    with av.open(io.BytesIO(data)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape == clip.shape
    assert np.abs(decoded.astype(int) - clip.astype(int)).mean() < 6  # coding noise and yuv420p chroma only
    # mb-tree off: the same frames give the same bytes (the demo data's determinism rests on it)
    assert encode_h264(clip, 25, H264Settings(keyint=8, scenecut=False, mbtree=False)) == data


def test_writer_takes_yuv_frames_and_rejects_what_it_cannot_encode():
    clip = _moving(frames=4)
    writer = H264Writer(fps=10, width=48, height=32, settings=H264Settings(mbtree=False))
    for rgb in clip:
        writer.write(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p"))
    assert writer.count == 4
    # the same frames as arrays: the writer converts them the same way
    assert writer.finish() == encode_h264(clip, 10, H264Settings(mbtree=False))

    with pytest.raises(ValueError, match="even width and height >= 2, got 47x32"):
        H264Writer(fps=10, width=47, height=32, settings=H264Settings())
    writer = H264Writer(fps=10, width=48, height=32, settings=H264Settings())
    with pytest.raises(ValueError, match=r"expected uint8 \(32, 48, 3\) RGB, got uint8 \(32, 40, 3\)"):
        writer.write(clip[0, :, :40])
    with pytest.raises(ValueError, match="got rgb24 48x32: reformat it first"):
        writer.write(av.VideoFrame.from_ndarray(clip[0], format="rgb24"))
    writer.close()
    with pytest.raises(ValueError, match="T >= 1"):
        encode_h264(clip[:0], 10, H264Settings())
