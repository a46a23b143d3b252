#!/usr/bin/env python
"""Command line of video_ens.data.convert_kinetics.convert; --help states the conversion rules."""

from __future__ import annotations

import argparse
import sys

from video_ens import cli
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
    cli.add_converter_options(
        p,
        timeout=600.0,
        timeout_item="a clip",
        on_hang="a hung decoder is killed, the clip skipped",
        shard_size=256,
        shard_item="samples",
        shuffle_order="the CSV order",
    )
    a = p.parse_args(argv)
    return cli.run_converter(
        "convert_kinetics",
        lambda: convert_kinetics.convert(
            annotations=a.annotations,
            videos=a.videos,
            out=a.out,
            split=a.split,
            labels=a.labels,
            short_side=a.short_side,
            keyint=a.keyint,
            verify=a.verify,
            **cli.converter_kwargs(a),
        ),
        lambda info: [f"{a.out}: {info.summary()}", *_notes(info)],
    )


def _notes(info) -> list[str]:
    """What the summary leaves out: clips whose frames or display differ from what their container says."""
    notes = []
    if info.extra.get("shortened"):
        notes.append(
            f"  {len(info.extra['shortened'])} clips hold fewer frames than packets (see 'shortened' in _info.json)"
        )
    if info.extra.get("display"):
        notes.append(
            f"  {len(info.extra['display'])} clips were turned upright or given square pixels (see 'display' in "
            "_info.json)"
        )
    return notes


if __name__ == "__main__":
    sys.exit(main())
