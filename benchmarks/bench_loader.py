"""Loader benchmark: decoding per backend beside the ffmpeg command line; --mode pipeline: train_stream end to end.

    python benchmarks/bench_loader.py                   # makes 3 clips of 340x256 H.264 (10 s, 30 fps) in a temp dir
    python benchmarks/bench_loader.py --videos DIR      # every .mp4/.mkv/.webm/.avi under DIR

Everything runs on one thread: decoders single-threaded, torch.set_num_threads(1), `ffmpeg -threads 1`. Training
gets its parallelism from DataLoader workers, one core each (shared/design/environment.md), so the per-core rate is
the number that matters. Sources are the encoded bytes in memory, as they come out of a shard.

Samplings (each call returns the frames at --short-side):
  window  64 consecutive frames at a random start (a training clip at stride 1)
  spread  64 frames spread evenly over the whole video (a sparse sampler)
  all     every frame, the same work as the ffmpeg command line, so its ratio to ffmpeg is like for like

frames_per_s counts frames returned to the caller; for "window" and "spread" the decoder also decodes the frames
between keyframe and window, or between the spread frames, which the rate includes as cost, not as frames.
vs_ffmpeg divides by the ffmpeg CLI's rate for every frame without its process start (ffmpeg-cli-net: the time of
a run minus a one-frame run of the same file; the start alone is ~50 ms per file here, 15-40% of a 10 s clip).

Backends are interleaved over --rounds rounds (each round: the same clip positions for every backend), so load from
other processes falls on all of them alike; the CSV keeps the median and the best round, and the load average.
The results go to benchmarks/results/loader_<hostname>_<date>.csv with versions, machine and git SHA.

Pipeline mode (--mode pipeline): the training input pipeline end to end, as train.py runs it
-------------------------------------------------------------------------------------------

    python benchmarks/bench_loader.py --mode pipeline                      # 64 frames, crop 224, short side 256-320
    python benchmarks/bench_loader.py --mode pipeline --preset small       # 32 frames, crop 112, short side 128-160
    python benchmarks/bench_loader.py --mode pipeline --shards DIR --workers 0 1 2 --repeat 1 2 4 --rounds 3
    python benchmarks/bench_loader.py --mode pipeline --videos DIR --reencode 256 16   # converted the README's way

Shards: --shards DIR (any converted clip dataset, tools/convert_kinetics.py), or the synthetic videos (or --videos
DIR) converted by video_ens.data.convert_kinetics into a temp dir (--reencode SHORT_SIDE KEYINT as the README converts),
listed --dataset-size / videos times (identical bytes then, but decoding never caches across samples: each opens its
own decoder). `loader.train_stream(...).batches(epoch)` then runs with the recipe's data settings from the command
line (frames, stride, crop, short-side range, flip, colour jitter, decoder = data.decoder, data.repeat_samples =
--repeat) for every --workers count (data.num_workers; 0 = in the main process), micro-batches of --batch-size, a
fresh stream (and fork of its workers) per run. The main process only counts the batches: the rate is what the
workers hand to the device step, at most. The device step (`transforms.to_model_input`: resize, flip, colour,
normalise) is timed apart on this CPU on one real batch (device_ms); on a GPU it is not the CPU's work.
Configurations are interleaved over --rounds rounds.

Columns per (backend, workers, repeat):
  clips_per_s            steady rate of the whole pipeline: the first batch of every worker (fork, imports, a
                         first full micro-batch) is left out; first_batch_s is that start-up latency
  clips_per_s_per_worker clips_per_s / max(workers, 1) (workers = 0: the main process is the one worker)
  frames_per_s           frames delivered per second per process (clips_per_s_per_worker x frames)
  vs_ffmpeg              frames_per_s / the ffmpeg CLI's one-thread rate decoding every frame of the same stored
                         clips to RGB (target >= 0.8; the frames before a window in its keyframe interval make ~0.9
                         the limit at keyint 16)
  decode_ms, crop_ms, other_ms, handoff_ms
                         per clip, measured inside the workers (the stream's stats): the decoder (opening, demuxing,
                         decoding, RGB conversion), copying boxes out of the decoded frames, the rest of building a
                         micro-batch (tar reading, shuffle buffer, buffers), and the rest of a worker's wall time per
                         clip (handing the batch over, waiting for the next request)
  worker_cpu_ms          CPU time per clip of the thread that builds batches
  decoded_per_delivered  frames out of the decoder per frame placed in a batch (a window decoded from the keyframe
                         before it costs the frames in between; repeated views share one decode)
  device_ms              the device step on this CPU, per clip (main process, one thread)
  keyint, stored_kbit_s, stored_bytes_per_frame
                         the stored clips' keyframe interval (when --reencode made them) and size
A reference row ffmpeg-cli-net gives the ffmpeg command line's single-thread rate decoding every frame of the
stored videos to RGB at their stored size (per video the best of 3 runs minus a one-frame run, the process start;
the videos' per-frame times weighted by their samples, as the pipeline draws clips from them).
The results go to benchmarks/results/loader_pipeline_<hostname>_<date>.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import git_sha  # benchmarks/ is on sys.path when a script runs

from video_ens.data import convert_kinetics
from video_ens.data.decode import BACKENDS, DecodeError, backend_version, decode_frames, probe, resized_size
from video_ens.data.encode import H264Settings, H264Writer

RESULTS = Path(__file__).resolve().parent / "results"
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov"}
CLIP_FRAMES = 64


# --------------------------------------------------------------------------------------------------------------------
# Test videos


def make_videos(folder: Path, count: int, seconds: float = 10.0, fps: int = 30) -> list[Path]:
    """Kinetics-like clips: 340x256 H.264 (x264 defaults: preset medium, CRF 23, keyframe every 250 frames)."""
    width, height = 340, 256
    rng = np.random.default_rng(0)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    paths = []
    for v in range(count):
        path = folder / f"synthetic_{v}.mp4"
        writer = H264Writer(fps=fps, width=width, height=height, settings=H264Settings())
        for i in range(int(seconds * fps)):
            # A panning gradient, three moving discs and mild sensor noise: about 210 kbit/s at CRF 23, and
            # the discs wrapping round trigger scene-cut keyframes (3-4 per clip) as real footage does.
            image = np.empty((height, width, 3), dtype=np.float32)
            image[..., 0] = 128 + 100 * np.sin((x + 3 * i + 40 * v) / 37.0)
            image[..., 1] = 128 + 90 * np.cos((y + 2 * i) / 23.0)
            image[..., 2] = 0.5 * (x + y) % 256
            for k in range(3):
                cx = (60 + 80 * k + 4 * i * (k + 1)) % width
                cy = 128 + 80 * math.sin(i / (10.0 + 5 * k) + k)
                disc = (x - cx) ** 2 + (y - cy) ** 2 < (18 + 6 * k) ** 2
                image[disc] = (255 * (k == 0), 255 * (k == 1), 255 * (k == 2))
            image += rng.normal(0, 3, image.shape)
            writer.write(image.clip(0, 255).astype(np.uint8))
        path.write_bytes(writer.finish())
        paths.append(path)
    return paths


def find_videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)


# --------------------------------------------------------------------------------------------------------------------
# Measurements


def indices_for(sampling: str, num_frames: int, rng: random.Random) -> list[int]:
    if sampling == "window":
        start = rng.randint(0, max(num_frames - CLIP_FRAMES, 0))
        return [min(start + k, num_frames - 1) for k in range(CLIP_FRAMES)]
    if sampling == "spread":
        return [round(k * (num_frames - 1) / (CLIP_FRAMES - 1)) for k in range(CLIP_FRAMES)]
    return list(range(num_frames))


def decode_pass(backend: str, requests: list[tuple[bytes, list[int]]], short_side: int) -> tuple[int, float]:
    """Decode every (video bytes, indices) request once; returns (frames returned, seconds)."""
    frames = 0
    start = time.perf_counter()
    for data, indices in requests:
        frames += len(decode_frames(data, indices, short_side=short_side, backend=backend))
    return frames, time.perf_counter() - start


def ffmpeg_pass(
    ffmpeg: str,
    paths: list[Path],
    sizes: list[tuple[int, int]] | None = None,
    max_frames: int | None = None,
    loops: int = 1,
) -> float:
    """Seconds for the ffmpeg CLI to decode, scale (to `sizes`, else not at all) and convert to RGB every frame (or
    the first max_frames) on one thread; `loops` times over each file (`-stream_loop`) in one process."""
    start = time.perf_counter()
    for i, path in enumerate(paths):
        command = [ffmpeg, "-nostdin", "-loglevel", "error", "-threads", "1"]
        command += ["-stream_loop", str(loops - 1)] if loops > 1 else []
        command += ["-i", str(path), "-filter_threads", "1"]
        if sizes is not None:
            command += ["-vf", f"scale={sizes[i][0]}:{sizes[i][1]}:flags=bilinear"]
        command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-y"]
        command += ["-frames:v", str(max_frames)] if max_frames else []
        subprocess.run([*command, "/dev/null"], check=True)
    return time.perf_counter() - start


def run_rounds(backends, samplings, videos, paths, short_side, rounds, clips_per_video):
    """Interleave backends round by round, so load from other processes falls on all of them alike.

    Each round draws one set of window positions that every backend decodes. Returns
    {(backend, sampling): [(frames, clips, seconds) per round]}, with ("ffmpeg-cli", "all") when ffmpeg exists.
    """
    ffmpeg = shutil.which("ffmpeg")
    sizes = [resized_size(*probe_size(p), short_side) for p in paths]
    times: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
    for backend in backends:  # warm-up: library loading, first-call caches
        decode_frames(videos[0][0], [0], short_side=short_side, backend=backend)
    for r in range(rounds):
        for sampling in samplings:
            rng = random.Random(f"{r}-{sampling}")
            repeat = clips_per_video[sampling]
            requests = [(data, indices_for(sampling, n, rng)) for data, n in videos for _ in range(repeat)]
            shift = r % len(backends)  # rotate who goes first, so no backend always inherits warm caches
            for backend in backends[shift:] + backends[:shift]:
                frames, seconds = decode_pass(backend, requests, short_side)
                times.setdefault((backend, sampling), []).append((frames, len(requests), seconds))
        if ffmpeg:
            # A process start and one frame cost ~50 ms per file here; "ffmpeg-cli-net" subtracts that run.
            seconds = ffmpeg_pass(ffmpeg, paths, sizes)
            startup = ffmpeg_pass(ffmpeg, paths, sizes, max_frames=1)
            frames = sum(n for _, n in videos)
            times.setdefault(("ffmpeg-cli", "all"), []).append((frames, len(videos), seconds))
            times.setdefault(("ffmpeg-cli-net", "all"), []).append(
                (frames - len(videos), len(videos), seconds - startup)
            )
    return times


def probe_size(path: Path) -> tuple[int, int]:
    info = probe(path)
    return info.width, info.height


# --------------------------------------------------------------------------------------------------------------------
# Provenance


def ffmpeg_version_line() -> str | None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return None
    return subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout.split("\n")[0]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_columns(load_before: float) -> dict:
    """Versions, machine, load and code: the columns every row of both modes carries after its own."""
    return {
        "torch": torch.__version__,
        "av": backend_version("pyav") or "",
        "decord": backend_version("decord") or "",
        "torchcodec": backend_version("torchcodec") or "",
        "ffmpeg": ffmpeg_version_line() or "ffmpeg not found",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": 1,
        "loadavg": f"{load_before:.1f}-{os.getloadavg()[0]:.1f}",
        "git_sha": git_sha(),
        "date": datetime.date.today().isoformat(),
    }


# --------------------------------------------------------------------------------------------------------------------
# Pipeline mode: train_stream end to end

PRESETS = {  # recipe-like data settings: frames, crop_size, short_side range
    "kinetics": (64, 224, (256, 320)),  # recipes/kinetics_s3dg_mu2.json
    "small": (32, 112, (128, 160)),
}


def convert_videos(paths: list[Path], videos: Path, out: Path, size: int, shard_size: int, reencode) -> Path:
    """A clip dataset of `size` samples (the videos listed in turn) through video_ens.data.convert_kinetics."""
    annotations = out.parent / "annotations.csv"
    with annotations.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for i in range(max(size, len(paths))):
            path = paths[i % len(paths)]
            writer.writerow([path.relative_to(videos).as_posix(), path.stem])
    short_side, keyint = reencode or (None, None)
    convert_kinetics.convert(
        annotations=str(annotations),
        videos=str(videos),
        out=str(out),
        short_side=short_side,
        keyint=keyint,
        workers=1,
        shard_size=shard_size,
        progress=False,
    )
    return out


def extract_videos(dataset: Path, folder: Path, count: int, scan: int = 512) -> list[tuple[Path, int]]:
    """Up to `count` distinct source videos of a converted dataset as files (for the ffmpeg command line), each with
    the number of its samples among the first `scan` (a dataset may list a video several times; re-encoded copies
    are not byte-identical, so videos are told apart by their video_id)."""
    from video_ens.data import samples, schema

    found: dict[str, list] = {}
    seen = 0
    for shard in schema.read_info(dataset).shards:
        for raw in samples.read_shard(str(dataset / shard.name), []):
            if seen == scan:
                return [(path, n) for path, n in found.values()]
            seen += 1
            try:
                sample = schema.decode_video_sample(raw)
            except schema.SampleError:
                continue
            if sample.video_id in found:
                found[sample.video_id][1] += 1
            elif len(found) < count:
                path = folder / f"{len(found)}.{sample.container}"
                path.write_bytes(sample.video)
                found[sample.video_id] = [path, 1]
    return [(path, n) for path, n in found.values()]


# Frames the ffmpeg reference decodes per video and run (the file looped): a 120-frame clip decodes in ~35 ms against
# a process start of ~50 ms that varies by ~10 ms, so one pass per run left the net time mostly noise (6700 against
# 3800 frames/s for the same clip, measured here); ~1500 frames make the start a few percent of the run.
REFERENCE_FRAMES = 1500


def ffmpeg_reference(ffmpeg: str, videos: list[tuple[Path, int]], repeats: int = 3) -> float | None:
    """Frames per second of the ffmpeg CLI decoding every frame to RGB on one thread, as the pipeline's mix sees it:
    per video the best of `repeats` runs that decode it ~REFERENCE_FRAMES frames' worth of times over, less the
    best of as many one-frame runs (the process start, ~50 ms), per frame; the videos' per-frame times weighted by
    their samples (every sample gives clips of the same length). None when a video decodes faster than the start-up
    time varies (a net time <= 0): then there is no meaningful reference."""
    per_frame, weights = [], []
    for path, weight in videos:
        frames = probe(path).num_frames
        if frames < 2:
            continue
        loops = max(1, math.ceil(REFERENCE_FRAMES / frames))
        # Each minimum is taken on its own: the minimum of (full - start) differences would pick the run whose
        # start happened to be slow, a bias toward a faster reference.
        full = min(ffmpeg_pass(ffmpeg, [path], loops=loops) for _ in range(repeats))
        start = min(ffmpeg_pass(ffmpeg, [path], max_frames=1) for _ in range(repeats))
        if full - start <= 0:
            return None
        per_frame.append((full - start) / (frames * loops - 1))
        weights.append(weight)
    return float(sum(weights) / np.dot(weights, per_frame)) if weights else None


def pipeline_pass(loader, data_cfg, *, batch_size: int, clips: int, epoch: int) -> dict:
    """One epoch of `clips` training clips through train_stream: arrival times and the stream's stats."""
    root = loader.resolve_paths(data_cfg)
    spec = {"kind": "clip", "frames": data_cfg.frames, "size": data_cfg.crop_size}
    stream = loader.train_stream(
        data_cfg, input_spec=spec, micro_batch_size=batch_size, rank=0, world_size=1, seed=0, root=root
    )
    arrivals, count, last = [], 0, None
    cpu, start = time.process_time(), time.perf_counter()
    for batch in stream.batches(epoch):
        arrivals.append(time.perf_counter())
        count += len(batch["ids"])
        last = batch
    main_cpu = time.process_time() - cpu
    stats = stream.stats
    stream.close()
    if stats["bad"]:
        print(f"warning: {stats['bad']} bad samples: {stats['last_bad'][-2:]}", file=sys.stderr)
    warm = max(1, data_cfg.num_workers)  # batches that carried a worker's start-up
    steady = (count - warm * batch_size, arrivals[-1] - arrivals[warm - 1]) if len(arrivals) > warm else None
    return {
        "clips": count,
        "seconds": arrivals[-1] - start,
        "first_batch_s": arrivals[0] - start,
        "steady": steady,
        "main_cpu_s": main_cpu,
        "stats": stats,
        "batch": last,
    }


