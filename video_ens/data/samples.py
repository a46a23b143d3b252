"""One raw shard sample into model inputs, per kind: the work a DataLoader worker does for every sample.

    spec = SampleSpec.from_config(recipe.data, num_classes)
    buffer = ClipBuffer(slots=8, frames=64, shared=True)          # one training micro-batch of clips
    key, label = train_clips(raw, spec, gens, buffer, first_slot=0, cost=cost)   # k = len(gens) views of one decode
    items = eval_items(raw, spec, view)                          # evaluation entries of one sample
    item = train_item(raw, spec, gen)                            # features and images
    batch = collate(items, spec)

Clips leave the workers as uint8 boxes cut from frames at their stored size, with the parameters of the rest of
their augmentation (`transforms.ClipAugment`); `transforms.to_model_input` finishes them on the training device.
A training micro-batch of clips is decoded straight into one `ClipBuffer` (shared memory in a worker), so the crop
copied out of each decoded frame is the only copy a clip's pixels make before the device: the DataLoader hands the
buffer over by reference, not by pickling its bytes. Features and images leave finished, as float32.

Every problem with one sample raises `BadSample` (reason, key, detail), which the streams count and skip;
`SampleStats` is that accounting, with the decoding work done (`DecodeCost`).
"""

from __future__ import annotations

import collections
import io
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from video_ens.data import remote, schema
from video_ens.data.decode import Budget, DecodeError, open_video
from video_ens.data.transforms import (
    ClipAugment,
    ClipEvalTransform,
    ClipTrainTransform,
    ColourJitter,
    ImageEvalTransform,
    ImageTrainTransform,
    sample_window,
    shifted_window,
    uniform_clips,
)

__all__ = [
    "BadSample",
    "BatchReport",
    "ClipBuffer",
    "DecodeCost",
    "EvalView",
    "ImageOverBudget",
    "Item",
    "SampleSpec",
    "SampleStats",
    "collate",
    "eval_items",
    "read_image",
    "read_shard",
    "sample_key",
    "train_clips",
    "train_item",
]

# Seconds a remote shard (a `pipe:` command, an http(s) URL) may stay silent before its read fails: botocore's
# default read timeout (what `aws s3 cp` waits) is 60 s too. config.DataConfig.read_timeout_s has the same default.
READ_TIMEOUT_S = 60.0

# Bad sample records kept in SampleStats' "last_bad".
LAST_BAD_KEPT = 10


# ---------------------------------------------------------------------------------------------------------------
# What decoding needs


@dataclass(frozen=True)
class SampleSpec:
    """The data recipe as plain values (pickled into workers when they are spawned)."""

    kind: str
    num_classes: int | None
    decoder: str
    frames: int
    frame_stride: int
    crop_size: int
    short_side: tuple[int, int]
    flip: bool
    color_jitter: float
    clip_crop: str  # "scale_jitter" | "resized_crop" (clips, training)
    crop_scale: tuple[float, float]  # resized crop: area fraction range (images; clips with "resized_crop")
    crop_ratio: tuple[float, float]  # resized crop: aspect ratio range
    # Budgets of one sample (config.DataConfig): shard member bytes, pixels of a frame, pixels one sample holds at
    # once, frames claimed. Checked from headers before anything is allocated; over budget = a bad sample ("budget").
    max_member_bytes: int = 256 << 20
    max_frame_pixels: int = 4096 * 2304
    max_clip_pixels: int = 1 << 28
    max_video_frames: int = 1_000_000
    read_timeout_s: float = READ_TIMEOUT_S  # a remote shard (pipe: or http) silent this long is a read error

    @classmethod
    def from_config(cls, data_cfg, num_classes: int | None) -> SampleSpec:
        return cls(
            kind=data_cfg.kind,
            num_classes=num_classes,
            decoder=data_cfg.decoder,
            frames=data_cfg.frames,
            frame_stride=data_cfg.frame_stride,
            crop_size=data_cfg.crop_size,
            short_side=tuple(data_cfg.short_side),
            flip=data_cfg.flip,
            color_jitter=data_cfg.color_jitter,
            clip_crop=data_cfg.clip_crop,
            crop_scale=tuple(data_cfg.crop_scale),
            crop_ratio=tuple(data_cfg.crop_ratio),
            max_member_bytes=data_cfg.max_member_bytes,
            max_frame_pixels=data_cfg.max_frame_pixels,
            max_clip_pixels=data_cfg.max_clip_pixels,
            max_video_frames=data_cfg.max_video_frames,
            read_timeout_s=data_cfg.read_timeout_s,
        )

    def budget(self) -> Budget:
        return Budget(frame_pixels=self.max_frame_pixels, clip_pixels=self.max_clip_pixels)

    def colour(self) -> ColourJitter:
        s = self.color_jitter
        return ColourJitter(s, s, s)

    def clip_transform(self) -> ClipTrainTransform:
        return ClipTrainTransform(
            crop_size=self.crop_size,
            crop=self.clip_crop,
            short_side_range=self.short_side,
            scale=self.crop_scale,
            ratio=self.crop_ratio,
            flip=self.flip,
            colour=self.colour(),
        )


