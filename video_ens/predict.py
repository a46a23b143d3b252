"""A trained model on raw files: class predictions and pooled embeddings of videos, images or YouTube-8M features.

    predictor = Predictor.load(recipe="runs/demo/recipe.json", weights="runs/demo/model.safetensors")
    inputs, missing = find_inputs(["clips/", "more_clips.txt", "phone.mov"], predictor.kind)
    for result in predict_all(predictor, inputs, embed=True):    # a Prediction, or a Skipped input
        if isinstance(result, Prediction):
            print(format_text(result, predictor.class_names, 5))      # the ensemble's top 5 with names
            record = prediction_record(result, predictor.class_names, 5)   # {"video", "ensemble", "branches"}

What a file becomes is what evaluation makes of a sample of the recipe's dataset (video_ens.data.samples.eval_items),
so a clip that was converted and evaluated gets the same scores here as in tools/eval.py:
* clip models: a video file PyAV opens (mp4, webm, mkv, avi, mov, ...), turned upright and resampled to square
  pixels first (`decode.read_display` / `apply_display`: phones store rotated frames, DVD/DV files non-square
  pixels). eval.mode "full": every data.frame_stride-th frame up to eval.max_frames, one centre crop; "clips":
  eval.num_clips uniform clips x eval.num_crops crops, probabilities averaged over the views. Frames whose short
  side exceeds the evaluation short side are scaled down inside the decoder, as `convert_kinetics --short-side`
  would have stored them (where it is not larger, the frames are used as stored, exactly as evaluation uses them).
* image models: an image Pillow opens, turned by its EXIF orientation, short side scaled, centre crop.
* feature models (DBoF): a YouTube-8M video's frame features as `.npy` of shape (T, 1152), rgb (1024) then audio
  (128) per frame, either float32 already dequantized (what the model consumes) or uint8 as quantized in the
  TFRecords (dequantized here as the loader does); or `.npz` with arrays "rgb" (T, 1024) and "audio" (T, 128), uint8
  or float. The first eval.max_frames frames are used.

Scores are each branch's probabilities (softmax; for sigmoid models, DBoF's MoE, the per-class scores) averaged over
the views, and the ensemble's are exactly their mean over branches (the paper's p_ens), computed in float64.

Embeddings (`EmbeddingWriter`, `read_embeddings`) are `EnsembleNet.embed`'s pooled representations, averaged over
the views: the shared base's output averaged over time and space, and each branch's classifier input. They are
streamed to a folder of npy shards in input order (see `EmbeddingWriter` for the layout and why npy).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dist
from .config import load_recipe
from .data import loader, schema, sources
from .data.decode import Display, apply_display, decode_frames, probe, read_display
from .data.samples import EvalView, ImageOverBudget, Item, SampleSpec, collate, read_image
from .data.transforms import ClipEvalTransform, ImageEvalTransform, to_model_input, uniform_clips
from .durable import write_atomic
from .evaluate import autocast, load_weights
from .models import builder_arguments, channels_last, create_model
from .models.ensemble import EnsembleNet, branch_probs
from .progress import format_duration

LOG = dist.get_logger("video_ens.predict")

__all__ = [
    "EMBEDDINGS_FORMAT",
    "INPUT_EXTS",
    "EmbeddingWriter",
    "InputError",
    "Prediction",
    "Predictor",
    "Skipped",
    "class_names",
    "embeddings_metadata",
    "find_inputs",
    "load_clip_views",
    "format_text",
    "iter_embedding_shards",
    "load_features",
    "load_image",
    "predict_all",
    "prediction_record",
    "read_embeddings",
    "top_k",
]

# File name endings taken from a folder, per model input kind. A file named on the command line is tried whatever
# its ending (PyAV and Pillow read the content, not the name).
INPUT_EXTS = {
    "clip": (*schema.VIDEO_EXTS, "m4v", "mpg", "mpeg", "ts", "mts", "m2ts", "3gp", "ogv", "flv", "wmv"),
    "image": (*schema.IMAGE_EXTS, "jpeg", "tif"),
    "features": ("npy", "npz"),
}
LIST_SUFFIX = ".txt"  # a PATH ending in .txt is a list of paths, one per line


class InputError(ValueError):
    """One input that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Skipped:
    """An input left out: its path as given and why."""

    id: str
    reason: str


