"""Convert Kinetics-style video clips into WebDataset shards of kind "video" (layout: video_ens/data/schema.py).

    python tools/convert_kinetics.py --annotations kinetics400/train.csv --videos kinetics400/train \\
        --out data/k400/train [--split train] [--labels classes.txt] [--short-side 256 --keyint 16] [--workers 8]

Annotations, either of:
  * the Kinetics CSV, header `label,youtube_id,time_start,time_end,split` (extra columns such as `is_cc` are
    ignored); the clip of a row is the file `<youtube_id>_<time_start:06d>_<time_end:06d>.<ext>` anywhere under
    --videos (the naming of the common Kinetics downloaders; ext one of mp4, webm, mkv, avi, mov);
  * a plain CSV with header `path,label`, paths relative to --videos.
Paths must stay inside --videos: absolute paths, `..` components and YouTube ids that are not plain ids are skipped.

Labels: sorted class names of the (split-filtered) rows, or --labels (a text file with one name per line, or a
converted dataset folder / its _info.json, so that val uses exactly train's label map). Class names that are all
integers sort numerically.

Frame counts: the stored num_frames is the number of frames a sequential decode yields, the numbering the loader
decodes by (video_ens.data.decode). Container headers over-report it: a stream-copy trim
(`ffmpeg -ss 1.3 -i a.mp4 -t 2 -c copy b.mp4`) declared 61 frames that decode to 52, and a truncated file keeps
its old claim (50 declared, 10 decodable). So each clip is counted by `decode.probe` (demuxing only: video packets,
less those an edit list discards), and then its first and last frames are decoded with `decode.decode_frames`, as
the loader would. If the last frame does not decode (a truncated or damaged tail), the clip is decoded from the start
and stored with the frames that came out; it is listed under "shortened" in _info.json's "extra". --verify always
decodes every frame (catching damage in the middle of a clip as well, which the default check can miss). Cost per
clip on one core (10 s, 30 fps, H.264): the check decodes the last keyframe interval, 15 ms at 340x256 with a
keyframe every 250 frames and 91 ms at 1280x720, where reading the header's claim took 1.8 and 9.6 ms and --verify
takes 56 and 450 ms.

Missing, unreadable and zero-frame clips are skipped and listed in _info.json, never fatal; so is a clip whose
decoder crashes its worker process (with --workers > 1: the clips that were in flight are then redone one at a time
in a fresh process to find it; with --workers 1 the crash ends the conversion). A conversion that writes no clip at
all publishes nothing and fails (exit status 2), listing the reasons. A shard that cannot be written (disk full,
quota, file-size limit) ends the conversion, naming the shard, and publishes nothing (exit status 1).

--short-side S --keyint N re-encodes each clip with libx264 (video only, yuv420p, single-threaded, short side S, a
keyframe every N frames): dense keyframes make seeking to a sampled window cheap (MMAction2's resize_videos.py
--dense measured 2.3x faster sparse sampling). A clip whose decoding breaks off is re-encoded up to that point.

Rotation and pixel shape: the loader uses stored pixels as they are, so a clip whose container says to show it
rotated (phone videos: a display matrix, or a "rotate" tag) or whose pixels are not square (sample aspect ratio
other than 1, e.g. anamorphic DVD/DV) is re-encoded upright with square pixels (video_ens.data.decode.read_display,
apply_display), also without --short-side: at its own displayed size then (SAR above 1 widens, below 1 heightens),
with a keyframe every --keyint (default 16) frames. Such clips are listed under "display" in _info.json's "extra";
a rotation that is not a multiple of 90 degrees skips the clip.

Samples are shuffled with --seed before writing (annotation files are usually sorted by class, and a streaming
loader's shuffle buffer cannot undo class-sorted shards); --no-shuffle keeps the CSV order.
"""

from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath

