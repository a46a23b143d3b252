#!/usr/bin/env python
"""Compare finished runs in one table, laid out like the paper's Tables 1-3.

    python tools/compare.py runs/k400_baseline runs/k400_mu2 runs/k400_lambda0 [--branches] [--markdown | --json]

One row per run folder: model, branches and width (N, branch width ratio, fork layer), loss structure and weight,
every metric of the ensemble from RUN/eval.json (with --branches, also each branch's, as "b0 / b1"), how it was
evaluated (mode: "full" whole videos, "clips 10x3" clips x crops averaged per video, "all_frames", "center_crop")
and on how many samples ("n/N" when bad samples left n of the N evaluated), #params and #FLOPs. Sizes are measured on the meta device the way the paper reports them (video_ens.models.size): parameters
with BN folded, FLOPs at batch 1 on the model's own input (S3D-G: 64 x 224^2 frames; DBoF: video level only),
counting multiply and add separately, once as pure 2 x MAC of convs and matmuls and once with the cheap ops
tf.profiler also counts ("+ew", which matches the paper's rounding on ResNet and DBoF, architecture.md 0.1).
Metrics are printed in %. A run without eval.json still gets its sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from video_ens.config import recipe_from_dict
from video_ens.models import builder_arguments
from video_ens.models.ensemble import resolve_width_ratio
from video_ens.models.size import model_size_report

GREEK = {"ensembling": "λ", "codistillation": "μ"}


def read_run(run_dir: Path) -> dict:
    recipe_path = run_dir / "recipe.json"
    eval_path = run_dir / "eval.json"
    result = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    if recipe_path.is_file():
        raw = json.loads(recipe_path.read_text())
    elif result is not None and "recipe" in result:
        raw = result["recipe"]
    else:
        raise FileNotFoundError(f"{run_dir}: no recipe.json (and no eval.json holding the recipe): is it a run folder?")
    return {"dir": run_dir, "recipe": recipe_from_dict(raw, source=str(recipe_path)), "eval": result}


_SIZE_CACHE: dict[str, dict] = {}


def sizes(model_cfg) -> dict:
    """model_size_report of the model the recipe builds (cached: sweeps repeat the same model)."""
    kwargs = model_cfg.builder_kwargs()
    key = json.dumps([model_cfg.name, kwargs], sort_keys=True, default=str)
    if key not in _SIZE_CACHE:
        _SIZE_CACHE[key] = model_size_report(model_cfg.name, **kwargs)
    return _SIZE_CACHE[key]


def row(run: dict, *, branches: bool) -> dict:
    recipe = run["recipe"]
    m = recipe.model
    kw = builder_arguments(m.name, **m.builder_kwargs())  # as create_model builds it
    num_branches = kw.get("num_branches") or 1
    fork = kw.get("fork")
    # family-specific branch settings, e.g. DBoF's branch_hidden_size / branch_mixtures, ResNet's branch_widths
    pinned = {k: v for k, v in kw.items() if k.startswith("branch_") and v}
    # a pinned branch width replaces the ratio (the builders refuse both); otherwise the builder's rule applies
    width_pinned = any(k in pinned for k in ("branch_hidden_size", "branch_widths"))
    ratio = None if width_pinned else resolve_width_ratio(kw.get("width_ratio"), num_branches)
    if num_branches == 1:
        config, loss = "single network", "baseline"
    else:
        parts = [f"{num_branches} branches after {fork}"] + (
            [f"width x{ratio:.3g}"] if ratio not in (None, 1.0) else []
        )
        parts += [f"{k.removeprefix('branch_')}={v}" for k, v in pinned.items()]
        config = ", ".join(parts)
        structure = recipe.objective.structure
        loss = f"{structure} {GREEK[structure]}={recipe.objective.weight:g}"
    size = sizes(m)
    out = {
        "run": run["dir"].name,
        "path": str(run["dir"]),
        "model": m.name,
        "num_branches": num_branches,
        "width_ratio": ratio,
        "fork": fork,
        "config": config,
        "structure": recipe.objective.structure,
        "weight": recipe.objective.weight,
        "loss": loss,
        "params": size["params"],
        "flops": size["flops"],
        "flops_ew": size["flops_ew"],
        "flops_input": size["input"],
        "metrics": None,
        "num_samples": None,
        "dataset_size": None,
        "mode": None,
        "views_per_video": None,
        "eval_mode": None,
    }
    result = run["eval"]
    if result is not None:
        out["metrics"] = dict(result["ensemble"])
        out["num_samples"] = result.get("num_samples")
        out["dataset_size"] = result.get("dataset_size")
        out["mode"] = result.get("mode")
        out["views_per_video"] = result.get("views_per_video")
        out["eval_mode"] = eval_mode(result)
        if branches:
            out["branch_metrics"] = [dict(b) for b in result.get("branches", [])]
    return out


def eval_mode(result: dict) -> str | None:
    """How eval.json's run evaluated: its mode, with clips x crops for mode "clips" ("clips 10x3")."""
    mode = result.get("mode")
    if mode != "clips":
        return mode
    ev = (result.get("recipe") or {}).get("eval") or {}
    if ev.get("num_clips") and ev.get("num_crops"):
        return f"clips {ev['num_clips']}x{ev['num_crops']}"
    views = result.get("views_per_video")
    return f"clips ({views} views)" if views else "clips"