@dataclass
class Prediction:
    """The model's view of one input.

    branches: (N, C) float64, each branch's probabilities (sigmoid models: scores) averaged over the views.
    ensemble: (C,) float64, the mean of the rows of `branches`.
    views: model inputs the file became (clips x crops in eval mode "clips", else 1).
    display: the rotation and sample aspect ratio applied (videos), else None.
    base, embeddings: pooled representations averaged over the views, float32: the base's (D_base,) and each
        branch's (N, D); only when asked for (`Predictor.predict(..., embed=True)`).
    """

    id: str
    branches: np.ndarray
    ensemble: np.ndarray
    views: int = 1
    display: Display | None = None
    base: np.ndarray | None = None
    embeddings: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------------------------
# Finding inputs


def _wanted(name: str, kind: str) -> bool:
    return not name.startswith(".") and name.rpartition(".")[2].lower() in INPUT_EXTS[kind]


def _walk(folder: str, kind: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, name) for name in sorted(files) if _wanted(name, kind)]
    return found


def _list_file(path: str) -> list[str]:
    """The paths a list file names, relative ones taken from the list's folder; blank lines and # comments left out."""
    base = os.path.dirname(path)
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line if os.path.isabs(line) else os.path.join(base, line) for line in lines if line and line[0] != "#"]


def find_inputs(paths: Iterable[str | os.PathLike], kind: str) -> tuple[list[str], list[Skipped]]:
    """The files to predict on, in order, and the paths that name nothing usable.

    Each path is a file (taken as it is, whatever its ending), a folder (every file under it whose ending is one of
    INPUT_EXTS[kind], sorted, recursively; hidden ones left out) or a `.txt` list of such paths, one per line
    (relative to the list's folder; a list inside a list is not followed). A file named twice is kept once, where
    it first appears.
    """
    if kind not in INPUT_EXTS:
        raise ValueError(f"kind must be one of {sorted(INPUT_EXTS)}, got {kind!r}")
    found: list[str] = []
    missing: list[Skipped] = []
    seen: set[str] = set()

    def add(path: str, *, from_list: bool) -> None:
        if os.path.isdir(path):
            files = _walk(path, kind)
            if not files:
                exts = ", ".join(f".{e}" for e in INPUT_EXTS[kind])
                missing.append(Skipped(path, f"no {kind} files ({exts}) in this folder"))
        elif path.lower().endswith(LIST_SUFFIX) and not from_list and os.path.isfile(path):
            try:
                entries = _list_file(path)
            except (OSError, UnicodeDecodeError) as e:
                missing.append(Skipped(path, f"cannot read this list of paths: {e}"))
                return
            for entry in entries:
                add(entry, from_list=True)
            return
        elif os.path.exists(path):
            files = [path]
        else:
            missing.append(Skipped(path, "no such file or folder"))
            return
        for file in files:
            key = os.path.abspath(file)
            if key not in seen:
                seen.add(key)
                found.append(file)

    for path in paths:
        add(os.fspath(path), from_list=False)
    return found, missing


# --------------------------------------------------------------------------------------------------------------------
# One file as model input


def _decode_short_side(width: int, height: int, display: Display, short_side: int) -> int | None:
    """The short side to decode at so that the displayed picture's short side comes out at `short_side`; None
    (decode as stored) when it is not larger than that already: evaluation then cuts its crops from the stored
    frames, and so does this."""
    square = display.square_size(width, height)
    if min(square) <= short_side:
        return None
    return max(1, round(min(width, height) * short_side / min(square)))


