#!/usr/bin/env python
"""Generate the small, learnable demo datasets used by the quickstart and CI (video_ens.data.demo).

python tools/make_demo_data.py --out data/demo [--kind kinetics|yt8m|images|all] [--seed 0] [--overwrite]

data/demo/kinetics/{train,val}   H.264 clips whose class is a motion        (tools/convert_kinetics.py)
data/demo/yt8m/{train,val}       YouTube-8M-style multi-label frame features (tools/convert_yt8m.py)
data/demo/images/{train,val}     32x32 PNG/JPEG patterns                     (tools/convert_images.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from video_ens.data import demo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=f"{__doc__}\n{demo.__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="data/demo", help="parent folder of kinetics/, yt8m/, images/")
    p.add_argument("--kind", choices=(*demo.KINDS, "all"), default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true", help="regenerate even if present")
    p.add_argument(
        "--refresh", action="store_true",
        help="regenerate demo data made by another generator version or settings (launch.sh uses this)",
    )  # fmt: skip
    a = p.parse_args(argv)
    overwrite = True if a.overwrite else ("stale" if a.refresh else False)
    status = 0
    for kind in demo.KINDS if a.kind == "all" else (a.kind,):
        start = time.perf_counter()
        out = os.path.join(a.out, kind)
        try:
            infos = demo.MAKERS[kind](out, seed=a.seed, workers=a.workers, overwrite=overwrite, progress=True)
        except FileExistsError as e:
            print(f"make_demo_data: {e}", file=sys.stderr)
            status = 2
            continue
        for split, info in infos.items():
            print(f"{os.path.join(out, split)}: {info.summary()}")
        print(f"  {kind}: {time.perf_counter() - start:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