@dataclass(frozen=True)
class EvalView:
    """How evaluation looks at a sample: mode "full" (the first max_frames frames, one centre crop) or "clips"
    (num_clips uniform clips x num_crops crops); clips scaled to short_side and cropped to crop_size."""

    mode: str
    num_clips: int
    num_crops: int
    max_frames: int
    short_side: int
    crop_size: int

    @classmethod
    def from_config(cls, data_cfg, eval_cfg, input_spec: dict) -> EvalView:
        """The recipe's view, as evaluation and predict both take it: a feature model reads at most the frames it
        was built for (its input_spec's max_frames), whatever eval.max_frames says."""
        max_frames = eval_cfg.max_frames
        if data_cfg.kind == "features":
            max_frames = min(max_frames, input_spec.get("max_frames", max_frames))
        short_side, crop_size = eval_cfg.view_size(data_cfg)
        return cls(
            mode=eval_cfg.mode,
            num_clips=eval_cfg.num_clips,
            num_crops=eval_cfg.num_crops,
            max_frames=max_frames,
            short_side=short_side,
            crop_size=crop_size,
        )


# ---------------------------------------------------------------------------------------------------------------
# Raw samples and bad samples


class BadSample(Exception):
    """One sample that cannot be used; `record` = {"key", "reason", "detail"} for the stream's accounting."""

    def __init__(self, reason: str, key: str, detail: str):
        super().__init__(f"{reason}: {key}: {detail}")
        self.record = {"key": key, "reason": reason, "detail": detail[:300]}


def sample_key(raw: dict) -> str:
    return str(raw.get("__key__", "<no key>"))


# The field a sample gets instead of a shard member over max_member_bytes: why, for the decoders to report.
OVER_BUDGET = "__over_budget__"


def read_shard(url: str, errors: list[dict], max_member_bytes: int = 256 << 20, *,
               read_timeout_s: float = READ_TIMEOUT_S):  # fmt: skip
    """Raw samples of one tar, in order: {"__key__", "__url__", field: bytes}. Read errors land in `errors`.

    `url`: a local path, a `pipe:` command or an http(s) URL (remote.open_stream: a command that fails, a 404, a
    connection that drops or stays silent for read_timeout_s end the shard with an error record naming it).
    A member larger than max_member_bytes is not read into memory (its size is in its tar header; a stream passes
    over its bytes in 10 KiB records): its sample carries OVER_BUDGET instead, so it is counted once, as a bad
    sample with its key, where its position in the shard still counts (evaluation splits shards by position).
    """
    from webdataset.tariterators import group_by_keys

    def handler(exn: Exception) -> bool:
        errors.append({"key": url, "reason": "shard", "detail": f"{type(exn).__name__}: {exn}"[:300]})
        return True  # go on with the next member, or the next shard

    def members():
        try:
            with remote.open_stream(url, timeout_s=read_timeout_s) as stream:
                yield from _tar_members(stream, url, max_member_bytes)
        except Exception as exn:  # unreadable, or a damaged tar (truncated, bad header): what was read stays used
            handler(exn)

    yield from group_by_keys(members(), handler=handler)


def _tar_members(stream, url: str, max_member_bytes: int):
    import re
    import tarfile

    from webdataset.tariterators import base_plus_ext

    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            # Regular files, without webdataset's "__name__" meta members (as its own expander reads a tar).
            if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                continue
            if info.size > max_member_bytes:
                key, _ = base_plus_ext(info.name)
                if key is None:
                    continue  # no extension: not part of any sample (webdataset drops it too)
                detail = (
                    f"{info.name}: {info.size} bytes, over the budget of {max_member_bytes} (data.max_member_bytes)"
                )
                yield {"fname": f"{key}.{OVER_BUDGET}", "data": detail.encode(), "__url__": url}
            else:
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # stream mode keeps every header otherwise


