"""Decode chosen frames of one video into a uint8 tensor, exactly the frames a sequential decode yields.

`decode_frames(src, indices)` returns (T, H, W, 3) uint8 RGB frames for frame indices given in any order (repeats
allowed), from a path or from the encoded bytes held in a shard. "Frame i" always means the i-th frame that
`container.decode(video=0)` yields from the start of the file, B-frames and sparse keyframes included; the tests
hold every backend to that, bit-exactly at native resolution.

Backends:
- "pyav" (default): the fastest here, on real clips (environment.md: 1862 f/s for a 64-frame window at 340x256,
  decord 1214) and on synthetic ones (benchmarks/results/loader_vm_2026-11-27.csv: 2617 f/s, TorchCodec 2143,
  decord 1439). Decodes single-threaded: decoder threads give nothing on 2 cores, and automatic threading inside
  DataLoader workers oversubscribes cores (and once deadlocked a worker, NVIDIA-TAO/tao-pytorch#109). Parallelise
  with workers instead.
- "decord": kept for comparison. Indices are checked against a PyAV demux pass (`probe`'s count) before `get_batch`,
  which spins forever holding the GIL when asked for a frame past the real end (dmlc/decord#373). That guards
  over-reported headers only: `get_batch` has also hung on files whose packets all exist (dmlc/decord#375), so a
  loader using decord still needs a per-sample timeout in a killable process.
- "torchcodec": used only if importable (0.13 runs on CPU with Debian's FFmpeg libraries; >= 0.14 on PyPI needs CUDA).

decord and TorchCodec number frames by their own packet tables, which can disagree with a sequential decode. decord
0.6 counts the packets an mp4 edit list marks as discard (the pre-roll of a stream-copy trim such as
`ffmpeg -ss 1.3 -i a.mp4 -t 2 -c copy b.mp4`): on such a clip with 9 discarded packets, its frame 50 was sequential
frame 41, silently. TorchCodec skips those packets in its index but once sought the wrong keyframe because of them
(meta-pytorch/torchcodec#1504). So both backends first demux the file with PyAV and hand the file to PyAV instead
when it has discard-flagged packets or when the backend's own frame count differs from PyAV's. The frames are then
right, only decoded by PyAV; the first such file in a process raises one RuntimeWarning naming it. A fallback rather
than a DecodeError: the loader would otherwise skip every trimmed clip, and with it a slice of the dataset that
decodes perfectly well. The extra demux pass costs about 2 ms a call on a 10 s 340x256 clip (decord, best of 25:
a 64-frame window 41 -> 43 ms, one frame 4.5 -> 6.6 ms).

Frames come as stored: `read_display` reads a video's rotation metadata and sample aspect ratio and `apply_display`
turns stored frames into the picture a player shows (tools/predict.py and the Kinetics converter apply them).

Every failure to deliver the requested frames (unreadable or truncated file, no video stream, zero frames, an index
past the end) raises `DecodeError`, which names the source and the reason; the loader turns it into a skipped
sample. Every decode loop carries a packet budget, so a pathological file ends in an error, never in a hang.

Heavy imports (av, decord, torchcodec) happen inside functions, so importing this module needs none of them.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Union

import numpy as np
import torch

BACKENDS = ("pyav", "decord", "torchcodec")

# swscale's bilinear widens its filter to cover the source footprint when it downscales, so it does not alias the
# way a 2-tap bilinear would; it is also the scaler PyAV uses when asked for nothing else.
INTERPOLATION = "BILINEAR"

# Seeking to a keyframe instead of decoding on from the last delivered frame pays off only if it skips more frames
# than a seek costs. A seek flushes the decoder and restarts on an intra frame; measured on 340x256 H.264, seek plus
# the first frame cost 4.5 inter frames on smooth content (0.64 ms against 0.14 ms) and 15 on noisy content (5.2 ms
# against 0.35 ms).
SEEK_COST_FRAMES = 8

# When every gap between wanted frames (and from frame 0 to the first) is at most this, decode straight through from
# the start: no seek could save more than gap - SEEK_COST_FRAMES frames, which does not repay the packet scan that
# planning seeks needs (0.9 ms per 300 packets, 3-6 frames of decoding). Counting also needs no timestamps at all.
SEQUENTIAL_MAX_GAP = 2 * SEEK_COST_FRAMES

# Frames a decoder may hold back (B-frame reordering) or emit before a keyframe (open-GOP leading frames) after a
# seek; H.264 allows at most 16 reference frames, so 64 is generous. Only bounds a loop, never changes a result.
REORDER_SLACK = 64

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


def backend_version(backend: str) -> str | None:
    """The version of a BACKENDS decoder, or None when it cannot be used here (not installed, or TorchCodec without
    the FFmpeg libraries it loads on import)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown decoder backend {backend!r}: one of {BACKENDS}")
    try:
        if backend == "pyav":
            import av

            return av.__version__
        if backend == "decord":
            import decord

            return decord.__version__
        import torchcodec
        import torchcodec.decoders  # noqa: F401  (loads its FFmpeg libraries: fails without them)

        return torchcodec.__version__
    except Exception:
        return None


