#!/usr/bin/env python
"""Command line of video_ens.data.convert_images.convert; --help states the conversion rules."""

from __future__ import annotations

import argparse
import os
import sys
import time

from video_ens.data import convert_images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=convert_images.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--root", required=True, help="class-per-folder image tree")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--labels", help="class names: text file (one per line), dataset folder or _info.json")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds an image may take (with --workers > 1): a hung decoder ends the conversion",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for the sample order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted folder order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        info = convert_images.convert(
            root=a.root,
            out=a.out,
            labels=a.labels,
            workers=a.workers,
            timeout=a.timeout,
            shard_size=a.shard_size,
            seed=None if a.no_shuffle else a.seed,
            overwrite=a.overwrite,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"convert_images: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a shard that could not be written (disk full): the error names the file
        print(f"convert_images: error: {e}\n  nothing was published", file=sys.stderr)
        return 1
    print(f"{a.out}: {info.summary()}\n  took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