from video_ens.data.decode import DecodeError, Display, apply_display, decode_frames, probe, read_display
from video_ens.data.encode import H264Settings, H264Writer
from video_ens.data.schema import (
    VIDEO_EXTS,
    DatasetInfo,
    encode_video_sample,
    load_label_names,
    make_key,
    sort_label_names,
)
from video_ens.data.writer import DatasetWriter, check_replaceable, map_surviving_crashes, skip_summary

CONVERTER_NAME = "convert_kinetics"
CONVERTER_VERSION = "1"
# Frames between keyframes of a re-encoded clip (--keyint): a clip window of 64 frames at stride 1 then decodes at most
# 15 frames it does not use before its start (benchmarks/results/loader_pipeline_keyint_vm_2026-12-06.csv).
DEFAULT_KEYINT = 16

_YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class Clip:
    """One annotation row: where its file is (or why it cannot be used), its class and id."""

    source: str  # "<csv name>:<line>" for messages
    video_id: str
    label_name: str
    path: str | None = None  # absolute path of the clip file
    relpath: str = ""  # path relative to --videos (stored in the sample's json)
    problem: str | None = None  # set when the row is skipped before any decoding


def _index_videos(videos: str) -> dict[str, str]:
    """Map file stem -> path for every video file under `videos` (any layout: flat, per class, per split)."""
    index: dict[str, str] = {}
    for root, dirs, files in os.walk(videos):
        dirs.sort()
        for name in sorted(files):
            stem, dot, ext = name.rpartition(".")
            if not dot or ext.lower() not in VIDEO_EXTS:
                continue
            path = os.path.join(root, name)
            # Prefer mp4 when a clip exists in several containers.
            if stem not in index or (ext.lower() == "mp4" and not index[stem].lower().endswith(".mp4")):
                index[stem] = path
    return index


def _safe_relpath(raw: str) -> str | None:
    """The path if it is relative and has no `..` component (POSIX or Windows spelling), else None."""
    if not raw or PurePosixPath(raw).is_absolute() or PureWindowsPath(raw).is_absolute() or PureWindowsPath(raw).drive:
        return None
    parts = PureWindowsPath(raw).parts  # splits on both "/" and "\\"
    if any(p == ".." for p in parts):
        return None
    return str(PurePosixPath(*PureWindowsPath(raw).parts))


