"""Convert an ImageNet-style class-per-folder tree into WebDataset shards of kind "image" (video_ens/data/schema.py).

    python tools/convert_images.py --root imagenet/train --out data/imagenet/train [--labels data/imagenet/train]

    <root>/<class name>/**/<image file>     one folder per class; hidden files and folders are ignored

Class indices are the sorted folder names, or --labels (a text file with one name per line, a converted dataset
folder or its _info.json: convert val with train's labels so the indices agree). The encoded bytes are stored
unchanged, under the field of their real format (found from the content, not the file name: ImageNet has PNG and
CMYK files named .JPEG). With Pillow installed every image is fully decoded to prove it is readable; without it,
only the format signature is checked. Files that are not readable images are skipped and listed in _info.json; a
conversion that writes no image at all publishes nothing and fails (exit status 2), listing the reasons. A shard
that cannot be written (disk full, quota, file-size limit) ends the conversion, naming the shard, and publishes
nothing (exit status 1).
Samples are shuffled with --seed (class-sorted shards defeat a streaming loader's shuffle buffer).
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass

from video_ens.data.schema import DatasetInfo, encode_image_sample, load_label_names, make_key, sort_label_names
from video_ens.data.writer import DatasetWriter, check_replaceable, map_ordered, skip_summary

CONVERTER_NAME = "convert_images"
CONVERTER_VERSION = "1"

# Format signatures (each format's specification: JPEG SOI marker, the PNG signature, GIF87a/89a, BMP "BM",
# RIFF....WEBP, TIFF byte-order marks).
_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_PIL_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tiff"}


def sniff_format(data: bytes) -> str | None:
    """The IMAGE_EXTS field name of `data` from its signature, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def check_image(data: bytes) -> str:
    """Format field of a readable image; raises ValueError saying why the bytes are not one."""
    fmt = sniff_format(data)
    try:
        from PIL import Image
    except ImportError:
        if fmt is None:
            raise ValueError("not an image (unknown signature)") from None
        return fmt
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes every pixel: catches truncated files that a header check passes
            pil_format = img.format
    except Exception as e:  # PIL raises many types for bad input
        raise ValueError(f"unreadable: {type(e).__name__}: {e}") from None
    if pil_format not in _PIL_FORMATS:
        raise ValueError(f"unsupported image format {pil_format}")
    return _PIL_FORMATS[pil_format]


@dataclass
class _Task:
    index: int
    path: str
    relpath: str
    label: int


def _load_image(task: _Task) -> tuple[int, dict | None, str | None]:
    try:
        with open(task.path, "rb") as f:
            data = f.read()
        fmt = check_image(data)
    except (OSError, ValueError) as e:
        return task.index, None, str(e)
    ident = os.path.splitext(os.path.basename(task.relpath))[0]
    sample = encode_image_sample(
        key=make_key(task.index, ident), image=data, format=fmt, label=task.label, source=task.relpath
    )
    return task.index, sample, None


def _nothing_written(root: str, skipped: list[tuple[str, str]]) -> str:
    """The error message of a conversion that wrote no image: the input, the count skipped and the reasons."""
    lines = [f"no image was converted: all {len(skipped)} files under {root} were skipped; nothing was published:"]
    if not skipped:
        lines[0] = f"no image was converted: {root} holds no files in class folders; nothing was published"
    lines += skip_summary(skipped)
    return "\n".join(lines)


def list_images(root: str) -> list[tuple[str, str]]:
    """[(relative path, class name)] for every non-hidden file under each class folder, in sorted order."""
    items = []
    for cls in sorted(os.listdir(root)):
        cls_dir = os.path.join(root, cls)
        if cls.startswith(".") or not os.path.isdir(cls_dir):
            continue
        for dirpath, dirs, files in os.walk(cls_dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    items.append((os.path.relpath(os.path.join(dirpath, name), root), cls))
    return items


def convert(
    *,
    root: str,
    out: str,
    labels: str | list[str] | None = None,
    workers: int = 1,
    shard_size: int = 1000,
    seed: int | None = 0,
    overwrite: bool = False,
    progress: bool = True,
    extra_info: dict | None = None,
    timeout: float | None = 60.0,
) -> DatasetInfo:
    """Convert the tree at `root` into the dataset folder `out`; returns what went into `_info.json`."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--root {root} is not a folder")
    check_replaceable(os.path.abspath(out), overwrite=overwrite)
    items = list_images(root)
    if isinstance(labels, str):
        label_names = load_label_names(labels)
    elif labels is not None:
        label_names = list(labels)
    else:
        label_names = sort_label_names(cls for _, cls in items)
    label_index = {n: i for i, n in enumerate(label_names)}
    if seed is not None:
        random.Random(seed).shuffle(items)

    args = {"root": os.path.abspath(root), "labels": labels if not isinstance(labels, list) else "<list>"}
    args.update(shard_size=shard_size, seed=seed)
    converter = {"name": CONVERTER_NAME, "version": CONVERTER_VERSION, "args": args}
    from tqdm import tqdm

    with DatasetWriter(out, kind="image", converter=converter, shard_size=shard_size, overwrite=overwrite) as w:
        tasks = []
        skipped: list[tuple[str, str]] = []
        for rel, cls in items:
            if cls not in label_index:
                skipped.append((rel, f"class folder {cls!r} not in the label map"))
            else:
                tasks.append(_Task(len(tasks), os.path.join(root, rel), rel, label_index[cls]))
        # closed on an error too, so that the error is not printed behind a progress bar
        bar = tqdm(total=len(tasks), disable=not progress, desc=os.path.basename(out), unit="img", dynamic_ncols=True)
        with bar:
            for index, sample, reason in map_ordered(
                _load_image, tasks, workers=workers, chunksize=64, timeout=timeout
            ):
                if sample is None:
                    skipped.append((tasks[index].relpath, reason))
                else:
                    w.write(sample)
                bar.update(1)
        for source, reason in skipped:
            w.skip(source, reason)
        if w.num_written == 0:  # an empty dataset would only fail later, in a loader with nothing to read
            raise ValueError(_nothing_written(root, skipped))
        return w.commit(num_classes=len(label_names), label_names=label_names, extra=extra_info)
