#!/usr/bin/env python
"""Command line of video_ens.data.convert_yt8m.convert; --help states the conversion rules."""

from __future__ import annotations

import argparse
import os
import sys
import time

from video_ens.data import convert_yt8m
from video_ens.data.schema import YT8M_NUM_CLASSES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=convert_yt8m.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", default=[], help="TFRecord files or glob patterns (quote them)")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--holdout-inputs", nargs="+", default=[], help="files whose videos are split by --holdout-fraction")
    p.add_argument("--holdout-fraction", type=float, default=0.0, help="share of --holdout-inputs held out (0.1)")
    p.add_argument("--holdout-out", help="dataset folder for the held-out videos")
    p.add_argument("--num-classes", type=int, default=YT8M_NUM_CLASSES)
    p.add_argument("--vocabulary", help="YouTube-8M vocabulary.csv, to store class names")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds an input file may take (with --workers > 1): a hung worker ends the conversion",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="videos per shard")
    p.add_argument("--overwrite", action="store_true", help="replace existing datasets at --out / --holdout-out")
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        infos = convert_yt8m.convert(
            inputs=a.inputs,
            out=a.out,
            holdout_inputs=a.holdout_inputs,
            holdout_fraction=a.holdout_fraction,
            holdout_out=a.holdout_out,
            num_classes=a.num_classes,
            vocabulary=a.vocabulary,
            workers=a.workers,
            timeout=a.timeout,
            shard_size=a.shard_size,
            overwrite=a.overwrite,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"convert_yt8m: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a shard that could not be written (disk full): the error names the file
        print(f"convert_yt8m: error: {e}\n  nothing was published", file=sys.stderr)
        return 1
    print(f"{a.out}: {infos['main'].summary()}")
    if "holdout" in infos:
        print(f"{a.holdout_out}: {infos['holdout'].summary()}")
    print(f"  took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