def _samples(r: dict) -> str:
    n, size = r.get("num_samples"), r.get("dataset_size")
    if n is None:
        return "-"
    return f"{n}/{size}" if size is not None and size != n else str(n)


def _si(value: float) -> str:
    """The paper's style (M, B), with K for the tiny test models."""
    if value >= 1e9:
        return f"{value / 1e9:.2f}B"
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}K"


def table(rows: list[dict], *, branches: bool) -> tuple[list[str], list[list[str]]]:
    metric_names: list[str] = []
    for r in rows:
        for name in r["metrics"] or {}:
            if name not in metric_names:
                metric_names.append(name)
    head = ["run", "model", "width config", "loss", *metric_names]
    if branches:
        head += [f"{name} branches" for name in metric_names]
    head += ["eval", "samples", "#params", "#FLOPs", "#FLOPs +ew"]
    body = []
    for r in rows:
        metrics = r["metrics"] or {}
        cells = [r["run"], r["model"], r["config"], r["loss"]]
        cells += [f"{100 * metrics[n]:.2f}" if n in metrics else "-" for n in metric_names]
        if branches:
            per = r.get("branch_metrics") or []
            cells += [" / ".join(f"{100 * b[n]:.2f}" for b in per) if per else "-" for n in metric_names]
        cells += [r.get("eval_mode") or "-", _samples(r)]
        cells += [_si(r["params"]), _si(r["flops"]), _si(r["flops_ew"])]
        body.append(cells)
    return head, body


TEXT_COLUMNS = ("run", "model", "width config", "loss", "eval")  # left-aligned; numbers right-aligned


def format_plain(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = []
    for line in [head, *body]:
        pairs = zip(head, line, widths, strict=True)
        cells = [c.ljust(w) if name in TEXT_COLUMNS else c.rjust(w) for name, c, w in pairs]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def format_markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "".join("---|" if n in TEXT_COLUMNS else "---:|" for n in head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


FOOTNOTE = (
    "metrics: ensemble, in %. eval: evaluation mode; samples: videos/images evaluated (n/N: N - n bad). "
    "#params: BN folded. #FLOPs: batch 1, multiply and add counted apart "
    "(2 x MAC); +ew adds bias/BN adds, pooling, means, softmax as tf.profiler does."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="run folders (recipe.json, eval.json)")
    p.add_argument("--branches", action="store_true", help="also each branch's metrics")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="a markdown table")
    fmt.add_argument("--json", action="store_true", help="one JSON list of rows, raw values")
    a = p.parse_args(argv)
    try:
        rows = [row(read_run(d), branches=a.branches) for d in a.runs]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    head, body = table(rows, branches=a.branches)
    print(format_markdown(head, body) if a.markdown else format_plain(head, body))
    print()
    print(FOOTNOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
