#!/usr/bin/env python
"""Command line of video_ens.data.convert_yt8m.convert; --help states the conversion rules."""

from __future__ import annotations

import argparse
import sys

from video_ens import cli
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
    cli.add_converter_options(
        p,
        timeout=3600.0,
        timeout_item="an input file",
        on_hang="a hung worker ends the conversion",
        shard_size=1000,
        shard_item="videos",
        shuffle_order=None,  # the videos keep the order of their input files
        overwrite_help="replace existing datasets at --out / --holdout-out",
    )
    a = p.parse_args(argv)
    return cli.run_converter(
        "convert_yt8m",
        lambda: convert_yt8m.convert(
            inputs=a.inputs,
            out=a.out,
            holdout_inputs=a.holdout_inputs,
            holdout_fraction=a.holdout_fraction,
            holdout_out=a.holdout_out,
            num_classes=a.num_classes,
            vocabulary=a.vocabulary,
            **cli.converter_kwargs(a),
        ),
        lambda infos: (
            [f"{a.out}: {infos['main'].summary()}"]
            + ([f"{a.holdout_out}: {infos['holdout'].summary()}"] if "holdout" in infos else [])
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
