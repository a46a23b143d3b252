"""Public pretrained weights as a model.safetensors that `model.init_from` takes (video_ens/models/importers.py).

    python tools/import_weights.py resnet152 --weights IMAGENET1K_V2 --out weights/resnet152_tv.safetensors
    python tools/import_weights.py s3d --weights KINETICS400_V1 --out weights/s3d_tv.safetensors
    python tools/import_weights.py resnet152 --state-dict resnet152-f82ba261.pth --out weights/r152.safetensors

--weights downloads torchvision's published file once (torch.hub's cache; no torchvision needed); --state-dict reads
a local one (.pth/.bin with weights_only, or .safetensors): torchvision's, or timm's default resnet152, which uses
the same names. It prints the architecture differences, what the import did about each, and the recipe model
section that builds the network and loads the file.
"""

from __future__ import annotations

import argparse
import json
import sys

from video_ens.models.importers import IMPORTERS, TORCHVISION_WEIGHTS
from video_ens.weights import import_pretrained, recipe_model_section


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("arch", choices=sorted(IMPORTERS), help="the source architecture")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--weights",
        help="torchvision's weights name: " + "; ".join(f"{a}: {', '.join(w)}" for a, w in TORCHVISION_WEIGHTS.items()),
    )
    source.add_argument("--state-dict", help="a local state dict file (.pth, .bin, .safetensors)")
    ap.add_argument("--out", required=True, help="the safetensors file to write")
    args = ap.parse_args(argv)
    try:
        imported = import_pretrained(args.arch, args.out, weights=args.weights, path=args.state_dict)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(imported.state)} tensors for model {imported.model}")
    if imported.dropped:
        print(f"not carried over from the source: {', '.join(imported.dropped)}")
    print("differences from the source's architecture, and what the import did:")
    for line in imported.differences:
        print(f"  - {line}")
    print("recipe model section that loads it:")
    print(json.dumps(recipe_model_section(imported, args.out), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
