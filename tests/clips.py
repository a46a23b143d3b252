"""Tiny video files for the loader, decoder, prediction and benchmark tests, made with PyAV in a few ms each."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def sliding_clip(frames: int, *, seed: int = 0, width: int = 48, height: int = 40) -> bytes:
    """An MP4 of `frames` H.264 frames at 25 fps: a random texture (from `seed`) sliding right one pixel per frame,
    so that every frame differs from the one before."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def encode_clip(
    path: Path,
    frames,
    *,
    codec: str = "libx264",
    fmt: str | None = None,
    rate: int = 16,
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    rotation: float | None = None,
    hflip: bool = False,
    vflip: bool = False,
    sar: Fraction | None = None,
    tag: str | None = None,
) -> Path:
    """Write RGB `frames` (T, H, W, 3) uint8 to `path`, frame i at pts i, with the metadata predict must honour: a
    display matrix (`rotation` degrees, mirrored by `hflip` / `vflip`), a sample aspect ratio `sar`, or the old
    `rotate` tag. Returns `path`."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = pix_fmt
        if options:
            s.options = options
        if sar is not None:
            s.codec_context.sample_aspect_ratio = sar
        if rotation is not None:
            s.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        if tag is not None:
            s.metadata["rotate"] = tag
        for i, rgb in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format=pix_fmt)
            f.pts = i
            for packet in s.encode(f):
                c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)
    return path