def read_annotations(annotations: str, videos: str, *, split: str | None = None) -> list[Clip]:
    """Rows of a Kinetics or `path,label` CSV as `Clip`s (rows of other splits left out, bad rows flagged)."""
    name = os.path.basename(annotations)
    with open(annotations, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        kinetics = {"label", "youtube_id", "time_start", "time_end"} <= set(header)
        plain = {"path", "label"} <= set(header)
        if not (kinetics or plain):
            raise ValueError(
                f"{annotations}: header {header} is neither Kinetics (label,youtube_id,time_start,time_end,split) "
                "nor path,label"
            )
        if split is not None and "split" not in header:
            raise ValueError(f"{annotations}: --split {split} given but the CSV has no split column")
        rows = list(reader)

    index = _index_videos(videos) if kinetics else {}
    clips = []
    for line, row in enumerate(rows, start=2):
        if split is not None and (row.get("split") or "").strip() != split:
            continue
        source = f"{name}:{line}"
        label = (row.get("label") or "").strip()
        if kinetics:
            vid = (row.get("youtube_id") or "").strip()
            clip = Clip(source=f"{source} ({vid})", video_id=vid, label_name=label)
            if not _YOUTUBE_ID.match(vid):
                clip.problem = f"youtube_id {vid!r} is not a plain id (would leave the videos folder)"
            else:
                try:
                    stem = f"{vid}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
                except (TypeError, ValueError):
                    clip.problem = f"bad time_start/time_end {row.get('time_start')!r}/{row.get('time_end')!r}"
                else:
                    clip.video_id = stem
                    clip.path = index.get(stem)
                    if clip.path is None:
                        clip.problem = f"missing: no {stem}.<{'|'.join(VIDEO_EXTS)}> under {videos}"
                    else:
                        clip.relpath = os.path.relpath(clip.path, videos)
        else:
            raw = (row.get("path") or "").strip()
            rel = _safe_relpath(raw)
            clip = Clip(source=f"{source} ({raw})", video_id=Path(raw).stem, label_name=label)
            if rel is None:
                clip.problem = f"path {raw!r} is absolute or contains '..' (must stay inside the videos folder)"
            else:
                clip.relpath = rel
                clip.path = os.path.join(videos, rel)
                if not os.path.isfile(clip.path):
                    clip.problem = f"missing: {clip.path} not found"
        if not label and clip.problem is None:
            clip.problem = "empty label"
        clips.append(clip)
    return clips


# ---------------------------------------------------------------------------------------------------------------
# Per-clip work (runs in worker processes)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Task:
    index: int
    path: str
    relpath: str
    video_id: str
    label: int
    short_side: int | None
    keyint: int | None
    verify: bool


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def _reencode(
    path: str, short_side: int | None, keyint: int, display: Display | None = None
) -> tuple[bytes, Fraction, int, int, int, str | None]:
    """Re-encode the first video stream to H.264 (short side `short_side`, keyframe every `keyint` frames), shown as
    `display` says: resampled to square pixels, then rotated and mirrored. short_side None keeps the displayed size.

    Returns (video, fps, frames, width, height, why decoding broke off early or None); width x height as stored now.
    """
    import av

    display = display or Display()
    turn = Display(rotation=display.rotation, mirror=display.mirror)  # what is left once the scaler made pixels square
    # x264's mb-tree stays on here (better quality per bit); the demo clips turn it off (encode.H264Settings.mbtree):
    # re-encoded bytes are not guaranteed identical across runs, decoded content differs by coding noise at most.
    settings = H264Settings(crf=23, preset="medium", keyint=keyint, scenecut=False)  # a fixed GOP

    with av.open(path) as src:
        stream = src.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ValueError("unknown frame rate")
        rate = Fraction(rate).limit_denominator(1001 * 1000)
        out = None
        stopped = None
        try:
            for frame in _frames_until_error(src.decode(stream)):
                if isinstance(frame, Exception):
                    if out is None:
                        raise frame
                    stopped = f"decoding stopped after {out.count} frames ({type(frame).__name__}: {frame})"
                    break
                if out is None:
                    w, h = display.square_size(frame.width, frame.height)  # square pixels, before the rotation
                    scale = short_side / min(w, h) if short_side else 1.0
                    width, height = _even(w * scale), _even(h * scale)
                    shown_width, shown_height = turn.size(width, height)  # square already: only the rotation
                    out = H264Writer(fps=rate, width=shown_width, height=shown_height, settings=settings)
                if turn.identity:
                    out.write(frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA"))
                else:  # rotate the scaled RGB picture; the writer converts it back to the encoder's format
                    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
                    out.write(apply_display(rgb.to_ndarray(), turn))
        except BaseException:
            if out is not None:
                out.close()
            raise
        if out is None:
            raise ValueError("no decodable frames")
        video = out.finish()
    return video, rate, out.count, out.width, out.height, stopped


def _frames_until_error(frames):
    """The frames of a decode iterator, then the exception that ended it early (if one did) as the last item."""
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except Exception as e:  # av.error.*: a damaged or truncated stream
            yield e
            return
        yield frame


def _decode_all(path: str) -> tuple[int, int, int, str | None]:
    """(frames, width, height, why decoding broke off or None) of a sequential decode of the first video stream."""
    import av

    count = width = height = 0
    with av.open(path) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_type = "NONE"  # one core per worker, as decode.py decodes
        stream.codec_context.thread_count = 1
        for frame in _frames_until_error(c.decode(stream)):
            if isinstance(frame, Exception):
                return count, width, height, f"{type(frame).__name__}: {frame}"
            if count == 0:
                width, height = frame.width, frame.height
            count += 1
    return count, width, height, None


def _count_frames(path: str, verify: bool) -> tuple[float, int, int, int, str | None]:
    """(fps, frames a sequential decode yields, width, height, why fewer than probe counted or None).

    Raises DecodeError or ValueError for a clip to skip.
    """
    info = probe(path)  # demux only: packets that show a frame, whatever the header claims
    if info.fps <= 0:
        raise ValueError("unknown frame rate")
    packets = info.num_frames
    if not verify:
        try:
            # The loader's own decoder, on the first frame (a broken stream) and the last (a truncated tail).
            first_last = decode_frames(path, [0, packets - 1])  # (2, H, W, 3)
            return info.fps, packets, first_last.shape[2], first_last.shape[1], None
        except DecodeError:
            pass  # count by decoding from the start, below
    count, width, height, stopped = _decode_all(path)
    if count == 0:
        raise ValueError(f"no decodable frames ({stopped})" if stopped else "no decodable frames")
    if count >= packets:
        # More frames than packets never happens with the codecs seen so far; the packet count bounds the indices
        # decode_frames accepts, so it is what can be stored.
        return info.fps, packets, width, height, None
    why = f"a sequential decode yields {count} frames from {packets} video packets"
    return info.fps, count, width, height, f"{why} ({stopped})" if stopped else why


def _load_clip(task: _Task) -> tuple[int, dict | None, str | None, dict | None]:
    """(index, sample, None, note) for a usable clip, (index, None, reason, None) for one to skip. Never raises.

    note: None for an intact clip stored as shown; else {"num_frames", "why"} for a clip stored with fewer frames
    than it should hold and/or {"display": {"rotation", "mirror", "sar"}} for one turned upright or given square
    pixels.
    """
    notes: dict = {}
    try:
        display = read_display(task.path)
        if task.short_side or not display.identity:
            video, rate, num_frames, width, height, note = _reencode(
                task.path, task.short_side, task.keyint or DEFAULT_KEYINT, display
            )
            container = "mp4"
            if not display.identity:
                notes["display"] = {"rotation": display.rotation, "mirror": display.mirror, "sar": str(display.sar)}
        else:
            rate, num_frames, width, height, note = _count_frames(task.path, task.verify)
            with open(task.path, "rb") as f:
                video = f.read()
            container = task.path.rpartition(".")[2].lower()
        if num_frames <= 0:
            return task.index, None, "no decodable frames", None
    except Exception as e:  # any decoder failure skips this clip only
        reason = str(e) or type(e).__name__
        if isinstance(e, DecodeError):
            reason = f"unreadable: {reason.removeprefix(task.path + ': ')}"
        elif not reason.startswith(("no ", "unknown ")):
            reason = f"unreadable: {type(e).__name__}: {reason}"
        return task.index, None, reason, None
    sample = encode_video_sample(
        key=make_key(task.index, task.video_id),
        video=video,
        container=container,
        label=task.label,
        video_id=task.video_id,
        fps=float(rate),
        num_frames=num_frames,
        width=width,
        height=height,
        source=task.relpath,
    )
    if note is not None:
        notes.update(num_frames=num_frames, why=note)
    return task.index, sample, None, notes or None


def _crashed(task: _Task, why: str) -> tuple[int, None, str, None]:
    return task.index, None, f"decoder crashed: the worker process died converting this clip ({why})", None


def _nothing_written(annotations: str, split: str | None, skipped: list[tuple[str, str]]) -> str:
    """The error message of a conversion that wrote no clip: the input, the count skipped and the reasons."""
    rows = f"rows of split {split!r}" if split is not None else "rows"
    lines = [f"no clip was converted: all {len(skipped)} {rows} of {annotations} were skipped; nothing was published:"]
    if not skipped:
        lines[0] = f"no clip was converted: {annotations} has no {rows}; nothing was published"
    lines += skip_summary(skipped)
    return "\n".join(lines)


def convert(
    *,
    annotations: str,
    videos: str,
    out: str,
    split: str | None = None,
    labels: str | list[str] | None = None,
    short_side: int | None = None,
    keyint: int | None = None,
    verify: bool = False,
    workers: int = 1,
    shard_size: int = 256,
    seed: int | None = 0,
    overwrite: bool = False,
    progress: bool = True,
    extra_info: dict | None = None,
    timeout: float | None = 600.0,
) -> DatasetInfo:
    """Convert one annotation file's clips into a dataset folder `out`; returns what went into `_info.json`.

    labels: a list of class names, or a path for `load_label_names`, or None for the sorted names in the CSV.
    seed: shuffle seed for the sample order (None keeps the CSV order).
    """
    if keyint is not None and short_side is None:
        raise ValueError("--keyint only applies when re-encoding: give --short-side too")
    if short_side is not None and keyint is None:
        keyint = DEFAULT_KEYINT
    if short_side is not None and short_side < 2:
        raise ValueError(f"--short-side must be >= 2, got {short_side}")
    if keyint is not None and keyint < 1:
        raise ValueError(f"--keyint must be >= 1, got {keyint}")
    if not os.path.isdir(videos):
        raise FileNotFoundError(f"--videos {videos} is not a folder")
    check_replaceable(os.path.abspath(out), overwrite=overwrite)  # fail before any work

    clips = read_annotations(annotations, videos, split=split)
    if isinstance(labels, str):
        label_names = load_label_names(labels)
    elif labels is not None:
        label_names = list(labels)
    else:
        label_names = sort_label_names(c.label_name for c in clips if c.label_name)
    label_index = {n: i for i, n in enumerate(label_names)}
    for c in clips:
        if c.problem is None and c.label_name not in label_index:
            c.problem = f"label {c.label_name!r} not in the label map"
    if seed is not None:
        random.Random(seed).shuffle(clips)

    args = {
        "annotations": os.path.abspath(annotations),
        "videos": os.path.abspath(videos),
        "split": split,
        "labels": labels if isinstance(labels, str) or labels is None else "<list>",
        "short_side": short_side,
        "keyint": keyint,
        "verify": verify,
        "shard_size": shard_size,
        "seed": seed,
    }
    converter = {"name": CONVERTER_NAME, "version": CONVERTER_VERSION, "args": args}
    with DatasetWriter(out, kind="video", converter=converter, shard_size=shard_size, overwrite=overwrite) as w:
        tasks = []
        skipped: list[tuple[str, str]] = []
        for c in clips:
            if c.problem is not None:
                skipped.append((c.source, c.problem))
                continue
            tasks.append(
                _Task(len(tasks), c.path, c.relpath, c.video_id, label_index[c.label_name], short_side, keyint, verify)
            )
        sources = [c.source for c in clips if c.problem is None]
        shortened, displayed = [], []
        results = map_surviving_crashes(
            _load_clip, tasks, workers=workers, chunksize=4, crashed=_crashed, timeout=timeout
        )
        # closed on an error too, so that the error is not printed behind a progress bar
        with _progress(total=len(tasks), enabled=progress, desc=f"{os.path.basename(out)}") as bar:
            for index, sample, reason, note in results:
                if sample is None:
                    skipped.append((sources[index], reason))
                else:
                    w.write(sample)
                    if note and "why" in note:
                        shortened.append(
                            {"source": sources[index], "num_frames": note["num_frames"], "why": note["why"]}
                        )
                    if note and "display" in note:
                        displayed.append({"source": sources[index], **note["display"]})
                bar.update(1)
        for source, reason in skipped:
            w.skip(source, reason)
        if w.num_written == 0:  # an empty dataset would only fail later, in a loader with nothing to read
            raise ValueError(_nothing_written(annotations, split, skipped))
        extra = dict(extra_info or {})
        if shortened:
            extra["shortened"] = shortened
        if displayed:
            extra["display"] = displayed
        return w.commit(num_classes=len(label_names), label_names=label_names, extra=extra)


def _progress(*, total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="clip", dynamic_ncols=True)
