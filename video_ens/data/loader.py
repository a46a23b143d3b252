"""Training and evaluation streams over WebDataset shards: clips (Kinetics), frame features (YouTube-8M), images.

    paths = resolve_paths(recipe.data)
    check_compatible(recipe.data, recipe.model.name, model.input_spec)
    train = train_stream(recipe.data, input_spec=..., micro_batch_size=8, rank=r, world_size=n, seed=0, root=paths)
    for batch in train.batches(epoch, start): ...      # {"inputs", "target", "ids"[, "lengths"]}; clips: uint8
    val = eval_stream(recipe.data, recipe.eval, input_spec=..., rank=r, world_size=n, root=paths)
    for batch in val.batches(): ...                    # every evaluation sample exactly once across ranks

Training: a pure function of (seed, rank, epoch, position)
----------------------------------------------------------
`TrainStream.batches(epoch, start)` yields micro-batches `start, start + 1, ...` of one nominal epoch, and micro-batch
k is the same tensor bit for bit whether the iterator began at 0 or at k. That is what lets a killed run resume at
the micro-batch its checkpoint recorded and reproduce the uninterrupted per-step losses (WebDataset has no
mid-epoch resume state of its own, webdataset/webdataset#271). How:

* Streams. A rank reads W = max(1, data.num_workers) independent sample streams; micro-batch k is built from
  stream k % W, as its (k // W)-th batch of B consecutive samples. DataLoader worker w is handed stream
  (w + start) % W, so the in-order DataLoader, which asks workers 0, 1, ... in turn, returns k = start, start+1, ...
  The stream therefore also depends on data.num_workers: resume with the recipe the checkpoint holds.
* Shards. Each stream is endless. Pass c over the shards draws a permutation of all shards from (seed, epoch, c),
  the same on every rank, and deals it out to the R x W (rank, stream) slots: with at least R x W shards, ranks
  read disjoint shards within a pass. This is WebDataset's resampled-shards scheme (the maintainer's advice for
  multi-node training, webdataset/webdataset#434: a fixed nominal epoch set on the loader, not on the dataset, so
  no rank runs out early and hangs the others in all-reduce, #225) drawn without replacement, so every shard is
  read equally often. The nominal epoch is data.samples_per_epoch (default: the dataset's size).
* Shuffle. Samples pass through a buffer (per-kind size below) shuffled by an RNG of (seed, rank, epoch, stream),
  emptied at the end of each pass. An epoch that fits in one pass (data.samples_per_epoch at most the dataset size,
  shards of equal size, at least R x W shards) therefore shows each rank a disjoint part of the data.
* Skipping. To start at k, a stream first reads its first k // W batches of raw tar samples and throws them away
  without decoding: tar reading runs at ~1 GB/s here (design/environment.md), while decoding and augmenting one
  32-frame 224x224 clip from 340x256 H.264 costs ~105 ms of a core.
* Augmentation. Slot i of micro-batch k draws every random choice (window, scale, crop, flip, colour, frames) from
  a torch.Generator seeded by a hash of (seed, rank, epoch, k, i), so it never depends on what came before.
* Bad samples (DecodeError, SampleError, a label outside the label map, non-finite features, an unreadable tar
  member) are counted in `TrainStream.stats` with their key and reason. A micro-batch always has B samples: a bad
  slot is refilled with another good sample of the same micro-batch, decoded again under the bad slot's own
  generator; a micro-batch whose every slot is bad (likely only with B of 1 or 2) refills from the first samples of
  randomly chosen shards (seeded by k; reading a tar's head is cheap). A refill never depends on the stream before
  the micro-batch, so skipping stays decode-free. When more than data.max_skip_fraction of the samples seen
  (after 100) were bad, the stream raises RuntimeError rather than train on what is left.
  A clip shorter than its window is not bad: the window loops (transforms.sample_window).

Workers are forked (cheap: no re-import of torch and PyAV, which costs seconds per worker when spawned) and not
persistent: each `batches()` call forks a fresh set, and no decoder object exists before the fork (decode_frames
opens one per sample, single-threaded, as torchcodec's and PyAV's users learned to, meta-pytorch/torchcodec#766).
The DataLoader gets its own torch.Generator, so iterating never draws from the global torch RNG (which would shift
dropout masks between a resumed and an uninterrupted run).

Evaluation: every sample once
-----------------------------
Rank r evaluates the samples with global index in [N r / R, N (r + 1) / R), N from _info.json, and its workers
split that range the same way: each byte is read by about one process, counts differ by at most one, and nothing
is padded or repeated (DistributedSampler's padding double-counts, pytorch/pytorch#25162). Sample ids are the
shard keys (unique within a dataset). `eval.batch_size` counts model inputs: videos in mode "full", views in mode
"clips" (a video's views may straddle batches; the metrics average them by id and view_ids), frame-feature videos,
images.

Transforms, per kind (normalisation constants in transforms.py: Kinetics 0.45/0.225 as PySlowFast, ImageNet's
for images). Clips, train and eval, are handed over as uint8 (B, 3, T, S, S): a 64 x 224 x 224 micro-batch of 8
is 77 MB through the DataLoader's shared memory instead of 308 MB in float32. `transforms.to_model_input`
normalises them on the device (the trainer and `evaluate` call it; call it yourself when you use a stream
directly). Pixels that jitter or a resize recomputed are rounded to the nearest grey level on the way.
* clip, train: window of data.frames frames data.frame_stride apart at a random start; short side scaled to a
  random size in data.short_side inside the decoder (3-9x cheaper than F.interpolate afterwards), random
  crop_size square, flip, colour jitter. Output (B, 3, T, S, S). With data.clip_crop = "resized_crop" the clip is
  decoded at short side data.short_side[1] and an Inception-style box (data.crop_scale, data.crop_ratio) is resized
  to crop_size instead of the scale jitter and square crop.
* clip, eval: short side decoded at eval.short_side (default data.short_side[0], the low end of the training
  scale), crops of eval.crop_size (default data.crop_size). Mode "full": the first eval.max_frames frames, centre
  crop; one video per entry, and only videos of the same length share a batch (consecutive ones: padding frames
  would change a fully convolutional model's temporal average). Mode "clips": eval.num_clips uniform clips x
  eval.num_crops crops along the long side; "view_ids" = clip x num_crops + crop. eval.mode only applies to clips:
  features and images always give one entry per sample.
* features: dequantized to [-2, 2] as the YouTube-8M starter code, rgb then audio (1024 + 128 = 1152). Training
  keeps data.frames frames drawn without replacement and kept in time order (all of a shorter video; the starter
  code draws with replacement), zero-padded to data.frames; evaluation keeps the first eval.max_frames frames,
  zero-padded to the longest in the batch. "lengths" holds the valid frames. Target: (B, C) multi-hot.
* image, train: Inception random-resized crop (data.crop_scale, data.crop_ratio), flip, colour jitter; eval: short
  side to eval.short_side (default crop_size / 0.875), centre crop of eval.crop_size (ImageNet's usual 224-of-256).
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import math
import multiprocessing
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from video_ens import dist
from video_ens.config import RecipeError
from video_ens.data import schema
from video_ens.data.decode import DecodeError, decode_frames
from video_ens.data.transforms import (
    ClipEvalTransform,
    ClipTrainTransform,
    ColourJitter,
    ImageEvalTransform,
    ImageTrainTransform,
    random_crop_box,
    sample_window,
    uniform_clips,
)

__all__ = [
    "DataPaths",
    "EvalStream",
    "TrainStream",
    "check_compatible",
    "eval_stream",
    "metrics_task",
    "resolve_paths",
    "train_stream",
]

# Shuffle buffer per kind, in samples, bounded by memory per worker: a 10 s Kinetics clip re-encoded at short side
# 256 is ~1-2 MB (128 -> ~200 MB), a YouTube-8M video's frame features ~350 KB (300 x 1152 B; 512 -> ~180 MB), an
# ImageNet JPEG ~110 KB (1000 -> ~110 MB). Never more than one stream's share of the dataset: a larger buffer would
# only hold samples of the next pass over the shards.
SHUFFLE_BUFFER = {"clip": 128, "features": 512, "image": 1000}

# The bad-sample fraction is judged only after this many samples, so two bad clips among the first three do not
# stop a run.
MIN_SEEN_FOR_SKIP_CHECK = 100

# A micro-batch whose every sample is bad tries at most this many spare samples before giving up.
SPARE_LIMIT = 64

# Bad sample records kept in stats["last_bad"].
LAST_BAD_KEPT = 10

# data.kind -> the schema kind of the dataset folder that feeds it.
SCHEMA_KIND = {"clip": "video", "features": "yt8m", "image": "image"}


# ---------------------------------------------------------------------------------------------------------------
# Recipe-level helpers
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPaths:
    """The training source (a dataset folder, or a brace pattern of local shards) and the evaluation folder."""

    train: Path
    val: Path | None


def metrics_task(data_cfg) -> str:
    """ "multi_label" for YouTube-8M frame features, "single_label" for clips and images."""
    return "multi_label" if data_cfg.kind == "features" else "single_label"


def _is_pattern(text: str) -> bool:
    return "{" in text and ".." in text


def _info_or_error(folder: Path, field_name: str, kind: str) -> schema.DatasetInfo:
    try:
        info = schema.read_info(folder)
    except (FileNotFoundError, ValueError) as e:
        raise RecipeError(f"data.{field_name}: {e}") from None
    if info.kind != SCHEMA_KIND[kind]:
        raise RecipeError(
            f"data.{field_name}: {folder} holds a {info.kind!r} dataset but data.kind is {kind!r}, which reads "
            f"{SCHEMA_KIND[kind]!r} shards: point it at a {SCHEMA_KIND[kind]} dataset or change data.kind"
        )
    return info


def _expand(pattern: str) -> list[str]:
    import braceexpand  # a dependency of webdataset

    return list(braceexpand.braceexpand(pattern))


def resolve_paths(data_cfg) -> DataPaths:
    """Check data.train_shards and data.val_shards and return them as paths.

    train_shards: a dataset folder with _info.json, or a brace pattern of local shards ("dir/train-{000000..000099}
    .tar"), which has no sample count, so data.samples_per_epoch must then be set. val_shards: a dataset folder
    (evaluation needs the per-shard counts of _info.json to give every sample to exactly one rank), or "" for none.
    """
    train_text = data_cfg.train_shards
    if not train_text:
        raise RecipeError("data.train_shards: is empty; name a dataset folder (demo recipes: data/demo/<kind>/train, made by launch.sh)")
    if _is_pattern(train_text):
        if data_cfg.samples_per_epoch is None:
            raise RecipeError(
                f"data.samples_per_epoch: required when data.train_shards is a brace pattern ({train_text!r}), "
                "which has no _info.json to give the dataset size; set it, or point train_shards at the folder"
            )
        missing = [p for p in _expand(train_text) if not os.path.isfile(p)]
        if missing:
            raise RecipeError(
                f"data.train_shards: {len(missing)} shard(s) of {train_text!r} do not exist, e.g. {missing[0]}"
            )
    else:
        _info_or_error(Path(train_text), "train_shards", data_cfg.kind)
    val = None
    if data_cfg.val_shards:
        if _is_pattern(data_cfg.val_shards):
            raise RecipeError(
                f"data.val_shards: {data_cfg.val_shards!r} is a brace pattern; evaluation needs a dataset folder "
                "with _info.json (its per-shard counts let each rank take a disjoint share): name the folder"
            )
        val = Path(data_cfg.val_shards)
        _info_or_error(val, "val_shards", data_cfg.kind)
    return DataPaths(train=Path(train_text), val=val)


def check_compatible(data_cfg, model_name: str, input_spec: dict) -> None:
    """Raise RecipeError when the data recipe cannot feed this model; the message names the field and the fix."""
    kind = input_spec.get("kind")
    if kind not in SCHEMA_KIND:
        raise RecipeError(f"model.name: model {model_name} declares input kind {kind!r}, which no loader provides")
    if data_cfg.kind != kind:
        raise RecipeError(
            f"data.kind: {data_cfg.kind!r} data cannot feed model {model_name}, which takes {kind!r} input "
            f"({_describe_spec(input_spec)}); set data.kind to {kind!r} with a {SCHEMA_KIND[kind]} dataset, "
            f"or choose a model for {data_cfg.kind!r} data"
        )
    if kind == "clip":
        if data_cfg.frames != input_spec["frames"]:
            raise RecipeError(
                f"data.frames: {data_cfg.frames} frames but model {model_name} expects {input_spec['frames']} "
                f"per clip; set data.frames to {input_spec['frames']}"
            )
    if kind in ("clip", "image"):
        if data_cfg.crop_size != input_spec["size"]:
            raise RecipeError(
                f"data.crop_size: {data_cfg.crop_size} but model {model_name} expects {input_spec['size']} x "
                f"{input_spec['size']} inputs; set data.crop_size to {input_spec['size']}"
            )
    if kind == "features":
        dim = schema.YT8M_RGB_DIM + schema.YT8M_AUDIO_DIM
        if input_spec["dim"] != dim:
            raise RecipeError(
                f"model.options: model {model_name} expects {input_spec['dim']}-d frame features but YouTube-8M "
                f"shards hold {schema.YT8M_RGB_DIM} rgb + {schema.YT8M_AUDIO_DIM} audio = {dim}; set "
                f"rgb_dim={schema.YT8M_RGB_DIM}, audio_dim={schema.YT8M_AUDIO_DIM}"
            )
        if data_cfg.frames > input_spec["max_frames"]:
            raise RecipeError(
                f"data.frames: {data_cfg.frames} frames per training video exceeds model {model_name}'s "
                f"max_frames {input_spec['max_frames']}; set data.frames to at most {input_spec['max_frames']} "
                f"(the paper samples {input_spec.get('train_frames', 25)})"
            )


def _describe_spec(spec: dict) -> str:
    if spec["kind"] == "clip":
        return f"clips of {spec['frames']} frames at {spec['size']}x{spec['size']}"
    if spec["kind"] == "image":
        return f"{spec['size']}x{spec['size']} images"
    return f"{spec['dim']}-d frame features"


# ---------------------------------------------------------------------------------------------------------------
# Seeds, raw samples and bad samples
# ---------------------------------------------------------------------------------------------------------------


def _mix(*parts: Any) -> int:
    """A 63-bit seed from a tuple of ints and strings, stable across processes and Python versions (no hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(*parts: Any) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(_mix(*parts))
    return gen


class _BadSample(Exception):
    def __init__(self, reason: str, key: str, detail: str):
        super().__init__(f"{reason}: {key}: {detail}")
        self.record = {"key": key, "reason": reason, "detail": detail[:300]}


def _read_shard(url: str, errors: list[dict]) -> Iterator[dict]:
    """Raw samples of one tar, in order: {"__key__", "__url__", field: bytes}. Read errors land in `errors`."""
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        errors.append({"key": url, "reason": "shard", "detail": f"{type(exn).__name__}: {exn}"[:300]})
        return True  # go on with the next member, or the next shard

    yield from wds.tarfile_samples([{"url": url}], handler=handler)


# ---------------------------------------------------------------------------------------------------------------
# Decoding one sample into model inputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Item:
    key: str
    inputs: torch.Tensor  # (3, T, S, S) clip, (T, D) features, (3, S, S) image
    target: Any  # int label, or (C,) float multi-hot
    length: int | None = None  # valid frames (features)
    view: int | None = None  # clip x crop index (eval mode "clips")


@dataclass(frozen=True)
class _Recipe:
    """What decoding needs, as plain values (pickled into workers when they are spawned)."""

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


def _key(raw: dict) -> str:
    return str(raw.get("__key__", "<no key>"))


def _label(value: int, key: str, num_classes: int | None) -> int:
    if num_classes is not None and value >= num_classes:
        raise _BadSample("label", key, f"label {value} outside the label map of {num_classes} classes")
    return value


def _video(raw: dict, rec: _Recipe) -> schema.VideoSample:
    try:
        sample = schema.decode_video_sample(raw)
    except schema.SampleError as e:
        raise _BadSample("format", _key(raw), str(e)) from None
    _label(sample.label, _key(raw), rec.num_classes)
    return sample


def _frames(sample: schema.VideoSample, indices: list[int], short_side: int, rec: _Recipe) -> torch.Tensor:
    try:
        return decode_frames(sample.video, indices, short_side=short_side, backend=rec.decoder)
    except DecodeError as e:
        raise _BadSample("decode", sample.key, str(e)) from None


def _yt8m(raw: dict, rec: _Recipe) -> schema.YT8MSample:
    try:
        sample = schema.decode_yt8m_sample(raw, num_classes=rec.num_classes or schema.YT8M_NUM_CLASSES)
    except schema.SampleError as e:
        reason = "label" if e.field == "json.labels" else "format"
        raise _BadSample(reason, _key(raw), str(e)) from None
    if sample.num_frames == 0:
        raise _BadSample("format", _key(raw), "no frames")
    return sample


def _features(sample: schema.YT8MSample, rows: np.ndarray | slice) -> torch.Tensor:
    """Dequantized rgb then audio of the chosen frames: float32 (n, 1152)."""
    feats = np.concatenate([schema.dequantize(sample.rgb[rows]), schema.dequantize(sample.audio[rows])], axis=1)
    if not np.isfinite(feats).all():
        raise _BadSample("nonfinite", sample.key, "features hold NaN or inf")
    return torch.from_numpy(feats)


def _multi_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes, dtype=torch.float32)
    target[torch.from_numpy(labels)] = 1.0
    return target


def _image(raw: dict, rec: _Recipe) -> tuple[schema.ImageSample, torch.Tensor]:
    """The image sample and its pixels, uint8 (H, W, 3) RGB."""
    from PIL import Image

    try:
        sample = schema.decode_image_sample(raw)
    except schema.SampleError as e:
        raise _BadSample("format", _key(raw), str(e)) from None
    _label(sample.label, sample.key, rec.num_classes)
    try:
        with Image.open(io.BytesIO(sample.image)) as im:
            pixels = np.array(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _BadSample("decode", sample.key, f"{type(e).__name__}: {e}") from None
    return sample, torch.from_numpy(pixels)


def _colour(rec: _Recipe) -> ColourJitter:
    s = rec.color_jitter
    return ColourJitter(s, s, s)


def _train_item(raw: dict, rec: _Recipe, gen: torch.Generator) -> _Item:
    """One augmented training sample; every random draw comes from `gen`, in a fixed order."""
    if rec.kind == "clip":
        sample = _video(raw, rec)
        indices = sample_window(sample.num_frames, rec.frames, rec.frame_stride, gen)
        if rec.clip_crop == "resized_crop":
            # Decoded at the top of the recipe's scale range: the box's area is a fraction of the picture whatever
            # its size, so the decode size only sets how much detail the resized box keeps.
            frames = _frames(sample, indices, rec.short_side[1], rec)
            transform = ClipTrainTransform(
                crop_size=rec.crop_size,
                crop="resized_crop",
                scale=rec.crop_scale,
                ratio=rec.crop_ratio,
                flip=rec.flip,
                colour=_colour(rec),
                uint8_out=True,
            )
            return _Item(sample.key, transform(frames, gen), sample.label)
        lo, hi = rec.short_side
        short = int(torch.randint(lo, hi + 1, (), generator=gen))
        frames = _frames(sample, indices, short, rec)  # uint8 (T, H, W, 3), short side already `short`
        top, left, height, width = random_crop_box(frames.shape[1], frames.shape[2], rec.crop_size, gen)
        frames = frames[:, top : top + height, left : left + width]  # (T, S, S, 3)
        # Scale (in the decoder) and crop (on uint8) happen here, ahead of ClipTrainTransform's own, which then
        # find nothing to do; it flips the bytes, converts only the crop and jitters and normalises in place (a
        # 64-frame clip at 224: 48 ms on one core, against 287 ms converting the whole frame out of place).
        transform = ClipTrainTransform(
            crop_size=rec.crop_size,
            short_side_range=(rec.crop_size, rec.crop_size),
            flip=rec.flip,
            colour=_colour(rec),
            uint8_out=True,
        )
        return _Item(sample.key, transform(frames, gen), sample.label)
    if rec.kind == "features":
        sample = _yt8m(raw, rec)
        n = sample.num_frames
        if n <= rec.frames:
            rows = np.arange(n)
        else:
            rows = torch.randperm(n, generator=gen)[: rec.frames].sort().values.numpy()
        feats = _features(sample, rows)
        return _Item(sample.key, feats, _multi_hot(sample.labels, rec.num_classes), length=len(rows))
    sample, pixels = _image(raw, rec)
    transform = ImageTrainTransform(
        crop_size=rec.crop_size, scale=rec.crop_scale, ratio=rec.crop_ratio, flip=rec.flip, colour=_colour(rec)
    )
    return _Item(sample.key, transform(pixels, gen), sample.label)


def _collate(items: list[_Item], rec: _Recipe, pad_to: int | None = None) -> dict[str, Any]:
    batch: dict[str, Any] = {"ids": [it.key for it in items]}
    if rec.kind == "features":
        lengths = torch.tensor([it.length for it in items], dtype=torch.int64)
        frames = pad_to if pad_to is not None else int(lengths.max())
        inputs = torch.zeros((len(items), frames, items[0].inputs.shape[-1]), dtype=torch.float32)  # (B, T, D)
        for b, it in enumerate(items):
            inputs[b, : it.length] = it.inputs
        batch.update(inputs=inputs, lengths=lengths, target=torch.stack([it.target for it in items]))
    else:
        batch["inputs"] = torch.stack([it.inputs for it in items])  # (B, 3, T, S, S) or (B, 3, S, S)
        batch["target"] = torch.tensor([it.target for it in items], dtype=torch.int64)
    if items[0].view is not None:
        batch["view_ids"] = torch.tensor([it.view for it in items], dtype=torch.int64)
    return batch


def _loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = False
        if "fork" in multiprocessing.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
    return DataLoader(
        dataset,
        batch_size=None,  # workers hand over whole batches
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),  # worker base seeds come from here, not the global torch RNG
        **kwargs,
    )


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TrainPlan:
    rec: _Recipe
    shards: tuple[str, ...]
    seed: int
    rank: int
    world_size: int
    streams: int  # W
    batch_size: int  # B
    buffer_size: int


class _TrainEpoch(IterableDataset):
    """Micro-batches [start, stop) of one epoch of one rank; each DataLoader worker builds whole micro-batches."""

    def __init__(self, plan: _TrainPlan, epoch: int, start: int, stop: int):
        super().__init__()
        self.plan, self.epoch, self.start, self.stop = plan, epoch, start, stop
        self._errors: list[dict] = []

    def __iter__(self) -> Iterator[dict]:
        p = self.plan
        worker, workers = _worker()
        assert workers == p.streams, (workers, p.streams)
        first = self.start + worker  # the DataLoader asks worker 0 first, so it serves micro-batch `start`
        stream = first % p.streams
        samples = self._shuffled(stream)
        # Decode-free skip of the batches this stream made before `first`.
        skipped = (first // p.streams) * p.batch_size
        next(itertools.islice(samples, skipped, skipped), None)
        self._errors.clear()
        for k in range(first, self.stop, p.streams):
            raws = list(itertools.islice(samples, p.batch_size))
            yield self._batch(k, raws)

    def _slot_shards(self, stream: int, cycle: int) -> list[int]:
        """The shards (indices) this (rank, stream) slot reads in pass `cycle` over the shard list."""
        p = self.plan
        n, slots = len(p.shards), p.world_size * p.streams
        order = random.Random(_mix("shards", p.seed, self.epoch, cycle)).sample(range(n), n)
        slot = p.rank * p.streams + stream
        return [order[i % n] for i in range(slot, max(n, slots), slots)]

    def _pass(self, stream: int, cycle: int, dead: set[int]) -> Iterator[dict]:
        """Raw samples of this slot's shards in pass `cycle`; `dead` collects shards that yield nothing."""
        for shard in self._slot_shards(stream, cycle):
            count = 0
            for sample in _read_shard(self.plan.shards[shard], self._errors):
                count += 1
                yield sample
            if count == 0:
                dead.add(shard)
                if len(dead) == len(self.plan.shards):
                    raise RuntimeError(
                        f"no shard of the training set yields a sample ({len(dead)} read, e.g. "
                        f"{self.plan.shards[0]}): {self._errors[-1:] or 'all empty'}"
                    )

    def _shuffled(self, stream: int) -> Iterator[dict]:
        """The slot's endless sample stream, shuffled through a buffer that empties at the end of every pass.

        Emptying it there keeps a pass's samples ahead of the next pass's, whose shards other ranks are reading
        now: an epoch that fits in one pass then gives the ranks disjoint samples.
        """
        p = self.plan
        rng = random.Random(_mix("buffer", p.seed, p.rank, self.epoch, stream))
        buffer: list[dict] = []
        dead: set[int] = set()
        for cycle in itertools.count():
            for sample in self._pass(stream, cycle, dead):
                if len(buffer) < p.buffer_size:
                    buffer.append(sample)
                    continue
                i = rng.randrange(len(buffer))
                yield buffer[i]
                buffer[i] = sample
            while buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()

    def _batch(self, k: int, raws: list[dict]) -> dict:
        p = self.plan
        bad, self._errors[:] = list(self._errors), []
        gens = [_generator("aug", p.seed, p.rank, self.epoch, k, i) for i in range(p.batch_size)]
        items: list[_Item | None] = [None] * p.batch_size
        good: list[int] = []
        for i, raw in enumerate(raws):
            try:
                items[i] = _train_item(raw, p.rec, gens[i])
                good.append(i)
            except _BadSample as e:
                bad.append(e.record)
        seen = len(raws)
        missing = [i for i in range(p.batch_size) if items[i] is None]
        # Refill from this micro-batch's own good samples, each bad slot from the next good one in turn.
        for m, i in enumerate(missing):
            for t in range(len(good)):
                try:
                    items[i] = _train_item(
                        raws[good[(m + t) % len(good)]], p.rec, _generator("aug", p.seed, p.rank, self.epoch, k, i)
                    )
                    break
                except _BadSample:
                    continue  # the sample decoded once; another window may hit a damaged stretch
        missing = [i for i in missing if items[i] is None]
        if missing:
            seen += self._refill_from_spares(k, items, missing, bad)
        return {**_collate(items, p.rec, pad_to=p.rec.frames), "_bad": bad, "_seen": seen}

    def _refill_from_spares(self, k: int, items: list, missing: list[int], bad: list[dict]) -> int:
        """Fill the slots left empty from the heads of shards in a random order seeded by k; returns samples tried."""
        p = self.plan
        order = random.Random(_mix("spare", p.seed, p.rank, self.epoch, k)).sample(range(len(p.shards)), len(p.shards))
        tried = 0
        errors: list[dict] = []
        while True:
            tried_before = tried
            for shard in order:
                for raw in _read_shard(p.shards[shard], errors):
                    if tried == SPARE_LIMIT:
                        raise RuntimeError(
                            f"micro-batch {k}: its {p.batch_size} samples and {SPARE_LIMIT} spares were all bad "
                            f"(last: {(bad + errors)[-1:]}); check the training shards"
                        )
                    tried += 1
                    for i in list(missing):
                        try:
                            items[i] = _train_item(raw, p.rec, _generator("aug", p.seed, p.rank, self.epoch, k, i))
                            missing.remove(i)
                        except _BadSample as e:
                            bad.append(e.record)
                            break  # next spare sample
                    if not missing:
                        bad.extend(errors)
                        return tried
            if tried == tried_before:
                raise RuntimeError(f"micro-batch {k}: no training shard yields a sample: {errors[-1:]}")


class TrainStream:
    """One rank's training micro-batches; see the module docstring for the determinism contract.

    Attributes:
        micro_batches_per_epoch: nominal epoch (data.samples_per_epoch, or the dataset size) // (B x world size).
        num_classes: the label map's size (None for a brace pattern without any _info.json to read it from).
        stats: {"samples": seen, "bad": n, "bad_by_reason": {reason: n}, "last_bad": [{key, reason, detail}]},
            counted over every micro-batch this process received.
    """

    def __init__(self, plan: _TrainPlan, *, micro_batches_per_epoch: int, num_workers: int, max_skip_fraction: float):
        self._plan = plan
        self.micro_batches_per_epoch = micro_batches_per_epoch
        self.num_classes = plan.rec.num_classes
        self.num_workers = num_workers
        self.max_skip_fraction = max_skip_fraction
        self.stats: dict[str, Any] = {"samples": 0, "bad": 0, "bad_by_reason": {}, "last_bad": []}
        self._last_bad: collections.deque = collections.deque(maxlen=LAST_BAD_KEPT)

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Micro-batches start, start + 1, ..., micro_batches_per_epoch - 1 of `epoch` on this rank.

        Each is {"inputs", "target", "ids"} plus "lengths" for features; see the module docstring for shapes.
        """
        if not 0 <= start <= self.micro_batches_per_epoch:
            raise ValueError(f"start must be in [0, {self.micro_batches_per_epoch}], got {start}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if start == self.micro_batches_per_epoch:
            return
        dataset = _TrainEpoch(self._plan, epoch, start, self.micro_batches_per_epoch)
        for batch in _loader(dataset, self.num_workers):
            self._account(batch.pop("_bad"), int(batch.pop("_seen")))
            yield batch

    def _account(self, bad: list[dict], seen: int) -> None:
        s = self.stats
        s["samples"] += seen
        s["bad"] += len(bad)
        for record in bad:
            s["bad_by_reason"][record["reason"]] = s["bad_by_reason"].get(record["reason"], 0) + 1
            self._last_bad.append(record)
        s["last_bad"] = list(self._last_bad)
        if s["samples"] >= MIN_SEEN_FOR_SKIP_CHECK and s["bad"] > self.max_skip_fraction * s["samples"]:
            raise RuntimeError(
                f"{s['bad']} of {s['samples']} training samples were bad, more than data.max_skip_fraction = "
                f"{self.max_skip_fraction}: by reason {s['bad_by_reason']}, last {s['last_bad'][-3:]}; "
                "fix or reconvert the shards"
            )


def _recipe(data_cfg, num_classes: int | None) -> _Recipe:
    return _Recipe(
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
    )


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


def train_stream(
    data_cfg, *, input_spec: dict, micro_batch_size: int, rank: int, world_size: int, seed: int, root: DataPaths
) -> TrainStream:
    """The training stream of this rank (see the module docstring)."""
    _check_rank(rank, world_size)
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if input_spec.get("kind") != data_cfg.kind:
        raise RecipeError(f"data.kind: {data_cfg.kind!r} but the model takes {input_spec.get('kind')!r} input")
    train = str(root.train)
    if _is_pattern(train):
        shards = _expand(train)
        num_samples = None
        num_classes = None
        if root.val is not None:  # the label map of the evaluation set is the one the labels index
            num_classes = _info_or_error(root.val, "val_shards", data_cfg.kind).num_classes
    else:
        info = _info_or_error(root.train, "train_shards", data_cfg.kind)
        shards = [os.path.join(train, s.name) for s in info.shards]
        num_samples, num_classes = info.num_samples, info.num_classes
    if data_cfg.kind == "features" and num_classes is None:
        num_classes = schema.YT8M_NUM_CLASSES
    nominal = data_cfg.samples_per_epoch or num_samples
    per_epoch = nominal // (micro_batch_size * world_size)
    if per_epoch < 1:
        where = "data.samples_per_epoch" if data_cfg.samples_per_epoch else f"data.train_shards ({num_samples} samples)"
        raise RecipeError(
            f"{where}: an epoch of {nominal} samples holds no micro-batch of {micro_batch_size} samples on each of "
            f"{world_size} ranks; set data.samples_per_epoch to at least {micro_batch_size * world_size}"
        )
    streams = max(1, data_cfg.num_workers)
    if len(shards) < world_size * streams and rank == 0:
        dist.get_logger("video_ens.data").warning(
            f"data.train_shards has {len(shards)} shard(s) for {world_size} rank(s) x {streams} stream(s): some "
            "(rank, stream) slots read the same shard in a pass, so ranks see overlapping samples within an epoch; "
            f"re-shard into at least {world_size * streams} shards (a converter's --shard-size) to keep them disjoint"
        )
    buffer = SHUFFLE_BUFFER[data_cfg.kind]
    if num_samples is not None:
        buffer = min(buffer, max(1, math.ceil(num_samples / (world_size * streams))))
    plan = _TrainPlan(
        rec=_recipe(data_cfg, num_classes),
        shards=tuple(shards),
        seed=seed,
        rank=rank,
        world_size=world_size,
        streams=streams,
        batch_size=micro_batch_size,
        buffer_size=buffer,
    )
    return TrainStream(
        plan,
        micro_batches_per_epoch=per_epoch,
        num_workers=data_cfg.num_workers,
        max_skip_fraction=data_cfg.max_skip_fraction,
    )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EvalPlan:
    rec: _Recipe
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    rank: int
    world_size: int
    streams: int
    batch_size: int
    mode: str  # "full" | "clips" (clips only)
    num_clips: int
    num_crops: int
    max_frames: int
    short_side: int  # clips: decode at this short side; images: resize to it (eval.short_side resolved)
    crop_size: int  # evaluation crops (eval.crop_size resolved)


def _share(lo: int, hi: int, part: int, parts: int) -> tuple[int, int]:
    """Part `part` of `parts` near-equal contiguous pieces of [lo, hi)."""
    n = hi - lo
    return lo + n * part // parts, lo + n * (part + 1) // parts


def _eval_items(raw: dict, plan: _EvalPlan) -> list[_Item]:
    """The evaluation entries of one sample: one, or num_clips x num_crops views in mode "clips"."""
    rec = plan.rec
    if rec.kind == "clip":
        sample = _video(raw, rec)
        if plan.mode == "full":
            # the frame rate the model was trained at: every frame_stride-th frame, at most max_frames of them
            indices = list(range(0, sample.num_frames, rec.frame_stride))[: plan.max_frames]
            frames = _frames(sample, indices, plan.short_side, rec)
            clip = ClipEvalTransform(
                short_side=plan.short_side, crop_size=plan.crop_size, num_crops=1, uint8_out=True
            )(frames)[0]
            return [_Item(sample.key, clip, sample.label)]
        clips = uniform_clips(sample.num_frames, rec.frames, rec.frame_stride, plan.num_clips)
        frames = _frames(sample, [i for c in clips for i in c], plan.short_side, rec)  # one decode for all clips
        transform = ClipEvalTransform(
            short_side=plan.short_side, crop_size=plan.crop_size, num_crops=plan.num_crops, uint8_out=True
        )
        items = []
        for c in range(plan.num_clips):
            views = transform(frames[c * rec.frames : (c + 1) * rec.frames])  # (num_crops, 3, T, S, S)
            items += [_Item(sample.key, v, sample.label, view=c * plan.num_crops + j) for j, v in enumerate(views)]
        return items
    if rec.kind == "features":
        sample = _yt8m(raw, rec)
        n = min(sample.num_frames, plan.max_frames)
        feats = _features(sample, slice(0, n))
        return [_Item(sample.key, feats, _multi_hot(sample.labels, rec.num_classes), length=n)]
    sample, pixels = _image(raw, rec)
    transform = ImageEvalTransform(short_side=plan.short_side, crop_size=plan.crop_size)
    return [_Item(sample.key, transform(pixels), sample.label)]


class _EvalPass(IterableDataset):
    """This rank's share of the evaluation set, split again between the DataLoader workers."""

    def __init__(self, plan: _EvalPlan):
        super().__init__()
        self.plan = plan

    def _samples(self, lo: int, hi: int, bad: list[dict]) -> Iterator[dict]:
        """Raw samples with global index in [lo, hi), by the offsets _info.json gives each shard."""
        p = self.plan
        offset = 0
        for url, count in zip(p.shards, p.counts, strict=True):
            begin, offset = offset, offset + count
            if offset <= lo or begin >= hi:
                continue
            for position, raw in enumerate(_read_shard(url, bad)):
                index = begin + position
                if position >= count:
                    bad.append(
                        {
                            "key": _key(raw),
                            "reason": "shard",
                            "detail": f"{url} holds more samples than the {count} _info.json lists",
                        }
                    )
                    break
                if index >= hi:
                    break
                if index >= lo:  # earlier ones are read but never decoded
                    yield raw

    def __iter__(self) -> Iterator[dict]:
        p = self.plan
        worker, workers = _worker()
        lo, hi = _share(0, sum(p.counts), p.rank, p.world_size)
        lo, hi = _share(lo, hi, worker, workers)
        bad: list[dict] = []
        pending: list[_Item] = []
        seen = 0

        def flush() -> dict:
            nonlocal pending, bad, seen
            out = {**_collate(pending, p.rec), "_bad": bad, "_seen": seen}
            pending, bad, seen = [], [], 0
            return out

        for raw in self._samples(lo, hi, bad):
            seen += 1
            try:
                items = _eval_items(raw, p)
            except _BadSample as e:
                bad.append(e.record)
                continue
            for item in items:
                # Mode "full": only videos of equal length share a batch (see the module docstring).
                if (
                    pending
                    and p.rec.kind == "clip"
                    and p.mode == "full"
                    and (item.inputs.shape != pending[0].inputs.shape)
                ):
                    yield flush()
                pending.append(item)
                if len(pending) == p.batch_size:
                    yield flush()
        if pending:
            yield flush()
        elif bad or seen:
            yield {"_bad": bad, "_seen": seen}  # bad samples at the end still reach the stats


class EvalStream:
    """Evaluation batches of this rank; over all ranks, every sample of the evaluation set exactly once.

    Attributes:
        num_classes: label map size; num_samples: samples in the evaluation set (all ranks together).
        aggregate: "mean" for multi-view clips (pass batch["view_ids"] to the metrics), else "first".
        stats: samples and bad samples of the last `batches()` pass, as TrainStream.stats.
    """

    def __init__(self, plan: _EvalPlan, *, num_workers: int):
        self._plan = plan
        self.num_workers = num_workers
        self.num_classes = plan.rec.num_classes
        self.num_samples = sum(plan.counts)
        self.aggregate = "mean" if plan.rec.kind == "clip" and plan.mode == "clips" else "first"
        self.stats: dict[str, Any] = {}

    def batches(self) -> Iterator[dict]:
        """Batches of {"inputs", "target", "ids"} (+ "lengths" for features, "view_ids" in clip mode "clips")."""
        self.stats = {"samples": 0, "bad": 0, "bad_by_reason": {}, "last_bad": []}
        last: collections.deque = collections.deque(maxlen=LAST_BAD_KEPT)
        for batch in _loader(_EvalPass(self._plan), self.num_workers):
            bad = batch.pop("_bad")
            self.stats["samples"] += int(batch.pop("_seen"))
            self.stats["bad"] += len(bad)
            for record in bad:
                reasons = self.stats["bad_by_reason"]
                reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
                last.append(record)
            self.stats["last_bad"] = list(last)
            if "inputs" in batch:
                yield batch


def eval_stream(
    data_cfg, eval_cfg, *, input_spec: dict, rank: int, world_size: int, root: DataPaths
) -> EvalStream | None:
    """This rank's evaluation stream, or None when data.val_shards is empty."""
    _check_rank(rank, world_size)
    if root.val is None:
        return None
    info = _info_or_error(root.val, "val_shards", data_cfg.kind)
    max_frames = eval_cfg.max_frames
    if data_cfg.kind == "features":
        max_frames = min(max_frames, input_spec.get("max_frames", max_frames))
    short_side, crop_size = eval_cfg.view_size(data_cfg)
    plan = _EvalPlan(
        rec=_recipe(data_cfg, info.num_classes),
        shards=tuple(os.path.join(str(root.val), s.name) for s in info.shards),
        counts=tuple(s.count for s in info.shards),
        rank=rank,
        world_size=world_size,
        streams=max(1, data_cfg.num_workers),
        batch_size=eval_cfg.batch_size,
        mode=eval_cfg.mode,
        num_clips=eval_cfg.num_clips,
        num_crops=eval_cfg.num_crops,
        max_frames=max_frames,
        short_side=short_side,
        crop_size=crop_size,
    )
    return EvalStream(plan, num_workers=data_cfg.num_workers)