@dataclass
class DecodeCost:
    """Decoding work of one batch (or summed over many): seconds inside the decoder (demuxing, decoding and
    converting to RGB) and copying crops out of the decoded frames, and frames decoded against frames delivered
    (a window decoded from the keyframe before it costs the frames in between)."""

    decode_s: float = 0.0
    crop_s: float = 0.0
    frames_decoded: int = 0
    frames_delivered: int = 0

    def add(self, other: DecodeCost) -> None:
        self.decode_s += other.decode_s
        self.crop_s += other.crop_s
        self.frames_decoded += other.frames_decoded
        self.frames_delivered += other.frames_delivered


class SampleStats:
    """What a stream's batches carried: samples seen, bad ones by reason with the last few keys, decoding work.

    `as_dict()` is the streams' `stats`: {"samples", "bad", "bad_by_reason", "last_bad": [{key, reason, detail}],
    "frames_decoded", "frames_delivered", "seconds": {"decode", "crop", "batch", "batch_cpu", "wait"}}. "batch" is
    the wall time the workers spent building batches (decoding included), "batch_cpu" their CPU time, "wait" the
    time the consumer waited for batches.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.bad = 0
        self.bad_by_reason: dict[str, int] = {}
        self.last_bad: collections.deque = collections.deque(maxlen=LAST_BAD_KEPT)
        self.cost = DecodeCost()
        self.batch_s = 0.0
        self.batch_cpu_s = 0.0
        self.wait_s = 0.0

    def add(self, report: dict) -> None:
        """Fold in one batch's report (the "_report" a worker attaches, see `BatchReport`)."""
        self.samples += report["seen"]
        self.bad += len(report["bad"])
        for record in report["bad"]:
            self.bad_by_reason[record["reason"]] = self.bad_by_reason.get(record["reason"], 0) + 1
            self.last_bad.append(record)
        self.cost.add(report["cost"])
        self.batch_s += report["batch_s"]
        self.batch_cpu_s += report["batch_cpu_s"]

    def as_dict(self) -> dict[str, Any]:
        c = self.cost
        return {
            "samples": self.samples,
            "bad": self.bad,
            "bad_by_reason": dict(self.bad_by_reason),
            "last_bad": list(self.last_bad),
            "frames_decoded": c.frames_decoded,
            "frames_delivered": c.frames_delivered,
            "seconds": {
                "decode": c.decode_s,
                "crop": c.crop_s,
                "batch": self.batch_s,
                "batch_cpu": self.batch_cpu_s,
                "wait": self.wait_s,
            },
        }


class BatchReport:
    """A worker's record of building one batch: samples seen, bad ones, decoding work, wall and CPU time. The
    streams attach `finish()` to the batch as "_report" and fold it into their SampleStats."""

    def __init__(self) -> None:
        self.seen = 0
        self.bad: list[dict] = []
        self.cost = DecodeCost()
        self._wall, self._cpu = time.perf_counter(), _thread_cpu()

    def finish(self) -> dict:
        return {
            "seen": self.seen,
            "bad": self.bad,
            "cost": self.cost,
            "batch_s": time.perf_counter() - self._wall,
            "batch_cpu_s": _thread_cpu() - self._cpu,
        }


def _thread_cpu() -> float:
    usage = resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------------------------
# Clips