def load_clip_views(path: str, spec: SampleSpec, view: EvalView) -> tuple[list[Item], Display]:
    """The evaluation views of a video file as loader items (uint8 boxes, shown upright with square pixels), and the
    display transform applied. Raises DecodeError (a ValueError) for a file that cannot deliver them."""
    info = probe(path)  # the frame count a sequential decode yields, not the header's claim
    if info.num_frames > spec.max_video_frames:
        raise InputError(
            f"{path}: {info.num_frames} frames, over the budget of {spec.max_video_frames} (data.max_video_frames)"
        )
    display = read_display(path)
    if view.mode == "full":
        clips = [list(range(0, info.num_frames, spec.frame_stride)[: view.max_frames])]
        transform = ClipEvalTransform(short_side=view.short_side, crop_size=view.crop_size, num_crops=1)
    else:
        clips = uniform_clips(info.num_frames, spec.frames, spec.frame_stride, view.num_clips)
        transform = ClipEvalTransform(short_side=view.short_side, crop_size=view.crop_size, num_crops=view.num_crops)
    wanted = sorted({i for clip in clips for i in clip})
    short_side = _decode_short_side(info.width, info.height, display, view.short_side)
    frames = decode_frames(path, wanted, short_side=short_side, budget=spec.budget())  # (F, h, w, 3)
    frames = apply_display(frames, display)  # (F, H, W, 3) as shown
    position = {index: k for k, index in enumerate(wanted)}
    boxes = transform.boxes(frames.shape[1], frames.shape[2])
    items = []
    for clip in clips:
        clip_frames = frames[[position[i] for i in clip]]  # (T, H, W, 3)
        for top, left, h, w in boxes:
            items.append(Item(path, clip_frames[:, top : top + h, left : left + w], 0, view=len(items), extent=(h, w)))
    return items, display


def load_image(path: str, spec: SampleSpec, view: EvalView) -> torch.Tensor:
    """An image file as the model's evaluation input (1, 3, S, S): EXIF orientation applied (the still-image twin of
    a video's rotation), short side scaled to the view's, centre crop. Raises InputError."""
    try:
        pixels = read_image(path, spec.max_frame_pixels)
    except ImageOverBudget as e:
        raise InputError(f"{path}: {e}") from None
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError and more on files it cannot read
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    transform = ImageEvalTransform(short_side=view.short_side, crop_size=view.crop_size)
    return transform(torch.from_numpy(pixels))[None]  # (1, 3, S, S)


