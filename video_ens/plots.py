"""Figures of runs and evaluations, as PNG: training curves, the lambda / mu sweep (paper Figure 2), confusion matrix.

matplotlib is optional (the [plot] and [dev] extras) and imported here only, when a figure is first drawn; without
it every entry point raises `PlotUnavailable`, whose message says what to install. Each figure has a builder that
returns the matplotlib Figure (`curves_figure`, `sweep_figure`, `confusion_figure`; tests read them) and a `plot_*`
that writes it with `save_figure`, atomically. Metrics are fractions in the logs and percentages on every axis,
which never runs past 0-100.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from . import durable

__all__ = [
    "PlotUnavailable",
    "confusion_figure",
    "curves_figure",
    "final_evaluation",
    "plot_confusion",
    "plot_curves",
    "plot_sweep",
    "pyplot",
    "read_metrics",
    "read_run",
    "run_title",
    "save_figure",
    "sweep_figure",
    "sweep_points",
]

STRUCTURE_AXIS = {"ensembling": "λ (ensembling loss, eq. 2)", "codistillation": "μ (co-distillation loss, eq. 3)"}
STRUCTURE_NAME = {"ensembling": "ensembling λ", "codistillation": "co-distillation μ"}
DPI = 100
# Confusion matrices: class names on the axes up to this many classes (at 0.28 in per class a 60-class matrix is
# 20 in wide, names still legible at 7 pt); counts written in the cells up to CELL_COUNTS_MAX classes.
LABELLED_CLASSES_MAX = 60
CELL_COUNTS_MAX = 30


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display); PlotUnavailable without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "matplotlib is not installed, so no figure is drawn: pip install -e .[plot] (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, *, dpi: int = DPI) -> Path:
    """Write `fig` as a PNG, atomically and durably (video_ens.durable), and close it."""
    path = Path(path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_atomic(path, buffer.getvalue())
    return path


def _cap_percent(ax) -> None:
    """Clamp a percentage axis to [0, 100]: the autoscale margin would run it to 104% for a curve at 100%."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, 0.0), min(hi, 100.0))


# ------------------------------------------------------------------------------------------------------- reading


def read_metrics(run_dir: Path) -> dict[str, dict[int, dict]]:
    """metrics.jsonl by kind and step; a step logged twice (before a crash and after the resume) keeps the last."""
    path = Path(run_dir) / "metrics.jsonl"
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