@dataclass(frozen=True)
class Budget:
    """What one decode may allocate, checked from the stream's header before decoding: pixels of one frame (as coded,
    and after scaling to a short side) and pixels of the frames one call returns. The defaults are the recipe's
    (`data.max_frame_pixels`, `data.max_clip_pixels`): 4K frames, 2^28 pixels (768 MiB of RGB)."""

    frame_pixels: int = 4096 * 2304
    clip_pixels: int = 1 << 28

    def check_frame(self, name: str, width: int, height: int, what: str = "frames") -> None:
        if width * height > self.frame_pixels:
            raise DecodeError(
                f"{name}: {what} of {width}x{height} ({width * height:,} pixels) are over the budget of "
                f"{self.frame_pixels:,} pixels a frame (data.max_frame_pixels)"
            )

    def check_clip(self, name: str, frames: int, width: int, height: int) -> None:
        self.check_frame(name, width, height)
        if frames * width * height > self.clip_pixels:
            raise DecodeError(
                f"{name}: {frames} frames of {width}x{height} ({frames * width * height:,} pixels) are over the "
                f"budget of {self.clip_pixels:,} pixels a clip (data.max_clip_pixels)"
            )


class DecodeError(ValueError):
    """A video could not deliver the requested frames. The message names the source and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns about a video's first video stream.

    num_frames: video packets demuxed, which for an intact file is the number of frames a sequential decode yields
        (not the container's claim). A damaged tail can hold packets that no longer decode; decode_frames then
        raises DecodeError for those indices.
    fps: average frame rate; 0.0 when the container states none.
    width, height: coded picture size in pixels (sample aspect ratio and rotation metadata are not applied:
        see `read_display`).
    duration: seconds; from the stream, else the container, else num_frames / fps.
    """

    num_frames: int
    fps: float
    width: int
    height: int
    duration: float


def describe_source(src: Source) -> str:
    """A short name for error messages: the path, or `<bytes len N>` for encoded bytes."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<bytes len {memoryview(src).nbytes}>"
    return os.fspath(src)


def resized_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to `short_side`, keeping the aspect ratio (rounded half up)."""
    if short_side is None:
        return width, height
    if short_side <= 0:
        raise ValueError(f"short_side must be a positive number of pixels or None, got {short_side}")
    if width <= height:
        return short_side, max(1, int(height * short_side / width + 0.5))
    return max(1, int(width * short_side / height + 0.5)), short_side


def decode_frames(
    src: Source,
    indices: Sequence[int],
    *,
    short_side: int | None = None,
    backend: str = "pyav",
    budget: Budget = Budget(),
) -> torch.Tensor:
    """Frames `indices` of `src` as a (T, H, W, 3) uint8 RGB tensor, in the order given (T = len(indices)).

    src: a path, or the encoded bytes of a whole video file (as stored in a shard).
    indices: frame numbers counted from 0 in presentation order; any order, repeats allowed.
    short_side: scale so the shorter side has this many pixels (aspect kept), inside the decoder: scaling there is
        3-9x cheaper than decoding at full size and calling F.interpolate afterwards (environment.md).
    backend: "pyav", "decord" or "torchcodec".
    budget: the most pixels a frame and the returned frames may have; checked from the header before decoding.

    Raises DecodeError when the video cannot deliver the frames or is over the budget, ValueError for a bad request
    (negative index, empty `indices`, unknown backend).
    """
    wanted = _check_request(indices, backend)
    name = describe_source(src)
    if backend == "pyav":
        frames = _decode_pyav(src, wanted, short_side, name, budget)
    else:
        with BatchReader(src, backend=backend, budget=budget) as reader:  # the size from the header, checked
            budget.check_clip(name, len(wanted), *resized_size(reader.width, reader.height, short_side))
        decode = _decode_decord if backend == "decord" else _decode_torchcodec
        frames = decode(src, wanted, short_side, name)
    # frames holds each distinct index once, ascending; expand to the caller's order and repeats.
    requested = [int(i) for i in indices]
    if requested != wanted:
        position = {index: k for k, index in enumerate(wanted)}
        frames = frames[np.array([position[i] for i in requested])]
    return torch.from_numpy(frames)


def open_video(src: Source, *, backend: str = "pyav", budget: Budget = Budget()) -> VideoReader | BatchReader:
    """A reader of `src` for `backend` with VideoReader's interface (width, height, decode_start, read,
    frames_decoded, close). Raises DecodeError when the video does not open or its frames are over the budget."""
    _check_request([0], backend)
    if backend == "pyav":
        return VideoReader(src, budget=budget)
    return BatchReader(src, backend=backend, budget=budget)