def device_step_seconds(batch: dict, repeats: int = 3) -> float:
    """Best time of the device step (transforms.to_model_input) on this CPU for one batch."""
    from video_ens.data.transforms import to_model_input

    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        to_model_input(batch)
        best = min(best, time.perf_counter() - start)
    return best


def run_pipeline(args, parser) -> Path:
    from video_ens.config import DataConfig
    from video_ens.data import loader

    frames, crop_size, short_side = PRESETS[args.preset]
    frames = args.frames or frames
    crop_size = args.crop_size or crop_size
    short_side = tuple(args.short_side_range or short_side)
    batch_size = args.batch_size
    clips = max(batch_size, args.clips // batch_size * batch_size)
    wanted = args.backends or ["pyav"]
    backends = [b for b in wanted if backend_version(b) is not None]
    torch.set_num_threads(1)  # workers = 0: the main process is the one worker (DataLoader workers set 1 themselves)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        if args.shards is not None:
            dataset = args.shards
            source = f"shards {args.shards}"
        else:
            if args.videos is not None:
                videos, paths = args.videos, find_videos(args.videos)
                if not paths:
                    parser.error(f"no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) under {args.videos}")
                source = str(args.videos)
            else:
                videos = scratch / "videos"
                videos.mkdir()
                paths = make_videos(videos, args.num_videos)
                source = f"synthetic 340x256 H.264 x{len(paths)}"
            dataset = convert_videos(
                paths, videos, scratch / "dataset", args.dataset_size, args.shard_size, args.reencode
            )
            size = f" re-encoded short side {args.reencode[0]} keyint {args.reencode[1]}" if args.reencode else ""
            source += f" as {max(args.dataset_size, len(paths))} samples{size}"
        # The ffmpeg reference decodes the stored clips themselves, at their stored size.
        references = extract_videos(dataset, scratch, args.num_videos if args.shards else 10**9)  # (path, samples)
        from video_ens.data import schema

        converter = schema.read_info(dataset).converter or {}
        stored = {"keyint": (converter.get("args") or {}).get("keyint") or ""}
        print(f"{source}: ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)

        settings = dict(
            kind="clip",
            train_shards=str(dataset),
            val_shards=str(dataset),
            samples_per_epoch=clips,
            frames=frames,
            frame_stride=args.frame_stride,
            crop_size=crop_size,
            short_side=short_side,
            flip=not args.no_flip,
            color_jitter=args.color_jitter,
        )
        configs = [(b, w, r) for b in backends for w in args.workers for r in args.repeat]
        runs: dict[tuple[str, int, int], list[dict]] = {}
        ffmpeg = shutil.which("ffmpeg")
        ffmpeg_samples = []
        for rnd in range(args.rounds):
            shift = rnd % len(configs)  # rotate who goes first, as in decode mode
            for backend, workers, repeat in configs[shift:] + configs[:shift]:
                cfg = DataConfig(**settings, num_workers=workers, decoder=backend, repeat_samples=repeat)
                run = pipeline_pass(loader, cfg, batch_size=batch_size, clips=clips, epoch=rnd)
                runs.setdefault((backend, workers, repeat), []).append(run)
                rate = run["steady"][0] / run["steady"][1] if run["steady"] else run["clips"] / run["seconds"]
                print(f"round {rnd} {backend} workers={workers} repeat={repeat}: {rate:.2f} clips/s", file=sys.stderr)
            if ffmpeg and references:  # the practical per-core limit: every stored frame to RGB on one thread
                reference = ffmpeg_reference(ffmpeg, references)
                if reference is not None:
                    ffmpeg_samples.append(reference)
        paths = [p for p, _ in references]
        stored_frames = sum(probe(p).num_frames for p in paths)
        stored_seconds = sum(probe(p).num_frames / (probe(p).fps or 25.0) for p in paths)
        stored["stored_kbit_s"] = 8 * sum(p.stat().st_size for p in paths) / 1000 / stored_seconds
        stored["stored_bytes_per_frame"] = sum(p.stat().st_size for p in paths) / stored_frames

    common = {"source": source, "short_side": f"{short_side[0]}-{short_side[1]}", "rounds": args.rounds}
    common |= machine_columns(load_before)
    ffmpeg_rate = float(np.median(ffmpeg_samples)) if ffmpeg_samples else None
    rows = []
    for (backend, workers, repeat), samples in runs.items():
        rates = sorted(s["steady"][0] / s["steady"][1] if s["steady"] else s["clips"] / s["seconds"] for s in samples)
        clips_per_s = float(np.median(rates))
        done = sum(s["clips"] for s in samples)
        per_clip = {
            k: 1000 * sum(s["stats"]["seconds"][k] for s in samples) / done for k in samples[0]["stats"]["seconds"]
        }
        decoded = sum(s["stats"]["frames_decoded"] for s in samples)
        delivered = sum(s["stats"]["frames_delivered"] for s in samples)
        per_worker = clips_per_s / max(workers, 1)
        device = device_step_seconds(samples[-1]["batch"]) / batch_size
        rows.append(
            {
                "backend": backend,
                "workers": workers,
                "repeat": repeat,
                "clips_per_s": clips_per_s,
                "clips_per_s_best": rates[-1],
                "clips_per_s_per_worker": per_worker,
                "worker_ms_per_clip": 1000 / per_worker,
                "frames_per_s": per_worker * frames,
                "vs_ffmpeg": per_worker * frames / ffmpeg_rate if ffmpeg_rate else "",
                "decode_ms": per_clip["decode"],
                "crop_ms": per_clip["crop"],
                "other_ms": per_clip["batch"] - per_clip["decode"] - per_clip["crop"],
                "handoff_ms": 1000 / per_worker - per_clip["batch"],
                "worker_cpu_ms": per_clip["batch_cpu"],
                "decoded_per_delivered": decoded / delivered if delivered else "",
                "device_ms": 1000 * device,
                "main_cpu_ms": 1000 * sum(s["main_cpu_s"] for s in samples) / done,
                "first_batch_s": float(np.median([s["first_batch_s"] for s in samples])),
                "clips": done,
            }
        )
    if ffmpeg_rate:
        rows.append(
            {
                "backend": "ffmpeg-cli-net",
                "clips_per_s": ffmpeg_rate / frames,
                "clips_per_s_best": max(ffmpeg_samples) / frames,
                "clips_per_s_per_worker": ffmpeg_rate / frames,
                "worker_ms_per_clip": 1000 * frames / ffmpeg_rate,
                "frames_per_s": ffmpeg_rate,
                "vs_ffmpeg": 1.0,
                "decoded_per_delivered": 1.0,
                "note": f"ffmpeg CLI, one thread, every frame of the {len(references)} stored videos to RGB at their "
                "stored size, minus process start, weighted by their samples",
            }
        )
    elif ffmpeg:
        rows.append(
            {
                "backend": "ffmpeg-cli-net",
                "note": "no reference: the stored videos decode faster than the "
                "ffmpeg command line's start-up time varies",
            }
        )
    for backend in wanted:
        if backend not in backends:
            rows.append({"backend": backend, "note": "not importable"})

    setting = {
        "frames": frames,
        "frame_stride": args.frame_stride,
        "crop_size": crop_size,
        "flip": not args.no_flip,
        "color_jitter": args.color_jitter,
        "batch_size": batch_size,
        "keyint": stored["keyint"],
        "stored_kbit_s": stored["stored_kbit_s"],
        "stored_bytes_per_frame": stored["stored_bytes_per_frame"],
    }
    host = socket.gethostname()
    out = args.out or RESULTS / f"loader_pipeline_{host}_{common['date']}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["backend", "workers", "repeat", "clips_per_s", "clips_per_s_best", "clips_per_s_per_worker"]
    fields += ["worker_ms_per_clip", "frames_per_s", "vs_ffmpeg", "decode_ms", "crop_ms", "other_ms", "handoff_ms"]
    fields += ["worker_cpu_ms", "decoded_per_delivered", "device_ms", "main_cpu_ms", "first_batch_s", "clips", "note"]
    fields += list(setting) + list(common)
    append = args.append and out.exists()
    with out.open("a" if append else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if not append:
            writer.writeheader()
        for row in rows:
            formatted = {
                k: (f"{v:.3f}" if k in ("vs_ffmpeg", "first_batch_s", "decoded_per_delivered") else f"{v:.2f}")
                if isinstance(v, float)
                else v
                for k, v in row.items()
            }
            settings_row = {k: (f"{v:.1f}" if isinstance(v, float) else v) for k, v in setting.items()}
            writer.writerow({k: "" for k in fields} | settings_row | common | formatted)
    print(
        f"{frames} frames x {crop_size}, short side {short_side[0]}-{short_side[1]}, batch {batch_size}:",
        file=sys.stderr,
    )
    print(
        "backend        workers repeat clips/s /worker frames/s vs_ffmpeg | decode crop other handoff (ms/clip)"
        " | decoded/delivered device_ms",
        file=sys.stderr,
    )
    for row in rows:
        if "clips_per_s" not in row:
            continue
        line = f"{row['backend']:14s} {row.get('workers', '')!s:>7} {row.get('repeat', '')!s:>6}"
        line += f" {row['clips_per_s']:7.2f} {row['clips_per_s_per_worker']:7.2f} {row['frames_per_s']:8.0f}"
        line += f" {row['vs_ffmpeg']:9.3f}" if row["vs_ffmpeg"] != "" else " " * 10
        if "decode_ms" in row:
            line += f" | {row['decode_ms']:6.1f} {row['crop_ms']:4.1f} {row['other_ms']:5.1f} {row['handoff_ms']:7.1f}"
            line += f" | {row['decoded_per_delivered']:.3f} {row['device_ms']:.1f}"
        print(line, file=sys.stderr)
    print(out)
    return out


# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = ("decode", "pipeline")
    parser.add_argument(
        "--mode", choices=modes, default="decode", help="decode (default) or pipeline (see the module docstring)"
    )
    parser.add_argument("--videos", type=Path, help="folder of videos (default: generate synthetic 340x256 clips)")
    parser.add_argument(
        "--num-videos",
        type=int,
        default=3,
        help="synthetic clips to make; with --shards: stored videos the ffmpeg row decodes",
    )
    parser.add_argument("--short-side", type=int, default=256, help="decode mode: the decoded short side")
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, help="decoder backends (default: decode mode all, pipeline pyav)"
    )
    samplings = ["window", "spread", "all"]
    parser.add_argument("--samplings", nargs="+", default=samplings, choices=samplings, help="decode mode")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds; the CSV has median and best (default 8; pipeline 2)"
    )
    parser.add_argument(
        "--out", type=Path, help="CSV path (default: benchmarks/results/loader[_pipeline]_<host>_<date>.csv)"
    )
    pipe = parser.add_argument_group("pipeline mode")
    pipe.add_argument(
        "--shards", type=Path, help="a converted clip dataset (default: convert the videos into a temp dir)"
    )
    pipe.add_argument("--dataset-size", type=int, default=24, help="samples of the converted dataset (videos repeated)")
    pipe.add_argument("--shard-size", type=int, default=8, help="samples per shard of the converted dataset")
    pipe.add_argument(
        "--reencode", type=int, nargs=2, metavar=("SHORT_SIDE", "KEYINT"), help="convert with re-encoding"
    )
    pipe.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="data.num_workers values to run")
    pipe.add_argument(
        "--preset", choices=PRESETS, default="kinetics", help="kinetics: 64x224, 256-320; small: 32x112, 128-160"
    )
    pipe.add_argument("--frames", type=int, help="data.frames (default: the preset's)")
    pipe.add_argument("--frame-stride", type=int, default=1, help="data.frame_stride")
    pipe.add_argument("--crop-size", type=int, help="data.crop_size (default: the preset's)")
    pipe.add_argument("--short-side-range", type=int, nargs=2, metavar=("MIN", "MAX"), help="data.short_side")
    pipe.add_argument("--no-flip", action="store_true", help="data.flip = false")
    pipe.add_argument("--color-jitter", type=float, default=0.4, help="data.color_jitter")
    pipe.add_argument("--batch-size", type=int, default=8, help="micro-batch size (train.micro_batch_size)")
    pipe.add_argument("--repeat", type=int, nargs="+", default=[1], help="data.repeat_samples values to run")
    pipe.add_argument("--clips", type=int, default=64, help="clips per worker count per round (rounded to batches)")
    pipe.add_argument("--append", action="store_true", help="append rows to an existing CSV (e.g. a second preset)")
    args = parser.parse_args(argv)
    if args.mode == "pipeline":
        args.rounds = args.rounds or 2
        return run_pipeline(args, parser)
    args.rounds = args.rounds or 8
    args.backends = args.backends or list(BACKENDS)
    return run_decode(args, parser)