def _read_recipe(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "recipe.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_run(run_dir: Path) -> dict:
    """The final evaluation and the recipe of a run: eval.json, and recipe.json (or the copy inside eval.json)."""
    run_dir = Path(run_dir)
    eval_path = run_dir / "eval.json"
    if not eval_path.is_file():
        raise FileNotFoundError(f"{eval_path}: the run has no final evaluation (tools/eval.py --run-dir {run_dir})")
    result = json.loads(eval_path.read_text())
    recipe = _read_recipe(run_dir) or result.get("recipe")
    if recipe is None:
        raise FileNotFoundError(f"{run_dir / 'recipe.json'}: no recipe.json, and eval.json holds no recipe")
    return {"name": run_dir.name, "eval": result, "recipe": recipe}


def final_evaluation(run_dir: Path, log: dict[str, dict[int, dict]] | None = None) -> tuple[dict, int | None] | None:
    """(result, step) of a run's last evaluation: the last "eval" record of metrics.jsonl (training logs its final
    evaluation there too), or else RUN_DIR/eval.json with no step; None if the run never evaluated."""
    log = read_metrics(run_dir) if log is None else log
    evals = log.get("eval") or {}
    if evals:
        step = max(evals)
        return evals[step], step
    path = Path(run_dir) / "eval.json"
    if path.is_file():
        return json.loads(path.read_text()), None
    return None


def run_title(recipe: dict | None, num_branches: int | None, run_name: str) -> str:
    """ "s3dg_tiny_ens2 (2 branches), co-distillation μ=2" then "run: NAME" on a second line; the folder name alone
    when there is no recipe. `num_branches` (from the logs) says whether the run is a baseline."""
    if recipe is None:
        return f"{run_name} (no recipe.json)"
    model = recipe.get("model", {}).get("name", "?")
    if num_branches == 1:
        what = f"{model} (single network), baseline"
    else:
        objective = recipe.get("objective", {})
        structure = objective.get("structure", "codistillation")
        weight = objective.get("weight")
        name = STRUCTURE_NAME.get(structure, structure)
        setting = f"{name}={float(weight):g}" if weight is not None else name
        what = f"{model} ({num_branches} branches), {setting}" if num_branches else f"{model}, {setting}"
    return f"{what}\nrun: {run_name}"


# ------------------------------------------------------------------------------------------------------- curves


def _final_bars(ax, result: dict, step: int | None) -> None:
    """Grouped bars of the final evaluation: one group per metric, one bar per head, each labelled with its %."""
    metrics = list(result["ensemble"])
    heads = [("ensemble", result["ensemble"])] + [(f"branch {i}", b) for i, b in enumerate(result.get("branches", []))]
    width = 0.8 / len(heads)
    x = np.arange(len(metrics))
    for j, (name, values) in enumerate(heads):
        heights = [100 * values[m] for m in metrics]
        colour = "black" if name == "ensemble" else f"C{j - 1}"
        xs = x + (j - (len(heads) - 1) / 2) * width
        ax.bar(xs, heights, width, label=name, color=colour, alpha=1.0 if name == "ensemble" else 0.8)
        for xi, h in zip(xs, heights, strict=True):
            # upright text inside the bar's top (the axis ends at 100, so nothing fits above a full bar), or just
            # above a bar too short to hold it
            inside = h >= 25
            ax.text(
                xi,
                h - 2 if inside else h + 2,
                f"{h:.1f}",
                rotation=90,
                ha="center",
                va="top" if inside else "bottom",
                fontsize="small",
                color="white" if inside else "black",
            )
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, 100)
    where = f"step {step}" if step is not None else "eval.json"
    samples = f", {result['num_samples']} samples" if "num_samples" in result else ""
    ax.set(title=f"final evaluation ({where}{samples})", ylabel="%")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(heads), frameon=False)


def curves_figure(run_dir: Path):
    """The figure of `plot_curves` (a matplotlib Figure)."""
    plt = pyplot()
    run_dir = Path(run_dir)
    log = read_metrics(run_dir)
    train = [log["train"][s] for s in sorted(log.get("train", {}))]
    evals = [log["eval"][s] for s in sorted(log.get("eval", {}))]
    final = final_evaluation(run_dir, log)
    if not train and final is None:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no train or eval records")
    # One evaluation is a point, not a curve: it is shown in the final panel only.
    metric_names = list(evals[-1]["ensemble"]) if len(evals) >= 2 else []
    truth = bool(train) and "branch_truth" in train[0]  # each head's own loss against the labels
    panels = 2 + truth + len(metric_names) + (final is not None)
    cols = 2
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    axes = axes.ravel()
    steps = [r["step"] for r in train]

    ax = axes[0]
    if train:
        ax.plot(steps, [r["loss"] for r in train], color="black", lw=2, label="total")
        ax.plot(steps, [r["ensemble"] for r in train], color="tab:red", lw=1.5, label="ensemble term")
        for i in range(len(train[0].get("branch", []))):
            ax.plot(steps, [r["branch"][i] for r in train], lw=1, alpha=0.8, label=f"branch {i} term")
        ax.legend(fontsize="small")
    for step in log.get("skip", {}):
        ax.axvline(step, color="tab:red", ls=":", lw=0.8)
    ax.set(title="training loss", xlabel="step", ylabel="loss")

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
    at = 2 + truth
    for ax, metric in zip(axes[at:], metric_names, strict=False):
        # clip_on=False: a curve at exactly 100% sits on the capped top edge and stays fully drawn
        ax.plot(
            eval_steps,
            [100 * r["ensemble"][metric] for r in evals],
            color="black",
            lw=2,
            marker=marker,
            label="ensemble",
            clip_on=False,
        )
        for i in range(len(evals[-1]["branches"])):
            ax.plot(
                eval_steps,
                [100 * r["branches"][i][metric] for r in evals],
                lw=1,
                marker=marker,
                alpha=0.8,
                label=f"branch {i}",
                clip_on=False,
            )
        ax.set(title=f"validation {metric}", xlabel="step", ylabel=f"{metric} (%)")
        _cap_percent(ax)
        ax.legend(fontsize="small")
    at += len(metric_names)
    if final is not None:
        _final_bars(axes[at], *final)
        at += 1
    for ax in axes[at:]:
        ax.set_visible(False)
    if train:
        num_branches = len(train[0].get("branch", [])) or None
    else:
        num_branches = len(final[0].get("branches", [])) or None
    fig.suptitle(run_title(_read_recipe(run_dir), num_branches, run_dir.name))
    fig.tight_layout()
    return fig