class Lease:
    """Hands a pooled shared-memory buffer back to the worker that filled it: `release` clears the flag byte in the
    buffer's header, after which that worker may decode the next micro-batch into it. It travels in the batch as
    "_lease" (an object, not a tensor, so pin_memory passes it through untouched); `loader` releases it when the
    batch's frames are garbage. A lease dropped unreleased by the process that received it (a restarted pass drops
    the batches prefetched for the old one unseen) releases itself; the worker's own copy, and copies that forked
    children inherit, never do."""

    def __init__(self, flag: torch.Tensor):
        self.flag = flag  # uint8 (1,) on the buffer's own storage
        self.holder: int | None = None  # the pid that received it (set when unpickled there)
        self.released = False

    def __getstate__(self) -> dict:
        return {"flag": self.flag}

    def __setstate__(self, state: dict) -> None:
        self.flag, self.holder, self.released = state["flag"], os.getpid(), False

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` still lives in the leased buffer (False after pin_memory copied it out)."""
        return tensor.untyped_storage().data_ptr() == self.flag.untyped_storage().data_ptr()

    def release(self) -> None:
        if not self.released:  # once: after that the worker may have taken the buffer again
            self.released = True
            self.flag.numpy()[0] = 0

    def __del__(self) -> None:
        try:
            if self.holder == os.getpid():
                self.release()
        except Exception:  # interpreter shutdown (modules torn down): its worker is gone as well
            pass


class _SharedPool:
    """A worker's reusable shared-memory buffers for training micro-batches. Fresh shared memory costs a page fault
    per 4 KiB on first touch, in the worker, and an unmap in the consumer: for a 64 x 224 micro-batch of 8 (~78 MB)
    that was ~5 ms of a ~43 ms clip on one core (benchmarks/results/loader_pipeline_vm_2026-12-06_pool.csv). A
    buffer is reused only after its consumer released it (`Lease`): byte 0 of its 64-byte header is 1 from the
    moment the worker takes it until then. With every buffer still held, a micro-batch gets fresh memory, as before
    the pool."""

    HEADER = 64

    def __init__(self, size: int):
        self.size = size
        self.storages: list[torch.UntypedStorage] = []
        # Per buffer, the (shape, extents) of the batch it last held, None when unknown; () for fresh memory, which
        # is all zeros. With the same shape, a slot's padding needs zeroing only where the last box reached beyond
        # the new one (zeroing all of it cost ~0.9 ms per clip).
        self.written: list[tuple[tuple[int, ...], np.ndarray | None] | None] = []

    def flag(self, index: int) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8).set_(self.storages[index], 0, (1,))

    def take(self, nbytes: int) -> int | None:
        """The index of a buffer with room for nbytes after the header, now flagged as taken (a new one if need
        be), or None when every buffer is held."""
        free = [i for i in range(len(self.storages)) if self.flag(i).numpy()[0] == 0]
        index = next((i for i in free if self.storages[i].nbytes() - self.HEADER >= nbytes), None)
        if index is None:
            if len(self.storages) < self.size:
                index = len(self.storages)
                self.storages.append(torch.UntypedStorage(0))
                self.written.append(None)
            elif free:  # a bigger box than this buffer was made for: replace it
                index = free[0]
            else:
                return None
            self.storages[index] = torch.UntypedStorage._new_shared(self.HEADER + nbytes)
            self.written[index] = ((), None)
        self.flag(index).numpy()[0] = 1
        return index


# Micro-batches a DataLoader worker builds ahead of the one being consumed (the loader's prefetch_factor). Two keep a
# worker busy while the trainer holds one batch and another waits in the queue; more only hold more shared memory (a
# 64 x 224 clip micro-batch of 8 is ~77 MB).
PREFETCH_PER_WORKER = 2
# Pooled buffers per training worker: those handed over or queued, one the consumer still holds while it waits for
# the next, one being filled.
POOL_BUFFERS = PREFETCH_PER_WORKER + 2
_pool: _SharedPool | None = None


def _worker_pool() -> _SharedPool:
    global _pool
    if _pool is None:
        _pool = _SharedPool(POOL_BUFFERS)
    return _pool


class ClipBuffer:
    """uint8 frames (slots, T, H, W, 3) that clip boxes are decoded into, one slot per clip view, each box at the
    top left of its slot and (H, W) the largest box; with the per-slot extent, flip and colour `finish_clips` needs.
    The padding around each box is zero, so a batch is the same bytes whatever memory it was built in.

    shared=True allocates in shared memory (a DataLoader worker: the batch then crosses to the main process as a
    handle, not as a pickled copy of its bytes); pooled=True (training) reuses the worker's released buffers
    (`_SharedPool`). `ensure(h, w)` grows the slots (a copy) for a box that does not fit.
    """

    def __init__(
        self, slots: int, frames: int, *, height: int = 1, width: int = 1, shared: bool | None = None,
        pooled: bool = False,
    ):  # fmt: skip
        self.shared = get_worker_info() is not None if shared is None else shared
        self.pooled = pooled and self.shared
        self._index: int | None = None  # the pool buffer in use
        self.slots, self.frames = slots, frames
        self.extent = torch.zeros((slots, 2), dtype=torch.int64)
        self.flip = torch.zeros(slots, dtype=torch.bool)
        self.colour = torch.ones((slots, 3), dtype=torch.float32)
        self._allocate(height, width)

    def _allocate(self, height: int, width: int) -> None:
        shape = (self.slots, self.frames, height, width, 3)
        nbytes = int(np.prod(shape))
        old, self._index = self._index, None
        pool = _worker_pool() if self.pooled else None
        if pool is not None:
            self._index = pool.take(nbytes)
        if old is not None:  # after the take, so the new buffer is another one (ensure copies the old one over)
            pool.written[old] = None
            pool.flag(old).numpy()[0] = 0
        self._dirty: np.ndarray | None = None  # per slot, the box that may be left over from the last batch
        if self._index is not None:
            tensor = torch.empty(0, dtype=torch.uint8).set_(pool.storages[self._index], _SharedPool.HEADER, shape)
            last = pool.written[self._index]
            self._zeroed = last is not None and last[0] == ()
            if last is not None and last[0] == shape:
                self._dirty = last[1]
        elif self.shared:
            # Straight into shared memory: share_memory_() on an ordinary tensor would copy it there once more.
            # Fresh shared memory reads as zeros, so the padding needs no writing.
            storage = torch.UntypedStorage._new_shared(nbytes)
            tensor = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
            self._zeroed = True
        else:
            tensor = torch.empty(shape, dtype=torch.uint8)
            self._zeroed = False
        self.tensor = tensor
        # Crops are copied through numpy: a torch slice copy runs through intra-op threads (decode.py: on a busy
        # 2-core machine, 300 of them took seconds against milliseconds in numpy).
        self.array = tensor.numpy()

    def ensure(self, height: int, width: int) -> None:
        _, _, h, w, _ = self.tensor.shape
        if height <= h and width <= w:
            return
        old, was_zeroed = self.array, self._zeroed
        self._allocate(max(height, h), max(width, w))
        self.array[:, :, :h, :w] = old
        # Slots not placed yet may carry a reused buffer's last pixels over: each place() zeroes all its padding.
        self._zeroed, self._dirty = was_zeroed and self._zeroed, None
        if not self._zeroed:  # the new margin is padding for the slots placed so far
            self.array[:, :, h:] = 0
            self.array[:, :, :h, w:] = 0

    def clear(self, slots: slice) -> None:
        """Zero `slots` (after a decode that failed part way: whatever fills them next starts from zeros)."""
        self.array[slots] = 0
        if self._dirty is not None:
            self._dirty[slots] = 0

    def place(self, slot: int, augment: ClipAugment) -> None:
        """Record the view in `slot`, whose box has been written, and make sure its padding is zero."""
        _, _, height, width = augment.box
        if self._dirty is not None:  # zero what is left of the last box beyond this one (the rest is zero)
            last_h, last_w = self._dirty[slot]
            self.array[slot, :, height:last_h, :last_w] = 0
            self.array[slot, :, : min(height, last_h), width:last_w] = 0
        elif not self._zeroed:
            self.array[slot, :, height:] = 0
            self.array[slot, :, :height, width:] = 0
        self.extent[slot] = torch.tensor([height, width])
        self.flip[slot] = augment.flip
        self.colour[slot] = torch.tensor(augment.colour, dtype=torch.float32)

    def batch(self, crop_size: int, *, augmented: bool) -> dict[str, Any]:
        """The loader batch's clip entries (see `transforms.to_model_input`); a pooled buffer's `Lease` rides along
        as "_lease" and the buffer is the consumer's until it releases it."""
        out: dict[str, Any] = {"inputs": self.tensor, "extent": self.extent, "crop_size": crop_size}
        if augmented:
            out.update(flip=self.flip, colour=self.colour)
        if self._index is not None:
            pool = _worker_pool()
            pool.written[self._index] = (tuple(self.tensor.shape), self.extent.numpy().copy())
            out["_lease"] = Lease(pool.flag(self._index))
            self._index = None
        return out


def _decoded(raw: dict, decode, *, label_field: str | None = None):
    """decode(raw) (a schema decoder) with its problems as BadSample: a member over max_member_bytes ("budget"), a
    bad label field ("label"), anything else ("format")."""
    if OVER_BUDGET in raw:
        raise BadSample("budget", sample_key(raw), raw[OVER_BUDGET].decode(errors="replace"))
    try:
        return decode(raw)
    except schema.SampleError as e:
        reason = "label" if label_field is not None and e.field == label_field else "format"
        raise BadSample(reason, sample_key(raw), str(e)) from None


def _frames_within_budget(key: str, frames: int, spec: SampleSpec) -> None:
    if frames > spec.max_video_frames:
        raise BadSample(
            "budget", key, f"claims {frames} frames, over the budget of {spec.max_video_frames} (data.max_video_frames)"
        )


def _video(raw: dict, spec: SampleSpec) -> schema.VideoSample:
    sample = _decoded(raw, schema.decode_video_sample)
    _label(sample.label, sample.key, spec.num_classes)
    _frames_within_budget(sample.key, sample.num_frames, spec)
    return sample


def _check_clip_pixels(key: str, clips: int, frames: int, height: int, width: int, spec: SampleSpec) -> None:
    """Before allocating (or growing a micro-batch buffer to) clips x frames boxes of height x width."""
    pixels = clips * frames * height * width
    if pixels > spec.max_clip_pixels:
        raise BadSample(
            "budget",
            key,
            f"{clips} x {frames} frames of {width}x{height} are {pixels:,} pixels, over "
            f"the budget of {spec.max_clip_pixels:,} (data.max_clip_pixels)",
        )


def _label(value: int, key: str, num_classes: int | None) -> int:
    if num_classes is not None and value >= num_classes:
        raise BadSample("label", key, f"label {value} outside the label map of {num_classes} classes")
    return value


def _decode_views(
    sample: schema.VideoSample,
    reader,
    views: list[tuple[list[int], tuple[int, int, int, int]]],
    out: np.ndarray,
    cost: DecodeCost,
) -> None:
    """Decode each frame the views need once and copy every view's box of it into out[view, t] (views: frame
    indices and box in stored pixels; out: (views, T, H, W, 3) with H, W >= every box). The crop copy is the only
    copy of the pixels: the decoder's RGB frame is read in place."""
    places: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)  # frame index -> [(view, t)]
    for v, (indices, _) in enumerate(views):
        for t, index in enumerate(indices):
            places[index].append((v, t))
    wanted = sorted(places)
    crop_s = 0.0

    def sink(position: int, rgb: np.ndarray) -> None:
        nonlocal crop_s
        start = time.perf_counter()
        for v, t in places[wanted[position]]:
            top, left, height, width = views[v][1]
            out[v, t, :height, :width] = rgb[top : top + height, left : left + width]
        crop_s += time.perf_counter() - start

    start = time.perf_counter()
    before = reader.frames_decoded
    try:
        reader.read(wanted, sink)
    except DecodeError as e:
        raise BadSample("decode", sample.key, str(e)) from None
    finally:
        cost.decode_s += time.perf_counter() - start - crop_s
        cost.crop_s += crop_s
        cost.frames_decoded += reader.frames_decoded - before
    cost.frames_delivered += sum(len(indices) for indices, _ in views)


def _open(sample: schema.VideoSample, spec: SampleSpec, cost: DecodeCost):
    """The sample's reader; opening (stream probing) counts as decoder time in `cost`."""
    start = time.perf_counter()
    try:
        return open_video(sample.video, backend=spec.decoder, budget=spec.budget())
    except DecodeError as e:
        raise BadSample("decode", sample.key, str(e)) from None
    finally:
        cost.decode_s += time.perf_counter() - start


def train_clips(
    raw: dict, spec: SampleSpec, gens: list[torch.Generator], buffer: ClipBuffer, first_slot: int, cost: DecodeCost
) -> tuple[str, int]:
    """k = len(gens) training views of one video into slots first_slot .. first_slot + k - 1 of `buffer`, from one
    decode; returns (key, label). Raises BadSample.

    View j draws everything from gens[j]: view 0 its window (uniform over the video), each further view a window
    shifted back by up to the frames the decoder passes through anyway before view 0's window (its keyframe
    interval), then each view its box, flip and colour (`ClipTrainTransform.draw`). So the k views differ in crop,
    scale, flip, colour and, within the decoded span, time; k = 1 is the ordinary single clip.
    """
    sample = _video(raw, spec)
    with _open(sample, spec, cost) as reader:
        first = sample_window(sample.num_frames, spec.frames, spec.frame_stride, gens[0])
        windows = [first]
        if len(gens) > 1:
            start = time.perf_counter()
            try:
                lowest = reader.decode_start(first[0])
            except DecodeError as e:
                raise BadSample("decode", sample.key, str(e)) from None
            cost.decode_s += time.perf_counter() - start
            windows += [shifted_window(first, lowest, sample.num_frames, spec.frame_stride, g) for g in gens[1:]]
        transform = spec.clip_transform()
        augments = [transform.draw(reader.height, reader.width, gen) for gen in gens]
        height, width = max(a.box[2] for a in augments), max(a.box[3] for a in augments)
        _check_clip_pixels(sample.key, buffer.slots, spec.frames, height, width, spec)
        buffer.ensure(height, width)
        slots = slice(first_slot, first_slot + len(gens))
        _decode_views(
            sample, reader, [(w, a.box) for w, a in zip(windows, augments, strict=True)], buffer.array[slots], cost
        )
    for j, augment in enumerate(augments):
        buffer.place(first_slot + j, augment)
    return sample.key, sample.label


# ---------------------------------------------------------------------------------------------------------------
# Features and images


@dataclass
class Item:
    """One model input before collation."""

    key: str
    inputs: torch.Tensor  # uint8 (T, h, w, 3) clip box, float (T, D) features, float (3, S, S) image
    target: Any  # int label, or (C,) float multi-hot
    length: int | None = None  # valid frames (features)
    view: int | None = None  # clip x crop index (eval mode "clips")
    extent: tuple[int, int] | None = None  # clips: (h, w) of the box


def _yt8m(raw: dict, spec: SampleSpec) -> schema.YT8MSample:
    num_classes = spec.num_classes or schema.YT8M_NUM_CLASSES
    sample = _decoded(raw, lambda r: schema.decode_yt8m_sample(r, num_classes=num_classes), label_field="json.labels")
    if sample.num_frames == 0:
        raise BadSample("format", sample_key(raw), "no frames")
    _frames_within_budget(sample.key, sample.num_frames, spec)
    return sample


def _features(sample: schema.YT8MSample, rows: np.ndarray | slice) -> torch.Tensor:
    """Dequantized rgb then audio of the chosen frames: float32 (n, 1152)."""
    feats = np.concatenate([schema.dequantize(sample.rgb[rows]), schema.dequantize(sample.audio[rows])], axis=1)
    if not np.isfinite(feats).all():
        raise BadSample("nonfinite", sample.key, "features hold NaN or inf")
    return torch.from_numpy(feats)


def _multi_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes, dtype=torch.float32)
    target[torch.from_numpy(labels)] = 1.0
    return target


class ImageOverBudget(ValueError):
    """An image whose header gives more pixels than data.max_frame_pixels; nothing of it was decoded."""


def read_image(source: Any, max_pixels: int) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an image file or file object, turned the way its EXIF orientation says (phone photos
    are stored turned): what training, evaluation and predict all see. ImageOverBudget from the header's size, else
    whatever Pillow raises on the bytes."""
    from PIL import Image, ImageOps

    with Image.open(source) as im:
        width, height = im.size  # from the header: nothing is decoded yet
        if width * height > max_pixels:
            raise ImageOverBudget(
                f"{width}x{height} image, over the budget of {max_pixels:,} pixels (data.max_frame_pixels)"
            )
        ImageOps.exif_transpose(im, in_place=True)
        return np.array(im.convert("RGB"))


def _image(raw: dict, spec: SampleSpec) -> tuple[schema.ImageSample, torch.Tensor]:
    """The image sample and its pixels, uint8 (H, W, 3) RGB."""
    sample = _decoded(raw, schema.decode_image_sample)
    _label(sample.label, sample.key, spec.num_classes)
    try:
        pixels = read_image(io.BytesIO(sample.image), spec.max_frame_pixels)
    except ImageOverBudget as e:
        raise BadSample("budget", sample.key, str(e)) from None
    except Exception as e:
        # Anything Pillow raises on the sample's bytes is the sample's fault: besides OSError and ValueError, damaged
        # PNGs raise SyntaxError, and truncated or hostile files struct.error, IndexError, MemoryError and more.
        raise BadSample("decode", sample.key, f"{type(e).__name__}: {e}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise BadSample("decode", sample.key, f"decoded to an array of shape {pixels.shape}")
    return sample, torch.from_numpy(pixels)


def train_item(raw: dict, spec: SampleSpec, gen: torch.Generator) -> Item:
    """One augmented training sample of features or an image; every random draw comes from `gen`, in a fixed order."""
    if spec.kind == "features":
        sample = _yt8m(raw, spec)
        n = sample.num_frames
        if n <= spec.frames:
            rows = np.arange(n)
        else:
            rows = torch.randperm(n, generator=gen)[: spec.frames].sort().values.numpy()
        feats = _features(sample, rows)
        return Item(sample.key, feats, _multi_hot(sample.labels, spec.num_classes), length=len(rows))
    if spec.kind != "image":
        raise ValueError(f"train_item takes features or images; clips go through train_clips, got {spec.kind!r}")
    sample, pixels = _image(raw, spec)
    transform = ImageTrainTransform(
        crop_size=spec.crop_size, scale=spec.crop_scale, ratio=spec.crop_ratio, flip=spec.flip, colour=spec.colour()
    )
    return Item(sample.key, transform(pixels, gen), sample.label)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def eval_items(raw: dict, spec: SampleSpec, view: EvalView, cost: DecodeCost | None = None) -> list[Item]:
    """The evaluation entries of one sample: one, or num_clips x num_crops views of a clip in mode "clips".

    Clips: mode "full" takes every frame_stride-th frame (the frame rate the model was trained at), at most
    max_frames of them, with the centre crop; mode "clips" decodes the frames of all clips once.
    """
    cost = cost if cost is not None else DecodeCost()
    if spec.kind == "clip":
        sample = _video(raw, spec)
        if view.mode == "full":
            clips = [list(range(0, sample.num_frames, spec.frame_stride)[: view.max_frames])]  # range slices lazily
            transform = ClipEvalTransform(short_side=view.short_side, crop_size=view.crop_size, num_crops=1)
        else:
            clips = uniform_clips(sample.num_frames, spec.frames, spec.frame_stride, view.num_clips)
            transform = ClipEvalTransform(
                short_side=view.short_side, crop_size=view.crop_size, num_crops=view.num_crops
            )
        with _open(sample, spec, cost) as reader:
            boxes = transform.boxes(reader.height, reader.width)
            views = [(indices, box) for indices in clips for box in boxes]
            height, width = max(b[2] for b in boxes), max(b[3] for b in boxes)
            _check_clip_pixels(sample.key, len(views), len(clips[0]), height, width, spec)
            out = np.empty((len(views), len(clips[0]), height, width, 3), dtype=np.uint8)
            _decode_views(sample, reader, views, out, cost)
        multi = view.mode == "clips"
        return [
            Item(
                sample.key,
                torch.from_numpy(out[v, :, : box[2], : box[3]]),
                sample.label,
                view=v if multi else None,
                extent=(box[2], box[3]),
            )
            for v, (_, box) in enumerate(views)
        ]
    if spec.kind == "features":
        sample = _yt8m(raw, spec)
        n = min(sample.num_frames, view.max_frames)
        feats = _features(sample, slice(0, n))
        return [Item(sample.key, feats, _multi_hot(sample.labels, spec.num_classes), length=n)]
    sample, pixels = _image(raw, spec)
    transform = ImageEvalTransform(short_side=view.short_side, crop_size=view.crop_size)
    return [Item(sample.key, transform(pixels), sample.label)]


def collate(items: list[Item], spec: SampleSpec, *, pad_to: int | None = None, crop_size: int | None = None) -> dict:
    """A batch of items: features zero-padded to `pad_to` frames (default: the longest) with "lengths"; clip boxes
    placed into one ClipBuffer (with their extents; "crop_size" the size they are resized to on the device)."""
    batch: dict[str, Any] = {"ids": [it.key for it in items]}
    if spec.kind == "features":
        lengths = torch.tensor([it.length for it in items], dtype=torch.int64)
        frames = pad_to if pad_to is not None else int(lengths.max())
        inputs = torch.zeros((len(items), frames, items[0].inputs.shape[-1]), dtype=torch.float32)  # (B, T, D)
        for b, it in enumerate(items):
            inputs[b, : it.length] = it.inputs
        batch.update(inputs=inputs, lengths=lengths, target=torch.stack([it.target for it in items]))
    elif spec.kind == "clip":
        buffer = ClipBuffer(
            len(items),
            items[0].inputs.shape[0],
            height=max(it.extent[0] for it in items),
            width=max(it.extent[1] for it in items),
        )
        for b, it in enumerate(items):
            h, w = it.extent
            buffer.array[b, :, :h, :w] = it.inputs.numpy()
            buffer.place(b, ClipAugment((0, 0, h, w)))
        batch.update(buffer.batch(crop_size or spec.crop_size, augmented=False))
        batch["target"] = torch.tensor([it.target for it in items], dtype=torch.int64)
    else:
        batch["inputs"] = torch.stack([it.inputs for it in items])  # (B, 3, S, S)
        batch["target"] = torch.tensor([it.target for it in items], dtype=torch.int64)
    if items[0].view is not None:
        batch["view_ids"] = torch.tensor([it.view for it in items], dtype=torch.int64)
    return batch
