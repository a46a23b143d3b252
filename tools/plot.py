#!/usr/bin/env python
"""Plots of runs, as PNG (needs matplotlib: pip install -e .[plot]).

    python tools/plot.py curves runs/demo1 [--out curves.png]
    python tools/plot.py sweep runs/k400_lambda* runs/k400_mu* runs/k400_baseline [--metric top1] [--out sweep.png]

curves: training curves of one run from RUN_DIR/metrics.jsonl: the total loss, each branch's term and the
    ensemble term against the step; the learning rate; and, when the run evaluated, every metric of the ensemble
    and of each branch against the step. Default output RUN_DIR/curves.png.
sweep: the paper's Figure 2: the validation metric of the ensemble (and the mean of its branches, dashed) against
    lambda for ensembling runs and against mu for co-distillation runs, one panel each, from each run's eval.json
    and recipe (objective.structure and objective.weight). Runs with a single branch are baselines, drawn as
    horizontal lines in every panel. Runs of different models get their own series. Default output sweep.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

STRUCTURE_AXIS = {"ensembling": "λ (ensembling loss, eq. 2)", "codistillation": "μ (co-distillation loss, eq. 3)"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "error: tools/plot.py needs matplotlib: pip install -e .[plot]  (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------------- reading


def read_metrics(run_dir: Path) -> dict[str, dict[int, dict]]:
    """metrics.jsonl by kind and step; a step logged twice (before a crash and after the resume) keeps the last."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics log (training writes it into the run folder)")
    by_kind: dict[str, dict[int, dict]] = defaultdict(dict)
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a line cut short by a kill: the run is still readable
            raise ValueError(f"{path}:{n}: not a JSON line") from None
        by_kind[record.get("kind", "?")][int(record.get("step", 0))] = record
    return by_kind


def read_run(run_dir: Path) -> dict:
    """The final evaluation and the recipe of a run: eval.json, and recipe.json (or the copy inside eval.json)."""
    eval_path = run_dir / "eval.json"
    if not eval_path.is_file():
        raise FileNotFoundError(f"{eval_path}: the run has no final evaluation (tools/eval.py --run-dir {run_dir})")
    result = json.loads(eval_path.read_text())
    recipe_path = run_dir / "recipe.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else result.get("recipe")
    if recipe is None:
        raise FileNotFoundError(f"{recipe_path}: no recipe.json, and eval.json holds no recipe")
    return {"name": run_dir.name, "eval": result, "recipe": recipe}


# ------------------------------------------------------------------------------------------------------- curves


