#!/usr/bin/env python
"""Command line of video_ens.data.convert_kinetics.convert; --help states the conversion rules."""

from __future__ import annotations

import argparse
import os
import sys
import time

from video_ens.data import convert_kinetics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=convert_kinetics.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--annotations", required=True, help="Kinetics CSV or path,label CSV")
    p.add_argument("--videos", required=True, help="folder holding the clips")
    p.add_argument("--out", required=True, help="dataset folder to create (shards + _info.json)")
    p.add_argument("--split", help="keep only rows whose split column equals this (train, val, test)")
    p.add_argument("--labels", help="class names: text file (one per line), dataset folder or _info.json")
    p.add_argument("--short-side", type=int, help="re-encode to this short side (libx264)")
    p.add_argument("--keyint", type=int, help="keyframe interval when re-encoding (default 16)")
    p.add_argument("--verify", action="store_true", help="decode every frame to count them")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a clip may take (with --workers > 1): a hung decoder is killed, the clip skipped",
    )
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for the sample order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the CSV order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        info = convert_kinetics.convert(
            annotations=a.annotations,
            videos=a.videos,
            out=a.out,
            split=a.split,
            labels=a.labels,
            short_side=a.short_side,
            keyint=a.keyint,
            verify=a.verify,
            workers=a.workers,
            timeout=a.timeout,
            shard_size=a.shard_size,
            seed=None if a.no_shuffle else a.seed,
            overwrite=a.overwrite,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"convert_kinetics: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a shard that could not be written (disk full): the error names the file
        print(f"convert_kinetics: error: {e}\n  nothing was published", file=sys.stderr)
        return 1
    print(f"{a.out}: {info.summary()}")
    if info.extra.get("shortened"):
        print(f"  {len(info.extra['shortened'])} clips hold fewer frames than packets (see 'shortened' in _info.json)")
    if info.extra.get("display"):
        print(
            f"  {len(info.extra['display'])} clips were turned upright or given square pixels (see 'display' in "
            "_info.json)"
        )
    print(f"  took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
