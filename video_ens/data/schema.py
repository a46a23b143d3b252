"""Shard formats: the sample layout of each dataset kind, the `_info.json` index, and typed decoding of samples.

A dataset is one folder:

    <folder>/<prefix>-000000.tar, <prefix>-000001.tar, ...   WebDataset shards (plain, uncompressed tar)
    <folder>/_info.json                                       written last: its presence means "complete"

Inside a shard, a sample is the group of members sharing a key, `<key>.<field>` (the WebDataset convention: the key
is the member name up to the first dot of its last path component, the field is the rest). Nothing is pickled:
arrays are `.npy` written with `allow_pickle=False`, metadata is JSON, labels are ASCII integers.

kind "video" (Kinetics-style clips)
    <key>.mp4 | .webm | .mkv | .avi | .mov   the encoded clip, bytes as the converter wrote them (one of these)
    <key>.cls                                label index, ASCII decimal (index into `label_names`)
    <key>.json                               {"video_id": str, "fps": float, "num_frames": int,
                                              "width": int, "height": int, "source": str}

kind "yt8m" (YouTube-8M frame-level features)
    <key>.rgb.npy                            uint8 (T, 1024): quantized visual features, one row per second
    <key>.audio.npy                          uint8 (T, 128): quantized audio features
    <key>.json                               {"video_id": str, "labels": [int, ...]}   (positive class indices)

kind "image" (class-per-folder image sets)
    <key>.jpg | .png | .webp | .bmp | .gif | .tiff   the encoded image, bytes as found (field named by the real format)
    <key>.cls                                label index, ASCII decimal
    <key>.json                               {"source": str}   (path relative to the converted tree)

`_info.json` (see `DatasetInfo`): format version, kind, number of samples, each shard's name and sample count, the
label map (`label_names`, `num_classes`), what was skipped and why, and the converter with its version and
arguments.

Readers (the loader) get samples as dicts of bytes, `{"__key__": ..., "cls": b"3", ...}`, and turn them into typed
records with `decode_video_sample` / `decode_yt8m_sample` / `decode_image_sample`; every problem is a
`SampleError` naming the sample key and the field.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "INFO_NAME",
    "KINDS",
    "VIDEO_EXTS",
    "IMAGE_EXTS",
    "YT8M_NUM_CLASSES",
    "YT8M_RGB_DIM",
    "YT8M_AUDIO_DIM",
    "DatasetInfo",
    "ShardInfo",
    "SampleError",
    "VideoSample",
    "YT8MSample",
    "ImageSample",
    "decode_image_sample",
    "decode_sample",
    "decode_video_sample",
    "decode_yt8m_sample",
    "dequantize",
    "encode_image_sample",
    "encode_video_sample",
    "encode_yt8m_sample",
    "load_label_names",
    "make_key",
    "npy_bytes",
    "read_info",
    "shard_paths",
    "sort_label_names",
]

FORMAT_VERSION = 1
INFO_NAME = "_info.json"
KINDS = ("video", "yt8m", "image")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
IMAGE_EXTS = ("jpg", "png", "webp", "bmp", "gif", "tiff")
# YouTube-8M (2018 release): 3862 classes; 1024-d visual (Inception + PCA) and 128-d audio (VGGish) per second.
YT8M_NUM_CLASSES = 3862
YT8M_RGB_DIM = 1024
YT8M_AUDIO_DIM = 128


class SampleError(ValueError):
    """A sample that does not follow its kind's layout; names the sample key and the field."""

    def __init__(self, key: str, field_name: str, problem: str):
        self.key = key
        self.field = field_name
        self.problem = problem
        super().__init__(f"sample {key!r}, field {field_name!r}: {problem}")


# ---------------------------------------------------------------------------------------------------------------
# Keys and field encodings
# ---------------------------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(index: int | str, ident: str = "") -> str:
    """A WebDataset key: `index` (unique within the dataset) plus a readable, sanitised part of `ident`.

    Keys may not contain dots (WebDataset splits key and field at the first dot) or slashes; anything outside
    [A-Za-z0-9_-] becomes "_", and the readable part is cut to 48 characters.
    """
    prefix = f"{index:08d}" if isinstance(index, int) else _UNSAFE.sub("_", str(index))
    tail = _UNSAFE.sub("_", ident)[:48].strip("_")
    return f"{prefix}_{tail}" if tail else prefix


