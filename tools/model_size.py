"""Parameters and FLOPs of the paper's eight configurations, measured, next to the paper's Tables 1-3.

    python tools/model_size.py                        # the table
    python tools/model_size.py --models resnet152,dbof
    python tools/model_size.py --json                 # one JSON list, for scripts

Conventions (design/architecture.md 0.1): parameters with BN folded (one value per BN channel); FLOPs at batch 1
counting multiply and add separately, both as pure 2 x MAC of the convs and matmuls and "+ew" (adding the cheap
ops tf.profiler counts: bias and folded-BN adds, residual adds, SE multiplies, pooling, means, softmax).
ResNet on 1 x 3 x 224^2, S3D-G on 1 x 3 x 64 x 224^2, DBoF on one video's pooled features: its frame-level layers
are excluded as in the paper, and their per-frame cost is shown apart. Everything runs on the meta device, so the
whole table takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys

from video_ens.models import MODELS
from video_ens.models.size import model_size_report

# Paper values as printed, (#Params, #FLOPs): Tables 1a/1b (ImageNet), 2 (YouTube-8M), 3 (Kinetics).
PAPER: dict[str, tuple[str, str]] = {
    "s3dg": ("9.7M", "129B"),
    "s3dg_ens2": ("9.7M", "129B"),
    "dbof": ("229M", "415M"),
    "dbof_ens2": ("226M", "410M"),
    "resnet152": ("60.1M", "21.8B"),
    "resnet152_ens2": ("58.2M", "21.0B"),
    "seresnet152": ("66.7M", "21.9B"),
    "seresnet152_ens2": ("64.5M", "21.1B"),
}
_SUFFIX = {"M": 1e6, "B": 1e9}

NOTES: dict[str, str] = {
    "s3dg": "the paper's 9.7M is 1.9% above every reading of S3D-G tried (architecture.md 2.5); FLOPs agree",
    "s3dg_ens2": (
        "Table 3 repeats the baseline's 9.7M / 129B for this row, but the width config it states (branches "
        "(554), every branch width round(c / 1.5)) gives 8.84M / 126-127B; both are shown (architecture.md 2.5)"
    ),
    "dbof": "video-level FLOPs only, as in the paper (architecture.md 3.5)",
    "dbof_ens2": "video-level FLOPs only, as in the paper (architecture.md 3.5)",
}


def _value(printed: str | None) -> float | None:
    return None if printed is None else float(printed[:-1]) * _SUFFIX[printed[-1]]


def _delta(measured: float, paper: float | None) -> float | None:
    """Percent difference from the paper's value, which is itself rounded to 2-3 digits."""
    return None if paper is None else 100.0 * (measured - paper) / paper


def _row(name: str) -> dict:
    r = model_size_report(name)
    paper_params, paper_flops = PAPER.get(name, (None, None))
    r["paper_params"] = _value(paper_params)
    r["paper_flops"] = _value(paper_flops)
    r["paper_printed"] = None if paper_params is None else f"{paper_params} / {paper_flops}"
    r["params_delta_pct"] = _delta(r["params"], r["paper_params"])
    r["flops_delta_pct"] = _delta(r["flops"], r["paper_flops"])
    r["flops_ew_delta_pct"] = _delta(r["flops_ew"], r["paper_flops"])
    r["note"] = NOTES.get(name)
    return r


def _si(value: float, digits: int = 3) -> str:
    """In M below 1e9, else in B, as the paper writes its sizes."""
    scale, suffix = (1e9, "B") if value >= 1e9 else (1e6, "M")
    return f"{value / scale:.{digits}f}{suffix}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def _table(rows: list[dict]) -> str:
    head = ["model", "params", "paper", "Δ", "FLOPs 2·MAC", "Δ", "FLOPs +ew", "Δ", "paper", "input"]
    body = []
    for r in rows:
        paper_params, paper_flops = PAPER.get(r["name"], ("-", "-"))
        body.append(
            [
                r["name"],
                _si(r["params"]),
                paper_params,
                _pct(r["params_delta_pct"]),
                _si(r["flops"]),
                _pct(r["flops_delta_pct"]),
                _si(r["flops_ew"]),
                _pct(r["flops_ew_delta_pct"]),
                paper_flops,
                "x".join(str(d) for d in r["input"]),
            ]
        )
    grid = [head, *body]
    widths = [max(len(line[i]) for line in grid) for i in range(len(head))]
    lines = []
    for line in grid:  # names left-aligned, numbers right-aligned, the input shape last and unpadded
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:-1], widths[1:-1], strict=True)]
        lines.append("  ".join([*cells, line[-1]]))
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append("params: BN folded (one value per BN channel). FLOPs: batch 1, multiply and add counted apart.")
    for r in rows:
        if "frame_flops" in r:
            lines.append(
                f"{r['name']}: frame-level base (not counted above) costs {_si(r['frame_flops'], 2)} "
                f"({_si(r['frame_flops_ew'], 2)} +ew) per frame"
            )
    for r in rows:
        if r["note"]:
            lines.append(f"{r['name']}: {r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(PAPER), help="comma-separated model names (default: the paper's 8)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        p.error(f"unknown model(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(sorted(MODELS))}")
    rows = [_row(n) for n in names]
    if a.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
