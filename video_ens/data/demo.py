"""The small, learnable demo datasets of the quickstart and CI, made through the real converters
(tools/make_demo_data.py is the command line):

    make_kinetics(out)   out/{train,val}: H.264 clips whose class is a motion         (convert_kinetics)
    make_yt8m(out)       out/{train,val}: YouTube-8M-style multi-label frame features  (convert_yt8m)
    make_images(out)     out/{train,val}: 32x32 PNG/JPEG patterns                      (convert_images)

Each kind is written as its raw form first (mp4 files + a Kinetics annotation CSV; TFRecords of SequenceExamples;
a class-per-folder image tree) in a temporary folder, then converted by the converter's library function, so the
demo data goes through exactly the shard format and checks real data goes through.

kinetics: 8 classes of motion of one large striped shape: move left/right slowly or fast, rotate cw/ccw, grow,
    shrink (direction, speed, rotation, scaling).
    Start positions, sizes and angles are drawn so that a single frame says little about the class (grow and
    shrink share their mid-clip sizes, every position and angle occurs in every class): the change over time tells.
    Appearance comes from small shared palettes (6 flat background tones, 4 stripe colour pairs, 3 shapes) drawn
    independently of the class, so there is no per-clip look to memorise instead of the motion. Up to two small,
    plain, low-contrast distractor shapes move, turn and scale at random, the large shape also drifts, turns or
    scales a little, and every frame gets slight flicker and pixel noise, so a tiny model does not saturate in one
    epoch (the quickstart's tiny S3D-G learns it over its ~40 epochs).
yt8m: 16 classes, 1-3 labels per video, 10-60 frames. Each class adds its own pattern (1024-d visual, 128-d audio;
    odd classes partly copy the previous class's pattern, so pairs are confusable) on a random contiguous stretch
    of the video's frames, on top of frame noise and a per-video offset; features are quantized as YouTube-8M's
    are. Validate records are split 50/50 by the converter's hash holdout, as the paper's split does with 10%.
images: 10 classes of pattern (horizontal/vertical/two diagonal stripes, checkerboard, disc, ring, cross, dots,
    square outline) with random colours, period, phase and position, plus noise; even-numbered files PNG, odd JPEG.

Deterministic: the same seed gives the same bytes for features and images, and the same decoded frames for the
clips (libx264 runs single-threaded on explicitly converted, numbered frames; with the same FFmpeg build the clip
bytes are identical too).

Each make_* keeps an existing folder made with the same settings (printed as up to date). overwrite=True always
regenerates (make_demo_data.py --overwrite); overwrite="stale" regenerates demo data of the same kind made by another
generator version or other settings (--refresh); otherwise a folder holding other data raises FileExistsError.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from fractions import Fraction

import numpy as np

from video_ens.data import convert_images, convert_kinetics, convert_yt8m
from video_ens.data.encode import H264Settings, encode_h264
from video_ens.data.schema import DatasetInfo, read_info
from video_ens.data.tfrecord import TFRecordWriter, bytes_feature, encode_sequence_example, int64_feature
from video_ens.data.writer import map_ordered

GENERATOR_VERSION = "3"
# Direction, speed, rotation and scaling: move_left vs move_right differ in direction only, move_* vs move_*_fast in
# speed only (0.45-0.7 against 1.1-1.4 px per frame at 64 px), so a model must measure how far the shape travels.
MOTION_CLASSES = (
    "move_left",
    "move_right",
    "move_left_fast",
    "move_right_fast",
    "rotate_cw",
    "rotate_ccw",
    "grow",
    "shrink",
)
PATTERN_CLASSES = (
    "stripes_horizontal",
    "stripes_vertical",
    "stripes_diagonal_up",
    "stripes_diagonal_down",
    "checkerboard",
    "disc",
    "ring",
    "cross",
    "dots",
    "square_outline",
)
_SPLIT_CODE = {"train": 0, "val": 1, "validate": 1}


# ---------------------------------------------------------------------------------------------------------------
# Motion clips
# ---------------------------------------------------------------------------------------------------------------


# Appearance is shared, not per clip, and drawn independently of the class, so it cannot be memorised as a shortcut:
# flat backgrounds of low-saturation mid tones (with a faint gradient) and a few high-contrast stripe colour pairs.
_BACKGROUNDS = np.array(
    [[118, 118, 118], [96, 108, 124], [128, 118, 100], [104, 122, 106], [138, 130, 136], [88, 92, 100]],
    np.float32,
)
_STRIPE_COLOURS = np.array(
    [
        [[245, 245, 240], [20, 20, 25]],
        [[250, 220, 40], [30, 40, 150]],
        [[240, 70, 60], [20, 90, 40]],
        [[80, 230, 240], [120, 20, 60]],
    ],
    np.float32,
)


def _shape_alpha(u: np.ndarray, v: np.ndarray, shape: int, r: float) -> np.ndarray:
    """Anti-aliased coverage of a unit shape at object coordinates (u, v) (in radii); r = radius in pixels."""
    if shape == 0:  # square
        d = np.maximum(np.abs(u), np.abs(v))
    elif shape == 1:  # disc
        d = np.sqrt(u * u + v * v)
    else:  # diamond
        d = (np.abs(u) + np.abs(v)) * 0.85
    return np.clip((1.0 - d) * r + 0.5, 0.0, 1.0)


def _draw(img: np.ndarray, xx: np.ndarray, yy: np.ndarray, obj: dict, cx: float, cy: float, angle: float, r: float):
    """Composite one shape, centred at (cx, cy), turned by `angle` (radians), of radius r, onto img.

    obj["colors"] holds one colour (a plain shape) or two (stripes across the shape, which make its turn visible).
    """
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(angle), math.sin(angle)
    u = (c * dx + s * dy) / r  # object coordinates, in radii
    v = (-s * dx + c * dy) / r
    alpha = _shape_alpha(u, v, obj["shape"], r)[..., None]  # (H, W, 1)
    colors = obj["colors"]
    if len(colors) == 1:
        fill = colors[0]
    else:  # crisp stripes, one cycle per radius: they scale and turn with the shape
        t = 0.5 + 0.5 * np.tanh(3.0 * np.sin(2 * math.pi * u + obj["phase"]))[..., None]
        fill = t * colors[0] + (1.0 - t) * colors[1]
    img *= 1.0 - alpha
    img += alpha * fill


def render_motion_clip(
    seed: int, split: str, index: int, label: int, *, frames: int = 32, size: int = 64
) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of one clip of class MOTION_CLASSES[label]; a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index, 17])
    name = MOTION_CLASSES[label]
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    steps = np.arange(frames, dtype=np.float64)
    unit = size / 64.0  # all distances below are for 64-pixel frames

    # Background: a shared flat colour with a faint random gradient, still.
    bg = np.empty((h, w, 3), np.float32)
    bg[:] = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]
    gx, gy = rng.normal(0, 1, 2)
    bg += (10.0 * (gx * (xx - size / 2) + gy * (yy - size / 2)) / size)[..., None]

    # The large striped object: its class motion plus small nuisance motion of the other kinds.
    span = frames - 1
    r0 = rng.uniform(11.0, 14.0) * unit
    angle0 = rng.uniform(0, 2 * math.pi)
    spin = math.radians(rng.uniform(-1.0, 1.0))  # nuisance turn per frame
    scale = np.exp(rng.uniform(-0.06, 0.06) * steps / span)  # nuisance zoom
    drift = rng.normal(0, 0.06 * unit, 2)  # nuisance drift per frame
    if name.startswith("move"):
        speed = (rng.uniform(1.1, 1.4) if name.endswith("_fast") else rng.uniform(0.45, 0.7)) * unit
        heading = {"move_left": math.pi, "move_right": 0.0}[name.removesuffix("_fast")]
        heading += math.radians(rng.uniform(-10, 10))
        velocity = speed * np.array([math.cos(heading), math.sin(heading)])
    elif name.startswith("rotate"):
        spin = math.radians(rng.uniform(5.0, 8.0)) * (1 if name == "rotate_cw" else -1)  # +angle turns clockwise
        velocity = drift
    else:
        factor = rng.uniform(1.7, 2.2)  # end radius / start radius for grow; its inverse for shrink
        r0 = rng.uniform(11.0, 14.0) * unit / math.sqrt(factor)  # start radius: the mid-clip size is class-free
        if name == "shrink":
            r0 *= factor
            factor = 1 / factor
        scale = factor ** (steps / span)
        velocity = drift
    radius = r0 * scale  # (T,)
    travel = velocity * span
    margin = float(radius.max()) * 0.6
    lo = np.maximum(margin, margin - travel)  # keep the centre inside the frame over the whole path
    hi = np.minimum(size - margin, size - margin - travel)
    start = rng.uniform(lo, np.maximum(lo, hi))
    centre = start[None, :] + velocity[None, :] * steps[:, None]  # (T, 2)
    angle = angle0 + spin * steps
    pair = _STRIPE_COLOURS[rng.integers(len(_STRIPE_COLOURS))]
    if rng.integers(2):
        pair = pair[::-1]
    main = {"shape": int(rng.integers(3)), "colors": tuple(pair), "phase": rng.uniform(0, 2 * math.pi)}

    # Distractors: up to two small plain shapes of a low contrast, with random motion of every kind, drawn under
    # the large object.
    objects = []
    for _ in range(int(rng.integers(0, 3))):
        rd = rng.uniform(3.0, 4.5) * unit
        pos = rng.uniform(0, size, 2) + rng.normal(0, 0.5 * unit, 2)[None, :] * steps[:, None]  # (T, 2)
        turn = rng.uniform(0, 6.3) + math.radians(rng.uniform(-6, 6)) * steps
        zoom = rd * rng.uniform(0.8, 1.25) ** (steps / span)
        colour = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))] + rng.choice([-40.0, 40.0])
        objects.append(({"shape": int(rng.integers(3)), "colors": (colour,)}, pos, turn, zoom))
    objects.append((main, centre, angle, radius))

    clip = np.empty((frames, h, w, 3), np.uint8)
    gain = 1.0 + rng.normal(0, 0.02, frames)  # slight flicker
    for t in range(frames):
        img = bg.copy()
        for obj, pos, ang, rad in objects:
            _draw(img, xx, yy, obj, float(pos[t, 0]), float(pos[t, 1]), float(ang[t]), float(rad[t]))
        img = img * gain[t] + rng.normal(0, 3, img.shape).astype(np.float32)
        clip[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return clip


# A keyframe every 16 frames, like the converter's re-encode default; mb-tree off so the same seed gives the same
# bytes (see H264Settings.mbtree).
DEMO_H264 = H264Settings(crf=20, preset="fast", keyint=16, mbtree=False)


def _write_clip(job: tuple) -> str:
    """Render and encode one clip to `path` (runs in a worker)."""
    path, seed, split, index, label, frames, size, fps = job
    data = encode_h264(
        render_motion_clip(seed, split, index, label, frames=frames, size=size), Fraction(fps), DEMO_H264
    )
    with open(path, "wb") as f:
        f.write(data)
    return path


def make_kinetics(
    out: str,
    *,
    seed: int = 0,
    num_train: int = 200,
    num_val: int = 80,
    frames: int = 32,
    size: int = 64,
    fps: int = 16,
    shard_size: int = 20,
    workers: int = 1,
    overwrite: bool | str = False,
    progress: bool = False,
) -> dict[str, DatasetInfo]:
    """Write `out`/train and `out`/val (kind "video") through convert_kinetics."""
    settings, kept = _settings_and_kept(
        "kinetics", out, overwrite, progress,
        seed=seed, num_train=num_train, num_val=num_val, frames=frames, size=size, fps=fps, shard_size=shard_size,
    )  # fmt: skip
    if kept is not None:
        return kept
    duration = max(1, math.ceil(frames / fps))
    with tempfile.TemporaryDirectory(prefix="demo-kinetics-") as tmp:
        videos = os.path.join(tmp, "videos")
        os.makedirs(videos)
        rows, jobs = [], []
        for split, n in (("train", num_train), ("val", num_val)):
            for i in range(n):
                label = i % len(MOTION_CLASSES)
                youtube_id = f"demo-{split}-{i:05d}"
                path = os.path.join(videos, f"{youtube_id}_{0:06d}_{duration:06d}.mp4")
                rows.append((MOTION_CLASSES[label], youtube_id, 0, duration, split))
                jobs.append((path, seed, split, i, label, frames, size, fps))
        for _ in map_ordered(_write_clip, jobs, workers=workers, chunksize=8):
            pass
        annotations = _write_csv(
            os.path.join(tmp, "annotations.csv"), ["label", "youtube_id", "time_start", "time_end", "split"], rows
        )
        infos = {}
        for split in ("train", "val"):
            infos[split] = convert_kinetics.convert(
                annotations=annotations,
                videos=videos,
                out=os.path.join(out, split),
                split=split,
                labels=sorted(MOTION_CLASSES),
                workers=workers,
                shard_size=shard_size,
                seed=seed,
                overwrite=True,
                progress=progress,
                extra_info={"demo": settings},
            )
    return infos


# ---------------------------------------------------------------------------------------------------------------
# YouTube-8M-style features
# ---------------------------------------------------------------------------------------------------------------

# The starter code's quantization range (google/youtube-8m utils.py Dequantize: max 2, min -2); quantize inverts
# schema.dequantize: x ~ q * 4/255 + (4/512 - 2).
_Q_SCALE = 4.0 / 255.0
_Q_BIAS = 4.0 / 512.0 - 2.0


def _quantize(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((x - _Q_BIAS) / _Q_SCALE), 0, 255).astype(np.uint8)


def _class_patterns(seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(num_classes, 1024) and (num_classes, 128) patterns; each odd class shares 60% of the previous one's."""
    rng = np.random.default_rng([seed, 8, 0])
    out = []
    for dim, amplitude in ((1024, 0.09), (128, 0.16)):
        p = rng.normal(0, 1, (num_classes, dim))
        p[1::2] = 0.6 * p[0::2][: p[1::2].shape[0]] + 0.8 * p[1::2]
        out.append((amplitude * p).astype(np.float32))
    return out[0], out[1]