def _json_bytes(obj: Mapping[str, Any]) -> bytes:
    # Sorted keys and fixed separators: the same sample always gives the same bytes.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def npy_bytes(array: np.ndarray) -> bytes:
    """`.npy` bytes of a plain (non-object) array; pickling is refused."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise TypeError(f"cannot store an object array ({array.dtype}) in a shard: shards never hold pickles")
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)
    return stream.getvalue()


def _label_bytes(label: int) -> bytes:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
        raise ValueError(f"label must be a non-negative int, got {label!r}")
    return str(int(label)).encode("ascii")


def encode_video_sample(
    *,
    key: str,
    video: bytes,
    container: str,
    label: int,
    video_id: str,
    fps: float,
    num_frames: int,
    width: int,
    height: int,
    source: str = "",
) -> dict[str, bytes | str]:
    """Sample dict (field -> bytes) of kind "video", ready for the shard writer."""
    if container not in VIDEO_EXTS:
        raise ValueError(f"container must be one of {VIDEO_EXTS}, got {container!r}")
    meta = {
        "video_id": str(video_id),
        "fps": float(fps),
        "num_frames": int(num_frames),
        "width": int(width),
        "height": int(height),
        "source": str(source),
    }
    return {"__key__": key, container: bytes(video), "cls": _label_bytes(label), "json": _json_bytes(meta)}


def encode_yt8m_sample(
    *, key: str, video_id: str, rgb: np.ndarray, audio: np.ndarray, labels: list[int] | np.ndarray
) -> dict[str, bytes | str]:
    """Sample dict of kind "yt8m": rgb uint8 (T, 1024), audio uint8 (T, 128), labels = positive class indices."""
    rgb, audio = np.asarray(rgb), np.asarray(audio)
    for name, arr, dim in (("rgb", rgb, YT8M_RGB_DIM), ("audio", audio, YT8M_AUDIO_DIM)):
        if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != dim:
            raise ValueError(f"{name} must be uint8 (T, {dim}), got {arr.dtype} {arr.shape}")
    if rgb.shape[0] != audio.shape[0]:
        raise ValueError(f"rgb has {rgb.shape[0]} frames but audio has {audio.shape[0]}")
    meta = {"video_id": str(video_id), "labels": [int(v) for v in labels]}
    return {"__key__": key, "rgb.npy": npy_bytes(rgb), "audio.npy": npy_bytes(audio), "json": _json_bytes(meta)}


def encode_image_sample(*, key: str, image: bytes, format: str, label: int, source: str = "") -> dict[str, bytes | str]:
    """Sample dict of kind "image"; `format` is the field name, one of IMAGE_EXTS."""
    if format not in IMAGE_EXTS:
        raise ValueError(f"format must be one of {IMAGE_EXTS}, got {format!r}")
    return {"__key__": key, format: bytes(image), "cls": _label_bytes(label), "json": _json_bytes({"source": source})}


# ---------------------------------------------------------------------------------------------------------------
# Typed decoding
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoSample:
    key: str
    video: bytes  # the encoded clip
    container: str  # its field name / file extension, one of VIDEO_EXTS
    label: int
    video_id: str
    fps: float
    num_frames: int
    width: int
    height: int


@dataclass(frozen=True)
class YT8MSample:
    key: str
    video_id: str
    rgb: np.ndarray  # uint8 (T, 1024), quantized: see `dequantize`
    audio: np.ndarray  # uint8 (T, 128)
    labels: np.ndarray  # int64 (L,), positive class indices, sorted as stored

    @property
    def num_frames(self) -> int:
        return int(self.rgb.shape[0])


@dataclass(frozen=True)
class ImageSample:
    key: str
    image: bytes  # the encoded image
    format: str  # one of IMAGE_EXTS
    label: int


def _key_of(sample: Mapping[str, Any]) -> str:
    key = sample.get("__key__", "<no __key__>")
    url = sample.get("__url__")
    return f"{key} (in {url})" if url else str(key)


def _get(sample: Mapping[str, Any], key: str, name: str) -> bytes:
    if name not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError(key, name, f"missing (fields present: {present})")
    value = sample[name]
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise SampleError(key, name, f"expected raw bytes, got {type(value).__name__} (read shards without a decoder)")
    return bytes(value)


def _one_of(sample: Mapping[str, Any], key: str, exts: tuple[str, ...], what: str) -> tuple[str, bytes]:
    found = [e for e in exts if e in sample]
    if len(found) != 1:
        problem = "missing" if not found else f"several present: {found}"
        raise SampleError(key, "|".join(exts), f"{what}: {problem}")
    return found[0], _get(sample, key, found[0])


def _int_field(sample: Mapping[str, Any], key: str, name: str) -> int:
    raw = _get(sample, key, name)
    try:
        text = raw.decode("ascii").strip()
        value = int(text)
    except (UnicodeDecodeError, ValueError):
        raise SampleError(key, name, f"expected an ASCII integer, got {raw[:32]!r}") from None
    if value < 0:
        raise SampleError(key, name, f"expected a non-negative label, got {value}")
    return value


def _json_field(sample: Mapping[str, Any], key: str, required: Mapping[str, type | tuple[type, ...]]) -> dict:
    raw = _get(sample, key, "json")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: "[[[[..." nested deep
        raise SampleError(key, "json", f"not valid UTF-8 JSON: {e}") from None
    if not isinstance(meta, dict):
        raise SampleError(key, "json", f"expected a JSON object, got {type(meta).__name__}")
    for name, types in required.items():
        if name not in meta:
            raise SampleError(key, f"json.{name}", f"missing (keys present: {sorted(meta)})")
        value = meta[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise SampleError(key, f"json.{name}", f"expected {types}, got {value!r}")
    return meta


def _npy_field(sample: Mapping[str, Any], key: str, name: str, dim: int) -> np.ndarray:
    """The (T, dim) uint8 array of a .npy member, as a read-only view of its bytes.

    The header is read and checked first, then the data must be exactly the bytes it promises: np.load allocates
    what the header claims before reading, so a 100-byte file claiming (2^40, 1024) raised MemoryError."""
    raw = _get(sample, key, name)
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"format version {version}")  # 3.0 only holds structured dtypes
    except Exception as e:  # numpy's header parser on the sample's bytes: ValueError, SyntaxError, ... all mean bad
        raise SampleError(key, name, f"not a plain .npy array: {type(e).__name__}: {e}") from None
    if dtype.hasobject:
        raise SampleError(key, name, "not a plain .npy array: it holds pickled objects, which are never loaded")
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != dim:
        raise SampleError(key, name, f"expected uint8 (T, {dim}), got {dtype} {shape}")
    offset = stream.tell()
    if len(raw) - offset != shape[0] * dim:
        raise SampleError(
            key, name, f"header promises {shape[0]} x {dim} bytes of data, the file holds {len(raw) - offset}"
        )
    data = np.frombuffer(raw, dtype=np.uint8, count=shape[0] * dim, offset=offset)
    return data.reshape(shape[::-1]).T if fortran else data.reshape(shape)


def decode_video_sample(sample: Mapping[str, Any]) -> VideoSample:
    key = _key_of(sample)
    container, video = _one_of(sample, key, VIDEO_EXTS, "encoded clip")
    label = _int_field(sample, key, "cls")
    meta = _json_field(
        sample,
        key,
        {"video_id": str, "fps": (int, float), "num_frames": int, "width": int, "height": int},
    )
    if meta["num_frames"] <= 0:
        raise SampleError(key, "json.num_frames", f"must be positive, got {meta['num_frames']}")
    if meta["fps"] <= 0:
        raise SampleError(key, "json.fps", f"must be positive, got {meta['fps']}")
    return VideoSample(
        key=str(sample.get("__key__", "")),
        video=video,
        container=container,
        label=label,
        video_id=meta["video_id"],
        fps=float(meta["fps"]),
        num_frames=meta["num_frames"],
        width=meta["width"],
        height=meta["height"],
    )


def decode_yt8m_sample(sample: Mapping[str, Any], *, num_classes: int = YT8M_NUM_CLASSES) -> YT8MSample:
    key = _key_of(sample)
    rgb = _npy_field(sample, key, "rgb.npy", YT8M_RGB_DIM)
    audio = _npy_field(sample, key, "audio.npy", YT8M_AUDIO_DIM)
    if rgb.shape[0] != audio.shape[0]:
        raise SampleError(key, "audio.npy", f"has {audio.shape[0]} frames but rgb.npy has {rgb.shape[0]}")
    meta = _json_field(sample, key, {"video_id": str, "labels": list})
    labels = meta["labels"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_classes for v in labels):
        raise SampleError(key, "json.labels", f"expected class indices in [0, {num_classes}), got {labels[:10]!r}")
    return YT8MSample(
        key=str(sample.get("__key__", "")),
        video_id=meta["video_id"],
        rgb=rgb,
        audio=audio,
        labels=np.asarray(labels, dtype=np.int64),
    )


def decode_image_sample(sample: Mapping[str, Any]) -> ImageSample:
    key = _key_of(sample)
    fmt, image = _one_of(sample, key, IMAGE_EXTS, "encoded image")
    return ImageSample(
        key=str(sample.get("__key__", "")), image=image, format=fmt, label=_int_field(sample, key, "cls")
    )


def decode_sample(kind: str, sample: Mapping[str, Any]) -> VideoSample | YT8MSample | ImageSample:
    if kind == "video":
        return decode_video_sample(sample)
    if kind == "yt8m":
        return decode_yt8m_sample(sample)
    if kind == "image":
        return decode_image_sample(sample)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def dequantize(feat, max_quantized_value: float = 2.0, min_quantized_value: float = -2.0):
    """Map YouTube-8M's uint8 features back to floats, as the starter code does (google/youtube-8m, utils.py).

    x = q * (max - min) / 255 + (max - min) / 512 + min: the 256 codes split [min, max] into steps of (max-min)/255,
    offset by about half a step. Works on numpy arrays (float32 result) and torch tensors (float32 result).
    """
    if not max_quantized_value > min_quantized_value:
        raise ValueError(f"max_quantized_value ({max_quantized_value}) must exceed min_quantized_value")
    span = max_quantized_value - min_quantized_value
    scalar = span / 255.0
    bias = span / 512.0 + min_quantized_value
    if hasattr(feat, "float") and not isinstance(feat, np.ndarray):  # a torch tensor; torch is not imported here
        return feat.float() * scalar + bias
    return np.asarray(feat, dtype=np.float32) * np.float32(scalar) + np.float32(bias)


# ---------------------------------------------------------------------------------------------------------------
# _info.json
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    name: str  # file name inside the dataset folder
    count: int  # samples in this shard
    bytes: int = 0  # file size


@dataclass
class DatasetInfo:
    """The contents of `_info.json`."""

    kind: str
    num_samples: int
    shards: list[ShardInfo]
    num_classes: int
    label_names: list[str] | None  # index -> class name; None when the source has no names (YouTube-8M ids only)
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{"source": ..., "reason": ...}]
    converter: dict[str, Any] = field(default_factory=dict)  # {"name", "version", "args"}
    extra: dict[str, Any] = field(default_factory=dict)  # converter-specific facts (e.g. the demo generator's seed)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = INFO_NAME) -> DatasetInfo:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{where}: format_version {version!r}, this video_ens reads {FORMAT_VERSION}: reconvert the dataset"
            )
        try:
            shards = [ShardInfo(**s) for s in raw.pop("shards")]
            info = cls(shards=shards, **raw)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: malformed ({e})") from None
        info.validate(where=where)
        return info

    def validate(self, *, where: str = INFO_NAME) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        total = sum(s.count for s in self.shards)
        if total != self.num_samples:
            raise ValueError(f"{where}: shard counts add up to {total}, num_samples says {self.num_samples}")
        if self.label_names is not None and len(self.label_names) != self.num_classes:
            raise ValueError(f"{where}: {len(self.label_names)} label_names for num_classes={self.num_classes}")

    def summary(self) -> str:
        lines = [
            f"{self.kind} dataset: {self.num_samples} samples in {len(self.shards)} shards, "
            f"{sum(s.bytes for s in self.shards) / 1e6:.1f} MB, {self.num_classes} classes, "
            f"{len(self.skipped)} skipped"
        ]
        reasons: dict[str, int] = {}
        for s in self.skipped:
            reason = s.get("reason", "?").split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
        lines += [f"  skipped {n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def read_info(folder: str | os.PathLike) -> DatasetInfo:
    """Read and check `<folder>/_info.json`; every listed shard must exist."""
    folder = os.fspath(folder)
    path = os.path.join(folder, INFO_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {folder} is not a converted dataset, or its conversion did not finish "
            "(run the converter again)"
        )
    with open(path, encoding="utf-8") as f:
        info = DatasetInfo.from_json(f.read(), where=path)
    for s in info.shards:
        if not os.path.isfile(os.path.join(folder, s.name)):
            raise FileNotFoundError(f"{path} lists {s.name}, which is missing from {folder}")
    return info


def sort_label_names(names) -> list[str]:
    """Sorted class names; names that are all integers ("0", "2", "10") sort numerically."""
    names = set(names)
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def load_label_names(spec: str | os.PathLike) -> list[str]:
    """Class names from a text file (one per line), a converted dataset folder, or a dataset's `_info.json`.

    Converting val with train's label map (`--labels data/x/train`) keeps the class indices of the two equal.
    """
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        names = read_info(spec).label_names
    elif os.path.basename(spec) == INFO_NAME:
        names = read_info(os.path.dirname(spec) or ".").label_names
    else:
        with open(spec, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"labels {spec}: no class names found")
    if len(set(names)) != len(names):
        raise ValueError(f"labels {spec}: duplicate class names")
    return list(names)


def shard_paths(folder: str | os.PathLike) -> list[str]:
    """Paths of the dataset's shards, in order, as listed in its `_info.json`."""
    folder = os.fspath(folder)
    return [os.path.join(folder, s.name) for s in read_info(folder).shards]
