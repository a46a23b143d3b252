#!/usr/bin/env python
"""Run a trained model on video files, images or YouTube-8M feature files: top classes, and embeddings.

    python tools/predict.py --run-dir runs/demo_kinetics_s3dg_mu2 clip.mp4 more_clips/ list_of_paths.txt
    python tools/predict.py --run-dir RUN --top-k 3 --branches phone.mov          # each branch's top 3 as well
    python tools/predict.py --run-dir RUN --json clips/ > predictions.jsonl       # one JSON object per input
    python tools/predict.py --recipe recipes/kinetics_s3dg_mu2.json --weights model.safetensors \\
        --set eval.mode=clips --embeddings emb/ clips/                          # 10 x 3 views; embeddings to emb/

PATH: a file (any container PyAV opens, whatever its name), a folder (its files with a known ending, recursively)
or a .txt list of paths, one per line. A file becomes what evaluation makes of a sample of the recipe's data
(eval.mode "full" or "clips", short side and crop; videos turned upright and given square pixels from their
rotation metadata and sample aspect ratio; images by their EXIF orientation). Feature models take .npy (T, 1152),
rgb then audio per frame, float or uint8-quantized, or .npz with "rgb" and "audio" (video_ens/predict.py).

Prints the input's path and the ensemble's top-k classes with probabilities (with --branches, each branch's too).
--json prints instead one object per input: {"video": path, "ensemble": [{"label": name, "score": p}, ...],
"branches": [[...], ...]}, the ensemble's scores being the mean of the branches' (softmax probabilities, or the
sigmoid scores of multi-label models). Class names: the run's training dataset's _info.json, else --labels.

--embeddings OUT writes the pooled representation of the shared base and of every branch for each input, streamed
in shards of --shard-size inputs: OUT/index.json, OUT/<shard>.{base,branch<i>}.npy, OUT/<shard>.ids.json
(video_ens.predict.EmbeddingWriter; read them with video_ens.predict.read_embeddings).

Files that cannot be read are named on stderr and skipped. Exit status: 0 if at least one input was predicted, 1
if none was, 2 for a bad recipe, weights or arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from video_ens import cli, dist
from video_ens.config import RecipeError
from video_ens.predict import (
    EmbeddingWriter,
    Predictor,
    Skipped,
    embeddings_metadata,
    find_inputs,
    format_text,
    predict_all,
    prediction_record,
)

LOG = dist.get_logger("video_ens.tools.predict")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="files, folders, or .txt lists of paths")
    cli.add_model_source(p, "which model (either --run-dir, or --recipe with --weights)")
    cli.add_overrides(p, "eval.mode=clips, eval.num_clips=10, eval.batch_size=30")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per head (default 5)")
    p.add_argument("--branches", action="store_true", help="also print each branch's top classes")
    p.add_argument("--json", action="store_true", help="print one JSON object per input instead of text")
    p.add_argument(
        "--labels",
        type=Path,
        help="class names: a text file (one per line) or a dataset folder; default: the run's training data",
    )
    p.add_argument("--embeddings", type=Path, metavar="OUT", help="write pooled embeddings to this new folder")
    p.add_argument("--shard-size", type=int, default=1024, help="inputs per embeddings shard (default 1024)")
    cli.add_device(p)
    cli.add_precision(p)
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines; 0 = none")
    args = p.parse_args(argv)
    cli.check_model_source(p, args)
    if args.top_k < 1:
        p.error("--top-k must be >= 1")
    if args.shard_size < 1:
        p.error("--shard-size must be >= 1")
    return args


def run(args: argparse.Namespace) -> int:
    recipe, weights = cli.model_files(args)
    predictor = Predictor.load(
        recipe=recipe,
        weights=weights,
        overrides=args.overrides,
        device=args.device,
        precision=args.precision,
        labels=args.labels,
    )
    inputs, missing = find_inputs(args.paths, predictor.kind)
    for skip in missing:
        print(f"skipped {skip.id}: {skip.reason}", file=sys.stderr)
    LOG.info(
        f"{len(inputs)} input(s), {predictor.recipe.model.name} ({predictor.mode}) on {predictor.device}, "
        f"precision {predictor.precision}; class names from {predictor.names_source}"
    )
    top = min(args.top_k, len(predictor.class_names))
    done = 0
    with contextlib.ExitStack() as stack:  # the writer's exit writes its last shard (index complete only on success)
        writer = None
        if args.embeddings is not None:
            writer = stack.enter_context(
                EmbeddingWriter(args.embeddings, shard_size=args.shard_size, metadata=embeddings_metadata(predictor))
            )
        for result in predict_all(predictor, inputs, embed=writer is not None, log_every_s=args.log_every):
            if isinstance(result, Skipped):
                print(f"skipped {result.id}: {result.reason}", file=sys.stderr, flush=True)
                continue
            done += 1
            if writer is not None:
                writer.add(result.id, result.base, result.embeddings)
            if args.json:
                print(json.dumps(prediction_record(result, predictor.class_names, top), ensure_ascii=False))
            else:
                print(format_text(result, predictor.class_names, top, branches=args.branches))
            sys.stdout.flush()
    if writer is not None:
        LOG.info(f"wrote embeddings of {writer.num_inputs} input(s) to {args.embeddings}")
    if done == 0:
        print(f"error: none of the {len(inputs) + len(missing)} input(s) could be predicted", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (RecipeError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
