#!/usr/bin/env python
"""Plots of runs, as PNG (needs matplotlib: pip install -e .[plot]); the figures are video_ens.plots.

    python tools/plot.py curves runs/demo1 [--out curves.png]
    python tools/plot.py sweep runs/k400_lambda* runs/k400_mu* runs/k400_baseline [--metric top1] [--out sweep.png]

curves: training curves of one run from RUN_DIR/metrics.jsonl, titled with the model and objective of
    RUN_DIR/recipe.json: the total loss, each branch's term and the ensemble term against the step; the learning
    rate; with two or more evaluations, every metric of the ensemble and of each branch against the step; and the
    final evaluation as bars labelled with their values. Percentage axes run from 0 to 100 at most. Default output
    RUN_DIR/curves.png.
sweep: the paper's Figure 2: the validation metric of the ensemble (and the mean of its branches, dashed) against
    lambda for ensembling runs and against mu for co-distillation runs, one panel each, from each run's eval.json
    and recipe (objective.structure and objective.weight). Runs with a single branch are baselines, drawn as
    horizontal lines in every panel. Runs of different models get their own series. Default output sweep.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from video_ens.plots import PlotUnavailable, plot_curves, plot_sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("curves", help="training curves of one run")
    c.add_argument("run_dir", type=Path)
    c.add_argument("--out", type=Path, help="PNG file (default: RUN_DIR/curves.png)")
    s = sub.add_parser("sweep", help="ensemble metric against lambda / mu over runs (paper Figure 2)")
    s.add_argument("run_dirs", type=Path, nargs="+")
    s.add_argument("--metric", help="a key of eval.json's ensemble, e.g. top1, gap (default: the first)")
    s.add_argument("--out", type=Path, default=Path("sweep.png"), help="PNG file (default: sweep.png)")
    a = p.parse_args(argv)
    try:
        if a.command == "curves":
            path = plot_curves(a.run_dir, a.out or a.run_dir / "curves.png")
        else:
            path = plot_sweep(a.run_dirs, a.out, a.metric)
    except (FileNotFoundError, ValueError, KeyError, PlotUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