def render_yt8m_video(
    seed: int, split: str, index: int, patterns: tuple[np.ndarray, np.ndarray]
) -> tuple[str, list[int], np.ndarray, np.ndarray]:
    """(video id, labels, rgb uint8 (T, 1024), audio uint8 (T, 128)) of one synthetic video."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index, 8])
    rgb_p, audio_p = patterns
    num_classes = rgb_p.shape[0]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    video_id = "".join(alphabet[k] for k in rng.integers(len(alphabet), size=6)) + f"{split[0]}{index:05d}"
    t = int(rng.integers(10, 61))
    prior = 1.0 / (1.0 + np.arange(num_classes) / 4.0)  # some classes rarer than others
    k = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    labels = sorted(int(c) for c in rng.choice(num_classes, size=k, replace=False, p=prior / prior.sum()))
    feats = []
    for pat, noise in ((rgb_p, 0.5), (audio_p, 0.6)):
        x = rng.normal(0, noise, (t, pat.shape[1])) + rng.normal(0, 0.3, pat.shape[1])  # frame noise + video offset
        for c in labels:
            length = max(2, int(round(t * rng.uniform(0.3, 0.8))))
            start = int(rng.integers(0, t - length + 1))
            x[start : start + length] += rng.uniform(0.6, 1.4) * pat[c]  # the class shows for a stretch
        feats.append(_quantize(x))
    return video_id, labels, feats[0], feats[1]


def _yt8m_record(video_id: str, labels: list[int], rgb: np.ndarray, audio: np.ndarray) -> bytes:
    context = {"id": bytes_feature([video_id.encode()]), "labels": int64_feature(labels)}
    lists = {
        "rgb": [bytes_feature([row.tobytes()]) for row in rgb],
        "audio": [bytes_feature([row.tobytes()]) for row in audio],
    }
    return encode_sequence_example(context, lists)


def make_yt8m(
    out: str,
    *,
    seed: int = 0,
    num_train: int = 320,
    num_validate: int = 160,
    num_classes: int = 16,
    holdout_fraction: float = 0.5,
    train_files: int = 2,
    shard_size: int = 20,
    workers: int = 1,
    overwrite: bool | str = False,
    progress: bool = False,
) -> dict[str, DatasetInfo]:
    """Write `out`/train (train records + the rest of validate) and `out`/val (held-out validate) via convert_yt8m."""
    settings, kept = _settings_and_kept(
        "yt8m", out, overwrite, progress,
        seed=seed, num_train=num_train, num_validate=num_validate, num_classes=num_classes,
        holdout_fraction=holdout_fraction, train_files=train_files, shard_size=shard_size,
    )  # fmt: skip
    if kept is not None:
        return kept
    patterns = _class_patterns(seed, num_classes)
    with tempfile.TemporaryDirectory(prefix="demo-yt8m-") as tmp:
        train_paths = [os.path.join(tmp, f"train{j:04d}.tfrecord") for j in range(train_files)]
        validate_path = os.path.join(tmp, "validate0000.tfrecord")
        writers = [TFRecordWriter(p) for p in train_paths]
        for i in range(num_train):
            writers[i * train_files // max(1, num_train)].write(
                _yt8m_record(*render_yt8m_video(seed, "train", i, patterns))
            )
        for w in writers:
            w.close()
        with TFRecordWriter(validate_path) as w:
            for i in range(num_validate):
                w.write(_yt8m_record(*render_yt8m_video(seed, "validate", i, patterns)))
        vocabulary = _write_csv(
            os.path.join(tmp, "vocabulary.csv"), ["Index", "Name"], ([c, f"topic_{c:02d}"] for c in range(num_classes))
        )
        infos = convert_yt8m.convert(
            inputs=train_paths,
            holdout_inputs=[validate_path],
            holdout_fraction=holdout_fraction,
            out=os.path.join(out, "train"),
            holdout_out=os.path.join(out, "val"),
            num_classes=num_classes,
            vocabulary=vocabulary,
            workers=workers,
            shard_size=shard_size,
            overwrite=True,
            progress=progress,
            extra_info={"demo": settings},
        )
    return {"train": infos["main"], "val": infos["holdout"]}


# ---------------------------------------------------------------------------------------------------------------
# Pattern images
# ---------------------------------------------------------------------------------------------------------------


def render_pattern_image(seed: int, split: str, index: int, label: int, *, size: int = 32) -> np.ndarray:
    """uint8 (H, W, 3) image of class PATTERN_CLASSES[label]."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index, 10])
    name = PATTERN_CLASSES[label]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    fg = rng.uniform(0, 255, 3)
    bg = np.clip(255 - fg + rng.normal(0, 40, 3), 0, 255)
    period = rng.uniform(4.0, 9.0) * size / 32
    phase = rng.uniform(0, 2 * math.pi)
    tilt = math.radians(rng.uniform(-10, 10))
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.2, 0.35) * size
    rx, ry = xx - cx, yy - cy
    wave = lambda a: np.sin(2 * math.pi * (math.cos(a) * xx + math.sin(a) * yy) / period + phase)  # noqa: E731
    if name == "stripes_horizontal":
        m = wave(math.pi / 2 + tilt) > 0
    elif name == "stripes_vertical":
        m = wave(tilt) > 0
    elif name == "stripes_diagonal_up":
        m = wave(-math.pi / 4 + tilt) > 0
    elif name == "stripes_diagonal_down":
        m = wave(math.pi / 4 + tilt) > 0
    elif name == "checkerboard":
        m = (wave(tilt) > 0) ^ (wave(math.pi / 2 + tilt) > 0)
    elif name == "disc":
        m = rx * rx + ry * ry < radius * radius
    elif name == "ring":
        d = np.sqrt(rx * rx + ry * ry)
        m = np.abs(d - radius) < rng.uniform(1.2, 2.5) * size / 32
    elif name == "cross":
        half = rng.uniform(1.2, 2.5) * size / 32
        m = ((np.abs(rx) < half) | (np.abs(ry) < half)) & (np.maximum(np.abs(rx), np.abs(ry)) < radius * 1.3)
    elif name == "dots":
        m = (np.sin(2 * math.pi * xx / period + phase) > 0.6) & (np.sin(2 * math.pi * yy / period + phase * 0.7) > 0.6)
    else:  # square_outline
        d = np.maximum(np.abs(rx), np.abs(ry))
        m = np.abs(d - radius) < rng.uniform(1.2, 2.5) * size / 32
    img = np.where(m[..., None], fg, bg) + rng.normal(0, 14, (size, size, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def make_images(
    out: str,
    *,
    seed: int = 0,
    num_train: int = 500,
    num_val: int = 200,
    size: int = 32,
    shard_size: int = 50,
    workers: int = 1,
    overwrite: bool | str = False,
    progress: bool = False,
) -> dict[str, DatasetInfo]:
    """Write `out`/train and `out`/val (kind "image") through convert_images."""
    from PIL import Image  # a dependency of tensorboard, which video_ens requires

    settings, kept = _settings_and_kept(
        "images", out, overwrite, progress,
        seed=seed, num_train=num_train, num_val=num_val, size=size, shard_size=shard_size,
    )  # fmt: skip
    if kept is not None:
        return kept
    infos = {}
    with tempfile.TemporaryDirectory(prefix="demo-images-") as tmp:
        for split, n in (("train", num_train), ("val", num_val)):
            root = os.path.join(tmp, split)
            for cls in PATTERN_CLASSES:
                os.makedirs(os.path.join(root, cls))
            for i in range(n):
                label = i % len(PATTERN_CLASSES)
                image = Image.fromarray(render_pattern_image(seed, split, i, label, size=size))
                stem = os.path.join(root, PATTERN_CLASSES[label], f"{split}_{i:05d}")
                if i % 2 == 0:
                    image.save(stem + ".png", format="PNG", optimize=False)
                else:
                    image.save(stem + ".jpg", format="JPEG", quality=90)
            infos[split] = convert_images.convert(
                root=root,
                out=os.path.join(out, split),
                labels=list(PATTERN_CLASSES),
                workers=workers,
                shard_size=shard_size,
                seed=seed,
                overwrite=True,
                progress=progress,
                extra_info={"demo": settings},
            )
    return infos


# ---------------------------------------------------------------------------------------------------------------

MAKERS = {"kinetics": make_kinetics, "yt8m": make_yt8m, "images": make_images}
KINDS = tuple(MAKERS)


def _settings_and_kept(
    kind: str, out: str, overwrite: bool | str, progress: bool, **settings
) -> tuple[dict, dict[str, DatasetInfo] | None]:
    """The settings that a `kind` demo set records in its _info.json (extra "demo": generator, version, then the
    make_* arguments that shape the data), and the infos of `out`/{train,val} when they already hold it (None:
    generate it; see _up_to_date)."""
    settings = {"generator": f"make_demo_data.{kind}", "version": GENERATOR_VERSION, **settings}
    return settings, _up_to_date(out, ("train", "val"), settings, overwrite, progress)


def _up_to_date(
    out: str, splits: tuple[str, ...], settings: dict, overwrite: bool | str, verbose: bool = False
) -> dict[str, DatasetInfo] | None:
    """The existing infos when `out` already holds these splits made with `settings`; None to (re)generate.

    Raises FileExistsError when `out` holds data made differently and overwrite is False.
    """
    if overwrite is True:
        return None
    infos = {}
    for split in splits:
        folder = os.path.join(out, split)
        if not os.path.exists(folder):
            return None if not infos else _differs(out, "a split is missing")
        try:
            infos[split] = read_info(folder)
        except (FileNotFoundError, ValueError) as e:
            _differs(out, str(e))
        made_with = infos[split].extra.get("demo")
        if made_with != settings:
            if (
                overwrite == "stale"
                and isinstance(made_with, dict)
                and made_with.get("generator") == settings["generator"]
            ):
                if verbose:
                    print(f"{out}: made by an older generator or other settings, regenerating")
                return None  # demo data from another generator version: safe to replace
            _differs(out, f"it was made with {json.dumps(made_with)}")
    if verbose:
        print(f"{out}: up to date (seed {settings['seed']}; --overwrite regenerates it)")
    return infos


def _differs(out: str, why: str):
    raise FileExistsError(f"{out} exists but is not this demo data ({why}); pass --overwrite to regenerate it")


def _write_csv(path: str, header: list[str], rows) -> str:
    """Write a CSV file of the raw form (a converter's input); returns `path`."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path
