"""Loader benchmark, decoding stage: frames and clips per second per backend, beside the ffmpeg command line.

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

from video_ens.data.decode import BACKENDS, DecodeError, decode_frames, probe, resized_size

RESULTS = Path(__file__).resolve().parent / "results"
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov"}
CLIP_FRAMES = 64


# --------------------------------------------------------------------------------------------------------------------
# Test videos


def make_videos(folder: Path, count: int, seconds: float = 10.0, fps: int = 30) -> list[Path]:
    """Kinetics-like clips: 340x256 H.264 (x264 defaults: preset medium, CRF 23, keyframe every 250 frames)."""
    import av

    width, height = 340, 256
    rng = np.random.default_rng(0)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    paths = []
    for v in range(count):
        path = folder / f"synthetic_{v}.mp4"
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
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
                frame = av.VideoFrame.from_ndarray(image.clip(0, 255).astype(np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
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


def ffmpeg_pass(ffmpeg: str, paths: list[Path], sizes: list[tuple[int, int]], max_frames: int | None = None) -> float:
    """Seconds for the ffmpeg CLI to decode, scale and convert every frame (or the first max_frames) on one thread."""
    start = time.perf_counter()
    for path, (width, height) in zip(paths, sizes, strict=True):
        command = [ffmpeg, "-nostdin", "-loglevel", "error", "-threads", "1", "-i", str(path), "-filter_threads", "1"]
        command += ["-vf", f"scale={width}:{height}:flags=bilinear", "-f", "rawvideo", "-pix_fmt", "rgb24", "-y"]
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


def backend_version(backend: str) -> str | None:
    """The backend's version, or None when it cannot be imported."""
    try:
        if backend == "pyav":
            import av

            return av.__version__
        if backend == "decord":
            import decord

            return decord.__version__
        import torchcodec
        import torchcodec.decoders  # noqa: F401  (loads its FFmpeg libraries: fails without them)

        return torchcodec.__version__
    except Exception:
        return None


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


# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=Path, help="folder of videos (default: generate synthetic 340x256 clips)")
    parser.add_argument("--num-videos", type=int, default=3, help="synthetic clips to generate")
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    samplings = ["window", "spread", "all"]
    parser.add_argument("--samplings", nargs="+", default=samplings, choices=samplings)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds; the CSV has median and best")
    parser.add_argument("--out", type=Path, help="CSV path (default: benchmarks/results/loader_<host>_<date>.csv)")
    args = parser.parse_args(argv)

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
    ffmpeg_version = ffmpeg_version_line()
    common = {
        "source": source,
        "short_side": args.short_side,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "av": backend_version("pyav") or "",
        "decord": backend_version("decord") or "",
        "torchcodec": backend_version("torchcodec") or "",
        "ffmpeg": ffmpeg_version or "ffmpeg not found",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": 1,
        "loadavg": f"{load_before:.1f}-{os.getloadavg()[0]:.1f}",
        "git_sha": git_sha(),
        "date": datetime.date.today().isoformat(),
    }

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
