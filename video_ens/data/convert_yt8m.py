"""Convert YouTube-8M frame-level TFRecords into WebDataset shards of kind "yt8m" (layout: video_ens/data/schema.py).

    python tools/convert_yt8m.py --inputs 'yt8m/frame/train*.tfrecord' --out data/yt8m/train
    # the paper's split: train + 90% of validate to train on, the other 10% of validate to evaluate on
    python tools/convert_yt8m.py --inputs 'yt8m/frame/train*.tfrecord' \\
        --holdout-inputs 'yt8m/frame/validate*.tfrecord' --holdout-fraction 0.1 \\
        --out data/yt8m/train --holdout-out data/yt8m/heldout

No TensorFlow: records are read by video_ens.data.tfrecord (CRC-32C checked) and parsed as tf.train.SequenceExample,
the frame-level layout of the starter code (google/youtube-8m, readers.py YT8MFrameFeatureReader):
    context:       "id" bytes_list [video id], "labels" int64_list [class indices]
    feature_lists: "rgb" one bytes_list per second with 1024 uint8 values, "audio" likewise with 128.

Records with a bad CRC are skipped and listed in _info.json as "<file> record <k> @ byte <offset>"; a damaged
length header or a truncated record loses the rest of that file (the next record's position is unknown), and its
reason says so, with the number of bytes left unread. Records that are not valid SequenceExamples or break the
layout (missing id or feature lists, a frame of the wrong size, rgb/audio frame counts that differ, zero frames,
labels outside [0, --num-classes)) are listed as "<file> record <k>". k is the record's position in its file,
counting from 0, damaged records included.

A conversion that writes no video at all (or, with a holdout, leaves either dataset empty) publishes nothing and
fails with the reasons it skipped records: exit status 2 from the command line, ValueError from convert(). An input
file that cannot be read is skipped ("unreadable"); a shard that cannot be written (disk full, quota, file-size
limit) ends the conversion, naming the shard, and publishes nothing: exit status 1, OSError from convert().

Holdout: among --holdout-inputs, a video goes to --holdout-out when the first 8 bytes of SHA-256(video id), read
as a fraction of 2**64, are below --holdout-fraction; the split is therefore deterministic, independent of file
order and worker count, and stable when files are added. --holdout-inputs without a holdout fraction go to --out.

Parallel over input files (--workers): each worker writes its file's shards itself, and the shards are then
numbered in input-file order, so the result does not depend on the worker count.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import os
from dataclasses import dataclass

import numpy as np

from video_ens.data.schema import (
    YT8M_AUDIO_DIM,
    YT8M_NUM_CLASSES,
    YT8M_RGB_DIM,
    DatasetInfo,
    encode_yt8m_sample,
    make_key,
)
from video_ens.data.tfrecord import ProtobufDecodeError, TFRecordError, decode_sequence_example, iter_records
from video_ens.data.writer import DatasetWriter, ShardSeries, check_replaceable, map_ordered, skip_summary

CONVERTER_NAME = "convert_yt8m"
CONVERTER_VERSION = "1"


def holdout_score(video_id: str) -> float:
    """A number in [0, 1) fixed by the video id alone (SHA-256), used to choose held-out videos."""
    digest = hashlib.sha256(video_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _expand(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        for path in found:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is not a file")
            if path not in files:
                files.append(path)
    return files


def load_vocabulary(path: str, num_classes: int) -> list[str]:
    """Class names from the YouTube-8M vocabulary.csv (columns Index and Name); unnamed classes get their index."""
    names = [str(i) for i in range(num_classes)]
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                index = int(row["Index"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: expected columns Index and Name (the YouTube-8M vocabulary.csv)") from None
            if 0 <= index < num_classes and row.get("Name"):
                names[index] = row["Name"]
    return names


def parse_video(payload: bytes, num_classes: int) -> tuple[str, np.ndarray, np.ndarray, list[int]]:
    """(video id, rgb uint8 (T, 1024), audio uint8 (T, 128), labels) of one frame-level record.

    Raises ValueError with the reason when the record does not follow the layout.
    """
    try:
        ex = decode_sequence_example(payload)
    except ProtobufDecodeError as e:
        raise ValueError(f"not a SequenceExample: {e}") from None
    id_feature = ex.context.get("id")
    if id_feature is None or id_feature.kind != "bytes" or len(id_feature.values) != 1:
        raise ValueError("no context feature 'id' (one bytes value)")
    video_id = id_feature.values[0].decode("utf-8", errors="backslashreplace")
    label_feature = ex.context.get("labels")
    labels = list(label_feature.values) if label_feature is not None and label_feature.kind == "int64" else []
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"labels outside [0, {num_classes}): {bad[:5]} (video {video_id})")
    arrays = []
    for name, dim in (("rgb", YT8M_RGB_DIM), ("audio", YT8M_AUDIO_DIM)):
        frames = ex.feature_lists.get(name)
        if frames is None:
            raise ValueError(f"no feature list {name!r} (video {video_id}; video-level records are not supported)")
        rows = []
        for t, feat in enumerate(frames):
            if feat.kind != "bytes" or len(feat.values) != 1 or len(feat.values[0]) != dim:
                size = len(feat.values[0]) if feat.kind == "bytes" and len(feat.values) == 1 else "?"
                raise ValueError(
                    f"frame {t} of {name!r} is not one bytes value of {dim} (got {size}) (video {video_id})"
                )
            rows.append(feat.values[0])
        arrays.append(np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), dim))  # (T, dim)
    rgb, audio = arrays
    if rgb.shape[0] != audio.shape[0]:
        raise ValueError(f"rgb has {rgb.shape[0]} frames but audio has {audio.shape[0]} (video {video_id})")
    if rgb.shape[0] == 0:
        raise ValueError(f"zero frames (video {video_id})")
    return video_id, rgb, audio, sorted(set(labels))


@dataclass
class _FileTask:
    file_index: int
    path: str
    main_dir: str
    holdout_dir: str | None  # set when this file's videos may be held out
    holdout_fraction: float
    num_classes: int
    shard_size: int


@dataclass
class _FileResult:
    file_index: int
    main_shards: list[tuple[str, int]]
    holdout_shards: list[tuple[str, int]]
    skipped: list[tuple[str, str]]  # (source, reason)
    records: int


def _readable_records(path: str, errors: list[TFRecordError], unreadable: list[str]):
    """iter_records(path), ending at an OSError of reading the file, whose reason is appended to `unreadable`.

    Only reading is guarded: the caller writes shards in its loop body, outside this generator, so an OSError of
    writing (a full disk) is not mistaken for an unreadable input.
    """
    try:
        yield from iter_records(path, errors=errors)
    except OSError as e:
        unreadable.append(f"unreadable: {e}")


def _convert_file(task: _FileTask) -> _FileResult:
    """Read one TFRecord file and write its videos into shard series of its own (runs in a worker)."""
    stem = f"part{task.file_index:06d}"
    main = ShardSeries(task.main_dir, stem, shard_size=task.shard_size)
    holdout = ShardSeries(task.holdout_dir, stem, shard_size=task.shard_size) if task.holdout_dir else None
    skipped: list[tuple[int, str, str]] = []  # (record, source, reason); record -1 for the whole file
    errors: list[TFRecordError] = []
    unreadable: list[str] = []
    name = os.path.basename(task.path)
    yielded = 0
    try:
        for payload in _readable_records(task.path, errors, unreadable):
            # The record's position in the file: the errors so far are the damaged records before this one.
            record = yielded + len(errors)
            yielded += 1
            try:
                video_id, rgb, audio, labels = parse_video(payload, task.num_classes)
            except ValueError as e:
                skipped.append((record, f"{name} record {record}", str(e)))
                continue
            sample = encode_yt8m_sample(
                key=make_key(f"{task.file_index:05d}{record:06d}", video_id),
                video_id=video_id,
                rgb=rgb,
                audio=audio,
                labels=labels,
            )
            if holdout is not None and holdout_score(video_id) < task.holdout_fraction:
                holdout.write(sample)
            else:
                main.write(sample)
        main_shards = main.close()
        holdout_shards = holdout.close() if holdout is not None else []
    except BaseException:
        # A failed write (or an interrupt): close this file's shards quietly; the main process deletes the partial
        # dataset they are in.
        main.abort()
        if holdout is not None:
            holdout.abort()
        raise
    skipped += [(-1, name, reason) for reason in unreadable]
    skipped += [(e.record, f"{name} record {e.record} @ byte {e.offset}", _corrupt_reason(e)) for e in errors]
    skipped.sort(key=lambda item: item[0])  # file order: damaged records were only added once reading ended
    return _FileResult(
        task.file_index,
        main_shards,
        holdout_shards,
        [(source, reason) for _, source, reason in skipped],
        yielded + len(errors),
    )


def _corrupt_reason(error: TFRecordError) -> str:
    if not error.file_stopped:
        return f"corrupt record: {error.problem}"
    return (
        f"corrupt record: {error.problem}; the rest of the file ({error.remaining} bytes from this offset on) could "
        "not be read, so any records in it are lost"
    )


def _nothing_written(dataset: str, files: list[str], skipped: list[tuple[str, str]], hint: str = "") -> str:
    """The error message of a conversion that wrote no video into `dataset`: the inputs and why records were skipped."""
    lines = [
        f"no video was written to {dataset} from {len(files)} input file(s) ({', '.join(files[:3])}"
        f"{', ...' if len(files) > 3 else ''}): {len(skipped)} record(s) or file(s) skipped{hint}; nothing was "
        "published"
    ]
    if not skipped:
        lines.append("  the input files hold no records")
    lines += skip_summary(skipped)
    return "\n".join(lines)


def convert(
    *,
    inputs: list[str],
    out: str,
    holdout_inputs: list[str] = (),
    holdout_fraction: float = 0.0,
    holdout_out: str | None = None,
    num_classes: int = YT8M_NUM_CLASSES,
    vocabulary: str | None = None,
    workers: int = 1,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    extra_info: dict | None = None,
    timeout: float | None = 3600.0,
) -> dict[str, DatasetInfo]:
    """Convert TFRecord files (paths or glob patterns) into `out` and, with a holdout, `holdout_out`.

    Returns {"main": info} or {"main": info, "holdout": info}.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"--holdout-fraction must be in [0, 1), got {holdout_fraction}")
    if holdout_fraction > 0 and not holdout_out:
        raise ValueError("--holdout-fraction needs --holdout-out")
    if holdout_fraction > 0 and not holdout_inputs:
        raise ValueError("--holdout-fraction needs --holdout-inputs (the files to split, e.g. validate*.tfrecord)")
    if holdout_out and os.path.abspath(holdout_out) == os.path.abspath(out):
        raise ValueError("--holdout-out must differ from --out")
    main_files = _expand(list(inputs))
    holdout_files = [f for f in _expand(list(holdout_inputs)) if f not in main_files]
    if not main_files and not holdout_files:
        raise ValueError("no input files")
    label_names = load_vocabulary(vocabulary, num_classes) if vocabulary else None
    use_holdout = holdout_fraction > 0
    check_replaceable(os.path.abspath(out), overwrite=overwrite)
    if use_holdout:
        check_replaceable(os.path.abspath(holdout_out), overwrite=overwrite)

    args = {
        "inputs": [os.path.abspath(f) for f in main_files],
        "holdout_inputs": [os.path.abspath(f) for f in holdout_files],
        "holdout_fraction": holdout_fraction,
        "num_classes": num_classes,
        "vocabulary": vocabulary,
        "shard_size": shard_size,
    }
    converter = {"name": CONVERTER_NAME, "version": CONVERTER_VERSION, "args": args}
    from tqdm import tqdm

    with contextlib.ExitStack() as stack:  # a writer left without commit() deletes its partial folder
        main_w = stack.enter_context(
            DatasetWriter(out, kind="yt8m", converter=converter, shard_size=shard_size, overwrite=overwrite)
        )
        holdout_w = None
        if use_holdout:
            holdout_w = stack.enter_context(
                DatasetWriter(holdout_out, kind="yt8m", converter=converter, shard_size=shard_size, overwrite=overwrite)
            )
        files = main_files + holdout_files
        tasks = [
            _FileTask(
                i,
                path,
                main_w.parts_dir,
                holdout_w.parts_dir if holdout_w is not None and path in holdout_files else None,
                holdout_fraction,
                num_classes,
                shard_size,
            )
            for i, path in enumerate(files)
        ]
        # closed on an error too, so that the error is not printed behind a progress bar
        bar = stack.enter_context(tqdm(total=len(tasks), disable=not progress, desc=os.path.basename(out), unit="file"))
        skipped: list[tuple[str, str]] = []
        for result in map_ordered(_convert_file, tasks, workers=workers, timeout=timeout):
            main_w.add_shards(result.main_shards)
            if holdout_w is not None:
                holdout_w.add_shards(result.holdout_shards)
            for source, reason in result.skipped:  # listed once, in the main dataset's _info.json
                main_w.skip(source, reason)
            skipped += result.skipped
            bar.update(1)
            bar.set_postfix(videos=main_w.num_written + (holdout_w.num_written if holdout_w else 0))
        bar.close()
        # An empty dataset would only fail later, in a loader with nothing to read: fail here, publishing neither.
        if main_w.num_written == 0:
            raise ValueError(_nothing_written(out, files, skipped))
        if holdout_w is not None and holdout_w.num_written == 0:
            hint = f" (or --holdout-fraction {holdout_fraction} held out none of the videos read)"
            raise ValueError(_nothing_written(holdout_out, holdout_files, skipped, hint))
        infos = {"main": main_w.commit(num_classes=num_classes, label_names=label_names, extra=extra_info)}
        if holdout_w is not None:
            infos["holdout"] = holdout_w.commit(num_classes=num_classes, label_names=label_names, extra=extra_info)
    return infos