class BatchReader:
    """decord or TorchCodec behind VideoReader's interface. They hand back all requested frames from one call, so
    no frame comes for free before a window (decode_start(first) is first), and frames_decoded counts the frames
    delivered (their own reference decoding is not visible)."""

    def __init__(self, src: Source, *, backend: str, budget: Budget = Budget()):
        self.src, self.backend, self.name = src, backend, describe_source(src)
        with _AvVideo(src, self.name) as video:  # the size, and a DecodeError for a file that does not open
            self.width, self.height = video.width, video.height
        budget.check_frame(self.name, self.width, self.height, "coded frames")
        self.budget = budget
        self.frames_decoded = 0

    def decode_start(self, first: int) -> int:
        return first

    def read(self, wanted: Sequence[int], sink: FrameSink, *, short_side: int | None = None) -> None:
        wanted = list(wanted)
        self.budget.check_clip(self.name, len(wanted), *resized_size(self.width, self.height, short_side))
        decode = _decode_decord if self.backend == "decord" else _decode_torchcodec
        frames = decode(self.src, wanted, short_side, self.name)
        self.frames_decoded += len(wanted)
        for position, frame in enumerate(frames):
            sink(position, frame)

    def close(self) -> None:
        pass

    def __enter__(self) -> BatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe(src: Source) -> VideoInfo:
    """Frame count, rate, size and duration of the first video stream of `src`.

    The count comes from demuxing every packet (0.9 ms for 300 packets of 340x256 H.264), not from the container
    header: headers over-report (dmlc/decord#373 saw 431 claimed for 300 decodable frames) and truncated files keep
    their old claim.
    """
    name = describe_source(src)
    with _AvVideo(src, name) as video:
        table = video.scan()
        if table.num_frames == 0:
            raise DecodeError(f"{name}: the video stream holds no frames")
        stream = video.stream
        fps = _stream_fps(stream)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif video.container.duration is not None:
            duration = video.container.duration / 1_000_000  # container duration is in AV_TIME_BASE (microseconds)
        else:
            duration = table.num_frames / fps if fps > 0 else 0.0
        return VideoInfo(table.num_frames, fps, video.width, video.height, duration)


# --------------------------------------------------------------------------------------------------------------------
# How a picture is meant to be shown: rotation metadata and the sample aspect ratio


@dataclass(frozen=True)
class Display:
    """How the stored pictures of a video are meant to be shown (`read_display`); `apply_display` shows them so.

    rotation: degrees the picture turns counter-clockwise for display: 0, 90, 180 or 270. This is FFmpeg's
        av_display_rotation_get and PyAV's VideoFrame.rotation, modulo 360; a phone held upright usually stores
        landscape frames with 270 (the old "rotate" tag's 90, which counts clockwise). `ffmpeg -i` applies it.
    mirror: after the rotation, the picture is mirrored left-right (a display matrix with a negative determinant).
    sar: sample aspect ratio, the width of a stored pixel over its height: 1 for square pixels; anamorphic DVD and
        DV video store 720 x 576 frames with 16/15 or 64/45. `ffmpeg -i` does not resample it; players do.
    """

    rotation: int = 0
    mirror: bool = False
    sar: Fraction = Fraction(1)

    @property
    def identity(self) -> bool:
        return self.rotation == 0 and not self.mirror and self.sar == 1

    def square_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a stored width x height picture resampled to square pixels, before the rotation: the
        SAR stretches the width when above 1 and the height when below, so no stored pixel is dropped."""
        if self.sar > 1:
            return max(1, round(width * self.sar)), height
        if self.sar < 1:
            return width, max(1, round(height / self.sar))
        return width, height

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the displayed picture of a stored width x height one: square pixels, then rotated."""
        w, h = self.square_size(width, height)
        return (h, w) if self.rotation in (90, 270) else (w, h)


def _orientation(matrix: Sequence[int], name: str) -> tuple[int, bool]:
    """(rotation, mirror) of an FFmpeg display matrix (9 int32, a b u / c d v / x y w; a b c d in 16.16 fixed point).

    FFmpeg maps a stored pixel (p, q) (column, row) to p' = a p + c q, q' = b p + d q (libavutil/display.h). Only
    axis-aligned matrices (multiples of 90 degrees, scaling ignored) are accepted; the one of the eight rotations and
    mirrors that moves the pixels of a small grid the way the matrix does is returned.
    """
    a, b, c, d = (float(matrix[i]) / 65536.0 for i in (0, 1, 3, 4))
    scale = max(abs(a), abs(b), abs(c), abs(d))
    if scale == 0 or not (max(abs(b), abs(c)) < 1e-3 * scale or max(abs(a), abs(d)) < 1e-3 * scale):
        angle = math.degrees(math.atan2(b, a)) if scale else float("nan")
        raise DecodeError(
            f"{name}: the display matrix turns the picture by {-angle:.1f} degrees; only multiples "
            "of 90 are applied (re-encode the video upright, e.g. with ffmpeg -i, which rotates it)"
        )
    sa, sb, sc, sd = (int(np.sign(round(v / scale, 3))) for v in (a, b, c, d))
    grid = np.arange(6).reshape(2, 3)  # (rows q, columns p)
    q, p = np.indices(grid.shape)
    rows, cols = sb * p + sd * q, sa * p + sc * q
    shown = np.empty((rows.max() - rows.min() + 1, cols.max() - cols.min() + 1), dtype=grid.dtype)
    shown[rows - rows.min(), cols - cols.min()] = grid
    for rotation in (0, 90, 180, 270):
        for mirror in (False, True):
            candidate = np.rot90(grid, rotation // 90)  # np.rot90 turns counter-clockwise
            if mirror:
                candidate = candidate[:, ::-1]
            if candidate.shape == shown.shape and np.array_equal(candidate, shown):
                return rotation, mirror
    raise AssertionError(f"no orientation matches display matrix {list(matrix)}")


def _stream_sar(stream: Any) -> Fraction:
    """The stream's sample aspect ratio (the container's, else the codec's); 1 when unset or 0 (unknown)."""
    for owner in (stream, stream.codec_context):
        value = getattr(owner, "sample_aspect_ratio", None)
        if value:  # None and Fraction(0) both mean "not stated"
            return Fraction(value)
    return Fraction(1)


def read_display(src: Source) -> Display:
    """The rotation, mirroring and sample aspect ratio of the first video stream of `src`.

    The rotation comes from the display matrix FFmpeg attaches to decoded frames (mp4/mov `tkhd` matrix, Matroska
    projection, and the like), so the first frame is decoded (a few ms); a stream without one falls back to the
    stream's "rotate" tag (clockwise degrees, any letter case), which some tools write instead (FFmpeg itself now
    ignores that tag; older FFmpeg reported phones' matrices as it). Raises DecodeError for a video that
    does not open or decode, and for a rotation that is not a multiple of 90 degrees.
    """
    name = describe_source(src)
    with _AvVideo(src, name) as video:
        sar = _stream_sar(video.stream)
        matrix = None
        try:
            # The first frame needs at most the reorder delay's worth of packets (see REORDER_SLACK).
            for packet in video.packets(4 * REORDER_SLACK):
                frames = packet.decode()
                if frames:
                    for side in frames[0].side_data:
                        if getattr(side.type, "name", "") == "DISPLAYMATRIX":
                            matrix = np.frombuffer(bytes(side), dtype=np.int32)[:9].tolist()
                    break
            else:
                raise DecodeError(f"{name}: no frame decoded to read the display matrix from")
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"{name}: decoding the first frame failed ({type(exc).__name__}: {exc})") from exc
        if matrix is not None:
            rotation, mirror = _orientation(matrix, name)
        else:
            tags = {k.lower(): v for k, v in (video.stream.metadata or {}).items()}  # Matroska writes "ROTATE"
            tag = tags.get("rotate", "0")
            try:
                degrees = float(tag)
            except ValueError:
                raise DecodeError(f"{name}: the stream's rotate tag {tag!r} is not a number") from None
            if degrees % 90:
                raise DecodeError(
                    f"{name}: the rotate tag turns the picture by {degrees:g} degrees; only multiples of 90 are applied"
                )
            rotation, mirror = int(-degrees) % 360, False
    return Display(rotation=rotation, mirror=mirror, sar=sar)