def load_features(path: str, *, rgb_dim: int, audio_dim: int, max_frames: int) -> torch.Tensor:
    """A YouTube-8M video's frame features as the model's input (1, T, rgb_dim + audio_dim) float32, T <= max_frames.

    `.npy`: (T, rgb_dim + audio_dim), rgb first; float (dequantized) or uint8 (quantized, dequantized here).
    `.npz`: arrays "rgb" (T, rgb_dim) and "audio" (T, audio_dim), each float or uint8. Raises InputError.
    """
    dim = rgb_dim + audio_dim
    layout = (
        f"expected .npy of shape (T, {dim}) (rgb {rgb_dim} then audio {audio_dim} per frame, float or "
        f"uint8-quantized) or .npz with 'rgb' (T, {rgb_dim}) and 'audio' (T, {audio_dim})"
    )

    def floats(array: np.ndarray, what: str) -> np.ndarray:
        if array.dtype == np.uint8:
            return schema.dequantize(array)
        if array.dtype.kind != "f":
            raise InputError(f"{path}: {what} has dtype {array.dtype}; {layout}")
        return array.astype(np.float32)

    try:
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                if "rgb" not in z or "audio" not in z:
                    raise InputError(f"{path}: arrays {sorted(z.files)}; {layout}")
                rgb, audio = z["rgb"], z["audio"]
            if (
                rgb.ndim != 2
                or audio.ndim != 2
                or rgb.shape != (len(rgb), rgb_dim)
                or audio.shape != (len(rgb), audio_dim)
            ):
                raise InputError(f"{path}: rgb {rgb.shape} and audio {audio.shape}; {layout}")
            feats = np.concatenate([floats(rgb[:max_frames], "rgb"), floats(audio[:max_frames], "audio")], axis=1)
        else:
            array = np.load(path, mmap_mode="r", allow_pickle=False)  # only the frames used are read
            if array.ndim != 2 or array.shape[1] != dim:
                raise InputError(f"{path}: array of shape {array.shape}; {layout}")
            feats = floats(np.asarray(array[:max_frames]), "the array")
    except InputError:
        raise
    except Exception as e:  # not an npy/npz file, a pickle, a truncated file
        raise InputError(f"{path}: not a readable feature file ({type(e).__name__}: {e}); {layout}") from None
    if len(feats) == 0:
        raise InputError(f"{path}: no frames")
    if not np.isfinite(feats).all():
        raise InputError(f"{path}: the features hold NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(feats))[None]  # (1, T, D)


# --------------------------------------------------------------------------------------------------------------------
# Class names


def class_names(recipe, num_classes: int, labels: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """(names, where they came from): `labels` when given (a text file with one name per line, a dataset folder or
    its _info.json), else the label map of the run's datasets (`sources.label_names`); else the class indices as
    text, with a warning. ValueError when the names found do not
    number `num_classes`."""
    if labels is not None:
        names, source = schema.load_label_names(labels), os.fspath(labels)
    else:
        names, source = sources.label_names(recipe.data)
        if names is None:
            LOG.warning(
                "no class names found (data.train_shards and data.val_shards: no readable _info.json with "
                "label_names); showing class indices. Pass --labels (a names file, or the training dataset "
                "folder)"
            )
            return [str(i) for i in range(num_classes)], "class indices"
    if len(names) != num_classes:
        raise ValueError(
            f"{source}: {len(names)} class names, but the model predicts {num_classes} classes; pass "
            "--labels with the label map the model was trained with"
        )
    return list(names), source


# --------------------------------------------------------------------------------------------------------------------
# The predictor


@dataclass
class Predictor:
    """A loaded model with the recipe's evaluation settings; `predict(path)` runs one file."""

    model: EnsembleNet
    recipe: Any
    device: torch.device
    precision: str
    class_names: list[str]
    names_source: str = ""
    weights: str = ""
    spec: SampleSpec = field(init=False)
    view: EvalView = field(init=False)

    def __post_init__(self) -> None:
        data, ev = self.recipe.data, self.recipe.eval
        self.spec = SampleSpec.from_config(data, len(self.class_names))
        self.view = EvalView.from_config(data, ev, self.model.input_spec)  # what evaluation sees

    @classmethod
    def load(
        cls,
        *,
        recipe: str | os.PathLike,
        weights: str | os.PathLike,
        overrides: Sequence[str] = (),
        device: str | None = None,
        precision: str | None = None,
        labels: str | os.PathLike | None = None,
    ) -> Predictor:
        """The recipe's model (with `--set`-style overrides) with `weights` loaded strictly, on `device` ("auto",
        "cpu", "cuda"; default the recipe's train.device), autocast to `precision` (default train.precision).
        Raises RecipeError, ValueError or FileNotFoundError naming what is wrong."""
        r = load_recipe(recipe, list(overrides))
        dev = dist.pick_device(device or r.train.device)
        kwargs = r.model.builder_kwargs()
        model = create_model(r.model.name, **kwargs)
        load_weights(model, weights, expect_model=r.model.name)
        loader.check_compatible(r.data, r.model.name, model.input_spec)
        model = model.to(dev).eval()
        if r.model.channels_last:
            model = channels_last(model)
        num_classes = builder_arguments(r.model.name, **kwargs)["num_classes"]
        names, source = class_names(r, num_classes, labels)
        return cls(
            model=model,
            recipe=r,
            device=dev,
            precision=precision or r.train.precision,
            class_names=names,
            names_source=source,
            weights=os.fspath(weights),
        )

    @property
    def kind(self) -> str:
        return self.model.input_spec["kind"]

    @property
    def mode(self) -> str:
        """What a file becomes: "full" or "clips<K>x<crops>" for videos, "center_crop", "all_frames"."""
        return self.recipe.eval.view_name(self.recipe.data)

    def _batches(self, path: str) -> tuple[Iterator[tuple[torch.Tensor, dict]], Display | None]:
        """The file's model inputs in batches of at most eval.batch_size views, with the display transform applied.
        Clip batches are made one at a time as they are consumed: 30 views of 64 x 224^2 are 1.1 GB as float."""
        if self.kind == "clip":
            items, display = load_clip_views(path, self.spec, self.view)
            size = self.recipe.eval.batch_size
            batches = (
                (
                    to_model_input(collate(items[i : i + size], self.spec, crop_size=self.view.crop_size), self.device),
                    {},
                )
                for i in range(0, len(items), size)
            )
            return batches, display
        if self.kind == "image":
            return iter([(load_image(path, self.spec, self.view).to(self.device), {})]), None
        spec = self.model.input_spec
        x = load_features(path, rgb_dim=spec["rgb_dim"], audio_dim=spec["audio_dim"], max_frames=self.view.max_frames)
        lengths = torch.tensor([x.shape[1]], dtype=torch.int64, device=self.device)
        return iter([(x.to(self.device), {"lengths": lengths})]), None

    @torch.no_grad()
    def predict(self, path: str, *, embed: bool = False) -> Prediction:
        """Scores (and with `embed`, pooled representations) of one file, averaged over its views. Raises
        InputError or DecodeError (both ValueError) for a file that cannot be read."""
        batches, display = self._batches(path)
        probs, base, feats, views = [], [], [], 0
        for x, kwargs in batches:
            with autocast(self.device, self.precision):
                if embed:
                    out, b, f = self.model.embed(x, **kwargs)
                    base.append(b.double().sum(dim=0))  # (D_base,)
                    feats.append(f.double().sum(dim=1))  # (N, D)
                else:
                    out = self.model(x, **kwargs)
            p = branch_probs(out.branches, self.model.output_type, self.model.activation)  # (N, V, C), fp32
            probs.append(p.double().sum(dim=1))  # (N, C)
            views += x.shape[0]
        branches = (torch.stack(probs).sum(dim=0) / views).cpu().numpy()  # (N, C), mean over the views
        if branches.shape[1] != len(self.class_names):
            raise ValueError(
                f"the model predicts {branches.shape[1]} classes, the class names number {len(self.class_names)}"
            )
        result = Prediction(id=path, branches=branches, ensemble=branches.mean(axis=0), views=views, display=display)
        if embed:
            result.base = (torch.stack(base).sum(dim=0) / views).float().cpu().numpy()
            result.embeddings = (torch.stack(feats).sum(dim=0) / views).float().cpu().numpy()
        return result


def _progress(done: int, total: int, seconds: float, skipped: int) -> str:
    """ "processed 12/300 inputs (4.0%), 2.1 inputs/s, eta 0:02:17; 1 skipped" (the ETA at the rate so far)."""
    rate = done / max(seconds, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    text = (
        f"processed {done}/{total} inputs ({100 * done / max(total, 1):.1f}%), {rate:.2f} inputs/s, "
        f"eta {format_duration(eta)}"
    )
    return text + (f"; {skipped} skipped" if skipped else "")


def predict_all(
    predictor: Predictor, inputs: Sequence[str], *, embed: bool = False, log_every_s: float = 10.0
) -> Iterator[Prediction | Skipped]:
    """`predictor.predict` over `inputs` in order, yielding a Prediction per file and a Skipped for each file that
    cannot be read (any error of the decoders, or of the model on a file it cannot take). Logs progress (done,
    rate, ETA) every `log_every_s` seconds and at the end."""
    start = last = time.monotonic()
    skipped = 0
    for done, path in enumerate(inputs, start=1):
        try:
            yield predictor.predict(path, embed=embed)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:  # decoders raise many kinds on damaged files; the message says which
            skipped += 1
            text = (str(e) or type(e).__name__).removeprefix(f"{path}: ")  # the path is the record's id
            if not isinstance(e, ValueError):
                text = f"{type(e).__name__}: {text}"
            yield Skipped(path, text)
        now = time.monotonic()
        if log_every_s and (now - last >= log_every_s or done == len(inputs)):
            LOG.info(_progress(done, len(inputs), now - start, skipped))
            last = now


# --------------------------------------------------------------------------------------------------------------------
# Reporting


def top_k(scores: np.ndarray, names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """[{"label": name, "score": p}, ...] of the k highest scores, highest first (ties: lower class index first)."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return [{"label": names[i], "score": float(scores[i])} for i in order]


def prediction_record(result: Prediction, names: Sequence[str], top: int) -> dict[str, Any]:
    """The JSON object of one input: {"video": path, "ensemble": [{"label", "score"}, ...], "branches": [[...], ...]}
    ("video" names the input whatever its kind)."""
    return {
        "video": result.id,
        "ensemble": top_k(result.ensemble, names, top),
        "branches": [top_k(row, names, top) for row in result.branches],
    }


def format_text(result: Prediction, names: Sequence[str], top: int, *, branches: bool = False) -> str:
    """The input's path, then the ensemble's top classes with percentages, and with `branches` each branch's."""

    def line(head: str, scores: np.ndarray) -> str:
        return f"  {head:<9} " + ", ".join(f"{t['label']} {100 * t['score']:.1f}%" for t in top_k(scores, names, top))

    lines = [result.id, line("ensemble", result.ensemble)]
    if branches:
        lines += [line(f"branch {i}", row) for i, row in enumerate(result.branches)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Embeddings: streamed npy shards

EMBEDDINGS_FORMAT = "video_ens.embeddings"
EMBEDDINGS_VERSION = 1
INDEX_NAME = "index.json"


class EmbeddingWriter:
    """Pooled representations of many inputs, streamed to a folder as shards of `shard_size` inputs:

        OUT/000000.base.npy       float32 (n, D_base)   the shared base's, one row per input
        OUT/000000.branch0.npy    float32 (n, D)        branch 0's (one file per branch)
        OUT/000000.ids.json       ["path", ...]         the inputs of the rows, in order
        OUT/index.json            {"format", "version", "complete", "num_inputs", "arrays": {name: [D]},
                                   "shards": [{"name": "000000", "count": n}, ...], plus the caller's metadata}

    npy rather than safetensors: a safetensors file states every tensor's offset in a header at its start, so it can
    only be written whole, while here a shard is written as soon as it is full and nothing more than one shard is
    held; and npy shards open with numpy alone, memory-mapped (`iter_embedding_shards`), for sets larger than memory.
    Every file is written atomically and durably (video_ens.durable.write_atomic); index.json is rewritten after
    each shard, listing only shards already on disk, and says "complete": true once `close` ran, so a reader of a
    crashed or running job sees a consistent prefix. Ids live beside each shard, so a shard costs the same to
    write however many came before it.
    """

    def __init__(self, folder: str | os.PathLike, *, shard_size: int = 1024, metadata: dict | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder = Path(folder)
        if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
            raise FileExistsError(
                f"{self.folder}: exists and is not an empty folder; embeddings go to a new or empty "
                "folder (remove it, or name another)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.metadata = dict(metadata or {})
        self.shards: list[dict[str, Any]] = []
        self.arrays: dict[str, list[int]] | None = None
        self.num_inputs = 0
        self._ids: list[str] = []
        self._rows: dict[str, list[np.ndarray]] = {}
        self._write_index(complete=False)

    def add(self, id: str, base: np.ndarray, branches: np.ndarray) -> None:
        """One input's base representation (D_base,) and branch representations (N, D)."""
        rows = {"base": np.asarray(base, dtype=np.float32)}
        rows.update({f"branch{i}": np.asarray(row, dtype=np.float32) for i, row in enumerate(branches)})
        shapes = {name: list(row.shape) for name, row in rows.items()}
        if self.arrays is None:
            self.arrays = shapes
        elif shapes != self.arrays:
            raise ValueError(f"{id}: representations of shapes {shapes}, the earlier inputs' are {self.arrays}")
        self._ids.append(id)
        for name, row in rows.items():
            self._rows.setdefault(name, []).append(row)
        if len(self._ids) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the inputs added since the last shard as a shard (nothing when there are none)."""
        if not self._ids:
            return
        name = f"{len(self.shards):06d}"
        for array, rows in self._rows.items():
            write_atomic(self.folder / f"{name}.{array}.npy", schema.npy_bytes(np.stack(rows)))
        write_atomic(self.folder / f"{name}.ids.json", json.dumps(self._ids, ensure_ascii=False) + "\n")
        self.shards.append({"name": name, "count": len(self._ids)})
        self.num_inputs += len(self._ids)
        self._ids, self._rows = [], {}
        self._write_index(complete=False)

    def close(self) -> None:
        self.flush()
        self._write_index(complete=True)

    def _write_index(self, *, complete: bool) -> None:
        index = {
            "format": EMBEDDINGS_FORMAT,
            "version": EMBEDDINGS_VERSION,
            "complete": complete,
            "num_inputs": self.num_inputs,
            "arrays": self.arrays or {},
            "shards": self.shards,
            **self.metadata,
        }
        write_atomic(self.folder / INDEX_NAME, json.dumps(index, indent=1, ensure_ascii=False) + "\n")

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.flush()  # what was computed stays usable; the index says the set is not complete


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} holds no embeddings written by tools/predict.py")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != EMBEDDINGS_FORMAT or index.get("version") != EMBEDDINGS_VERSION:
        raise ValueError(
            f"{path}: format {index.get('format')!r} version {index.get('version')!r}, this video_ens "
            f"reads {EMBEDDINGS_FORMAT!r} version {EMBEDDINGS_VERSION}"
        )
    return index


def iter_embedding_shards(folder: str | os.PathLike, *, mmap: bool = True) -> Iterator[dict[str, Any]]:
    """{"ids": [...], "base": (n, D_base), "branches": [(n, D) per branch]} per shard, in order; the arrays
    memory-mapped by default (nothing is read until used)."""
    folder = Path(folder)
    index = _read_index(folder)
    branches = sorted((a for a in index["arrays"] if a.startswith("branch")), key=lambda a: int(a[len("branch") :]))

    def load(name: str, array: str) -> np.ndarray:
        return np.load(folder / f"{name}.{array}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)

    for shard in index["shards"]:
        name = shard["name"]
        ids = json.loads((folder / f"{name}.ids.json").read_text(encoding="utf-8"))
        base = load(name, "base")
        if len(ids) != shard["count"] or len(base) != shard["count"]:
            raise ValueError(f"{folder / name}: {len(ids)} ids and {len(base)} rows, the index says {shard['count']}")
        yield {"ids": ids, "base": base, "branches": [load(name, b) for b in branches]}


def read_embeddings(folder: str | os.PathLike) -> dict[str, Any]:
    """Every shard in one: {"ids": [...], "base": (n, D_base), "branches": (N, n, D), "index": the index}."""
    shards = list(iter_embedding_shards(folder, mmap=False))
    index = _read_index(Path(folder))
    if not shards:
        dims = index["arrays"]
        n_branch = sum(a.startswith("branch") for a in dims)
        return {
            "ids": [],
            "base": np.zeros((0, *dims.get("base", [0])), np.float32),
            "branches": np.zeros((n_branch, 0, *dims.get("branch0", [0])), np.float32),
            "index": index,
        }
    return {
        "ids": [i for s in shards for i in s["ids"]],
        "base": np.concatenate([s["base"] for s in shards]),
        "branches": np.stack([np.concatenate(parts) for parts in zip(*(s["branches"] for s in shards), strict=True)]),
        "index": index,
    }


def embeddings_metadata(predictor: Predictor) -> dict[str, Any]:
    """What an embeddings index records about how the rows were made."""
    return {
        "model": predictor.recipe.model.name,
        "num_branches": predictor.model.num_branches,
        "weights": predictor.weights,
        "mode": predictor.mode,
        "precision": predictor.precision,
        "pooling": "base: output averaged over time and space; branch i: its classifier input (EnsembleNet.embed)"
        "; both averaged over the views of an input",
    }
