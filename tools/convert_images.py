#!/usr/bin/env python
"""Command line of video_ens.data.convert_images.convert; --help states the conversion rules."""

from __future__ import annotations

import argparse
import sys

from video_ens import cli
from video_ens.data import convert_images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=convert_images.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--root", required=True, help="class-per-folder image tree")
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--labels", help="class names: text file (one per line), dataset folder or _info.json")
    cli.add_converter_options(
        p,
        timeout=60.0,
        timeout_item="an image",
        on_hang="a hung decoder ends the conversion",
        shard_size=1000,
        shard_item="images",
        shuffle_order="the sorted folder order",
    )
    a = p.parse_args(argv)
    return cli.run_converter(
        "convert_images",
        lambda: convert_images.convert(
            root=a.root,
            out=a.out,
            labels=a.labels,
            **cli.converter_kwargs(a),
        ),
        lambda info: [f"{a.out}: {info.summary()}"],
    )


if __name__ == "__main__":
    sys.exit(main())