def apply_display(frames: torch.Tensor | np.ndarray, display: Display) -> torch.Tensor | np.ndarray:
    """Frames (..., H, W, 3) uint8 as they are meant to be shown (same type as given): resampled to square pixels
    (`Display.square_size`; antialiased bilinear, as the transforms resize), then rotated and mirrored.

    Frames already scaled by the decoder (decode_frames' short_side) are fine: the SAR is a ratio. Rotation and
    mirroring are exact (a view); only a SAR other than 1 resamples.
    """
    as_numpy = isinstance(frames, np.ndarray)
    x = torch.from_numpy(frames) if as_numpy else frames
    if x.dtype != torch.uint8 or x.dim() < 3 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (..., H, W, 3), got {x.dtype} {tuple(x.shape)}")
    height, width = x.shape[-3:-1]
    new_width, new_height = display.square_size(width, height)
    if (new_width, new_height) != (width, height):
        lead = x.shape[:-3]
        x = _resize_uint8(x.reshape(-1, height, width, 3), new_height, new_width).reshape(
            *lead, new_height, new_width, 3
        )
    if display.rotation:
        x = torch.rot90(x, display.rotation // 90, dims=(-3, -2))  # counter-clockwise, as np.rot90
    if display.mirror:
        x = x.flip(-2)
    if as_numpy:
        return np.ascontiguousarray(x.numpy())
    return x.contiguous()


# --------------------------------------------------------------------------------------------------------------------
# Shared checks


def _check_request(indices: Sequence[int], backend: str) -> list[int]:
    """Sorted distinct indices; a malformed request is the caller's bug, so it raises ValueError, not DecodeError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if len(indices) == 0:
        raise ValueError("indices is empty: ask for at least one frame")
    wanted = sorted({int(i) for i in indices})
    if wanted[0] < 0:
        raise ValueError(f"frame indices count from 0; got {wanted[0]} (negative indices are not supported)")
    return wanted


def _check_count(name: str, wanted: list[int], num_frames: int) -> None:
    if num_frames <= 0:
        raise DecodeError(f"{name}: the video stream holds no frames")
    if wanted[-1] >= num_frames:
        raise DecodeError(f"{name}: frame {wanted[-1]} requested but the video has {num_frames} frames")


def _stream_fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


# --------------------------------------------------------------------------------------------------------------------
# PyAV


@dataclass
class _PacketTable:
    """Presentation order of the video packets, from one demux pass (no decoding).

    num_frames: packets that decode to a shown frame (empty and discard-flagged packets excluded).
    index_of: pts -> frame index in presentation order; None when some packet lacks a pts or two share one, in which
        case frames can only be numbered by counting from the start.
    keyframes: frame indices of keyframes, ascending; key_pts: the pts of each, the timestamp to seek to.
    discarded: packets flagged discard (not counted in num_frames).
    """

    num_frames: int
    index_of: dict[int, int] | None
    keyframes: list[int]
    key_pts: dict[int, int]
    discarded: int = 0  # packets flagged discard (edit-list pre-roll): decoded for reference, never shown


class _Unreliable(Exception):
    """The seek path could not prove which frame is which; the caller falls back to counting from the start."""


class _AvVideo:
    """One open PyAV container with its first video stream set to decode on one thread; closes on exit."""

    def __init__(self, src: Source, name: str):
        import av
        from av.video.reformatter import VideoReformatter

        self.name = name
        self.container = None
        try:
            target = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
            self.container = av.open(target, mode="r")
            if not self.container.streams.video:
                raise DecodeError(f"{name}: no video stream")
            self.stream = self.container.streams.video[0]
            context = self.stream.codec_context
            if context is None:
                raise DecodeError(f"{name}: no decoder for codec of the video stream")
            # One thread, chosen here rather than left to PyAV's default of automatic slice threading: see the
            # module docstring. Must be set before the first decode opens the codec.
            context.thread_type = "NONE"
            context.thread_count = 1
            self.width = context.width
            self.height = context.height
            if self.width <= 0 or self.height <= 0:
                raise DecodeError(
                    f"{name}: the video stream's header gives no picture size ({self.width}x{self.height})"
                )
            self.reformatter = VideoReformatter()
            self.decoded = 0  # frames out of the decoder (VideoReader.frames_decoded)
            self.nal_length = _nal_length_size(context)
        except DecodeError:
            self.close()
            raise
        except Exception as exc:  # av.error.*, OSError, ...: anything that stops the file from opening
            self.close()
            raise DecodeError(f"{name}: cannot open ({type(exc).__name__}: {exc})") from exc

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def __enter__(self) -> _AvVideo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def packets(self, budget: int):
        """Video packets in decode order, at most `budget` of them (the EOF flush packet included)."""
        for count, packet in enumerate(self.container.demux(self.stream), start=1):
            if count > budget:
                raise DecodeError(f"{self.name}: gave up after {budget} packets without reaching the wanted frames")
            yield packet

    def scan(self) -> _PacketTable:
        """Demux every packet once (no decoding) to number the frames in presentation order."""
        pts_list: list[int] = []
        key_list: list[int] = []  # pts of keyframes
        exact = True
        discarded = 0
        try:
            # 100M packets is about 5 weeks of 30 fps video: a bound on the loop, not a limit anyone meets.
            for packet in self.packets(100_000_000):
                if packet.size == 0:
                    continue  # the flush packet demux yields at EOF
                if packet.is_discard:
                    # Edit-list pre-roll: decoded for reference, but the decoder drops its frame.
                    discarded += 1
                    continue
                if packet.pts is None:
                    exact = False
                    pts_list.append(-1)
                    continue
                pts_list.append(packet.pts)
                if packet.is_keyframe:
                    key_list.append(packet.pts)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"{self.name}: demuxing failed ({type(exc).__name__}: {exc})") from exc
        if not exact or len(set(pts_list)) != len(pts_list):
            return _PacketTable(len(pts_list), None, [], {}, discarded)
        index_of = {pts: i for i, pts in enumerate(sorted(pts_list))}
        key_pts = {index_of[pts]: pts for pts in key_list}
        return _PacketTable(len(pts_list), index_of, sorted(key_pts), key_pts, discarded)


def _decode_pyav(
    src: Source, wanted: list[int], short_side: int | None, name: str, budget: Budget | None = None
) -> np.ndarray:
    """budget None: checked by the caller (another backend handing a file over)."""
    with VideoReader(src, name=name, budget=budget or Budget(frame_pixels=2**62, clip_pixels=2**62)) as reader:
        width, height = resized_size(reader.width, reader.height, short_side)
        if budget is not None:
            budget.check_clip(name, len(wanted), width, height)
        # Filled per frame in numpy, not torch: a torch slice copy runs through intra-op threads, and with two
        # threads on a busy 2-core machine 300 such copies took 1.8-3.6 s against 8 ms in numpy.
        out = np.empty((len(wanted), height, width, 3), dtype=np.uint8)

        def sink(position: int, rgb: np.ndarray) -> None:
            out[position] = rgb

        reader.read(wanted, sink, short_side=short_side)
    return out


FrameSink = Callable[[int, np.ndarray], None]
"""Receives (position in the sorted request, RGB frame (H, W, 3) uint8). The array is valid only during the call:
copy what is needed (a crop) out of it."""


class VideoReader:
    """One open video (PyAV) that decodes chosen frames into a caller's sink, for callers that place crops of each
    frame straight into their own buffer instead of receiving whole frames (the training loader).

        with VideoReader(data) as reader:                    # DecodeError if it does not open
            first = reader.decode_start(window[0])           # frames before the window that are decoded anyway
            reader.read(sorted_distinct_indices, sink)       # sink(position, rgb) once per index, ascending
            reader.frames_decoded                            # frames that came out of the decoder

    Frames are numbered and delivered exactly as `decode_frames` delivers them (it is built on this class); `read`
    may be called more than once. The frame handed to the sink is converted to RGB at the coded size (or at
    `short_side`), so a stream whose picture size changes midway still yields frames of one size.
    """

    def __init__(self, src: Source, *, name: str | None = None, budget: Budget = Budget()):
        self.src = src
        self.name = name or describe_source(src)
        self.budget = budget
        self._table: _PacketTable | None = None
        self._fresh = True  # the container has not been read from: a decode can count frames from the start
        self._decoded_before = 0  # frames decoded by containers this reader has already closed
        self._video: _AvVideo | None = _AvVideo(src, self.name)
        self.width, self.height = self._video.width, self._video.height
        try:
            budget.check_frame(self.name, self.width, self.height, "coded frames")
        except DecodeError:
            self.close()
            raise

    @property
    def frames_decoded(self) -> int:
        """Frames the decoder produced so far: frames delivered plus those decoded only as references (from the
        keyframe before a window, or from the start of the file)."""
        return self._decoded_before + (self._video.decoded if self._video is not None else 0)

    def table(self) -> _PacketTable:
        """The demuxed packet table (scanned once, then cached)."""
        if self._table is None:
            self._table = self._open().scan()
        return self._table

    def decode_start(self, first: int) -> int:
        """The first frame that `read` decodes when the smallest index asked for is `first`: 0 when it decodes
        from the start, else the keyframe at or before `first`. Frames in [decode_start(first), first) cost nothing
        more to deliver than the decoding they already need."""
        if first <= SEQUENTIAL_MAX_GAP:
            return 0
        table = self.table()
        if table.index_of is None:
            return 0
        position = bisect.bisect_right(table.keyframes, first) - 1
        return table.keyframes[position] if position >= 0 else 0

    def read(self, wanted: Sequence[int], sink: FrameSink, *, short_side: int | None = None) -> None:
        """Decode frames `wanted` (sorted, distinct) and call sink(position, rgb) for each, in ascending order.

        Raises DecodeError when the video cannot deliver them. A sink may receive a frame again when a seek turned
        out unreliable and the frames are decoded afresh by counting from the start.
        """
        wanted = list(wanted)
        width, height = resized_size(self.width, self.height, short_side)
        self.budget.check_frame(self.name, width, height, f"frames scaled to short side {short_side}")
        gaps = [b - a for a, b in zip([0] + wanted[:-1], wanted, strict=True)]
        if max(gaps) <= SEQUENTIAL_MAX_GAP:
            # A window near the start, or frames spread densely: decode straight through, numbering by count.
            _decode_counting(self._open(start=True), wanted, sink, width, height)
            return
        table = self.table()
        _check_count(self.name, wanted, table.num_frames)
        if table.index_of is not None:
            try:
                _decode_seeking(self._open(), table, wanted, sink, width, height)
                return
            except _Unreliable:
                pass  # timestamps did not line up with the packet table: number frames by counting instead
        _decode_counting(self._open(start=True), wanted, sink, width, height)

    def _open(self, *, start: bool = False) -> _AvVideo:
        """The open container, from now on counted as read from; with start=True one that has not been read from
        yet (the one opened by the constructor while unused, else a fresh one)."""
        if self._video is not None and start and not self._fresh:
            self.close()
        if self._video is None:
            self._video = _AvVideo(self.src, self.name)
        self._fresh = False
        return self._video

    def close(self) -> None:
        if self._video is not None:
            self._decoded_before += self._video.decoded
            self._video.close()
            self._video = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rgb(video: _AvVideo, frame: Any, width: int, height: int) -> np.ndarray:
    # One reformatter per video keeps one swscale context (frame.to_ndarray builds one per frame: 7% slower here).
    options = {"width": width, "height": height, "format": "rgb24", "interpolation": INTERPOLATION}
    try:
        # threads=1: PyAV >= 17 otherwise passes 0, letting swscale pick its own threads (1.5x slower on a busy
        # 2-core machine). Older PyAV has no `threads` argument and scales on one thread anyway.
        rgb = video.reformatter.reformat(frame, threads=1, **options)
    except TypeError:
        rgb = video.reformatter.reformat(frame, **options)
    return rgb.to_ndarray()  # a view of the converted frame's buffer (rgb24 has one plane: no copy)


def _decode_counting(video: _AvVideo, wanted: list[int], sink: FrameSink, width: int, height: int) -> None:
    """Decode from the start of a freshly opened container; frame i is the i-th frame out of the decoder."""
    slot = {index: k for k, index in enumerate(wanted)}
    last = wanted[-1]
    produced = 0
    # A packet yields at most one frame, so reaching frame `last` needs about last + 1 packets; allow twice that plus
    # slack for reordering delay and packets that yield nothing (discarded pre-roll).
    try:
        for packet in video.packets(2 * (last + 1) + REORDER_SLACK):
            for frame in packet.decode():
                video.decoded += 1
                if produced in slot:
                    sink(slot[produced], _rgb(video, frame, width, height))
                if produced == last:
                    return
                produced += 1
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(
            f"{video.name}: decoding failed after {produced} frames ({type(exc).__name__}: {exc})"
        ) from exc
    if produced == 0:
        raise DecodeError(f"{video.name}: the video stream holds no decodable frames")
    raise DecodeError(f"{video.name}: frame {last} requested but decoding ended after {produced} frames")


def _plan_segments(table: _PacketTable, wanted: list[int]) -> list[tuple[int, list[int]]]:
    """Group wanted frames into runs decoded from one keyframe each: (keyframe index, wanted indices)."""
    segments: list[tuple[int, list[int]]] = []
    for index in wanted:
        position = bisect.bisect_right(table.keyframes, index) - 1
        if position < 0:
            # No keyframe at or before this frame (a stream that opens on open-GOP leading frames): only a decode
            # from the very start delivers it.
            raise _Unreliable
        keyframe = table.keyframes[position]
        if segments and keyframe <= segments[-1][1][-1] + SEEK_COST_FRAMES:
            segments[-1][1].append(index)  # decoding on from the previous wanted frame is no dearer than a seek
        else:
            segments.append((keyframe, [index]))
    return segments


def _nal_length_size(context: Any) -> int | None:
    """Bytes of the length before each NAL unit of an H.264 stream stored with an avcC header (mp4, Matroska), or
    None: another codec, or start-code framing, which `_unreferenced` does not parse."""
    try:
        extra = bytes(context.extradata or b"") if context.name == "h264" else b""
    except Exception:  # a codec context without extradata access
        return None
    return (extra[4] & 3) + 1 if len(extra) >= 7 and extra[0] == 1 else None


def _unreferenced(packet: Any, length_size: int) -> bool:
    """Whether the packet is a whole H.264 picture whose slices all have nal_ref_idc 0: no other picture predicts
    from it (H.264 7.4.1) and frame_num does not count it, so leaving it out of the decoder changes no other frame.
    FFmpeg's skip_frame=NONREF makes the same choice inside the decoder; doing it here spares the packet's parse."""
    data = memoryview(packet)
    position = slices = 0
    while position + length_size < len(data):
        header = data[position + length_size]
        if header & 0x1F in (1, 2, 3, 4, 5):  # coded slice or slice data partition
            if header & 0x60:
                return False
            slices += 1
        position += length_size + int.from_bytes(data[position : position + length_size], "big")
    return slices > 0 and position == len(data)


def _decode_seeking(
    video: _AvVideo, table: _PacketTable, wanted: list[int], sink: FrameSink, width: int, height: int
) -> None:
    """Seek to the keyframe before each run of wanted frames and number frames by pts through the packet table.

    Raises _Unreliable when a frame's pts is not in the table, the seek lands after the first wanted frame, or the
    decoder skips or repeats a frame: then counting from the start is the only trustworthy numbering.
    """
    slot = {index: k for k, index in enumerate(wanted)}
    assert table.index_of is not None
    for keyframe, run in _plan_segments(table, wanted):
        # Non-reference pictures before the run are left out: with x264's B-pyramid about 40% of the pictures of a
        # 16-frame GOP, and the frames before a window are about 10% of those decoded for a 64-frame clip.
        skipped: set[int] = set()
        try:
            # Seek by the keyframe's pts: FFmpeg's mp4 and Matroska demuxers both search keyframes by pts (seeking to
            # the smaller dts instead landed one keyframe early in mp4, 124 frames of wasted decoding here).
            video.container.seek(table.key_pts[keyframe], stream=video.stream, backward=True)
        except Exception as exc:
            raise _Unreliable from exc
        expected = None
        done = False
        try:
            # Bound as when counting from the start: no decode needs more packets than frames up to the last.
            for packet in video.packets(run[-1] + 1 + REORDER_SLACK):
                before = table.index_of.get(packet.pts, run[0]) < run[0] if packet.pts is not None else False
                if before and video.nal_length and _unreferenced(packet, video.nal_length):
                    skipped.add(table.index_of[packet.pts])
                    continue
                for frame in packet.decode():
                    video.decoded += 1
                    index = table.index_of.get(frame.pts) if frame.pts is not None else None
                    if index is None:
                        raise _Unreliable
                    if expected is None and index > run[0]:
                        raise _Unreliable  # landed past the first wanted frame
                    while expected in skipped:
                        expected += 1
                    if expected is not None and index != expected:
                        raise _Unreliable  # a frame went missing or came twice
                    expected = index + 1
                    if index in slot:
                        sink(slot[index], _rgb(video, frame, width, height))
                    if index >= run[-1]:
                        done = True
                        break
                if done:
                    break
        except (_Unreliable, DecodeError):
            raise _Unreliable from None
        except Exception as exc:
            raise _Unreliable from exc
        if not done:
            raise _Unreliable  # the table promised frames the decoder did not deliver


# --------------------------------------------------------------------------------------------------------------------
# decord


def _decode_decord(src: Source, wanted: list[int], short_side: int | None, name: str) -> np.ndarray:
    try:
        import decord
    except ImportError as exc:
        raise ImportError("backend='decord' needs the decord package (pip install decord)") from exc
    table, width, height = _pyav_table(src, wanted, short_side, name)
    if table.discarded:
        return _pyav_instead(src, wanted, short_side, name, "decord", _discard_reason(table))
    try:
        if short_side is None:
            return _decord_batch(decord, src, wanted, {}, name, table.num_frames)
        try:
            return _decord_batch(decord, src, wanted, {"width": width, "height": height}, name, table.num_frames)
        except DecodeError as exc:
            if "DECORDArrayCopyFromTo" not in str(exc):
                raise
        # decord 0.6 fails to copy out frames scaled to some widths (48 and 72 px from a 66x50 clip: it hands back 4
        # bytes per pixel). Decode at full size and scale here instead; slower (environment.md: 3-9x), but rare.
        frames = _decord_batch(decord, src, wanted, {}, name, table.num_frames)
    except _OtherNumbering as exc:
        return _pyav_instead(src, wanted, short_side, name, "decord", str(exc))
    return _resize_uint8(torch.from_numpy(frames), height, width).contiguous().numpy()


def _resize_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) frames resampled to (N, height, width, 3): antialiased bilinear, rounded to the nearest
    level. A view in NHWC order, not contiguous."""
    chw = frames.permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    chw = torch.nn.functional.interpolate(chw, size=(height, width), mode="bilinear", antialias=True)
    return chw.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _decord_batch(
    decord: Any, src: Source, wanted: list[int], size: dict[str, int], name: str, num_frames: int
) -> np.ndarray:
    """decord's frames `wanted`; raises _OtherNumbering when its packet count is not `num_frames` (PyAV's)."""
    reader = None
    try:
        # decord copies a file-like object into its own buffer; bytes need the wrapper.
        target = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
        reader = decord.VideoReader(target, ctx=decord.cpu(0), num_threads=1, **size)
        # len(reader) is the container's claim; get_frame_timestamp fills decord's own table of demuxed packets,
        # which is what get_batch can actually reach. Asking past it spins forever (dmlc/decord#373).
        reader.get_frame_timestamp([0])
        table = getattr(reader, "_frame_pts", None)  # a private attribute: without it, the header's claim
        counted = len(table) if table is not None else len(reader)
        if counted != num_frames:
            raise _OtherNumbering(f"decord counts {counted} frames where a sequential decode yields {num_frames}")
        batch = reader.get_batch(wanted).asnumpy()  # (T, H, W, 3) uint8
    except (DecodeError, _OtherNumbering):
        raise
    except Exception as exc:  # DECORDError, RuntimeError, and the AssertionError decord raises for 0 frames
        raise DecodeError(f"{name}: decord failed ({type(exc).__name__}: {exc})") from exc
    finally:
        # decord frees its native reader in __del__; dropping the only reference frees it now.
        del reader
    return batch


# --------------------------------------------------------------------------------------------------------------------
# Guarding the other backends with PyAV's numbering


class _OtherNumbering(Exception):
    """A backend's frame numbering may differ from a sequential decode's; the message says why."""


_warned_fallback = False


def _pyav_table(src: Source, wanted: list[int], short_side: int | None, name: str) -> tuple[_PacketTable, int, int]:
    """PyAV's packet table and the output (width, height); raises DecodeError if `wanted` lies past the end."""
    with _AvVideo(src, name) as video:
        table = video.scan()
        width, height = resized_size(video.width, video.height, short_side)
    _check_count(name, wanted, table.num_frames)
    return table, width, height


def _discard_reason(table: _PacketTable) -> str:
    return (
        f"{table.discarded} packets are flagged discard (an edit list that starts between keyframes, as a "
        "stream-copy trim makes)"
    )


def _pyav_instead(
    src: Source, wanted: list[int], short_side: int | None, name: str, backend: str, reason: str
) -> np.ndarray:
    """Decode with PyAV a file whose frames `backend` may number differently from a sequential decode."""
    global _warned_fallback
    if not _warned_fallback:  # once per process: a dataset of trimmed clips would otherwise warn per sample
        _warned_fallback = True
        warnings.warn(
            f"{name}: {reason}; backend={backend!r} could return the wrong frames, so this file and any like it "
            "are decoded with PyAV (backend='pyav') instead",
            RuntimeWarning,
            stacklevel=4,
        )
    return _decode_pyav(src, wanted, short_side, name)


# --------------------------------------------------------------------------------------------------------------------
# TorchCodec


def _decode_torchcodec(src: Source, wanted: list[int], short_side: int | None, name: str) -> np.ndarray:
    try:
        from torchcodec.decoders import VideoDecoder

        if short_side is not None:
            from torchcodec.transforms import Resize  # decoder transforms: scaling inside FFmpeg
    except Exception as exc:  # ImportError, or OSError when its FFmpeg libraries are missing
        raise ImportError(
            "backend='torchcodec' needs torchcodec (with decoder transforms for short_side) importable with its "
            "FFmpeg libraries; on CPU machines torchcodec 0.13 and the system ffmpeg work. "
            f"Import failed with {type(exc).__name__}: {exc}"
        ) from exc
    table, width, height = _pyav_table(src, wanted, short_side, name)
    if table.discarded:
        return _pyav_instead(src, wanted, short_side, name, "torchcodec", _discard_reason(table))
    try:
        source = bytes(src) if isinstance(src, (bytearray, memoryview)) else src
        if not isinstance(source, bytes):
            source = os.fspath(source)
        # seek_mode="exact" scans every packet, so num_frames and the index -> frame mapping are real, not claimed.
        # One FFmpeg thread, as for the other backends (also its default, torchcodec#1639).
        options: dict[str, Any] = {"seek_mode": "exact", "num_ffmpeg_threads": 1, "dimension_order": "NHWC"}
        if short_side is not None:
            options["transforms"] = [Resize(size=(height, width))]
        decoder = VideoDecoder(source, **options)
        counted = decoder.metadata.num_frames
        if counted != table.num_frames:
            raise _OtherNumbering(
                f"torchcodec counts {counted} frames where a sequential decode yields {table.num_frames}"
            )
        return decoder.get_frames_at(indices=wanted).data.numpy()  # (T, H, W, 3) uint8
    except _OtherNumbering as exc:
        return _pyav_instead(src, wanted, short_side, name, "torchcodec", str(exc))
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"{name}: torchcodec failed ({type(exc).__name__}: {exc})") from exc
