"""decode_frames must return exactly the frames a plain sequential PyAV decode yields, for every backend.

The clips are made here with PyAV's bundled libx264: B-frames with short GOPs, B-frames with one keyframe in 90
frames, a Matroska file (seeks by pts rather than mp4's dts), and a stream-copy trim whose mp4 edit list starts
between keyframes (its pre-roll packets are flagged discard and its header over-reports the frame count; decord 0.6
numbered its frames wrongly). Each frame carries its number in binary as black/white blocks on a moving gradient, so
an off-by-one frame can never compare equal.
"""

from __future__ import annotations

import multiprocessing
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from video_ens.data import decode  # noqa: E402
from video_ens.data.decode import DecodeError, decode_frames, probe, resized_size  # noqa: E402

BACKENDS = ["pyav", "decord", "torchcodec"]

# name -> (file name, frames, width, height, libx264 options). Sizes are even (yuv420p) but not multiples of 16,
# so the decoder's cropping of padded macroblocks is exercised.
CLIPS = {
    "bframes": ("bframes.mp4", 75, 64, 48, {"bf": "2", "g": "12"}),
    "sparse_keys": ("sparse_keys.mp4", 90, 66, 50, {"bf": "3", "g": "60", "keyint_min": "60", "sc_threshold": "0"}),
    "matroska": ("bframes.mkv", 40, 70, 42, {"bf": "2", "g": "16"}),
}

# name -> (file name, source clip, first second, seconds): `ffmpeg -ss START -i SOURCE -t SECONDS -c copy`, done with
# PyAV (see _trim). The source has a keyframe every 24 frames; the cut at 1.3 s (frame 39) keeps frames 24-38 as
# discarded pre-roll.
TRIMS = {"edit_list": ("edit_list.mp4", "gop24", 1.3, 1.5)}
TRIM_SOURCES = {"gop24": ("gop24.mp4", 90, 64, 48, {"bf": "2", "g": "24", "keyint_min": "24", "sc_threshold": "0"})}
ALL_CLIPS = [*CLIPS, *TRIMS]


def _frame_image(i: int, width: int, height: int) -> np.ndarray:
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = (x * 4 + i * 6) % 256  # moving texture, so the encoder makes P- and B-frames that differ
    image[..., 1] = (y * 5) % 256
    image[..., 2] = ((x + y) * 3 + i * 2) % 256
    for bit in range(7):  # the frame number in binary, 8x8 blocks along the top edge
        image[:8, bit * 8 : bit * 8 + 8] = 255 if (i >> bit) & 1 else 0
    return image