def plot_curves(run_dir: Path, out: Path) -> Path:
    plt = _pyplot()
    log = read_metrics(run_dir)
    train = [log["train"][s] for s in sorted(log["train"])]
    evals = [log["eval"][s] for s in sorted(log["eval"])]
    if not train and not evals:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no train or eval records")
    metric_names = list(evals[-1]["ensemble"]) if evals else []
    truth = bool(train) and "branch_truth" in train[0]  # each head's own loss against the labels
    panels = 2 + truth + len(metric_names)
    cols = 2
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    axes = axes.ravel()
    steps = [r["step"] for r in train]

    ax = axes[0]
    if train:
        ax.plot(steps, [r["loss"] for r in train], color="black", lw=2, label="total")
        ax.plot(steps, [r["ensemble"] for r in train], color="tab:red", lw=1.5, label="ensemble term")
        num_branches = len(train[0].get("branch", []))
        for i in range(num_branches):
            ax.plot(steps, [r["branch"][i] for r in train], lw=1, alpha=0.8, label=f"branch {i} term")
    for step in log.get("skip", {}):
        ax.axvline(step, color="tab:red", ls=":", lw=0.8)
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.legend(fontsize="small")

    ax = axes[1]
    if train and "lr" in train[0]:
        ax.plot(steps, [r["lr"] for r in train], color="tab:blue")
    ax.set(title="learning rate", xlabel="step", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    if truth:
        ax = axes[2]
        ax.plot(steps, [r["ensemble_truth"] for r in train], color="black", lw=2, label="ensemble")
        for i in range(len(train[0]["branch_truth"])):
            ax.plot(steps, [r["branch_truth"][i] for r in train], lw=1, alpha=0.8, label=f"branch {i}")
        ax.set(title="training loss against the labels", xlabel="step", ylabel="loss")
        ax.legend(fontsize="small")

    eval_steps = [r["step"] for r in evals]
    marker = "o" if len(evals) < 30 else None
    for ax, metric in zip(axes[2 + truth :], metric_names, strict=False):
        ax.plot(eval_steps, [100 * r["ensemble"][metric] for r in evals], color="black", lw=2, marker=marker,
                label="ensemble")
        for i in range(len(evals[-1]["branches"])):
            ax.plot(eval_steps, [100 * r["branches"][i][metric] for r in evals], lw=1, marker=marker, alpha=0.8,
                    label=f"branch {i}")
        ax.set(title=f"validation {metric}", xlabel="step", ylabel=f"{metric} (%)")
        ax.legend(fontsize="small")
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------------- sweep


def sweep_points(runs: list[dict], metric: str | None) -> tuple[str, dict, dict]:
    """(metric, points, baselines): points[structure][model] = sorted [(weight, ensemble %, branch mean %, run)],
    baselines[model] = [(ensemble %, run)] for the single-branch runs."""
    if metric is None:
        metric = next(iter(runs[0]["eval"]["ensemble"]))
    points: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    baselines: dict[str, list] = defaultdict(list)
    for run in runs:
        ens = run["eval"]["ensemble"]
        if metric not in ens:
            raise ValueError(f"run {run['name']}: eval.json has no metric {metric!r} (it has {', '.join(ens)})")
        model = run["recipe"]["model"]["name"]
        branches = run["eval"].get("branches", [])
        if len(branches) <= 1:
            baselines[model].append((100 * ens[metric], run["name"]))
            continue
        objective = run["recipe"].get("objective", {})
        structure = objective.get("structure", "codistillation")
        weight = float(objective.get("weight", 2.0))
        branch_mean = 100 * sum(b[metric] for b in branches) / len(branches)
        points[structure][model].append((weight, 100 * ens[metric], branch_mean, run["name"]))
    for series in points.values():
        for values in series.values():
            values.sort()
    return metric, points, baselines


def plot_sweep(run_dirs: list[Path], out: Path, metric: str | None = None) -> Path:
    plt = _pyplot()
    runs = [read_run(d) for d in run_dirs]
    metric, points, baselines = sweep_points(runs, metric)
    structures = [s for s in STRUCTURE_AXIS if s in points] or ["codistillation"]
    fig, axes = plt.subplots(1, len(structures), figsize=(6 * len(structures), 4.2), squeeze=False)
    models = sorted({m for s in points.values() for m in s} | set(baselines))
    colours = {m: f"C{i}" for i, m in enumerate(models)}
    for ax, structure in zip(axes[0], structures, strict=True):
        for model, values in sorted(points.get(structure, {}).items()):
            xs = [v[0] for v in values]
            ax.plot(xs, [v[1] for v in values], color=colours[model], marker="o", lw=2, label=f"{model}: ensemble")
            ax.plot(xs, [v[2] for v in values], color=colours[model], marker=".", ls="--", lw=1,
                    label=f"{model}: mean of branches")
        for model, lines in sorted(baselines.items()):
            for i, (value, name) in enumerate(lines):
                label = f"{model}: baseline" + (f" ({name})" if len(lines) > 1 else "")
                ax.axhline(value, color=colours[model], ls=":", lw=1.5, label=label, alpha=1.0 - 0.25 * i)
        ax.set(title=f"{structure}", xlabel=STRUCTURE_AXIS[structure], ylabel=f"validation {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


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
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