def run_decode(args, parser) -> Path:
    torch.set_num_threads(1)
    backends = [b for b in args.backends if backend_version(b) is not None]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        if args.videos is not None:
            paths = find_videos(args.videos)
            if not paths:
                parser.error(f"no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) under {args.videos}")
            source = str(args.videos)
        else:
            started = time.perf_counter()
            paths = make_videos(Path(scratch), args.num_videos)
            print(f"made {len(paths)} synthetic clips in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            source = f"synthetic 340x256 H.264 x{len(paths)}"
        videos, usable = [], []
        for path in paths:
            try:
                videos.append((path.read_bytes(), probe(path).num_frames))
                usable.append(path)
            except DecodeError as exc:
                print(f"skipping {exc}", file=sys.stderr)
        kbps = np.mean([8 * len(data) / 1000 / (n / 30) for data, n in videos])
        print(f"{len(videos)} videos, {sum(n for _, n in videos)} frames, ~{kbps:.0f} kbit/s", file=sys.stderr)
        # Window clips are short: several per video per round keep each timed pass above ~50 ms.
        clips_per_video = {"window": 4, "spread": 2, "all": 1}
        times = run_rounds(backends, args.samplings, videos, usable, args.short_side, args.rounds, clips_per_video)

    if shutil.which("ffmpeg") is None:
        print("ffmpeg not found: no command-line reference (apt-get install ffmpeg)", file=sys.stderr)
    common = {"source": source, "short_side": args.short_side, "rounds": args.rounds} | machine_columns(load_before)

    def rate(samples, index):  # median and best of frames (index 0) or clips (index 1) per second
        rates = sorted(sample[index] / sample[2] for sample in samples)
        return float(np.median(rates)), rates[-1]

    net = ("ffmpeg-cli-net", "all")
    ffmpeg_rate = rate(times[net], 0)[0] if net in times else None
    rows = []
    for (backend, sampling), samples in times.items():
        frames_median, frames_best = rate(samples, 0)
        clips_median, _ = rate(samples, 1)
        note = {
            "ffmpeg-cli": "decode+scale+rgb24 of every frame, one process per file",
            "ffmpeg-cli-net": "the same minus a one-frame run (process start)",
        }.get(backend, "")
        rows.append(
            {"backend": backend, "sampling": sampling, "frames_per_s": frames_median, "frames_per_s_best": frames_best}
            | {"clips_per_s": "" if backend.startswith("ffmpeg") else clips_median}
            | {"vs_ffmpeg": frames_median / ffmpeg_rate if ffmpeg_rate else "", "note": note}
        )
    for backend in args.backends:
        if backend not in backends:
            rows.append({"backend": backend, "note": "not importable"})

    out = args.out or RESULTS / f"loader_{socket.gethostname()}_{common['date']}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["backend", "sampling", "frames_per_s", "frames_per_s_best", "clips_per_s", "vs_ffmpeg", "note"]
    fields += list(common)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            formatted = {
                k: (f"{v:.3f}" if k == "vs_ffmpeg" else f"{v:.1f}") if isinstance(v, float) else v
                for k, v in row.items()
            }
            writer.writerow({k: "" for k in fields} | common | formatted)
            if row.get("sampling"):
                ratio = f"{row['vs_ffmpeg']:.2f}x ffmpeg" if ffmpeg_rate else ""
                clips = f"{row['clips_per_s']:6.1f} clips/s" if row["clips_per_s"] != "" else " " * 14
                print(f"{backend_label(row)} {row['frames_per_s']:7.0f} frames/s {clips} {ratio}", file=sys.stderr)
    print(out)
    return out


def backend_label(row: dict) -> str:
    return f"{row['backend']:14s} {row['sampling']:6s}"


if __name__ == "__main__":
    main()