def _encode(path: Path, frames: int, width: int, height: int, options: dict[str, str]) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_frame_image(i, width, height), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _trim(source: Path, path: Path, start: float, seconds: float) -> None:
    """Copy the packets of `source` from the keyframe before `start` on, with timestamps shifted so that `start` is 0.

    What `ffmpeg -ss start -i source -t seconds -c copy path` does: the packets before `start` get negative times,
    so the mp4 muxer writes an edit list that starts at `start` and demuxers flag those packets discard.
    """
    with av.open(str(source)) as src, av.open(str(path), mode="w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        shift = int(start / stream.time_base)
        end = int((start + seconds) / stream.time_base)
        src.seek(shift, stream=stream, backward=True)
        for packet in src.demux(stream):
            if packet.dts is None:
                continue  # the flush packet
            if packet.is_keyframe and packet.pts >= end:
                break
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = out
            dst.mux(packet)


def _sequential(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The reference: every frame of a plain decode from the start, optionally scaled by PyAV's reformat."""
    with av.open(str(path)) as container:
        if size is None:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        width, height = size
        return np.stack(
            [
                f.reformat(width=width, height=height, format="rgb24", interpolation=decode.INTERPOLATION).to_ndarray()
                for f in container.decode(video=0)
            ]
        )


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    folder = tmp_path_factory.mktemp("clips")
    made = {}
    for name, (file_name, frames, width, height, options) in CLIPS.items():
        path = folder / file_name
        _encode(path, frames, width, height, options)
        made[name] = (path, _sequential(path))
    for name, (file_name, source_name, start, seconds) in TRIMS.items():
        source_file, frames, width, height, options = TRIM_SOURCES[source_name]
        _encode(folder / source_file, frames, width, height, options)
        _trim(folder / source_file, folder / file_name, start, seconds)
        made[name] = (folder / file_name, _sequential(folder / file_name))
    return made


def _backend(name: str) -> str:
    if name == "decord":
        pytest.importorskip("decord")
    if name == "torchcodec":
        try:
            import torchcodec.decoders  # noqa: F401
        except Exception as exc:  # ImportError, or a missing FFmpeg library
            pytest.skip(f"torchcodec not usable here: {exc}")
    return name


def _in_child(fn, *args, timeout: float = 20.0):
    """Run fn(*args) in a forked child and return ("ok", value) or ("error", type name, message).

    A decoder that spins in native code holding the GIL (dmlc/decord#373) cannot be interrupted by a signal
    handler or a thread; a separate process can be killed, so a hang fails this test instead of the whole run.
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def target():
        try:
            sender.send(("ok", fn(*args)))
        except BaseException as exc:
            sender.send(("error", type(exc).__name__, str(exc)))

    child = context.Process(target=target, daemon=True)
    child.start()
    got = receiver.recv() if receiver.poll(timeout) else None
    child.join(1.0)
    if child.is_alive():
        child.kill()
        child.join()
    assert got is not None, f"{fn.__name__}{args!r} did not finish within {timeout} s"
    return got


# --------------------------------------------------------------------------------------------------------------------
# The clips themselves


def _frame_number(image: np.ndarray) -> int:
    return sum(1 << bit for bit in range(7) if image[:8, bit * 8 : bit * 8 + 8].mean() > 127)


def test_clips_have_bframes_sparse_keys_and_distinct_frames(clips):
    for name, (path, frames) in clips.items():
        # Every frame differs from the next, so a decoder off by one frame cannot pass the comparisons below.
        assert all((frames[i] != frames[i + 1]).any() for i in range(len(frames) - 1)), name
        with av.open(str(path)) as container:
            packets = [p for p in container.demux(video=0) if p.size]
        pts = [p.pts for p in packets]
        assert pts != sorted(pts), f"{name}: no B-frames (decode order equals presentation order)"
        if name in CLIPS:
            assert len(frames) == CLIPS[name][1] == len(packets), name
            assert not any(p.is_discard for p in packets), name
        if name == "sparse_keys":
            assert sum(p.is_keyframe for p in packets) == 2  # frames 0 and 60
    # The trim: source frames 39-89 are shown, the pre-roll 24-38 is demuxed but discarded, and the header counts it.
    path, frames = clips["edit_list"]
    assert [_frame_number(f) for f in frames] == list(range(39, 90))
    with av.open(str(path)) as container:
        claimed = container.streams.video[0].frames
        packets = [p for p in container.demux(video=0) if p.size]
    assert sum(p.is_discard for p in packets) == 15 and len(packets) == claimed == 66
    assert probe(path).num_frames == len(frames) == 51


# --------------------------------------------------------------------------------------------------------------------
# Exact frames


@pytest.mark.filterwarnings("ignore:.*decoded with PyAV:RuntimeWarning")  # the edit-list clip; tested below
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("from_bytes", [False, True], ids=["path", "bytes"])
@pytest.mark.parametrize("clip", ALL_CLIPS)
def test_frames_equal_sequential_decode(clips, clip, backend, from_bytes):
    backend = _backend(backend)
    path, reference = clips[clip]
    src = path.read_bytes() if from_bytes else path
    n = len(reference)
    rng = random.Random(f"{clip}-{backend}")
    requests = [
        list(range(n)),  # everything, in order
        rng.sample(range(n), 12),  # random and unsorted
        [n - 1, 3, 3, n // 2, 3, 0],  # repeats, last frame first
        list(range(n - 20, n)),  # a late window: needs a seek past the first keyframe
        list(range(n // 2, n // 2 + 8)),  # a window in the middle
        [n - 2],  # one frame near the end
        list(range(0, n, 9)),  # spread over the video
    ]
    for indices in requests:
        got = decode_frames(src, indices, backend=backend)
        assert got.dtype == torch.uint8 and got.shape == (len(indices), *reference.shape[1:])
        assert np.array_equal(got.numpy(), reference[indices]), f"{clip} {backend} {indices}"


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
def test_other_backends_hand_edit_list_files_to_pyav(clips, backend, monkeypatch):
    # The bit-exact comparison above holds for the edit-list clip because PyAV decodes it; the other clips must still
    # go through the backend itself, or the comparison would prove nothing about it.
    backend = _backend(backend)
    handed = []
    real = decode._decode_pyav

    def recording(src, wanted, short_side, name, budget=None):
        if budget is None:  # handed over by another backend (a pyav decode passes its budget)
            handed.append(name)
        return real(src, wanted, short_side, name, budget)

    monkeypatch.setattr(decode, "_decode_pyav", recording)
    monkeypatch.setattr(decode, "_warned_fallback", False)
    for name in ALL_CLIPS:
        path, reference = clips[name]
        indices = [len(reference) - 1, 0]
        if name in TRIMS:
            with pytest.warns(RuntimeWarning, match=f"{path.name}.*15 packets are flagged discard.*backend='pyav'"):
                got = decode_frames(path, indices, backend=backend)
        else:
            got = decode_frames(path, indices, backend=backend)
        assert np.array_equal(got.numpy(), reference[indices]), name
    assert handed == [str(clips[name][0]) for name in TRIMS]
    # Scaled frames are PyAV's too, and the warning comes once per process, not once per sample.
    path, _ = clips["edit_list"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = decode_frames(path, [5, 40], short_side=32, backend=backend)
    assert np.array_equal(got.numpy(), decode_frames(path, [5, 40], short_side=32).numpy())


def test_decord_count_that_differs_from_pyav_hands_the_file_to_pyav(clips, monkeypatch):
    # decord numbers frames by its own packet table; when that disagrees with PyAV's count (here: forced), which
    # frame is which is unknown, so PyAV decodes the file.
    _backend("decord")
    path, reference = clips["bframes"]
    scan = decode._AvVideo.scan

    def one_more(self):
        table = scan(self)
        return decode._PacketTable(table.num_frames - 1, None, [], {}, 0)

    monkeypatch.setattr(decode._AvVideo, "scan", one_more)
    monkeypatch.setattr(decode, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match=f"decord counts {len(reference)} frames where a sequential decode yields"):
        got = decode_frames(path, [3, 1], backend="decord")
    assert np.array_equal(got.numpy(), reference[[3, 1]])


@pytest.mark.parametrize("clip", ALL_CLIPS)
def test_pyav_fallback_by_counting_gives_the_same_frames(clips, clip, monkeypatch):
    # Force the path taken when timestamps cannot be trusted: renumber by counting from the start.
    path, reference = clips[clip]

    def untrustworthy(*args, **kwargs):
        raise decode._Unreliable

    monkeypatch.setattr(decode, "_decode_seeking", untrustworthy)
    indices = [len(reference) - 1, len(reference) // 2, 40 % len(reference)]
    assert np.array_equal(decode_frames(path, indices).numpy(), reference[indices])


@pytest.mark.parametrize("clip", ALL_CLIPS)
def test_pyav_late_window_seeks_to_the_nearest_keyframe(clips, clip, monkeypatch):
    # Results are right even if a seek misses (the counting fallback catches it), so check the path and its cost.
    path, reference = clips[clip]
    n = len(reference)

    def no_counting(*args, **kwargs):
        raise AssertionError("fell back to counting from the start")

    decoded_packets = []
    packets = decode._AvVideo.packets

    def counted(self, budget):
        for packet in packets(self, budget):
            decoded_packets.append(packet)
            yield packet

    with av.open(str(path)) as container:
        demuxed = [p for p in container.demux(video=0) if p.size and not p.is_discard]  # the frames shown
    keyframes = sorted(sorted(p.pts for p in demuxed).index(p.pts) for p in demuxed if p.is_keyframe)
    indices = list(range(n - 6, n))
    nearest = max(k for k in keyframes if k <= indices[0])
    monkeypatch.setattr(decode, "_decode_counting", no_counting)
    with av.open(str(path)) as container:
        scan_packets = sum(1 for _ in container.demux(video=0))
    monkeypatch.setattr(decode._AvVideo, "packets", counted)
    assert np.array_equal(decode_frames(path, indices).numpy(), reference[indices])
    decoded = len(decoded_packets) - scan_packets
    # From the nearest keyframe to the end, plus the EOF flush packet.
    assert decoded <= n - nearest + 1, (decoded, nearest)


def test_segments_seek_only_across_keyframes():
    table = decode._PacketTable(num_frames=200, index_of={}, keyframes=[0, 60, 120], key_pts={})
    # From 5, keyframe 60 skips 55 frames: seek. 62 follows 61: decode on. 130 lies past keyframe 120: seek.
    assert decode._plan_segments(table, [5, 61, 62, 130]) == [(0, [5]), (60, [61, 62]), (120, [130])]
    # No keyframe between 70 and 110: decode on however far it is.
    assert decode._plan_segments(table, [70, 110]) == [(60, [70, 110])]
    # Keyframe 60 is within SEEK_COST_FRAMES of frame 55: decoding on is no dearer than seeking.
    assert decode._plan_segments(table, [55, 65]) == [(0, [55, 65])]


# --------------------------------------------------------------------------------------------------------------------
# Scaling inside the decoder


def _ffmpeg_nonref_kept(path: Path, keyframe_pts: int, first_pts: int) -> int:
    """Pictures FFmpeg's own decoder keeps between a keyframe and a later frame when told to skip non-reference
    ones (skip_frame NONREF): the independent count for the test below."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        container.seek(keyframe_pts, stream=stream, backward=True)
        kept = 0
        for packet in container.demux(stream):
            for frame in packet.decode():
                if frame.pts >= first_pts:
                    return kept
                kept += 1
    raise AssertionError("never reached the window")


@pytest.mark.parametrize("clip", ["sparse_keys", "bframes", "matroska"])
def test_pyav_leaves_out_unreferenced_pictures_before_a_window(clips, clip):
    """Before a late window only the pictures others predict from are decoded (FFmpeg's NONREF count), and the
    window's frames are still exactly the sequential decode's."""
    path, reference = clips[clip]
    n = len(reference)
    with av.open(str(path)) as container:
        pts = sorted(p.pts for p in container.demux(video=0) if p.size and not p.is_discard)
        keys = sorted(pts.index(p.pts) for p in av.open(str(path)).demux(video=0) if p.size and p.is_keyframe)
    keyframe = max(k for k in keys if k + 5 + 8 <= n)  # an 8-frame window 5 frames after it
    first = keyframe + 5
    assert first > decode.SEQUENTIAL_MAX_GAP  # a window the reader seeks to
    indices = list(range(first, first + 8))
    with decode.open_video(path) as reader:
        got = []
        reader.read(indices, lambda position, rgb: got.append(rgb.copy()))
        decoded = reader.frames_decoded
    assert np.array_equal(np.stack(got), reference[indices])
    kept = _ffmpeg_nonref_kept(path, pts[keyframe], pts[first])
    assert kept < first - keyframe  # the clip has unreferenced pictures there to leave out
    assert decoded == kept + len(indices)


@pytest.mark.parametrize("clip", ALL_CLIPS)
def test_pyav_short_side_equals_sequential_decode_then_reformat(clips, clip):
    path, reference = clips[clip]
    height, width = reference.shape[1:3]
    for short_side in (32, 37, 96):  # down, down to an odd size, up
        size = resized_size(width, height, short_side)
        assert min(size) == short_side
        expected = _sequential(path, size)
        indices = [len(reference) - 1, 0, 17, 17]
        got = decode_frames(path.read_bytes(), indices, short_side=short_side)
        assert got.shape == (4, size[1], size[0], 3)
        assert np.array_equal(got.numpy(), expected[indices])


@pytest.mark.parametrize("backend", ["decord", "torchcodec"])
@pytest.mark.parametrize("short_side", [32, 36])  # 66x50 -> 42x32, and 48x36 (a width decord 0.6 cannot copy out)
def test_other_backends_scale_to_the_same_shape_and_picture(clips, backend, short_side):
    backend = _backend(backend)
    path, _ = clips["sparse_keys"]
    indices = [70, 2, 45]
    pyav = decode_frames(path, indices, short_side=short_side).float()
    got = decode_frames(path, indices, short_side=short_side, backend=backend)
    assert got.shape == pyav.shape == (3, short_side, resized_size(66, 50, short_side)[0], 3)
    # Each library scales with its own filter (PyAV through swscale's bilinear, TorchCodec as antialiased bilinear
    # like F.interpolate): the same picture, not the same bytes. Mean differences measured on these clips were
    # 1.7-4.8 of 255 (the sharp-edged number blocks dominate).
    assert (got.float() - pyav).abs().mean() < 8


def test_resized_size_keeps_aspect():
    assert resized_size(340, 256, 128) == (170, 128)
    assert resized_size(256, 340, 128) == (128, 170)
    assert resized_size(66, 50, 37) == (49, 37)  # 48.84 rounds up
    assert resized_size(64, 48, None) == (64, 48)
    with pytest.raises(ValueError):
        resized_size(64, 48, 0)


# --------------------------------------------------------------------------------------------------------------------
# Failures: a clear DecodeError, never a hang


def _decode_outcome(src, indices, backend):
    try:
        return ("frames", decode_frames(src, indices, backend=backend).numpy())
    except DecodeError as exc:
        return ("DecodeError", str(exc))


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_past_the_end_raises(clips, backend):
    backend = _backend(backend)
    path, reference = clips["bframes"]
    n = len(reference)
    for src, name in ((path, str(path)), (path.read_bytes(), f"<bytes len {path.stat().st_size}>")):
        kind, value = _in_child(_decode_outcome, src, [0, n], backend)[1]
        assert kind == "DecodeError" and name in value and str(n) in value, value
    # The last real frame still decodes.
    assert np.array_equal(decode_frames(path, [n - 1], backend=backend).numpy(), reference[[n - 1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_bytes_raise(backend):
    backend = _backend(backend)
    garbage = bytes(random.Random(0).getrandbits(8) for _ in range(4096))
    kind, value = _in_child(_decode_outcome, garbage, [0], backend)[1]
    assert kind == "DecodeError" and "<bytes len 4096>" in value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("faststart", [False, True], ids=["moov_last", "moov_first"])
def test_truncated_file_raises_or_returns_true_frames(clips, tmp_path, backend, faststart):
    """The first half of a file: with the index at the end nothing opens; with it first, the early frames remain."""
    backend = _backend(backend)
    _, frames, width, height, options = CLIPS["bframes"]
    full = tmp_path / "full.mp4"
    with av.open(str(full), mode="w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        for i in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(_frame_image(i, width, height), format="rgb24")))
        container.mux(stream.encode())
    reference = _sequential(full)
    half = full.read_bytes()[: full.stat().st_size // 2]
    for indices in ([0, 1, 2], [5, 20], [frames - 1]):
        outcome = _in_child(_decode_outcome, half, indices, backend)
        assert outcome[0] == "ok", outcome  # any other exception type is a bug
        kind, value = outcome[1]
        if kind == "frames":
            assert np.array_equal(value, reference[indices]), indices
        else:
            assert f"<bytes len {len(half)}>" in value
    # Frame frames-1 lies in the missing half: it can never come back.
    assert _in_child(_decode_outcome, half, [frames - 1], backend)[1][0] == "DecodeError"


def _silence(container, rate: int = 16000) -> None:
    stream = container.add_stream("aac", rate=rate)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = rate
    container.mux(stream.encode(frame))
    container.mux(stream.encode())


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_stream_without_frames_raises(tmp_path, backend):
    backend = _backend(backend)
    empty = tmp_path / "empty.mkv"  # Matroska keeps a video track that never got a frame (mp4 drops it)
    with av.open(str(empty), mode="w") as container:
        video = container.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        _silence(container)
    for indices in ([0], [40]):
        kind, value = _in_child(_decode_outcome, empty, indices, backend)[1]
        assert kind == "DecodeError" and "empty.mkv" in value
    with pytest.raises(DecodeError, match="no frames"):
        probe(empty)


def test_missing_file_and_no_video_stream_raise(tmp_path):
    with pytest.raises(DecodeError, match="nothing.mp4"):
        decode_frames(tmp_path / "nothing.mp4", [0])
    audio = tmp_path / "audio.mkv"
    with av.open(str(audio), mode="w") as container:
        _silence(container)
    for call in (lambda: decode_frames(audio, [0]), lambda: probe(audio)):
        with pytest.raises(DecodeError, match="no video stream"):
            call()


def test_bad_requests_are_value_errors_not_decode_errors(clips):
    path, _ = clips["bframes"]
    for kwargs, message in (
        ({"indices": []}, "empty"),
        ({"indices": [-1]}, "negative"),
        ({"indices": [0], "backend": "opencv"}, "backend"),
    ):
        with pytest.raises(ValueError, match=message) as info:
            decode_frames(path, **kwargs)
        assert not isinstance(info.value, DecodeError)


# --------------------------------------------------------------------------------------------------------------------
# probe


@pytest.mark.parametrize("clip", ALL_CLIPS)
def test_probe_counts_frames(clips, clip):
    path, reference = clips[clip]
    for src in (path, path.read_bytes()):
        info = probe(src)
        assert info.num_frames == len(reference)
        assert info.fps == pytest.approx(30.0)
        assert (info.height, info.width) == reference.shape[1:3]
        assert info.duration == pytest.approx(len(reference) / 30.0, abs=0.05)


def test_decoders_are_imported_only_inside_functions():
    # Importing the module must work without av, decord or torchcodec installed (parsing beats a 5 s subprocess).
    import ast

    tree = ast.parse(Path(decode.__file__).read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"av", "decord", "torchcodec"}, top_level