def plot_curves(run_dir: Path, out: Path) -> Path:
    """Training curves of one run from RUN_DIR/metrics.jsonl as a PNG: the total loss, each branch's term and the
    ensemble term; the learning rate; with two or more evaluations, every metric of the ensemble and each branch
    against the step; and the final evaluation as labelled bars. Titled with the model and objective."""
    return save_figure(curves_figure(run_dir), out)


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


def sweep_figure(run_dirs: list[Path], metric: str | None = None):
    """The figure of `plot_sweep`."""
    plt = pyplot()
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
            ax.plot(
                xs,
                [v[2] for v in values],
                color=colours[model],
                marker=".",
                ls="--",
                lw=1,
                label=f"{model}: mean of branches",
            )
        for model, lines in sorted(baselines.items()):
            for i, (value, name) in enumerate(lines):
                label = f"{model}: baseline" + (f" ({name})" if len(lines) > 1 else "")
                ax.axhline(value, color=colours[model], ls=":", lw=1.5, label=label, alpha=1.0 - 0.25 * i)
        ax.set(title=f"{structure}", xlabel=STRUCTURE_AXIS[structure], ylabel=f"validation {metric} (%)")
        _cap_percent(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_sweep(run_dirs: list[Path], out: Path, metric: str | None = None) -> Path:
    """The paper's Figure 2 as a PNG: the ensemble's validation metric (and the mean of its branches, dashed)
    against lambda for ensembling runs and against mu for co-distillation runs, one panel each, from each run's
    eval.json and recipe; single-branch runs are baselines, drawn as horizontal lines in every panel."""
    return save_figure(sweep_figure(run_dirs, metric), out)


# ------------------------------------------------------------------------------------------------------- confusion


def confusion_figure(confusion: Any, class_names: list[str] | None = None, *, title: str = ""):
    """A confusion matrix (rows true class, columns predicted class, counts) drawn as each row's share of its true
    class in %, so that rare and frequent classes read alike. Up to LABELLED_CLASSES_MAX classes the axes carry the
    class names (and up to CELL_COUNTS_MAX the cells their counts); beyond, the class indices."""
    plt = pyplot()
    matrix = np.asarray(confusion, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion must be a square (C, C) matrix, got shape {matrix.shape}")
    num_classes = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class confusion matrix")
    support = matrix.sum(axis=1, keepdims=True)
    share = np.zeros(matrix.shape)
    np.divide(100.0 * matrix, support, out=share, where=support > 0)
    labelled = num_classes <= LABELLED_CLASSES_MAX
    side = min(3.0 + 0.28 * num_classes, 20.0) if labelled else 12.0
    fig, ax = plt.subplots(figsize=(side + 1.5, side))  # + the colour bar
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    if labelled:
        ax.set_xticks(range(num_classes), names, rotation=90, fontsize=7)
        ax.set_yticks(range(num_classes), names, fontsize=7)
    if num_classes <= CELL_COUNTS_MAX:
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                ax.text(
                    col,
                    row,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[row, col] > 50 else "black",
                )
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.tight_layout()
    return fig


def plot_confusion(confusion: Any, out: Path, class_names: list[str] | None = None, *, title: str = "") -> Path:
    """`confusion_figure` written as a PNG."""
    return save_figure(confusion_figure(confusion, class_names, title=title), out)
